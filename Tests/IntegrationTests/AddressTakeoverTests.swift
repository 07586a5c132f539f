import Foundation
import Testing

/// `--address`: only the named local addresses are taken over; connections to the host's other
/// addresses, and to a family no address names, reach the app as outside a window. On nftables
/// (with and without the identity binding a host with nat gets) and on the legacy path, where the
/// rules armed per challenge are rebuilt from the journal with their address.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct AddressTakeoverTests {
    static let named4 = "10.99.0.3", other4 = TestNetwork.hostAddress4
    static let named6 = TestNetwork.hostAddress6, other6 = "fd99::3"

    @Test(arguments: [Host.nftablesPolicyDrop, .legacyDrop, .legacyDropForcedLegacy])
    func onlyTheNamedAddressesAreTakenOver(host: Host) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        for (address, family) in [("\(Self.named4)/24", "-4"), ("\(Self.other6)/64", "-6")] {
            let add = try net.exec(net.host, ["ip", family, "addr", "add", address, "dev", "veth-h"] + (family == "-6" ? ["nodad"] : []))
            #expect(add.status == 0, "\(add)")
        }
        try net.startApp()
        let before = try net.ruleset()
        let all = [Self.named4, Self.other4, Self.named6, Self.other6]
        for address in all {
            #expect(try net.httpClient("get", address, "/.well-known/acme-challenge/tok") == "200 app challenge tok")
        }

        let begin = try net.leRedirect(
            ["begin", "--in-memory", "--unknown-challenges", "404", "--address", Self.named4, "--address", Self.named6] + host.begin)
        #expect(begin.status == 0, "\(begin)")
        #expect(try net.status()["backend"] as? String == host.backend)
        let add = try net.leRedirect("challenge", "add", "tok", "tok.thumbprint")
        #expect(add.status == 0, "\(add)")
        for address in all {
            let named = address == Self.named4 || address == Self.named6
            #expect(
                try net.httpClient("get", address, "/.well-known/acme-challenge/tok") == (named ? "200 tok.thumbprint" : "200 app challenge tok"),
                "\(address)")
            // Relayed by the proxy, the app sees a connection from one of the host's addresses
            // (without --forwarded or --proxy-protocol); directly, from the client.
            let client = address.contains(":") ? TestNetwork.clientAddress6 : TestNetwork.clientAddress4
            let seen = try net.httpClient("get", address, "/")
            #expect(seen.hasPrefix("200 app ") && (seen == "200 app \(client)") == !named, "\(address): \(seen)")
        }

        // The rules are those the docs (rules/) print: one per address, nothing for the others.
        if host.backend == "nftables" {
            let listed = try net.nftRuleset()
            #expect(listed.contains(#"iifname != "lo" fib daddr type local ip daddr 10.99.0.3 tcp dport @ports tcp flags syn / fin,syn,rst,ack tproxy to :12347 counter comment "LE""#), "\(listed)")
            #expect(listed.contains(#"iifname != "lo" fib daddr type local ip6 daddr fd99::1 tcp dport @ports tcp flags syn / fin,syn,rst,ack tproxy to :12347 counter comment "LE""#), "\(listed)")
            #expect(listed.components(separatedBy: "tproxy to").count == 3)
            if host.legacy != nil {  // x_tables nat: the identity binding, per address too
                #expect(listed.contains(#"iifname != "lo" fib daddr type local ip daddr 10.99.0.3 tcp dport @ports tcp flags syn / fin,syn,rst,ack dnat ip to ip daddr comment "LE""#), "\(listed)")
                #expect(listed.contains(#"iifname != "lo" fib daddr type local ip6 daddr fd99::1 tcp dport @ports tcp flags syn / fin,syn,rst,ack dnat ip6 to ip6 daddr comment "LE""#), "\(listed)")
                #expect(listed.components(separatedBy: "dnat ip").count == 3)
            }
        } else {
            let listed = try net.legacyRuleset()
            let v4 = listed.components(separatedBy: "# ip6tables-legacy-save")[0], v6 = listed.components(separatedBy: "# ip6tables-legacy-save")[1]
            #expect(v4.contains("-A PREROUTING -d 10.99.0.3/32 ! -i lo -p tcp -m tcp --dport 80 --tcp-flags FIN,SYN,RST,ACK SYN -m addrtype --dst-type LOCAL"), "\(listed)")
            #expect(v6.contains("-A PREROUTING -d fd99::1/128 ! -i lo -p tcp -m tcp --dport 80 --tcp-flags FIN,SYN,RST,ACK SYN -m addrtype --dst-type LOCAL"), "\(listed)")
            #expect(listed.components(separatedBy: "--comment LE").count == 5)  // TPROXY and ACCEPT, per family
        }

        #expect(try net.leRedirect("challenge", "remove", "tok").status == 0)
        #expect(try net.httpClient("get", Self.named4, "/.well-known/acme-challenge/tok") == "200 app challenge tok")
        let end = try net.leRedirect("end")
        #expect(end.status == 0, "\(end)")
        #expect(try net.ruleset() == before)

        // An address this host does not have takes nothing over: refused, nothing changed.
        let missing = try net.leRedirect(["begin", "--external-proxy", "--address", "10.99.0.9"] + host.begin)
        #expect(missing.status == 2, "\(missing)")
        #expect(missing.stderr.contains("--address 10.99.0.9: not an address of this host's interfaces"), "\(missing)")
        #expect(try net.ruleset() == before)
        #expect(try net.status()["active"] as? Bool == false)
    }
}
