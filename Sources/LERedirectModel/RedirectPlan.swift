/// What begin commits, worked out from what it read of each firewall system: where the redirect
/// lives, and a scoped accept at the head of every input filter chain of either system (an accept
/// in one table cannot override another table's drop, nor one system's accept the other's drop).
/// Pure: the same snapshots and options always give the same plan.
package struct RedirectPlan: Hashable, Sendable {
    package let port: UInt16
    package let proxyPort: UInt16
    package let ttl: Duration
    /// Unix milliseconds at which the redirect ends by itself.
    package let expiresAt: Int64
    /// False when the redirect is armed per challenge: the port set starts empty (nftables), or the
    /// redirect rules are inserted only with the first token (x_tables).
    package let armed: Bool
    /// The system that holds the redirect, and why.
    package let decision: BackendDecision
    package var nftables: NftablesPart?
    package let iptablesLegacy: LegacyPart?

    /// What goes into nftables: our owned table with the redirect (when nftables holds it) and the
    /// accepts, in one batch.
    package struct NftablesPart: Hashable, Sendable {
        /// The generation the part was made from; the batch is refused if the ruleset moved on.
        package let generation: UInt32
        /// Whether the batch creates our owned table with the port set, nat chain and redirect.
        package let holdsRedirect: Bool
        /// A leftover `inet le_redirect` that no live process owns (restored from a saved ruleset,
        /// say): the same batch deletes it before creating ours.
        package let replacesLeftoverTable: Bool
        /// The host's input base chains, in a stable order, each with the accept in the form its
        /// table needs.
        package let accepts: [PlannedRule]
    }

    /// What goes into x_tables: one commit per table.
    package struct LegacyPart: Hashable, Sendable {
        /// filter INPUT of each family whose filter table exists.
        package let accepts: [PlannedRule]
        /// nat PREROUTING of each family, when x_tables holds the redirect.
        package let redirects: [PlannedRule]
    }

    package struct PlannedRule: Hashable, Sendable {
        package let system: FirewallSystem
        package let chain: ChainRef
        package let spec: RuleSpec

        package init(_ system: FirewallSystem, _ chain: ChainRef, _ spec: RuleSpec) {
            self.system = system
            self.chain = chain
            self.spec = spec
        }
    }

    package static let setName = "ports"
    package static let natChain = ChainRef(TableRef.own, "prerouting")
    /// dstnat - 10: ahead of every nat prerouting chain a host usually has (dstnat = -100), x_tables'
    /// nat table included.
    package static let natPriority: Int32 = -110
    /// Families whose input hook sees traffic to local addresses.
    package static let inputFamilies: Set<Family> = [.ip, .ip6, .inet]

    /// The nftables-only plan (hosts and tests that have no x_tables).
    package static func make(_ options: ValidatedOptions, from snapshot: FirewallSnapshot, now: Int64 = 0)
        throws(LERedirectError) -> RedirectPlan
    {
        try make(options, nftables: snapshot, iptablesLegacy: nil, now: now)
    }

    package static func make(
        _ options: ValidatedOptions, nftables: FirewallSnapshot?, iptablesLegacy: FirewallSnapshot?,
        unavailable: [FirewallSystem: String] = [:], now: Int64
    ) throws(LERedirectError) -> RedirectPlan {
        let decision = try BackendDecision.make(
            options.backend, nftables: nftables, iptablesLegacy: iptablesLegacy, unavailable: unavailable)
        let expiresAt = now + options.ttl.milliseconds
        let accept = { (form: RuleForm) in RuleSpec.scopedAccept(proxyPort: options.proxyPort, originalPort: options.port, form: form) }
        var legacy: LegacyPart?
        if let snapshot = iptablesLegacy {
            let accepts = snapshot.tables.map(\.ref).filter { $0.name == "filter" }.sorted()
                .map { PlannedRule(.iptablesLegacy, ChainRef($0, "INPUT"), accept(.xtables)) }
            var redirects: [PlannedRule] = []
            if decision.redirect == .iptablesLegacy {
                // Whole seconds: the time match compares seconds, and stops matching after `until`.
                let until = expiresAt / 1000
                redirects = snapshot.families.sorted().map {
                    PlannedRule(
                        .iptablesLegacy, ChainRef($0, "nat", "PREROUTING"),
                        .expiringRedirect(port: options.port, proxyPort: options.proxyPort, until: until))
                }
            }
            legacy = LegacyPart(accepts: accepts, redirects: redirects)
        }
        return RedirectPlan(
            port: options.port, proxyPort: options.proxyPort, ttl: options.ttl, expiresAt: expiresAt,
            armed: !options.proxy.armsPerChallenge, decision: decision,
            nftables: try nftables.map { (s) throws(LERedirectError) in
                try nftablesPart(options, s, holdsRedirect: decision.redirect == .nftables)
            },
            iptablesLegacy: legacy)
    }

    /// The nftables part alone, from a fresh snapshot: begin plans it again when another program
    /// committed between its read and its batch.
    package static func nftablesPart(_ options: ValidatedOptions, _ snapshot: FirewallSnapshot, holdsRedirect: Bool)
        throws(LERedirectError) -> NftablesPart
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
        let xtables = Set(snapshot.iptablesNftTables)
        return NftablesPart(
            generation: snapshot.generation, holdsRedirect: holdsRedirect, replacesLeftoverTable: leftover,
            accepts: inputChains.map(\.ref).sorted().map {
                PlannedRule(
                    .nftables, $0,
                    .scopedAccept(
                        proxyPort: options.proxyPort, originalPort: options.port,
                        form: xtables.contains($0.table) ? .xtables : .native))
            })
    }

    package var redirectRule: RuleSpec { .redirect(set: Self.setName, proxyPort: proxyPort) }

    /// Every rule the session inserts into chains it does not own, in commit order: the journal's
    /// entries.
    package var rules: [PlannedRule] {
        (iptablesLegacy?.accepts ?? []) + (nftables?.accepts ?? []) + (iptablesLegacy?.redirects ?? [])
    }

    /// One atomic commit of begin.
    package struct Step: Hashable, Sendable, CustomStringConvertible {
        package let system: FirewallSystem
        /// The x_tables table it replaces; nil for an nftables batch.
        package let table: TableRef?
        package let changes: [FirewallChange]
        /// Indices into `rules` of what it inserts, in order (after the redirect an nftables batch
        /// inserts first, when it holds it).
        package let entries: [Int]

        package var description: String { table.map { "\(system) \($0)" } ?? "\(system) batch" }
    }

    /// Begin's commits, in order: x_tables accepts (a table each), the nftables batch, x_tables
    /// redirects (a table each, only when armed). Accepts go in before the redirect that needs them.
    package var installSteps: [Step] {
        legacyAcceptSteps + (nftablesStep.map { [$0] } ?? []) + (armed ? legacyRedirectSteps : [])
    }

    package var legacyAcceptSteps: [Step] { legacySteps(iptablesLegacy?.accepts ?? []) }

    /// One per nat table, whether or not begin commits them (armed per challenge, it does not).
    package var legacyRedirectSteps: [Step] { legacySteps(iptablesLegacy?.redirects ?? []) }

    package var nftablesStep: Step? {
        guard let nft = nftables, nft.holdsRedirect || !nft.accepts.isEmpty else { return nil }
        var changes: [FirewallChange] = []
        if nft.holdsRedirect {
            if nft.replacesLeftoverTable { changes.append(.deleteTable(TableRef.own)) }
            changes += [
                .addOwnedTable(TableRef.own),
                .addPortSet(table: TableRef.own, name: Self.setName, ports: armed ? [port] : [], timeout: ttl),
                .addNATChain(Self.natChain, hook: .prerouting, priority: Self.natPriority),
                .insertRule(Self.natChain, redirectRule),
            ]
        }
        changes += nft.accepts.map { .insertRule($0.chain, $0.spec) }
        let all = rules
        return Step(system: .nftables, table: nil, changes: changes, entries: all.indices.filter { all[$0].system == .nftables })
    }

    private func legacySteps(_ planned: [PlannedRule]) -> [Step] {
        let all = rules
        return Set(planned.map(\.chain.table)).sorted().map { table in
            let indices = all.indices.filter { all[$0].chain.table == table && planned.contains(all[$0]) }
            return Step(
                system: .iptablesLegacy, table: table, changes: indices.map { .insertRule(all[$0].chain, all[$0].spec) },
                entries: indices)
        }
    }

    /// Arms the nftables redirect until `remaining` (the rest of the TTL) passes.
    package static func armChanges(port: UInt16, remaining: Duration) -> [FirewallChange] {
        [.addSetElement(table: TableRef.own, set: setName, port: port, timeout: remaining)]
    }

    /// Disarms it: new connections reach the app directly; the session stays.
    package static func disarmChanges(port: UInt16) -> [FirewallChange] {
        [.deleteSetElement(table: TableRef.own, set: setName, port: port)]
    }

    /// End's batch after the drain: the whole owned table.
    package static var removeRedirectChanges: [FirewallChange] { [.deleteTable(TableRef.own)] }

    /// Exactly the nftables accepts begin inserted (and that still exist).
    package static func removeAcceptChanges(_ rules: [RuleLocation]) -> [FirewallChange] {
        rules.map { .deleteRule($0) }
    }
}

/// A system a host's firewall can be held in, as `detect` names them.
package enum HostFirewallKind: String, Sendable, Hashable, CaseIterable {
    /// nftables tables written for nft.
    case nftables
    /// nftables tables that iptables-nft manages (x_tables names and chains).
    case iptablesNft = "iptables-nft"
    case iptablesLegacy = "iptables-legacy"
}

/// Which system holds the redirect, and why; begin follows it and detect prints it.
package struct BackendDecision: Hashable, Sendable {
    package let redirect: FirewallSystem
    /// The systems that hold the host's firewall (tables with rules or a drop policy).
    package let firewall: [HostFirewallKind]
    /// Why, one sentence each.
    package let reasons: [String]

    package static func make(
        _ choice: BackendChoice, nftables: FirewallSnapshot?, iptablesLegacy: FirewallSnapshot?,
        unavailable: [FirewallSystem: String] = [:]
    ) throws(LERedirectError) -> BackendDecision {
        let firewall = hostFirewall(nftables: nftables, iptablesLegacy: iptablesLegacy)
        let legacyHolds = firewall.contains(.iptablesLegacy)

        // Why each system can or cannot hold the redirect.
        var nftablesProblem: String?
        if nftables == nil {
            nftablesProblem = "nftables cannot be used here (\(unavailable[.nftables] ?? "not available"))"
        } else if nftables?.ownedTables == false {
            nftablesProblem = "this kernel cannot give a table to a process (owned tables need Linux 5.12 or newer)"
        }
        var legacyProblem: String?
        if let iptablesLegacy {
            let missing = iptablesLegacy.families.sorted().filter { !iptablesLegacy.tables.map(\.ref).contains(TableRef($0, "nat")) }
            if !missing.isEmpty {
                legacyProblem =
                    "iptables-legacy has no nat table for \(missing.map { $0 == .ip ? "IPv4" : "IPv6" }.joined(separator: " and ")) "
                    + "in this network namespace, and an x_tables table cannot be deleted once made, so le-redirect "
                    + "does not make one (`\(missing.map { $0 == .ip ? "iptables-legacy" : "ip6tables-legacy" }.joined(separator: "` and `")) "
                    + "-t nat -L` would)"
            }
        } else {
            legacyProblem = "iptables-legacy cannot be used here (\(unavailable[.iptablesLegacy] ?? "not available"))"
        }

        let held = firewall.isEmpty ? "no firewall tables" : firewall.map(\.rawValue).joined(separator: " and ")
        switch choice {
        case .nftables:
            if let nftablesProblem {
                throw LERedirectError(.unsupported, "--backend nftables: \(nftablesProblem). Nothing was changed")
            }
            return BackendDecision(redirect: .nftables, firewall: firewall, reasons: ["--backend nftables was given"])
        case .iptablesLegacy:
            if let legacyProblem {
                throw LERedirectError(.unsupported, "--backend iptables-legacy: \(legacyProblem). Nothing was changed")
            }
            return BackendDecision(
                redirect: .iptablesLegacy, firewall: firewall,
                reasons: ["--backend iptables-legacy was given", Self.legacyTTLNote])
        case .auto:
            if legacyHolds && !firewall.contains(.nftables) && !firewall.contains(.iptablesNft) && legacyProblem == nil {
                return BackendDecision(
                    redirect: .iptablesLegacy, firewall: firewall,
                    reasons: [
                        "the host's firewall is in iptables-legacy only: the redirect goes where iptables-legacy-save lists it",
                        Self.legacyTTLNote,
                    ])
            }
            if nftablesProblem == nil {
                var reasons = ["the host holds \(held)"]
                if legacyHolds, let legacyProblem {
                    reasons.append("\(legacyProblem): the redirect goes into nftables instead")
                } else if legacyHolds {
                    reasons.append("nftables holds part of the firewall, and its owned table runs before x_tables' nat")
                }
                reasons.append("the redirect lives in table \(TableRef.own), owned by the session: the kernel deletes it the moment the session's process dies")
                return BackendDecision(redirect: .nftables, firewall: firewall, reasons: reasons)
            }
            if legacyProblem == nil {
                return BackendDecision(
                    redirect: .iptablesLegacy, firewall: firewall,
                    reasons: ["the host holds \(held)", "\(nftablesProblem!): the redirect goes into iptables-legacy", Self.legacyTTLNote])
            }
            throw LERedirectError(
                .unsupported,
                "no firewall system here can hold the redirect: \(nftablesProblem!); \(legacyProblem!). Nothing was changed")
        }
    }

    /// The systems that hold the host's firewall: nftables tables other than ours (written for nft,
    /// or laid out by iptables-nft), and x_tables tables with rules or a drop policy.
    package static func hostFirewall(nftables: FirewallSnapshot?, iptablesLegacy: FirewallSnapshot?) -> [HostFirewallKind] {
        var kinds: [HostFirewallKind] = []
        if let nftables {
            let xtables = Set(nftables.iptablesNftTables)
            let tables = nftables.tables.map(\.ref).filter { $0 != TableRef.own }
            if tables.contains(where: { !xtables.contains($0) }) { kinds.append(.nftables) }
            if !xtables.isEmpty { kinds.append(.iptablesNft) }
        }
        if iptablesLegacy?.holdsFirewall == true { kinds.append(.iptablesLegacy) }
        return kinds
    }

    private static let legacyTTLNote =
        "x_tables has no owned tables: if the session dies, its time match ends the redirect at the TTL, "
        + "and recover (or the next begin or end) removes it"
}

extension FirewallSnapshot {
    /// The tables x_tables' names give to iptables-nft's: an ip or ip6 table named filter, nat,
    /// mangle, raw or security whose base chains all carry iptables' built-in names for their hooks.
    /// A table written that way with nft is taken for one too: iptables' form of the accept is read
    /// by both tools, nft's would make `iptables-nft-save` refuse the table.
    package var iptablesNftTables: [TableRef] {
        let names: Set<String> = ["filter", "nat", "mangle", "raw", "security"]
        return tables.map(\.ref).filter { table in
            guard table.family != .inet, names.contains(table.name) else { return false }
            let base = chains(of: table).filter { $0.hook != nil }
            return !base.isEmpty && base.allSatisfy { $0.ref.name == $0.hook!.rawValue.uppercased() }
        }
    }

    /// Whether any chain holds a rule or drops by default (a table can exist, empty and accepting,
    /// only because something once read it).
    package var holdsFirewall: Bool {
        chains.contains { ($0.rules ?? 0) > 0 || $0.policy == .drop }
    }
}
