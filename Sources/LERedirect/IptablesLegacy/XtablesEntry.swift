import CIPTables
import Glibc
import LERedirectModel

/// The x_tables encodings of le-redirect's rules: byte for byte the entries `iptables-legacy` and
/// `ip6tables-legacy` make for the text in rules/iptables-legacy.rules (so `iptables -D` with that
/// text removes them too), and the reading of entries the kernel hands back.
///
/// An entry is a header (`ipt_entry` / `ip6t_entry`), then each match (a 32-byte header: size, name,
/// revision; then its data, 8-byte aligned), then the target in the same shape.
enum XtablesEntry {
    struct Layout {
        let header: Int
        let nfcache: Int
        let targetOffset: Int
        let nextOffset: Int
        let comefrom: Int
        let counters: Int
    }

    static func layout(_ family: Family) -> Layout { family == .ip6 ? layout6 : layout4 }

    private static let layout4 = computeLayout(.ip)
    private static let layout6 = computeLayout(.ip6)

    private static func computeLayout(_ family: Family) -> Layout {
        family == .ip6
            ? Layout(
                header: MemoryLayout<ip6t_entry>.size, nfcache: MemoryLayout<ip6t_entry>.offset(of: \.nfcache)!,
                targetOffset: MemoryLayout<ip6t_entry>.offset(of: \.target_offset)!,
                nextOffset: MemoryLayout<ip6t_entry>.offset(of: \.next_offset)!,
                comefrom: MemoryLayout<ip6t_entry>.offset(of: \.comefrom)!,
                counters: MemoryLayout<ip6t_entry>.offset(of: \.counters)!)
            : Layout(
                header: MemoryLayout<ipt_entry>.size, nfcache: MemoryLayout<ipt_entry>.offset(of: \.nfcache)!,
                targetOffset: MemoryLayout<ipt_entry>.offset(of: \.target_offset)!,
                nextOffset: MemoryLayout<ipt_entry>.offset(of: \.next_offset)!,
                comefrom: MemoryLayout<ipt_entry>.offset(of: \.comefrom)!,
                counters: MemoryLayout<ipt_entry>.offset(of: \.counters)!)
    }

    /// XT_ALIGN: every match and target, and their data, start at a multiple of 8.
    static func align(_ n: Int) -> Int { (n + 7) & ~7 }

    static let objectHeader = 32  // XT_ALIGN(sizeof(struct xt_entry_match)) == that of xt_entry_target

    /// The entry for `spec`. `forInsertion` names the standard target ACCEPT, as libiptc expects
    /// from its callers; without it the name is empty, as the kernel lists it (the canonical form).
    static func build(_ spec: RuleSpec, family: Family, forInsertion: Bool = false) -> [UInt8] {
        var matches: [UInt8] = []
        let target: [UInt8]
        switch spec {
        case .expiringSteer(let port, let proxyPort, let until, _):
            matches = steeredSYNMatches(port: port, until: until)
            target = tproxyTarget(port: proxyPort)
        case .expiringKeepDestination(let port, let until, _):
            matches = steeredSYNMatches(port: port, until: until)
            var verdict = Int32(-NF_ACCEPT - 1)  // a standard target's verdict: -(verdict) - 1
            target = object(forInsertion ? "ACCEPT" : "", revision: 0, withUnsafeBytes(of: &verdict) { Array($0) })
        case .steer, .keepDestination, .markLocal, .steerLocal, .unmarkProxy, .clearLocal:
            preconditionFailure("the nftables rules have no x_tables form")
        }
        let l = layout(family)
        var entry = [UInt8](repeating: 0, count: l.header)
        if family == .ip6 {
            var e = ip6t_entry()
            e.ipv6.proto = UInt16(IPPROTO_TCP)
            e.ipv6.flags = UInt8(IP6T_F_PROTO)  // ip6tables matches the protocol only with this flag
            withUnsafeMutableBytes(of: &e.ipv6.iniface) { notLoopback($0) }
            withUnsafeMutableBytes(of: &e.ipv6.iniface_mask) { loopbackMask($0) }
            e.ipv6.invflags = UInt8(IP6T_INV_VIA_IN)
            if let address = spec.address {  // `-d ADDRESS/128`
                withUnsafeMutableBytes(of: &e.ipv6.dst) { $0.copyBytes(from: address.bytes) }
                withUnsafeMutableBytes(of: &e.ipv6.dmsk) { $0.copyBytes(from: [UInt8](repeating: 0xFF, count: 16)) }
            }
            entry = raw(&e)
        } else {
            var e = ipt_entry()
            e.ip.proto = UInt16(IPPROTO_TCP)
            withUnsafeMutableBytes(of: &e.ip.iniface) { notLoopback($0) }
            withUnsafeMutableBytes(of: &e.ip.iniface_mask) { loopbackMask($0) }
            e.ip.invflags = UInt8(IPT_INV_VIA_IN)
            if let address = spec.address {  // `-d ADDRESS/32`
                withUnsafeMutableBytes(of: &e.ip.dst) { $0.copyBytes(from: address.bytes) }
                withUnsafeMutableBytes(of: &e.ip.dmsk) { $0.copyBytes(from: [UInt8](repeating: 0xFF, count: 4)) }
            }
            entry = raw(&e)
        }
        put(UInt16(l.header + matches.count), at: l.targetOffset, in: &entry)
        put(UInt16(l.header + matches.count + target.count), at: l.nextOffset, in: &entry)
        return entry + matches + target
    }

    /// What both of our x_tables rules match (with `! -i lo` in the entry's header): `-p tcp -m tcp
    /// --dport PORT --syn -m addrtype --dst-type LOCAL -m time --datestop UNTIL -m comment --comment LE`.
    private static func steeredSYNMatches(port: UInt16, until: Int64) -> [UInt8] {
        var addrtype = xt_addrtype_info_v1()
        addrtype.dest = UInt16(XT_ADDRTYPE_LOCAL)
        return tcp(destinationPort: port, synOnly: true) + object("addrtype", revision: 1, raw(&addrtype))
            + object("time", revision: 0, timeData(until: until)) + object("comment", revision: 0, commentData(ruleTag))
    }

    /// `-m time --datestop UNTIL` (UTC, as iptables writes it without --kerneltz), field by field into
    /// zeroed bytes: a struct copied whole can carry its padding as whatever the stack held (a
    /// struct returned from a function did), and both iptables -D and the fingerprint compare
    /// every byte.
    private static func timeData(until: Int64) -> [UInt8] {
        typealias T = xt_time_info
        var data = [UInt8](repeating: 0, count: MemoryLayout<T>.size)
        put(UInt32(0), at: MemoryLayout<T>.offset(of: \.date_start)!, in: &data)
        put(UInt32(clamping: until), at: MemoryLayout<T>.offset(of: \.date_stop)!, in: &data)
        put(UInt32(XT_TIME_MIN_DAYTIME), at: MemoryLayout<T>.offset(of: \.daytime_start)!, in: &data)
        put(UInt32(XT_TIME_MAX_DAYTIME), at: MemoryLayout<T>.offset(of: \.daytime_stop)!, in: &data)
        put(UInt32(truncatingIfNeeded: XT_TIME_ALL_MONTHDAYS), at: MemoryLayout<T>.offset(of: \.monthdays_match)!, in: &data)
        put(UInt8(XT_TIME_ALL_WEEKDAYS), at: MemoryLayout<T>.offset(of: \.weekdays_match)!, in: &data)
        put(UInt8(0), at: MemoryLayout<T>.offset(of: \.flags)!, in: &data)  // UTC
        return data
    }

    /// `-p tcp -m tcp --dport PORT`, with `synOnly` also `--syn` (`--tcp-flags FIN,SYN,RST,ACK SYN`):
    /// connection openings only. xt_tcp keeps its ports in host order.
    private static func tcp(destinationPort port: UInt16, synOnly: Bool = false) -> [UInt8] {
        var info = xt_tcp()
        info.spts = (0, 0xFFFF)
        info.dpts = (port, port)
        if synOnly {
            info.flg_mask = 0x17  // FIN | SYN | RST | ACK
            info.flg_cmp = 0x02  // SYN
        }
        return object("tcp", revision: 0, raw(&info))
    }

    /// The data of `-m comment --comment TEXT`.
    static func commentData(_ text: String) -> [UInt8] {
        var data = [UInt8](repeating: 0, count: Int(XT_MAX_COMMENT_LEN))
        data.replaceSubrange(0..<text.utf8.count, with: text.utf8)
        return padded(data)
    }

    private static func padded(_ data: [UInt8]) -> [UInt8] {
        data + [UInt8](repeating: 0, count: align(data.count) - data.count)
    }

    /// `! -i lo`: the interface name, and the mask iptables makes for a name without "+": one
    /// 0xff per character and one for the NUL.
    private static func notLoopback(_ name: UnsafeMutableRawBufferPointer) {
        name.copyBytes(from: Array("lo".utf8))
    }

    private static func loopbackMask(_ mask: UnsafeMutableRawBufferPointer) {
        for i in 0..<3 { mask[i] = 0xff }
    }

    /// `-j TPROXY --on-port PORT --on-ip 0.0.0.0 --tproxy-mark 0x0/0x0` (revision 1, either family):
    /// the socket listening on PORT takes the connection; the mark is left alone.
    /// Written field by field into zeroed bytes: a struct copied whole would carry its padding
    /// (after lport) as whatever the stack held, and iptables -D compares every byte.
    private static func tproxyTarget(port: UInt16) -> [UInt8] {
        var data = [UInt8](repeating: 0, count: MemoryLayout<xt_tproxy_target_info_v1>.size)
        put(port.bigEndian, at: MemoryLayout<xt_tproxy_target_info_v1>.offset(of: \.lport)!, in: &data)
        return object("TPROXY", revision: 1, data)
    }

    /// A match or target: size, NUL-padded name, revision, then the data padded to XT_ALIGN.
    private static func object(_ name: String, revision: UInt8, _ data: [UInt8]) -> [UInt8] {
        let size = objectHeader + align(data.count)
        var bytes = [UInt8](repeating: 0, count: size)
        put(UInt16(size), at: 0, in: &bytes)
        bytes.replaceSubrange(2..<(2 + name.utf8.count), with: name.utf8)
        bytes[objectHeader - 1] = revision
        bytes.replaceSubrange(objectHeader..<(objectHeader + data.count), with: data)
        return bytes
    }

    /// The bytes of a variable as it lies in memory (a C struct's `init()` zeroes all of it, padding
    /// included). Through `inout`: a copy of the value need not carry its padding bytes along.
    private static func raw<T>(_ value: inout T) -> [UInt8] {
        withUnsafeBytes(of: &value) { Array($0) }
    }

    private static func put<T: FixedWidthInteger>(_ value: T, at offset: Int, in bytes: inout [UInt8]) {
        withUnsafeBytes(of: value) { bytes.replaceSubrange(offset..<(offset + $0.count), with: $0) }
    }

    // MARK: Reading entries back

    /// Calls `body` with the offset and size of each match, then of the target.
    static func forEachObject(_ entry: UnsafeRawBufferPointer, family: Family, _ body: (_ offset: Int, _ size: Int) -> Void) {
        let l = layout(family)
        guard entry.count >= l.header else { return }
        let targetAt = Int(entry.loadUnaligned(fromByteOffset: l.targetOffset, as: UInt16.self))
        var offset = l.header
        while offset + objectHeader <= min(targetAt, entry.count) {
            let size = Int(entry.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
            guard size >= objectHeader else { break }
            body(offset, size)
            offset += size
        }
        if targetAt + objectHeader <= entry.count {
            body(targetAt, Int(entry.loadUnaligned(fromByteOffset: targetAt, as: UInt16.self)))
        }
    }

    /// Whether the object at `offset` is named `name` (compared in place).
    static func hasName(_ name: StaticString, at offset: Int, in entry: UnsafeRawBufferPointer) -> Bool {
        let count = name.utf8CodeUnitCount
        guard offset + 2 + count < offset + objectHeader, offset + objectHeader <= entry.count else { return false }
        for i in 0..<count where entry[offset + 2 + i] != name.utf8Start[i] { return false }
        return entry[offset + 2 + count] == 0
    }

    /// Reads entries the kernel hands back, through one scratch buffer: fingerprints of tens of
    /// thousands of host rules without an allocation each.
    final class Reader {
        private var scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)

        deinit { scratch.deallocate() }

        /// The entry without what the kernel keeps for itself (counters, the hook bookkeeping in
        /// `comefrom`) and without the bytes after each name's NUL, which the kernel leaves unwritten
        /// when it hands entries out: the same for a rule we built and that rule as the kernel lists it.
        func canonical<R>(_ entry: UnsafeRawBufferPointer, family: Family, _ body: (UnsafeRawBufferPointer) -> R) -> R {
            if scratch.count < entry.count {
                scratch.deallocate()
                scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: entry.count, alignment: 8)
            }
            let bytes = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<entry.count])
            bytes.copyMemory(from: entry)
            let l = layout(family)
            if entry.count >= l.header {
                bytes.storeBytes(of: 0, toByteOffset: l.nfcache, as: UInt32.self)
                bytes.storeBytes(of: 0, toByteOffset: l.comefrom, as: UInt32.self)
                bytes.storeBytes(of: 0, toByteOffset: l.counters, as: UInt64.self)
                bytes.storeBytes(of: 0, toByteOffset: l.counters + 8, as: UInt64.self)
            }
            forEachObject(entry, family: family) { offset, _ in
                var i = offset + 2
                while i < offset + objectHeader - 1 && bytes[i] != 0 { i += 1 }
                while i < offset + objectHeader - 1 {
                    bytes[i] = 0
                    i += 1
                }
            }
            return body(UnsafeRawBufferPointer(bytes))
        }

        func fingerprint(_ entry: UnsafeRawBufferPointer, family: Family) -> RuleFingerprint {
            canonical(entry, family: family) { bytes in
                // FNV-1a, as RuleFingerprint(hashing:) computes it, over the prefix and the bytes.
                var hash: UInt64 = family == .ip6 ? XtablesEntry.prefixHash6 : XtablesEntry.prefixHash4
                for byte in bytes {
                    hash ^= UInt64(byte)
                    hash = hash &* 0x0000_0100_0000_01b3
                }
                return RuleFingerprint(hash)
            }
        }
    }

    /// The FNV-1a state after the prefix that sets x_tables fingerprints apart from nftables'.
    private static let prefixHash4 = RuleFingerprint(hashing: fingerprintPrefix(.ip)).value
    private static let prefixHash6 = RuleFingerprint(hashing: fingerprintPrefix(.ip6)).value

    static func fingerprintPrefix(_ family: Family) -> String.UTF8View { (family == .ip6 ? "x_tables ip6 " : "x_tables ip ").utf8 }

    /// The text of the entry's comment match, if it has one.
    static func comment(of entry: UnsafeRawBufferPointer, family: Family) -> String? {
        var found: String?
        forEachObject(entry, family: family) { offset, size in
            guard found == nil, hasName("comment", at: offset, in: entry) else { return }
            let data = UnsafeRawBufferPointer(rebasing: entry[(offset + objectHeader)..<min(offset + size, entry.count)])
            found = String(decoding: data.prefix { $0 != 0 }, as: UTF8.self)
        }
        return found
    }

    static func isSteer(_ entry: UnsafeRawBufferPointer, family: Family) -> Bool {
        var last = -1
        forEachObject(entry, family: family) { offset, _ in last = offset }
        return last >= 0 && hasName("TPROXY", at: last, in: entry)
    }

    static func packets(of entry: UnsafeRawBufferPointer, family: Family) -> UInt64 {
        entry.loadUnaligned(fromByteOffset: layout(family).counters, as: UInt64.self)
    }

    // MARK: The same over byte arrays (tests, and entries le-redirect builds)

    static func canonical(_ entry: [UInt8], family: Family) -> [UInt8] {
        entry.withUnsafeBytes { raw in Reader().canonical(raw, family: family) { Array($0) } }
    }

    static func fingerprint(_ entry: [UInt8], family: Family) -> RuleFingerprint {
        entry.withUnsafeBytes { Reader().fingerprint($0, family: family) }
    }

    static func comment(of entry: [UInt8], family: Family) -> String? {
        entry.withUnsafeBytes { comment(of: $0, family: family) }
    }

    static func objects(_ entry: [UInt8], family: Family) -> [(offset: Int, size: Int)] {
        var result: [(Int, Int)] = []
        entry.withUnsafeBytes { forEachObject($0, family: family) { result.append(($0, $1)) } }
        return result
    }

    static func name(at offset: Int, in bytes: [UInt8]) -> String {
        String(decoding: bytes[(offset + 2)..<(offset + objectHeader - 1)].prefix { $0 != 0 }, as: UTF8.self)
    }

    static func targetName(of entry: [UInt8], family: Family) -> String {
        objects(entry, family: family).last.map { name(at: $0.offset, in: entry) } ?? ""
    }

    static func packets(of entry: [UInt8], family: Family) -> UInt64 {
        entry.withUnsafeBytes { packets(of: $0, family: family) }
    }
}
