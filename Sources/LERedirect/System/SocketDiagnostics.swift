import CNetfilter
import Glibc
import LERedirectModel

/// What the kernel says about this network namespace's TCP sockets (sock_diag, as `ss` asks):
/// which socket holds a connection, and which user owns a listener. No privilege is needed.
enum SocketDiagnostics {
    /// One socket as sock_diag reports it.
    struct Socket: Equatable {
        var family: UInt8
        /// TCP's state (include/net/tcp_states.h).
        var state: UInt8
        /// The local address (4 or 16 bytes) and port (host order).
        var address: [UInt8]
        var port: UInt16
        var uid: UInt32
        var inode: UInt32
        /// IP_TRANSPARENT / IPV6_TRANSPARENT (INET_DIAG_SOCKOPT, Linux 5.10 and newer); nil where
        /// the kernel did not say. Only a transparent listener gets the connections tproxy steers.
        var transparent: Bool? = nil
        /// IPV6_V6ONLY of an IPv6 socket (INET_DIAG_SKV6ONLY); nil where the kernel did not say.
        var v6only: Bool? = nil

        /// Bound to the wildcard address of its family.
        var wildcard: Bool { address.allSatisfy { $0 == 0 } }

        /// Whether `uid` is the owner's. sock_diag reports uid 0 for a socket that no file holds:
        /// request sockets (SYN_RECV), TIME_WAIT ones, and, on kernels before 6.17 or so, a
        /// connection still waiting in its listener's accept queue (the owner is then taken from
        /// the socket's inode, which it has only once accepted). Never take that for root.
        var ownerIsKnown: Bool { inode != 0 && state != 6 && state != 7 && state != 12 }
    }

    static let tcpListen: UInt8 = 10

    /// The socket whose local end is `local`:`localPort` and remote end `remote`:`remotePort` or,
    /// when there is none, the listener the kernel would hand such a connection to; nil when
    /// neither exists.
    static func lookup(
        _ diag: NetlinkSocket, family: UInt8, local: [UInt8], localPort: UInt16, remote: [UInt8], remotePort: UInt16
    ) throws(NetlinkError) -> Socket? {
        var found: Socket?
        do throws(NetlinkError) {
            try diag.request(
                build: { buf, seq in
                    let (nlh, req) = request(buf, seq, flags: NLM_F_REQUEST | NLM_F_ACK, family: family, states: ~0)
                    req.pointee.id.idiag_sport = localPort.bigEndian
                    req.pointee.id.idiag_dport = remotePort.bigEndian
                    withUnsafeMutableBytes(of: &req.pointee.id.idiag_src) { $0.copyBytes(from: local) }
                    withUnsafeMutableBytes(of: &req.pointee.id.idiag_dst) { $0.copyBytes(from: remote) }
                    req.pointee.id.idiag_cookie = (UInt32.max, UInt32.max)  // INET_DIAG_NOCOOKIE
                    return nlh
                },
                each: { reply in found = socket(reply) ?? found })
        } catch where error.errno == ENOENT {
            return nil
        }
        return found
    }

    /// Every TCP listener on `port`, IPv4 and IPv6.
    static func listeners(_ diag: NetlinkSocket, port: UInt16) throws(NetlinkError) -> [Socket] {
        var found: [Socket] = []
        for family in [UInt8(AF_INET), UInt8(AF_INET6)] {
            try diag.request(
                build: { buf, seq in
                    request(buf, seq, flags: NLM_F_REQUEST | NLM_F_DUMP, family: family, states: 1 << UInt32(tcpListen)).0
                },
                each: { reply in
                    if let socket = socket(reply), socket.port == port { found.append(socket) }
                })
        }
        return found
    }

    /// A SOCK_DIAG_BY_FAMILY request for TCP sockets of `family` in `states` (a bit per state).
    private static func request(
        _ buf: UnsafeMutablePointer<CChar>, _ seq: UInt32, flags: Int32, family: UInt8, states: UInt32
    ) -> (UnsafeMutablePointer<nlmsghdr>, UnsafeMutablePointer<inet_diag_req_v2>) {
        let nlh = mnl_nlmsg_put_header(buf)!
        nlh.pointee.nlmsg_type = UInt16(SOCK_DIAG_BY_FAMILY)
        nlh.pointee.nlmsg_flags = UInt16(flags)
        nlh.pointee.nlmsg_seq = seq
        let req = mnl_nlmsg_put_extra_header(nlh, MemoryLayout<inet_diag_req_v2>.size)!.assumingMemoryBound(to: inet_diag_req_v2.self)
        req.pointee.sdiag_family = family
        req.pointee.sdiag_protocol = ipprotoTCP
        req.pointee.idiag_states = states
        return (nlh, req)
    }

    private static func socket(_ reply: UnsafePointer<nlmsghdr>) -> Socket? {
        guard reply.pointee.nlmsg_type == UInt16(SOCK_DIAG_BY_FAMILY),
            Int(reply.pointee.nlmsg_len) >= MemoryLayout<nlmsghdr>.size + MemoryLayout<inet_diag_msg>.size
        else { return nil }
        let message = mnl_nlmsg_get_payload(reply).assumingMemoryBound(to: inet_diag_msg.self).pointee
        let length = message.idiag_family == UInt8(AF_INET6) ? 16 : 4
        let address = withUnsafeBytes(of: message.id.idiag_src) { Array($0.prefix(length)) }
        return Socket(
            family: message.idiag_family, state: message.idiag_state, address: address,
            port: UInt16(bigEndian: message.id.idiag_sport), uid: message.idiag_uid, inode: message.idiag_inode,
            transparent: attribute(reply, UInt16(INET_DIAG_SOCKOPT)).map { $0 & (1 << 5) != 0 },
            v6only: attribute(reply, UInt16(INET_DIAG_SKV6ONLY)).map { $0 != 0 })
    }

    /// The first byte of the reply's attribute `kind`, if it has one. INET_DIAG_SOCKOPT's first byte
    /// holds recverr, is_icsk, freebind, hdrincl, mc_loop, transparent, ... from bit 0 (bitfields
    /// of a little-endian build: the only kind this project builds for).
    private static func attribute(_ reply: UnsafePointer<nlmsghdr>, _ kind: UInt16) -> UInt8? {
        let total = Int(reply.pointee.nlmsg_len)
        let base = UnsafeRawPointer(reply)
        var offset = align4(MemoryLayout<nlmsghdr>.size) + align4(MemoryLayout<inet_diag_msg>.size)
        while offset + 4 <= total {
            let length = Int(base.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
            let type = base.loadUnaligned(fromByteOffset: offset + 2, as: UInt16.self) & 0x3fff
            guard length >= 4, offset + length <= total else { return nil }
            if type == kind, length >= 5 { return base.load(fromByteOffset: offset + 4, as: UInt8.self) }
            offset += align4(length)
        }
        return nil
    }

    private static func align4(_ n: Int) -> Int { (n + 3) & ~3 }
}

/// Who may answer challenges through a local listener: root, and the users the operator named
/// (`--challenge-owner`). Any other local user could bind a free loopback port (before the ACME
/// client starts its server, or between two of its authorizations) and answer with a key
/// authorization of its own account: enough to be issued a certificate for the domain.
struct ListenerOwners: Sendable, Hashable {
    var allowed: Set<UInt32>

    init(_ named: [UInt32]) { allowed = Set(named).union([0]) }

    func allows(_ uid: UInt32) -> Bool { allowed.contains(uid) }

    /// "root" or "root or uid 1000, 1001", for messages.
    var text: String {
        let others = allowed.subtracting([0]).sorted()
        return others.isEmpty ? "root" : "root or uid " + others.map(String.init).joined(separator: ", ")
    }
}
