import CLERedirectShim
import Glibc
import LERedirectModel

/// The control socket of a session holder (control.sock in the state directory): one request
/// `Message` per connection (`statusRequest`, `endRequest`, `challengeAdd`, `challengeRemove`),
/// answered by one `Message`; a `failure` keeps the error's kind and errno. Only root (or the
/// holder's own uid) may connect.
enum ControlChannel {
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

    /// Reads the request of a client; nil for anything that is not one.
    static func readRequest(_ fd: Int32) -> Message? {
        guard let message = try? MessageChannel(fd: fd, peer: "a control client").receive(timeout: .seconds(5)) else {
            return nil
        }
        switch message {
        case .statusRequest, .endRequest, .challengeAdd, .challengeRemove: return message
        default: return nil
        }
    }

    /// Answers a client (a client that went away is not an error).
    static func send(_ fd: Int32, _ message: Message) {
        try? MessageChannel(fd: fd, peer: "a control client").send(message)
    }

    // MARK: Client side

    /// Sends `request` to the holder listening at `path` and waits up to `timeout` for its answer
    /// (a `failure` among them). Throws when the holder cannot be reached or does not answer in time.
    static func call(_ request: Message, path: String, timeout: Duration) throws(LERedirectError) -> Message {
        var address = try socketAddress(path)
        let fd = le_unix_stream_socket()
        guard fd >= 0 else {
            throw LERedirectError(.failed, "creating a socket: \(errnoText(errno))", errno: errno)
        }
        defer { closeDescriptor(fd) }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else {
            throw LERedirectError(
                .failed, "connecting to the session holder at \(path): \(errnoText(errno))", errno: errno)
        }
        let channel = MessageChannel(fd: fd, peer: "the session holder")
        do { try channel.send(request) } catch {
            throw LERedirectError(.failed, "sending '\(request.name)' to the session holder: \(errnoText(error.errno))", errno: error.errno)
        }
        let answer: Message
        do { answer = try channel.receive(timeout: timeout) } catch {
            switch error {
            case .closed:
                throw LERedirectError(
                    .failed,
                    "the session holder closed the connection without answering '\(request.name)': it has probably "
                        + "exited (`le-redirect status` tells; `le-redirect recover` removes what a dead session left)")
            case .timedOut:
                throw LERedirectError(
                    .failed, "the session holder did not answer '\(request.name)' within \(DurationText.format(timeout))",
                    errno: ETIMEDOUT)
            default:
                throw channel.describe(error, answering: request)
            }
        }
        return answer
    }

    private static func setTimeouts(_ fd: Int32, seconds: Int) {
        var timeout = timeval(tv_sec: seconds, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }
}
