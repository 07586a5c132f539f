import Foundation
import Glibc
import Testing

/// Whether the kernel tests can run here: root, and network namespaces. With
/// LE_REDIRECT_REQUIRE_KERNEL_TESTS=1 (scripts/test sets it) they run regardless, and fail loudly
/// instead of being skipped.
enum Kernel {
    static let required = ProcessInfo.processInfo.environment["LE_REDIRECT_REQUIRE_KERNEL_TESTS"] == "1"
    static let available: Bool = getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip")
        && FileManager.default.isExecutableFile(atPath: "/usr/sbin/nft")
    static var enabled: Bool { available || required }
}

struct Output: CustomStringConvertible {
    var status: Int32
    var stdout: String
    var stderr: String
    var timedOut = false

    var description: String { "exit \(status)\(timedOut ? " (timed out)" : "")\nstdout: \(stdout)\nstderr: \(stderr)" }
}

enum Paths {
    /// The le-redirect binary `swift build` put next to the test bundle.
    static let binary: String = {
        if let explicit = ProcessInfo.processInfo.environment["LE_REDIRECT_BIN"] { return explicit }
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        return URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("le-redirect").path
    }()

    static let support = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    static let peer = support.appendingPathComponent("peer.py").path
    static let app = support.appendingPathComponent("app.py").path
    static let client = support.appendingPathComponent("client.py").path
    static let rulesets = support.deletingLastPathComponent().appendingPathComponent("Rulesets")
    static let repository = support.deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func ruleset(_ name: String) -> String { rulesets.appendingPathComponent("\(name).nft").path }
    /// An iptables-restore file of Rulesets/, for `v4` or `v6`.
    static func xtablesRules(_ name: String, _ family: String) -> String {
        rulesets.appendingPathComponent("\(name).\(family).rules").path
    }
}

/// Runs a program to completion (killing it after `timeout` seconds) and returns its output.
/// posix_spawn directly: safe to call from many tests at once.
@discardableResult
func run(_ arguments: [String], environment: [String: String] = [:], timeout: Double = 30) throws -> Output {
    let base = "/tmp/le-redirect-tests/run-\(getpid())-\(UUID().uuidString)"
    try FileManager.default.createDirectory(atPath: "/tmp/le-redirect-tests", withIntermediateDirectories: true)
    let outPath = base + ".out", errPath = base + ".err"
    let outFD = open(outPath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
    let errFD = open(errPath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
    defer {
        close(outFD)
        close(errFD)
        unlink(outPath)
        unlink(errPath)
    }
    guard outFD >= 0, errFD >= 0 else { throw TestFailure("creating \(base): \(String(cString: strerror(errno)))") }
    let pid = try spawn(arguments, environment: environment, stdout: outFD, stderr: errFD)
    let deadline = Date().addingTimeInterval(timeout)
    var status: Int32 = 0
    var timedOut = false
    while true {
        let done = waitpid(pid, &status, WNOHANG)
        if done == pid { break }
        if done < 0 && errno != EINTR { throw TestFailure("waitpid: \(String(cString: strerror(errno)))") }
        if Date() > deadline && !timedOut {
            timedOut = true
            kill(pid, SIGKILL)
        }
        usleep(1_000)
    }
    let exit: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    return Output(
        status: exit, stdout: (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "",
        stderr: (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "", timedOut: timedOut)
}

/// Starts `arguments` (searched on PATH) with stdin from /dev/null; returns its pid.
func spawn(_ arguments: [String], environment: [String: String] = [:], stdout: Int32, stderr: Int32) throws -> pid_t {
    var env = ProcessInfo.processInfo.environment
    env.merge(environment) { $1 }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_adddup2(&actions, stdout, 1)
    posix_spawn_file_actions_adddup2(&actions, stderr, 2)
    let argv = arguments.map { strdup($0) } + [nil]
    let envp = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer {
        argv.forEach { free($0) }
        envp.forEach { free($0) }
    }
    var pid: pid_t = 0
    let rc = posix_spawnp(&pid, arguments[0], &actions, nil, argv, envp)
    guard rc == 0 else { throw TestFailure("spawning \(arguments[0]): \(String(cString: strerror(rc)))") }
    return pid
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// A test's own network: a "host" namespace where le-redirect, the app (:80) and a stand-in proxy
/// (:12347) run, a "client" namespace joined to it by a veth pair (10.99.0.0/24, fd99::/64), and
/// optionally a "server" namespace behind the host as a router (10.98.0.0/24), for forwarded traffic.
/// Everything it made is removed by `close()`.
final class TestNetwork: @unchecked Sendable {
    private static let counter = Counter()
    let id: String
    let host: String
    let client: String
    let server: String?
    let stateDirectory: String
    private var started: [pid_t] = []

    static let hostAddress4 = "10.99.0.1", hostAddress6 = "fd99::1"
    static let clientAddress4 = "10.99.0.2", clientAddress6 = "fd99::2"
    static let serverAddress4 = "10.98.0.2"

    /// `ruleset` is loaded with nft, `legacy` with iptables-legacy-restore and `iptablesNft` with
    /// iptables-nft-restore (each an IPv4 and an IPv6 file of Rulesets/).
    init(ruleset: String = "empty", legacy: String? = nil, iptablesNft: String? = nil, router: Bool = false) throws {
        id = "lrt\(getpid() % 100_000)n\(Self.counter.next())"
        host = id + "h"
        client = id + "c"
        server = router ? id + "s" : nil
        stateDirectory = "/tmp/le-redirect-tests/\(id)"
        try? FileManager.default.removeItem(atPath: stateDirectory)
        try FileManager.default.createDirectory(atPath: "/tmp/le-redirect-tests", withIntermediateDirectories: true)

        for ns in [host, client] + (server.map { [$0] } ?? []) {
            try check(run(["ip", "netns", "add", ns]), "creating namespace \(ns)")
        }
        // Refuse to touch netfilter unless the namespace really is a new one: not this test
        // process's (the machine's) namespace, nor PID 1's where that can be read.
        let references = try Self.referenceNamespaces()
        for ns in [host, client] + (server.map { [$0] } ?? []) {
            let inside = try run(["ip", "netns", "exec", ns, "readlink", "/proc/self/ns/net"]).stdout
                .trimmingCharacters(in: .whitespacesAndNewlines)
            guard inside.hasPrefix("net:["), !references.contains(inside) else {
                close()
                throw TestFailure("namespace \(ns) is the initial network namespace; refusing to go on")
            }
        }
        let setup: [[String]] = [
            ["ip", "link", "add", "veth-h", "netns", host, "type", "veth", "peer", "name", "veth-c", "netns", client],
            ["ip", "-n", host, "addr", "add", "\(Self.hostAddress4)/24", "dev", "veth-h"],
            ["ip", "-n", host, "addr", "add", "\(Self.hostAddress6)/64", "dev", "veth-h", "nodad"],
            ["ip", "-n", client, "addr", "add", "\(Self.clientAddress4)/24", "dev", "veth-c"],
            ["ip", "-n", client, "addr", "add", "\(Self.clientAddress6)/64", "dev", "veth-c", "nodad"],
            ["ip", "-n", host, "link", "set", "lo", "up"], ["ip", "-n", host, "link", "set", "veth-h", "up"],
            ["ip", "-n", client, "link", "set", "lo", "up"], ["ip", "-n", client, "link", "set", "veth-c", "up"],
        ]
        for command in setup { try check(run(command), command.joined(separator: " ")) }
        if let server {
            let routed: [[String]] = [
                ["ip", "link", "add", "veth-r", "netns", host, "type", "veth", "peer", "name", "veth-s", "netns", server],
                ["ip", "-n", host, "addr", "add", "10.98.0.1/24", "dev", "veth-r"],
                ["ip", "-n", server, "addr", "add", "\(Self.serverAddress4)/24", "dev", "veth-s"],
                ["ip", "-n", host, "link", "set", "veth-r", "up"], ["ip", "-n", server, "link", "set", "veth-s", "up"],
                ["ip", "-n", server, "link", "set", "lo", "up"],
                ["ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                ["ip", "-n", client, "route", "add", "10.98.0.0/24", "via", Self.hostAddress4],
                ["ip", "-n", server, "route", "add", "default", "via", "10.98.0.1"],
            ]
            for command in routed { try check(run(command), command.joined(separator: " ")) }
        }
        if ruleset != "empty" {
            try check(run(["ip", "netns", "exec", host, "nft", "-f", Paths.ruleset(ruleset)]), "loading \(ruleset)")
        }
        for (name, tools) in [(legacy, ["iptables-legacy-restore", "ip6tables-legacy-restore"]), (iptablesNft, ["iptables-nft-restore", "ip6tables-nft-restore"])] {
            guard let name else { continue }
            for (tool, family) in zip(tools, ["v4", "v6"]) {
                try check(run(["ip", "netns", "exec", host, tool, Paths.xtablesRules(name, family)]), "loading \(name) with \(tool)")
            }
        }
    }

    convenience init(_ host: Host, router: Bool = false) throws {
        try self.init(ruleset: host.nft, legacy: host.legacy, iptablesNft: host.iptablesNft, router: router)
    }

    deinit { close() }

    /// The namespaces a test must never change: its own, and PID 1's when readable (it is not in
    /// every sandbox). Throws when none can be read, rather than compare against nothing.
    static func referenceNamespaces() throws -> Set<String> {
        var references: Set<String> = []
        for path in ["/proc/self/ns/net", "/proc/1/ns/net"] {
            if let link = try? FileManager.default.destinationOfSymbolicLink(atPath: path), link.hasPrefix("net:[") {
                references.insert(link)
            }
        }
        guard !references.isEmpty else { throw TestFailure("cannot read this process's network namespace") }
        return references
    }

    /// Kills everything started in the namespaces and deletes them.
    func close() {
        for pid in started {
            kill(pid, SIGKILL)
            waitpid(pid, nil, 0)
        }
        started = []
        for ns in [host, client] + (server.map { [$0] } ?? []) {
            if let pids = try? run(["ip", "netns", "pids", ns]).stdout {
                for pid in pids.split(separator: "\n").compactMap({ Int32($0) }) { kill(pid, SIGKILL) }
            }
            _ = try? run(["ip", "netns", "del", ns])
        }
        try? FileManager.default.removeItem(atPath: stateDirectory)
        try? FileManager.default.removeItem(atPath: stateDirectory + "-nginx")
    }

    private func check(_ output: Output, _ what: String) throws {
        guard output.status == 0 else { throw TestFailure("\(what) failed: \(output)") }
    }

    // MARK: Running things

    /// Runs `arguments` inside namespace `ns`, with this network's state directory.
    @discardableResult
    func exec(_ ns: String, _ arguments: [String], environment: [String: String] = [:], timeout: Double = 30) throws -> Output {
        try run(
            ["ip", "netns", "exec", ns] + arguments,
            environment: environment.merging(["LE_REDIRECT_STATE_DIR": stateDirectory]) { a, _ in a }, timeout: timeout)
    }

    /// Runs le-redirect in the host namespace.
    @discardableResult
    func leRedirect(_ arguments: String..., timeout: Double = 60) throws -> Output {
        try leRedirect(arguments, timeout: timeout)
    }

    @discardableResult
    func leRedirect(_ arguments: [String], environment: [String: String] = [:], timeout: Double = 60) throws -> Output {
        try exec(host, [Paths.binary] + arguments, environment: environment, timeout: timeout)
    }

    /// Starts a long-running program in `ns`; `close()` kills it.
    @discardableResult
    func start(_ ns: String, _ arguments: [String]) throws -> pid_t {
        let devnull = open("/dev/null", O_WRONLY | O_CLOEXEC)
        defer { Glibc.close(devnull) }
        let pid = try spawn(["ip", "netns", "exec", ns] + arguments, stdout: devnull, stderr: devnull)
        started.append(pid)
        return pid
    }

    /// Starts tagged listeners: the app on :80 and a stand-in proxy on :12347 in the host, and a
    /// backend on :80 in the server namespace when there is one. Waits until they answer.
    func startListeners() throws {
        try start(host, ["python3", Paths.peer, "serve", "80", "app"])
        try start(host, Self.standInProxy)
        var waits = [(host, "80"), (host, "12347")]
        if let server {
            try start(server, ["python3", Paths.peer, "serve", "80", "backend"])
            waits.append((server, "80"))
        }
        // Wait by looking at listening sockets: a probe connection could be dropped by the
        // host's own firewall (several-chains drops :12347 even on loopback).
        let deadline = Date().addingTimeInterval(10)
        for (ns, port) in waits {
            while !(try exec(ns, ["ss", "-Hltn", "sport = :\(port)"]).stdout.contains("LISTEN")) {
                guard Date() < deadline else { throw TestFailure("listener on \(ns):\(port) did not come up") }
                usleep(20_000)
            }
        }
    }

    /// A stand-in for the proxy on :12347 that answers every connection with "proxy".
    static let standInProxy = ["python3", Paths.peer, "serve", "12347", "proxy"]

    /// Starts the stand-in proxy in the host and waits until it listens.
    func startStandInProxy() throws {
        try start(host, Self.standInProxy)
        try waitForListener(host, 12347)
    }

    /// Starts the HTTP test app (Support/app.py) in the host and waits until it listens.
    func startApp(port: Int = 80, tag: String = "app", address: String? = nil, in ns: String? = nil) throws {
        try start(ns ?? host, ["python3", Paths.app, "\(port)", tag] + (address.map { ["--host", $0] } ?? []))
        try waitForListener(ns ?? host, port)
    }

    /// nginx on :80 (IPv4 and IPv6) in front of the app on 127.0.0.1:8081, as a real site would be;
    /// with `proxyProtocol`, as behind a load balancer: every connection must start with a PROXY
    /// header, whose client address the app gets as X-Real-IP.
    func startNginx(proxyProtocol: Bool = false) throws {
        try startApp(port: 8081, address: "127.0.0.1")
        let dir = stateDirectory + "-nginx"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let config = """
            worker_processes 1; worker_rlimit_nofile 16384; daemon off; pid \(dir)/nginx.pid; error_log \(dir)/error.log;
            events { worker_connections 12000; }
            http {
              access_log off; client_body_temp_path \(dir)/body; proxy_temp_path \(dir)/proxy;
              map $http_upgrade $connection_upgrade { default upgrade; '' ''; }
              upstream app { server 127.0.0.1:8081; keepalive 16; }
              server { listen 80\(proxyProtocol ? " proxy_protocol" : ""); listen [::]:80\(proxyProtocol ? " proxy_protocol" : ""); keepalive_requests 1000000; client_max_body_size 64m;
                location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Host $host;
                  proxy_set_header X-Real-IP \(proxyProtocol ? "$proxy_protocol_addr" : "$remote_addr"); proxy_set_header Upgrade $http_upgrade;
                  proxy_set_header Connection $connection_upgrade; proxy_buffering off; }
                location = /static { return 200 "static\\n"; }
              }
            }
            """
        try config.write(toFile: dir + "/nginx.conf", atomically: true, encoding: .utf8)
        try start(host, ["nginx", "-c", dir + "/nginx.conf", "-e", dir + "/error.log"])
        try waitForListener(host, 80)
    }

    func waitForListener(_ ns: String, _ port: Int) throws {
        let deadline = Date().addingTimeInterval(10)
        while !(try exec(ns, ["ss", "-Hltn", "sport = :\(port)"]).stdout.contains("LISTEN")) {
            guard Date() < deadline else { throw TestFailure("listener on \(ns):\(port) did not come up") }
            usleep(20_000)
        }
    }

    /// Runs a case of Support/client.py from the client namespace; its last line.
    func httpClient(_ arguments: String..., from ns: String? = nil) throws -> String {
        try httpClient(arguments, from: ns)
    }

    func httpClient(_ arguments: [String], from ns: String? = nil) throws -> String {
        let output = try exec(ns ?? client, ["python3", Paths.client] + arguments, timeout: 30)
        let last = output.stdout.split(separator: "\n").last.map(String.init) ?? ""
        return output.status == 0 ? last : "failed: \(output.stderr.split(separator: "\n").last ?? "")"
    }

    /// Connects from `ns` to `address`:`port` and returns the tag of whoever answered ("app",
    /// "proxy", "backend"), or "failed: ..." when the connection was refused, reset or timed out.
    func reach(
        _ address: String, port: Int = 80, from ns: String? = nil, sourcePort: Int? = nil, sourceAddress: String? = nil,
        timeout: Double? = nil
    ) throws -> String {
        var extra: [String] = []
        if sourcePort != nil || sourceAddress != nil || timeout != nil {
            extra = ["\(sourcePort ?? 0)", sourceAddress ?? "-", "\(timeout ?? 3)"]
        }
        let output = try exec(ns ?? client, ["python3", Paths.peer, "get", address, "\(port)"] + extra, timeout: 10)
        let line = output.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        guard output.status == 0 else { return "failed: \(line)" }
        return String(line.split(separator: " ").first ?? "")
    }

    /// The address the listener reported for the client (to check the app never sees loopback).
    func peerAddress(_ address: String, port: Int = 80) throws -> String {
        let output = try exec(client, ["python3", Paths.peer, "get", address, "\(port)"], timeout: 10)
        return String(output.stdout.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: " ").last ?? "")
    }

    /// `nft list ruleset`, `iptables-legacy-save` and `ip6tables-legacy-save` of the host, with
    /// counters, timer values and save dates normalised: what invariant 1 compares.
    func ruleset() throws -> String {
        try nftRuleset() + "\n" + (try legacyRuleset())
    }

    /// `nft list ruleset`, normalised.
    func nftRuleset() throws -> String {
        let output = try exec(host, ["nft", "list", "ruleset"])
        guard output.status == 0 else { throw TestFailure("nft list ruleset: \(output)") }
        return Normalise.listing(output.stdout)
    }

    /// `iptables-legacy-save` and `ip6tables-legacy-save`, normalised (empty when the namespace has
    /// no x_tables tables; saving never makes one).
    func legacyRuleset(counters: Bool = false) throws -> String {
        var text = ""
        for tool in ["iptables-legacy-save", "ip6tables-legacy-save"] {
            let output = try exec(host, [tool] + (counters ? ["-c"] : []))
            guard output.status == 0 else { throw TestFailure("\(tool): \(output)") }
            text += "# \(tool)\n" + Normalise.xtables(output.stdout, counters: counters)
        }
        return text
    }

    /// Session daemons running in the host namespace (not those of other tests).
    func daemons() throws -> [Int32] {
        try processes(matching: "__session")
    }

    /// Processes in the host namespace whose command line contains `text`.
    func processes(matching text: String) throws -> [Int32] {
        let pids = try run(["ip", "netns", "pids", host]).stdout.split(separator: "\n").compactMap { Int32($0) }
        return pids.filter { pid in
            let cmdline = (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)) ?? ""
            return cmdline.contains(text) && !processGone(pid)
        }
    }

    /// Begins a session and SIGKILLs its daemon, as a crash would; returns once it is gone.
    @discardableResult
    func crashSession(_ extra: [String] = []) throws -> Int32 {
        let begin = try leRedirect(["begin", "--external-proxy"] + extra)
        guard begin.status == 0, let pid = try daemonPID() else { throw TestFailure("begin: \(begin)") }
        kill(pid, SIGKILL)
        guard waitUntilGone(pid) else { throw TestFailure("daemon \(pid) survived SIGKILL") }
        return pid
    }

    /// Starts the library example (Examples/EmbeddedRenewer) holding a session until ended from
    /// outside; returns its pid once the session is active.
    func startEmbeddedSession(example: String, mode: String = "wait", environment: [String] = []) throws -> Int32 {
        try start(host, ["env", "LE_REDIRECT_STATE_DIR=\(stateDirectory)"] + environment + [example, mode])
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if (try? status()["active"] as? Bool) == true, let pid = try daemonPID() { return pid }
            usleep(20_000)
        }
        throw TestFailure("the embedded session did not become active")
    }

    /// The pid of the session daemon, from `status --json`.
    func daemonPID() throws -> Int32? {
        let output = try leRedirect("status", "--json")
        guard let data = output.stdout.data(using: .utf8),
            let object = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        else { return nil }
        return (object["pid"] as? NSNumber)?.int32Value
    }

    func status() throws -> [String: Any] {
        let output = try leRedirect("status", "--json")
        guard output.status == 0, let data = output.stdout.data(using: .utf8),
            let object = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        else { throw TestFailure("status --json: \(output)") }
        return object
    }
}

enum Normalise {
    /// Strips what changes by itself: counters, set element expiry, handles.
    static func listing(_ text: String) -> String {
        var out = text
        for (pattern, replacement) in [
            (#"counter packets \d+ bytes \d+"#, "counter"),
            (#" expires [0-9hmsd]+"#, ""),
            (#" # handle \d+"#, ""),
            (#" # progname \S+"#, ""),
            (#" progname \S+"#, ""),
        ] {
            out = out.replacingOccurrences(of: pattern, with: replacement, options: .regularExpression)
        }
        return out
    }
}

extension Normalise {
    /// iptables-save text without its dated comment lines, and without counters unless asked for.
    static func xtables(_ text: String, counters: Bool) -> String {
        var out = text.split(separator: "\n").filter { !$0.hasPrefix("#") }.joined(separator: "\n") + "\n"
        if !counters { out = out.replacingOccurrences(of: #"\[\d+:\d+\]"#, with: "[]", options: .regularExpression) }
        return out
    }
}

final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var value = 0
    func next() -> Int {
        lock.lock()
        defer { lock.unlock() }
        value += 1
        return value
    }
}

/// Whether `pid` has exited: gone, or a zombie nobody reaped yet (kill(pid, 0) still succeeds then).
func processGone(_ pid: Int32) -> Bool {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
        let close = stat.lastIndex(of: ")")
    else { return true }
    return stat[stat.index(after: close)...].split(separator: " ").first == "Z"
}

/// Waits up to `seconds` for `pid` to exit; returns whether it did.
@discardableResult
func waitUntilGone(_ pid: Int32, seconds: Double = 5) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while !processGone(pid) && Date() < deadline { usleep(5_000) }
    return processGone(pid)
}
