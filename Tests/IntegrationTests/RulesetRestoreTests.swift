import Foundation
import Testing

/// Invariant 1: after `end`, the host's ruleset is exactly what it was before `begin`.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct RulesetRestoreTests {
    static let hosts = ["empty", "policy-accept", "policy-drop", "several-chains"]

    @Test(arguments: hosts)
    func beginThenEndRestoresTheRuleset(host: String) throws {
        let net = try TestNetwork(ruleset: host)
        defer { net.close() }
        let before = try net.ruleset()

        let begin = try net.leRedirect("begin", "--external-proxy", "--ttl", "2m")
        #expect(begin.status == 0, "\(begin)")
        let during = try net.ruleset()
        #expect(during.contains("table inet le_redirect"))
        #expect(during.contains("flags owner"))
        // One scoped accept per input base chain of the host, and nowhere else.
        let chains = try net.exec(net.host, ["nft", "-j", "list", "chains"]).stdout
        let inputChains = chains.components(separatedBy: "\"hook\": \"input\"").count - 1
        let accepts = during.components(separatedBy: "ct status dnat ct original proto-dst 80 accept comment \"LE\"").count - 1
        #expect(accepts == inputChains)

        let end = try net.leRedirect("end")
        #expect(end.status == 0, "\(end)")
        #expect(try net.ruleset() == before)
        #expect(!FileManager.default.fileExists(atPath: net.stateDirectory + "/journal"))
        #expect(!FileManager.default.fileExists(atPath: net.stateDirectory + "/control.sock"))
    }

    /// rules/nftables.nft is what the kernel lists after begin on the typical host
    /// (Tests/IntegrationTests/Rulesets/policy-drop.nft).
    @Test func rulesFileMatchesWhatTheKernelLists() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let begin = try net.leRedirect("begin", "--external-proxy", "--ttl", "15m")
        #expect(begin.status == 0, "\(begin)")
        let listed = try net.ruleset()
        let file = try String(contentsOf: Paths.repository.appendingPathComponent("rules/nftables.nft"), encoding: .utf8)
        let expected = file.split(separator: "\n", omittingEmptySubsequences: false)
            .filter { !$0.hasPrefix("#") }.joined(separator: "\n")
        #expect(listed.trimmingCharacters(in: .whitespacesAndNewlines) == expected.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(try net.leRedirect("end").status == 0)
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
