/// Which firewall system holds the steering. Neither way does anything go into the host's filter
/// chains.
public enum BackendChoice: String, Sendable, Hashable, CaseIterable {
    /// As `le-redirect detect` explains: nftables wherever the kernel has owned tables and
    /// nft_tproxy, iptables-legacy (mangle PREROUTING) otherwise.
    case auto
    case nftables
    case iptablesLegacy = "iptables-legacy"
}

/// Who answers the redirected connections on the proxy port.
public enum ProxyMode: Sendable, Hashable {
    /// The caller runs its own proxy on the proxy port, listening on IPv4 and IPv6.
    case external
    /// The session runs le-redirect's validation proxy: challenges go to `options.challenge`,
    /// everything else to the connection's original destination.
    case builtIn(ProxyOptions)

    /// As the journal and `status` name it.
    public var name: String {
        switch self {
        case .external: "external"
        case .builtIn: "built-in"
        }
    }

    /// True when the redirect is armed only while a challenge token is registered.
    public var armsPerChallenge: Bool {
        if case .builtIn(let options) = self, options.challenge == .memory { return true }
        return false
    }
}

/// What a takeover does: which port it takes over, where it sends it, and for how long at most.
public struct TakeoverOptions: Sendable, Hashable {
    /// The port whose new connections are redirected (the port the ACME CA validates): 80.
    public var port: Int
    /// The local port that receives the redirected connections.
    public var proxyPort: Int
    /// How long the redirect may live at most. The kernel removes it by itself when this passes,
    /// even if no le-redirect process is left to do it.
    public var ttl: Duration
    public var backend: BackendChoice
    public var proxy: ProxyMode
    /// Where the lock, journal and control socket live; nil means `LE_REDIRECT_STATE_DIR`, or
    /// `/run/le-redirect`.
    public var stateDirectory: String?
    /// Users besides root (uids) whose listeners may answer: the challenge port's (or a loopback
    /// --challenge-url's) server and the external proxy. A listener of anyone else gets nothing.
    public var listenerOwners: [UInt32]
    /// On a host that publishes container ports through its nat (Docker's DNAT), the operator
    /// accepts that during the window the steered connections to the port are decided by the
    /// host's INPUT chains, not its FORWARD chains (DOCKER-USER): without it, begin refuses there.
    public var throughInput: Bool
    /// The local addresses whose port is taken over (IPv4 or IPv6, as text); empty means every
    /// local address. Connections to the host's other addresses reach the app as outside a window,
    /// and a family none of them belongs to is not steered at all.
    public var addresses: [String]
    /// Also steer the host's own new connections to the port (those of every user but the built-in
    /// proxy's), for ACME clients that fetch their challenge over HTTP before asking the CA
    /// (acme-tiny, acmetool). nftables only; needs the built-in proxy.
    public var includeLocal: Bool

    public init(
        port: Int = 80, proxyPort: Int = 12347, ttl: Duration = .seconds(15 * 60),
        backend: BackendChoice = .auto, proxy: ProxyMode, stateDirectory: String? = nil, listenerOwners: [UInt32] = [],
        throughInput: Bool = false, addresses: [String] = [], includeLocal: Bool = false
    ) {
        self.addresses = addresses
        self.includeLocal = includeLocal
        self.port = port
        self.proxyPort = proxyPort
        self.ttl = ttl
        self.backend = backend
        self.proxy = proxy
        self.stateDirectory = stateDirectory
        self.listenerOwners = listenerOwners
        self.throughInput = throughInput
    }

    /// The shortest and longest TTL begin accepts.
    public static let ttlRange: ClosedRange<Duration> = .seconds(10) ... .seconds(24 * 3600)

    /// Checks every value; throws `.invalidArgument` naming the first bad one.
    public func validated() throws(LERedirectError) -> ValidatedOptions {
        func checkedPort(_ value: Int, _ flag: String) throws(LERedirectError) -> UInt16 {
            guard (1...65535).contains(value) else {
                throw LERedirectError(.invalidArgument, "\(flag) \(value) is not a TCP port (1-65535)")
            }
            return UInt16(value)
        }
        let redirected = try checkedPort(port, "--port")
        let proxy = try checkedPort(proxyPort, "--proxy-port")
        guard redirected != proxy else {
            throw LERedirectError(
                .invalidArgument,
                "--proxy-port \(proxyPort) is the redirected port itself; choose another proxy port")
        }
        guard Self.ttlRange.contains(ttl) else {
            throw LERedirectError(
                .invalidArgument,
                "--ttl \(DurationText.format(ttl)) is out of range "
                    + "(\(DurationText.format(Self.ttlRange.lowerBound))-\(DurationText.format(Self.ttlRange.upperBound)))")
        }
        guard ttl.milliseconds % 1000 == 0 else {
            throw LERedirectError(.invalidArgument, "--ttl \(DurationText.format(ttl)) must be whole seconds")
        }
        if case .builtIn(let options) = self.proxy {
            try options.validate()
            // The proxy would send each challenge to itself, or to the app it stands in for.
            if case .port(let challenge) = options.challenge, challenge == proxy || challenge == redirected {
                throw LERedirectError(
                    .invalidArgument,
                    "--challenge-port \(challenge) is the \(challenge == proxy ? "proxy port" : "redirected port"): "
                        + "give the port the ACME client's own server listens on (e.g. certbot --http-01-port 12348)")
            }
        }
        if includeLocal, case .external = self.proxy {
            throw LERedirectError(
                .invalidArgument,
                "--include-local needs the built-in proxy: the proxy's own connections to the app must not be steered back "
                    + "to it, and le-redirect can tell apart only those of its own proxy (by its user)")
        }
        var parsed: [IPAddress] = []
        for text in addresses {
            guard let address = IPAddress(text) else {
                throw LERedirectError(
                    .invalidArgument, "--address \(text) is not an IPv4 or IPv6 address (one address, without a prefix length or zone)")
            }
            if let reason = address.unusableReason {
                throw LERedirectError(.invalidArgument, "--address \(text) is \(reason)")
            }
            parsed.append(address)
        }
        return ValidatedOptions(
            port: redirected, proxyPort: proxy, ttl: ttl, backend: backend, proxy: self.proxy,
            listenerOwners: Array(Set(listenerOwners.filter { $0 != 0 })).sorted(), throughInput: throughInput,
            addresses: Array(Set(parsed)).sorted(), includeLocal: includeLocal)
    }
}

/// Options that passed validation.
public struct ValidatedOptions: Sendable, Hashable {
    public let port: UInt16
    public let proxyPort: UInt16
    public let ttl: Duration
    public let backend: BackendChoice
    public let proxy: ProxyMode
    /// Users besides root whose listeners may answer (sorted, without root).
    public let listenerOwners: [UInt32]
    /// See `TakeoverOptions.throughInput`.
    public let throughInput: Bool
    /// See `TakeoverOptions.addresses`: sorted (IPv4 first), without repeats; empty means all.
    package let addresses: [IPAddress]
    /// See `TakeoverOptions.includeLocal`.
    public let includeLocal: Bool

    /// The families steered: those of `addresses`, or both.
    package var steeredFamilies: [Family] { addresses.isEmpty ? [.ip, .ip6] : Array(Set(addresses.map(\.family))).sorted() }
}
