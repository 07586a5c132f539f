// libFuzzer's entry point for scripts/fuzz: compiled with LERedirectModel's sources and
// Tests/LERedirectModelTests/FuzzProperties.swift, with -D FUZZ_HEAD, -D FUZZ_JOURNAL or -D FUZZ_WIRE.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = data.map { Array(UnsafeBufferPointer(start: $0, count: size)) } ?? []
    do {
        #if FUZZ_HEAD
        try FuzzProperties.head(bytes)
        #elseif FUZZ_JOURNAL
        try FuzzProperties.journal(bytes)
        #elseif FUZZ_WIRE
        try FuzzProperties.wire(bytes)
        #endif
    } catch {
        fatalError("\(error)")
    }
    return 0
}
