/// A unicast IPv4 or IPv6 address, as `--address` names a local address to take over. Parsed and
/// printed here, without the C library, so that the plan and the wire stay pure; printed as
/// `inet_ntop` and `nft` print it (RFC 5952 for IPv6), so that rule texts match the kernel's lists.
package struct IPAddress: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// .ip (4 bytes) or .ip6 (16 bytes), network order.
    package let family: Family
    package let bytes: [UInt8]

    package init?(family: Family, bytes: [UInt8]) {
        guard (family == .ip && bytes.count == 4) || (family == .ip6 && bytes.count == 16) else { return nil }
        self.family = family
        self.bytes = bytes
    }

    /// Parses dotted-quad IPv4 (exactly four decimal parts, no leading zeros) or IPv6 (eight groups
    /// of up to four hex digits, one `::`, an IPv4 tail allowed); nil for anything else, a zone
    /// (`%eth0`) or a prefix (`/24`) included.
    package init?(_ text: String) {
        if let v4 = Self.parse4(Substring(text)) {
            self.init(family: .ip, bytes: v4)
        } else if let v6 = Self.parse6(text) {
            self.init(family: .ip6, bytes: v6)
        } else {
            return nil
        }
    }

    private static func parse4(_ text: Substring) -> [UInt8]? {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var bytes: [UInt8] = []
        for part in parts {
            guard (1...3).contains(part.count), part.allSatisfy({ $0.isASCII && $0.isNumber }),
                part.count == 1 || part.first != "0", let value = UInt8(part)
            else { return nil }
            bytes.append(value)
        }
        return bytes
    }

    private static func parse6(_ text: String) -> [UInt8]? {
        guard text.count <= 45, text.contains(":") else { return nil }
        let gaps = text.ranges(of: "::")
        guard gaps.count <= 1 else { return nil }
        let halves = gaps.first.map { [String(text[..<$0.lowerBound]), String(text[$0.upperBound...])] } ?? [text]
        func groups(_ part: String, last: Bool) -> [UInt8]? {
            if part.isEmpty { return [] }
            var bytes: [UInt8] = []
            let fields = part.split(separator: ":", omittingEmptySubsequences: false)
            for (i, field) in fields.enumerated() {
                if last, i == fields.count - 1, field.contains(".") {
                    guard let v4 = parse4(field) else { return nil }
                    bytes += v4
                    continue
                }
                guard (1...4).contains(field.count), field.allSatisfy({ $0.isHexDigit && $0.isASCII }),
                    let value = UInt16(field, radix: 16)
                else { return nil }
                bytes += [UInt8(value >> 8), UInt8(value & 0xFF)]
            }
            return bytes
        }
        if halves.count == 1 {
            guard let all = groups(halves[0], last: true), all.count == 16 else { return nil }
            return all
        }
        guard let head = groups(halves[0], last: false), let tail = groups(halves[1], last: true),
            head.count + tail.count <= 14
        else { return nil }
        return head + [UInt8](repeating: 0, count: 16 - head.count - tail.count) + tail
    }

    package var description: String {
        if family == .ip { return bytes.map { String($0) }.joined(separator: ".") }
        let groups = (0..<8).map { UInt16(bytes[2 * $0]) << 8 | UInt16(bytes[2 * $0 + 1]) }
        // The longest run of two or more zero groups (the first of equal ones) becomes "::".
        var best = (start: -1, length: 0)
        var i = 0
        while i < 8 {
            guard groups[i] == 0 else {
                i += 1
                continue
            }
            var j = i
            while j < 8 && groups[j] == 0 { j += 1 }
            if j - i > best.length { best = (i, j - i) }
            i = j
        }
        let hex = { (range: Range<Int>) in range.map { String(groups[$0], radix: 16) }.joined(separator: ":") }
        if best.length < 2 { return hex(0..<8) }
        return hex(0..<best.start) + "::" + hex((best.start + best.length)..<8)
    }

    /// Why this address cannot be taken over, or nil: steering is for unicast addresses a client
    /// from outside can connect to.
    package var unusableReason: String? {
        if family == .ip {
            if bytes == [0, 0, 0, 0] { return "the unspecified address" }
            if bytes[0] == 127 { return "a loopback address (the host's own connections are never steered)" }
            if bytes[0] >= 224 { return "not a unicast address" }
            if bytes[0] == 169 && bytes[1] == 254 { return "a link-local address (no ACME server reaches it)" }
        } else {
            if bytes.allSatisfy({ $0 == 0 }) { return "the unspecified address" }
            if bytes == [UInt8](repeating: 0, count: 15) + [1] {
                return "a loopback address (the host's own connections are never steered)"
            }
            if bytes[0] == 0xFF { return "not a unicast address" }
            if bytes[0..<10].allSatisfy({ $0 == 0 }) && bytes[10] == 0xFF && bytes[11] == 0xFF {
                return "an IPv4-mapped address: give the IPv4 address itself"
            }
            if bytes[0..<12].allSatisfy({ $0 == 0 }) {
                return "an IPv4-compatible address (deprecated, RFC 4291): give the IPv4 address itself"
            }
            if bytes[0] == 0xFE && bytes[1] & 0xC0 == 0x80 { return "a link-local address (no ACME server reaches it)" }
        }
        return nil
    }

    package static func < (a: IPAddress, b: IPAddress) -> Bool {
        a.family != b.family ? a.family < b.family : a.bytes.lexicographicallyPrecedes(b.bytes)
    }
}
