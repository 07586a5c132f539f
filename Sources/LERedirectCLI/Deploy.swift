import ArgumentParser
import Glibc
import LERedirect

struct Deploy: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Put a renewed certificate in service without a restart.",
        subcommands: [DeployHAProxy.self])
}

/// `deploy haproxy`: the renewed certificate swapped into a running HAProxy over its Runtime API.
struct DeployHAProxy: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "haproxy",
        abstract: "Swap a renewed certificate into a running HAProxy over its Runtime API (set ssl cert, commit ssl cert).",
        discussion: """
            The chain and key come from --fullchain and --key, else from the ACME client's deploy-hook \
            environment: certbot's RENEWED_LINEAGE (fullchain.pem, privkey.pem), lego's LEGO_CERT_PATH and \
            LEGO_CERT_KEY_PATH, acme.sh's CERT_FULLCHAIN_PATH and CERT_KEY_PATH. HAProxy keeps serving; \
            connections open meanwhile keep the certificate they began with. The same PEM is then written \
            to --certificate (atomically, mode 0600 or the old file's), so a later reload or restart \
            serves it too; --no-write leaves the file alone.
            """)

    @Option(help: ArgumentHelp("HAProxy's stats socket, at level admin.", valueName: "path"))
    var socket = "/run/haproxy/admin.sock"

    @Option(help: ArgumentHelp("The certificate's name in HAProxy: the crt path its configuration names (`show ssl cert` lists them).", valueName: "path"))
    var certificate: String

    @Option(help: ArgumentHelp("The certificate chain (PEM), leaf first.", valueName: "file"))
    var fullchain: String?

    @Option(help: ArgumentHelp("The private key (PEM).", valueName: "file"))
    var key: String?

    @Flag(name: .customLong("no-write"), help: "Do not write the PEM to --certificate's file.")
    var noWrite = false

    func run() throws {
        let (chainPath, keyPath) = try sources()
        let pem = try HAProxyCertificate.pem(
            fullchain: try readText(chainPath), key: try readText(keyPath), fullchainPath: chainPath, keyPath: keyPath)
        _ = try HAProxyRuntime.replaceCertificate(socket: socket, name: certificate, pem: pem)
        print("le-redirect: HAProxy (\(socket)) now serves the certificate of \(chainPath) as \(certificate)")
        if noWrite { return }
        guard certificate.hasPrefix("/") else {
            printWarning(
                "\(certificate) is a name relative to HAProxy's crt-base: the file was not written, so a reload or restart would serve the old certificate; give --certificate as the absolute path, or write the file yourself")
            return
        }
        let written = try writeAtomically(pem, to: certificate)
        print("le-redirect: wrote \(written)")
    }

    /// The chain and key files: given, or named by the ACME client's deploy-hook environment.
    func sources() throws -> (String, String) {
        switch (fullchain, key) {
        case (let chain?, let key?): return (chain, key)
        case (nil, nil): break
        default: throw LERedirectError(.invalidArgument, "--fullchain and --key go together")
        }
        let env = { (name: String) -> String? in getenv(name).map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } }
        if let lineage = env("RENEWED_LINEAGE") { return (lineage + "/fullchain.pem", lineage + "/privkey.pem") }
        if let chain = env("LEGO_CERT_PATH"), let key = env("LEGO_CERT_KEY_PATH") { return (chain, key) }
        if let chain = env("CERT_FULLCHAIN_PATH"), let key = env("CERT_KEY_PATH") { return (chain, key) }
        throw LERedirectError(
            .invalidArgument,
            "no certificate given: use --fullchain FILE --key FILE, or run as a deploy hook (certbot's RENEWED_LINEAGE, lego's LEGO_CERT_PATH and LEGO_CERT_KEY_PATH, acme.sh's CERT_FULLCHAIN_PATH and CERT_KEY_PATH)")
    }
}

/// A file's text (at most 1 MiB: certificates and keys are a few KiB).
func readText(_ path: String) throws -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw LERedirectError(.failed, "reading \(path): \(String(cString: strerror(errno)))", errno: errno) }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 16_384)
    while true {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
        if n < 0 {
            if errno == EINTR { continue }
            throw LERedirectError(.failed, "reading \(path): \(String(cString: strerror(errno)))", errno: errno)
        }
        if n == 0 { break }
        bytes += buffer[..<n]
        guard bytes.count <= 1 << 20 else { throw LERedirectError(.invalidArgument, "\(path) is larger than 1 MiB: not a certificate") }
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// Writes `text` (a certificate and its private key) to `path` by a rename: through a symbolic
/// link to the file it names, keeping the old file's owner and its mode without any bit for others
/// or group write (0600 for a new file), the directory synced. Returns the path written.
func writeAtomically(_ text: String, to givenPath: String) throws -> String {
    var path = givenPath
    var link = stat()
    if lstat(givenPath, &link) == 0, link.st_mode & S_IFMT == S_IFLNK {
        guard let resolved = realpath(givenPath, nil) else {
            throw LERedirectError(
                .failed, "\(givenPath) is a symbolic link to nothing: \(String(cString: strerror(errno))); HAProxy serves the new certificate, nothing was written",
                errno: errno)
        }
        path = String(cString: resolved)
        free(resolved)
    }
    var old = stat()
    let exists = stat(path, &old) == 0
    let mode = exists ? old.st_mode & 0o740 : 0o600
    let temporary = path + ".le-redirect.\(getpid())"
    var created = false
    let fail = { (what: String) -> LERedirectError in
        let code = errno
        if created { unlink(temporary) }
        return LERedirectError(
            .failed, "\(what) \(path): \(String(cString: strerror(code))); HAProxy serves the new certificate, the file is unchanged",
            errno: code)
    }
    let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode)
    guard fd >= 0 else { throw fail("writing") }
    created = true
    var ok = true
    var bytes = Array(text.utf8)
    var written = 0
    while ok && written < bytes.count {
        let n = bytes.withUnsafeMutableBytes { write(fd, $0.baseAddress! + written, $0.count - written) }
        if n < 0 && errno != EINTR { ok = false } else if n > 0 { written += n }
    }
    bytes = []
    if ok && exists && fchown(fd, old.st_uid, old.st_gid) != 0 { ok = false }
    if ok && fchmod(fd, mode) != 0 { ok = false }
    if ok && fsync(fd) != 0 { ok = false }
    if !ok {
        let error = fail("writing")
        close(fd)
        throw error
    }
    close(fd)
    guard rename(temporary, path) == 0 else { throw fail("replacing") }
    let directory = open(path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/") + "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    if directory >= 0 {
        _ = fsync(directory)
        close(directory)
    }
    return path
}
