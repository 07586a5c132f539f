// A renewer that embeds LERedirect instead of running the CLI: it holds the takeover in its own
// process (if it dies, the kernel drops the redirect with it).
//
//   embedded-renewer-example self   begin, wait a moment, end
//   embedded-renewer-example wait   begin, then wait until `le-redirect end` (or the TTL) ends it
//   embedded-renewer-example proxy  as wait, with le-redirect's built-in proxy (challenges to an
//                                   ACME client's server on 127.0.0.1:12348) instead of one's own
import LERedirect

@main
struct EmbeddedRenewer {
    static func main() async {
        let mode = CommandLine.arguments.dropFirst().first ?? "self"
        do {
            // With the built-in proxy, the le-redirect program runs it, unprivileged, in a process of
            // its own (found beside this program, in /usr/sbin, or named by LE_REDIRECT_EXECUTABLE).
            let proxy: ProxyMode = mode == "proxy" ? .builtIn(ProxyOptions(challenge: .port(12348))) : .external
            let session = try await Takeover.begin(TakeoverOptions(proxyPort: 12347, ttl: .seconds(120), proxy: proxy))
            print("ready: port \(session.port) -> \(session.proxyPort) until \(RFC3339.format(unixMilliseconds: session.expiresAt))")
            // ... run the ACME client here; its validation server listens on session.proxyPort ...
            let report: EndReport
            if mode == "wait" || mode == "proxy" {
                report = try await session.ended()
            } else {
                try await Task.sleep(for: .milliseconds(200))
                report = try await session.end()
            }
            print("ended: \(report.reason.rawValue), warnings: \(report.warnings.count)")
        } catch {
            print("error: \(error)")
        }
    }
}
