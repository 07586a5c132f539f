import LERedirectModel
import Testing

struct DurationTextTests {
    @Test(arguments: [
        ("900", 900_000), ("30s", 30_000), ("15m", 900_000), ("1h30m", 5_400_000), ("250ms", 250),
        ("1d", 86_400_000), ("0", 0), ("2m5s", 125_000),
    ] as [(String, Int64)])
    func parses(_ text: String, milliseconds: Int64) {
        #expect(DurationText.parse(text)?.milliseconds == milliseconds)
    }

    @Test(arguments: ["", "m", "-5", "5x", "1.5s", "s5", "15 m", "99999999999999999999s", "1h-1m"])
    func rejects(_ text: String) {
        #expect(DurationText.parse(text) == nil, "\(text)")
    }

    @Test func formats() {
        #expect(DurationText.format(.seconds(900)) == "15m")
        #expect(DurationText.format(.seconds(5400)) == "1h30m")
        #expect(DurationText.format(.milliseconds(1500)) == "1s500ms")
        #expect(DurationText.format(.zero) == "0s")
    }
}

struct TakeoverOptionsTests {
    func error(_ options: TakeoverOptions) -> LERedirectError? {
        do {
            _ = try options.validated()
            return nil
        } catch {
            return error
        }
    }

    @Test func defaultsAreValid() throws {
        let valid = try TakeoverOptions(proxy: .external).validated()
        #expect(valid.port == 80)
        #expect(valid.proxyPort == 12347)
        #expect(valid.ttl == .seconds(900))
        #expect(valid.backend == .auto)
    }

    @Test(arguments: [0, -1, 65536, 1_000_000])
    func badPortsAreUsageErrors(port: Int) {
        let e = error(TakeoverOptions(port: port, proxy: .external))
        #expect(e?.kind == .invalidArgument)
        #expect(e?.exitCode == 2)
        #expect(e?.message.contains("--port \(port)") == true)
        #expect(error(TakeoverOptions(proxyPort: port, proxy: .external))?.message.contains("--proxy-port") == true)
    }

    @Test func theProxyPortCannotBeTheRedirectedPort() {
        let e = error(TakeoverOptions(port: 8080, proxyPort: 8080, proxy: .external))
        #expect(e?.kind == .invalidArgument)
        #expect(e?.message.contains("redirected port itself") == true)
    }

    @Test(arguments: [Duration.seconds(9), .seconds(24 * 3600 + 1), .milliseconds(10_500), .zero])
    func badTTLsAreUsageErrors(ttl: Duration) {
        #expect(error(TakeoverOptions(ttl: ttl, proxy: .external))?.kind == .invalidArgument)
    }

    @Test func ttlBoundsAreInclusive() {
        #expect(error(TakeoverOptions(ttl: .seconds(10), proxy: .external)) == nil)
        #expect(error(TakeoverOptions(ttl: .seconds(24 * 3600), proxy: .external)) == nil)
    }

    @Test func exitCodes() {
        #expect(LERedirectError(.invalidArgument, "").exitCode == 2)
        #expect(LERedirectError(.notPermitted, "").exitCode == 3)
        #expect(LERedirectError(.conflict, "").exitCode == 1)
        #expect(LERedirectError(.unsupported, "").exitCode == 1)
        #expect(LERedirectError(.failed, "").exitCode == 1)
    }
}

struct FormattingTests {
    @Test(arguments: [
        (Int64(0), "1970-01-01T00:00:00Z"), (1_795_430_918_365, "2026-11-23T10:48:38Z"),
        (1_709_164_800_000, "2024-02-29T00:00:00Z"), (951_782_400_000, "2000-02-29T00:00:00Z"),
        (-1_000, "1969-12-31T23:59:59Z"), (4_102_444_799_999, "2099-12-31T23:59:59Z"),
    ])
    func rfc3339(_ ms: Int64, _ text: String) {
        #expect(RFC3339.format(unixMilliseconds: ms) == text)
    }

    @Test(arguments: [
        (Int64(0), "1970-01-01T00:00:00.000Z"), (1_795_430_918_365, "2026-11-23T10:48:38.365Z"),
        (1_795_430_918_005, "2026-11-23T10:48:38.005Z"), (1_795_430_918_050, "2026-11-23T10:48:38.050Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
    ])
    func rfc3339WithMilliseconds(_ ms: Int64, _ text: String) {
        #expect(RFC3339.formatWithMilliseconds(unixMilliseconds: ms) == text)
    }

    @Test func jsonEscapesAndKeepsOrder() {
        let value = JSONValue.object([
            ("b", .string("quote \" backslash \\ newline \n tab \t bell \u{7}")), ("a", .int(-3)),
            ("list", .array([.bool(true), .null])), ("empty", .object([])),
        ])
        #expect(
            value.rendered()
                == #"{"b":"quote \" backslash \\ newline \n tab \t bell \u0007","a":-3,"list":[true,null],"empty":{}}"#)
        #expect(value.rendered(pretty: true).contains("\n  \"a\": -3"))
    }

    @Test func statusJSONHasTheDocumentedFields() {
        var status = SessionStatus(state: .active)
        status.pid = 42
        status.backend = "nftables"
        status.port = 80
        status.proxyPort = 12347
        status.expiresAt = 0
        let json = status.json.rendered()
        for key in ["\"active\":true", "\"pid\":42", "\"backend\":\"nftables\"", "\"port\":80", "\"proxyPort\":12347",
            "\"expiresAt\":\"1970-01-01T00:00:00Z\"", "\"counters\":{}"]
        {
            #expect(json.contains(key), "\(key) in \(json)")
        }
    }

    /// --stateless echoes tokens: only a thumbprint-shaped value is accepted, and only plain tokens
    /// of 22-128 characters are answered (RFC 8555 8.3).
    @Test func statelessAcceptsOnlyAThumbprintAndBoundedTokens() throws {
        let thumbprint = "n4bQgYhMfWWaL-qgxVrQFaO_TxsrC4Is0V1sFbDwCgg"
        try ProxyOptions(challenge: .stateless(thumbprint: thumbprint)).validate()
        for bad in ["", "short", thumbprint + "A", String(thumbprint.dropLast()) + "=", "<script>alert(1)</script>xxxxxxxxxxxxxxxxxx"] {
            #expect(throws: LERedirectError.self, "\(bad)") { try ProxyOptions(challenge: .stateless(thumbprint: bad)).validate() }
        }
        #expect(ChallengeToken.isValidStateless(String(repeating: "a", count: 22)))
        #expect(ChallengeToken.isValidStateless(String(repeating: "a", count: 128)))
        #expect(!ChallengeToken.isValidStateless(String(repeating: "a", count: 21)))
        #expect(!ChallengeToken.isValidStateless(String(repeating: "a", count: 129)))
        #expect(!ChallengeToken.isValidStateless(String(repeating: "a", count: 30) + "<b>"))
    }
}
