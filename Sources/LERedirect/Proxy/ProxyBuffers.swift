import Glibc

/// Bytes waiting to be written to one socket. Allocated only while the socket cannot take what
/// was read (back-pressure: its source is not read meanwhile), freed once written, so that an
/// idle connection holds no buffer at all.
struct OutBuffer: ~Copyable {
    private var storage: UnsafeMutableRawPointer?
    private var capacity = 0
    private var start = 0
    private var end = 0

    init() {}

    deinit { free(storage) }

    var isEmpty: Bool { start == end }
    var count: Int { end - start }

    mutating func append(_ bytes: UnsafeRawPointer, _ n: Int) {
        guard n > 0 else { return }
        if end + n > capacity {
            let live = end - start
            if live + n <= capacity, let storage {
                storage.copyMemory(from: storage + start, byteCount: live)
            } else {
                let newCapacity = max(4096, (live + n).roundedUpToPowerOfTwo)
                let fresh = malloc(newCapacity)!
                if let storage { fresh.copyMemory(from: storage + start, byteCount: live) }
                free(storage)
                storage = fresh
                capacity = newCapacity
            }
            start = 0
            end = live
        }
        (storage! + end).copyMemory(from: bytes, byteCount: n)
        end += n
    }

    mutating func append(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { append($0.baseAddress!, $0.count) }
    }

    /// Writes as much as the socket takes. Returns false on a hard error (errno set).
    mutating func flush(to fd: Int32) -> (ok: Bool, written: Int) {
        var written = 0
        while start < end {
            let n = send(fd, storage! + start, end - start, Int32(MSG_NOSIGNAL))
            if n > 0 {
                start += n
                written += n
                continue
            }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return (true, written) }
            return (false, written)
        }
        release()
        return (true, written)
    }

    mutating func release() {
        free(storage)
        storage = nil
        capacity = 0
        start = 0
        end = 0
    }
}

/// A request or response head that arrived in pieces, kept until its blank line arrives.
struct HeadBuffer: ~Copyable {
    private(set) var bytes: [UInt8] = []

    var isEmpty: Bool { bytes.isEmpty }
    var count: Int { bytes.count }

    mutating func append(_ p: UnsafeRawPointer, _ n: Int) {
        bytes.append(contentsOf: UnsafeRawBufferPointer(start: p, count: n))
    }

    mutating func reset() { bytes = [] }
}

extension Int {
    fileprivate var roundedUpToPowerOfTwo: Int {
        var v = 1
        while v < self { v <<= 1 }
        return v
    }
}
