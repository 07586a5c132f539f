import ArgumentParser
import Glibc
import LERedirect
import Logging

/// `le-redirect`: the thin command line over the LERedirect library.
public struct LERedirectCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "le-redirect",
        abstract: "Take over port 80 for an ACME HTTP-01 challenge without stopping the web application.",
        discussion: """
            Exit codes: 0 ok, 1 operation failed (nothing changed), 2 usage error, 3 not permitted.
            State lives in /run/le-redirect (LE_REDIRECT_STATE_DIR overrides it).
            """,
        version: LERedirectVersion.current,
        subcommands: [Begin.self, End.self, Status.self, Recover.self, Run.self, Detect.self, Challenge.self, Deploy.self]
    )

    public init() {}

    /// Parses `arguments` (without the program name), runs the command and returns the exit code,
    /// having printed whatever the command or its error had to say.
    public static func run(_ arguments: [String]) -> Int32 {
        do {
            var command = try parseAsRoot(arguments)
            try command.run()
            return 0
        } catch let error as LERedirectError {
            printError(error.message)
            return error.exitCode
        } catch let code as ExitCode {
            return code.rawValue
        } catch {
            // Help and version requests are "errors" that exit 0; everything else is a usage error.
            if exitCode(for: error) == .success {
                print(fullMessage(for: error))
                return 0
            }
            // The parser's message starts with its own "Error: ".
            var message = fullMessage(for: error)
            if message.hasPrefix("Error: ") { message.removeFirst("Error: ".count) }
            printError(message)
            return 2
        }
    }
}

/// Sends the CLI's log lines to stderr (call once, before `run`).
public func bootstrapLogging() {
    LoggingSystem.bootstrap { _ in LineLogHandler(label: "le-redirect", level: LineLogHandler.level(default: .notice)) }
}

public enum LERedirectVersion {
    public static let current = "0.1.0"
}

func printError(_ message: String) {
    var stderr = StandardError()
    print("le-redirect: error: \(message)", to: &stderr)
}

func printNote(_ message: String) {
    var stderr = StandardError()
    print("le-redirect: note: \(message)", to: &stderr)
}

func printWarning(_ message: String) {
    var stderr = StandardError()
    print("le-redirect: warning: \(message)", to: &stderr)
}

struct StandardError: TextOutputStream {
    mutating func write(_ string: String) {
        let bytes = Array(string.utf8)
        _ = bytes.withUnsafeBytes { Glibc.write(STDERR_FILENO, $0.baseAddress, $0.count) }
    }
}

let logger = Logger(label: "le-redirect")
