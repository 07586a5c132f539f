import Foundation
import Glibc
import Testing

/// What the proxy must never expose, tried as an attacker would: a webroot owner's symbolic links,
/// an unprivileged local user (uid 65534, through setpriv) listening where the ACME client's server
/// or the external proxy should be, CONNECT and pipelining used to get past --forwarded or to the
/// challenge server, a state directory below another user's directory; and what must still work:
/// IPv6 link-local clients, and every other client while one source floods. The client is in
/// another namespace, over IPv4 and IPv6. Each row goes to docs/hostile.md's table.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct ExposureTests {
    static let v4 = TestNetwork.hostAddress4, v6 = TestNetwork.hostAddress6
    static let hostile = Paths.support.appendingPathComponent("hostile.py").path
    static let nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--"]

    private func hostile(_ net: TestNetwork, _ arguments: [String], timeout: Double = 30) throws -> String {
        let output = try net.exec(net.client, ["python3", Self.hostile] + arguments, timeout: timeout)
        return output.stdout.split(separator: "\n").last.map(String.init) ?? "failed: \(output)"
    }

    private static func hex(_ text: String) -> String { text.utf8.map { String(format: "%02x", $0) }.joined() }

    /// Runs Support/SCRIPT with `arguments` as uid 65534 in the host namespace, in the background
    /// (`close()` ends it). The script is copied where that user can read it, whatever the
    /// checkout's permissions (the network's -nginx directory, which `close()` removes).
    private func startAsNobody(_ net: TestNetwork, _ script: String, _ arguments: [String], log: String? = nil) throws {
        let dir = net.stateDirectory + "-nginx"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let copy = dir + "/" + script
        _ = try? FileManager.default.removeItem(atPath: copy)
        try FileManager.default.copyItem(atPath: Paths.support.appendingPathComponent(script).path, toPath: copy)
        chmod(copy, 0o644)
        let env = log.map { ["env", "APP_LOG=\($0)"] } ?? []
        // Debian's python3: the one on root's PATH may live where that user cannot go.
        try net.start(net.host, Self.nobody + env + ["/usr/bin/python3", copy] + arguments)
    }

    private func report(_ order: Int, _ row: String) { TestReport.add("hostile", order: order, row) }

    // MARK: 1. The webroot

    @Test(arguments: ["openat2", "a walk without openat2 (LE_REDIRECT_FAULT=openat2=ENOSYS)"])
    func webrootFilesAreReadAsItsOwnerWouldWithNoLinkFollowed(path: String) throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        let webroot = net.stateDirectory + "-nginx/webroot"
        try FileManager.default.createDirectory(atPath: webroot, withIntermediateDirectories: true)
        _ = try run(["chown", "65534:65534", webroot])
        // The webroot's owner (an unprivileged user) links the challenge directory to /etc, and the
        // token file of another name to a root-only file.
        for command in [
            ["mkdir", webroot + "/.well-known"], ["ln", "-s", "/etc", webroot + "/.well-known/acme-challenge"],
            ["ln", "-s", "/etc/shadow", webroot + "/tokL"], ["sh", "-c", "umask 077; echo own > \(webroot)/tokO"],
        ] {
            let out = try run(Self.nobody + command)
            #expect(out.status == 0, "\(command): \(out)")
        }
        // A file only root can read, put there by root (as a hard link or a careless copy would).
        try "root only".write(toFile: webroot + "/tokR", atomically: true, encoding: .utf8)
        chmod(webroot + "/tokR", 0o600)
        let environment = path.hasPrefix("openat2") ? [:] : ["LE_REDIRECT_FAULT": "openat2=ENOSYS"]
        // 404 for what the session cannot answer: a refusal here is the proxy's, not the app's.
        let begin = try net.leRedirect(["begin", "--webroot", webroot, "--unknown-challenges", "404"], environment: environment)
        #expect(begin.status == 0, "\(begin)")
        let shadow = (try? String(contentsOfFile: "/etc/shadow", encoding: .utf8)) ?? "root:"
        // What each got before the fix, measured with the previous release.
        for (token, what, expected, before) in [
            ("shadow", "a directory link to /etc: /etc/shadow", "404", "200 and /etc/shadow"),
            ("passwd", "a directory link to /etc: /etc/passwd", "404", "200 and /etc/passwd"),
            ("tokL", "a token file that links to /etc/shadow", "404", "404 (O_NOFOLLOW on the last component)"),
            ("tokR", "a root-only file (0600 root)", "404", "200 root only"), ("tokO", "the owner's own 0600 file", "200", "200 own"),
        ] {
            for address in [Self.v4, Self.v6] {
                let answer = try net.httpClient("get", address, "/.well-known/acme-challenge/" + token)
                #expect(answer.hasPrefix(expected), "\(what) over \(address) (\(path)): \(answer)")
                #expect(!answer.contains("root:") && !answer.contains(String(shadow.prefix(20))) && !answer.contains("root only"))
                if address == Self.v4 {
                    report(400 + (path.hasPrefix("openat2") ? 0 : 10), "| --webroot owned by uid 65534, \(what), \(path) | before: \(before) · after: \(answer) |")
                }
            }
        }
        #expect(try net.leRedirect("end").status == 0)
    }

    // MARK: 2 and 3. Listeners of a local user

    @Test(arguments: [Host.nftablesPolicyDrop, Host.legacyDropForcedLegacy])
    func aLocalUsersListenerOnTheChallengePortAnswersNothing(host: Host) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        try net.startApp()
        let log = net.stateDirectory + "-squatter.log"
        defer { try? FileManager.default.removeItem(atPath: log) }
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        _ = try run(["chown", "65534", log])
        // Before the ACME client starts its server, uid 65534 listens on its port.
        try startAsNobody(net, "app.py", ["12348", "squatter", "--host", "127.0.0.1"], log: log)
        try net.waitForListener(net.host, 12348)
        #expect(try net.leRedirect(["begin"] + host.begin).status == 0)
        for address in [Self.v4, Self.v6] {
            let answer = try net.httpClient("get", address, "/.well-known/acme-challenge/tokA")
            #expect(answer.hasPrefix("503"), "over \(address): \(answer)")
            #expect(!answer.contains("squatter"))
            if address == Self.v4 {
                report(420, "| uid 65534 listens on 127.0.0.1:12348 (the challenge port), \(host.name) | before: 200 squatter challenge tokA · after: \(answer) |")
            }
        }
        #expect(try String(contentsOfFile: log, encoding: .utf8) == "", "the squatter saw a request")
        let sessionLog = try String(contentsOfFile: net.stateDirectory + "/session.log", encoding: .utf8)
        #expect(sessionLog.contains("belongs to uid 65534"), "the log names the uid")
        #expect(try net.leRedirect("end").status == 0)
        // Named by the operator, the same user's server answers.
        #expect(try net.leRedirect(["begin", "--challenge-owner", "65534"] + host.begin).status == 0)
        #expect(try net.httpClient("get", Self.v6, "/.well-known/acme-challenge/tokA") == "200 squatter challenge tokA")
        #expect(try net.leRedirect("end").status == 0)
    }

    @Test func aLocalUsersListenerIsNotGivenPortEightyAsTheExternalProxy() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.start(net.host, ["python3", Paths.peer, "serve", "80", "app"])
        try net.waitForListener(net.host, 80)
        try startAsNobody(net, "peer.py", ["serve", "12347", "proxy"])
        try net.waitForListener(net.host, 12347)
        let before = try net.ruleset()
        let begin = try net.leRedirect("begin", "--external-proxy")
        #expect(begin.status == 1, "\(begin)")
        #expect(begin.stderr.contains("belongs to uid 65534"), "\(begin.stderr)")
        #expect(try net.ruleset() == before)
        for address in [Self.v4, Self.v6] { #expect(try net.reach(address) == "app", "over \(address)") }
        let message = begin.stderr.split(separator: "\n").first.map(String.init) ?? ""
        report(430, "| uid 65534 listens on the proxy port; `begin --external-proxy` | before: exit 0, port 80 to that user's process · after: exit \(begin.status), \(message) |")
        // Named by the operator, that user's listener is trusted; but a user without CAP_NET_ADMIN
        // cannot make it transparent, and steered connections reach only a transparent listener.
        let named = try net.leRedirect("begin", "--external-proxy", "--challenge-owner", "nobody")
        #expect(named.status == 1, "\(named)")
        #expect(named.stderr.contains("is not transparent"), "\(named)")
        #expect(try net.ruleset() == before)
        for address in [Self.v4, Self.v6] { #expect(try net.reach(address) == "app", "over \(address)") }
    }

    @Test func aLocalUserWhoTakesTheProxyPortDuringASessionEndsIt() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.start(net.host, ["python3", Paths.peer, "serve", "80", "app"])
        try net.waitForListener(net.host, 80)
        // The operator's proxy is not up (or restarting): begin warns and watches the port.
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)
        let pid = try net.daemonPID()
        let started = Date()
        try startAsNobody(net, "peer.py", ["serve", "12347", "proxy"])
        try net.waitForListener(net.host, 12347)
        let gone = pid.map { waitUntilGone($0, seconds: 5) } ?? false
        let seconds = Date().timeIntervalSince(started)
        #expect(gone, "the session did not end")
        for address in [Self.v4, Self.v6] { #expect(try net.reach(address) == "app", "over \(address)") }
        let log = try String(contentsOfFile: net.stateDirectory + "/session.log", encoding: .utf8)
        #expect(log.contains("uid 65534 now listens on the proxy port"), "\(log)")
        #expect(try net.leRedirect("end").status == 0)
        report(431, "| uid 65534 takes the proxy port during an `--external-proxy` session | before: port 80 to that user's process until the TTL · after: session ended \(String(format: "%.1f", seconds)) s after the listener appeared; port 80 to the app |")
    }

    // MARK: 4 and 5. CONNECT and pipelining

    @Test func aRefusedConnectLeavesTheNextRequestParsedAndRewritten() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        #expect(try net.leRedirect("begin", "--forwarded").status == 0)
        for (address, client) in [(Self.v4, TestNetwork.clientAddress4), (Self.v6, TestNetwork.clientAddress6)] {
            let bytes = Self.hex(
                "CONNECT internal:22 HTTP/1.1\r\nHost: internal:22\r\n\r\n"
                    + "GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 127.0.0.1\r\nForwarded: for=127.0.0.1\r\nConnection: close\r\n\r\n")
            let answer = try hostile(net, ["exchange", address, bytes])
            #expect(answer.contains("405 Method Not Allowed"), "over \(address): \(answer)")
            #expect(answer.contains("x-forwarded-for=\(client)"), "over \(address): \(answer)")
            #expect(!answer.contains("127.0.0.1"), "over \(address): \(answer)")
            if address == Self.v4 {
                let app = answer.components(separatedBy: " | ").first { $0.hasPrefix("app ") } ?? answer
                report(440, "| CONNECT refused by the app (405), then a request with X-Forwarded-For: 127.0.0.1 (--forwarded) | before: the app got x-forwarded-for=127.0.0.1 · after: 405, then `\(app)` |")
            }
        }
        // A tunnel the app does accept is still one.
        let tunnel = try hostile(net, ["exchange", Self.v4, Self.hex("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\nraw bytes")])
        #expect(tunnel.contains("101 Switching Protocols") && tunnel.contains("raw bytes") && tunnel.contains("bye"), "\(tunnel)")
        // ... also when it comes pipelined after an ordinary request.
        let second = try hostile(
            net, ["exchange", Self.v4, Self.hex("GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\nraw bytes")])
        #expect(second.contains("200 OK") && second.contains("101 Switching Protocols") && second.contains("raw bytes") && second.contains("bye"), "\(second)")
        #expect(try net.leRedirect("end").status == 0)
    }

    @Test func aChallengeConnectionCarriesOneRequestToTheChallengeServer() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        let log = net.stateDirectory + "-acme.log"
        defer { try? FileManager.default.removeItem(atPath: log) }
        try net.start(net.host, ["env", "APP_LOG=\(log)", "python3", Paths.app, "12348", "acme", "--host", "127.0.0.1"])
        try net.waitForListener(net.host, 12348)
        // 404 for a token that is not one: a refusal here is the proxy's, not the app's (with the
        // default, app, it reaches the app as without le-redirect; never the challenge server).
        #expect(try net.leRedirect("begin", "--unknown-challenges", "404").status == 0)
        let pipelined = Self.hex(
            "GET /.well-known/acme-challenge/tokA HTTP/1.1\r\nHost: x\r\n\r\n"
                + "POST /admin/delete HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                + "GET /.well-known/acme-challenge/tokB HTTP/1.1\r\nHost: x\r\n\r\n")
        for address in [Self.v4, Self.v6] {
            let answer = try hostile(net, ["exchange", address, pipelined])
            #expect(answer.contains("acme challenge tokA") && answer.contains("Connection: close"), "over \(address): \(answer)")
            #expect(answer.components(separatedBy: "HTTP/1.1 ").count == 2, "one answer only, over \(address): \(answer)")
            if address == Self.v4 {
                report(450, "| a challenge, then POST /admin/delete pipelined on the same connection | before: the POST reached the challenge server · after: one answer (`Connection: close`), the challenge server saw only the challenge |")
            }
        }
        for token in ["../../admin", "..%2f..%2fadmin", "tokA%20HTTP/1.1%0d%0aX:"] {
            let answer = try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/" + token)
            #expect(answer.hasPrefix("404") || answer.hasPrefix("400"), "\(token): \(answer)")
            report(451, "| token `\(token)` | before: forwarded to the challenge server · after: \(answer) |")
        }
        let seen = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").map(String.init)
        #expect(seen == Array(repeating: "GET /.well-known/acme-challenge/tokA HTTP/1.1", count: 2), "\(seen)")
        #expect(try net.leRedirect("end").status == 0)
    }

    // MARK: 6. The state directory, IPv6 link-local clients, one source's share

    @Test func aStateDirectoryBelowAnotherUsersDirectoryIsRefused() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let parent = net.stateDirectory + "-parent"
        defer { try? FileManager.default.removeItem(atPath: parent) }
        try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
        _ = try run(["chown", "65534", parent])
        let before = try net.ruleset()
        let begin = try net.leRedirect("begin", "--external-proxy", "--state-dir", parent + "/state")
        #expect(begin.status == 1, "\(begin)")
        #expect(begin.stderr.contains("belongs to another user"), "\(begin.stderr)")
        #expect(try net.ruleset() == before)
        let writable = net.stateDirectory + "-writable"
        defer { try? FileManager.default.removeItem(atPath: writable) }
        try FileManager.default.createDirectory(atPath: writable, withIntermediateDirectories: true)
        chmod(writable, 0o777)
        let open = try net.leRedirect("begin", "--external-proxy", "--state-dir", writable + "/state")
        #expect(open.status == 1 && open.stderr.contains("other users may write to"), "\(open)")
        report(460, "| state directory below a directory of uid 65534 | before: begin exit 0 (and end could be turned away) · after: exit \(begin.status), \(begin.stderr.split(separator: "\n").first ?? "") |")
    }

    @Test func anIPv6LinkLocalClientReachesTheApp() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        let shown = try net.exec(net.host, ["ip", "-6", "-o", "addr", "show", "dev", "veth-h", "scope", "link"]).stdout
        guard let range = shown.range(of: #"fe80::[0-9a-f:]+"#, options: .regularExpression) else {
            throw TestFailure("no link-local address on veth-h: \(shown)")
        }
        let address = String(shown[range])
        // Until the kernel's duplicate address detection is over the address cannot be used.
        let deadline = Date().addingTimeInterval(5)
        for (ns, device) in [(net.host, "veth-h"), (net.client, "veth-c")] {
            while try net.exec(ns, ["ip", "-6", "addr", "show", "dev", device, "tentative"]).stdout.contains("fe80"),
                Date() < deadline
            {
                usleep(100_000)
            }
        }
        #expect(try net.leRedirect("begin").status == 0)
        let answer = try net.httpClient("get", address + "%veth-c", "/")
        #expect(answer.hasPrefix("200 app fe80:"), "\(answer)")
        report(470, "| GET / from an IPv6 link-local address (\(address)%veth-c) | before: 502 · after: \(answer) |")
        #expect(try net.leRedirect("end").status == 0)
    }

    @Test func oneSourceCannotTakeEverySlot() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        #expect(try net.leRedirect("begin", "--max-connections-per-source", "20").status == 0)
        let answer = try hostile(net, ["cap", Self.v4, "20"])
        #expect(answer == "extra closed, first status 200", "\(answer)")
        // Another address is another source: served meanwhile.
        #expect(try net.httpClient("get", Self.v6, "/") == "200 app \(Self.v6)")
        report(480, "| 21 connections from one address, --max-connections-per-source 20 | before: all held (no cap) · after: \(answer); another address served |")
        #expect(try net.leRedirect("end").status == 0)
    }
}
