import CLERedirectShim
import Glibc
import LERedirectModel
import Logging

extension Session {
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
                        .endRequest(drainTimeout: drainTimeout), path: state.controlSocketPath,
                        timeout: .seconds(60) + (drainTimeout ?? .seconds(3600)))
                    switch reply {
                    case .ended(let reported):
                        return EndReport(reason: .requested, warnings: reported)
                    case .failure(let error):
                        // The holder could not finish; once it is gone, recovery can.
                        waitForExit(journal.holder)
                        logger.warning("the session holder reported: \(error)")
                        warnings.append(error.message)
                    default:
                        waitForExit(journal.holder)
                        warnings.append("the session holder (pid \(journal.holder.pid)) answered '\(reply.name)' to 'end'")
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
        if case .holderStatus(let reply)? = try? ControlChannel.call(
            .statusRequest, path: state.controlSocketPath, timeout: .seconds(2))
        {
            status.responding = true
            status.redirectedPackets = reply.redirectedPackets
            status.armed = reply.armed
            status.challengeSource = reply.challengeSource
            status.clientPid = reply.clientPid
            status.proxyPid = reply.proxyPid
            status.addresses = reply.addresses
            status.includeLocal = reply.includeLocal
            if !reply.notes.isEmpty { status.note = reply.notes.joined(separator: "; ") }
            if let tokens = reply.tokens { status.counters.append(("tokens", UInt64(tokens))) }
            if let proxy = reply.proxy {
                status.proxyPhase = proxy.phase
                status.counters += proxy.named
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

    private static func challenge(_ request: Message, stateDirectory: String?) throws(LERedirectError)
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
        let reply: Message
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
        switch reply {
        case .challengeReply(let tokens, let armed, let ends):
            return ChallengeReply(tokens: tokens, armed: armed, endsWithLastToken: ends)
        case .failure(let error): throw error
        default: throw LERedirectError(.failed, "the session holder answered '\(reply.name)' to '\(request.name)'")
        }
    }
}
