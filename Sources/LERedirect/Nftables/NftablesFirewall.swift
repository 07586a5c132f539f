import CNetfilter
import Glibc
import LERedirectModel
import Synchronization

/// The nftables backend: one netlink socket per connection, every change one BEGIN..END batch,
/// handles learned from the kernel's echo of each inserted rule.
///
/// `@unchecked Sendable`: the socket is only touched inside `lock`, so one thread at a time uses it.
final class NftablesFirewall: Firewall, @unchecked Sendable {
    private let nl: NetlinkSocket
    private let lock = Mutex(())

    /// Opens a connection in the calling thread's network namespace.
    init() throws(FirewallError) {
        do {
            nl = try NetlinkSocket()
        } catch {
            throw Self.error(error, doing: "opening a netfilter netlink socket", change: nil)
        }
    }

    var system: FirewallSystem { .nftables }

    /// nftables needs no lock: a batch planned against a generation is refused once it moved on.
    func exclusively<T>(_ body: () throws(LERedirectError) -> T) throws(LERedirectError) -> T { try body() }

    /// Owned tables (NFT_TABLE_F_OWNER) came with Linux 5.12.
    static let kernelOwnsTables: Bool = ProcessFacts.kernelVersion.map { $0 >= (5, 12) } ?? true

    func close() {
        lock.withLock { _ in nl.close() }
    }

    // MARK: Reading

    func snapshot() throws(FirewallError) -> FirewallSnapshot {
        try withSocket("listing tables and chains") { (nl) throws(NetlinkError) in
            // A dump interrupted by a concurrent commit, or a generation that moved while we read,
            // means the lists may be inconsistent: read again.
            var attempt = 0
            while true {
                attempt += 1
                do throws(NetlinkError) {
                    let generation = try Self.generation(nl)
                    let tables = try Self.tables(nl)
                    let chains = try Self.chains(nl)
                    if try Self.generation(nl) == generation || attempt >= 10 {
                        return FirewallSnapshot(
                            generation: generation, tables: tables, chains: chains, ownedTables: Self.kernelOwnsTables)
                    }
                } catch where error.errno == EINTR && attempt < 10 {
                    continue
                }
            }
        }
    }

    func tableList() throws(FirewallError) -> [TableRef] {
        try withSocket("listing tables") { (nl) throws(NetlinkError) in try Self.tables(nl).map(\.ref) }
    }

    private static func generation(_ nl: NetlinkSocket) throws(NetlinkError) -> UInt32 {
        var id: UInt32?
        try nl.request(
            build: { buf, seq in nftnl_nlmsg_build_hdr(buf, u16(NFT_MSG_GETGEN), UInt16(AF_UNSPEC), UInt16(NLM_F_ACK), seq) },
            each: { message in
                guard let gen = nftnl_gen_alloc() else { return }
                defer { nftnl_gen_free(gen) }
                if nftnl_gen_nlmsg_parse(message, gen) >= 0 { id = nftnl_gen_get_u32(gen, u16(NFTNL_GEN_ID)) }
            })
        guard let id else { throw NetlinkError(stage: .kernel, errno: EPROTO) }
        return id
    }

    /// One NLM_F_DUMP request (optionally filtered by `payload`), each reply parsed by `parse`.
    private static func dump<T>(
        _ nl: NetlinkSocket, _ message: nf_tables_msg_types, family: UInt16 = UInt16(AF_UNSPEC),
        payload: (UnsafeMutablePointer<nlmsghdr>) -> Void = { _ in }, parse: (UnsafePointer<nlmsghdr>) -> T?
    ) throws(NetlinkError) -> [T] {
        var result: [T] = []
        try nl.request(
            build: { buf, seq in
                let nlh = nftnl_nlmsg_build_hdr(buf, u16(message), family, UInt16(NLM_F_DUMP), seq)!
                payload(nlh)
                return nlh
            },
            each: { if let item = parse($0) { result.append(item) } })
        return result
    }

    private static func tables(_ nl: NetlinkSocket) throws(NetlinkError) -> [HostTable] {
        try dump(nl, NFT_MSG_GETTABLE) { message in
            guard let t = nftnl_table_alloc() else { return nil }
            defer { nftnl_table_free(t) }
            guard nftnl_table_nlmsg_parse(message, t) >= 0,
                let family = NftObjects.family(nftnl_table_get_u32(t, u16(NFTNL_TABLE_FAMILY)))
            else { return nil }
            let name = cString(nftnl_table_get_str(t, u16(NFTNL_TABLE_NAME)))
            let flags = nftnl_table_get_u32(t, u16(NFTNL_TABLE_FLAGS))
            let owned = flags & u32(NFT_TABLE_F_OWNER) != 0 && nftnl_table_is_set(t, u16(NFTNL_TABLE_OWNER))
            let owner = owned ? nftnl_table_get_u32(t, u16(NFTNL_TABLE_OWNER)) : 0
            return HostTable(TableRef(family, name), ownedByAnotherProcess: owned && owner != nl.portID)
        }
    }

    private static func chains(_ nl: NetlinkSocket) throws(NetlinkError) -> [HostChain] {
        try dump(nl, NFT_MSG_GETCHAIN) { message in
            guard let c = nftnl_chain_alloc() else { return nil }
            defer { nftnl_chain_free(c) }
            guard nftnl_chain_nlmsg_parse(message, c) >= 0,
                let family = NftObjects.family(nftnl_chain_get_u32(c, u16(NFTNL_CHAIN_FAMILY)))
            else { return nil }
            let ref = ChainRef(
                family, cString(nftnl_chain_get_str(c, u16(NFTNL_CHAIN_TABLE))),
                cString(nftnl_chain_get_str(c, u16(NFTNL_CHAIN_NAME))))
            var chain = HostChain(ref)
            if nftnl_chain_is_set(c, u16(NFTNL_CHAIN_HOOKNUM)) {
                chain.hook = NftObjects.hook(nftnl_chain_get_u32(c, u16(NFTNL_CHAIN_HOOKNUM)))
                chain.priority = nftnl_chain_get_s32(c, u16(NFTNL_CHAIN_PRIO))
                chain.type = cString(nftnl_chain_get_str(c, u16(NFTNL_CHAIN_TYPE)))
                if nftnl_chain_is_set(c, u16(NFTNL_CHAIN_POLICY)) {
                    chain.policy = nftnl_chain_get_u32(c, u16(NFTNL_CHAIN_POLICY)) == u32(NF_DROP) ? .drop : .accept
                }
            }
            return chain
        }
    }

    /// Every rule of one chain, parsed; the kernel filters the dump by table and chain name.
    private static func dumpRules<T>(
        _ nl: NetlinkSocket, in chain: ChainRef, _ body: (OpaquePointer, ObservedRule) -> T?
    ) throws(NetlinkError) -> [T] {
        try dump(
            nl, NFT_MSG_GETRULE, family: NftObjects.familyNumber(chain.table.family),
            payload: { nlh in
                let r = nftnl_rule_alloc()!
                defer { nftnl_rule_free(r) }
                nftnl_rule_set_str(r, u16(NFTNL_RULE_TABLE), chain.table.name)
                nftnl_rule_set_str(r, u16(NFTNL_RULE_CHAIN), chain.name)
                nftnl_rule_nlmsg_build_payload(nlh, r)
            },
            parse: { message in
                var item: T?
                parseRule(message) { rule, observed in
                    // A chain of the same name in a table of another family is not this one.
                    if observed.location.chain == chain { item = body(rule, observed) }
                }
                return item
            })
    }

    func fingerprint(of spec: RuleSpec, family: Family) -> RuleFingerprint {
        let rule = NftObjects.makeRule(spec, in: ChainRef(family, "-", "-"))
        defer { nftnl_rule_free(rule) }
        return NftObjects.fingerprint(of: rule)
    }

    func rule(at location: RuleLocation) throws(FirewallError) -> ObservedRule? {
        var found: ObservedRule?
        do {
            try withSocket("reading rule \(location)") { (nl) throws(NetlinkError) in
                try nl.request(
                    build: { buf, seq in
                        let nlh = nftnl_nlmsg_build_hdr(
                            buf, u16(NFT_MSG_GETRULE), NftObjects.familyNumber(location.chain.table.family),
                            UInt16(NLM_F_ACK), seq)!
                        let r = nftnl_rule_alloc()!
                        defer { nftnl_rule_free(r) }
                        nftnl_rule_set_str(r, u16(NFTNL_RULE_TABLE), location.chain.table.name)
                        nftnl_rule_set_str(r, u16(NFTNL_RULE_CHAIN), location.chain.name)
                        nftnl_rule_set_u64(r, u16(NFTNL_RULE_HANDLE), location.handle)
                        nftnl_rule_nlmsg_build_payload(nlh, r)
                        return nlh
                    },
                    each: { message in
                        Self.parseRule(message) { rule, observed in found = observed }
                    })
            }
        } catch where error.reason == .notFound {
            return nil
        }
        return found
    }

    func rules(in chain: ChainRef) throws(FirewallError) -> [ObservedRule] {
        var found: [ObservedRule] = []
        do {
            try eachRule(in: chain, doing: "listing the rules of \(chain)") { _, observed in found.append(observed) }
        } catch where error.reason == .notFound {
            return []
        }
        return found
    }

    /// The steering chain's counters, and --include-local's lo chain's where it exists.
    func redirectedPackets() throws(FirewallError) -> UInt64? {
        var packets: UInt64?
        for chain in [RedirectPlan.steeringChain, RedirectPlan.localSteeringChain] {
            do {
                try eachRule(in: chain, doing: "reading the steering counter") { rule, observed in
                    guard observed.comment == ruleTag, let iterator = nftnl_expr_iter_create(rule) else { return }
                    defer { nftnl_expr_iter_destroy(iterator) }
                    while let expr = nftnl_expr_iter_next(iterator) {
                        if cString(nftnl_expr_get_str(expr, u16(NFTNL_EXPR_NAME))) == "counter" {
                            packets = (packets ?? 0) + nftnl_expr_get_u64(expr, u16(NFTNL_EXPR_CTR_PACKETS))
                        }
                    }
                }
            } catch where error.reason == .notFound {
                if chain == RedirectPlan.steeringChain { return nil }
            }
        }
        return packets
    }

    private func eachRule(
        in chain: ChainRef, doing: String, _ body: (OpaquePointer, ObservedRule) -> Void
    ) throws(FirewallError) {
        try withSocket(doing) { (nl) throws(NetlinkError) in
            _ = try Self.dumpRules(nl, in: chain) { rule, observed in body(rule, observed) }
        }
    }

    private static func parseRule(_ message: UnsafePointer<nlmsghdr>, _ body: (OpaquePointer, ObservedRule) -> Void) {
        guard let r = nftnl_rule_alloc() else { return }
        defer { nftnl_rule_free(r) }
        guard nftnl_rule_nlmsg_parse(message, r) >= 0,
            let family = NftObjects.family(nftnl_rule_get_u32(r, u16(NFTNL_RULE_FAMILY)))
        else { return }
        let chain = ChainRef(
            family, cString(nftnl_rule_get_str(r, u16(NFTNL_RULE_TABLE))),
            cString(nftnl_rule_get_str(r, u16(NFTNL_RULE_CHAIN))))
        let location = RuleLocation(chain, handle: nftnl_rule_get_u64(r, u16(NFTNL_RULE_HANDLE)))
        let observed = ObservedRule(
            location, fingerprint: NftObjects.fingerprint(of: r),
            comment: NftObjects.comment(of: r))
        body(r, observed)
    }

    // MARK: Committing

    func commit(_ changes: [FirewallChange], expecting generation: UInt32?) throws(FirewallError) -> [InsertedRule] {
        if changes.isEmpty { return [] }
        if let change = changes.first(where: { if case .deleteMatching = $0 { true } else { false } }) {
            throw FirewallError(.unsupported, doing: "\(change)", detail: "nftables rules are deleted by handle")
        }
        return try lock.withLock { (_) throws(FirewallError) -> [InsertedRule] in
            var batch = NftBatch(firstSequence: nl.nextSequence(), generation: generation)
            var changeOf: [UInt32: Int] = [:]  // message sequence -> index in `changes`
            for (index, change) in changes.enumerated() {
                for message in Self.messages(for: change) {
                    changeOf[batch.upcomingSequence] = index
                    batch.append(message)
                }
            }
            batch.finish()
            // The batch used a run of sequence numbers; later requests must not reuse them.
            nl.continueAfter(batch.lastSequence)

            do throws(NetlinkError) {
                try batch.withBytes { (bytes) throws(NetlinkError) in try nl.send(bytes) }
            } catch {
                throw Self.error(error, doing: "sending the batch (\(Self.summary(changes)))", change: nil)
            }
            Fault.reach("batch-sent")

            let lastMessage = batch.sequences.last!
            var failure: (sequence: UInt32, errno: Int32)?
            var echoed: [UInt32: ObservedRule] = [:]
            do throws(NetlinkError) {
                try nl.receive { (message) throws(NetlinkError) -> Bool in
                    let seq = message.pointee.nlmsg_seq
                    if Int32(message.pointee.nlmsg_type) == NLMSG_ERROR {
                        let code = NetlinkSocket.errorCode(message)
                        if seq == batch.beginSequence {
                            // Refused as a whole: stale generation, or out of memory.
                            if code != 0 { failure = (seq, code); return true }
                            return false
                        }
                        if code != 0, failure == nil { failure = (seq, code) }
                        return seq == lastMessage
                    }
                    // Only rule echoes: when a batch's first change asks for an echo, the kernel also
                    // echoes its NEWGEN notice under that change's sequence number.
                    if changeOf[seq] != nil, message.pointee.nlmsg_type == Self.newRuleType {
                        Self.parseRule(message) { _, observed in echoed[seq] = observed }
                    }
                    return false
                }
            } catch {
                throw FirewallError(
                    .outcomeUnknown, doing: "reading the kernel's answer to the batch (\(Self.summary(changes)))",
                    detail: errnoText(error.errno), errno: error.errno)
            }

            if let failure {
                if failure.sequence == batch.beginSequence {
                    throw Self.error(
                        NetlinkError(stage: .kernel, errno: failure.errno), doing: "committing the batch", change: nil)
                }
                let change = changeOf[failure.sequence].map { changes[$0] }
                throw Self.error(
                    NetlinkError(stage: .kernel, errno: failure.errno), doing: change.map(Self.doing) ?? "committing",
                    change: change)
            }

            var inserted: [InsertedRule] = []
            for seq in batch.sequences {
                guard let index = changeOf[seq], case .insertRule(let chain, let spec) = changes[index] else { continue }
                if let echo = echoed[seq] {
                    inserted.append(InsertedRule(echo.location, fingerprint: echo.fingerprint))
                } else {
                    // The commit succeeded but the echo is missing: find the rule at the head of its chain.
                    inserted.append(
                        try Self.locate(spec, in: chain, nl: nl))
                }
            }
            return inserted
        }
    }

    /// NFT_MSG_NEWRULE as a netlink message type: the nf_tables subsystem in the high byte.
    private static let newRuleType = UInt16(NFNL_SUBSYS_NFTABLES) << 8 | u16(NFT_MSG_NEWRULE)

    private static func locate(_ spec: RuleSpec, in chain: ChainRef, nl: NetlinkSocket) throws(FirewallError)
        -> InsertedRule
    {
        let rule = NftObjects.makeRule(spec, in: chain)
        let expected = NftObjects.fingerprint(of: rule)
        nftnl_rule_free(rule)
        let found: InsertedRule?
        do throws(NetlinkError) {
            found = try dumpRules(nl, in: chain) { _, observed in
                observed.fingerprint == expected ? InsertedRule(observed.location, fingerprint: observed.fingerprint) : nil
            }.first
        } catch {
            throw Self.error(error, doing: "finding the rule just inserted into \(chain)", change: nil)
        }
        guard let found else {
            throw FirewallError(
                .outcomeUnknown, doing: "finding the rule just inserted into \(chain)",
                detail: "the kernel acknowledged it but it is not in the chain")
        }
        return found
    }

    /// The netlink messages of one change.
    private static func messages(for change: FirewallChange)
        -> [(UnsafeMutablePointer<CChar>, UInt32) -> UnsafeMutablePointer<nlmsghdr>]
    {
        let create = UInt16(NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK)
        switch change {
        case .addOwnedTable(let table):
            return [{ buf, seq in
                let nlh = nftnl_nlmsg_build_hdr(buf, u16(NFT_MSG_NEWTABLE), NftObjects.familyNumber(table.family), create, seq)!
                let t = nftnl_table_alloc()!
                defer { nftnl_table_free(t) }
                nftnl_table_set_str(t, u16(NFTNL_TABLE_NAME), table.name)
                nftnl_table_set_u32(t, u16(NFTNL_TABLE_FLAGS), u32(NFT_TABLE_F_OWNER))
                nftnl_table_nlmsg_build_payload(nlh, t)
                return nlh
            }]
        case .addPortSet(let table, let name, let ports, let timeout):
            let family = NftObjects.familyNumber(table.family)
            var messages: [(UnsafeMutablePointer<CChar>, UInt32) -> UnsafeMutablePointer<nlmsghdr>] = [
                { buf, seq in
                    let nlh = nftnl_nlmsg_build_hdr(buf, u16(NFT_MSG_NEWSET), family, create, seq)!
                    let s = Self.setObject(table, name, id: 1)
                    defer { nftnl_set_free(s) }
                    nftnl_set_set_u32(s, u16(NFTNL_SET_FLAGS), u32(NFT_SET_TIMEOUT))
                    nftnl_set_set_u32(s, u16(NFTNL_SET_KEY_TYPE), 13)  // nft's inet_service datatype
                    nftnl_set_set_u32(s, u16(NFTNL_SET_KEY_LEN), 2)
                    // NFTNL_UDATA_SET_KEYBYTEORDER = big endian, as nft writes it, so `nft list` prints the ports.
                    let udata: [UInt8] = [0, 4, 2, 0, 0, 0]
                    udata.withUnsafeBytes { _ = nftnl_set_set_data(s, u16(NFTNL_SET_USERDATA), $0.baseAddress, 6) }
                    nftnl_set_nlmsg_build_payload(nlh, s)
                    return nlh
                }
            ]
            // An empty element list is refused by the kernel: a set armed per challenge starts empty.
            if !ports.isEmpty {
                messages.append(Self.elementsMessage(NFT_MSG_NEWSETELEM, table, name, id: 1, ports, timeout: timeout))
            }
            return messages
        case .addSetElement(let table, let name, let port, let timeout):
            return [Self.elementsMessage(NFT_MSG_NEWSETELEM, table, name, id: nil, [port], timeout: timeout)]
        case .deleteSetElement(let table, let name, let port):
            return [Self.elementsMessage(NFT_MSG_DELSETELEM, table, name, id: nil, [port], timeout: nil)]
        case .addBaseChain(let chain, let type, let hook, let priority):
            return [{ buf, seq in
                let nlh = nftnl_nlmsg_build_hdr(
                    buf, u16(NFT_MSG_NEWCHAIN), NftObjects.familyNumber(chain.table.family), create, seq)!
                let c = nftnl_chain_alloc()!
                defer { nftnl_chain_free(c) }
                nftnl_chain_set_str(c, u16(NFTNL_CHAIN_TABLE), chain.table.name)
                nftnl_chain_set_str(c, u16(NFTNL_CHAIN_NAME), chain.name)
                nftnl_chain_set_u32(c, u16(NFTNL_CHAIN_HOOKNUM), NftObjects.hookNumber(hook))
                nftnl_chain_set_s32(c, u16(NFTNL_CHAIN_PRIO), priority)
                nftnl_chain_set_str(c, u16(NFTNL_CHAIN_TYPE), type)
                nftnl_chain_set_u32(c, u16(NFTNL_CHAIN_POLICY), u32(NF_ACCEPT))
                nftnl_chain_nlmsg_build_payload(nlh, c)
                return nlh
            }]
        case .insertRule(let chain, let spec):
            return [{ buf, seq in
                // No NLM_F_APPEND and no position: the kernel inserts at the head of the chain.
                let nlh = nftnl_nlmsg_build_hdr(
                    buf, u16(NFT_MSG_NEWRULE), NftObjects.familyNumber(chain.table.family),
                    UInt16(NLM_F_CREATE | NLM_F_ACK | NLM_F_ECHO), seq)!
                let r = NftObjects.makeRule(spec, in: chain)
                defer { nftnl_rule_free(r) }
                nftnl_rule_nlmsg_build_payload(nlh, r)
                return nlh
            }]
        case .deleteTable(let table):
            return [{ buf, seq in
                let nlh = nftnl_nlmsg_build_hdr(
                    buf, u16(NFT_MSG_DELTABLE), NftObjects.familyNumber(table.family), UInt16(NLM_F_ACK), seq)!
                let t = nftnl_table_alloc()!
                defer { nftnl_table_free(t) }
                nftnl_table_set_str(t, u16(NFTNL_TABLE_NAME), table.name)
                nftnl_table_nlmsg_build_payload(nlh, t)
                return nlh
            }]
        case .deleteRule(let location):
            return [{ buf, seq in
                let nlh = nftnl_nlmsg_build_hdr(
                    buf, u16(NFT_MSG_DELRULE), NftObjects.familyNumber(location.chain.table.family), UInt16(NLM_F_ACK), seq)!
                let r = nftnl_rule_alloc()!
                defer { nftnl_rule_free(r) }
                nftnl_rule_set_str(r, u16(NFTNL_RULE_TABLE), location.chain.table.name)
                nftnl_rule_set_str(r, u16(NFTNL_RULE_CHAIN), location.chain.name)
                nftnl_rule_set_u64(r, u16(NFTNL_RULE_HANDLE), location.handle)
                nftnl_rule_nlmsg_build_payload(nlh, r)
                return nlh
            }]
        case .deleteMatching:
            return []  // refused by commit: nftables rules are deleted by handle
        }
    }

    private static func setObject(_ table: TableRef, _ name: String, id: UInt32?) -> OpaquePointer {
        let s = nftnl_set_alloc()!
        nftnl_set_set_str(s, u16(NFTNL_SET_TABLE), table.name)
        nftnl_set_set_str(s, u16(NFTNL_SET_NAME), name)
        // Within the batch that creates the set, the kernel finds it by its transaction id.
        if let id { nftnl_set_set_u32(s, u16(NFTNL_SET_ID), id) }
        return s
    }

    private static func elementsMessage(
        _ type: nf_tables_msg_types, _ table: TableRef, _ name: String, id: UInt32?, _ ports: [UInt16], timeout: Duration?
    ) -> (UnsafeMutablePointer<CChar>, UInt32) -> UnsafeMutablePointer<nlmsghdr> {
        { buf, seq in
            let flags = type == NFT_MSG_NEWSETELEM ? UInt16(NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK) : UInt16(NLM_F_ACK)
            let nlh = nftnl_nlmsg_build_hdr(buf, u16(type), NftObjects.familyNumber(table.family), flags, seq)!
            let s = setObject(table, name, id: id)
            defer { nftnl_set_free(s) }
            for port in ports {
                let e = nftnl_set_elem_alloc()!
                var key = port.bigEndian
                _ = nftnl_set_elem_set(e, u16(NFTNL_SET_ELEM_KEY), &key, 2)
                if let timeout { nftnl_set_elem_set_u64(e, u16(NFTNL_SET_ELEM_TIMEOUT), UInt64(timeout.milliseconds)) }
                nftnl_set_elem_add(s, e)
            }
            nftnl_set_elems_nlmsg_build_payload(nlh, s)
            return nlh
        }
    }

    // MARK: Errors

    private func withSocket<T>(_ doing: String, _ body: (NetlinkSocket) throws(NetlinkError) -> T) throws(FirewallError) -> T {
        try lock.withLock { (_) throws(FirewallError) -> T in
            do throws(NetlinkError) {
                return try body(nl)
            } catch {
                throw Self.error(error, doing: doing, change: nil)
            }
        }
    }

    private static func doing(_ change: FirewallChange) -> String {
        switch change {
        case .addOwnedTable(let t): "creating table \(t)"
        case .addPortSet(let t, let name, _, _): "creating set \(name) in \(t)"
        case .addBaseChain(let c, _, _, _): "creating chain \(c)"
        case .addSetElement(let t, let name, let port, _): "arming the steering (port \(port) into set \(t) \(name))"
        case .deleteSetElement(let t, let name, let port): "disarming the steering (port \(port) out of set \(t) \(name))"
        case .insertRule(let c, _): "inserting the steering rule into \(c)"
        case .deleteMatching(let c, _, _): "deleting rules of \(c)"
        case .deleteTable(let t): "deleting table \(t)"
        case .deleteRule(let l): "deleting rule \(l)"
        }
    }

    private static func summary(_ changes: [FirewallChange]) -> String {
        changes.count == 1 ? doing(changes[0]) : "\(changes.count) changes"
    }

    static func error(_ error: NetlinkError, doing: String, change: FirewallChange?) -> FirewallError {
        let code = error.errno
        var detail = errnoText(code)
        var reason: FirewallError.Reason
        switch code {
        case ERESTART:
            reason = .generationChanged
            detail = "the ruleset changed since it was read"
        case EPERM, EACCES:
            reason = .notPermitted
            if error.stage == .open || change == nil {
                detail += " (le-redirect needs root or CAP_NET_ADMIN)"
            } else {
                detail += " (run as root; or the table is owned by another process)"
            }
        case ENOENT:
            reason = .notFound
            if case .insertRule(_, .steer) = change {
                // An expression type the kernel does not know (it tried to load its module).
                reason = .unsupported
                detail += " (this kernel lacks nf_tables' tproxy or fib expression: nft_tproxy and nft_fib_inet are needed)"
            }
        case EEXIST:
            reason = .alreadyExists
        case EOPNOTSUPP where { if case .addOwnedTable = change { true } else { false } }():
            reason = .unsupported
            detail += " (tables owned by a process need Linux 5.12 or newer)"
        case EPROTONOSUPPORT, EAFNOSUPPORT, EOPNOTSUPP:
            reason = .unsupported
            detail += " (this kernel lacks nf_tables support: load nf_tables, or use another backend)"
        default:
            reason = .other
        }
        return FirewallError(reason, doing: doing, detail: detail, errno: code)
    }
}
