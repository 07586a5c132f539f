import LERedirectModel
import Testing

/// Plan building against the host shapes the issue names, through the fake backend's snapshots.
struct RedirectPlanTests {
    let options = try! TakeoverOptions(ttl: .seconds(600), proxy: .external).validated()

    func plan(_ kernel: FakeKernel) throws -> RedirectPlan {
        try RedirectPlan.make(options, from: kernel.connect().snapshot())
    }

    /// The chains of the nftables accepts, and the nftables batch.
    func acceptChains(_ plan: RedirectPlan) -> [ChainRef] { plan.nftables!.accepts.map(\.chain) }
    func batch(_ plan: RedirectPlan) -> [FirewallChange] { plan.nftablesStep!.changes }

    @Test func aHostWithNoTablesGetsOnlyTheRedirect() throws {
        let plan = try plan(FakeKernel())
        #expect(acceptChains(plan).isEmpty)
        #expect(!plan.nftables!.replacesLeftoverTable)
        #expect(batch(plan) == [
            .addOwnedTable(TableRef.own),
            .addPortSet(table: TableRef.own, name: "ports", ports: [80], timeout: .seconds(600)),
            .addNATChain(RedirectPlan.natChain, hook: .prerouting, priority: -110),
            .insertRule(RedirectPlan.natChain, .redirect(set: "ports", proxyPort: 12347)),
        ])
    }

    @Test func aPolicyAcceptChainStillGetsTheAccept() throws {
        let kernel = FakeKernel()
        let input = ChainRef(.inet, "filter", "input")
        kernel.addChain(HostChain(input, hook: .input, type: "filter", priority: 0, policy: .accept))
        kernel.addChain(HostChain(ChainRef(.inet, "filter", "blocklist")))
        kernel.addRule(input, "jump blocklist")
        kernel.addChain(HostChain(ChainRef(.inet, "filter", "forward"), hook: .forward, type: "filter", priority: 0))
        let plan = try plan(kernel)
        #expect(acceptChains(plan) == [input])
        #expect(batch(plan).last == .insertRule(input, .scopedAccept(proxyPort: 12347, originalPort: 80, form: .native)))
    }

    @Test func policyDropChainsInEveryFamilyGetTheAccept() throws {
        let kernel = FakeKernel()
        let chains = [ChainRef(.inet, "firewall", "inbound"), ChainRef(.ip6, "filter", "INPUT"), ChainRef(.ip, "filter", "INPUT")]
        for chain in chains { kernel.addChain(HostChain(chain, hook: .input, type: "filter", priority: 0, policy: .drop)) }
        let plan = try plan(kernel)
        #expect(acceptChains(plan) == [ChainRef(.ip, "filter", "INPUT"), ChainRef(.ip6, "filter", "INPUT"), ChainRef(.inet, "firewall", "inbound")])
        // Tables laid out as iptables-nft makes them get iptables' form of the accept.
        #expect(plan.nftables!.accepts.map(\.spec) == [
            .scopedAccept(proxyPort: 12347, originalPort: 80, form: .xtables),
            .scopedAccept(proxyPort: 12347, originalPort: 80, form: .xtables),
            .scopedAccept(proxyPort: 12347, originalPort: 80, form: .native),
        ])
    }

    @Test func everyInputBaseChainAndNoOtherChainGetsTheAccept() throws {
        let kernel = FakeKernel()
        let fw = TableRef(.inet, "host-fw")
        kernel.addChain(HostChain(ChainRef(fw, "early/input"), hook: .input, type: "filter", priority: -150))
        kernel.addChain(HostChain(ChainRef(fw, "input"), hook: .input, type: "filter", priority: 0, policy: .drop))
        kernel.addChain(HostChain(ChainRef(fw, "late"), hook: .input, type: "filter", priority: 100))
        kernel.addChain(HostChain(ChainRef(fw, "output"), hook: .output, type: "filter", priority: 0))
        kernel.addChain(HostChain(ChainRef(fw, "regular")))
        kernel.addChain(HostChain(ChainRef(.ip, "nat", "PREROUTING"), hook: .prerouting, type: "nat", priority: -100))
        kernel.addChain(HostChain(ChainRef(.ip, "nat", "INPUT"), hook: .input, type: "nat", priority: 100))
        let plan = try plan(kernel)
        #expect(acceptChains(plan) == [
            ChainRef(.ip, "nat", "INPUT"), ChainRef(fw, "early/input"), ChainRef(fw, "input"), ChainRef(fw, "late"),
        ])
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
        kernel.addChain(HostChain(RedirectPlan.natChain, hook: .prerouting, type: "nat", priority: -110))
        kernel.addRule(RedirectPlan.natChain, "redirect to :12347", comment: "LE")
        let plan = try plan(kernel)
        #expect(plan.nftables!.replacesLeftoverTable)
        #expect(acceptChains(plan).isEmpty)  // our own table's chains never get an accept
        #expect(batch(plan).first == .deleteTable(TableRef.own))
        _ = try kernel.connect().commit(batch(plan), expecting: plan.nftables!.generation)
        #expect(!kernel.listing().contains("redirect to :12347\n"))
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

    @Test func anInputChainInATableOwnedByAnotherProcessIsAConflict() throws {
        let kernel = FakeKernel()
        let daemon = kernel.connect()
        let table = TableRef(.inet, "firewalld")
        _ = try daemon.commit([.addOwnedTable(table), .addNATChain(ChainRef(table, "filter_INPUT"), hook: .input, priority: 10)], expecting: nil)
        #expect {
            try plan(kernel)
        } throws: { error in
            let e = error as? LERedirectError
            return e?.kind == .conflict && e!.message.contains("inet firewalld filter_INPUT") && e!.message.contains("12347")
        }
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
                .insertRule(ChainRef(.ip, "filter", "INPUT"), .scopedAccept(proxyPort: 1, originalPort: 2, form: .native)),
                .insertRule(ChainRef(.ip, "filter", "missing"), .scopedAccept(proxyPort: 1, originalPort: 2, form: .native)),
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

/// Where the redirect goes on each shape of host, and why.
struct BackendDecisionTests {
    let options = try! TakeoverOptions(ttl: .seconds(600), proxy: .external).validated()

    static func legacy(nat: Bool = true, rules: Bool = true, families: Set<Family> = [.ip, .ip6]) -> FirewallSnapshot {
        var tables: [HostTable] = []
        var chains: [HostChain] = []
        for family in families.sorted() {
            tables.append(HostTable(TableRef(family, "filter")))
            chains.append(HostChain(ChainRef(family, "filter", "INPUT"), hook: .input, policy: rules ? .drop : .accept, rules: rules ? 3 : 0))
            if nat {
                tables.append(HostTable(TableRef(family, "nat")))
                chains.append(HostChain(ChainRef(family, "nat", "PREROUTING"), hook: .prerouting, type: "nat", priority: -100, rules: 0))
            }
        }
        return FirewallSnapshot(generation: 0, tables: tables, chains: chains, families: families, ownedTables: false)
    }

    static func nftables(_ chains: [HostChain] = [], ownedTables: Bool = true) -> FirewallSnapshot {
        FirewallSnapshot(
            generation: 7, tables: Array(Set(chains.map(\.ref.table))).sorted().map { HostTable($0) }, chains: chains,
            ownedTables: ownedTables)
    }

    func decide(_ choice: BackendChoice = .auto, nft: FirewallSnapshot?, legacy: FirewallSnapshot?) throws -> BackendDecision {
        try BackendDecision.make(choice, nftables: nft, iptablesLegacy: legacy, unavailable: [.nftables: "no nf_tables"])
    }

    @Test func aFirewallInXtablesAloneGetsTheRedirectThere() throws {
        let d = try decide(nft: Self.nftables(), legacy: Self.legacy())
        #expect(d.redirect == .iptablesLegacy)
        #expect(d.firewall == [.iptablesLegacy])
        #expect(d.reasons.joined().contains("iptables-legacy only"))
        let plan = try RedirectPlan.make(options, nftables: Self.nftables(), iptablesLegacy: Self.legacy(), now: 2_000)
        #expect(plan.installSteps.map(\.description) == [
            "iptables-legacy ip filter", "iptables-legacy ip6 filter", "iptables-legacy ip nat", "iptables-legacy ip6 nat",
        ])
        #expect(plan.iptablesLegacy!.redirects.map(\.spec) == Array(repeating: .expiringRedirect(port: 80, proxyPort: 12347, until: 602), count: 2))
    }

    /// x_tables tables cannot be deleted, so begin never makes one: without nat tables, the
    /// redirect goes into nftables and the accepts still go into x_tables' filter INPUT.
    @Test func noXtablesNatTableSendsTheRedirectToNftables() throws {
        let plan = try RedirectPlan.make(options, nftables: Self.nftables(), iptablesLegacy: Self.legacy(nat: false), now: 0)
        #expect(plan.decision.redirect == .nftables)
        #expect(plan.decision.reasons.joined().contains("no nat table for IPv4 and IPv6"))
        #expect(plan.iptablesLegacy!.accepts.map(\.chain) == [ChainRef(.ip, "filter", "INPUT"), ChainRef(.ip6, "filter", "INPUT")])
        #expect(plan.installSteps.map(\.description) == ["iptables-legacy ip filter", "iptables-legacy ip6 filter", "nftables batch"])
    }

    @Test func withoutOwnedTablesXtablesHoldsTheRedirect() throws {
        let d = try decide(nft: Self.nftables([HostChain(ChainRef(.inet, "fw", "input"), hook: .input)], ownedTables: false), legacy: Self.legacy())
        #expect(d.redirect == .iptablesLegacy)
        #expect(d.reasons.joined().contains("5.12"))
    }

    @Test func bothSystemsHoldingTheFirewallKeepTheRedirectInNftables() throws {
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

    @Test func nothingCanHoldTheRedirect() throws {
        #expect {
            try decide(nft: nil, legacy: Self.legacy(nat: false))
        } throws: { error in
            let e = error as? LERedirectError
            return e?.kind == .unsupported && e!.message.contains("no nf_tables") && e!.message.contains("no nat table")
        }
    }

    @Test func aForcedBackendThatCannotHoldTheRedirectIsRefused() throws {
        #expect {
            try decide(.nftables, nft: Self.nftables(ownedTables: false), legacy: Self.legacy())
        } throws: { ($0 as? LERedirectError)?.message.contains("--backend nftables") == true }
        #expect {
            try decide(.iptablesLegacy, nft: Self.nftables(), legacy: Self.legacy(nat: false))
        } throws: { ($0 as? LERedirectError)?.message.contains("cannot be deleted once made") == true }
        #expect(try decide(.iptablesLegacy, nft: Self.nftables(), legacy: Self.legacy()).redirect == .iptablesLegacy)
        #expect(try decide(.nftables, nft: Self.nftables(), legacy: Self.legacy()).redirect == .nftables)
    }

    /// x_tables without IPv6 needs only the IPv4 nat table.
    @Test func anXtablesWithoutIPv6NeedsOnlyItsIPv4NatTable() throws {
        let plan = try RedirectPlan.make(options, nftables: nil, iptablesLegacy: Self.legacy(families: [.ip]), now: 0)
        #expect(plan.decision.redirect == .iptablesLegacy)
        #expect(plan.iptablesLegacy!.redirects.map(\.chain) == [ChainRef(.ip, "nat", "PREROUTING")])
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
