/// The two netfilter systems a host's firewall can live in. x_tables tables edited with
/// `iptables-nft` are nftables tables, so they belong to `.nftables`.
package enum FirewallSystem: String, Sendable, Hashable, CaseIterable, Comparable, CustomStringConvertible {
    case nftables
    case iptablesLegacy = "iptables-legacy"

    package static func < (a: FirewallSystem, b: FirewallSystem) -> Bool {
        allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
    }

    package var description: String { rawValue }
}

/// The address families le-redirect reads and writes (x_tables has ip and ip6 only).
package enum Family: String, Sendable, Hashable, CaseIterable, Comparable {
    case ip, ip6, inet

    package static func < (a: Family, b: Family) -> Bool {
        allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
    }
}

package struct TableRef: Hashable, Sendable, Comparable, CustomStringConvertible {
    package var family: Family
    package var name: String

    package init(_ family: Family, _ name: String) {
        self.family = family
        self.name = name
    }

    package var description: String { "\(family) \(name)" }

    package static func < (a: TableRef, b: TableRef) -> Bool {
        (a.family, a.name) < (b.family, b.name)
    }

    /// The table le-redirect creates and owns for the session.
    package static let own = TableRef(.inet, "le_redirect")
}

package struct ChainRef: Hashable, Sendable, Comparable, CustomStringConvertible {
    package var table: TableRef
    package var name: String

    package init(_ table: TableRef, _ name: String) {
        self.table = table
        self.name = name
    }

    package init(_ family: Family, _ table: String, _ name: String) {
        self.init(TableRef(family, table), name)
    }

    package var description: String { "\(table) \(name)" }

    package static func < (a: ChainRef, b: ChainRef) -> Bool {
        (a.table, a.name) < (b.table, b.name)
    }
}

/// A rule in the kernel: the chain it lives in and its kernel-assigned handle.
package struct RuleLocation: Hashable, Sendable, CustomStringConvertible {
    package var chain: ChainRef
    package var handle: UInt64

    package init(_ chain: ChainRef, handle: UInt64) {
        self.chain = chain
        self.handle = handle
    }

    package var description: String { "\(chain) handle \(handle)" }
}

/// The netfilter hooks a base chain can attach to.
package enum Hook: String, Sendable, Hashable {
    case prerouting, input, forward, output, postrouting, ingress, egress
}

package enum ChainPolicy: String, Sendable, Hashable {
    case accept, drop
}

/// A table as the kernel lists it (without its contents).
package struct HostTable: Hashable, Sendable {
    package var ref: TableRef
    /// True when another netlink socket owns the table: only that socket may change it.
    package var ownedByAnotherProcess: Bool

    package init(_ ref: TableRef, ownedByAnotherProcess: Bool = false) {
        self.ref = ref
        self.ownedByAnotherProcess = ownedByAnotherProcess
    }
}

/// A chain as the kernel lists it (without its rules). Base chains have a hook.
package struct HostChain: Hashable, Sendable {
    package var ref: ChainRef
    package var hook: Hook?
    package var type: String?
    package var priority: Int32?
    package var policy: ChainPolicy?
    /// How many rules it holds, when the backend read them anyway (x_tables reads whole tables).
    package var rules: Int?

    package init(
        _ ref: ChainRef, hook: Hook? = nil, type: String? = nil, priority: Int32? = nil, policy: ChainPolicy? = nil,
        rules: Int? = nil
    ) {
        self.ref = ref
        self.hook = hook
        self.type = type
        self.priority = priority
        self.policy = policy
        self.rules = rules
    }
}

/// What le-redirect reads before it plans: the ruleset generation and the tables and chains, never
/// their rules (reading is then as fast with 100,000 host rules as with none).
package struct FirewallSnapshot: Hashable, Sendable {
    /// nf_tables' ruleset generation; x_tables has none (0).
    package var generation: UInt32
    package var tables: [HostTable]
    package var chains: [HostChain]
    /// The families this system can hold tables of here: x_tables' ip6 half may be missing.
    package var families: Set<Family>
    /// Whether the kernel deletes a table owned by a netlink socket when the socket closes
    /// (nf_tables, Linux 5.12 and newer).
    package var ownedTables: Bool

    package init(
        generation: UInt32, tables: [HostTable], chains: [HostChain], families: Set<Family> = [.ip, .ip6, .inet],
        ownedTables: Bool = true
    ) {
        self.generation = generation
        self.tables = tables
        self.chains = chains
        self.families = families
        self.ownedTables = ownedTables
    }

    package func chains(of table: TableRef) -> [HostChain] { chains.filter { $0.ref.table == table } }
}

/// The rules le-redirect inserts, all tagged with the comment "LE": the steering (nftables and
/// x_tables forms), which assigns a new connection to the proxy's transparent listener without
/// rewriting a byte of it, so the packet keeps its destination port and the host's own input rules
/// decide whether it is let in; and, on hosts with nat of their own, the identity binding that keeps
/// the host's nat from taking steered SYNs away (both forms).
package enum RuleSpec: Hashable, Sendable, CustomStringConvertible {
    /// In our own nftables prerouting chain: the SYN of a new TCP connection to a local address
    /// (to `address` only, when given: `--address`), not arriving on loopback, whose destination
    /// port is in `set`, goes to the listener on `proxyPort` (`tproxy`).
    case steer(set: String, proxyPort: UInt16, address: IPAddress? = nil)
    /// In x_tables' mangle PREROUTING (which no process can own): the same for `port`, until
    /// `until` (Unix seconds, UTC), after which the kernel's time match stops matching, whether or
    /// not anyone is left to remove the rule.
    case expiringSteer(port: UInt16, proxyPort: UInt16, until: Int64, address: IPAddress? = nil)
    /// At the head of an x_tables nat PREROUTING, on the legacy path of a host with nat of its own:
    /// the SYNs the steering takes (until `until`) are accepted there, so that the host's DNAT
    /// rules after it (Docker's published ports) leave them alone (the kernel gives them a null
    /// binding). Nothing of the packet changes, and no filter decision is made.
    case expiringKeepDestination(port: UInt16, until: Int64, address: IPAddress? = nil)
    /// In our own nftables nat prerouting chain, on a host with nat of its own: the same SYNs (of
    /// `family`, ip or ip6) get an identity DNAT (to their own destination), so that the host's
    /// later nat chains skip them; nothing of the packet changes.
    case keepDestination(set: String, family: Family, address: IPAddress? = nil)
    /// In our own nftables postrouting chain (--include-local), after the host's output and
    /// postrouting chains: the SYN of a new TCP connection of this host's own to a local address
    /// (`address` only, when given) on a port in `set`, from a socket of any user but `exemptUID`
    /// (the built-in proxy's, whose connections to the app must reach the app), gets bit `mark` of
    /// its packet mark, by which the steering knows it when it comes back in on lo.
    case markLocal(set: String, exemptUID: UInt32, mark: UInt32, address: IPAddress? = nil)
    /// After it: the proxy's own SYNs to the port never carry the bit, whatever a rule of the
    /// host's set (it would steer the proxy's connection to the app back to the proxy).
    case unmarkProxy(set: String, uid: UInt32, mark: UInt32)
    /// In our prerouting chain for lo, before the host's raw chains: such a SYN, in on lo with the
    /// bit set, has the bit cleared again (every chain of the host's sees the mark it had) and goes
    /// to the listener on `proxyPort`.
    case steerLocal(set: String, proxyPort: UInt16, mark: UInt32, address: IPAddress? = nil)
    /// After it: a SYN in on lo that still carries the bit (its port left the set meanwhile, or it
    /// is not to a named address) has it cleared.
    case clearLocal(mark: UInt32)

    /// The destination address it is limited to, if any.
    package var address: IPAddress? {
        switch self {
        case .steer(_, _, let a), .expiringSteer(_, _, _, let a), .expiringKeepDestination(_, _, let a), .keepDestination(_, _, let a),
            .markLocal(_, _, _, let a), .steerLocal(_, _, _, let a):
            a
        case .unmarkProxy, .clearLocal: nil
        }
    }

    package var description: String {
        // As nft and iptables-save print a destination address.
        let nftAddress = address.map { "\($0.family) daddr \($0) " } ?? ""
        let xtAddress = address.map { "-d \($0)/\($0.family == .ip ? 32 : 128) " } ?? ""
        switch self {
        case .expiringKeepDestination(let port, let until, _):
            return xtAddress + "! -i lo -p tcp -m tcp --dport \(port) --tcp-flags FIN,SYN,RST,ACK SYN -m addrtype --dst-type LOCAL -m time --datestop "
                + "\(RFC3339.format(unixMilliseconds: until * 1000).dropLast()) -m comment --comment LE -j ACCEPT"
        case .keepDestination(let set, let family, _):
            return (address == nil ? "meta nfproto \(family == .ip6 ? "ipv6" : "ipv4") " : "")
                + "iifname != \"lo\" fib daddr type local \(nftAddress)tcp dport @\(set) "
                + "tcp flags syn / fin,syn,rst,ack dnat \(family) to \(family) daddr comment \"LE\""
        case .markLocal(let set, let uid, let mark, _):
            return "meta skuid != \(uid) fib daddr type local \(nftAddress)tcp dport @\(set) tcp flags syn / fin,syn,rst,ack "
                + "meta mark set meta mark | \(Self.hex(mark)) comment \"LE\""
        case .unmarkProxy(let set, let uid, let mark):
            return "meta skuid \(uid) fib daddr type local tcp dport @\(set) tcp flags syn / fin,syn,rst,ack "
                + "meta mark set meta mark & \(Self.hex(~mark)) comment \"LE\""
        case .clearLocal(let mark):
            return "iifname \"lo\" meta mark & \(Self.hex(mark)) == \(Self.hex(mark)) tcp flags syn / fin,syn,rst,ack "
                + "meta mark set meta mark & \(Self.hex(~mark)) comment \"LE\""
        case .steerLocal(let set, let proxyPort, let mark, _):
            return "iifname \"lo\" meta mark & \(Self.hex(mark)) == \(Self.hex(mark)) fib daddr type local \(nftAddress)tcp dport @\(set) "
                + "tcp flags syn / fin,syn,rst,ack meta mark set meta mark & \(Self.hex(~mark)) tproxy to :\(proxyPort) counter comment \"LE\""
        case .steer(let set, let proxyPort, _):
            return "iifname != \"lo\" fib daddr type local \(nftAddress)tcp dport @\(set) tcp flags syn / fin,syn,rst,ack tproxy to :\(proxyPort) counter comment \"LE\""
        case .expiringSteer(let port, let proxyPort, let until, let address):
            // --datestop as iptables-save prints it: UTC, without the "Z".
            return xtAddress + "! -i lo -p tcp -m tcp --dport \(port) --tcp-flags FIN,SYN,RST,ACK SYN -m addrtype --dst-type LOCAL -m time --datestop "
                + "\(RFC3339.format(unixMilliseconds: until * 1000).dropLast()) "
                + "-m comment --comment LE -j TPROXY --on-port \(proxyPort) --on-ip \(address?.family == .ip6 ? "::" : "0.0.0.0") --tproxy-mark 0x0/0x0"
        }
    }

    /// A mark as nft prints it.
    static func hex(_ value: UInt32) -> String { "0x" + Hex.format(value, width: 8) }

    /// What the journal records it as.
    package var kind: RuleKind { .redirect }

    /// Whether it goes at the end of its chain rather than the head: x_tables' TPROXY ends a
    /// packet's walk through mangle PREROUTING, so the host's own rules there (an ipset blocklist,
    /// a MARK for policy routing) must see the SYN first.
    package var appendsToChain: Bool {
        if case .expiringSteer = self { return true }
        return false
    }
}

/// The jobs a rule of le-redirect's does, as a journal records them.
package enum RuleKind: String, Sendable, Hashable {
    /// Steering new connections to the proxy (before: rewriting them to the proxy port).
    case redirect
    /// A scoped accept in a host input chain: only journals of versions that rewrote connections
    /// list them (recover still removes them, by the fingerprint recorded).
    case accept
}

/// The comment every rule le-redirect inserts carries.
package let ruleTag = "LE"

/// One change inside an atomic transaction.
package enum FirewallChange: Hashable, Sendable, CustomStringConvertible {
    /// Creates a table owned by the committing socket: the kernel deletes it when the socket closes.
    case addOwnedTable(TableRef)
    /// Creates a set of TCP ports whose elements expire after `timeout`.
    case addPortSet(table: TableRef, name: String, ports: [UInt16], timeout: Duration)
    /// Creates a base chain of `type` ("filter" or "nat") on `hook`, policy accept.
    case addBaseChain(ChainRef, type: String, hook: Hook, priority: Int32)
    /// Adds one port to an existing port set, expiring after `timeout` (arming the redirect).
    case addSetElement(table: TableRef, set: String, port: UInt16, timeout: Duration)
    /// Takes one port out of a port set (disarming the redirect).
    case deleteSetElement(table: TableRef, set: String, port: UInt16)
    /// Inserts a rule at the head of the chain (at its end where `spec.appendsToChain`); the commit
    /// reports its handle.
    case insertRule(ChainRef, RuleSpec)
    case deleteTable(TableRef)
    case deleteRule(RuleLocation)
    /// Deletes `count` rules of `chain` whose fingerprint is `fingerprint`: how rules are removed
    /// where they have no handles (x_tables).
    case deleteMatching(ChainRef, RuleFingerprint, count: Int)

    /// The table it changes.
    package var table: TableRef {
        switch self {
        case .addOwnedTable(let t), .addPortSet(let t, _, _, _), .addSetElement(let t, _, _, _),
            .deleteSetElement(let t, _, _), .deleteTable(let t):
            t
        case .addBaseChain(let c, _, _, _), .insertRule(let c, _), .deleteMatching(let c, _, _): c.table
        case .deleteRule(let l): l.chain.table
        }
    }

    package var description: String {
        switch self {
        case .addOwnedTable(let t): "add table \(t) (owner)"
        case .addPortSet(let t, let name, let ports, let timeout):
            "add set \(t) \(name) { \(ports.map(String.init).joined(separator: ", ")) timeout \(DurationText.format(timeout)) }"
        case .addBaseChain(let c, let type, let hook, let priority): "add chain \(c) (\(type) \(hook) priority \(priority))"
        case .addSetElement(let t, let set, let port, let timeout):
            "add element \(t) \(set) { \(port) timeout \(DurationText.format(timeout)) }"
        case .deleteSetElement(let t, let set, let port): "delete element \(t) \(set) { \(port) }"
        case .insertRule(let c, let spec): "\(spec.appendsToChain ? "append" : "insert") rule \(c) \(spec)"
        case .deleteTable(let t): "delete table \(t)"
        case .deleteRule(let location): "delete rule \(location)"
        case .deleteMatching(let c, let fingerprint, let count): "delete \(count) rule(s) \(fingerprint) from \(c)"
        }
    }
}

/// A rule the commit inserted, as the kernel reported it back.
package struct InsertedRule: Hashable, Sendable {
    package var chain: ChainRef
    /// The kernel-assigned handle; nil where rules have none (x_tables).
    package var handle: UInt64?
    package var fingerprint: RuleFingerprint

    package init(_ location: RuleLocation, fingerprint: RuleFingerprint) {
        self.init(location.chain, handle: location.handle, fingerprint: fingerprint)
    }

    package init(_ chain: ChainRef, handle: UInt64?, fingerprint: RuleFingerprint) {
        self.chain = chain
        self.handle = handle
        self.fingerprint = fingerprint
    }
}

/// Identifies a rule's content (its expressions and comment), not its place. Two rules with the
/// same fingerprint match the same packets and do the same thing.
package struct RuleFingerprint: Hashable, Sendable, CustomStringConvertible {
    package var value: UInt64

    package init(_ value: UInt64) { self.value = value }

    /// FNV-1a over the bytes of a canonical rendering of the rule.
    package init<S: Sequence>(hashing bytes: S) where S.Element == UInt8 {
        self.init(hashing: EmptyCollection<UInt8>(), then: bytes)
    }

    /// FNV-1a over `prefix`, then `bytes`.
    package init<P: Sequence, S: Sequence>(hashing prefix: P, then bytes: S) where P.Element == UInt8, S.Element == UInt8 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in prefix {
            hash ^= UInt64(byte)
            hash = hash &* 0x0000_0100_0000_01b3
        }
        for byte in bytes {
            hash ^= UInt64(byte)
            hash = hash &* 0x0000_0100_0000_01b3
        }
        value = hash
    }

    package var description: String { Hex.format(value, width: 16) }
}

/// A rule found in the kernel when le-redirect looks at one chain. Where rules have no handles
/// (x_tables), the location's handle is the rule's position in the chain, from 1.
package struct ObservedRule: Hashable, Sendable {
    package var location: RuleLocation
    package var fingerprint: RuleFingerprint
    package var comment: String?

    package init(_ location: RuleLocation, fingerprint: RuleFingerprint, comment: String?) {
        self.location = location
        self.fingerprint = fingerprint
        self.comment = comment
    }
}

package enum Hex {
    package static func format<T: BinaryInteger>(_ value: T, width: Int) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: max(0, width - digits.count)) + digits
    }
}
