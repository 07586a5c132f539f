import Foundation
import Glibc
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

    /// A keep-alive connection opened before begin goes on reaching the app through begin and end:
    /// only SYNs are steered, and this connection's packets find the app's socket as before.
    @Test(arguments: [Host.emptyHost, .nftablesPolicyDrop, .legacyDropForcedLegacy])
    func aConnectionOpenedBeforeBeginKeepsReachingTheApp(host: Host) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        try net.startApp()
        try net.startStandInProxy()
        let step = net.stateDirectory + "-step"
        defer { for n in 1...3 { unlink("\(step)\(n)") } }
        // One connection, three requests: before begin, during the session, after end.
        let script = """
            import os, socket, sys, time
            s = socket.create_connection((sys.argv[1], 80), timeout=10)
            for n in (1, 2, 3):
                while not os.path.exists(sys.argv[2] + str(n)): time.sleep(0.02)
                s.sendall(b"GET / HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n")
                data = b""
                while b"\\r\\n\\r\\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk: sys.exit(f"closed at request {n}")
                    data += chunk
                head, _, rest = data.partition(b"\\r\\n\\r\\n")
                length = int([l.split(b":")[1] for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length")][0])
                while len(rest) < length: rest += s.recv(4096)
                print(n, head.split(b" ")[1].decode(), rest[:3].decode(), flush=True)
            """
        let scriptPath = net.stateDirectory + "-client.py"
        try script.write(toFile: scriptPath, atomically: true, encoding: .utf8)
        defer { unlink(scriptPath) }
        let out = net.stateDirectory + "-client.out"
        defer { unlink(out) }
        let outFD = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        defer { close(outFD) }
        let client = try spawn(
            ["ip", "netns", "exec", net.client, "python3", scriptPath, TestNetwork.hostAddress4, step], stdout: outFD, stderr: outFD)
        _ = FileManager.default.createFile(atPath: step + "1", contents: nil)
        usleep(300_000)
        #expect(try net.leRedirect(["begin", "--external-proxy"] + host.begin).status == 0)
        _ = FileManager.default.createFile(atPath: step + "2", contents: nil)
        usleep(300_000)
        #expect(try net.reach(TestNetwork.hostAddress4) == "proxy")  // new connections are redirected
        #expect(try net.leRedirect("end").status == 0)
        _ = FileManager.default.createFile(atPath: step + "3", contents: nil)
        var status: Int32 = 0
        waitpid(client, &status, 0)
        let lines = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        #expect(status == 0, "\(lines)")
        #expect(lines == "1 200 app\n2 200 app\n3 200 app\n", "\(lines)")
    }

    /// Nothing is rewritten, so conntrack holds nothing of le-redirect's: on a host whose
    /// firewall tracks connections, a steered connection's entry is that of a plain connection to
    /// port 80 (its reply comes from port 80, not from the proxy port), during the window and after.
    @Test(arguments: [Host.nftablesPolicyDrop, .legacyDropForcedLegacy])
    func conntrackHoldsNoTranslation(host: Host) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        try net.startListeners()
        let listing = { () throws -> [Substring] in
            try net.exec(net.host, ["conntrack", "-L", "-p", "tcp"]).stdout.split(separator: "\n")
        }
        #expect(try net.leRedirect(["begin", "--external-proxy"] + host.begin).status == 0)
        for _ in 0..<3 {
            #expect(try net.reach(TestNetwork.hostAddress4) == "proxy")
            #expect(try net.reach(TestNetwork.hostAddress6) == "proxy")
        }
        let steered = try listing().filter { $0.contains("dport=80 ") }
        #expect(steered.count >= 6, "\(steered)")
        #expect(steered.allSatisfy { $0.contains("sport=80 ") && !$0.contains("12347") }, "\(steered)")
        #expect(try net.leRedirect("end").status == 0)
        #expect(try listing().allSatisfy { !$0.contains("12347") })
    }

    /// A conntrack entry that outlived its connection (a visitor's, whose close conntrack never
    /// saw) still says "established"; conntrack takes a new SYN from the same address and port as
    /// part of it. Rewriting connections, such a SYN went past the nat redirect to the app (the CA's
    /// validation reusing a visitor's source port failed), and begin had to scan conntrack for
    /// such entries. Steering, the SYN is steered whatever conntrack holds, and begin reads nothing
    /// of it: the entry is still there, and the connection reaches the proxy.
    @Test(arguments: [TestNetwork.hostAddress4, TestNetwork.hostAddress6])
    func aSynWithAStaleConntrackEntryIsStillSteered(address: String) throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startListeners()
        let v6 = address.contains(":")
        let client = v6 ? TestNetwork.clientAddress6 : TestNetwork.clientAddress4
        let insert = try net.exec(net.host, [
            "conntrack", "-I", "-p", "tcp", "-s", client, "-d", address, "--sport", "41000", "--dport", "80",
            "-r", address, "-q", client, "--reply-port-src", "80", "--reply-port-dst", "41000",
            "--state", "ESTABLISHED", "--timeout", "600", "-u", "SEEN_REPLY,ASSURED",
        ])
        try #require(insert.status == 0, "\(insert)")
        let entries = { () throws -> [Substring] in
            try net.exec(net.host, ["conntrack", "-L", "-p", "tcp"]).stdout.split(separator: "\n")
                .filter { $0.contains(" sport=41000 dport=80 ") }
        }
        let stale = try entries()
        #expect(stale.first?.contains("ESTABLISHED") == true, "\(stale)")
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)
        #expect(try entries().count == 1, "begin leaves conntrack alone")
        #expect(try net.reach(address, sourcePort: 41000) == "proxy")
        #expect(try net.leRedirect("end").status == 0)
    }

    @Test(arguments: [Host.nftablesPolicyDrop, .legacyDropForcedLegacy])
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

    @Test(arguments: [Host.emptyHost, .legacyDropForcedLegacy])
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

    /// The proxy port itself stays closed to direct connections on a host whose firewall drops by
    /// default: the steered packets are let in as port 80, nothing lets in the proxy port.
    @Test func theProxyPortIsReachableOnlyThroughTheSteering() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startListeners()
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)
        #expect(try net.reach(TestNetwork.hostAddress4, port: 12347).hasPrefix("failed"))
        #expect(try net.reach(TestNetwork.hostAddress6, port: 12347).hasPrefix("failed"))
        #expect(try net.reach(TestNetwork.hostAddress4) == "proxy")
        #expect(try net.leRedirect("end").status == 0)
    }

    /// `--external-proxy` with a real proxy: HAProxy in front of the app, listening transparently
    /// on the proxy port (`bind ... transparent`), gets the steered connections (the app then sees
    /// HAProxy's address, not the visitor's), over IPv4 and IPv6; a host whose firewall drops by
    /// default keeps the proxy port closed. Without `transparent`, begin refuses (nothing would
    /// reach HAProxy).
    @Test func haproxyListeningTransparentlyIsTheExternalProxy() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.start(net.host, ["python3", Paths.peer, "serve", "80", "app"])
        try net.waitForListener(net.host, 80)
        let config = net.stateDirectory + "-haproxy.cfg"
        defer { unlink(config) }
        for transparent in [false, true] {
            let bind = transparent ? " transparent" : ""
            try """
                global
                  nbthread 1
                defaults
                  mode tcp
                  timeout connect 5s
                  timeout client 30s
                  timeout server 30s
                frontend f
                  bind :12347\(bind)
                  bind :::12347 v6only\(bind)
                  default_backend b
                backend b
                  server app 127.0.0.1:80

                """.write(toFile: config, atomically: true, encoding: .utf8)
            let check = try net.exec(net.host, ["haproxy", "-c", "-f", config])
            try #require(check.status == 0, "\(check)")
            try net.start(net.host, ["haproxy", "-db", "-f", config])
            try net.waitForListener(net.host, 12347)
            let begin = try net.leRedirect("begin", "--external-proxy")
            if !transparent {
                #expect(begin.status == 1 && begin.stderr.contains("is not transparent"), "\(begin)")
                #expect(try net.reach(TestNetwork.hostAddress4) == "app")
                for pid in try net.processes(matching: "haproxy") { kill(pid, SIGTERM) }
                let gone = Date().addingTimeInterval(10)
                while try net.exec(net.host, ["ss", "-Hltn", "sport = :12347"]).stdout.contains("LISTEN"), Date() < gone { usleep(20_000) }
                continue
            }
            #expect(begin.status == 0, "\(begin)")
            for address in [TestNetwork.hostAddress4, TestNetwork.hostAddress6] {
                #expect(try net.reach(address) == "app")
                #expect(try net.peerAddress(address) == "127.0.0.1", "through HAProxy, over \(address)")
                #expect(try net.reach(address, port: 12347, timeout: 1.5).hasPrefix("failed"))
            }
            #expect(try net.leRedirect("end").status == 0)
            #expect(try net.peerAddress(TestNetwork.hostAddress4) == TestNetwork.clientAddress4)
        }
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
