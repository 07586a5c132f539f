import Glibc

/// C enums arrive in Swift either as `Int` constants (anonymous enums) or as structs with a raw
/// value (named enums); these take both, so call sites read like the C they mirror.
@inline(__always) func u16(_ value: Int) -> UInt16 { UInt16(value) }
@inline(__always) func u16<T: RawRepresentable>(_ value: T) -> UInt16 where T.RawValue: BinaryInteger {
    UInt16(value.rawValue)
}
@inline(__always) func u32(_ value: Int) -> UInt32 { UInt32(value) }
@inline(__always) func u32<T: RawRepresentable>(_ value: T) -> UInt32 where T.RawValue: BinaryInteger {
    UInt32(value.rawValue)
}
@inline(__always) func u32(_ value: Int32) -> UInt32 { UInt32(value) }

/// A NUL-terminated C string as a Swift string (invalid UTF-8 repaired); "" for NULL.
func cString(_ pointer: UnsafePointer<CChar>?) -> String {
    guard let pointer else { return "" }
    return String(decoding: UnsafeRawBufferPointer(start: pointer, count: strlen(pointer)), as: UTF8.self)
}

/// IPPROTO_TCP. With two C modules including <netinet/in.h>, Swift attributes glibc's constant to
/// whichever it met first, so it is spelled out here rather than imported from one of them.
let ipprotoTCP: UInt8 = 6
