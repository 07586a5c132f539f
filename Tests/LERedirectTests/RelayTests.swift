import CLERedirectShim
import Glibc
import LERedirectModel
import Testing

@testable import LERedirect

/// The proxy's per-connection decisions that need no socket: what the drain timeout ends, how
/// sources are counted, which addresses are this host's loopback.
struct RelayTests {
    private func endpoint(_ text: String) -> le_endpoint {
        var e = le_endpoint()
        let six = text.contains(":")
        e.family = six ? AF_INET6 : AF_INET
        withUnsafeMutableBytes(of: &e.addr) { _ = inet_pton(e.family, text, $0.baseAddress) }
        return e
    }

    private func relay() -> Relay {
        Relay(client: -1, peer: endpoint("10.0.0.1"), original: endpoint("10.0.0.2"), maxHeadBytes: 16384)
    }

    private func request(_ text: String) -> HTTPHead.Request {
        let bytes = Array(text.utf8)
        return bytes.withUnsafeBytes { try! HTTPHead.parseRequest($0) }
    }

    /// Feeds client bytes through the connection's request framing, as the loop does.
    private func feed(_ r: Relay, _ text: String) -> HTTPFramer.Step {
        let bytes = Array(text.utf8)
        return bytes.withUnsafeBytes { r.requests.step($0, at: 0) }
    }

    @Test func theDrainTimeoutEndsStreamsIdleConnectionsAndUnfinishedRequestsOnly() {
        let fresh = relay()
        #expect(!fresh.endsAtDrainTimeout, "a new connection's first request is on its way")
        let idle = relay()
        idle.requestSent(request("GET / HTTP/1.1\r\n\r\n"))
        _ = idle.responseEnded()
        #expect(idle.endsAtDrainTimeout, "an idle keep-alive connection")
        let answering = relay()
        answering.requestSentAsLast(request("GET / HTTP/1.1\r\n\r\n"))
        #expect(!answering.endsAtDrainTimeout, "a request being answered")
        let pipelined = relay()
        pipelined.requestSent(request("GET / HTTP/1.1\r\n\r\n"))
        #expect(feed(pipelined, "GET / HT") == .held)
        #expect(!pipelined.endsAtDrainTimeout, "a pipelined partial head behind an answer in flight")
        let uploading = relay()
        uploading.requestSent(request("POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n"))
        #expect(uploading.requests.state == .body)
        #expect(uploading.endsAtDrainTimeout, "a client still sending its body")
        let opaque = relay()
        opaque.opaque = true
        #expect(opaque.endsAtDrainTimeout)
        let lingering = relay()
        lingering.opaque = true
        lingering.lingering = true
        #expect(!lingering.endsAtDrainTimeout, "a lingering close ends by itself")
        let tunnel = relay()
        tunnel.requestSent(request("CONNECT example.org:443 HTTP/1.1\r\n\r\n"))
        #expect(tunnel.phase == .tunnelRequested)
        #expect(!tunnel.endsAtDrainTimeout, "a CONNECT waiting for its answer")
    }

    /// The transitions between requests and responses, as the connection makes them.
    @Test func requestsAndResponsesTakeTurns() {
        // Paused while draining: the held bytes come back when the response in flight ends.
        let paused = relay()
        paused.requestSent(request("GET /a HTTP/1.1\r\n\r\n"))
        paused.phase = .paused
        Array("GET /b HTTP/1.1\r\n\r\n".utf8).withUnsafeBytes { paused.pending.append($0.baseAddress!, $0.count) }
        guard case .resume(let held) = paused.responseEnded() else {
            Issue.record("a paused connection did not resume")
            return
        }
        #expect(held == Array("GET /b HTTP/1.1\r\n\r\n".utf8) && paused.phase == .reading && !paused.requestBytesHeld)
        // The last response of a connection finishes it, and nothing of the app's follows.
        let last = relay()
        last.requestSent(request("GET / HTTP/1.1\r\n\r\n"))
        last.closeAfterResponse = true
        #expect(last.responseEnded() == .finish && last.responseStopped)
        // A tunnel accepted: what waited goes upstream first, and everything passes from then on.
        let tunnel = relay()
        tunnel.requestSent(request("GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"))
        #expect(tunnel.phase == .tunnelRequested)
        Array("frame".utf8).withUnsafeBytes { tunnel.pending.append($0.baseAddress!, $0.count) }
        #expect(tunnel.tunnelAccepted() == Array("frame".utf8))
        #expect(tunnel.opaque && tunnel.requests.state == .passThrough && tunnel.responses.state == .passThrough)
        // A tunnel refused: the next request is read again.
        let refused = relay()
        refused.requestSent(request("CONNECT example.org:443 HTTP/1.1\r\n\r\n"))
        #expect(refused.responseEnded() == .idle && refused.phase == .reading)
        // The app's bytes cannot be followed: both ways pass from here on, what waited first.
        let lost = relay()
        lost.requestSent(request("GET / HTTP/1.1\r\n\r\n"))
        #expect(feed(lost, "GET /next HT") == .held)
        #expect(lost.stopFollowing() == Array("GET /next HT".utf8))
        #expect(lost.opaque && lost.requests.state == .passThrough && lost.responses.state == .passThrough && !lost.requestBytesHeld)
        // A response that ends when the app closes.
        let untilClose = relay()
        untilClose.responseBody(.untilClose)
        #expect(untilClose.responseEndsAtClose && untilClose.responses.state == .passThrough)
    }

    @Test func ipv6SourcesAreCountedPerSlash64() {
        #expect(SourceAddress(endpoint("2001:db8:1:2::1")) == SourceAddress(endpoint("2001:db8:1:2:ffff::9")))
        #expect(SourceAddress(endpoint("2001:db8:1:2::1")) != SourceAddress(endpoint("2001:db8:1:3::1")))
        #expect(SourceAddress(endpoint("192.0.2.1")) != SourceAddress(endpoint("192.0.2.2")))
        // Loopback is one source, however many of 127/8's addresses a local user binds.
        #expect(SourceAddress(endpoint("127.0.0.1")) == SourceAddress(endpoint("127.3.2.1")))
        #expect(SourceAddress(endpoint("127.0.0.1")) != SourceAddress(endpoint("128.0.0.1")))
    }

    @Test func loopbackAndUnspecifiedAddresses() {
        for text in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] { #expect(endpoint(text).isLoopback, "\(text)") }
        for text in ["10.0.0.1", "::2", "fe80::1", "::ffff:10.0.0.1"] { #expect(!endpoint(text).isLoopback, "\(text)") }
        #expect(endpoint("0.0.0.0").isUnspecified && endpoint("::").isUnspecified && !endpoint("::1").isUnspecified)
        #expect(endpoint("fe80::1").isLinkLocal && endpoint("febf::1").isLinkLocal && !endpoint("fec0::1").isLinkLocal)
    }
}
