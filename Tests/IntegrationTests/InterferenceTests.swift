import Foundation
import Glibc
import Testing

/// Invariant 1 when the host changes its own firewall during a window: le-redirect never deletes
/// anything that is not its own, `end` exits 0 (with a warning when the host took our rules out;
/// on nftables it cannot: our table is owned, and nothing of ours is anywhere else),
/// and the ruleset after `end` is exactly what the same change gives on the same host without
/// le-redirect (a second namespace, changed the same way, is the reference).
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct InterferenceTests {
    struct Change: Sendable, CustomTestStringConvertible {
        var name: String
        var host: Host
        /// Run in the host's namespace during the window, in order.
        var commands: [[String]]
        /// What end's warning says; nil when end must not warn.
        var warning: String?
        /// Whether the change leaves a ruleset other than the one before (a reload of the same
        /// file does not).
        var changes = true
        var testDescription: String { "\(host.backend): \(name)" }
    }

    static let reload = "flush ruleset\n" + ((try? String(contentsOfFile: Paths.ruleset("policy-drop"), encoding: .utf8)) ?? "")

    static let changes: [Change] = [
        // Our table is owned: a flush by anyone else leaves it (and nothing of ours is anywhere else).
        Change(name: "nft flush ruleset", host: .nftablesPolicyDrop, commands: [["nft", "flush", "ruleset"]], warning: nil),
        // A firewall service restarting: its whole file, flush included, as nftables.service loads it.
        Change(name: "nft -f of the whole ruleset", host: .nftablesPolicyDrop,
               commands: [["sh", "-c", "printf '%s' \"$0\" | nft -f -", reload]], warning: nil, changes: false),
        Change(name: "an input chain deleted", host: .nftablesPolicyDrop,
               commands: [["nft", "delete", "chain", "inet", "firewall", "inbound"]], warning: nil),
        Change(name: "a rule added to the input chain", host: .nftablesPolicyDrop,
               commands: [["nft", "insert", "rule", "inet", "firewall", "inbound", "tcp", "dport", "9999", "drop"]],
               warning: nil),
        Change(name: "iptables-restore of both families", host: .legacyDropForcedLegacy,
               commands: [
                   ["iptables-legacy-restore", Paths.xtablesRules("legacy-drop", "v4")],
                   ["ip6tables-legacy-restore", Paths.xtablesRules("legacy-drop", "v6")],
               ], warning: "was already gone"),
        Change(name: "iptables -t mangle -F PREROUTING", host: .legacyDropForcedLegacy,
               commands: [["iptables-legacy", "-w", "-t", "mangle", "-F", "PREROUTING"]],
               warning: "steering rule in iptables-legacy ip mangle PREROUTING was already gone"),
        Change(name: "a rule inserted at the top of INPUT, mangle and nat PREROUTING", host: .legacyDropForcedLegacy,
               commands: [
                   ["iptables-legacy", "-w", "-I", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "DROP"],
                   ["iptables-legacy", "-w", "-t", "mangle", "-I", "PREROUTING", "-p", "tcp", "--dport", "9997", "-j", "ACCEPT"],
                   ["iptables-legacy", "-w", "-t", "nat", "-I", "PREROUTING", "-p", "tcp", "--dport", "9998", "-j", "REDIRECT", "--to-ports", "80"],
               ], warning: nil),
    ]

    @Test(arguments: changes)
    func theHostsNewRulesetIsWhatEndLeaves(_ change: Change) throws {
        let net = try TestNetwork(change.host)
        defer { net.close() }
        let reference = try TestNetwork(change.host)
        defer { reference.close() }
        try net.startApp()
        let before = try net.ruleset()
        #expect(try reference.ruleset() == before)

        let begin = try net.leRedirect(["begin", "--external-proxy"] + change.host.begin)
        try #require(begin.status == 0, "\(begin)")
        for command in change.commands {
            for n in [net, reference] {
                let output = try n.exec(n.host, command)
                try #require(output.status == 0, "\(command): \(output)")
            }
        }
        let expected = try reference.ruleset()
        // A reload of the same rules lists as before; end's warning then shows our rules went.
        #expect(expected != before || change.warning != nil || !change.changes, "the change changed nothing")

        let end = try net.leRedirect("end")
        #expect(end.status == 0, "\(end)")
        if let warning = change.warning {
            #expect(end.stderr.contains(warning), "\(end)")
        } else {
            #expect(end.stderr.isEmpty, "\(end)")
        }
        #expect(try net.ruleset() == expected)
        #expect(try net.daemons().isEmpty)
        // And the next session works on the host's new ruleset.
        let again = try net.leRedirect(["begin", "--external-proxy"] + change.host.begin)
        #expect(again.status == 0, "\(again)")
        let againEnd = try net.leRedirect("end")
        #expect(againEnd.status == 0 && againEnd.stderr.isEmpty, "\(againEnd)")
        #expect(try net.ruleset() == expected)
    }

    /// Another tool commits in a loop during begin and end (nftables: every commit moves the
    /// generation on, and begin's batch, planned against the old one, is refused and planned again;
    /// x_tables: it holds the xtables lock between its commits). Both succeed; nothing is left.
    @Test(arguments: [
        (Host.nftablesPolicyDrop, "while :; do nft add chain inet firewall churn; nft delete chain inet firewall churn; done",
         ["nft", "delete", "chain", "inet", "firewall", "churn"]),
        (Host.legacyDropForcedLegacy,
         "while :; do iptables-legacy -w -A INPUT -p tcp --dport 9001 -j DROP; iptables-legacy -w -D INPUT -p tcp --dport 9001 -j DROP; done",
         ["iptables-legacy", "-w", "-D", "INPUT", "-p", "tcp", "--dport", "9001", "-j", "DROP"]),
    ])
    func anotherToolCommittingInALoop(host: Host, loop: String, cleanUp: [String]) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        let before = try net.ruleset()
        try net.start(net.host, ["sh", "-c", loop])
        usleep(200_000)
        for _ in 0..<5 {
            let begin = try net.leRedirect(["begin", "--external-proxy"] + host.begin)
            #expect(begin.status == 0, "\(begin)")
            let end = try net.leRedirect("end")
            #expect(end.status == 0 && end.stderr.isEmpty, "\(end)")
        }
        for pid in try net.processes(matching: "while :") { kill(pid, SIGKILL) }
        usleep(100_000)
        _ = try net.exec(net.host, cleanUp)  // the loop may have died between its two commands
        #expect(try net.ruleset() == before)
    }

    /// Two network namespaces, each with a session, both with the default state directory: neither
    /// sees the other's session, and each ends its own. Run in a mount namespace with /run on a
    /// tmpfs, so that the machine's /run/le-redirect is never touched.
    @Test func twoNamespacesWithTheDefaultStateDirectory() throws {
        let a = try TestNetwork(.nftablesPolicyDrop)
        defer { a.close() }
        let b = try TestNetwork(.legacyDropForcedLegacy)
        defer { b.close() }
        let beforeA = try a.ruleset(), beforeB = try b.ruleset()
        let script = #"""
            set -eu
            exec 3</run/netns/"$A" 4</run/netns/"$B"
            mount -t tmpfs -o mode=0755 le-redirect-test /run
            unset LE_REDIRECT_STATE_DIR
            a() { nsenter --net=/proc/self/fd/3 "$BIN" "$@"; }
            b() { nsenter --net=/proc/self/fd/4 "$BIN" "$@"; }
            a begin --external-proxy --ttl 2m >/dev/null
            b begin --external-proxy --backend iptables-legacy --ttl 2m >/dev/null
            echo "a $(a status --json | tr -d '\n ')"
            echo "b $(b status --json | tr -d '\n ')"
            echo "dirs $(ls /run/le-redirect/netns | sort | tr '\n' ' ')"
            echo "inodes $(stat -L -c %i /proc/self/fd/3 /proc/self/fd/4 | sort | tr '\n' ' ')"
            a end
            echo "b-after-a $(b status --json | tr -d '\n ')"
            b end
            """#
        let output = try run(
            ["unshare", "-m", "--propagation", "private", "bash", "-c", script],
            environment: ["A": a.host, "B": b.host, "BIN": Paths.binary], timeout: 60)
        #expect(output.status == 0, "\(output)")
        let lines = Dictionary(
            output.stdout.split(separator: "\n").map { line in
                (String(line.prefix { $0 != " " }), String(line.drop { $0 != " " }.dropFirst()))
            }, uniquingKeysWith: { $1 })
        #expect(lines["a"]?.contains("\"backend\":\"nftables\"") == true, "\(output)")
        #expect(lines["a"]?.contains("\"state\":\"active\"") == true, "\(output)")
        #expect(lines["b"]?.contains("\"backend\":\"iptables-legacy\"") == true, "\(output)")
        #expect(lines["b"]?.contains("\"state\":\"active\"") == true, "\(output)")
        #expect(lines["b-after-a"]?.contains("\"state\":\"active\"") == true, "\(output)")
        #expect(lines["dirs"] == lines["inodes"], "\(output)")
        #expect(try a.ruleset() == beforeA)
        #expect(try b.ruleset() == beforeB)
        #expect(try a.daemons().isEmpty && b.daemons().isEmpty)
    }
}
