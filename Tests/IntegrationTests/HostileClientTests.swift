import Foundation
import Glibc
import Testing

/// The built-in proxy against hostile clients, through the redirect, on a policy-drop nftables host
/// with an HTTP app on :80: bytes that are not HTTP, framing that a proxy and an app could read
/// differently, heads over the limit, challenge paths that try to leave --webroot, slowloris and
/// 10,000 idle connections. The proxy refuses or closes each, never serves a file outside the
/// webroot, and the app keeps serving an ordinary client; the daemon's memory is recorded.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct HostileClientTests {
    static let v4 = TestNetwork.hostAddress4
    static let hostile = Paths.support.appendingPathComponent("hostile.py").path

    /// A session with the built-in proxy answering from a webroot that holds token tokA, next to a
    /// file that must never be served.
    private func session(_ extra: [String] = []) throws -> (TestNetwork, Int32) {
        let net = try TestNetwork(ruleset: "policy-drop")
        try net.startApp()
        let webroot = net.stateDirectory + "-nginx/webroot"
        try FileManager.default.createDirectory(atPath: webroot, withIntermediateDirectories: true)
        try "tokA.thumb".write(toFile: webroot + "/tokA", atomically: true, encoding: .utf8)
        try "secret".write(toFile: net.stateDirectory + "-nginx/secret", atomically: true, encoding: .utf8)
        let begin = try net.leRedirect(["begin", "--webroot", webroot, "--head-timeout", "2s"] + extra)
        guard begin.status == 0, let pid = try net.daemonPID() else { throw TestFailure("begin: \(begin)") }
        return (net, pid)
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

    @Test func slowlorisIsClosedAtTheHeadTimeoutWhileTheAppServes() throws {
        let (net, pid) = try session()
        defer { net.close() }
        let log = net.stateDirectory + "-slowloris"
        defer { try? FileManager.default.removeItem(atPath: log) }
        try net.start(net.client, ["sh", "-c", "python3 \(Self.hostile) slowloris \(Self.v4) 300 8 > \(log)"])
        usleep(500_000)
        let served = try net.httpClient("get", Self.v4, "/")
        #expect(served == "200 app \(Self.v4)")
        let result = Self.output(log, containing: "closed", by: Date().addingTimeInterval(20))
        #expect(result.hasPrefix("closed 300 of 300"), "\(result)")
        TestReport.add("hostile", order: 200, "| slowloris: 300 heads, a byte every 0.5 s, --head-timeout 2s | \(result.trimmingCharacters(in: .whitespacesAndNewlines)); meanwhile GET / → \(served); daemon \(Self.memory(pid)) |")
        #expect(try net.leRedirect("end").status == 0)
    }

    @Test func tenThousandIdleConnectionsDoNotStopTheApp() throws {
        let (net, pid) = try session()
        defer { net.close() }
        let before = Self.memory(pid)
        let log = net.stateDirectory + "-flood"
        defer { try? FileManager.default.removeItem(atPath: log) }
        try net.start(net.client, ["sh", "-c", "python3 \(Self.hostile) flood \(Self.v4) 10000 6 > \(log)"])
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
        TestReport.add("hostile", order: 300, "| 10,000 idle connections at once, --head-timeout 2s | \(text.split(separator: "\n").joined(separator: "; ")); GET / during it → \(served) after \(String(format: "%.1f", waited)) s; daemon before \(before), during \(during), after \(Self.memory(pid)) |")
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
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return "gone" }
        func kib(_ key: String) -> Double {
            let line = text.split(separator: "\n").first { $0.hasPrefix(key + ":") } ?? ""
            return Double(line.split(separator: " ").dropFirst().first ?? "0") ?? 0
        }
        return String(format: "RSS %.1f MiB (peak %.1f MiB)", kib("VmRSS") / 1024, kib("VmHWM") / 1024)
    }
}
