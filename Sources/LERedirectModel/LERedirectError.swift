/// The one error type the public API throws. Every message says what was being done and on what,
/// and ends with a hint when the operator can do something about it.
public struct LERedirectError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of failure this is; the CLI maps it to its exit code.
    public enum Kind: Sendable, Hashable {
        /// An argument or option is malformed or out of range; nothing was changed.
        case invalidArgument
        /// The caller lacks root or CAP_NET_ADMIN; nothing was changed.
        case notPermitted
        /// A session is already active, or the state is held by someone else; nothing was changed.
        case conflict
        /// The kernel or the system lacks something le-redirect needs.
        case unsupported
        /// The operation failed; see the message for what was left in which state.
        case failed
    }

    public var kind: Kind
    public var message: String
    /// The errno behind the failure, when there is one.
    public var errno: Int32?

    public init(_ kind: Kind, _ message: String, errno: Int32? = nil) {
        self.kind = kind
        self.message = message
        self.errno = errno
    }

    public var description: String { message }

    /// The process exit code the CLI uses for this error (1 failed, 2 usage, 3 not permitted).
    public var exitCode: Int32 {
        switch kind {
        case .invalidArgument: 2
        case .notPermitted: 3
        case .conflict, .unsupported, .failed: 1
        }
    }
}
