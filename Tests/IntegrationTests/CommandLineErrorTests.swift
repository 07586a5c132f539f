import Foundation
import Testing

/// Bad input gets a clear message and the right exit code, and changes nothing.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct CommandLineErrorTests {
    struct Case: CustomTestStringConvertible, Sendable {
        var arguments: [String]
        var status: Int32
        var message: String
        var testDescription: String { arguments.joined(separator: " ") }
    }

    static let cases: [Case] = [
        Case(arguments: ["--external-proxy", "--port", "0"], status: 2, message: "is not a TCP port"),
        Case(arguments: ["--external-proxy", "--port", "70000"], status: 2, message: "is not a TCP port"),
        Case(arguments: ["--external-proxy", "--proxy-port", "65536"], status: 2, message: "is not a TCP port"),
        Case(arguments: ["--external-proxy", "--proxy-port", "80"], status: 2, message: "the redirected port itself"),
        Case(arguments: ["--external-proxy", "--port", "abc"], status: 2, message: "--port"),
        Case(arguments: ["--external-proxy", "--ttl", "5s"], status: 2, message: "out of range"),
        Case(arguments: ["--external-proxy", "--ttl", "25h"], status: 2, message: "out of range"),
        Case(arguments: ["--external-proxy", "--ttl", "soon"], status: 2, message: "is not a duration"),
        Case(arguments: ["--external-proxy", "--ttl", "1500ms"], status: 2, message: "out of range"),
        Case(arguments: ["--external-proxy", "--backend", "pf"], status: 2, message: "is not a backend"),
        // The host has no x_tables nat table, and begin never makes one (it could not be deleted).
        Case(arguments: ["--external-proxy", "--backend", "iptables-legacy"], status: 1, message: "has no nat table"),
        Case(arguments: ["--webroot", "/srv/acme", "--in-memory"], status: 2, message: "exclude each other"),
        Case(arguments: ["--external-proxy", "--forwarded"], status: 2, message: "do not apply"),
        Case(arguments: ["--proxy-protocol", "v1"], status: 2, message: "only v2"),
        Case(arguments: ["--challenge-url", "ftp://x"], status: 2, message: "expected http://"),
        Case(arguments: ["--external-proxy", "--bogus"], status: 2, message: "--bogus"),
    ]

    @Test(arguments: cases)
    func badBeginArgumentsChangeNothing(_ c: Case) throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let before = try net.ruleset()
        let output = try net.exec(net.host, [Paths.binary, "begin"] + c.arguments)
        #expect(output.status == c.status, "\(output)")
        #expect(output.stderr.contains(c.message), "\(output)")
        #expect(try net.ruleset() == before)
        #expect(!FileManager.default.fileExists(atPath: net.stateDirectory + "/journal"))
    }

    @Test(arguments: [["begin", "--external-proxy"], ["end"], ["status"], ["recover"], ["recover", "--sweep"], ["detect"]])
    func withoutRootEveryCommandExitsThree(_ arguments: [String]) throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let before = try net.ruleset()
        let output = try net.exec(
            net.host,
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", Paths.binary] + arguments)
        #expect(output.status == 3, "\(output)")
        #expect(output.stderr.contains("needs root"), "\(output)")
        #expect(try net.ruleset() == before)
    }

    @Test func aCorruptJournalIsReportedAndNeverHalfTrusted() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let before = try net.ruleset()
        try net.crashSession()
        let path = net.stateDirectory + "/journal"
        var text = try String(contentsOfFile: path, encoding: .utf8)
        text = text.replacingOccurrences(of: "port 80", with: "port 81")
        try text.write(toFile: path, atomically: false, encoding: .utf8)
        let leftovers = try net.ruleset()

        let recover = try net.leRedirect("recover")
        #expect(recover.status == 1, "\(recover)")
        #expect(recover.stderr.contains("corrupt"), "\(recover)")
        #expect(recover.stderr.contains("checksum"), "\(recover)")
        #expect(try net.ruleset() == leftovers)
        let status = try net.status()
        #expect(status["state"] as? String == "stale")
        #expect((status["note"] as? String)?.contains("corrupt") == true)
        let begin = try net.leRedirect("begin", "--external-proxy")
        #expect(begin.status == 1, "\(begin)")
        #expect(try net.ruleset() == leftovers)

        let sweep = try net.leRedirect("recover", "--sweep")
        #expect(sweep.status == 0, "\(sweep)")
        #expect(try net.ruleset() == before)
        #expect(!FileManager.default.fileExists(atPath: path))
    }

    @Test func aTruncatedJournalIsCorrupt() throws {
        let net = try TestNetwork(ruleset: "policy-accept")
        defer { net.close() }
        try net.crashSession()
        let path = net.stateDirectory + "/journal"
        let text = try String(contentsOfFile: path, encoding: .utf8)
        try String(text.prefix(text.count / 2)).write(toFile: path, atomically: false, encoding: .utf8)
        let recover = try net.leRedirect("recover")
        #expect(recover.status == 1)
        #expect(recover.stderr.contains("corrupt"), "\(recover)")
        #expect(try net.leRedirect("recover", "--sweep").status == 0)
    }

    @Test func aJournalFromAnotherNamespaceIsLeftAlone() throws {
        let a = try TestNetwork(ruleset: "policy-drop")
        defer { a.close() }
        let b = try TestNetwork(ruleset: "policy-drop")
        defer { b.close() }
        try a.crashSession()
        let leftovers = try a.ruleset()
        // Namespace b pointed at a's state directory.
        let recover = try run(
            ["ip", "netns", "exec", b.host, Paths.binary, "recover"], environment: ["LE_REDIRECT_STATE_DIR": a.stateDirectory])
        #expect(recover.status == 1, "\(recover)")
        #expect(recover.stderr.contains("network namespace"), "\(recover)")
        #expect(try a.ruleset() == leftovers)
        #expect(FileManager.default.fileExists(atPath: a.stateDirectory + "/journal"))
        #expect(try a.leRedirect("recover").status == 0)
    }

    @Test func aSecondSessionInTheSameNamespaceIsRefusedByTheKernelsOwnership() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)
        let during = try net.ruleset()
        let other = try run(
            ["ip", "netns", "exec", net.host, Paths.binary, "begin", "--external-proxy"],
            environment: ["LE_REDIRECT_STATE_DIR": net.stateDirectory + "-other"])
        defer { try? FileManager.default.removeItem(atPath: net.stateDirectory + "-other") }
        #expect(other.status == 1, "\(other)")
        #expect(other.stderr.contains("owned by another process"), "\(other)")
        #expect(try net.ruleset() == during)
        #expect(try net.leRedirect("end").status == 0)
    }

    @Test func anUnsafeStateDirectoryIsRefused() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let before = try net.ruleset()
        let real = net.stateDirectory + "-real"
        try FileManager.default.createDirectory(atPath: real, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: real) }
        try FileManager.default.createSymbolicLink(atPath: net.stateDirectory, withDestinationPath: real)
        let symlinked = try net.leRedirect("begin", "--external-proxy")
        #expect(symlinked.status == 1, "\(symlinked)")
        #expect(symlinked.stderr.contains("symbolic link"), "\(symlinked)")
        try FileManager.default.removeItem(atPath: net.stateDirectory)

        try FileManager.default.createDirectory(atPath: net.stateDirectory, withIntermediateDirectories: true)
        chmod(net.stateDirectory, 0o755)
        let open = try net.leRedirect("begin", "--external-proxy")
        #expect(open.status == 1, "\(open)")
        #expect(open.stderr.contains("accessible to other users"), "\(open)")
        #expect(try net.ruleset() == before)
    }
}
