import Foundation
import Glibc
import Testing

/// Invariant 5: the host's own rules decide who reaches port 80 during a window exactly as outside
/// it. Each host firewall below (bans in the same chain and in a table of their own, an allow-list,
/// an interface limit, a rate limit, ufw's and firewalld's layouts; nftables, iptables-nft and
/// iptables-legacy) is probed as visitors would: a banned or unlisted one (10.99.0.2, fd99::2) and
/// an allowed one (10.99.0.3, fd99::3), before begin, during the window and after end. Where the
/// app answered before, the proxy answers during the window; where nothing answered, nothing does.
/// (The versions that rewrote connections let the banned visitor in for the whole window.)
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct PolicyTests {
    struct Scenario: Sendable, CustomTestStringConvertible {
        var host: Host
        /// Whether the banned or unlisted visitor reaches port 80 (the allowed one always does).
        var bannedReaches = false
        /// Whether the allowed visitor does.
        var allowedReaches = true
        /// Commands run in the host namespace before anything is measured.
        var setup: [[String]] = []
        /// Whether the host's rules keep the proxy port closed (they drop by default).
        var proxyPortClosed = true
        var testDescription: String { host.name }
    }

    static let makeMangle = [["iptables-legacy", "-t", "mangle", "-L", "-n"], ["ip6tables-legacy", "-t", "mangle", "-L", "-n"]]

    static let scenarios: [Scenario] = [
        Scenario(host: Host(name: "nftables: a ban in the input chain", nft: "banned")),
        Scenario(host: Host(name: "nftables: fail2ban's table of its own", nft: "banned-own-table"), proxyPortClosed: false),
        Scenario(host: Host(name: "nftables: an allow-list for port 80", nft: "allow-list")),
        Scenario(host: Host(name: "nftables: port 80 on another interface only", nft: "interface-limit"), allowedReaches: false),
        Scenario(host: Host(name: "firewalld's layout, a rich rule drops the visitor", nft: "firewalld")),
        Scenario(host: Host(name: "ufw's layout on iptables-nft", iptablesNft: "ufw")),
        Scenario(host: Host(name: "ufw's layout on iptables-legacy", legacy: "ufw")),
        Scenario(
            host: Host(
                name: "ufw's layout on iptables-legacy, --backend iptables-legacy", legacy: "ufw",
                begin: ["--backend", "iptables-legacy"], backend: "iptables-legacy"),
            setup: makeMangle),
    ]

    static let banned = [TestNetwork.clientAddress4, TestNetwork.clientAddress6]
    static let allowed = ["10.99.0.3", "fd99::3"]

    /// What each visitor gets on port 80 of the host's address of its family.
    func probe(_ net: TestNetwork) throws -> [String] {
        try (Self.banned + Self.allowed).map { source in
            let target = source.contains(":") ? TestNetwork.hostAddress6 : TestNetwork.hostAddress4
            let answer = try net.reach(target, sourceAddress: source, timeout: 1.5)
            return "\(source): " + (answer.hasPrefix("failed") ? "nothing" : answer)
        }
    }

    @Test(arguments: scenarios)
    func theHostsRulesDecideDuringTheWindowAsOutsideIt(_ s: Scenario) throws {
        let net = try TestNetwork(s.host)
        defer { net.close() }
        for command in s.setup { _ = try net.exec(net.host, command) }
        for address in ["10.99.0.3/24", "fd99::3/64"] {
            let add = try net.exec(net.client, ["ip", "addr", "add", address, "dev", "veth-c", "nodad"])
            try #require(add.status == 0, "\(add)")
        }
        try net.startListeners()
        let before = try net.ruleset()
        let expected = { (answer: String) in
            zip(Self.banned + Self.allowed, [s.bannedReaches, s.bannedReaches, s.allowedReaches, s.allowedReaches])
                .map { "\($0.0): " + ($0.1 ? answer : "nothing") }
        }
        let outside = try probe(net)
        #expect(outside == expected("app"), "before: \(outside)")

        let begin = try net.leRedirect(["begin", "--external-proxy"] + s.host.begin)
        try #require(begin.status == 0, "\(begin)")
        #expect(try net.status()["backend"] as? String == s.host.backend)
        let during = try probe(net)
        #expect(during == expected("proxy"), "during: \(during)")
        // The proxy port itself is reachable by nobody where the host drops what it does not let in.
        for target in [TestNetwork.hostAddress4, TestNetwork.hostAddress6] where s.proxyPortClosed {
            #expect(try net.reach(target, port: 12347, sourceAddress: target.contains(":") ? "fd99::3" : "10.99.0.3", timeout: 1.5).hasPrefix("failed"))
        }
        #expect(try net.leRedirect("end").status == 0)
        let after = try probe(net)
        #expect(after == expected("app"), "after: \(after)")
        #expect(try net.ruleset() == before)
    }

    /// A rate limit on new connections to port 80 counts the window's connections as it counts
    /// any: two get through, the third does not, before the window and during it.
    @Test func aRateLimitOnPortEightyStillLimits() throws {
        let net = try TestNetwork(ruleset: "rate-limit")
        defer { net.close() }
        try net.startListeners()
        let three = { () throws -> [String] in
            try (0..<3).map { _ in
                let answer = try net.reach(TestNetwork.hostAddress4, timeout: 1.5)
                return answer.hasPrefix("failed") ? "nothing" : answer
            }
        }
        let outside = try three()
        #expect(outside == ["app", "app", "nothing"], "before: \(outside)")
        // A fresh limit for the window: the host's table loaded again (ours is not there yet).
        #expect(try net.exec(net.host, ["nft", "flush", "ruleset"]).status == 0)
        #expect(try net.exec(net.host, ["nft", "-f", Paths.ruleset("rate-limit")]).status == 0)
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)
        let during = try three()
        #expect(during == ["proxy", "proxy", "nothing"], "during: \(during)")
        #expect(try net.leRedirect("end").status == 0)
    }
}
