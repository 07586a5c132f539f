import Foundation
import Testing

/// Invariant 1: after `end`, the host's ruleset (nftables and x_tables) is exactly what it was before
/// `begin`, whichever system holds the host's firewall and whichever holds the redirect.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct RulesetRestoreTests {
    @Test(arguments: Host.all)
    func beginThenEndRestoresTheRuleset(host: Host) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        let before = try net.ruleset()

        let begin = try net.leRedirect(["begin", "--external-proxy", "--ttl", "2m"] + host.begin)
        #expect(begin.status == 0, "\(begin)")
        #expect(try net.status()["backend"] as? String == host.backend)
        let nft = try net.nftRuleset(), legacy = try net.legacyRuleset()
        if host.backend == "nftables" {
            #expect(nft.contains("table inet le_redirect"))
            #expect(nft.contains("flags owner"))
            #expect(!legacy.contains("-j REDIRECT --to-ports 12347"))
        } else {
            #expect(!nft.contains("table inet le_redirect"))
            // One expiring redirect per family, in x_tables' nat PREROUTING.
            #expect(legacy.components(separatedBy: "-m comment --comment LE -j REDIRECT --to-ports 12347").count - 1 == 2)
        }
        // One scoped accept per input chain of either system, and nowhere else.
        let chains = try net.exec(net.host, ["nft", "-j", "list", "chains"]).stdout
        let nftInputChains = chains.components(separatedBy: "\"hook\": \"input\"").count - 1
        let legacyFilterTables = legacy.components(separatedBy: "*filter").count - 1
        let nftAccepts = nft.components(separatedBy: "ct status dnat ct original proto-dst 80").count - 1
        let legacyAccepts = legacy.components(separatedBy: "--ctstate DNAT --ctorigdstport 80 -m comment --comment LE -j ACCEPT").count - 1
        #expect(nftAccepts == nftInputChains)
        #expect(legacyAccepts == legacyFilterTables)
        #expect((try net.status()["acceptRules"] as? NSNumber)?.intValue == nftInputChains + legacyFilterTables)

        let end = try net.leRedirect("end")
        #expect(end.status == 0, "\(end)")
        #expect(try net.ruleset() == before)
        #expect(!FileManager.default.fileExists(atPath: net.stateDirectory + "/journal"))
        #expect(!FileManager.default.fileExists(atPath: net.stateDirectory + "/control.sock"))
    }

    /// rules/nftables.nft is what the kernel lists after begin on a typical nftables host
    /// (Tests/IntegrationTests/Rulesets/policy-drop.nft).
    @Test func nftablesRulesFileMatchesWhatTheKernelLists() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let begin = try net.leRedirect("begin", "--external-proxy", "--ttl", "15m")
        #expect(begin.status == 0, "\(begin)")
        let listed = try net.nftRuleset()
        let expected = try Self.rulesFile("nftables.nft")
        #expect(listed.trimmingCharacters(in: .whitespacesAndNewlines) == expected.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(try net.leRedirect("end").status == 0)
    }

    /// rules/iptables-legacy.rules is what iptables-legacy-save and ip6tables-legacy-save list after
    /// begin on an x_tables host (Rulesets/legacy-drop.v4.rules and .v6.rules); the redirect's
    /// --datestop is the session's expiry, to the second.
    @Test func iptablesLegacyRulesFileMatchesWhatTheKernelLists() throws {
        let net = try TestNetwork(legacy: "legacy-drop")
        defer { net.close() }
        let begin = try net.leRedirect("begin", "--external-proxy", "--ttl", "15m")
        #expect(begin.status == 0, "\(begin)")
        let expires = try #require(net.status()["expiresAt"] as? String)
        let listed = try net.legacyRuleset()
        #expect(listed.contains("--datestop \(expires.dropLast()) "), "expires \(expires)")
        let datestop = #"--datestop [0-9T:-]+"#
        let expected = try Self.rulesFile("iptables-legacy.rules")
        let normalised = { (text: String) in
            text.replacingOccurrences(of: datestop, with: "--datestop X", options: .regularExpression)
                .replacingOccurrences(of: #"\[\d+:\d+\]"#, with: "[]", options: .regularExpression)
                .trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(normalised(listed) == normalised(expected))
        #expect(try net.leRedirect("end").status == 0)
    }

    /// A rules file without its comment lines, but with the "# iptables-legacy-save" headings.
    static func rulesFile(_ name: String) throws -> String {
        let file = try String(contentsOf: Paths.repository.appendingPathComponent("rules/\(name)"), encoding: .utf8)
        return file.split(separator: "\n", omittingEmptySubsequences: false)
            .filter { !$0.hasPrefix("#") || $0.hasPrefix("# ip") }.joined(separator: "\n")
    }

    @Test func statusReportsTheSession() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        #expect(try net.status()["active"] as? Bool == false)
        let begin = try net.leRedirect("begin", "--external-proxy", "--port", "80", "--proxy-port", "12347", "--ttl", "5m")
        #expect(begin.status == 0, "\(begin)")
        let status = try net.status()
        #expect(status["active"] as? Bool == true)
        #expect(status["backend"] as? String == "nftables")
        #expect((status["port"] as? NSNumber)?.intValue == 80)
        #expect((status["proxyPort"] as? NSNumber)?.intValue == 12347)
        #expect((status["acceptRules"] as? NSNumber)?.intValue == 3)
        #expect(status["responding"] as? Bool == true)
        #expect(status["counters"] is [String: Any])
        let expires = try #require(status["expiresAt"] as? String)
        let formatter = ISO8601DateFormatter()
        let deadline = try #require(formatter.date(from: expires))
        #expect(abs(deadline.timeIntervalSinceNow - 300) < 10)
        let pid = try #require((status["pid"] as? NSNumber)?.int32Value)
        #expect(!processGone(pid))
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.status()["active"] as? Bool == false)
    }
}

/// The guard every kernel test relies on must be able to fail.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct NamespaceGuardTests {
    @Test func theTestProcessItselfCountsAsTheInitialNamespace() throws {
        let references = try TestNetwork.referenceNamespaces()
        let mine = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/net")
        #expect(references.contains(mine))
        let net = try TestNetwork()
        defer { net.close() }
        let inside = try net.exec(net.host, ["readlink", "/proc/self/ns/net"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(inside.hasPrefix("net:["))
        #expect(!references.contains(inside))
    }
}
