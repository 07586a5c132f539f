import CLERedirectShim
import Glibc

/// PROXY protocol version 2 (haproxy.org/download/2.6/doc/proxy-protocol.txt): the binary header
/// that tells an app which client a relayed connection is from, for apps set up to expect it.
enum ProxyProtocol {
    static let signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]

    static func v2Header(source: le_endpoint, destination: le_endpoint) -> [UInt8] {
        var header = signature
        header.append(0x21)  // version 2, PROXY command
        let v6 = source.family == AF_INET6
        header.append(v6 ? 0x21 : 0x11)  // TCP over IPv6 / IPv4
        let addressLength = v6 ? 16 : 4
        let length = UInt16(2 * addressLength + 4)
        header += [UInt8(length >> 8), UInt8(length & 0xff)]
        for endpoint in [source, destination] {
            withUnsafeBytes(of: endpoint.addr) { header += $0.prefix(addressLength) }
        }
        for endpoint in [source, destination] {
            header += [UInt8(endpoint.port >> 8), UInt8(endpoint.port & 0xff)]
        }
        return header
    }
}
