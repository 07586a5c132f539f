import Glibc
import LERedirectModel

/// Sends and receives `Message`s, framed (WireFrame), on a stream socket or a pipe. Every read has
/// a deadline; a peer that closes, sends a malformed frame or says nothing in time is an error that
/// names the link (`peer`) and keeps the errno.
struct MessageChannel {
    let fd: Int32
    /// Who is at the other end, for messages: "the session holder", "the proxy process (pid 12)".
    let peer: String

    enum ReceiveError: Error {
        /// The other end closed the connection (or died) before a whole frame came.
        case closed
        case timedOut
        case system(Int32)
        case malformed(WireError)
    }

    func send(_ message: Message) throws(SystemError) {
        let bytes = WireFrame.frame(message.encoded())
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
            }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && errno == ENOTSOCK {
                // A pipe: write(2), SIGPIPE being ignored by whoever uses one.
                let w = bytes.withUnsafeBytes { raw in write(fd, raw.baseAddress! + offset, raw.count - offset) }
                if w < 0 && errno == EINTR { continue }
                guard w > 0 else { throw SystemError(errno: errno, call: "write", subject: "a message to \(peer)") }
                offset += w
                continue
            }
            guard n > 0 else { throw SystemError(errno: errno, call: "send", subject: "a message to \(peer)") }
            offset += n
        }
    }

    /// Waits for one message until `timeout` has passed (nil: for ever).
    func receive(timeout: Duration?) throws(ReceiveError) -> Message {
        let deadline = timeout.map { monotonicMilliseconds() + $0.milliseconds }
        let header = try read(4, deadline)
        let length: Int
        do { length = try WireFrame.length(header) } catch { throw .malformed(error) }
        let payload = try read(length, deadline)
        do { return try Message(decoding: payload) } catch { throw .malformed(error) }
    }

    /// Sends a request and waits for its answer.
    func call(_ request: Message, timeout: Duration?) throws(LERedirectError) -> Message {
        do { try send(request) } catch {
            throw LERedirectError(.failed, "sending '\(request.name)' to \(peer): \(errnoText(error.errno))", errno: error.errno)
        }
        do { return try receive(timeout: timeout) } catch { throw describe(error, answering: request) }
    }

    /// The error for a failed receive of the answer to `request`.
    func describe(_ error: ReceiveError, answering request: Message) -> LERedirectError {
        switch error {
        case .closed:
            return LERedirectError(.failed, "\(peer) closed the connection without answering '\(request.name)'")
        case .timedOut:
            return LERedirectError(.failed, "\(peer) did not answer '\(request.name)' in time", errno: ETIMEDOUT)
        case .system(let code):
            return LERedirectError(.failed, "reading the answer of \(peer) to '\(request.name)': \(errnoText(code))", errno: code)
        case .malformed(let why):
            return LERedirectError(.failed, "the answer of \(peer) to '\(request.name)' is malformed: \(why)", errno: EPROTO)
        }
    }

    private func read(_ count: Int, _ deadline: Int64?) throws(ReceiveError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let wait = deadline.map { Int32(clamping: max(0, $0 - monotonicMilliseconds())) } ?? -1
            let ready = poll(&pfd, 1, wait)
            if ready < 0 && errno == EINTR { continue }
            if ready < 0 { throw .system(errno) }
            if ready == 0 { throw .timedOut }
            let n = out.withUnsafeMutableBytes { raw in Glibc.read(fd, raw.baseAddress! + got, count - got) }
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            if n < 0 && errno == ECONNRESET { throw .closed }
            if n < 0 { throw .system(errno) }
            if n == 0 { throw .closed }
            got += n
        }
        return out
    }
}
