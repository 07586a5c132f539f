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
        #expect(begin.drain.drainTimeout == .seconds(30))
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

    @Test func beginWithoutExternalProxyExplainsWhy() throws {
        let begin = try #require(try LERedirectCommand.parseAsRoot(["begin"]) as? Begin)
        #expect {
            try begin.options()
        } throws: { error in
            let e = error as? LERedirectError
            return e?.exitCode == 2 && e!.message.contains("--external-proxy")
        }
    }

    @Test func theOtherCommandsParse() throws {
        #expect(try LERedirectCommand.parseAsRoot(["end", "--drain-timeout", "10s"]) is End)
        #expect((try LERedirectCommand.parseAsRoot(["status", "--json"]) as? Status)?.json == true)
        #expect((try LERedirectCommand.parseAsRoot(["recover", "--sweep"]) as? Recover)?.sweep == true)
        #expect((try LERedirectCommand.parseAsRoot(["recover"]) as? Recover)?.sweep == false)
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
        #expect(LERedirectCommand.run(["begin"]) == 2)
        #expect(LERedirectCommand.run(["begin", "--external-proxy", "--backend", "iptables-legacy"]) == 1)
    }
}
