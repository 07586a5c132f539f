import Foundation
import Glibc
import Testing

/// The built-in proxy against hostile clients, through the redirect, on a policy-drop nftables host
/// with an HTTP app on :80: bytes that are not HTTP, framing that a proxy and an app could read
/// differently, heads over the limit, challenge paths that try to leave --webroot, slowloris and
/// 10,000 idle connections. The proxy refuses or closes each, never serves a file outside the
/// webroot, and the app keeps serving an ordinary client; the proxy process's memory is recorded.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct HostileClientTests {
    static let v4 = TestNetwork.hostAddress4
    static let hostile = Paths.support.appendingPathComponent("hostile.py").path

    /// A session with the built-in proxy answering from a webroot that holds token tokA, next to a
    /// file that must never be served; the app is the HTTP app on :80, or nginx in front of it.
    private func session(_ extra: [String] = [], nginx: Bool = false) throws -> (TestNetwork, Int32) {
        let net = try TestNetwork(ruleset: "policy-drop")
        try nginx ? net.startNginx() : net.startApp()
        let webroot = net.stateDirectory + "-nginx/webroot"
        try FileManager.default.createDirectory(atPath: webroot, withIntermediateDirectories: true)
        try "tokA.thumb".write(toFile: webroot + "/tokA", atomically: true, encoding: .utf8)
        try "secret".write(toFile: net.stateDirectory + "-nginx/secret", atomically: true, encoding: .utf8)
        // 404 for what the session cannot answer: a refusal here is the proxy's, not the app's.
        let begin = try net.leRedirect(["begin", "--webroot", webroot, "--head-timeout", "2s", "--unknown-challenges", "404"] + extra)
        // The proxy's process: it, not the session daemon, holds the connections and their buffers.
        guard begin.status == 0, let pid = (try net.status()["proxyPid"] as? NSNumber)?.int32Value else {
            throw TestFailure("begin: \(begin)")
        }
        return (net, pid)
    }

    /// Starts hostile.py with `arguments` in the client's namespace, in the background; returns the
    /// file its output goes to (read it with `output(_:containing:by:)`, remove it when done).
    private func background(_ net: TestNetwork, _ arguments: [String]) throws -> String {
        let log = net.stateDirectory + "-" + arguments[0]
        try net.start(net.client, ["sh", "-c", "python3 \(Self.hostile) \(arguments.joined(separator: " ")) > \(log)"])
        return log
    }

    private func hostile(_ net: TestNetwork, _ arguments: [String], timeout: Double = 60) throws -> String {
        let output = try net.exec(net.client, ["python3", Self.hostile] + arguments, timeout: timeout)
        return output.stdout.split(separator: "\n").last.map(String.init) ?? "failed: \(output)"
    }

    /// What a request that both a proxy and an app read must not be: ambiguous.
    static let shapes: [(String, String, Set<String>)] = {
        var random = [UInt8]()
        var x: UInt32 = 2_463_534_242
        for _ in 0..<4096 {
            x ^= x << 13; x ^= x >> 17; x ^= x << 5
            random.append(UInt8(truncatingIfNeeded: x))
        }
        let smuggled = "GET /.well-known/acme-challenge/tokA HTTP/1.1\r\nHost: x\r\n\r\n"
        let hex = { (s: String) in s.utf8.map { String(format: "%02x", $0) }.joined() }
        return [
            ("random bytes", random.map { String(format: "%02x", $0) }.joined(), ["closed", "status 400"]),
            ("a TLS ClientHello", "16030100a5010000a10303" + String(repeating: "ab", count: 160), ["closed", "status 400"]),
            ("Content-Length and Transfer-Encoding",
             hex("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled),
             ["status 400"]),
            ("two different Content-Lengths",
             hex("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 56\r\n\r\n" + smuggled), ["status 400"]),
            ("an obs-folded header",
             hex("GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n"), ["status 400"]),
            ("a chunk size that overflows",
             hex("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n\r\n"),
             ["status 400", "closed"]),
            ("a head over --max-head-size",
             hex("GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + String(repeating: "a", count: 20000) + "\r\n\r\n"),
             ["status 431"]),
            ("a bare LF head", hex("GET / HTTP/1.1\nHost: x\n\n"), ["status 400", "closed"]),
        ]
    }()

    @Test func malformedAndAmbiguousRequestsAreRefused() throws {
        let (net, _) = try session()
        defer { net.close() }
        for (name, bytes, allowed) in Self.shapes {
            let answer = try hostile(net, ["responses", Self.v4, bytes])
            let first = answer.hasPrefix("statuses ") ? "status " + answer.dropFirst(9).split(separator: ",")[0] : answer
            #expect(allowed.contains(first), "\(name): \(answer)")
            // Never a second answer: the smuggled request must not be served.
            #expect(!answer.contains(","), "\(name): \(answer)")
            #expect(try net.httpClient("get", Self.v4, "/") == "200 app \(Self.v4)", "after \(name)")
            TestReport.add("hostile", order: 10 + (Self.shapes.firstIndex { $0.0 == name } ?? 0), "| \(name) | \(answer) |")
        }
        #expect(try net.leRedirect("end").status == 0)
    }

    @Test func challengePathsNeverLeaveTheWebroot() throws {
        let (net, _) = try session()
        defer { net.close() }
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/tokA") == "200 tokA.thumb")
        let prefix = "/.well-known/acme-challenge/"
        for tail in [
            "../secret", "..%2fsecret", "%2e%2e%2fsecret", "%2E%2E/secret", "..\\secret", "..%5csecret", "tokA%00",
            "tokA/../../secret", "%2fetc%2fpasswd", "/etc/passwd", "....//secret", ".", "..", "%2e", "tokA/", "tokA%2f",
            "tokA?x=../../secret", "tokA#../secret",
        ] {
            let answer = try net.httpClient("get", Self.v4, prefix + tail)
            #expect(!answer.contains("secret") && !answer.contains("root:"), "\(tail): \(answer)")
            #expect(answer.hasPrefix("404") || answer.hasPrefix("400") || answer == "200 tokA.thumb", "\(tail): \(answer)")
            TestReport.add("hostile", order: 100, "| `\(prefix + tail)` | \(answer) |")
        }
        #expect(try net.leRedirect("end").status == 0)
    }

    /// A request answered, half of the next one pipelined behind it, then nothing: the head
    /// timeout runs for the half from when the first response ended (it used to run for nothing,
    /// and the connection stayed open for as long as the client liked).
    @Test func halfAHeadBehindAPipelinedRequestTimesOut() throws {
        let (net, _) = try session()
        defer { net.close() }
        let bytes = Array("GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nX: a".utf8).map { String(format: "%02x", $0) }.joined()
        let output = try net.exec(net.client, ["python3", Self.hostile, "stall", Self.v4, bytes, "10"], timeout: 30)
        let result = output.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(result.hasPrefix("closed after ") && result.hasSuffix("statuses 200"), "\(output)")
        TestReport.add("hostile", order: 210, "| a request, then half of a second one pipelined behind it, then nothing (--head-timeout 2s) | before: open after 10 s · after: \(result) |")
        #expect(try net.leRedirect("end").status == 0)
    }

    @Test func slowlorisIsClosedAtTheHeadTimeoutWhileTheAppServes() throws {
        let (net, pid) = try session()
        defer { net.close() }
        let log = try background(net, ["slowloris", Self.v4, "300", "8"])
        defer { try? FileManager.default.removeItem(atPath: log) }
        usleep(500_000)
        let served = try net.httpClient("get", Self.v4, "/")
        #expect(served == "200 app \(Self.v4)")
        let result = Self.output(log, containing: "closed", by: Date().addingTimeInterval(20))
        #expect(result.hasPrefix("closed 300 of 300"), "\(result)")
        TestReport.add("hostile", order: 200, "| slowloris: 300 heads, a byte every 0.5 s, --head-timeout 2s | \(result.trimmingCharacters(in: .whitespacesAndNewlines)); meanwhile GET / → \(served); proxy \(Self.memory(pid)) |")
        #expect(try net.leRedirect("end").status == 0)
    }

    // One client stands for many here: the per-source cap is raised so that every connection counts.
    @Test func tenThousandIdleConnectionsDoNotStopTheApp() throws {
        let (net, pid) = try session(["--max-connections-per-source", "20000"])
        defer { net.close() }
        let before = Self.memory(pid)
        let log = try background(net, ["flood", Self.v4, "10000", "6"])
        defer { try? FileManager.default.removeItem(atPath: log) }
        let deadline = Date().addingTimeInterval(40)
        var text = Self.output(log, containing: "open ", by: deadline)
        #expect(text.contains("open 10000"), "\(text)")
        let asked = Date()
        let served = try net.httpClient("get", Self.v4, "/")
        let waited = Date().timeIntervalSince(asked)
        #expect(served == "200 app \(Self.v4)")
        let during = Self.memory(pid)
        text = Self.output(log, containing: "closed", by: deadline)
        #expect(text.contains("closed 10000 of 10000"), "\(text)")
        let status = try net.status()
        #expect((status["counters"] as? [String: Int])?["connections"] ?? -1 <= 1, "\(status)")
        TestReport.add("hostile", order: 300, "| 10,000 idle connections at once, --head-timeout 2s | \(text.split(separator: "\n").joined(separator: "; ")); GET / during it → \(served) after \(String(format: "%.1f", waited)) s; proxy before \(before), during \(during), after \(Self.memory(pid)) |")
        #expect(try net.leRedirect("end").status == 0)
    }

    /// Bodies that trickle or stall hold a proxy connection and an app connection, as they would
    /// hold the app's own: the proxy adds no timeout of its own while a request is with the app. The
    /// app keeps serving, and `end` closes them at --drain-timeout.
    @Test func slowBodiesDoNotStopTheAppAndEndClosesThem() throws {
        let (net, pid) = try session(["--drain-timeout", "2s"])
        defer { net.close() }
        let log = try background(net, ["slowbody", Self.v4, "300", "4"])
        defer { try? FileManager.default.removeItem(atPath: log) }
        let opened = Self.output(log, containing: "open ", by: Date().addingTimeInterval(30))
        #expect(opened.contains("open 300 of 300"), "\(opened)")
        let served = try net.httpClient("get", Self.v4, "/")
        #expect(served == "200 app \(Self.v4)")
        let during = Self.memory(pid)
        let end = try net.leRedirect("end")
        #expect(end.status == 0, "\(end)")
        let result = Self.output(log, containing: "closed", by: Date().addingTimeInterval(30))
        #expect(result.contains("closed 300 of 300"), "\(result)")
        // Straight to the app now: it sees the client's own address.
        #expect(try net.httpClient("get", Self.v4, "/") == "200 app \(TestNetwork.clientAddress4)")
        TestReport.add("hostile", order: 250, "| slow bodies: 300 POSTs of a 1 MB body, a byte every 0.5 s, then stalled; `end` with --drain-timeout 2s | \(result.split(separator: "\n").joined(separator: "; ")); meanwhile GET / → \(served); proxy \(during); `end` exit \(end.status) |")
    }

    /// 10,000 clients that each send a request at once (app: nginx): every one answered. The proxy
    /// takes at most (limit - 128) / 2 at a time; the rest wait in the listen queue.
    @Test func tenThousandRequestsAtOnceAreAllAnswered() throws {
        let (net, pid) = try session(["--max-connections-per-source", "20000"], nginx: true)
        defer { net.close() }
        let before = Self.memory(pid)
        let output = try net.exec(net.client, ["python3", Self.hostile, "burst", Self.v4, "10000", "/static"], timeout: 180)
        let result = output.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(result.hasPrefix("answered 10000 of 10000, 200 x 10000, 0 errors"), "\(output)")
        TestReport.add("hostile", order: 310, "| 10,000 requests at once (GET, app nginx) | \(result); proxy before \(before), after \(Self.memory(pid)) |")
        #expect(try net.leRedirect("end").status == 0)
    }

    /// 256 MiB each way through the proxy while the other side does not read for 3 s: the proxy
    /// stops reading instead of buffering, so its memory does not grow with the body.
    @Test func largeBodiesAreRelayedWithoutBuffering() throws {
        let (net, pid) = try session()
        defer { net.close() }
        let before = Self.memory(pid)
        let baseline = Self.kib(pid, "VmRSS")
        let download = try net.exec(net.client, ["python3", Self.hostile, "download", Self.v4, "/huge", "3"], timeout: 120)
        #expect(download.stdout.contains("read 268435456 bytes"), "\(download)")
        let upload = try net.exec(net.client, ["python3", Self.hostile, "upload", Self.v4, "256", "3"], timeout: 120)
        #expect(upload.stdout.contains(" 268435456"), "\(upload)")
        let peak = Self.kib(pid, "VmHWM")
        // Buffering either body would add 256 MiB; relaying adds buffers of a fixed size.
        #expect(peak - baseline < 64 * 1024, "proxy peak \(peak) KiB from \(baseline) KiB")
        TestReport.add("hostile", order: 320, "| 256 MiB download and 256 MiB upload, the receiver not reading for 3 s | \(download.stdout.trimmingCharacters(in: .whitespacesAndNewlines)); app got \(upload.stdout.split(separator: " ").last.map { $0.trimmingCharacters(in: .whitespacesAndNewlines) } ?? "?") bytes; proxy before \(before), after \(Self.memory(pid)) |")
        #expect(try net.leRedirect("end").status == 0)
    }

    /// The proxy port itself: from the host (loopback or its own address) the proxy closes at once,
    /// since the connection did not come through the redirect; from another host the scoped accept
    /// does not let it in at all (policy drop).
    @Test func theProxyPortServesOnlyRedirectedConnections() throws {
        let (net, _) = try session()
        defer { net.close() }
        for (who, ns, address) in [
            ("the host itself, 127.0.0.1:12347", net.host, "127.0.0.1"), ("the host itself, [::1]:12347", net.host, "::1"),
            ("the host itself, its own address :12347", net.host, Self.v4),
        ] {
            let answer = try net.httpClient("raw", address, "12347", from: ns)
            #expect(answer == "closed", "\(who): \(answer)")
            TestReport.add("hostile", order: 400, "| \(who) | \(answer) |")
        }
        let probe = """
            import socket
            try:
                s = socket.create_connection(("\(Self.v4)", 12347), timeout=2)
                print("connected: " + repr(s.recv(100)))
            except socket.timeout:
                print("no connection (dropped by the host's policy)")
            except OSError as e:
                print("refused: " + str(e))
            """
        let remote = try net.exec(net.client, ["python3", "-c", probe]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(remote == "no connection (dropped by the host's policy)")
        TestReport.add("hostile", order: 401, "| another host, HOST:12347 | \(remote) |")
        let counters = try #require(try net.status()["counters"] as? [String: Int])
        #expect(counters["refused"] == 3, "\(counters)")
        #expect(try net.httpClient("get", Self.v4, "/") == "200 app \(Self.v4)")
        #expect(try net.leRedirect("end").status == 0)
    }

    /// What a background client wrote to `path`, once it contains `text` (or at `deadline`).
    static func output(_ path: String, containing text: String, by deadline: Date) -> String {
        while true {
            let written = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
            if written.contains(text) || Date() >= deadline { return written }
            usleep(100_000)
        }
    }

    /// "RSS 12.3 MiB (peak 45.6 MiB)" of a process, from /proc.
    static func memory(_ pid: Int32) -> String {
        guard kill(pid, 0) == 0 else { return "gone" }
        return String(format: "RSS %.1f MiB (peak %.1f MiB)", Double(kib(pid, "VmRSS")) / 1024, Double(kib(pid, "VmHWM")) / 1024)
    }

    /// A /proc/PID/status figure in KiB (VmRSS, VmHWM); 0 when the process is gone.
    static func kib(_ pid: Int32, _ key: String) -> Int {
        let text = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        let line = text.split(separator: "\n").first { $0.hasPrefix(key + ":") } ?? ""
        return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "0") ?? 0
    }
}
