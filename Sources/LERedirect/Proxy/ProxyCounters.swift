import Synchronization

/// What `status` shows about the proxy. Written by the proxy's one thread only (so a relaxed load
/// and store is an increment), read by the holder's thread for `status`.
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

    var lines: [(String, String)] {
        [
            ("proxy-phase", ["serving", "draining", "done"][min(2, phase.load(ordering: .relaxed))]),
            ("proxy-connections", "\(connections.load(ordering: .relaxed))"),
            ("proxy-accepted", "\(accepted.load(ordering: .relaxed))"),
            ("proxy-requests", "\(requests.load(ordering: .relaxed))"),
            ("proxy-challenges", "\(challenges.load(ordering: .relaxed))"),
            ("proxy-bytes-in", "\(bytesFromClients.load(ordering: .relaxed))"),
            ("proxy-bytes-out", "\(bytesToClients.load(ordering: .relaxed))"),
            ("proxy-refused", "\(refused.load(ordering: .relaxed))"),
            ("proxy-errors", "\(proxyErrors.load(ordering: .relaxed))"),
        ]
    }
}

/// Challenge tokens held in memory (`le-redirect challenge add`, the certbot manual hooks, the
/// library), read by the proxy's thread when a challenge request arrives.
final class ChallengeStore: Sendable {
    private let tokens = Mutex<[String: String]>([:])

    func keyAuthorization(for token: String) -> String? { tokens.withLock { $0[token] } }

    /// Adds or replaces; returns how many tokens are registered afterwards.
    @discardableResult
    func add(_ token: String, _ keyAuthorization: String) -> Int {
        tokens.withLock {
            $0[token] = keyAuthorization
            return $0.count
        }
    }

    /// Returns whether it was registered, and how many remain.
    @discardableResult
    func remove(_ token: String) -> (removed: Bool, remaining: Int) {
        tokens.withLock { ($0.removeValue(forKey: token) != nil, $0.count) }
    }

    var count: Int { tokens.withLock { $0.count } }
}
