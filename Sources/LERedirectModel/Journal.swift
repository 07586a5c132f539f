/// The crash-recovery record of a session: written and fsync'd before each commit (phase
/// `intent`) and rewritten once everything is in (phase `installed`). Whoever finds it with its
/// holder dead removes exactly the rules it lists.
///
/// The format is line-based text, one `key value` per line, checked by a CRC-32 on the last line; a
/// journal that fails any check is reported as corrupt and never half-trusted. Format 1 (nftables
/// accepts only) is still read.
package struct Journal: Hashable, Sendable {
    package static let formatVersion = 2
    package static let magic = "le-redirect journal"

    package enum Phase: String, Sendable, Hashable {
        /// Commits may or may not have happened; nftables handles are not all known.
        case intent
        /// Every commit happened; every rule's handle (or count) is recorded.
        case installed
    }

    package var phase: Phase
    package var holder: ProcessIdentity
    package var namespace: NamespaceIdentity
    /// The system that holds the redirect.
    package var backend: FirewallSystem
    package var port: UInt16
    package var proxyPort: UInt16
    package var proxy: String
    /// Unix time in milliseconds.
    package var createdAt: Int64
    package var expiresAt: Int64
    /// Every rule the session inserts into chains it does not own, in the order of their commits.
    package var rules: [Entry]

    /// One rule: where it was (or will be) inserted, what it is, and how to tell it from the host's.
    package struct Entry: Hashable, Sendable {
        package var system: FirewallSystem
        package var kind: RuleKind
        package var chain: ChainRef
        package var fingerprint: RuleFingerprint
        /// nftables: the kernel-assigned handle, once the commit reported it.
        package var handle: UInt64?
        /// x_tables, whose rules have no handles: how many rules with this fingerprint the chain
        /// held just before the commit that inserts it; nil while that commit is not prepared (so
        /// it cannot have happened). Removal deletes whatever is above this count.
        package var preexisting: Int?

        package init(
            system: FirewallSystem = .nftables, kind: RuleKind = .accept, chain: ChainRef, fingerprint: RuleFingerprint,
            handle: UInt64? = nil, preexisting: Int? = nil
        ) {
            self.system = system
            self.kind = kind
            self.chain = chain
            self.fingerprint = fingerprint
            self.handle = handle
            self.preexisting = preexisting
        }

        /// Whether everything removal needs is recorded.
        var isComplete: Bool { system == .nftables ? handle != nil : preexisting != nil }
    }

    package init(
        phase: Phase, holder: ProcessIdentity, namespace: NamespaceIdentity, backend: FirewallSystem, port: UInt16,
        proxyPort: UInt16, proxy: String, createdAt: Int64, expiresAt: Int64, rules: [Entry]
    ) {
        self.phase = phase
        self.holder = holder
        self.namespace = namespace
        self.backend = backend
        self.port = port
        self.proxyPort = proxyPort
        self.proxy = proxy
        self.createdAt = createdAt
        self.expiresAt = expiresAt
        self.rules = rules
    }

    /// The scoped accepts among the rules.
    package var accepts: [Entry] { rules.filter { $0.kind == .accept } }

    package func encoded() -> String {
        var body = "\(Self.magic) \(Self.formatVersion)\n"
        body += "phase \(phase.rawValue)\n"
        body += "holder \(holder.kind.rawValue) \(holder.pid) \(holder.startTicks) \(holder.bootID)\n"
        body += "netns \(namespace.device) \(namespace.inode)\n"
        body += "backend \(backend)\n"
        body += "port \(port)\n"
        body += "proxy-port \(proxyPort)\n"
        body += "proxy \(proxy)\n"
        body += "created \(createdAt)\n"
        body += "expires \(expiresAt)\n"
        for entry in rules {
            let c = entry.chain
            body += "rule \(entry.system) \(entry.kind.rawValue) \(c.table.family) \(Name.encode(c.table.name)) "
            body += "\(Name.encode(c.name)) \(entry.fingerprint) \(entry.handle.map(String.init) ?? "-") "
            body += "\(entry.preexisting.map(String.init) ?? "-")\n"
        }
        return body + "crc32 \(Hex.format(CRC32.checksum(body.utf8), width: 8))\n"
    }

    package static func decode(_ text: String) throws(JournalError) -> Journal {
        guard text.hasSuffix("\n") else { throw .corrupt("it does not end with a newline (truncated?)") }
        var lines = text.dropLast().split(separator: "\n", omittingEmptySubsequences: false)
        guard let header = lines.first, header.hasPrefix(Self.magic + " ") else {
            throw .corrupt("it does not start with '\(Self.magic)'")
        }
        guard let version = Int(header.dropFirst(Self.magic.count + 1)) else {
            throw .corrupt("its version is not a number")
        }
        if version > Self.formatVersion { throw .newerVersion(version) }
        guard version >= 1 else { throw .corrupt("unknown version \(version)") }
        guard let last = lines.popLast(), last.hasPrefix("crc32 "), let stored = UInt32(last.dropFirst(6), radix: 16),
            last.count == 14
        else { throw .corrupt("its checksum line is missing (truncated?)") }
        let body = lines.joined(separator: "\n") + "\n"
        let actual = CRC32.checksum(body.utf8)
        guard actual == stored else {
            throw .corrupt("checksum mismatch (stored \(Hex.format(stored, width: 8)), computed \(Hex.format(actual, width: 8)))")
        }

        var fields: [String: [Substring]] = [:]
        var rules: [Entry] = []
        for line in lines.dropFirst() {
            let words = line.split(separator: " ", omittingEmptySubsequences: false)
            guard let key = words.first, !key.isEmpty else { throw .corrupt("empty line") }
            let values = Array(words.dropFirst())
            if key == "accept" && version == 1 {
                rules.append(try decodeAccept(values))
            } else if key == "rule" && version >= 2 {
                rules.append(try decodeRule(values))
            } else {
                guard fields[String(key)] == nil else { throw .corrupt("'\(key)' appears twice") }
                fields[String(key)] = values
            }
        }
        func field(_ key: String, count: Int = 1) throws(JournalError) -> [Substring] {
            guard let values = fields.removeValue(forKey: key) else { throw .corrupt("'\(key)' is missing") }
            guard values.count == count, values.allSatisfy({ !$0.isEmpty }) else {
                throw .corrupt("'\(key)' has \(values.count) values, expected \(count)")
            }
            return values
        }
        func number<T: FixedWidthInteger>(_ text: Substring, _ key: String) throws(JournalError) -> T {
            guard let value = T(text) else { throw .corrupt("'\(key)' value '\(text)' is not a valid number") }
            return value
        }

        guard let phase = Phase(rawValue: String(try field("phase")[0])) else { throw .corrupt("unknown phase") }
        let h = try field("holder", count: 4)
        guard let kind = ProcessIdentity.Kind(rawValue: String(h[0])) else { throw .corrupt("unknown holder kind") }
        let holder = ProcessIdentity(
            kind: kind, pid: try number(h[1], "holder"), startTicks: try number(h[2], "holder"), bootID: String(h[3]))
        let n = try field("netns", count: 2)
        let namespace = NamespaceIdentity(device: try number(n[0], "netns"), inode: try number(n[1], "netns"))
        guard let backend = FirewallSystem(rawValue: String(try field("backend")[0])) else {
            throw .corrupt("unknown backend")
        }
        let journal = Journal(
            phase: phase, holder: holder, namespace: namespace, backend: backend,
            port: try number(try field("port")[0], "port"), proxyPort: try number(try field("proxy-port")[0], "proxy-port"),
            proxy: String(try field("proxy")[0]), createdAt: try number(try field("created")[0], "created"),
            expiresAt: try number(try field("expires")[0], "expires"), rules: rules)
        if let extra = fields.keys.sorted().first { throw .corrupt("unknown key '\(extra)'") }
        if phase == .installed, journal.rules.contains(where: { !$0.isComplete }) {
            throw .corrupt("an installed journal lists a rule without its handle or count")
        }
        return journal
    }

    private static func decodeRule(_ v: [Substring]) throws(JournalError) -> Entry {
        guard v.count == 8, let system = FirewallSystem(rawValue: String(v[0])), let kind = RuleKind(rawValue: String(v[1])),
            let family = Family(rawValue: String(v[2])), let table = Name.decode(v[3]), let chain = Name.decode(v[4]),
            v[5].count == 16, let fingerprint = UInt64(v[5], radix: 16)
        else { throw .corrupt("malformed rule line") }
        var entry = Entry(
            system: system, kind: kind, chain: ChainRef(family, table, chain), fingerprint: RuleFingerprint(fingerprint))
        if v[6] != "-" {
            guard system == .nftables, let h = UInt64(v[6]), h > 0 else { throw .corrupt("malformed rule handle") }
            entry.handle = h
        }
        if v[7] != "-" {
            guard system == .iptablesLegacy, let n = Int(v[7]), n >= 0 else { throw .corrupt("malformed rule count") }
            entry.preexisting = n
        }
        return entry
    }

    /// Format 1's `accept FAMILY TABLE CHAIN FINGERPRINT HANDLE`: an nftables scoped accept.
    private static func decodeAccept(_ v: [Substring]) throws(JournalError) -> Entry {
        guard v.count == 5, let family = Family(rawValue: String(v[0])), let table = Name.decode(v[1]),
            let chain = Name.decode(v[2]), v[3].count == 16, let fingerprint = UInt64(v[3], radix: 16)
        else { throw .corrupt("malformed accept line") }
        var handle: UInt64?
        if v[4] != "-" {
            guard let h = UInt64(v[4]), h > 0 else { throw .corrupt("malformed accept handle") }
            handle = h
        }
        return Entry(chain: ChainRef(family, table, chain), fingerprint: RuleFingerprint(fingerprint), handle: handle)
    }

    /// Table and chain names may hold any byte nft accepts; in the journal they are percent-encoded.
    enum Name {
        static func encode(_ name: String) -> String {
            var out = ""
            for byte in name.utf8 {
                let c = Character(Unicode.Scalar(byte))
                if byte < 0x80, c.isLetter || c.isNumber || c == "_" || c == "-" || c == "." {
                    out.append(c)
                } else {
                    out += "%" + Hex.format(byte, width: 2)
                }
            }
            return out.isEmpty ? "%" : out
        }

        static func decode(_ text: Substring) -> String? {
            if text == "%" { return "" }
            var bytes: [UInt8] = []
            var i = text.utf8.startIndex
            let utf8 = text.utf8
            while i < utf8.endIndex {
                if utf8[i] == UInt8(ascii: "%") {
                    let a = utf8.index(after: i)
                    guard a < utf8.endIndex, utf8.index(after: a) < utf8.endIndex else { return nil }
                    let b = utf8.index(after: a)
                    guard let byte = UInt8(String(decoding: utf8[a...b], as: UTF8.self), radix: 16) else { return nil }
                    bytes.append(byte)
                    i = utf8.index(after: b)
                } else {
                    bytes.append(utf8[i])
                    i = utf8.index(after: i)
                }
            }
            return String(validating: bytes, as: UTF8.self)
        }
    }
}

package enum JournalError: Error, Sendable, Hashable, CustomStringConvertible {
    case corrupt(String)
    case newerVersion(Int)

    package var description: String {
        switch self {
        case .corrupt(let why): "the journal is corrupt: \(why)"
        case .newerVersion(let v):
            "the journal was written by a newer le-redirect (format \(v), this one reads \(Journal.formatVersion))"
        }
    }
}

/// A process, identified so that a recycled pid is not mistaken for it.
package struct ProcessIdentity: Hashable, Sendable {
    package enum Kind: String, Sendable, Hashable {
        /// The detached `le-redirect` session daemon.
        case daemon
        /// A program that embeds the library and holds the session itself.
        case embedded
    }

    package var kind: Kind
    package var pid: Int32
    /// The process's start time in clock ticks since boot (/proc/PID/stat field 22).
    package var startTicks: UInt64
    /// /proc/sys/kernel/random/boot_id: pids and start times mean nothing across a reboot.
    package var bootID: String

    package init(kind: Kind, pid: Int32, startTicks: UInt64, bootID: String) {
        self.kind = kind
        self.pid = pid
        self.startTicks = startTicks
        self.bootID = bootID
    }
}

/// A network namespace, by the device and inode of its nsfs file.
package struct NamespaceIdentity: Hashable, Sendable, CustomStringConvertible {
    package var device: UInt64
    package var inode: UInt64

    package init(device: UInt64, inode: UInt64) {
        self.device = device
        self.inode = inode
    }

    package var description: String { "net:[\(inode)]" }
}

package enum CRC32 {
    private static let table: [UInt32] = (0..<256).map { i in
        var c = UInt32(i)
        for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }

    package static func checksum<S: Sequence>(_ bytes: S) -> UInt32 where S.Element == UInt8 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes { crc = table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8) }
        return crc ^ 0xFFFF_FFFF
    }
}
