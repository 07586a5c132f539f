import Foundation
import Glibc
import Testing

/// The host firewalls the invariant suites run against, and the backend begin picks on each.
struct Host: Sendable, CustomTestStringConvertible {
    var name: String
    /// Rulesets/NAME.nft, loaded with nft.
    var nft = "empty"
    /// Rulesets/NAME.v4.rules and .v6.rules, loaded with iptables-legacy-restore.
    var legacy: String?
    /// The same files, loaded with iptables-nft-restore.
    var iptablesNft: String?
    /// Extra arguments for begin.
    var begin: [String] = []
    /// The system status reports as holding the steering.
    var backend = "nftables"

    var testDescription: String { name }

    static let emptyHost = Host(name: "no tables")
    static let nftablesPolicyAccept = Host(name: "nftables, policy accept", nft: "policy-accept")
    static let nftablesPolicyDrop = Host(name: "nftables, policy drop", nft: "policy-drop")
    static let nftablesSeveralChains = Host(name: "nftables, several input chains", nft: "several-chains")
    /// An x_tables firewall on a kernel with owned tables: the steering is in our nftables table,
    /// and x_tables' own rules decide who reaches port 80.
    static let legacyDrop = Host(name: "iptables-legacy, policy drop", legacy: "legacy-drop")
    /// The same host through the legacy path (what kernels without owned tables get): mangle PREROUTING.
    static let legacyDropForcedLegacy = Host(
        name: "iptables-legacy, --backend iptables-legacy", legacy: "legacy-drop", begin: ["--backend", "iptables-legacy"],
        backend: "iptables-legacy")
    static let iptablesNftDrop = Host(name: "iptables-nft, policy drop", iptablesNft: "legacy-drop")
    static let bothDrop = Host(name: "iptables-legacy and iptables-nft, both policy drop", legacy: "legacy-drop", iptablesNft: "legacy-drop")
    static let bothDropForcedLegacy = Host(
        name: "both, --backend iptables-legacy", legacy: "legacy-drop", iptablesNft: "legacy-drop",
        begin: ["--backend", "iptables-legacy"], backend: "iptables-legacy")
    /// x_tables holds the firewall but has no mangle or nat table: none is made (x_tables tables
    /// cannot be deleted), and the steering is in nftables as everywhere.
    static let legacyFilterOnly = Host(name: "iptables-legacy without a mangle table", legacy: "legacy-filter-only")

    static let nftables = [emptyHost, nftablesPolicyAccept, nftablesPolicyDrop, nftablesSeveralChains]
    static let xtables = [legacyDrop, legacyDropForcedLegacy, iptablesNftDrop, bothDrop, bothDropForcedLegacy, legacyFilterOnly]
    static let all = nftables + xtables
}

/// Tables the kernel tests measure for docs/ (scripts/test prints them): with LE_REDIRECT_REPORT_DIR
/// set, each row goes to file TABLE there, prefixed by `order` for sorting.
enum TestReport {
    static func add(_ table: String, order: Int, _ row: String) {
        guard let dir = ProcessInfo.processInfo.environment["LE_REDIRECT_REPORT_DIR"] else { return }
        let fd = open(dir + "/" + table, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }
        let line = String(format: "%04d ", order) + row + "\n"
        _ = line.withCString { write(fd, $0, strlen($0)) }
        close(fd)
    }

    /// A message's first line, for a table cell.
    static func cell(_ text: String) -> String {
        let line = text.split(separator: "\n").first.map(String.init) ?? ""
        return line.replacingOccurrences(of: "|", with: "\\|").replacingOccurrences(of: "le-redirect: error: ", with: "")
    }
}
