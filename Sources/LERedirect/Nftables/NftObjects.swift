import CNetfilter
import Glibc
import LERedirectModel

/// The nf_tables encodings of le-redirect's objects: family numbers, hooks, and the exact
/// expressions of its steering rule (the same ones `nft` generates for the text in rules/).
enum NftObjects {
    static func familyNumber(_ family: Family) -> UInt16 {
        switch family {
        case .ip: UInt16(NFPROTO_IPV4)
        case .ip6: UInt16(NFPROTO_IPV6)
        case .inet: UInt16(NFPROTO_INET)
        }
    }

    static func family(_ number: UInt32) -> Family? {
        switch Int(number) {
        case Int(NFPROTO_IPV4): .ip
        case Int(NFPROTO_IPV6): .ip6
        case Int(NFPROTO_INET): .inet
        default: nil
        }
    }

    static func hook(_ number: UInt32) -> Hook? {
        switch Int32(number) {
        case Int32(u32(NF_INET_PRE_ROUTING)): .prerouting
        case Int32(u32(NF_INET_LOCAL_IN)): .input
        case Int32(u32(NF_INET_FORWARD)): .forward
        case Int32(u32(NF_INET_LOCAL_OUT)): .output
        case Int32(u32(NF_INET_POST_ROUTING)): .postrouting
        case Int32(u32(NF_INET_INGRESS)): .ingress
        default: nil
        }
    }

    static func hookNumber(_ hook: Hook) -> UInt32 {
        switch hook {
        case .prerouting: u32(NF_INET_PRE_ROUTING)
        case .input: u32(NF_INET_LOCAL_IN)
        case .forward: u32(NF_INET_FORWARD)
        case .output: u32(NF_INET_LOCAL_OUT)
        case .postrouting: u32(NF_INET_POST_ROUTING)
        case .ingress: u32(NF_INET_INGRESS)
        case .egress: u32(NF_INET_NUMHOOKS)  // never created by le-redirect
        }
    }

    /// The userdata of a rule commented "LE": one TLV, type NFTNL_UDATA_RULE_COMMENT, NUL-terminated.
    static let tagUserdata: [UInt8] = [UInt8(u32(NFTNL_UDATA_RULE_COMMENT)), UInt8(ruleTag.utf8.count + 1)]
        + Array(ruleTag.utf8) + [0]

    /// The rule's comment: in its userdata (nft), or in an x_tables comment match (iptables-nft).
    static func comment(of rule: OpaquePointer) -> String? {
        if let comment = comment(inUserdata: userdata(of: rule)) { return comment }
        guard let iterator = nftnl_expr_iter_create(rule) else { return nil }
        defer { nftnl_expr_iter_destroy(iterator) }
        while let expr = nftnl_expr_iter_next(iterator) {
            guard cString(nftnl_expr_get_str(expr, u16(NFTNL_EXPR_NAME))) == "match",
                cString(nftnl_expr_get_str(expr, u16(NFTNL_EXPR_MT_NAME))) == "comment"
            else { continue }
            let info = exprData(expr, u32(NFTNL_EXPR_MT_INFO))
            return String(decoding: info.prefix { $0 != 0 }, as: UTF8.self)
        }
        return nil
    }

    /// The comment in a rule's userdata, if it has one.
    static func comment(inUserdata bytes: [UInt8]) -> String? {
        var i = 0
        while i + 2 <= bytes.count {
            let type = bytes[i]
            let length = Int(bytes[i + 1])
            guard i + 2 + length <= bytes.count else { return nil }
            if type == UInt8(u32(NFTNL_UDATA_RULE_COMMENT)) {
                var value = Array(bytes[(i + 2)..<(i + 2 + length)])
                if value.last == 0 { value.removeLast() }
                return String(decoding: value, as: UTF8.self)
            }
            i += 2 + length
        }
        return nil
    }

    // MARK: Rules

    /// Builds the nftnl rule for `spec` in `chain`. The caller frees it with nftnl_rule_free.
    static func makeRule(_ spec: RuleSpec, in chain: ChainRef, setID: UInt32 = 1) -> OpaquePointer {
        let rule = nftnl_rule_alloc()!
        nftnl_rule_set_u32(rule, u16(NFTNL_RULE_FAMILY), UInt32(familyNumber(chain.table.family)))
        nftnl_rule_set_str(rule, u16(NFTNL_RULE_TABLE), chain.table.name)
        nftnl_rule_set_str(rule, u16(NFTNL_RULE_CHAIN), chain.name)
        let r1 = u32(NFT_REG_1)
        switch spec {
        case .steer(let set, let proxyPort, let address):
            matchSteeredSYN(rule, set: set, setID: setID, address: address)
            add(rule, immediate(r1, bytes(proxyPort.bigEndian)))
            add(rule, tproxy(portRegister: r1))
            // After tproxy: a SYN it found no transparent listener for stops the rule there, so
            // the counter counts exactly the connections handed to the proxy (end's drain waits
            // for that many).
            add(rule, nftnl_expr_alloc("counter")!)
        case .keepDestination(let set, let family, let address):
            let v6 = family == .ip6
            if address == nil {  // with one, its match checks the family
                add(rule, meta(u32(NFT_META_NFPROTO), into: r1))
                add(rule, cmp(r1, .eq, [UInt8(v6 ? NFPROTO_IPV6 : NFPROTO_IPV4)]))
            }
            matchSteeredSYN(rule, set: set, setID: setID, address: address)
            // The destination address, as the packet has it, becomes the binding's: an identity.
            add(rule, networkDestination(v6: v6, into: r1))
            add(rule, dnat(family: v6 ? u32(NFPROTO_IPV6) : u32(NFPROTO_IPV4), addressRegister: r1))
        case .markLocal(let set, let uid, let mark, let address):
            add(rule, meta(u32(NFT_META_SKUID), into: r1))
            add(rule, cmp(r1, .neq, bytes(uid)))
            matchSYN(rule, set: set, setID: setID, address: address)
            // meta mark set meta mark | MARK: (mark & ~MARK) ^ MARK, as nft encodes it.
            add(rule, meta(u32(NFT_META_MARK), into: r1))
            add(rule, bitwise(r1, mask: bytes(~mark), xor: bytes(mark)))
            add(rule, setMeta(u32(NFT_META_MARK), from: r1))
        case .unmarkProxy(let set, let uid, let mark):
            add(rule, meta(u32(NFT_META_SKUID), into: r1))
            add(rule, cmp(r1, .eq, bytes(uid)))
            matchSYN(rule, set: set, setID: setID, address: nil)
            add(rule, meta(u32(NFT_META_MARK), into: r1))
            add(rule, bitwise(r1, mask: bytes(~mark), xor: bytes(UInt32(0))))
            add(rule, setMeta(u32(NFT_META_MARK), from: r1))
        case .clearLocal(let mark):
            add(rule, meta(u32(NFT_META_IIFNAME), into: r1))
            add(rule, cmp(r1, .eq, Array("lo".utf8) + [UInt8](repeating: 0, count: 14)))
            add(rule, meta(u32(NFT_META_MARK), into: r1))
            add(rule, bitwise(r1, mask: bytes(mark), xor: bytes(UInt32(0))))
            add(rule, cmp(r1, .eq, bytes(mark)))
            add(rule, meta(u32(NFT_META_L4PROTO), into: r1))
            add(rule, cmp(r1, .eq, [ipprotoTCP]))
            add(rule, tcpFlags(into: r1))
            add(rule, bitwise(r1, mask: [0x17], xor: [0x00]))
            add(rule, cmp(r1, .eq, [0x02]))
            add(rule, meta(u32(NFT_META_MARK), into: r1))
            add(rule, bitwise(r1, mask: bytes(~mark), xor: bytes(UInt32(0))))
            add(rule, setMeta(u32(NFT_META_MARK), from: r1))
        case .steerLocal(let set, let proxyPort, let mark, let address):
            add(rule, meta(u32(NFT_META_IIFNAME), into: r1))
            add(rule, cmp(r1, .eq, Array("lo".utf8) + [UInt8](repeating: 0, count: 14)))
            add(rule, meta(u32(NFT_META_MARK), into: r1))
            add(rule, bitwise(r1, mask: bytes(mark), xor: bytes(UInt32(0))))
            add(rule, cmp(r1, .eq, bytes(mark)))
            matchSYN(rule, set: set, setID: setID, address: address)
            // The bit goes before the packet reaches any chain of the host's input.
            add(rule, meta(u32(NFT_META_MARK), into: r1))
            add(rule, bitwise(r1, mask: bytes(~mark), xor: bytes(UInt32(0))))
            add(rule, setMeta(u32(NFT_META_MARK), from: r1))
            add(rule, immediate(r1, bytes(proxyPort.bigEndian)))
            add(rule, tproxy(portRegister: r1))
            add(rule, nftnl_expr_alloc("counter")!)
        case .expiringSteer, .expiringKeepDestination:
            preconditionFailure("x_tables' rules have no nftables form")
        }
        tagUserdata.withUnsafeBytes { buf in
            _ = nftnl_rule_set_data(rule, u16(NFTNL_RULE_USERDATA), buf.baseAddress, UInt32(buf.count))
        }
        return rule
    }

    /// A rendering of the rule's expressions and userdata, the same for a rule we built and for that
    /// rule as the kernel lists it back, whatever its counters say; its hash is the rule's fingerprint.
    static func fingerprint(of rule: OpaquePointer) -> RuleFingerprint {
        var text = ""
        var line = [CChar](repeating: 0, count: 1024)
        if let iterator = nftnl_expr_iter_create(rule) {
            while let expr = nftnl_expr_iter_next(iterator) {
                let name = cString(nftnl_expr_get_str(expr, u16(NFTNL_EXPR_NAME)))
                switch name {
                case "counter":
                    text += "[ counter ]"
                case "match", "target":
                    // libnftnl prints an x_tables object's name and revision, not its data.
                    _ = nftnl_expr_snprintf(&line, line.count, expr, u32(NFTNL_OUTPUT_DEFAULT), 0)
                    let info = exprData(expr, name == "match" ? u32(NFTNL_EXPR_MT_INFO) : u32(NFTNL_EXPR_TG_INFO))
                    text += "[ \(name) \(cString(line)) \(info.map { Hex.format($0, width: 2) }.joined())]"
                default:
                    _ = nftnl_expr_snprintf(&line, line.count, expr, u32(NFTNL_OUTPUT_DEFAULT), 0)
                    text += "[ \(name) \(cString(line))]"
                }
            }
            nftnl_expr_iter_destroy(iterator)
        }
        text += " userdata " + userdata(of: rule).map { Hex.format($0, width: 2) }.joined()
        return RuleFingerprint(hashing: text.utf8)
    }

    static func userdata(of rule: OpaquePointer) -> [UInt8] {
        var length: UInt32 = 0
        guard let data = nftnl_rule_get_data(rule, u16(NFTNL_RULE_USERDATA), &length) else { return [] }
        return Array(UnsafeRawBufferPointer(start: data, count: Int(length)))
    }

    /// What both of our nftables rules match: `iifname != "lo" fib daddr type local tcp dport @SET
    /// tcp flags syn / fin,syn,rst,ack`. Not from lo: the host's own connections (the proxy's to
    /// the app among them) are never steered. SYN only: connection openings; the rest of a steered
    /// connection finds its socket by the usual lookup.
    /// With `address` (--address), also `ip daddr ADDRESS` / `ip6 daddr ADDRESS` after the fib
    /// check, with the family check nft puts before it.
    private static func matchSteeredSYN(_ rule: OpaquePointer, set: String, setID: UInt32, address: IPAddress?) {
        let r1 = u32(NFT_REG_1)
        add(rule, meta(u32(NFT_META_IIFNAME), into: r1))
        add(rule, cmp(r1, .neq, Array("lo".utf8) + [UInt8](repeating: 0, count: 14)))
        matchSYN(rule, set: set, setID: setID, address: address)
    }

    /// `fib daddr type local [ip daddr ADDRESS] tcp dport @SET tcp flags syn / fin,syn,rst,ack`.
    private static func matchSYN(_ rule: OpaquePointer, set: String, setID: UInt32, address: IPAddress?) {
        let r1 = u32(NFT_REG_1)
        add(rule, fibDestinationType(into: r1))
        add(rule, cmp(r1, .eq, bytes(u32(RTN_LOCAL))))
        if let address {
            let v6 = address.family == .ip6
            add(rule, meta(u32(NFT_META_NFPROTO), into: r1))
            add(rule, cmp(r1, .eq, [UInt8(v6 ? NFPROTO_IPV6 : NFPROTO_IPV4)]))
            add(rule, networkDestination(v6: v6, into: r1))
            add(rule, cmp(r1, .eq, address.bytes))
        }
        add(rule, meta(u32(NFT_META_L4PROTO), into: r1))
        add(rule, cmp(r1, .eq, [ipprotoTCP]))
        add(rule, transportPort(destination: true, into: r1))
        add(rule, lookup(r1, set: set, setID: setID))
        add(rule, tcpFlags(into: r1))
        add(rule, bitwise(r1, mask: [0x17], xor: [0x00]))
        add(rule, cmp(r1, .eq, [0x02]))
    }

    // MARK: Expressions

    enum CmpOp { case eq, neq }

    private static func add(_ rule: OpaquePointer, _ expr: OpaquePointer) { nftnl_rule_add_expr(rule, expr) }

    private static func bytes<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value) { Array($0) }
    }

    private static func setData(_ expr: OpaquePointer, _ attr: UInt32, _ data: [UInt8]) {
        data.withUnsafeBytes { _ = nftnl_expr_set(expr, UInt16(attr), $0.baseAddress, UInt32($0.count)) }
    }

    private static func meta(_ key: UInt32, into reg: UInt32) -> OpaquePointer {
        let e = nftnl_expr_alloc("meta")!
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_META_KEY), key)
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_META_DREG), reg)
        return e
    }

    private static func setMeta(_ key: UInt32, from reg: UInt32) -> OpaquePointer {
        let e = nftnl_expr_alloc("meta")!
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_META_KEY), key)
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_META_SREG), reg)
        return e
    }

    private static func cmp(_ reg: UInt32, _ op: CmpOp, _ data: [UInt8]) -> OpaquePointer {
        let e = nftnl_expr_alloc("cmp")!
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_CMP_SREG), reg)
        nftnl_expr_set_u32(
            e, u16(NFTNL_EXPR_CMP_OP), op == .eq ? u32(NFT_CMP_EQ) : u32(NFT_CMP_NEQ))
        setData(e, u32(NFTNL_EXPR_CMP_DATA), data)
        return e
    }

    private static func fibDestinationType(into reg: UInt32) -> OpaquePointer {
        let e = nftnl_expr_alloc("fib")!
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_FIB_RESULT), u32(NFT_FIB_RESULT_ADDRTYPE))
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_FIB_FLAGS), u32(NFTA_FIB_F_DADDR))
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_FIB_DREG), reg)
        return e
    }

    private static func transportPort(destination: Bool, into reg: UInt32) -> OpaquePointer {
        let e = nftnl_expr_alloc("payload")!
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_PAYLOAD_BASE), u32(NFT_PAYLOAD_TRANSPORT_HEADER))
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_PAYLOAD_OFFSET), destination ? 2 : 0)
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_PAYLOAD_LEN), 2)
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_PAYLOAD_DREG), reg)
        return e
    }

    /// The TCP header's flags byte (offset 13).
    private static func tcpFlags(into reg: UInt32) -> OpaquePointer {
        let e = nftnl_expr_alloc("payload")!
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_PAYLOAD_BASE), u32(NFT_PAYLOAD_TRANSPORT_HEADER))
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_PAYLOAD_OFFSET), 13)
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_PAYLOAD_LEN), 1)
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_PAYLOAD_DREG), reg)
        return e
    }

    private static func lookup(_ reg: UInt32, set: String, setID: UInt32) -> OpaquePointer {
        let e = nftnl_expr_alloc("lookup")!
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_LOOKUP_SREG), reg)
        nftnl_expr_set_str(e, u16(NFTNL_EXPR_LOOKUP_SET), set)
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_LOOKUP_SET_ID), setID)
        return e
    }

    private static func immediate(_ reg: UInt32, _ data: [UInt8]) -> OpaquePointer {
        let e = nftnl_expr_alloc("immediate")!
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_IMM_DREG), reg)
        setData(e, u32(NFTNL_EXPR_IMM_DATA), data)
        return e
    }

    /// `ip daddr` (offset 16, 4 bytes) or `ip6 daddr` (offset 24, 16 bytes).
    private static func networkDestination(v6: Bool, into reg: UInt32) -> OpaquePointer {
        let e = nftnl_expr_alloc("payload")!
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_PAYLOAD_BASE), u32(NFT_PAYLOAD_NETWORK_HEADER))
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_PAYLOAD_OFFSET), v6 ? 24 : 16)
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_PAYLOAD_LEN), v6 ? 16 : 4)
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_PAYLOAD_DREG), reg)
        return e
    }

    private static func dnat(family: UInt32, addressRegister reg: UInt32) -> OpaquePointer {
        let e = nftnl_expr_alloc("nat")!
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_NAT_TYPE), u32(NFT_NAT_DNAT))
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_NAT_FAMILY), family)
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_NAT_REG_ADDR_MIN), reg)
        return e
    }

    /// `tproxy to :PORT` for either family (NFPROTO_UNSPEC: no address, the packet's own family).
    private static func tproxy(portRegister reg: UInt32) -> OpaquePointer {
        let e = nftnl_expr_alloc("tproxy")!
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_TPROXY_FAMILY), u32(NFPROTO_UNSPEC))
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_TPROXY_REG_PORT), reg)
        return e
    }


    private static func bitwise(_ reg: UInt32, mask: [UInt8], xor: [UInt8]) -> OpaquePointer {
        let e = nftnl_expr_alloc("bitwise")!
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_BITWISE_SREG), reg)
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_BITWISE_DREG), reg)
        nftnl_expr_set_u32(e, u16(NFTNL_EXPR_BITWISE_LEN), UInt32(mask.count))
        setData(e, u32(NFTNL_EXPR_BITWISE_MASK), mask)
        setData(e, u32(NFTNL_EXPR_BITWISE_XOR), xor)
        return e
    }


    private static func exprData(_ expr: OpaquePointer, _ attr: UInt32) -> [UInt8] {
        var length: UInt32 = 0
        guard let data = nftnl_expr_get(expr, UInt16(attr), &length) else { return [] }
        return Array(UnsafeRawBufferPointer(start: data, count: Int(length)))
    }

}
