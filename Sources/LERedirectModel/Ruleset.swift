/// The nftables address families le-redirect reads and writes.
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

    package init(
        _ ref: ChainRef, hook: Hook? = nil, type: String? = nil, priority: Int32? = nil, policy: ChainPolicy? = nil
    ) {
        self.ref = ref
        self.hook = hook
        self.type = type
        self.priority = priority
        self.policy = policy
    }
}

/// What le-redirect reads before it plans: the ruleset generation and the tables and chains, never
/// their rules (reading is then as fast with 100,000 host rules as with none).
package struct FirewallSnapshot: Hashable, Sendable {
    package var generation: UInt32
    package var tables: [HostTable]
    package var chains: [HostChain]

    package init(generation: UInt32, tables: [HostTable], chains: [HostChain]) {
        self.generation = generation
        self.tables = tables
        self.chains = chains
    }
}

/// The two kinds of rule le-redirect inserts, both tagged with the comment "LE".
package enum RuleSpec: Hashable, Sendable, CustomStringConvertible {
    /// In our own nat prerouting chain: new TCP connections to local addresses whose destination
    /// port is in `set` go to `proxyPort`.
    case redirect(set: String, proxyPort: UInt16)
    /// At the head of a host input chain: accept what our redirect sent to the proxy port, and
    /// nothing else (`tcp dport <proxy> ct status dnat ct original proto-dst <port> accept`).
    case scopedAccept(proxyPort: UInt16, originalPort: UInt16)

    package var description: String {
        switch self {
        case .redirect(let set, let proxyPort):
            "fib daddr type local tcp dport @\(set) counter redirect to :\(proxyPort) comment \"LE\""
        case .scopedAccept(let proxyPort, let originalPort):
            "tcp dport \(proxyPort) ct status dnat ct original proto-dst \(originalPort) accept comment \"LE\""
        }
    }
}

/// The comment every rule le-redirect inserts carries.
package let ruleTag = "LE"

/// One change inside an atomic transaction.
package enum FirewallChange: Hashable, Sendable, CustomStringConvertible {
    /// Creates a table owned by the committing socket: the kernel deletes it when the socket closes.
    case addOwnedTable(TableRef)
    /// Creates a set of TCP ports whose elements expire after `timeout`.
    case addPortSet(table: TableRef, name: String, ports: [UInt16], timeout: Duration)
    case addNATChain(ChainRef, hook: Hook, priority: Int32)
    /// Adds one port to an existing port set, expiring after `timeout` (arming the redirect).
    case addSetElement(table: TableRef, set: String, port: UInt16, timeout: Duration)
    /// Takes one port out of a port set (disarming the redirect).
    case deleteSetElement(table: TableRef, set: String, port: UInt16)
    /// Inserts a rule at the head of the chain; the commit reports its handle.
    case insertRule(ChainRef, RuleSpec)
    case deleteTable(TableRef)
    case deleteRule(RuleLocation)

    package var description: String {
        switch self {
        case .addOwnedTable(let t): "add table \(t) (owner)"
        case .addPortSet(let t, let name, let ports, let timeout):
            "add set \(t) \(name) { \(ports.map(String.init).joined(separator: ", ")) timeout \(DurationText.format(timeout)) }"
        case .addNATChain(let c, let hook, let priority): "add chain \(c) (nat \(hook) priority \(priority))"
        case .addSetElement(let t, let set, let port, let timeout):
            "add element \(t) \(set) { \(port) timeout \(DurationText.format(timeout)) }"
        case .deleteSetElement(let t, let set, let port): "delete element \(t) \(set) { \(port) }"
        case .insertRule(let c, let spec): "insert rule \(c) \(spec)"
        case .deleteTable(let t): "delete table \(t)"
        case .deleteRule(let location): "delete rule \(location)"
        }
    }
}

/// A rule the commit inserted, as the kernel reported it back.
package struct InsertedRule: Hashable, Sendable {
    package var location: RuleLocation
    package var fingerprint: RuleFingerprint

    package init(_ location: RuleLocation, fingerprint: RuleFingerprint) {
        self.location = location
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
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in bytes {
            hash ^= UInt64(byte)
            hash = hash &* 0x0000_0100_0000_01b3
        }
        value = hash
    }

    package var description: String { Hex.format(value, width: 16) }
}

/// A rule found in the kernel when le-redirect looks at one chain.
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
