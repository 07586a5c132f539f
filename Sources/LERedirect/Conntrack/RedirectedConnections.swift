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
        let nl: NetlinkSocket
        do { nl = try NetlinkSocket() } catch {
            throw NftablesFirewall.error(error, doing: "opening a netfilter netlink socket for conntrack", change: nil)
        }
        defer { nl.close() }
        var found: [Entry] = []
        do throws(NetlinkError) {
            try nl.request(
                build: { buf, seq in
                    message(buf, seq, type: IPCTNL_MSG_CT_GET, flags: NLM_F_REQUEST | NLM_F_DUMP, family: UInt8(AF_UNSPEC))
                },
                each: { reply in
                    if let entry = Entry(reply), entry.isRedirected(port: port, proxyPort: proxyPort) { found.append(entry) }
                })
        } catch {
            throw NftablesFirewall.error(error, doing: "listing conntrack's entries", change: nil)
        }
        var deleted = 0
        for entry in found {
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
                throw NftablesFirewall.error(error, doing: "deleting a redirected connection's conntrack entry", change: nil)
            }
        }
        return deleted
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

    /// What one conntrack entry says about itself, as far as telling ours apart needs.
    private struct Entry {
        let family: UInt8
        let id: UInt32  // network order, as the kernel sent it
        let status: UInt32
        let protocolNumber: UInt8
        let originalDestinationPort: UInt16
        let replySourcePort: UInt16
        /// CTA_TUPLE_ORIG's payload, to name the entry in the delete request.
        let originalTuple: [UInt8]

        init?(_ message: UnsafePointer<nlmsghdr>) {
            guard message.pointee.nlmsg_type == UInt16(NFNL_SUBSYS_CTNETLINK) << 8 | UInt16(IPCTNL_MSG_CT_NEW.rawValue) else {
                return nil
            }
            let header = mnl_nlmsg_get_payload(message).assumingMemoryBound(to: nfgenmsg.self)
            family = header.pointee.nfgen_family
            var id: UInt32?, status: UInt32?, proto: UInt8?, dport: UInt16?, sport: UInt16?, tuple: [UInt8]?
            for (type, payload) in Self.attributes(mnl_nlmsg_get_payload_offset(message, MemoryLayout<nfgenmsg>.size),
                                                   Int(message.pointee.nlmsg_len) - MemoryLayout<nlmsghdr>.size - MemoryLayout<nfgenmsg>.size) {
                switch Int(type) {
                case Int(CTA_ID.rawValue): id = payload.count >= 4 ? payload.loadUnaligned(as: UInt32.self) : nil
                case Int(CTA_STATUS.rawValue): status = payload.count >= 4 ? UInt32(bigEndian: payload.loadUnaligned(as: UInt32.self)) : nil
                case Int(CTA_TUPLE_ORIG.rawValue):
                    tuple = Array(payload)
                    if let transport = Self.transport(of: payload) { (proto, dport) = (transport.number, transport.destination) }
                case Int(CTA_TUPLE_REPLY.rawValue):
                    sport = Self.transport(of: payload)?.source
                default: break
                }
            }
            guard let id, let status, let proto, let dport, let sport, let tuple else { return nil }
            (self.id, self.status, protocolNumber, originalDestinationPort, replySourcePort, originalTuple) =
                (id, status, proto, dport, sport, tuple)
        }

        func isRedirected(port: UInt16, proxyPort: UInt16) -> Bool {
            protocolNumber == ipprotoTCP && status & UInt32(IPS_DST_NAT.rawValue) != 0 && originalDestinationPort == port
                && replySourcePort == proxyPort
        }

        /// A tuple's protocol number and ports (host order).
        private static func transport(of tuple: UnsafeRawBufferPointer) -> (number: UInt8, source: UInt16, destination: UInt16)? {
            guard let base = tuple.baseAddress else { return nil }
            for (type, payload) in attributes(base, tuple.count) where Int(type) == Int(CTA_TUPLE_PROTO.rawValue) {
                var num: UInt8?, source: UInt16?, destination: UInt16?
                for (t, p) in attributes(payload.baseAddress!, payload.count) {
                    switch Int(t) {
                    case Int(CTA_PROTO_NUM.rawValue): num = p.first
                    case Int(CTA_PROTO_SRC_PORT.rawValue): source = p.count >= 2 ? UInt16(bigEndian: p.loadUnaligned(as: UInt16.self)) : nil
                    case Int(CTA_PROTO_DST_PORT.rawValue): destination = p.count >= 2 ? UInt16(bigEndian: p.loadUnaligned(as: UInt16.self)) : nil
                    default: break
                    }
                }
                if let num { return (num, source ?? 0, destination ?? 0) }
            }
            return nil
        }

        /// The netlink attributes in `length` bytes at `start`: type (without its flags) and payload.
        private static func attributes(_ start: UnsafeRawPointer, _ length: Int) -> [(UInt16, UnsafeRawBufferPointer)] {
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
