import CLERedirectShim
import Glibc
import LERedirectModel

/// One client connection and, once routed, its upstream connection: the connection's state
/// machine. The framing of each direction is the model's `HTTPFramer` (pure); what the proxy's
/// policies add to it (a request paused while draining, a tunnel asked for, no further request
/// taken) and the transitions between requests and responses are here; the event loop
/// (`ValidationProxy`) does the I/O each transition asks for.
final class Relay {
    /// What the client's side is doing besides following its bytes' framing.
    enum RequestPhase {
        /// Requests are read and framed (`requests`).
        case reading
        /// Draining: the next request waits until the response in flight is complete (its bytes
        /// in `pending`).
        case paused
        /// A CONNECT or an upgrade was sent: what the client sends next waits for the answer
        /// (in `pending`), opaque after a 2xx / 101, another request after anything else.
        case tunnelRequested
        /// No further request is taken.
        case stopped
    }

    /// What `responseEnded` asks of the loop.
    enum AfterResponse: Equatable {
        /// Nothing: wait for the next request.
        case idle
        /// The connection ends after this response: finish the client.
        case finish
        /// Requests resume: these bytes, held meanwhile, are the next ones from the client.
        case resume([UInt8])
    }

    /// An interest value meaning "not registered with epoll" (after a hang-up on an unread side).
    static let parked = UInt32.max

    var slot = 0
    var generation: UInt32 = 0
    let client: Int32
    var upstream: Int32 = -1
    let peer: le_endpoint
    let original: le_endpoint
    var connecting = false
    var toChallengeServer = false
    /// A challenge relayed to the app after the challenge port refused it: the connection still
    /// carries this one request.
    var oneRequest = false
    /// The upstream is a listener on this host whose owner must be root or a --challenge-owner
    /// user; nothing is sent to it before that is known.
    var checksListenerOwner = false
    var opaque = false
    var lingering = false
    var closed = false
    var closeAfterResponse = false
    var clientEOF = false
    var upstreamEOF = false
    var clientWriteShut = false
    var upstreamWriteShut = false
    var clientInterest: UInt32 = 0
    var upstreamInterest: UInt32 = 0
    var deadline: Int64 = .max
    var bytesToClient = 0
    var requestsTaken = 0
    /// Methods of the requests whose responses have not ended, oldest first (pipelining).
    var outstanding: [HTTPHead.Method] = []
    var toUpstream = OutBuffer()
    var toClient = OutBuffer()
    var phase = RequestPhase.reading
    var requests: HTTPFramer
    var responses: HTTPFramer
    /// The client's bytes held while `paused` or `tunnelRequested`.
    var pending = HeadBuffer()
    /// Whether the connection's first bytes were read far enough to know if a PROXY header from
    /// a load balancer in front starts it (`ProxyHeader`).
    var preambleSettled = false
    /// The first bytes, held until that is known.
    var preambleHeld: [UInt8] = []
    /// The PROXY header the connection started with: handed on to the app unchanged.
    var proxyHeader: [UInt8] = []
    /// The request sent to the challenge server, kept to be relayed to the app instead if nothing
    /// listens there (`--unknown-challenges app`).
    var challengeRequest: [UInt8] = []
    /// The response in flight has a body that ends when the app closes.
    var responseEndsAtClose = false
    /// Nothing more of the app's is relayed (an answer of the proxy's own was sent).
    var responseStopped = false

    init(client: Int32, peer: le_endpoint, original: le_endpoint, maxHeadBytes: Int) {
        self.client = client
        self.peer = peer
        self.original = original
        requests = HTTPFramer(.request, headLimit: maxHeadBytes)
        // A response head is followed up to four times that; past it, bytes pass as they are.
        responses = HTTPFramer(.response, headLimit: maxHeadBytes * 4)
    }

    @inline(__always)
    func tag(upstream: Bool) -> UInt64 {
        EventTag.connection(slot: slot, generation: generation, upstream: upstream).rawValue
    }

    /// Closed when the drain timeout passes: an opaque stream, an idle keep-alive connection, a
    /// client still sending its request. Not: a lingering close, a request being answered, a new
    /// connection whose first request has not come yet (its head timeout bounds it).
    var endsAtDrainTimeout: Bool {
        if lingering { return false }
        if opaque { return true }
        guard phase == .reading else { return outstanding.isEmpty }
        switch requests.state {
        case .body, .chunked: return true
        case .head: return outstanding.isEmpty && (requests.isHolding || requestsTaken > 0)
        case .passThrough: return outstanding.isEmpty
        }
    }

    /// Between two requests (or taking none): where the response to the last one may say
    /// `Connection: close`.
    var betweenRequests: Bool { phase != .reading || requests.state == .head }

    /// At the start of a request head, nothing of it held: the connection is idle.
    var idleBetweenRequests: Bool { phase == .reading && requests.state == .head && !requestBytesHeld }

    /// Bytes of the client's are held (part of a head, or what waits while paused or for a tunnel).
    var requestBytesHeld: Bool { requests.isHolding || !pending.isEmpty || !preambleHeld.isEmpty }

    /// While draining, a connection carries at most one more request, and only once the
    /// responses it was waiting for are complete.
    func mayStartRequest() -> Bool {
        outstanding.isEmpty && !closeAfterResponse
    }

    /// A request's head went upstream: its response is awaited, its body follows.
    func requestSent(_ request: HTTPHead.Request) {
        outstanding.append(request.method)
        requestsTaken += 1
        requests.expect(request.body == .untilClose ? .none : request.body)
        if request.method == .connect || request.upgrade, request.body == .none || request.body == .untilClose {
            phase = .tunnelRequested
        }
    }

    /// The challenge source gets one request and nothing after it.
    func requestSentAsLast(_ request: HTTPHead.Request) {
        outstanding.append(request.method)
        requestsTaken += 1
        phase = .stopped
    }

    /// The app accepted the tunnel (101, or 2xx to CONNECT): from here on both ways pass as they
    /// are; returns the client's bytes that waited for the answer, to go upstream first.
    func tunnelAccepted() -> [UInt8] {
        responses.passEverything()
        requests.passEverything()
        phase = .reading
        opaque = true
        let held = pending.bytes
        pending.reset()
        return held
    }

    /// The app's bytes cannot be followed (not HTTP, a head past the limit, broken chunks): both
    /// ways pass as they are from here on, like a tunnel; returns the client's bytes that waited.
    func stopFollowing() -> [UInt8] {
        let held = tunnelAccepted()
        let partial = requests.isHolding ? requests.takeHead() : []
        requests.passEverything()
        return partial + held
    }

    /// The response head says the body that follows (`.untilClose`: until the app closes).
    func responseBody(_ body: HTTPHead.Body) {
        responseEndsAtClose = body == .untilClose
        responses.expect(body)
    }

    /// The response in flight is complete.
    func responseEnded() -> AfterResponse {
        if !outstanding.isEmpty { outstanding.removeFirst() }
        responseEndsAtClose = false
        if closeAfterResponse {
            responseStopped = true
            return .finish
        }
        if phase == .paused || (phase == .tunnelRequested && outstanding.isEmpty) {
            phase = .reading
            let held = pending.bytes
            pending.reset()
            if !held.isEmpty { return .resume(held) }
        }
        return .idle
    }

    /// Neither requests nor the app's responses are relayed any more.
    func stopBothWays() {
        phase = .stopped
        responseStopped = true
    }
}

/// A client's address as the per-source connection count knows it: an IPv4 address, or an IPv6
/// /64 (one subscriber's prefix: otherwise a client could take a new address per connection). All
/// of 127.0.0.0/8 is one source: with --include-local, a local user can bind any of its addresses.
struct SourceAddress: Hashable {
    var family: Int32
    var high: UInt64, low: UInt64

    init(_ e: le_endpoint) {
        family = e.family
        (high, low) = withUnsafeBytes(of: e.addr) { ($0.loadUnaligned(as: UInt64.self), $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
        if family == AF_INET6 { low = 0 }
        if family == AF_INET, withUnsafeBytes(of: e.addr, { $0[0] }) == 127 { (high, low) = (127, 0) }
    }
}

extension le_endpoint {
    /// The address's bytes: 4 for IPv4, 16 for IPv6.
    var addressBytes: [UInt8] {
        withUnsafeBytes(of: addr) { Array($0.prefix(family == AF_INET6 ? 16 : 4)) }
    }

    /// 127.0.0.0/8, ::1 or an IPv4-mapped loopback address.
    var isLoopback: Bool {
        let b = addressBytes
        if family == AF_INET { return b[0] == 127 }
        if b[0..<15].allSatisfy({ $0 == 0 }) && b[15] == 1 { return true }
        return b[0..<10].allSatisfy { $0 == 0 } && b[10] == 0xff && b[11] == 0xff && b[12] == 127
    }

    /// 0.0.0.0 or :: (which connect to this host).
    var isUnspecified: Bool { addressBytes.allSatisfy { $0 == 0 } }

    /// fe80::/10.
    var isLinkLocal: Bool { family == AF_INET6 && addr.0 == 0xfe && addr.1 & 0xc0 == 0x80 }

    var addressText: String {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        var copy = self
        return withUnsafeBytes(of: &copy.addr) { raw in
            inet_ntop(family, raw.baseAddress, &buffer, socklen_t(buffer.count))
            let length = buffer.firstIndex(of: 0) ?? buffer.count
            return String(decoding: buffer[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }
}
