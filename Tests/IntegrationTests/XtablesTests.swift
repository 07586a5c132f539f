import Foundation
import Glibc
import Testing

/// The x_tables side: detection on each host shape; and the legacy path (`--backend
/// iptables-legacy`, what kernels without owned tables get): rules the host's own tools can list
/// and remove, counters left alone, the xtables lock, a crash between two tables' commits, and the
/// time match that ends the steering with no process left.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct XtablesTests {
    static let legacy = ["--backend", "iptables-legacy"]

    struct Detection: Sendable, CustomTestStringConvertible {
        var host: Host
        var firewall: [String]
        var redirect: String
        /// A phrase the reasons must contain.
        var because: String
        var testDescription: String { host.name }
    }

    static let detections = [
        Detection(host: .emptyHost, firewall: [], redirect: "nftables", because: "owned by the session"),
        // Its ip nat table has iptables' chain names: taken for iptables-nft's.
        Detection(
            host: .nftablesSeveralChains, firewall: ["nftables", "iptables-nft"], redirect: "nftables", because: "owned by the session"),
        // Wherever the kernel has owned tables, the steering is in nftables; x_tables' rules still decide.
        Detection(host: .legacyDrop, firewall: ["iptables-legacy"], redirect: "nftables", because: "iptables-legacy rules still decide"),
        Detection(
            host: .legacyDropForcedLegacy, firewall: ["iptables-legacy"], redirect: "iptables-legacy",
            because: "--backend iptables-legacy was given"),
        Detection(host: .iptablesNftDrop, firewall: ["iptables-nft"], redirect: "nftables", because: "owned by the session"),
        Detection(host: .bothDrop, firewall: ["iptables-nft", "iptables-legacy"], redirect: "nftables", because: "rules still decide"),
        Detection(host: .legacyFilterOnly, firewall: ["iptables-legacy"], redirect: "nftables", because: "owned by the session"),
    ]

    @Test(arguments: detections)
    func detectPicksTheBackendAndSaysWhy(_ d: Detection) throws {
        let net = try TestNetwork(d.host)
        defer { net.close() }
        let before = try net.ruleset()
        let output = try net.leRedirect(["detect", "--json"] + d.host.begin)
        #expect(output.status == 0, "\(output)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(output.stdout.utf8)) as? [String: Any])
        #expect(json["firewall"] as? [String] == d.firewall)
        #expect(json["redirect"] as? String == d.redirect)
        let reasons = (json["reasons"] as? [String] ?? []).joined(separator: " ")
        #expect(reasons.contains(d.because), "\(reasons)")
        let plan = try #require(json["plan"] as? [[String: Any]])
        #expect(!plan.isEmpty)
        #expect(plan.allSatisfy { $0["system"] as? String == d.redirect })
        // What the kernel offers for steering, and where that was read.
        let tproxy = try #require(json["tproxy"] as? [String: Any])
        #expect(tproxy["evidence"] is String)
        let text = try net.leRedirect(["detect"] + d.host.begin)
        #expect(text.status == 0)
        #expect(text.stdout.contains("redirect: \(d.redirect)"))
        #expect(try net.ruleset() == before)  // detect changes nothing, and makes no x_tables table
    }

    /// Every rule begin writes is the entry iptables itself makes for the text in rules/: the
    /// host's own tool removes it, and end then finds nothing to remove and still exits 0.
    @Test func legacyRulesAreRemovableWithIptablesItself() throws {
        let net = try TestNetwork(.legacyDrop)
        defer { net.close() }
        let before = try net.ruleset()
        #expect(try net.leRedirect(["begin", "--external-proxy", "--ttl", "5m"] + Self.legacy).status == 0)
        let datestop = try #require(
            try net.legacyRuleset().firstMatch(of: #/--datestop (\S+)/#).map { String($0.output.1) })
        let steer = ["!", "-i", "lo", "-p", "tcp", "--dport", "80", "--syn", "-m", "addrtype", "--dst-type", "LOCAL", "-m", "time",
                     "--datestop", datestop, "-m", "comment", "--comment", "LE", "-j", "TPROXY", "--on-port", "12347",
                     "--on-ip", "0.0.0.0", "--tproxy-mark", "0x0/0x0"]
        let keep = ["!", "-i", "lo", "-p", "tcp", "--dport", "80", "--syn", "-m", "addrtype", "--dst-type", "LOCAL", "-m", "time",
                    "--datestop", datestop, "-m", "comment", "--comment", "LE", "-j", "ACCEPT"]
        for tool in ["iptables-legacy", "ip6tables-legacy"] {
            let on = tool == "iptables-legacy" ? "0.0.0.0" : "::"
            let args = steer.map { $0 == "0.0.0.0" ? on : $0 }
            let mangle = try net.exec(net.host, [tool, "-t", "mangle", "-D", "PREROUTING"] + args)
            #expect(mangle.status == 0, "\(mangle)")
            let nat = try net.exec(net.host, [tool, "-t", "nat", "-D", "PREROUTING"] + keep)
            #expect(nat.status == 0, "\(nat)")
        }
        #expect(try net.ruleset() == before)
        let end = try net.leRedirect("end")
        #expect(end.status == 0, "\(end)")
        #expect(try net.ruleset() == before)
    }

    /// On an iptables-nft host nothing goes into iptables-nft's tables: iptables-nft-save lists
    /// them as they were during the window, and the host's own rules there still decide.
    @Test func iptablesNftKeepsWorkingDuringTheWindow() throws {
        let net = try TestNetwork(.iptablesNftDrop)
        defer { net.close() }
        try net.startListeners()
        let before = try net.ruleset()
        let saved = try RulesetRestoreTests.iptablesNftSave(net)
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)
        #expect(try RulesetRestoreTests.iptablesNftSave(net) == saved)
        #expect(!saved.contains("incompatible"))
        #expect(try net.reach(TestNetwork.hostAddress4) == "proxy")
        // The host's drop of port 9999 and its allow-list still apply; the proxy port stays closed.
        #expect(try net.reach(TestNetwork.hostAddress4, port: 12347).hasPrefix("failed"))
        let end = try net.leRedirect("end")
        #expect(end.status == 0, "\(end)")
        #expect(try net.ruleset() == before)
    }

    /// libiptc replaces whole tables: the counters of the host's rules must survive begin and end.
    @Test func theCountersOfTheHostsRulesAreUntouched() throws {
        let net = try TestNetwork(.legacyDrop)
        defer { net.close() }
        try net.startListeners()
        for _ in 0..<3 { _ = try net.reach(TestNetwork.hostAddress4) }
        // IPv4 only: IPv6 has neighbour discovery of its own going on, which counts too.
        let counted = { () throws -> String in
            try net.legacyRuleset(counters: true).components(separatedBy: "# ip6tables-legacy-save")[0]
                .split(separator: "\n").filter { !$0.contains("--comment LE") }.joined(separator: "\n")
        }
        let before = try counted()
        #expect(before.contains(#/\[[1-9]\d*:\d+\] -A INPUT -p tcp -m multiport/#), "\(before)")
        #expect(try net.leRedirect(["begin", "--external-proxy"] + Self.legacy).status == 0)
        #expect(try counted() == before)
        #expect(try net.leRedirect("end").status == 0)
        #expect(try counted() == before)
    }

    /// Invariant 3 across tables' commits: the daemon dies after x_tables' nat commits and IPv4
    /// mangle commit and before the IPv6 mangle one (a debug build's fault point stops it there), with begin killed too;
    /// `recover` then restores the ruleset exactly.
    @Test func aCrashBetweenTheTwoMangleCommitsIsRecovered() throws {
        let net = try TestNetwork(.legacyDrop)
        defer { net.close() }
        let before = try net.ruleset()
        try net.start(
            net.host,
            ["env", "LE_REDIRECT_STATE_DIR=\(net.stateDirectory)", "LE_REDIRECT_FAULT=journal-intent-written iptables-legacy ip6 mangle=stop",
             Paths.binary, "begin", "--external-proxy"] + Self.legacy)
        let deadline = Date().addingTimeInterval(20)
        var daemon: Int32?
        while Date() < deadline {
            if let pid = try net.daemons().first, isStopped(pid) {
                daemon = pid
                break
            }
            usleep(20_000)
        }
        let pid = try #require(daemon, "the daemon did not stop at the fault point")
        let half = try net.legacyRuleset()
        #expect(half.components(separatedBy: "-j TPROXY --on-port 12347").count - 1 == 1)
        // Kill begin and its daemon, as a crash of the whole renewal would.
        for pid in try net.processes(matching: Paths.binary) { kill(pid, SIGKILL) }
        waitUntilGone(pid)
        #expect(try net.status()["state"] as? String == "stale")

        let recover = try net.leRedirect("recover")
        #expect(recover.status == 0, "\(recover)")
        #expect(try net.ruleset() == before)
        #expect(try net.status()["state"] as? String == "inactive")
    }

    /// x_tables has no table a process can own: with the daemon killed and nothing left to remove
    /// it, the steering rule's time match stops it at the TTL.
    @Test func aDeadSessionsLegacySteeringEndsAtTheTTL() throws {
        let net = try TestNetwork(.legacyDrop)
        defer { net.close() }
        try net.startListeners()
        let before = try net.ruleset()
        #expect(try net.leRedirect(["begin", "--external-proxy", "--ttl", "10s"] + Self.legacy).status == 0)
        let begun = Date()
        let pid = try #require(try net.daemonPID())
        kill(pid, SIGKILL)
        waitUntilGone(pid)
        #expect(try net.daemons().isEmpty)
        #expect(try net.reach(TestNetwork.hostAddress4) == "proxy")
        #expect(try net.reach(TestNetwork.hostAddress6) == "proxy")
        let status = try net.status()
        #expect(status["state"] as? String == "stale")
        #expect((status["note"] as? String)?.contains("matches until") == true)
        // The time match compares whole seconds and matches through the deadline's second.
        while Date().timeIntervalSince(begun) < 12 { usleep(100_000) }
        #expect(try net.reach(TestNetwork.hostAddress4) == "app")
        #expect(try net.reach(TestNetwork.hostAddress6) == "app")
        #expect(try net.legacyRuleset().contains("-j TPROXY --on-port 12347"))  // still there, inert
        let recover = try net.leRedirect("recover")
        #expect(recover.status == 0, "\(recover)")
        let after = try net.ruleset()
        #expect(after == before, "before:\n\(before)\nafter:\n\(after)\nrecover: \(recover)")
    }

    /// begin takes the xtables lock around its read-modify-commit, as iptables does: while another
    /// holder keeps it, nothing is committed; once released, begin goes on.
    @Test func beginWaitsForTheXtablesLock() throws {
        let net = try TestNetwork(.legacyDrop)
        defer { net.close() }
        let lock = net.stateDirectory + "-xtables.lock", release = net.stateDirectory + "-release"
        defer {
            unlink(lock)
            unlink(release)
        }
        try net.start(net.host, ["flock", "-x", lock, "-c", "while [ ! -e \(release) ]; do sleep 0.02; done"])
        let held = Date().addingTimeInterval(10)
        while try net.exec(net.host, ["flock", "-n", lock, "true"]).status == 0 {
            guard Date() < held else { throw TestFailure("the lock holder did not take \(lock)") }
            usleep(20_000)
        }
        try net.start(
            net.host,
            ["env", "LE_REDIRECT_STATE_DIR=\(net.stateDirectory)", "XTABLES_LOCKFILE=\(lock)", Paths.binary, "begin", "--external-proxy"]
                + Self.legacy)
        // Give begin ample time: it must be waiting, with nothing committed.
        let waiting = Date().addingTimeInterval(2)
        while Date() < waiting {
            #expect(try !net.legacyRuleset().contains("--comment LE"))
            usleep(100_000)
        }
        #expect(try !net.daemons().isEmpty)
        _ = FileManager.default.createFile(atPath: release, contents: nil)
        let done = Date().addingTimeInterval(20)
        while try net.status()["active"] as? Bool != true {
            guard Date() < done else { throw TestFailure("begin did not finish once the lock was free") }
            usleep(20_000)
        }
        #expect(try net.legacyRuleset().components(separatedBy: "--comment LE").count - 1 == 4)
        #expect(try net.exec(net.host, [Paths.binary, "end"], environment: ["XTABLES_LOCKFILE": lock]).status == 0)
    }

    @Test func sweepRemovesLegacyRulesWithoutAJournal() throws {
        let net = try TestNetwork(.legacyDrop)
        defer { net.close() }
        let before = try net.ruleset()
        try net.crashSession(Self.legacy)
        try FileManager.default.removeItem(atPath: net.stateDirectory + "/journal")
        #expect(try net.legacyRuleset().contains("--comment LE"))
        let sweep = try net.leRedirect("recover", "--sweep")
        #expect(sweep.status == 0, "\(sweep)")
        #expect(try net.ruleset() == before)
    }
}

/// Whether the process is stopped (state T), as a fault point leaves it.
func isStopped(_ pid: Int32) -> Bool {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")")
    else { return false }
    return stat[stat.index(after: close)...].split(separator: " ").first == "T"
}
