import Foundation
@testable import LERedirect
import Logging
import Testing

/// The session logic across nftables and x_tables, against two fake kernels: commit order,
/// the journal before each commit, removal by content and count, and recovery from a crash
/// between two tables' commits.
struct LegacyEngineTests {
    let options = try! TakeoverOptions(ttl: .seconds(600), proxy: .external).validated()
    let namespace = NamespaceIdentity(device: 4, inode: 1234)
    let me = ProcessIdentity(kind: .daemon, pid: 1, startTicks: 1, bootID: "test")

    func engine() throws -> (SessionEngine, StateDirectory) {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("le-redirect-unit-\(UUID().uuidString)").path
        let state = StateDirectory(path: path)
        try state.prepare()
        var engine = SessionEngine(state: state, logger: Logger(label: "test"))
        engine.isAlive = { _ in false }
        engine.beforeCommit = { _ in }
        return (engine, state)
    }

    /// x_tables with filter INPUT (policy drop) in both families, and nat PREROUTING unless `nat` is false.
    static func legacyHost(nat: Bool = true) -> FakeKernel {
        let kernel = FakeKernel(.iptablesLegacy)
        for family in [Family.ip, .ip6] {
            let input = ChainRef(family, "filter", "INPUT")
            kernel.addChain(HostChain(input, hook: .input, type: "filter", priority: 0, policy: .drop))
            kernel.addRule(input, "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
            kernel.addRule(input, "-p tcp -m multiport --dports 22,80 -j ACCEPT")
            kernel.addChain(HostChain(ChainRef(family, "filter", "OUTPUT"), hook: .output, type: "filter", priority: 0, policy: .accept))
            if nat {
                let prerouting = ChainRef(family, "nat", "PREROUTING")
                kernel.addChain(HostChain(prerouting, hook: .prerouting, type: "nat", priority: -100, policy: .accept))
                kernel.addRule(prerouting, "-p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 80")
            }
        }
        return kernel
    }

    /// nftables tables laid out as iptables-nft makes them.
    static func iptablesNftHost() -> FakeKernel {
        let kernel = FakeKernel()
        for family in [Family.ip, .ip6] {
            let input = ChainRef(family, "filter", "INPUT")
            kernel.addChain(HostChain(input, hook: .input, type: "filter", priority: 0, policy: .drop))
            kernel.addRule(input, "tcp dport 22 counter accept")
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

    @Test func anXtablesHostGetsAccountedCommitsInOrder() throws {
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
        // Accepts first, a table per commit, then the redirects; nothing in nftables.
        #expect(recorder.log == [
            "iptables-legacy ip filter insert accept", "iptables-legacy ip6 filter insert accept",
            "iptables-legacy ip nat insert redirect", "iptables-legacy ip6 nat insert redirect",
        ])
        #expect(nft.listing() == nftBefore)
        // Before each commit, the journal already counted the identical rules of that commit's chain.
        for (index, seen) in journalled.value.enumerated() {
            #expect(seen.rules.count == 4)
            #expect(seen.rules.prefix(index + 1).allSatisfy { $0.preexisting == 0 }, "commit \(index)")
        }
        #expect(journal.rules.map(\.kind) == [.accept, .accept, .redirect, .redirect])
        #expect(legacy.listing().contains("--datestop 1970-01-01T00:26:40 "))  // 1,000 s + the 600 s TTL
        #expect(try Journal.decode(try #require(try state.readJournal())) == journal)

        var duringDrain = ""
        let warnings = try engine.uninstall(journal, firewalls: firewalls) { duringDrain = legacy.listing() }
        #expect(warnings.isEmpty)
        // Redirects out before the drain, accepts only after it.
        #expect(!duringDrain.contains("REDIRECT --to-ports 12347"))
        #expect(duringDrain.components(separatedBy: "--comment LE -j ACCEPT").count - 1 == 2)
        #expect(Array(recorder.log.suffix(4)) == [
            "iptables-legacy ip nat delete", "iptables-legacy ip6 nat delete", "iptables-legacy ip filter delete",
            "iptables-legacy ip6 filter delete",
        ])
        #expect(legacy.listing() == before)
        #expect(try state.readJournal() == nil)
    }

    @Test func aRefusedCommitTakesBackTheTablesCommittedBeforeIt() throws {
        let legacy = Self.legacyHost(), nft = FakeKernel()
        let before = legacy.listing()
        let (engine, state) = try engine()
        legacy.injectFault { change in
            if case .insertRule(let chain, _) = change, chain.table == TableRef(.ip6, "nat") {
                return FirewallError(.notFound, doing: "inserting into \(chain)", detail: "No chain/target/match by that name")
            }
            return nil
        }
        #expect {
            try engine.install(
                options, firewalls: Firewalls([nft.connect(), legacy.connect()]), holder: me, namespace: namespace, now: 0)
        } throws: { error in
            let e = error as? LERedirectError
            return e?.message.contains("ip6 nat") == true && e!.message.contains("removed again")
        }
        #expect(legacy.listing() == before)
        #expect(try state.readJournal() == nil)
    }

    /// Invariant 3 between two tables' commits: the process dies after the filter commits (the crash
    /// image), and recovery from the journal it left restores the ruleset exactly.
    @Test(arguments: ["iptables-legacy ip filter", "iptables-legacy ip6 filter", "iptables-legacy ip nat", "iptables-legacy ip6 nat"])
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
        #expect(crashedLegacy.listing() != before || step == "iptables-legacy ip filter")

        let (recovering, recoveredState) = try self.engine()
        try journal.write(toFile: recoveredState.journalPath, atomically: true, encoding: .utf8)
        let report = try recovering.recover(
            sweep: false, firewalls: Firewalls([crashedNft.connect(), crashedLegacy.connect()]), namespace: namespace)
        #expect(report.recoveredJournal)
        #expect(crashedLegacy.listing() == before)
        #expect(try recoveredState.readJournal() == nil)
    }

    /// A host that kept a copy of our accept (a ruleset saved during a window and restored) keeps
    /// it: removal takes out only as many copies as begin added.
    @Test func aCopyTheHostAlreadyHadIsKept() throws {
        let legacy = Self.legacyHost(), nft = FakeKernel()
        let input = ChainRef(.ip, "filter", "INPUT")
        legacy.addRule(input, .scopedAccept(proxyPort: 12347, originalPort: 80, form: .xtables))
        let before = legacy.listing()
        let (engine, _) = try engine()
        let firewalls = Firewalls([nft.connect(), legacy.connect()])
        let journal = try engine.install(options, firewalls: firewalls, holder: me, namespace: namespace, now: 0)
        #expect(journal.rules.first { $0.chain == input }?.preexisting == 1)
        #expect(legacy.listing().components(separatedBy: "--comment LE -j ACCEPT").count - 1 == 3)
        _ = try engine.uninstall(journal, firewalls: firewalls)
        #expect(legacy.listing() == before)
    }

    @Test func anArmedPerChallengeRedirectGoesInAndOut() throws {
        let legacy = Self.legacyHost(), nft = FakeKernel()
        let before = legacy.listing()
        let (engine, _) = try engine()
        let memory = try TakeoverOptions(ttl: .seconds(600), proxy: .builtIn(ProxyOptions(challenge: .memory))).validated()
        let firewalls = Firewalls([nft.connect(), legacy.connect()])
        let journal = try engine.install(memory, firewalls: firewalls, holder: me, namespace: namespace, now: 0)
        let redirects = { legacy.listing().components(separatedBy: "REDIRECT --to-ports 12347").count - 1 }
        #expect(redirects() == 0)
        #expect(journal.rules.filter { $0.kind == .redirect }.allSatisfy { $0.preexisting == 0 })
        try engine.arm(journal, firewalls: firewalls, remaining: .seconds(60))
        #expect(redirects() == 2)
        try engine.arm(journal, firewalls: firewalls, remaining: .seconds(60))  // armed already: no second copy
        #expect(redirects() == 2)
        try engine.disarm(journal, firewalls: firewalls)
        #expect(redirects() == 0)
        _ = try engine.uninstall(journal, firewalls: firewalls)
        #expect(legacy.listing() == before)
    }

    /// Both systems hold input chains: each gets the accept (iptables-nft's chains in iptables'
    /// form), and the owned nftables table holds the redirect.
    @Test func bothSystemsGetTheAcceptAndNftablesHoldsTheRedirect() throws {
        let legacy = Self.legacyHost(), nft = Self.iptablesNftHost()
        let (before, nftBefore) = (legacy.listing(), nft.listing())
        let (engine, state) = try engine()
        let recorder = Recorder()
        recorder.watch(legacy)
        recorder.watch(nft)
        let firewalls = Firewalls([nft.connect(), legacy.connect()])
        let journal = try engine.install(options, firewalls: firewalls, holder: me, namespace: namespace, now: 0)
        #expect(journal.backend == .nftables)
        #expect(journal.accepts.map(\.system) == [.iptablesLegacy, .iptablesLegacy, .nftables, .nftables])
        #expect(recorder.log.prefix(2) == ["iptables-legacy ip filter insert accept", "iptables-legacy ip6 filter insert accept"])
        #expect(recorder.log.dropFirst(2).allSatisfy { $0.hasPrefix("nftables") })
        #expect(nft.listing().contains(RuleSpec.scopedAccept(proxyPort: 12347, originalPort: 80, form: .xtables).description))
        #expect(!legacy.listing().contains("REDIRECT --to-ports 12347"))
        _ = try engine.uninstall(journal, firewalls: firewalls)
        #expect(legacy.listing() == before)
        #expect(nft.listing() == nftBefore)
        #expect(try state.readJournal() == nil)
    }

    @Test func sweepRemovesTaggedXtablesRules() throws {
        let legacy = Self.legacyHost(), nft = FakeKernel()
        let before = legacy.listing()
        legacy.addRule(ChainRef(.ip, "filter", "INPUT"), .scopedAccept(proxyPort: 12347, originalPort: 80, form: .xtables))
        legacy.addRule(ChainRef(.ip6, "nat", "PREROUTING"), .expiringRedirect(port: 80, proxyPort: 12347, until: 5))
        legacy.addRule(ChainRef(.ip6, "nat", "PREROUTING"), .expiringRedirect(port: 80, proxyPort: 12347, until: 5))
        let (engine, _) = try engine()
        let report = try engine.recover(sweep: true, firewalls: Firewalls([nft.connect(), legacy.connect()]), namespace: namespace)
        #expect(report.removedRules == 3)
        #expect(legacy.listing() == before)
    }
}
