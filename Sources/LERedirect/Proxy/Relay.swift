import CLERedirectShim
import Glibc
import LERedirectModel

/// One client connection and, once routed, its upstream connection.
final class Relay {
    enum RequestState {
        case head, body, chunked, opaque
        /// Draining: the next request waits until the response in flight is complete.
        case paused
        /// No further request is taken.
        case stopped

        var betweenRequests: Bool { self == .head || self == .paused || self == .stopped }
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
    var requestsSinceDrain = 0
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
        UInt64(generation) << 32 | UInt64(slot) << 1 | (upstream ? 1 : 0)
    }

    /// While draining, a connection carries at most one more request, and only once the
    /// responses it was waiting for are complete.
    func mayStartRequest() -> Bool {
        outstanding.isEmpty && !closeAfterResponse
    }
}

/// epoll's constants, from the shim.
enum Epoll {
    static let readable = UInt32(LE_EPOLLIN)
    static let writable = UInt32(LE_EPOLLOUT)
    static let error = UInt32(LE_EPOLLERR)
    static let hangUp = UInt32(LE_EPOLLHUP)
    static let add = Int32(LE_EPOLL_CTL_ADD)
    static let modify = Int32(LE_EPOLL_CTL_MOD)
    static let delete = Int32(LE_EPOLL_CTL_DEL)
}

extension le_endpoint {
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
