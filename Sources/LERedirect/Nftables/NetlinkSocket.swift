import CNetfilter
import Glibc
import LERedirectModel

/// A netlink error: the errno the kernel (or the socket) returned, and for a batch the sequence
/// number of the message it refused.
struct NetlinkError: Error, Sendable {
    enum Stage: Sendable { case open, send, receive, kernel }
    var stage: Stage
    var errno: Int32
    var sequence: UInt32?
}

/// The netlink socket of one nftables connection (NETLINK_NETFILTER, close-on-exec). Tables created
/// with the owner flag through it live exactly as long as it stays open.
///
/// Not thread-safe by itself: `NftablesFirewall` serialises every use behind its mutex.
final class NetlinkSocket {
    private var socket: OpaquePointer?  // struct mnl_socket *
    let portID: UInt32
    private var sequence: UInt32
    /// Large enough for a dump datagram (the kernel sends at most 32 KiB per part by default).
    private let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 * 1024, alignment: 16)

    /// `bus` is NETLINK_NETFILTER unless another is named (NETLINK_SOCK_DIAG, to look up sockets).
    init(bus: Int32 = NETLINK_NETFILTER) throws(NetlinkError) {
        guard let nl = mnl_socket_open2(bus, Int32(SOCK_CLOEXEC.rawValue)) else {
            buffer.deallocate()
            throw NetlinkError(stage: .open, errno: Glibc.errno)
        }
        if mnl_socket_bind(nl, 0, pid_t(MNL_SOCKET_AUTOPID)) < 0 {
            let code = Glibc.errno
            mnl_socket_close(nl)
            buffer.deallocate()
            throw NetlinkError(stage: .open, errno: code)
        }
        socket = nl
        portID = mnl_socket_get_portid(nl)
        sequence = UInt32(truncatingIfNeeded: unixMilliseconds())
        let fd = mnl_socket_get_fd(nl)
        // Echo replies and acks of a big batch must not overflow the receive queue; as root the
        // limit can be forced past rmem_max. A timeout keeps a lost reply from hanging a session.
        var size: Int32 = 4 << 20
        if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, socklen_t(MemoryLayout<Int32>.size)) != 0 {
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        // Ask for extended acks without the echoed request, to keep error replies small.
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_NETLINK, NETLINK_CAP_ACK, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit {
        assert(socket == nil, "NetlinkSocket was not closed")
        buffer.deallocate()
    }

    /// Closes the socket; the kernel then deletes every table it owns.
    func close() {
        if let socket {
            mnl_socket_close(socket)
            self.socket = nil
        }
    }

    var isOpen: Bool { socket != nil }

    func nextSequence() -> UInt32 {
        sequence &+= 1
        return sequence
    }

    /// Continues numbering after `last`, the final sequence number a batch used.
    func continueAfter(_ last: UInt32) {
        sequence = last
    }

    func send(_ bytes: UnsafeRawBufferPointer) throws(NetlinkError) {
        guard let socket else { throw NetlinkError(stage: .send, errno: EBADF) }
        if let code = Fault.injectedErrno("netlink-send") { throw NetlinkError(stage: .send, errno: code) }
        while true {
            let n = mnl_socket_sendto(socket, bytes.baseAddress, bytes.count)
            if n >= 0 { return }
            if Glibc.errno == EINTR { continue }
            throw NetlinkError(stage: .send, errno: Glibc.errno)
        }
    }

    /// Receives datagrams and hands every message to `handle` until it returns true (done).
    func receive(_ handle: (UnsafePointer<nlmsghdr>) throws(NetlinkError) -> Bool) throws(NetlinkError) {
        guard let socket else { throw NetlinkError(stage: .receive, errno: EBADF) }
        while true {
            if let code = Fault.injectedErrno("netlink-receive") { throw NetlinkError(stage: .receive, errno: code) }
            let n = mnl_socket_recvfrom(socket, buffer.baseAddress, buffer.count)
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                throw NetlinkError(stage: .receive, errno: Glibc.errno)
            }
            var remaining = Int32(n)
            var message = UnsafePointer(buffer.baseAddress!.assumingMemoryBound(to: nlmsghdr.self))
            while mnl_nlmsg_ok(message, remaining) {
                if try handle(message) { return }
                message = UnsafePointer(mnl_nlmsg_next(message, &remaining))
            }
        }
    }

    /// Sends one request message built by `build` (given the buffer and sequence number) and passes
    /// each reply message to `each` until the kernel's ack, or NLMSG_DONE for a dump.
    func request(
        build: (UnsafeMutablePointer<CChar>, UInt32) -> UnsafeMutablePointer<nlmsghdr>,
        each: (UnsafePointer<nlmsghdr>) -> Void
    ) throws(NetlinkError) {
        let seq = nextSequence()
        var storage = [CChar](repeating: 0, count: 8192)
        try storage.withUnsafeMutableBufferPointer { (buf) throws(NetlinkError) in
            let nlh = build(buf.baseAddress!, seq)
            try send(UnsafeRawBufferPointer(start: buf.baseAddress, count: Int(nlh.pointee.nlmsg_len)))
        }
        try receive { (message) throws(NetlinkError) -> Bool in
            guard message.pointee.nlmsg_seq == seq else { return false }  // a stale reply
            switch Int32(message.pointee.nlmsg_type) {
            case NLMSG_ERROR:
                let code = Self.errorCode(message)
                if code != 0 { throw NetlinkError(stage: .kernel, errno: code, sequence: seq) }
                return true
            case NLMSG_DONE:
                // A dump that failed part-way reports its error in the DONE payload.
                if message.pointee.nlmsg_len >= UInt32(MemoryLayout<nlmsghdr>.size + 4) {
                    let code = mnl_nlmsg_get_payload(message).load(as: Int32.self)
                    if code < 0 { throw NetlinkError(stage: .kernel, errno: -code, sequence: seq) }
                }
                if message.pointee.nlmsg_flags & UInt16(NLM_F_DUMP_INTR) != 0 {
                    throw NetlinkError(stage: .kernel, errno: EINTR, sequence: seq)
                }
                return true
            default:
                if message.pointee.nlmsg_flags & UInt16(NLM_F_DUMP_INTR) != 0 {
                    throw NetlinkError(stage: .kernel, errno: EINTR, sequence: seq)
                }
                each(message)
                return false
            }
        }
    }

    /// The positive errno of an NLMSG_ERROR message (0 for an ack).
    static func errorCode(_ message: UnsafePointer<nlmsghdr>) -> Int32 {
        -mnl_nlmsg_get_payload(message).load(as: Int32.self)
    }

    /// The sequence number of the request an NLMSG_ERROR message answers.
    static func erroredSequence(_ message: UnsafePointer<nlmsghdr>) -> UInt32 {
        // struct nlmsgerr { int error; struct nlmsghdr msg; }
        mnl_nlmsg_get_payload(message).load(fromByteOffset: 4 + 8, as: UInt32.self)
    }
}
