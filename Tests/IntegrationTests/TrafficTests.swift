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

    /// A keep-alive connection opened before begin goes on reaching the app through begin and end.
    /// On a host with no tables, conntrack starts with our nat chain and first sees such a
    /// connection mid-stream, as a new flow: only a SYN may be redirected, or it would be reset.
    @Test(arguments: [Host.emptyHost, .nftablesPolicyDrop, .legacyDrop])
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

    /// Conntrack's entries of redirected connections carry the translation to the proxy port; once
    /// conntrack stops (on a host with no tables it runs only with our nat chain) and starts again,
    /// they would reset clients that reuse their ports. end, and recover after a crash, remove them.
    @Test func noConntrackEntryOfARedirectedConnectionOutlivesTheSession() throws {
        let net = try TestNetwork(ruleset: "empty")
        defer { net.close() }
        try net.startListeners()
        let ours = { () throws -> Int in
            try net.exec(net.host, ["conntrack", "-L"]).stdout.split(separator: "\n").filter { $0.contains("sport=12347 dport=") }.count
        }
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)
        for _ in 0..<3 {
            #expect(try net.reach(TestNetwork.hostAddress4) == "proxy")
            #expect(try net.reach(TestNetwork.hostAddress6) == "proxy")
        }
        #expect(try ours() == 6)
        #expect(try net.leRedirect("end").status == 0)
        #expect(try ours() == 0)

        let pid = try net.crashSession()
        #expect(processGone(pid))
        #expect(try net.reach(TestNetwork.hostAddress4) == "app")
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)  // recovers the dead one first
        #expect(try net.reach(TestNetwork.hostAddress4) == "proxy")
        let daemon = try #require(try net.daemonPID())
        kill(daemon, SIGKILL)
        waitUntilGone(daemon)
        #expect(try ours() == 1)
        #expect(try net.leRedirect("recover").status == 0)
        #expect(try ours() == 0)
    }

    /// On a host with no tables, conntrack stops with our nat chain and keeps the entries of the
    /// connections it picked up (opened before begin, not redirected) as they were at end: one
    /// closed since still says "established", and conntrack lets a new SYN with its addresses and
    /// ports through as part of it, past the next session's redirect, to the app (the CA's
    /// validation, reusing a visitor's source port). begin removes such entries first, and keeps
    /// those of connections that are still open.
    @Test(arguments: [TestNetwork.hostAddress4, TestNetwork.hostAddress6])
    func aStaleConntrackEntryDoesNotTakeANewConnectionPastTheRedirect(address: String) throws {
        let net = try TestNetwork(ruleset: "empty")
        defer { net.close() }
        try net.startApp()
        try net.startStandInProxy()
        let step = net.stateDirectory + "-step"
        defer { for n in 1...4 { unlink("\(step)\(n)") } }
        // Two connections from fixed ports, opened before the first session and used during it;
        // after its end one closes (a reset nobody tracks), the other stays open. Then, in the
        // second session, a new connection from the closed one's port, and the open one again.
        let script = """
            import os, socket, struct, sys, time
            def step(n):
                while not os.path.exists(sys.argv[2] + str(n)): time.sleep(0.02)
            def connect(port):
                v6 = ":" in sys.argv[1]
                s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("::" if v6 else "0.0.0.0", port))
                s.settimeout(10)
                s.connect((sys.argv[1], 80))
                return s
            def ask(s):
                s.sendall(b"GET / HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n")
                data = s.recv(4096)
                return "proxy" if data.startswith(b"proxy") else "app" if data.startswith(b"HTTP/1.1 200") else repr(data[:20])
            closing, staying = connect(41000), connect(41001)
            print(1, ask(closing), ask(staying), flush=True)
            step(2)
            print(2, ask(closing), ask(staying), flush=True)
            step(3)
            closing.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            closing.close()
            print(3, flush=True)
            step(4)
            print(4, ask(connect(41000)), ask(staying), flush=True)
            """
        let scriptPath = net.stateDirectory + "-client.py"
        try script.write(toFile: scriptPath, atomically: true, encoding: .utf8)
        defer { unlink(scriptPath) }
        let out = net.stateDirectory + "-client.out"
        defer { unlink(out) }
        let outFD = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        defer { close(outFD) }
        let client = try spawn(
            ["ip", "netns", "exec", net.client, "python3", scriptPath, address, step], stdout: outFD, stderr: outFD)
        let printed = { (line: String) -> Bool in ((try? String(contentsOfFile: out, encoding: .utf8)) ?? "").contains(line) }
        func waitFor(_ line: String) throws {
            let deadline = Date().addingTimeInterval(10)
            while !printed(line) {
                guard Date() < deadline else { throw TestFailure("the client did not print \(line)") }
                usleep(20_000)
            }
        }
        let entries = { (port: Int) throws -> [Substring] in
            try net.exec(net.host, ["conntrack", "-L"]).stdout.split(separator: "\n").filter { $0.contains(" sport=\(port) dport=80 ") }
        }
        try waitFor("1 ")
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)
        _ = FileManager.default.createFile(atPath: step + "2", contents: nil)
        try waitFor("2 ")
        #expect(try net.leRedirect("end").status == 0)
        _ = FileManager.default.createFile(atPath: step + "3", contents: nil)
        try waitFor("3\n")
        #expect(try entries(41000).first?.contains("ESTABLISHED") == true, "the closed connection's entry is stale")
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)
        #expect(try entries(41000).isEmpty, "begin removed the stale entry")
        #expect(try entries(41001).count == 1, "begin kept the open connection's entry")
        _ = FileManager.default.createFile(atPath: step + "4", contents: nil)
        var status: Int32 = 0
        waitpid(client, &status, 0)
        #expect(try net.leRedirect("end").status == 0)
        let lines = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        #expect(status == 0, "\(lines)")
        #expect(lines == "1 app app\n2 app app\n3\n4 proxy app\n", "\(lines)")
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
