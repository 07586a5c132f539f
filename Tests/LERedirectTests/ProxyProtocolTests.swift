import CLERedirectShim
import Glibc
@testable import LERedirect
import Testing

struct ProxyProtocolTests {
    @Test func v2HeaderForIPv4() {
        var source = le_endpoint(), destination = le_endpoint()
        source.family = AF_INET
        source.addr.0 = 10; source.addr.1 = 99; source.addr.2 = 0; source.addr.3 = 2
        source.port = 40000
        destination.family = AF_INET
        destination.addr.0 = 10; destination.addr.1 = 99; destination.addr.2 = 0; destination.addr.3 = 1
        destination.port = 80
        let header = ProxyProtocol.v2Header(source: source, destination: destination)
        #expect(header == ProxyProtocol.signature + [0x21, 0x11, 0, 12, 10, 99, 0, 2, 10, 99, 0, 1, 0x9c, 0x40, 0, 80])
    }

    @Test func v2HeaderForIPv6() {
        var source = le_endpoint()
        source.family = AF_INET6
        source.addr.15 = 2
        source.port = 1
        let header = ProxyProtocol.v2Header(source: source, destination: source)
        #expect(header.count == 16 + 36)
        #expect(header[13] == 0x21 && header[15] == 36)
    }
}
