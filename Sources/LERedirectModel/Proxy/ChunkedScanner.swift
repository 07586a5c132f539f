/// Follows a chunked body (RFC 9112 7.1) as it streams past, without changing or copying a byte:
/// it only says where the body ends, however the bytes are split across reads.
package struct ChunkedScanner: Hashable, Sendable {
    private enum State: Hashable, Sendable {
        case size, extensions, sizeLF, data, dataCR, dataLF, trailerStart, trailerLine, trailerLF, endLF
    }

    private var state = State.size
    private var size: UInt64 = 0
    private var digits = 0
    private var remaining: UInt64 = 0

    package init() {}

    /// Scans `bytes[from...]`; returns the index just past the body's last byte when the body ends
    /// there, or nil when every byte belongs to the body and more is to come.
    package mutating func scan(_ bytes: UnsafeRawBufferPointer, from: Int) throws(HTTPHead.Failure) -> Int? {
        var i = from
        let count = bytes.count
        while i < count {
            if state == .data {
                let take = Int(min(remaining, UInt64(count - i)))
                i += take
                remaining -= UInt64(take)
                if remaining == 0 { state = .dataCR }
                continue
            }
            let b = bytes[i]
            i += 1
            switch state {
            case .size:
                if let value = Self.hexValue(b) {
                    guard digits < 15 else { throw .malformed("chunk size too large") }
                    size = size << 4 | UInt64(value)
                    digits += 1
                } else if digits == 0 {
                    throw .malformed("bad chunk size")
                } else if b == 13 {
                    state = .sizeLF
                } else if b == 10 {
                    try endSizeLine()
                } else if b == 59 || b == 32 || b == 9 {  // ';' extensions (and BWS before them)
                    state = .extensions
                } else {
                    throw .malformed("bad chunk size")
                }
            case .extensions:
                if b == 13 { state = .sizeLF } else if b == 10 { try endSizeLine() } else if b < 32 && b != 9 {
                    throw .malformed("control character in a chunk extension")
                }
            case .sizeLF:
                guard b == 10 else { throw .malformed("CR without LF after a chunk size") }
                try endSizeLine()
            case .dataCR:
                if b == 13 { state = .dataLF } else if b == 10 { startChunk() } else {
                    throw .malformed("chunk data longer than its size")
                }
            case .dataLF:
                guard b == 10 else { throw .malformed("CR without LF after chunk data") }
                startChunk()
            case .trailerStart:
                if b == 13 { state = .endLF } else if b == 10 { return finish(i) } else { state = .trailerLine }
            case .trailerLine:
                if b == 13 { state = .trailerLF } else if b == 10 { state = .trailerStart }
            case .trailerLF:
                guard b == 10 else { throw .malformed("CR without LF in a trailer") }
                state = .trailerStart
            case .endLF:
                guard b == 10 else { throw .malformed("CR without LF at the end of a chunked body") }
                return finish(i)
            case .data:
                break
            }
        }
        return nil
    }

    private mutating func endSizeLine() throws(HTTPHead.Failure) {
        if size == 0 {
            state = .trailerStart
        } else {
            remaining = size
            state = .data
        }
    }

    private mutating func startChunk() {
        state = .size
        size = 0
        digits = 0
    }

    private mutating func finish(_ index: Int) -> Int {
        self = ChunkedScanner()
        return index
    }

    @inline(__always)
    private static func hexValue(_ b: UInt8) -> UInt8? {
        switch b {
        case 48...57: b - 48
        case 65...70: b - 55
        case 97...102: b - 87
        default: nil
        }
    }
}
