import CIPTables
import Glibc
import LERedirectModel
import Synchronization

/// The iptables-legacy backend: x_tables through libiptc (libip4tc, libip6tc), never the
/// `iptables` command. A commit replaces one table atomically (libiptc reads the whole table,
/// changes it in memory, and hands the kernel the new one; counters of the rules it kept are carried
/// over). Writers hold the xtables lock, as iptables does, around read-modify-commit.
///
/// It never reads a table that does not exist yet: reading instantiates an x_tables table in the
/// network namespace for good, which would change what `iptables-legacy-save` lists ever after.
///
/// Reading a table costs the kernel copying all of it out (about 30 ms for 25,000 rules), so inside
/// `exclusively`, where nobody who honours the lock can change it, each table is read once: reads
/// and the commit share one libiptc handle, dropped once it is committed or the scope ends.
///
/// `@unchecked Sendable`: libiptc keeps process-wide state, so every call into it is serialised
/// behind one process-wide mutex (taken before this connection's cache of handles, never after);
/// the lock state is behind its own.
final class IptablesLegacyFirewall: Firewall, @unchecked Sendable {
    var system: FirewallSystem { .iptablesLegacy }

    /// libiptc's calls, one process at a time.
    private static let library = Mutex(())
    /// The handles read inside `exclusively`.
    private let cache = Mutex<[TableRef: XtablesTable]>([:])
    private let xtablesLock = Mutex(XtablesLock())
    /// Attempts when the kernel refuses a table because it changed since libiptc read it (EAGAIN:
    /// a writer that does not take the xtables lock).
    private let maxAttempts = 8

    /// Opens nothing: x_tables has no connection. Fails when this kernel has no x_tables at all.
    init() throws(FirewallError) {
        if Self.families.isEmpty {
            throw FirewallError(
                .unsupported, doing: "looking for x_tables",
                detail: "this kernel has no iptables-legacy support (no /proc/net/ip_tables_names)")
        }
    }

    func close() {}

    /// The families whose x_tables are in this kernel (ip6 may be missing).
    static var families: [Family] {
        [Family.ip, .ip6].filter { access(namesFile($0), F_OK) == 0 }
    }

    private static func namesFile(_ family: Family) -> String {
        family == .ip6 ? "/proc/net/ip6_tables_names" : "/proc/net/ip_tables_names"
    }

    /// The tables that exist in this network namespace.
    private static func tableNames(_ family: Family) -> [String] {
        guard let bytes = try? readFile(namesFile(family)) else { return [] }
        return String(decoding: bytes, as: UTF8.self).split(separator: "\n").map(String.init).sorted()
    }

    // MARK: Reading

    func tableList() throws(FirewallError) -> [TableRef] {
        Self.families.flatMap { family in Self.tableNames(family).map { TableRef(family, $0) } }
    }

    func snapshot() throws(FirewallError) -> FirewallSnapshot {
        var tables: [HostTable] = []
        var chains: [HostChain] = []
        for family in Self.families {
            for name in Self.tableNames(family) {
                let ref = TableRef(family, name)
                tables.append(HostTable(ref))
                chains += try withTable(ref, doing: "reading iptables-legacy \(ref)") { table in table.chains() }
            }
        }
        return FirewallSnapshot(
            generation: 0, tables: tables, chains: chains, families: Set(Self.families), ownedTables: false)
    }

    func fingerprint(of spec: RuleSpec, family: Family) -> RuleFingerprint {
        XtablesEntry.fingerprint(XtablesEntry.build(spec, family: family), family: family)
    }

    func rules(in chain: ChainRef) throws(FirewallError) -> [ObservedRule] {
        guard Self.tableNames(chain.table.family).contains(chain.table.name) else { return [] }
        return try withTable(chain.table, doing: "listing iptables-legacy \(chain)") { table in
            let reader = XtablesEntry.Reader()
            var rules: [ObservedRule] = []
            table.forEachEntry(of: chain.name) { entry in
                rules.append(
                    ObservedRule(
                        RuleLocation(chain, handle: UInt64(rules.count + 1)),
                        fingerprint: reader.fingerprint(entry, family: chain.table.family),
                        comment: XtablesEntry.comment(of: entry, family: chain.table.family)))
            }
            return rules
        }
    }

    func rule(at location: RuleLocation) throws(FirewallError) -> ObservedRule? {
        try rules(in: location.chain).first { $0.location.handle == location.handle }
    }

    func redirectedPackets() throws(FirewallError) -> UInt64? {
        var packets: UInt64?
        for family in Self.families where Self.tableNames(family).contains("mangle") {
            let chain = ChainRef(family, "mangle", "PREROUTING")
            try withTable(chain.table, doing: "reading the steering counter") { table in
                table.forEachEntry(of: chain.name) { entry in
                    guard XtablesEntry.isSteer(entry, family: family), XtablesEntry.comment(of: entry, family: family) == ruleTag
                    else { return }
                    packets = (packets ?? 0) + XtablesEntry.packets(of: entry, family: family)
                }
            }
        }
        return packets
    }

    // MARK: Committing

    func commit(_ changes: [FirewallChange], expecting generation: UInt32?) throws(FirewallError) -> [InsertedRule] {
        guard let table = changes.first?.table else { return [] }
        guard changes.allSatisfy({ $0.table == table }) else {
            throw FirewallError(.other, doing: "committing to iptables-legacy", detail: "one commit replaces one table")
        }
        guard Self.tableNames(table.family).contains(table.name) else {
            throw FirewallError(
                .notFound, doing: "changing iptables-legacy \(table)",
                detail: "the table does not exist, and le-redirect does not make x_tables tables (they cannot be deleted)")
        }
        return try exclusivelyFirewall { () throws(FirewallError) -> [InsertedRule] in
            var attempt = 0
            while true {
                attempt += 1
                do throws(FirewallError) {
                    // The handle is spent either way: committed, or changed in part.
                    return try withTable(table, doing: "changing iptables-legacy \(table)", spending: true) {
                        (t) throws(FirewallError) in
                        var inserted: [InsertedRule] = []
                        for change in changes {
                            inserted += try t.apply(change)
                        }
                        try t.commit()
                        return inserted
                    }
                } catch where error.errno == EAGAIN && attempt < maxAttempts {
                    continue  // someone replaced the table between our read and our commit
                }
            }
        }
    }

    // MARK: The xtables lock

    func exclusively<T>(_ body: () throws(LERedirectError) -> T) throws(LERedirectError) -> T {
        do { try acquire() } catch {
            throw LERedirectError(
                error.reason == .notPermitted ? .notPermitted : .failed, "\(error.doing): \(error.detail)",
                errno: error.errno)
        }
        defer { release() }
        return try body()
    }

    private func exclusivelyFirewall<T>(_ body: () throws(FirewallError) -> T) throws(FirewallError) -> T {
        try acquire()
        defer { release() }
        return try body()
    }

    private func acquire() throws(FirewallError) {
        // Waiting for the lock must not hold the mutex: only the depth and descriptor live there.
        if xtablesLock.withLock({ lock in
            guard lock.depth > 0 else { return false }
            lock.depth += 1
            return true
        }) { return }
        let fd = try XtablesLock.take(timeout: .seconds(10))
        xtablesLock.withLock { lock in
            lock.fd = fd
            lock.depth = 1
        }
    }

    private func release() {
        let last = xtablesLock.withLock { lock -> Bool in
            lock.depth -= 1
            return lock.depth == 0
        }
        guard last else { return }
        // Handles read under the lock are worth nothing once it is released.
        Self.library.withLock { _ in
            cache.withLock { cache in
                for table in cache.values { table.free() }
                cache = [:]
            }
        }
        xtablesLock.withLock { lock in
            if lock.fd >= 0 {
                closeDescriptor(lock.fd)  // closing releases the flock
                lock.fd = -1
            }
        }
    }

    private var isExclusive: Bool { xtablesLock.withLock { $0.depth > 0 } }

    // MARK: Tables

    /// Runs `body` on a libiptc handle of `ref`, with libiptc to itself: the one read earlier in
    /// this `exclusively` scope, or a fresh one. Outside the scope, or when `spending` (a commit),
    /// the handle is freed afterwards.
    private func withTable<T>(
        _ ref: TableRef, doing: String, spending: Bool = false, _ body: (XtablesTable) throws(FirewallError) -> T
    ) throws(FirewallError) -> T {
        let exclusive = isExclusive
        return try Self.library.withLock { (_) throws(FirewallError) -> T in
            let table = try cache.withLock { (cache) throws(FirewallError) -> XtablesTable in
                let table: XtablesTable
                if let cached = cache[ref] { table = cached } else { table = try XtablesTable(ref, doing: doing) }
                cache[ref] = exclusive && !spending ? table : nil
                return table
            }
            defer { if !exclusive || spending { table.free() } }
            return try body(table)
        }
    }
}

/// The flock iptables takes around its read-modify-commit: /run/xtables.lock, or XTABLES_LOCKFILE.
struct XtablesLock {
    var fd: Int32 = -1
    var depth = 0

    static var path: String {
        if let env = getenv("XTABLES_LOCKFILE"), env.pointee != 0 { return cString(env) }
        return "/run/xtables.lock"
    }

    static func take(timeout: Duration) throws(FirewallError) -> Int32 {
        let path = Self.path
        let fd = Fault.injectedErrno("xtables-lock").map { errno = $0; return -1 } ?? open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            let code = errno
            throw FirewallError(
                code == EACCES || code == EPERM ? .notPermitted : .other, doing: "opening the xtables lock \(path)",
                detail: errnoText(code), errno: code)
        }
        let deadline = monotonicMilliseconds() + timeout.milliseconds
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let code = errno
            if code == EINTR { continue }
            guard code == EWOULDBLOCK, monotonicMilliseconds() < deadline else {
                closeDescriptor(fd)
                throw FirewallError(
                    .other, doing: "taking the xtables lock \(path)",
                    detail: code == EWOULDBLOCK
                        ? "another program (iptables?) has held it for over \(DurationText.format(timeout)); nothing was changed"
                        : errnoText(code), errno: code)
            }
            usleep(5_000)
        }
        return fd
    }
}

/// One x_tables table read by libiptc: its chains and entries, changed in memory, then committed
/// whole. The same calls exist for IPv4 (iptc_*) and IPv6 (ip6tc_*); this picks by family.
///
/// `@unchecked Sendable`: a libiptc handle, only ever used with the library mutex held.
private struct XtablesTable: @unchecked Sendable {
    let ref: TableRef
    let handle: OpaquePointer
    let doing: String
    var v6: Bool { ref.family == .ip6 }

    init(_ ref: TableRef, doing: String) throws(FirewallError) {
        self.ref = ref
        self.doing = doing
        let handle = ref.family == .ip6 ? ip6tc_init(ref.name) : iptc_init(ref.name)
        guard let handle else { throw Self.error(errno, v6: ref.family == .ip6, doing: doing, change: nil) }
        self.handle = handle
    }

    func free() {
        if v6 { ip6tc_free(handle) } else { iptc_free(handle) }
    }

    func chains() -> [HostChain] {
        var result: [HostChain] = []
        var name = v6 ? ip6tc_first_chain(handle) : iptc_first_chain(handle)
        while let current = name {
            let chain = cString(current)
            var rules = 0
            forEachEntry(of: chain) { _ in rules += 1 }
            var info = HostChain(ChainRef(ref, chain), rules: rules)
            if (v6 ? ip6tc_builtin(chain, handle) : iptc_builtin(chain, handle)) != 0 {
                var counters = xt_counters()
                let policy = v6 ? ip6tc_get_policy(chain, &counters, handle) : iptc_get_policy(chain, &counters, handle)
                info.hook = Hook(rawValue: chain.lowercased())
                info.type = ref.name == "nat" ? "nat" : "filter"
                info.priority = Self.priority(table: ref.name, chain: chain)
                info.policy = cString(policy) == "DROP" ? .drop : .accept
            }
            result.append(info)
            name = v6 ? ip6tc_next_chain(handle) : iptc_next_chain(handle)
        }
        return result
    }

    /// x_tables' fixed hook priorities (NF_IP_PRI_*), for detect's evidence.
    static func priority(table: String, chain: String) -> Int32 {
        switch table {
        case "raw": -300
        case "mangle": -150
        case "nat": chain == "PREROUTING" || chain == "OUTPUT" ? -100 : 100
        case "security": 50
        default: 0
        }
    }

    /// Calls `body` with each entry of a chain, in place (valid only during the call); nothing
    /// when there is no such chain.
    func forEachEntry(of chain: String, _ body: (UnsafeRawBufferPointer) -> Void) {
        if v6 {
            guard ip6tc_is_chain(chain, handle) != 0 else { return }
            var entry = ip6tc_first_rule(chain, handle)
            while let e = entry {
                body(UnsafeRawBufferPointer(start: e, count: Int(e.pointee.next_offset)))
                entry = ip6tc_next_rule(e, handle)
            }
        } else {
            guard iptc_is_chain(chain, handle) != 0 else { return }
            var entry = iptc_first_rule(chain, handle)
            while let e = entry {
                body(UnsafeRawBufferPointer(start: e, count: Int(e.pointee.next_offset)))
                entry = iptc_next_rule(e, handle)
            }
        }
    }

    /// Applies one change to the table in memory.
    func apply(_ change: FirewallChange) throws(FirewallError) -> [InsertedRule] {
        switch change {
        case .insertRule(let chain, let spec):
            let entry = XtablesEntry.build(spec, family: ref.family, forInsertion: true)
            // Position 0, the head of the chain; or its end.
            let append = spec.appendsToChain
            let ok = entry.withUnsafeBytes { bytes in
                v6
                    ? (append
                        ? ip6tc_append_entry(chain.name, bytes.baseAddress!.assumingMemoryBound(to: ip6t_entry.self), handle)
                        : ip6tc_insert_entry(chain.name, bytes.baseAddress!.assumingMemoryBound(to: ip6t_entry.self), 0, handle))
                    : (append
                        ? iptc_append_entry(chain.name, bytes.baseAddress!.assumingMemoryBound(to: ipt_entry.self), handle)
                        : iptc_insert_entry(chain.name, bytes.baseAddress!.assumingMemoryBound(to: ipt_entry.self), 0, handle))
            }
            guard ok != 0 else { throw Self.error(errno, v6: v6, doing: doing, change: change) }
            return [InsertedRule(chain, handle: nil, fingerprint: XtablesEntry.fingerprint(entry, family: ref.family))]
        case .deleteMatching(let chain, let fingerprint, let count):
            let reader = XtablesEntry.Reader()
            var positions: [Int] = []
            var position = 0
            forEachEntry(of: chain.name) { entry in
                if reader.fingerprint(entry, family: ref.family) == fingerprint { positions.append(position) }
                position += 1
            }
            guard positions.count >= count else {
                throw FirewallError(
                    .notFound, doing: "deleting le-redirect's rule from iptables-legacy \(chain)",
                    detail: "the chain holds \(positions.count) of them, not \(count)")
            }
            // From the last, so that the positions still to delete do not move.
            for position in positions.suffix(count).reversed() {
                let ok = v6
                    ? ip6tc_delete_num_entry(chain.name, UInt32(position), handle)
                    : iptc_delete_num_entry(chain.name, UInt32(position), handle)
                guard ok != 0 else { throw Self.error(errno, v6: v6, doing: doing, change: change) }
            }
            return []
        default:
            throw FirewallError(.unsupported, doing: doing, detail: "x_tables has no such object: \(change)")
        }
    }

    /// Hands the changed table to the kernel, which swaps it in whole. libiptc carries the rules'
    /// counters over, but the libiptc of iptables 1.8.9 (Debian 12) zeroes every built-in chain's
    /// policy counters on commit, as `iptables -I` there does too (netfilter bugzilla 912, reverted
    /// in 1.8.10): they are written back from what this handle read, so at most the packets that
    /// met a policy during the read-modify-commit (milliseconds, under the xtables lock) go uncounted.
    func commit() throws(FirewallError) {
        var name = v6 ? ip6tc_first_chain(handle) : iptc_first_chain(handle)
        while let current = name {
            if (v6 ? ip6tc_builtin(current, handle) : iptc_builtin(current, handle)) != 0 {
                var counters = xt_counters()
                if let policy = v6 ? ip6tc_get_policy(current, &counters, handle) : iptc_get_policy(current, &counters, handle) {
                    let chain = cString(current), verdict = cString(policy)
                    let ok = v6 ? ip6tc_set_policy(chain, verdict, &counters, handle) : iptc_set_policy(chain, verdict, &counters, handle)
                    guard ok != 0 else { throw Self.error(errno, v6: v6, doing: "\(doing): keeping \(chain)'s policy counters", change: nil) }
                }
            }
            name = v6 ? ip6tc_next_chain(handle) : iptc_next_chain(handle)
        }
        if let code = Fault.injectedErrno("xtables-commit") {
            throw Self.error(code, v6: v6, doing: "\(doing): committing", change: nil)
        }
        guard (v6 ? ip6tc_commit(handle) : iptc_commit(handle)) != 0 else {
            throw Self.error(errno, v6: v6, doing: "\(doing): committing", change: nil)
        }
    }

    static func error(_ code: Int32, v6: Bool, doing: String, change: FirewallChange?) -> FirewallError {
        var detail = cString(v6 ? ip6tc_strerror(code) : iptc_strerror(code))
        let reason: FirewallError.Reason
        switch code {
        case EPERM, EACCES:
            reason = .notPermitted
            detail += " (le-redirect needs root or CAP_NET_ADMIN)"
        case ENOENT:
            reason = .notFound
            if change == nil {
                detail += " (are the kernel's xt_tcpudp, xt_addrtype, xt_time, xt_comment and xt_TPROXY available?)"
            }
        case ENOPROTOOPT, EAFNOSUPPORT:
            reason = .unsupported
        default:
            reason = .other
        }
        return FirewallError(reason, doing: doing, detail: detail, errno: code)
    }
}
