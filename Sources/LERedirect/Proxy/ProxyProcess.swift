import CLERedirectShim
import Glibc
import LERedirectModel
import Logging

/// The session holder's side of the validation proxy, which runs in a process of its own
/// (`le-redirect __proxy`, `ProxyMain`): the holder binds the transparent listeners (that takes
/// CAP_NET_ADMIN), starts the process with them, and from then on only talks to it over their
/// socket pair. The process drops every privilege before it reads a byte from the network.
///
/// The two watch each other: the holder polls the socket and ends the session when it closes
/// (the proxy died: `proxyGone`); the proxy exits when the holder's end closes.
///
/// Used by the holder's thread only (`@unchecked Sendable` for the holder's sake).
final class ProxyProcess: @unchecked Sendable {
    let options: ProxyOptions
    let pid: pid_t
    let ready: ProxyReady
    let user: ProxyUser
    private let channel: MessageChannel
    private let logger: Logger
    private var reaped: Int32?
    /// The counters the proxy reported when it finished draining.
    private(set) var finalStatus: ProxyStatus?

    /// The socket to poll: readable (or hung up) while no request is outstanding means the proxy died.
    var socket: Int32 { channel.fd }

    private init(options: ProxyOptions, pid: pid_t, ready: ProxyReady, user: ProxyUser, channel: MessageChannel, logger: Logger) {
        self.options = options
        self.pid = pid
        self.ready = ready
        self.user = user
        self.channel = channel
        self.logger = logger
    }

    deinit { closeDescriptor(channel.fd) }

    // MARK: Starting

    /// Binds the listeners, starts the proxy process with them and waits until it serves.
    /// Throws with nothing left open and the process gone.
    static func start(
        options: ProxyOptions, redirectedPort: UInt16, proxyPort: UInt16, listenerOwners: [UInt32], logPath: String,
        kind: ProcessIdentity.Kind, logger: Logger, readyTimeout: Duration = .seconds(10)
    ) throws(LERedirectError) -> ProxyProcess {
        let executable = try proxyExecutable(kind)
        let user = ProxyUser.resolve(webroot: options.challenge)
        // Closed here once the process has its copies (or on any failure before).
        var listeners: [Int32] = []
        defer { for fd in listeners { closeDescriptor(fd) } }
        for family in [AF_INET, AF_INET6] {
            let injected = Fault.injectedErrno("bind")
            let fd = injected == nil ? le_tcp_listen(family, proxyPort, 4096, 1) : -1
            if fd < 0 {
                let code = injected ?? errno
                if family == AF_INET6 && (code == EAFNOSUPPORT || code == EADDRNOTAVAIL) {
                    logger.warning("no IPv6 on this host; the proxy listens on IPv4 only")
                    continue
                }
                let hint =
                    code == EADDRINUSE
                    ? "; another program listens there: choose another proxy port"
                    : code == EPERM ? " (a transparent listener, which steered connections need, takes CAP_NET_ADMIN)" : ""
                throw LERedirectError(
                    .failed,
                    "binding the validation proxy to \(family == AF_INET ? "0.0.0.0" : "[::]"):\(proxyPort): "
                        + "\(errnoText(code))\(hint). Nothing was changed", errno: code)
            }
            listeners.append(fd)
        }
        var pair: [Int32] = [-1, -1]
        guard le_socketpair_cloexec(&pair) == 0 else {
            let code = errno
            throw LERedirectError(.failed, "starting the validation proxy: socketpair: \(errnoText(code))", errno: code)
        }
        let ours = OwnedDescriptor(pair[0])
        let theirs = OwnedDescriptor(pair[1])
        let log = OwnedDescriptor(open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0o600))
        let devnull = OwnedDescriptor(open("/dev/null", O_RDWR | O_CLOEXEC))
        guard log.rawValue >= 0, devnull.rawValue >= 0 else {
            let code = errno
            throw LERedirectError(.failed, "starting the validation proxy: opening \(logPath): \(errnoText(code))", errno: code)
        }
        let arguments = [executable, "__proxy", "\(listeners.count)"]
        // Only what the proxy reads: nothing of the holder's (a hook's or an embedding program's
        // credentials) goes into the process that reads the internet. The runtime's crash reporter
        // would be a process the seccomp filter does not let it start.
        let passedOn = ["LE_REDIRECT_LOG_LEVEL=", "LE_REDIRECT_FAULT=", "LE_REDIRECT_PROXY_PROBE="]
        let environment = currentEnvironment().filter { entry in passedOn.contains { entry.hasPrefix($0) } }
            + ["SWIFT_BACKTRACE=enable=no", "PATH=/nonexistent"]
        var passed = [theirs.rawValue, log.rawValue]
        passed += listeners
        var pid: pid_t = 0
        let rc = Session.withCStrings(arguments) { argv in
            Session.withCStrings(environment) { envp in
                passed.withUnsafeBufferPointer {
                    le_spawn_detached(&pid, executable, argv, envp, devnull.rawValue, $0.baseAddress, Int32($0.count))
                }
            }
        }
        // The holder keeps no copy of the proxy's end: when the proxy dies, ours reads EOF.
        _ = consume theirs
        for fd in listeners { closeDescriptor(fd) }
        listeners = []
        guard rc == 0 else {
            throw LERedirectError(.failed, "starting the validation proxy \(executable): \(errnoText(rc))", errno: rc)
        }
        let channel = MessageChannel(fd: ours.take(), peer: "the validation proxy (pid \(pid))")
        func abandon(_ error: LERedirectError) -> LERedirectError {
            _ = Glibc.kill(pid, SIGKILL)
            var status: Int32 = 0
            _ = waitpid(pid, &status, 0)
            closeDescriptor(channel.fd)
            return error
        }
        let start = ProxyStart(
            options: options, redirectedPort: redirectedPort, proxyPort: proxyPort, listenerOwners: listenerOwners, user: user)
        let answer: Message
        do { answer = try channel.call(.proxyStart(start), timeout: readyTimeout) } catch {
            var status: Int32 = 0
            let exited = waitpid(pid, &status, WNOHANG) == pid
            let why = exited ? " (it \(Self.describe(status)))" : ""
            throw abandon(LERedirectError(error.kind, "starting the validation proxy: \(error.message)\(why)", errno: error.errno))
        }
        switch answer {
        case .proxyReady(let ready):
            logger.info(
                "validation proxy started",
                metadata: [
                    "pid": "\(pid)", "user": "\(user.name)", "uid": "\(ready.uid)",
                    "landlock": "\(ready.landlockABI == 0 ? "none" : "abi \(ready.landlockABI)")", "seccomp": "\(ready.seccomp)",
                ])
            if ready.landlockABI == 0 {
                logger.notice("this kernel has no Landlock: the validation proxy (user \(user.name)) may read what that user may")
            }
            return ProxyProcess(options: options, pid: pid, ready: ready, user: user, channel: channel, logger: logger)
        case .failure(let error):
            // Its words, not to be trusted: one line of printable text.
            let said = String(String.UnicodeScalarView(error.message.unicodeScalars.prefix(2000).map {
                $0.value < 0x20 || $0.value == 0x7f || (0x80..<0xa0).contains($0.value) ? " " : $0
            }))
            throw abandon(LERedirectError(error.kind, said, errno: error.errno))
        default:
            throw abandon(LERedirectError(.failed, "starting the validation proxy: it answered '\(answer.name)'"))
        }
    }

    /// The program that runs the proxy: this one when it is le-redirect (the daemon); for a
    /// program embedding the library, LE_REDIRECT_EXECUTABLE, else le-redirect beside it, in
    /// /usr/sbin or /usr/local/sbin, or on PATH.
    static func proxyExecutable(_ kind: ProcessIdentity.Kind) throws(LERedirectError) -> String {
        let own = Session.executablePath()
        if kind == .daemon { return own }
        if let set = getenv("LE_REDIRECT_EXECUTABLE").map({ String(cString: $0) }), !set.isEmpty {
            if let why = untrustworthy(set) {
                throw LERedirectError(
                    .invalidArgument, "LE_REDIRECT_EXECUTABLE=\(set): \(why); it names the le-redirect program that runs the validation proxy. Nothing was changed")
            }
            return set
        }
        var candidates: [String] = []
        if let slash = own.lastIndex(of: "/") { candidates.append(String(own[..<slash]) + "/le-redirect") }
        candidates += ["/usr/sbin/le-redirect", "/usr/local/sbin/le-redirect"]
        if let path = getenv("PATH").map({ String(cString: $0) }) {
            candidates += path.split(separator: ":").filter { $0.hasPrefix("/") }.map { "\($0)/le-redirect" }
        }
        // Root starts it: only a program no one but root (or this process's user) could have put there.
        if let found = candidates.first(where: { untrustworthy($0) == nil }) { return found }
        throw LERedirectError(
            .unsupported,
            "the validation proxy runs as the program le-redirect, unprivileged, and none was found beside \(own), in "
                + "/usr/sbin, /usr/local/sbin or on PATH that root or this user owns and no one else may write; install it "
                + "or set LE_REDIRECT_EXECUTABLE. Nothing was changed")
    }

    /// Why `path` is not a program to start as root: missing, not executable, or it (or its
    /// directory) belongs to another user or may be written by others. nil when it will do.
    static func untrustworthy(_ path: String) -> String? {
        guard access(path, X_OK) == 0 else { return errnoText(errno) }
        let directory = path.lastIndex(of: "/").map { String(path[..<$0]) }.flatMap { $0.isEmpty ? "/" : $0 } ?? "."
        for (what, checked) in [("it", path), ("its directory", directory)] {
            var st = stat()
            guard stat(checked, &st) == 0 else { return "\(what): \(errnoText(errno))" }
            if st.st_uid != 0 && st.st_uid != geteuid() { return "\(what) belongs to uid \(st.st_uid)" }
            if st.st_mode & (S_IWGRP | S_IWOTH) != 0 { return "\(what) may be written by others (mode \(String(st.st_mode & 0o7777, radix: 8)))" }
        }
        return nil
    }

    private static func currentEnvironment() -> [String] {
        var out: [String] = []
        var p = environ
        while let entry = p.pointee {
            out.append(String(cString: entry))
            p += 1
        }
        return out
    }

    // MARK: Talking to it

    /// Registers a token; returns how many the proxy holds.
    func add(_ token: String, _ keyAuthorization: String) throws(LERedirectError) -> Int {
        try tokens(.challengeAdd(token: token, keyAuthorization: keyAuthorization))
    }

    func remove(_ token: String) throws(LERedirectError) -> Int {
        try tokens(.challengeRemove(token: token))
    }

    /// One request and the answer `expected` takes (or the proxy's `failure`). A proxy that breaks
    /// the protocol (no answer in time, a malformed one, one that answers another request) is
    /// killed: it is stopped, hung, or no longer the proxy the holder started (compromised), a late
    /// answer would be taken for the next request's, and steered connections would wait on it.
    /// The holder then sees its socket close and ends the session.
    private func call<T>(_ request: Message, timeout: Duration, _ expected: (Message) -> T?) throws(LERedirectError) -> T {
        guard reaped == nil else {
            throw LERedirectError(.failed, "the validation proxy (pid \(pid)) has exited; '\(request.name)' was not sent")
        }
        let answer: Message
        do { answer = try channel.call(request, timeout: timeout) } catch {
            kill()
            throw error
        }
        if let value = expected(answer) { return value }
        if case .failure(let error) = answer { throw error }
        kill()
        throw LERedirectError(.failed, "the validation proxy answered '\(answer.name)' to '\(request.name)', and was killed")
    }

    private func tokens(_ request: Message) throws(LERedirectError) -> Int {
        try call(request, timeout: .seconds(5)) { if case .tokensHeld(let n) = $0 { n } else { nil } }
    }

    /// How long the proxy may take to answer a status request.
    static let answerTimeout: Duration = .seconds(2)

    /// Its counters, or nil when it does not answer within `answerTimeout`.
    func status() -> ProxyStatus? {
        if let finalStatus { return finalStatus }
        return try? call(.statusRequest, timeout: Self.answerTimeout) { if case .proxyStatus(let s) = $0 { s } else { nil } }
    }

    /// Kills it (it does not answer) and reaps it.
    func kill() {
        guard reaped == nil else { return }
        _ = Glibc.kill(pid, SIGKILL)
        var status: Int32 = 0
        if waitpid(pid, &status, 0) == pid { reaped = status }
    }

    /// Drains (see `ValidationProxy`) and waits until the process has exited.
    func drain(timeout: Duration?, steered: UInt64?) {
        let drainTimeout = min(max(timeout ?? options.drainTimeout, .zero), .seconds(3600))
        let wait = drainTimeout + .milliseconds(ValidationProxy.responseGrace) + .seconds(5)
        guard reaped == nil else { return }
        let request = Message.drain(timeout: timeout, steered: steered)
        do {
            try channel.send(request)
            Fault.reach("drain-started")
            switch try channel.receive(timeout: wait) {
            case .drained(let s): finalStatus = s
            case let other: logger.warning("the validation proxy answered '\(other.name)' to 'drain'; it is killed")
            }
        } catch let error as SystemError {
            logger.warning("draining the validation proxy: \(error)")
        } catch let error as MessageChannel.ReceiveError {
            logger.warning("draining the validation proxy: \(channel.describe(error, answering: request).message)")
        } catch {}
        reap(within: .seconds(2))
    }

    /// Ends the proxy at once (its connections are closed) and waits until it has exited.
    func stop() {
        guard reaped == nil else { return }
        try? channel.send(.stop)
        reap(within: .seconds(2))
    }

    /// After its socket closed unasked: how it ended, for the log.
    func exitDescription() -> String {
        reap(within: .seconds(1))
        return reaped.map { "the validation proxy (pid \(pid)) \(Self.describe($0))" } ?? "the validation proxy (pid \(pid)) closed its socket"
    }

    private func reap(within limit: Duration) {
        guard reaped == nil else { return }
        let deadline = monotonicMilliseconds() + limit.milliseconds
        var status: Int32 = 0
        while monotonicMilliseconds() < deadline {
            if waitpid(pid, &status, WNOHANG) == pid {
                reaped = status
                return
            }
            usleep(2_000)
        }
        _ = Glibc.kill(pid, SIGKILL)
        if waitpid(pid, &status, 0) == pid { reaped = status }
        logger.warning("the validation proxy (pid \(pid)) did not exit in time and was killed")
    }

    static func describe(_ status: Int32) -> String {
        let signal = status & 0x7f
        guard signal != 0 else { return "exited with status \((status >> 8) & 0xff)" }
        if signal == SIGSYS { return "was killed by signal \(signal) (SIGSYS: a system call its seccomp filter does not allow)" }
        return "was killed by signal \(signal)"
    }
}

extension ProxyUser {
    /// The proxy's user: `le-redirect` where scripts/install (or the package) created it, else
    /// `nobody`; with a webroot, the webroot's group too (unless it is root's), so that challenge
    /// files readable by that group are served.
    static func resolve(webroot: ChallengeSource) -> ProxyUser {
        var user = lookup("le-redirect") ?? lookup("nobody") ?? ProxyUser(name: "nobody", uid: 65534, gid: 65534)
        if user.gid == 0 { user.gid = 65534 }
        if case .webroot(let dir) = webroot {
            var st = stat()
            if stat(dir, &st) == 0, st.st_gid != 0, st.st_gid != user.gid { user.groups = [st.st_gid] }
        }
        return user
    }

    private static func lookup(_ name: String) -> ProxyUser? {
        var entry = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 16384)
        guard getpwnam_r(name, &entry, &buffer, buffer.count, &result) == 0, result != nil, entry.pw_uid != 0 else { return nil }
        return ProxyUser(name: name, uid: entry.pw_uid, gid: entry.pw_gid)
    }
}
