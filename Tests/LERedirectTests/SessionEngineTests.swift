import Foundation
@testable import LERedirect
import Logging
import Testing

/// The session logic against the fake backend: what begin commits and journals, what end and
/// recover remove, and that a host's ruleset always comes back exactly.
struct SessionEngineTests {
    let options = try! TakeoverOptions(ttl: .seconds(600), proxy: .external).validated()
    let namespace = NamespaceIdentity(device: 4, inode: 1234)
    let me = ProcessIdentity(kind: .daemon, pid: 1, startTicks: 1, bootID: "test")

    /// A state directory of its own, and an engine whose holders are alive unless `dead` says so.
    func engine(dead: Bool = true) throws -> (SessionEngine, StateDirectory) {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("le-redirect-unit-\(UUID().uuidString)").path
        let state = StateDirectory(path: path)
        try state.prepare()
        var engine = SessionEngine(state: state, logger: Logger(label: "test"))
        engine.isAlive = { _ in !dead }
        return (engine, state)
    }

    /// Installs a session on `kernel` and drops its connection, as the daemon's death would: the
    /// owned table goes, the accepts and the journal stay.
    func crash(_ engine: SessionEngine, on kernel: FakeKernel) throws {
        let daemon = kernel.connect()
        _ = try engine.install(options, firewalls: Firewalls([daemon]), holder: me, namespace: namespace, now: 0)
        daemon.close()
    }

    static func typicalHost() -> FakeKernel {
        let kernel = FakeKernel()
        for (family, table, chain) in [(Family.ip, "filter", "INPUT"), (.ip6, "filter", "INPUT"), (.inet, "firewall", "inbound")] {
            let ref = ChainRef(family, table, chain)
            kernel.addChain(HostChain(ref, hook: .input, type: "filter", priority: 0, policy: .drop))
            kernel.addRule(ref, "ct state established,related accept")
            kernel.addRule(ref, "tcp dport { 22, 80 } accept")
        }
        kernel.addChain(HostChain(ChainRef(.ip, "nat", "PREROUTING"), hook: .prerouting, type: "nat", priority: -100))
        return kernel
    }

    static let hosts: [(String, @Sendable () -> FakeKernel)] = [
        ("no tables", { FakeKernel() }),
        ("typical", { typicalHost() }),
        ("policy accept", {
            let k = FakeKernel()
            k.addChain(HostChain(ChainRef(.inet, "filter", "input"), hook: .input, type: "filter", priority: 0, policy: .accept))
            k.addChain(HostChain(ChainRef(.inet, "filter", "blocklist")))
            k.addRule(ChainRef(.inet, "filter", "input"), "jump blocklist")
            return k
        }),
    ]

    @Test(arguments: hosts.map(\.0))
    func installThenUninstallRestoresTheRuleset(host: String) throws {
        let kernel = Self.hosts.first { $0.0 == host }!.1()
        let before = kernel.listing()
        let (engine, state) = try engine()
        let fw = kernel.connect()
        let journal = try engine.install(options, firewalls: Firewalls([fw]), holder: me, namespace: namespace, now: 1000)
        #expect(journal.phase == .installed)
        #expect(journal.expiresAt == 601_000)
        #expect(journal.accepts.allSatisfy { $0.handle != nil })
        #expect(try Journal.decode(try #require(try state.readJournal())) == journal)
        #expect(kernel.listing() != before)
        #expect(kernel.rules(taggedWith: "LE").count == 1 + journal.accepts.count)

        var drained = false
        let warnings = try engine.uninstall(journal, firewalls: Firewalls([fw])) {
            // While the proxy drains, nothing new is redirected (the port left the set) but the nat
            // chain and the accepts still carry the connections in flight.
            drained = kernel.setElements(TableRef.own, RedirectPlan.setName) == []
                && kernel.rules(taggedWith: "LE").count == 1 + journal.accepts.count
        }
        #expect(drained)
        #expect(warnings.isEmpty)
        #expect(kernel.listing() == before)
        #expect(try state.readJournal() == nil)
    }

    /// Once nothing is redirected, conntrack's entries of what was go too: after end, and after
    /// recovering a dead session.
    @Test func endAndRecoverForgetTheRedirectedConnections() throws {
        let kernel = Self.typicalHost()
        var (engine, _) = try engine(dead: true)
        let calls = Locked<[String]>([])
        engine.forgetRedirectedConnections = { port, proxyPort in
            calls.mutate { $0.append("\(port)->\(proxyPort) \(kernel.tableExists(TableRef.own) ? "while redirecting" : "after")") }
            return 0
        }
        let fw = kernel.connect()
        let journal = try engine.install(options, firewalls: Firewalls([fw]), holder: me, namespace: namespace, now: 0)
        _ = try engine.uninstall(journal, firewalls: Firewalls([fw]))
        #expect(calls.value == ["80->12347 after"])
        try crash(engine, on: kernel)
        _ = try engine.recover(sweep: false, firewalls: Firewalls([kernel.connect()]), namespace: namespace)
        #expect(calls.value == ["80->12347 after", "80->12347 after"])
    }

    @Test func theJournalIsWrittenBeforeTheCommit() throws {
        let kernel = Self.typicalHost()
        let (engine, state) = try engine()
        let seen = Locked<Journal?>(nil)
        kernel.injectFault { change in
            if case .addOwnedTable = change, let text = try? state.readJournal() { seen.set(try? Journal.decode(text)) }
            return nil
        }
        _ = try engine.install(options, firewalls: Firewalls([kernel.connect()]), holder: me, namespace: namespace, now: 0)
        let intent = try #require(seen.value)
        #expect(intent.phase == .intent)
        #expect(intent.accepts.count == 3)
        #expect(intent.accepts.allSatisfy { $0.handle == nil })
    }

    /// Another process commits between our read and our commit: the batch is refused whole, and
    /// rebuilt from fresh state (which now includes the chain it added).
    @Test func aChangedGenerationIsReplannedFromFreshState() throws {
        let kernel = Self.typicalHost()
        let (engine, _) = try engine()
        let late = ChainRef(.ip, "late", "input")
        kernel.beforeNextCommit { k in k.addChain(HostChain(late, hook: .input, type: "filter", priority: 0)) }
        let journal = try engine.install(options, firewalls: Firewalls([kernel.connect()]), holder: me, namespace: namespace, now: 0)
        #expect(journal.accepts.map(\.chain).contains(late))
        #expect(journal.accepts.count == 4)
    }

    @Test func aGenerationThatNeverSettlesFailsAndChangesNothing() throws {
        let kernel = Self.typicalHost()
        var (engine, state) = try engine()
        engine.maxAttempts = 3
        @Sendable func churn(_ k: FakeKernel) {
            k.addTable(TableRef(.ip, "churn\(k.generation)"))
            k.beforeNextCommit(churn)
        }
        kernel.beforeNextCommit(churn)
        #expect {
            try engine.install(options, firewalls: Firewalls([kernel.connect()]), holder: me, namespace: namespace, now: 0)
        } throws: { ($0 as? LERedirectError)?.message.contains("kept changing") == true }
        kernel.beforeNextCommit { _ in }
        #expect(!kernel.tableExists(TableRef.own))
        #expect(kernel.rules(taggedWith: "LE").isEmpty)
        #expect(try state.readJournal() == nil)
    }

    @Test func aRefusedBatchLeavesNothingAndSaysWhatFailed() throws {
        let kernel = Self.typicalHost()
        let before = kernel.listing()
        let (engine, state) = try engine()
        kernel.injectFault { change in
            if case .insertRule(let chain, .scopedAccept) = change, chain.table.family == .ip6 {
                return FirewallError(.notPermitted, doing: "inserting the scoped accept into \(chain)", detail: "Operation not permitted")
            }
            return nil
        }
        #expect {
            try engine.install(options, firewalls: Firewalls([kernel.connect()]), holder: me, namespace: namespace, now: 0)
        } throws: { error in
            let e = error as? LERedirectError
            return e?.kind == .notPermitted && e!.message.contains("ip6 filter INPUT")
        }
        #expect(kernel.listing() == before)
        #expect(try state.readJournal() == nil)
    }

    /// The batch was applied but its reply was lost: begin takes back everything it applied.
    @Test func aLostReplyIsUndone() throws {
        let kernel = Self.typicalHost()
        let before = kernel.listing()
        let (engine, state) = try engine()
        kernel.loseNextReply()
        #expect(throws: LERedirectError.self) {
            try engine.install(options, firewalls: Firewalls([kernel.connect()]), holder: me, namespace: namespace, now: 0)
        }
        #expect(kernel.listing() == before)
        #expect(try state.readJournal() == nil)
    }

    /// The daemon died (its connection closed): the owned table went with it, the accepts are
    /// removed by recover from another connection.
    @Test func recoverFinishesADeadSession() throws {
        let kernel = Self.typicalHost()
        let before = kernel.listing()
        let (engine, state) = try engine(dead: true)
        try crash(engine, on: kernel)
        #expect(!kernel.tableExists(TableRef.own))
        #expect(kernel.rules(taggedWith: "LE").count == 3)

        let report = try engine.recover(sweep: false, firewalls: Firewalls([kernel.connect()]), namespace: namespace)
        #expect(report.recoveredJournal)
        #expect(report.removedRules == 3)
        #expect(kernel.listing() == before)
        #expect(try state.readJournal() == nil)
        // Nothing left to do the second time.
        #expect(try !engine.recover(sweep: false, firewalls: Firewalls([kernel.connect()]), namespace: namespace).changedAnything)
    }

    /// A crash between the commit and recording the handles leaves an intent journal: recover
    /// finds the accepts by content in the chains it names.
    @Test func recoverFromAnIntentJournalFindsTheRulesByContent() throws {
        let kernel = Self.typicalHost()
        let before = kernel.listing()
        let (engine, state) = try engine(dead: true)
        let daemon = kernel.connect()
        let snapshot = try daemon.snapshot()
        let plan = try RedirectPlan.make(options, from: snapshot)
        try state.writeJournal(Journal(
            phase: .intent, holder: me, namespace: namespace, backend: .nftables, port: 80, proxyPort: 12347,
            proxy: "external", createdAt: 0, expiresAt: 1,
            rules: plan.rules.map {
                Journal.Entry(chain: $0.chain, fingerprint: daemon.fingerprint(of: $0.spec, family: $0.chain.table.family))
            }))
        _ = try daemon.commit(plan.nftablesStep!.changes, expecting: nil)
        daemon.close()
        // A host rule tagged "LE" with other content is not ours and stays.
        kernel.addRule(ChainRef(.ip, "filter", "INPUT"), "tcp dport 12348 accept", comment: "LE")
        let ours = [RuleForm.native, .xtables].map { "\t\t\(RuleSpec.scopedAccept(proxyPort: 12347, originalPort: 80, form: $0))" }
        let hostRule = kernel.listing().split(separator: "\n", omittingEmptySubsequences: false)
            .filter { !ours.contains(String($0)) }.joined(separator: "\n")

        _ = try engine.recover(sweep: false, firewalls: Firewalls([kernel.connect()]), namespace: namespace)
        #expect(kernel.listing() == hostRule)
        #expect(kernel.listing() != before)
        #expect(try state.readJournal() == nil)
    }

    /// The host reloaded its ruleset during the window: handles were reused by its own rules.
    @Test func aHandleThatNoLongerHoldsOurRuleIsLeftAlone() throws {
        let kernel = Self.typicalHost()
        let (engine, _) = try engine()
        let fw = kernel.connect()
        let journal = try engine.install(options, firewalls: Firewalls([fw]), holder: me, namespace: namespace, now: 0)
        let victim = journal.accepts[0].chain
        kernel.deleteTable(victim.table)
        kernel.addChain(HostChain(victim, hook: .input, type: "filter", priority: 0, policy: .drop))
        for _ in 0..<8 { kernel.addRule(victim, "tcp dport 443 accept") }
        let reloaded = kernel.listing()

        let warnings = try engine.uninstall(journal, firewalls: Firewalls([fw]))
        #expect(warnings.count == 1)
        #expect(warnings.first?.contains("no longer le-redirect's") == true)
        #expect(kernel.rules(taggedWith: "LE").isEmpty)
        #expect(kernel.listing().contains("tcp dport 443 accept"))
        #expect(kernel.listing().components(separatedBy: "tcp dport 443 accept").count == reloaded.components(separatedBy: "tcp dport 443 accept").count)
    }

    @Test func aChainTheHostDeletedDuringTheWindowDoesNotBlockEnd() throws {
        let kernel = Self.typicalHost()
        let (engine, state) = try engine()
        let fw = kernel.connect()
        let journal = try engine.install(options, firewalls: Firewalls([fw]), holder: me, namespace: namespace, now: 0)
        kernel.deleteTable(TableRef(.ip6, "filter"))
        let warnings = try engine.uninstall(journal, firewalls: Firewalls([fw]))
        // The operator hears of it; nothing else of the host's is touched.
        #expect(warnings == [
            "le-redirect's scoped accept in nftables ip6 filter INPUT was already gone (the host changed its ruleset "
                + "during the session); nothing of the host's was touched",
        ])
        #expect(kernel.rules(taggedWith: "LE").isEmpty)
        #expect(try state.readJournal() == nil)
    }

    @Test func recoverRefusesALiveSession() throws {
        let kernel = Self.typicalHost()
        let (engine, state) = try engine(dead: false)
        let fw = kernel.connect()
        _ = try engine.install(options, firewalls: Firewalls([fw]), holder: me, namespace: namespace, now: 0)
        let during = kernel.listing()
        #expect {
            try engine.recover(sweep: false, firewalls: Firewalls([kernel.connect()]), namespace: namespace)
        } throws: { ($0 as? LERedirectError)?.kind == .conflict }
        #expect(kernel.listing() == during)
        #expect(try state.readJournal() != nil)
    }

    @Test func recoverRefusesAJournalOfAnotherNamespace() throws {
        let kernel = Self.typicalHost()
        let (engine, state) = try engine(dead: true)
        try crash(engine, on: kernel)
        let leftovers = kernel.listing()
        #expect {
            try engine.recover(sweep: false, firewalls: Firewalls([kernel.connect()]), namespace: NamespaceIdentity(device: 4, inode: 99))
        } throws: { ($0 as? LERedirectError)?.message.contains("network namespace") == true }
        #expect(kernel.listing() == leftovers)
        #expect(try state.readJournal() != nil)
    }

    @Test func aCorruptJournalNeedsSweep() throws {
        let kernel = Self.typicalHost()
        let before = kernel.listing()
        let (engine, state) = try engine(dead: true)
        try crash(engine, on: kernel)
        try "le-redirect journal 1\ngarbage\n".write(toFile: state.journalPath, atomically: false, encoding: .utf8)
        let leftovers = kernel.listing()
        #expect {
            try engine.recover(sweep: false, firewalls: Firewalls([kernel.connect()]), namespace: namespace)
        } throws: { ($0 as? LERedirectError)?.message.contains("--sweep") == true }
        #expect(kernel.listing() == leftovers)

        let report = try engine.recover(sweep: true, firewalls: Firewalls([kernel.connect()]), namespace: namespace)
        #expect(report.removedRules == 3)
        #expect(kernel.listing() == before)
        #expect(try state.readJournal() == nil)
    }

    /// With no journal at all, sweep removes every "LE"-tagged rule of the input chains (including
    /// the approach this project replaces, which tags its rules "LE" too) and a leftover table.
    @Test func sweepWithoutAJournal() throws {
        let kernel = Self.typicalHost()
        let input = ChainRef(.ip, "filter", "INPUT")
        let before = kernel.listing()
        kernel.addRule(input, "tcp dport 12347 counter accept", comment: "LE")
        kernel.addRule(ChainRef(.ip6, "filter", "INPUT"), "tcp dport 12348 counter accept", comment: "LE")
        kernel.addChain(HostChain(RedirectPlan.natChain, hook: .prerouting, type: "nat", priority: -110))
        let (engine, _) = try engine()
        let report = try engine.recover(sweep: true, firewalls: Firewalls([kernel.connect()]), namespace: namespace)
        #expect(report.removedRules == 2)
        #expect(report.removedTable)
        #expect(kernel.listing() == before)
    }

    @Test func sweepRefusesWhileALiveSessionOwnsTheTable() throws {
        let kernel = Self.typicalHost()
        let live = kernel.connect()
        _ = try live.commit([.addOwnedTable(TableRef.own)], expecting: nil)
        let (engine, _) = try engine()
        #expect {
            try engine.recover(sweep: true, firewalls: Firewalls([kernel.connect()]), namespace: namespace)
        } throws: { ($0 as? LERedirectError)?.kind == .conflict }
        #expect(kernel.tableExists(TableRef.own))
    }
}

final class Locked<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: T
    init(_ value: T) { stored = value }
    var value: T { lock.lock(); defer { lock.unlock() }; return stored }
    func set(_ value: T) { lock.lock(); stored = value; lock.unlock() }
    func mutate(_ body: (inout T) -> Void) { lock.lock(); body(&stored); lock.unlock() }
}
