import Foundation
import Glibc
import Testing

/// The code that reads the internet holds no privilege (docs/design.md, "Processes"): the proxy
/// runs in a process of its own, read here from /proc as the kernel sees it, and is tried as an
/// attacker would: an unprivileged local user (uid 65534, the proxy's own uid where there is no
/// `le-redirect` user) tracing, reading and stopping it; a forbidden system call; the file system
/// outside the webroot. Whatever happens to the proxy, the session ends cleanly: port 80 goes back
/// to the app at once and the ruleset is as before.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct PrivilegeTests {
    static let v4 = TestNetwork.hostAddress4
    static let nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--"]

    /// /proc/PID/status as name -> value.
    private static func procStatus(_ pid: Int32) throws -> [String: String] {
        let text = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        var fields: [String: String] = [:]
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[String(line[..<colon])] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return fields
    }

    private func report(_ order: Int, _ row: String) { TestReport.add("hostile", order: order, row) }

    private func proxyPID(_ net: TestNetwork) throws -> Int32 {
        try #require((try net.status()["proxyPid"] as? NSNumber)?.int32Value)
    }

    private func serves(_ net: TestNetwork) throws -> String {
        let answer = try net.httpClient("get", Self.v4, "/")
        guard answer.hasPrefix("200 app ") else { return answer }
        return answer.contains(Self.v4) ? "proxy" : "app"
    }

    /// After the proxy was killed or stopped: the session ended by itself and left nothing.
    private func sessionEndedCleanly(_ net: TestNetwork, before: String, holder: Int32, why: String) throws {
        #expect(waitUntilGone(holder, seconds: 10), "the session holder did not end after \(why)")
        #expect(try net.status()["state"] as? String == "inactive")
        #expect(try net.ruleset() == before, "the ruleset is not as before after \(why)")
        #expect(try serves(net) == "app")
        let log = (try? String(contentsOfFile: net.stateDirectory + "/session.log", encoding: .utf8)) ?? ""
        #expect(log.contains("reason=proxy-exited"), "\(log)")
    }

    @Test(arguments: ["--webroot", "--challenge-port"])
    func theProxyProcessHoldsNoPrivilege(_ source: String) throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        let webroot = net.stateDirectory + "-nginx/webroot"
        try FileManager.default.createDirectory(atPath: webroot, withIntermediateDirectories: true)
        try "tokA.thumb".write(toFile: webroot + "/tokA", atomically: true, encoding: .utf8)
        let begin = source == "--webroot" ? ["begin", "--webroot", webroot] : ["begin"]
        #expect(try net.leRedirect(begin).status == 0)
        if source == "--webroot" {
            #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/tokA") == "200 tokA.thumb")
        }
        let holder = try #require(try net.daemonPID())
        let proxy = try proxyPID(net)
        #expect(proxy != holder)
        let p = try Self.procStatus(proxy)
        for field in ["Uid", "Gid"] {
            let ids = (p[field] ?? "").split(separator: "\t").compactMap { Int($0) }
            #expect(ids.count == 4 && !ids.contains(0), "\(field): \(p[field] ?? "?")")
        }
        #expect(!(p["Groups"] ?? "").split(separator: " ").contains("0"), "Groups: \(p["Groups"] ?? "")")
        for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            #expect(p[field] == "0000000000000000", "\(field): \(p[field] ?? "?")")
        }
        #expect(p["NoNewPrivs"] == "1")
        #expect(p["Seccomp"] == "2", "seccomp mode \(p["Seccomp"] ?? "?") (2 is a filter)")
        // The holder is the one that keeps root.
        #expect(try Self.procStatus(holder)["Uid"]?.hasPrefix("0\t") == true)
        // None of the holder's netfilter sockets went with the listeners: no NETLINK_NETFILTER
        // (protocol 12) socket among the proxy's descriptors.
        let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(proxy)/fd")
        let inodes = Set(fds.compactMap { fd -> String? in
            let link = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(proxy)/fd/\(fd)")) ?? ""
            return link.hasPrefix("socket:[") ? String(link.dropFirst(8).dropLast()) : nil
        })
        let netlink = try net.exec(net.host, ["cat", "/proc/net/netlink"]).stdout.split(separator: "\n").dropFirst()
        let netfilter = netlink.filter { line in
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            return f.count > 9 && f[1] == "12" && inodes.contains(String(f[9]))
        }
        #expect(netfilter.isEmpty, "the proxy holds a netfilter socket: \(netfilter)")
        let ids = "Uid \(p["Uid"] ?? "?"), CapEff \(p["CapEff"] ?? "?"), CapBnd \(p["CapBnd"] ?? "?"), NoNewPrivs \(p["NoNewPrivs"] ?? "?"), Seccomp \(p["Seccomp"] ?? "?")"
        report(500, "| the proxy process's /proc/PID/status, \(source) | before: uid 0, CapEff 000001fffeffffff, NoNewPrivs 0, Seccomp 0 (a thread of the root daemon) · after: \(ids.replacingOccurrences(of: "\t", with: " ")); no netfilter socket |")
        #expect(try net.leRedirect("end").status == 0)
        #expect(waitUntilGone(proxy), "the proxy process outlived end")
    }

    /// uid 65534 (the proxy's own uid here) can neither trace it nor read its memory or
    /// environment: it is not dumpable.
    @Test func anUnprivilegedUserCannotTraceOrReadTheProxy() throws {
        let net = try TestNetwork(ruleset: "empty")
        defer { net.close() }
        try net.startApp()
        #expect(try net.leRedirect("begin").status == 0)
        let proxy = try proxyPID(net)
        let attempt = """
            import ctypes, sys
            libc = ctypes.CDLL(None, use_errno=True)
            r = libc.ptrace(16, \(proxy), None, None)  # PTRACE_ATTACH
            print("ptrace", r, ctypes.get_errno())
            for name in ("mem", "environ", "maps"):
                try:
                    open("/proc/\(proxy)/" + name, "rb").read(16)
                    print(name, "read")
                except OSError as e:
                    print(name, e.errno)
            """
        let output = try net.exec(net.host, Self.nobody + ["/usr/bin/python3", "-c", attempt])
        let lines = output.stdout.split(separator: "\n").map(String.init)
        #expect(lines.contains("ptrace -1 \(EPERM)"), "\(output)")
        for name in ["mem", "environ", "maps"] {
            #expect(lines.contains("\(name) \(EACCES)") || lines.contains("\(name) \(EPERM)"), "\(name): \(output)")
        }
        report(510, "| uid 65534 (the proxy's uid) ptraces it, reads /proc/PID/mem, environ, maps | before: root's process: EPERM / EACCES · after: \(lines.joined(separator: ", ")) |")
        #expect(try net.leRedirect("end").status == 0)
    }

    /// Any process of the proxy's uid may send it SIGSTOP: steered connections would then wait on
    /// it. The holder asks it every two seconds, and ends the session when it does not answer.
    @Test func aStoppedProxyEndsTheSession() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        let before = try net.ruleset()
        #expect(try net.leRedirect("begin").status == 0)
        let holder = try #require(try net.daemonPID())
        let proxy = try proxyPID(net)
        #expect(try serves(net) == "proxy")
        let stopped = try net.exec(net.host, Self.nobody + ["kill", "-STOP", "\(proxy)"])
        #expect(stopped.status == 0, "uid 65534 could not signal the proxy: \(stopped)")
        let start = Date()
        try sessionEndedCleanly(net, before: before, holder: holder, why: "SIGSTOP")
        let seconds = Date().timeIntervalSince(start)
        report(520, "| uid 65534 sends the proxy SIGSTOP (it may: same uid, where there is no `le-redirect` user) | before: not possible (root's thread) · after: session ended \(String(format: "%.1f", seconds)) s later, port 80 to the app, ruleset as before |")
        #expect(waitUntilGone(proxy), "the stopped proxy was not killed")
    }

    /// A system call outside the filter (the fault `proxy-accepted=syscall` makes one at the first
    /// steered connection) kills the proxy with SIGSYS, and only it: the holder ends the session.
    @Test func aSeccompViolationKillsOnlyTheProxy() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        let before = try net.ruleset()
        let begun = try net.leRedirect(["begin"], environment: ["LE_REDIRECT_FAULT": "proxy-accepted=syscall"])
        #expect(begun.status == 0, "\(begun)")
        let holder = try #require(try net.daemonPID())
        let proxy = try proxyPID(net)
        _ = try? net.httpClient("get", Self.v4, "/")  // killed mid-connection: no answer
        #expect(waitUntilGone(proxy))
        try sessionEndedCleanly(net, before: before, holder: holder, why: "a seccomp violation")
        let log = try String(contentsOfFile: net.stateDirectory + "/session.log", encoding: .utf8)
        #expect(log.contains("SIGSYS"), "\(log)")
        report(530, "| a forbidden system call in the proxy (`LE_REDIRECT_FAULT=proxy-accepted=syscall`: ptrace at the first connection) | before: no filter · after: proxy killed by SIGSYS, session ended, port 80 to the app, ruleset as before |")
    }

    @Test func aKilledProxyEndsTheSession() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        let before = try net.ruleset()
        #expect(try net.leRedirect("begin").status == 0)
        let holder = try #require(try net.daemonPID())
        let proxy = try proxyPID(net)
        kill(proxy, SIGKILL)
        try sessionEndedCleanly(net, before: before, holder: holder, why: "SIGKILL of the proxy")
    }

    /// The holder killed: the proxy sees its socket close and exits; the next command recovers.
    @Test func aKilledHolderTakesTheProxyWithIt() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        let before = try net.ruleset()
        #expect(try net.leRedirect("begin").status == 0)
        let holder = try #require(try net.daemonPID())
        let proxy = try proxyPID(net)
        kill(holder, SIGKILL)
        #expect(waitUntilGone(proxy, seconds: 5), "the proxy outlived its holder")
        #expect(try net.leRedirect("recover").status == 0)
        #expect(try net.ruleset() == before)
        #expect(try serves(net) == "app")
    }

    /// Landlock: the confined proxy opens nothing outside the webroot, not even what its uid may
    /// read (/etc/passwd), while the webroot's files still serve. The probe is a debug build's.
    @Test func theProxyOpensNothingOutsideTheWebroot() throws {
        let net = try TestNetwork(ruleset: "empty")
        defer { net.close() }
        try net.startApp()
        let webroot = net.stateDirectory + "-nginx/webroot"
        try FileManager.default.createDirectory(atPath: webroot, withIntermediateDirectories: true)
        try "tokA.thumb".write(toFile: webroot + "/tokA", atomically: true, encoding: .utf8)
        let probe = "/etc/passwd:\(webroot)/tokA:/proc/self/status"
        let begun = try net.leRedirect(["begin", "--webroot", webroot], environment: ["LE_REDIRECT_PROXY_PROBE": probe])
        #expect(begun.status == 0, "\(begun)")
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/tokA") == "200 tokA.thumb")
        #expect(try net.leRedirect("end").status == 0)
        let log = try String(contentsOfFile: net.stateDirectory + "/session.log", encoding: .utf8)
        #expect(log.contains("probe /etc/passwd: Permission denied"), "\(log)")
        #expect(log.contains("probe /proc/self/status: Permission denied"), "\(log)")
        #expect(log.contains("probe \(webroot)/tokA: opened"), "\(log)")
        #expect(log.contains("landlock=abi "), "\(log)")
        let probed = log.split(separator: "\n").filter { $0.contains("probe ") }.map { String($0[$0.range(of: "probe ")!.lowerBound...]) }
        report(540, "| the confined proxy opens /etc/passwd, /proc/self/status, a webroot file (`LE_REDIRECT_PROXY_PROBE`) | before: everything (root) · after: \(probed.joined(separator: "; ")) |")
    }
}
