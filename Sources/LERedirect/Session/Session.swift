import CLERedirectShim
import Glibc
import LERedirectModel
import Logging

/// The operations behind the CLI's commands and the public API, as blocking calls. Each takes the
/// state lock where it changes anything, and begins with the recovery of a dead session.
package enum Session {
    /// Checks privileges before anything is read or changed.
    package static func requirePrivileges(_ command: String) throws(LERedirectError) {
        guard ProcessFacts.hasNetAdmin() else {
            throw LERedirectError(
                .notPermitted,
                "le-redirect \(command) needs root (or CAP_NET_ADMIN): it changes the firewall and keeps its state in "
                    + "\(StateDirectory.defaultPath). Run it with sudo")
        }
    }

    private static func namespace() throws(LERedirectError) -> NamespaceIdentity {
        do { return try ProcessFacts.currentNamespace() } catch {
            throw LERedirectError(.failed, "reading this process's network namespace: \(error)", errno: error.errno)
        }
    }

    /// With the lock held: refuses if a live session exists, and recovers a dead one.
    static func recoverBeforeBegin(_ state: StateDirectory, logger: Logger) throws(LERedirectError) {
        guard let text = try state.readJournal() else { return }
        if let journal = try? Journal.decode(text), ProcessFacts.isAlive(journal.holder) {
            throw LERedirectError(
                .conflict,
                "a session is already active (pid \(journal.holder.pid), port \(journal.port) -> \(journal.proxyPort), "
                    + "expires \(RFC3339.format(unixMilliseconds: journal.expiresAt))); `le-redirect end` ends it. "
                    + "Nothing was changed")
        }
        let firewalls = try Firewalls.open("begin: recovering the previous session")
        defer { firewalls.close() }
        let report = try SessionEngine.live(state: state, logger: logger)
            .recover(sweep: false, firewalls: firewalls, namespace: try namespace())
        if report.changedAnything {
            logger.notice(
                "recovered a previous session whose holder had died",
                metadata: ["removedRules": "\(report.removedRules)"])
        }
        for warning in report.warnings { logger.warning("\(warning)") }
    }

    /// What both kinds of begin do first. The lock is held until the value goes out of scope.
    private struct PreparedBegin: ~Copyable {
        let options: ValidatedOptions
        let state: StateDirectory
        let lock: StateLock
    }

    private static func prepareBegin(_ options: TakeoverOptions, logger: Logger) throws(LERedirectError) -> PreparedBegin {
        let valid = try options.validated()
        try requirePrivileges("begin")
        let state = StateDirectory.resolve(options.stateDirectory)
        try state.prepare()
        let lock = try state.lock()
        Fault.reach("lock-taken")
        try recoverBeforeBegin(state, logger: logger)
        return PreparedBegin(options: valid, state: state, lock: lock)
    }

    // MARK: Begin, in this process (library)

    static func beginEmbedded(_ options: TakeoverOptions, logger: Logger) throws(LERedirectError) -> SessionHolder {
        let begin = try prepareBegin(options, logger: logger)
        return try SessionHolder.start(begin.options, state: begin.state, kind: .embedded, logger: logger)
    }

    // MARK: Begin, with a detached daemon (CLI)

    /// The program a session follows: it ends when that process exits.
    package enum Follow {
        /// The program that ran the hook: the first ancestor past the hook script and any shells.
        case parent
    }

    /// Starts the session daemon and returns once the redirect is live. The daemon keeps none of
    /// this process's descriptors, so a hook runner that waits for EOF returns at once. With
    /// `following`, the daemon ends the session when that program exits (a killed ACME client does
    /// not leave the redirect up until the TTL).
    package static func beginDetached(
        _ options: TakeoverOptions, endsWithLastToken: Bool = false, following: Follow? = nil, logger: Logger,
        readyTimeout: Duration = .seconds(30)
    )
        throws(LERedirectError) -> SessionStatus
    {
        var client: (pid: Int32, name: String, fd: Int32)?
        if following != nil {
            guard let (pid, name) = ProcessFacts.nearestNonShellAncestor() else {
                throw LERedirectError(.invalidArgument, "--until-parent-exits: no program other than a shell runs this one")
            }
            let fd = le_pidfd_open(pid)
            guard fd >= 0 else {
                throw LERedirectError(.failed, "--until-parent-exits: following \(name) (pid \(pid)): \(errnoText(errno))", errno: errno)
            }
            client = (pid, name, fd)
        }
        defer { if let client { closeDescriptor(client.fd) } }
        let begin = try prepareBegin(options, logger: logger)
        let (valid, state, lock) = (begin.options, begin.state, begin.lock.fd)

        var arguments = [
            executablePath(), "__session", "--state-dir", state.path, "--port", "\(valid.port)", "--proxy-port",
            "\(valid.proxyPort)", "--ttl", "\(valid.ttl.milliseconds / 1000)s", "--backend", valid.backend.rawValue,
        ] + DaemonArguments.encode(valid.proxy) + (endsWithLastToken ? ["--ends-with-last-token", "1"] : [])
        if valid.throughInput { arguments += ["--through-input", "1"] }
        if !valid.listenerOwners.isEmpty {
            arguments += ["--listener-owners", valid.listenerOwners.map(String.init).joined(separator: ",")]
        }
        if let client { arguments += ["--client-pid", "\(client.pid)", "--client-name", client.name] }
        var pipeFDs: [Int32] = [0, 0]
        guard pipe(&pipeFDs) == 0 else {
            throw LERedirectError(.failed, "begin: creating the readiness pipe: \(errnoText(errno))", errno: errno)
        }
        for fd in pipeFDs { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let devnull = open("/dev/null", O_RDWR | O_CLOEXEC)
        var pid: pid_t = 0
        let rc = withCStrings(arguments) { argv in
            ([pipeFDs[1], lock] + (client.map { [$0.fd] } ?? [])).withUnsafeBufferPointer { passed in
                le_spawn_detached(&pid, arguments[0], argv, environ, devnull, passed.baseAddress, Int32(passed.count))
            }
        }
        closeDescriptor(devnull)
        closeDescriptor(pipeFDs[1])
        defer { closeDescriptor(pipeFDs[0]) }
        guard rc == 0 else {
            throw LERedirectError(.failed, "begin: starting the session daemon \(arguments[0]): \(errnoText(rc))", errno: rc)
        }
        Fault.reach("daemon-spawned")

        let line = readLine(pipeFDs[0], timeout: readyTimeout)
        if let line, line == "ok" || line.hasPrefix("ok ") {
            // From the journal: asking the daemon would have it read its counters, which on
            // x_tables means reading whole tables again. After "ok ", what the plan's notes say.
            var begun = status(state: state, askingTheHolder: false)
            begun.armed = !valid.proxy.armsPerChallenge
            if line.hasPrefix("ok ") { begun.note = String(line.dropFirst(3)) }
            return begun
        }
        // Not ready: make sure the daemon is gone, then undo whatever it left (we still hold the lock).
        var why: String
        if let line, line.hasPrefix("error ") {
            let parts = line.split(separator: " ", maxSplits: 2)
            why = parts.count > 2 ? String(parts[2]) : line
            var status: Int32 = 0
            _ = waitpid(pid, &status, 0)
            let code = parts.count > 1 ? Int32(parts[1]) ?? 1 : 1
            let kind: LERedirectError.Kind =
                code == 3 ? .notPermitted : code == 2 ? .invalidArgument : why.contains("already") ? .conflict : .failed
            try? cleanUpFailedStart(state, logger: logger)
            throw LERedirectError(kind, why)
        }
        var status: Int32 = 0
        let exited = waitpid(pid, &status, WNOHANG) == pid
        if line == nil && !exited {
            kill(pid, SIGKILL)
            why = "the session daemon (pid \(pid)) was not ready within \(DurationText.format(readyTimeout)) and was killed"
        } else {
            why = "the session daemon (pid \(pid)) exited before it was ready"
        }
        if !exited { _ = waitpid(pid, &status, 0) }
        if status & 0x7f != 0 { why += " (signal \(status & 0x7f))" } else { why += " (exit status \((status >> 8) & 0xff))" }
        try cleanUpFailedStart(state, logger: logger)
        throw LERedirectError(.failed, "begin: \(why); its log is \(state.logPath). Nothing was left changed")
    }

    private static func cleanUpFailedStart(_ state: StateDirectory, logger: Logger) throws(LERedirectError) {
        guard try state.readJournal() != nil else { return }
        let firewalls = try Firewalls.open("begin: cleaning up")
        defer { firewalls.close() }
        _ = try SessionEngine.live(state: state, logger: logger).recover(sweep: false, firewalls: firewalls, namespace: try namespace())
    }

    /// The daemon's entry point (`le-redirect __session ...`): fd 3 is the readiness pipe, fd 4 the
    /// state lock that begin holds on its behalf until it reports ready, and with --client-pid fd 5
    /// a pidfd of the program the session follows.
    package static func runDaemon(_ arguments: [String]) -> Never {
        let readyFD: Int32 = 3
        let lockFD: Int32 = 4
        let clientFD: Int32 = 5
        /// Whether `begin` got the line (it is gone if not: killed, or its hook runner timed out).
        func report(_ line: String) -> Bool {
            let bytes = Array((line + "\n").utf8)
            let written = bytes.withUnsafeBytes { write(readyFD, $0.baseAddress, $0.count) }
            closeDescriptor(readyFD)
            return written == bytes.count
        }
        // A begin that died must not kill the daemon with SIGPIPE before it has taken its rules out.
        signal(SIGPIPE, SIG_IGN)
        // Hook runners often leave the soft descriptor limit at 1024: the proxy needs two per
        // connection, so the daemon takes what the hard limit allows.
        var limit = rlimit()
        if getrlimit(RLIMIT_NOFILE_VALUE, &limit) == 0, limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(RLIMIT_NOFILE_VALUE, &limit)
        }
        umask(0o077)
        _ = chdir("/")
        var values: [String: String] = [:]
        var i = 0
        while i + 1 < arguments.count {
            values[arguments[i]] = arguments[i + 1]
            i += 2
        }
        guard let statePath = values["--state-dir"], let port = values["--port"].flatMap(Int.init),
            let proxyPort = values["--proxy-port"].flatMap(Int.init),
            let ttl = values["--ttl"].flatMap(DurationText.parse),
            let backend = values["--backend"].flatMap(BackendChoice.init(rawValue:)),
            let proxy = DaemonArguments.decode(values)
        else {
            _ = report("error 2 the session daemon was started with malformed arguments")
            exit(2)
        }
        let state = StateDirectory(path: statePath)
        // One log per state directory, kept from growing without bound over many sessions.
        var st = stat()
        if lstat(state.logPath, &st) == 0, st.st_size > 1 << 20 { _ = rename(state.logPath, state.logPath + ".1") }
        let handler = LineLogHandler.file(state.logPath, label: "le-redirect[\(getpid())]", level: LineLogHandler.level(default: .info))
        let logger = Logger(label: "le-redirect.session") { _ in handler }
        let stopSignals = le_termination_signalfd()
        do throws(LERedirectError) {
            let owners = (values["--listener-owners"] ?? "").split(separator: ",").compactMap { UInt32($0) }
            let options = try TakeoverOptions(
                port: port, proxyPort: proxyPort, ttl: ttl, backend: backend, proxy: proxy, stateDirectory: statePath,
                listenerOwners: owners, throughInput: values["--through-input"] == "1"
            ).validated()
            let followed = values["--client-pid"].flatMap(Int32.init).map {
                SessionHolder.Followed(fd: clientFD, pid: $0, name: values["--client-name"] ?? "?")
            }
            Fault.reach("daemon-started")
            let holder = try SessionHolder.start(
                options, state: state, kind: .daemon, stopSignals: stopSignals >= 0 ? stopSignals : nil,
                endsWithLastToken: values["--ends-with-last-token"] == "1", following: followed, logger: logger)
            logger.info("session started", metadata: ["expires": "\(RFC3339.format(unixMilliseconds: holder.journal.expiresAt))"])
            let notes = holder.engineNotes.map { String($0.map { $0 == "\n" ? " " : $0 }) }
            let told = report(notes.isEmpty ? "ok" : "ok " + notes.joined(separator: "; "))
            Fault.reach("ready-reported")
            closeDescriptor(lockFD)
            if !told {
                // Nobody was told the redirect is live, so nobody will end it: end it now.
                logger.error("begin exited before the session was ready (killed?); ending the session")
                holder.requestEnd()
            }
            switch holder.join() {
            case .success: exit(0)
            case .failure(let error): exit(error.exitCode)
            }
        } catch {
            logger.error("begin failed: \(error)")
            _ = report("error \(error.exitCode) \(error.message.replacingNewlines())")
            exit(error.exitCode)
        }
    }

    // MARK: End

    package static func end(stateDirectory: String?, drainTimeout: Duration? = nil, logger: Logger) throws(LERedirectError)
        -> EndReport
    {
        try requirePrivileges("end")
        let state = StateDirectory.resolve(stateDirectory)
        guard try state.exists() else { return EndReport(reason: .notActive) }
        let lock = try state.lock()  // released when it goes out of scope
        _ = lock.fd
        guard let text = try state.readJournal() else { return EndReport(reason: .notActive) }
        let journal: Journal
        do { journal = try Journal.decode(text) } catch {
            if case .newerVersion = error {
                throw LERedirectError(
                    .failed, "end: \(state.journalPath): \(error); end it with that version. Nothing was changed")
            }
            throw LERedirectError(
                .failed,
                "end: \(state.journalPath): \(error). Nothing was changed; `le-redirect recover --sweep` removes every "
                    + "\"LE\"-tagged rule of the input chains, of x_tables' mangle and nat PREROUTING, and table \(TableRef.own) instead")
        }
        let engine = SessionEngine.live(state: state, logger: logger)
        let here = try namespace()
        guard journal.namespace == here else {
            throw LERedirectError(
                .conflict,
                "end: the session in \(state.path) runs in network namespace \(journal.namespace), this process in "
                    + "\(here); run end in that namespace. Nothing was changed")
        }
        var warnings: [String] = []
        if ProcessFacts.isAlive(journal.holder) {
            if !ProcessFacts.isStopped(journal.holder.pid) {
                do {
                    let reply = try ControlChannel.call(
                        .end(drainTimeout: drainTimeout), path: state.controlSocketPath,
                        timeout: .seconds(60) + (drainTimeout ?? .seconds(3600)))
                    if let error = reply.error {
                        // The holder could not finish; once it is gone, recovery can.
                        waitForExit(journal.holder)
                        logger.warning("the session holder reported: \(error)")
                        warnings.append(error.message)
                    } else {
                        return EndReport(reason: .requested, warnings: reply.values("warning"))
                    }
                } catch {
                    logger.warning("\(error)")
                    warnings.append("the session holder (pid \(journal.holder.pid)) did not answer")
                }
            } else {
                warnings.append("the session holder (pid \(journal.holder.pid)) is stopped")
            }
            if try state.readJournal() == nil {
                // The session ended while we were asking: by itself (its TTL), or its holder died
                // after removing everything (then the warning above says it did not answer).
                return EndReport(reason: .expired, warnings: warnings)
            }
            if ProcessFacts.isAlive(journal.holder) {
                guard journal.holder.kind == .daemon else {
                    throw LERedirectError(
                        .failed,
                        "end: the session is held by pid \(journal.holder.pid), a program embedding le-redirect, which "
                            + "does not answer; stop that program, then run `le-redirect recover`. Nothing was changed")
                }
                // Killing the daemon closes its netlink socket: the kernel deletes an nftables redirect
                // at once; recovery below removes an x_tables one.
                kill(journal.holder.pid, SIGKILL)
                waitForExit(journal.holder)
                warnings.append("the session daemon (pid \(journal.holder.pid)) was killed")
            }
        }
        let firewalls = try Firewalls.open("end: recovering the session")
        defer { firewalls.close() }
        let report = try engine.recover(sweep: false, firewalls: firewalls, namespace: here)
        return EndReport(reason: warnings.isEmpty ? .notActive : .requested, warnings: warnings + report.warnings, recovery: report)
    }

    private static func waitForExit(_ holder: ProcessIdentity, timeout: Duration = .seconds(5)) {
        guard holder.kind == .daemon else { return }
        let deadline = monotonicMilliseconds() + timeout.milliseconds
        while ProcessFacts.isAlive(holder) && monotonicMilliseconds() < deadline { usleep(2_000) }
    }

    // MARK: Status and recover

    package static func status(stateDirectory: String?) throws(LERedirectError) -> SessionStatus {
        try requirePrivileges("status")
        let state = StateDirectory.resolve(stateDirectory)
        guard try state.exists() else { return SessionStatus(state: .inactive) }
        return status(state: state)
    }

    /// The session as its journal records it, and, `askingTheHolder`, as its holder reports it.
    static func status(state: StateDirectory, askingTheHolder: Bool = true) -> SessionStatus {
        let text: String?
        do { text = try state.readJournal() } catch { return SessionStatus(state: .stale, note: error.message) }
        guard let text else { return SessionStatus(state: .inactive) }
        let journal: Journal
        do { journal = try Journal.decode(text) } catch {
            return SessionStatus(state: .stale, note: "\(error); `le-redirect recover --sweep` cleans up")
        }
        let alive = ProcessFacts.isAlive(journal.holder)
        var status = SessionStatus(state: alive ? .active : .stale)
        status.pid = journal.holder.pid
        status.holder = journal.holder.kind.rawValue
        status.backend = journal.backend.rawValue
        status.port = Int(journal.port)
        status.proxyPort = Int(journal.proxyPort)
        status.proxy = journal.proxy
        status.createdAt = journal.createdAt
        status.expiresAt = journal.expiresAt
        status.acceptRules = journal.accepts.count
        if !alive {
            switch journal.backend {
            case .nftables:
                status.note =
                    "the session holder (pid \(journal.holder.pid)) is gone: port \(journal.port) is no longer steered (its "
                    + "table died with it); `le-redirect recover` (or the next begin or end) removes the journal"
                    + (journal.accepts.isEmpty
                        ? "" : " and the \(journal.accepts.count) scoped accept rule(s) an older version left")
            case .iptablesLegacy:
                status.note =
                    "the session holder (pid \(journal.holder.pid)) is gone: its iptables-legacy steering of port "
                    + "\(journal.port) matches until \(RFC3339.format(unixMilliseconds: journal.expiresAt)) at most; "
                    + "`le-redirect recover` (or the next begin or end) removes it now"
                    + (journal.accepts.isEmpty
                        ? "" : ", with the \(journal.accepts.count) scoped accept rule(s) an older version left")
            }
            return status
        }
        if let here = try? ProcessFacts.currentNamespace(), here != journal.namespace {
            status.note = "the session runs in network namespace \(journal.namespace), not in this one (\(here))"
        }
        if ProcessFacts.isStopped(journal.holder.pid) {
            status.responding = false
            status.note = "the session holder is stopped; the kernel ends the redirect by itself at expiresAt"
            return status
        }
        guard askingTheHolder else { return status }
        if let reply = try? ControlChannel.call(.status, path: state.controlSocketPath, timeout: .seconds(2)),
            reply.error == nil
        {
            status.responding = true
            status.redirectedPackets = reply.values("redirected-packets").first.flatMap { UInt64($0) }
            status.armed = reply.values("armed").first.map { $0 == "yes" }
            status.challengeSource = reply.values("challenge-source").first
            status.clientPid = reply.values("client-pid").first.flatMap { Int32($0) }
            let notes = reply.values("note")
            if !notes.isEmpty { status.note = notes.joined(separator: "; ") }
            for (key, value) in reply.lines where key.hasPrefix("proxy-") || key == "tokens" {
                let name = String(key.dropFirst(key.hasPrefix("proxy-") ? 6 : 0))
                if let number = UInt64(value) { status.counters.append((name, number)) } else if name == "phase" {
                    status.proxyPhase = value
                }
            }
        } else {
            status.responding = false
        }
        return status
    }

    package static func recover(sweep: Bool, stateDirectory: String?, logger: Logger) throws(LERedirectError)
        -> RecoveryReport
    {
        try requirePrivileges(sweep ? "recover --sweep" : "recover")
        let state = StateDirectory.resolve(stateDirectory)
        if !sweep, try !state.exists() { return RecoveryReport() }
        try state.prepare()
        let lock = try state.lock()  // released when it goes out of scope
        _ = lock.fd
        if !sweep, try state.readJournal() == nil { return RecoveryReport() }
        let firewalls = try Firewalls.open("recover")
        defer { firewalls.close() }
        return try SessionEngine.live(state: state, logger: logger).recover(sweep: sweep, firewalls: firewalls, namespace: try namespace())
    }

    // MARK: Challenges

    /// `challenge add`: registers a token with the active session's proxy.
    package static func challengeAdd(token: String, keyAuthorization: String, stateDirectory: String?)
        throws(LERedirectError) -> ChallengeReply
    {
        try challenge(.challengeAdd(token: token, keyAuthorization: keyAuthorization), stateDirectory: stateDirectory)
    }

    /// `challenge remove`: unregisters a token (not an error when it was not registered).
    package static func challengeRemove(token: String, stateDirectory: String?) throws(LERedirectError)
        -> ChallengeReply
    {
        try challenge(.challengeRemove(token: token), stateDirectory: stateDirectory)
    }

    package struct ChallengeReply {
        package var tokens: Int
        package var armed: Bool
        /// The session was begun by the certbot auth hook and ends when its last token goes.
        package var endsWithLastToken: Bool
    }

    private static func challenge(_ request: ControlChannel.Request, stateDirectory: String?) throws(LERedirectError)
        -> ChallengeReply
    {
        try requirePrivileges("challenge")
        let state = StateDirectory.resolve(stateDirectory)
        guard try state.exists(), let text = try state.readJournal(), let journal = try? Journal.decode(text),
            ProcessFacts.isAlive(journal.holder)
        else {
            throw LERedirectError(
                .failed, "no active session in \(state.path): run `le-redirect begin` first (its built-in proxy holds the tokens)")
        }
        let reply: ControlChannel.Reply
        do { reply = try ControlChannel.call(request, path: state.controlSocketPath, timeout: .seconds(10)) } catch {
            // A holder that died before answering (mid-arming, say) left a dead session: put port 80
            // back at once rather than leave an x_tables redirect to a closed port until the TTL.
            waitForExit(journal.holder, timeout: .seconds(1))
            guard !ProcessFacts.isAlive(journal.holder) else { throw error }
            let what = "the session holder (pid \(journal.holder.pid)) exited before answering"
            let report: RecoveryReport
            do throws(LERedirectError) {
                report = try recover(sweep: false, stateDirectory: stateDirectory, logger: Logger(label: "le-redirect"))
            } catch {
                throw LERedirectError(
                    .failed, "\(what), and recovering its session failed: \(error.message); run `le-redirect recover`",
                    errno: error.errno)
            }
            throw LERedirectError(
                .failed,
                "\(what); its session was recovered (\(report.removedRules) rule(s) removed, port 80 goes to the app "
                    + "again): begin a new session to retry")
        }
        if let error = reply.error { throw error }
        return ChallengeReply(
            tokens: reply.values("tokens").first.flatMap { Int($0) } ?? 0, armed: reply.values("armed").first == "yes",
            endsWithLastToken: reply.values("ends-with-last-token").first == "yes")
    }

    // MARK: Helpers

    private static func executablePath() -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        return n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
    }

    static func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> R) -> R {
        var pointers = strings.map { strdup($0) } + [nil]
        defer { for p in pointers { free(p) } }
        return pointers.withUnsafeMutableBufferPointer { body($0.baseAddress!) }
    }

    /// Reads one line from `fd` within `timeout`; nil on EOF or timeout.
    private static func readLine(_ fd: Int32, timeout: Duration) -> String? {
        let deadline = monotonicMilliseconds() + timeout.milliseconds
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 512)
        while true {
            let remaining = deadline - monotonicMilliseconds()
            if remaining <= 0 { return nil }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, Int32(remaining))
            if ready < 0 && errno == EINTR { continue }
            if ready <= 0 { return nil }
            let n = read(fd, &chunk, chunk.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return nil }
            bytes += chunk[0..<n]
            if let newline = bytes.firstIndex(of: UInt8(ascii: "\n")) {
                return String(decoding: bytes[..<newline], as: UTF8.self)
            }
        }
    }
}

extension String {
    func replacingNewlines() -> String { String(map { $0 == "\n" ? " " : $0 }) }
}

/// The proxy's options as the daemon's command line carries them.
enum DaemonArguments {
    static func encode(_ proxy: ProxyMode) -> [String] {
        guard case .builtIn(let o) = proxy else { return ["--proxy", "external"] }
        let challenge: String
        switch o.challenge {
        case .port(let port): challenge = "port:\(port)"
        case .url(let host, let port): challenge = "url:\(port):\(host)"
        case .webroot(let dir): challenge = "webroot:\(dir)"
        case .memory: challenge = "memory"
        }
        return [
            "--proxy", "built-in", "--challenge", challenge, "--forwarded", o.forwarded ? "1" : "0",
            "--proxy-protocol", o.proxyProtocol ? "1" : "0", "--max-connections", "\(o.maxConnections)",
            "--max-connections-per-source", "\(o.maxConnectionsPerSource)",
            "--max-head-size", "\(o.maxHeadBytes)", "--head-timeout", "\(o.headTimeout.milliseconds)ms",
            "--idle-timeout", "\(o.idleTimeout.milliseconds)ms", "--drain-timeout", "\(o.drainTimeout.milliseconds)ms",
        ]
    }

    static func decode(_ values: [String: String]) -> ProxyMode? {
        switch values["--proxy"] {
        case "external": return .external
        case "built-in": break
        default: return nil
        }
        guard let challengeText = values["--challenge"], let maxConnections = values["--max-connections"].flatMap(Int.init),
            let perSource = values["--max-connections-per-source"].flatMap(Int.init),
            let maxHead = values["--max-head-size"].flatMap(Int.init),
            let headTimeout = values["--head-timeout"].flatMap(DurationText.parse),
            let idleTimeout = values["--idle-timeout"].flatMap(DurationText.parse),
            let drainTimeout = values["--drain-timeout"].flatMap(DurationText.parse)
        else { return nil }
        let challenge: ChallengeSource
        if challengeText == "memory" {
            challenge = .memory
        } else if challengeText.hasPrefix("port:"), let port = UInt16(challengeText.dropFirst(5)) {
            challenge = .port(port)
        } else if challengeText.hasPrefix("webroot:") {
            challenge = .webroot(String(challengeText.dropFirst(8)))
        } else if challengeText.hasPrefix("url:") {
            let rest = challengeText.dropFirst(4)
            guard let colon = rest.firstIndex(of: ":"), let port = UInt16(rest[..<colon]) else { return nil }
            challenge = .url(host: String(rest[rest.index(after: colon)...]), port: port)
        } else {
            return nil
        }
        return .builtIn(
            ProxyOptions(
                challenge: challenge, forwarded: values["--forwarded"] == "1", proxyProtocol: values["--proxy-protocol"] == "1",
                maxConnections: maxConnections, maxConnectionsPerSource: perSource, maxHeadBytes: maxHead, headTimeout: headTimeout, idleTimeout: idleTimeout,
                drainTimeout: drainTimeout))
    }
}
