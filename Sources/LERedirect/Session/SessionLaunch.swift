import CLERedirectShim
import Glibc
import LERedirectModel
import Logging

extension Session {
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

        let start = DaemonStart(
            stateDirectory: state.path, options: valid, endsWithLastToken: endsWithLastToken, clientPid: client?.pid,
            clientName: client?.name)
        let arguments = [executablePath(), "__session"]
        var pair: [Int32] = [-1, -1]
        guard le_socketpair_cloexec(&pair) == 0 else {
            throw LERedirectError(.failed, "begin: creating the start socket: \(errnoText(errno))", errno: errno)
        }
        defer { closeDescriptor(pair[0]) }
        let devnull = open("/dev/null", O_RDWR | O_CLOEXEC)
        var pid: pid_t = 0
        let rc = withCStrings(arguments) { argv in
            ([pair[1], lock] + (client.map { [$0.fd] } ?? [])).withUnsafeBufferPointer { passed in
                le_spawn_detached(&pid, arguments[0], argv, environ, devnull, passed.baseAddress, Int32(passed.count))
            }
        }
        closeDescriptor(devnull)
        closeDescriptor(pair[1])
        guard rc == 0 else {
            throw LERedirectError(.failed, "begin: starting the session daemon \(arguments[0]): \(errnoText(rc))", errno: rc)
        }
        Fault.reach("daemon-spawned")

        let daemon = MessageChannel(fd: pair[0], peer: "the session daemon (pid \(pid))")
        var answer: Message?
        var timedOut = false
        do {
            try daemon.send(.startDaemon(start))
            answer = try daemon.receive(timeout: readyTimeout)
        } catch let error as MessageChannel.ReceiveError {
            if case .timedOut = error { timedOut = true }
        } catch {}  // the daemon died before it read its start: told below
        if case .ready(let notes)? = answer {
            // From the journal: asking the daemon would have it read its counters, which on
            // x_tables means reading whole tables again. And what the plan's notes say.
            var begun = status(state: state, askingTheHolder: false)
            begun.armed = !valid.proxy.armsPerChallenge
            if !notes.isEmpty { begun.note = notes.joined(separator: "; ") }
            return begun
        }
        // Not ready: make sure the daemon is gone, then undo whatever it left (we still hold the lock).
        var status: Int32 = 0
        if case .failure(let error)? = answer {
            _ = waitpid(pid, &status, 0)
            try? cleanUpFailedStart(state, logger: logger)
            throw error
        }
        var why: String
        let exited = waitpid(pid, &status, WNOHANG) == pid
        if timedOut && !exited {
            kill(pid, SIGKILL)
            why = "the session daemon (pid \(pid)) was not ready within \(DurationText.format(readyTimeout)) and was killed"
        } else if let answer {
            why = "the session daemon (pid \(pid)) answered '\(answer.name)' instead of 'ready'"
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
}
