import LERedirectModel

extension Firewalls {
    /// Opens a connection to each firewall system that this kernel has. A missing system is noted
    /// (detect says why, begin plans without it); a permission problem is an error.
    static func open(_ doing: String) throws(LERedirectError) -> Firewalls {
        var connections: [any Firewall] = []
        var unavailable: [FirewallSystem: String] = [:]
        do { connections.append(try NftablesFirewall()) } catch {
            if error.reason == .notPermitted { throw SessionEngine.failure(doing, error) }
            unavailable[.nftables] = error.detail
        }
        do { connections.append(try IptablesLegacyFirewall()) } catch {
            unavailable[.iptablesLegacy] = error.detail
        }
        return Firewalls(connections, unavailable: unavailable)
    }
}
