/// Parses and prints the durations the CLI accepts: `15m`, `30s`, `1h30m`, `500ms`, or a bare number
/// of seconds.
public enum DurationText {
    public static func parse(_ text: String) -> Duration? {
        if text.isEmpty { return nil }
        if let seconds = Int64(text) {
            return seconds >= 0 ? .seconds(seconds) : nil
        }
        var total: Int64 = 0  // milliseconds
        var digits = Substring("")
        var rest = Substring(text)
        var sawComponent = false
        while !rest.isEmpty {
            let numberEnd = rest.firstIndex(where: { !$0.isASCII || !$0.isNumber }) ?? rest.endIndex
            digits = rest[rest.startIndex..<numberEnd]
            rest = rest[numberEnd...]
            guard !digits.isEmpty, let value = Int64(digits) else { return nil }
            let unitEnd = rest.firstIndex(where: { $0.isASCII && $0.isNumber }) ?? rest.endIndex
            let unit = rest[rest.startIndex..<unitEnd]
            rest = rest[unitEnd...]
            let scale: Int64
            switch unit {
            case "ms": scale = 1
            case "s": scale = 1_000
            case "m": scale = 60_000
            case "h": scale = 3_600_000
            case "d": scale = 86_400_000
            default: return nil
            }
            let (product, overflow1) = value.multipliedReportingOverflow(by: scale)
            let (sum, overflow2) = total.addingReportingOverflow(product)
            if overflow1 || overflow2 { return nil }
            total = sum
            sawComponent = true
        }
        return sawComponent ? .milliseconds(total) : nil
    }

    /// `1h30m`, `15m`, `2s`, `250ms`, `0s`.
    public static func format(_ duration: Duration) -> String {
        var ms = duration.milliseconds
        if ms == 0 { return "0s" }
        var out = ""
        if ms < 0 { out = "-"; ms = -ms }
        for (unit, size) in [("h", Int64(3_600_000)), ("m", 60_000), ("s", 1_000), ("ms", 1)] where ms >= size {
            out += "\(ms / size)\(unit)"
            ms %= size
        }
        return out
    }
}

extension Duration {
    /// Whole milliseconds, truncated.
    public var milliseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000 + attoseconds / 1_000_000_000_000_000
    }
}
