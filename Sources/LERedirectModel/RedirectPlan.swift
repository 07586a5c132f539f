/// What begin commits, worked out from what it read: which system steers new connections to the
/// proxy, and how. On nftables everything lives in le-redirect's own owned table; on
/// iptables-legacy (kernels without owned tables) it is one rule per family at the end of mangle
/// PREROUTING, and where the host has a nat table an identity-binding ACCEPT at the head of nat
/// PREROUTING: nothing in any filter chain. The packets keep destination port `port`, so the host's
/// input rules decide who reaches the proxy exactly as they decide who reaches the app.
/// Pure: the same snapshots and options always give the same plan.
package struct RedirectPlan: Hashable, Sendable {
    package let port: UInt16
    package let proxyPort: UInt16
    package let ttl: Duration
    /// Unix milliseconds at which the steering ends by itself.
    package let expiresAt: Int64
    /// False when the steering is armed per challenge: the port set starts empty (nftables), or the
    /// steering rules are inserted only with the first token (x_tables).
    package let armed: Bool
    /// The local addresses taken over (`--address`); empty: every local address.
    package let addresses: [IPAddress]
    /// With --include-local: the user whose connections are never steered (the built-in proxy's);
    /// nil: the host's own connections are never steered.
    package let localExemptUID: UInt32?
    /// The system that holds the steering, and why.
    package let decision: BackendDecision
    /// Our owned table, when nftables holds the steering.
    package var nftables: NftablesPart?
    /// The mangle (and nat) PREROUTING rules, when iptables-legacy holds it.
    package let iptablesLegacy: LegacyPart?

    package struct NftablesPart: Hashable, Sendable {
        /// The generation the part was made from; the batch is refused if the ruleset moved on.
        package let generation: UInt32
        /// A leftover `inet le_redirect` that no live process owns (restored from a saved ruleset,
        /// say): the same batch deletes it before creating ours.
        package let replacesLeftoverTable: Bool
        /// The host translates destinations in prerouting (these nat chains): the steered SYNs get
        /// an identity binding from a nat chain of ours that runs first, so that the host's nat
        /// leaves them alone (a SYN DNAT'ed away after tproxy gave it a socket would be dropped).
        package let hostNAT: [String]
        /// The host's nat on output (nat-type output chains, x_tables nat tables): with
        /// --include-local, a connection of the host's own that it sends elsewhere is not steered.
        package var hostOutputNAT: [String] = []

        package var keepsDestinations: Bool { !hostNAT.isEmpty }
    }

    /// What goes into x_tables: one commit per table.
    package struct LegacyPart: Hashable, Sendable {
        /// mangle PREROUTING of each family.
        package let steers: [PlannedRule]
        /// nat PREROUTING of each family whose nat table exists (the host's nat, Docker's published
        /// ports among it): the identity binding's x_tables form, committed before the steering.
        package let keepDestinations: [PlannedRule]
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
    package static let steeringChain = ChainRef(TableRef.own, "prerouting")
    /// Where steered SYNs get their identity binding on a host with nat chains of its own.
    package static let natChain = ChainRef(TableRef.own, "keep-destination")
    /// dstnat - 10: ahead of every nat prerouting chain a host usually has (dstnat = -100),
    /// x_tables' nat table (and so Docker's published ports) included.
    package static let natPriority: Int32 = -110
    /// mangle (-150), where transparent proxying is done: after conntrack (-200) and the host's raw
    /// chains, before its nat (dstnat = -100) and filter chains, which all still see the packet.
    package static let steeringPriority: Int32 = -150
    /// --include-local: where the host's own SYNs get their mark, on postrouting at 1000: after
    /// the host's output nat (a connection DNATed away from this host is not marked), its output
    /// filter (a connection it drops never gets here) and its postrouting chains.
    package static let localChain = ChainRef(TableRef.own, "local-out")
    package static let localPriority: Int32 = 1000
    /// Where they are steered when they come back in on lo: prerouting at raw - 1, before any
    /// chain of the host's sees the bit.
    package static let localSteeringChain = ChainRef(TableRef.own, "local-in")
    package static let localSteeringPriority: Int32 = -301
    /// The packet-mark bit that carries "steer this local SYN" from postrouting to prerouting,
    /// where it is cleared again. Only on those SYNs, and only between the two chains.
    package static let localMark: UInt32 = 0x4000_0000

    /// The nftables-only plan (hosts and tests that have no x_tables).
    package static func make(_ options: ValidatedOptions, from snapshot: FirewallSnapshot, now: Int64 = 0)
        throws(LERedirectError) -> RedirectPlan
    {
        try make(options, nftables: snapshot, iptablesLegacy: nil, now: now)
    }

    /// `legacyTables`: the x_tables tables that exist, when x_tables itself was not read (begin on
    /// the nftables path reads only its table names); taken from `iptablesLegacy` otherwise.
    /// `proxyUID`: the built-in proxy's user, which --include-local needs.
    package static func make(
        _ options: ValidatedOptions, nftables: FirewallSnapshot?, iptablesLegacy: FirewallSnapshot?,
        legacyTables: [TableRef]? = nil, unavailable: [FirewallSystem: String] = [:], kernel: KernelSupport = KernelSupport(),
        proxyUID: UInt32? = nil, now: Int64
    ) throws(LERedirectError) -> RedirectPlan {
        let decision = try BackendDecision.make(
            options.backend, nftables: nftables, iptablesLegacy: iptablesLegacy, unavailable: unavailable, kernel: kernel)
        var localExemptUID: UInt32?
        if options.includeLocal {
            guard decision.redirect == .nftables else {
                throw LERedirectError(
                    .unsupported,
                    "--include-local: the host's own connections can be steered only from nftables (owned tables, Linux 5.12 "
                        + "or newer), and here the steering would be in iptables-legacy. Nothing was changed")
            }
            guard let proxyUID, proxyUID != 0 else {
                throw LERedirectError(.failed, "--include-local: the built-in proxy's user is not known. Nothing was changed")
            }
            localExemptUID = proxyUID
        }
        let expiresAt = now + options.ttl.milliseconds
        var legacy: LegacyPart?
        if decision.redirect == .iptablesLegacy, let snapshot = iptablesLegacy {
            // Whole seconds: the time match compares seconds, and stops matching after `until`.
            let until = expiresAt / 1000
            let tables = Set(snapshot.tables.map(\.ref))
            // An address whose family x_tables does not hold here (ip6_tables not loaded) would get
            // no rule, and begin would succeed taking nothing over for it.
            let absent = options.addresses.filter { !snapshot.families.contains($0.family) }
            if !absent.isEmpty {
                throw LERedirectError(
                    .unsupported,
                    "--address \(absent.map(\.description).joined(separator: ", ")): iptables-legacy has no "
                        + "\(absent[0].family == .ip ? "IPv4" : "IPv6") tables in this network namespace, so nothing would steer it. "
                        + "Nothing was changed")
            }
            // One rule per family, or with --address one per address, in its family's chain.
            let targets = snapshot.families.sorted().flatMap { family in
                options.addresses.isEmpty ? [(family, nil)] : options.addresses.filter { $0.family == family }.map { (family, $0) }
            } as [(Family, IPAddress?)]
            legacy = LegacyPart(
                steers: targets.map {
                    PlannedRule(
                        .iptablesLegacy, ChainRef($0.0, "mangle", "PREROUTING"),
                        .expiringSteer(port: options.port, proxyPort: options.proxyPort, until: until, address: $0.1))
                },
                keepDestinations: targets.filter { tables.contains(TableRef($0.0, "nat")) }.map {
                    PlannedRule(
                        .iptablesLegacy, ChainRef($0.0, "nat", "PREROUTING"),
                        .expiringKeepDestination(port: options.port, until: until, address: $0.1))
                })
        }
        var nft: NftablesPart?
        if decision.redirect == .nftables, let snapshot = nftables {
            nft = try nftablesPart(options, snapshot, legacyTables: legacyTables ?? iptablesLegacy?.tables.map(\.ref) ?? [])
        }
        return RedirectPlan(
            port: options.port, proxyPort: options.proxyPort, ttl: options.ttl, expiresAt: expiresAt,
            armed: !options.proxy.armsPerChallenge, addresses: options.addresses, localExemptUID: localExemptUID,
            decision: decision, nftables: nft, iptablesLegacy: legacy)
    }

    /// Why begin refuses this plan on this host, if it does: a host that publishes container ports
    /// and filters by default (FORWARD, DOCKER-USER's policy, or INPUT): the steered connections
    /// would be decided by INPUT instead of FORWARD. Only with the operator's word (--through-input).
    package func refusal(
        _ options: ValidatedOptions, nftables: FirewallSnapshot?, iptablesLegacy: FirewallSnapshot?
    ) -> LERedirectError? {
        let containers = Self.containerNAT(nftables) + Self.containerNAT(iptablesLegacy).map { "iptables-legacy \($0)" }
        let chains = (nftables?.chains ?? []) + (iptablesLegacy?.chains ?? [])
        let drops = chains.filter { ($0.hook == .input || $0.hook == .forward) && $0.policy == .drop && $0.ref.table != TableRef.own }
        guard keepsDestinations, !containers.isEmpty, !drops.isEmpty, !options.throughInput else { return nil }
        return LERedirectError(
            .failed,
            "this host publishes container ports (\(containers.joined(separator: ", "))) and filters by default "
                + "(\(drops.map { "\($0.ref) \($0.hook!.rawValue)" }.joined(separator: ", ")) drop): during the window the steered "
                + "connections to port \(options.port) would pass its INPUT chains, not FORWARD, so FORWARD's and DOCKER-USER's "
                + "rules would not apply to them, and an INPUT that does not accept port \(options.port) would drop them. If INPUT "
                + "accepts port \(options.port) from whoever may reach the published port, run begin with --through-input. "
                + "Nothing was changed")
    }

    /// Whether steered SYNs get an identity binding (the host has nat of its own).
    package var keepsDestinations: Bool {
        (nftables?.keepsDestinations ?? false) || !(iptablesLegacy?.keepDestinations.isEmpty ?? true)
    }

    /// The nftables part alone, from a fresh snapshot: begin plans it again when another program
    /// committed between its read and its batch.
    package static func nftablesPart(_ options: ValidatedOptions, _ snapshot: FirewallSnapshot, legacyTables: [TableRef])
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
        var part = NftablesPart(
            generation: snapshot.generation, replacesLeftoverTable: leftover,
            hostNAT: hostNAT(nftables: snapshot, legacyTables: legacyTables))
        part.hostOutputNAT = snapshot.chains.filter {
            $0.hook == .output && $0.type == "nat" && $0.ref.table != TableRef.own
        }.map { "nftables \($0.ref)" }.sorted()
            + legacyTables.filter { $0.name == "nat" }.sorted().map { "iptables-legacy \($0) OUTPUT" }
        return part
    }

    /// The host's own nat on prerouting: nat-type prerouting base chains of nftables (iptables-nft's
    /// included), and x_tables nat tables. Read off the chain and table lists alone: begin never
    /// reads the host's rules.
    package static func hostNAT(nftables: FirewallSnapshot?, legacyTables: [TableRef]) -> [String] {
        let nft = (nftables?.chains ?? []).filter {
            $0.hook == .prerouting && $0.type == "nat" && $0.ref.table != TableRef.own
        }.map { "nftables \($0.ref)" }.sorted()
        let legacy = legacyTables.filter { $0.name == "nat" }.sorted().map { "iptables-legacy \($0) PREROUTING" }
        return nft + legacy
    }

    /// The chains of the host's nat tables whose names container engines and orchestrators give
    /// theirs (Docker, Podman's netavark, CNI's portmap, kube-proxy, LXD): their published ports
    /// are DNAT'ed to addresses that are not the host's.
    package static func containerNAT(_ snapshot: FirewallSnapshot?) -> [String] {
        let prefixes = ["DOCKER", "NETAVARK", "CNI-HOSTPORT", "CNI-DN", "KUBE-", "prert."]
        let natTables = Set((snapshot?.chains ?? []).filter { $0.type == "nat" }.map(\.ref.table))
        return (snapshot?.chains ?? []).filter { chain in
            natTables.contains(chain.ref.table) && prefixes.contains { chain.ref.name.hasPrefix($0) }
        }.map { "\($0.ref)" }.sorted()
    }

    /// What the operator should know about this plan, said by detect, logged by begin and shown by
    /// status: the identity binding, and on a host that publishes container ports, that the
    /// steered connections then pass the host's INPUT chains instead of its FORWARD chains.
    package func notes(containerChains: [String] = [], inputDropsByDefault: Bool = false) -> [String] {
        var notes: [String] = []
        let how = "so the host's own nat leaves them alone, and the proxy connects to their original destination from the "
            + "host itself, where the host's output nat (published container ports) takes it on"
        if let nft = nftables, nft.keepsDestinations {
            notes.append(
                "the host translates destinations in prerouting (\(nft.hostNAT.joined(separator: ", "))): the steered SYNs "
                    + "get an identity binding first (chain \(Self.natChain), priority dstnat - 10), " + how)
        } else if let legacy = iptablesLegacy, !legacy.keepDestinations.isEmpty {
            notes.append(
                "the host has x_tables nat tables (\(legacy.keepDestinations.map { "\($0.chain)" }.joined(separator: ", "))): the "
                    + "steered SYNs are accepted at their head first, " + how)
        }
        if localExemptUID != nil, let nft = nftables, !nft.hostOutputNAT.isEmpty {
            notes.append(
                "--include-local: the host translates destinations on output (\(nft.hostOutputNAT.joined(separator: ", "))): "
                    + "a connection of the host's own to port \(port) that its nat sends elsewhere (a published container "
                    + "port) is not steered, and reaches where the nat sends it")
        }
        guard !notes.isEmpty else { return [] }
        if !containerChains.isEmpty && keepsDestinations {
            notes.append(
                "this host publishes container ports (\(containerChains.joined(separator: ", "))): during the window the "
                    + "steered connections to port \(port) pass its INPUT chains, not FORWARD, so rules in DOCKER-USER or "
                    + "FORWARD do not see them"
                    + (inputDropsByDefault
                        ? ", and an input chain here drops by default: if it does not accept port \(port), they are dropped"
                        : ""))
        }
        return notes
    }

    /// The steering rules of the owned table: one, or with --address one per address.
    package var steeringRules: [RuleSpec] {
        addresses.isEmpty
            ? [.steer(set: Self.setName, proxyPort: proxyPort)]
            : addresses.map { .steer(set: Self.setName, proxyPort: proxyPort, address: $0) }
    }

    /// --include-local's rules, in listing order: the postrouting chain's marks (one, or one per
    /// address) and the proxy's unmarking; the lo chain's steering of marked SYNs and the clearing
    /// of what is left.
    package var localRules: (mark: [RuleSpec], steer: [RuleSpec]) {
        guard let uid = localExemptUID else { return ([], []) }
        let targets: [IPAddress?] = addresses.isEmpty ? [nil] : addresses
        return (
            targets.map { .markLocal(set: Self.setName, exemptUID: uid, mark: Self.localMark, address: $0) }
                + [.unmarkProxy(set: Self.setName, uid: uid, mark: Self.localMark)],
            targets.map { .steerLocal(set: Self.setName, proxyPort: proxyPort, mark: Self.localMark, address: $0) }
                + [.clearLocal(mark: Self.localMark)]
        )
    }

    /// The identity bindings of the owned nat chain, in listing order: per family, or per address.
    package var keepDestinationRules: [RuleSpec] {
        addresses.isEmpty
            ? [.keepDestination(set: Self.setName, family: .ip), .keepDestination(set: Self.setName, family: .ip6)]
            : addresses.map { .keepDestination(set: Self.setName, family: $0.family, address: $0) }
    }

    /// Every rule the session inserts into chains it does not own, in commit order: the journal's
    /// entries (x_tables only; on nftables everything is in the owned table).
    package var rules: [PlannedRule] { (iptablesLegacy?.keepDestinations ?? []) + (iptablesLegacy?.steers ?? []) }

    /// One atomic commit of begin.
    package struct Step: Hashable, Sendable, CustomStringConvertible {
        package let system: FirewallSystem
        /// The x_tables table it replaces; nil for an nftables batch.
        package let table: TableRef?
        package let changes: [FirewallChange]
        /// Indices into `rules` of what it inserts, in order.
        package let entries: [Int]

        package var description: String { table.map { "\(system) \($0)" } ?? "\(system) batch" }
    }

    /// Begin's commits, in order: the nftables batch, or the x_tables steering (a table each, only
    /// when armed).
    package var installSteps: [Step] {
        (nftablesStep.map { [$0] } ?? []) + (armed ? legacySteerSteps : [])
    }

    /// One per table, nat tables first (the identity binding must be there before a SYN is
    /// steered), whether or not begin commits them (armed per challenge, it does not).
    package var legacySteerSteps: [Step] {
        let all = rules
        return Set(all.map(\.chain.table)).sorted { ($0.name == "nat" ? 0 : 1, $0) < ($1.name == "nat" ? 0 : 1, $1) }.map { table in
            let indices = all.indices.filter { all[$0].chain.table == table }
            return Step(
                system: .iptablesLegacy, table: table, changes: indices.map { .insertRule(all[$0].chain, all[$0].spec) },
                entries: indices)
        }
    }

    package var nftablesStep: Step? {
        guard let nft = nftables else { return nil }
        var changes: [FirewallChange] = []
        if nft.replacesLeftoverTable { changes.append(.deleteTable(TableRef.own)) }
        changes += [
            .addOwnedTable(TableRef.own),
            .addPortSet(table: TableRef.own, name: Self.setName, ports: armed ? [port] : [], timeout: ttl),
            .addBaseChain(Self.steeringChain, type: "filter", hook: .prerouting, priority: Self.steeringPriority),
        ]
        // Each rule goes in at the head: the last first, so that they are listed in order.
        changes += steeringRules.reversed().map { .insertRule(Self.steeringChain, $0) }
        let local = localRules
        if !local.mark.isEmpty {
            changes.append(.addBaseChain(Self.localSteeringChain, type: "filter", hook: .prerouting, priority: Self.localSteeringPriority))
            changes += local.steer.reversed().map { .insertRule(Self.localSteeringChain, $0) }
            changes.append(.addBaseChain(Self.localChain, type: "filter", hook: .postrouting, priority: Self.localPriority))
            changes += local.mark.reversed().map { .insertRule(Self.localChain, $0) }
        }
        if nft.keepsDestinations {
            changes.append(.addBaseChain(Self.natChain, type: "nat", hook: .prerouting, priority: Self.natPriority))
            changes += keepDestinationRules.reversed().map { .insertRule(Self.natChain, $0) }
        }
        return Step(system: .nftables, table: nil, changes: changes, entries: [])
    }

    /// Arms the steering until `remaining` (the rest of the TTL) passes.
    package static func armChanges(port: UInt16, remaining: Duration) -> [FirewallChange] {
        [.addSetElement(table: TableRef.own, set: setName, port: port, timeout: remaining)]
    }

    /// Disarms it: new connections reach the app directly; the session stays.
    package static func disarmChanges(port: UInt16) -> [FirewallChange] {
        [.deleteSetElement(table: TableRef.own, set: setName, port: port)]
    }

    /// End's batch after the drain: the whole owned table.
    package static var removeTableChanges: [FirewallChange] { [.deleteTable(TableRef.own)] }

    /// Families whose input hook sees traffic to local addresses: where versions that rewrote
    /// connections put their scoped accepts (`recover --sweep` still looks there).
    package static let inputFamilies: Set<Family> = [.ip, .ip6, .inet]
}

/// What the running kernel offers for steering, read off /sys, modules.builtin and the kernel's
/// config; nil where none of them could tell (begin then tries, and says what failed).
package struct KernelSupport: Hashable, Sendable {
    /// nf_tables' `tproxy` expression (nft_tproxy).
    package var nftTproxy: Bool?
    /// x_tables' TPROXY target (xt_TPROXY).
    package var xtTproxy: Bool?
    /// Where the answer came from, for detect.
    package var evidence: String

    package init(nftTproxy: Bool? = nil, xtTproxy: Bool? = nil, evidence: String = "not checked") {
        self.nftTproxy = nftTproxy
        self.xtTproxy = xtTproxy
        self.evidence = evidence
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
        unavailable: [FirewallSystem: String] = [:], kernel: KernelSupport = KernelSupport()
    ) throws(LERedirectError) -> BackendDecision {
        let firewall = hostFirewall(nftables: nftables, iptablesLegacy: iptablesLegacy)
        let legacyHolds = firewall.contains(.iptablesLegacy)
        let nftablesProblem = Self.nftablesProblem(nftables: nftables, unavailable: unavailable, kernel: kernel)

        var legacyProblem: String?
        if let iptablesLegacy {
            let missing = iptablesLegacy.families.sorted().filter {
                !iptablesLegacy.tables.map(\.ref).contains(TableRef($0, "mangle"))
            }
            if kernel.xtTproxy == false {
                legacyProblem = "this kernel has no x_tables TPROXY target (xt_TPROXY, CONFIG_NETFILTER_XT_TARGET_TPROXY), which steering needs"
            } else if !missing.isEmpty {
                legacyProblem =
                    "iptables-legacy has no mangle table for \(missing.map { $0 == .ip ? "IPv4" : "IPv6" }.joined(separator: " and ")) "
                    + "in this network namespace, and an x_tables table cannot be deleted once made, so le-redirect "
                    + "does not make one (`\(missing.map { $0 == .ip ? "iptables-legacy" : "ip6tables-legacy" }.joined(separator: "` and `")) "
                    + "-t mangle -L` would)"
            }
        } else {
            legacyProblem = "iptables-legacy cannot be used here (\(unavailable[.iptablesLegacy] ?? "not available"))"
        }

        let held = firewall.isEmpty ? "no firewall tables" : firewall.map(\.rawValue).joined(separator: " and ")
        let decides = "the host's own rules decide who reaches the port, as outside a window: the packets keep their destination port, and nothing is added to the host's chains"
        switch choice {
        case .nftables:
            if let nftablesProblem {
                throw LERedirectError(.unsupported, "--backend nftables: \(nftablesProblem). Nothing was changed")
            }
            return BackendDecision(redirect: .nftables, firewall: firewall, reasons: ["--backend nftables was given", decides])
        case .iptablesLegacy:
            if let legacyProblem {
                throw LERedirectError(.unsupported, "--backend iptables-legacy: \(legacyProblem). Nothing was changed")
            }
            return BackendDecision(
                redirect: .iptablesLegacy, firewall: firewall,
                reasons: ["--backend iptables-legacy was given", decides, Self.legacyTTLNote])
        case .auto:
            if nftablesProblem == nil {
                var reasons = iptablesLegacy == nil && nftables != nil ? [] : ["the host holds \(held)"]
                if legacyHolds {
                    reasons.append("its iptables-legacy rules still decide who reaches the port: the steering rewrites nothing")
                }
                reasons.append(decides)
                reasons.append(
                    "the steering lives in table \(TableRef.own), owned by the session: the kernel deletes it the moment the session's process dies")
                return BackendDecision(redirect: .nftables, firewall: firewall, reasons: reasons)
            }
            if legacyProblem == nil {
                return BackendDecision(
                    redirect: .iptablesLegacy, firewall: firewall,
                    reasons: [
                        "the host holds \(held)", "\(nftablesProblem!): the steering goes into iptables-legacy's mangle PREROUTING",
                        decides, Self.legacyTTLNote,
                    ])
            }
            throw LERedirectError(
                .unsupported,
                "no firewall system here can steer the port: \(nftablesProblem!); \(legacyProblem!). Nothing was changed")
        }
    }

    /// Why nftables cannot hold the steering here, or nil when it can.
    package static func nftablesProblem(
        nftables: FirewallSnapshot?, unavailable: [FirewallSystem: String], kernel: KernelSupport
    ) -> String? {
        if nftables == nil {
            return "nftables cannot be used here (\(unavailable[.nftables] ?? "not available"))"
        } else if nftables?.ownedTables == false {
            return "this kernel cannot give a table to a process (owned tables need Linux 5.12 or newer)"
        } else if kernel.nftTproxy == false {
            return "this kernel has no nf_tables tproxy expression (nft_tproxy, CONFIG_NFT_TPROXY), which steering needs"
        }
        return nil
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
        "x_tables has no owned tables: if the session dies, its time match ends the steering at the TTL (until then "
        + "x_tables' TPROXY drops the port's new connections, as it drops any it finds no transparent listener for), "
        + "and recover (or the next begin or end) removes it"
}

extension FirewallSnapshot {
    /// The tables x_tables' names give to iptables-nft's: an ip or ip6 table named filter, nat,
    /// mangle, raw or security whose base chains all carry iptables' built-in names for their hooks
    /// (a table written that way with nft is taken for one too). detect reports them.
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
