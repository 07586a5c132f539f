import ArgumentParser
import Glibc
import LERedirect

/// Options shared by the commands that read the session's state.
struct StateOptions: ParsableArguments {
    @Option(name: .customLong("state-dir"), help: ArgumentHelp("State directory (default: LE_REDIRECT_STATE_DIR, else /run/le-redirect, or /run/le-redirect/netns/INODE in a network namespace other than the host's).", valueName: "dir"))
    var stateDirectory: String?
}

/// `--drain-timeout` of end: overrides the one begin set.
struct DrainOptions: ParsableArguments {
    @Option(
        name: .customLong("drain-timeout"),
        help: ArgumentHelp(
            "How long upgraded and opaque streams may go on once end has begun (default: begin's, 30s).",
            valueName: "duration"),
        transform: parseDuration)
    var drainTimeout: Duration?
}

/// What begin (and the certbot auth hook) take: where the steering goes and how the proxy behaves.
struct BeginOptions: ParsableArguments {
    @Option(help: "The port to take over.")
    var port: Int = 80

    @Option(name: .customLong("proxy-port"), help: "The local port whose transparent listener receives the steered connections.")
    var proxyPort: Int = 12347

    @Option(help: ArgumentHelp("Longest life of the steering (e.g. 15m, 900s, 1h).", valueName: "duration"), transform: parseDuration)
    var ttl: Duration = .seconds(900)

    @Option(
        help: "Where the steering lives: auto (what `le-redirect detect` picks: nftables wherever the kernel has owned tables), nftables (a table of its own) or iptables-legacy (a rule per family at the end of mangle PREROUTING, and at the head of nat PREROUTING where there is one). Nothing goes into the host's filter chains either way.")
    var backend: String = "auto"

    @Option(
        name: .customLong("challenge-port"),
        help: "Challenges go to an ACME client's server on 127.0.0.1:PORT (certbot --standalone --http-01-port, lego --http.port); the default, with 12348.")
    var challengePort: Int?

    @Option(name: .customLong("challenge-url"), help: ArgumentHelp("Challenges go to http://HOST:PORT (the node running the ACME client).", valueName: "url"))
    var challengeURL: String?

    @Option(help: ArgumentHelp("Challenges are answered from files named by token in DIR (or DIR/.well-known/acme-challenge).", valueName: "dir"))
    var webroot: String?

    @Flag(
        name: .customLong("in-memory"),
        help: "Only tokens given by `le-redirect challenge add` (or the certbot manual hooks) are answered; the steering is armed only while one is registered.")
    var inMemory = false

    @Option(
        help: ArgumentHelp(
            "Every challenge with a well-formed token is answered TOKEN.THUMBPRINT (acme.sh --stateless): THUMBPRINT is the ACME account key's thumbprint, so any client, and every node behind a load balancer, needs begin and end alone.",
            valueName: "thumbprint"))
    var stateless: String?

    @Option(
        name: .customLong("unknown-challenges"),
        help: ArgumentHelp(
            "What a challenge for a token the session does not hold gets (also one that finds nothing listening on --challenge-port): app (the default: relayed to the app, as without le-redirect, so a certificate renewed another way in the same window still validates) or 404.",
            valueName: "app|404"))
    var unknownChallenges: String = "app"

    @Flag(name: .customLong("external-proxy"), help: "You run the proxy on --proxy-port yourself, listening transparently (IPv4 and IPv6).")
    var externalProxy = false

    @Flag(
        name: .customLong("through-input"),
        help: "On a host that publishes container ports (Docker) and filters by default (an input or forward chain with policy drop), accept that during the window steered connections to the port are decided by INPUT, not FORWARD/DOCKER-USER; begin refuses there without it.")
    var throughInput = false

    @Option(
        name: .customLong("address"),
        help: ArgumentHelp(
            "Take over port --port on this local address only (IPv4 or IPv6; repeatable). Connections to the host's other addresses reach the app directly, and a family no --address names is not taken over. Default: every local address.",
            valueName: "address"))
    var addresses: [String] = []

    @Flag(
        name: .customLong("include-local"),
        help: "Also steer this host's own new connections to the port (every user's but the proxy's), for ACME clients that fetch their challenge over HTTP before asking the CA (acme-tiny, acmetool). nftables only.")
    var includeLocal = false

    @Flag(
        name: .customLong("until-parent-exits"),
        help: "End the session when the program that ran this one exits (the ACME client running the hook: the first ancestor past the hook script and any shells), so that a killed client does not leave the redirect up until the TTL.")
    var untilParentExits = false

    /// What the session follows, if anything.
    var following: Session.Follow? { untilParentExits ? .parent : nil }

    @Flag(help: "Set X-Forwarded-For, X-Forwarded-Proto and Forwarded on relayed requests (replacing the client's).")
    var forwarded = false

    @Option(name: .customLong("proxy-protocol"), help: ArgumentHelp("Speak PROXY protocol to the app: v2.", valueName: "version"))
    var proxyProtocol: String?

    @Option(name: .customLong("max-connections"), help: "Connections the proxy serves at once.")
    var maxConnections: Int = 10_000

    @Option(name: .customLong("max-connections-per-source"), help: "Connections one client address may hold at once; more are closed.")
    var maxConnectionsPerSource: Int = 1_000

    @Option(
        name: .customLong("challenge-owner"),
        help: ArgumentHelp(
            "A user (name or uid) besides root whose listener may answer: the challenge port's server, or the external proxy. Repeatable.",
            valueName: "user"))
    var challengeOwners: [String] = []

    @Option(name: .customLong("max-head-size"), help: "Largest request head, in bytes.")
    var maxHeadSize: Int = 16 * 1024

    @Option(name: .customLong("head-timeout"), help: ArgumentHelp("Time a client has to send a request head.", valueName: "duration"), transform: parseDuration)
    var headTimeout: Duration = .seconds(10)

    @Option(name: .customLong("idle-timeout"), help: ArgumentHelp("Time a keep-alive connection may sit idle.", valueName: "duration"), transform: parseDuration)
    var idleTimeout: Duration = .seconds(60)

    @Option(
        name: .customLong("drain-timeout"),
        help: ArgumentHelp("How long upgraded and opaque streams may go on once end has begun.", valueName: "duration"),
        transform: parseDuration)
    var drainTimeout: Duration = .seconds(30)

    @OptionGroup var state: StateOptions

    func options(forceInMemory: Bool = false) throws -> TakeoverOptions {
        guard let backend = BackendChoice(rawValue: backend) else {
            throw LERedirectError(
                .invalidArgument,
                "--backend '\(backend)' is not a backend: use auto, nftables or iptables-legacy")
        }
        let sources = [challengePort != nil, challengeURL != nil, webroot != nil, inMemory || forceInMemory, stateless != nil]
            .filter { $0 }.count
        guard sources <= 1 else {
            throw LERedirectError(
                .invalidArgument,
                "--challenge-port, --challenge-url, --webroot, --in-memory and --stateless exclude each other: choose one"
                    + (forceInMemory ? " (this command keeps its tokens in memory)" : ""))
        }
        guard let unknown = UnknownChallenges(rawValue: unknownChallenges) else {
            throw LERedirectError(.invalidArgument, "--unknown-challenges \(unknownChallenges): use app or 404")
        }
        if externalProxy {
            guard sources == 0, !forwarded, proxyProtocol == nil, unknownChallenges == "app" else {
                throw LERedirectError(
                    .invalidArgument,
                    "--external-proxy: your proxy answers the challenges; the built-in proxy's options do not apply")
            }
            return TakeoverOptions(
                port: port, proxyPort: proxyPort, ttl: ttl, backend: backend, proxy: .external,
                stateDirectory: state.stateDirectory, listenerOwners: try listenerOwners(), throughInput: throughInput,
                addresses: addresses, includeLocal: includeLocal)
        }
        var challenge = ChallengeSource.port(ChallengeSource.defaultPort)
        if let challengePort {
            guard (1...65535).contains(challengePort) else {
                throw LERedirectError(.invalidArgument, "--challenge-port \(challengePort) is not a TCP port (1-65535)")
            }
            challenge = .port(UInt16(challengePort))
        } else if let challengeURL {
            challenge = try ChallengeSource.parseURL(challengeURL)
        } else if let webroot {
            challenge = .webroot(webroot)
        } else if inMemory || forceInMemory {
            challenge = .memory
        } else if let stateless {
            challenge = .stateless(thumbprint: stateless)
        }
        if let proxyProtocol, proxyProtocol != "v2" {
            throw LERedirectError(.invalidArgument, "--proxy-protocol \(proxyProtocol): only v2 is spoken")
        }
        let proxy = ProxyOptions(
            challenge: challenge, forwarded: forwarded, proxyProtocol: proxyProtocol != nil, maxConnections: maxConnections,
            maxConnectionsPerSource: maxConnectionsPerSource, maxHeadBytes: maxHeadSize, headTimeout: headTimeout, idleTimeout: idleTimeout, drainTimeout: drainTimeout,
            unknownChallenges: unknown)
        return TakeoverOptions(
            port: port, proxyPort: proxyPort, ttl: ttl, backend: backend, proxy: .builtIn(proxy),
            stateDirectory: state.stateDirectory, listenerOwners: try listenerOwners(), throughInput: throughInput,
                addresses: addresses, includeLocal: includeLocal)
    }

    /// --challenge-owner's users as uids: a name from the user database, or a number.
    func listenerOwners() throws -> [UInt32] {
        try challengeOwners.map { (user: String) throws -> UInt32 in
            if let entry = getpwnam(user) { return entry.pointee.pw_uid }
            if let uid = UInt32(user) { return uid }
            throw LERedirectError(.invalidArgument, "--challenge-owner \(user): no such user")
        }
    }
}

func parseDuration(_ text: String) throws -> Duration {
    guard let duration = DurationText.parse(text) else {
        throw ValidationError("'\(text)' is not a duration (e.g. 900, 30s, 15m, 1h30m)")
    }
    return duration
}

struct Begin: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Redirect new connections to this host's port 80 to the validation proxy, until `end`.",
        discussion: """
            Returns once the steering is live, held by a session daemon in the background that runs the \
            validation proxy: challenge requests go to the challenge source, everything else to the app, \
            bytes unchanged. The steering expires by itself after --ttl even if nothing is left to remove it.
            """)

    @OptionGroup var begin: BeginOptions

    func options() throws -> TakeoverOptions { try begin.options() }

    func run() throws {
        let status = try Session.beginDetached(try options(), following: begin.following, logger: logger)
        printBegun(status)
    }
}

func printBegun(_ status: SessionStatus) {
    print(begunLine(status) + "; `le-redirect end` removes it")
    if let note = status.note { printNote(note) }
}

func begunLine(_ status: SessionStatus) -> String {
    let expires = status.expiresAt.map { RFC3339.format(unixMilliseconds: $0) } ?? "?"
    let target = status.proxy == "built-in" ? "the built-in proxy on port" : "port"
    let armed = status.armed == false ? " (armed only while a challenge token is registered)" : ""
    return "le-redirect: steering new connections to port \(status.port ?? 0) to \(target) \(status.proxyPort ?? 0)\(armed) "
        + "until \(expires) through \(status.backend ?? "?") (session pid \(status.pid.map(String.init) ?? "?"))"
}

struct End: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stop the steering and remove everything begin added; exits 0 when nothing is active.")

    @OptionGroup var drain: DrainOptions

    @OptionGroup var state: StateOptions

    func run() throws {
        let report = try Session.end(stateDirectory: state.stateDirectory, drainTimeout: drain.drainTimeout, logger: logger)
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
        if let port = status.port, let proxyPort = status.proxyPort { print("steering: :\(port) -> :\(proxyPort)") }
        if let expires = status.expiresAt { print("expires: \(RFC3339.format(unixMilliseconds: expires))") }
        if let accepts = status.acceptRules, accepts > 0 { print("scoped accepts (left by an older version): \(accepts)") }
        if let packets = status.redirectedPackets { print("steered connections: \(packets)") }
        if let responding = status.responding { print("responding: \(responding ? "yes" : "no")") }
        if let proxy = status.proxy {
            let process = status.proxyPid.map { ", process \($0)" } ?? ""
            print("proxy: \(proxy)\(status.proxyPhase.map { " (\($0)\(process))" } ?? "")")
        }
        if let source = status.challengeSource { print("challenge source: \(source)") }
        if let armed = status.armed { print("armed: \(armed ? "yes" : "no")") }
        if let pid = status.clientPid { print("follows: pid \(pid) (the session ends when it exits)") }
        for (name, value) in status.counters { print("\(name): \(value)") }
        if let note = status.note { print("note: \(note)") }
    }
}

struct Detect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show which system holds this host's firewall, the evidence, and what begin would do. Changes nothing.",
        discussion: """
            Reads nftables (telling tables written for nft from those iptables-nft manages) and iptables-legacy \
            (x_tables), and prints their tables and chains with hooks, priorities, policies and rule counts, \
            where begin would put the steering and why, and begin's commits in order. Exits 1 when begin \
            would refuse.
            """)

    @Flag(help: "Print JSON.")
    var json = false

    @Option(help: "The port to take over.")
    var port: Int = 80

    @Option(name: .customLong("proxy-port"), help: "The local port whose transparent listener receives the steered connections.")
    var proxyPort: Int = 12347

    @Option(help: "auto, nftables or iptables-legacy.")
    var backend: String = "auto"

    @Flag(name: .customLong("through-input"), help: "As begin's --through-input.")
    var throughInput = false

    @Option(name: .customLong("address"), help: ArgumentHelp("As begin's --address (repeatable).", valueName: "address"))
    var addresses: [String] = []

    func run() throws {
        guard let choice = BackendChoice(rawValue: backend) else {
            throw LERedirectError(.invalidArgument, "--backend '\(backend)' is not a backend: use auto, nftables or iptables-legacy")
        }
        let report = try Session.detect(
            TakeoverOptions(
                port: port, proxyPort: proxyPort, backend: choice, proxy: .external, throughInput: throughInput,
                addresses: addresses))
        print(json ? report.json.rendered(pretty: true) : report.text)
        if case .failure = report.plan { throw ExitCode(1) }
        if report.refusal != nil { throw ExitCode(1) }
    }
}

struct Recover: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove what a dead session left behind, by its journal.",
        discussion: "With --sweep and no usable journal: remove every \"LE\"-tagged rule of the input chains, of x_tables' mangle and nat PREROUTING, and table inet le_redirect.")

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

struct Challenge: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Hand challenge tokens to the active session's proxy (begin --in-memory arms the steering per token).",
        subcommands: [ChallengeAdd.self, ChallengeRemove.self, CertbotAuth.self, CertbotCleanup.self])
}

struct ChallengeAdd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "add", abstract: "Serve TOKEN with KEY_AUTHORIZATION.",
        discussion: """
            With --begin, an --in-memory session is begun first if none is active (it takes begin's options), \
            and `challenge remove` ends it once its last token is gone: the whole of what a hook protocol \
            with deploy/clean steps (dehydrated's, certbot's manual hooks) needs.
            """)

    @Argument(help: "The token (the last path segment of the challenge URL).")
    var token: String

    @Argument(help: "The key authorization (TOKEN.THUMBPRINT).", transform: { $0 })
    var keyAuthorization: String

    @Flag(help: "Begin an --in-memory session first if none is active; it ends with its last token.")
    var begin = false

    @OptionGroup var options: BeginOptions

    func run() throws {
        try addChallenge(token, keyAuthorization, beginning: begin ? options : nil, stateDirectory: options.state.stateDirectory)
    }
}

struct ChallengeRemove: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "remove", abstract: "Stop serving TOKEN; a session `challenge add --begin` began ends with its last token.")

    @Argument(help: "The token.")
    var token: String

    @OptionGroup var state: StateOptions

    func run() throws {
        try removeChallenge(token, stateDirectory: state.stateDirectory)
    }
}

/// certbot --manual-auth-hook: `challenge add --begin --until-parent-exits $CERTBOT_TOKEN $CERTBOT_VALIDATION`.
struct CertbotAuth: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "certbot-auth",
        abstract: "certbot --manual-auth-hook: serve $CERTBOT_TOKEN (begins an --in-memory session if none is active).",
        discussion: "The session it begins ends when certbot-cleanup removes its last token, or when certbot exits.")

    @OptionGroup var begin: BeginOptions

    func run() throws {
        let (token, validation) = try certbotEnvironment(needValidation: true)
        var options = begin
        options.untilParentExits = true
        try addChallenge(token, validation!, beginning: options, stateDirectory: begin.state.stateDirectory)
    }
}

/// certbot --manual-cleanup-hook: `challenge remove $CERTBOT_TOKEN`.
struct CertbotCleanup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "certbot-cleanup",
        abstract: "certbot --manual-cleanup-hook: stop serving $CERTBOT_TOKEN (ends the session certbot-auth began after the last one).")

    @OptionGroup var state: StateOptions

    func run() throws {
        let (token, _) = try certbotEnvironment(needValidation: false)
        try removeChallenge(token, stateDirectory: state.stateDirectory)
    }
}

/// Registers a token; with `beginning`, first begins an --in-memory session (that ends with its last
/// token) if none is active, and ends it again if the token cannot be registered.
private func addChallenge(_ token: String, _ keyAuthorization: String, beginning: BeginOptions?, stateDirectory: String?) throws {
    try checkToken(token, keyAuthorization)
    var begun = false
    if let beginning, !(try Session.status(stateDirectory: stateDirectory).active) {
        _ = try Session.beginDetached(
            try beginning.options(forceInMemory: true), endsWithLastToken: true, following: beginning.following, logger: logger)
        begun = true
    }
    do {
        let reply = try Session.challengeAdd(token: token, keyAuthorization: keyAuthorization, stateDirectory: stateDirectory)
        print("le-redirect: serving token \(token) (\(reply.tokens) registered; steering \(reply.armed ? "armed" : "not armed"))")
    } catch {
        if begun { _ = try? Session.end(stateDirectory: stateDirectory, logger: logger) }
        throw error
    }
}

/// Unregisters a token; ends the session once its last token is gone if a hook began it. Not an
/// error when no session is active (a cleanup step runs after a failed deploy step too).
private func removeChallenge(_ token: String, stateDirectory: String?) throws {
    guard try Session.status(stateDirectory: stateDirectory).active else {
        print("le-redirect: no active session; nothing to clean up")
        return
    }
    let reply = try Session.challengeRemove(token: token, stateDirectory: stateDirectory)
    if reply.tokens == 0 && reply.endsWithLastToken {
        let report = try Session.end(stateDirectory: stateDirectory, logger: logger)
        for warning in report.warnings { printWarning(warning) }
        print("le-redirect: last token removed; session ended, the ruleset is as it was before")
    } else {
        print("le-redirect: token \(token) removed (\(reply.tokens) left)")
    }
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Begin, run COMMAND, end: also when COMMAND fails or this process gets SIGINT, SIGTERM or SIGHUP.",
        discussion: """
            COMMAND runs in the foreground with this process's descriptors and environment once the steering \
            is live; signals this process gets are passed on to it. Exits with COMMAND's exit status (128 + \
            the signal if a signal ended it, 127 if it could not start), or with end's exit code if COMMAND \
            succeeded and end failed. If begin fails, COMMAND does not run. le-redirect's own messages go to \
            stderr.
            """)

    @OptionGroup var begin: BeginOptions

    @Argument(parsing: .postTerminator, help: ArgumentHelp("The command and its arguments, after --.", valueName: "command"))
    var command: [String] = []

    func validate() throws {
        if command.isEmpty { throw ValidationError("no command given: le-redirect run [begin options] -- COMMAND [ARGS...]") }
    }

    func run() throws {
        let outcome = try Session.run(try begin.options(), command: command, drainTimeout: nil, logger: logger)
        var stderr = StandardError()
        print(begunLine(outcome.begun), to: &stderr)
        if let signal = outcome.signal { printWarning("signal \(signal) passed on to \(command[0])") }
        if outcome.status == 127 { printError("could not start \(command[0])") }
        if let error = outcome.endError {
            printError(error.message)
            if outcome.status == 0 { throw ExitCode(error.exitCode) }
        } else {
            print("le-redirect: session ended; the ruleset is as it was before begin", to: &stderr)
        }
        throw ExitCode(outcome.status)
    }
}

private func certbotEnvironment(needValidation: Bool) throws -> (String, String?) {
    guard let token = getenv("CERTBOT_TOKEN").map({ String(cString: $0) }), !token.isEmpty else {
        throw LERedirectError(.invalidArgument, "CERTBOT_TOKEN is not set: run this as certbot's --manual-auth-hook / --manual-cleanup-hook")
    }
    let validation = getenv("CERTBOT_VALIDATION").map { String(cString: $0) }
    if needValidation && (validation ?? "").isEmpty {
        throw LERedirectError(.invalidArgument, "CERTBOT_VALIDATION is not set: run this as certbot's --manual-auth-hook")
    }
    return (token, validation)
}

private func checkToken(_ token: String, _ keyAuthorization: String) throws {
    guard ChallengeToken.isValid(token) else {
        throw LERedirectError(.invalidArgument, "'\(token)' is not an ACME token (base64url, 1-256 characters)")
    }
    guard ChallengeToken.isValidKeyAuthorization(keyAuthorization), keyAuthorization.hasPrefix(token + ".") else {
        throw LERedirectError(.invalidArgument, "'\(keyAuthorization)' is not a key authorization for token \(token) (TOKEN.THUMBPRINT)")
    }
}
