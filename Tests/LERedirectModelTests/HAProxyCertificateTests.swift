@testable import LERedirectModel
import Testing

/// The PEM `deploy haproxy` sends: the chain's certificates then the key, no empty line (it would
/// end the Runtime API's `<<` payload), nothing between blocks, and clear refusals.
struct HAProxyCertificateTests {
    static let cert = "-----BEGIN CERTIFICATE-----\nMIIBcert\nAAAA\n-----END CERTIFICATE-----\n"
    static let key = "-----BEGIN PRIVATE KEY-----\nMIIkey\n-----END PRIVATE KEY-----\n"

    @Test func chainThenKeyWithoutEmptyLines() throws {
        let chain = "subject=CN = web.test\n" + Self.cert + "\n\r\n" + Self.cert.replacingOccurrences(of: "MIIBcert", with: "MIIBissuer")
        let pem = try HAProxyCertificate.pem(fullchain: chain, key: "\n" + Self.key.replacingOccurrences(of: "\n", with: "\r\n"), fullchainPath: "c", keyPath: "k")
        #expect(pem == Self.cert + Self.cert.replacingOccurrences(of: "MIIBcert", with: "MIIBissuer") + Self.key)
        #expect(!pem.contains("\n\n") && !pem.contains("\r") && !pem.contains("subject="))
        #expect(HAProxyCertificate.setCommand(name: "/etc/haproxy/site.pem", pem: pem) == "set ssl cert /etc/haproxy/site.pem <<\n\(pem)\n")
    }

    @Test func refusals() {
        #expect(throws: LERedirectError.self) { try HAProxyCertificate.pem(fullchain: Self.key, key: Self.key, fullchainPath: "c", keyPath: "k") }
        #expect(throws: LERedirectError.self) { try HAProxyCertificate.pem(fullchain: Self.cert, key: Self.cert, fullchainPath: "c", keyPath: "k") }
        #expect(throws: LERedirectError.self) { try HAProxyCertificate.pem(fullchain: Self.cert, key: Self.key + Self.key, fullchainPath: "c", keyPath: "k") }
        #expect(throws: LERedirectError.self) {
            try HAProxyCertificate.pem(fullchain: "-----BEGIN CERTIFICATE-----\nMII\n", key: Self.key, fullchainPath: "c", keyPath: "k")
        }
        #expect(!HAProxyCertificate.validName("a b") && !HAProxyCertificate.validName("x;y") && !HAProxyCertificate.validName(""))
        #expect(HAProxyCertificate.validName("/etc/haproxy/certs/web.test.pem"))
    }
}
