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

    /// Sends `bytes` now if nothing is waiting before them; what the socket does not take (or
    /// everything, when bytes are already waiting) is kept. False on a hard error.
    mutating func write(_ bytes: UnsafeRawPointer, _ n: Int, to fd: Int32) -> Bool {
        guard isEmpty else {
            append(bytes, n)
            return true
        }
        guard let sent = sendSome(fd, bytes, n) else { return false }
        append(bytes + sent, n - sent)
        return true
    }

    /// Writes as much of what is waiting as the socket takes. False on a hard error.
    mutating func flush(to fd: Int32) -> Bool {
        guard let storage, start < end else { return true }
        guard let sent = sendSome(fd, storage + start, end - start) else { return false }
        start += sent
        if start == end { release() }
        return true
    }

    mutating func release() {
        free(storage)
        storage = nil
        capacity = 0
        start = 0
        end = 0
    }
}

/// Sends until done or the socket is full: the count sent, or nil on a hard error (errno set).
private func sendSome(_ fd: Int32, _ bytes: UnsafeRawPointer, _ n: Int) -> Int? {
    var sent = 0
    while sent < n {
        let w = send(fd, bytes + sent, n - sent, Int32(MSG_NOSIGNAL))
        if w > 0 {
            sent += w
        } else if w < 0 && errno == EINTR {
            continue
        } else if w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
            break
        } else {
            return nil
        }
    }
    return sent
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
