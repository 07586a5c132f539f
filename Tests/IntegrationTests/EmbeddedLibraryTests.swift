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

    /// A program embedding the library with the built-in proxy starts the same unprivileged proxy
    /// process as the daemon does, from the le-redirect program beside it; one it would have to
    /// trust blindly (LE_REDIRECT_EXECUTABLE naming a file others may write) is refused.
    @Test func anEmbeddedBuiltInProxyRunsUnprivileged() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        try net.startApp()
        let before = try net.ruleset()
        let pid = try net.startEmbeddedSession(example: Self.example, mode: "proxy")
        let proxy = try #require((try net.status()["proxyPid"] as? NSNumber)?.int32Value)
        let status = try String(contentsOfFile: "/proc/\(proxy)/status", encoding: .utf8)
        #expect(status.contains("CapEff:\t0000000000000000") && status.contains("NoNewPrivs:\t1") && status.contains("Seccomp:\t2"), "\(status)")
        #expect(!status.contains("Uid:\t0\t"), "\(status)")
        #expect(try net.httpClient("get", TestNetwork.hostAddress4, "/") == "200 app \(TestNetwork.hostAddress4)")
        #expect(try net.leRedirect("end").status == 0)
        #expect(waitUntilGone(pid) && waitUntilGone(proxy))
        #expect(try net.ruleset() == before)

        // An executable named that anyone may write: begin refuses, nothing changed.
        let copy = net.stateDirectory + "-nginx/le-redirect"
        try FileManager.default.createDirectory(atPath: net.stateDirectory + "-nginx", withIntermediateDirectories: true)
        try? FileManager.default.removeItem(atPath: copy)
        try FileManager.default.copyItem(atPath: Paths.binary, toPath: copy)
        chmod(copy, 0o777)
        let refused = try net.exec(
            net.host, ["env", "LE_REDIRECT_STATE_DIR=\(net.stateDirectory)", "LE_REDIRECT_EXECUTABLE=\(copy)", Self.example, "proxy"])
        #expect(refused.stdout.contains("error:") && refused.stdout.contains("may be written by others"), "\(refused)")
        #expect(try net.ruleset() == before)
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
