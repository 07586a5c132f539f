@testable import LERedirectModel
import Testing

/// A PROXY header from a load balancer in front is told apart from HTTP by its first bytes,
/// however they are split, and framed without being trusted.
struct ProxyHeaderTests {
    static func scan(_ bytes: [UInt8], limit: Int = 16_384) -> ProxyHeader.Scan {
        bytes.withUnsafeBytes { ProxyHeader.scan($0, limit: limit) }
    }

    static let v1 = Array("PROXY TCP4 192.0.2.7 10.77.0.2 51234 80\r\n".utf8)
    static let v2: [UInt8] = ProxyHeader.v2Signature + [0x21, 0x11, 0x00, 0x0C] + [192, 0, 2, 7, 10, 77, 0, 2, 0xC8, 0x22, 0x00, 0x50]
    static let request = Array("GET / HTTP/1.1\r\nHost: web.test\r\n\r\n".utf8)

    @Test func wholeHeadersAreFramed() {
        #expect(Self.scan(Self.v1 + Self.request) == .header(length: Self.v1.count))
        #expect(Self.scan(Self.v2 + Self.request) == .header(length: Self.v2.count))
        #expect(Self.scan(Self.v1) == .header(length: Self.v1.count))
        // v2 LOCAL (a balancer's health check) carries no addresses.
        #expect(Self.scan(ProxyHeader.v2Signature + [0x20, 0x00, 0x00, 0x00]) == .header(length: 16))
        // PROXY UNKNOWN, the shortest v1.
        #expect(Self.scan(Array("PROXY UNKNOWN\r\n".utf8)) == .header(length: 15))
    }

    /// Every proper prefix of a header asks for more; the whole one is framed at once.
    @Test func everySplitAsksForMoreUntilWhole() {
        for header in [Self.v1, Self.v2] {
            for cut in 1..<header.count {
                #expect(Self.scan(Array(header[..<cut])) == .needMore, "cut \(cut) of \(header.count)")
            }
        }
    }

    /// No HTTP request starts like a header, leading empty lines included (RFC 9112 2.2 lets a
    /// server skip them): the first differing byte decides.
    @Test func httpIsNeverAHeader() {
        #expect(Self.scan(Self.request) == .notAHeader)
        #expect(Self.scan(Array("\r\n\r\nGET / HTTP/1.1\r\n\r\n".utf8)) == .notAHeader)
        #expect(Self.scan(Array("PROXYGET".utf8)) == .notAHeader)
        #expect(Self.scan(Array("PRI * HTTP/2.0\r\n".utf8)) == .notAHeader)
        #expect(Self.scan(Array("POST /x HTTP/1.1\r\n".utf8)) == .notAHeader)
        #expect(Self.scan([0x16, 0x03, 0x01]) == .notAHeader)  // TLS to port 80
        // Prefixes shared with a header wait for the byte that tells.
        #expect(Self.scan(Array("\r\n".utf8)) == .needMore)
        #expect(Self.scan(Array("PRO".utf8)) == .needMore)
    }

    @Test func hostileHeadersAreRefused() {
        // A v1 line that never ends within 107 bytes.
        let long = Array(("PROXY TCP4 " + String(repeating: "1", count: 200)).utf8)
        guard case .invalid = Self.scan(long) else { Issue.record("a 211-byte v1 line framed"); return }
        guard case .invalid = Self.scan(Array("PROXY TCP4 1\r2\r\n".utf8)) else { Issue.record("bare CR"); return }
        guard case .invalid = Self.scan(Array("PROXY TCP4 \u{0}\r\n".utf8)) else { Issue.record("NUL"); return }
        // A v2 header longer than allowed, of another version or command.
        guard case .invalid = Self.scan(ProxyHeader.v2Signature + [0x21, 0x11, 0xFF, 0xFF], limit: 4096) else {
            Issue.record("64 KiB of TLVs framed"); return
        }
        guard case .invalid = Self.scan(ProxyHeader.v2Signature + [0x11, 0x11, 0x00, 0x0C]) else { Issue.record("version 1"); return }
        guard case .invalid = Self.scan(ProxyHeader.v2Signature + [0x2F, 0x11, 0x00, 0x0C]) else { Issue.record("command 15"); return }
    }

    /// A 107-byte line is the longest v1 allows; a line ending right there is whole.
    @Test func theLongestV1LineIsFramed() {
        let body = "PROXY TCP6 " + String(repeating: "f", count: 107 - 11 - 2)
        let line = Array((body + "\r\n").utf8)
        #expect(line.count == 107)
        #expect(Self.scan(line) == .header(length: 107))
    }
}
