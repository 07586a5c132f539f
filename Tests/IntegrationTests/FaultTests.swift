import Foundation
import Glibc
import Testing

/// Invariant 3 at every step: a debug build killed at each fault point of begin, end and recover,
/// or with a call that can fail made to fail, on an nftables and an iptables-legacy host. Each case
/// shows that port 80 serves the app (at once; on iptables-legacy, a session killed after it
/// reported ready by its TTL), that the next recover, begin or end restores the ruleset exactly,
/// and that a later session works. Each case adds its row to docs/faults.md's table (TestReport).
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct FaultTests {
    /// `challenge`: `challenge add` arming a session begun with --in-memory. `embedded`: a program
    /// holding the session itself through the library (Examples/EmbeddedRenewer: begin, end).
    enum Phase: String, Sendable { case begin, challenge, end, recover, embedded }

    enum Expected: Sendable {
        /// The faulted command itself was SIGKILLed.
        case commandKilled
        /// begin reports that its session daemon was killed before it was ready.
        case daemonKilled
        /// The command exits 0; its output contains the text (a warning), if any.
        case succeeded(String?)
        /// The command exits 1, saying the text.
        case failed(String)
    }

    enum Restorer: String, Sendable { case recover, begin, end }

    struct Case: Sendable, CustomTestStringConvertible {
        var host: Host
        var phase: Phase
        var fault: String
        var expected: Expected
        var restorer: Restorer = .recover
        var testDescription: String { "\(host.backend): \(phase.rawValue): \(fault)" }
        /// Whether port 80 may point at the dead session's proxy port until the TTL: only an
        /// x_tables redirect whose session died with nobody left to take it out.
        var appAtOnce: Bool { !(host.backend == "iptables-legacy" && fault == "ready-reported") }
        /// Whether the faulted command (or a daemon ending a session nobody knows of) leaves nothing
        /// for a restorer: all but a session killed after it reported ready, a killed embedding
        /// program, and a killed recover.
        var leavesNothing: Bool { [.begin, .challenge, .end].contains(phase) && fault != "ready-reported" }
    }

    static let ttl = 10
    static let nft = Host.nftablesPolicyDrop, legacy = Host.legacyDropForcedLegacy

    static let cases: [Case] = {
        var cases: [Case] = []
        for host in [nft, legacy] {
            let isLegacy = host.backend == "iptables-legacy"
            // The commits begin makes, first and last: one nftables batch, or x_tables' nat tables (the
            // identity bindings) then its mangle tables.
            let commits = isLegacy ? ["iptables-legacy ip nat", "iptables-legacy ip6 mangle"] : ["nftables batch"]
            var begin: [(String, Expected)] = [
                ("lock-taken", .commandKilled), ("daemon-spawned", .commandKilled), ("daemon-started", .daemonKilled),
                ("listeners-bound", .daemonKilled),
            ]
            for commit in commits { begin.append(("journal-intent-written \(commit)", .daemonKilled)) }
            // Only the daemon's: begin's own clean-up after the daemon died sends batches too.
            if !isLegacy { begin.append(("daemon-started>batch-sent@1", .daemonKilled)) }
            for commit in commits { begin.append(("commit-acknowledged \(commit)", .daemonKilled)) }
            begin += [("handles-recorded", .daemonKilled), ("ready-reported", .succeeded(nil))]
            // The proxy process killed once it serves: begin returns, and its session ends by itself.
            begin.append(("proxy-confined", .succeeded(nil)))
            // Calls that fail: nothing of begin may stay.
            begin += [
                ("daemon-started>bind@1=EADDRINUSE", .failed("binding the control socket")),
                ("daemon-started>bind@2=EADDRINUSE", .failed("binding the validation proxy")),
                ("daemon-started>fsync@1=EIO", .failed("Input/output error")),
                ("daemon-started>rename@1=EROFS", .failed("Read-only file system")),
                ("commit-acknowledged \(commits.last!)>fsync@1=ENOSPC", .failed("No space left on device")),
            ]
            if isLegacy {
                begin += [
                    ("daemon-started>xtables-lock@1=EIO", .failed("xtables lock")),
                    ("daemon-started>xtables-commit@1=ENOMEM", .failed("begin: iptables-legacy ip nat")),
                    ("commit-acknowledged iptables-legacy ip mangle>xtables-commit@1=ENOMEM",
                     .failed("anything begin had applied was removed again")),
                ]
            } else {
                begin += [
                    ("journal-intent-written>netlink-send@1=ENOBUFS", .failed("No buffer space available")),
                    // The kernel's answer is lost: begin cannot know what it applied, and takes back
                    // whatever of it is there.
                    ("batch-sent>netlink-receive@1=EIO", .failed("anything begin had applied was removed again")),
                ]
            }
            for (fault, expected) in begin { cases.append(Case(host: host, phase: .begin, fault: fault, expected: expected)) }

            // end runs in the session holder; `end` recovers what a dead or failing holder left.
            var end: [(String, Expected)] = [("redirect-removed", .succeeded("did not answer"))]
            end.append(("drain-started", .succeeded("did not answer")))
            if !isLegacy { end.append(("table-removed", .succeeded("did not answer"))) }
            end += [("journal-deleted", .succeeded("did not answer"))]
            end += [
                (isLegacy ? "ready-reported>xtables-commit=EIO" : "ready-reported>netlink-send=EIO",
                 .succeeded(isLegacy ? "removing le-redirect's rules" : "removing the steering")),
                ("drain-started>unlink=EACCES", .succeeded("Permission denied")),
                ("drain-started>fsync@1=EIO", .succeeded("Input/output error")),
            ]
            // After the steering is out, x_tables has nothing more to commit; nftables deletes the table.
            if !isLegacy { end.append(("redirect-removed>netlink-send=EIO", .succeeded("end: removing the steering"))) }
            if isLegacy { end.append(("ready-reported>xtables-lock=EIO", .succeeded("xtables lock"))) }
            for (fault, expected) in end { cases.append(Case(host: host, phase: .end, fault: fault, expected: expected)) }
            // The holder killed just after `challenge add` armed the redirect: challenge add recovers.
            cases.append(Case(host: host, phase: .challenge, fault: "redirect-armed", expected: .failed("its session was recovered")))
            // A program embedding the library, killed mid-begin (after the commits) and mid-end. On
            // iptables-legacy a redirect left in x_tables would wait for the example's 2-minute TTL.
            let embedded = isLegacy
                ? ["redirect-removed", "journal-deleted"]
                : ["commit-acknowledged nftables batch", "handles-recorded", "redirect-removed", "table-removed"]
            for fault in embedded { cases.append(Case(host: host, phase: .embedded, fault: fault, expected: .commandKilled)) }
            cases.append(Case(host: host, phase: .recover, fault: "recovery-rules-removed", expected: .commandKilled))
        }
        // Every restorer gets its share of the cases (recover's own cases are restored by recover).
        let restorers: [Restorer] = [.recover, .begin, .end]
        for i in cases.indices where cases[i].phase != .recover { cases[i].restorer = restorers[i % 3] }
        return cases
    }()

    @Test(arguments: cases)
    func aFaultLeavesNothingBehind(_ c: Case) throws {
        let net = try TestNetwork(c.host)
        defer { net.close() }
        try net.startApp()
        let before = try net.ruleset()
        let fault = ["LE_REDIRECT_FAULT": c.fault]
        let begin = ["begin", "--ttl", "\(Self.ttl)s"] + c.host.begin

        // The faulted command.
        let faulted: Output
        switch c.phase {
        case .begin:
            faulted = try net.leRedirect(begin, environment: fault)
        case .end:
            // The daemon inherits the fault from begin's environment; end's steps run in it.
            let started = try net.leRedirect(begin, environment: fault)
            try #require(started.status == 0, "\(started)")
            #expect(try serves(net) == "proxy", "the session was not live before end")
            faulted = try net.leRedirect("end")
        case .challenge:
            let started = try net.leRedirect(begin + ["--in-memory"], environment: fault)
            try #require(started.status == 0, "\(started)")
            #expect(try serves(net) == "app", "a session armed per challenge redirected before a challenge")
            faulted = try net.leRedirect("challenge", "add", "tok", "tok.key")
        case .embedded:
            faulted = try net.exec(net.host, [EmbeddedLibraryTests.example, "self"], environment: fault)
        case .recover:
            let started = try net.leRedirect(begin)
            try #require(started.status == 0, "\(started)")
            let pid = try #require(try net.daemonPID())
            kill(pid, SIGKILL)
            #expect(waitUntilGone(pid))
            faulted = try net.leRedirect(["recover"], environment: fault)
        }
        let returned = Date()
        let output = faulted.stdout + faulted.stderr
        switch c.expected {
        case .commandKilled:
            #expect(faulted.status == 128 + SIGKILL, "\(faulted)")
        case .daemonKilled:
            #expect(faulted.status == 1 && output.contains("(signal 9)"), "\(faulted)")
        case .succeeded(let text):
            #expect(faulted.status == 0 && (text.map { output.contains($0) } ?? true), "\(faulted)")
        case .failed(let text):
            #expect(faulted.status == 1 && output.contains(text), "\(faulted)")
        }

        // Port 80 serves the app (directly, or through a session still ending itself): at once, or
        // by the TTL. A daemon whose begin was killed ends its session itself.
        var served = try serves(net)
        let atOnce = served == "app" || served == "proxy"
        #expect(atOnce || !c.appAtOnce, "port 80 did not serve the app at once: \(served)")
        while served != "app" && served != "proxy" && Date().timeIntervalSince(returned) < Double(Self.ttl + 5) {
            usleep(100_000)
            served = try serves(net)
        }
        let timeToApp = Date().timeIntervalSince(returned)
        #expect(served == "app" || served == "proxy", "port 80 never served the app again: \(served)")
        let deadline = Date().addingTimeInterval(10)
        while try !net.daemons().isEmpty && Date() < deadline { usleep(20_000) }
        #expect(try net.daemons().isEmpty, "a session daemon is still running")
        #expect(try serves(net) == "app")
        #expect(try serves(net, TestNetwork.hostAddress6) == "app")

        let left = try net.ruleset()
        let leftRules = left.components(separatedBy: "comment \"LE\"").count + left.components(separatedBy: "--comment LE").count - 2
        let journalLeft = FileManager.default.fileExists(atPath: net.stateDirectory + "/journal")
        #expect(!c.leavesNothing || (leftRules == 0 && !journalLeft), "left \(leftRules) rules, journal: \(journalLeft)")

        // The next recover, begin or end restores the ruleset exactly.
        switch c.restorer {
        case .recover:
            let recover = try net.leRedirect("recover")
            #expect(recover.status == 0, "\(recover)")
        case .begin:
            let next = try net.leRedirect(begin)
            #expect(next.status == 0, "\(next)")
            #expect(try serves(net) == "proxy")
            #expect(try net.leRedirect("end").status == 0)
        case .end:
            let end = try net.leRedirect("end")
            #expect(end.status == 0, "\(end)")
        }
        let restored = try net.ruleset() == before
        #expect(restored, "the ruleset differs from before the fault")
        #expect(!FileManager.default.fileExists(atPath: net.stateDirectory + "/journal"))

        // And no later session is blocked.
        let again = try net.leRedirect(begin)
        #expect(again.status == 0, "\(again)")
        #expect(try serves(net) == "proxy")
        let end = try net.leRedirect("end")
        #expect(end.status == 0 && end.stderr.isEmpty, "\(end)")
        let after = try net.ruleset()
        let next = again.status == 0 && end.status == 0 && after == before
        #expect(next)

        Self.record(c, faulted: faulted, leftRules: leftRules, journalLeft: journalLeft, atOnce: atOnce,
                    timeToApp: timeToApp, restored: restored, next: next)
    }

    /// Who answers port 80 of the host from the client: "app" (directly), "proxy" (the app, through
    /// the session's proxy: it connects from the host's own address), or why nothing did.
    private func serves(_ net: TestNetwork, _ address: String = TestNetwork.hostAddress4) throws -> String {
        let answer = try net.httpClient("get", address, "/")
        guard answer.hasPrefix("200 app ") else { return answer }
        return answer.contains(address) ? "proxy" : "app"
    }

    private static func record(
        _ c: Case, faulted: Output, leftRules: Int, journalLeft: Bool, atOnce: Bool, timeToApp: Double, restored: Bool,
        next: Bool
    ) {
        let result: String
        switch c.expected {
        case .commandKilled: result = "\(c.phase.rawValue) killed"
        case .daemonKilled: result = "begin exits 1: daemon killed"
        case .succeeded: result = "\(c.phase.rawValue) exits \(faulted.status)" + (faulted.stderr.contains("warning") ? ", warns" : "")
        case .failed: result = "\(c.phase.rawValue) exits \(faulted.status)"
        }
        let time = atOnce ? "at once" : String(format: "%.1f s", timeToApp)
        let index = cases.firstIndex { $0.testDescription == c.testDescription } ?? 999
        TestReport.add(
            "faults", order: index,
            "| \(c.host.backend) | \(c.phase.rawValue) | `\(c.fault)` | \(result) | \(leftRules)\(journalLeft ? " + journal" : "") "
                + "| \(time) | \(c.restorer.rawValue) | \(restored ? "yes" : "NO") | \(next ? "yes" : "NO") |")
    }
}
