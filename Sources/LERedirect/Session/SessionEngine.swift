import LERedirectModel
import Logging

/// What recover (or the recovery at the start of begin and end) did.
public struct RecoveryReport: Sendable, Hashable {
    /// Rules removed from the host's chains.
    public var removedRules: Int = 0
    /// Whether a leftover `inet le_redirect` table was removed.
    public var removedTable = false
    /// Whether there was a journal of a dead session.
    public var recoveredJournal = false
    /// Things the operator should know (rules that were no longer ours, and were left alone).
    public var warnings: [String] = []

    public init() {}

    public var changedAnything: Bool { removedRules > 0 || removedTable || recoveredJournal }
}

/// The session's decisions, over any `Firewall` and the state directory: what begin commits and
/// records, what end removes, what recovery trusts. Nothing else touches the kernel or the journal.
struct SessionEngine {
    let state: StateDirectory
    let logger: Logger
    /// How a journal's holder is checked for life; tests replace it.
    var isAlive: @Sendable (ProcessIdentity) -> Bool = { ProcessFacts.isAlive($0) }
    /// Attempts when another process keeps committing between our read and our commit.
    var maxAttempts = 8

    // MARK: Begin (run by the holder, with the lock held)

    /// Plans, journals and commits begin's one batch, then records the kernel's handles. On any
    /// failure nothing is left behind: the kernel refused the batch whole, or the rules it took are
    /// removed again before this throws.
    func install(
        _ options: ValidatedOptions, firewall: some Firewall, holder: ProcessIdentity, namespace: NamespaceIdentity,
        now: Int64
    ) throws(LERedirectError) -> Journal {
        var attempt = 0
        while true {
            attempt += 1
            let snapshot = try map { () throws(FirewallError) in try firewall.snapshot() }
            let plan = try RedirectPlan.make(options, from: snapshot)
            var journal = Journal(
                phase: .intent, holder: holder, namespace: namespace, backend: firewall.backendName, port: plan.port,
                proxyPort: plan.proxyPort, proxy: options.proxy.name, createdAt: now, expiresAt: now + plan.ttl.milliseconds,
                accepts: plan.acceptChains.map {
                    Journal.Entry(chain: $0, fingerprint: firewall.fingerprint(of: plan.acceptRule, family: $0.table.family))
                })
            try state.writeJournal(journal)

            let inserted: [InsertedRule]
            do {
                let started = ContinuousClock.now
                inserted = try firewall.commit(plan.installChanges, expecting: plan.generation)
                logger.debug("begin batch committed", metadata: ["commitMs": "\(milliseconds(since: started))"])
            } catch where error.reason == .generationChanged && attempt < maxAttempts {
                logger.debug("the ruleset changed while begin planned; planning again", metadata: ["attempt": "\(attempt)"])
                continue
            } catch where error.reason == .outcomeUnknown {
                // The batch may have been applied: take back whatever of it is there.
                undo(journal, firewall: firewall)
                throw LERedirectError(.failed, "begin: \(error); anything it applied was removed again", errno: error.errno)
            } catch {
                // The kernel refused the batch as a whole: nothing changed.
                try? state.deleteJournal()
                throw Self.failure("begin", error, attempts: attempt)
            }

            guard inserted.count == 1 + plan.acceptChains.count else {
                undo(journal, firewall: firewall)
                throw LERedirectError(
                    .failed, "begin: the kernel reported \(inserted.count) inserted rules, expected "
                        + "\(1 + plan.acceptChains.count); everything was removed again")
            }
            journal.phase = .installed
            journal.accepts = zip(journal.accepts, inserted.dropFirst()).map { entry, rule in
                if rule.fingerprint != entry.fingerprint {
                    logger.warning(
                        "the kernel lists the scoped accept differently than planned; recording the kernel's form",
                        metadata: ["chain": "\(rule.location.chain)"])
                }
                return Journal.Entry(chain: rule.location.chain, fingerprint: rule.fingerprint, handle: rule.location.handle)
            }
            do {
                try state.writeJournal(journal)
            } catch {
                undo(journal, firewall: firewall)
                throw LERedirectError(error.kind, "\(error.message); the rules begin inserted were removed again")
            }
            logger.info(
                "redirect installed",
                metadata: ["port": "\(plan.port)", "proxyPort": "\(plan.proxyPort)", "accepts": "\(plan.acceptChains.count)"])
            return journal
        }
    }

    /// Best-effort removal of whatever begin's batch may have applied, then of the journal.
    private func undo(_ journal: Journal, firewall: some Firewall) {
        do {
            _ = try firewall.commit(RedirectPlan.removeRedirectChanges, expecting: nil)
        } catch where error.reason == .notFound {
        } catch {
            logger.error("undoing begin: \(error)")
        }
        do {
            _ = try removeAccepts(journal.accepts, firewall: firewall)
            try state.deleteJournal()
        } catch {
            logger.error("undoing begin: \(error); the journal is kept so that `le-redirect recover` can finish")
        }
    }

    // MARK: End (run by the holder)

    /// Removes the redirect (one batch), then the accepts (one batch), then the journal.
    /// End's sequence. `betweenSteps` runs once no new connection is redirected: the proxy drains
    /// there. The redirect is disarmed (its port leaves the set) rather than deleted at first:
    /// unregistering the namespace's last nat hook drops the NAT bindings of the connections in
    /// flight, and the kernel would then reset every proxied connection instead of letting it finish.
    func uninstall(_ journal: Journal, firewall: some Firewall, betweenSteps: () -> Void = {}) throws(LERedirectError)
        -> [String]
    {
        var warnings: [String] = []
        do {
            let started = ContinuousClock.now
            _ = try firewall.commit(RedirectPlan.disarmChanges(port: journal.port), expecting: nil)
            logger.debug("redirect disarmed", metadata: ["commitMs": "\(milliseconds(since: started))"])
        } catch where error.reason == .notFound {
            // Not armed (armed per challenge, or the TTL passed), or the table is gone: see below.
        } catch {
            throw Self.failure("end: removing the redirect", error)
        }
        betweenSteps()
        do {
            let started = ContinuousClock.now
            _ = try firewall.commit(RedirectPlan.removeRedirectChanges, expecting: nil)
            logger.debug("redirect removed", metadata: ["commitMs": "\(milliseconds(since: started))"])
        } catch where error.reason == .notFound {
            warnings.append("table \(TableRef.own) was already gone")
        } catch {
            throw Self.failure("end: removing the redirect", error)
        }
        warnings += try removeAccepts(journal.accepts, firewall: firewall).warnings
        try state.deleteJournal()
        return warnings
    }

    // MARK: Accepts

    /// Removes the scoped accepts a journal lists, each only after checking that the rule at its
    /// handle is still exactly ours (a host that reloaded its ruleset may have put its own rule
    /// there). Entries without a handle (an intent journal) are looked for by content in their chain.
    func removeAccepts(_ entries: [Journal.Entry], firewall: some Firewall) throws(LERedirectError)
        -> (removed: Int, warnings: [String])
    {
        var attempt = 0
        while true {
            attempt += 1
            var warnings: [String] = []
            let generation = try map { () throws(FirewallError) in try firewall.snapshot().generation }
            var targets: [RuleLocation] = []
            for entry in entries {
                if let handle = entry.handle {
                    let location = RuleLocation(entry.chain, handle: handle)
                    let observed = try map { () throws(FirewallError) in try firewall.rule(at: location) }
                    if let observed, observed.fingerprint == entry.fingerprint {
                        targets.append(location)
                    } else if observed != nil {
                        warnings.append(
                            "\(location) is no longer le-redirect's scoped accept (the host replaced its rules?); left alone")
                    } else {
                        logger.debug("scoped accept already gone", metadata: ["rule": "\(location)"])
                    }
                } else {
                    let rules = try map { () throws(FirewallError) in try firewall.rules(in: entry.chain) }
                    targets += rules.filter { $0.fingerprint == entry.fingerprint && $0.comment == ruleTag }.map(\.location)
                }
            }
            targets = Array(Set(targets)).sorted { ($0.chain, $0.handle) < ($1.chain, $1.handle) }
            if targets.isEmpty { return (0, warnings) }
            do {
                let started = ContinuousClock.now
                _ = try firewall.commit(RedirectPlan.removeAcceptChanges(targets), expecting: generation)
                logger.debug(
                    "scoped accepts removed",
                    metadata: ["count": "\(targets.count)", "commitMs": "\(milliseconds(since: started))"])
                return (targets.count, warnings)
            } catch where (error.reason == .generationChanged || error.reason == .notFound) && attempt < maxAttempts {
                continue
            } catch {
                throw Self.failure("removing the scoped accepts", error, attempts: attempt)
            }
        }
    }

    // MARK: Recover (run by anyone but the holder, with the lock held)

    /// Finishes a dead session: removes the rules its journal lists (and a leftover table), then the
    /// journal. With `sweep` and no usable journal, removes every "LE"-tagged rule of the host's
    /// input chains and our table instead.
    func recover(sweep: Bool, firewall: some Firewall, namespace: NamespaceIdentity) throws(LERedirectError)
        -> RecoveryReport
    {
        var report = RecoveryReport()
        guard let text = try state.readJournal() else {
            if sweep { try self.sweep(firewall: firewall, into: &report) }
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
                        + "\"LE\"-tagged rule of the input chains and table \(TableRef.own) instead")
            }
            logger.warning("\(error); sweeping instead")
            try self.sweep(firewall: firewall, into: &report)
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
        guard journal.backend == firewall.backendName else {
            throw LERedirectError(
                .failed, "the journal was written by the \(journal.backend) backend; this build recovers "
                    + "\(firewall.backendName) only. Nothing was changed")
        }
        logger.info("recovering a session whose holder is gone", metadata: ["pid": "\(journal.holder.pid)"])
        report.recoveredJournal = true
        let before = try map { () throws(FirewallError) in try firewall.snapshot() }
        let own = before.tables.first { $0.ref == TableRef.own }
        let removal = try removeAccepts(journal.accepts, firewall: firewall)
        report.warnings += removal.warnings
        report.removedRules = removal.removed
        // The owned table died with its holder; a copy restored without the owner flag goes too.
        if let own, !own.ownedByAnotherProcess {
            do {
                _ = try firewall.commit([.deleteTable(TableRef.own)], expecting: nil)
                report.removedTable = true
            } catch where error.reason == .notFound {
            } catch {
                throw Self.failure("recover: removing table \(TableRef.own)", error)
            }
        }
        if sweep { try self.sweep(firewall: firewall, into: &report) }
        try state.deleteJournal()
        return report
    }

    /// Removes every "LE"-tagged rule of the host's input base chains, and our table unless a live
    /// process owns it, in one batch.
    func sweep(firewall: some Firewall, into report: inout RecoveryReport) throws(LERedirectError) {
        var attempt = 0
        while true {
            attempt += 1
            let snapshot = try map { () throws(FirewallError) in try firewall.snapshot() }
            let own = snapshot.tables.first { $0.ref == TableRef.own }
            if let own, own.ownedByAnotherProcess {
                throw LERedirectError(
                    .conflict,
                    "table \(TableRef.own) is held by a live process: a session is active in this network namespace; "
                        + "end it first. Nothing was changed")
            }
            var changes: [FirewallChange] = []
            for chain in snapshot.chains
            where chain.hook == .input && RedirectPlan.inputFamilies.contains(chain.ref.table.family)
                && chain.ref.table != TableRef.own
            {
                let rules = try map { () throws(FirewallError) in try firewall.rules(in: chain.ref) }
                changes += rules.filter { $0.comment == ruleTag }.map { .deleteRule($0.location) }
            }
            let removesTable = own != nil
            if removesTable { changes.append(.deleteTable(TableRef.own)) }
            if changes.isEmpty { return }
            do {
                _ = try firewall.commit(changes, expecting: snapshot.generation)
                report.removedRules += changes.count - (removesTable ? 1 : 0)
                report.removedTable = report.removedTable || removesTable
                return
            } catch where error.reason == .generationChanged && attempt < maxAttempts {
                continue
            } catch {
                throw Self.failure("recover --sweep", error, attempts: attempt)
            }
        }
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
