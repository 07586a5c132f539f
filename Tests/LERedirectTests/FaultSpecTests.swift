import Foundation
import Glibc
@testable import LERedirect
import Testing

/// LE_REDIRECT_FAULT's grammar: a mistake must be refused, never read as "no fault" (a fault test
/// would then pass without its fault).
struct FaultSpecTests {
    @Test func stepsCallsOccurrencesAndAfter() throws {
        let specs = try Fault.parse("batch-sent, journal-intent-written iptables-legacy ip mangle=stop,"
            + "redirect-removed>netlink-send@2=EIO,fsync=5")
        #expect(specs == [
            Fault.Spec(after: nil, name: "batch-sent", occurrence: nil, action: .kill),
            Fault.Spec(after: nil, name: "journal-intent-written iptables-legacy ip mangle", occurrence: nil, action: .stop),
            Fault.Spec(after: "redirect-removed", name: "netlink-send", occurrence: 2, action: .fail(EIO)),
            Fault.Spec(after: nil, name: "fsync", occurrence: nil, action: .fail(5)),
        ])
    }

    @Test(arguments: [
        "batch-snet", "fsync", "fsync=kill", "bind=EWHATEVER", "batch-sent=EIO", "batch-sent@0", "batch-sent@x",
        "nowhere>fsync=EIO", "netlink-send>fsync=EIO",
    ])
    func mistakesAreRefused(_ text: String) {
        #expect(throws: FaultSpecError.self) { try Fault.parse(text) }
    }

    @Test func everyStepIsReachedSomewhere() throws {
        // Each name in the list appears as a literal at a call site of Fault.reach.
        let sources = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Sources/LERedirect")
        var text = ""
        for case let file as URL in FileManager.default.enumerator(at: sources, includingPropertiesForKeys: nil)!
        where file.pathExtension == "swift" && file.lastPathComponent != "Fault.swift" {
            text += try String(contentsOf: file, encoding: .utf8)
        }
        for step in Fault.steps {
            #expect(text.contains("Fault.reach(\"\(step)\""), "\(step) has no fault point")
        }
        for call in Fault.calls {
            #expect(text.contains("Fault.injectedErrno(\"\(call)\")") || call == "fsync" || call == "rename",
                "\(call) is never injected")
        }
    }
}
