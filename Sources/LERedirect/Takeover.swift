@_exported import LERedirectModel
import Logging

/// Takes over a port (80) for the duration of an ACME HTTP-01 challenge without stopping the
/// application that owns it: new TCP connections to the host's own addresses on that port are
/// steered (tproxy) to the proxy's transparent listener, without a byte of them rewritten, so the
/// host's own rules still decide who may connect; and the host's ruleset comes back exactly as it was.
///
/// ```swift
/// let session = try await Takeover.begin(TakeoverOptions(proxy: .external))
/// // ... answer the challenge through the proxy on session.proxyPort ...
/// let report = try await session.end()
/// ```
///
/// The session is held by this process: if it dies, the kernel deletes the steering with it, and
/// the next `begin`, `end` or `recover` (from any process) removes what is left. `le-redirect status`
/// and `le-redirect end` see and end an embedded session like one held by the CLI's daemon.
public enum Takeover {
    /// Installs the steering, held by this process, and returns once it is live.
    ///
    /// Takes the state lock, recovers what a dead session left, then commits the steering: either
    /// an owned `inet le_redirect` table (it dies with this process), or on the legacy path a TPROXY
    /// rule at the end of x_tables' mangle PREROUTING (and, where the host has a nat table, an
    /// identity-binding ACCEPT at the head of nat PREROUTING), as `options.backend` and the host
    /// decide (`le-redirect detect` explains). Either way it ends after `options.ttl` even if this
    /// process hangs.
    ///
    /// - Throws: `LERedirectError` with kind `.invalidArgument` for bad options, `.notPermitted`
    ///   without root or CAP_NET_ADMIN, `.conflict` when a session is already active, and `.failed`
    ///   or `.unsupported` otherwise; in every case nothing is left changed.
    public static func begin(
        _ options: TakeoverOptions, logger: Logger = Logger(label: "le-redirect")
    ) async throws(LERedirectError) -> TakeoverSession {
        let holder = try await offload { () throws(LERedirectError) in try Session.beginEmbedded(options, logger: logger) }
        return TakeoverSession(holder: holder)
    }

    /// Ends the session of a state directory, whoever holds it (the CLI's daemon or another
    /// program); recovers a dead one. Returns `.notActive` when there is nothing to end.
    public static func end(
        stateDirectory: String? = nil, logger: Logger = Logger(label: "le-redirect")
    ) async throws(LERedirectError) -> EndReport {
        try await offload { () throws(LERedirectError) in try Session.end(stateDirectory: stateDirectory, logger: logger) }
    }

    /// The session of a state directory, as `le-redirect status` shows it.
    public static func status(stateDirectory: String? = nil) async throws(LERedirectError) -> SessionStatus {
        try await offload { () throws(LERedirectError) in try Session.status(stateDirectory: stateDirectory) }
    }

    /// Removes what a dead session left (by its journal). With `sweep` and no usable journal,
    /// removes every "LE"-tagged rule of the host's input chains (older versions'), of x_tables'
    /// mangle and nat PREROUTING, and table `inet le_redirect`.
    public static func recover(
        sweep: Bool = false, stateDirectory: String? = nil, logger: Logger = Logger(label: "le-redirect")
    ) async throws(LERedirectError) -> RecoveryReport {
        try await offload { () throws(LERedirectError) in
            try Session.recover(sweep: sweep, stateDirectory: stateDirectory, logger: logger)
        }
    }
}

/// An active takeover held by this process.
public final class TakeoverSession: Sendable {
    private let holder: SessionHolder

    /// The redirected port.
    public var port: Int { Int(holder.journal.port) }
    /// Where redirected connections arrive.
    public var proxyPort: Int { Int(holder.journal.proxyPort) }
    /// When the kernel drops the redirect by itself (Unix milliseconds).
    public var expiresAt: Int64 { holder.journal.expiresAt }
    /// The state directory holding this session's journal and control socket.
    public var stateDirectory: String { holder.state.path }

    init(holder: SessionHolder) { self.holder = holder }

    /// Stops the steering, drains the proxy, removes the table (or the x_tables rules), then the
    /// journal. Calling it again, or after
    /// the session ended by itself, returns the same report.
    public func end() async throws(LERedirectError) -> EndReport {
        try await holder.end().get()
    }

    /// Waits until the session ends: by `end()`, `le-redirect end` from elsewhere, or the TTL.
    public func ended() async throws(LERedirectError) -> EndReport {
        try await holder.ended().get()
    }
}
