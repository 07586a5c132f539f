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
