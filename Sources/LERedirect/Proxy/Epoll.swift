import CLERedirectShim

/// epoll's constants, from the shim.
enum Epoll {
    static let readable = UInt32(LE_EPOLLIN)
    static let writable = UInt32(LE_EPOLLOUT)
    static let error = UInt32(LE_EPOLLERR)
    static let hangUp = UInt32(LE_EPOLLHUP)
    static let add = Int32(LE_EPOLL_CTL_ADD)
    static let modify = Int32(LE_EPOLL_CTL_MOD)
    static let delete = Int32(LE_EPOLL_CTL_DEL)
}

/// What an epoll event is about, in its 64-bit user data: the kind in the low two bits, so that
/// no kind's fields can overlap another's (a connection's generation takes the high 32 bits
/// whole, its slot the 30 below).
enum EventTag: Equatable {
    /// The session holder's socket.
    case holder
    /// A listener, by its index.
    case listener(Int)
    /// One side of a connection: its slot, the slot's generation when it was taken, and which side.
    case connection(slot: Int, generation: UInt32, upstream: Bool)

    static let maxSlots = 1 << 30

    var rawValue: UInt64 {
        switch self {
        case .holder: 0
        case .listener(let index): UInt64(index) << 2 | 1
        case .connection(let slot, let generation, let upstream):
            UInt64(generation) << 32 | UInt64(slot & (Self.maxSlots - 1)) << 2 | (upstream ? 3 : 2)
        }
    }

    init(rawValue: UInt64) {
        switch rawValue & 3 {
        case 0: self = .holder
        case 1: self = .listener(Int(rawValue >> 2))
        default:
            self = .connection(
                slot: Int((rawValue & 0xffff_ffff) >> 2), generation: UInt32(rawValue >> 32), upstream: rawValue & 3 == 3)
        }
    }
}
