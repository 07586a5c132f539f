"""A two-host testbed in network namespaces made here: the ACME CA and the load, and a web host.

  acme  10.77.0.1 / fd77::1   Pebble (its own CA, made here) on :14000, pebble-challtestsrv as its
                              DNS (web.test -> the web host), wrk for load
  web   10.77.0.2 / fd77::2   nginx on :80 (IPv4 and IPv6) as the app, le-redirect, the ACME client,
                              and one of the host firewalls in FIREWALLS

Used by scripts/testbed (up, down, status), scripts/demo and scripts/renewal-suite. Everything lives
in the two namespaces and in STATE_ROOT/NAME; `down` (and every `up`) removes what a previous run
left, crashed or not. Nothing touches the machine's own namespace: traffic stays on the veth pair.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULESETS = os.path.join(ROOT, "Tests", "IntegrationTests", "Rulesets")
STATE_ROOT = "/run/le-redirect-testbed"

ACME4, ACME6 = "10.77.0.1", "fd77::1"
WEB4, WEB6 = "10.77.0.2", "fd77::2"
DOMAIN = "web.test"
DIRECTORY = f"https://{ACME4}:14000/dir"

# The web host's firewall variants: how each is loaded.
FIREWALLS = {
    "none": [],
    "nft-accept": [["nft", "-f", os.path.join(RULESETS, "policy-accept.nft")]],
    "nft-drop": [["nft", "-f", os.path.join(RULESETS, "policy-drop.nft")]],
    "legacy-drop": [["iptables-legacy-restore", os.path.join(RULESETS, "legacy-drop.v4.rules")],
                    ["ip6tables-legacy-restore", os.path.join(RULESETS, "legacy-drop.v6.rules")]],
    # The same rules through iptables-nft: ip/ip6 filter and nat tables in nftables (Debian's and
    # Ubuntu's default iptables), the layout the source approach (docs/design.md) assumes.
    "iptables-nft-drop": [["iptables-nft-restore", os.path.join(RULESETS, "legacy-drop.v4.rules")],
                          ["ip6tables-nft-restore", os.path.join(RULESETS, "legacy-drop.v6.rules")]],
}

PAGE = "<!doctype html><title>app</title>" + "<p>The app on port 80 keeps serving while a certificate renews.</p>" * 8


def run(argv, check=True, **kwargs):
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result


def initial_namespaces():
    """This process's network namespace, and PID 1's where readable: never to be changed."""
    refs = {os.readlink("/proc/self/ns/net")}
    try:
        refs.add(os.readlink("/proc/1/ns/net"))
    except OSError:
        pass
    return refs


class Testbed:
    def __init__(self, name="lrtb", firewall="nft-drop", binary=None, va_sleep=0):
        if firewall not in FIREWALLS:
            raise ValueError(f"unknown firewall variant {firewall}: one of {', '.join(FIREWALLS)}")
        self.name, self.firewall, self.va_sleep = name, firewall, va_sleep
        self.acme, self.web = f"{name}-acme", f"{name}-web"
        self.state = os.path.join(STATE_ROOT, name)
        self.binary = binary or os.path.join(ROOT, ".build", "debug", "le-redirect")

    # Paths in the state directory.
    def path(self, *parts):
        return os.path.join(self.state, *parts)

    @property
    def ca(self):
        return self.path("ca", "ca.pem")

    @property
    def le_state(self):
        return self.path("le-redirect")

    # MARK: Up and down

    def up(self):
        self.down()
        os.makedirs(self.state, mode=0o700)
        for sub in ("ca", "bin", "nginx", "pebble", "clients"):
            os.makedirs(self.path(sub), mode=0o700)
        for ns in (self.acme, self.web):
            run(["ip", "netns", "add", ns])
        refs = initial_namespaces()
        for ns in (self.acme, self.web):
            inside = run(["ip", "netns", "exec", ns, "readlink", "/proc/self/ns/net"]).stdout.strip()
            if not inside.startswith("net:[") or inside in refs:
                self.down()
                raise RuntimeError(f"namespace {ns} is the initial network namespace; refusing to go on")
        for argv in (
            ["ip", "link", "add", "veth-acme", "netns", self.acme, "type", "veth", "peer", "name", "veth-web", "netns", self.web],
            ["ip", "-n", self.acme, "addr", "add", f"{ACME4}/24", "dev", "veth-acme"],
            ["ip", "-n", self.acme, "addr", "add", f"{ACME6}/64", "dev", "veth-acme", "nodad"],
            ["ip", "-n", self.web, "addr", "add", f"{WEB4}/24", "dev", "veth-web"],
            ["ip", "-n", self.web, "addr", "add", f"{WEB6}/64", "dev", "veth-web", "nodad"],
        ):
            run(argv)
        for ns, dev in ((self.acme, "veth-acme"), (self.web, "veth-web")):
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
        for argv in FIREWALLS[self.firewall]:
            run(["ip", "netns", "exec", self.web] + argv)
        os.symlink(self.binary, self.path("bin", "le-redirect"))
        self._make_ca()
        self._start_pebble()
        self._start_nginx()
        self.wait_ready()
        return self

    def down(self):
        """Removes the namespaces (and everything running in them) and the state directory."""
        for ns in (self.acme, self.web):
            if run(["ip", "netns", "pids", ns], check=False).returncode != 0:
                continue
            for _ in range(50):
                pids = [int(p) for p in run(["ip", "netns", "pids", ns], check=False).stdout.split()]
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
            run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(self.state, ignore_errors=True)

    def _make_ca(self):
        ca = self.path("ca")
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", "/CN=le-redirect testbed CA", "-keyout", f"{ca}/ca.key", "-out", f"{ca}/ca.pem"])
        run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=acme",
             "-keyout", f"{ca}/pebble.key", "-out", f"{ca}/pebble.csr"])
        with open(f"{ca}/san.ext", "w") as f:
            f.write(f"subjectAltName=IP:{ACME4},IP:{ACME6},DNS:acme.test\n")
        run(["openssl", "x509", "-req", "-in", f"{ca}/pebble.csr", "-CA", f"{ca}/ca.pem", "-CAkey", f"{ca}/ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", f"{ca}/san.ext", "-out", f"{ca}/pebble.pem"])

    def _start_pebble(self):
        config = {"pebble": {
            "listenAddress": "0.0.0.0:14000", "managementListenAddress": "0.0.0.0:15000",
            "certificate": self.path("ca", "pebble.pem"), "privateKey": self.path("ca", "pebble.key"),
            "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "", "externalAccountBindingRequired": False}}
        with open(self.path("pebble", "config.json"), "w") as f:
            json.dump(config, f)
        self.start(self.acme, ["pebble-challtestsrv", "-dns01", "127.0.0.1:8053", "-http01", "", "-https01", "",
                               "-tlsalpn01", "", "-management", "127.0.0.1:8055",
                               "-defaultIPv4", WEB4, "-defaultIPv6", WEB6], "challtestsrv")
        env = dict(os.environ, PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
        if self.va_sleep:
            env["PEBBLE_VA_SLEEPTIME"] = str(self.va_sleep)
        else:
            env["PEBBLE_VA_NOSLEEP"] = "1"
        self.start(self.acme, ["pebble", "-config", self.path("pebble", "config.json"), "-dnsserver", "127.0.0.1:8053"],
                   "pebble", env=env)

    def _start_nginx(self):
        d = self.path("nginx")
        # The page is in the configuration: nginx's workers cannot read the root-only state directory.
        # A webroot for certificates renewed with certbot --webroot: served by the master's user.
        os.makedirs(f"{d}/webroot/.well-known/acme-challenge", exist_ok=True)
        with open(f"{d}/nginx.conf", "w") as f:
            f.write(f"""user root; worker_processes 2; daemon off; pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  server {{ listen 80 reuseport; listen [::]:80 reuseport; keepalive_requests 1000000;
    location / {{ default_type text/html; return 200 '{PAGE}'; }}
    location ^~ /.well-known/acme-challenge/ {{ root {d}/webroot; default_type text/plain; }}
  }}
}}
""")
        self.start(self.web, ["nginx", "-c", f"{d}/nginx.conf", "-e", f"{d}/error.log"], "nginx")

    def start(self, ns, argv, log, env=None):
        """Starts a long-running program in a namespace; its output goes to STATE/NAME.log."""
        out = open(self.path(f"{log}.log"), "ab")
        return subprocess.Popen(["ip", "netns", "exec", ns] + argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def wait_ready(self, seconds=30):
        deadline = time.monotonic() + seconds
        checks = [
            (self.web, ["curl", "-sf", "--cacert", self.ca, "-o", "/dev/null", DIRECTORY], "Pebble's directory"),
            (self.acme, ["curl", "-sf", "-o", "/dev/null", f"http://{WEB4}/"], "the app over IPv4"),
            (self.acme, ["curl", "-sf", "-o", "/dev/null", f"http://[{WEB6}]/"], "the app over IPv6"),
        ]
        for ns, argv, what in checks:
            while run(["ip", "netns", "exec", ns] + argv, check=False).returncode != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"testbed: {what} did not come up (logs in {self.state})")
                time.sleep(0.1)

    # MARK: Running things

    def client_env(self, **extra):
        """The environment of ACME clients and hooks on the web host."""
        env = dict(os.environ)
        env.update({
            "PATH": self.path("bin") + ":" + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LE_REDIRECT_STATE_DIR": self.le_state,
            "REQUESTS_CA_BUNDLE": self.ca,  # certbot
            "LEGO_CA_CERTIFICATES": self.ca,  # lego
            "CURL_CA_BUNDLE": self.ca,  # curl (dehydrated)
            "SSL_CERT_FILE": self.ca,  # Python's urllib (acme-tiny)
        })
        env.update(extra)
        return env

    def web_exec(self, argv, timeout=300, **extra):
        return subprocess.run(["ip", "netns", "exec", self.web] + argv, env=self.client_env(**extra), timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def ruleset(self):
        """nft list ruleset and iptables-legacy-save (both families) of the web host, counters and
        dates left out: what must come back exactly."""
        out = run(["ip", "netns", "exec", self.web, "nft", "list", "ruleset"]).stdout
        out = re.sub(r"counter packets \d+ bytes \d+", "counter", out)
        for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
            saved = run(["ip", "netns", "exec", self.web, tool]).stdout
            out += "\n".join(re.sub(r"\[\d+:\d+\]", "[]", l) for l in saved.splitlines() if not l.startswith("#")) + "\n"
        return out

    def le_rules_left(self):
        text = self.ruleset()
        return text.count('comment "LE"') + text.count("--comment LE") + text.count("le_redirect")

    def status(self):
        lines = []
        for ns in (self.acme, self.web):
            exists = run(["ip", "netns", "pids", ns], check=False).returncode == 0
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split() if exists else []
            names = []
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        names.append(f.read().strip())
                except OSError:
                    pass
            lines.append(f"{ns}: {'up' if exists else 'down'}" + (f", running {', '.join(sorted(set(names)))}" if names else ""))
        lines.append(f"state: {self.state}" + ("" if os.path.isdir(self.state) else " (none)"))
        return "\n".join(lines)


class Load:
    """wrk from the acme host against the app, for `seconds` at most: keep-alive and
    connection-close, IPv4 and IPv6, at once (or with `scheme` https, on :443). `results()` waits
    and parses."""

    def __init__(self, bed, seconds, connections=4, nice=0, scheme="http"):
        self.runs = []
        for family, host in (("IPv4", WEB4), ("IPv6", f"[{WEB6}]")):
            for mode, headers in (("keep-alive", []), ("close", ["-H", "Connection: close"])):
                argv = ["ip", "netns", "exec", bed.acme] + (["nice", "-n", str(nice)] if nice else [])
                argv += ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s"]
                argv += headers + [f"{scheme}://{host}/"]
                label = f"{family} {mode}" + (f" {scheme}" if scheme != "http" else "")
                self.runs.append((label, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))

    def stop(self):
        for _, p in self.runs:
            p.send_signal(signal.SIGINT)

    def results(self):
        out = []
        for label, p in self.runs:
            text, _ = p.communicate(timeout=600)
            requests = int(re.search(r"(\d+) requests in", text).group(1)) if "requests in" in text else 0
            errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
            non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", text)) else 0
            out.append({"load": label, "requests": requests, "errors": errors, "non2xx": non2xx, "raw": text})
        return out


if __name__ == "__main__":
    sys.exit("this is a library: use scripts/testbed")
