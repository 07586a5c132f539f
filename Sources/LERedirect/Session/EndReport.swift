/// How a session ended.
public struct EndReport: Sendable, Hashable {
    public enum Reason: String, Sendable, Hashable {
        /// `end` was asked for (CLI, library, or the control socket).
        case requested
        /// The TTL passed.
        case expired
        /// The daemon got SIGTERM, SIGINT or SIGHUP.
        case signal
        /// The program the session followed (`begin --until-parent-exits`) exited.
        case clientExited = "client-exited"
        /// A user other than root or a `--challenge-owner` listened on the external proxy's port.
        case untrustedListener = "untrusted-listener"
        /// The built-in proxy's process exited (or was killed) on its own.
        case proxyExited = "proxy-exited"
        /// There was no active session.
        case notActive
    }

    public var reason: Reason
    /// Things the operator should know, e.g. rules the host had already removed.
    public var warnings: [String]
    /// When `end` found a dead session instead of a live one: what recovering it did.
    public var recovery: RecoveryReport?

    public var wasActive: Bool { reason != .notActive }

    public init(reason: Reason, warnings: [String] = [], recovery: RecoveryReport? = nil) {
        self.reason = reason
        self.warnings = warnings
        self.recovery = recovery
    }
}
