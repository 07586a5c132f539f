/// The byte format of `Message`: a frame is a 4-byte big-endian length and that many bytes of
/// payload; a payload is a version byte, a message tag and the message's fields, each written by
/// `WireWriter` and read back by `WireReader`, which refuses anything malformed (a short field, a
/// count or length past what is left, invalid UTF-8, an unknown tag, bytes left over).
public enum WireFormat {
    public static let version: UInt8 = 3
    /// The largest payload either side sends or accepts (a status with its notes is a few KiB).
    public static let maxPayload = 256 * 1024
    /// Strings and arrays inside a payload are bounded too, so that a hostile length never makes
    /// a reader allocate more than the frame it already holds.
    public static let maxCount = 65_536
}

/// Why bytes are not a message.
public struct WireError: Error, Sendable, Hashable, CustomStringConvertible {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// Appends fields in the wire format.
public struct WireWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init() {}

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }
    public mutating func u16(_ v: UInt16) { bytes += [UInt8(v >> 8), UInt8(v & 0xff)] }
    public mutating func u32(_ v: UInt32) { for shift in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8((v >> UInt32(shift)) & 0xff)) } }
    public mutating func u64(_ v: UInt64) { for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8((v >> UInt64(shift)) & 0xff)) } }
    public mutating func i64(_ v: Int64) { u64(UInt64(bitPattern: v)) }
    public mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }
    public mutating func string(_ s: String) {
        let utf8 = Array(s.utf8)
        u32(UInt32(utf8.count))
        bytes += utf8
    }
    public mutating func optional<T>(_ v: T?, _ write: (inout WireWriter, T) -> Void) {
        guard let v else { return u8(0) }
        u8(1)
        write(&self, v)
    }
    public mutating func array<T>(_ items: [T], _ write: (inout WireWriter, T) -> Void) {
        u32(UInt32(items.count))
        for item in items { write(&self, item) }
    }
    public mutating func duration(_ d: Duration) { i64(d.milliseconds) }
}

/// Reads fields in the wire format; every read checks what is left.
public struct WireReader {
    private let bytes: [UInt8]
    private var offset = 0

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var isAtEnd: Bool { offset == bytes.count }

    private mutating func take(_ n: Int, _ what: String) throws(WireError) -> ArraySlice<UInt8> {
        guard n >= 0, bytes.count - offset >= n else { throw WireError("\(what): the payload ends early") }
        defer { offset += n }
        return bytes[offset..<offset + n]
    }

    public mutating func u8(_ what: String) throws(WireError) -> UInt8 { try take(1, what).first! }
    public mutating func bool(_ what: String) throws(WireError) -> Bool {
        switch try u8(what) {
        case 0: return false
        case 1: return true
        case let other: throw WireError("\(what): \(other) is not a boolean")
        }
    }
    public mutating func u16(_ what: String) throws(WireError) -> UInt16 {
        try take(2, what).reduce(0) { $0 << 8 | UInt16($1) }
    }
    public mutating func u32(_ what: String) throws(WireError) -> UInt32 {
        try take(4, what).reduce(0) { $0 << 8 | UInt32($1) }
    }
    public mutating func u64(_ what: String) throws(WireError) -> UInt64 {
        try take(8, what).reduce(0) { $0 << 8 | UInt64($1) }
    }
    public mutating func i64(_ what: String) throws(WireError) -> Int64 { Int64(bitPattern: try u64(what)) }
    public mutating func i32(_ what: String) throws(WireError) -> Int32 { Int32(bitPattern: try u32(what)) }
    public mutating func count(_ what: String) throws(WireError) -> Int {
        let n = Int(try u32(what))
        guard n <= WireFormat.maxCount, n <= bytes.count - offset else {
            throw WireError("\(what): a count of \(n) is more than the payload holds")
        }
        return n
    }
    public mutating func string(_ what: String) throws(WireError) -> String {
        let n = try count(what)
        let raw = try take(n, what)
        guard let s = String(validating: raw, as: UTF8.self) else { throw WireError("\(what): not UTF-8") }
        return s
    }
    public mutating func optional<T>(_ what: String, _ read: (inout WireReader) throws(WireError) -> T) throws(WireError) -> T? {
        try bool(what) ? try read(&self) : nil
    }
    public mutating func array<T>(_ what: String, _ read: (inout WireReader) throws(WireError) -> T) throws(WireError) -> [T] {
        let n = try count(what)
        var out: [T] = []
        out.reserveCapacity(n)
        for _ in 0..<n { out.append(try read(&self)) }
        return out
    }
    public mutating func duration(_ what: String) throws(WireError) -> Duration {
        let ms = try i64(what)
        guard ms >= 0, ms <= 366 * 24 * 3_600_000 else { throw WireError("\(what): \(ms) ms is out of range") }
        return .milliseconds(ms)
    }
    public mutating func port(_ what: String) throws(WireError) -> UInt16 {
        let p = try u16(what)
        guard p != 0 else { throw WireError("\(what): port 0") }
        return p
    }
}

/// Framing: how a frame's length is written and checked.
public enum WireFrame {
    /// The frame of `payload`.
    public static func frame(_ payload: [UInt8]) -> [UInt8] {
        var w = WireWriter()
        w.u32(UInt32(payload.count))
        return w.bytes + payload
    }

    /// The payload length a 4-byte header announces, checked against the limit.
    public static func length(_ header: [UInt8]) throws(WireError) -> Int {
        guard header.count == 4 else { throw WireError("a frame header is 4 bytes") }
        let n = header.reduce(0) { $0 << 8 | Int($1) }
        guard n > 0, n <= WireFormat.maxPayload else {
            throw WireError("a frame of \(n) bytes (at most \(WireFormat.maxPayload))")
        }
        return n
    }
}
