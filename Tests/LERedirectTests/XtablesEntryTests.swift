@testable import LERedirect
import Testing

/// The x_tables entry le-redirect builds for its steering rule. That it is byte for byte the entry
/// iptables makes for the text in rules/iptables-legacy.rules is proved against the kernel
/// (XtablesTests.legacyRulesAreRemovableWithIptablesItself: `iptables-legacy -D` with that text
/// finds it, and iptables compares whole entries); here, its shape and the fingerprint.
struct XtablesEntryTests {
    static let until: Int64 = 1_795_447_800  // 2026-11-23T15:30:00Z
    static let steer = RuleSpec.expiringSteer(port: 80, proxyPort: 12347, until: until)

    @Test(arguments: [Family.ip, .ip6])
    func theEntryMatchesSynsToLocalAddressesNotFromLoopbackAndSteers(_ family: Family) {
        let built = XtablesEntry.build(Self.steer, family: family)
        let objects = XtablesEntry.objects(built, family: family)
        #expect(objects.map { XtablesEntry.name(at: $0.offset, in: built) } == ["tcp", "addrtype", "time", "comment", "TPROXY"])
        #expect(XtablesEntry.targetName(of: built, family: family) == "TPROXY")
        #expect(built[objects.last!.offset + XtablesEntry.objectHeader - 1] == 1)  // revision 1, both families
        #expect(XtablesEntry.comment(of: built, family: family) == "LE")
        // `! -i lo`: the interface name, its mask (three bytes: "lo" and the NUL), the inversion
        // flag (ipt_ip: four addresses then iniface, outiface, their masks, proto, flags, invflags;
        // ip6t_ip6 the same with 16-byte addresses and a tos byte).
        let nameOffset = family == .ip ? 16 : 64
        let invflags = family == .ip ? 83 : 132
        #expect(Array(built[nameOffset..<(nameOffset + 3)]) == [0x6c, 0x6f, 0x00])
        #expect(Array(built[(nameOffset + 32)..<(nameOffset + 36)]) == [0xff, 0xff, 0xff, 0x00])
        #expect(built[invflags] == 0x01)
        // The port the listener is on, in network order, after the marks and the address.
        let target = objects.last!
        let data = Array(built[(target.offset + XtablesEntry.objectHeader)..<(target.offset + target.size)])
        #expect(Array(data[24..<26]) == [0x30, 0x3b])
        #expect(data[0..<24].allSatisfy { $0 == 0 })
        #expect(data[26...].allSatisfy { $0 == 0 })  // the struct's padding too: iptables -D compares it
    }

    /// The entry is the same bytes every time it is built: begin journals the fingerprint of one
    /// build and commits another, and recovery finds the rule by it (a struct's padding copied as
    /// the stack held it once made these differ, and recover left the rule behind).
    @Test(arguments: [Family.ip, .ip6])
    func buildingTwiceGivesTheSameBytes(_ family: Family) {
        for spec in [Self.steer, RuleSpec.expiringKeepDestination(port: 80, until: Self.until)] {
            var builds: Set<[UInt8]> = []
            for n in 0..<16 {
                // Something else on the stack between builds.
                let noise = (0..<(64 * (n + 1))).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ n) }
                builds.insert(XtablesEntry.build(spec, family: family) + (noise.isEmpty ? [1] : []))
            }
            #expect(builds.count == 1, "\(spec)")
        }
    }

    /// What the kernel keeps to itself, and name bytes it leaves unwritten, do not change a fingerprint.
    @Test func theFingerprintIgnoresCountersHookBookkeepingAndNamePadding() {
        let built = XtablesEntry.build(Self.steer, family: .ip)
        var kernel = built
        let layout = XtablesEntry.layout(.ip)
        kernel[layout.comefrom] = 0x7
        kernel[layout.counters] = 0x42
        kernel[layout.counters + 8] = 0x99
        let match = XtablesEntry.objects(kernel, family: .ip)[0]
        kernel[match.offset + 2 + 4] = 0xAA  // after "tcp\0"
        #expect(XtablesEntry.fingerprint(kernel, family: .ip) == XtablesEntry.fingerprint(built, family: .ip))
        #expect(XtablesEntry.packets(of: kernel, family: .ip) == 0x42)
        // A different port, or another deadline, is a different rule.
        let other = XtablesEntry.build(.expiringSteer(port: 80, proxyPort: 12348, until: Self.until), family: .ip)
        #expect(XtablesEntry.fingerprint(other, family: .ip) != XtablesEntry.fingerprint(kernel, family: .ip))
        let later = XtablesEntry.build(.expiringSteer(port: 80, proxyPort: 12347, until: Self.until + 1), family: .ip)
        #expect(XtablesEntry.fingerprint(later, family: .ip) != XtablesEntry.fingerprint(kernel, family: .ip))
        #expect(XtablesEntry.fingerprint(built, family: .ip6) != XtablesEntry.fingerprint(built, family: .ip))
    }
}
