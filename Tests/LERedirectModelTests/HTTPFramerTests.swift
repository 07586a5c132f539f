@testable import LERedirectModel
import Testing

/// The proxy's framing of each direction, driven without a socket: bytes split at every point
/// frame the same, nothing is lost or duplicated, limits hold however a head arrives.
struct HTTPFramerTests {
    /// What the framer made of a stream: heads (parsed, then `expect`ed as a proxy would), body
    /// and pass-through bytes, in order; and how it stopped.
    struct Transcript: Equatable {
        var pieces: [String] = []
        var stopped: String?
    }

    /// Feeds `chunks` one after another, as reads. A head is parsed as a request or a response
    /// (to a GET) and its body expected; `onHead` may change that (a tunnel accepted).
    static func frame(
        _ direction: HTTPFramer.Direction, _ chunks: [[UInt8]], limit: Int = 1024,
        onHead: ((inout HTTPFramer, String) -> Void)? = nil
    ) -> Transcript {
        var framer = HTTPFramer(direction, headLimit: limit)
        var t = Transcript()
        func head(_ raw: UnsafeRawBufferPointer) {
            let text = String(decoding: raw, as: UTF8.self)
            t.pieces.append("head " + text)
            let skip = HTTPHead.leadingEmptyLines(raw)
            let body: HTTPHead.Body
            if direction == .request {
                body = (try? HTTPHead.parseRequest(UnsafeRawBufferPointer(rebasing: raw[skip...])))?.body ?? .none
            } else {
                body = (try? HTTPHead.parseResponse(raw, requestMethod: .get))?.body ?? .none
            }
            framer.expect(body)
            onHead?(&framer, text)
        }
        for chunk in chunks {
            chunk.withUnsafeBytes { input in
                var i = 0
                loop: while true {
                    switch framer.step(input, at: i) {
                    case .head(let range):
                        head(UnsafeRawBufferPointer(rebasing: input[range]))
                        i = range.upperBound
                    case .assembledHead(let upTo):
                        let bytes = framer.takeHead()
                        bytes.withUnsafeBytes { head($0) }
                        i = upTo
                    case .body(let range, let ends):
                        t.pieces.append("body " + String(decoding: input[range], as: UTF8.self) + (ends ? " <end>" : ""))
                        i = range.upperBound
                    case .passThrough(let range):
                        t.pieces.append("pass " + String(decoding: input[range], as: UTF8.self))
                        i = range.upperBound
                    case .held, .end:
                        break loop
                    case .headTooLarge:
                        t.stopped = "too large, \(framer.heldCount) held"
                        return
                    case .brokenChunks:
                        t.stopped = "broken chunks"
                        return
                    }
                }
            }
            if t.stopped != nil { break }
        }
        return t
    }

    /// Merges adjacent body / pass-through pieces, so that transcripts of different splits compare.
    static func merged(_ t: Transcript) -> Transcript {
        var out = Transcript(stopped: t.stopped)
        for piece in t.pieces {
            if let last = out.pieces.last, piece.hasPrefix("body "), last.hasPrefix("body "), !last.hasSuffix(" <end>") {
                out.pieces[out.pieces.count - 1] = last + piece.dropFirst(5)
            } else if let last = out.pieces.last, piece.hasPrefix("pass "), last.hasPrefix("pass ") {
                out.pieces[out.pieces.count - 1] = last + piece.dropFirst(5)
            } else {
                out.pieces.append(piece)
            }
        }
        return out
    }

    static let pipelined = Array(
        ("POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
            + "POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            + "\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n").utf8)

    @Test func pipelinedRequestsFrameTheSameSplitAnywhere() {
        let whole = Self.merged(Self.frame(.request, [Self.pipelined]))
        #expect(whole.pieces.count == 5, "\(whole)")
        #expect(whole.pieces[1] == "body hello <end>")
        #expect(whole.pieces[3] == "body 3\r\nabc\r\n0\r\n\r\n <end>")
        #expect(whole.pieces[4].hasPrefix("head \r\nGET /c"))
        for split in 1..<Self.pipelined.count {
            let two = Self.frame(.request, [Array(Self.pipelined[..<split]), Array(Self.pipelined[split...])])
            #expect(Self.merged(two) == whole, "split at \(split)")
        }
        // Byte by byte.
        #expect(Self.merged(Self.frame(.request, Self.pipelined.map { [$0] })) == whole)
    }

    @Test func aRequestHeadOverTheLimitIsRefusedHoweverItArrives() {
        let head = Array(("GET / HTTP/1.1\r\nX: " + String(repeating: "a", count: 2000) + "\r\n\r\n").utf8)
        #expect(Self.frame(.request, [head]).stopped?.hasPrefix("too large") == true)
        for size in [1, 7, 100, 1000] {
            let chunks = stride(from: 0, to: head.count, by: size).map { Array(head[$0..<min($0 + size, head.count)]) }
            let t = Self.frame(.request, chunks)
            #expect(t.stopped?.hasPrefix("too large") == true, "in pieces of \(size): \(t)")
            #expect(t.pieces.isEmpty)
        }
        // At the limit it passes.
        let fits = Array(("GET / HTTP/1.1\r\nX: " + String(repeating: "a", count: 990) + "\r\n\r\n").utf8)
        #expect(fits.count <= 1024 + 4)
        #expect(Self.frame(.request, [Array(fits[..<500]), Array(fits[500...])]).pieces.count == 1)
    }

    @Test func aResponseItCannotFollowPassesAsItIs() {
        // A head four times the request limit: everything, the held part first, passes.
        let big = Array(("HTTP/1.1 200 OK\r\nX: " + String(repeating: "b", count: 5000) + "\r\n\r\nbody").utf8)
        var framer = HTTPFramer(.response, headLimit: 4096)
        var out: [UInt8] = []
        for chunk in [Array(big[..<3000]), Array(big[3000...])] {
            chunk.withUnsafeBytes { input in
                var i = 0
                loop: while true {
                    switch framer.step(input, at: i) {
                    case .held, .end: break loop
                    case .headTooLarge:
                        out += framer.takeHead()
                        framer.passEverything()
                    case .passThrough(let range):
                        out += input[range]
                        i = range.upperBound
                    default:
                        Issue.record("unexpected step")
                        break loop
                    }
                }
            }
        }
        #expect(out == big)
        // A body that ends when the app closes passes whole.
        let t = Self.frame(.response, [Array("HTTP/1.0 200 OK\r\n\r\nall of".utf8), Array(" it".utf8)])
        #expect(Self.merged(t).pieces.last == "pass all of it")
    }

    @Test func brokenChunksAreSaid() {
        let t = Self.frame(.request, [Array("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".utf8)])
        #expect(t.stopped == "broken chunks")
    }

    /// After a tunnel is accepted everything passes, whatever it looks like.
    @Test func aTunnelPassesEverything() {
        let t = Self.frame(.response, [Array("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nHTTP/1.1 200 OK\r\n\r\n".utf8)]) {
            framer, _ in framer.passEverything()
        }
        #expect(t.pieces.count == 2 && t.pieces[1] == "pass HTTP/1.1 200 OK\r\n\r\n", "\(t)")
    }
}
