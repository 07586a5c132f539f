import Synchronization

/// An in-memory nf_tables (or x_tables) for unit tests: the state one network namespace's kernel
/// would hold for one system, shared by every `FakeFirewall` connection made to it. It keeps the
/// kernel's semantics that the session logic depends on: atomic commits that roll back whole,
/// generations, per-table handles, owned tables that only their connection may change and that die
/// with it; and for x_tables: no handles, no generation, one table per commit, tables that commits
/// never create.
package final class FakeKernel: Sendable {
    package struct Rule: Hashable, Sendable {
        package var handle: UInt64
        /// What `nft list` would print for the rule (without handle).
        package var text: String
        package var fingerprint: RuleFingerprint
        package var comment: String?
        package var packets: UInt64 = 0
    }

    package struct Chain: Hashable, Sendable {
        package var info: HostChain
        package var rules: [Rule] = []
    }

    package struct Table: Hashable, Sendable {
        package var ref: TableRef
        package var owner: Int?
        package var chains: [Chain] = []
        package var sets: [String: PortSet] = [:]
        package var nextHandle: UInt64 = 1
    }

    /// A set of ports, each with the timeout it was added with.
    package struct PortSet: Hashable, Sendable, CustomStringConvertible {
        package var elements: [UInt16: Duration] = [:]

        package var description: String {
            "type inet_service; flags timeout; elements = { "
                + elements.sorted { $0.key < $1.key }.map { "\($0.key) timeout \(DurationText.format($0.value))" }
                .joined(separator: ", ") + " }"
        }
    }

    package struct State: Hashable, Sendable {
        package var generation: UInt32 = 1
        package var tables: [Table] = []
        package var nextConnection = 1
    }

    /// Lets a test break a commit: called with each change before it is applied; returning an error
    /// makes the whole commit fail (and roll back) with it.
    package typealias Fault = @Sendable (FirewallChange) -> FirewallError?

    let state = Mutex(State())
    let fault = Mutex<Fault?>(nil)
    /// Runs once before the next commit is checked, as another process committing meanwhile would.
    let interloper = Mutex<(@Sendable (FakeKernel) -> Void)?>(nil)

    /// When set, the next commit is applied but reports `.outcomeUnknown`, as a lost netlink reply would.
    let loseReply = Mutex(false)

    package let system: FirewallSystem

    package init(_ system: FirewallSystem = .nftables) { self.system = system }

    package func loseNextReply() { loseReply.withLock { $0 = true } }

    /// A kernel holding what this one holds now, as a crash at this moment would leave it (tables
    /// owned by a connection die with it).
    package func crashImage() -> FakeKernel {
        let image = FakeKernel(system)
        let now = state.withLock { $0 }
        image.state.withLock { s in
            s = now
            s.tables.removeAll { $0.owner != nil }
        }
        return image
    }

    package func injectFault(_ fault: Fault?) { self.fault.withLock { $0 = fault } }

    package func beforeNextCommit(_ body: @escaping @Sendable (FakeKernel) -> Void) {
        interloper.withLock { $0 = body }
    }

    package var generation: UInt32 { state.withLock { $0.generation } }

    // MARK: The host's side: set up rulesets as a test host would have them.

    package func addTable(_ ref: TableRef) {
        state.withLock { s in
            if !s.tables.contains(where: { $0.ref == ref }) { s.tables.append(Table(ref: ref)) }
            s.generation &+= 1
        }
    }

    package func addChain(_ info: HostChain) {
        addTable(info.ref.table)
        state.withLock { s in
            let t = s.tables.firstIndex(where: { $0.ref == info.ref.table })!
            s.tables[t].chains.append(Chain(info: info))
            s.tables[t].nextHandle += 1
            s.generation &+= 1
        }
    }

    /// Appends a host rule; its text is what `nft list` would show.
    @discardableResult
    package func addRule(_ chain: ChainRef, _ text: String, comment: String? = nil) -> RuleLocation {
        state.withLock { s in
            let t = s.tables.firstIndex(where: { $0.ref == chain.table })!
            let c = s.tables[t].chains.firstIndex(where: { $0.info.ref == chain })!
            let handle = s.tables[t].nextHandle
            s.tables[t].nextHandle += 1
            let full = comment.map { "\(text) comment \"\($0)\"" } ?? text
            s.tables[t].chains[c].rules.append(
                Rule(handle: handle, text: full, fingerprint: RuleFingerprint(hashing: full.utf8), comment: comment))
            s.generation &+= 1
            return RuleLocation(chain, handle: handle)
        }
    }

    /// Appends a rule identical to the one le-redirect inserts for `spec` (one a host kept from an
    /// earlier session, say).
    package func addRule(_ chain: ChainRef, _ spec: RuleSpec) {
        state.withLock { s in
            let t = s.tables.firstIndex(where: { $0.ref == chain.table })!
            let c = s.tables[t].chains.firstIndex(where: { $0.info.ref == chain })!
            let handle = s.tables[t].nextHandle
            s.tables[t].nextHandle += 1
            s.tables[t].chains[c].rules.append(
                Rule(handle: handle, text: spec.description, fingerprint: FakeFirewall.fingerprint(spec, chain.table.family), comment: ruleTag))
            s.generation &+= 1
        }
    }

    package func deleteTable(_ ref: TableRef) {
        state.withLock { s in
            s.tables.removeAll { $0.ref == ref }
            s.generation &+= 1
        }
    }

    /// The ports of a set, or nil when the table or set does not exist.
    package func setElements(_ table: TableRef, _ set: String) -> [UInt16]? {
        state.withLock { s in
            s.tables.first { $0.ref == table }?.sets[set].map { $0.elements.keys.sorted() }
        }
    }

    /// `nft list ruleset` without handles: what the invariants compare.
    package func listing() -> String {
        state.withLock { s in
            var out = ""
            for table in s.tables {
                out += "table \(table.ref) {\n"
                for (name, body) in table.sets.sorted(by: { $0.key < $1.key }) {
                    out += "\tset \(name) { \(body) }\n"
                }
                for chain in table.chains {
                    out += "\tchain \(chain.info.ref.name) {\n"
                    if let hook = chain.info.hook {
                        out += "\t\ttype \(chain.info.type ?? "filter") hook \(hook) priority \(chain.info.priority ?? 0);"
                        out += " policy \((chain.info.policy ?? .accept).rawValue);\n"
                    }
                    for rule in chain.rules { out += "\t\t\(rule.text)\n" }
                    out += "\t}\n"
                }
                out += "}\n"
            }
            return out
        }
    }

    /// Rules whose comment is `tag`, anywhere.
    package func rules(taggedWith tag: String) -> [RuleLocation] {
        state.withLock { s in
            s.tables.flatMap { t in
                t.chains.flatMap { c in c.rules.filter { $0.comment == tag }.map { RuleLocation(c.info.ref, handle: $0.handle) } }
            }
        }
    }

    package func tableExists(_ ref: TableRef) -> Bool {
        state.withLock { s in s.tables.contains { $0.ref == ref } }
    }

    package func connect() -> FakeFirewall {
        let id = state.withLock { s in
            defer { s.nextConnection += 1 }
            return s.nextConnection
        }
        return FakeFirewall(kernel: self, connection: id)
    }

    /// What the kernel does when a netlink socket closes: it deletes the tables the socket owns.
    func release(connection: Int) {
        state.withLock { s in
            let before = s.tables.count
            s.tables.removeAll { $0.owner == connection }
            if s.tables.count != before { s.generation &+= 1 }
        }
    }

    func commit(_ changes: [FirewallChange], expecting generation: UInt32?, connection: Int) throws(FirewallError)
        -> [InsertedRule]
    {
        if let body = interloper.withLock({ i -> (@Sendable (FakeKernel) -> Void)? in
            defer { i = nil }
            return i
        }) {
            body(self)
        }
        let fault = self.fault.withLock { $0 }
        if system == .iptablesLegacy, Set(changes.map(\.table)).count > 1 {
            throw FirewallError(.other, doing: "committing", detail: "an x_tables commit replaces one table")
        }
        let result: Result<[InsertedRule], FirewallError> = state.withLock { s in
            if system == .nftables, let generation, generation != s.generation {
                return .failure(FirewallError(.generationChanged, doing: "committing", detail: "generation changed"))
            }
            var next = s  // applied to a copy: a failure leaves `s` as it was
            var inserted: [InsertedRule] = []
            for change in changes {
                if let error = fault?(change) { return .failure(error) }
                do throws(FirewallError) {
                    if let rule = try Self.apply(change, to: &next, connection: connection, system: system) {
                        inserted.append(rule)
                    }
                } catch {
                    return .failure(error)
                }
            }
            next.generation &+= 1
            s = next
            return .success(inserted)
        }
        let inserted = try result.get()
        if loseReply.withLock({ l in defer { l = false }; return l }) {
            throw FirewallError(.outcomeUnknown, doing: "reading the reply", detail: "reply lost")
        }
        return inserted
    }

    private static func apply(
        _ change: FirewallChange, to s: inout State, connection: Int, system: FirewallSystem
    ) throws(FirewallError) -> InsertedRule? {
        if system == .iptablesLegacy {
            switch change {
            case .insertRule, .deleteMatching: break
            default: throw FirewallError(.unsupported, doing: "\(change)", detail: "x_tables has no such object")
            }
        }
        func table(_ ref: TableRef) throws(FirewallError) -> Int {
            guard let t = s.tables.firstIndex(where: { $0.ref == ref }) else {
                throw FirewallError(.notFound, doing: "\(change)", detail: "No such file or directory")
            }
            if let owner = s.tables[t].owner, owner != connection {
                throw FirewallError(.notPermitted, doing: "\(change)", detail: "Operation not permitted")
            }
            return t
        }
        func chain(_ ref: ChainRef, _ t: Int) throws(FirewallError) -> Int {
            guard let c = s.tables[t].chains.firstIndex(where: { $0.info.ref == ref }) else {
                throw FirewallError(.notFound, doing: "\(change)", detail: "No such file or directory")
            }
            return c
        }
        switch change {
        case .addOwnedTable(let ref):
            if s.tables.contains(where: { $0.ref == ref }) {
                throw FirewallError(.alreadyExists, doing: "\(change)", detail: "File exists")
            }
            s.tables.append(Table(ref: ref, owner: connection))
        case .addPortSet(let ref, let name, let ports, let timeout):
            let t = try table(ref)
            s.tables[t].sets[name] = PortSet(elements: Dictionary(uniqueKeysWithValues: ports.map { ($0, timeout) }))
            s.tables[t].nextHandle += 1
        case .addSetElement(let ref, let name, let port, let timeout):
            let t = try table(ref)
            guard var set = s.tables[t].sets[name] else {
                throw FirewallError(.notFound, doing: "\(change)", detail: "No such file or directory")
            }
            guard set.elements[port] == nil else {
                throw FirewallError(.alreadyExists, doing: "\(change)", detail: "File exists")
            }
            set.elements[port] = timeout
            s.tables[t].sets[name] = set
        case .deleteSetElement(let ref, let name, let port):
            let t = try table(ref)
            guard var set = s.tables[t].sets[name], set.elements.removeValue(forKey: port) != nil else {
                throw FirewallError(.notFound, doing: "\(change)", detail: "No such file or directory")
            }
            s.tables[t].sets[name] = set
        case .addBaseChain(let ref, let type, let hook, let priority):
            let t = try table(ref.table)
            s.tables[t].chains.append(
                Chain(info: HostChain(ref, hook: hook, type: type, priority: priority, policy: .accept)))
            s.tables[t].nextHandle += 1
        case .insertRule(let ref, let spec):
            let t = try table(ref.table)
            let c = try chain(ref, t)
            let handle = s.tables[t].nextHandle
            s.tables[t].nextHandle += 1
            let fingerprint = FakeFirewall.fingerprint(spec, ref.table.family)
            s.tables[t].chains[c].rules.insert(
                Rule(handle: handle, text: spec.description, fingerprint: fingerprint, comment: ruleTag),
                at: spec.appendsToChain ? s.tables[t].chains[c].rules.count : 0)
            return InsertedRule(ref, handle: system == .nftables ? handle : nil, fingerprint: fingerprint)
        case .deleteTable(let ref):
            let t = try table(ref)
            s.tables.remove(at: t)
        case .deleteRule(let location):
            let t = try table(location.chain.table)
            let c = try chain(location.chain, t)
            guard let r = s.tables[t].chains[c].rules.firstIndex(where: { $0.handle == location.handle }) else {
                throw FirewallError(.notFound, doing: "\(change)", detail: "No such file or directory")
            }
            s.tables[t].chains[c].rules.remove(at: r)
        case .deleteMatching(let ref, let fingerprint, let count):
            let t = try table(ref.table)
            let c = try chain(ref, t)
            for _ in 0..<count {
                guard let r = s.tables[t].chains[c].rules.firstIndex(where: { $0.fingerprint == fingerprint }) else {
                    throw FirewallError(.notFound, doing: "\(change)", detail: "Bad rule (does a matching rule exist in that chain?)")
                }
                s.tables[t].chains[c].rules.remove(at: r)
            }
        }
        return nil
    }

    func snapshot(connection: Int) -> FirewallSnapshot {
        state.withLock { s in
            let legacy = system == .iptablesLegacy
            return FirewallSnapshot(
                generation: legacy ? 0 : s.generation,
                tables: s.tables.map {
                    HostTable($0.ref, ownedByAnotherProcess: $0.owner != nil && $0.owner != connection)
                },
                chains: s.tables.flatMap {
                    $0.chains.map { chain in
                        var info = chain.info
                        if legacy { info.rules = chain.rules.count }
                        return info
                    }
                },
                families: legacy ? [.ip, .ip6] : [.ip, .ip6, .inet], ownedTables: !legacy)
        }
    }

    func observe(_ chain: ChainRef) -> [ObservedRule]? {
        state.withLock { s in
            guard let t = s.tables.first(where: { $0.ref == chain.table }),
                let c = t.chains.first(where: { $0.info.ref == chain })
            else { return nil }
            return c.rules.enumerated().map { position, rule in
                ObservedRule(
                    RuleLocation(chain, handle: system == .nftables ? rule.handle : UInt64(position + 1)),
                    fingerprint: rule.fingerprint, comment: rule.comment)
            }
        }
    }
}

/// One connection to a `FakeKernel`, standing in for a netlink socket.
package final class FakeFirewall: Firewall, Sendable {
    package let kernel: FakeKernel
    package let connection: Int
    private let closed = Atomic<Bool>(false)

    init(kernel: FakeKernel, connection: Int) {
        self.kernel = kernel
        self.connection = connection
    }

    package var system: FirewallSystem { kernel.system }

    package func exclusively<T>(_ body: () throws(LERedirectError) -> T) throws(LERedirectError) -> T {
        try body()
    }

    static func fingerprint(_ spec: RuleSpec, _ family: Family) -> RuleFingerprint {
        RuleFingerprint(hashing: "\(family) \(spec)".utf8)
    }

    package func fingerprint(of spec: RuleSpec, family: Family) -> RuleFingerprint {
        Self.fingerprint(spec, family)
    }

    private func checkOpen(_ doing: String) throws(FirewallError) {
        if closed.load(ordering: .acquiring) {
            throw FirewallError(.other, doing: doing, detail: "connection closed")
        }
    }

    package func snapshot() throws(FirewallError) -> FirewallSnapshot {
        try checkOpen("listing chains")
        return kernel.snapshot(connection: connection)
    }

    package func tableList() throws(FirewallError) -> [TableRef] {
        try checkOpen("listing tables")
        return kernel.snapshot(connection: connection).tables.map(\.ref)
    }

    package func commit(_ changes: [FirewallChange], expecting generation: UInt32?) throws(FirewallError)
        -> [InsertedRule]
    {
        try checkOpen("committing")
        return try kernel.commit(changes, expecting: generation, connection: connection)
    }

    package func rule(at location: RuleLocation) throws(FirewallError) -> ObservedRule? {
        try checkOpen("reading \(location)")
        return kernel.observe(location.chain)?.first { $0.location.handle == location.handle }
    }

    package func rules(in chain: ChainRef) throws(FirewallError) -> [ObservedRule] {
        try checkOpen("listing \(chain)")
        return kernel.observe(chain) ?? []
    }

    package func redirectedPackets() throws(FirewallError) -> UInt64? {
        try checkOpen("reading the redirect counter")
        if system == .iptablesLegacy {
            let redirects = [Family.ip, .ip6].flatMap { kernel.observe(ChainRef($0, "mangle", "PREROUTING")) ?? [] }
                .filter { $0.comment == ruleTag }
            return redirects.isEmpty ? nil : 0
        }
        return kernel.observe(RedirectPlan.steeringChain)?.isEmpty == false ? 0 : nil
    }

    package func close() {
        if !closed.exchange(true, ordering: .acquiringAndReleasing) {
            kernel.release(connection: connection)
        }
    }
}
