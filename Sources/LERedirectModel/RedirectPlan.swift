/// What begin commits, worked out from a snapshot of the host's tables and chains: our owned table
/// with its port set and nat chain, the redirect, and a scoped accept at the head of every input
/// base chain of the host. Pure: the same snapshot and options always give the same plan.
package struct RedirectPlan: Hashable, Sendable {
    package let port: UInt16
    package let proxyPort: UInt16
    package let ttl: Duration
    /// The generation the plan was made from; the commit is refused if the ruleset moved on.
    package let generation: UInt32
    /// Host input base chains that get the scoped accept, in a stable order.
    package let acceptChains: [ChainRef]
    /// A leftover `inet le_redirect` that no live process owns (restored from a saved ruleset, say):
    /// the same batch deletes it before creating ours.
    package let replacesLeftoverTable: Bool
    /// False when the redirect is armed per challenge: the port set starts empty.
    package let armed: Bool

    package static let setName = "ports"
    package static let natChain = ChainRef(TableRef.own, "prerouting")
    /// dstnat - 10: ahead of every nat prerouting chain a host usually has (dstnat = -100).
    package static let natPriority: Int32 = -110
    /// Families whose input hook sees traffic to local addresses.
    package static let inputFamilies: Set<Family> = [.ip, .ip6, .inet]

    package static func make(_ options: ValidatedOptions, from snapshot: FirewallSnapshot) throws(LERedirectError)
        -> RedirectPlan
    {
        var leftover = false
        if let own = snapshot.tables.first(where: { $0.ref == TableRef.own }) {
            if own.ownedByAnotherProcess {
                throw LERedirectError(
                    .conflict,
                    "table \(TableRef.own) already exists and is owned by another process: another le-redirect "
                        + "session is active in this network namespace (with another state directory?); "
                        + "end it first")
            }
            leftover = true
        }
        let inputChains = snapshot.chains.filter {
            $0.hook == .input && inputFamilies.contains($0.ref.table.family) && $0.ref.table != TableRef.own
        }
        let ownedElsewhere = Set(snapshot.tables.filter(\.ownedByAnotherProcess).map(\.ref))
        let blocked = inputChains.filter { ownedElsewhere.contains($0.ref.table) }
        if !blocked.isEmpty {
            throw LERedirectError(
                .conflict,
                "cannot add the scoped accept to \(blocked.map { "'\($0.ref)'" }.joined(separator: ", ")): "
                    + "the table is owned by another process, so only that process may change it; "
                    + "allow TCP port \(options.proxyPort) for connections DNAT'ed from port \(options.port) there")
        }
        return RedirectPlan(
            port: options.port, proxyPort: options.proxyPort, ttl: options.ttl, generation: snapshot.generation,
            acceptChains: inputChains.map(\.ref).sorted(), replacesLeftoverTable: leftover,
            armed: !options.proxy.armsPerChallenge)
    }

    package var redirectRule: RuleSpec { .redirect(set: Self.setName, proxyPort: proxyPort) }
    package var acceptRule: RuleSpec { .scopedAccept(proxyPort: proxyPort, originalPort: port) }

    /// Begin's one batch. The accepts come last so that the commit's inserted rules are: the
    /// redirect, then one accept per entry of `acceptChains`, in order.
    package var installChanges: [FirewallChange] {
        var changes: [FirewallChange] = []
        if replacesLeftoverTable { changes.append(.deleteTable(TableRef.own)) }
        changes += [
            .addOwnedTable(TableRef.own),
            .addPortSet(table: TableRef.own, name: Self.setName, ports: armed ? [port] : [], timeout: ttl),
            .addNATChain(Self.natChain, hook: .prerouting, priority: Self.natPriority),
            .insertRule(Self.natChain, redirectRule),
        ]
        changes += acceptChains.map { .insertRule($0, acceptRule) }
        return changes
    }

    /// Arms the redirect until `remaining` (the rest of the TTL) passes.
    package static func armChanges(port: UInt16, remaining: Duration) -> [FirewallChange] {
        [.addSetElement(table: TableRef.own, set: setName, port: port, timeout: remaining)]
    }

    /// Disarms it: new connections reach the app directly; the session stays.
    package static func disarmChanges(port: UInt16) -> [FirewallChange] {
        [.deleteSetElement(table: TableRef.own, set: setName, port: port)]
    }

    /// End's first batch: the whole owned table, so new connections reach the app directly.
    package static var removeRedirectChanges: [FirewallChange] { [.deleteTable(TableRef.own)] }

    /// End's last batch: exactly the accepts begin inserted (and that still exist).
    package static func removeAcceptChanges(_ rules: [RuleLocation]) -> [FirewallChange] {
        rules.map { .deleteRule($0) }
    }
}
