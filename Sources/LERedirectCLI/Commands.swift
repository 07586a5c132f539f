import ArgumentParser
import Glibc
import LERedirect

/// Options shared by the commands that read the session's state.
struct StateOptions: ParsableArguments {
    @Option(name: .customLong("state-dir"), help: ArgumentHelp("State directory (default: LE_REDIRECT_STATE_DIR or /run/le-redirect).", valueName: "dir"))
    var stateDirectory: String?
}

/// `--drain-timeout`, for begin and end: how long proxied connections get when the session ends.
/// Accepted now, used by the built-in proxy.
struct DrainOptions: ParsableArguments {
    @Option(
        name: .customLong("drain-timeout"),
        help: ArgumentHelp("How long end waits for proxied connections (built-in proxy).", valueName: "duration"),
        transform: parseDuration)
    var drainTimeout: Duration = .seconds(30)
}

func parseDuration(_ text: String) throws -> Duration {
    guard let duration = DurationText.parse(text) else {
        throw ValidationError("'\(text)' is not a duration (e.g. 900, 30s, 15m, 1h30m)")
    }
    return duration
}

struct Begin: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Redirect new connections to this host's port 80 to the proxy port, until `end`.",
        discussion: """
            Returns once the redirect is live, held by a session daemon in the background. The redirect \
            expires by itself after --ttl even if nothing is left to remove it.
            """)

    @Option(help: "The port to take over.")
    var port: Int = 80

    @Option(name: .customLong("proxy-port"), help: "The local port that receives the redirected connections.")
    var proxyPort: Int = 12347

    @Option(help: ArgumentHelp("Longest life of the redirect (e.g. 15m, 900s, 1h).", valueName: "duration"), transform: parseDuration)
    var ttl: Duration = .seconds(900)

    @Option(help: "auto, nftables or iptables-legacy.")
    var backend: String = "auto"

    @Flag(name: .customLong("external-proxy"), help: "You run the proxy on --proxy-port yourself (IPv4 and IPv6).")
    var externalProxy = false

    @OptionGroup var drain: DrainOptions

    @OptionGroup var state: StateOptions

    func options() throws -> TakeoverOptions {
        guard let backend = BackendChoice(rawValue: backend) else {
            throw LERedirectError(
                .invalidArgument,
                "--backend '\(backend)' is not a backend: use auto, nftables or iptables-legacy")
        }
        guard externalProxy else {
            throw LERedirectError(
                .invalidArgument,
                "the built-in validation proxy is not part of this version yet: run your own proxy on port "
                    + "\(proxyPort) (IPv4 and IPv6) and pass --external-proxy")
        }
        return TakeoverOptions(
            port: port, proxyPort: proxyPort, ttl: ttl, backend: backend, proxy: .external,
            stateDirectory: state.stateDirectory)
    }

    func run() throws {
        let status = try Session.beginDetached(try options(), logger: logger)
        let expires = status.expiresAt.map { RFC3339.format(unixMilliseconds: $0) } ?? "?"
        print(
            "le-redirect: redirecting new connections to port \(status.port ?? port) to port \(status.proxyPort ?? proxyPort) "
                + "until \(expires) (session pid \(status.pid.map(String.init) ?? "?")); `le-redirect end` removes it")
    }
}

struct End: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove the redirect and everything begin added; exits 0 when nothing is active.")

    @OptionGroup var drain: DrainOptions

    @OptionGroup var state: StateOptions

    func run() throws {
        let report = try Session.end(stateDirectory: state.stateDirectory, logger: logger)
        for warning in report.warnings { printWarning(warning) }
        if report.wasActive {
            print("le-redirect: session ended; the ruleset is as it was before begin")
        } else if let recovery = report.recovery, recovery.changedAnything {
            print("le-redirect: no active session; removed \(recovery.removedRules) rule(s) a dead session left")
        } else {
            print("le-redirect: no active session")
        }
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the session, if any.")

    @Flag(help: "Print JSON.")
    var json = false

    @OptionGroup var state: StateOptions

    func run() throws {
        let status = try Session.status(stateDirectory: state.stateDirectory)
        if json {
            print(status.json.rendered(pretty: true))
            return
        }
        print("state: \(status.state.rawValue)")
        if let pid = status.pid { print("pid: \(pid) (\(status.holder ?? "?"))") }
        if let backend = status.backend { print("backend: \(backend)") }
        if let port = status.port, let proxyPort = status.proxyPort { print("redirect: :\(port) -> :\(proxyPort)") }
        if let expires = status.expiresAt { print("expires: \(RFC3339.format(unixMilliseconds: expires))") }
        if let accepts = status.acceptRules { print("scoped accepts: \(accepts)") }
        if let packets = status.redirectedPackets { print("redirected connections: \(packets)") }
        if let responding = status.responding { print("responding: \(responding ? "yes" : "no")") }
        if let note = status.note { print("note: \(note)") }
    }
}

struct Recover: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove what a dead session left behind, by its journal.",
        discussion: "With --sweep and no usable journal: remove every \"LE\"-tagged rule of the input chains and table inet le_redirect.")

    @Flag(help: "Without a usable journal, remove every \"LE\"-tagged rule.")
    var sweep = false

    @OptionGroup var state: StateOptions

    func run() throws {
        let report = try Session.recover(sweep: sweep, stateDirectory: state.stateDirectory, logger: logger)
        for warning in report.warnings { printWarning(warning) }
        if report.changedAnything {
            print(
                "le-redirect: removed \(report.removedRules) rule(s)"
                    + (report.removedTable ? " and table inet le_redirect" : ""))
        } else {
            print("le-redirect: nothing to recover")
        }
    }
}
