/// Why a firewall operation failed, in the backend's terms. The session layer turns it into a
/// `LERedirectError` that says what the session was doing.
package struct FirewallError: Error, Sendable, Hashable, CustomStringConvertible {
    package enum Reason: Sendable, Hashable {
        /// Someone else committed since our snapshot; rebuild the change from fresh state and retry.
        case generationChanged
        /// A table, chain or rule the change names does not exist.
        case notFound
        case alreadyExists
        /// No root / CAP_NET_ADMIN, or the object is owned by another process.
        case notPermitted
        /// The kernel lacks a feature (nf_tables itself, or an expression's module).
        case unsupported
        /// The batch was sent but its replies were lost: it may or may not have been applied.
        case outcomeUnknown
        case other
    }

    package var reason: Reason
    /// What the backend was doing, e.g. "inserting the scoped accept into ip filter input".
    package var doing: String
    package var detail: String
    package var errno: Int32?

    package init(_ reason: Reason, doing: String, detail: String, errno: Int32? = nil) {
        self.reason = reason
        self.doing = doing
        self.detail = detail
        self.errno = errno
    }

    package var description: String { "\(doing): \(detail)" }
}

/// A connection to one firewall system of one network namespace. Every change goes through
/// `commit`, which applies all of its changes or none: that is the backend's one place of atomicity.
/// nftables commits one batch across any tables; x_tables replaces one table per commit, so its
/// commits each touch one table.
///
/// An owned table lives as long as the connection that created it; closing the connection (or the
/// death of its process) makes the kernel delete it.
package protocol Firewall: AnyObject {
    /// Which system this connection changes; the journal records it with every rule.
    var system: FirewallSystem { get }

    /// The generation (nftables), tables and chains; never rules, except where the kernel hands out
    /// whole tables anyway (x_tables), which count theirs.
    func snapshot() throws(FirewallError) -> FirewallSnapshot

    /// Applies `changes` atomically. With `generation`, refuses with `.generationChanged` when the
    /// ruleset changed since that snapshot (nftables; x_tables has no generation). Returns each
    /// inserted rule, in order.
    func commit(_ changes: [FirewallChange], expecting generation: UInt32?) throws(FirewallError) -> [InsertedRule]

    /// The tables that exist, without reading anything in them (x_tables: its table-name lists;
    /// reading a table's rules takes time in proportion to them).
    func tableList() throws(FirewallError) -> [TableRef]

    /// The fingerprint the kernel will report for `spec` inserted into a chain of `family`.
    func fingerprint(of spec: RuleSpec, family: Family) -> RuleFingerprint

    /// The rule at `location`, or nil when it, its chain or its table no longer exists.
    func rule(at location: RuleLocation) throws(FirewallError) -> ObservedRule?

    /// Every rule of one chain; empty when the chain is gone.
    func rules(in chain: ChainRef) throws(FirewallError) -> [ObservedRule]

    /// Packets the redirect has sent to the proxy port, or nil when there is no redirect.
    func redirectedPackets() throws(FirewallError) -> UInt64?

    /// Runs `body` while other programs that follow this system's convention are kept from changing
    /// it (the xtables lock, which iptables takes too), so that what `body` reads still holds when it
    /// commits. nftables needs no lock: its batches are refused when the generation moved.
    func exclusively<T>(_ body: () throws(LERedirectError) -> T) throws(LERedirectError) -> T

    /// Closes the connection; owned tables die with it.
    func close()
}

extension Firewall {
    /// Whether the kernel gives rules handles; without them rules are found and removed by content.
    package var rulesHaveHandles: Bool { system == .nftables }
}

/// The connections a session works with: at most one per system, each present when that system
/// can be read here.
package struct Firewalls {
    package var nftables: (any Firewall)?
    package var iptablesLegacy: (any Firewall)?
    /// Why a system could not be opened, for the messages that need it.
    package var unavailable: [FirewallSystem: String]

    package init(_ connections: [any Firewall], unavailable: [FirewallSystem: String] = [:]) {
        self.unavailable = unavailable
        for connection in connections {
            switch connection.system {
            case .nftables: nftables = connection
            case .iptablesLegacy: iptablesLegacy = connection
            }
        }
    }

    package subscript(system: FirewallSystem) -> (any Firewall)? {
        switch system {
        case .nftables: nftables
        case .iptablesLegacy: iptablesLegacy
        }
    }

    package var all: [any Firewall] { [nftables, iptablesLegacy].compactMap { $0 } }

    package func close() {
        for connection in all { connection.close() }
    }
}
