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
        Case(arguments: ["--external-proxy", "--address", "10.99.0.0/24"], status: 2, message: "is not an IPv4 or IPv6 address"),
        Case(arguments: ["--external-proxy", "--address", "127.0.0.1"], status: 2, message: "is a loopback address"),
        Case(arguments: ["--external-proxy", "--address", "::ffff:10.99.0.1"], status: 2, message: "IPv4-mapped"),
        Case(arguments: ["--external-proxy", "--include-local"], status: 2, message: "--include-local needs the built-in proxy"),
        // The host has no x_tables nat table, and begin never makes one (it could not be deleted).
        Case(arguments: ["--external-proxy", "--backend", "iptables-legacy"], status: 1, message: "has no mangle table"),
        Case(arguments: ["--webroot", "/srv/acme", "--in-memory"], status: 2, message: "exclude each other"),
        Case(arguments: ["--external-proxy", "--forwarded"], status: 2, message: "do not apply"),
        Case(arguments: ["--proxy-protocol", "v1"], status: 2, message: "only v2"),
        Case(arguments: ["--challenge-url", "ftp://x"], status: 2, message: "expected http://"),
        Case(arguments: ["--external-proxy", "--bogus"], status: 2, message: "--bogus"),
        Case(arguments: ["--external-proxy", "--ttl", "10.5s"], status: 2, message: "is not a duration"),
        Case(arguments: ["--external-proxy", "--ttl", "-1m"], status: 2, message: "--ttl"),
        Case(arguments: ["--external-proxy", "--port", "-1"], status: 2, message: "--port"),
        Case(arguments: ["--challenge-port", "12347"], status: 2, message: "is the proxy port"),
        Case(arguments: ["--challenge-port", "80"], status: 2, message: "is the redirected port"),
        Case(arguments: ["--challenge-port", "0"], status: 2, message: "is not a TCP port"),
        Case(arguments: ["--challenge-port", "12348", "--webroot", "/srv"], status: 2, message: "exclude each other"),
        Case(arguments: ["--webroot", "srv/acme"], status: 2, message: "must be an absolute path"),
        Case(arguments: ["--challenge-url", "http://[::1"], status: 2, message: "unclosed ["),
        Case(arguments: ["--challenge-url", "http://host:99999"], status: 2, message: "bad port"),
        Case(arguments: ["--challenge-url", "http://host/path"], status: 2, message: "no path"),
        Case(arguments: ["--max-connections", "0"], status: 2, message: "out of range"),
        Case(arguments: ["--max-connections", "99999999"], status: 2, message: "out of range"),
        Case(arguments: ["--max-head-size", "100"], status: 2, message: "out of range"),
        Case(arguments: ["--head-timeout", "0s"], status: 2, message: "out of range"),
        Case(arguments: ["--idle-timeout", "30d"], status: 2, message: "out of range"),
        Case(arguments: ["--drain-timeout", "forever"], status: 2, message: "is not a duration"),
        Case(arguments: ["--external-proxy", "--in-memory"], status: 2, message: "do not apply"),
        Case(arguments: ["--max-connections-per-source", "0"], status: 2, message: "out of range"),
        Case(arguments: ["--challenge-owner", "no-such-user-here"], status: 2, message: "no such user"),
        Case(arguments: ["--webroot", "/nonexistent/webroot"], status: 2, message: "opening the directory"),
    ]

    @Test(arguments: cases)
    func badBeginArgumentsChangeNothing(_ c: Case) throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let before = try net.ruleset()
        let output = try net.exec(net.host, [Paths.binary, "begin"] + c.arguments)
        #expect(output.status == c.status, "\(output)")
        #expect(output.stderr.contains(c.message), "\(output)")
        let unchanged = try net.ruleset() == before
        #expect(unchanged)
        #expect(!FileManager.default.fileExists(atPath: net.stateDirectory + "/journal"))
        TestReport.add(
            "errors", order: Self.cases.firstIndex { $0.testDescription == c.testDescription } ?? 99,
            "| `begin \(c.testDescription)` | \(output.status) | \(TestReport.cell(output.stderr)) | \(unchanged ? "yes" : "NO") |")
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

    /// The state directory and the journal, broken every way a host can break them: each command
    /// says what is wrong, exits 1 (2 for a usage error), and changes nothing.
    enum Broken: String, CaseIterable, Sendable {
        case stateDirectoryOwnedByAnotherUser = "state directory owned by another user"
        case stateDirectoryIsAFile = "state directory is a file"
        case stateDirectoryRelative = "--state-dir relative"
        case stateDirectoryReadOnly = "state directory on a read-only filesystem"
        case stateDirectoryFull = "state directory on a full filesystem"
        case journalGarbage = "journal of random bytes"
        case journalEmpty = "journal empty"
        case journalNewerVersion = "journal from a newer version"
        case journalSymlink = "journal is a symbolic link"
    }

    @Test(arguments: Broken.allCases)
    func brokenStateChangesNothing(_ broken: Broken) throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let before = try net.ruleset()
        let dir = net.stateDirectory
        var leftovers = before
        var commands: [(arguments: [String], status: Int32, message: String)] = []
        var mount: String?  // a shell line run in a mount namespace of the command's own first
        switch broken {
        case .stateDirectoryOwnedByAnotherUser:
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            chmod(dir, 0o700)
            chown(dir, 65534, 65534)
            commands = [(["begin", "--external-proxy"], 1, "belongs to uid 65534"), (["end"], 1, "belongs to uid 65534"),
                        (["recover"], 1, "belongs to uid 65534")]
        case .stateDirectoryIsAFile:
            try "".write(toFile: dir, atomically: false, encoding: .utf8)
            commands = [(["begin", "--external-proxy"], 1, "is not a directory"), (["end"], 1, "is not a directory")]
        case .stateDirectoryRelative:
            commands = [(["begin", "--external-proxy", "--state-dir", "relative/dir"], 2, "must be an absolute path")]
        case .stateDirectoryReadOnly:
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            mount = "mount -t tmpfs -o size=1m,mode=0700 le-redirect-test \(dir) && mount -o remount,ro \(dir)"
            commands = [(["begin", "--external-proxy"], 1, "Read-only file system")]
        case .stateDirectoryFull:
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            mount = "mount -t tmpfs -o size=64k,mode=0700 le-redirect-test \(dir) && "
                + "(dd if=/dev/zero of=\(dir)/fill bs=4k 2>/dev/null || true)"
            commands = [(["begin", "--external-proxy"], 1, "No space left on device")]
        case .journalGarbage, .journalEmpty, .journalNewerVersion, .journalSymlink:
            try net.crashSession()
            leftovers = try net.ruleset()
            let path = dir + "/journal"
            let text = try String(contentsOfFile: path, encoding: .utf8)
            try FileManager.default.removeItem(atPath: path)
            let message: String
            switch broken {
            case .journalGarbage:
                var bytes = [UInt8](repeating: 0, count: 700)
                for i in bytes.indices { bytes[i] = UInt8.random(in: 0...255) }
                try Data(bytes).write(to: URL(fileURLWithPath: path))
                message = "corrupt"
            case .journalEmpty:
                try Data().write(to: URL(fileURLWithPath: path))
                message = "corrupt"
            case .journalNewerVersion:
                var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
                lines[0] = lines[0].replacingOccurrences(of: #"\d+$"#, with: "99", options: .regularExpression)
                try lines.joined(separator: "\n").write(toFile: path, atomically: false, encoding: .utf8)
                message = "newer le-redirect"
            default:
                try text.write(toFile: dir + "/elsewhere", atomically: false, encoding: .utf8)
                try FileManager.default.createSymbolicLink(atPath: path, withDestinationPath: dir + "/elsewhere")
                message = "symbolic link"
            }
            commands = [(["recover"], 1, message), (["begin", "--external-proxy"], 1, message), (["end"], 1, message)]
        }
        for (order, command) in commands.enumerated() {
            let output: Output
            if let mount {
                output = try run(
                    ["unshare", "-m", "--propagation", "private", "sh", "-c",
                     "\(mount) && exec ip netns exec \(net.host) \(Paths.binary) \(command.arguments.joined(separator: " "))"],
                    environment: ["LE_REDIRECT_STATE_DIR": dir])
            } else {
                output = try net.leRedirect(command.arguments)
            }
            #expect(output.status == command.status, "\(command.arguments): \(output)")
            #expect(output.stderr.contains(command.message), "\(command.arguments): \(output)")
            let unchanged = try net.ruleset() == leftovers
            #expect(unchanged, "\(command.arguments) changed the ruleset")
            TestReport.add(
                "errors", order: 100 + (Broken.allCases.firstIndex(of: broken) ?? 0) * 10 + order,
                "| \(broken.rawValue): `\(command.arguments.joined(separator: " "))` | \(output.status) | "
                    + "\(TestReport.cell(output.stderr)) | \(unchanged ? "yes" : "NO") |")
        }
        #expect(try net.daemons().isEmpty)
        if leftovers != before {
            // What the broken journal stood for is still recoverable by the sweep.
            try? FileManager.default.removeItem(atPath: dir + "/journal")
            #expect(try net.leRedirect("recover", "--sweep").status == 0)
            #expect(try net.ruleset() == before)
        }
        if broken == .stateDirectoryIsAFile { try? FileManager.default.removeItem(atPath: dir) }
    }
}
