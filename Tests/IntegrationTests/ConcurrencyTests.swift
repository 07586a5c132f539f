import Foundation
import Testing

@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct ConcurrencyTests {
    @Test func tenSimultaneousBeginsGiveExactlyOneSession() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let before = try net.ruleset()
        let outputs = Locked<[Output]>([])
        DispatchQueue.concurrentPerform(iterations: 10) { _ in
            if let output = try? net.leRedirect("begin", "--external-proxy") { outputs.mutate { $0.append(output) } }
        }
        let results = outputs.value
        #expect(results.count == 10)
        #expect(results.filter { $0.status == 0 }.count == 1, "\(results)")
        for failed in results where failed.status != 0 {
            #expect(failed.status == 1)
            #expect(failed.stderr.contains("already active"), "\(failed)")
        }
        let listing = try net.ruleset()
        #expect(listing.components(separatedBy: "tproxy to :12347").count - 1 == 1)
        #expect(listing.components(separatedBy: "table inet le_redirect").count - 1 == 1)
        #expect(try net.daemons().count == 1)
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.ruleset() == before)
    }

    @Test func endWithoutBeginExitsZero() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let before = try net.ruleset()
        let end = try net.leRedirect("end")
        #expect(end.status == 0, "\(end)")
        #expect(end.stdout.contains("no active session"))
        #expect(try net.leRedirect("begin", "--external-proxy").status == 0)
        #expect(try net.leRedirect("end").status == 0)
        let again = try net.leRedirect("end")
        #expect(again.status == 0)
        #expect(again.stdout.contains("no active session"))
        #expect(try net.ruleset() == before)
    }

    /// A hook runner waits for EOF on begin's stdout and stderr: the daemon must not hold them.
    @Test func beginReturnsAtOnceUnderAHookRunnerThatWaitsForEOF() throws {
        let net = try TestNetwork()
        defer { net.close() }
        // `$(...)` waits until every writer of the pipe has closed it.
        let started = Date()
        let output = try net.exec(
            net.host,
            ["sh", "-c", "out=$(\(Paths.binary) begin --external-proxy 2>&1); echo \"captured: $out\""], timeout: 20)
        #expect(output.status == 0, "\(output)")
        #expect(output.stdout.contains("captured: le-redirect: steering"))
        #expect(Date().timeIntervalSince(started) < 5)
        #expect(try net.status()["active"] as? Bool == true)
        #expect(try net.leRedirect("end").status == 0)
    }
}

final class Locked<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: T
    init(_ value: T) { stored = value }
    var value: T { lock.lock(); defer { lock.unlock() }; return stored }
    func mutate(_ body: (inout T) -> Void) { lock.lock(); defer { lock.unlock() }; body(&stored) }
}
