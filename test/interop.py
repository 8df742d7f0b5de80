"""Real senders against smtp521: does the mail come back at once?

smtp521 runs under systemd-socket-activate in each mode on a loopback port.
Each sender sends one message to a test domain routed there (no DNS), and
the verdict is read from the sender itself: returned at once (a permanent
failure on the first attempt), deferred (requeued), or delivered to the
second host (for senders given two).  Postfix, Exim and OpenSMTPD replace
one another in Debian, so each is installed in its own phase; this suite
installs and removes MTAs and rewrites their configuration, so it runs only
where that is wanted: CI=true or SMTP521_INTEROP=1.
"""
import os
import re
import shutil
import smtplib
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time

from harness import ROOT

MODES = [("rcpt", []), ("greeting", ["-r", "greeting"]), ("close", ["-c"])]
NAME = "mx.test"
SENDER = "alice@sender.test"
MESSAGE = b"From: alice@sender.test\r\nTo: bob\r\nSubject: interop\r\n\r\nThis host takes no mail.\r\n"
ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive")

rows = []  # sender, version, setting, mode, verdict, what the sender reports
checks = []  # (name, ok, detail)
counter = iter(range(1, 1 << 30))


def run(argv, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 300)
    return subprocess.run(argv, env=kw.pop("env", ENV), **kw)


def apt_install(*packages):
    p = run(["apt-get", "install", "-y", "-q", "--no-install-recommends"] + list(packages), timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"apt-get install {packages}: {p.stdout[-1000:]}{p.stderr[-1000:]}")


def version(package):
    return run(["dpkg-query", "-W", "-f", "${Version}", package]).stdout.strip()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


# ------------------------------------------------------------ the servers

class Responders:
    """smtp521 in each mode on 127.0.0.1:port, and an accepting sink on
    127.0.0.2 at the same port: the 'second host' for two-host routes."""

    def __init__(self, binary):
        self.port = {}
        self.procs = []
        self.sinks = []
        for mode, args in MODES:
            port = free_port()
            self.port[mode] = port
            self.procs.append(subprocess.Popen(
                ["systemd-socket-activate", "--inetd", "-a", "-l", f"127.0.0.1:{port}",
                 binary, "-H", NAME, "-l", "none"] + args,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            sink = Sink(("127.0.0.2", port))
            threading.Thread(target=sink.serve_forever, daemon=True).start()
            self.sinks.append(sink)
        for port in self.port.values():
            assert wait_for(lambda: listening(port), 10), port
        self.delivered = set()
        for sink in self.sinks:
            sink.delivered = self.delivered

    def stop(self):
        for p in self.procs:
            p.terminate()
            p.wait(timeout=10)
        for s in self.sinks:
            s.shutdown()
            s.server_close()


def listening(port):
    with open("/proc/net/tcp") as f:
        return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A" for line in f)


class SinkHandler(socketserver.StreamRequestHandler):
    """An SMTP server that takes everything: the 'second host'."""

    def handle(self):
        w = self.wfile.write
        w(b"220 sink.test ESMTP\r\n")
        rcpts = []
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                w(b"250 sink.test\r\n")
            elif verb == b"RCPT":
                rcpts.append(line[8:].strip().strip(b"<>").decode("ascii", "replace"))
                w(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                w(b"354 go on\r\n")
                while self.rfile.readline() not in (b".\r\n", b".\n", b""):
                    pass
                self.server.delivered.update(rcpts)
                w(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                w(b"221 2.0.0 Bye\r\n")
                return
            else:
                w(b"250 2.0.0 Ok\r\n")


class Sink(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address):
        super().__init__(address, SinkHandler)
        self.delivered = set()


def record(sender, ver, setting, mode, verdict, detail):
    rows.append((sender, ver, setting, mode, verdict, " ".join(detail.split())[:160]))
    print(f"     {sender} {setting} [{mode}]: {verdict} -- {detail.strip()[:160]}")
    sys.stdout.flush()


def recipient(domain):
    return f"bob-{next(counter)}@{domain}"


# ------------------------------------------------------------ direct clients

def direct_clients(r):
    for mode, _ in MODES:
        port = r.port[mode]
        rcpt = recipient(f"{mode}.test.invalid")
        with tempfile.NamedTemporaryFile("wb", suffix=".eml") as msg:
            msg.write(MESSAGE)
            msg.flush()

            p = run(["swaks", "--server", "127.0.0.1", "--port", str(port), "--from", SENDER, "--to", rcpt,
                     "--timeout", "20", "--data", msg.name])
            last = [l for l in p.stdout.splitlines() if l.startswith("<** ")]
            record("swaks", version("swaks"), "default", mode, f"fails at once (exit {p.returncode})",
                   last[-1][4:] if last else p.stdout[-200:])
            checks.append((f"swaks [{mode}] fails with a 5yz", p.returncode in (21, 22, 23, 24) and last
                           and last[-1][4] == "5", p.stdout[-300:]))

            p = run(["msmtp", "--host=127.0.0.1", f"--port={port}", "--auth=off", "--tls=off",
                     f"--from={SENDER}", "--", rcpt], input=MESSAGE.decode())
            said = [l for l in p.stderr.splitlines() if "server message" in l or "not accepted" in l]
            record("msmtp", version("msmtp"), "default", mode, f"fails at once (exit {p.returncode})",
                   " / ".join(said) if said else p.stderr.strip()[-200:])
            # EX_TEMPFAIL (75) would mean 'try again later'.
            checks.append((f"msmtp [{mode}] fails permanently", p.returncode not in (0, 75), p.stderr[-300:]))

            p = run(["curl", "-sS", f"smtp://127.0.0.1:{port}", "--mail-from", SENDER, "--mail-rcpt", rcpt,
                     "-T", msg.name, "--max-time", "20"])
            record("curl", version("curl"), "smtp://", mode, f"fails at once (exit {p.returncode})",
                   p.stderr.strip())
            checks.append((f"curl [{mode}] fails", p.returncode in (8, 55, 56), p.stderr[-300:]))

        verdict, detail = smtplib_send(port, rcpt)
        record("python smtplib", sys.version.split()[0], "sendmail()", mode, verdict, detail)
        checks.append((f"smtplib [{mode}] gets a 5yz", verdict.startswith("fails at once") and " 5" in
                       f" {detail}", detail))


def smtplib_send(port, rcpt):
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.sendmail(SENDER, [rcpt], MESSAGE)
        return "delivered", ""
    except smtplib.SMTPConnectError as e:
        return "fails at once (SMTPConnectError)", f"{e.smtp_code} {e.smtp_error.decode()}"
    except smtplib.SMTPSenderRefused as e:
        return "fails at once (SMTPSenderRefused)", f"{e.smtp_code} {e.smtp_error.decode()}"
    except smtplib.SMTPRecipientsRefused as e:
        code, text = next(iter(e.recipients.values()))
        return "fails at once (SMTPRecipientsRefused)", f"{code} {text.decode()}"
    except smtplib.SMTPServerDisconnected as e:
        return "fails at once (SMTPServerDisconnected)", str(e)
    except smtplib.SMTPResponseException as e:
        return f"fails at once ({type(e).__name__})", f"{e.smtp_code} {e.smtp_error.decode()}"


# ------------------------------------------------------------ Postfix

POSTFIX_LOG = "/var/log/postfix-interop.log"


def postfix_phase(r, binary):
    for line in ("postfix postfix/main_mailer_type select Local only", "postfix postfix/mailname string sender.test"):
        run(["debconf-set-selections"], input=line + "\n")
    apt_install("postfix")
    ver = version("postfix")
    relay_port = free_port()
    transport = "".join(
        f"{mode}.test.invalid smtp:[127.0.0.1]:{r.port[mode]}\n"
        f"two-{mode}.test.invalid smtp:[127.0.0.1]:{r.port[mode]}, [127.0.0.2]:{r.port[mode]}\n"
        for mode, _ in MODES)
    with open("/etc/postfix/interop_transport", "w") as f:
        f.write(transport)
    # The MX-relay alternative of RFC 1846 section 3, as the man page gives it.
    with open("/etc/postfix/nomail", "w") as f:
        f.write("nomail.test.invalid  556 5.1.10 nomail.test.invalid does not accept mail\n")
    run(["postmap", "/etc/postfix/nomail"], check=True)
    with open("/etc/postfix/master.cf") as f:
        master = f.read().split("# smtp521 interop\n")[0]
    with open("/etc/postfix/master.cf", "w") as f:
        f.write(master + "# smtp521 interop\n"
                f"127.0.0.1:{relay_port} inet n - n - - smtpd\n"
                "  -o smtpd_recipient_restrictions=check_recipient_access,hash:/etc/postfix/nomail,"
                "permit_mynetworks,reject_unauth_destination\n")
    settings = {
        "myhostname": "sender.test", "mydestination": "localhost", "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4", "relayhost": "", "transport_maps": "texthash:/etc/postfix/interop_transport",
        "maillog_file": POSTFIX_LOG, "smtp_tls_security_level": "none", "smtpd_tls_security_level": "none",
        "smtp_skip_5xx_greeting": "yes", "compatibility_level": "3.6",
    }
    run(["postconf", "-e"] + [f"{k}={v}" for k, v in settings.items()], check=True)
    if os.path.exists(POSTFIX_LOG):
        os.remove(POSTFIX_LOG)
    run(["postfix", "stop"])
    p = run(["postfix", "start"])
    assert p.returncode == 0, p.stderr
    try:
        for setting, skip in (("default", "yes"), ("smtp_skip_5xx_greeting = no", "no")):
            run(["postconf", "-e", f"smtp_skip_5xx_greeting={skip}"], check=True)
            run(["postfix", "reload"], check=True)
            time.sleep(1)
            for mode, _ in MODES:
                verdict, detail = postfix_send(f"{mode}.test.invalid", r)
                record("Postfix", ver, setting, mode, verdict, detail)
                if mode == "rcpt":
                    checks.append((f"Postfix {setting} [rcpt] returns the mail at once",
                                   verdict.startswith("returned at once"), detail))
            run(["postsuper", "-d", "ALL"])
        run(["postconf", "-e", "smtp_skip_5xx_greeting=yes"], check=True)
        run(["postfix", "reload"], check=True)
        time.sleep(1)
        for mode, _ in MODES:
            verdict, detail = postfix_send(f"two-{mode}.test.invalid", r)
            record("Postfix", ver, "two destinations", mode, verdict, detail)
        run(["postsuper", "-d", "ALL"])
        # The MX relay: Postfix's smtpd refuses RCPT for the mailless host.
        p = run(["swaks", "--server", "127.0.0.1", "--port", str(relay_port), "--from", SENDER,
                 "--to", "bob@nomail.test.invalid", "--timeout", "20"])
        refusal = [l for l in p.stdout.splitlines() if l.startswith("<** ")]
        record("Postfix smtpd as MX relay", ver, "check_recipient_access", "-",
               "refuses the recipient" if refusal else "accepts", refusal[-1][4:] if refusal else p.stdout[-200:])
        # Postfix 3.7 does not pass on the detail 10 of 5.1.10: it sends 5.1.0.
        checks.append(("Postfix MX-relay access map refuses with 556",
                       bool(refusal) and refusal[-1][4:].startswith("556 5.1.") and
                       "does not accept mail" in refusal[-1], p.stdout[-400:]))
    finally:
        run(["postfix", "stop"])


def postfix_send(domain, r):
    rcpt = recipient(domain)
    run(["/usr/sbin/sendmail", "-f", SENDER, rcpt], input=MESSAGE.decode(), check=True)

    def verdict_line():
        try:
            with open(POSTFIX_LOG) as f:
                for line in f:
                    if f"to=<{rcpt}>" in line and "status=" in line:
                        return line
        except FileNotFoundError:
            pass
        return None

    line = wait_for(verdict_line, 60)
    if line is None:
        return "no verdict in 60 s", ""
    m = re.search(r"relay=(\S+), .*dsn=([\d.]+), status=(\w+) \((.*)\)$", line.strip())
    relay, dsn, status, text = m.groups() if m else ("?", "?", "?", line)
    if status == "bounced":
        return f"returned at once ({dsn})", text
    if status == "sent":
        return f"moved to the 2nd host ({relay})", text
    return f"{status} ({dsn})", text


# ------------------------------------------------------------ Exim

def exim_phase(r):
    apt_install("exim4-daemon-light")
    ver = version("exim4-daemon-light")
    run(["pkill", "-x", "exim4"])
    d = tempfile.mkdtemp(prefix="smtp521-exim-")
    os.chmod(d, 0o755)
    conf = os.path.join(d, "exim.conf")
    routers = []
    transports = []
    for mode, _ in MODES:
        port = r.port[mode]
        transports.append(f"t_{mode}:\n  driver = smtp\n  port = {port}\n  allow_localhost\n"
                          "  hosts_randomize = false\n")
        for prefix, hosts in (("", "127.0.0.1"), ("two-", "127.0.0.1 : 127.0.0.2")):
            routers.append(f"r_{prefix.strip('-') or 'one'}_{mode}:\n  driver = manualroute\n"
                           f"  domains = {prefix}{mode}.test.invalid\n  route_list = * \"{hosts}\" byname\n"
                           f"  self = send\n  transport = t_{mode}\n  no_more\n")
    with open(conf, "w") as f:
        f.write("primary_hostname = sender.test\nqualify_domain = sender.test\n"
                "exim_user = Debian-exim\nexim_group = Debian-exim\n"
                "spool_directory = /var/spool/exim4\n"
                f"log_file_path = {d}/%slog\n"
                "host_lookup = \nrfc1413_hosts = \n"
                "begin routers\n" + "".join(routers) +
                "begin transports\n" + "".join(transports) +
                "begin retry\n* * F,2d,15m\n")
    os.chmod(conf, 0o644)
    shutil.chown(d, "Debian-exim", "Debian-exim")
    try:
        for prefix, setting in (("", "default"), ("two-", "two destinations")):
            for mode, _ in MODES:
                rcpt = recipient(f"{prefix}{mode}.test.invalid")
                run(["exim4", "-C", conf, "-odf", "-f", SENDER, rcpt], input=MESSAGE.decode(), timeout=120)
                verdict, detail = exim_verdict(os.path.join(d, "mainlog"), rcpt)
                record("Exim", ver, setting, mode, verdict, detail)
                if mode == "rcpt" and not prefix:
                    checks.append(("Exim default [rcpt] returns the mail at once",
                                   verdict.startswith("returned at once"), detail))
    finally:
        # Whatever is left queued (bounces to the test sender): by message id.
        queued = re.findall(r"\b\w{6}-\w{6,11}-\w{2,4}\b", run(["exim4", "-C", conf, "-bp"]).stdout)
        if queued:
            run(["exim4", "-C", conf, "-Mrm"] + queued)
        shutil.rmtree(d, ignore_errors=True)


def exim_verdict(log, rcpt):
    try:
        with open(log) as f:
            lines = [line for line in f if f" {rcpt}" in line]
    except FileNotFoundError:
        return "no verdict", ""
    for line in lines:
        if " ** " in line:
            return "returned at once", line.split(": ", 1)[-1].strip()
        if " => " in line:
            return "moved to the 2nd host", line.split(" => ", 1)[-1].strip()
        if " == " in line:
            return "deferred", line.split(": ", 1)[-1].strip()
    return "no verdict", "".join(lines)[-200:]


# ------------------------------------------------------------ OpenSMTPD

def opensmtpd_phase(r):
    apt_install("opensmtpd")
    ver = version("opensmtpd")
    # One smtpd per mode, each with an empty queue: after a refused greeting
    # OpenSMTPD disables its route to 127.0.0.1 (all ports) for a while, so
    # one mode's verdict must not delay the next.
    for mode, _ in MODES:
        verdict, detail = opensmtpd_send(r, mode)
        record("OpenSMTPD", ver, "default", mode, verdict, detail)
        if mode == "rcpt":
            checks.append(("OpenSMTPD default [rcpt] returns the mail at once",
                           verdict.startswith("returned at once"), detail))


def opensmtpd_send(r, mode):
    run(["pkill", "-x", "smtpd"])
    wait_for(lambda: run(["pgrep", "-x", "smtpd"]).returncode != 0, 10)
    for sub in ("queue", "incoming", "corrupt", "temporary"):
        path = os.path.join("/var/spool/smtpd", sub)
        for entry in os.listdir(path) if os.path.isdir(path) else []:
            shutil.rmtree(os.path.join(path, entry), ignore_errors=True)
    d = tempfile.mkdtemp(prefix="smtp521-smtpd-")
    conf = os.path.join(d, "smtpd.conf")
    with open(conf, "w") as f:
        f.write(f'action "relay521" relay host smtp://127.0.0.1:{r.port[mode]}\n'
                f'match from local for domain "{mode}.test.invalid" action "relay521"\n')
    os.chmod(conf, 0o644)
    log = os.path.join(d, "smtpd.log")
    with open(log, "w") as logf:
        proc = subprocess.Popen(["smtpd", "-d", "-f", conf], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    try:
        assert wait_for(lambda: "starting" in open(log).read(), 20), open(log).read()[-1000:]
        time.sleep(1)
        rcpt = recipient(f"{mode}.test.invalid")
        p = run(["/usr/sbin/sendmail", "-f", SENDER, rcpt], input=MESSAGE.decode(), timeout=60)
        assert p.returncode == 0, p.stderr

        def verdict_line():
            with open(log) as f:
                for line in f:
                    if f"to=<{rcpt}>" in line and "result=" in line:
                        return line
                    if "mta error reason=" in line:
                        return line
            return None

        line = wait_for(verdict_line, 30)
        if line is None:
            return "no verdict in 30 s", ""
        if "result=" not in line:
            # A refused greeting gives no result: the route is disabled and
            # the envelope waits in the queue.
            queued = rcpt in run(["smtpctl", "show", "queue"]).stdout
            return ("deferred" if queued else "gone from the queue"), line.split("reason=", 1)[-1]
        result = re.search(r'result="?(\w+)"?', line).group(1)
        stat = re.search(r'stat="?(.*?)"?$', line.strip())
        detail = stat.group(1) if stat else line
        return {"PermFail": "returned at once", "TempFail": "deferred", "Ok": "delivered"}.get(result, result), detail
    finally:
        run(["smtpctl", "remove", "all"])
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------ main

def table():
    out = ["| sender | version | setting | smtp521 mode | verdict | what the sender reports |",
           "|---|---|---|---|---|---|"]
    for row in rows:
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(out) + "\n"


def main(binary):
    apt_install("swaks", "msmtp", "curl")
    r = Responders(binary)
    phases = [("direct clients", lambda: direct_clients(r)), ("Postfix", lambda: postfix_phase(r, binary)),
              ("Exim", lambda: exim_phase(r)), ("OpenSMTPD", lambda: opensmtpd_phase(r))]
    try:
        for name, phase in phases:
            print(f"---- {name}")
            sys.stdout.flush()
            try:
                phase()
            except Exception as e:  # noqa: BLE001 -- a phase that breaks is a failed check
                checks.append((f"{name} phase ran", False, repr(e)))
    finally:
        r.stop()
    text = table()
    out = os.path.join(ROOT, "test", "interop-table.md")
    with open(out, "w") as f:
        f.write(text)
    print(text)
    passed = failed = 0
    for name, ok, detail in checks:
        if ok:
            passed += 1
            print(f"ok   interop: {name}")
        else:
            failed += 1
            print(f"FAIL interop: {name}\n     {str(detail)[:400]}")
    return passed, failed


if __name__ == "__main__":
    p, f = main(os.path.join(ROOT, "smtp521"))
    print(f"{p} passed, {f} failed")
    sys.exit(1 if f else 0)
