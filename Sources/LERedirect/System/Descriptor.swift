import Glibc

/// A descriptor with one owner: closed when the value goes away, never twice, never by copy
/// (`~Copyable`), as swift-system's FileDescriptor and swift-nio's NIOFileHandle do it by hand.
/// `take()` hands the number on to a new owner (another process, say) without closing it.
struct OwnedDescriptor: ~Copyable {
    private(set) var rawValue: Int32

    init(_ rawValue: Int32) { self.rawValue = rawValue }

    /// Opens with `body` (a call returning -1 and setting errno), retrying EINTR.
    init(_ call: String, _ subject: @autoclosure () -> String, _ body: () -> Int32) throws(SystemError) {
        rawValue = try syscall(call, subject(), body)
    }

    /// Gives up ownership: the caller closes it (or hands it to a child process).
    consuming func take() -> Int32 {
        let fd = rawValue
        discard self
        return fd
    }

    deinit { if rawValue >= 0 { closeDescriptor(rawValue) } }
}
