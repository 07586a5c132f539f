import CLERedirectShim
import Glibc
import LERedirectModel
import Logging

/// The operations behind the CLI's commands and the public API, as blocking calls. Each takes the
/// state lock where it changes anything, and begins with the recovery of a dead session. By job:
/// what every begin shares and the embedded begin (here), the CLI's begin that launches the daemon
/// (SessionLaunch.swift), the daemon's setup (SessionDaemon.swift), and the calls of a client of a
/// running session: end, status, recover, challenges (SessionClient.swift).
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

    static func namespace() throws(LERedirectError) -> NamespaceIdentity {
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
    struct PreparedBegin: ~Copyable {
        let options: ValidatedOptions
        let state: StateDirectory
        let lock: StateLock
    }

    static func prepareBegin(_ options: TakeoverOptions, logger: Logger) throws(LERedirectError) -> PreparedBegin {
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

    // MARK: Helpers

    /// Waits (up to `timeout`) until a daemon holder has exited.
    static func waitForExit(_ holder: ProcessIdentity, timeout: Duration = .seconds(5)) {
        guard holder.kind == .daemon else { return }
        let deadline = monotonicMilliseconds() + timeout.milliseconds
        while ProcessFacts.isAlive(holder) && monotonicMilliseconds() < deadline { usleep(2_000) }
    }


    static func executablePath() -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        return n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
    }

    static func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> R) -> R {
        var pointers = strings.map { strdup($0) } + [nil]
        defer { for p in pointers { free(p) } }
        return pointers.withUnsafeMutableBufferPointer { body($0.baseAddress!) }
    }
}

extension String {
    func replacingNewlines() -> String { String(map { $0 == "\n" ? " " : $0 }) }
}

