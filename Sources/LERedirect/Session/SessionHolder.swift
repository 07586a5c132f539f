import CLERedirectShim
import CNetfilter
import Glibc
import LERedirectModel
import Logging
import Synchronization

/// The process side of an active session: it owns the firewall connections (and with the nftables
/// one the owned table), serves the control socket, and ends the session when asked, at the TTL, or
/// on a signal.
/// The daemon runs one; a program embedding the library runs one in-process.
///
/// `@unchecked Sendable`: the descriptors and the firewalls are set once in `start` and then used only
/// by the holder's own thread (each firewall serialises itself); mutable state lives in `shared`.
final class SessionHolder: @unchecked Sendable {
    let state: StateDirectory
    let logger: Logger
    let journal: Journal
    private let engine: SessionEngine
    private let firewalls: Firewalls
    private let listener: Int32
    private let wake: Int32
    private let stopSignals: Int32?
    /// The program the session follows, if any: a pidfd, readable once it has exited.
    struct Followed {
        let fd: Int32
        let pid: Int32
        let name: String
    }
    private let followed: Followed?
    private let monotonicDeadline: Int64
    private var thread = pthread_t()
    /// The built-in validation proxy's process; nil with an external proxy.
    let proxy: ProxyProcess?
    /// With an external proxy: whose listeners on the proxy port may have port 80 (checked every second).
    private let externalProxyOwners: ListenerOwners?
    /// How many challenge tokens the proxy holds (it holds them; this is its last answer).
    private var tokenCount = 0
    private let armsPerChallenge: Bool
    /// --address: what the journal's x_tables rules were made for (arming rebuilds them).
    private let addresses: [IPAddress]
    /// --include-local, for status.
    private let includeLocal: Bool
    /// Begun by the certbot auth hook: the cleanup hook ends it when the last token goes.
    let endsWithLastToken: Bool
    private var drainTimeout: Duration?
    /// Whether the port is in the redirect's set; changed with the firewall under this lock.
    private let armed: Mutex<Bool>

    private struct Shared {
        var outcome: Result<EndReport, LERedirectError>?
        var waiters: [CheckedContinuation<Result<EndReport, LERedirectError>, Never>] = []
    }
    private let shared = Mutex(Shared())

    private init(
        state: StateDirectory, logger: Logger, journal: Journal, engine: SessionEngine, firewalls: Firewalls,
        listener: Int32, wake: Int32, stopSignals: Int32?, followed: Followed?, monotonicDeadline: Int64,
        proxy: ProxyProcess?, externalProxyOwners: ListenerOwners?, armsPerChallenge: Bool, addresses: [IPAddress] = [], includeLocal: Bool = false,
        endsWithLastToken: Bool
    ) {
        self.followed = followed
        self.externalProxyOwners = externalProxyOwners
        self.endsWithLastToken = endsWithLastToken
        self.proxy = proxy
        self.armsPerChallenge = armsPerChallenge
        self.addresses = addresses
        self.includeLocal = includeLocal
        self.armed = Mutex(!armsPerChallenge)
        self.state = state
        self.logger = logger
        self.journal = journal
        self.engine = engine
        self.firewalls = firewalls
        self.listener = listener
        self.wake = wake
        self.stopSignals = stopSignals
        self.monotonicDeadline = monotonicDeadline
    }

    /// Opens the firewall connections, binds the control socket, installs the redirect, and starts
    /// serving. The caller holds the state lock. On failure nothing is left installed.
    static func start(
        _ options: ValidatedOptions, state: StateDirectory, kind: ProcessIdentity.Kind, stopSignals: Int32? = nil,
        endsWithLastToken: Bool = false, following followed: Followed? = nil, logger: Logger
    ) throws(LERedirectError) -> SessionHolder {
        let namespace: NamespaceIdentity
        do { namespace = try ProcessFacts.currentNamespace() } catch {
            throw LERedirectError(.failed, "reading this process's network namespace: \(error)", errno: error.errno)
        }
        let firewalls = try Firewalls.open("begin")
        let listener: Int32
        do { listener = try ControlChannel.listen(at: state.controlSocketPath) } catch {
            firewalls.close()
            throw error
        }
        let wake = le_eventfd_cloexec()
        guard wake >= 0 else {
            let code = errno
            closeDescriptor(listener)
            firewalls.close()
            throw LERedirectError(.failed, "creating an eventfd: \(errnoText(code))", errno: code)
        }
        var proxy: ProxyProcess?
        if case .external = options.proxy {
            do { try checkExternalProxy(options, logger: logger) } catch {
                closeDescriptor(wake)
                closeDescriptor(listener)
                _ = unlink(state.controlSocketPath)
                firewalls.close()
                throw error
            }
        }
        if case .builtIn(let proxyOptions) = options.proxy {
            // Listening before the redirect exists: there is no moment when it points at nothing.
            do {
                proxy = try ProxyProcess.start(
                    options: proxyOptions, redirectedPort: options.port, proxyPort: options.proxyPort,
                    listenerOwners: options.listenerOwners, logPath: state.logPath, kind: kind, logger: logger)
            } catch {
                closeDescriptor(wake)
                closeDescriptor(listener)
                _ = unlink(state.controlSocketPath)
                firewalls.close()
                throw error
            }
        }
        Fault.reach("listeners-bound")
        let engine = SessionEngine.live(state: state, logger: logger)
        let journal: Journal
        do {
            let startedMonotonic = monotonicMilliseconds()
            journal = try engine.install(
                options, firewalls: firewalls, holder: ProcessFacts.identity(kind: kind), namespace: namespace,
                proxyUID: proxy?.user.uid, now: unixMilliseconds())
            if options.includeLocal, let proxy, proxy.user.name != "le-redirect" {
                let note =
                    "--include-local: the proxy runs as \(proxy.user.name) (uid \(proxy.user.uid)), as there is no user le-redirect "
                    + "(scripts/install makes it): connections of every process of that user are not steered either"
                engine.notes.append(note)
                logger.notice("\(note)")
            }
            let holder = SessionHolder(
                state: state, logger: logger, journal: journal, engine: engine, firewalls: firewalls, listener: listener,
                wake: wake, stopSignals: stopSignals, followed: followed,
                monotonicDeadline: startedMonotonic + options.ttl.milliseconds,
                proxy: proxy, externalProxyOwners: proxy == nil ? ListenerOwners(options.listenerOwners) : nil,
                armsPerChallenge: options.proxy.armsPerChallenge, addresses: options.addresses,
                includeLocal: options.includeLocal,
                endsWithLastToken: endsWithLastToken)
            holder.thread = startThread { holder.run() }
            return holder
        } catch {
            proxy?.stop()
            closeDescriptor(wake)
            closeDescriptor(listener)
            _ = unlink(state.controlSocketPath)
            firewalls.close()
            throw error
        }
    }

    /// An external proxy gets port 80 only if every socket listening on the proxy port belongs to
    /// root or a user named with --challenge-owner: any local user may bind a free port.
    private static func checkExternalProxy(_ options: ValidatedOptions, logger: Logger) throws(LERedirectError) {
        let owners = ListenerOwners(options.listenerOwners)
        let listeners: [SocketDiagnostics.Socket]
        do throws(NetlinkError) { listeners = try proxyListeners(options.proxyPort) } catch {
            throw LERedirectError(
                .failed, "begin --external-proxy: listing the listeners on port \(options.proxyPort): \(errnoText(error.errno)). Nothing was changed",
                errno: error.errno)
        }
        if let foreign = untrusted(listeners, owners) {
            throw LERedirectError(
                .failed,
                "begin --external-proxy: the listener on port \(options.proxyPort) belongs to \(foreign), not \(owners.text); "
                    + "port 80 is not handed to it (name its user with --challenge-owner if it is your proxy). Nothing was changed")
        }
        if listeners.isEmpty {
            logger.warning(
                "begin --external-proxy: nothing listens on port \(options.proxyPort) yet; port \(options.port) reaches no one until your proxy does (transparently: HAProxy's `bind :\(options.proxyPort) transparent`)")
        }
        // tproxy hands a connection only to a transparent listener on the wildcard address (or the
        // incoming interface's first address): without one, steered SYNs would go on to the app
        // (nftables) or be dropped (x_tables' TPROXY), and every challenge fail with nothing to say why.
        guard !listeners.isEmpty else { return }
        let steered = options.steeredFamilies  // --address may leave a family alone
        for (family, name, any) in [(UInt8(AF_INET), "IPv4", "0.0.0.0"), (UInt8(AF_INET6), "IPv6", "[::]")]
        where steered.contains(family == UInt8(AF_INET) ? .ip : .ip6) {
            let covering = listeners.filter {
                $0.wildcard && ($0.family == family || (family == UInt8(AF_INET) && $0.family == UInt8(AF_INET6) && $0.v6only == false))
            }
            if covering.contains(where: { $0.transparent == true }) { continue }
            if let unknown = covering.first(where: { $0.transparent == nil }) {
                logger.warning(
                    "begin --external-proxy: this kernel does not say whether the listener on \(any):\(options.proxyPort) (uid \(unknown.uid)) is transparent (Linux 5.10 or newer does); steered \(name) connections reach it only if it is")
                continue
            }
            let what = covering.isEmpty ? "nothing listens on \(any):\(options.proxyPort)" : "the listener on \(any):\(options.proxyPort) is not transparent (IP_TRANSPARENT / IPV6_TRANSPARENT)"
            if family == UInt8(AF_INET6) && listeners.allSatisfy({ $0.family == UInt8(AF_INET) }) {
                // An IPv4-only proxy: IPv6 visitors would not reach it.
                logger.warning("begin --external-proxy: \(what); steered IPv6 connections reach no one")
                continue
            }
            throw LERedirectError(
                .failed,
                "begin --external-proxy: \(what), and steered \(name) connections reach only a transparent listener on the "
                    + "wildcard address; make your proxy listen there transparently (HAProxy: `bind :\(options.proxyPort) transparent` "
                    + "and `bind :::\(options.proxyPort) v6only transparent`; it needs CAP_NET_ADMIN). Nothing was changed")
        }
    }

    private static func proxyListeners(_ port: UInt16) throws(NetlinkError) -> [SocketDiagnostics.Socket] {
        let diag = try NetlinkSocket(bus: NETLINK_SOCK_DIAG)
        defer { diag.close() }
        return try SocketDiagnostics.listeners(diag, port: port)
    }

    /// "uid N" of the first listener that is neither root's nor a named user's, if any.
    private static func untrusted(_ listeners: [SocketDiagnostics.Socket], _ owners: ListenerOwners) -> String? {
        listeners.first { !$0.ownerIsKnown || !owners.allows($0.uid) }.map { $0.ownerIsKnown ? "uid \($0.uid)" : "an unknown user" }
    }

    /// With an external proxy: whether someone not trusted now listens on the proxy port (the
    /// operator's proxy restarted, and another user took the port meanwhile).
    private func externalProxyTakenOver() -> String? {
        guard let owners = externalProxyOwners else { return nil }
        do throws(NetlinkError) {
            return Self.untrusted(try Self.proxyListeners(journal.proxyPort), owners)
        } catch {
            logger.warning("listing the listeners on port \(journal.proxyPort): \(errnoText(error.errno))")
            return nil
        }
    }

    /// How often the holder makes sure the proxy process still answers.
    static let proxyCheckInterval: Int64 = 2000

    deinit {
        // The wake descriptor outlives the holder's thread so that a late end() never writes to a
        // closed (or reused) descriptor.
        closeDescriptor(wake)
    }

    // MARK: Ending

    /// Asks the holder to end (as `le-redirect end` would, but from this process) and waits.
    func end() async -> Result<EndReport, LERedirectError> {
        if let outcome = shared.withLock({ $0.outcome }) { return outcome }
        requestEnd()
        return await ended()
    }

    /// Asks the holder's thread to end the session, without waiting.
    func requestEnd() {
        var one: UInt64 = 1
        _ = write(wake, &one, 8)
    }

    /// Waits until the session has ended, for whatever reason.
    func ended() async -> Result<EndReport, LERedirectError> {
        await withCheckedContinuation { continuation in
            let ready = shared.withLock { s -> Result<EndReport, LERedirectError>? in
                if let outcome = s.outcome { return outcome }
                s.waiters.append(continuation)
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    /// Blocks the calling thread until the holder's thread is done (the daemon's main thread).
    func join() -> Result<EndReport, LERedirectError> {
        pthread_join(thread, nil)
        return shared.withLock { $0.outcome! }
    }

    // MARK: The holder's thread

    private func run() {
        var reason = EndReport.Reason.expired
        var requester: Int32?
        var nextListenerCheck: Int64 = 0
        var nextProxyCheck = monotonicMilliseconds() + Self.proxyCheckInterval
        loop: while true {
            let remaining = monotonicDeadline - monotonicMilliseconds()
            if remaining <= 0 {
                logger.warning("the TTL has passed; ending the session")
                reason = .expired
                break
            }
            var fds = [
                pollfd(fd: listener, events: Int16(POLLIN), revents: 0), pollfd(fd: wake, events: Int16(POLLIN), revents: 0),
                pollfd(fd: stopSignals ?? -1, events: Int16(POLLIN), revents: 0),
                pollfd(fd: followed?.fd ?? -1, events: Int16(POLLIN), revents: 0),
                pollfd(fd: proxy?.socket ?? -1, events: Int16(POLLIN), revents: 0),
            ]
            // With an external proxy, who listens on its port is looked at every second; the
            // built-in proxy's process is asked for its counters every two.
            let n = poll(&fds, nfds_t(fds.count), Int32(min(remaining, externalProxyOwners == nil && proxy == nil ? 60_000 : 1000)))
            if n < 0 {
                if errno == EINTR { continue }
                logger.error("poll: \(errnoText(errno)); ending the session")
                reason = .requested
                break
            }
            if externalProxyOwners != nil, monotonicMilliseconds() >= nextListenerCheck {
                nextListenerCheck = monotonicMilliseconds() + 1000
                if let foreign = externalProxyTakenOver() {
                    logger.error("\(foreign) now listens on the proxy port \(journal.proxyPort); ending the session so that port 80 goes to the app")
                    reason = .untrustedListener
                    break
                }
            }
            if let proxy, fds[4].revents == 0, monotonicMilliseconds() >= nextProxyCheck {
                nextProxyCheck = monotonicMilliseconds() + Self.proxyCheckInterval
                if proxy.status() == nil {
                    // Stopped (SIGSTOP, by anyone running as its user) or hung: steered
                    // connections would wait on it. Port 80 goes back to the app.
                    logger.error(
                        "the validation proxy (pid \(proxy.pid)) did not answer within \(DurationText.format(ProxyProcess.answerTimeout)); ending the session")
                    proxy.kill()
                    reason = .proxyExited
                    break
                }
            }
            if n == 0 { continue }
            if fds[1].revents != 0 {
                reason = .requested
                break
            }
            if fds[2].revents != 0 {
                logger.notice("signal \(le_read_signalfd(fds[2].fd)) received; ending the session")
                reason = .signal
                break
            }
            if fds[4].revents != 0, let proxy {
                // Nothing was asked of it: the proxy died (or broke the protocol). Port 80 goes back.
                logger.error("\(proxy.exitDescription()); ending the session")
                reason = .proxyExited
                break
            }
            if fds[3].revents != 0, let followed {
                logger.notice("\(followed.name) (pid \(followed.pid)), which the session follows, has exited; ending the session")
                reason = .clientExited
                break
            }
            if fds[0].revents != 0, let client = ControlChannel.accept(listener) {
                switch ControlChannel.readRequest(client) {
                case .statusRequest:
                    ControlChannel.send(client, .holderStatus(currentStatus()))
                    closeDescriptor(client)
                case .endRequest(let timeout):
                    drainTimeout = timeout
                    requester = client
                    reason = .requested
                    break loop
                case .challengeAdd(let token, let keyAuthorization):
                    answerChallenge(client) { () throws(LERedirectError) in try addChallenge(token, keyAuthorization) }
                case .challengeRemove(let token):
                    answerChallenge(client) { () throws(LERedirectError) in try removeChallenge(token) }
                default:
                    closeDescriptor(client)
                }
            }
        }

        let outcome = finish(reason, lockHeldByRequester: requester != nil)
        if let requester {
            switch outcome {
            case .success(let report): ControlChannel.send(requester, .ended(warnings: report.warnings))
            case .failure(let error): ControlChannel.send(requester, .failure(error))
            }
            closeDescriptor(requester)
        }
        let waiters = shared.withLock { s in
            s.outcome = outcome
            defer { s.waiters = [] }
            return s.waiters
        }
        for waiter in waiters { waiter.resume(returning: outcome) }
        // Only now: the kernel's teardown of a netlink socket takes tens of milliseconds, and
        // after a successful end there is nothing left for it to remove.
        firewalls.close()
    }

    /// End's sequence: steering out, proxy drained, table out, journal deleted. The connection is closed by the
    /// caller once everyone waiting has been told (at once here if the removal failed).
    private func finish(_ reason: EndReport.Reason, lockHeldByRequester: Bool) -> Result<EndReport, LERedirectError> {
        var lock: StateLock?
        if !lockHeldByRequester {
            // Briefly: an `end` that holds the lock may be waiting for this very thread to answer.
            do { lock = try state.lock(timeout: .seconds(3)) } catch {
                logger.warning("\(error); ending without the lock (only le-redirect's own rules are touched)")
            }
        }
        let outcome: Result<EndReport, LERedirectError>
        do {
            var drained = false
            let warnings = try engine.uninstall(journal, firewalls: firewalls, armed: isArmed) {
                // Nothing new is steered: the connections in flight finish. The rule's counter says how
                // many SYNs it ever steered, so the proxy knows when its accept queue holds no more.
                let steered = journal.backend == .nftables ? (try? firewalls.nftables?.redirectedPackets()) ?? nil : nil
                proxy?.drain(timeout: drainTimeout, steered: steered)
                drained = true
            }
            if !drained { proxy?.stop() }
            for warning in warnings { logger.warning("\(warning)") }
            // With the proxy's counters: what the window served, for whoever reads the log.
            var metadata: Logger.Metadata = ["reason": "\(reason.rawValue)"]
            for (key, value) in proxy?.finalStatus?.named ?? [] { metadata[key] = "\(value)" }
            logger.info("session ended", metadata: metadata)
            outcome = .success(EndReport(reason: reason, warnings: warnings))
        } catch {
            logger.error("ending the session: \(error); the journal is kept for `le-redirect recover`")
            outcome = .failure(error)
        }
        if case .failure = outcome {
            proxy?.stop()
            // Closing the connection deletes the owned table if the removal above could not;
            // that must have happened before anyone is told the session is over.
            firewalls.close()
        }
        closeDescriptor(listener)
        _ = unlink(state.controlSocketPath)
        _ = lock?.release()
        return outcome
    }

    private func currentStatus() -> HolderStatus {
        HolderStatus(
            pid: getpid(), clientPid: followed?.pid,
            redirectedPackets: (try? firewalls[journal.backend]?.redirectedPackets()) ?? nil, armed: isArmed,
            notes: engine.notes, challengeSource: proxy?.options.challenge.description, tokens: proxy.map { _ in tokenCount },
            proxyPid: proxy?.pid, proxy: proxy?.status(), addresses: addresses.map(\.description), includeLocal: includeLocal)
    }

    // MARK: Challenges held in memory

    var isArmed: Bool { armed.withLock { $0 } }

    /// What begin's plan said the operator should know.
    var engineNotes: [String] { engine.notes }

    /// Answers a `challenge-add` / `challenge-remove` client with the tokens left and the arming.
    private func answerChallenge(_ client: Int32, _ change: () throws(LERedirectError) -> Int) {
        do {
            let count = try change()
            ControlChannel.send(client, .challengeReply(tokens: count, armed: isArmed, endsWithLastToken: endsWithLastToken))
        } catch {
            ControlChannel.send(client, .failure(error))
        }
        closeDescriptor(client)
    }

    /// Registers a token; the first one arms a redirect that is armed per challenge. Returns how
    /// many tokens are registered.
    func addChallenge(_ token: String, _ keyAuthorization: String) throws(LERedirectError) -> Int {
        guard let proxy else {
            throw LERedirectError(
                .invalidArgument,
                "this session uses an external proxy (begin --external-proxy): it holds no challenge tokens")
        }
        guard ChallengeToken.isValid(token) else {
            throw LERedirectError(.invalidArgument, "'\(token)' is not an ACME token (base64url, 1-256 characters)")
        }
        guard ChallengeToken.isValidKeyAuthorization(keyAuthorization), keyAuthorization.hasPrefix(token + ".") else {
            throw LERedirectError(
                .invalidArgument, "'\(keyAuthorization)' is not a key authorization for token \(token) (TOKEN.THUMBPRINT)")
        }
        return try armed.withLock { (armed: inout Bool) throws(LERedirectError) -> Int in
            let count = try proxy.add(token, keyAuthorization)
            tokenCount = count
            if armsPerChallenge && !armed {
                let remaining = max(1000, journal.expiresAt - unixMilliseconds())
                do throws(LERedirectError) {
                    try engine.arm(journal, firewalls: firewalls, remaining: .milliseconds(remaining), addresses: addresses)
                } catch {
                    if let left = try? proxy.remove(token) { tokenCount = left }
                    throw LERedirectError(error.kind, "challenge add: \(error.message)", errno: error.errno)
                }
                armed = true
                logger.info("redirect armed", metadata: ["token": "\(token)"])
            }
            return count
        }
    }

    /// Removes a token; the last one disarms a redirect that is armed per challenge. Returns how
    /// many tokens remain.
    func removeChallenge(_ token: String) throws(LERedirectError) -> Int {
        try armed.withLock { (armed: inout Bool) throws(LERedirectError) -> Int in
            guard let proxy else { return 0 }
            let remaining = try proxy.remove(token)
            tokenCount = remaining
            if armsPerChallenge && armed && remaining == 0 {
                do throws(LERedirectError) { try engine.disarm(journal, firewalls: firewalls) } catch {
                    throw LERedirectError(error.kind, "challenge remove: \(error.message)", errno: error.errno)
                }
                armed = false
                logger.info("redirect disarmed")
            }
            return remaining
        }
    }
}
