import Glibc

/// A failed system call: which call, on what, and the errno. The one error type of the system layer.
struct SystemError: Error, Sendable, CustomStringConvertible {
    var errno: Int32
    var call: String
    var subject: String

    var description: String { "\(call) \(subject): \(errnoText(errno))" }
}

/// `strerror` text, e.g. "Operation not permitted".
func errnoText(_ code: Int32) -> String {
    String(cString: strerror(code))
}

/// Runs a syscall that returns -1 and sets errno on failure, retrying EINTR.
@discardableResult
func syscall<T: FixedWidthInteger>(_ call: String, _ subject: @autoclosure () -> String, _ body: () -> T)
    throws(SystemError) -> T
{
    if let code = Fault.injectedErrno(call) { throw SystemError(errno: code, call: call, subject: subject()) }
    while true {
        let result = body()
        if result != -1 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        throw SystemError(errno: code, call: call, subject: subject())
    }
}

/// Closes a descriptor; EINTR after close means it is closed (Linux), so it is not retried.
func closeDescriptor(_ fd: Int32) {
    _ = Glibc.close(fd)
}

/// Reads a whole (small) file: /proc and /sys entries, the journal.
func readFile(_ path: String, maxBytes: Int = 1 << 20, noFollow: Bool = false) throws(SystemError) -> [UInt8] {
    let fd = try syscall("open", path) { open(path, O_RDONLY | O_CLOEXEC | (noFollow ? O_NOFOLLOW : 0)) }
    defer { closeDescriptor(fd) }
    var out: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = try syscall("read", path) { chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) } }
        if n == 0 { return out }
        out += chunk[0..<n]
        if out.count > maxBytes {
            throw SystemError(errno: EFBIG, call: "read", subject: path)
        }
    }
}

/// Writes all of `bytes` to `fd`.
func writeAll(_ fd: Int32, _ bytes: [UInt8], subject: String) throws(SystemError) {
    var offset = 0
    while offset < bytes.count {
        let n = try syscall("write", subject) {
            bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
        }
        offset += n
    }
}

/// CLOCK_REALTIME in milliseconds: the clock the journal's deadlines and `status` use.
func unixMilliseconds() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
}

/// CLOCK_MONOTONIC in milliseconds: for timeouts, immune to clock changes.
func monotonicMilliseconds() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
}

/// RLIMIT_NOFILE as getrlimit and setrlimit take it.
let RLIMIT_NOFILE_VALUE = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
