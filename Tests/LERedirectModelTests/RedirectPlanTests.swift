import LERedirectModel
import Testing

/// Plan building against the host shapes the issue names, through the fake backend's snapshots.
struct RedirectPlanTests {
    let options = try! TakeoverOptions(ttl: .seconds(600), proxy: .external).validated()

    func plan(_ kernel: FakeKernel) throws -> RedirectPlan {
        try RedirectPlan.make(options, from: kernel.connect().snapshot())
    }

    func batch(_ plan: RedirectPlan) -> [FirewallChange] { plan.nftablesStep!.changes }

    static let steeringBatch: [FirewallChange] = [
        .addOwnedTable(TableRef.own),
        .addPortSet(table: TableRef.own, name: "ports", ports: [80], timeout: .seconds(600)),
        .addBaseChain(RedirectPlan.steeringChain, type: "filter", hook: .prerouting, priority: -150),
        .insertRule(RedirectPlan.steeringChain, .steer(set: "ports", proxyPort: 12347)),
    ]

    @Test func aHostWithNoTablesGetsOnlyOurTable() throws {
        let plan = try plan(FakeKernel())
        #expect(!plan.nftables!.replacesLeftoverTable)
        #expect(batch(plan) == Self.steeringBatch)
        #expect(plan.rules.isEmpty)
    }

    /// Whatever the host's input chains say, nothing goes into them: the steered packets keep
    /// port 80, and those chains decide about them as they always do.
    @Test func noHostChainIsTouchedWhateverItHolds() throws {
        let kernel = FakeKernel()
        let fw = TableRef(.inet, "host-fw")
        kernel.addChain(HostChain(ChainRef(fw, "early/input"), hook: .input, type: "filter", priority: -150))
        kernel.addChain(HostChain(ChainRef(fw, "input"), hook: .input, type: "filter", priority: 0, policy: .drop))
        kernel.addChain(HostChain(ChainRef(.ip, "filter", "INPUT"), hook: .input, type: "filter", priority: 0, policy: .drop))
        kernel.addChain(HostChain(ChainRef(fw, "prerouting"), hook: .prerouting, type: "filter", priority: -300))
        let plan = try plan(kernel)
        #expect(batch(plan) == Self.steeringBatch)
        #expect(batch(plan).allSatisfy { $0.table == TableRef.own })
        #expect(plan.rules.isEmpty)
        #expect(plan.notes().isEmpty)
    }

    /// A host with nat of its own on prerouting (nftables, iptables-nft's, or x_tables' nat
    /// table): the steered SYNs get an identity binding in a nat chain of ours that runs first,
    /// and the plan says so; where the chains look like a container engine's, it also says that
    /// INPUT, not FORWARD, decides about them during the window.
    @Test(arguments: ["nftables", "iptables-legacy"])
    func aHostWithNatOfItsOwnGetsTheIdentityBinding(_ system: String) throws {
        let kernel = FakeKernel()
        var legacyTables: [TableRef] = []
        if system == "nftables" {
            kernel.addChain(HostChain(ChainRef(.ip, "nat", "PREROUTING"), hook: .prerouting, type: "nat", priority: -100))
            kernel.addChain(HostChain(ChainRef(.ip, "nat", "DOCKER")))
        } else {
            legacyTables = [TableRef(.ip, "filter"), TableRef(.ip, "nat")]
        }
        kernel.addChain(HostChain(ChainRef(.inet, "fw", "input"), hook: .input, type: "filter", priority: 0, policy: .drop))
        let snapshot = try kernel.connect().snapshot()
        let plan = try RedirectPlan.make(options, nftables: snapshot, iptablesLegacy: nil, legacyTables: legacyTables, now: 0)
        #expect(plan.nftables!.hostNAT == [system == "nftables" ? "nftables ip nat PREROUTING" : "iptables-legacy ip nat PREROUTING"])
        #expect(Array(batch(plan).suffix(3)) == [
            .addBaseChain(RedirectPlan.natChain, type: "nat", hook: .prerouting, priority: -110),
            .insertRule(RedirectPlan.natChain, .keepDestination(set: "ports", family: .ip6)),
            .insertRule(RedirectPlan.natChain, .keepDestination(set: "ports", family: .ip)),
        ])
        let containers = RedirectPlan.containerNAT(snapshot)
        #expect(containers == (system == "nftables" ? ["ip nat DOCKER"] : []))
        let notes = plan.notes(containerChains: containers, inputDropsByDefault: true)
        #expect(notes.first?.contains("identity binding") == true)
        #expect(notes.count == (system == "nftables" ? 2 : 1))
        if system == "nftables" { #expect(notes[1].contains("pass its INPUT chains, not FORWARD") && notes[1].contains("drops by default")) }
    }

    @Test func armedPerChallengeTheSetStartsEmpty() throws {
        let perChallenge = try TakeoverOptions(ttl: .seconds(600), proxy: .builtIn(ProxyOptions(challenge: .memory))).validated()
        let plan = try RedirectPlan.make(perChallenge, from: FakeKernel().connect().snapshot())
        #expect(!plan.armed)
        #expect(batch(plan)[1] == .addPortSet(table: TableRef.own, name: "ports", ports: [], timeout: .seconds(600)))
    }

    @Test func theSamePlanFromTheSameSnapshot() throws {
        let kernel = FakeKernel()
        kernel.addChain(HostChain(ChainRef(.ip, "b", "in"), hook: .input))
        kernel.addChain(HostChain(ChainRef(.ip, "a", "in"), hook: .input))
        let snapshot = try kernel.connect().snapshot()
        #expect(try RedirectPlan.make(options, from: snapshot) == RedirectPlan.make(options, from: snapshot))
    }

    /// A copy of our table restored without the owner flag (a saved ruleset reloaded) is replaced
    /// in the same batch; a table a live session owns is a conflict.
    @Test func ourOwnLeftoverTableIsReplacedInTheSameBatch() throws {
        let kernel = FakeKernel()
        kernel.addChain(HostChain(RedirectPlan.steeringChain, hook: .prerouting, type: "filter", priority: -150))
        kernel.addRule(RedirectPlan.steeringChain, "tproxy to :12347", comment: "LE")
        let plan = try plan(kernel)
        #expect(plan.nftables!.replacesLeftoverTable)
        #expect(batch(plan).first == .deleteTable(TableRef.own))
        _ = try kernel.connect().commit(batch(plan), expecting: plan.nftables!.generation)
        #expect(!kernel.listing().contains("tproxy to :12347\n"))
    }

    @Test func aTableOwnedByALiveSessionIsAConflict() throws {
        let kernel = FakeKernel()
        let other = kernel.connect()
        _ = try other.commit([.addOwnedTable(TableRef.own)], expecting: nil)
        #expect {
            try plan(kernel)
        } throws: { ($0 as? LERedirectError)?.kind == .conflict && "\($0)".contains("owned by another process") }
        other.close()
        #expect(try plan(kernel).nftables!.replacesLeftoverTable == false)
    }

    /// A host daemon's owned table (firewalld's, say) is no obstacle any more: nothing goes into it.
    @Test func anInputChainInATableOwnedByAnotherProcessIsNoObstacle() throws {
        let kernel = FakeKernel()
        let daemon = kernel.connect()
        let table = TableRef(.inet, "firewalld")
        _ = try daemon.commit(
            [.addOwnedTable(table), .addBaseChain(ChainRef(table, "filter_INPUT"), type: "filter", hook: .input, priority: 10)],
            expecting: nil)
        #expect(try batch(plan(kernel)) == Self.steeringBatch)
    }
}

struct FakeKernelTests {
    @Test func aFailedCommitChangesNothing() throws {
        let kernel = FakeKernel()
        kernel.addChain(HostChain(ChainRef(.ip, "filter", "INPUT"), hook: .input))
        let before = kernel.listing()
        let generation = kernel.generation
        let fw = kernel.connect()
        #expect(throws: FirewallError.self) {
            try fw.commit([
                .insertRule(ChainRef(.ip, "filter", "INPUT"), .steer(set: "ports", proxyPort: 1)),
                .insertRule(ChainRef(.ip, "filter", "missing"), .steer(set: "ports", proxyPort: 1)),
            ], expecting: nil)
        }
        #expect(kernel.listing() == before)
        #expect(kernel.generation == generation)
    }

    @Test func aStaleGenerationIsRefused() throws {
        let kernel = FakeKernel()
        let fw = kernel.connect()
        let snapshot = try fw.snapshot()
        kernel.addTable(TableRef(.ip, "x"))
        #expect {
            try fw.commit([.addOwnedTable(TableRef.own)], expecting: snapshot.generation)
        } throws: { ($0 as? FirewallError)?.reason == .generationChanged }
    }

    @Test func ownedTablesDieWithTheirConnectionAndRefuseOthers() throws {
        let kernel = FakeKernel()
        let a = kernel.connect(), b = kernel.connect()
        _ = try a.commit([.addOwnedTable(TableRef.own)], expecting: nil)
        #expect {
            try b.commit([.deleteTable(TableRef.own)], expecting: nil)
        } throws: { ($0 as? FirewallError)?.reason == .notPermitted }
        a.close()
        #expect(!kernel.tableExists(TableRef.own))
    }
}

/// Where the steering goes on each shape of host, and why.
struct BackendDecisionTests {
    let options = try! TakeoverOptions(ttl: .seconds(600), proxy: .external).validated()

    static func legacy(mangle: Bool = true, rules: Bool = true, families: Set<Family> = [.ip, .ip6]) -> FirewallSnapshot {
        var tables: [HostTable] = []
        var chains: [HostChain] = []
        for family in families.sorted() {
            tables.append(HostTable(TableRef(family, "filter")))
            chains.append(HostChain(ChainRef(family, "filter", "INPUT"), hook: .input, policy: rules ? .drop : .accept, rules: rules ? 3 : 0))
            if mangle {
                tables.append(HostTable(TableRef(family, "mangle")))
                chains.append(HostChain(ChainRef(family, "mangle", "PREROUTING"), hook: .prerouting, priority: -150, rules: 0))
            }
        }
        return FirewallSnapshot(generation: 0, tables: tables, chains: chains, families: families, ownedTables: false)
    }

    static func nftables(_ chains: [HostChain] = [], ownedTables: Bool = true) -> FirewallSnapshot {
        FirewallSnapshot(
            generation: 7, tables: Array(Set(chains.map(\.ref.table))).sorted().map { HostTable($0) }, chains: chains,
            ownedTables: ownedTables)
    }

    func decide(
        _ choice: BackendChoice = .auto, nft: FirewallSnapshot?, legacy: FirewallSnapshot?, kernel: KernelSupport = KernelSupport()
    ) throws -> BackendDecision {
        try BackendDecision.make(choice, nftables: nft, iptablesLegacy: legacy, unavailable: [.nftables: "no nf_tables"], kernel: kernel)
    }

    /// Where the kernel has owned tables, even a firewall held in x_tables alone gets the steering
    /// in nftables: its own rules still decide who reaches port 80, and nothing of it is touched.
    @Test func aFirewallInXtablesAloneStillGetsOurOwnTable() throws {
        let d = try decide(nft: Self.nftables(), legacy: Self.legacy())
        #expect(d.redirect == .nftables)
        #expect(d.firewall == [.iptablesLegacy])
        #expect(d.reasons.joined().contains("iptables-legacy rules still decide"))
        let plan = try RedirectPlan.make(options, nftables: Self.nftables(), iptablesLegacy: Self.legacy(), now: 2_000)
        #expect(plan.installSteps.map(\.description) == ["nftables batch"])
        #expect(plan.iptablesLegacy == nil)
    }

    @Test func withoutOwnedTablesXtablesHoldsTheSteeringInMangle() throws {
        let nft = Self.nftables([HostChain(ChainRef(.inet, "fw", "input"), hook: .input)], ownedTables: false)
        let d = try decide(nft: nft, legacy: Self.legacy())
        #expect(d.redirect == .iptablesLegacy)
        #expect(d.reasons.joined().contains("5.12"))
        let plan = try RedirectPlan.make(options, nftables: nft, iptablesLegacy: Self.legacy(), now: 2_000)
        #expect(plan.installSteps.map(\.description) == ["iptables-legacy ip mangle", "iptables-legacy ip6 mangle"])
        #expect(plan.iptablesLegacy!.steers.map(\.spec) == Array(repeating: .expiringSteer(port: 80, proxyPort: 12347, until: 602), count: 2))
        #expect(plan.nftables == nil)
    }

    /// x_tables tables cannot be deleted, so begin never makes one.
    @Test func noXtablesMangleTableAndNoOwnedTablesIsRefused() throws {
        #expect {
            try decide(nft: Self.nftables(ownedTables: false), legacy: Self.legacy(mangle: false))
        } throws: { error in
            let e = error as? LERedirectError
            return e?.kind == .unsupported && e!.message.contains("5.12") && e!.message.contains("no mangle table for IPv4 and IPv6")
        }
    }

    /// Without tproxy in the kernel, neither system can steer: begin says which module is missing.
    @Test func aKernelWithoutTproxyIsNamed() throws {
        #expect {
            try decide(nft: Self.nftables(), legacy: Self.legacy(), kernel: KernelSupport(nftTproxy: false, xtTproxy: false))
        } throws: { error in
            let e = error as? LERedirectError
            return e?.kind == .unsupported && e!.message.contains("nft_tproxy") && e!.message.contains("xt_TPROXY")
        }
        // Only nf_tables' missing: the steering goes into x_tables, and says why.
        let d = try decide(nft: Self.nftables(), legacy: Self.legacy(), kernel: KernelSupport(nftTproxy: false, xtTproxy: true))
        #expect(d.redirect == .iptablesLegacy)
        #expect(d.reasons.joined().contains("nft_tproxy"))
        // Unknown (nothing could be read): begin tries nftables.
        #expect(try decide(nft: Self.nftables(), legacy: nil, kernel: KernelSupport()).redirect == .nftables)
    }

    @Test func bothSystemsHoldingTheFirewallKeepTheSteeringInNftables() throws {
        let nft = Self.nftables([HostChain(ChainRef(.ip, "filter", "INPUT"), hook: .input, policy: .drop)])
        let d = try decide(nft: nft, legacy: Self.legacy())
        #expect(d.redirect == .nftables)
        #expect(d.firewall == [.iptablesNft, .iptablesLegacy])
    }

    /// Tables that exist only because something read them (empty, accepting) do not hold a firewall.
    @Test func emptyXtablesTablesDoNotHoldTheFirewall() throws {
        let d = try decide(nft: Self.nftables(), legacy: Self.legacy(rules: false))
        #expect(d.redirect == .nftables)
        #expect(d.firewall.isEmpty)
    }

    @Test func nothingCanHoldTheSteering() throws {
        #expect {
            try decide(nft: nil, legacy: Self.legacy(mangle: false))
        } throws: { error in
            let e = error as? LERedirectError
            return e?.kind == .unsupported && e!.message.contains("no nf_tables") && e!.message.contains("no mangle table")
        }
    }

    @Test func aForcedBackendThatCannotHoldTheSteeringIsRefused() throws {
        #expect {
            try decide(.nftables, nft: Self.nftables(ownedTables: false), legacy: Self.legacy())
        } throws: { ($0 as? LERedirectError)?.message.contains("--backend nftables") == true }
        #expect {
            try decide(.iptablesLegacy, nft: Self.nftables(), legacy: Self.legacy(mangle: false))
        } throws: { ($0 as? LERedirectError)?.message.contains("cannot be deleted once made") == true }
        #expect(try decide(.iptablesLegacy, nft: Self.nftables(), legacy: Self.legacy()).redirect == .iptablesLegacy)
        #expect(try decide(.nftables, nft: Self.nftables(), legacy: Self.legacy()).redirect == .nftables)
    }

    /// x_tables without IPv6 needs only the IPv4 mangle table.
    @Test func anXtablesWithoutIPv6NeedsOnlyItsIPv4MangleTable() throws {
        let plan = try RedirectPlan.make(options, nftables: nil, iptablesLegacy: Self.legacy(families: [.ip]), now: 0)
        #expect(plan.decision.redirect == .iptablesLegacy)
        #expect(plan.iptablesLegacy!.steers.map(\.chain) == [ChainRef(.ip, "mangle", "PREROUTING")])
    }

    @Test func iptablesNftTablesAreKnownByTheirNamesAndChains() {
        let snapshot = Self.nftables([
            HostChain(ChainRef(.ip, "filter", "INPUT"), hook: .input),
            HostChain(ChainRef(.ip, "filter", "DOCKER-USER")),
            HostChain(ChainRef(.ip6, "nat", "PREROUTING"), hook: .prerouting),
            HostChain(ChainRef(.ip6, "nat", "INPUT"), hook: .input),
            HostChain(ChainRef(.inet, "filter", "INPUT"), hook: .input),  // inet: not iptables'
            HostChain(ChainRef(.ip, "mangle", "input"), hook: .input),  // not iptables' chain name
            HostChain(ChainRef(.ip, "fw", "INPUT"), hook: .input),  // not iptables' table name
        ])
        #expect(snapshot.iptablesNftTables == [TableRef(.ip, "filter"), TableRef(.ip6, "nat")])
    }
}
