import CLERedirectShim
import Glibc
import LERedirectModel
import Logging

extension Session {
    /// The daemon's entry point (`le-redirect __session`): fd 3 is the start socket (begin sends
    /// `startDaemon` there and waits for `ready` or `failure`), fd 4 the state lock that begin
    /// holds on its behalf until it reports ready, and with a followed client fd 5 a pidfd of the
    /// program the session follows.
    package static func runDaemon(_ arguments: [String]) -> Never {
        let begin = MessageChannel(fd: 3, peer: "begin")
        let lockFD: Int32 = 4
        let clientFD: Int32 = 5
        /// Whether `begin` got the answer (it is gone if not: killed, or its hook runner timed out).
        func report(_ message: Message) -> Bool {
            defer { closeDescriptor(begin.fd) }
            do { try begin.send(message) } catch { return false }
            return true
        }
        // A begin that died must not kill the daemon with SIGPIPE before it has taken its rules out.
        signal(SIGPIPE, SIG_IGN)
        // Hook runners often leave the soft descriptor limit at 1024: the proxy needs two per
        // connection, so the daemon (and the proxy process it starts) takes what the hard limit allows.
        var limit = rlimit()
        if getrlimit(RLIMIT_NOFILE_VALUE, &limit) == 0, limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(RLIMIT_NOFILE_VALUE, &limit)
        }
        umask(0o077)
        _ = chdir("/")
        guard arguments.isEmpty, case .startDaemon(let start)? = try? begin.receive(timeout: .seconds(10)) else {
            _ = report(.failure(LERedirectError(.invalidArgument, "the session daemon is started by `le-redirect begin`, which did not send its start")))
            exit(2)
        }
        let state = StateDirectory(path: start.stateDirectory)
        // One log per state directory, kept from growing without bound over many sessions.
        var st = stat()
        if lstat(state.logPath, &st) == 0, st.st_size > 1 << 20 { _ = rename(state.logPath, state.logPath + ".1") }
        let handler = LineLogHandler.file(state.logPath, label: "le-redirect[\(getpid())]", level: LineLogHandler.level(default: .info))
        let logger = Logger(label: "le-redirect.session") { _ in handler }
        let stopSignals = le_termination_signalfd()
        do throws(LERedirectError) {
            let followed = start.clientPid.map {
                SessionHolder.Followed(fd: clientFD, pid: $0, name: start.clientName ?? "?")
            }
            Fault.reach("daemon-started")
            let holder = try SessionHolder.start(
                start.options, state: state, kind: .daemon, stopSignals: stopSignals >= 0 ? stopSignals : nil,
                endsWithLastToken: start.endsWithLastToken, following: followed, logger: logger)
            logger.info("session started", metadata: ["expires": "\(RFC3339.format(unixMilliseconds: holder.journal.expiresAt))"])
            let told = report(.ready(notes: holder.engineNotes))
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
            _ = report(.failure(error))
            exit(error.exitCode)
        }
    }
}
