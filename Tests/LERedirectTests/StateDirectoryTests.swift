import Foundation
@testable import LERedirect
import LERedirectModel
import Testing

struct StateDirectoryTests {
    func temporary() -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("le-redirect-state-\(UUID().uuidString)").path
    }

    @Test func createsAPrivateDirectoryAndPrivateFiles() throws {
        let state = StateDirectory(path: temporary())
        try state.prepare()
        let attributes = try FileManager.default.attributesOfItem(atPath: state.path)
        #expect((attributes[.posixPermissions] as? NSNumber)?.intValue == 0o700)
        try state.writeJournal(JournalTestData.sample)
        let journal = try FileManager.default.attributesOfItem(atPath: state.journalPath)
        #expect((journal[.posixPermissions] as? NSNumber)?.intValue == 0o600)
        #expect(try state.readJournal() == JournalTestData.sample.encoded())
        try state.deleteJournal()
        #expect(try state.readJournal() == nil)
        try state.deleteJournal()  // idempotent
    }

    @Test func refusesASymlinkedDirectory() throws {
        let real = temporary()
        try FileManager.default.createDirectory(atPath: real, withIntermediateDirectories: false, attributes: [.posixPermissions: 0o700])
        let link = temporary()
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: real)
        #expect {
            try StateDirectory(path: link).prepare()
        } throws: { "\($0)".contains("symbolic link") }
    }

    @Test func refusesADirectoryOthersCanRead() throws {
        let path = temporary()
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false, attributes: [.posixPermissions: 0o755])
        #expect {
            try StateDirectory(path: path).prepare()
        } throws: { "\($0)".contains("accessible to other users") }
    }

    @Test func refusesASymlinkedJournal() throws {
        let state = StateDirectory(path: temporary())
        try state.prepare()
        try FileManager.default.createSymbolicLink(atPath: state.journalPath, withDestinationPath: "/etc/hostname")
        #expect {
            try state.readJournal()
        } throws: { "\($0)".contains("symbolic link") }
    }

    @Test func resolvesExplicitThenEnvironmentThenDefault() {
        #expect(StateDirectory.resolve("/tmp/x/").path == "/tmp/x")
        if ProcessInfo.processInfo.environment[StateDirectory.environmentVariable] == nil {
            #expect(StateDirectory.resolve(nil).path == "/run/le-redirect")
        }
    }

    @Test func aSecondLockWaitsAndTimesOutWithAClearMessage() throws {
        let state = StateDirectory(path: temporary())
        try state.prepare()
        let held = try state.lock()
        #expect {
            _ = try state.lock(timeout: .milliseconds(50))
        } throws: { ($0 as? LERedirectError)?.kind == .conflict && "\($0)".contains("pid \(getpid())") }
        held.release()
        let again = try state.lock(timeout: .milliseconds(50))
        again.release()
    }
}

enum JournalTestData {
    static let sample = Journal(
        phase: .installed, holder: ProcessIdentity(kind: .daemon, pid: 1, startTicks: 2, bootID: "b"),
        namespace: NamespaceIdentity(device: 1, inode: 2), backend: .nftables, port: 80, proxyPort: 12347,
        proxy: "external", createdAt: 1, expiresAt: 2,
        rules: [Journal.Entry(chain: ChainRef(.ip, "filter", "INPUT"), fingerprint: RuleFingerprint(7), handle: 3)])
}

struct ProcessFactsTests {
    @Test func thisProcessIsAliveAndARecycledPidIsNot() {
        let me = ProcessFacts.identity(kind: .embedded)
        #expect(me.startTicks > 0)
        #expect(ProcessFacts.isAlive(me))
        var recycled = me
        recycled.startTicks += 1
        #expect(!ProcessFacts.isAlive(recycled))
        var otherBoot = me
        otherBoot.bootID = "another-boot"
        #expect(!ProcessFacts.isAlive(otherBoot))
        #expect(!ProcessFacts.isAlive(ProcessIdentity(kind: .daemon, pid: Int32.max, startTicks: 1, bootID: me.bootID)))
    }
}

/// Sessions in two network namespaces never share a state directory by default.
struct DefaultStateDirectoryTests {
    let host = NamespaceIdentity(device: 4, inode: 4026531840), other = NamespaceIdentity(device: 4, inode: 4026532999)

    @Test func theHostsNamespaceKeepsRunLeRedirect() {
        #expect(StateDirectory.defaultPath(namespace: host, initial: host) == "/run/le-redirect")
    }

    @Test func anotherNamespaceGetsItsOwn() {
        #expect(StateDirectory.defaultPath(namespace: other, initial: host) == "/run/le-redirect/netns/4026532999")
    }

    @Test func withoutPIDOnesTheKernelsReservedInodeTells() {
        let reserved = NamespaceIdentity(device: 4, inode: 0xEFFF_FFF9)
        #expect(StateDirectory.defaultPath(namespace: reserved, initial: nil) == "/run/le-redirect")
        #expect(StateDirectory.defaultPath(namespace: other, initial: nil) == "/run/le-redirect/netns/4026532999")
        #expect(StateDirectory.defaultPath(namespace: nil, initial: host) == "/run/le-redirect")
    }
}
