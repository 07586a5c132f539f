import Glibc
import LERedirectModel
import Logging

/// Writes one line per log event to a file descriptor: stderr for the CLI, the session log file in
/// the state directory for the daemon (whose stderr is /dev/null).
package struct LineLogHandler: LogHandler {
    package var logLevel: Logger.Level
    package var metadata: Logger.Metadata = [:]
    private let fd: Int32
    private let label: String

    package init(label: String, fd: Int32 = STDERR_FILENO, level: Logger.Level) {
        self.label = label
        self.fd = fd
        self.logLevel = level
    }

    /// Opens (appending) the daemon's log file: 0600, never through a symlink.
    package static func file(_ path: String, label: String, level: Logger.Level) -> LineLogHandler {
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0o600)
        return LineLogHandler(label: label, fd: fd >= 0 ? fd : STDERR_FILENO, level: level)
    }

    /// The level from LE_REDIRECT_LOG_LEVEL (trace, debug, info, notice, warning, error), else `fallback`.
    package static func level(default fallback: Logger.Level) -> Logger.Level {
        guard let raw = getenv("LE_REDIRECT_LOG_LEVEL") else { return fallback }
        return Logger.Level(rawValue: cString(raw).lowercased()) ?? fallback
    }

    package subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    package func log(event: LogEvent) {
        var all = metadata
        if let extra = event.metadata { all.merge(extra) { $1 } }
        var line = "\(RFC3339.formatWithMilliseconds(unixMilliseconds: unixMilliseconds())) \(event.level) \(label): \(event.message)"
        if !all.isEmpty {
            line += " " + all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        }
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }
}
