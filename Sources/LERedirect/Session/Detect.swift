import LERedirectModel

extension Session {
    /// `le-redirect detect`: reads both systems (counting the rules of nftables' base chains, for
    /// the evidence), and works out what begin with `options` would do. Changes nothing.
    package static func detect(_ options: TakeoverOptions) throws(LERedirectError) -> DetectionReport {
        let valid = try options.validated()
        try requirePrivileges("detect")
        try SessionEngine.checkAddresses(valid.addresses, local: ProcessFacts.localAddresses(), doing: "detect")
        let firewalls = try Firewalls.open("detect")
        defer { firewalls.close() }
        var unavailable = firewalls.unavailable
        var nftables: FirewallSnapshot?
        do {
            if let connection = firewalls.nftables {
                var snapshot = try connection.snapshot()
                for index in snapshot.chains.indices where snapshot.chains[index].hook != nil {
                    snapshot.chains[index].rules = try connection.rules(in: snapshot.chains[index].ref).count
                }
                nftables = snapshot
            }
        } catch where error.reason == .unsupported {
            unavailable[.nftables] = error.detail
        } catch {
            throw SessionEngine.failure("detect: reading nftables", error)
        }
        let legacy: FirewallSnapshot?
        do { legacy = try firewalls.iptablesLegacy?.snapshot() } catch {
            throw SessionEngine.failure("detect: reading iptables-legacy", error)
        }
        return DetectionReport(
            valid, nftables: nftables, iptablesLegacy: legacy, unavailable: unavailable,
            kernel: ProcessFacts.kernelSupport(thorough: true), now: unixMilliseconds())
    }
}
