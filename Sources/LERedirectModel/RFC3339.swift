/// Formats Unix time (milliseconds) as RFC 3339 in UTC, e.g. `2026-11-23T09:41:05Z`.
public enum RFC3339 {
    public static func format(unixMilliseconds ms: Int64) -> String {
        format(ms, milliseconds: false)
    }

    /// With the milliseconds, e.g. `2026-11-23T09:41:05.123Z` (session.log's timestamps).
    public static func formatWithMilliseconds(unixMilliseconds ms: Int64) -> String {
        format(ms, milliseconds: true)
    }

    private static func format(_ ms: Int64, milliseconds: Bool) -> String {
        let seconds = ms >= 0 ? ms / 1000 : (ms - 999) / 1000
        var days = seconds >= 0 ? seconds / 86_400 : (seconds - 86_399) / 86_400
        let secondOfDay = seconds - days * 86_400
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        days += 719_468
        let era = (days >= 0 ? days : days - 146_096) / 146_097
        let dayOfEra = days - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36_524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let mp = (5 * dayOfYear + 2) / 153
        let day = dayOfYear - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        let year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
        func two(_ v: Int64) -> String { v < 10 ? "0\(v)" : "\(v)" }
        let fraction = ms - seconds * 1000
        let millis = milliseconds ? "." + String(repeating: "0", count: fraction < 10 ? 2 : fraction < 100 ? 1 : 0) + "\(fraction)" : ""
        return "\(year)-\(two(month))-\(two(day))T\(two(secondOfDay / 3600)):\(two(secondOfDay % 3600 / 60)):"
            + "\(two(secondOfDay % 60))\(millis)Z"
    }
}
