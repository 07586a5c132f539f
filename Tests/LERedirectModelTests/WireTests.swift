import Foundation
@testable import LERedirectModel
import Testing

/// The protocol between le-redirect's processes: every message survives the trip, errors keep
/// their kind and errno, and nothing malformed decodes.
struct WireTests {
    static let options: ValidatedOptions = {
        let proxy = ProxyOptions(
            challenge: .webroot("/var/www/acme"), forwarded: true, proxyProtocol: false, maxConnections: 5000,
            maxConnectionsPerSource: 30, maxHeadBytes: 8192, headTimeout: .seconds(7), idleTimeout: .milliseconds(1500),
            drainTimeout: .zero)
        return try! TakeoverOptions(
            port: 80, proxyPort: 12347, ttl: .seconds(600), backend: .iptablesLegacy, proxy: .builtIn(proxy),
            listenerOwners: [1000, 33], throughInput: true, addresses: ["192.0.2.1", "2001:db8::1"], includeLocal: true
        ).validated()
    }()

    static var status: ProxyStatus {
        var s = ProxyStatus()
        s.phase = .draining
        s.connections = 3
        s.accepted = 1 << 40
        s.requests = 17
        s.challenges = 2
        s.bytesIn = 123_456
        s.bytesOut = .max
        s.refused = 1
        s.errors = 0
        return s
    }

    /// One of every message, with fields that exercise their encodings (empty, unicode, extremes).
    static let samples: [(String, Message)] = [
        ("start-daemon", .startDaemon(DaemonStart(stateDirectory: "/run/le-redirect", options: options, endsWithLastToken: true, clientPid: 4242, clientName: "certbot"))),
        ("start-daemon-external", .startDaemon(DaemonStart(stateDirectory: "/tmp/é", options: try! TakeoverOptions(proxy: .external).validated()))),
        ("ready", .ready(notes: ["host NAT seen: identity binding", ""])),
        ("failure", .failure(LERedirectError(.notPermitted, "binding: Operation not permitted\nsecond line", errno: 1))),
        ("failure-no-errno", .failure(LERedirectError(.conflict, "a session is already active"))),
        ("status", .statusRequest),
        ("end", .endRequest(drainTimeout: .milliseconds(250))),
        ("end-default", .endRequest(drainTimeout: nil)),
        ("challenge-add", .challengeAdd(token: "tok_1-A", keyAuthorization: "tok_1-A.thumb")),
        ("challenge-remove", .challengeRemove(token: "tok_1-A")),
        ("holder-status", .holderStatus(HolderStatus(pid: 10, clientPid: 11, redirectedPackets: 99, armed: true, notes: ["n"], challengeSource: "webroot /x", tokens: 2, proxyPid: 12, proxy: status, addresses: ["192.0.2.1"], includeLocal: true))),
        ("holder-status-external", .holderStatus(HolderStatus(pid: 10, armed: false))),
        ("ended", .ended(warnings: ["the host had removed a rule"])),
        ("challenge-reply", .challengeReply(tokens: 0, armed: false, endsWithLastToken: true)),
        ("proxy-start", .proxyStart(ProxyStart(options: ProxyOptions(challenge: .url(host: "fd00::7", port: 9000)), redirectedPort: 80, proxyPort: 12347, listenerOwners: [1000], user: ProxyUser(name: "le-redirect", uid: 998, gid: 998, groups: [33])))),
        ("proxy-start-stateless", .proxyStart(ProxyStart(options: ProxyOptions(challenge: .stateless(thumbprint: String(repeating: "T", count: 43)), unknownChallenges: .notFound), redirectedPort: 80, proxyPort: 12347, listenerOwners: [], user: ProxyUser(name: "le-redirect", uid: 998, gid: 998)))),
        ("proxy-ready", .proxyReady(ProxyReady(pid: 77, uid: 65534, landlockABI: 7, seccomp: true))),
        ("tokens-held", .tokensHeld(3)),
        ("proxy-status", .proxyStatus(status)),
        ("drain", .drain(timeout: .seconds(30), steered: 12)),
        ("drain-default", .drain(timeout: nil, steered: nil)),
        ("drained", .drained(status)),
        ("stop", .stop),
    ]

    @Test(arguments: samples.map(\.0))
    func everyMessageSurvivesTheTrip(_ name: String) throws {
        let message = try #require(Self.samples.first { $0.0 == name }?.1)
        let bytes = message.encoded()
        #expect(try Message(decoding: bytes) == message)
        #expect(try FuzzProperties.wire(bytes) == ())
    }

    @Test func errorsKeepTheirKindAndErrno() throws {
        for kind in [LERedirectError.Kind.invalidArgument, .notPermitted, .conflict, .unsupported, .failed] {
            let error = LERedirectError(kind, "what was being done, on what", errno: 28)
            guard case .failure(let back) = try Message(decoding: Message.failure(error).encoded()) else {
                Issue.record("not a failure")
                continue
            }
            #expect(back.kind == kind && back.errno == 28 && back.message == error.message)
        }
    }

    /// Every prefix of every message is refused, and so is a byte more.
    @Test func truncatedOrLongerPayloadsAreRefused() throws {
        for (name, message) in Self.samples {
            let bytes = message.encoded()
            for cut in 0..<bytes.count {
                #expect(throws: WireError.self, "\(name) cut at \(cut)") { try Message(decoding: Array(bytes[..<cut])) }
            }
            #expect(throws: WireError.self, "\(name) with a byte more") { try Message(decoding: bytes + [0]) }
        }
    }

    @Test func malformedFieldsAreRefused() throws {
        // Another protocol version, an unknown message, a boolean that is not 0 or 1.
        #expect(throws: WireError.self) { try Message(decoding: [2, 6]) }
        #expect(throws: WireError.self) { try Message(decoding: [1, 200]) }
        var bytes = Message.challengeReply(tokens: 1, armed: true, endsWithLastToken: false).encoded()
        bytes[6] = 2
        #expect(throws: WireError.self) { try Message(decoding: bytes) }
        // A string length past the payload, and invalid UTF-8.
        #expect(throws: WireError.self) { try Message(decoding: [1, 7, 0xff, 0xff, 0xff, 0xff]) }
        #expect(throws: WireError.self) { try Message(decoding: [1, 7, 0, 0, 0, 2, 0xc3, 0x28]) }
        // A count that would have the reader allocate far more than the frame holds.
        #expect(throws: WireError.self) { try Message(decoding: [1, 2, 0x7f, 0xff, 0xff, 0xff]) }
        // Frames: empty and oversized lengths.
        #expect(throws: WireError.self) { try WireFrame.length([0, 0, 0, 0]) }
        #expect(throws: WireError.self) { try WireFrame.length([0, 0x10, 0, 1]) }
        #expect(try WireFrame.length([0, 0, 1, 0]) == 256)
    }

    /// The decoder checks what begin's validation guarantees: the proxy is never told to run as
    /// root, and options out of range do not decode.
    @Test func decodedValuesAreChecked() throws {
        let root = Message.proxyStart(ProxyStart(options: ProxyOptions(), redirectedPort: 80, proxyPort: 12347, listenerOwners: [], user: ProxyUser(name: "root", uid: 0, gid: 0)))
        #expect(throws: WireError.self) { try Message(decoding: root.encoded()) }
        let rootGroup = Message.proxyStart(ProxyStart(options: ProxyOptions(), redirectedPort: 80, proxyPort: 12347, listenerOwners: [], user: ProxyUser(name: "x", uid: 5, gid: 5, groups: [0])))
        #expect(throws: WireError.self) { try Message(decoding: rootGroup.encoded()) }
        var tooMany = ProxyOptions()
        tooMany.maxConnections = 2_000_000
        let bad = Message.proxyStart(ProxyStart(options: tooMany, redirectedPort: 80, proxyPort: 12347, listenerOwners: [], user: ProxyUser(name: "x", uid: 5, gid: 5)))
        #expect(throws: WireError.self) { try Message(decoding: bad.encoded()) }
        // A thumbprint that is not one would be echoed in every answer: it does not decode.
        let markup = Message.proxyStart(ProxyStart(options: ProxyOptions(challenge: .stateless(thumbprint: "<script>")), redirectedPort: 80, proxyPort: 12347, listenerOwners: [], user: ProxyUser(name: "x", uid: 5, gid: 5)))
        #expect(throws: WireError.self) { try Message(decoding: markup.encoded()) }
    }

    /// scripts/fuzz's seeds for the wire target are these samples (regenerated with
    /// LE_REDIRECT_WRITE_WIRE_SEEDS=1 when a message changes).
    @Test func theFuzzSeedsAreTheSamples() throws {
        let dir = FuzzRegressionTests.root.appendingPathComponent("seeds").appendingPathComponent("wire")
        if ProcessInfo.processInfo.environment["LE_REDIRECT_WRITE_WIRE_SEEDS"] == "1" {
            for (name, message) in Self.samples {
                try Data(message.encoded()).write(to: dir.appendingPathComponent(name))
            }
        }
        for (name, message) in Self.samples {
            let seed = [UInt8](try Data(contentsOf: dir.appendingPathComponent(name)))
            #expect(seed == message.encoded(), "seeds/wire/\(name) is not the sample's encoding")
        }
    }
}
