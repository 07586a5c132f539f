"""Real renewals on the testbed (scripts/lib/testbed.py), each under load, with what they leave behind.

Each client obtains a certificate for web.test from Pebble on the acme host while wrk loads the app
(keep-alive and connection-close, IPv4 and IPv6) from the acme host, for the whole renewal. `renew`
returns the figures and the checks: certificate issued, socket errors and non-2xx answers of the
load, le-redirect rules left, and whether the ruleset came back byte for byte (counters aside).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import testbed

HOOKS = os.path.join(testbed.ROOT, "scripts", "hooks")
SOURCE_APPROACH = os.path.join(testbed.ROOT, "scripts", "lib", "source-approach")


def certbot_args(bed, workdir, domain=True):
    # --force-renewal: a lineage from an earlier run here is renewed, not kept.
    return ["certbot", "--server", testbed.DIRECTORY, "--agree-tos", "--register-unsafely-without-email",
            "--non-interactive", "--force-renewal", "--config-dir", f"{workdir}/config", "--work-dir", f"{workdir}/work",
            "--logs-dir", f"{workdir}/logs"] + (["-d", testbed.DOMAIN] if domain else [])


def certbot(bed, workdir):
    """certbot --standalone on 12348, le-redirect through its pre and post hooks."""
    argv = certbot_args(bed, workdir) + ["certonly", "--standalone", "--http-01-port", "12348",
                                         "--http-01-address", "127.0.0.1",
                                         "--pre-hook", f"{HOOKS}/certbot-pre.sh", "--post-hook", f"{HOOKS}/certbot-post.sh"]
    return argv, f"{workdir}/config/live/{testbed.DOMAIN}/cert.pem"


def certbot_deploy_haproxy(bed, workdir):
    """certbot --standalone through le-redirect's hooks, with `--deploy-hook "le-redirect deploy
    haproxy ..."`: HAProxy, terminating TLS on :443 of the web host in front of the app, gets the
    certificate certbot has just issued over its Runtime API, never restarted. HTTPS load (keep-alive
    and close, IPv4 and IPv6) runs on :443 across the renewal and the deploy; `verify` then checks
    it, the serial HAProxy serves and its pid."""
    hp = f"{workdir}/haproxy"
    os.makedirs(hp, exist_ok=True)
    site, socket = f"{hp}/site.pem", f"{hp}/admin.sock"
    if not os.path.exists(site):  # a placeholder until the first deploy
        testbed.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
                     "-subj", f"/CN={testbed.DOMAIN}", "-keyout", f"{hp}/placeholder.key", "-out", f"{hp}/placeholder.crt"])
        with open(site, "w") as f:
            f.write(open(f"{hp}/placeholder.crt").read() + open(f"{hp}/placeholder.key").read())
        os.chmod(site, 0o600)
    with open(f"{hp}/haproxy.cfg", "w") as f:
        f.write(f"""global
  stats socket {socket} mode 600 level admin
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend https
  bind :443 ssl crt {site}
  bind :::443 v6only ssl crt {site}
  default_backend app
backend app
  server app 127.0.0.1:80
""")
    if getattr(certbot_deploy_haproxy, "haproxy", None) is None or certbot_deploy_haproxy.haproxy.poll() is not None:
        certbot_deploy_haproxy.haproxy = bed.start(bed.web, ["haproxy", "-db", "-f", f"{hp}/haproxy.cfg"], "haproxy")
        deadline = time.monotonic() + 10
        while "LISTEN" not in testbed.run(["ip", "netns", "exec", bed.web, "ss", "-Hltn", "sport = :443"]).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError("HAProxy did not listen on :443")
            time.sleep(0.05)
    argv, cert = certbot(bed, workdir)
    argv += ["--deploy-hook", f"le-redirect deploy haproxy --socket {socket} --certificate {site}"]
    certbot_deploy_haproxy.load = testbed.Load(bed, seconds=120, scheme="https")
    return argv, cert


def load_problems(loads):
    """What a load's results say went wrong: no request made, socket errors, non-2xx answers."""
    problems = []
    for l in loads:
        if l["requests"] == 0:
            problems.append(f"the {l['load']} load made no request")
        if l["errors"]:
            problems.append(f"the {l['load']} load saw {l['errors']} socket errors")
        if l["non2xx"]:
            problems.append(f"the {l['load']} load saw {l['non2xx']} non-2xx answers")
    return problems


def served_serial(bed, address):
    out = subprocess.run(["ip", "netns", "exec", bed.acme, "sh", "-c",
                          f"openssl s_client -connect {address}:443 -servername {testbed.DOMAIN} </dev/null 2>/dev/null "
                          "| openssl x509 -noout -serial"], stdout=subprocess.PIPE, text=True).stdout.strip()
    return out


def _verify_deploy_haproxy(bed, workdir, result):
    problems = []
    fn = certbot_deploy_haproxy
    time.sleep(1)
    fn.load.stop()
    loads = fn.load.results()
    result["loads"] = result.get("loads", []) + loads
    problems += load_problems(loads)
    issued = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", f"{workdir}/config/live/{testbed.DOMAIN}/cert.pem"],
                            stdout=subprocess.PIPE, text=True).stdout.strip()
    for address in (testbed.WEB4, f"[{testbed.WEB6}]"):
        served = served_serial(bed, address)
        if not issued or served != issued:
            problems.append(f"HAProxy serves {served or 'nothing'} on {address}:443, not the issued certificate's {issued}")
    if fn.haproxy.poll() is not None:
        problems.append("HAProxy exited")
    elif f"pid={fn.haproxy.pid}," not in testbed.run(["ip", "netns", "exec", bed.web, "ss", "-Hltnp", "sport = :443"]).stdout:
        problems.append("another process than the HAProxy started before listens on :443")
    return problems


certbot_deploy_haproxy.verify = _verify_deploy_haproxy


def certbot_renew(bed, workdir):
    """`certbot renew` with le-redirect's hooks installed in renewal-hooks/ (as scripts/install
    does): the certificate is first obtained without load, the renewal is what is measured."""
    for stage in ("pre", "post"):
        os.makedirs(f"{workdir}/config/renewal-hooks/{stage}", exist_ok=True)
        target = f"{workdir}/config/renewal-hooks/{stage}/le-redirect"
        if not os.path.exists(target):
            os.symlink(f"{HOOKS}/certbot-{stage}.sh", target)
    if not os.path.exists(f"{workdir}/config/live/{testbed.DOMAIN}/cert.pem"):
        first = bed.web_exec(certbot(bed, workdir)[0])  # renewal-hooks/ are run by `renew` only
        if first.returncode != 0:
            raise RuntimeError(f"certbot certonly before renew failed: {first.stdout[-2000:]}")
    # No random delay: certbot waits up to 8 minutes before a non-interactive renew otherwise.
    return (certbot_args(bed, workdir, domain=False) + ["renew", "--no-random-sleep-on-renew"],
            f"{workdir}/config/live/{testbed.DOMAIN}/cert.pem")


def certbot_renew_mixed(bed, workdir):
    """`certbot renew` of two certificates in one run, le-redirect's hooks installed in renewal-hooks/:
    one obtained with --standalone (through le-redirect), one with --webroot (the app, nginx, serves
    its webroot; obtained without le-redirect, as `certonly` runs no renewal-hooks). The hooks take
    over port 80 for the whole run, so the webroot certificate's challenge reaches the proxy with a
    token le-redirect does not hold, and nothing listens on 12348 at that moment: with
    --unknown-challenges app (which the installed hooks pass) it is relayed to nginx and validates.
    The webroot certificate is the one checked (certbot renew exits 1 if either fails)."""
    argv, _ = certbot_renew(bed, workdir)
    name = f"{testbed.DOMAIN}-webroot"
    cert = f"{workdir}/config/live/{name}/cert.pem"
    if not os.path.exists(cert):
        first = bed.web_exec(certbot_args(bed, workdir) + ["certonly", "--webroot", "-w", bed.path("nginx", "webroot"),
                                                            "--cert-name", name])
        if first.returncode != 0:
            raise RuntimeError(f"certbot certonly --webroot before renew failed: {first.stdout[-2000:]}")
    return argv, cert


def certbot_manual(bed, workdir):
    """certbot --manual: tokens from memory, the redirect armed only for the challenge."""
    argv = certbot_args(bed, workdir) + ["certonly", "--manual", "--preferred-challenges", "http",
                                         "--manual-auth-hook", "le-redirect challenge certbot-auth",
                                         "--manual-cleanup-hook", "le-redirect challenge certbot-cleanup"]
    return argv, f"{workdir}/config/live/{testbed.DOMAIN}/cert.pem"


def lego(bed, workdir, server=testbed.DIRECTORY):
    """lego has no pre/post hooks: `le-redirect run -- lego ... run`."""
    argv = ["le-redirect", "run", "--", "lego", "--server", server, "--email", f"admin@{testbed.DOMAIN}", "--accept-tos",
            "--domains", testbed.DOMAIN, "--http", "--http.port", "127.0.0.1:12348", "--path", workdir, "run"]
    return argv, f"{workdir}/certificates/{testbed.DOMAIN}.crt"


def lego_renew(bed, workdir):
    """`lego renew` through `le-redirect run`, with lego's --renew-hook (run after the renewal, with
    the new certificate: where an app is reloaded). The certificate is first obtained without load;
    --days beyond its lifetime makes lego renew it now; --no-random-sleep, or lego first sleeps up to
    8 minutes, inside the takeover."""
    common = ["lego", "--server", testbed.DIRECTORY, "--email", f"admin@{testbed.DOMAIN}", "--accept-tos",
              "--domains", testbed.DOMAIN, "--http", "--http.port", "127.0.0.1:12348", "--path", workdir]
    if not os.path.exists(f"{workdir}/certificates/{testbed.DOMAIN}.crt"):
        first = bed.web_exec(["le-redirect", "run", "--"] + common + ["run"])
        if first.returncode != 0:
            raise RuntimeError(f"lego run before renew failed: {first.stdout[-2000:]}")
    marker = f"{workdir}/{lego_renew.hook_marker}"
    if os.path.exists(marker):
        os.unlink(marker)
    return (["le-redirect", "run", "--"] + common + ["renew", "--days", "100000", "--no-random-sleep", "--renew-hook", f"touch {marker}"],
            f"{workdir}/certificates/{testbed.DOMAIN}.crt")


lego_renew.hook_marker = "renew-hook-ran"


def dehydrated(bed, workdir):
    """dehydrated through its hook.sh protocol (deploy_challenge / clean_challenge)."""
    os.makedirs(f"{workdir}/wellknown", exist_ok=True)
    with open(f"{workdir}/config", "w") as f:
        f.write(f'CA="{testbed.DIRECTORY}"\nCHALLENGETYPE="http-01"\nBASEDIR="{workdir}"\nWELLKNOWN="{workdir}/wellknown"\n'
                f'HOOK="{HOOKS}/dehydrated-hook.sh"\nCURL_OPTS="--cacert {bed.ca}"\n')
    if not os.path.isdir(f"{workdir}/accounts"):
        reg = bed.web_exec(["dehydrated", "--register", "--accept-terms", "-f", f"{workdir}/config"])
        if reg.returncode != 0:
            raise RuntimeError(f"dehydrated --register failed: {reg.stdout[-2000:]}")
    return ["dehydrated", "-c", "--force", "-d", testbed.DOMAIN, "-f", f"{workdir}/config"], f"{workdir}/certs/{testbed.DOMAIN}/cert.pem"


def uacme(bed, workdir):
    """uacme through its hook (METHOD TYPE IDENT TOKEN AUTH). Debian's uacme (libcurl-gnutls) trusts
    only the system's CA bundle: Pebble's CA is bind-mounted over it in a mount namespace of its own."""
    os.makedirs(workdir, exist_ok=True)

    def trusting_pebble(argv):
        return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/ssl/certs/ca-certificates.crt && exec "$@"', bed.ca] + argv

    common = ["uacme", "-y", "-v", "-c", f"{workdir}/conf", "-a", testbed.DIRECTORY]
    if not os.path.isfile(f"{workdir}/conf/private/key.pem"):
        reg = bed.web_exec(trusting_pebble(common + ["new"]))
        if reg.returncode != 0:
            raise RuntimeError(f"uacme new failed: {reg.stdout[-2000:]}")
    argv = trusting_pebble(common + ["-f", "-h", f"{HOOKS}/uacme-hook.sh", "issue", testbed.DOMAIN])
    return argv, f"{workdir}/conf/{testbed.DOMAIN}/cert.pem"


def resolving_domain_here(bed, workdir, argv, setup=""):
    """`argv` with DOMAIN resolving to the web host on the web host itself (for a client's own check
    of its challenge): a hosts file bind-mounted over /etc/hosts in a mount namespace of its own,
    after the shell commands `setup` (run in that namespace too)."""
    hosts = f"{workdir}/hosts"
    with open(hosts, "w") as f:
        f.write(f"127.0.0.1 localhost\n::1 localhost\n{testbed.WEB4} {testbed.DOMAIN}\n{testbed.WEB6} {testbed.DOMAIN}\n")
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            setup + 'mount --bind "$0" /etc/hosts && exec "$@"', hosts] + argv


def acme_tiny(bed, workdir):
    """acme-tiny has no hooks: `le-redirect run --webroot DIR --include-local -- acme-tiny --acme-dir
    DIR`. Before asking the CA, acme-tiny fetches each challenge from http://DOMAIN/ itself, from this
    host: --include-local steers the host's own connections too, so that check reaches the proxy
    (without it, the app answers and acme-tiny gives up)."""
    challenges = f"{workdir}/challenges"
    os.makedirs(challenges, exist_ok=True)
    os.chmod(challenges, 0o755)
    # The proxy opens the webroot as its unprivileged user: every directory on the way must let
    # others search it (o+x; nothing becomes listable or writable).
    d = os.path.dirname(challenges)
    while d not in ("/", ""):
        mode = os.stat(d).st_mode
        if not mode & 0o001:
            os.chmod(d, (mode & 0o7777) | 0o001)
        d = os.path.dirname(d)
    for key in ("account.key", "domain.key"):
        if not os.path.isfile(f"{workdir}/{key}"):
            subprocess.run(["openssl", "genrsa", "-out", f"{workdir}/{key}", "2048"], check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-new", "-sha256", "-key", f"{workdir}/domain.key", "-subj", f"/CN={testbed.DOMAIN}",
                    "-addext", f"subjectAltName=DNS:{testbed.DOMAIN}",
                    "-out", f"{workdir}/domain.csr"], check=True, capture_output=True)
    cert = f"{workdir}/cert.pem"
    argv = ["sh", "-c", 'rm -f "$0" && "$@" > "$0.new" && mv "$0.new" "$0"', cert,
            "le-redirect", "run", "--webroot", challenges, "--include-local", "--", "acme-tiny", "--account-key",
            f"{workdir}/account.key", "--csr", f"{workdir}/domain.csr", "--acme-dir", challenges,
            "--directory-url", testbed.DIRECTORY]
    return resolving_domain_here(bed, workdir, argv), cert


def acmetool(bed, workdir):
    """acmetool through its hooks directory (scripts/hooks/acmetool-hook.sh as hooks/le-redirect):
    challenge-http-start begins an --in-memory session with --include-local, as acmetool fetches
    each challenge from http://DOMAIN/ itself before asking the CA (its self-test, which fails
    without it). acmetool also drops each challenge into /var/run/acme/acme-challenge, whatever it
    is told: a tmpfs there, in the mount namespace acmetool runs in, keeps it off the machine."""
    state, hooks = f"{workdir}/state", f"{workdir}/hooks"
    os.makedirs(f"{state}/conf", exist_ok=True)
    os.makedirs(hooks, exist_ok=True)
    os.chmod(hooks, 0o755)  # acmetool runs no hook from a world-writable directory
    if not os.path.lexists(f"{hooks}/le-redirect"):
        os.symlink(f"{HOOKS}/acmetool-hook.sh", f"{hooks}/le-redirect")
    with open(f"{state}/conf/target", "w") as f:
        f.write(f"request:\n  provider: {testbed.DIRECTORY}\n  key:\n    type: ecdsa\n")
    with open(f"{state}/conf/responses", "w") as f:
        f.write('"acme-enter-email": "admin@web.test"\n"acme-agreement:data:text/plain,Do%20what%20thou%20wilt": true\n')
    # A certificate from an earlier run would satisfy the target: only the account stays.
    for d in ("certs", "keys", "live", "desired"):
        shutil.rmtree(f"{state}/{d}", ignore_errors=True)
    argv = ["acmetool", "--batch", "--state", state, "--hooks", hooks, "want", testbed.DOMAIN]
    made = not os.path.exists("/run/acme")
    acmetool.cleanup = (lambda: os.rmdir("/run/acme")) if made else None
    setup = "mkdir -p /run/acme && mount -t tmpfs -o mode=0755,size=1m tmpfs /run/acme && "
    return resolving_domain_here(bed, workdir, argv, setup=setup), f"{state}/live/{testbed.DOMAIN}/cert"


def certbot_source_approach(bed, workdir):
    """For comparison only: certbot --standalone with the hooks the source approach (docs/design.md) uses
    (tinyproxy on 12347 and six nft CLI rules, removed one by one afterwards)."""
    argv = certbot_args(bed, workdir) + ["certonly", "--standalone", "--http-01-port", "12348",
                                         "--pre-hook", f"{SOURCE_APPROACH}/pre.sh", "--post-hook", f"{SOURCE_APPROACH}/post.sh"]
    return argv, f"{workdir}/config/live/{testbed.DOMAIN}/cert.pem"


CLIENTS = {
    "certbot": certbot,
    "certbot-renew": certbot_renew,
    "certbot-manual": certbot_manual,
    "lego": lego,
    "lego-renew": lego_renew,
    "dehydrated": dehydrated,
    "uacme": uacme,
    "acme-tiny": acme_tiny,
    "acmetool": acmetool,
}


def session_log_since(bed, offset):
    path = os.path.join(bed.le_state, "session.log")
    try:
        with open(path) as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return ""


def log_size(bed):
    try:
        return os.path.getsize(os.path.join(bed.le_state, "session.log"))
    except OSError:
        return 0


def stamp(line):
    """Seconds since the epoch of a session.log line's millisecond timestamp."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z", line)
    if not m:
        return None
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) - time.timezone + int(m.group(2)) / 1000


def session_active(bed):
    out = bed.web_exec(["le-redirect", "status", "--json"]).stdout
    try:
        return json.loads(out).get("active") is True
    except ValueError:
        raise RuntimeError(f"le-redirect status --json: {out[-500:]}")


def renew(bed, name, client=None, load=True, expect_success=True, extra_env=None):
    """One renewal with `client` (a function of CLIENTS, or another), under load unless `load` is
    False. Returns a dict of figures and of failed checks ('problems', empty when all hold)."""
    client = client or CLIENTS[name]
    workdir = bed.path("clients", name)
    os.makedirs(workdir, exist_ok=True)
    argv, cert = client(bed, workdir)
    before = bed.ruleset()
    offset = log_size(bed)
    cert_before = os.path.getmtime(cert) if os.path.exists(cert) else 0
    wrk = testbed.Load(bed, seconds=120) if load else None
    if wrk:
        time.sleep(1)  # the load is steady before the renewal starts
    started = time.monotonic()
    try:
        done = bed.web_exec(argv, timeout=300, **(extra_env or {}))
    finally:
        cleanup = getattr(client, "cleanup", None)
        if cleanup:
            try:
                cleanup()
            except OSError:
                pass
    wall = time.monotonic() - started
    if wrk:
        time.sleep(1)
        wrk.stop()
    loads = wrk.results() if wrk else []
    after = bed.ruleset()
    log = session_log_since(bed, offset)
    result = {"client": name, "firewall": bed.firewall, "exit": done.returncode, "wall": wall, "loads": loads,
              "output": done.stdout[-4000:], "log": log}
    starts = [stamp(l) for l in log.splitlines() if "session started" in l]
    ends = [(stamp(l), l) for l in log.splitlines() if "session ended" in l]
    if starts and ends:
        result["window"] = ends[-1][0] - starts[0]
        counters = dict(re.findall(r" (\w[\w-]*)=(\S+)", ends[-1][1]))
        result["window_requests"] = int(counters.get("requests", 0))
        result["window_errors"] = int(counters.get("errors", 0))
    issued = os.path.exists(cert) and os.path.getmtime(cert) > cert_before
    problems = []
    if expect_success:
        if done.returncode != 0:
            problems.append(f"{name} exited {done.returncode}")
        if not issued:
            problems.append("no certificate was issued")
    else:
        if done.returncode == 0:
            problems.append(f"{name} succeeded where it should have failed")
        if issued:
            problems.append("a certificate was issued where validation should have failed")
    problems += load_problems(loads)
    verify = getattr(client, "verify", None)
    if verify:
        problems += verify(bed, workdir, result) if expect_success else []
    marker = getattr(client, "hook_marker", None)
    if expect_success and marker and not os.path.exists(os.path.join(workdir, marker)):
        problems.append(f"{name}'s own hook did not run")
    left = after.count('comment "LE"') + after.count("--comment LE") + after.count("le_redirect")
    if left:
        problems.append(f"{left} le-redirect rule(s) left")
    if after != before:
        problems.append("the ruleset differs from before the renewal")
    if session_active(bed):
        problems.append("a session is still active")
    result.update(issued=issued, rules_left=left, restored=after == before, problems=problems)
    return result


def killed_between_hooks(bed):
    """certbot SIGKILLed while its session is active (between its pre and post hooks): port 80 keeps
    serving the app, the session ends with certbot (the hook follows it), the ruleset comes back,
    and the next renewal goes through."""
    workdir = bed.path("clients", "certbot-killed")
    os.makedirs(workdir, exist_ok=True)
    argv, _ = certbot(bed, workdir)
    before = bed.ruleset()
    problems = []
    proc = subprocess.Popen(["ip", "netns", "exec", bed.web] + argv, env=bed.client_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while not session_active(bed):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            return {"problems": ["the session did not become active before certbot was to be killed"]}
        time.sleep(0.05)
    certbot_pids = [int(p) for p in subprocess.run(["pgrep", "-f", f"certbot.*{workdir}"], stdout=subprocess.PIPE,
                                                    text=True).stdout.split()]
    for pid in certbot_pids:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    for family, url in (("IPv4", f"http://{testbed.WEB4}/"), ("IPv6", f"http://[{testbed.WEB6}]/")):
        got = subprocess.run(["ip", "netns", "exec", bed.acme, "curl", "-s", "--max-time", "5", url], stdout=subprocess.PIPE,
                             text=True).stdout
        if "keeps serving" not in got:
            problems.append(f"port 80 did not serve the app over {family} after certbot was killed")
    deadline = time.monotonic() + 30
    while session_active(bed):
        if time.monotonic() > deadline:
            problems.append("the session outlived the certbot it followed")
            break
        time.sleep(0.1)
    if bed.ruleset() != before:
        problems.append("the ruleset did not come back after certbot was killed")
    again = renew(bed, "certbot", load=False)
    problems += [f"the next renewal: {p}" for p in again["problems"]]
    return {"killed": certbot_pids, "problems": problems}
