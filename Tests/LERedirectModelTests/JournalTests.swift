@testable import LERedirectModel
import Testing

struct JournalTests {
    static let sample = Journal(
        phase: .installed,
        holder: ProcessIdentity(kind: .daemon, pid: 4242, startTicks: 123_456, bootID: "2ac807cc-5b28-42ea-9e42-f33a3d3f2da9"),
        namespace: NamespaceIdentity(device: 4, inode: 4_026_532_177), backend: .nftables, port: 80, proxyPort: 12347,
        proxy: "external", createdAt: 1_795_430_918_365, expiresAt: 1_795_431_818_365,
        rules: [
            Journal.Entry(
                system: .iptablesLegacy, chain: ChainRef(.ip, "filter", "INPUT"), fingerprint: RuleFingerprint(7), preexisting: 0),
            Journal.Entry(chain: ChainRef(.ip, "filter", "INPUT"), fingerprint: RuleFingerprint(0xef65_a28f_ecae_3b7a), handle: 6),
            Journal.Entry(chain: ChainRef(.inet, "host-fw", "early/input"), fingerprint: RuleFingerprint(1), handle: 13),
            Journal.Entry(chain: ChainRef(.ip6, "t é%x", "sp ace\n"), fingerprint: RuleFingerprint(.max), handle: .max),
            Journal.Entry(
                system: .iptablesLegacy, kind: .redirect, chain: ChainRef(.ip6, "nat", "PREROUTING"),
                fingerprint: RuleFingerprint(9), preexisting: 2),
        ])

    @Test func roundTrips() throws {
        let text = Self.sample.encoded()
        #expect(try Journal.decode(text) == Self.sample)
        var intent = Self.sample
        intent.phase = .intent
        intent.rules = intent.rules.map {
            Journal.Entry(system: $0.system, kind: $0.kind, chain: $0.chain, fingerprint: $0.fingerprint)
        }
        #expect(try Journal.decode(intent.encoded()) == intent)
        var none = Self.sample
        none.rules = []
        #expect(try Journal.decode(none.encoded()) == none)
    }

    @Test func namesAreEncodedToOneWord() {
        let text = Self.sample.encoded()
        #expect(text.contains("rule nftables accept inet host-fw early%2finput 0000000000000001 13 -\n"))
        #expect(text.contains("rule nftables accept ip6 t%20%c3%a9%25x sp%20ace%0a "))
        #expect(text.contains("rule iptables-legacy redirect ip6 nat PREROUTING 0000000000000009 - 2\n"))
    }

    /// Any single changed byte anywhere is detected, never half-trusted.
    @Test func everyFlippedByteIsDetected() {
        let bytes = Array(Self.sample.encoded().utf8)
        for index in bytes.indices {
            var corrupted = bytes
            corrupted[index] ^= 0x01
            let text = String(decoding: corrupted, as: UTF8.self)
            #expect(throws: JournalError.self, "byte \(index)") { try Journal.decode(text) }
        }
    }

    @Test func everyTruncationIsDetected() {
        let text = Self.sample.encoded()
        for length in 0..<text.utf8.count {
            let truncated = String(decoding: Array(text.utf8.prefix(length)), as: UTF8.self)
            #expect(throws: JournalError.self, "length \(length)") { try Journal.decode(truncated) }
        }
    }

    @Test func aNewerVersionIsReportedAsSuch() throws {
        let body = "le-redirect journal 3\nphase installed\n"
        let text = body + "crc32 \(Hex.format(CRC32.checksum(body.utf8), width: 8))\n"
        #expect(throws: JournalError.newerVersion(3)) { try Journal.decode(text) }
    }

    /// A journal the previous format wrote (nftables accepts only) is still read.
    @Test func formatOneIsStillRead() throws {
        let body = "le-redirect journal 1\nphase installed\nholder daemon 7 8 b\nnetns 4 5\nbackend nftables\nport 80\n"
            + "proxy-port 12347\nproxy external\ncreated 1\nexpires 2\naccept ip filter INPUT 00000000000000ff 6\n"
        let journal = try Journal.decode(body + "crc32 \(Hex.format(CRC32.checksum(body.utf8), width: 8))\n")
        #expect(journal.backend == .nftables)
        #expect(journal.rules == [Journal.Entry(chain: ChainRef(.ip, "filter", "INPUT"), fingerprint: RuleFingerprint(0xff), handle: 6)])
    }

    /// A well-formed checksum over nonsense is still rejected: every field is checked.
    @Test(arguments: [
        "phase installed\n",  // nearly everything missing
        "phase gone\nholder daemon 1 2 b\nnetns 1 2\nbackend nftables\nport 80\nproxy-port 1\nproxy external\ncreated 1\nexpires 2\n",
        "phase installed\nholder daemon 1 2 b\nnetns 1 2\nbackend nftables\nport 80\nproxy-port 1\nproxy external\ncreated 1\nexpires 2\naccept ip filter INPUT 0000000000000001 -\n",
        "phase intent\nholder daemon 1 2 b\nnetns 1 2\nbackend nftables\nport 80\nport 81\nproxy-port 1\nproxy external\ncreated 1\nexpires 2\n",
        "phase intent\nholder daemon 1 2 b\nnetns 1 2\nbackend nftables\nport 99999\nproxy-port 1\nproxy external\ncreated 1\nexpires 2\n",
        "phase intent\nholder daemon 1 2 b\nnetns 1 2\nbackend nftables\nport 80\nproxy-port 1\nproxy external\ncreated 1\nexpires 2\nextra 1\n",
        "phase intent\nholder daemon 1 2 b\nnetns 1 2\nbackend nftables\nport 80\nproxy-port 1\nproxy external\ncreated 1\nexpires 2\naccept arp filter INPUT 0000000000000001 -\n",
        "phase intent\nholder daemon 1 2 b\nnetns 1 2\nbackend nftables\nport 80\nproxy-port 1\nproxy external\ncreated 1\nexpires 2\naccept ip filter INPUT 01 -\n",
        "phase intent\nholder daemon 1 2 b\nnetns 1 2\nbackend nftables\nport 80\nproxy-port 1\nproxy external\ncreated 1\nexpires 2\naccept ip filter INPUT 0000000000000001 0\n",
        "phase intent\nholder daemon 1 2 b\nnetns 1 2\nbackend nftables\nport 80\nproxy-port 1\nproxy external\ncreated 1\nexpires 2\naccept ip fil%zz INPUT 0000000000000001 -\n",
    ])
    func malformedBodiesAreCorrupt(_ fields: String) {
        let body = "le-redirect journal 1\n" + fields
        let text = body + "crc32 \(Hex.format(CRC32.checksum(body.utf8), width: 8))\n"
        #expect(throws: JournalError.self) { try Journal.decode(text) }
    }

    @Test func crc32MatchesTheStandardCheckValue() {
        #expect(CRC32.checksum("123456789".utf8) == 0xCBF4_3926)
    }
}
