import Glibc
import LERedirect
import LERedirectCLI

// The session daemon and the proxy process are started by le-redirect itself with a private
// argument; they skip argument parsing.
let arguments = Array(CommandLine.arguments.dropFirst())
Fault.validate()
if arguments.first == "__session" {
    Session.runDaemon(Array(arguments.dropFirst()))
}
if arguments.first == "__proxy" {
    ProxyMain.run(Array(arguments.dropFirst()))
}
bootstrapLogging()
exit(LERedirectCommand.run(arguments))
