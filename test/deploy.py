"""Deployment: the systemd units, the inetd line, the man page and `make
install`, and smtp521 under the real super-servers (systemd-socket-activate,
openbsd-inetd, tcpserver), with syslog captured on a private /dev/log."""
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import tempfile
import time

from harness import ROOT, crlf, fields

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


GREET = b"220 mx.test ESMTP does not accept mail\r\n"
BYE = b"221 2.0.0 mx.test closing connection\r\n"
REFUSAL = b"521 5.3.2 mx.test does not accept mail\r\n"
SESSION_IN = crlf("EHLO client.example", "MAIL FROM:<a@client.example>", "RCPT TO:<b@mx.test>", "QUIT")
SESSION_OUT = GREET + b"250-mx.test\r\n250 ENHANCEDSTATUSCODES\r\n250 2.1.0 Ok\r\n" + REFUSAL + BYE


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def talk(port, data, host="127.0.0.1", family=socket.AF_INET, timeout=10):
    """Connect, send, read to EOF; return (reply bytes, our local port)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        local_port = s.getsockname()[1]
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out, local_port
            out += chunk


def wait_listening(port, host="127.0.0.1", family=socket.AF_INET, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # A probe that connects would start a session: only ask the
            # kernel's table of listening sockets.
            table = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
            with open(table) as f:
                if any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A" for line in f):
                    return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {host}:{port}")


class Syslog:
    """A private /dev/log: a datagram socket in a temporary directory, and
    the command prefix that runs a program with it as /dev/log."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="smtp521-syslog-")
        os.mkdir(os.path.join(self.dir, "dev"))
        self.path = os.path.join(self.dir, "log.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)  # inetd's child runs as nobody
        self.prefix = [os.path.join(ROOT, "test", "with-devlog"), os.path.join(self.dir, "dev"), self.path]

    def messages(self, want, timeout=5):
        """At least `want` messages from smtp521 (others, e.g. inetd's, are skipped)."""
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                msg = self.sock.recv(8192).decode("ascii", "replace")
            except socket.timeout:
                break
            if re.match(r"<\d+>\w{3} [ \d]\d \d\d:\d\d:\d\d smtp521\[\d+\]: ", msg):
                got.append(msg)
        return got

    def close(self):
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def parse_syslog(msg):
    """(priority, pid, text) of an RFC 3164 line as glibc's syslog(3) sends it."""
    m = re.match(r"<(\d+)>\w{3} [ \d]\d \d\d:\d\d:\d\d smtp521\[(\d+)\]: (.*)$", msg)
    assert m, msg
    return int(m.group(1)), int(m.group(2)), m.group(3)


LOG_MAIL_INFO = 2 * 8 + 6
LOG_MAIL_ERR = 2 * 8 + 3


class Server:
    def __init__(self, argv, port, family=socket.AF_INET, host="127.0.0.1"):
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        try:
            wait_listening(port, host, family)
        except AssertionError:
            self.stop()
            raise AssertionError(f"{argv[0]} did not start: {self.proc.stderr.read()[-2000:]!r}")

    def stop(self):
        """Stop the server once its sessions have ended and logged; return
        what it wrote on stderr."""
        children = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with open(children) as f:
                    if not f.read().strip():
                        break
            except OSError:
                break
            time.sleep(0.02)
        try:
            os.killpg(self.proc.pid, 15)
        except ProcessLookupError:
            pass
        _, err = self.proc.communicate(timeout=10)
        return err.decode("utf-8", "replace")


def binary_copy(binary):
    """A copy of the binary in a directory every user can reach (inetd runs
    it as nobody; the work tree may be private)."""
    d = tempfile.mkdtemp(prefix="smtp521-bin-")
    os.chmod(d, 0o755)
    path = os.path.join(d, "smtp521")
    shutil.copy(binary, path)
    os.chmod(path, 0o755)
    return path


def log_lines(text):
    return [fields(line) for line in text.splitlines() if line.startswith("peer=")]


# ------------------------------------------------------------ units

def unit_settings(path):
    settings = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", "[")) and "=" in line:
                key, value = line.split("=", 1)
                settings.setdefault(key, []).append(value)
    return settings


@test
def units_pass_systemd_analyze_verify(binary):
    prefix = tempfile.mkdtemp(prefix="smtp521-prefix-")
    try:
        subprocess.run(["make", "-s", "install", f"PREFIX={prefix}"], cwd=ROOT, check=True, capture_output=True)
        unitdir = os.path.join(prefix, "lib", "systemd", "system")
        p = subprocess.run(["systemd-analyze", "verify", "--man=no", os.path.join(unitdir, "smtp521.socket"),
                            os.path.join(unitdir, "smtp521@.service")], capture_output=True, text=True)
        # verify only warns on unknown keys: any output at all is a failure.
        assert p.returncode == 0 and p.stdout == "" and p.stderr == "", (p.returncode, p.stdout, p.stderr)
    finally:
        shutil.rmtree(prefix)


@test
def service_exposure_at_most_half(binary):
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                        os.path.join(ROOT, "smtp521@.service")], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for smtp521@\S*: (\d+\.\d+)", p.stdout)
    assert m, p.stdout[-2000:] + p.stderr
    print(f"     exposure {m.group(1)}")
    assert float(m.group(1)) <= 0.5, m.group(0)


@test
def units_say_what_they_must(binary):
    sock = unit_settings(os.path.join(ROOT, "smtp521.socket"))
    svc = unit_settings(os.path.join(ROOT, "smtp521@.service"))
    assert sock["ListenStream"] == ["25"] and sock["Accept"] == ["yes"]
    assert "MaxConnections" in sock and "MaxConnectionsPerSource" in sock
    # The trigger limit off: a burst must not put port 25 into failed state.
    assert sock["TriggerLimitIntervalSec"] == ["0"]
    assert "IPAddressDeny" not in sock  # it would filter the connections themselves
    assert svc["StandardInput"] == ["socket"] and svc["StandardOutput"] == ["socket"]
    assert svc["StandardError"] == ["journal"]
    assert svc["IPAddressDeny"] == ["any"] and svc["PrivateNetwork"] == ["yes"] and svc["DynamicUser"] == ["yes"]
    assert svc["ExecStart"][0].split()[0] == "/usr/local/sbin/smtp521"
    # The unit's backstop must not cut a session before smtp521's own deadline.
    argv = svc["ExecStart"][0].split()
    timeout = int(argv[argv.index("-t") + 1]) if "-t" in argv else 300
    assert int(svc["RuntimeMaxSec"][0]) >= timeout + 3


# ------------------------------------------------------------ man page

@test
def man_page_is_lint_clean(binary):
    p = subprocess.run(["mandoc", "-Tlint", "-Wwarning", os.path.join(ROOT, "man", "smtp521.8")],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p.stdout + p.stderr


@test
def man_page_and_help_list_the_same_options(binary):
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    help_opts = set(re.findall(r"^\s+(-\w), (--[\w-]+)", help_text, re.M))
    with open(os.path.join(ROOT, "man", "smtp521.8")) as f:
        man = f.read()
    man_opts = {(f"-{s}", f"--{l}") for s, l in re.findall(r"^\.It Fl (\w)\b.*?Fl \\-([\w-]+)", man, re.M)}
    assert help_opts and help_opts == man_opts, (help_opts ^ man_opts)
    # Every end reason and log field the program can print is documented.
    for word in ("quit", "eof", "timeout", "limit", "close", "http", "tls", "read-error", "write-error",
                 "peer", "commands", "duration", "helo", "mail", "rcpt", "rcpts"):
        assert re.search(rf"^\.It Cm {re.escape(word)}\b|^\.Cm {re.escape(word)}\b", man, re.M), word
    for status in ("0", "64"):
        assert re.search(rf"^\.It {status}$", man, re.M), status


@test
def install_and_uninstall_with_destdir(binary):
    dest = tempfile.mkdtemp(prefix="smtp521-dest-")
    try:
        subprocess.run(["make", "-s", "install", f"DESTDIR={dest}", "PREFIX=/opt/s5"], cwd=ROOT, check=True,
                       capture_output=True)
        want = {"opt/s5/sbin/smtp521": 0o755, "opt/s5/share/man/man8/smtp521.8": 0o644,
                "opt/s5/lib/systemd/system/smtp521.socket": 0o644,
                "opt/s5/lib/systemd/system/smtp521@.service": 0o644,
                "opt/s5/lib/systemd/system/smtp521.slice": 0o644,
                "opt/s5/share/doc/smtp521/inetd.conf.example": 0o644,
                "opt/s5/share/doc/smtp521/README.md": 0o644}
        found = {os.path.relpath(os.path.join(d, f), dest) for d, _, fs in os.walk(dest) for f in fs}
        assert found == set(want), found
        for path, mode in want.items():
            assert os.stat(os.path.join(dest, path)).st_mode & 0o777 == mode, path
        svc = unit_settings(os.path.join(dest, "opt/s5/lib/systemd/system/smtp521@.service"))
        assert svc["ExecStart"][0].startswith("/opt/s5/sbin/smtp521 "), svc["ExecStart"]
        with open(os.path.join(dest, "opt/s5/share/doc/smtp521/inetd.conf.example")) as f:
            assert "/opt/s5/sbin/smtp521" in f.read()
        subprocess.run(["make", "-s", "uninstall", f"DESTDIR={dest}", "PREFIX=/opt/s5"], cwd=ROOT, check=True,
                       capture_output=True)
        left = [os.path.join(d, f) for d, _, fs in os.walk(dest) for f in fs]
        assert left == [], left
    finally:
        shutil.rmtree(dest)


# ------------------------------------------------------------ super-servers

@test
def under_systemd_socket_activate(binary):
    # The stand-in for Accept=yes: one process per connection, on the socket.
    port = free_port()
    srv = Server(["systemd-socket-activate", "--inetd", "-a", "-l", f"127.0.0.1:{port}",
                  binary, "-H", "mx.test", "-l", "stderr"], port)
    try:
        clients = []
        for _ in range(3):
            out, local = talk(port, SESSION_IN)
            assert out == SESSION_OUT, out
            clients.append(local)
        out, _ = talk(port, crlf("GET / HTTP/1.1"))
        assert out == GREET, out
    finally:
        err = srv.stop()
    logs = log_lines(err)
    assert len(logs) == 4, err
    for log, local in zip(logs, clients):
        assert log["peer"] == f"127.0.0.1:{local}" and log["end"] == "quit" and log["rcpt"] == "<b@mx.test>", log
    assert logs[3]["end"] == "http"


def inetd_conf(path, port, binary, extra_args, suffix=None):
    """The lines of inetd.conf.example, with the port, the path and the
    arguments rewritten (and the rate suffix, if asked)."""
    lines = []
    with open(os.path.join(ROOT, "inetd.conf.example")) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            cols = line.split()
            assert cols[0] == "smtp" and cols[5] == "/usr/local/sbin/smtp521", cols
            cols[0] = str(port)
            if suffix is not None:
                cols[3] = suffix
            cols[5] = binary
            lines.append("\t".join(cols + extra_args))
    assert len(lines) == 2 and {line.split()[2] for line in lines} == {"tcp4", "tcp6"}, lines
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def inetd_sessions(binary, extra_args, clients):
    """Run openbsd-inetd with the lines of inetd.conf.example (port, path and
    arguments rewritten) and syslog on a private /dev/log; call clients(port)
    and return what it returned, and smtp521's syslog messages."""
    exe = binary_copy(binary)
    log = Syslog()
    port = free_port()
    conf = os.path.join(log.dir, "inetd.conf")
    inetd_conf(conf, port, exe, extra_args)
    srv = Server(log.prefix + ["inetd", "-d", conf], port)
    try:
        wait_listening(port, "::1", socket.AF_INET6)
        result = clients(port)
        msgs = log.messages(len(result))
    finally:
        srv.stop()
        log.close()
        shutil.rmtree(os.path.dirname(exe))
    return result, msgs


@test
def under_openbsd_inetd(binary):
    # The lines from inetd.conf.example under a real inetd, IPv4 and IPv6.
    # They ask for -l stderr: under inetd fd 2 is the connection, so the log
    # line must go to syslog, never to the client.
    def clients(port):
        return [talk(port, SESSION_IN), talk(port, SESSION_IN, "::1", socket.AF_INET6)]

    ((out4, local4), (out6, local6)), msgs = inetd_sessions(binary, ["-H", "mx.test", "-l", "stderr"], clients)
    assert out4 == SESSION_OUT, out4
    assert out6 == SESSION_OUT, out6
    assert len(msgs) == 2, msgs
    peers = set()
    for msg in msgs:
        prio, pid, text = parse_syslog(msg)
        assert prio == LOG_MAIL_INFO, msg
        f = fields(text)
        assert f["end"] == "quit" and f["helo"] == "client.example" and f["rcpts"] == "1", f
        assert f["sandbox"] == "on", f
        peers.add(f["peer"])
    assert peers == {f"127.0.0.1:{local4}", f"[::1]:{local6}"}, peers


@test
def inetd_bad_option_reaches_syslog_not_client(binary):
    def clients(port):
        try:
            return [talk(port, crlf("EHLO a", "QUIT"))[0]]
        except ConnectionResetError:  # it exits without reading what we sent
            return [b""]

    (out,), msgs = inetd_sessions(binary, ["-t", "soon"], clients)
    assert out == b"", out
    assert len(msgs) == 1, msgs
    prio, _, text = parse_syslog(msgs[0])
    assert prio == LOG_MAIL_ERR and "--timeout 'soon'" in text, msgs[0]


def burst(port, count):
    """`count` sessions, one after another, as fast as they go; how many were greeted."""
    greeted = 0
    for _ in range(count):
        try:
            out, _ = talk(port, crlf("QUIT"), timeout=3)
        except OSError:
            continue
        greeted += out == GREET.replace(b"mx.test", socket.gethostname().encode()) + \
            BYE.replace(b"mx.test", socket.gethostname().encode())
    return greeted


@test
def inetd_rate_suffix_survives_a_burst(binary):
    # 300 connections in a few seconds.  openbsd-inetd's default (256 a
    # minute) switches the service off for ten minutes part-way; the
    # example's suffix does not.  The default is run too, to show the test
    # can see the difference.
    exe = binary_copy(binary)
    results = {}
    try:
        for suffix in ("nowait", None):
            port = free_port()
            d = tempfile.mkdtemp(prefix="smtp521-inetd-")
            conf = os.path.join(d, "inetd.conf")
            inetd_conf(conf, port, exe, ["-l", "none"], suffix)
            srv = Server(["inetd", "-d", conf], port)
            try:
                results[suffix or "example"] = burst(port, 300)
            finally:
                srv.stop()
                shutil.rmtree(d)
    finally:
        shutil.rmtree(os.path.dirname(exe))
    print(f"     300 connections greeted: inetd default {results['nowait']}, example {results['example']}")
    assert results["example"] == 300, results
    assert results["nowait"] < 300, results


@test
def under_tcpserver(binary):
    port = free_port()
    srv = Server(["tcpserver", "-H", "-R", "127.0.0.1", str(port), binary, "-H", "mx.test", "-l", "stderr"], port)
    try:
        out, local = talk(port, SESSION_IN)
    finally:
        err = srv.stop()
    assert out == SESSION_OUT, out
    logs = log_lines(err)
    assert len(logs) == 1 and logs[0]["peer"] == f"127.0.0.1:{local}" and logs[0]["end"] == "quit", err
    assert logs[0]["sandbox"] == "on", err


@test
def syslog_line_field_by_field(binary):
    log = Syslog()
    try:
        p = subprocess.run(log.prefix + [binary, "-H", "mx.test"],
                           input=crlf("EHLO c.example", "MAIL FROM:<a@c.example>", "RCPT TO:<x@mx.test>",
                                      "RCPT TO:<y@mx.test>", "QUIT"),
                           capture_output=True, timeout=10, env={"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "192.0.2.4",
                                                                 "TCPREMOTEPORT": "2525"})
        msgs = log.messages(1)
        bad = subprocess.run(log.prefix + [binary, "--log", "file"], capture_output=True, timeout=10)
        errs = log.messages(1)
    finally:
        log.close()
    assert p.returncode == 0 and p.stderr == b"", p
    assert len(msgs) == 1, msgs
    prio, pid, text = parse_syslog(msgs[0])
    assert prio == LOG_MAIL_INFO
    f = fields(text)
    assert list(f) == ["peer", "end", "commands", "duration", "helo", "mail", "rcpt", "rcpts", "sandbox"], f
    assert f["peer"] == "192.0.2.4:2525" and f["end"] == "quit" and f["commands"] == "5"
    assert re.fullmatch(r"\d+\.\d{3}", f["duration"]) and float(f["duration"]) < 5
    assert f["helo"] == "c.example" and f["mail"] == "<a@c.example>"
    assert f["rcpt"] == "<x@mx.test>,<y@mx.test>" and f["rcpts"] == "2"
    assert f["sandbox"] == "on"  # confined, and syslog(3) still works
    assert bad.returncode == 64 and bad.stdout == b""
    assert len(errs) == 1 and parse_syslog(errs[0])[0] == LOG_MAIL_ERR and "--log 'file'" in errs[0], errs


# ------------------------------------------------------------ real systemd

class Systemd:
    """A private systemd (test/with-systemd) that knows only the given units."""

    def __init__(self, unitdir, binary):
        self.proc = subprocess.Popen([os.path.join(ROOT, "test", "with-systemd"), unitdir, binary],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.pid = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.pid is None:
            # PID 1 of the namespace: the child of unshare's fork.
            try:
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                    kids = f.read().split()
                if kids:
                    with open(f"/proc/{kids[0]}/cmdline", "rb") as f:
                        if f.read().startswith(b"/lib/systemd/systemd\0"):
                            self.pid = int(kids[0])
            except OSError:
                pass
            time.sleep(0.05)
        assert self.pid, "systemd did not start"
        while time.monotonic() < deadline:
            state = self.ctl("is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.1)
        raise AssertionError(f"systemd not running: {state}")

    def ctl(self, *args, check=True, tool="systemctl"):
        # -r -w: the target's root and working directory, not the mount
        # namespace's (they differ when the tests run in a chroot).
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "-r", "-w", tool, "--no-pager"]
                              + list(args),
                              capture_output=True, text=True, check=check, timeout=30)

    def stop(self):
        try:
            os.kill(self.pid, 9)  # SIGTERM would make PID 1 re-execute
        except (ProcessLookupError, TypeError):
            pass
        self.proc.wait(timeout=10)


def systemd_units(port_ours, port_default):
    """The shipped units with only the port changed, and a copy of the
    socket with systemd's default trigger limit, for comparison."""
    d = tempfile.mkdtemp(prefix="smtp521-units-")
    os.chmod(d, 0o755)
    with open(os.path.join(ROOT, "smtp521.socket")) as f:
        sock = f.read()
    with open(os.path.join(ROOT, "smtp521@.service")) as f:
        svc = f.read()
    assert "\nListenStream=25\n" in sock and "\nTriggerLimitIntervalSec=0\n" in sock
    files = {
        "smtp521.socket": sock.replace("\nListenStream=25\n", f"\nListenStream=127.0.0.1:{port_ours}\n"),
        "smtp521@.service": svc,
        "smtp521-default.socket": sock.replace("\nListenStream=25\n", f"\nListenStream=127.0.0.1:{port_default}\n")
                                      .replace("\nTriggerLimitIntervalSec=0\n", "\n"),
        "smtp521-default@.service": svc,
    }
    for name, text in files.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return d


def burst_concurrent(port, count):
    """Open `count` connections as fast as possible, then close them all."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            continue
        socks.append(s)
    time.sleep(1)
    for s in socks:
        s.close()


def session_works(port, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            out, _ = talk(port, SESSION_IN, timeout=5)
            name = socket.gethostname().encode()
            if out == SESSION_OUT.replace(b"mx.test", name):
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


@test
def under_real_systemd_accept_yes(binary):
    # The shipped units, sandbox and all, under a real systemd: a session,
    # its journal entry (facility mail, ident smtp521, a dynamic user), and a
    # burst of 1000 connections in about a second.  systemd's default trigger
    # limit (200 in 2 s) fails the comparison socket and closes its port;
    # ours stays up.
    port_ours, port_default = free_port(), free_port()
    unitdir = systemd_units(port_ours, port_default)
    sd = Systemd(unitdir, binary)
    try:
        sd.ctl("start", "systemd-journald.socket", "systemd-journald.service", "smtp521.socket",
               "smtp521-default.socket")
        out, local = talk(port_ours, SESSION_IN)
        name = socket.gethostname().encode()
        assert out == SESSION_OUT.replace(b"mx.test", name), out
        time.sleep(0.5)
        entries = sd.ctl("-t", "smtp521", "-o", "json", tool="journalctl").stdout.splitlines()
        entries = [json.loads(e) for e in entries]
        assert len(entries) == 1, entries
        e = entries[0]
        assert e["SYSLOG_FACILITY"] == "2" and e["PRIORITY"] == "6", e
        assert int(e["_UID"]) >= 61184, e  # DynamicUser's range
        f = fields(e["MESSAGE"])
        assert f["peer"] == f"127.0.0.1:{local}" and f["end"] == "quit" and f["rcpt"] == "<b@mx.test>", f
        assert f["sandbox"] == "on", f  # inside the unit's own sandbox too

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
        def state(unit):
            return sd.ctl("is-active", unit, check=False).stdout.strip()

        burst_concurrent(port_default, 1000)
        deadline = time.monotonic() + 10
        while state("smtp521-default.socket") != "failed" and time.monotonic() < deadline:
            time.sleep(0.2)
        default = state("smtp521-default.socket")
        burst_concurrent(port_ours, 1000)
        time.sleep(3)
        ours = state("smtp521.socket")
        print(f"     after 1000 connections: smtp521.socket {ours}, with the default trigger limit {default}")
        assert ours == "active", ours
        assert default == "failed", default
        assert session_works(port_ours)
        assert not session_works(port_default, timeout=1)
        failed = sd.ctl("list-units", "--state=failed", "--plain", "--no-legend", "smtp521@*").stdout.strip()
        assert failed == "", failed  # no session instance ended in failure
    finally:
        sd.stop()
        shutil.rmtree(unitdir)
