import Synchronization

/// What `status` shows about the proxy (`ValidationProxy.status` reads them for the holder).
/// Written by the proxy's one thread only, so a relaxed load and store is an increment.
final class ProxyCounters: Sendable {
    let connections = Atomic<Int>(0)
    let accepted = Atomic<Int>(0)
    let requests = Atomic<Int>(0)
    let challenges = Atomic<Int>(0)
    let bytesFromClients = Atomic<Int>(0)
    let bytesToClients = Atomic<Int>(0)
    /// Connections to the proxy port that did not come through the redirect, closed at once.
    let refused = Atomic<Int>(0)
    /// Requests answered 400, 431 or 502 by the proxy itself.
    let proxyErrors = Atomic<Int>(0)
    /// 0 serving, 1 draining, 2 done.
    let phase = Atomic<Int>(0)

    @inline(__always)
    static func bump(_ counter: borrowing Atomic<Int>, by n: Int = 1) {
        counter.store(counter.load(ordering: .relaxed) &+ n, ordering: .relaxed)
    }
}
