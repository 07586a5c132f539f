import CLERedirectShim
import Glibc
import LERedirectModel
import Logging

extension Session {
    /// How `le-redirect run` went: the session it began, the command's exit status, and end's error
    /// if end failed.
    package struct RunOutcome {
        package var begun: SessionStatus
        /// The command's exit status; 128 + the signal when a signal ended it; 127 when it could not
        /// be started.
        package var status: Int32
        package var endError: LERedirectError?
        /// The signal this process got and passed on to the command, if any.
        package var signal: Int32?
    }

    /// `le-redirect run`: begins, runs `command` in the foreground (this process's descriptors and
    /// environment), and ends, also when the command fails or cannot start, and when this process
    /// gets SIGINT, SIGTERM or SIGHUP (passed on to the command, whose exit is then awaited). A
    /// signal that arrives while begin runs ends the session before the command starts.
    package static func run(
        _ options: TakeoverOptions, command: [String], drainTimeout: Duration?, logger: Logger
    ) throws(LERedirectError) -> RunOutcome {
        guard let program = command.first else {
            throw LERedirectError(.invalidArgument, "run: no command given (le-redirect run [begin options] -- COMMAND [ARGS...])")
        }
        // Blocked before begin, so that none is lost while the session starts.
        let signals = le_termination_signalfd()
        guard signals >= 0 else {
            throw LERedirectError(.failed, "run: watching for signals: \(errnoText(errno))", errno: errno)
        }
        defer { closeDescriptor(signals) }
        let begun = try beginDetached(options, logger: logger)
        var outcome = RunOutcome(begun: begun, status: 0)

        if let early = pendingSignal(signals) {
            logger.notice("signal \(early) while the session began; ending it without running \(program)")
            outcome.signal = early
            outcome.status = 128 + early
        } else {
            var pid: pid_t = 0
            let rc = withCStrings(command) { argv in le_spawn_foreground(&pid, program, argv, environ) }
            if rc != 0 {
                logger.error("run: starting \(program): \(errnoText(rc))")
                outcome.status = 127
            } else {
                (outcome.status, outcome.signal) = wait(for: pid, passingOn: signals, logger: logger)
            }
        }
        do {
            _ = try end(stateDirectory: options.stateDirectory, drainTimeout: drainTimeout, logger: logger)
        } catch {
            outcome.endError = error
        }
        return outcome
    }

    /// Waits for the command, passing each termination signal this process gets on to it.
    private static func wait(for pid: pid_t, passingOn signals: Int32, logger: Logger) -> (Int32, Int32?) {
        let exited = le_pidfd_open(pid)
        defer { if exited >= 0 { closeDescriptor(exited) } }
        var received: Int32?
        while exited >= 0 {
            var fds = [pollfd(fd: exited, events: Int16(POLLIN), revents: 0), pollfd(fd: signals, events: Int16(POLLIN), revents: 0)]
            let n = poll(&fds, 2, -1)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 || fds[0].revents != 0 { break }
            if fds[1].revents != 0 {
                let signal = le_read_signalfd(signals)
                guard signal > 0 else { continue }
                logger.notice("signal \(signal) received; passing it on to pid \(pid)")
                received = signal
                kill(pid, signal)
            }
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let code = status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return (code, received)
    }

    /// A termination signal already queued, if any.
    private static func pendingSignal(_ signals: Int32) -> Int32? {
        var pfd = pollfd(fd: signals, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 0) > 0 else { return nil }
        let signal = le_read_signalfd(signals)
        return signal > 0 ? signal : nil
    }
}
