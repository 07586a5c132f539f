@testable import LERedirect
import Testing

/// The proxy's epoll user data: every kind of event decodes to what it was, whatever a
/// connection's generation (the packing it replaced read a connection whose generation reached
/// 2^30 as a listener).
struct EventTagTests {
    @Test(arguments: [0, 1, 1 << 29, 1 << 30, 1 << 31, UInt32.max])
    func aConnectionIsAlwaysAConnection(_ generation: UInt32) {
        for slot in [0, 1, 9_999, EventTag.maxSlots - 1] {
            for upstream in [false, true] {
                let tag = EventTag.connection(slot: slot, generation: generation, upstream: upstream)
                #expect(EventTag(rawValue: tag.rawValue) == tag)
            }
        }
    }

    @Test func listenersAndTheHolderKeepTheirKind() {
        #expect(EventTag(rawValue: EventTag.holder.rawValue) == .holder)
        for index in [0, 1, 7] {
            #expect(EventTag(rawValue: EventTag.listener(index).rawValue) == .listener(index))
        }
        // No connection's tag is the holder's or a listener's.
        let raw = EventTag.connection(slot: 0, generation: 0, upstream: false).rawValue
        #expect(raw != EventTag.holder.rawValue && raw != EventTag.listener(0).rawValue)
    }
}
