import Foundation
import Testing

/// The library used in-process (Examples/EmbeddedRenewer, the README's example): the same
/// guarantees as the CLI's daemon, and the CLI sees and ends the embedded session.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct EmbeddedLibraryTests {
    static var example: String {
        URL(fileURLWithPath: Paths.binary).deletingLastPathComponent().appendingPathComponent("embedded-renewer-example").path
    }

    @Test func anEmbeddedSessionBeginsAndEndsItself() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let before = try net.ruleset()
        let output = try net.exec(net.host, [Self.example, "self"])
        #expect(output.status == 0, "\(output)")
        #expect(output.stdout.contains("ready: port 80 -> 12347"), "\(output)")
        #expect(output.stdout.contains("ended: requested, warnings: 0"), "\(output)")
        #expect(try net.ruleset() == before)
    }

    @Test func theCLISeesAndEndsAnEmbeddedSession() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startListeners()
        let before = try net.ruleset()
        _ = try net.startEmbeddedSession(example: Self.example)
        #expect(try net.status()["holder"] as? String == "embedded")
        #expect(try net.reach(TestNetwork.hostAddress4) == "proxy")
        #expect(try net.leRedirect("begin", "--external-proxy").status == 1)

        let end = try net.leRedirect("end")
        #expect(end.status == 0, "\(end)")
        #expect(try net.ruleset() == before)
        #expect(try net.reach(TestNetwork.hostAddress4) == "app")
    }

    @Test func sigkillOfAnEmbeddingProcessGivesPortEightyBack() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startListeners()
        let before = try net.ruleset()
        let pid = try net.startEmbeddedSession(example: Self.example)
        kill(pid, SIGKILL)
        #expect(waitUntilGone(pid))
        #expect(try net.reach(TestNetwork.hostAddress4) == "app")
        #expect(try net.leRedirect("recover").status == 0)
        #expect(try net.ruleset() == before)
    }
}
