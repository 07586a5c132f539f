import Glibc
import LERedirectModel

/// What the kernel says about processes and namespaces: the facts the journal records so that a
/// later process can tell whether a session's holder is still alive, and in which namespace it ran.
enum ProcessFacts {
    /// The fields of /proc/PID/stat le-redirect uses, or nil if there is no such process.
    private static func procStat(of pid: Int32) -> (state: Character, startTicks: UInt64)? {
        guard let bytes = try? readFile("/proc/\(pid)/stat") else { return nil }
        let text = String(decoding: bytes, as: UTF8.self)
        // The command name (field 2) is parenthesised and may contain spaces and ')'.
        guard let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // fields[0] is field 3 (the state letter); field 22 (start time) is fields[19].
        guard fields.count > 19, let state = fields[0].first, let ticks = UInt64(fields[19]) else { return nil }
        return (state, ticks)
    }

    /// The parent pid and command name of a process (/proc/PID/stat fields 4 and 2).
    private static func parentAndName(of pid: Int32) -> (parent: Int32, name: String)? {
        guard let bytes = try? readFile("/proc/\(pid)/stat") else { return nil }
        let text = String(decoding: bytes, as: UTF8.self)
        guard let open = text.firstIndex(of: "("), let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 1, let parent = Int32(fields[1]) else { return nil }
        return (parent, String(text[text.index(after: open)..<close]))
    }

    /// The program that ran the hook this process runs in: past the hook script (our parent, when
    /// it is a script: its name is its own, its executable a shell) and the `sh -c` wrappers hook
    /// runners use (shells by name), the first ancestor that is neither: certbot, or dehydrated and
    /// acme.sh, which are scripts themselves. Nil past init.
    static func nearestNonShellAncestor() -> (pid: Int32, name: String)? {
        let shells: Set<String> = ["sh", "dash", "bash", "zsh", "ash", "ksh", "mksh", "busybox", "env", "sudo", "timeout"]
        var pid = getppid()
        var first = true
        while pid > 1, let (parent, name) = parentAndName(of: pid) {
            var exe = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
            let n = readlink("/proc/\(pid)/exe", &exe, exe.count - 1)
            let program = n > 0 ? String(decoding: exe[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
            let script = shells.contains(String(program.split(separator: "/").last ?? ""))
            if !shells.contains(name) && !(first && script) { return (pid, name) }
            first = false
            pid = parent
        }
        return nil
    }

    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    static func startTicks(of pid: Int32) -> UInt64? { procStat(of: pid)?.startTicks }

    /// Whether the process is stopped (SIGSTOP, or a tracer): it will not answer on its socket.
    static func isStopped(_ pid: Int32) -> Bool {
        guard let state = procStat(of: pid)?.state else { return false }
        return state == "T" || state == "t"
    }

    static func bootID() -> String {
        guard let bytes = try? readFile("/proc/sys/kernel/random/boot_id") else { return "unknown" }
        let id = String(decoding: bytes, as: UTF8.self).filter { $0.isHexDigit || $0 == "-" }
        return id.isEmpty ? "unknown" : id
    }

    static func identity(of pid: Int32 = getpid(), kind: ProcessIdentity.Kind) -> ProcessIdentity {
        ProcessIdentity(kind: kind, pid: pid, startTicks: startTicks(of: pid) ?? 0, bootID: bootID())
    }

    /// True when the process that `identity` names is still running (not a recycled pid, not a
    /// zombie, same boot).
    static func isAlive(_ identity: ProcessIdentity) -> Bool {
        guard identity.bootID == bootID(), let stat = procStat(of: identity.pid), stat.startTicks == identity.startTicks
        else { return false }
        return stat.state != "Z"
    }

    /// The network namespace the calling thread is in.
    static func currentNamespace() throws(SystemError) -> NamespaceIdentity {
        try namespace(at: "/proc/thread-self/ns/net")
    }

    /// The network namespace of process `pid` (PID 1's is the host's own); needs root for others'.
    static func namespace(ofPID pid: Int32) throws(SystemError) -> NamespaceIdentity {
        try namespace(at: "/proc/\(pid)/ns/net")
    }

    private static func namespace(at path: String) throws(SystemError) -> NamespaceIdentity {
        var st = stat()
        try syscall("stat", path) { stat(path, &st) }
        return NamespaceIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }

    /// The running kernel's major and minor version (/proc/sys/kernel/osrelease), if readable.
    static let kernelVersion: (Int, Int)? = {
        guard let bytes = try? readFile("/proc/sys/kernel/osrelease") else { return nil }
        let parts = String(decoding: bytes, as: UTF8.self).split(whereSeparator: { !$0.isNumber }).prefix(2).compactMap { Int($0) }
        return parts.count == 2 ? (parts[0], parts[1]) : nil
    }()

    /// The addresses of this network namespace's interfaces (getifaddrs), or nil when they cannot
    /// be read. IPv6 link-local addresses are listed without their zone.
    static func localAddresses() -> [IPAddress]? {
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0 else { return nil }
        defer { freeifaddrs(list) }
        var found: [IPAddress] = []
        var next = list
        while let entry = next {
            defer { next = entry.pointee.ifa_next }
            guard let sa = entry.pointee.ifa_addr else { continue }
            switch Int32(sa.pointee.sa_family) {
            case AF_INET:
                let bytes = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sin in
                    withUnsafeBytes(of: sin.pointee.sin_addr) { Array($0) }
                }
                if let a = IPAddress(family: .ip, bytes: bytes) { found.append(a) }
            case AF_INET6:
                let bytes = sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { sin in
                    withUnsafeBytes(of: sin.pointee.sin6_addr) { Array($0) }
                }
                if let a = IPAddress(family: .ip6, bytes: bytes) { found.append(a) }
            default:
                continue
            }
        }
        return found
    }

    /// Whether the kernel can steer connections: nf_tables' tproxy expression and x_tables' TPROXY
    /// target. With `thorough` (detect): each loaded, built in (modules.builtin), loadable
    /// (modules.dep lists it), or its code present in /proc/kallsyms; unknown (nil) where nothing
    /// could be read; missing only where the module lists were read and name neither. Without it
    /// (begin): only what a few stat calls tell (see quickKernelSupport); never "missing".
    static func kernelSupport(thorough: Bool) -> KernelSupport {
        let release = (try? readFile("/proc/sys/kernel/osrelease")).map {
            String(decoding: $0, as: UTF8.self).trimmingCharacters(in: " \n")
        } ?? ""
        guard thorough else { return quickKernelSupport(release: release) }
        let builtin = (try? readFile("/lib/modules/\(release)/modules.builtin", maxBytes: 16 << 20)).map { String(decoding: $0, as: UTF8.self) }
        let dep = (try? readFile("/lib/modules/\(release)/modules.dep", maxBytes: 16 << 20)).map { String(decoding: $0, as: UTF8.self) }
        var symbols: String?
        if thorough, let bytes = try? readFile("/proc/kallsyms", maxBytes: 256 << 20) { symbols = String(decoding: bytes, as: UTF8.self) }
        var evidence: [String] = []
        func check(_ module: String, symbol: String) -> Bool? {
            if access("/sys/module/\(module)", F_OK) == 0 {
                evidence.append("\(module) loaded")
                return true
            }
            if let builtin, builtin.contains("/\(module).ko") {
                evidence.append("\(module) built in")
                return true
            }
            if let dep, dep.contains("/\(module).ko") {
                evidence.append("\(module) loadable")
                return true
            }
            if let symbols, symbols.contains(symbol) {
                evidence.append("\(module) in /proc/kallsyms")
                return true
            }
            if dep != nil || symbols != nil {
                evidence.append("\(module) in none of " + [dep != nil ? "modules.dep" : nil, symbols != nil ? "/proc/kallsyms" : nil]
                    .compactMap { $0 }.joined(separator: ", "))
                return false
            }
            return nil
        }
        let nft = check("nft_tproxy", symbol: " nft_tproxy_")
        let xt = check("xt_TPROXY", symbol: " tproxy_tg")
        return KernelSupport(
            nftTproxy: nft, xtTproxy: xt,
            evidence: evidence.isEmpty ? "no module list or symbol table could be read" : evidence.joined(separator: "; "))
    }

    /// begin's check: a few stat calls, no module list read (modules.dep runs to megabytes): loaded
    /// (/sys/module), or a module file in the usual place (the kernel loads it when begin's batch
    /// names the expression); otherwise unknown, and begin tries (a refusal names the module).
    private static func quickKernelSupport(release: String) -> KernelSupport {
        func present(_ module: String) -> Bool? {
            if access("/sys/module/\(module)", F_OK) == 0 { return true }
            for suffix in [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
            where access("/lib/modules/\(release)/kernel/net/netfilter/\(module)\(suffix)", F_OK) == 0 {
                return true
            }
            return nil
        }
        return KernelSupport(nftTproxy: present("nft_tproxy"), xtTproxy: present("xt_TPROXY"), evidence: "/sys/module and module files")
    }

    /// Whether the effective capability set holds CAP_NET_ADMIN (bit 12).
    static func hasNetAdmin() -> Bool {
        if geteuid() == 0 { return true }
        guard let bytes = try? readFile("/proc/self/status") else { return false }
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") where line.hasPrefix("CapEff:") {
            let hex = line.dropFirst("CapEff:".count).trimmingCharacters(in: " \t")
            if let caps = UInt64(hex, radix: 16) { return caps & (1 << 12) != 0 }
        }
        return false
    }
}

extension StringProtocol {
    func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s.removeFirst() }
        while let l = s.last, set.contains(l) { s.removeLast() }
        return String(s)
    }
}
