/// The one protocol between le-redirect's processes (docs/design.md, "The protocol"):
///
/// - `begin` (CLI) -> session daemon, on the start socket: `startDaemon`; the daemon answers
///   `ready` once the steering is live, or `failure`.
/// - CLI -> session holder, on control.sock: `statusRequest`, `endRequest`, `challengeAdd`,
///   `challengeRemove`; answered by `holderStatus`, `ended`, `challengeReply` or `failure`.
/// - session holder -> proxy process, on their socket pair: `proxyStart` (answered `proxyReady` or
///   `failure`), `challengeAdd` / `challengeRemove` (`tokensHeld`), `statusRequest`
///   (`proxyStatus`), `drain` (`drained` once the last connection closed), `stop`.
///
/// Every request has one answer; errors keep their kind and errno.
package enum Message: Sendable, Hashable {
    case startDaemon(DaemonStart)
    case ready(notes: [String])
    case failure(LERedirectError)

    case statusRequest
    case endRequest(drainTimeout: Duration?)
    case challengeAdd(token: String, keyAuthorization: String)
    case challengeRemove(token: String)

    case holderStatus(HolderStatus)
    case ended(warnings: [String])
    case challengeReply(tokens: Int, armed: Bool, endsWithLastToken: Bool)

    case proxyStart(ProxyStart)
    case proxyReady(ProxyReady)
    case tokensHeld(Int)
    case proxyStatus(ProxyStatus)
    case drain(timeout: Duration?, steered: UInt64?)
    case drained(ProxyStatus)
    case stop

    /// For messages about an unexpected answer.
    package var name: String {
        switch self {
        case .startDaemon: "start-daemon"
        case .ready: "ready"
        case .failure: "failure"
        case .statusRequest: "status"
        case .endRequest: "end"
        case .challengeAdd: "challenge-add"
        case .challengeRemove: "challenge-remove"
        case .holderStatus: "holder-status"
        case .ended: "ended"
        case .challengeReply: "challenge-reply"
        case .proxyStart: "proxy-start"
        case .proxyReady: "proxy-ready"
        case .tokensHeld: "tokens-held"
        case .proxyStatus: "proxy-status"
        case .drain: "drain"
        case .drained: "drained"
        case .stop: "stop"
        }
    }
}

/// What `begin` hands the session daemon it starts.
package struct DaemonStart: Sendable, Hashable {
    package var stateDirectory: String
    package var options: ValidatedOptions
    /// Begun by the certbot auth hook: the cleanup hook ends it with the last token.
    package var endsWithLastToken: Bool
    /// `--until-parent-exits`: the program followed (its pidfd is passed alongside).
    package var clientPid: Int32?
    package var clientName: String?

    package init(
        stateDirectory: String, options: ValidatedOptions, endsWithLastToken: Bool = false, clientPid: Int32? = nil,
        clientName: String? = nil
    ) {
        self.stateDirectory = stateDirectory
        self.options = options
        self.endsWithLastToken = endsWithLastToken
        self.clientPid = clientPid
        self.clientName = clientName
    }
}

/// What the session holder tells the proxy process it starts; its listeners come with it.
package struct ProxyStart: Sendable, Hashable {
    package var options: ProxyOptions
    package var redirectedPort: UInt16
    package var proxyPort: UInt16
    /// Users besides root whose listeners may answer challenges.
    package var listenerOwners: [UInt32]
    /// Who the proxy runs as once its listeners are in hand.
    package var user: ProxyUser

    package init(options: ProxyOptions, redirectedPort: UInt16, proxyPort: UInt16, listenerOwners: [UInt32], user: ProxyUser) {
        self.options = options
        self.redirectedPort = redirectedPort
        self.proxyPort = proxyPort
        self.listenerOwners = listenerOwners
        self.user = user
    }
}

/// An unprivileged user: `le-redirect` where scripts/install made it, else `nobody`.
package struct ProxyUser: Sendable, Hashable {
    package var name: String
    package var uid: UInt32
    package var gid: UInt32
    /// Supplementary groups (the webroot's group, so that group-readable challenge files serve).
    package var groups: [UInt32]

    package init(name: String, uid: UInt32, gid: UInt32, groups: [UInt32] = []) {
        self.name = name
        self.uid = uid
        self.gid = gid
        self.groups = groups
    }
}

/// What the proxy process reports once it serves: who it runs as and how it is confined.
package struct ProxyReady: Sendable, Hashable {
    package var pid: Int32
    package var uid: UInt32
    /// The Landlock ABI it restricted itself with; 0 where the kernel has no Landlock.
    package var landlockABI: Int32
    /// Whether its seccomp filter is loaded.
    package var seccomp: Bool

    package init(pid: Int32, uid: UInt32, landlockABI: Int32, seccomp: Bool) {
        self.pid = pid
        self.uid = uid
        self.landlockABI = landlockABI
        self.seccomp = seccomp
    }
}

/// The built-in proxy's phase.
public enum ProxyPhase: UInt8, Sendable, Hashable, CustomStringConvertible {
    case serving = 0
    case draining = 1
    case done = 2

    public var description: String {
        switch self {
        case .serving: "serving"
        case .draining: "draining"
        case .done: "done"
        }
    }
}

/// The proxy's counters, as `status` shows them.
package struct ProxyStatus: Sendable, Hashable {
    package var phase: ProxyPhase = .serving
    package var connections: UInt64 = 0
    package var accepted: UInt64 = 0
    package var requests: UInt64 = 0
    package var challenges: UInt64 = 0
    package var bytesIn: UInt64 = 0
    package var bytesOut: UInt64 = 0
    package var refused: UInt64 = 0
    package var errors: UInt64 = 0

    package init() {}

    /// Name and value, in the order `status` prints them.
    package var named: [(String, UInt64)] {
        [
            ("connections", connections), ("accepted", accepted), ("requests", requests), ("challenges", challenges),
            ("bytes-in", bytesIn), ("bytes-out", bytesOut), ("refused", refused), ("errors", errors),
        ]
    }
}

/// What the session holder answers to `statusRequest`.
package struct HolderStatus: Sendable, Hashable {
    package var pid: Int32
    package var clientPid: Int32?
    package var redirectedPackets: UInt64?
    package var armed: Bool
    package var notes: [String]
    /// The built-in proxy's, nil with an external proxy.
    package var challengeSource: String?
    package var tokens: Int?
    package var proxyPid: Int32?
    package var proxy: ProxyStatus?
    /// --address (empty: every local address) and --include-local.
    package var addresses: [String]
    package var includeLocal: Bool

    package init(
        pid: Int32, clientPid: Int32? = nil, redirectedPackets: UInt64? = nil, armed: Bool, notes: [String] = [],
        challengeSource: String? = nil, tokens: Int? = nil, proxyPid: Int32? = nil, proxy: ProxyStatus? = nil,
        addresses: [String] = [], includeLocal: Bool = false
    ) {
        self.addresses = addresses
        self.includeLocal = includeLocal
        self.pid = pid
        self.clientPid = clientPid
        self.redirectedPackets = redirectedPackets
        self.armed = armed
        self.notes = notes
        self.challengeSource = challengeSource
        self.tokens = tokens
        self.proxyPid = proxyPid
        self.proxy = proxy
    }
}

// MARK: Encoding

extension Message {
    private enum Tag: UInt8 {
        case startDaemon = 1, ready, failure, statusRequest, endRequest, challengeAdd, challengeRemove, holderStatus, ended
        case challengeReply, proxyStart, proxyReady, tokensHeld, proxyStatus, drain, drained, stop
    }

    /// The payload (without the frame's length).
    package func encoded() -> [UInt8] {
        var w = WireWriter()
        w.u8(WireFormat.version)
        switch self {
        case .startDaemon(let s):
            w.u8(Tag.startDaemon.rawValue)
            w.string(s.stateDirectory)
            Self.write(&w, s.options)
            w.bool(s.endsWithLastToken)
            w.optional(s.clientPid) { $0.i32($1) }
            w.optional(s.clientName) { $0.string($1) }
        case .ready(let notes):
            w.u8(Tag.ready.rawValue)
            w.array(notes) { $0.string($1) }
        case .failure(let e):
            w.u8(Tag.failure.rawValue)
            w.u8(Self.kindCode(e.kind))
            w.optional(e.errno) { $0.i32($1) }
            w.string(e.message)
        case .statusRequest: w.u8(Tag.statusRequest.rawValue)
        case .endRequest(let timeout):
            w.u8(Tag.endRequest.rawValue)
            w.optional(timeout) { $0.duration($1) }
        case .challengeAdd(let token, let ka):
            w.u8(Tag.challengeAdd.rawValue)
            w.string(token)
            w.string(ka)
        case .challengeRemove(let token):
            w.u8(Tag.challengeRemove.rawValue)
            w.string(token)
        case .holderStatus(let s):
            w.u8(Tag.holderStatus.rawValue)
            w.i32(s.pid)
            w.optional(s.clientPid) { $0.i32($1) }
            w.optional(s.redirectedPackets) { $0.u64($1) }
            w.bool(s.armed)
            w.array(s.notes) { $0.string($1) }
            w.optional(s.challengeSource) { $0.string($1) }
            w.optional(s.tokens) { $0.u32(UInt32(clamping: $1)) }
            w.optional(s.proxyPid) { $0.i32($1) }
            w.optional(s.proxy) { Self.write(&$0, $1) }
            w.array(s.addresses) { $0.string($1) }
            w.bool(s.includeLocal)
        case .ended(let warnings):
            w.u8(Tag.ended.rawValue)
            w.array(warnings) { $0.string($1) }
        case .challengeReply(let tokens, let armed, let ends):
            w.u8(Tag.challengeReply.rawValue)
            w.u32(UInt32(clamping: tokens))
            w.bool(armed)
            w.bool(ends)
        case .proxyStart(let s):
            w.u8(Tag.proxyStart.rawValue)
            Self.write(&w, s.options)
            w.u16(s.redirectedPort)
            w.u16(s.proxyPort)
            w.array(s.listenerOwners) { $0.u32($1) }
            w.string(s.user.name)
            w.u32(s.user.uid)
            w.u32(s.user.gid)
            w.array(s.user.groups) { $0.u32($1) }
        case .proxyReady(let r):
            w.u8(Tag.proxyReady.rawValue)
            w.i32(r.pid)
            w.u32(r.uid)
            w.i32(r.landlockABI)
            w.bool(r.seccomp)
        case .tokensHeld(let n):
            w.u8(Tag.tokensHeld.rawValue)
            w.u32(UInt32(clamping: n))
        case .proxyStatus(let s):
            w.u8(Tag.proxyStatus.rawValue)
            Self.write(&w, s)
        case .drain(let timeout, let steered):
            w.u8(Tag.drain.rawValue)
            w.optional(timeout) { $0.duration($1) }
            w.optional(steered) { $0.u64($1) }
        case .drained(let s):
            w.u8(Tag.drained.rawValue)
            Self.write(&w, s)
        case .stop: w.u8(Tag.stop.rawValue)
        }
        return w.bytes
    }

    /// Decodes a payload; throws on anything that is not exactly one well-formed message.
    package init(decoding bytes: [UInt8]) throws(WireError) {
        var r = WireReader(bytes)
        let version = try r.u8("version")
        guard version == WireFormat.version else {
            throw WireError("protocol version \(version), this le-redirect speaks \(WireFormat.version)")
        }
        let raw = try r.u8("message")
        guard let tag = Tag(rawValue: raw) else { throw WireError("unknown message \(raw)") }
        switch tag {
        case .startDaemon:
            let dir = try r.string("state directory")
            let options = try Self.readOptions(&r)
            let ends = try r.bool("ends with last token")
            let pid = try r.optional("client pid") { (r: inout WireReader) throws(WireError) in try r.i32("client pid") }
            let name = try r.optional("client name") { (r: inout WireReader) throws(WireError) in try r.string("client name") }
            self = .startDaemon(DaemonStart(stateDirectory: dir, options: options, endsWithLastToken: ends, clientPid: pid, clientName: name))
        case .ready:
            self = .ready(notes: try r.array("notes") { (r: inout WireReader) throws(WireError) in try r.string("note") })
        case .failure:
            let kind = try Self.kind(try r.u8("error kind"))
            let code = try r.optional("errno") { (r: inout WireReader) throws(WireError) in try r.i32("errno") }
            self = .failure(LERedirectError(kind, try r.string("error message"), errno: code))
        case .statusRequest: self = .statusRequest
        case .endRequest:
            self = .endRequest(
                drainTimeout: try r.optional("drain timeout") { (r: inout WireReader) throws(WireError) in try r.duration("drain timeout") })
        case .challengeAdd:
            let token = try r.string("token")
            self = .challengeAdd(token: token, keyAuthorization: try r.string("key authorization"))
        case .challengeRemove: self = .challengeRemove(token: try r.string("token"))
        case .holderStatus:
            let pid = try r.i32("pid")
            let client = try r.optional("client pid") { (r: inout WireReader) throws(WireError) in try r.i32("client pid") }
            let packets = try r.optional("packets") { (r: inout WireReader) throws(WireError) in try r.u64("packets") }
            let armed = try r.bool("armed")
            let notes = try r.array("notes") { (r: inout WireReader) throws(WireError) in try r.string("note") }
            let source = try r.optional("challenge source") { (r: inout WireReader) throws(WireError) in try r.string("challenge source") }
            let tokens = try r.optional("tokens") { (r: inout WireReader) throws(WireError) in Int(try r.u32("tokens")) }
            let proxyPid = try r.optional("proxy pid") { (r: inout WireReader) throws(WireError) in try r.i32("proxy pid") }
            let proxy = try r.optional("proxy") { (r: inout WireReader) throws(WireError) in try Self.readStatus(&r) }
            let addresses = try r.array("addresses") { (r: inout WireReader) throws(WireError) in try r.string("address") }
            let includeLocal = try r.bool("include local")
            self = .holderStatus(
                HolderStatus(
                    pid: pid, clientPid: client, redirectedPackets: packets, armed: armed, notes: notes,
                    challengeSource: source, tokens: tokens, proxyPid: proxyPid, proxy: proxy, addresses: addresses,
                    includeLocal: includeLocal))
        case .ended:
            self = .ended(warnings: try r.array("warnings") { (r: inout WireReader) throws(WireError) in try r.string("warning") })
        case .challengeReply:
            let tokens = Int(try r.u32("tokens"))
            let armed = try r.bool("armed")
            self = .challengeReply(tokens: tokens, armed: armed, endsWithLastToken: try r.bool("ends with last token"))
        case .proxyStart:
            let options = try Self.readProxyOptions(&r)
            let redirected = try r.port("redirected port")
            let proxyPort = try r.port("proxy port")
            let owners = try r.array("listener owners") { (r: inout WireReader) throws(WireError) in try r.u32("uid") }
            let name = try r.string("user")
            let uid = try r.u32("uid")
            let gid = try r.u32("gid")
            let groups = try r.array("groups") { (r: inout WireReader) throws(WireError) in try r.u32("gid") }
            guard uid != 0, gid != 0, !groups.contains(0) else { throw WireError("the proxy never runs as root") }
            self = .proxyStart(
                ProxyStart(
                    options: options, redirectedPort: redirected, proxyPort: proxyPort, listenerOwners: owners,
                    user: ProxyUser(name: name, uid: uid, gid: gid, groups: groups)))
        case .proxyReady:
            let pid = try r.i32("pid")
            let uid = try r.u32("uid")
            let abi = try r.i32("landlock")
            self = .proxyReady(ProxyReady(pid: pid, uid: uid, landlockABI: abi, seccomp: try r.bool("seccomp")))
        case .tokensHeld: self = .tokensHeld(Int(try r.u32("tokens")))
        case .proxyStatus: self = .proxyStatus(try Self.readStatus(&r))
        case .drain:
            let timeout = try r.optional("drain timeout") { (r: inout WireReader) throws(WireError) in try r.duration("drain timeout") }
            self = .drain(timeout: timeout, steered: try r.optional("steered") { (r: inout WireReader) throws(WireError) in try r.u64("steered") })
        case .drained: self = .drained(try Self.readStatus(&r))
        case .stop: self = .stop
        }
        guard r.isAtEnd else { throw WireError("bytes after the \(name) message") }
    }

    private static func kindCode(_ kind: LERedirectError.Kind) -> UInt8 {
        switch kind {
        case .invalidArgument: 1
        case .notPermitted: 2
        case .conflict: 3
        case .unsupported: 4
        case .failed: 5
        }
    }

    private static func kind(_ code: UInt8) throws(WireError) -> LERedirectError.Kind {
        switch code {
        case 1: .invalidArgument
        case 2: .notPermitted
        case 3: .conflict
        case 4: .unsupported
        case 5: .failed
        default: throw WireError("unknown error kind \(code)")
        }
    }

    private static func write(_ w: inout WireWriter, _ s: ProxyStatus) {
        w.u8(s.phase.rawValue)
        for (_, value) in s.named { w.u64(value) }
    }

    private static func readStatus(_ r: inout WireReader) throws(WireError) -> ProxyStatus {
        var s = ProxyStatus()
        guard let phase = ProxyPhase(rawValue: try r.u8("phase")) else { throw WireError("unknown proxy phase") }
        s.phase = phase
        s.connections = try r.u64("connections")
        s.accepted = try r.u64("accepted")
        s.requests = try r.u64("requests")
        s.challenges = try r.u64("challenges")
        s.bytesIn = try r.u64("bytes in")
        s.bytesOut = try r.u64("bytes out")
        s.refused = try r.u64("refused")
        s.errors = try r.u64("errors")
        return s
    }

    private static func write(_ w: inout WireWriter, _ o: ValidatedOptions) {
        w.u16(o.port)
        w.u16(o.proxyPort)
        w.duration(o.ttl)
        w.u8(o.backend == .auto ? 0 : o.backend == .nftables ? 1 : 2)
        switch o.proxy {
        case .external: w.u8(0)
        case .builtIn(let p):
            w.u8(1)
            write(&w, p)
        }
        w.array(o.listenerOwners) { $0.u32($1) }
        w.bool(o.throughInput)
        w.array(o.addresses) { $0.string($1.description) }
        w.bool(o.includeLocal)
    }

    /// Options are validated once, by `begin`; what arrives here is checked only for what would
    /// make no sense on the wire (the values begin's validation guarantees are checked again, as
    /// a decoder must not trust its input).
    private static func readOptions(_ r: inout WireReader) throws(WireError) -> ValidatedOptions {
        let port = try r.port("port")
        let proxyPort = try r.port("proxy port")
        let ttl = try r.duration("ttl")
        let backend: BackendChoice
        switch try r.u8("backend") {
        case 0: backend = .auto
        case 1: backend = .nftables
        case 2: backend = .iptablesLegacy
        case let other: throw WireError("unknown backend \(other)")
        }
        let proxy: ProxyMode
        switch try r.u8("proxy") {
        case 0: proxy = .external
        case 1: proxy = .builtIn(try readProxyOptions(&r))
        case let other: throw WireError("unknown proxy mode \(other)")
        }
        let owners = try r.array("listener owners") { (r: inout WireReader) throws(WireError) in try r.u32("uid") }
        let throughInput = try r.bool("through input")
        let addresses = try r.array("addresses") { (r: inout WireReader) throws(WireError) in try r.string("address") }
        let includeLocal = try r.bool("include local")
        let options = TakeoverOptions(
            port: Int(port), proxyPort: Int(proxyPort), ttl: ttl, backend: backend, proxy: proxy,
            listenerOwners: owners, throughInput: throughInput, addresses: addresses, includeLocal: includeLocal)
        do { return try options.validated() } catch { throw WireError("options: \(error.message)") }
    }

    private static func write(_ w: inout WireWriter, _ p: ProxyOptions) {
        switch p.challenge {
        case .port(let port):
            w.u8(0)
            w.u16(port)
        case .url(let host, let port):
            w.u8(1)
            w.string(host)
            w.u16(port)
        case .webroot(let dir):
            w.u8(2)
            w.string(dir)
        case .memory: w.u8(3)
        case .stateless(let thumbprint):
            w.u8(4)
            w.string(thumbprint)
        }
        w.bool(p.forwarded)
        w.bool(p.proxyProtocol)
        w.u32(UInt32(clamping: p.maxConnections))
        w.u32(UInt32(clamping: p.maxConnectionsPerSource))
        w.u32(UInt32(clamping: p.maxHeadBytes))
        w.duration(p.headTimeout)
        w.duration(p.idleTimeout)
        w.duration(p.drainTimeout)
        w.u8(p.unknownChallenges == .app ? 0 : 1)
    }

    private static func unknownChallenges(_ r: inout WireReader) throws(WireError) -> UnknownChallenges {
        switch try r.u8("unknown challenges") {
        case 0: .app
        case 1: .notFound
        case let other: throw WireError("unknown challenges \(other)")
        }
    }

    private static func readProxyOptions(_ r: inout WireReader) throws(WireError) -> ProxyOptions {
        let challenge: ChallengeSource
        switch try r.u8("challenge source") {
        case 0: challenge = .port(try r.port("challenge port"))
        case 1:
            let host = try r.string("challenge host")
            challenge = .url(host: host, port: try r.port("challenge url port"))
        case 2: challenge = .webroot(try r.string("webroot"))
        case 3: challenge = .memory
        case 4: challenge = .stateless(thumbprint: try r.string("thumbprint"))
        case let other: throw WireError("unknown challenge source \(other)")
        }
        let options = ProxyOptions(
            challenge: challenge, forwarded: try r.bool("forwarded"), proxyProtocol: try r.bool("proxy protocol"),
            maxConnections: Int(try r.u32("max connections")), maxConnectionsPerSource: Int(try r.u32("per source")),
            maxHeadBytes: Int(try r.u32("max head")), headTimeout: try r.duration("head timeout"),
            idleTimeout: try r.duration("idle timeout"), drainTimeout: try r.duration("drain timeout"),
            unknownChallenges: try unknownChallenges(&r))
        do { try options.validate() } catch { throw WireError("proxy options: \(error.message)") }
        return options
    }
}
