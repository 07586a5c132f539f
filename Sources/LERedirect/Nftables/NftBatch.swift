import CNetfilter
import Glibc

/// One nf_tables transaction as netlink messages: BEGIN (carrying the generation the batch was
/// planned against), the change messages, END. The kernel applies all of it or none of it.
///
/// Owns its buffer; `~Copyable` so there is exactly one owner and the buffer is freed once.
struct NftBatch: ~Copyable {
    private var storage: UnsafeMutableRawPointer
    private var capacity: Int
    private var used = 0
    let beginSequence: UInt32
    /// The sequence number of each change message, in order.
    private(set) var sequences: [UInt32] = []
    private var nextSequence: UInt32

    /// libnftnl writes attributes without bounds checks, so every message gets this much room.
    private static let messageRoom = 16 * 1024

    init(firstSequence: UInt32, generation: UInt32?) {
        capacity = 64 * 1024
        storage = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 16)
        memset(storage, 0, capacity)
        beginSequence = firstSequence
        nextSequence = firstSequence &+ 1
        let nlh = nftnl_batch_begin(storage.assumingMemoryBound(to: CChar.self) + used, firstSequence)!
        if let generation {
            mnl_attr_put_u32(nlh, u16(NFNL_BATCH_GENID), generation.bigEndian)
        }
        used += Int(nlh.pointee.nlmsg_len)
    }

    deinit { storage.deallocate() }

    /// The sequence number the next change message will carry.
    var upcomingSequence: UInt32 { nextSequence }

    /// Appends one message; `build` writes it at the given address with the given sequence number
    /// and returns its header.
    mutating func append(_ build: (UnsafeMutablePointer<CChar>, UInt32) -> UnsafeMutablePointer<nlmsghdr>) {
        reserve(Self.messageRoom)
        let seq = nextSequence
        nextSequence &+= 1
        let nlh = build(storage.assumingMemoryBound(to: CChar.self) + used, seq)
        used += Self.align(Int(nlh.pointee.nlmsg_len))
        sequences.append(seq)
    }

    /// Appends END; the batch is then ready to send.
    mutating func finish() {
        reserve(256)
        let nlh = nftnl_batch_end(storage.assumingMemoryBound(to: CChar.self) + used, nextSequence)!
        nextSequence &+= 1
        used += Int(nlh.pointee.nlmsg_len)
    }

    /// The last sequence number used (END's).
    var lastSequence: UInt32 { nextSequence &- 1 }

    func withBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(start: storage, count: used))
    }

    private mutating func reserve(_ room: Int) {
        guard capacity - used < room else { return }
        let grown = max(capacity * 2, used + room)
        let fresh = UnsafeMutableRawPointer.allocate(byteCount: grown, alignment: 16)
        memset(fresh, 0, grown)
        fresh.copyMemory(from: storage, byteCount: used)
        storage.deallocate()
        storage = fresh
        capacity = grown
    }

    private static func align(_ n: Int) -> Int { (n + 3) & ~3 }
}
