import LERedirectModel
import Testing

struct HTTPHeadTests {
    func request(_ text: String) throws -> HTTPHead.Request {
        let bytes = Array(text.utf8)
        return try bytes.withUnsafeBytes { (raw) throws(HTTPHead.Failure) in
            guard let end = HTTPHead.end(of: raw) else { throw .malformed("no end") }
            return try HTTPHead.parseRequest(UnsafeRawBufferPointer(rebasing: raw[..<end]))
        }
    }

    func response(_ text: String, method: HTTPHead.Method = .get) throws -> HTTPHead.Response {
        let bytes = Array(text.utf8)
        return try bytes.withUnsafeBytes { (raw) throws(HTTPHead.Failure) in try HTTPHead.parseResponse(raw, requestMethod: method) }
    }

    @Test func routesChallengesByTheirFirstLine() throws {
        #expect(try request("GET /.well-known/acme-challenge/abc_-9 HTTP/1.1\r\nHost: x\r\n\r\n").challengeToken == "abc_-9")
        #expect(try request("HEAD /.well-known/acme-challenge/t HTTP/1.0\r\n\r\n").challengeToken == "t")
        #expect(try request("POST /.well-known/acme-challenge/t HTTP/1.1\r\nContent-Length: 0\r\n\r\n").challengeToken == nil)
        #expect(try request("GET /.well-known/acme-challenge HTTP/1.1\r\n\r\n").challengeToken == nil)
        #expect(try request("GET /index.html HTTP/1.1\r\n\r\n").challengeToken == nil)
        #expect(try request("GET /.well-known/acme-challenge/../x HTTP/1.1\r\n\r\n").challengeToken == "../x")
        #expect(!ChallengeToken.isValid("../x") && !ChallengeToken.isValid("a%2Fb") && ChallengeToken.isValid("aZ09_-"))
    }

    @Test func findsTheEndOfAHeadSplitAnywhere() {
        let text = Array("GET / HTTP/1.1\r\nHost: x\r\n\r\nNEXT".utf8)
        for split in 1..<text.count {
            var buffer: [UInt8] = Array(text[..<split])
            var found = buffer.withUnsafeBytes { HTTPHead.end(of: $0) }
            if found == nil {
                let before = buffer.count
                buffer += text[split...]
                found = buffer.withUnsafeBytes { HTTPHead.end(of: $0, from: before - 3) }
            }
            #expect(found == text.count - 4, "split at \(split)")
        }
        #expect(Array("GET / HTTP/1.0\n\n".utf8).withUnsafeBytes { HTTPHead.end(of: $0) } == 16)
        #expect(Array("GET / HTTP/1.1\r\nHost: x\r\n".utf8).withUnsafeBytes { HTTPHead.end(of: $0) } == nil)
    }

    @Test func bodyFramingAndKeepAlive() throws {
        let get = try request("GET / HTTP/1.1\r\n\r\n")
        #expect(get.body == .none && get.keepAlive && get.method == .get)
        #expect(try request("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n").body == .length(12))
        #expect(try request("POST / HTTP/1.1\r\ncontent-length: 7, 7\r\n\r\n").body == .length(7))
        #expect(try request("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").body == .chunked)
        #expect(try !request("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keepAlive)
        #expect(try !request("GET / HTTP/1.0\r\n\r\n").keepAlive)
        #expect(try request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keepAlive)
        #expect(try request("GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n").upgrade)
        #expect(try request("CONNECT a:443 HTTP/1.1\r\n\r\n").method == .connect)
    }

    @Test(arguments: [
        "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
        "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        "GET / HTTP/2.0\r\n\r\n", "GET /\r\n\r\n", "GET  / HTTP/1.1\r\n\r\n", "G(T / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", "GET / HTTP/1.1\r\n: x\r\n\r\n", "GET / HTTP/1.1\r\nX: a\u{1}b\r\n\r\n",
        "\u{16}\u{3}\u{1}\u{2}\u{0}\r\n\r\n",
    ])
    func refusesMalformedAndAmbiguousRequests(_ text: String) {
        #expect(throws: (any Error).self) { try request(text) }
    }

    @Test func responseFraming() throws {
        #expect(try response("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n").body == .length(3))
        #expect(try response("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", method: .head).body == .none)
        #expect(try response("HTTP/1.1 204 No Content\r\n\r\n").body == .none)
        #expect(try response("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n").body == .none)
        #expect(try response("HTTP/1.1 100 Continue\r\n\r\n").interim)
        #expect(try !response("HTTP/1.1 101 Switching Protocols\r\n\r\n").interim)
        #expect(try response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n").body == .chunked)
        let close = try response("HTTP/1.0 200 OK\r\n\r\n")
        #expect(close.body == .untilClose && !close.keepAlive)
        #expect(try response("HTTP/1.1 200 OK\r\n\r\n", method: .connect).body == .untilClose)
    }

    @Test func rewritingKeepsEveryOtherByte() {
        let head = Array("HTTP/1.1 200 OK\r\nServer: x\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-A: b\r\n\r\n".utf8)
        let out = head.withUnsafeBytes { HTTPHead.rewrite($0, dropping: ["connection", "keep-alive"], adding: ["Connection: close"]) }
        #expect(String(decoding: out, as: UTF8.self) == "HTTP/1.1 200 OK\r\nServer: x\r\nX-A: b\r\nConnection: close\r\n\r\n")
    }
}

struct ChunkedScannerTests {
    func scanAll(_ pieces: [String]) throws -> (Int?, Int) {
        var scanner = ChunkedScanner()
        var total = 0
        for piece in pieces {
            let bytes = Array(piece.utf8)
            let end = try bytes.withUnsafeBytes { (raw) throws(HTTPHead.Failure) in try scanner.scan(raw, from: 0) }
            if let end { return (total + end, total + bytes.count) }
            total += bytes.count
        }
        return (nil, total)
    }

    @Test func findsTheEndHoweverTheBodyIsSplit() throws {
        let body = "5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: t\r\n\r\n"
        let bytes = Array(body.utf8)
        for split in 0...bytes.count {
            let pieces = [String(decoding: bytes[..<split], as: UTF8.self), String(decoding: bytes[split...], as: UTF8.self) + "NEXT"]
            let (end, _) = try scanAll(pieces)
            #expect(end == bytes.count, "split at \(split)")
        }
        #expect(try scanAll(["0\r\n\r\n"]).0 == 5)
        #expect(try scanAll(["3\r\nabc\r\n"]).0 == nil)
    }

    @Test(arguments: ["x\r\n", "5\r\nhelloX\r\n", "5\rX", "fffffffffffffffff\r\n", "\r\n"])
    func refusesBrokenChunks(_ text: String) {
        #expect(throws: (any Error).self) { try scanAll([text]) }
    }
}
