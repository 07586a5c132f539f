import CNetfilter
import Glibc
import LERedirectModel

/// Conntrack's entries for the connections the redirect sent to the proxy port: state the session
/// leaves in the kernel, removed when it ends.
///
/// Why: on a host whose firewall keeps no conntrack state of its own, conntrack runs only while our
/// nat chain exists. When the session ends, it stops watching but keeps its entries (those of closed
/// proxied connections in TIME_WAIT, for two minutes; of connections cut short, for days), each with
/// its translation to the proxy port. When conntrack runs again (the next session, or the host's own
/// rules) a client reusing one of those source ports has its connection to port 80 sent to the
/// proxy port halfway through its handshake, and reset.
enum RedirectedConnections {
    /// Deletes the entries of TCP connections to `port` translated to `proxyPort`; returns how many
    /// it deleted. Entries gone meanwhile are not an error.
    static func forget(port: UInt16, proxyPort: UInt16) throws(FirewallError) -> Int {
        try withConntrack { (nl) throws(FirewallError) in
            try delete(try entries(nl).filter { $0.isRedirected(port: port, proxyPort: proxyPort) }, nl)
        }
    }

    /// Deletes the stale entries of connections to `port` of this host that were not redirected:
    /// entries that still say a connection is open (so that conntrack lets a SYN with the same
    /// addresses and ports through as part of it, never to our nat chain) while the host has no
    /// such connection. Run by begin before the redirect goes in; returns how many it deleted.
    ///
    /// Why: on a host whose firewall keeps no conntrack state of its own, conntrack runs only while
    /// our nat chain exists, and picks up the connections it sees then (those opened before begin,
    /// which are not redirected). Those still open when the session ends keep entries that nothing
    /// updates any more: established, for five days. In a later session, a client reusing such a
    /// connection's source port (the CA's validation server, from an address that was a visitor
    /// too) reaches the app instead of the proxy. An entry of a live connection (the host has its
    /// socket, open) is left alone, as are entries of forwarded connections and of any translation.
    static func forgetStale(port: UInt16) throws(FirewallError) -> Int {
        let local = localAddresses()
        return try withConntrack { (nl) throws(FirewallError) in
            let candidates = try entries(nl).filter { $0.ignoresNewSYN(port: port) && local.contains($0.destination) }
            guard !candidates.isEmpty else { return 0 }
            let diag: NetlinkSocket
            do throws(NetlinkError) { diag = try NetlinkSocket(bus: NETLINK_SOCK_DIAG) } catch {
                throw NftablesFirewall.error(error, doing: "opening a sock_diag netlink socket", change: nil)
            }
            defer { diag.close() }
            var stale: [Entry] = []
            for entry in candidates where try !hasOpenSocket(entry, diag) { stale.append(entry) }
            return try delete(stale, nl)
        }
    }

    private static func withConntrack<T>(_ body: (NetlinkSocket) throws(FirewallError) -> T) throws(FirewallError) -> T {
        if let code = Fault.injectedErrno("conntrack") {
            throw NftablesFirewall.error(NetlinkError(stage: .send, errno: code), doing: "listing conntrack's entries", change: nil)
        }
        let nl: NetlinkSocket
        do throws(NetlinkError) { nl = try NetlinkSocket() } catch {
            throw NftablesFirewall.error(error, doing: "opening a netfilter netlink socket for conntrack", change: nil)
        }
        defer { nl.close() }
        return try body(nl)
    }

    private static func entries(_ nl: NetlinkSocket) throws(FirewallError) -> [Entry] {
        var found: [Entry] = []
        do throws(NetlinkError) {
            try nl.request(
                build: { buf, seq in
                    message(buf, seq, type: IPCTNL_MSG_CT_GET, flags: NLM_F_REQUEST | NLM_F_DUMP, family: UInt8(AF_UNSPEC))
                },
                each: { reply in
                    if let entry = Entry(reply), entry.protocolNumber == ipprotoTCP { found.append(entry) }
                })
        } catch {
            throw NftablesFirewall.error(error, doing: "listing conntrack's entries", change: nil)
        }
        return found
    }

    private static func delete(_ entries: [Entry], _ nl: NetlinkSocket) throws(FirewallError) -> Int {
        var deleted = 0
        for entry in entries {
            do throws(NetlinkError) {
                try nl.request(
                    build: { buf, seq in
                        let nlh = message(buf, seq, type: IPCTNL_MSG_CT_DELETE, flags: NLM_F_REQUEST | NLM_F_ACK, family: entry.family)
                        entry.originalTuple.withUnsafeBytes {
                            mnl_attr_put(nlh, UInt16(CTA_TUPLE_ORIG.rawValue) | UInt16(NLA_F_NESTED), $0.count, $0.baseAddress)
                        }
                        mnl_attr_put_u32(nlh, UInt16(CTA_ID.rawValue), entry.id)
                        return nlh
                    },
                    each: { _ in })
                deleted += 1
            } catch where error.errno == ENOENT {
                // Gone already (it timed out, or its connection was reopened).
            } catch {
                throw NftablesFirewall.error(error, doing: "deleting a conntrack entry", change: nil)
            }
        }
        return deleted
    }

    /// Whether the host holds an open socket for the entry's connection (its local end is the
    /// entry's original destination). A listener is what the lookup falls back to when there is
    /// none; a socket in TIME_WAIT or CLOSE is a connection that is over.
    private static func hasOpenSocket(_ entry: Entry, _ diag: NetlinkSocket) throws(FirewallError) -> Bool {
        let socket: SocketDiagnostics.Socket?
        do throws(NetlinkError) {
            socket = try SocketDiagnostics.lookup(
                diag, family: entry.family, local: entry.destination, localPort: entry.destinationPort,
                remote: entry.source, remotePort: entry.sourcePort)
        } catch {
            throw NftablesFirewall.error(error, doing: "looking up the socket of a conntrack entry", change: nil)
        }
        // TCP_TIME_WAIT 6, TCP_CLOSE 7, TCP_LISTEN 10 (include/net/tcp_states.h)
        guard let socket else { return false }
        return ![6, 7, SocketDiagnostics.tcpListen].contains(socket.state)
    }

    /// The addresses of this network namespace's interfaces (4 or 16 bytes each).
    private static func localAddresses() -> Set<[UInt8]> {
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0 else { return [] }
        defer { freeifaddrs(list) }
        var result: Set<[UInt8]> = []
        var item = list
        while let current = item {
            if let address = current.pointee.ifa_addr {
                switch Int32(address.pointee.sa_family) {
                case AF_INET:
                    address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) {
                        _ = result.insert(withUnsafeBytes(of: $0.pointee.sin_addr) { Array($0) })
                    }
                case AF_INET6:
                    address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) {
                        _ = result.insert(withUnsafeBytes(of: $0.pointee.sin6_addr) { Array($0) })
                    }
                default: break
                }
            }
            item = current.pointee.ifa_next
        }
        return result
    }

    private static func message(
        _ buf: UnsafeMutablePointer<CChar>, _ seq: UInt32, type: cntl_msg_types, flags: Int32, family: UInt8
    ) -> UnsafeMutablePointer<nlmsghdr> {
        let nlh = mnl_nlmsg_put_header(buf)!
        nlh.pointee.nlmsg_type = UInt16(NFNL_SUBSYS_CTNETLINK) << 8 | UInt16(type.rawValue)
        nlh.pointee.nlmsg_flags = UInt16(flags)
        nlh.pointee.nlmsg_seq = seq
        let header = mnl_nlmsg_put_extra_header(nlh, MemoryLayout<nfgenmsg>.size)!.assumingMemoryBound(to: nfgenmsg.self)
        header.pointee.nfgen_family = family
        header.pointee.version = UInt8(NFNETLINK_V0)
        header.pointee.res_id = 0
        return nlh
    }

    /// What one conntrack entry says about itself, as far as telling ours (and stale ones) apart needs.
    private struct Entry {
        let family: UInt8
        let id: UInt32  // network order, as the kernel sent it
        let status: UInt32
        let protocolNumber: UInt8
        /// The original direction's addresses (4 or 16 bytes) and ports (host order).
        let source: [UInt8], destination: [UInt8]
        let sourcePort: UInt16, destinationPort: UInt16
        let replySourcePort: UInt16
        /// TCP's state as conntrack tracks it (enum tcp_conntrack), nil for other protocols.
        let tcpState: UInt8?
        /// CTA_TUPLE_ORIG's payload, to name the entry in the delete request.
        let originalTuple: [UInt8]

        init?(_ message: UnsafePointer<nlmsghdr>) {
            guard message.pointee.nlmsg_type == UInt16(NFNL_SUBSYS_CTNETLINK) << 8 | UInt16(IPCTNL_MSG_CT_NEW.rawValue) else {
                return nil
            }
            let header = mnl_nlmsg_get_payload(message).assumingMemoryBound(to: nfgenmsg.self)
            family = header.pointee.nfgen_family
            var id: UInt32?, status: UInt32?, original: Tuple?, replySource: UInt16?, tuple: [UInt8]?, state: UInt8?
            for (type, payload) in Self.attributes(mnl_nlmsg_get_payload_offset(message, MemoryLayout<nfgenmsg>.size),
                                                   Int(message.pointee.nlmsg_len) - MemoryLayout<nlmsghdr>.size - MemoryLayout<nfgenmsg>.size) {
                switch Int(type) {
                case Int(CTA_ID.rawValue): id = payload.count >= 4 ? payload.loadUnaligned(as: UInt32.self) : nil
                case Int(CTA_STATUS.rawValue): status = payload.count >= 4 ? UInt32(bigEndian: payload.loadUnaligned(as: UInt32.self)) : nil
                case Int(CTA_TUPLE_ORIG.rawValue):
                    tuple = Array(payload)
                    original = Tuple(payload)
                case Int(CTA_TUPLE_REPLY.rawValue):
                    replySource = Tuple(payload)?.sourcePort
                case Int(CTA_PROTOINFO.rawValue):
                    for (t, p) in Self.attributes(payload.baseAddress!, payload.count) where Int(t) == Int(CTA_PROTOINFO_TCP.rawValue) {
                        for (u, q) in Self.attributes(p.baseAddress!, p.count) where Int(u) == Int(CTA_PROTOINFO_TCP_STATE.rawValue) {
                            state = q.first
                        }
                    }
                default: break
                }
            }
            guard let id, let status, let original, let replySource, let tuple else { return nil }
            (self.id, self.status, protocolNumber, source, destination, sourcePort, destinationPort) =
                (id, status, original.protocolNumber, original.source, original.destination, original.sourcePort,
                 original.destinationPort)
            (replySourcePort, tcpState, originalTuple) = (replySource, state, tuple)
        }

        func isRedirected(port: UInt16, proxyPort: UInt16) -> Bool {
            protocolNumber == ipprotoTCP && status & UInt32(IPS_DST_NAT.rawValue) != 0 && destinationPort == port
                && replySourcePort == proxyPort
        }

        /// An untranslated TCP connection to `port` in a state where conntrack lets a new SYN with
        /// the same tuple through as part of it (SYN_SENT, as a retransmission; SYN_RECV,
        /// ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK: the kernel's tcp_conntracks table) instead
        /// of starting a new connection. SYN_SENT: a SYN seen as the last session's table went, its
        /// answer never tracked (on a host with no conntrack of its own), for two minutes.
        func ignoresNewSYN(port: UInt16) -> Bool {
            guard protocolNumber == ipprotoTCP, destinationPort == port, let tcpState else { return false }
            return status & UInt32(IPS_NAT_MASK.rawValue) == 0 && (1...6).contains(tcpState)
        }

        /// One CTA_TUPLE_* payload: addresses, protocol number and ports.
        private struct Tuple {
            var source: [UInt8] = [], destination: [UInt8] = []
            var protocolNumber: UInt8 = 0, sourcePort: UInt16 = 0, destinationPort: UInt16 = 0

            init?(_ tuple: UnsafeRawBufferPointer) {
                guard let base = tuple.baseAddress else { return nil }
                var sawProtocol = false
                for (type, payload) in Entry.attributes(base, tuple.count) {
                    switch Int(type) {
                    case Int(CTA_TUPLE_IP.rawValue):
                        for (t, p) in Entry.attributes(payload.baseAddress!, payload.count) {
                            switch Int(t) {
                            case Int(CTA_IP_V4_SRC.rawValue), Int(CTA_IP_V6_SRC.rawValue): source = Array(p)
                            case Int(CTA_IP_V4_DST.rawValue), Int(CTA_IP_V6_DST.rawValue): destination = Array(p)
                            default: break
                            }
                        }
                    case Int(CTA_TUPLE_PROTO.rawValue):
                        for (t, p) in Entry.attributes(payload.baseAddress!, payload.count) {
                            switch Int(t) {
                            case Int(CTA_PROTO_NUM.rawValue): if let n = p.first { (protocolNumber, sawProtocol) = (n, true) }
                            case Int(CTA_PROTO_SRC_PORT.rawValue): if p.count >= 2 { sourcePort = UInt16(bigEndian: p.loadUnaligned(as: UInt16.self)) }
                            case Int(CTA_PROTO_DST_PORT.rawValue): if p.count >= 2 { destinationPort = UInt16(bigEndian: p.loadUnaligned(as: UInt16.self)) }
                            default: break
                            }
                        }
                    default: break
                    }
                }
                guard sawProtocol else { return nil }
            }
        }

        /// The netlink attributes in `length` bytes at `start`: type (without its flags) and payload.
        fileprivate static func attributes(_ start: UnsafeRawPointer, _ length: Int) -> [(UInt16, UnsafeRawBufferPointer)] {
            var result: [(UInt16, UnsafeRawBufferPointer)] = []
            var offset = 0
            while offset + 4 <= length {
                let size = Int(start.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
                let type = start.loadUnaligned(fromByteOffset: offset + 2, as: UInt16.self) & 0x3FFF
                guard size >= 4, offset + size <= length else { break }
                result.append((type, UnsafeRawBufferPointer(start: start + offset + 4, count: size - 4)))
                offset += (size + 3) & ~3
            }
            return result
        }
    }
}
