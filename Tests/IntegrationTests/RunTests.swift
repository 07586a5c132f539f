import Foundation
import Glibc
import Testing

/// `le-redirect run -- COMMAND`: begin, the command, end, whatever happens to the command; and
/// `challenge add --begin` / `challenge remove`, the deploy/clean hook protocol.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct RunTests {
    @Test(arguments: [Host.nftablesPolicyDrop, .legacyDropForcedLegacy])
    func runPassesTheCommandsStatusThroughAndEnds(host: Host) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        let before = try net.ruleset()
        let seen = net.stateDirectory + "-seen"
        defer { unlink(seen) }
        let run = try net.leRedirect(
            ["run", "--external-proxy"] + host.begin + ["--", "sh", "-c", "\(Paths.binary) status --json > \(seen); exit 7"])
        #expect(run.status == 7, "\(run)")
        #expect(run.stdout.isEmpty, "le-redirect's own messages go to stderr: \(run)")
        let during = try String(contentsOfFile: seen, encoding: .utf8)
        #expect(during.contains("\"active\" : true") || during.contains("\"active\": true"), "\(during)")
        #expect(try net.ruleset() == before)
        #expect(try net.status()["state"] as? String == "inactive")
    }

    @Test func aCommandThatCannotStartStillEnds() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let before = try net.ruleset()
        let run = try net.leRedirect("run", "--external-proxy", "--", "/nonexistent/acme-client")
        #expect(run.status == 127, "\(run)")
        #expect(run.stderr.contains("could not start"), "\(run)")
        #expect(try net.ruleset() == before)
    }

    @Test func whenBeginFailsTheCommandDoesNotRun() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let marker = net.stateDirectory + "-ran"
        let run = try net.leRedirect("run", "--port", "0", "--", "touch", marker)
        #expect(run.status == 2, "\(run)")
        #expect(!FileManager.default.fileExists(atPath: marker))
    }

    /// SIGTERM to the wrapper reaches the command; the session ends and the wrapper exits with the
    /// command's status (128 + SIGTERM).
    @Test func aSignalReachesTheCommandAndTheSessionEnds() throws {
        let net = try TestNetwork(ruleset: "policy-drop")
        defer { net.close() }
        let before = try net.ruleset()
        let devnull = open("/dev/null", O_WRONLY | O_CLOEXEC)
        defer { close(devnull) }
        let wrapper = try spawn(
            ["ip", "netns", "exec", net.host, "env", "LE_REDIRECT_STATE_DIR=\(net.stateDirectory)", Paths.binary, "run",
             "--external-proxy", "--", "sleep", "60"],
            stdout: devnull, stderr: devnull)
        let deadline = Date().addingTimeInterval(15)
        while try (try? net.status()["active"] as? Bool) != true || net.processes(matching: "sleep").isEmpty {
            guard Date() < deadline else { throw TestFailure("the session did not become active") }
            usleep(20_000)
        }
        kill(wrapper, SIGTERM)
        var status: Int32 = 0
        waitpid(wrapper, &status, 0)
        #expect((status >> 8) & 0xff == 128 + SIGTERM)
        #expect(try net.processes(matching: "sleep").isEmpty)
        #expect(try net.ruleset() == before)
        #expect(try net.status()["state"] as? String == "inactive")
    }

    /// How an ACME client runs a hook: a program through `sh -c` (certbot), or a script running a
    /// hook script (dehydrated, acme.sh: scripts themselves, whose executable is a shell).
    enum HookRunner: String, CaseIterable, Sendable {
        case programThroughShell = "a program through sh -c"
        case scriptRunningAScript = "a script running a hook script"
    }

    /// A hook's session follows the ACME client that ran the hook (past the `sh -c` or hook script
    /// in between): when the client is killed, the session ends at once instead of at the TTL.
    @Test(arguments: [Host.nftablesPolicyDrop, .legacyDropForcedLegacy], HookRunner.allCases)
    func aSessionThatFollowsItsParentEndsWhenTheParentDies(host: Host, runner: HookRunner) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        let before = try net.ruleset()
        let devnull = open("/dev/null", O_WRONLY | O_CLOEXEC)
        defer { close(devnull) }
        let hook = "\(Paths.binary) begin --external-proxy --until-parent-exits \(host.begin.joined(separator: " "))"
        let argv: [String]
        switch runner {
        case .programThroughShell:
            argv = ["python3", "-c", "import subprocess, time; subprocess.run(['sh', '-c', '\(hook)']); time.sleep(120)"]
        case .scriptRunningAScript:
            argv = ["HOOK_COMMAND=\(hook)", Paths.support.appendingPathComponent("acme-client.sh").path]
        }
        let client = try spawn(
            ["ip", "netns", "exec", net.host, "env", "LE_REDIRECT_STATE_DIR=\(net.stateDirectory)"] + argv,
            stdout: devnull, stderr: devnull)
        let deadline = Date().addingTimeInterval(15)
        while (try? net.status()["active"] as? Bool) != true {
            guard Date() < deadline else { throw TestFailure("the session did not become active") }
            usleep(20_000)
        }
        let status = try net.status()
        #expect((status["clientPid"] as? NSNumber)?.int32Value == client)
        #expect(status["backend"] as? String == host.backend)
        kill(client, SIGKILL)
        waitpid(client, nil, 0)
        let ended = Date().addingTimeInterval(15)
        while try net.status()["state"] as? String != "inactive" {
            guard Date() < ended else { throw TestFailure("the session outlived the program it follows") }
            usleep(20_000)
        }
        #expect(try net.ruleset() == before)
        #expect(try net.daemons().isEmpty)
    }

    /// dehydrated's deploy_challenge / clean_challenge (and certbot's manual hooks) in two commands.
    @Test(arguments: [Host.nftablesPolicyDrop, .legacyDropForcedLegacy])
    func challengeAddBeginsAndTheLastRemoveEnds(host: Host) throws {
        let net = try TestNetwork(host)
        defer { net.close() }
        try net.startApp()
        let before = try net.ruleset()
        for token in ["tokA", "tokB"] {
            let add = try net.leRedirect(["challenge", "add", "--begin", token, "\(token).thumb"] + host.begin)
            #expect(add.status == 0, "\(add)")
        }
        #expect(try net.status()["backend"] as? String == host.backend)
        #expect(try net.httpClient("get", TestNetwork.hostAddress4, "/.well-known/acme-challenge/tokB") == "200 tokB.thumb")
        #expect(try net.leRedirect("challenge", "remove", "tokA").status == 0)
        #expect(try net.status()["active"] as? Bool == true)
        let last = try net.leRedirect("challenge", "remove", "tokB")
        #expect(last.status == 0, "\(last)")
        #expect(last.stdout.contains("session ended"), "\(last)")
        #expect(try net.ruleset() == before)
        // A clean step after the session is gone is not an error.
        #expect(try net.leRedirect("challenge", "remove", "tokB").status == 0)
    }
}
