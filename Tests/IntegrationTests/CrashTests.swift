import Foundation
import Testing

/// Invariant 3: a dead or frozen session daemon never leaves port 80 pointing at nothing, and
/// recovery restores the ruleset exactly.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct CrashTests {
    @Test func sigkillOfTheDaemonGivesPortEightyBackAtOnceAndRecoverRestoresTheRuleset() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startListeners()
        let before = try net.ruleset()
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)
        #expect(try net.reach(TestNetwork.hostAddress4) == "proxy")
        let pid = try #require(try net.daemonPID())

        kill(pid, SIGKILL)
        waitUntilGone(pid)
        // The owned table died with the daemon's socket: the app answers at once.
        #expect(try net.reach(TestNetwork.hostAddress4) == "app")
        #expect(try net.reach(TestNetwork.hostAddress6) == "app")
        // Nothing of le-redirect's is left in the kernel; only the journal waits for recover.
        #expect(try net.ruleset() == before)
        #expect(try net.status()["state"] as? String == "stale")

        let recover = try net.leRedirect("recover")
        #expect(recover.status == 0, "\(recover)")
        #expect(try net.ruleset() == before)
        #expect(try net.status()["state"] as? String == "inactive")
        // And a new session starts normally.
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.ruleset() == before)
    }

    /// The dead session's rules are removed first: exactly one session's rules are there after
    /// (nftables: the steering rule in our table; x_tables: per family, a steering rule in mangle
    /// and, the host having nat tables, an identity binding in nat).
    @Test(arguments: [(Host.nftablesPolicyAccept, 1), (.legacyDropForcedLegacy, 4)])
    func theNextBeginRecoversADeadSession(host: Host, rules: Int) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        let before = try net.ruleset()
        try net.crashSession(host.begin)
        let begin = try net.leRedirect(["begin", "--external-proxy"] + host.begin)
        #expect(begin.status == 0, "\(begin)")
        let during = try net.ruleset()
        #expect(during.components(separatedBy: "comment \"LE\"").count + during.components(separatedBy: "--comment LE").count - 2 == rules)
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.ruleset() == before)
    }

    @Test func endAfterADeadSessionRecoversAndExitsZero() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let before = try net.ruleset()
        try net.crashSession()
        let end = try net.leRedirect("end")
        #expect(end.status == 0, "\(end)")
        #expect(try net.ruleset() == before)
    }

    /// A frozen daemon holds its socket, so its table stays; the set element's kernel timeout is
    /// what ends the redirect, with no le-redirect process doing anything.
    @Test func aStoppedDaemonLosesTheRedirectAtTheTTL() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startListeners()
        let before = try net.ruleset()
        #expect(try net.leRedirect("begin", "--external-proxy", "--ttl", "10s").status == 0)
        let pid = try #require(try net.daemonPID())
        kill(pid, SIGSTOP)
        let stoppedAt = Date()
        #expect(try net.reach(TestNetwork.hostAddress4) == "proxy")
        while Date().timeIntervalSince(stoppedAt) < 11 { usleep(100_000) }
        #expect(try net.reach(TestNetwork.hostAddress4) == "app")
        #expect(try net.reach(TestNetwork.hostAddress6) == "app")
        #expect(try net.status()["responding"] as? Bool == false)

        // end does not wait for a stopped daemon: it kills it and recovers.
        let end = try net.leRedirect("end", timeout: 20)
        #expect(end.status == 0, "\(end)")
        #expect(processGone(pid))
        #expect(try net.ruleset() == before)
    }

    @Test func sigtermEndsTheSessionCleanly() throws {
        let net = try TestNetwork(ruleset: "several-chains")
        defer { net.close() }
        let before = try net.ruleset()
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)
        let pid = try #require(try net.daemonPID())
        kill(pid, SIGTERM)
        waitUntilGone(pid)
        #expect(processGone(pid))
        #expect(try net.ruleset() == before)
        #expect(!FileManager.default.fileExists(atPath: net.stateDirectory + "/journal"))
    }

    @Test func theDaemonEndsItselfAtTheTTL() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let before = try net.ruleset()
        #expect(try net.leRedirect("begin", "--external-proxy", "--ttl", "10s").status == 0)
        let pid = try #require(try net.daemonPID())
        let started = Date()
        waitUntilGone(pid, seconds: 20)
        _ = started
        #expect(processGone(pid))
        #expect(try net.ruleset() == before)
        #expect(try net.leRedirect("end").stdout.contains("no active session"))
    }
}
