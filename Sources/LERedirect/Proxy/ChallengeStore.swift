import Synchronization

/// Challenge tokens held in memory by the proxy process: registered by the holder's messages
/// (`le-redirect challenge add`, the certbot manual hooks), read when a challenge request arrives.
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
