import Glibc
@testable import LERedirect
import Testing

/// How kernel errnos become messages: what was being done, on what, and a hint.
struct NftablesErrorTests {
    @Test func aKernelWithoutNfTablesIsUnsupported() {
        let e = NftablesFirewall.error(NetlinkError(stage: .open, errno: EPROTONOSUPPORT), doing: "opening a netfilter netlink socket", change: nil)
        #expect(e.reason == .unsupported)
        #expect(e.description.contains("opening a netfilter netlink socket"))
        #expect(e.description.contains("nf_tables"))
        let session = SessionEngine.failure("begin", e)
        #expect(session.kind == .unsupported)
        #expect(session.exitCode == 1)
    }

    @Test func aKernelWithoutOwnedTablesIsNamed() {
        let e = NftablesFirewall.error(
            NetlinkError(stage: .kernel, errno: EOPNOTSUPP), doing: "creating table inet le_redirect",
            change: .addOwnedTable(TableRef.own))
        #expect(e.reason == .unsupported)
        #expect(e.description.contains("Linux 5.12"))
    }

    @Test func noPrivilegeIsNotPermittedWithAHint() {
        let e = NftablesFirewall.error(NetlinkError(stage: .kernel, errno: EPERM), doing: "committing", change: nil)
        #expect(e.reason == .notPermitted)
        #expect(e.description.contains("CAP_NET_ADMIN"))
        #expect(SessionEngine.failure("begin", e).exitCode == 3)
    }

    @Test func aStaleGenerationIsRetryable() {
        #expect(NftablesFirewall.error(NetlinkError(stage: .kernel, errno: ERESTART), doing: "x", change: nil).reason == .generationChanged)
    }

    @Test func aMissingExpressionModuleIsNamed() {
        let change = FirewallChange.insertRule(ChainRef(.inet, "le_redirect", "prerouting"), .steer(set: "ports", proxyPort: 1))
        let e = NftablesFirewall.error(NetlinkError(stage: .kernel, errno: ENOENT), doing: "inserting the steering rule", change: change)
        #expect(e.reason == .unsupported)
        #expect(e.description.contains("nft_tproxy"))
    }
}
