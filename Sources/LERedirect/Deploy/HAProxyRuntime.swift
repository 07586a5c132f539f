import Glibc
import LERedirectModel

/// HAProxy's Runtime API over its stats socket (`stats socket PATH level admin`): one command per
/// connection, the answer read to the end (HAProxy closes a non-interactive connection after it).
public enum HAProxyRuntime {
    /// Swaps the certificate HAProxy loaded as `name` (its `crt` path) for `pem`, without a restart:
    /// `set ssl cert`, then `commit ssl cert`; on a refusal the transaction is aborted and nothing
    /// changed. Returns HAProxy's answer to the commit.
    public static func replaceCertificate(socket path: String, name: String, pem: String, timeout: Duration = .seconds(30))
        throws(LERedirectError) -> String
    {
        guard HAProxyCertificate.validName(name) else {
            throw LERedirectError(.invalidArgument, "--certificate \(name): not a name HAProxy's Runtime API can be given")
        }
        let set: String
        do { set = try command(path, HAProxyCertificate.setCommand(name: name, pem: pem), timeout: timeout) } catch {
            // The payload may have arrived: a transaction left open would block the next deploy.
            _ = try? command(path, HAProxyCertificate.abortCommand(name: name), timeout: timeout)
            throw error
        }
        guard HAProxyCertificate.setSucceeded(set) else {
            _ = try? command(path, HAProxyCertificate.abortCommand(name: name), timeout: timeout)
            throw LERedirectError(
                .failed,
                "HAProxy (\(path)) refused the new certificate for \(name): \(oneLine(set)) (is \(name) the crt path HAProxy's configuration names? `show ssl cert` on the socket lists them); nothing was changed")
        }
        let commit: String
        do { commit = try command(path, HAProxyCertificate.commitCommand(name: name), timeout: timeout) } catch {
            _ = try? command(path, HAProxyCertificate.abortCommand(name: name), timeout: timeout)
            throw error
        }
        guard HAProxyCertificate.commitSucceeded(commit) else {
            _ = try? command(path, HAProxyCertificate.abortCommand(name: name), timeout: timeout)
            throw LERedirectError(
                .failed, "HAProxy (\(path)) did not commit the new certificate for \(name): \(oneLine(commit)); the old one is still served")
        }
        return commit
    }

    static func oneLine(_ text: String) -> String {
        let joined = text.split(whereSeparator: { $0 == "\n" || $0 == "\r" }).joined(separator: " ")
        return joined.isEmpty ? "no answer" : String(joined.prefix(500))
    }

    /// Sends one command and reads the whole answer.
    static func command(_ path: String, _ text: String, timeout: Duration) throws(LERedirectError) -> String {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(path.utf8)
        guard !pathBytes.isEmpty, pathBytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw LERedirectError(.invalidArgument, "--socket \(path): not a Unix socket path")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in pathBytes.enumerated() { raw[i] = b }
        }
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw LERedirectError(.failed, "opening a Unix socket: \(errnoText(errno))", errno: errno) }
        defer { Glibc.close(fd) }
        var tv = timeval(tv_sec: Int(timeout.components.seconds), tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else {
            let code = errno
            let hint =
                code == ENOENT || code == ECONNREFUSED
                ? " (is HAProxy running with `stats socket \(path) level admin` in its global section?)"
                : code == EACCES ? " (the socket's mode or owner keeps this user out: run as root or HAProxy's user)" : ""
            throw LERedirectError(.failed, "connecting to HAProxy's Runtime API at \(path): \(errnoText(code))\(hint)", errno: code)
        }
        var bytes = Array(text.utf8)
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeMutableBytes { send(fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw LERedirectError(.failed, "writing to HAProxy's Runtime API at \(path): \(errnoText(errno))", errno: errno)
            }
            sent += n
        }
        bytes = []
        var answer: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while answer.count < 1 << 20 {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
            if n == 0 { break }
            if n < 0 {
                if errno == EINTR { continue }
                throw LERedirectError(
                    .failed, "reading HAProxy's answer at \(path): \(errnoText(errno))"
                        + (errno == EAGAIN ? " (no answer within \(DurationText.format(timeout)))" : ""), errno: errno)
            }
            answer += buffer[..<n]
        }
        return String(decoding: answer, as: UTF8.self)
    }
}
