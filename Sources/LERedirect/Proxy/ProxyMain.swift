import CLERedirectSandbox
import CLERedirectShim
import Glibc
import LERedirectModel
import Logging

/// The proxy process (`le-redirect __proxy COUNT`), started by the session holder
/// (`ProxyProcess`): fd 3 is its socket to the holder, fd 4 the session log, fds 5... its COUNT
/// listeners, bound and transparent. It reads `proxyStart`, prepares what needs the file system,
/// then gives up everything before the first byte from the network: uid 0 and every capability,
/// for the `le-redirect` user (or `nobody`), no_new_privs, non-dumpable; Landlock (nothing of the
/// file system but reading the webroot; no TCP bind); a seccomp filter of the calls the relay
/// makes. It answers `proxyReady` and serves until the holder drains or stops it, or goes away.
package enum ProxyMain {
    static let holderFD: Int32 = 3
    static let logFD: Int32 = 4
    static let firstListenerFD: Int32 = 5

    package static func run(_ arguments: [String]) -> Never {
        signal(SIGPIPE, SIG_IGN)
        let handler = LineLogHandler(label: "le-redirect-proxy[\(getpid())]", fd: logFD, level: LineLogHandler.level(default: .info))
        let logger = Logger(label: "le-redirect.proxy") { _ in handler }
        let holder = MessageChannel(fd: holderFD, peer: "the session holder")
        func fail(_ error: LERedirectError) -> Never {
            logger.error("the validation proxy could not start: \(error.message)")
            try? holder.send(.failure(error))
            exit(error.exitCode)
        }
        guard let count = arguments.first.flatMap(Int32.init), (1...2).contains(count) else {
            fail(LERedirectError(.invalidArgument, "le-redirect __proxy is started by the session holder, with its listeners"))
        }
        let start: ProxyStart
        do {
            guard case .proxyStart(let s) = try holder.receive(timeout: .seconds(10)) else {
                fail(LERedirectError(.failed, "the session holder's first message is not 'proxy-start'"))
            }
            start = s
        } catch {
            fail(holder.describe(error, answering: .statusRequest))
        }
        let proxy = ValidationProxy(
            options: start.options, redirectedPort: start.redirectedPort, proxyPort: start.proxyPort,
            listeners: (0..<count).map { firstListenerFD + $0 }, holder: holder,
            listenerOwners: ListenerOwners(start.listenerOwners), logger: logger)
        do throws(LERedirectError) {
            try proxy.prepare()
            let ready = try confine(proxy, as: start.user)
            try holderSend(holder, .proxyReady(ready))
        } catch {
            fail(error)
        }
        Fault.reach("proxy-confined")
        probe(logger)
        switch proxy.run() {
        case .drained, .stopped: exit(0)
        case .holderGone, .failed: exit(1)
        }
    }

    /// Debug builds: LE_REDIRECT_PROXY_PROBE=PATH[:PATH...] has the confined proxy try to open
    /// each path and log what happened, so that a test sees what its confinement lets through.
    private static func probe(_ logger: Logger) {
        #if DEBUG
        guard let list = getenv("LE_REDIRECT_PROXY_PROBE").map({ String(cString: $0) }) else { return }
        for path in list.split(separator: ":").map(String.init) {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            let code = errno
            if fd >= 0 { closeDescriptor(fd) }
            logger.notice("probe \(path): \(fd >= 0 ? "opened" : errnoText(code))")
        }
        #endif
    }

    private static func holderSend(_ holder: MessageChannel, _ message: Message) throws(LERedirectError) {
        do { try holder.send(message) } catch {
            throw LERedirectError(.failed, "telling the session holder: \(error)", errno: error.errno)
        }
    }

    /// Drops privileges, opens the webroot as the proxy's user, then Landlock and seccomp.
    private static func confine(_ proxy: ValidationProxy, as user: ProxyUser) throws(LERedirectError) -> ProxyReady {
        let dropped = user.groups.withUnsafeBufferPointer {
            le_drop_privileges(user.uid, user.gid, $0.baseAddress, Int32($0.count))
        }
        guard dropped == 0 else {
            throw LERedirectError(
                .failed, "the validation proxy dropping its privileges for user \(user.name) (uid \(user.uid)): \(errnoText(dropped))",
                errno: dropped)
        }
        let webroot: Int32?
        do { webroot = try proxy.openWebroot() } catch {
            throw LERedirectError(
                error.kind,
                "\(error.message) (the validation proxy opens it as user \(user.name), uid \(user.uid): every directory on "
                    + "the way needs search permission for it, e.g. chmod o+x)", errno: error.errno)
        }
        var abi: Int32 = 0
        let landlocked = le_landlock_restrict(webroot ?? -1, &abi)
        guard landlocked == 0 else {
            throw LERedirectError(.failed, "the validation proxy restricting itself with Landlock: \(errnoText(landlocked))", errno: landlocked)
        }
        let filtered = le_seccomp_load()
        guard filtered == 0 else {
            throw LERedirectError(
                .failed, "the validation proxy loading its seccomp filter: \(errnoText(-filtered))", errno: -filtered)
        }
        return ProxyReady(pid: getpid(), uid: getuid(), landlockABI: abi, seccomp: true)
    }
}
