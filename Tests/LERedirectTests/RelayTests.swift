import CLERedirectShim
import Glibc
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

    private func relay() -> Relay { Relay(client: -1, peer: endpoint("10.0.0.1"), original: endpoint("10.0.0.2")) }

    @Test func theDrainTimeoutEndsStreamsIdleConnectionsAndUnfinishedRequestsOnly() {
        let fresh = relay()
        #expect(!fresh.endsAtDrainTimeout, "a new connection's first request is on its way")
        let idle = relay()
        idle.requestsTaken = 1
        #expect(idle.endsAtDrainTimeout, "an idle keep-alive connection")
        let answering = relay()
        answering.requestsTaken = 1
        answering.outstanding = [.get]
        answering.request.state = .stopped
        #expect(!answering.endsAtDrainTimeout, "a request being answered")
        answering.request.state = .head
        Array("GET / HT".utf8).withUnsafeBytes { answering.request.head.append($0.baseAddress!, $0.count) }
        #expect(!answering.endsAtDrainTimeout, "a pipelined partial head behind an answer in flight")
        let uploading = relay()
        uploading.outstanding = [.other]
        uploading.request.state = .body
        #expect(uploading.endsAtDrainTimeout, "a client still sending its body")
        let opaque = relay()
        opaque.opaque = true
        #expect(opaque.endsAtDrainTimeout)
        let lingering = relay()
        lingering.opaque = true
        lingering.lingering = true
        #expect(!lingering.endsAtDrainTimeout, "a lingering close ends by itself")
        let tunnel = relay()
        tunnel.outstanding = [.connect]
        tunnel.request.state = .tunnelRequested
        #expect(!tunnel.endsAtDrainTimeout, "a CONNECT waiting for its answer")
    }

    @Test func ipv6SourcesAreCountedPerSlash64() {
        #expect(SourceAddress(endpoint("2001:db8:1:2::1")) == SourceAddress(endpoint("2001:db8:1:2:ffff::9")))
        #expect(SourceAddress(endpoint("2001:db8:1:2::1")) != SourceAddress(endpoint("2001:db8:1:3::1")))
        #expect(SourceAddress(endpoint("192.0.2.1")) != SourceAddress(endpoint("192.0.2.2")))
    }

    @Test func loopbackAndUnspecifiedAddresses() {
        for text in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] { #expect(endpoint(text).isLoopback, "\(text)") }
        for text in ["10.0.0.1", "::2", "fe80::1", "::ffff:10.0.0.1"] { #expect(!endpoint(text).isLoopback, "\(text)") }
        #expect(endpoint("0.0.0.0").isUnspecified && endpoint("::").isUnspecified && !endpoint("::1").isUnspecified)
        #expect(endpoint("fe80::1").isLinkLocal && endpoint("febf::1").isLinkLocal && !endpoint("fec0::1").isLinkLocal)
    }
}
