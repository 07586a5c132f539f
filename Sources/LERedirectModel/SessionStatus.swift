/// What `le-redirect status` reports about the session of one state directory.
public struct SessionStatus: Sendable, Hashable {
    public enum State: String, Sendable, Hashable {
        /// No session, and nothing left behind.
        case inactive
        /// A session holds the redirect.
        case active
        /// A session whose holder is gone left rules behind; `recover` removes them.
        case stale
    }

    public var state: State
    public var active: Bool { state == .active }
    /// The process holding the session (the daemon, or the program embedding the library).
    public var pid: Int32?
    public var holder: String?
    /// Whether the holder answered on the control socket; false for a stopped or hung holder.
    public var responding: Bool?
    public var backend: String?
    public var port: Int?
    public var proxyPort: Int?
    public var proxy: String?
    /// Unix milliseconds.
    public var createdAt: Int64?
    public var expiresAt: Int64?
    /// Scoped accepts in host input chains that a dead session of an older version left (this one
    /// inserts none).
    public var acceptRules: Int?
    /// Packets the redirect rule sent to the proxy port (first packets of connections).
    public var redirectedPackets: UInt64?
    /// Whether new connections to the port are redirected now (false between challenges when
    /// the redirect is armed per challenge).
    public var armed: Bool?
    /// Where the built-in proxy answers challenges from.
    public var challengeSource: String?
    /// The built-in proxy: serving, draining or done.
    public var proxyPhase: ProxyPhase?
    /// The built-in proxy's process (unprivileged: see docs/design.md).
    public var proxyPid: Int32?
    /// The program the session follows (`begin --until-parent-exits`): it ends when that exits.
    public var clientPid: Int32?
    /// The proxy's counters; empty with an external proxy.
    public var counters: [(String, UInt64)]
    /// Anything the operator should know: a stale session, an unreadable journal.
    public var note: String?
    /// The local addresses taken over (--address); empty: every one. Nil when not asked.
    public var addresses: [String]?
    /// Whether the host's own connections are steered too (--include-local).
    public var includeLocal: Bool?

    public init(state: State, note: String? = nil) {
        self.state = state
        self.counters = []
        self.note = note
    }

    public static func == (a: SessionStatus, b: SessionStatus) -> Bool { a.json == b.json }
    public func hash(into hasher: inout Hasher) { hasher.combine(json) }

    public var json: JSONValue {
        func opt<T>(_ v: T?, _ f: (T) -> JSONValue) -> JSONValue { v.map(f) ?? .null }
        return .object([
            ("active", .bool(active)),
            ("state", .string(state.rawValue)),
            ("pid", opt(pid) { .int(Int64($0)) }),
            ("holder", opt(holder) { .string($0) }),
            ("responding", opt(responding) { .bool($0) }),
            ("backend", opt(backend) { .string($0) }),
            ("port", opt(port) { .int(Int64($0)) }),
            ("proxyPort", opt(proxyPort) { .int(Int64($0)) }),
            ("proxy", opt(proxy) { .string($0) }),
            ("createdAt", opt(createdAt) { .string(RFC3339.format(unixMilliseconds: $0)) }),
            ("expiresAt", opt(expiresAt) { .string(RFC3339.format(unixMilliseconds: $0)) }),
            ("acceptRules", opt(acceptRules) { .int(Int64($0)) }),
            ("redirectedPackets", opt(redirectedPackets) { .int(Int64(clamping: $0)) }),
            ("armed", opt(armed) { .bool($0) }),
            ("challengeSource", opt(challengeSource) { .string($0) }),
            ("proxyPhase", opt(proxyPhase) { .string($0.description) }),
            ("proxyPid", opt(proxyPid) { .int(Int64($0)) }),
            ("clientPid", opt(clientPid) { .int(Int64($0)) }),
            ("addresses", opt(addresses) { .array($0.map { .string($0) }) }),
            ("includeLocal", opt(includeLocal) { .bool($0) }),
            ("counters", .object(counters.map { ($0.0, .int(Int64(clamping: $0.1))) })),
            ("note", opt(note) { .string($0) }),
        ])
    }
}
