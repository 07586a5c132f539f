/// What `le-redirect detect` found in each firewall system, which system holds the host's firewall,
/// and what begin would do there (or why it would refuse).
package struct DetectionReport: Sendable {
    package var nftables: FirewallSnapshot?
    package var iptablesLegacy: FirewallSnapshot?
    package var unavailable: [FirewallSystem: String]
    package var kernel: KernelSupport
    package var plan: Result<RedirectPlan, LERedirectError>
    /// Why begin would refuse the plan on this host (RedirectPlan.refusal), if it would.
    package var refusal: LERedirectError?

    package init(
        _ options: ValidatedOptions, nftables: FirewallSnapshot?, iptablesLegacy: FirewallSnapshot?,
        unavailable: [FirewallSystem: String], kernel: KernelSupport = KernelSupport(), now: Int64
    ) {
        self.nftables = nftables
        self.iptablesLegacy = iptablesLegacy
        self.unavailable = unavailable
        self.kernel = kernel
        do {
            plan = .success(
                try RedirectPlan.make(
                    options, nftables: nftables, iptablesLegacy: iptablesLegacy, unavailable: unavailable, kernel: kernel,
                    now: now))
        } catch {
            plan = .failure(error)
        }
        if case .success(let made) = plan {
            refusal = made.refusal(options, nftables: nftables, iptablesLegacy: iptablesLegacy)
        }
    }

    /// The plan's notes (the identity binding on a host with nat of its own, and what it means on a
    /// host that publishes container ports), with both systems' chains to go by.
    package var notes: [String] {
        guard case .success(let plan) = plan else { return [] }
        let chains = (nftables?.chains ?? []) + (iptablesLegacy?.chains ?? [])
        return plan.notes(
            containerChains: RedirectPlan.containerNAT(nftables) + RedirectPlan.containerNAT(iptablesLegacy).map { "iptables-legacy \($0)" },
            inputDropsByDefault: chains.contains { $0.hook == .input && $0.policy == .drop })
    }

    /// The systems holding the host's firewall, e.g. ["iptables-legacy", "iptables-nft"].
    package var firewall: [HostFirewallKind] {
        BackendDecision.hostFirewall(nftables: nftables, iptablesLegacy: iptablesLegacy)
    }

    // MARK: Text

    package var text: String {
        var lines: [String] = []
        let held = firewall
        lines.append("firewall: " + (held.isEmpty ? "none (no tables with rules or a drop policy)" : held.map(\.rawValue).joined(separator: " and ")))
        switch plan {
        case .success(let plan):
            lines.append("redirect: \(plan.decision.redirect)")
            lines += plan.decision.reasons.map { "  because \($0)" }
            lines += notes.map { "note: \($0)" }
            if let refusal { lines.append("begin refuses: \(refusal.message)") }
        case .failure(let error):
            lines.append("redirect: none: \(error.message)")
        }
        lines.append("transparent proxying: " + kernelText)
        lines.append("")
        lines += systemLines(.nftables, nftables)
        lines += systemLines(.iptablesLegacy, iptablesLegacy)
        if case .success(let plan) = plan {
            lines.append("")
            lines.append("what begin would do, one atomic commit per step, in order:")
            for (number, step) in plan.installSteps.enumerated() {
                lines.append("  \(number + 1). \(step)")
                lines += step.changes.map { "       \($0)" }
            }
            if !plan.armed, !plan.legacySteerSteps.isEmpty {
                lines.append("  (the iptables-legacy steering rules go in with the first challenge token)")
            }
        }
        return lines.joined(separator: "\n")
    }

    private static func yesNo(_ value: Bool?) -> String { value.map { $0 ? "yes" : "no" } ?? "unknown" }

    private var kernelText: String {
        "nft_tproxy \(Self.yesNo(kernel.nftTproxy)), xt_TPROXY \(Self.yesNo(kernel.xtTproxy)) (\(kernel.evidence))"
    }

    private func systemLines(_ system: FirewallSystem, _ snapshot: FirewallSnapshot?) -> [String] {
        guard let snapshot else {
            return ["\(system): not available (\(unavailable[system] ?? "not present"))"]
        }
        var lines: [String] = []
        switch system {
        case .nftables:
            lines.append("nftables: available; tables owned by a process: \(snapshot.ownedTables ? "yes" : "no (Linux 5.12 or newer needed)")")
        case .iptablesLegacy:
            lines.append("iptables-legacy: available for \(snapshot.families.sorted().map(\.rawValue).joined(separator: ", "))")
        }
        if snapshot.tables.isEmpty { lines.append("  no tables") }
        let xtables = Set(snapshot.iptablesNftTables)
        for table in snapshot.tables.map(\.ref).sorted() {
            let kind =
                system == .iptablesLegacy ? "" : table == TableRef.own ? " (le-redirect's)" : xtables.contains(table) ? " (iptables-nft)" : ""
            lines.append("  table \(table)\(kind)")
            for chain in snapshot.chains(of: table) {
                lines.append("    chain \(chain.ref.name)" + Self.describe(chain))
            }
        }
        return lines
    }

    private static func describe(_ chain: HostChain) -> String {
        var parts: [String] = []
        if let hook = chain.hook {
            parts.append("\(chain.type ?? "filter") hook \(hook) priority \(chain.priority ?? 0) policy \((chain.policy ?? .accept).rawValue)")
        }
        if let rules = chain.rules { parts.append("\(rules) rule\(rules == 1 ? "" : "s")") }
        return parts.isEmpty ? "" : ": " + parts.joined(separator: ", ")
    }

    // MARK: JSON

    package var json: JSONValue {
        var members: [(String, JSONValue)] = [("firewall", .array(firewall.map { .string($0.rawValue) }))]
        switch plan {
        case .success(let plan):
            members += [
                ("redirect", .string(plan.decision.redirect.rawValue)),
                ("reasons", .array(plan.decision.reasons.map { .string($0) })),
                ("notes", .array(notes.map { .string($0) })),
                (
                    "hostNAT",
                    .array(
                        (plan.nftables?.hostNAT ?? (plan.iptablesLegacy?.keepDestinations ?? []).map { "iptables-legacy \($0.chain)" })
                            .map { .string($0) })
                ),
                ("error", refusal.map { .string($0.message) } ?? .null),
            ]
        case .failure(let error):
            members += [
                ("redirect", .null), ("reasons", .array([])), ("notes", .array([])), ("hostNAT", .array([])),
                ("error", .string(error.message)),
            ]
        }
        members.append(
            (
                "tproxy",
                .object([
                    ("nftables", kernel.nftTproxy.map { .bool($0) } ?? .null),
                    ("iptablesLegacy", kernel.xtTproxy.map { .bool($0) } ?? .null),
                    ("evidence", .string(kernel.evidence)),
                ])
            ))
        members.append(("nftables", systemJSON(.nftables, nftables)))
        members.append(("iptablesLegacy", systemJSON(.iptablesLegacy, iptablesLegacy)))
        if case .success(let plan) = plan {
            members.append(
                (
                    "plan",
                    .array(
                        plan.installSteps.map { step in
                            .object([
                                ("system", .string(step.system.rawValue)),
                                ("table", step.table.map { .string("\($0)") } ?? .null),
                                ("changes", .array(step.changes.map { .string("\($0)") })),
                            ])
                        })
                ))
        } else {
            members.append(("plan", .null))
        }
        return .object(members)
    }

    private func systemJSON(_ system: FirewallSystem, _ snapshot: FirewallSnapshot?) -> JSONValue {
        guard let snapshot else {
            return .object([("available", .bool(false)), ("note", .string(unavailable[system] ?? "not present"))])
        }
        let xtables = Set(snapshot.iptablesNftTables)
        var members: [(String, JSONValue)] = [("available", .bool(true))]
        if system == .nftables {
            members.append(("ownedTables", .bool(snapshot.ownedTables)))
        } else {
            members.append(("families", .array(snapshot.families.sorted().map { .string($0.rawValue) })))
        }
        members.append(
            (
                "tables",
                .array(
                    snapshot.tables.map(\.ref).sorted().map { table in
                        var t: [(String, JSONValue)] = [("family", .string(table.family.rawValue)), ("name", .string(table.name))]
                        if system == .nftables {
                            t.append(
                                ("kind", .string(table == TableRef.own ? "le-redirect" : xtables.contains(table) ? "iptables-nft" : "nftables")))
                        }
                        t.append(
                            (
                                "chains",
                                .array(
                                    snapshot.chains(of: table).map { chain in
                                        .object([
                                            ("name", .string(chain.ref.name)),
                                            ("hook", chain.hook.map { .string($0.rawValue) } ?? .null),
                                            ("type", chain.type.map { .string($0) } ?? .null),
                                            ("priority", chain.priority.map { .int(Int64($0)) } ?? .null),
                                            ("policy", chain.policy.map { .string($0.rawValue) } ?? .null),
                                            ("rules", chain.rules.map { .int(Int64($0)) } ?? .null),
                                        ])
                                    })
                            ))
                        return .object(t)
                    })
            ))
        return .object(members)
    }
}
