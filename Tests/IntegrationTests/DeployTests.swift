import Foundation
import Testing

/// HAProxy in front (TLS on :443, the site on :80), as one of the articles this project started
/// from runs it: a renewal window through le-redirect with HAProxy untouched, then the renewed
/// certificate swapped in over the Runtime API by `le-redirect deploy haproxy`, all under HTTPS
/// (keep-alive and close) and HTTP load: no socket or TLS error, HAProxy's pid unchanged, the new
/// certificate (its serial) served afterwards. And the errors an operator gets for a wrong socket,
/// a wrong certificate name, a key that is not the certificate's, no certificate at all.
@Suite(.enabled(if: Kernel.enabled, "needs root and network namespaces"))
struct DeployTests {
    static let v4 = TestNetwork.hostAddress4, v6 = TestNetwork.hostAddress6

    func makeCertificate(_ dir: String, _ name: String, serial: String) throws {
        let out = try run([
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "\(dir)/\(name).key", "-out",
            "\(dir)/\(name).crt", "-days", "2", "-subj", "/CN=web.test", "-set_serial", "0x\(serial)",
        ])
        #expect(out.status == 0, "\(out)")
    }

    func servedSerial(_ net: TestNetwork, _ address: String) throws -> String {
        let target = address.contains(":") ? "[\(address)]:443" : "\(address):443"
        let out = try net.exec(
            net.client, ["sh", "-c", "openssl s_client -connect \(target) -servername web.test </dev/null 2>/dev/null | openssl x509 -noout -serial"])
        return out.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The load: HTTPS keep-alive and close on IPv4 and IPv6, HTTP on :80, 6 s each from the client
    /// namespace, for the whole window and the deploy.
    func startLoads(_ net: TestNetwork, _ dir: String) throws -> [(String, pid_t, String)] {
        let loads: [(String, [String])] = [
            ("https-keepalive", ["https://\(Self.v4)/"]), ("https-close", ["-H", "Connection: close", "https://[\(Self.v6)]/"]),
            ("http", ["http://\(Self.v4)/"]),
        ]
        var running: [(String, pid_t, String)] = []
        for (name, arguments) in loads {
            let log = "\(dir)/wrk-\(name).log"
            let fd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            defer { Glibc.close(fd) }
            let pid = try spawn(["ip", "netns", "exec", net.client, "wrk", "-t1", "-c8", "-d6s"] + arguments, stdout: fd, stderr: fd)
            running.append((name, pid, log))
        }
        return running
    }

    /// Waits for the loads: each made requests, with no socket error and no non-2xx answer.
    /// `closedKeepAlive`: read errors a keep-alive load may see, one per connection at most (a
    /// server closing its idle keep-alive connections as a request is sent on them).
    func checkLoads(_ running: [(String, pid_t, String)], _ label: String, closedKeepAlive: Int = 0) throws {
        for (name, pid, log) in running {
            var code: Int32 = 0
            waitpid(pid, &code, 0)
            let output = try String(contentsOfFile: log, encoding: .utf8)
            #expect(code == 0 && output.contains("requests in"), "\(name): \(output)")
            if closedKeepAlive > 0, !name.hasSuffix("close"), let m = output.firstMatch(of: #/Socket errors: connect 0, read (\d+), write 0, timeout 0/#) {
                #expect(Int(m.output.1)! <= closedKeepAlive, "\(name): \(output)")
            } else {
                #expect(!output.contains("Socket errors"), "\(name): \(output)")
            }
            #expect(!output.contains("Non-2xx"), "\(name): \(output)")
            let lines = output.split(separator: "\n").filter { $0.contains("requests in") || $0.contains("errors") || $0.contains("Non-2xx") }
            print("\(label), \(name): " + lines.map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: "; "))
        }
    }

    /// A renewal's window: begin, a challenge answered by the ACME client's stand-in on 12348,
    /// end, and the ruleset as before.
    func renewalWindow(_ net: TestNetwork) throws {
        let before = try net.ruleset()
        #expect(try net.leRedirect("begin", "--ttl", "2m").status == 0)
        #expect(try net.httpClient("get", Self.v4, "/.well-known/acme-challenge/tok") == "200 acme-client challenge tok")
        #expect(try net.leRedirect("end").status == 0)
        #expect(try net.ruleset() == before)
    }

    @Test func aRenewedCertificateIsSwappedIntoHAProxyUnderLoad() throws {
        // A host firewall that drops by default what is not 22, 80 or 443.
        let net = try TestNetwork(ruleset: "policy-accept")
        defer { net.close() }
        let dir = net.stateDirectory + "-nginx"  // removed by close()
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try makeCertificate(dir, "old", serial: "A1")
        try makeCertificate(dir, "new", serial: "B2")
        let site = "\(dir)/site.pem"
        try (String(contentsOfFile: "\(dir)/old.crt", encoding: .utf8) + String(contentsOfFile: "\(dir)/old.key", encoding: .utf8))
            .write(toFile: site, atomically: true, encoding: .utf8)
        let socket = "\(dir)/admin.sock"
        let config = """
            global
              stats socket \(socket) mode 600 level admin
              maxconn 4096
            defaults
              mode http
              timeout connect 5s
              timeout client 30s
              timeout server 30s
            frontend https
              bind :443 ssl crt \(site)
              bind :::443 v6only ssl crt \(site)
              default_backend app
            frontend http
              bind :80
              bind :::80 v6only
              default_backend app
            backend app
              server app 127.0.0.1:8081

            """
        try config.write(toFile: "\(dir)/haproxy.cfg", atomically: true, encoding: .utf8)
        try net.startApp(port: 8081, address: "127.0.0.1")
        try net.startApp(port: 12348, tag: "acme-client", address: "127.0.0.1")
        let haproxy = try net.start(net.host, ["haproxy", "-db", "-f", "\(dir)/haproxy.cfg"])
        try net.waitForListener(net.host, 443)
        #expect(try servedSerial(net, Self.v4) == "serial=A1")

        let running = try startLoads(net, dir)
        usleep(1_000_000)
        try renewalWindow(net)

        // certbot's deploy hook: RENEWED_LINEAGE names the live directory.
        let lineage = "\(dir)/live"
        try FileManager.default.createDirectory(atPath: lineage, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: "\(dir)/new.crt", toPath: "\(lineage)/fullchain.pem")
        try FileManager.default.copyItem(atPath: "\(dir)/new.key", toPath: "\(lineage)/privkey.pem")
        let deploy = try net.leRedirect(["deploy", "haproxy", "--socket", socket, "--certificate", site], environment: ["RENEWED_LINEAGE": lineage])
        #expect(deploy.status == 0, "\(deploy)")
        #expect(try servedSerial(net, Self.v4) == "serial=B2")
        #expect(try servedSerial(net, Self.v6) == "serial=B2")
        // The file HAProxy loads at its next start is the new one too, and (it holds the key) no
        // longer readable by others, as it was.
        let attributes = try FileManager.default.attributesOfItem(atPath: site)
        #expect((attributes[.posixPermissions] as? Int).map { $0 & 0o007 } == 0, "\(attributes)")
        #expect(try String(contentsOfFile: site, encoding: .utf8).contains(String(contentsOfFile: "\(dir)/new.crt", encoding: .utf8).split(separator: "\n")[1]))

        try checkLoads(running, "deploy haproxy")
        // The same HAProxy all along.
        #expect(kill(haproxy, 0) == 0)
        #expect(try net.exec(net.host, ["ss", "-Hltnp", "sport = :443"]).stdout.contains("pid=\(haproxy)"))
        // The errors: each says what was being done on what, and the certificate served stays.
        // (After the load: HAProxy 2.6 drops a keep-alive TLS connection when a commit fails on a
        // key that is not the certificate's.)
        let wrongSocket = try net.leRedirect(["deploy", "haproxy", "--socket", "\(dir)/nothing.sock", "--certificate", site,
                                              "--fullchain", "\(dir)/new.crt", "--key", "\(dir)/new.key"])
        #expect(wrongSocket.status == 1 && wrongSocket.stderr.contains("connecting to HAProxy's Runtime API at \(dir)/nothing.sock"), "\(wrongSocket)")
        let wrongName = try net.leRedirect(["deploy", "haproxy", "--socket", socket, "--certificate", "\(dir)/other.pem",
                                            "--fullchain", "\(dir)/old.crt", "--key", "\(dir)/old.key"])
        #expect(wrongName.status == 1 && wrongName.stderr.contains("refused the new certificate for \(dir)/other.pem"), "\(wrongName)")
        let wrongKey = try net.leRedirect(["deploy", "haproxy", "--socket", socket, "--certificate", site,
                                           "--fullchain", "\(dir)/old.crt", "--key", "\(dir)/new.key"])
        #expect(wrongKey.status == 1 && wrongKey.stderr.contains("did not commit the new certificate") && wrongKey.stderr.contains("inconsistencies"), "\(wrongKey)")
        let nothing = try net.leRedirect(["deploy", "haproxy", "--socket", socket, "--certificate", site])
        #expect(nothing.status == 2 && nothing.stderr.contains("RENEWED_LINEAGE"), "\(nothing)")
        #expect(try servedSerial(net, Self.v4) == "serial=B2")
    }

    /// nginx terminating TLS on :443 and serving the site on :80: the renewal window through
    /// le-redirect, then the deploy step the README gives for nginx, the renewed files in place and
    /// a graceful reload (`nginx -s reload`), under the same loads: no socket error, the same master
    /// process, the new certificate served afterwards.
    @Test func aGracefulNginxReloadServesTheRenewedCertificateUnderLoad() throws {
        let net = try TestNetwork(ruleset: "policy-accept")
        defer { net.close() }
        let dir = net.stateDirectory + "-nginx"  // removed by close()
        try FileManager.default.createDirectory(atPath: "\(dir)/live", withIntermediateDirectories: true)
        try makeCertificate(dir, "old", serial: "A1")
        try makeCertificate(dir, "new", serial: "B2")
        try FileManager.default.copyItem(atPath: "\(dir)/old.crt", toPath: "\(dir)/live/fullchain.pem")
        try FileManager.default.copyItem(atPath: "\(dir)/old.key", toPath: "\(dir)/live/privkey.pem")
        let config = """
            worker_processes 2; daemon off; pid \(dir)/nginx.pid; error_log \(dir)/error.log;
            events { worker_connections 4096; }
            http {
              access_log off; client_body_temp_path \(dir)/body; proxy_temp_path \(dir)/proxy;
              server { listen 443 ssl; listen [::]:443 ssl; keepalive_requests 1000000;
                ssl_certificate \(dir)/live/fullchain.pem; ssl_certificate_key \(dir)/live/privkey.pem;
                location / { return 200 "site\\n"; } }
              server { listen 80; listen [::]:80; keepalive_requests 1000000; location / { return 200 "site\\n"; } }
            }
            """
        try config.write(toFile: "\(dir)/nginx.conf", atomically: true, encoding: .utf8)
        try net.startApp(port: 12348, tag: "acme-client", address: "127.0.0.1")
        let nginx = try net.start(net.host, ["nginx", "-c", "\(dir)/nginx.conf", "-e", "\(dir)/error.log"])
        try net.waitForListener(net.host, 443)
        #expect(try servedSerial(net, Self.v4) == "serial=A1")

        // The window, under load: not one error.
        let window = try startLoads(net, dir)
        usleep(1_000_000)
        try renewalWindow(net)
        try checkLoads(window, "nginx, the renewal window")

        // The deploy, under load: nginx's graceful reload closes the old workers' idle keep-alive
        // connections, and a request sent on one at that moment fails (wrk counts a read error;
        // a browser sends it again): at most one per keep-alive connection (8), none otherwise.
        let running = try startLoads(net, dir)
        usleep(1_000_000)
        // certbot's deploy hook for nginx: the lineage's files are renewed in place, then
        // `nginx -s reload` (new workers with the new certificate; the old ones finish what they
        // serve).
        for (from, to) in [("new.crt", "fullchain.pem"), ("new.key", "privkey.pem")] {
            try FileManager.default.removeItem(atPath: "\(dir)/live/\(to)")
            try FileManager.default.copyItem(atPath: "\(dir)/\(from)", toPath: "\(dir)/live/\(to)")
        }
        let reload = try net.exec(net.host, ["nginx", "-c", "\(dir)/nginx.conf", "-e", "\(dir)/error.log", "-s", "reload"])
        #expect(reload.status == 0, "\(reload)")
        var served = ""
        for _ in 0..<50 {  // the new workers take a moment to come up
            served = try servedSerial(net, Self.v4)
            if served == "serial=B2" { break }
            usleep(100_000)
        }
        #expect(served == "serial=B2")
        #expect(try servedSerial(net, Self.v6) == "serial=B2")
        try checkLoads(running, "nginx reload", closedKeepAlive: 8)
        #expect(kill(nginx, 0) == 0)
        #expect(try String(contentsOfFile: "\(dir)/nginx.pid", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines) == "\(nginx)")
    }
}
