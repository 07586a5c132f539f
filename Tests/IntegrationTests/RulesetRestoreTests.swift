import Foundation
import Glibc
import Testing

/// Invariant 1: after `end`, the host's ruleset (nftables and x_tables) is exactly what it was before
/// `begin`, whichever system holds the host's firewall and whichever holds the steering; and during
/// the window the host's own tables are untouched: only le-redirect's table is added (on the
/// legacy path, one rule per family in mangle PREROUTING).
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct RulesetRestoreTests {
    /// The listing without `table inet le_redirect { ... }`.
    static func withoutOwnTable(_ listing: String) -> String {
        guard let start = listing.range(of: "table inet le_redirect {") else { return listing }
        let rest = listing[start.lowerBound...]
        guard let close = rest.range(of: "\n}\n") ?? rest.range(of: "\n}") else { return listing }
        return String(listing[..<start.lowerBound] + listing[close.upperBound...])
    }

    /// `iptables-nft-save` and `ip6tables-nft-save`: how a host on iptables-nft sees its firewall.
    static func iptablesNftSave(_ net: TestNetwork) throws -> String {
        try ["iptables-nft-save", "ip6tables-nft-save"].map { tool in
            let out = try net.exec(net.host, [tool])
            return "\(tool) \(out.status)\n" + out.stdout.split(separator: "\n").filter { !$0.hasPrefix("#") }
                .map { $0.replacingOccurrences(of: #"\[\d+:\d+\]"#, with: "[]", options: .regularExpression) }
                .joined(separator: "\n")
        }.joined(separator: "\n")
    }

    @Test(arguments: Host.all)
    func beginThenEndRestoresTheRuleset(host: Host) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        let before = try net.ruleset()
        let nftBefore = try net.nftRuleset(), legacyBefore = try net.legacyRuleset()
        let iptablesNftBefore = try Self.iptablesNftSave(net)

        let begin = try net.leRedirect(["begin", "--external-proxy", "--ttl", "2m"] + host.begin)
        #expect(begin.status == 0, "\(begin)")
        #expect(try net.status()["backend"] as? String == host.backend)
        let nft = try net.nftRuleset(), legacy = try net.legacyRuleset()
        if host.backend == "nftables" {
            #expect(nft.contains("table inet le_redirect"))
            #expect(nft.contains("flags owner"))
            #expect(Self.withoutOwnTable(nft) == nftBefore)
            #expect(legacy == legacyBefore)
        } else {
            #expect(nft == nftBefore)
            // One expiring steering rule per family, at the end of x_tables' mangle PREROUTING; with
            // a nat table of the host's, one identity binding (ACCEPT) per family at its head.
            let ours = legacy.split(separator: "\n", omittingEmptySubsequences: false).filter { $0.contains("--comment LE") }
            let natTables = legacy.components(separatedBy: "*nat").count - 1
            #expect(ours.count == 2 + natTables)
            #expect(ours.allSatisfy { $0.hasPrefix("-A PREROUTING ! -i lo -p tcp") })
            #expect(ours.filter { $0.contains("-j TPROXY --on-port 12347 --on-ip ") && $0.hasSuffix(" --tproxy-mark 0x0/0x0") }.count == 2)
            #expect(ours.filter { $0.hasSuffix("-m comment --comment LE -j ACCEPT") }.count == natTables)
            let rest = legacy.split(separator: "\n", omittingEmptySubsequences: false).filter { !$0.contains("--comment LE") }
            #expect(rest.joined(separator: "\n") == legacyBefore)
        }
        // iptables-nft sees its tables as they were.
        #expect(try Self.iptablesNftSave(net) == iptablesNftBefore)
        #expect((try net.status()["acceptRules"] as? NSNumber)?.intValue ?? 0 == 0)

        let end = try net.leRedirect("end")
        #expect(end.status == 0, "\(end)")
        #expect(try net.ruleset() == before)
        #expect(!FileManager.default.fileExists(atPath: net.stateDirectory + "/journal"))
        #expect(!FileManager.default.fileExists(atPath: net.stateDirectory + "/control.sock"))
    }

    /// A journal the previous version wrote (its scoped accepts in the host's input chains, in
    /// nft's and iptables-nft's forms, or with x_tables its accepts and nat redirects), left by a
    /// session that was SIGKILLed: this version's `recover` removes exactly those rules.
    /// Rulesets/previous-version/ holds what that version left (generated with it; see README there).
    @Test func aJournalOfThePreviousVersionIsRecoveredExactly() throws {
        let old = Paths.rulesets.appendingPathComponent("previous-version")
        // nftables: the host's ruleset, then the accepts inserted as that version's batch did (its
        // rule handles come out the same in a fresh namespace).
        do {
            let net = try TestNetwork(ruleset: "policy-drop")
            defer { net.close() }
            let before = try net.ruleset()
            let accept = ["-p", "tcp", "--dport", "12347", "-m", "conntrack", "--ctstate", "DNAT", "--ctorigdstport", "80",
                          "-m", "comment", "--comment", "LE", "-j", "ACCEPT"]
            for command in [
                ["iptables-nft", "-I", "INPUT"] + accept, ["ip6tables-nft", "-I", "INPUT"] + accept,
                ["nft", "insert rule inet firewall inbound tcp dport 12347 ct status dnat ct original proto-dst 80 accept comment \"LE\""],
            ] {
                let out = try net.exec(net.host, command)
                try #require(out.status == 0, "\(out)")
            }
            let left = try String(contentsOf: old.appendingPathComponent("nftables.after-crash"), encoding: .utf8)
            #expect(try net.nftRuleset().trimmingCharacters(in: .whitespacesAndNewlines) == Normalise.listing(left).trimmingCharacters(in: .whitespacesAndNewlines))
            try Self.installJournal(old.appendingPathComponent("nftables.journal"), in: net)
            let recover = try net.leRedirect("recover")
            #expect(recover.status == 0, "\(recover)")
            #expect(recover.stdout.contains("3"), "\(recover)")
            #expect(try net.ruleset() == before)
            #expect(!FileManager.default.fileExists(atPath: net.stateDirectory + "/journal"))
        }
        // iptables-legacy: what that version's session left, restored as iptables-legacy-save listed it.
        do {
            let net = try TestNetwork(legacy: "legacy-drop")
            defer { net.close() }
            let before = try net.ruleset()
            for (tool, file) in [("iptables-legacy-restore", "legacy.v4.after-crash"), ("ip6tables-legacy-restore", "legacy.v6.after-crash")] {
                let out = try net.exec(net.host, ["sh", "-c", "\(tool) < \(old.appendingPathComponent(file).path)"])
                try #require(out.status == 0, "\(out)")
            }
            try Self.installJournal(old.appendingPathComponent("legacy.journal"), in: net)
            let recover = try net.leRedirect("recover")
            #expect(recover.status == 0, "\(recover)")
            #expect(try net.legacyRuleset().contains("--comment LE") == false)
            #expect(try net.ruleset() == before)
        }
    }

    /// Puts a journal fixture into the test's state directory, with this namespace's identity in
    /// place of the one it was written in (and its checksum redone): the journal of a dead session
    /// of this very namespace.
    static func installJournal(_ fixture: URL, in net: TestNetwork) throws {
        var lines = try String(contentsOf: fixture, encoding: .utf8).split(separator: "\n").map(String.init)
        let inside = try net.exec(net.host, ["stat", "-L", "-c", "%d %i", "/proc/self/ns/net"]).stdout
            .trimmingCharacters(in: .whitespacesAndNewlines)
        lines = lines.filter { !$0.hasPrefix("crc32 ") }.map { $0.hasPrefix("netns ") ? "netns \(inside)" : $0 }
        let body = lines.joined(separator: "\n") + "\n"
        let crc = String(format: "%08x", CRC32.of(Array(body.utf8)))
        try FileManager.default.createDirectory(atPath: net.stateDirectory, withIntermediateDirectories: true)
        chmod(net.stateDirectory, 0o700)
        try (body + "crc32 \(crc)\n").write(toFile: net.stateDirectory + "/journal", atomically: true, encoding: .utf8)
    }

    /// rules/nftables.nft is what the kernel lists after begin on a typical nftables host
    /// (Tests/IntegrationTests/Rulesets/policy-drop.nft).
    @Test func nftablesRulesFileMatchesWhatTheKernelLists() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let begin = try net.leRedirect("begin", "--external-proxy", "--ttl", "15m")
        #expect(begin.status == 0, "\(begin)")
        let listed = try net.nftRuleset()
        let expected = try Self.rulesFile("nftables.nft")
        #expect(listed.trimmingCharacters(in: .whitespacesAndNewlines) == expected.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(try net.leRedirect("end").status == 0)
    }

    /// rules/iptables-legacy.rules is what iptables-legacy-save and ip6tables-legacy-save list after
    /// begin on the legacy path on an x_tables host (Rulesets/legacy-drop.v4.rules and .v6.rules);
    /// the rule's --datestop is the session's expiry, to the second.
    @Test func iptablesLegacyRulesFileMatchesWhatTheKernelLists() throws {
        let net = try TestNetwork(legacy: "legacy-drop")
        defer { net.close() }
        let begin = try net.leRedirect("begin", "--external-proxy", "--backend", "iptables-legacy", "--ttl", "15m")
        #expect(begin.status == 0, "\(begin)")
        let expires = try #require(net.status()["expiresAt"] as? String)
        let listed = try net.legacyRuleset()
        #expect(listed.contains("--datestop \(expires.dropLast()) "), "expires \(expires)")
        let datestop = #"--datestop [0-9T:-]+"#
        let expected = try Self.rulesFile("iptables-legacy.rules")
        let normalised = { (text: String) in
            text.replacingOccurrences(of: datestop, with: "--datestop X", options: .regularExpression)
                .replacingOccurrences(of: #"\[\d+:\d+\]"#, with: "[]", options: .regularExpression)
                .trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(normalised(listed) == normalised(expected))
        #expect(try net.leRedirect("end").status == 0)
    }

    /// A rules file without its comment lines, but with the "# iptables-legacy-save" headings.
    static func rulesFile(_ name: String) throws -> String {
        let file = try String(contentsOf: Paths.repository.appendingPathComponent("rules/\(name)"), encoding: .utf8)
        return file.split(separator: "\n", omittingEmptySubsequences: false)
            .filter { !$0.hasPrefix("#") || $0.hasPrefix("# ip") }.joined(separator: "\n")
    }

    @Test func statusReportsTheSession() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        #expect(try net.status()["active"] as? Bool == false)
        let begin = try net.leRedirect("begin", "--external-proxy", "--port", "80", "--proxy-port", "12347", "--ttl", "5m")
        #expect(begin.status == 0, "\(begin)")
        let status = try net.status()
        #expect(status["active"] as? Bool == true)
        #expect(status["backend"] as? String == "nftables")
        #expect((status["port"] as? NSNumber)?.intValue == 80)
        #expect((status["proxyPort"] as? NSNumber)?.intValue == 12347)
        #expect((status["acceptRules"] as? NSNumber)?.intValue ?? 0 == 0)
        #expect(status["responding"] as? Bool == true)
        #expect(status["counters"] is [String: Any])
        let expires = try #require(status["expiresAt"] as? String)
        let formatter = ISO8601DateFormatter()
        let deadline = try #require(formatter.date(from: expires))
        #expect(abs(deadline.timeIntervalSinceNow - 300) < 10)
        let pid = try #require((status["pid"] as? NSNumber)?.int32Value)
        #expect(!processGone(pid))
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.status()["active"] as? Bool == false)
    }
}

/// The guard every kernel test relies on must be able to fail.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct NamespaceGuardTests {
    @Test func theTestProcessItselfCountsAsTheInitialNamespace() throws {
        let references = try TestNetwork.referenceNamespaces()
        let mine = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/net")
        #expect(references.contains(mine))
        let net = try TestNetwork()
        defer { net.close() }
        let inside = try net.exec(net.host, ["readlink", "/proc/self/ns/net"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(inside.hasPrefix("net:["))
        #expect(!references.contains(inside))
    }
}

/// The journal's checksum (CRC-32, as zlib computes it), for fixtures rewritten by a test.
enum CRC32 {
    static func of(_ bytes: [UInt8]) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes {
            crc ^= UInt32(byte)
            for _ in 0..<8 { crc = crc & 1 != 0 ? 0xEDB8_8320 ^ (crc >> 1) : crc >> 1 }
        }
        return crc ^ 0xFFFF_FFFF
    }
}
