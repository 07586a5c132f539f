@testable import LERedirectModel
import Testing

/// --address: what parses, what prints as nft and iptables-save print it, what is refused, and
/// the plan it gives on each backend.
struct AddressTests {
    @Test(arguments: [
        ("192.0.2.1", "192.0.2.1"), ("10.0.0.255", "10.0.0.255"), ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"), ("fd99::", "fd99::"), ("::ffff:0:1:1", "::ffff:0:1:1"),
        ("2001:db8:0:1:0:0:0:1", "2001:db8:0:1::1"), ("2001:0:0:1:0:0:1:1", "2001::1:0:0:1:1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2:3:4:5:6"), ("2001:db8:0:2:3:4:5:6", "2001:db8:0:2:3:4:5:6"),
        ("64:ff9b::192.0.2.1", "64:ff9b::c000:201"), ("fe80::1", "fe80::1"),
    ])
    func parsesAndPrintsAsTheKernelsToolsDo(_ text: String, _ printed: String) throws {
        let address = try #require(IPAddress(text))
        #expect(address.description == printed)
        #expect(IPAddress(printed) == address)
    }

    @Test(arguments: [
        "", "1.2.3", "1.2.3.4.5", "256.1.1.1", "01.2.3.4", "1.2.3.-4", "1.2.3.4/32", " 1.2.3.4", "1.2.3.4 ",
        "fd99::1/64", "fe80::1%eth0", ":::1", "1::2::3", "12345::1", "1:2:3:4:5:6:7:8:9", "1:2:3:4:5:6:7", "g::1",
        "::1.2.3", "1.2.3.4::", "2001:db8::1:2:3:4:5:6", "localhost", "١.٢.٣.٤",
    ])
    func refusesWhatIsNotOneAddress(_ text: String) {
        #expect(IPAddress(text) == nil)
    }

    @Test(arguments: [
        ("0.0.0.0", "unspecified"), ("127.0.0.1", "loopback"), ("224.0.0.1", "unicast"), ("::", "unspecified"),
        ("::1", "loopback"), ("ff02::1", "unicast"), ("::ffff:192.0.2.1", "IPv4-mapped"), ("::10.99.0.3", "IPv4-compatible"),
        ("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("febf::1", "link-local"),
    ])
    func refusesAddressesNoClientFromOutsideReaches(_ text: String, _ reason: String) {
        #expect(throws: LERedirectError.self) {
            try TakeoverOptions(proxy: .external, addresses: [text]).validated()
        }
        #expect(IPAddress(text)!.unusableReason?.contains(reason) == true)
    }

    @Test func optionsAreSortedWithoutRepeats() throws {
        let options = try TakeoverOptions(proxy: .external, addresses: ["fd99::1", "10.0.0.2", "10.0.0.1", "FD99::1"]).validated()
        #expect(options.addresses.map(\.description) == ["10.0.0.1", "10.0.0.2", "fd99::1"])
        #expect(options.steeredFamilies == [.ip, .ip6])
        #expect(try TakeoverOptions(proxy: .external, addresses: ["10.0.0.1"]).validated().steeredFamilies == [.ip])
        do {
            _ = try TakeoverOptions(proxy: .external, addresses: ["10.0.0.0/8"]).validated()
            Issue.record("a prefix was accepted")
        } catch {
            #expect(error.message.contains("--address 10.0.0.0/8 is not an IPv4 or IPv6 address"))
        }
    }

    /// nftables: one steering rule per address, and where the host has nat, one identity binding
    /// per address; nothing for a family no address names.
    @Test func nftablesGetsARulePerAddress() throws {
        let options = try TakeoverOptions(ttl: .seconds(600), proxy: .external, addresses: ["fd99::1", "10.99.0.3"]).validated()
        let kernel = FakeKernel()
        kernel.addChain(HostChain(ChainRef(.ip, "nat", "PREROUTING"), hook: .prerouting, type: "nat", priority: -100))
        let plan = try RedirectPlan.make(options, from: kernel.connect().snapshot())
        let v4 = IPAddress("10.99.0.3")!, v6 = IPAddress("fd99::1")!
        let inserted = plan.nftablesStep!.changes.compactMap { change -> RuleSpec? in
            if case .insertRule(_, let spec) = change { return spec }
            return nil
        }
        // Inserted at the head, last first: listed in address order.
        #expect(inserted == [
            .steer(set: "ports", proxyPort: 12347, address: v6), .steer(set: "ports", proxyPort: 12347, address: v4),
            .keepDestination(set: "ports", family: .ip6, address: v6), .keepDestination(set: "ports", family: .ip, address: v4),
        ])
        #expect(inserted[1].description
            == #"iifname != "lo" fib daddr type local ip daddr 10.99.0.3 tcp dport @ports tcp flags syn / fin,syn,rst,ack tproxy to :12347 counter comment "LE""#)
        #expect(inserted[3].description
            == #"iifname != "lo" fib daddr type local ip daddr 10.99.0.3 tcp dport @ports tcp flags syn / fin,syn,rst,ack dnat ip to ip daddr comment "LE""#)

        let only4 = try TakeoverOptions(proxy: .external, addresses: ["10.99.0.3"]).validated()
        let plan4 = try RedirectPlan.make(only4, from: FakeKernel().connect().snapshot())
        #expect(plan4.steeringRules == [.steer(set: "ports", proxyPort: 12347, address: v4)])
    }

    /// x_tables: an address of a family x_tables does not hold here (no ip6_tables) is refused,
    /// not quietly left unsteered; a mixed list gets each address in its own family's chains.
    @Test func xtablesRefusesAnAddressOfAFamilyItDoesNotHold() throws {
        let nft = FirewallSnapshot(generation: 1, tables: [], chains: [], ownedTables: false)
        func legacy(_ families: Set<Family>) -> FirewallSnapshot {
            let refs = families.sorted().map { TableRef($0, "mangle") }
            return FirewallSnapshot(
                generation: 0, tables: refs.map { HostTable($0) },
                chains: refs.map { HostChain(ChainRef($0, "PREROUTING"), hook: .prerouting, rules: 0) }, families: families,
                ownedTables: false)
        }
        let mixed = try TakeoverOptions(proxy: .external, addresses: ["fd99::1", "10.99.0.3"]).validated()
        do {
            _ = try RedirectPlan.make(mixed, nftables: nft, iptablesLegacy: legacy([.ip]), now: 0)
            Issue.record("an IPv6 address was accepted without ip6_tables")
        } catch {
            #expect(error.message.contains("--address fd99::1: iptables-legacy has no IPv6 tables"))
        }
        let plan = try RedirectPlan.make(mixed, nftables: nft, iptablesLegacy: legacy([.ip, .ip6]), now: 0)
        #expect(plan.iptablesLegacy!.steers.map { "\($0.chain.table.family) \($0.spec.address!)" } == ["ip 10.99.0.3", "ip6 fd99::1"])
        #expect(plan.iptablesLegacy!.steers[1].spec.description.hasPrefix("-d fd99::1/128 ! -i lo "))
        #expect(plan.iptablesLegacy!.steers[1].spec.description.contains("--on-ip :: "))
    }

    /// x_tables: a rule per address in its own family's chain (`-d ADDRESS/32` or `/128`).
    @Test func xtablesGetsARulePerAddressInItsFamily() throws {
        let options = try TakeoverOptions(ttl: .seconds(600), proxy: .external, addresses: ["10.99.0.3", "10.99.0.4"]).validated()
        let nft = FirewallSnapshot(generation: 1, tables: [], chains: [], ownedTables: false)
        var tables: [HostTable] = []
        var chains: [HostChain] = []
        for family in [Family.ip, .ip6] {
            for table in ["mangle", "nat"] {
                tables.append(HostTable(TableRef(family, table)))
                chains.append(HostChain(ChainRef(family, table, "PREROUTING"), hook: .prerouting, rules: 0))
            }
        }
        let legacy = FirewallSnapshot(generation: 0, tables: tables, chains: chains, families: [.ip, .ip6], ownedTables: false)
        let plan = try RedirectPlan.make(options, nftables: nft, iptablesLegacy: legacy, now: 2_000)
        let steers = plan.iptablesLegacy!.steers
        #expect(steers.map(\.chain) == [ChainRef(.ip, "mangle", "PREROUTING"), ChainRef(.ip, "mangle", "PREROUTING")])
        #expect(steers.map { $0.spec.address?.description } == ["10.99.0.3", "10.99.0.4"])
        #expect(plan.iptablesLegacy!.keepDestinations.map(\.chain) == [ChainRef(.ip, "nat", "PREROUTING"), ChainRef(.ip, "nat", "PREROUTING")])
        #expect(steers[0].spec.description.hasPrefix("-d 10.99.0.3/32 ! -i lo -p tcp -m tcp --dport 80 "))
        #expect(plan.installSteps.map(\.description) == ["iptables-legacy ip nat", "iptables-legacy ip mangle"])
    }

    /// --include-local: a postrouting chain marks the host's own SYNs (every user's but the
    /// proxy's, whose SYNs are unmarked whatever set the bit) and a lo chain before raw steers and
    /// clears them; refused without the proxy's user, with an external proxy and on the legacy path.
    @Test func includeLocalPlansTwoChainsOnNftablesOnly() throws {
        let options = try TakeoverOptions(
            ttl: .seconds(600), proxy: .builtIn(ProxyOptions(challenge: .memory)), addresses: ["10.99.0.3"], includeLocal: true
        ).validated()
        let snapshot = try FakeKernel().connect().snapshot()
        let plan = try RedirectPlan.make(options, nftables: snapshot, iptablesLegacy: nil, proxyUID: 999, now: 0)
        let changes = plan.nftablesStep!.changes
        #expect(changes.contains(.addBaseChain(RedirectPlan.localSteeringChain, type: "filter", hook: .prerouting, priority: -301)))
        #expect(changes.contains(.addBaseChain(RedirectPlan.localChain, type: "filter", hook: .postrouting, priority: 1000)))
        let address = IPAddress("10.99.0.3")!
        func inserted(_ chain: ChainRef) -> [RuleSpec] {
            changes.compactMap { if case .insertRule(chain, let spec) = $0 { spec } else { nil } }.reversed()
        }
        #expect(inserted(RedirectPlan.localChain) == [
            .markLocal(set: "ports", exemptUID: 999, mark: 0x4000_0000, address: address),
            .unmarkProxy(set: "ports", uid: 999, mark: 0x4000_0000),
        ])
        #expect(inserted(RedirectPlan.localSteeringChain) == [
            .steerLocal(set: "ports", proxyPort: 12347, mark: 0x4000_0000, address: address), .clearLocal(mark: 0x4000_0000),
        ])
        #expect(inserted(RedirectPlan.localChain)[0].description.hasPrefix(
            "meta skuid != 999 fib daddr type local ip daddr 10.99.0.3 tcp dport @ports "))
        // Without it, neither chain.
        let plain = try RedirectPlan.make(
            try TakeoverOptions(proxy: .builtIn(ProxyOptions(challenge: .memory))).validated(), nftables: snapshot,
            iptablesLegacy: nil, proxyUID: 999, now: 0)
        #expect(!plain.nftablesStep!.changes.contains { $0.description.contains("local-") })

        #expect(throws: LERedirectError.self) {
            try RedirectPlan.make(options, nftables: snapshot, iptablesLegacy: nil, proxyUID: nil, now: 0)
        }
        #expect(throws: LERedirectError.self) {
            try RedirectPlan.make(options, nftables: snapshot, iptablesLegacy: nil, proxyUID: 0, now: 0)
        }
        #expect(throws: LERedirectError.self) { try TakeoverOptions(proxy: .external, includeLocal: true).validated() }
        let legacyOnly = try TakeoverOptions(
            backend: .iptablesLegacy, proxy: .builtIn(ProxyOptions(challenge: .memory)), includeLocal: true
        ).validated()
        let mangle = FirewallSnapshot(
            generation: 0, tables: [HostTable(TableRef(.ip, "mangle"))],
            chains: [HostChain(ChainRef(.ip, "mangle", "PREROUTING"), hook: .prerouting, rules: 0)], families: [.ip], ownedTables: false)
        do {
            _ = try RedirectPlan.make(legacyOnly, nftables: snapshot, iptablesLegacy: mangle, proxyUID: 999, now: 0)
            Issue.record("--include-local was planned on the legacy path")
        } catch {
            #expect(error.kind == .unsupported)
            #expect(error.message.contains("Nothing was changed"))
        }
    }
}
