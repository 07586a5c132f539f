import Foundation
@testable import LERedirectModel
import Testing

/// Replays scripts/fuzz's seeds and every input it ever kept (Tests/Fuzz/crashes) through the
/// properties it checks, so that a crash once found stays fixed.
struct FuzzRegressionTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fuzz")

    static func inputs(_ target: String) throws -> [(String, [UInt8])] {
        try ["seeds", "crashes"].flatMap { kind in
            let dir = root.appendingPathComponent(kind).appendingPathComponent(target)
            let names = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { !$0.hasPrefix(".") }.sorted()
            return try names.map { name in
                ("\(kind)/\(target)/\(name)", [UInt8](try Data(contentsOf: dir.appendingPathComponent(name))))
            }
        }
    }

    @Test(arguments: ["head", "journal", "wire"])
    func keptInputsHoldEveryProperty(_ target: String) throws {
        let inputs = try Self.inputs(target)
        #expect(inputs.count(where: { $0.0.hasPrefix("seeds/") }) >= 3, "the seed corpus went missing")
        for (name, bytes) in inputs {
            do {
                switch target {
                case "head": try FuzzProperties.head(bytes)
                case "journal": try FuzzProperties.journal(bytes)
                default: try FuzzProperties.wire(bytes)
                }
            } catch {
                Issue.record("\(name): \(error)")
            }
        }
    }

    /// The seeds are what the fuzzer mutates: they must reach past the first refusal.
    @Test func seedsAreValid() throws {
        for (name, bytes) in try Self.inputs("journal") where name.hasPrefix("seeds/") {
            #expect(throws: Never.self, "\(name)") { try Journal.decode(String(decoding: bytes, as: UTF8.self)) }
        }
        for (name, bytes) in try Self.inputs("head") where name.hasPrefix("seeds/") {
            let end = bytes.withUnsafeBytes { HTTPHead.end(of: $0) }
            #expect(end != nil, "\(name) has no complete head")
        }
    }

    /// The properties catch what they are meant to: a journal field changed without its checksum is
    /// refused, and a property violation is reported, not swallowed.
    @Test func propertiesCanFail() throws {
        #expect(throws: FuzzProperties.Violation.self) { try FuzzProperties.check(false, "must fail") }
        let (_, seed) = try #require(try Self.inputs("journal").first { $0.0 == "seeds/journal/installed" })
        var text = String(decoding: seed, as: UTF8.self)
        text = text.replacingOccurrences(of: "port 80\n", with: "port 81\n")
        #expect(throws: JournalError.self) { try Journal.decode(text) }
    }
}
