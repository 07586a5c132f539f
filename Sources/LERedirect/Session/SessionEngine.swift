import Glibc
import LERedirectModel
import Logging

/// The session's decisions, over the firewall systems and the state directory: what begin commits
/// and records, what end removes, what recovery trusts. Nothing else touches the kernel or the journal.
///
/// Begin commits one nftables batch (our owned table, with the steering), or on iptables-legacy one
/// commit per table (nat tables first, then mangle); end takes the port out of the set (or the rules
/// out of x_tables), lets the
/// proxy drain, then deletes the table. Nothing is rewritten, so nothing is left in conntrack. The
/// journal is rewritten before every commit, so a crash between two of them leaves a journal that
/// covers what is in the kernel; journals of versions that rewrote connections (scoped accepts in
/// the host's input chains, nat redirects) are recovered the same way, by what they record.
struct SessionEngine {
    let state: StateDirectory
    let logger: Logger
    /// How a journal's holder is checked for life; tests replace it.
    var isAlive: @Sendable (ProcessIdentity) -> Bool = { ProcessFacts.isAlive($0) }
    /// Attempts when another process keeps committing between our read and our commit: a tool
    /// committing in a tight loop (measured: `nft` add/delete in a shell loop under CI load) can
    /// beat 8 attempts back to back, so there are many, each after a short randomised pause
    /// (up to about 4 s in all before begin gives up, changing nothing).
    var maxAttempts = 200
    /// The pause before attempt `n` + 1: 1, 2, 4, 8, then 16 ms, plus up to 4 ms at random, so
    /// that the retries do not keep falling into the other tool's rhythm.
    var pauseBeforeRetry: @Sendable (_ attempt: Int) -> Void = { attempt in
        usleep(UInt32((1 << min(attempt - 1, 4)) * 1000 + Int.random(in: 0..<4000)))
    }
    /// Runs just before each of begin's commits, once the journal covers it, with the commit's name
    /// ("iptables-legacy ip mangle"); debug builds can be killed there (Fault).
    var beforeCommit: (String) -> Void = { Fault.reach("journal-intent-written", detail: $0) }
    /// What begin's plan says the operator should know (RedirectPlan.notes), set by `install`.
    var notes: [String] {
        get { noteBox.value }
        nonmutating set { noteBox.value = newValue }
    }
    private let noteBox = NoteBox()
    /// What the kernel offers for steering; tests replace it.
    var kernel: () -> KernelSupport = { ProcessFacts.kernelSupport(thorough: false) }
    /// The addresses of this namespace's interfaces (nil: unreadable); tests replace it.
    var localAddresses: () -> [IPAddress]? = { ProcessFacts.localAddresses() }

    final class NoteBox: @unchecked Sendable {
        var value: [String] = []
    }

    /// The engine the CLI and the library run.
    static func live(state: StateDirectory, logger: Logger) -> SessionEngine {
        SessionEngine(state: state, logger: logger)
    }

    // MARK: Begin (run by the holder, with the lock held)

    /// Reads what it needs, plans, and commits begin's steps, journalling before each. On any
    /// failure nothing is left behind: what the kernel took is removed again before this throws.
    /// x_tables is read only when it is to hold the steering (reading it costs time in proportion
    /// to the host's rules, and nothing else of begin needs it).
    /// `proxyUID`: the built-in proxy's user (--include-local leaves its connections alone).
    func install(
        _ options: ValidatedOptions, firewalls: Firewalls, holder: ProcessIdentity, namespace: NamespaceIdentity,
        proxyUID: UInt32? = nil, now: Int64
    ) throws(LERedirectError) -> Journal {
        try Self.checkAddresses(options.addresses, local: localAddresses(), doing: "begin")
        var unavailable = firewalls.unavailable
        var nftables = firewalls.nftables
        let nftablesSnapshot: FirewallSnapshot?
        do {
            nftablesSnapshot = try nftables?.snapshot()
        } catch where error.reason == .unsupported {
            // nf_tables is missing from this kernel: plan without it.
            unavailable[.nftables] = "\(error)"
            nftablesSnapshot = nil
            nftables = nil
        } catch {
            throw Self.failure("begin: reading the ruleset", error)
        }
        let support = kernel()
        let nftablesWillDo =
            options.backend == .nftables
            || (options.backend == .auto
                && BackendDecision.nftablesProblem(nftables: nftablesSnapshot, unavailable: unavailable, kernel: support) == nil)
        guard !nftablesWillDo, let legacy = firewalls.iptablesLegacy else {
            // x_tables' table names alone: whether it has nat of its own.
            let legacyTables = (try? firewalls.iptablesLegacy?.tableList()) ?? []
            return try installLocked(
                options, firewalls: firewalls, nftables: nftables, nftablesSnapshot: nftablesSnapshot, legacySnapshot: nil,
                legacyTables: legacyTables, unavailable: unavailable, kernel: support, holder: holder, namespace: namespace,
                proxyUID: proxyUID, now: now)
        }
        // Under the xtables lock throughout: x_tables is read once, and what the plan was made
        // from still holds at each of its commits.
        return try legacy.exclusively { () throws(LERedirectError) -> Journal in
            let legacySnapshot = try map { () throws(FirewallError) in try legacy.snapshot() }
            return try installLocked(
                options, firewalls: firewalls, nftables: nftables, nftablesSnapshot: nftablesSnapshot,
                legacySnapshot: legacySnapshot, legacyTables: legacySnapshot.tables.map(\.ref), unavailable: unavailable,
                kernel: support, holder: holder, namespace: namespace, proxyUID: proxyUID, now: now)
        }
    }

    /// Refuses `addresses` (--address) that are not on this namespace's interfaces: such an
    /// address would take nothing over. `local` nil: the interfaces could not be read.
    static func checkAddresses(_ addresses: [IPAddress], local: [IPAddress]?, doing: String) throws(LERedirectError) {
        guard !addresses.isEmpty else { return }
        guard let local else {
            throw LERedirectError(
                .failed, "\(doing) --address: the addresses of this host's interfaces could not be read (getifaddrs). Nothing was changed")
        }
        let missing = addresses.filter { !local.contains($0) }
        if !missing.isEmpty {
            throw LERedirectError(
                .invalidArgument,
                "--address \(missing.map(\.description).joined(separator: ", ")): not an address of this host's interfaces in "
                    + "this network namespace (`ip address` lists them). Nothing was changed")
        }
    }

    private func installLocked(
        _ options: ValidatedOptions, firewalls: Firewalls, nftables: (any Firewall)?, nftablesSnapshot: FirewallSnapshot?,
        legacySnapshot: FirewallSnapshot?, legacyTables: [TableRef], unavailable: [FirewallSystem: String],
        kernel: KernelSupport, holder: ProcessIdentity, namespace: NamespaceIdentity, proxyUID: UInt32?, now: Int64
    ) throws(LERedirectError) -> Journal {
        var plan = try RedirectPlan.make(
            options, nftables: nftablesSnapshot, iptablesLegacy: legacySnapshot, legacyTables: legacyTables,
            unavailable: unavailable, kernel: kernel, proxyUID: proxyUID, now: now)
        if let refusal = plan.refusal(options, nftables: nftablesSnapshot, iptablesLegacy: legacySnapshot) { throw refusal }
        notes = plan.notes(
            containerChains: RedirectPlan.containerNAT(nftablesSnapshot),
            inputDropsByDefault: (nftablesSnapshot?.chains ?? []).contains { $0.hook == .input && $0.policy == .drop })
        for note in notes { logger.notice("\(note)") }
        logger.debug(
            "plan", metadata: ["steering": "\(plan.decision.redirect)", "steps": "\(plan.installSteps.map(\.description))"])
        var journal = Journal(
            phase: .intent, holder: holder, namespace: namespace, backend: plan.decision.redirect, port: plan.port,
            proxyPort: plan.proxyPort, proxy: options.proxy.name, createdAt: now, expiresAt: plan.expiresAt,
            rules: entries(of: plan, firewalls: firewalls))

        // Whether the nftables batch may be in the kernel: only then does undoing touch nftables.
        var nftablesApplied = false
        do {
            if let nftables, plan.nftablesStep != nil {
                try commitNftables(
                    &plan, options: options, journal: &journal, firewall: nftables, legacyTables: legacyTables,
                    applied: &nftablesApplied)
            }
            // Counted even when not armed, so that arming later and recovery know how many identical
            // rules were the host's.
            for step in plan.legacySteerSteps {
                try commitLegacy(step, journal: &journal, firewalls: firewalls, commit: plan.armed)
            }
            journal.phase = .installed
            try state.writeJournal(journal)
            Fault.reach("handles-recorded")
        } catch {
            let touched = nftablesApplied || journal.rules.contains { $0.preexisting != nil }
            undo(journal, firewalls: firewalls, nftablesApplied: nftablesApplied)
            throw LERedirectError(
                error.kind, error.message + (touched ? "; anything begin had applied was removed again" : ""),
                errno: error.errno)
        }
        logger.info(
            "steering installed",
            metadata: [
                "port": "\(plan.port)", "proxyPort": "\(plan.proxyPort)", "backend": "\(plan.decision.redirect)",
                "rules": "\(journal.rules.count)",
            ])
        return journal
    }

    /// The journal's entries for a plan's rules, fingerprinted by the system that inserts each.
    private func entries(of plan: RedirectPlan, firewalls: Firewalls) -> [Journal.Entry] {
        plan.rules.map { rule in
            Journal.Entry(
                system: rule.system, kind: rule.spec.kind, chain: rule.chain,
                fingerprint: firewalls[rule.system]!.fingerprint(of: rule.spec, family: rule.chain.table.family))
        }
    }

    /// One x_tables commit of begin, under the xtables lock: counts the rules identical to each it
    /// inserts, journals those counts, then (when `commit`) replaces the table.
    private func commitLegacy(
        _ step: RedirectPlan.Step, journal: inout Journal, firewalls: Firewalls, commit: Bool
    ) throws(LERedirectError) {
        guard let firewall = firewalls.iptablesLegacy else { return }
        var updated = journal
        try firewall.exclusively { () throws(LERedirectError) in
            var observed: [ChainRef: [ObservedRule]] = [:]
            for index in step.entries {
                let chain = updated.rules[index].chain
                if observed[chain] == nil {
                    observed[chain] = try map { () throws(FirewallError) in try firewall.rules(in: chain) }
                }
                updated.rules[index].preexisting = observed[chain]!.filter { $0.fingerprint == updated.rules[index].fingerprint }.count
            }
            try state.writeJournal(updated)
            guard commit else { return }
            beforeCommit(step.description)
            let started = ContinuousClock.now
            do throws(FirewallError) {
                _ = try firewall.commit(step.changes, expecting: nil)
            } catch {
                throw Self.failure("begin: \(step)", error)
            }
            Fault.reach("commit-acknowledged", detail: step.description)
            logger.debug("begin commit", metadata: ["step": "\(step)", "commitMs": "\(milliseconds(since: started))"])
        }
        journal = updated
    }

    /// Begin's nftables batch, planned again from fresh state when another program committed
    /// between our read and our batch.
    private func commitNftables(
        _ plan: inout RedirectPlan, options: ValidatedOptions, journal: inout Journal, firewall: any Firewall,
        legacyTables: [TableRef], applied: inout Bool
    ) throws(LERedirectError) {
        try committingWithRetries("begin") { (attempt) throws(CommitAttemptError) in
            if attempt > 1 {
                logger.debug("the ruleset changed while begin planned; planning again", metadata: ["attempt": "\(attempt)"])
                let snapshot = try CommitAttemptError.lift { () throws(LERedirectError) in
                    try map { () throws(FirewallError) in try firewall.snapshot() }
                }
                plan.nftables = try CommitAttemptError.lift { () throws(LERedirectError) in
                    try RedirectPlan.nftablesPart(options, snapshot, legacyTables: legacyTables)
                }
            }
            guard let step = plan.nftablesStep else { return }
            try CommitAttemptError.lift { () throws(LERedirectError) in try state.writeJournal(journal) }
            beforeCommit(step.description)
            do throws(FirewallError) {
                let started = ContinuousClock.now
                _ = try firewall.commit(step.changes, expecting: plan.nftables!.generation)
                logger.debug("begin batch committed", metadata: ["commitMs": "\(milliseconds(since: started))"])
            } catch where error.reason == .outcomeUnknown {
                // The batch may have been applied: the caller takes back whatever of it is there.
                applied = true
                throw .other(LERedirectError(.failed, "begin: \(error)", errno: error.errno))
            } catch {
                // Refused as a whole (a changed generation among the reasons): nothing of it is there.
                throw .commit(error)
            }
            applied = true
            Fault.reach("commit-acknowledged", detail: step.description)
        }
    }

    /// Best-effort removal of whatever begin may have applied, then of the journal.
    private func undo(_ journal: Journal, firewalls: Firewalls, nftablesApplied: Bool) {
        if nftablesApplied, journal.backend == .nftables, let nftables = firewalls.nftables {
            do {
                _ = try nftables.commit(RedirectPlan.removeTableChanges, expecting: nil)
            } catch where error.reason == .notFound {
            } catch {
                logger.error("undoing begin: \(error)")
            }
        }
        do {
            _ = try removeRules(journal.rules, firewalls: firewalls)
            try state.deleteJournal()
        } catch {
            logger.error("undoing begin: \(error); the journal is kept so that `le-redirect recover` can finish")
        }
    }

    // MARK: Arming (sessions armed per challenge)

    /// Starts steering: the port goes into the set (nftables) until `remaining` passes, or the
    /// expiring rules go into x_tables (the identity ACCEPTs in nat, then TPROXY in mangle).
    /// `addresses`: the session's --address list, which the journal's fingerprints were made with.
    func arm(_ journal: Journal, firewalls: Firewalls, remaining: Duration, addresses: [IPAddress] = []) throws(LERedirectError) {
        switch journal.backend {
        case .nftables:
            do {
                _ = try firewalls.nftables?.commit(
                    RedirectPlan.armChanges(port: journal.port, remaining: remaining), expecting: nil)
            } catch where error.reason == .alreadyExists {
            } catch {
                throw Self.failure("arming the steering", error)
            }
        case .iptablesLegacy:
            let firewall = try connection(.iptablesLegacy, firewalls)
            let until = journal.expiresAt / 1000
            // The identity bindings (nat) before the steering (mangle), as begin commits them.
            let entries = journal.rules.filter { $0.kind == .redirect }.sorted { ($0.chain.table.name == "nat" ? 0 : 1) < ($1.chain.table.name == "nat" ? 0 : 1) }
            for entry in entries {
                let family = entry.chain.table.family
                // The rule begin planned for this entry: the one (per address) with its fingerprint.
                let candidates: [RuleSpec] = (addresses.isEmpty ? [nil] : addresses.filter { $0.family == family } as [IPAddress?]).map {
                    entry.chain.table.name == "nat"
                        ? .expiringKeepDestination(port: journal.port, until: until, address: $0)
                        : .expiringSteer(port: journal.port, proxyPort: journal.proxyPort, until: until, address: $0)
                }
                guard let spec = candidates.first(where: { firewall.fingerprint(of: $0, family: family) == entry.fingerprint })
                else {
                    throw LERedirectError(
                        .failed, "arming the steering: the journal's rule for \(entry.chain) is none of this session's rules")
                }
                try firewall.exclusively { () throws(LERedirectError) in
                    let present = try map { () throws(FirewallError) in try firewall.rules(in: entry.chain) }
                        .filter { $0.fingerprint == entry.fingerprint }.count
                    guard present <= entry.preexisting ?? 0 else { return }  // armed already
                    do throws(FirewallError) { _ = try firewall.commit([.insertRule(entry.chain, spec)], expecting: nil) } catch {
                        throw Self.failure("arming the steering", error)
                    }
                }
            }
        }
        Fault.reach("redirect-armed")
    }

    /// Stops steering new connections; connections already steered keep their socket. With
    /// `warnIfGone`, an x_tables steering rule that is no longer there is worth a warning.
    @discardableResult
    func disarm(_ journal: Journal, firewalls: Firewalls, warnIfGone: Bool = false) throws(LERedirectError) -> [String] {
        switch journal.backend {
        case .nftables:
            do {
                let started = ContinuousClock.now
                _ = try firewalls.nftables?.commit(RedirectPlan.disarmChanges(port: journal.port), expecting: nil)
                logger.debug("redirect disarmed", metadata: ["commitMs": "\(milliseconds(since: started))"])
            } catch where error.reason == .notFound {
                // Not armed (armed per challenge, or the TTL passed), or the table is gone.
            } catch {
                throw Self.failure("removing the steering", error)
            }
            return []
        case .iptablesLegacy:
            return try removeRules(journal.rules.filter { $0.kind == .redirect }, firewalls: firewalls, warnIfGone: warnIfGone)
                .warnings
        }
    }

    // MARK: End (run by the holder)

    /// End's sequence: stop steering new connections (the port leaves the set; on x_tables the
    /// rules go), let `betweenSteps` drain the proxy, remove the table (nftables), then the
    /// journal. Connections steered before keep their socket whatever the ruleset says: only SYNs
    /// are steered, the rest of a connection finds its socket by the usual lookup.
    func uninstall(_ journal: Journal, firewalls: Firewalls, armed: Bool = true, betweenSteps: () -> Void = {})
        throws(LERedirectError) -> [String]
    {
        var warnings: [String] = []
        do { warnings += try disarm(journal, firewalls: firewalls, warnIfGone: armed) } catch {
            throw LERedirectError(error.kind, "end: \(error.message)", errno: error.errno)
        }
        Fault.reach("redirect-removed")
        betweenSteps()
        if journal.backend == .nftables, let nftables = firewalls.nftables {
            do {
                let started = ContinuousClock.now
                _ = try nftables.commit(RedirectPlan.removeTableChanges, expecting: nil)
                logger.debug("table removed", metadata: ["commitMs": "\(milliseconds(since: started))"])
            } catch where error.reason == .notFound {
                warnings.append("table \(TableRef.own) was already gone")
            } catch {
                throw Self.failure("end: removing the steering", error)
            }
            Fault.reach("table-removed")
        }
        // A journal of an older version may list accepts; one written by this one lists none.
        warnings += try removeRules(journal.accepts, firewalls: firewalls, warnIfGone: true).warnings
        try state.deleteJournal()
        Fault.reach("journal-deleted")
        return warnings
    }

    // MARK: Removing rules

    /// Removes the rules a journal lists: nftables ones by handle, each only after checking that the
    /// rule there is still exactly ours (a host that reloaded its ruleset may have put its own rule
    /// there), or by content where the handle is not known; x_tables ones by content, as many as
    /// the chain holds above the count recorded before their commit. With `warnIfGone` (end: the
    /// rules were all there at begin), a rule that is gone already is worth a warning: the host
    /// changed its ruleset during the session.
    func removeRules(_ entries: [Journal.Entry], firewalls: Firewalls, warnIfGone: Bool = false) throws(LERedirectError)
        -> (removed: Int, warnings: [String])
    {
        var removed = 0
        var warnings: [String] = []
        let nftables = entries.filter { $0.system == .nftables }
        if !nftables.isEmpty {
            let result = try removeNftables(nftables, firewall: try connection(.nftables, firewalls), warnIfGone: warnIfGone)
            removed += result.removed
            warnings += result.warnings
        }
        let legacy = entries.filter { $0.system == .iptablesLegacy && $0.preexisting != nil }
        if !legacy.isEmpty {
            let firewall = try connection(.iptablesLegacy, firewalls)
            for table in Set(legacy.map(\.chain.table)).sorted() {
                let result = try removeLegacy(
                    legacy.filter { $0.chain.table == table }, table: table, firewall: firewall, warnIfGone: warnIfGone)
                removed += result.removed
                warnings += result.warnings
            }
        }
        return (removed, warnings)
    }

    /// The warning for a rule of ours that the host removed during the session.
    private static func goneWarning(_ entry: Journal.Entry, _ system: FirewallSystem) -> String {
        "le-redirect's \(entry.kind == .redirect ? "steering rule" : "scoped accept") in \(system) \(entry.chain) was already "
            + "gone (the host changed its ruleset during the session); nothing of the host's was touched"
    }

    private func removeNftables(_ entries: [Journal.Entry], firewall: any Firewall, warnIfGone: Bool) throws(LERedirectError)
        -> (removed: Int, warnings: [String])
    {
        // A rule the host removed meanwhile (notFound) is looked for again, as after a changed generation.
        try committingWithRetries("removing le-redirect's rules", retrying: [.generationChanged, .notFound]) {
            (_) throws(CommitAttemptError) -> (removed: Int, warnings: [String]) in
            var warnings: [String] = []
            let generation = try read { () throws(FirewallError) in try firewall.snapshot().generation }
            var targets: [RuleLocation] = []
            for entry in entries {
                if let handle = entry.handle {
                    let location = RuleLocation(entry.chain, handle: handle)
                    let observed = try read { () throws(FirewallError) in try firewall.rule(at: location) }
                    if let observed, observed.fingerprint == entry.fingerprint {
                        targets.append(location)
                    } else if observed != nil {
                        warnings.append(
                            "\(location) is no longer le-redirect's rule (the host replaced its rules?); left alone")
                    } else if warnIfGone {
                        warnings.append(Self.goneWarning(entry, .nftables))
                    } else {
                        logger.debug("rule already gone", metadata: ["rule": "\(location)"])
                    }
                } else {
                    let rules = try read { () throws(FirewallError) in try firewall.rules(in: entry.chain) }
                    let ours = rules.filter { $0.fingerprint == entry.fingerprint && $0.comment == ruleTag }.map(\.location)
                    if ours.isEmpty && warnIfGone { warnings.append(Self.goneWarning(entry, .nftables)) }
                    targets += ours
                }
            }
            targets = Array(Set(targets)).sorted { ($0.chain, $0.handle) < ($1.chain, $1.handle) }
            if targets.isEmpty { return (0, warnings) }
            do throws(FirewallError) {
                let started = ContinuousClock.now
                _ = try firewall.commit(targets.map { .deleteRule($0) }, expecting: generation)
                logger.debug(
                    "rules removed",
                    metadata: ["count": "\(targets.count)", "commitMs": "\(milliseconds(since: started))"])
                return (targets.count, warnings)
            } catch {
                throw .commit(error)
            }
        }
    }

    /// One x_tables table's share of a journal's rules, removed in one commit under the xtables lock.
    private func removeLegacy(_ entries: [Journal.Entry], table: TableRef, firewall: any Firewall, warnIfGone: Bool)
        throws(LERedirectError) -> (removed: Int, warnings: [String])
    {
        try firewall.exclusively { () throws(LERedirectError) -> (removed: Int, warnings: [String]) in
            var observed: [ChainRef: [ObservedRule]] = [:]
            var changes: [FirewallChange] = []
            var warnings: [String] = []
            for entry in entries {
                if observed[entry.chain] == nil {
                    observed[entry.chain] = try map { () throws(FirewallError) in try firewall.rules(in: entry.chain) }
                }
                let present = observed[entry.chain]!.filter { $0.fingerprint == entry.fingerprint }.count
                let ours = present - (entry.preexisting ?? 0)
                if ours > 0 {
                    changes.append(.deleteMatching(entry.chain, entry.fingerprint, count: ours))
                } else if warnIfGone {
                    warnings.append(Self.goneWarning(entry, .iptablesLegacy))
                } else {
                    logger.debug(
                        "rule already gone",
                        metadata: [
                            "chain": "\(entry.chain)", "kind": "\(entry.kind.rawValue)", "fingerprint": "\(entry.fingerprint)",
                            "present": "\(present)", "chainHolds": "\(observed[entry.chain]!.map { "\($0.fingerprint)" }.joined(separator: ","))",
                        ])
                }
            }
            if changes.isEmpty { return (0, warnings) }
            let started = ContinuousClock.now
            do throws(FirewallError) {
                _ = try firewall.commit(changes, expecting: nil)
            } catch {
                throw Self.failure("removing le-redirect's rules from iptables-legacy \(table)", error)
            }
            logger.debug("rules removed", metadata: ["table": "iptables-legacy \(table)", "commitMs": "\(milliseconds(since: started))"])
            let removed = changes.reduce(0) { total, change in
                if case .deleteMatching(_, _, let count) = change { return total + count }
                return total
            }
            return (removed, warnings)
        }
    }

    private func connection(_ system: FirewallSystem, _ firewalls: Firewalls) throws(LERedirectError) -> any Firewall {
        guard let firewall = firewalls[system] else {
            throw LERedirectError(
                .unsupported,
                "the journal lists \(system) rules, but \(system) cannot be read here"
                    + (firewalls.unavailable[system].map { " (\($0))" } ?? "") + ". Nothing was changed")
        }
        return firewall
    }

    // MARK: Recover (run by anyone but the holder, with the lock held)

    /// Finishes a dead session: removes the rules its journal lists (redirects first), a leftover
    /// table, then the journal. With `sweep` and no usable journal, removes every "LE"-tagged rule
    /// of the host's input chains and x_tables' mangle and nat PREROUTING (where this version and
    /// older ones put theirs) and our table instead.
    func recover(sweep: Bool, firewalls: Firewalls, namespace: NamespaceIdentity) throws(LERedirectError)
        -> RecoveryReport
    {
        var report = RecoveryReport()
        guard let text = try state.readJournal() else {
            if sweep { try self.sweep(firewalls: firewalls, into: &report) }
            return report
        }
        let journal: Journal
        do {
            journal = try Journal.decode(text)
        } catch {
            if case .newerVersion = error {
                throw LERedirectError(
                    .failed, "\(state.journalPath): \(error); recover with that version. Nothing was changed")
            }
            guard sweep else {
                throw LERedirectError(
                    .failed,
                    "\(state.journalPath): \(error). Nothing was changed; `le-redirect recover --sweep` removes every "
                        + "\"LE\"-tagged rule of the input chains, of x_tables' mangle and nat PREROUTING, and table \(TableRef.own) instead")
            }
            logger.warning("\(error); sweeping instead")
            try self.sweep(firewalls: firewalls, into: &report)
            try state.deleteJournal()
            return report
        }
        guard journal.namespace == namespace else {
            throw LERedirectError(
                .conflict,
                "the journal in \(state.path) belongs to network namespace \(journal.namespace), this process runs in "
                    + "\(namespace); run le-redirect in that namespace, or give each namespace its own "
                    + "\(StateDirectory.environmentVariable). Nothing was changed")
        }
        if isAlive(journal.holder) {
            throw LERedirectError(
                .conflict,
                "a session is active (pid \(journal.holder.pid), since "
                    + "\(RFC3339.format(unixMilliseconds: journal.createdAt))); `le-redirect end` ends it. Nothing was changed")
        }
        for system in Set(journal.rules.map(\.system) + [journal.backend]).sorted() {
            _ = try connection(system, firewalls)
        }
        logger.info("recovering a session whose holder is gone", metadata: ["pid": "\(journal.holder.pid)"])
        report.recoveredJournal = true
        let redirects = journal.rules.filter { $0.kind == .redirect }
        let removal = try removeRules(redirects + journal.accepts, firewalls: firewalls)
        report.warnings += removal.warnings
        report.removedRules = removal.removed
        Fault.reach("recovery-rules-removed")
        // The owned table died with its holder; a copy restored without the owner flag goes too.
        if let nftables = firewalls.nftables, let snapshot = try nftablesSnapshot(nftables) {
            let own = snapshot.tables.first { $0.ref == TableRef.own }
            if let own, !own.ownedByAnotherProcess {
                do {
                    _ = try nftables.commit([.deleteTable(TableRef.own)], expecting: nil)
                    report.removedTable = true
                } catch where error.reason == .notFound {
                } catch {
                    throw Self.failure("recover: removing table \(TableRef.own)", error)
                }
            }
        }
        if sweep { try self.sweep(firewalls: firewalls, into: &report) }
        try state.deleteJournal()
        return report
    }

    /// Removes every "LE"-tagged rule of the host's input base chains and our table unless a live
    /// process owns it (one nftables batch), and every "LE"-tagged rule of x_tables' filter INPUT and
    /// mangle and nat PREROUTING (a commit per table).
    func sweep(firewalls: Firewalls, into report: inout RecoveryReport) throws(LERedirectError) {
        if let nftables = firewalls.nftables { try sweepNftables(nftables, into: &report) }
        if let legacy = firewalls.iptablesLegacy {
            let snapshot = try map { () throws(FirewallError) in try legacy.snapshot() }
            for table in snapshot.tables.map(\.ref).sorted() where ["filter", "nat", "mangle"].contains(table.name) {
                let chain = ChainRef(table, table.name == "filter" ? "INPUT" : "PREROUTING")
                report.removedRules += try legacy.exclusively { () throws(LERedirectError) -> Int in
                    let tagged = try map { () throws(FirewallError) in try legacy.rules(in: chain) }.filter { $0.comment == ruleTag }
                    guard !tagged.isEmpty else { return 0 }
                    let counts = Dictionary(tagged.map { ($0.fingerprint, 1) }, uniquingKeysWith: +)
                    do throws(FirewallError) {
                        _ = try legacy.commit(
                            counts.sorted { $0.key.value < $1.key.value }.map { .deleteMatching(chain, $0.key, count: $0.value) },
                            expecting: nil)
                    } catch {
                        throw Self.failure("recover --sweep: iptables-legacy \(table)", error)
                    }
                    return tagged.count
                }
            }
        }
    }

    /// nftables' snapshot, or nil on a kernel without nf_tables.
    private func nftablesSnapshot(_ firewall: any Firewall) throws(LERedirectError) -> FirewallSnapshot? {
        do { return try firewall.snapshot() } catch where error.reason == .unsupported { return nil } catch {
            throw Self.failure("reading the ruleset", error)
        }
    }

    private func sweepNftables(_ firewall: any Firewall, into report: inout RecoveryReport) throws(LERedirectError) {
        try committingWithRetries("recover --sweep") { (_) throws(CommitAttemptError) in
            guard let snapshot = try CommitAttemptError.lift({ () throws(LERedirectError) in try nftablesSnapshot(firewall) }) else {
                return
            }
            let own = snapshot.tables.first { $0.ref == TableRef.own }
            if let own, own.ownedByAnotherProcess {
                throw .other(
                    LERedirectError(
                        .conflict,
                        "table \(TableRef.own) is held by a live process: a session is active in this network namespace; "
                            + "end it first. Nothing was changed"))
            }
            var changes: [FirewallChange] = []
            for chain in snapshot.chains
            where chain.hook == .input && RedirectPlan.inputFamilies.contains(chain.ref.table.family)
                && chain.ref.table != TableRef.own
            {
                let rules = try read { () throws(FirewallError) in try firewall.rules(in: chain.ref) }
                changes += rules.filter { $0.comment == ruleTag }.map { .deleteRule($0.location) }
            }
            let removesTable = own != nil
            if removesTable { changes.append(.deleteTable(TableRef.own)) }
            if changes.isEmpty { return }
            do throws(FirewallError) { _ = try firewall.commit(changes, expecting: snapshot.generation) } catch {
                throw .commit(error)
            }
            report.removedRules += changes.count - (removesTable ? 1 : 0)
            report.removedTable = report.removedTable || removesTable
        }
    }

    // MARK: Committing against a generation

    /// Why one attempt of `committingWithRetries` failed: its commit was refused (retried when the
    /// reason is one of those named), or anything else (not retried).
    enum CommitAttemptError: Error {
        case commit(FirewallError)
        case other(LERedirectError)

        static func lift<T>(_ body: () throws(LERedirectError) -> T) throws(CommitAttemptError) -> T {
            do { return try body() } catch { throw .other(error) }
        }
    }

    /// The one retry loop of every nftables commit made against the generation of a snapshot
    /// (begin's batch, removing rules, the sweep): `attempt` reads, plans and commits; when its
    /// commit is refused because another program committed in between (the batch is refused as a
    /// whole, so nothing of it applied), it runs again from fresh state, up to `maxAttempts` times
    /// with `pauseBeforeRetry` between them.
    private func committingWithRetries<T>(
        _ context: String, retrying: Set<FirewallError.Reason> = [.generationChanged],
        _ attempt: (_ number: Int) throws(CommitAttemptError) -> T
    ) throws(LERedirectError) -> T {
        var number = 0
        while true {
            number += 1
            do { return try attempt(number) } catch {
                switch error {
                case .other(let failure): throw failure
                case .commit(let refused) where retrying.contains(refused.reason) && number < maxAttempts:
                    pauseBeforeRetry(number)
                case .commit(let refused): throw Self.failure(context, refused, attempts: number)
                }
            }
        }
    }

    /// `map` for an attempt: a failed read is not retried.
    private func read<T>(_ body: () throws(FirewallError) -> T) throws(CommitAttemptError) -> T {
        do { return try body() } catch { throw .other(Self.failure("reading the ruleset", error)) }
    }

    /// "12.345": milliseconds with microsecond precision, for the debug log.
    private func milliseconds(since start: ContinuousClock.Instant) -> String {
        let elapsed = ContinuousClock.now - start
        let micros = elapsed.components.seconds * 1_000_000 + elapsed.components.attoseconds / 1_000_000_000_000
        let fraction = String(micros % 1000)
        return "\(micros / 1000)." + String(repeating: "0", count: 3 - fraction.count) + fraction
    }

    // MARK: Errors

    private func map<T>(_ body: () throws(FirewallError) -> T) throws(LERedirectError) -> T {
        do {
            return try body()
        } catch {
            throw Self.failure("reading the ruleset", error)
        }
    }

    static func failure(_ context: String, _ error: FirewallError, attempts: Int = 1) -> LERedirectError {
        let kind: LERedirectError.Kind =
            switch error.reason {
            case .notPermitted: .notPermitted
            case .unsupported: .unsupported
            default: .failed
            }
        if error.reason == .generationChanged {
            return LERedirectError(
                .failed, "\(context): the ruleset kept changing under it (\(attempts) attempts); nothing was changed",
                errno: error.errno)
        }
        return LERedirectError(kind, "\(context): \(error.doing): \(error.detail)", errno: error.errno)
    }
}
