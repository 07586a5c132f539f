/// Where the built-in proxy gets the answer to a challenge.
public enum ChallengeSource: Sendable, Hashable, CustomStringConvertible {
    /// An ACME client's own HTTP server on this host's loopback (certbot --standalone
    /// --http-01-port, lego --http.port, acme.sh --httpport).
    case port(UInt16)
    /// A node that holds the ACME client (`http://host:port`), for clusters behind a load balancer.
    case url(host: String, port: UInt16)
    /// Files named by token, in DIR or in DIR/.well-known/acme-challenge (certbot and lego --webroot).
    case webroot(String)
    /// Only tokens registered with `le-redirect challenge add` (or the library); the redirect is
    /// armed only while at least one is registered.
    case memory
    /// Any well-formed token is answered `TOKEN.THUMBPRINT` (acme.sh's `--stateless`): the ACME
    /// account key's thumbprint does not change between renewals, so no token is handed around.
    case stateless(thumbprint: String)

    public static let defaultPort: UInt16 = 12348

    public var description: String {
        switch self {
        case .port(let port): "challenge-port \(port)"
        case .url(let host, let port): "challenge-url http://\(host.contains(":") ? "[\(host)]" : host):\(port)"
        case .webroot(let dir): "webroot \(dir)"
        case .memory: "in-memory tokens"
        case .stateless: "stateless"
        }
    }

    /// Parses `http://host:port` (an IPv6 literal in brackets; port 80 when left out).
    public static func parseURL(_ text: String) throws(LERedirectError) -> ChallengeSource {
        guard text.hasPrefix("http://") else {
            throw LERedirectError(.invalidArgument, "--challenge-url \(text): expected http://HOST[:PORT]")
        }
        var rest = Substring(text.dropFirst(7))
        if rest.hasSuffix("/") { rest = rest.dropLast() }
        guard !rest.isEmpty, !rest.contains("/"), !rest.contains("@") else {
            throw LERedirectError(.invalidArgument, "--challenge-url \(text): expected http://HOST[:PORT], no path")
        }
        var host: Substring
        var portText: Substring?
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else {
                throw LERedirectError(.invalidArgument, "--challenge-url \(text): unclosed [")
            }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw LERedirectError(.invalidArgument, "--challenge-url \(text): bad port") }
                portText = after.dropFirst()
            }
        } else if let colon = rest.firstIndex(of: ":") {
            host = rest[..<colon]
            portText = rest[rest.index(after: colon)...]
        } else {
            host = rest
        }
        var port: UInt16 = 80
        if let portText {
            guard let value = UInt16(portText), value > 0 else {
                throw LERedirectError(.invalidArgument, "--challenge-url \(text): bad port")
            }
            port = value
        }
        guard !host.isEmpty else { throw LERedirectError(.invalidArgument, "--challenge-url \(text): no host") }
        return .url(host: String(host), port: port)
    }
}

/// What a challenge for a token the session cannot answer gets.
public enum UnknownChallenges: String, Sendable, Hashable, CaseIterable {
    /// Relayed to the app like any other request: what it would get without le-redirect, so that a
    /// certificate renewed another way in the same window (certbot --webroot or --nginx, another
    /// client) still validates.
    case app
    /// Answered 404 by the proxy: no challenge path ever reaches the app during a window.
    case notFound = "404"
}

/// How the built-in proxy behaves: its challenge source and its limits.
public struct ProxyOptions: Sendable, Hashable {
    public var challenge: ChallengeSource
    /// What a challenge for a token the session does not hold gets (with --challenge-port: also a
    /// challenge that finds nothing listening on that port).
    public var unknownChallenges: UnknownChallenges
    /// Sets X-Forwarded-For, X-Forwarded-Proto and Forwarded on every relayed request, replacing
    /// any the client sent.
    public var forwarded: Bool
    /// Speaks PROXY protocol v2 to the app, for apps configured to trust it.
    public var proxyProtocol: Bool
    /// Connections served at once; more wait in the kernel's accept queue.
    public var maxConnections: Int
    /// Connections one client address may hold at once; more are closed as they come, so that one
    /// source cannot take the slots every other visitor needs.
    public var maxConnectionsPerSource: Int
    /// The largest request or response head accepted.
    public var maxHeadBytes: Int
    /// How long a client may take to send a whole request head (slowloris).
    public var headTimeout: Duration
    /// How long a keep-alive connection may sit between requests.
    public var idleTimeout: Duration
    /// How long upgraded and opaque streams may go on once end has begun.
    public var drainTimeout: Duration

    public init(
        challenge: ChallengeSource = .port(ChallengeSource.defaultPort), forwarded: Bool = false,
        proxyProtocol: Bool = false, maxConnections: Int = 10_000, maxConnectionsPerSource: Int = 1_000,
        maxHeadBytes: Int = 16 * 1024,
        headTimeout: Duration = .seconds(10), idleTimeout: Duration = .seconds(60),
        drainTimeout: Duration = .seconds(30), unknownChallenges: UnknownChallenges = .app
    ) {
        self.challenge = challenge
        self.unknownChallenges = unknownChallenges
        self.forwarded = forwarded
        self.proxyProtocol = proxyProtocol
        self.maxConnections = maxConnections
        self.maxConnectionsPerSource = maxConnectionsPerSource
        self.maxHeadBytes = maxHeadBytes
        self.headTimeout = headTimeout
        self.idleTimeout = idleTimeout
        self.drainTimeout = drainTimeout
    }

    /// Checks every value; throws `.invalidArgument` naming the first bad one.
    public func validate() throws(LERedirectError) {
        guard (1...1_000_000).contains(maxConnections) else {
            throw LERedirectError(.invalidArgument, "--max-connections \(maxConnections) is out of range (1-1000000)")
        }
        guard (1...1_000_000).contains(maxConnectionsPerSource) else {
            throw LERedirectError(
                .invalidArgument, "--max-connections-per-source \(maxConnectionsPerSource) is out of range (1-1000000)")
        }
        guard (1024...1_048_576).contains(maxHeadBytes) else {
            throw LERedirectError(.invalidArgument, "--max-head-size \(maxHeadBytes) is out of range (1024-1048576 bytes)")
        }
        for (flag, value, range) in [
            ("--head-timeout", headTimeout, Duration.milliseconds(100) ... .seconds(3600)),
            ("--idle-timeout", idleTimeout, Duration.milliseconds(100) ... .seconds(3600)),
            ("--drain-timeout", drainTimeout, Duration.zero ... .seconds(3600)),
        ] where !range.contains(value) {
            throw LERedirectError(
                .invalidArgument,
                "\(flag) \(DurationText.format(value)) is out of range "
                    + "(\(DurationText.format(range.lowerBound))-\(DurationText.format(range.upperBound)))")
        }
        switch challenge {
        case .port(let port) where port == 0:
            throw LERedirectError(.invalidArgument, "--challenge-port 0 is not a TCP port (1-65535)")
        case .webroot(let dir) where !dir.hasPrefix("/"):
            throw LERedirectError(.invalidArgument, "--webroot \(dir) must be an absolute path")
        case .stateless(let thumbprint) where !ChallengeToken.isThumbprint(thumbprint):
            throw LERedirectError(
                .invalidArgument,
                "--stateless \(thumbprint.prefix(80)): expected the ACME account key's thumbprint, 43 base64url characters (acme.sh --register-account prints it as ACCOUNT_THUMBPRINT)")
        default:
            break
        }
    }
}

/// ACME tokens are base64url (RFC 8555 8.3): nothing else may name a file or a key.
public enum ChallengeToken {
    public static func isValid(_ token: String) -> Bool {
        let bytes = token.utf8
        return (1...256).contains(bytes.count)
            && bytes.allSatisfy { b in
                (b >= 48 && b <= 57) || (b >= 65 && b <= 90) || (b >= 97 && b <= 122) || b == 45 || b == 95
            }
    }

    /// Tokens answered without being registered (`--stateless`) are bounded more tightly: RFC 8555
    /// asks for at least 128 bits (22 base64url characters); CAs send 43. Anything echoed back must
    /// be a plain token (8.3 warns of cross-site scripting otherwise).
    public static let statelessLengths = 22...128

    public static func isValidStateless(_ token: String) -> Bool {
        statelessLengths.contains(token.utf8.count) && isValid(token)
    }

    /// A JWK thumbprint (RFC 7638) of SHA-256: 32 bytes, 43 base64url characters, no padding.
    public static func isThumbprint(_ text: String) -> Bool {
        text.utf8.count == 43 && isValid(text)
    }

    /// A key authorization is `token.thumbprint`, both base64url.
    public static func isValidKeyAuthorization(_ text: String) -> Bool {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 2 && parts.allSatisfy { isValid(String($0)) }
    }
}
