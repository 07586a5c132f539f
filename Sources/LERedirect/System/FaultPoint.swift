import Glibc

/// Named points between two of begin's commits where a debug build stops itself (SIGSTOP) when
/// LE_REDIRECT_FAULT_POINT names the point, so that a test can SIGKILL it there and prove that
/// recovery restores the ruleset. Release builds compile it away.
enum FaultPoint {
    static let environmentVariable = "LE_REDIRECT_FAULT_POINT"

    static func reach(_ name: String) {
        #if DEBUG
        guard let value = getenv(environmentVariable), cString(value) == name else { return }
        raise(SIGSTOP)
        #endif
    }
}
