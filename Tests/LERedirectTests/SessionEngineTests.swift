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
        engine.kernel = { KernelSupport(nftTproxy: true, xtTproxy: true, evidence: "test") }
        return (engine, state)
    }

    /// Installs a session on `kernel` and drops its connection, as the daemon's death would: the
    /// owned table goes, the journal stays.
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

    /// The text of the scoped accept versions that rewrote connections put into every host input
    /// chain (nft's form; the iptables-nft one differs only in its encoding).
    static let oldAccept = "tcp dport 12347 ct status dnat ct original proto-dst 80 accept"

    /// What a dead session of such a version left: its accepts in the host's input chains, and its
    /// journal (the owned table died with it). `handles: false`: a crash before they were recorded.
    func leaveOldSession(on kernel: FakeKernel, _ state: StateDirectory, handles: Bool = true) throws -> Journal {
        let inputs = [ChainRef(.ip, "filter", "INPUT"), ChainRef(.ip6, "filter", "INPUT"), ChainRef(.inet, "firewall", "inbound")]
        var entries: [Journal.Entry] = []
        let fw = kernel.connect()
        defer { fw.close() }
        for chain in inputs {
            let location = kernel.addRule(chain, Self.oldAccept, comment: "LE")
            let observed = try #require(try fw.rule(at: location))
            entries.append(
                Journal.Entry(chain: chain, fingerprint: observed.fingerprint, handle: handles ? location.handle : nil))
        }
        let journal = Journal(
            phase: handles ? .installed : .intent, holder: me, namespace: namespace, backend: .nftables, port: 80,
            proxyPort: 12347, proxy: "external", createdAt: 0, expiresAt: 1, rules: entries)
        try state.writeJournal(journal)
        return journal
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
        #expect(journal.rules.isEmpty)  // everything is in the owned table
        #expect(try Journal.decode(try #require(try state.readJournal())) == journal)
        #expect(kernel.listing() != before)
        // Only our table was added: every host chain lists exactly what it did. (With nat of the
        // host's own, our table also gives steered SYNs their identity binding: two rules more.)
        let hostNAT = kernel.listing().contains("type nat hook prerouting")
        #expect(kernel.rules(taggedWith: "LE").count == (hostNAT ? 3 : 1))
        #expect(try fw.snapshot().tables.map(\.ref).filter { $0 != TableRef.own }.sorted()
            == (try kernel.connect().snapshot().tables.map(\.ref).filter { $0 != TableRef.own }.sorted()))

        var drained = false
        let warnings = try engine.uninstall(journal, firewalls: Firewalls([fw])) {
            // While the proxy drains, nothing new is steered (the port left the set); the table
            // is still there.
            drained = kernel.setElements(TableRef.own, RedirectPlan.setName) == [] && kernel.tableExists(TableRef.own)
        }
        #expect(drained)
        #expect(warnings.isEmpty)
        #expect(kernel.listing() == before)
        #expect(try state.readJournal() == nil)
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
        #expect(intent.backend == .nftables)
    }

    /// Another process commits between our read and our commit: the batch is refused whole, and
    /// made again from fresh state (here: a leftover copy of our table appeared, which the new
    /// batch replaces).
    @Test func aChangedGenerationIsReplannedFromFreshState() throws {
        let kernel = Self.typicalHost()
        let (engine, _) = try engine()
        kernel.beforeNextCommit { k in
            k.addChain(HostChain(RedirectPlan.steeringChain, hook: .prerouting, type: "filter", priority: -150))
        }
        let fw = kernel.connect()
        let journal = try engine.install(options, firewalls: Firewalls([fw]), holder: me, namespace: namespace, now: 0)
        #expect(journal.phase == .installed)
        #expect(kernel.rules(taggedWith: "LE").count == 3)  // the steering, and the identity bindings
        #expect(try kernel.connect().snapshot().tables.first { $0.ref == TableRef.own }?.ownedByAnotherProcess == true)
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
            if case .insertRule(let chain, .steer) = change {
                return FirewallError(
                    .unsupported, doing: "inserting the steering rule into \(chain)",
                    detail: "No such file or directory (this kernel lacks nf_tables' tproxy or fib expression)")
            }
            return nil
        }
        #expect {
            try engine.install(options, firewalls: Firewalls([kernel.connect()]), holder: me, namespace: namespace, now: 0)
        } throws: { error in
            let e = error as? LERedirectError
            return e?.kind == .unsupported && e!.message.contains("inet le_redirect prerouting") && e!.message.contains("tproxy")
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

    /// The daemon died (its connection closed): the owned table went with it; recover removes the
    /// journal and has nothing else to do.
    @Test func recoverFinishesADeadSession() throws {
        let kernel = Self.typicalHost()
        let before = kernel.listing()
        let (engine, state) = try engine(dead: true)
        try crash(engine, on: kernel)
        #expect(!kernel.tableExists(TableRef.own))
        #expect(kernel.listing() == before)

        let report = try engine.recover(sweep: false, firewalls: Firewalls([kernel.connect()]), namespace: namespace)
        #expect(report.recoveredJournal)
        #expect(report.removedRules == 0)
        #expect(kernel.listing() == before)
        #expect(try state.readJournal() == nil)
        // Nothing left to do the second time.
        #expect(try !engine.recover(sweep: false, firewalls: Firewalls([kernel.connect()]), namespace: namespace).changedAnything)
    }

    /// A dead session of a version that rewrote connections left scoped accepts in the host's
    /// chains: this version's recover removes exactly them, by the handles its journal records.
    @Test func recoverFinishesAnOlderVersionsDeadSession() throws {
        let kernel = Self.typicalHost()
        let before = kernel.listing()
        let (engine, state) = try engine(dead: true)
        _ = try leaveOldSession(on: kernel, state)
        #expect(kernel.rules(taggedWith: "LE").count == 3)
        let report = try engine.recover(sweep: false, firewalls: Firewalls([kernel.connect()]), namespace: namespace)
        #expect(report.recoveredJournal)
        #expect(report.removedRules == 3)
        #expect(kernel.listing() == before)
        #expect(try state.readJournal() == nil)
    }

    /// It crashed between its commit and recording the handles (an intent journal): recover finds
    /// the accepts by content in the chains it names, and leaves a host rule tagged "LE" alone.
    @Test func recoverFromAnIntentJournalFindsTheRulesByContent() throws {
        let kernel = Self.typicalHost()
        let (engine, state) = try engine(dead: true)
        _ = try leaveOldSession(on: kernel, state, handles: false)
        kernel.addRule(ChainRef(.ip, "filter", "INPUT"), "tcp dport 12348 accept", comment: "LE")
        let hostRule = kernel.listing().split(separator: "\n", omittingEmptySubsequences: false)
            .filter { !$0.contains(Self.oldAccept) }.joined(separator: "\n")
        let report = try engine.recover(sweep: false, firewalls: Firewalls([kernel.connect()]), namespace: namespace)
        #expect(report.removedRules == 3)
        #expect(kernel.listing() == hostRule)
        #expect(try state.readJournal() == nil)
    }

    /// The host reloaded its ruleset after the old session died: the handles were reused by its own rules.
    @Test func aHandleThatNoLongerHoldsOurRuleIsLeftAlone() throws {
        let kernel = Self.typicalHost()
        let (engine, state) = try engine(dead: true)
        let journal = try leaveOldSession(on: kernel, state)
        let victim = journal.accepts[0].chain
        kernel.deleteTable(victim.table)
        kernel.addChain(HostChain(victim, hook: .input, type: "filter", priority: 0, policy: .drop))
        for _ in 0..<8 { kernel.addRule(victim, "tcp dport 443 accept") }
        let reloaded = kernel.listing()

        let report = try engine.recover(sweep: false, firewalls: Firewalls([kernel.connect()]), namespace: namespace)
        #expect(report.warnings.count == 1)
        #expect(report.warnings.first?.contains("no longer le-redirect's") == true)
        #expect(report.removedRules == 2)
        #expect(kernel.rules(taggedWith: "LE").isEmpty)
        #expect(kernel.listing().components(separatedBy: "tcp dport 443 accept").count == reloaded.components(separatedBy: "tcp dport 443 accept").count)
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
        _ = try leaveOldSession(on: kernel, state)
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
        kernel.addChain(HostChain(RedirectPlan.steeringChain, hook: .prerouting, type: "filter", priority: -150))
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
