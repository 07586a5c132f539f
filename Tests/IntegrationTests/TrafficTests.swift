import Foundation
import Testing

/// While a session is active, new connections to port 80 of the host's addresses reach the proxy
/// port over IPv4 and IPv6, through the host's firewall; nothing else is redirected (invariants 4, 5).
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct TrafficTests {
    static let hosts = [Host.nftablesPolicyDrop, .nftablesPolicyAccept, .nftablesSeveralChains] + Host.xtables

    @Test(arguments: hosts)
    func portEightyReachesTheProxyDuringTheWindowAndTheAppAfter(host: Host) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        try net.startListeners()
        let v4 = TestNetwork.hostAddress4, v6 = TestNetwork.hostAddress6
        #expect(try net.reach(v4) == "app")
        #expect(try net.reach(v6) == "app")

        let begin = try net.leRedirect(["begin", "--external-proxy", "--ttl", "2m"] + host.begin)
        #expect(begin.status == 0, "\(begin)")
        #expect(try net.status()["backend"] as? String == host.backend)
        #expect(try net.reach(v4) == "proxy")
        #expect(try net.reach(v6) == "proxy")
        // The proxy sees the real client, never a loopback address.
        #expect(try net.peerAddress(v4) == TestNetwork.clientAddress4)
        #expect(try net.peerAddress(v6) == TestNetwork.clientAddress6)
        // The proxy port itself stays closed to direct connections where the host drops by default.
        if host.name.contains("drop") {
            #expect(try net.reach(v4, port: 12347).hasPrefix("failed"))
            #expect(try net.reach(v6, port: 12347).hasPrefix("failed"))
        }
        #expect(try net.leRedirect("end").status == 0)

        #expect(try net.reach(v4) == "app")
        #expect(try net.reach(v6) == "app")
    }

    @Test(arguments: [Host.nftablesPolicyDrop, .legacyDrop])
    func theHostsOwnConnectionsAreNeverRedirected(host: Host) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        try net.startListeners()
        #expect(try net.leRedirect(["begin", "--external-proxy"] + host.begin).status == 0)
        for address in ["127.0.0.1", "::1", TestNetwork.hostAddress4, TestNetwork.hostAddress6] {
            #expect(try net.reach(address, from: net.host) == "app", "from the host to \(address)")
        }
        #expect(try net.leRedirect("end").status == 0)
    }

    @Test(arguments: [Host.emptyHost, .legacyDrop])
    func forwardedTrafficIsNeverRedirected(host: Host) throws {
        let net = try TestNetwork(host, router: true)
        defer { net.close() }
        try net.startListeners()
        #expect(try net.reach(TestNetwork.serverAddress4) == "backend")
        #expect(try net.leRedirect(["begin", "--external-proxy"] + host.begin).status == 0)
        #expect(try net.status()["backend"] as? String == host.backend)
        #expect(try net.reach(TestNetwork.serverAddress4) == "backend")
        #expect(try net.reach(TestNetwork.hostAddress4) == "proxy")
        #expect(try net.leRedirect("end").status == 0)
    }

    /// The scoped accept lets through only what the redirect sent: the proxy port itself stays
    /// closed to direct connections on a host whose firewall drops by default.
    @Test func theProxyPortIsReachableOnlyThroughTheRedirect() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startListeners()
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)
        #expect(try net.reach(TestNetwork.hostAddress4, port: 12347).hasPrefix("failed"))
        #expect(try net.reach(TestNetwork.hostAddress6, port: 12347).hasPrefix("failed"))
        #expect(try net.reach(TestNetwork.hostAddress4) == "proxy")
        #expect(try net.leRedirect("end").status == 0)
    }

    @Test func anotherPortCanBeTakenOver() throws {
        let net = try TestNetwork(ruleset: "empty")
        defer { net.close() }
        try net.start(net.host, ["python3", Paths.peer, "serve", "8080", "app8080"])
        try net.startListeners()
        #expect(try net.leRedirect("begin", "--external-proxy", "--port", "8080").status == 0)
        #expect(try net.reach(TestNetwork.hostAddress4, port: 8080) == "proxy")
        #expect(try net.reach(TestNetwork.hostAddress4) == "app")
        #expect(try net.leRedirect("end").status == 0)
    }
}
