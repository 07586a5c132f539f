import Foundation
@testable import LERedirect
import Logging
import Testing

/// The session logic on x_tables, against fake kernels: the legacy path (kernels without owned
/// tables, or `--backend iptables-legacy`) puts one steering rule per family at the head of mangle
/// PREROUTING, journalled before each commit, removed by content and count; and an x_tables host
/// on a kernel with owned tables gets our nftables table and nothing in x_tables.
struct LegacyEngineTests {
    let options = try! TakeoverOptions(ttl: .seconds(600), backend: .iptablesLegacy, proxy: .external).validated()
    let auto = try! TakeoverOptions(ttl: .seconds(600), proxy: .external).validated()
    let namespace = NamespaceIdentity(device: 4, inode: 1234)
    let me = ProcessIdentity(kind: .daemon, pid: 1, startTicks: 1, bootID: "test")

    func engine() throws -> (SessionEngine, StateDirectory) {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("le-redirect-unit-\(UUID().uuidString)").path
        let state = StateDirectory(path: path)
        try state.prepare()
        var engine = SessionEngine(state: state, logger: Logger(label: "test"))
        engine.isAlive = { _ in false }
        engine.beforeCommit = { _ in }
        engine.kernel = { KernelSupport(nftTproxy: true, xtTproxy: true, evidence: "test") }
        return (engine, state)
    }

    /// x_tables with filter INPUT (policy drop) in both families, mangle PREROUTING unless
    /// `mangle` is false, and nat PREROUTING with a redirect of the host's own.
    static func legacyHost(mangle: Bool = true) -> FakeKernel {
        let kernel = FakeKernel(.iptablesLegacy)
        for family in [Family.ip, .ip6] {
            let input = ChainRef(family, "filter", "INPUT")
            kernel.addChain(HostChain(input, hook: .input, type: "filter", priority: 0, policy: .drop))
            kernel.addRule(input, "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
            kernel.addRule(input, "-p tcp -m multiport --dports 22,80 -j ACCEPT")
            kernel.addChain(HostChain(ChainRef(family, "filter", "OUTPUT"), hook: .output, type: "filter", priority: 0, policy: .accept))
            if mangle {
                let prerouting = ChainRef(family, "mangle", "PREROUTING")
                kernel.addChain(HostChain(prerouting, hook: .prerouting, type: "filter", priority: -150, policy: .accept))
                kernel.addRule(prerouting, "-p tcp -m tcp --dport 443 -j MARK --set-mark 1")
            }
            let nat = ChainRef(family, "nat", "PREROUTING")
            kernel.addChain(HostChain(nat, hook: .prerouting, type: "nat", priority: -100, policy: .accept))
            kernel.addRule(nat, "-p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 80")
        }
        return kernel
    }

    /// Every change each kernel is asked to commit, in order, as "system table".
    final class Recorder: @unchecked Sendable {
        private let lock = NSLock()
        private var entries: [String] = []
        var log: [String] { lock.withLock { entries } }
        func watch(_ kernel: FakeKernel, also: (@Sendable (FirewallChange) -> Void)? = nil) {
            kernel.injectFault { [self] change in
                let what: String =
                    switch change {
                    case .insertRule(_, let spec): "insert \(spec.kind.rawValue)"
                    case .deleteMatching, .deleteRule: "delete"
                    default: "\(change)".components(separatedBy: " ").prefix(2).joined(separator: " ")
                    }
                lock.withLock { entries.append("\(kernel.system) \(change.table) \(what)") }
                also?(change)
                return nil
            }
        }
    }

    @Test func theLegacyPathGetsAccountedCommitsInOrder() throws {
        let legacy = Self.legacyHost(), nft = FakeKernel()
        let (before, nftBefore) = (legacy.listing(), nft.listing())
        let (engine, state) = try engine()
        let recorder = Recorder()
        let journalled = Locked<[Journal]>([])
        recorder.watch(legacy) { _ in
            if let text = try? state.readJournal(), let journal = try? Journal.decode(text) { journalled.mutate { $0.append(journal) } }
        }
        recorder.watch(nft)
        let firewalls = Firewalls([nft.connect(), legacy.connect()])
        let journal = try engine.install(options, firewalls: firewalls, holder: me, namespace: namespace, now: 1_000_000)
        #expect(journal.backend == .iptablesLegacy)
        #expect(journal.phase == .installed)
        // A table per commit: the identity bindings in nat first, then the steering in mangle;
        // nothing in filter, nothing in nftables.
        #expect(recorder.log == [
            "iptables-legacy ip nat insert redirect", "iptables-legacy ip6 nat insert redirect",
            "iptables-legacy ip mangle insert redirect", "iptables-legacy ip6 mangle insert redirect",
        ])
        #expect(nft.listing() == nftBefore)
        // Before each commit, the journal already counted the identical rules of that commit's chain.
        for (index, seen) in journalled.value.enumerated() {
            #expect(seen.rules.count == 4)
            #expect(seen.rules.prefix(index + 1).allSatisfy { $0.preexisting == 0 }, "commit \(index)")
        }
        #expect(journal.rules.map(\.kind) == [.redirect, .redirect, .redirect, .redirect])
        #expect(journal.rules.map(\.chain) == [
            ChainRef(.ip, "nat", "PREROUTING"), ChainRef(.ip6, "nat", "PREROUTING"),
            ChainRef(.ip, "mangle", "PREROUTING"), ChainRef(.ip6, "mangle", "PREROUTING"),
        ])
        // The steering goes after the host's own mangle rules (they must see the SYN first); the
        // identity binding before the host's nat rules.
        #expect(legacy.listing().contains("MARK --set-mark 1\n\t\t! -i lo"), "\(legacy.listing())")
        #expect(legacy.listing().contains("--datestop 1970-01-01T00:26:40 "))  // 1,000 s + the 600 s TTL
        #expect(legacy.listing().contains("-j TPROXY --on-port 12347"))
        #expect(try Journal.decode(try #require(try state.readJournal())) == journal)

        var duringDrain = ""
        let warnings = try engine.uninstall(journal, firewalls: firewalls) { duringDrain = legacy.listing() }
        #expect(warnings.isEmpty)
        // The steering is out before the drain.
        #expect(!duringDrain.contains("TPROXY"))
        #expect(Array(recorder.log.suffix(4)) == [
            "iptables-legacy ip mangle delete", "iptables-legacy ip nat delete", "iptables-legacy ip6 mangle delete",
            "iptables-legacy ip6 nat delete",
        ])
        #expect(legacy.listing() == before)
        #expect(try state.readJournal() == nil)
    }

    /// A kernel with owned tables: an x_tables-only host gets our nftables table, and x_tables is
    /// neither read nor changed (its rules decide who reaches port 80 as always).
    @Test func anXtablesHostOnAKernelWithOwnedTablesGetsOurTable() throws {
        let legacy = Self.legacyHost(), nft = FakeKernel()
        let before = legacy.listing()
        let (engine, state) = try engine()
        let recorder = Recorder()
        recorder.watch(legacy)
        let firewalls = Firewalls([nft.connect(), legacy.connect()])
        let journal = try engine.install(auto, firewalls: firewalls, holder: me, namespace: namespace, now: 0)
        #expect(journal.backend == .nftables)
        #expect(journal.rules.isEmpty)
        #expect(recorder.log.isEmpty)
        #expect(nft.tableExists(TableRef.own))
        _ = try engine.uninstall(journal, firewalls: firewalls)
        #expect(legacy.listing() == before)
        #expect(!nft.tableExists(TableRef.own))
        #expect(try state.readJournal() == nil)
    }

    @Test func aRefusedCommitTakesBackTheTablesCommittedBeforeIt() throws {
        let legacy = Self.legacyHost(), nft = FakeKernel()
        let before = legacy.listing()
        let (engine, state) = try engine()
        legacy.injectFault { change in
            if case .insertRule(let chain, _) = change, chain.table == TableRef(.ip6, "mangle") {
                return FirewallError(.notFound, doing: "inserting into \(chain)", detail: "No chain/target/match by that name")
            }
            return nil
        }
        #expect {
            try engine.install(
                options, firewalls: Firewalls([nft.connect(), legacy.connect()]), holder: me, namespace: namespace, now: 0)
        } throws: { error in
            let e = error as? LERedirectError
            return e?.message.contains("ip6 mangle") == true && e!.message.contains("removed again")
        }
        #expect(legacy.listing() == before)
        #expect(try state.readJournal() == nil)
    }

    /// x_tables tables cannot be deleted, so begin never makes one: no mangle table, no legacy path.
    @Test func noMangleTableIsRefusedAndNothingIsMade() throws {
        let legacy = Self.legacyHost(mangle: false), nft = FakeKernel()
        let before = legacy.listing()
        let (engine, state) = try engine()
        #expect {
            try engine.install(
                options, firewalls: Firewalls([nft.connect(), legacy.connect()]), holder: me, namespace: namespace, now: 0)
        } throws: { ($0 as? LERedirectError)?.message.contains("no mangle table") == true }
        #expect(legacy.listing() == before)
        #expect(try state.readJournal() == nil)
    }

    /// Invariant 3 between two tables' commits: the process dies before a commit (the crash
    /// image), and recovery from the journal it left restores the ruleset exactly.
    @Test(arguments: ["iptables-legacy ip mangle", "iptables-legacy ip6 mangle"])
    func aCrashBeforeAnyCommitIsRecovered(at step: String) throws {
        let legacy = Self.legacyHost(), nft = FakeKernel()
        let before = legacy.listing()
        var (engine, state) = try engine()
        let image = Locked<(FakeKernel, FakeKernel, String)?>(nil)
        engine.beforeCommit = { name in
            if name == step, let journal = try? state.readJournal() {
                image.set((legacy.crashImage(), nft.crashImage(), journal))
            }
        }
        _ = try engine.install(
            options, firewalls: Firewalls([nft.connect(), legacy.connect()]), holder: me, namespace: namespace, now: 0)
        let (crashedLegacy, crashedNft, journal) = try #require(image.value)
        #expect(crashedLegacy.listing() != before || step == "iptables-legacy ip mangle")

        let (recovering, recoveredState) = try self.engine()
        try journal.write(toFile: recoveredState.journalPath, atomically: true, encoding: .utf8)
        let report = try recovering.recover(
            sweep: false, firewalls: Firewalls([crashedNft.connect(), crashedLegacy.connect()]), namespace: namespace)
        #expect(report.recoveredJournal)
        #expect(crashedLegacy.listing() == before)
        #expect(try recoveredState.readJournal() == nil)
    }

    /// A host that kept a copy of our rule (a ruleset saved during a window and restored) keeps
    /// it: removal takes out only as many copies as begin added.
    @Test func aCopyTheHostAlreadyHadIsKept() throws {
        let legacy = Self.legacyHost(), nft = FakeKernel()
        let prerouting = ChainRef(.ip, "mangle", "PREROUTING")
        legacy.addRule(prerouting, .expiringSteer(port: 80, proxyPort: 12347, until: 600))
        let before = legacy.listing()
        let (engine, _) = try engine()
        let firewalls = Firewalls([nft.connect(), legacy.connect()])
        let journal = try engine.install(options, firewalls: firewalls, holder: me, namespace: namespace, now: 0)
        #expect(journal.rules.first { $0.chain == prerouting }?.preexisting == 1)
        #expect(legacy.listing().components(separatedBy: "-j TPROXY --on-port 12347").count - 1 == 3)
        _ = try engine.uninstall(journal, firewalls: firewalls)
        #expect(legacy.listing() == before)
    }

    @Test func anArmedPerChallengeSteeringGoesInAndOut() throws {
        let legacy = Self.legacyHost(), nft = FakeKernel()
        let before = legacy.listing()
        let (engine, _) = try engine()
        let memory = try TakeoverOptions(
            ttl: .seconds(600), backend: .iptablesLegacy, proxy: .builtIn(ProxyOptions(challenge: .memory))
        ).validated()
        let firewalls = Firewalls([nft.connect(), legacy.connect()])
        let journal = try engine.install(memory, firewalls: firewalls, holder: me, namespace: namespace, now: 0)
        let steers = { legacy.listing().components(separatedBy: "TPROXY --on-port 12347").count - 1 }
        #expect(steers() == 0)
        #expect(journal.rules.filter { $0.kind == .redirect }.allSatisfy { $0.preexisting == 0 })
        try engine.arm(journal, firewalls: firewalls, remaining: .seconds(60))
        #expect(steers() == 2)
        try engine.arm(journal, firewalls: firewalls, remaining: .seconds(60))  // armed already: no second copy
        #expect(steers() == 2)
        try engine.disarm(journal, firewalls: firewalls)
        #expect(steers() == 0)
        _ = try engine.uninstall(journal, firewalls: firewalls)
        #expect(legacy.listing() == before)
    }

    /// --address on the legacy path, armed per challenge: each journalled rule is rebuilt with its
    /// own address (two in one chain, one of the other family), and nothing else goes in.
    @Test func anArmedSteeringKeepsItsAddresses() throws {
        let legacy = Self.legacyHost(), nft = FakeKernel()
        let before = legacy.listing()
        var (engine, _) = try engine()
        let named = ["10.99.0.3", "10.99.0.4", "fd99::1"]
        engine.localAddresses = { (named + ["10.99.0.1"]).compactMap(IPAddress.init) }
        let memory = try TakeoverOptions(
            ttl: .seconds(600), backend: .iptablesLegacy, proxy: .builtIn(ProxyOptions(challenge: .memory)), addresses: named
        ).validated()
        let firewalls = Firewalls([nft.connect(), legacy.connect()])
        let journal = try engine.install(memory, firewalls: firewalls, holder: me, namespace: namespace, now: 0)
        #expect(journal.rules.filter { $0.chain.table.name == "mangle" }.count == 3)
        #expect(legacy.listing() == before)
        try engine.arm(journal, firewalls: firewalls, remaining: .seconds(60), addresses: memory.addresses)
        let listing = legacy.listing()
        for address in ["-d 10.99.0.3/32 ", "-d 10.99.0.4/32 ", "-d fd99::1/128 "] {
            #expect(listing.components(separatedBy: address).count - 1 == 2, "\(address) in \(listing)")  // TPROXY and nat ACCEPT
        }
        #expect(listing.components(separatedBy: "TPROXY --on-port 12347").count - 1 == 3)
        try engine.arm(journal, firewalls: firewalls, remaining: .seconds(60), addresses: memory.addresses)  // armed already
        #expect(legacy.listing() == listing)
        try engine.disarm(journal, firewalls: firewalls)
        #expect(legacy.listing() == before)
        // Arming with addresses the journal's rules were not made for is refused, not guessed.
        #expect(throws: LERedirectError.self) {
            try engine.arm(journal, firewalls: firewalls, remaining: .seconds(60), addresses: [IPAddress("10.99.0.9")!])
        }
        #expect(legacy.listing() == before)
        _ = try engine.uninstall(journal, firewalls: firewalls)
        #expect(legacy.listing() == before)
    }

    /// begin refuses an address the host's interfaces do not have, or cannot be checked.
    @Test func anAddressNotOnTheHostIsRefusedBeforeAnythingChanges() throws {
        let legacy = Self.legacyHost(), nft = FakeKernel()
        let before = legacy.listing()
        var (engine, state) = try engine()
        let options = try TakeoverOptions(ttl: .seconds(600), backend: .iptablesLegacy, proxy: .external, addresses: ["10.99.0.3"])
            .validated()
        let firewalls = Firewalls([nft.connect(), legacy.connect()])
        for (local, kind) in [([IPAddress("10.99.0.1")!], LERedirectError.Kind.invalidArgument), (nil, .failed)] {
            engine.localAddresses = { local }
            do {
                _ = try engine.install(options, firewalls: firewalls, holder: me, namespace: namespace, now: 0)
                Issue.record("begin took over an address the host does not have")
            } catch {
                #expect(error.kind == kind)
                #expect(error.message.contains("Nothing was changed"))
            }
            #expect(legacy.listing() == before)
            #expect(try state.readJournal() == nil)
        }
    }

    /// A dead session of a version that rewrote connections left accepts in filter INPUT and
    /// redirects in nat PREROUTING, journalled with their counts: recover takes out exactly those.
    @Test func anOlderVersionsDeadLegacySessionIsRecovered() throws {
        let legacy = Self.legacyHost(), nft = FakeKernel()
        let before = legacy.listing()
        let (engine, state) = try engine()
        var entries: [Journal.Entry] = []
        let fw = legacy.connect()
        for family in [Family.ip, .ip6] {
            for (chain, text, kind) in [
                (ChainRef(family, "filter", "INPUT"), "-p tcp -m tcp --dport 12347 -m conntrack --ctstate DNAT --ctorigdstport 80 -j ACCEPT", RuleKind.accept),
                (ChainRef(family, "nat", "PREROUTING"), "-p tcp -m tcp --dport 80 -j REDIRECT --to-ports 12347", .redirect),
            ] {
                let location = legacy.addRule(chain, text, comment: "LE")
                let fingerprint = try #require(try fw.rules(in: chain).last).fingerprint
                #expect(location.chain == chain)
                entries.append(Journal.Entry(system: .iptablesLegacy, kind: kind, chain: chain, fingerprint: fingerprint, preexisting: 0))
            }
        }
        try state.writeJournal(Journal(
            phase: .installed, holder: me, namespace: namespace, backend: .iptablesLegacy, port: 80, proxyPort: 12347,
            proxy: "external", createdAt: 0, expiresAt: 1, rules: entries))
        let report = try engine.recover(sweep: false, firewalls: Firewalls([nft.connect(), fw]), namespace: namespace)
        #expect(report.removedRules == 4)
        #expect(legacy.listing() == before)
    }

    @Test func sweepRemovesTaggedXtablesRules() throws {
        let legacy = Self.legacyHost(), nft = FakeKernel()
        let before = legacy.listing()
        legacy.addRule(ChainRef(.ip, "filter", "INPUT"), "-p tcp --dport 12347 -j ACCEPT", comment: "LE")
        legacy.addRule(ChainRef(.ip6, "nat", "PREROUTING"), "-p tcp --dport 80 -j REDIRECT --to-ports 12347", comment: "LE")
        legacy.addRule(ChainRef(.ip6, "mangle", "PREROUTING"), .expiringSteer(port: 80, proxyPort: 12347, until: 5))
        legacy.addRule(ChainRef(.ip6, "mangle", "PREROUTING"), .expiringSteer(port: 80, proxyPort: 12347, until: 5))
        let (engine, _) = try engine()
        let report = try engine.recover(sweep: true, firewalls: Firewalls([nft.connect(), legacy.connect()]), namespace: namespace)
        #expect(report.removedRules == 4)
        #expect(legacy.listing() == before)
    }
}
