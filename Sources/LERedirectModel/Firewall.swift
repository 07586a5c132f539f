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
///
/// An owned table lives as long as the connection that created it; closing the connection (or the
/// death of its process) makes the kernel delete it.
package protocol Firewall: AnyObject {
    /// "nftables" or "iptables-legacy", as recorded in the journal.
    var backendName: String { get }

    /// The generation, tables and chains; never rules.
    func snapshot() throws(FirewallError) -> FirewallSnapshot

    /// Applies `changes` atomically. With `generation`, refuses with `.generationChanged` when the
    /// ruleset changed since that snapshot. Returns each inserted rule, in order.
    func commit(_ changes: [FirewallChange], expecting generation: UInt32?) throws(FirewallError) -> [InsertedRule]

    /// The fingerprint the kernel will report for `spec` inserted into a chain of `family`.
    func fingerprint(of spec: RuleSpec, family: Family) -> RuleFingerprint

    /// The rule at `location`, or nil when it, its chain or its table no longer exists.
    func rule(at location: RuleLocation) throws(FirewallError) -> ObservedRule?

    /// Every rule of one chain (crash recovery and sweep only); empty when the chain is gone.
    func rules(in chain: ChainRef) throws(FirewallError) -> [ObservedRule]

    /// Packets the redirect rule has sent to the proxy port, or nil when it does not exist.
    func redirectedPackets() throws(FirewallError) -> UInt64?

    /// Closes the connection; owned tables die with it.
    func close()
}
