// What must hold for any input to the request-head scanner and the journal decoder. Compiled twice:
// into these tests (run over Tests/Fuzz's seeds and every crash the fuzzer ever found), and by
// scripts/fuzz into libFuzzer binaries together with LERedirectModel's sources (-D FUZZING), where
// a violation traps so that libFuzzer keeps the input.
#if !FUZZING
@testable import LERedirectModel
#endif

enum FuzzProperties {
    /// One broken property, with enough said to find it again.
    struct Violation: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    static func check(_ condition: Bool, _ message: @autoclosure () -> String) throws {
        if !condition { throw Violation(message()) }
    }

    // MARK: The request-head scanner

    /// The proxy's view of a client's bytes: where the head ends however the bytes are split across
    /// reads; what a parsed head says; that its rewrites frame the message as the original did.
    /// Then the same bytes as a response head and as a chunked body.
    static func head(_ bytes: [UInt8]) throws {
        try framing(bytes)
        try bytes.withUnsafeBytes { all in
            let end = HTTPHead.end(of: all)
            if let end {
                try check(end >= 2 && end <= all.count && all[end - 1] == 10, "end \(String(describing: end)) is not just past an LF")
            }
            // Split anywhere (the proxy searches again from 3 bytes before the new ones).
            for split in stride(from: 0, through: all.count, by: max(1, all.count / 128)) {
                let first = HTTPHead.end(of: UnsafeRawBufferPointer(rebasing: all[..<split]))
                let found = first ?? HTTPHead.end(of: all, from: split - 3)
                try check(found == end, "split at \(split): end \(String(describing: found)), in one read \(String(describing: end))")
            }
            guard let end else { return try chunked(all) }
            let raw = UnsafeRawBufferPointer(rebasing: all[..<end])
            let head = UnsafeRawBufferPointer(rebasing: raw[HTTPHead.leadingEmptyLines(raw)...])
            if let request = try? HTTPHead.parseRequest(head) {
                try parsedRequest(request, head)
            }
            for method in [HTTPHead.Method.get, .head, .connect, .other] {
                if let response = try? HTTPHead.parseResponse(head, requestMethod: method) {
                    try parsedResponse(response, head, method)
                }
            }
            try chunked(UnsafeRawBufferPointer(rebasing: all[end...]))
        }
    }

    private static func parsedRequest(_ request: HTTPHead.Request, _ head: UnsafeRawBufferPointer) throws {
        if let token = request.challengeToken {
            try check(request.method == .get || request.method == .head, "a challenge token on a \(request.method) request")
            try check(
                !token.utf8.contains(where: { $0 <= 32 || $0 == 127 }), "the token \(token.debugDescription) holds a space or a control byte")
        }
        try check(request.minorVersion >= 0 && request.minorVersion <= 9, "HTTP/1.\(request.minorVersion)")
        // Both rewrites the proxy makes: the app must frame them exactly as the client's head.
        let rewrites: [([StaticString], [String])] = [
            (["connection", "keep-alive"], ["Connection: close"]),
            (["x-forwarded-for", "x-forwarded-proto", "forwarded"], ["X-Forwarded-For: 192.0.2.1", "Forwarded: for=192.0.2.1;proto=http"]),
        ]
        for (drop, add) in rewrites {
            let rewritten = HTTPHead.rewrite(head, dropping: drop, adding: add)
            try rewritten.withUnsafeBytes { out in
                try check(HTTPHead.end(of: out) == out.count, "a rewritten head does not end where it should")
                let again: HTTPHead.Request
                do { again = try HTTPHead.parseRequest(out) } catch {
                    throw Violation("a rewritten head does not parse: \(error)")
                }
                try check(
                    again.method == request.method && again.challengeToken == request.challengeToken
                        && again.body == request.body && again.minorVersion == request.minorVersion,
                    "a rewritten head reads differently: \(again) for \(request)")
                if add == ["Connection: close"] {
                    try check(!again.keepAlive, "Connection: close did not end keep-alive")
                }
            }
        }
    }

    private static func parsedResponse(_ response: HTTPHead.Response, _ head: UnsafeRawBufferPointer, _ method: HTTPHead.Method)
        throws
    {
        try check(response.status >= 0 && response.status <= 999, "status \(response.status)")
        if response.body == .untilClose { try check(!response.keepAlive, "keep-alive on a body that ends at close") }
        let closing = HTTPHead.rewrite(head, dropping: ["connection", "keep-alive"], adding: ["Connection: close"])
        try closing.withUnsafeBytes { out in
            try check(HTTPHead.end(of: out) == out.count, "a rewritten response head does not end where it should")
            let again: HTTPHead.Response
            do { again = try HTTPHead.parseResponse(out, requestMethod: method) } catch {
                throw Violation("a rewritten response head does not parse: \(error)")
            }
            try check(again.status == response.status && again.body == response.body, "a rewritten response reads differently")
            try check(!again.keepAlive, "Connection: close did not end keep-alive on a response")
        }
    }

    /// A chunked body: the same end (or the same refusal) in one read, split anywhere, byte by byte.
    private static func chunked(_ body: UnsafeRawBufferPointer) throws {
        func scan(_ splits: [Int]) -> Result<Int?, HTTPHead.Failure> {
            var scanner = ChunkedScanner()
            var start = 0
            for stop in splits + [body.count] where stop >= start {
                let piece = UnsafeRawBufferPointer(rebasing: body[..<stop])
                do {
                    if let end = try scanner.scan(piece, from: start) { return .success(end) }
                } catch {
                    return .failure(error)
                }
                start = stop
            }
            return .success(nil)
        }
        let whole = scan([])
        if case .success(let end?) = whole {
            try check(end > 0 && end <= body.count && body[end - 1] == 10, "a chunked body ends at \(end), not after an LF")
        }
        for split in stride(from: 0, through: body.count, by: max(1, body.count / 64)) {
            let result = scan([split])
            try check(result == whole, "chunked split at \(split): \(result), in one read \(whole)")
        }
        try check(scan(Array(0..<body.count)) == whole, "chunked byte by byte differs from one read")
    }

    // MARK: The journal decoder

    /// Any text: decoding either refuses it or yields a journal that encodes and decodes to itself.
    /// The fuzzer rarely guesses a CRC, so the text is also tried with its checksum line made right.
    static func journal(_ bytes: [UInt8]) throws {
        let text = String(decoding: bytes, as: UTF8.self)
        try roundTrip(text)
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        if lines.last == "" { lines.removeLast() }
        if let last = lines.last, last.hasPrefix("crc32") { lines.removeLast() }
        let body = lines.map { $0 + "\n" }.joined()
        try roundTrip(body + "crc32 \(Hex.format(CRC32.checksum(body.utf8), width: 8))\n")
    }

    private static func roundTrip(_ text: String) throws {
        guard let journal = try? Journal.decode(text) else { return }
        let encoded = journal.encoded()
        let again: Journal
        do { again = try Journal.decode(encoded) } catch {
            throw Violation("a decoded journal does not decode once encoded (\(error)):\n\(encoded)")
        }
        try check(again == journal, "a journal reads differently once encoded:\n\(encoded)")
        for entry in journal.rules {
            for name in [entry.chain.table.name, entry.chain.name] {
                try check(Journal.Name.decode(Substring(Journal.Name.encode(name))) == name, "name \(name.debugDescription) does not round-trip")
            }
        }
    }

    // MARK: The proxy's framer

    /// The framer makes the same of the bytes in one read and split in two (at 16 points), as a
    /// request stream and as a response stream: the same heads, the same body bytes in the same
    /// order, the same end. One allowance, as any streaming relay has it: when the framing breaks
    /// (a malformed chunked body), bytes that looked valid up to the end of a read were passed on
    /// before the next read showed the error, so what went on before "broken" in one read is a
    /// prefix of what went on when split.
    static func framing(_ bytes: [UInt8]) throws {
        for direction in [HTTPFramer.Direction.request, .response] {
            let whole = frame(direction, [bytes])
            for split in stride(from: 1, to: bytes.count, by: max(1, bytes.count / 16)) {
                let two = frame(direction, [Array(bytes[..<split]), Array(bytes[split...])])
                if two == whole { continue }
                let (wholeRest, wholeBytes) = beforeBreak(whole)
                let (twoRest, twoBytes) = beforeBreak(two)
                try check(
                    wholeRest != nil && wholeRest == twoRest && twoBytes.starts(with: wholeBytes),
                    "\(direction) framing differs when split at \(split): \(two) vs \(whole)")
            }
        }
    }

    /// A transcript that ends in "broken": the rest, and the bytes passed on just before it.
    private static func beforeBreak(_ t: [Piece]) -> ([Piece]?, [UInt8]) {
        guard t.last?.kind == "broken" else { return (nil, []) }
        var rest = Array(t.dropLast())
        var passed: [UInt8] = []
        if let last = rest.last, last.kind == "bytes" {
            passed = last.bytes
            rest.removeLast()
        }
        return (rest, passed)
    }

    private struct Piece: Equatable, CustomStringConvertible {
        var kind: String
        var bytes: [UInt8] = []
        var description: String { bytes.isEmpty ? kind : "\(kind) \(bytes)" }
    }

    /// Heads, body bytes merged, how it stopped.
    private static func frame(_ direction: HTTPFramer.Direction, _ chunks: [[UInt8]]) -> [Piece] {
        var framer = HTTPFramer(direction, headLimit: 512)
        var out: [Piece] = []
        var body: [UInt8] = []
        func flush() {
            if !body.isEmpty { out.append(Piece(kind: "bytes", bytes: body)) }
            body = []
        }
        func head(_ raw: UnsafeRawBufferPointer) {
            flush()
            out.append(Piece(kind: "head", bytes: Array(raw)))
            let skip = HTTPHead.leadingEmptyLines(raw)
            let parsed: HTTPHead.Body? =
                direction == .request
                ? (try? HTTPHead.parseRequest(UnsafeRawBufferPointer(rebasing: raw[skip...])))?.body
                : (try? HTTPHead.parseResponse(raw, requestMethod: .get))?.body
            if let parsed { framer.expect(parsed) } else { framer.passEverything() }
        }
        for chunk in chunks {
            var stop = false
            chunk.withUnsafeBytes { input in
                var i = 0
                loop: while true {
                    switch framer.step(input, at: i) {
                    case .head(let range):
                        head(UnsafeRawBufferPointer(rebasing: input[range]))
                        i = range.upperBound
                    case .assembledHead(let upTo):
                        framer.takeHead().withUnsafeBytes { head($0) }
                        i = upTo
                    case .body(let range, let ends):
                        body += input[range]
                        if ends {
                            flush()
                            out.append(Piece(kind: "end"))
                        }
                        i = range.upperBound
                    case .passThrough(let range):
                        body += input[range]
                        i = range.upperBound
                    case .held, .end: break loop
                    case .headTooLarge:
                        flush()
                        out.append(Piece(kind: "too large"))
                        stop = true
                        break loop
                    case .brokenChunks:
                        flush()
                        out.append(Piece(kind: "broken"))
                        stop = true
                        break loop
                    }
                }
            }
            if stop { break }
        }
        flush()
        return out
    }

    // MARK: The protocol between the processes

    /// Any bytes as a payload: nothing crashes; what decodes encodes to bytes that decode to the
    /// same message, and encodes the same again (one encoding per message). The first four bytes
    /// as a frame header: a length in range or a refusal.
    static func wire(_ bytes: [UInt8]) throws {
        if bytes.count >= 4, let n = try? WireFrame.length(Array(bytes[..<4])) {
            try check(n > 0 && n <= WireFormat.maxPayload, "a frame length of \(n) was accepted")
        }
        guard let message = try? Message(decoding: bytes) else { return }
        let encoded = message.encoded()
        let again: Message
        do { again = try Message(decoding: encoded) } catch {
            throw Violation("a decoded \(message.name) does not decode once encoded (\(error))")
        }
        try check(again == message, "a \(message.name) reads differently once encoded")
        try check(again.encoded() == encoded, "a \(message.name) has two encodings")
    }
}
