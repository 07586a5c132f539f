import Glibc
import LERedirect
import LERedirectCLI

// The session daemon is started by `begin` with a private argument; it skips argument parsing.
let arguments = Array(CommandLine.arguments.dropFirst())
Fault.validate()
if arguments.first == "__session" {
    Session.runDaemon(Array(arguments.dropFirst()))
}
bootstrapLogging()
exit(LERedirectCommand.run(arguments))
