import CLERedirectShim
import Glibc
import LERedirectModel

/// The control socket of a session holder (control.sock in the state directory): one request line
/// per connection, answered by zero or more `key value` lines and a last line `ok` or
/// `error <exit-code> <message>`. Only root (or the holder's own uid) may connect.
enum ControlChannel {
    enum Request: Equatable {
        case status
        /// Ends the session; `drainTimeout` overrides the one begin set.
        case end(drainTimeout: Duration?)
        /// Registers a challenge token in memory (arming the redirect when it is armed per challenge).
        case challengeAdd(token: String, keyAuthorization: String)
        case challengeRemove(token: String)

        var line: String {
            switch self {
            case .status: "status"
            case .end(let drainTimeout): drainTimeout.map { "end \($0.milliseconds)" } ?? "end"
            case .challengeAdd(let token, let keyAuthorization): "challenge-add \(token) \(keyAuthorization)"
            case .challengeRemove(let token): "challenge-remove \(token)"
            }
        }

        init?(line: String) {
            let words = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
            switch (words.first, words.count) {
            case ("status", 1): self = .status
            case ("end", 1): self = .end(drainTimeout: nil)
            case ("end", 2):
                guard let ms = Int64(words[1]), ms >= 0 else { return nil }
                self = .end(drainTimeout: .milliseconds(ms))
            case ("challenge-add", 3): self = .challengeAdd(token: words[1], keyAuthorization: words[2])
            case ("challenge-remove", 2): self = .challengeRemove(token: words[1])
            default: return nil
            }
        }
    }

    /// A parsed reply: its `key value` lines, in order, and the outcome.
    struct Reply {
        var lines: [(key: String, value: String)] = []
        var error: LERedirectError?

        func values(_ key: String) -> [String] { lines.filter { $0.key == key }.map(\.value) }
    }

    static func socketAddress(_ path: String) throws(LERedirectError) -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else {
            throw LERedirectError(
                .invalidArgument, "the control socket path \(path) is longer than \(capacity - 1) bytes; "
                    + "choose a shorter \(StateDirectory.environmentVariable)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }

    // MARK: Server side

    /// Binds and listens; a stale socket file from a dead holder is replaced (the caller holds the lock).
    static func listen(at path: String) throws(LERedirectError) -> Int32 {
        var address = try socketAddress(path)
        let fd = le_unix_stream_socket()
        guard fd >= 0 else {
            throw LERedirectError(.failed, "creating the control socket: \(errnoText(errno))", errno: errno)
        }
        _ = unlink(path)
        let injected = Fault.injectedErrno("bind")
        let bound = injected != nil ? -1 : withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, chmod(path, 0o600) == 0, Glibc.listen(fd, 16) == 0 else {
            let code = injected ?? errno
            closeDescriptor(fd)
            throw LERedirectError(.failed, "binding the control socket \(path): \(errnoText(code))", errno: code)
        }
        return fd
    }

    /// Accepts one client; nil if the peer is not allowed or the accept failed.
    static func accept(_ listener: Int32) -> Int32? {
        let fd = le_accept_cloexec(listener)
        guard fd >= 0 else { return nil }
        var uid: UInt32 = 0
        guard le_peer_uid(fd, &uid) == 0, uid == 0 || uid == geteuid() else {
            closeDescriptor(fd)
            return nil
        }
        setTimeouts(fd, seconds: 5)
        return fd
    }

    /// Reads the request line of a client.
    static func readRequest(_ fd: Int32) -> Request? {
        guard case .line(let line) = readLine(fd, limit: 1024) else { return nil }
        return Request(line: line)
    }

    static func send(_ fd: Int32, lines: [(String, String)], error: LERedirectError? = nil) {
        var text = lines.map { "\($0.0) \(oneLine($0.1))\n" }.joined()
        if let error {
            text += "error \(error.exitCode) \(oneLine(error.message))\n"
        } else {
            text += "ok\n"
        }
        let bytes = Array(text.utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            offset += n
        }
    }

    // MARK: Client side

    /// Sends `request` to the holder listening at `path` and waits up to `timeout` for its reply.
    /// Throws when the holder cannot be reached or does not answer in time.
    static func call(_ request: Request, path: String, timeout: Duration) throws(LERedirectError) -> Reply {
        var address = try socketAddress(path)
        let fd = le_unix_stream_socket()
        guard fd >= 0 else {
            throw LERedirectError(.failed, "creating a socket: \(errnoText(errno))", errno: errno)
        }
        defer { closeDescriptor(fd) }
        setTimeouts(fd, seconds: Int(max(1, timeout.milliseconds / 1000)))
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else {
            throw LERedirectError(
                .failed, "connecting to the session holder at \(path): \(errnoText(errno))", errno: errno)
        }
        send(fd, text: request.line + "\n")
        var reply = Reply()
        while true {
            let line: String
            switch readLine(fd, limit: 64 * 1024) {
            case .line(let text): line = text
            case .closed:
                throw LERedirectError(
                    .failed,
                    "the session holder closed the connection without answering '\(request.line)': it has probably "
                        + "exited (`le-redirect status` tells; `le-redirect recover` removes what a dead session left)")
            case .failed(let code) where code == EAGAIN || code == EWOULDBLOCK:
                throw LERedirectError(
                    .failed,
                    "the session holder did not answer '\(request.line)' within \(DurationText.format(timeout))")
            case .failed(let code):
                throw LERedirectError(
                    .failed, "reading the session holder's answer to '\(request.line)': \(errnoText(code))", errno: code)
            case .tooLong:
                throw LERedirectError(.failed, "the session holder's answer to '\(request.line)' has a line over 64 KiB")
            }
            if line == "ok" { return reply }
            if line.hasPrefix("error ") {
                let parts = line.split(separator: " ", maxSplits: 2)
                let code = parts.count > 1 ? Int32(parts[1]) ?? 1 : 1
                let message = parts.count > 2 ? String(parts[2]) : "unknown error"
                let kind: LERedirectError.Kind = code == 3 ? .notPermitted : code == 2 ? .invalidArgument : .failed
                reply.error = LERedirectError(kind, message)
                return reply
            }
            let kv = line.split(separator: " ", maxSplits: 1)
            reply.lines.append((String(kv[0]), kv.count > 1 ? String(kv[1]) : ""))
        }
    }

    private static func send(_ fd: Int32, text: String) {
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    private static func setTimeouts(_ fd: Int32, seconds: Int) {
        var timeout = timeval(tv_sec: seconds, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    private enum LineRead {
        case line(String)
        /// The other end closed the connection before a newline.
        case closed
        /// read(2) failed: EAGAIN once the receive timeout passed.
        case failed(Int32)
        case tooLong
    }

    /// Reads up to a newline, byte by byte (requests and replies are a few lines).
    private static func readLine(_ fd: Int32, limit: Int) -> LineRead {
        var bytes: [UInt8] = []
        var byte: UInt8 = 0
        while bytes.count < limit {
            let n = read(fd, &byte, 1)
            if n < 0 && errno == EINTR { continue }
            if n < 0 { return .failed(errno) }
            if n == 0 { return .closed }
            if byte == UInt8(ascii: "\n") { return .line(String(decoding: bytes, as: UTF8.self)) }
            bytes.append(byte)
        }
        return .tooLong
    }

    private static func oneLine(_ s: String) -> String {
        String(s.map { $0 == "\n" || $0 == "\r" ? " " : $0 })
    }
}
