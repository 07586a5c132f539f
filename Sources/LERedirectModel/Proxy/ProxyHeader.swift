/// A PROXY protocol header (haproxy.org/download/2.6/doc/proxy-protocol.txt) at the start of a
/// connection from a load balancer in front (HAProxy `send-proxy`, nginx `proxy_protocol`, cloud
/// balancers): v1 is a text line `PROXY TCP4 ... \r\n` of at most 107 bytes, v2 a 16-byte binary
/// prefix (a 12-byte signature, version and command, family, length) and that many bytes of
/// addresses and TLVs. Neither can start an HTTP request (v2's signature holds a NUL after an
/// empty line; `PROXY ` is not a method followed by a target), so the proxy tells them apart
/// from a request by their first bytes alone, without being told a balancer is there.
///
/// Only the framing is read: the header is handed on to the app unchanged, and the app, which
/// trusts its balancer or not, reads the addresses.
public enum ProxyHeader {
    public static let v1Prefix: [UInt8] = Array("PROXY ".utf8)
    public static let v2Signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]
    /// The longest v1 line, CRLF included (the specification's bound).
    public static let v1MaxLength = 107

    public enum Scan: Equatable, Sendable {
        /// The connection does not start with a PROXY header: its bytes are HTTP's.
        case notAHeader
        /// So far a header's beginning: more bytes decide.
        case needMore
        /// A whole header of this many bytes; what follows is the connection's first request.
        case header(length: Int)
        /// A header that cannot be framed (a v1 line too long or not text, a v2 header of another
        /// version or command, or longer than allowed).
        case invalid(String)
    }

    /// Reads the start of a connection; `limit` bounds a v2 header (its TLVs).
    public static func scan(_ bytes: UnsafeRawBufferPointer, limit: Int) -> Scan {
        if bytes.isEmpty { return .needMore }
        if matchesPrefix(bytes, v2Signature) {
            guard bytes.count >= 16 else { return .needMore }
            let versionCommand = bytes[12]
            guard versionCommand >> 4 == 2 else {
                return .invalid("a PROXY v2 header of version \(versionCommand >> 4)")
            }
            guard versionCommand & 0x0F <= 1 else {
                return .invalid("a PROXY v2 header with command \(versionCommand & 0x0F)")
            }
            let length = 16 + (Int(bytes[14]) << 8 | Int(bytes[15]))
            guard length <= limit else {
                return .invalid("a PROXY v2 header of \(length) bytes (at most \(limit))")
            }
            return bytes.count >= length ? .header(length: length) : .needMore
        }
        if matchesPrefix(bytes, v1Prefix) {
            guard bytes.count >= v1Prefix.count else { return .needMore }
            var i = v1Prefix.count
            while i < min(bytes.count, v1MaxLength - 1) {
                let b = bytes[i]
                if b == 0x0D {
                    guard i + 1 < bytes.count else { return .needMore }
                    return bytes[i + 1] == 0x0A ? .header(length: i + 2) : .invalid("a PROXY v1 line with a bare CR")
                }
                guard b >= 0x20 && b < 0x7F else { return .invalid("a PROXY v1 line that is not text") }
                i += 1
            }
            return bytes.count >= v1MaxLength
                ? .invalid("a PROXY v1 line longer than \(v1MaxLength) bytes") : .needMore
        }
        return .notAHeader
    }

    /// Whether `bytes` agrees with `prefix` as far as either goes.
    private static func matchesPrefix(_ bytes: UnsafeRawBufferPointer, _ prefix: [UInt8]) -> Bool {
        let n = min(bytes.count, prefix.count)
        for i in 0..<n where bytes[i] != prefix[i] { return false }
        return true
    }
}
