import Foundation
import Testing

/// The built-in validation proxy against a real nginx app and real clients, in namespaces: every
/// relay case, every challenge source, the arming per challenge, and drain under load.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct ProxyTests {
    static let v4 = TestNetwork.hostAddress4, v6 = TestNetwork.hostAddress6

    @Test(arguments: [Host.nftablesPolicyDrop, .emptyHost, .legacyDropForcedLegacy])
    func relaysEveryHTTPShapeThroughNginx(host: Host) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        try net.startNginx()
        let before = try net.ruleset()
        let begin = try net.leRedirect(["begin", "--ttl", "2m"] + host.begin)
        #expect(begin.status == 0, "\(begin)")
        #expect(try net.status()["backend"] as? String == host.backend)
        for address in [Self.v4, Self.v6] {
            // Keep-alive, pipelining, HEAD, a 4 MiB answer, a 3 MB body, a chunked body.
            #expect(try net.httpClient("pipeline", address) == "ok pipeline", "\(address)")
            #expect(try net.httpClient("slow", address) == "ok slow", "\(address)")
            #expect(try net.httpClient("slowclient", address) == "ok slowclient", "\(address)")
            // nginx sees the host's own address, never loopback; the client's headers pass unchanged.
            #expect(try net.httpClient("get", address, "/", "X-Forwarded-For: 6.6.6.6") == "200 app \(address) x-forwarded-for=6.6.6.6")
        }
        let status = try net.status()
        let counters = try #require(status["counters"] as? [String: Int])
        #expect(counters["requests"]! >= 16)
        #expect(counters["errors"] == 0)
        #expect(status["proxy"] as? String == "built-in")
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.ruleset() == before)
    }

    @Test func upgradesAndHalfClosesPassThrough() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        #expect(try net.leRedirect("begin").status == 0)
        for address in [Self.v4, Self.v6] {
            #expect(try net.httpClient("upgrade", address) == "ok upgrade", "\(address)")
        }
        #expect(try net.leRedirect("end").status == 0)
    }

    @Test func forwardedHeadersReplaceTheClients() throws {
        let net = try TestNetwork(ruleset: "empty")
        defer { net.close() }
        try net.startApp()
        #expect(try net.leRedirect("begin", "--forwarded").status == 0)
        let client4 = TestNetwork.clientAddress4, client6 = TestNetwork.clientAddress6
        #expect(
            try net.httpClient("get", Self.v4, "/", "X-Forwarded-For: 6.6.6.6")
                == "200 app \(Self.v4) x-forwarded-for=\(client4) x-forwarded-proto=http forwarded=for=\(client4);proto=http")
        #expect(
            try net.httpClient("get", Self.v6, "/", "Forwarded: for=evil")
                == "200 app \(Self.v6) x-forwarded-for=\(client6) x-forwarded-proto=http forwarded=for=\"[\(client6)]\";proto=http")
        #expect(try net.leRedirect("end").status == 0)
    }

    @Test func challengesGoToTheChallengePortAndEverythingElseToTheApp() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        try net.startApp(port: 12348, tag: "acme-client", address: "127.0.0.1")
        #expect(try net.leRedirect("begin").status == 0)
        for address in [Self.v4, Self.v6] {
            #expect(try net.httpClient("get", address, "/.well-known/acme-challenge/tok_1-A") == "200 acme-client challenge tok_1-A")
            #expect(try net.httpClient("get", address, "/") == "200 app \(address)")
        }
        let counters = try #require(try net.status()["counters"] as? [String: Int])
        #expect(counters["challenges"] == 2)
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/tok_1-A") == "200 app challenge tok_1-A")
    }

    @Test func challengesGoToAChallengeURL() throws {
        let net = try TestNetwork(ruleset: "empty")
        defer { net.close() }
        try net.startApp()
        try net.startApp(port: 9000, tag: "acme-node")
        #expect(try net.leRedirect("begin", "--challenge-url", "http://[\(Self.v6)]:9000").status == 0)
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/abc") == "200 acme-node challenge abc")
        #expect(try net.httpClient("get", Self.v4, "/index") == "200 app \(Self.v4)")
        #expect(try net.leRedirect("end").status == 0)
    }

    @Test func challengesFromAWebroot() throws {
        let net = try TestNetwork(ruleset: "empty")
        defer { net.close() }
        try net.startApp()
        let webroot = net.stateDirectory + "-nginx/webroot"
        try FileManager.default.createDirectory(atPath: webroot + "/.well-known/acme-challenge", withIntermediateDirectories: true)
        try "tokA.thumb".write(toFile: webroot + "/tokA", atomically: true, encoding: .utf8)
        try "tokB.thumb".write(toFile: webroot + "/.well-known/acme-challenge/tokB", atomically: true, encoding: .utf8)
        try "secret".write(toFile: net.stateDirectory + "-nginx/secret", atomically: true, encoding: .utf8)
        #expect(try net.leRedirect("begin", "--webroot", webroot, "--unknown-challenges", "404").status == 0)
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/tokA") == "200 tokA.thumb")
        #expect(try net.httpClient("get", Self.v6, "/.well-known/acme-challenge/tokB") == "200 tokB.thumb")
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/missing") == "404 unknown ACME challenge token")
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/../secret") == "404 unknown ACME challenge token")
        #expect(try net.httpClient("get", Self.v4, "/") == "200 app \(Self.v4)")
        #expect(try net.leRedirect("end").status == 0)
        // By default a token the webroot lacks is the app's: what it would get without le-redirect.
        #expect(try net.leRedirect("begin", "--webroot", webroot).status == 0)
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/tokA") == "200 tokA.thumb")
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/missing") == "200 app challenge missing")
        #expect(try net.leRedirect("end").status == 0)
    }

    /// --in-memory: the redirect is armed only while a token is registered, so between challenges
    /// new connections reach the app directly.
    @Test(arguments: [Host.nftablesPolicyDrop, .legacyDropForcedLegacy])
    func inMemoryTokensArmTheRedirectPerChallenge(host: Host) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        try net.startApp()
        let before = try net.ruleset()
        #expect(try net.leRedirect(["begin", "--in-memory", "--unknown-challenges", "404"] + host.begin).status == 0)
        #expect(try net.status()["backend"] as? String == host.backend)
        #expect(try net.status()["armed"] as? Bool == false)
        // Not armed: the app answers even the challenge path.
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/tok") == "200 app challenge tok")
        let add = try net.leRedirect("challenge", "add", "tok", "tok.thumbprint")
        #expect(add.status == 0, "\(add)")
        #expect(try net.status()["armed"] as? Bool == true)
        for address in [Self.v4, Self.v6] {
            #expect(try net.httpClient("get", address, "/.well-known/acme-challenge/tok") == "200 tok.thumbprint")
            #expect(try net.httpClient("get", address, "/.well-known/acme-challenge/other") == "404 unknown ACME challenge token")
            #expect(try net.httpClient("get", address, "/") == "200 app \(address)")
        }
        #expect(try net.leRedirect("challenge", "remove", "tok").status == 0)
        #expect(try net.status()["armed"] as? Bool == false)
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/tok") == "200 app challenge tok")
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.ruleset() == before)
    }

    /// certbot --manual hooks: the auth hook begins a session armed for its token, the cleanup hook
    /// ends it with the last one.
    @Test func certbotManualHooksMakeAWindowOneChallengeLong() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        let before = try net.ruleset()
        let env = ["CERTBOT_TOKEN": "T0k-en_", "CERTBOT_VALIDATION": "T0k-en_.thumb", "CERTBOT_DOMAIN": "example.test"]
        let auth = try net.exec(net.host, [Paths.binary, "challenge", "certbot-auth"], environment: env)
        #expect(auth.status == 0, "\(auth)")
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/T0k-en_") == "200 T0k-en_.thumb")
        let cleanup = try net.exec(net.host, [Paths.binary, "challenge", "certbot-cleanup"], environment: env)
        #expect(cleanup.status == 0, "\(cleanup)")
        #expect(try net.status()["active"] as? Bool == false)
        #expect(try net.ruleset() == before)
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/T0k-en_") == "200 app challenge T0k-en_")
    }

    /// Behind a load balancer that sends PROXY protocol (nginx `listen 80 proxy_protocol`): the
    /// header (v1 or v2, split inside it) is read past, the request after it routed, and the header
    /// handed on unchanged, so the app sees the balancer's client exactly as without le-redirect;
    /// a challenge goes to the challenge source without it. With --proxy-protocol v2 the proxy's
    /// own header replaces the one that came (a client cannot name its address to an app that
    /// trusts the proxy).
    @Test(arguments: [Host.nftablesPolicyDrop, .legacyDropForcedLegacy])
    func aLoadBalancersProxyHeaderIsHandedOnUnchanged(host: Host) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        try net.startNginx(proxyProtocol: true)
        try net.startApp(port: 12348, tag: "acme-client", address: "127.0.0.1")
        let before = try net.ruleset()
        // nginx wants the whole header in its first read; the proxy also takes one cut in two.
        func check(_ phase: String, challenge: String, split: [String] = []) throws {
            for (address, source) in [(Self.v4, "192.0.2.7"), (Self.v6, "2001:db8::7")] {
                for version in ["v1", "v2"] {
                    #expect(
                        try net.httpClient(["proxied", address, version, "/"] + split) == "200 app \(source)",
                        "\(phase) \(address) \(version)")
                    #expect(
                        try net.httpClient(["proxied", address, version, "/.well-known/acme-challenge/tok"] + split) == challenge,
                        "\(phase) \(address) \(version)")
                }
                // Without a header nginx refuses the connection, during the window as outside it.
                #expect(try net.httpClient("get", address, "/").hasPrefix("failed"), "\(phase) \(address)")
            }
        }
        try check("before", challenge: "200 app challenge tok")
        #expect(try net.leRedirect(["begin"] + host.begin).status == 0)
        try check("window", challenge: "200 acme-client challenge tok")
        try check("window, split", challenge: "200 acme-client challenge tok", split: ["split"])
        let counters = try #require(try net.status()["counters"] as? [String: Int])
        #expect(counters["challenges"] == 8)
        #expect(try net.leRedirect("end").status == 0)
        try check("after", challenge: "200 app challenge tok")
        #expect(try net.leRedirect(["begin", "--proxy-protocol", "v2"] + host.begin).status == 0)
        #expect(try net.httpClient("proxied", Self.v4, "v1", "/") == "200 app \(TestNetwork.clientAddress4)")
        #expect(try net.httpClient("proxied", Self.v6, "v2", "/") == "200 app \(TestNetwork.clientAddress6)")
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.ruleset() == before)
    }

    /// --unknown-challenges: by default a challenge the session cannot answer reaches the app, as
    /// without le-redirect (a certificate renewed through --webroot or the nginx plugin in the same
    /// `certbot renew`, whose challenge port has nothing listening); with 404 the proxy answers it.
    @Test func unknownChallengesGoToTheAppOr404() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        let path = "/.well-known/acme-challenge/"
        // Nothing listens on the challenge port.
        #expect(try net.leRedirect("begin").status == 0)
        for address in [Self.v4, Self.v6] {
            #expect(try net.httpClient("get", address, path + "tokW") == "200 app challenge tokW", "\(address)")
            #expect(try net.httpClient("get", address, path + "a%2Fb") == "200 app challenge a%2Fb", "\(address)")
        }
        #expect(try net.leRedirect("end").status == 0)
        // With --forwarded the app gets the proxy's forwarding headers there too, not the client's.
        #expect(try net.leRedirect("begin", "--forwarded").status == 0)
        let client = TestNetwork.clientAddress4
        #expect(
            try net.httpClient("get", Self.v4, path + "tokW", "X-Forwarded-For: 6.6.6.6")
                == "200 app challenge tokW x-forwarded-for=\(client) x-forwarded-proto=http forwarded=for=\(client);proto=http")
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.leRedirect("begin", "--unknown-challenges", "404").status == 0)
        #expect(
            try net.httpClient("get", Self.v4, path + "tokW") == "502 the ACME client's challenge server did not accept the connection")
        #expect(try net.httpClient("get", Self.v4, path + "a%2Fb") == "404 unknown ACME challenge token")
        #expect(try net.leRedirect("end").status == 0)
        // In memory: a token not registered.
        #expect(try net.leRedirect("begin", "--in-memory").status == 0)
        #expect(try net.leRedirect("challenge", "add", "tok", "tok.thumbprint").status == 0)
        #expect(try net.httpClient("get", Self.v4, path + "tok") == "200 tok.thumbprint")
        #expect(try net.httpClient("get", Self.v6, path + "other") == "200 app challenge other")
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.leRedirect("begin", "--unknown-challenges", "maybe").status == 2)
    }

    /// --stateless THUMBPRINT answers any plain token of 22-128 characters with TOKEN.THUMBPRINT,
    /// as text/plain that no browser sniffs; nothing else is echoed (RFC 8555 8.3).
    @Test func statelessAnswersEveryPlainTokenAndEchoesNothingElse() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        let path = "/.well-known/acme-challenge/"
        let thumbprint = "n4bQgYhMfWWaL-qgxVrQFaO_TxsrC4Is0V1sFbDwCgg"
        let token = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
        #expect(try net.leRedirect("begin", "--stateless", "not-a-thumbprint").status == 2)
        #expect(try net.leRedirect("begin", "--stateless", thumbprint, "--unknown-challenges", "404").status == 0)
        for address in [Self.v4, Self.v6] {
            #expect(try net.httpClient("typed", address, path + token) == "200 text/plain nosniff \(token).\(thumbprint)")
            #expect(try net.httpClient("typed", address, path + String(token.prefix(21))) == "404 text/plain nosniff unknown ACME challenge token")
            #expect(try net.httpClient("typed", address, path + "%3Cscript%3Ealert(1)%3C%2Fscript%3Exxxxxxxxxxxx") == "404 text/plain nosniff unknown ACME challenge token")
            #expect(try net.httpClient("get", address, "/") == "200 app \(address)")
        }
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.leRedirect("begin", "--stateless", thumbprint, "--webroot", "/tmp").status == 2)
    }

    /// Connections to the proxy port that did not come through the redirect are closed at once.
    @Test func theProxyServesOnlyRedirectedConnections() throws {
        let net = try TestNetwork(ruleset: "empty")
        defer { net.close() }
        try net.startApp()
        #expect(try net.leRedirect("begin").status == 0)
        #expect(try net.httpClient("raw", Self.v4, "12347", from: net.host) == "closed")
        #expect(try net.httpClient("raw", "::1", "12347", from: net.host) == "closed")
        #expect(try net.httpClient("raw", Self.v4, "12347") == "closed")
        let counters = try #require(try net.status()["counters"] as? [String: Int])
        #expect(counters["refused"] == 3)
        #expect(try net.leRedirect("end").status == 0)
    }

    /// A host that publishes a container's port 80 the way Docker does (nat PREROUTING and OUTPUT
    /// jump to a DOCKER chain that DNATs to the container; FORWARD drops by default and lets the
    /// published port through): a SYN tproxy gave our socket would be DNAT'ed away after it and
    /// dropped, so the steered SYNs get an identity binding first; the proxy connects to the
    /// original destination from the host, where the host's OUTPUT DNAT takes it to the container.
    /// begin refuses without --through-input (FORWARD would not see the window's connections);
    /// with it, the container serves through the window and after, and the challenge is answered.
    /// On nftables (the ruleset as iptables-nft would list it) and through the legacy path
    /// (iptables-legacy's nat, an ACCEPT at the head of nat PREROUTING as the binding).
    @Test(arguments: ["nftables", "iptables-legacy"])
    func aContainerPublishedOnPortEightyKeepsServing(_ backend: String) throws {
        let net = try TestNetwork(ruleset: "empty", router: true)
        defer { net.close() }
        try net.startApp(tag: "container", in: net.server!)
        let legacy = backend == "iptables-legacy"
        if legacy {
            let rules = """
                *mangle
                :PREROUTING ACCEPT [0:0]
                :INPUT ACCEPT [0:0]
                :FORWARD ACCEPT [0:0]
                :OUTPUT ACCEPT [0:0]
                :POSTROUTING ACCEPT [0:0]
                COMMIT
                *nat
                :PREROUTING ACCEPT [0:0]
                :INPUT ACCEPT [0:0]
                :OUTPUT ACCEPT [0:0]
                :POSTROUTING ACCEPT [0:0]
                :DOCKER - [0:0]
                -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
                -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
                -A POSTROUTING -d 10.98.0.2/32 -j MASQUERADE
                -A DOCKER ! -i docker0 -d \(Self.v4)/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.98.0.2:80
                COMMIT
                *filter
                :INPUT ACCEPT [0:0]
                :FORWARD DROP [0:0]
                :OUTPUT ACCEPT [0:0]
                -A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
                -A FORWARD -d 10.98.0.2/32 -p tcp -m tcp --dport 80 -j ACCEPT
                COMMIT

                """
            let out = try net.exec(net.host, ["sh", "-c", "printf '%s' \"$0\" | iptables-legacy-restore", rules])
            try #require(out.status == 0, "\(out)")
            // The legacy path needs IPv6's mangle table too (it makes none).
            let v6 = try net.exec(net.host, ["ip6tables-legacy", "-t", "mangle", "-L", "-n"])
            try #require(v6.status == 0, "\(v6)")
        } else {
            let dnat = """
                table ip nat {
                  chain DOCKER { iifname != "docker0" ip daddr \(Self.v4) tcp dport 80 dnat to 10.98.0.2:80; }
                  chain PREROUTING { type nat hook prerouting priority dstnat; fib daddr type local jump DOCKER; }
                  chain OUTPUT { type nat hook output priority -100; ip daddr != 127.0.0.0/8 fib daddr type local jump DOCKER; }
                  chain POSTROUTING { type nat hook postrouting priority srcnat; ip daddr 10.98.0.2 masquerade; }
                }
                table ip filter {
                  chain FORWARD { type filter hook forward priority filter; policy drop; ct state established,related accept; ip daddr 10.98.0.2 tcp dport 80 accept; }
                }
                """
            let file = net.stateDirectory + "-published.nft"
            try dnat.write(toFile: file, atomically: true, encoding: .utf8)
            defer { try? FileManager.default.removeItem(atPath: file) }
            #expect(try net.exec(net.host, ["nft", "-f", file]).status == 0)
        }
        #expect(try net.httpClient("get", Self.v4, "/").hasPrefix("200 container"))
        let backendArgs = legacy ? ["--backend", "iptables-legacy"] : []
        let detect = try net.leRedirect(["detect", "--json"] + backendArgs)
        #expect(detect.status == 1, "begin would refuse: \(detect)")
        #expect(detect.stdout.contains("--through-input"), "\(detect)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(detect.stdout.utf8)) as? [String: Any])
        let notes = (json["notes"] as? [String] ?? []).joined(separator: " ")
        if legacy {
            #expect(notes.contains("accepted at their head first"), "\(detect)")
        } else {
            #expect(json["hostNAT"] as? [String] == ["nftables ip nat PREROUTING"])
            #expect(notes.contains("identity binding") && notes.contains("publishes container ports (ip nat DOCKER)"), "\(notes)")
        }
        let before = try net.ruleset()
        let refused = try net.leRedirect(["begin", "--in-memory"] + backendArgs)
        #expect(refused.status == 1 && refused.stderr.contains("--through-input"), "\(refused)")
        #expect(try net.ruleset() == before)
        let begin = try net.leRedirect(["begin", "--in-memory", "--through-input"] + backendArgs)
        #expect(begin.status == 0, "\(begin)")
        #expect(begin.stderr.contains("note: the host"), "\(begin)")
        if !legacy { #expect(try net.nftRuleset().contains("dnat ip to ip daddr")) }
        #expect(try net.leRedirect("challenge", "add", "t", "t.k").status == 0)
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/t") == "200 t.k")
        #expect(try net.httpClient("get", Self.v4, "/").hasPrefix("200 container"))
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.httpClient("get", Self.v4, "/").hasPrefix("200 container"))
        #expect(try net.ruleset() == before)
    }

    /// Invariant 2 across end: keep-alive and connection-close load, IPv4 and IPv6, sees no
    /// socket error and no non-2xx answer while the redirect goes and the proxy drains.
    @Test(arguments: [(Self.v4, true), (Self.v4, false), (Self.v6, true), (Self.v6, false)])
    func drainUnderLoadHasZeroErrors(address: String, keepAlive: Bool) throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startNginx()
        #expect(try net.leRedirect("begin").status == 0)
        let url = address.contains(":") ? "http://[\(address)]/static" : "http://\(address)/static"
        let log = net.stateDirectory + "-nginx/wrk.log"
        let fd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        defer { Glibc.close(fd) }
        let wrk = try spawn(
            ["ip", "netns", "exec", net.client, "wrk", "-t2", "-c32", "-d3s"] + (keepAlive ? [] : ["-H", "Connection: close"]) + [url],
            stdout: fd, stderr: fd)
        usleep(1_500_000)
        let status = try net.status()
        let end = try net.leRedirect("end")
        #expect(end.status == 0, "\(end)")
        var code: Int32 = 0
        waitpid(wrk, &code, 0)
        let output = try String(contentsOfFile: log, encoding: .utf8)
        #expect(code == 0, "\(output)")
        #expect(output.contains("requests in"), "\(output)")
        #expect(!output.contains("Socket errors"), "\(output)")
        #expect(!output.contains("Non-2xx"), "\(output)")
        let counters = try #require(status["counters"] as? [String: Int])
        #expect(counters["requests"]! > 100, "the load went through the proxy: \(status)")
    }
}
