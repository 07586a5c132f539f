import CLERedirectSandbox
import Glibc
import Synchronization

/// Faults a test injects into a debug build through LE_REDIRECT_FAULT; release builds compile every
/// check away. The variable holds a comma-separated list of
///
///     [AFTER>]NAME[@N][=ACTION]
///
/// NAME is a step (`Fault.steps`: `lock-taken`, `batch-sent`, `journal-deleted`, ...) or a call
/// that can fail (`Fault.calls`: `netlink-send`, `fsync`, `bind`, ...). For a step, ACTION is `kill`
/// (the default: SIGKILL there) or `stop` (SIGSTOP); for a call, an errno name (`EIO`) or number
/// that the call then fails with instead of being made. `@N` picks the Nth time the name is reached
/// in the process (1-based), counted from when step AFTER was reached in it; without `@N`, every
/// time. A step reached with a detail (the commit it precedes, e.g. `iptables-legacy ip mangle`) also
/// answers to `NAME DETAIL`. A process inherits the variable: a fault named for a step of the
/// session daemon fires there, not in the `begin` that started it.
package enum Fault {
    static let environmentVariable = "LE_REDIRECT_FAULT"

    /// Every step with a fault point, in the order a session reaches them.
    static let steps = [
        // begin, in the `begin` process (or the program embedding the library)
        "lock-taken", "daemon-spawned",
        // begin, in the session daemon
        "daemon-started", "listeners-bound", "journal-intent-written", "batch-sent", "commit-acknowledged",
        "handles-recorded", "ready-reported",
        // in the proxy process, once it is confined, and at each steered connection it takes
        "proxy-confined", "proxy-accepted",
        // `challenge add` of a session armed per challenge, in the session holder
        "redirect-armed",
        // end, in the session holder ("drain-started": once the proxy was told to drain)
        "redirect-removed", "drain-started", "table-removed", "journal-deleted",
        // recover, after the dead session's rules are gone and before its table and journal
        "recovery-rules-removed",
    ]

    /// The calls that can be made to fail.
    static let calls = [
        "netlink-send", "netlink-receive", "xtables-commit", "xtables-lock", "fsync", "rename", "unlink", "bind",
        // the webroot's files opened with openat2: ENOSYS takes the path of kernels without it
        "openat2",
    ]

    static let errnoNames: [String: Int32] = [
        "EPERM": EPERM, "ENOENT": ENOENT, "EINTR": EINTR, "EIO": EIO, "EAGAIN": EAGAIN, "ENOMEM": ENOMEM,
        "EACCES": EACCES, "EBUSY": EBUSY, "EEXIST": EEXIST, "EINVAL": EINVAL, "ENOSPC": ENOSPC, "EROFS": EROFS,
        "EDQUOT": EDQUOT, "ENOBUFS": ENOBUFS, "EADDRINUSE": EADDRINUSE, "ETIMEDOUT": ETIMEDOUT,
        "ECONNREFUSED": ECONNREFUSED, "EMSGSIZE": EMSGSIZE, "ENOSYS": ENOSYS,
    ]

    struct Spec: Sendable, Equatable {
        enum Action: Sendable, Equatable {
            case kill, stop
            /// A system call the proxy's seccomp filter does not allow (SIGSYS there).
            case syscall
            case fail(Int32)
        }
        var after: String?
        var name: String
        var occurrence: Int?
        var action: Action
    }

    /// Parses the variable's value; throws a message naming what is wrong.
    static func parse(_ text: String) throws(FaultSpecError) -> [Spec] {
        var specs: [Spec] = []
        for item in text.split(separator: ",", omittingEmptySubsequences: true) {
            var rest = Substring(item.trimmingSpaces())
            var spec = Spec(after: nil, name: "", occurrence: nil, action: .kill)
            if let arrow = rest.firstIndex(of: ">") {
                spec.after = String(rest[..<arrow])
                rest = rest[rest.index(after: arrow)...]
                guard steps.contains(where: { spec.after == $0 || spec.after!.hasPrefix($0 + " ") }) else {
                    throw FaultSpecError("'\(spec.after!)' in '\(item)' is not a step")
                }
            }
            var actionText: Substring?
            if let equals = rest.firstIndex(of: "=") {
                actionText = rest[rest.index(after: equals)...]
                rest = rest[..<equals]
            }
            if let at = rest.lastIndex(of: "@") {
                guard let n = Int(rest[rest.index(after: at)...]), n >= 1 else {
                    throw FaultSpecError("'\(item)': @N takes a number from 1")
                }
                spec.occurrence = n
                rest = rest[..<at]
            }
            spec.name = String(rest)
            if calls.contains(spec.name) {
                guard let actionText, let code = errnoNames[String(actionText)] ?? Int32(actionText), code > 0 else {
                    throw FaultSpecError("'\(item)': a call takes =ERRNO (e.g. =EIO)")
                }
                spec.action = .fail(code)
            } else if steps.contains(where: { spec.name == $0 || spec.name.hasPrefix($0 + " ") }) {
                switch actionText {
                case nil, "kill": spec.action = .kill
                case "stop": spec.action = .stop
                case "syscall": spec.action = .syscall
                default: throw FaultSpecError("'\(item)': a step takes =kill, =stop or =syscall")
                }
            } else {
                throw FaultSpecError("'\(spec.name)' is neither a step nor a call")
            }
            specs.append(spec)
        }
        return specs
    }

    #if DEBUG
    private struct State {
        var reached: Set<String> = []
        var counts: [Int]
    }

    private static let specs: [Spec] = {
        guard let value = getenv(environmentVariable) else { return [] }
        do {
            return try parse(cString(value))
        } catch {
            // A test that asked for a fault must not pass without it.
            let message = Array("le-redirect: \(environmentVariable): \(error)\n".utf8)
            _ = message.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
            exit(70)
        }
    }()
    private static let state = Mutex(State(counts: Array(repeating: 0, count: specs.count)))

    /// The action due now for `name` (and `name detail`), counting this occurrence; records the step.
    private static func due(_ name: String, detail: String?, step: Bool) -> Spec.Action? {
        state.withLock { s -> Spec.Action? in
            var action: Spec.Action?
            for (index, spec) in specs.enumerated()
            where spec.name == name || (detail != nil && spec.name == "\(name) \(detail!)") {
                if let after = spec.after, !s.reached.contains(after) { continue }
                s.counts[index] += 1
                if spec.occurrence == nil || spec.occurrence == s.counts[index] { action = action ?? spec.action }
            }
            if step {
                s.reached.insert(name)
                if let detail { s.reached.insert("\(name) \(detail)") }
            }
            return action
        }
    }
    #endif

    /// Makes the variable's mistakes fatal at once (exit 70) rather than at the first fault point.
    package static func validate() {
        #if DEBUG
        _ = specs
        #endif
    }

    /// A step of begin, end or recover: SIGKILLs or SIGSTOPs this process when a fault names it.
    static func reach(_ step: String, detail: String? = nil) {
        #if DEBUG
        guard !specs.isEmpty else { return }
        switch due(step, detail: detail, step: true) {
        case .kill?: raise(SIGKILL)
        case .stop?: raise(SIGSTOP)
        case .syscall?: le_forbidden_syscall()
        default: break
        }
        #endif
    }

    /// The errno a call must fail with now instead of being made, if a fault names it.
    static func injectedErrno(_ call: String) -> Int32? {
        #if DEBUG
        guard !specs.isEmpty, case .fail(let code)? = due(call, detail: nil, step: false) else { return nil }
        return code
        #else
        return nil
        #endif
    }
}

struct FaultSpecError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

extension Substring {
    fileprivate func trimmingSpaces() -> Substring {
        var s = self
        while s.first == " " { s.removeFirst() }
        while s.last == " " { s.removeLast() }
        return s
    }
}
