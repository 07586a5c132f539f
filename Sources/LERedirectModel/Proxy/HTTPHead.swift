/// The validation proxy's view of HTTP/1.x message heads: just enough to find where each message
/// ends (so that keep-alive, pipelining and drain work), to route the first request, and to refuse
/// the shapes that would let a client smuggle a request past the app's own parser. Bytes are never
/// normalised: what passes is relayed exactly as it came, except where a head is rewritten on
/// purpose (`Connection: close` while draining, `--forwarded`).
package enum HTTPHead {
    /// How the body after a head is delimited.
    package enum Body: Hashable, Sendable {
        case none
        case length(UInt64)
        case chunked
        /// Until the server closes the connection (responses only).
        case untilClose
    }

    package enum Method: Hashable, Sendable {
        case get, head, connect, other
    }

    package struct Request: Hashable, Sendable {
        package var method: Method
        /// The token of `GET|HEAD /.well-known/acme-challenge/<token>`, possibly invalid; nil when
        /// the request is not a challenge.
        package var challengeToken: String?
        package var minorVersion: Int
        package var body: Body
        package var keepAlive: Bool
        /// `Connection: upgrade` with an `Upgrade` header: a 101 answer turns the stream opaque.
        package var upgrade: Bool
    }

    package struct Response: Hashable, Sendable {
        package var status: Int
        package var body: Body
        package var keepAlive: Bool
        /// 1xx other than 101: another head follows for the same request.
        package var interim: Bool { status >= 100 && status < 200 && status != 101 }
    }

    package enum Failure: Error, Hashable, Sendable, CustomStringConvertible {
        case malformed(String)
        /// Framing the app could read differently (CL with TE, differing lengths, obs-fold).
        case ambiguous(String)
        case tooLarge

        package var description: String {
            switch self {
            case .malformed(let why): "malformed head: \(why)"
            case .ambiguous(let why): "ambiguous framing: \(why)"
            case .tooLarge: "head too large"
            }
        }
    }

    package static let challengePrefix = Array("/.well-known/acme-challenge/".utf8)

    // MARK: Finding the end of a head

    /// The index just past the blank line that ends a head in `bytes`, searching from `from`
    /// (pass the previous length minus 3 when more bytes arrive). Lines end in CRLF or a bare LF.
    /// Leading empty lines (allowed before a request) are not a head's end: callers skip them.
    @inline(__always)
    package static func end(of bytes: UnsafeRawBufferPointer, from: Int = 0) -> Int? {
        var i = max(from, 0)
        let count = bytes.count
        while i < count {
            if bytes[i] == 10 {  // LF
                if i + 1 < count, bytes[i + 1] == 10 { return i + 2 }
                if i + 2 < count, bytes[i + 1] == 13, bytes[i + 2] == 10 { return i + 3 }
            }
            i += 1
        }
        return nil
    }

    /// How many leading CRLF / LF bytes precede a request (RFC 9112 2.2 lets a server ignore them).
    package static func leadingEmptyLines(_ bytes: UnsafeRawBufferPointer) -> Int {
        var i = 0
        while i < bytes.count, bytes[i] == 13 || bytes[i] == 10 { i += 1 }
        return i
    }

    // MARK: Parsing

    package static func parseRequest(_ head: UnsafeRawBufferPointer) throws(Failure) -> Request {
        var lines = LineCursor(head)
        guard let line = lines.next(), !line.isEmpty else { throw .malformed("empty request line") }
        // method SP target SP HTTP/1.x
        guard let sp1 = line.firstIndex(of: 32, in: head), let sp2 = line.lastIndex(of: 32, in: head), sp2 > sp1 + 1
        else { throw .malformed("request line is not 'METHOD TARGET HTTP/1.x'") }
        let minor = try version(head, from: sp2 + 1, to: line.end)
        for i in line.start..<sp1 where !isTokenByte(head[i]) { throw .malformed("bad method") }
        let method: Method =
            matches(head, line.start, sp1, "GET") ? .get
            : matches(head, line.start, sp1, "HEAD") ? .head
            : matches(head, line.start, sp1, "CONNECT") ? .connect : .other
        for i in (sp1 + 1)..<sp2 where head[i] <= 32 || head[i] == 127 { throw .malformed("bad request target") }
        var token: String?
        if method == .get || method == .head {
            let targetStart = sp1 + 1
            let prefix = challengePrefix
            if sp2 - targetStart >= prefix.count,
                (0..<prefix.count).allSatisfy({ head[targetStart + $0] == prefix[$0] })
            {
                token = String(decoding: UnsafeRawBufferPointer(rebasing: head[(targetStart + prefix.count)..<sp2]), as: UTF8.self)
            }
        }
        let fields = try scanFields(&lines, head, request: true)
        if fields.chunked != nil && fields.contentLength != nil {
            throw .ambiguous("both Transfer-Encoding and Content-Length")
        }
        var body: Body = .none
        if let chunked = fields.chunked {
            guard chunked else { throw .malformed("a request's Transfer-Encoding must end in chunked") }
            body = .chunked
        } else if let length = fields.contentLength, length > 0 {
            body = .length(length)
        }
        let keepAlive = minor >= 1 ? !fields.connectionClose : fields.connectionKeepAlive
        return Request(
            method: method, challengeToken: token, minorVersion: minor, body: body, keepAlive: keepAlive,
            upgrade: fields.connectionUpgrade && fields.hasUpgrade)
    }

    /// `requestMethod` decides bodiless answers (HEAD) and tunnels (CONNECT).
    package static func parseResponse(_ head: UnsafeRawBufferPointer, requestMethod: Method) throws(Failure) -> Response {
        var lines = LineCursor(head)
        guard let line = lines.next(), line.end - line.start >= 12 else { throw .malformed("short status line") }
        let minor = try version(head, from: line.start, to: line.start + 8)
        guard head[line.start + 8] == 32 else { throw .malformed("bad status line") }
        var status = 0
        for i in (line.start + 9)..<(line.start + 12) {
            guard head[i] >= 48 && head[i] <= 57 else { throw .malformed("bad status code") }
            status = status * 10 + Int(head[i] - 48)
        }
        let fields = try scanFields(&lines, head, request: false)
        let keepAlive = minor >= 1 ? !fields.connectionClose : fields.connectionKeepAlive
        var body: Body
        if requestMethod == .head || status < 200 || status == 204 || status == 304 {
            body = .none
        } else if requestMethod == .connect && status < 300 {
            body = .untilClose
        } else if let chunked = fields.chunked {
            body = chunked ? .chunked : .untilClose
        } else if let length = fields.contentLength {
            body = length == 0 ? .none : .length(length)
        } else {
            body = .untilClose
        }
        return Response(status: status, body: body, keepAlive: keepAlive && body != .untilClose)
    }

    // MARK: Rewriting

    /// `head` without the fields named in `dropping` (lower-case), with `adding` (each "Name: value")
    /// before the blank line. Line endings of kept lines are kept as they were.
    package static func rewrite(_ head: UnsafeRawBufferPointer, dropping names: [StaticString], adding: [String]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(head.count + adding.reduce(0) { $0 + $1.utf8.count + 2 })
        var lines = LineCursor(head)
        var first = true
        while let line = lines.next() {
            if line.isEmpty { break }
            if !first, let colon = line.firstIndex(of: 58, in: head),
                names.contains(where: { equalsLowercased(head, line.start, colon, $0) })
            {
                continue
            }
            first = false
            out.append(contentsOf: UnsafeRawBufferPointer(rebasing: head[line.start..<line.next]))
        }
        for field in adding {
            out.append(contentsOf: field.utf8)
            out.append(contentsOf: [13, 10])
        }
        out.append(contentsOf: [13, 10])
        return out
    }

    // MARK: Internals

    private struct Fields {
        var contentLength: UInt64?
        /// nil: no Transfer-Encoding; true: its last coding is chunked.
        var chunked: Bool?
        var connectionClose = false
        var connectionKeepAlive = false
        var connectionUpgrade = false
        var hasUpgrade = false
    }

    private static func scanFields(_ lines: inout LineCursor, _ head: UnsafeRawBufferPointer, request: Bool)
        throws(Failure) -> Fields
    {
        var fields = Fields()
        while let line = lines.next() {
            if line.isEmpty { return fields }
            let first = head[line.start]
            if first == 32 || first == 9 { throw .ambiguous("obsolete line folding") }
            guard let colon = line.firstIndex(of: 58, in: head), colon > line.start else {
                throw .malformed("header line without a name")
            }
            for i in line.start..<colon where !isTokenByte(head[i]) {
                throw .malformed("bad header name")
            }
            for i in (colon + 1)..<line.end where (head[i] < 32 && head[i] != 9) || head[i] == 127 {
                throw .malformed("control character in a header value")
            }
            var vs = colon + 1
            var ve = line.end
            while vs < ve, head[vs] == 32 || head[vs] == 9 { vs += 1 }
            while ve > vs, head[ve - 1] == 32 || head[ve - 1] == 9 { ve -= 1 }
            let nameLength = colon - line.start
            // Only a handful of names matter; compare by length first.
            switch nameLength {
            case 14 where equalsLowercased(head, line.start, colon, "content-length"):
                let value = try parseLength(head, vs, ve)
                if let previous = fields.contentLength, previous != value {
                    throw .ambiguous("differing Content-Length values")
                }
                fields.contentLength = value
            case 17 where equalsLowercased(head, line.start, colon, "transfer-encoding"):
                // Several fields combine into one list; what counts is the last coding.
                fields.chunked = endsWithToken(head, vs, ve, "chunked")
            case 10 where equalsLowercased(head, line.start, colon, "connection"):
                forEachToken(head, vs, ve) { s, e in
                    if equalsLowercased(head, s, e, "close") { fields.connectionClose = true }
                    else if equalsLowercased(head, s, e, "keep-alive") { fields.connectionKeepAlive = true }
                    else if equalsLowercased(head, s, e, "upgrade") { fields.connectionUpgrade = true }
                }
            case 7 where equalsLowercased(head, line.start, colon, "upgrade"):
                fields.hasUpgrade = vs < ve
            default:
                break
            }
        }
        throw .malformed("head without its blank line")
    }

    private static func version(_ head: UnsafeRawBufferPointer, from: Int, to: Int) throws(Failure) -> Int {
        guard to - from == 8, matches(head, from, from + 7, "HTTP/1."), head[from + 7] >= 48, head[from + 7] <= 57
        else { throw .malformed("not HTTP/1.x") }
        return Int(head[from + 7] - 48)
    }

    private static func parseLength(_ head: UnsafeRawBufferPointer, _ start: Int, _ end: Int) throws(Failure) -> UInt64 {
        // "n" or a list of equal values "n, n" (RFC 9110 8.6).
        var value: UInt64?
        var current: UInt64 = 0
        var digits = 0
        var i = start
        while i <= end {
            if i == end || head[i] == 44 {
                guard digits > 0 else { throw .malformed("bad Content-Length") }
                if let value, value != current { throw .ambiguous("differing Content-Length values") }
                value = current
                current = 0
                digits = 0
                i += 1
                while i < end, head[i] == 32 || head[i] == 9 { i += 1 }
                continue
            }
            let byte = head[i]
            guard byte >= 48 && byte <= 57, digits < 19 else { throw .malformed("bad Content-Length") }
            current = current * 10 + UInt64(byte - 48)
            digits += 1
            i += 1
        }
        return value ?? 0
    }

    private static func forEachToken(_ head: UnsafeRawBufferPointer, _ start: Int, _ end: Int, _ body: (Int, Int) -> Void) {
        var s = start
        while s < end {
            while s < end, head[s] == 32 || head[s] == 9 || head[s] == 44 { s += 1 }
            var e = s
            while e < end, head[e] != 44 { e += 1 }
            var t = e
            while t > s, head[t - 1] == 32 || head[t - 1] == 9 { t -= 1 }
            if t > s { body(s, t) }
            s = e
        }
    }

    private static func endsWithToken(_ head: UnsafeRawBufferPointer, _ start: Int, _ end: Int, _ token: StaticString) -> Bool {
        var last: (Int, Int)?
        forEachToken(head, start, end) { s, e in last = (s, e) }
        guard let last else { return false }
        return equalsLowercased(head, last.0, last.1, token)
    }

    @inline(__always)
    private static func isTokenByte(_ b: UInt8) -> Bool {
        switch b {
        case 48...57, 65...90, 97...122: true
        case 33, 35, 36, 37, 38, 39, 42, 43, 45, 46, 94, 95, 96, 124, 126: true
        default: false
        }
    }

    private static func matches(_ head: UnsafeRawBufferPointer, _ start: Int, _ end: Int, _ literal: StaticString) -> Bool {
        guard end - start == literal.utf8CodeUnitCount else { return false }
        let p = literal.utf8Start
        for i in 0..<(end - start) where head[start + i] != p[i] { return false }
        return true
    }

    @inline(__always)
    private static func equalsLowercased(_ head: UnsafeRawBufferPointer, _ start: Int, _ end: Int, _ lower: StaticString) -> Bool {
        guard end - start == lower.utf8CodeUnitCount else { return false }
        let p = lower.utf8Start
        for i in 0..<(end - start) {
            var b = head[start + i]
            if b >= 65 && b <= 90 { b |= 0x20 }
            if b != p[i] { return false }
        }
        return true
    }
}

/// Walks the lines of a head: each line's content (without CR LF) and where the next begins.
struct LineCursor {
    struct Line {
        var start: Int
        var end: Int
        var next: Int
        var isEmpty: Bool { start == end }

        func firstIndex(of byte: UInt8, in head: UnsafeRawBufferPointer) -> Int? {
            var i = start
            while i < end {
                if head[i] == byte { return i }
                i += 1
            }
            return nil
        }

        func lastIndex(of byte: UInt8, in head: UnsafeRawBufferPointer) -> Int? {
            var i = end - 1
            while i >= start {
                if head[i] == byte { return i }
                i -= 1
            }
            return nil
        }
    }

    private let head: UnsafeRawBufferPointer
    private var position = 0

    init(_ head: UnsafeRawBufferPointer) { self.head = head }

    mutating func next() -> Line? {
        guard position < head.count else { return nil }
        var i = position
        while i < head.count, head[i] != 10 { i += 1 }
        guard i < head.count else { return nil }
        let end = i > position && head[i - 1] == 13 ? i - 1 : i
        defer { position = i + 1 }
        return Line(start: position, end: end, next: i + 1)
    }
}
