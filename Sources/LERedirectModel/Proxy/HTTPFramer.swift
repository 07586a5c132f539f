/// The framing of one direction of an HTTP/1 connection, as the validation proxy follows it, on
/// bytes that arrive split anyhow: where each head ends (held across reads, up to a limit), how
/// much body follows it, where a chunked body ends, and when everything just passes. It copies
/// nothing it does not have to (a head found within one read, and every body byte, is a range of
/// the input) and decides nothing about where bytes go: each `step` says what the next piece of
/// the input is, and the proxy acts on it (parses a head and says what body follows with
/// `expect`, passes a body on, refuses a head too large...). Pure: unit tests and the fuzzer
/// feed it bytes without a socket.
package struct HTTPFramer: Sendable {
    /// Requests: a head over the limit is refused (431). Responses: the limit is only where the
    /// proxy stops trying to follow, and everything passes as it is.
    package enum Direction: Sendable, Hashable {
        case request, response
    }

    package enum State: Sendable, Hashable {
        /// Between messages: the next bytes are a head.
        case head
        /// A body of known length: `remaining` bytes to go.
        case body
        case chunked
        /// Everything passes unchanged (a tunnel, a body that ends at close, bytes it cannot follow).
        case passThrough
    }

    /// What the next piece of the input is.
    package enum Step: Sendable, Hashable {
        /// A whole head, found within this input at `range` (the caller parses it, then calls
        /// `expect`; the next step starts after it).
        case head(Range<Int>)
        /// A whole head assembled from earlier inputs and this one: `takeHead()` hands it over; its
        /// last bytes were the input up to `upTo`.
        case assembledHead(upTo: Int)
        /// Body bytes of the input, to pass on unchanged; `ends`: the message's body ends with them.
        case body(Range<Int>, ends: Bool)
        /// Bytes that pass as they are.
        case passThrough(Range<Int>)
        /// The rest of the input is the start of a head, held until more comes.
        case held
        /// The head grew past the limit without ending (nothing of this step was consumed; held
        /// bytes stay for `takeHead()`).
        case headTooLarge
        /// The chunked body is malformed (nothing of this step was consumed).
        case brokenChunks
        /// Nothing is left of the input.
        case end
    }

    package let direction: Direction
    package let headLimit: Int
    package private(set) var state: State = .head
    /// A body of known length: how much of it is still to come.
    package private(set) var remaining: UInt64 = 0
    private var chunks = ChunkedScanner()
    private var held: [UInt8] = []

    /// `headLimit`: the largest head accepted (requests: --max-head-size; a response's limit is
    /// where following stops).
    package init(_ direction: Direction, headLimit: Int) {
        self.direction = direction
        self.headLimit = headLimit
    }

    /// Part of a head is held (more is awaited).
    package var isHolding: Bool { !held.isEmpty }
    package var heldCount: Int { held.count }

    /// The next piece of `input`, starting at `index` (the previous step's range's end).
    package mutating func step(_ input: UnsafeRawBufferPointer, at index: Int) -> Step {
        guard index < input.count else { return .end }
        switch state {
        case .head:
            return held.isEmpty ? firstPartOfHead(input, index) : moreOfHead(input, index)
        case .body:
            let take = Int(min(remaining, UInt64(input.count - index)))
            remaining -= UInt64(take)
            if remaining == 0 { state = .head }
            return .body(index..<index + take, ends: remaining == 0)
        case .chunked:
            let end: Int?
            do { end = try chunks.scan(input, from: index) } catch { return .brokenChunks }
            guard let end else { return .body(index..<input.count, ends: false) }
            state = .head
            return .body(index..<end, ends: true)
        case .passThrough:
            return .passThrough(index..<input.count)
        }
    }

    /// The longest head taken, blank line included: a request's limit counts its fields, and the
    /// CRLF CRLF that ends them comes on top.
    private var longest: Int { direction == .request ? headLimit + 4 : headLimit }

    // The limit holds however the head arrives: in one read, or split anywhere (a held part that
    // reached `longest` without an end can only end past it).
    private mutating func firstPartOfHead(_ input: UnsafeRawBufferPointer, _ index: Int) -> Step {
        let rest = UnsafeRawBufferPointer(rebasing: input[index...])
        if let end = HTTPHead.end(of: rest) {
            if end > longest { return .headTooLarge }
            return .head(index..<index + end)
        }
        if rest.count >= longest { return .headTooLarge }
        held.append(contentsOf: rest)
        return .held
    }

    private mutating func moreOfHead(_ input: UnsafeRawBufferPointer, _ index: Int) -> Step {
        let rest = UnsafeRawBufferPointer(rebasing: input[index...])
        let before = held.count
        // Never more than `longest` is held.
        let take = min(rest.count, max(0, longest - before))
        held.append(contentsOf: UnsafeRawBufferPointer(rebasing: rest[..<take]))
        let found = held.withUnsafeBytes { HTTPHead.end(of: $0, from: before - 3) }
        guard let end = found else {
            if held.count >= longest {
                // What this step added is taken back: the caller decides what the held bytes are.
                held.removeLast(take)
                return .headTooLarge
            }
            return .held
        }
        // Bytes past the head's end go back to the input: they are the next piece.
        held.removeLast(held.count - end)
        return .assembledHead(upTo: index + (end - before))
    }

    /// The head an `.assembledHead` step completed (or, after `.headTooLarge`, what was held).
    package mutating func takeHead() -> [UInt8] {
        defer { held = [] }
        return held
    }

    /// After a head: what follows it. `.none` (and a zero length) leaves the framer between messages.
    package mutating func expect(_ body: HTTPHead.Body) {
        switch body {
        case .none: state = .head
        case .length(let n):
            remaining = n
            state = n == 0 ? .head : .body
        case .chunked:
            chunks = ChunkedScanner()
            state = .chunked
        case .untilClose:
            state = .passThrough
        }
    }

    /// From here on everything passes as it is (an upgrade or CONNECT accepted, bytes that are not
    /// HTTP it can follow).
    package mutating func passEverything() {
        state = .passThrough
    }
}
