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
        #expect(try net.status()["addresses"] as? [String] == [Self.named4, Self.named6])
        // Armed, disarmed and armed again: the legacy path rebuilds each rule from the journal.
        for _ in 0..<2 {
            let add = try net.leRedirect("challenge", "add", "tok", "tok.thumbprint")
            #expect(add.status == 0, "\(add)")
            #expect(try net.httpClient("get", Self.named4, "/.well-known/acme-challenge/tok") == "200 tok.thumbprint")
            #expect(try net.leRedirect("challenge", "remove", "tok").status == 0)
            #expect(try net.httpClient("get", Self.named4, "/.well-known/acme-challenge/tok") == "200 app challenge tok")
        }
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

    /// --include-local: the host's own new connections to the port (any user's, to any local
    /// address, loopback included) reach the proxy too, as an ACME client checking its own
    /// challenge needs; the proxy's own connections to the app still reach the app (nothing loops),
    /// the mark is cleared before the host's input chains, and end gives the ruleset back.
    @Test func includeLocalSteersTheHostsOwnConnectionsButNotTheProxys() throws {
        let net = try TestNetwork(.nftablesPolicyDrop)
        defer { net.close() }
        // A host rule that would drop anything still carrying le-redirect's mark bit on input: the
        // bit must be gone by then.
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("le-redirect-markcheck-\(UUID().uuidString).nft")
        defer { try? FileManager.default.removeItem(at: file) }
        try """
            table inet markcheck {
                chain input {
                    type filter hook input priority filter - 1; policy accept;
                    meta mark & 0x40000000 == 0x40000000 counter drop
                }
            }
            """.write(to: file, atomically: true, encoding: .utf8)
        let markCheck = try net.exec(net.host, ["nft", "-f", file.path])
        #expect(markCheck.status == 0, "\(markCheck)")
        try net.startApp()
        let before = try net.ruleset()
        let challenge = "/.well-known/acme-challenge/tok"
        // As a user of the host's who is neither root nor the proxy's.
        let unprivileged = ["setpriv", "--reuid", "12345", "--regid", "12345", "--clear-groups", "--inh-caps=-all"]
        func local(_ address: String, _ path: String, as user: [String] = []) throws -> String {
            let output = try net.exec(net.host, user + ["/usr/bin/python3", Paths.client, "get", address, path], timeout: 30)
            return output.status == 0 ? (output.stdout.split(separator: "\n").last.map(String.init) ?? "") : "failed: \(output)"
        }
        // Without it, the host's own connections are never steered (invariant 4).
        #expect(try net.leRedirect("begin", "--in-memory", "--unknown-challenges", "404").status == 0)
        #expect(try net.leRedirect("challenge", "add", "tok", "tok.thumbprint").status == 0)
        #expect(try local(TestNetwork.hostAddress4, challenge) == "200 app challenge tok")
        #expect(try net.httpClient("get", TestNetwork.hostAddress4, challenge) == "200 tok.thumbprint")
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.ruleset() == before)

        // A host rule that sets le-redirect's bit on every SYN to port 80 the host sends, the
        // proxy's own among them: the proxy's connection to the app must still not be steered back
        // to the proxy, and no SYN may reach input with the bit.
        let hostile = FileManager.default.temporaryDirectory.appendingPathComponent("le-redirect-hostmark-\(UUID().uuidString).nft")
        defer { try? FileManager.default.removeItem(at: hostile) }
        try """
            table inet hostmark {
                chain output {
                    type route hook output priority mangle; policy accept;
                    tcp dport 80 tcp flags syn / fin,syn,rst,ack meta mark set meta mark | 0x40000000
                }
            }
            """.write(to: hostile, atomically: true, encoding: .utf8)
        #expect(try net.exec(net.host, ["nft", "-f", hostile.path]).status == 0)
        let withHostMark = try net.ruleset()

        let begin = try net.leRedirect("begin", "--in-memory", "--unknown-challenges", "404", "--include-local")
        #expect(begin.status == 0, "\(begin)")
        #expect(try net.status()["includeLocal"] as? Bool == true)
        #expect(try net.status()["addresses"] as? [String] == [])
        #expect(try local(TestNetwork.hostAddress4, challenge) == "200 app challenge tok")  // not armed yet
        for round in 0..<2 {  // armed, disarmed with the session going on, armed again
            #expect(try net.leRedirect("challenge", "add", "tok", "tok.thumbprint").status == 0)
            for address in [TestNetwork.hostAddress4, TestNetwork.hostAddress6, "127.0.0.1", "127.0.1.1", "::1"] {
                #expect(try local(address, challenge) == "200 tok.thumbprint", "\(address)")
                #expect(try local(address, challenge, as: unprivileged) == "200 tok.thumbprint", "\(address)")
                // Anything else is relayed to the app, by the proxy, whose own connection is not steered.
                #expect(try local(address, "/").hasPrefix("200 app "), "\(address)")
            }
            #expect(try net.httpClient("get", TestNetwork.hostAddress6, challenge) == "200 tok.thumbprint")
            if round == 0 {
                // The rules as rules/nftables.nft prints them, the proxy's user exempt.
                let uid = (getpwnam("le-redirect") ?? getpwnam("nobody")).map { $0.pointee.pw_uid } ?? 65534
                let listed = try net.nftRuleset()
                let expected = """
                    \tchain local-in {
                    \t\ttype filter hook prerouting priority raw - 1; policy accept;
                    \t\tiifname "lo" meta mark & 0x40000000 == 0x40000000 fib daddr type local tcp dport @ports tcp flags syn / fin,syn,rst,ack meta mark set meta mark & 0xbfffffff tproxy to :12347 counter comment "LE"
                    \t\tiifname "lo" meta mark & 0x40000000 == 0x40000000 tcp flags syn / fin,syn,rst,ack meta mark set meta mark & 0xbfffffff comment "LE"
                    \t}

                    \tchain local-out {
                    \t\ttype filter hook postrouting priority 1000; policy accept;
                    \t\tmeta skuid != \(uid) fib daddr type local tcp dport @ports tcp flags syn / fin,syn,rst,ack meta mark set meta mark | 0x40000000 comment "LE"
                    \t\tmeta skuid \(uid) fib daddr type local tcp dport @ports tcp flags syn / fin,syn,rst,ack meta mark set meta mark & 0xbfffffff comment "LE"
                    \t}
                    """
                #expect(listed.contains(expected), "\(listed)")
            }
            #expect(try net.leRedirect("challenge", "remove", "tok").status == 0)
            #expect(try local(TestNetwork.hostAddress4, challenge) == "200 app challenge tok")
        }
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.ruleset() == withHostMark)
        #expect(try net.exec(net.host, ["nft", "delete", "table", "inet", "hostmark"]).status == 0)
        #expect(try net.ruleset() == before)
        #expect(try local(TestNetwork.hostAddress4, challenge) == "200 app challenge tok")

        // With --address, only connections to those addresses (loopback is not one of them).
        #expect(try net.leRedirect("begin", "--stateless", String(repeating: "T", count: 43), "--include-local",
                                   "--address", TestNetwork.hostAddress4).status == 0)
        let token = String(repeating: "a", count: 22)
        #expect(try local(TestNetwork.hostAddress4, "/.well-known/acme-challenge/\(token)") == "200 \(token).\(String(repeating: "T", count: 43))")
        #expect(try local("127.0.0.1", "/.well-known/acme-challenge/\(token)") == "200 app challenge \(token)")
        #expect(try local(TestNetwork.hostAddress6, "/.well-known/acme-challenge/\(token)") == "200 app challenge \(token)")
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.ruleset() == before)

        // The legacy path cannot: refused, nothing changed.
        let legacy = try TestNetwork(.legacyDropForcedLegacy)
        defer { legacy.close() }
        let legacyBefore = try legacy.ruleset()
        let refused = try legacy.leRedirect(["begin", "--in-memory", "--include-local"] + Host.legacyDropForcedLegacy.begin)
        #expect(refused.status == 1, "\(refused)")
        #expect(refused.stderr.contains("--include-local: the host's own connections can be steered only from nftables"), "\(refused)")
        #expect(try legacy.ruleset() == legacyBefore)
    }
}
