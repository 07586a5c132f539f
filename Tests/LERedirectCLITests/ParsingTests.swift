import ArgumentParser
@testable import LERedirectCLI
import LERedirect
import Testing

struct ParsingTests {
    @Test func beginDefaults() throws {
        let begin = try #require(try LERedirectCommand.parseAsRoot(["begin", "--external-proxy"]) as? Begin)
        let options = try begin.options()
        #expect(options.port == 80)
        #expect(options.proxyPort == 12347)
        #expect(options.ttl == .seconds(900))
        #expect(options.backend == .auto)
        #expect(options.stateDirectory == nil)
        #expect(options.proxy == .external)
    }

    @Test func detectTakesBeginsPortsAndBackend() throws {
        let detect = try #require(
            try LERedirectCommand.parseAsRoot(["detect", "--json", "--backend", "iptables-legacy", "--port", "8080"]) as? Detect)
        #expect(detect.json)
        #expect(detect.backend == "iptables-legacy")
        #expect(detect.port == 8080)
        #expect(detect.proxyPort == 12347)
        let backend = try #require(try LERedirectCommand.parseAsRoot(["begin", "--backend", "iptables-legacy"]) as? Begin)
        #expect(try backend.options().backend == .iptablesLegacy)
    }

    @Test func beginRunsTheBuiltInProxyByDefault() throws {
        let begin = try #require(try LERedirectCommand.parseAsRoot(["begin"]) as? Begin)
        let options = try begin.options()
        #expect(options.proxy == .builtIn(ProxyOptions()))
        guard case .builtIn(let proxy) = options.proxy else { return }
        #expect(proxy.challenge == .port(12348))
        #expect(proxy.drainTimeout == .seconds(30))
        #expect(proxy.maxHeadBytes == 16384)
        #expect(!options.proxy.armsPerChallenge)
    }

    @Test func beginWithEveryProxyOption() throws {
        let begin = try #require(
            try LERedirectCommand.parseAsRoot([
                "begin", "--challenge-url", "http://[fd00::5]:8080", "--forwarded", "--proxy-protocol", "v2",
                "--max-connections", "500", "--max-head-size", "8192", "--head-timeout", "5s", "--idle-timeout", "20s",
                "--drain-timeout", "3s",
            ]) as? Begin)
        let options = try begin.options()
        #expect(
            options.proxy
                == .builtIn(
                    ProxyOptions(
                        challenge: .url(host: "fd00::5", port: 8080), forwarded: true, proxyProtocol: true,
                        maxConnections: 500, maxHeadBytes: 8192, headTimeout: .seconds(5), idleTimeout: .seconds(20),
                        drainTimeout: .seconds(3))))
    }

    @Test func challengeSources() throws {
        func source(_ args: [String]) throws -> ChallengeSource? {
            let begin = try #require(try LERedirectCommand.parseAsRoot(["begin"] + args) as? Begin)
            guard case .builtIn(let proxy) = try begin.options().proxy else { return nil }
            return proxy.challenge
        }
        #expect(try source(["--challenge-port", "9999"]) == .port(9999))
        #expect(try source(["--challenge-url", "http://acme-node"]) == .url(host: "acme-node", port: 80))
        #expect(try source(["--webroot", "/var/www/acme"]) == .webroot("/var/www/acme"))
        #expect(try source(["--in-memory"]) == .memory)
    }

    @Test(arguments: [
        ["--challenge-port", "1", "--webroot", "/x"], ["--in-memory", "--challenge-url", "http://a"],
        ["--external-proxy", "--webroot", "/x"], ["--external-proxy", "--forwarded"], ["--proxy-protocol", "v1"],
        ["--webroot", "relative"], ["--challenge-url", "https://a"], ["--challenge-url", "http://a/path"],
        ["--challenge-port", "70000"], ["--max-connections", "0"], ["--max-head-size", "10"], ["--head-timeout", "0s"],
    ])
    func conflictingOrBadProxyOptionsAreUsageErrors(_ arguments: [String]) throws {
        let begin = try #require(try LERedirectCommand.parseAsRoot(["begin"] + arguments) as? Begin)
        #expect { try begin.options().validated() } throws: { ($0 as? LERedirectError)?.exitCode == 2 }
    }

    @Test func beginWithEveryOption() throws {
        let begin = try #require(
            try LERedirectCommand.parseAsRoot([
                "begin", "--port", "8080", "--proxy-port", "9000", "--ttl", "1h30m", "--backend", "nftables",
                "--external-proxy", "--drain-timeout", "5s", "--state-dir", "/tmp/s",
            ]) as? Begin)
        let options = try begin.options()
        #expect(options.port == 8080)
        #expect(options.proxyPort == 9000)
        #expect(options.ttl == .seconds(5400))
        #expect(options.backend == .nftables)
        #expect(options.stateDirectory == "/tmp/s")
    }

    @Test(arguments: [["begin", "--ttl", "later"], ["begin", "--port", "eighty"], ["begin", "--nope"], ["frobnicate"], ["status", "--yaml"]])
    func malformedArgumentsAreParseErrors(_ arguments: [String]) {
        #expect(throws: (any Error).self) { try LERedirectCommand.parseAsRoot(arguments) }
    }

    @Test func anUnknownBackendIsAUsageError() throws {
        let begin = try #require(try LERedirectCommand.parseAsRoot(["begin", "--external-proxy", "--backend", "pf"]) as? Begin)
        #expect { try begin.options() } throws: { ($0 as? LERedirectError)?.exitCode == 2 }
    }


    @Test func theOtherCommandsParse() throws {
        #expect(try LERedirectCommand.parseAsRoot(["end", "--drain-timeout", "10s"]) is End)
        #expect((try LERedirectCommand.parseAsRoot(["status", "--json"]) as? Status)?.json == true)
        #expect((try LERedirectCommand.parseAsRoot(["recover", "--sweep"]) as? Recover)?.sweep == true)
        #expect((try LERedirectCommand.parseAsRoot(["recover"]) as? Recover)?.sweep == false)
        let add = try #require(try LERedirectCommand.parseAsRoot(["challenge", "add", "tok", "tok.thumb"]) as? ChallengeAdd)
        #expect(add.token == "tok" && add.keyAuthorization == "tok.thumb")
        #expect((try LERedirectCommand.parseAsRoot(["challenge", "remove", "tok"]) as? ChallengeRemove)?.token == "tok")
        #expect(try LERedirectCommand.parseAsRoot(["challenge", "certbot-auth", "--port", "8080"]) is CertbotAuth)
        #expect(try LERedirectCommand.parseAsRoot(["challenge", "certbot-cleanup"]) is CertbotCleanup)
    }

    /// Exit codes for what fails before anything is read or changed (no root needed).
    @Test func exitCodes() {
        #expect(LERedirectCommand.run(["--help"]) == 0)
        #expect(LERedirectCommand.run(["--version"]) == 0)
        #expect(LERedirectCommand.run(["frobnicate"]) == 2)
        #expect(LERedirectCommand.run(["begin", "--ttl", "later"]) == 2)
        #expect(LERedirectCommand.run(["begin", "--external-proxy", "--port", "0"]) == 2)
        #expect(LERedirectCommand.run(["begin", "--external-proxy", "--proxy-port", "80"]) == 2)
        #expect(LERedirectCommand.run(["begin", "--external-proxy", "--ttl", "1s"]) == 2)
        #expect(LERedirectCommand.run(["begin", "--webroot", "/x", "--in-memory"]) == 2)
        #expect(LERedirectCommand.run(["challenge", "add", "bad/token", "bad/token.x"]) == 2)
        #expect(LERedirectCommand.run(["detect", "--backend", "pf"]) == 2)
        #expect(LERedirectCommand.run(["detect", "--port", "0"]) == 2)
    }
}
