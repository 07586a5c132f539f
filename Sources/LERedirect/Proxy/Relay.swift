import CLERedirectShim
import Glibc
import LERedirectModel

/// One client connection and, once routed, its upstream connection.
final class Relay {
    enum RequestState {
        case head, body, chunked, opaque
        /// Draining: the next request waits until the response in flight is complete.
        case paused
        /// A CONNECT or an upgrade was sent: what the client sends next waits for the answer,
        /// opaque after a 2xx / 101, another request after anything else.
        case tunnelRequested
        /// No further request is taken.
        case stopped

        var betweenRequests: Bool { self == .head || self == .paused || self == .tunnelRequested || self == .stopped }
    }
    enum ResponseState { case head, body, chunked, untilClose, opaque, stopped }

    struct Side<State>: ~Copyable {
        var state: State
        var head = HeadBuffer()
        var remaining: UInt64 = 0
        var chunks = ChunkedScanner()
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
    var request = Side<RequestState>(state: .head)
    var response = Side<ResponseState>(state: .head)

    init(client: Int32, peer: le_endpoint, original: le_endpoint) {
        self.client = client
        self.peer = peer
        self.original = original
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
        switch request.state {
        case .body, .chunked: return true
        case .head: return outstanding.isEmpty && (!request.head.isEmpty || requestsTaken > 0)
        case .paused, .tunnelRequested, .stopped, .opaque: return outstanding.isEmpty
        }
    }

    /// While draining, a connection carries at most one more request, and only once the
    /// responses it was waiting for are complete.
    func mayStartRequest() -> Bool {
        outstanding.isEmpty && !closeAfterResponse
    }
}

/// A client's address as the per-source connection count knows it: an IPv4 address, or an IPv6
/// /64 (one subscriber's prefix: otherwise a client could take a new address per connection).
struct SourceAddress: Hashable {
    var family: Int32
    var high: UInt64, low: UInt64

    init(_ e: le_endpoint) {
        family = e.family
        (high, low) = withUnsafeBytes(of: e.addr) { ($0.loadUnaligned(as: UInt64.self), $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
        if family == AF_INET6 { low = 0 }
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
