import CLERedirectSandbox
import CLERedirectShim
import Glibc
import LERedirectModel
import Logging

/// The proxy process (`le-redirect __proxy COUNT`), started by the session holder
/// (`ProxyProcess`): fd 3 is its socket to the holder, fd 4 the session log, fds 5... its COUNT
/// listeners, bound and transparent. It reads `proxyStart`, then gives up uid 0 and every
/// capability for the `le-redirect` user (or `nobody`), no_new_privs, non-dumpable; as that user
/// prepares what needs the resolver and the file system (the challenge URL's address, the
/// webroot); then Landlock (nothing of the file system but reading the webroot; no TCP bind, TCP
/// connect only to the steered port and the challenge port), a bound on how far it may grow a
/// file (the session log), and a seccomp filter of the calls the relay makes, all before the
/// first byte from the network. It answers `proxyReady` and serves until the holder drains or
/// stops it, or goes away.
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
            let ready = try confine(proxy, start)
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

    /// How far the proxy may grow a file: the session log (rotated at 1 MiB when a session begins).
    static let fileSizeLimit: UInt = 8 << 20

    /// Drops privileges, prepares (resolver, webroot) as the proxy's user, then Landlock, the file
    /// size bound and seccomp.
    private static func confine(_ proxy: ValidationProxy, _ start: ProxyStart) throws(LERedirectError) -> ProxyReady {
        let user = start.user
        let dropped = user.groups.withUnsafeBufferPointer {
            le_drop_privileges(user.uid, user.gid, $0.baseAddress, Int32($0.count))
        }
        guard dropped == 0 else {
            throw LERedirectError(
                .failed, "the validation proxy dropping its privileges for user \(user.name) (uid \(user.uid)): \(errnoText(dropped))",
                errno: dropped)
        }
        try proxy.prepare()
        let webroot: Int32?
        do { webroot = try proxy.openWebroot(group: user.groups.first) } catch {
            throw LERedirectError(
                error.kind,
                "\(error.message) (the validation proxy opens it as user \(user.name), uid \(user.uid): every directory on "
                    + "the way needs search permission for it, e.g. chmod o+x)", errno: error.errno)
        }
        var abi: Int32 = 0
        let ports = proxy.connectPorts
        let landlocked = ports.withUnsafeBufferPointer {
            le_landlock_restrict(webroot ?? -1, $0.baseAddress, Int32($0.count), &abi)
        }
        guard landlocked == 0 else {
            throw LERedirectError(.failed, "the validation proxy restricting itself with Landlock: \(errnoText(landlocked))", errno: landlocked)
        }
        // Past the bound a write fails (EFBIG) rather than raising SIGXFSZ.
        signal(SIGXFSZ, SIG_IGN)
        var size = rlimit(rlim_cur: rlim_t(fileSizeLimit), rlim_max: rlim_t(fileSizeLimit))
        guard setrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &size) == 0 else {
            let code = errno
            throw LERedirectError(.failed, "the validation proxy bounding its file size: \(errnoText(code))", errno: code)
        }
        let filtered = le_seccomp_load(abi > 0 ? 1 : 0)
        guard filtered == 0 else {
            throw LERedirectError(
                .failed, "the validation proxy loading its seccomp filter: \(errnoText(-filtered))", errno: -filtered)
        }
        return ProxyReady(pid: getpid(), uid: getuid(), landlockABI: abi, seccomp: true)
    }
}
