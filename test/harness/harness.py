"""Shared helpers of the pytest suites (test/KIND/test_*.py; fixtures in
test/conftest.py): the binary started as a super-server starts it, the
loopback client, the super-servers, a private /dev/log, a private systemd,
and the checks for what a test needs (root, namespaces, tools), each done
once and each naming what is missing."""
import contextlib
import errno
import fcntl
import functools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time

# The tree: test/harness (HERE, its scripts), test/ (TEST) and the top (ROOT).
HERE = os.path.dirname(os.path.abspath(__file__))
TEST = os.path.dirname(HERE)
ROOT = os.path.dirname(TEST)
# inetd and friends live in /usr/sbin, which is not on a user's PATH.
TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])


def crlf(*lines):
    return b"".join(line.encode() + b"\r\n" for line in lines)


# The log line's fields, in the order smtp521 writes them and smtp521(8),
# LOGGING, documents them; those who parse the log rely on it.
LOG_FIELDS = ["peer", "end", "commands", "duration", "helo", "mail", "rcpt", "rcpts", "sandbox", "mode"]


def fields(log_line):
    """key=value fields of a log line."""
    return dict(f.split("=", 1) for f in log_line.split(" ") if "=" in f)


def wait_for(probe, timeout=20, interval=0.1):
    """Call probe() until it returns something true, or `timeout` seconds
    have passed; return its last value.  For what happens soon after an
    event (a log line reaching the journal, systemd recording a failure):
    wait for it, never sleep and then expect."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def cut_by(timeout):
    """The latest a session run with -t TIMEOUT may end, in seconds after
    its start: the deadline, plus as much again and a second and a half
    for a busy machine (2 cores, ASan, the rest of the suite) to wake the
    process and let it write and close.  A deadline that input pushed
    back, or none at all, still fails it."""
    return 2 * timeout + 1.5


# The replies of `-H mx.test`, the one home of their text outside the
# scripted sessions (test/sessions) and unit.cpp: the rcpt mode's, then the
# 521 modes' (no enhanced codes: RFC 2034 3 (4), no extension offered), and
# -r helo's greeting (its replies are the 521 modes').
GREET = b"220 mx.test ESMTP does not accept mail\r\n"
EHLO = b"250-mx.test\r\n250 ENHANCEDSTATUSCODES\r\n"
OK_MAIL = b"250 2.1.0 Ok\r\n"
REFUSAL = b"521 5.3.2 mx.test does not accept mail\r\n"
BYE = b"221 2.0.0 mx.test closing connection\r\n"
GREET_521 = b"521 mx.test does not accept mail\r\n"
BYE_521 = b"221 mx.test closing connection\r\n"
GREET_HELO = b"220 mx.test does not accept mail\r\n"
# What each mode (-r WHEN, or -c) sends first, and then to any command
# but QUIT (and to a session it cuts under stress).
MODES = {"rcpt": (["-r", "rcpt"], GREET, REFUSAL), "helo": (["-r", "helo"], GREET_HELO, GREET_521),
         "greeting": (["-r", "greeting"], GREET_521, GREET_521), "close": (["-c"], GREET_521, None)}
TEXT = b"does not accept mail"  # the default --message, as in every reply above
SESSION_IN = crlf("EHLO client.example", "MAIL FROM:<a@client.example>", "RCPT TO:<b@mx.test>", "QUIT")
SESSION_OUT = GREET + EHLO + OK_MAIL + REFUSAL + BYE


@functools.lru_cache(maxsize=None)
def help_text():
    """smtp521 --help, read from its one home, the string in smtp521.cpp
    (so that collection, before any build, can use it)."""
    with open(os.path.join(ROOT, "smtp521.cpp")) as f:
        source = f.read()
    start = source.index('"usage: smtp521')
    end = source.index(";", source.index("the last of them wins", start))
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', source[start:end])).replace("\\n", "\n").replace('\\"', '"')


def option_range(long_name):
    """(least, most, default) of a numeric option, as --help gives them:
    option_range("timeout") == (1, 86400, 300)."""
    block = re.search(rf"--{long_name} .*?(?=\n  -|\n\S)", help_text(), re.S)
    text = " ".join(block.group(0).split()) if block else ""
    bounds = re.search(r"(\d+)-(\d+)|(\d+) never, at most (\d+)", text)
    default = re.search(r"\(default (\d+)\)", text)
    assert bounds and default, f"--{long_name}: no range and default in --help: {text!r}"
    return tuple(int(g) for g in bounds.groups() if g is not None) + (int(default.group(1)),)


def check_default_file(text):
    """debian/smtp521.default, the package's /etc/default/smtp521: one
    SMTP521_OPTS line, empty, the only line that is not a comment (a second
    would replace the first: when each option had a commented line of its
    own, uncommenting two kept only the last); every option of --help that
    a service takes in a comment of its own, "# --option DEFAULT"."""
    assert re.findall(r"^[^#\s].*$", text, re.M) == ['SMTP521_OPTS=""'], text
    assert not re.search(r"^#\s*SMTP521_OPTS=", text, re.M), text
    commented = re.findall(r"^# (--.*)$", text, re.M)
    opts = [o for o in re.findall(r"^\s+-\w, (--[\w-]+)", help_text(), re.M)
            if o not in ("--version", "--help", "--check")]
    assert len(opts) >= 8, help_text()
    for opt in opts:
        assert any(c.split()[0] == opt for c in commented), f"{opt} not in /etc/default/smtp521"
    # Every number --help gives as a default, the file shows with its option.
    defaults = re.findall(r"^\s+-\w, (--[\w-]+)[^\n]*(?:\n\s{8,}[^\n]*)*?\(default (\d+)\)", help_text(), re.M)
    assert {o for o, _ in defaults} >= {"--timeout", "--max-commands", "--stress-at", "--stress-timeout"}, defaults
    for opt, default in defaults + [("--refuse-at", "rcpt")]:
        assert f"{opt} {default}" in commented, (opt, default)
    assert re.search(r"rcpt \(default\)", help_text())
    assert ("--max-commands", str(option_range("max-commands")[2])) in defaults, defaults
    assert f"--message '{TEXT.decode()}'" in commented and f'"{TEXT.decode()}"' in help_text()


def fill(fd):
    """Write to the pipe `fd` until its buffer is full; the octets written."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    n = 0
    try:
        while True:
            n += os.write(fd, b"x" * 4096)
    except BlockingIOError:
        pass
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return n


def current_syscall(pid):
    """The system call a process waits in, and its first argument, as
    /proc/PID/syscall gives them ("1", "0x2": write to fd 2 on x86-64);
    None once it is gone or running."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            nr, arg = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    return nr, arg


# ------------------------------------------------------------ what a test needs

def tool(name):
    """Absolute path of a program, looked up in PATH and the sbin directories."""
    return shutil.which(name, path=TOOL_PATH)


def _fails(argv):
    """None if the command succeeds, else the last line it printed."""
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if p.returncode == 0:
        return None
    out = (p.stderr + p.stdout).strip().splitlines()
    return out[-1] if out else f"exit status {p.returncode}"


PRIVATE = os.path.join(HERE, "private-mounts")


def _tool_reason(name, package):
    return None if tool(name) else f"needs {name} (apt-get install {package})"


def _root():
    return None if os.geteuid() == 0 else "needs root"


def _mountns():
    if _root():
        return "needs root for a mount namespace"
    err = _fails(["unshare", "--mount", "--propagation", "unchanged", PRIVATE, "true"])
    return f"needs mount namespaces: {err}" if err else None


def _userns():
    err = _fails(["unshare", "--user", "--map-root-user", "--mount", "--propagation", "unchanged",
                  PRIVATE, "true"])
    return f"needs user namespaces: {err}" if err else None


def _devlog():
    """A private /dev/log: a mount namespace as root, or a user namespace."""
    if os.geteuid() == 0:
        return _mountns()
    err = _userns()
    return f"needs root or user namespaces for a private /dev/log ({err})" if err else None


def _systemd():
    for reason in (_root(), _mountns()):
        if reason:
            return f"{reason} (a private systemd)"
    if not os.path.exists("/lib/systemd/systemd"):
        return "needs systemd (/lib/systemd/systemd)"
    err = _fails(["unshare", "--pid", "--fork", "--mount", "--propagation", "unchanged", PRIVATE, "true"])
    return f"needs PID namespaces: {err}" if err else None


# A skip whose reason starts so names a limit of the host itself, which no
# package can lift: the only kind of skip that CI=true accepts (conftest).
HOST_LIMIT = "host limit: "


def _i386():
    """The kernel executes i386 binaries (IA-32 emulation): smtp521-i386,
    exec'ed for its version, which runs no session and cannot hang."""
    path = os.path.join(ROOT, "smtp521-i386")
    if not os.access(path, os.X_OK):
        return "needs smtp521-i386 (make i386)"
    try:
        subprocess.run([path, "-V"], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except OSError as e:
        if e.errno == errno.ENOEXEC:
            return HOST_LIMIT + "this kernel cannot execute i386 binaries (no IA-32 emulation)"
        return f"cannot run smtp521-i386: {e}"
    return None


def systemd_version():
    """The major version of /lib/systemd/systemd (0 if it cannot say)."""
    try:
        out = subprocess.run(["/lib/systemd/systemd", "--version"], capture_output=True, text=True,
                             timeout=30).stdout.split()
        return int(out[1])
    except (OSError, subprocess.TimeoutExpired, IndexError, ValueError):
        return 0


def _controller(name, what):
    """systemd can use cgroup controller `name` here: it is on the cgroup v2
    hierarchy, or on cgroup v1 beside it (a hybrid layout) with a systemd
    that still manages v1 (before 256)."""
    v2, _ = cgroup_mounts()
    controllers = ""
    if v2:
        try:
            with open(os.path.join(v2, "cgroup.controllers")) as f:
                controllers = f.read()
        except OSError:
            pass
    if name in controllers.split():
        return None
    on_v1 = any(fstype == "cgroup" and name in opts for _, fstype, opts in cgroup_hierarchies())
    version = systemd_version()
    if on_v1 and version >= 256:
        return HOST_LIMIT + (f"the {name} controller is bound to cgroup v1 here, and systemd {version} "
                             f"manages cgroup v2 only: {what}")
    return None if on_v1 else f"no {name} controller in any cgroup hierarchy"


def _fuzz():
    if not os.access(os.path.join(TEST, "unit", "fuzz"), os.X_OK):
        return "needs test/unit/fuzz, built with clang (apt-get install clang libclang-rt-dev; make test/unit/fuzz)"
    return None


def _interop():
    if os.environ.get("CI") != "true" and os.environ.get("SMTP521_INTEROP") != "1":
        return "installs and replaces MTAs; set SMTP521_INTEROP=1 or run make interop"
    if _root():
        return "needs root (it installs MTAs)"
    return _tool_reason("apt-get", "apt")


def _ipv6():
    """An IPv6 loopback address to listen on (a kernel or container may
    have none)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        return HOST_LIMIT + f"no IPv6 loopback: {e.strerror}"
    return None


CAPABILITIES = {
    "root": _root,
    "mountns": _mountns,
    "devlog": _devlog,
    "systemd": _systemd,
    "fuzz": _fuzz,
    "interop": _interop,
    "inetd": lambda: None if os.access("/usr/sbin/inetd", os.X_OK) else
    "needs openbsd-inetd (/usr/sbin/inetd)",
    "tcpserver": lambda: _tool_reason("tcpserver", "ucspi-tcp"),
    "i386": _i386,
    "ipv6": _ipv6,
    "cpu-quota": lambda: _controller("cpu", "CPUQuota= cannot be enforced"),
    "pids": lambda: _controller("pids", "a slice counts no sessions, and smtp521 sees no stress"),
    "strace": lambda: _tool_reason("strace", "strace"),
    "man": lambda: _tool_reason("man", "man-db"),
    "systemd-socket-activate": lambda: _tool_reason("systemd-socket-activate", "systemd"),
    "systemd-analyze": lambda: _tool_reason("systemd-analyze", "systemd"),
    "mandoc": lambda: _tool_reason("mandoc", "mandoc"),
    # Debian's packaging, which the release tarball (make dist) leaves out.
    "debian": lambda: None if os.path.isdir(os.path.join(ROOT, "debian")) else
    "no debian/: the release tarball is upstream's alone (Debian's packaging is its debian.tar)",
}


@functools.lru_cache(maxsize=None)
def missing(capability):
    """Why `capability` is not available here, or None if it is.
    "built:PATH" asks for a file of the tree that make builds, "tool:NAME"
    for a program (test/packages has them all)."""
    if capability.startswith("tool:"):
        name = capability[len("tool:"):]
        return None if tool(name) else f"needs {name} (test/packages)"
    if capability.startswith("built:"):
        path = capability[len("built:"):]
        return None if os.access(os.path.join(ROOT, path), os.X_OK) else f"{path} is not built (make {path})"
    return CAPABILITIES[capability]()


def build(path, *capabilities):
    """A build (smtp521, smtp521-asan ...) as a test parameter, skipped at
    collection with the reason unless it is built and the host has what
    it needs to run it."""
    import pytest
    return pytest.param(path, id=path, marks=pytest.mark.needs(f"built:{path}", *capabilities))


def need(*capabilities):
    """Skip the calling test, with the reason, unless all are available.
    (Also as a marker: @pytest.mark.needs("root", "inetd").)"""
    import pytest  # here: interop.py uses this module outside pytest
    for cap in capabilities:
        reason = missing(cap)
        if reason:
            pytest.skip(reason)


# ------------------------------------------------------------ the binary on a socket

@contextlib.contextmanager
def started(argv, **popen):
    """A process of the test's own (subprocess.Popen(argv, **popen)) for the
    block: killed and reaped at its end if it still runs, so that a failed
    assertion leaves nothing behind."""
    p = subprocess.Popen(argv, **popen)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@contextlib.contextmanager
def serving(argv, server, **popen):
    """argv served as a super-server starts it, on `server`, an accepted
    connection (or one end of a socketpair) on stdin and stdout; this
    process's copy of it is closed at once, so the client sees EOF when
    the server ends.  Killed at the end of the block if it still runs."""
    with started(argv, stdin=server.fileno(), stdout=server.fileno(), **popen) as p:
        server.close()
        yield p


class Child:
    """smtp521 started the way a super-server starts it, on one end of a
    socketpair (or of an accepted TCP connection); the test holds the other.
    Whatever a test leaves running, close_all() kills (conftest does, after
    every test)."""

    live = []

    def __init__(self, binary, args, sock_kind="pair", stderr_is_socket=False, env=None):
        if sock_kind == "pair":
            self.client, server = socket.socketpair()
        elif sock_kind == "seqpacket":
            # Each write(2) is one record, and one recv() returns one
            # record: what the client reads shows how the server wrote.
            self.client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        else:
            # "tcp", "tcp6", or "tcp4-mapped": an IPv4 client of a dual-stack
            # listener, which the server sees as ::ffff:127.0.0.1.
            family, listen, connect = {"tcp": (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
                                       "tcp6": (socket.AF_INET6, "::1", "::1"),
                                       "tcp4-mapped": (socket.AF_INET6, "::", "127.0.0.1")}[sock_kind]
            listener = socket.socket(family, socket.SOCK_STREAM)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind((listen, 0))
            listener.listen(1)
            self.client = socket.create_connection((connect, listener.getsockname()[1]))
            server, _ = listener.accept()
            listener.close()
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            [binary] + list(args),
            stdin=server.fileno(),
            stdout=server.fileno(),
            stderr=server.fileno() if stderr_is_socket else subprocess.PIPE,
            env=env if env is not None else {"PATH": "/usr/bin:/bin"},
            close_fds=True,
        )
        server.close()
        Child.live.append(self)
        self.rusage = None
        self.returncode = None
        self.stderr = b""

    def send(self, data):
        self.client.sendall(data)

    def read_until_eof(self, timeout=10):
        """Everything the server sends until it closes."""
        return read_to_eof(self.client, timeout)

    def read_lines(self, count, timeout=10):
        self.client.settimeout(timeout)
        data = b""
        while data.count(b"\r\n") < count:
            chunk = self.client.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    def alive(self):
        """True while the process runs (it is not reaped: wait() does that)."""
        info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return info is None

    def wait(self, timeout=10):
        """Reap the process with its rusage; return its exit status."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.rusage = rusage
                self.proc.returncode = self.returncode
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"process still running after {timeout}s")
            time.sleep(0.01)
        self.elapsed = time.monotonic() - self.start
        if self.proc.stderr is not None:
            self.stderr = self.proc.stderr.read()
            self.proc.stderr.close()
        self.client.close()
        return self.returncode

    def close(self):
        """Kill and reap whatever is left (fixture teardown, failed tests)."""
        if self.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.returncode = self.proc.returncode
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self.stderr = self.proc.stderr.read()
            self.proc.stderr.close()
        self.client.close()

    @classmethod
    def close_all(cls):
        while cls.live:
            cls.live.pop().close()


# ------------------------------------------------------------ loopback clients

def free_port():
    """A port nothing listens on, below the kernel's ephemeral range: a
    port the kernel hands out (bind to 0) may be taken a moment later as the
    local port of some client's connection, and a super-server started on
    it then fails to listen (EADDRINUSE)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            if not listening(port) and not listening(port, socket.AF_INET6):
                return port
    raise AssertionError("no free port below the ephemeral range")


def read_to_eof(sock, timeout=30, got=b""):
    """`got` and everything the peer sends until it closes; fails if the
    peer has not closed within `timeout` seconds of the last byte."""
    sock.settimeout(timeout)
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise AssertionError(f"no EOF within {timeout}s; got {got[:300]!r}")
        if not chunk:
            return got
        got += chunk


def talk(port, data, host="127.0.0.1", family=socket.AF_INET, timeout=30):
    """Connect, send, read to EOF; return (reply bytes, our local port)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        local_port = s.getsockname()[1]
        s.sendall(data)
        return read_to_eof(s, timeout), local_port


def listening(port, family=socket.AF_INET):
    """Whether something listens on the port: asks the kernel's table, since
    a probe that connects would start a session."""
    table = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
    with open(table) as f:
        return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A" for line in f)


def accept_queue(port):
    """Connections waiting in the accept queue of the listening TCP socket
    on `port` (its rx_queue in /proc/net/tcp); 0 when none listens."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].split(":")[1], 16) == port:
                return int(cols[4].split(":")[1], 16)
    return 0


def system_user():
    """The system user of smtp521.sysusers, which inetd.conf.example's lines
    run sessions as: made on this host as `make install` makes it
    (systemd-sysusers; a test machine keeps it, as after make install)."""
    path = os.path.join(ROOT, "smtp521.sysusers")
    with open(path) as f:
        name = re.search(r"^u (\S+) ", f.read(), re.M).group(1)
    if subprocess.run(["getent", "passwd", name], capture_output=True).returncode:
        subprocess.run(["systemd-sysusers", path], check=True, capture_output=True)
    return name


def inetd_conf(path, port, binary, extra_args, suffix=None):
    """The lines of inetd.conf.example, with the port, the path and the
    arguments rewritten (and the rate suffix, if asked); their user, the
    package's, is made here if missing."""
    system_user()
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


def tcpserver_command():
    """smtp521(8)'s tcpserver line, as the shell command a user types."""
    with open(os.path.join(ROOT, "man", "smtp521.8")) as f:
        man = f.read()
    block = man.split("\n.Ss tcpserver\n", 1)[1].split(".Bd -literal -offset indent\n", 1)[1].split("\n.Ed\n")[0]
    return " ".join(block.replace("\\e\n", " ").split())


def tcpserver_line(port, binary, drop=()):
    """smtp521(8)'s tcpserver line, as argv: on 127.0.0.1:PORT, running
    BINARY, without its log redirection; without -u and -g when not root
    (only root can change user); without the smtp521 options in `drop`
    (each with its value)."""
    words = tcpserver_command().split()
    at = words.index("/usr/local/sbin/smtp521")
    assert words[0] == "tcpserver" and words[at - 2:at] == ["0", "25"] and words[-1].startswith("2>>"), words
    server, program = words[:at - 2], words[at + 1:-1]
    if os.geteuid() != 0:
        for flag in ("-u", "-g"):
            i = server.index(flag)
            del server[i:i + 2]
    for flag in drop:
        i = program.index(flag)
        del program[i:i + 2]
    return server + ["127.0.0.1", str(port), binary] + program


def wait_listening(port, host="127.0.0.1", family=socket.AF_INET, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(port, family):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {host}:{port}")


def cgroup_hierarchies():
    """(mount point, fstype, options) of each mounted cgroup hierarchy, once:
    where it is mounted first, whole (a chroot of CI's other releases binds
    the same hierarchies again, and a container mounts parts of them)."""
    found, seen = [], set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [TAGS] - FSTYPE SOURCE SUPEROPTIONS
            left, right = line.split(" - ", 1)
            _, _, device, root, mnt = left.split()[:5]
            fstype, _, superopts = right.split()[:3]
            if fstype in ("cgroup", "cgroup2") and root == "/" and device not in seen:
                seen.add(device)
                found.append((mnt.replace("\\040", " "), fstype, superopts.split(",")))
    return found


def cgroup_mounts():
    """(cgroup2 mount point, name=systemd v1 mount point or None)."""
    hierarchies = cgroup_hierarchies()
    v2 = next((mnt for mnt, fstype, _ in hierarchies if fstype == "cgroup2"), None)
    named = next((mnt for mnt, fstype, opts in hierarchies if fstype == "cgroup" and "name=systemd" in opts), None)
    return v2, named


class Cgroup:
    """A cgroup of the tests' own, `name` at the top of every mounted
    hierarchy: a private systemd started in it (join_argv()) builds its
    whole tree inside, and remove() takes that tree away and nothing else.
    Other cgroups made meanwhile (podman's testbeds, another test run, the
    host's own systemd) are not the tests' to remove."""

    def __init__(self, name):
        v2, _ = cgroup_mounts()
        self.name = name
        # In every hierarchy, as a container manager does: systemd takes
        # its root from name=systemd (or cgroup2) and uses a v1 controller
        # (memory, pids, cpu) only where that same path exists.  A new v1
        # cpuset takes no process until it has CPUs and memory nodes: its
        # parent's.
        self.dirs = []
        try:
            for mnt, _, opts in cgroup_hierarchies():
                d = os.path.join(mnt, name)
                os.mkdir(d)
                self.dirs.append(d)
                if "cpuset" in opts:
                    for knob in ("cpuset.cpus", "cpuset.mems"):
                        with open(os.path.join(mnt, knob)) as f, open(os.path.join(d, knob), "w") as g:
                            g.write(f.read())
        except BaseException:
            self.remove(timeout=0)
            raise
        self.v2 = os.path.join(v2, name) if v2 else None

    def join_argv(self):
        """A shell prefix that moves itself into the cgroup, then execs "$@"."""
        moves = "".join(f'echo $$ > "{d}/cgroup.procs"; ' for d in self.dirs)
        return ["sh", "-c", moves + 'exec "$@"', "sh"]

    def usage_usec(self):
        with open(os.path.join(self.v2, "cpu.stat")) as f:
            for line in f:
                k, v = line.split()
                if k == "usage_usec":
                    return int(v)
        raise RuntimeError("no usage_usec")

    def instances(self, prefix):
        """Service instance cgroups (at any depth) whose name starts with prefix."""
        return [d for _, ds, _ in os.walk(self.v2) for d in ds if d.startswith(prefix) and "@" in d]

    def procs(self):
        with open(os.path.join(self.v2, "cgroup.procs")) as f:
            return f.read().split()

    def remove(self, timeout=10):
        """Its tree in every hierarchy, deepest first, once the processes in
        it are gone; returns what is still there after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for top in self.dirs:
                for d, _, _ in os.walk(top, topdown=False):
                    try:
                        os.rmdir(d)
                    except OSError:
                        pass
            left = [top for top in self.dirs if os.path.isdir(top)]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Output:
    """A pipe drained by a thread, so that a chatty process never blocks on
    it; text() is what it wrote so far."""

    def __init__(self, pipe):
        self.chunks = []
        self.thread = threading.Thread(target=self._drain, args=(pipe,), daemon=True)
        self.thread.start()

    def _drain(self, pipe):
        try:
            for chunk in iter(lambda: pipe.read1(65536), b""):
                self.chunks.append(chunk)
        except OSError:  # EIO: the last process on a pseudo-terminal is gone
            pass
        pipe.close()

    def text(self, join=False):
        if join:
            self.thread.join(timeout=10)
        return b"".join(self.chunks).decode("utf-8", "replace")


# ------------------------------------------------------------ super-servers

class Server:
    """A super-server on a loopback port; stderr (and stdout) collected."""

    def __init__(self, argv, port, family=socket.AF_INET, host="127.0.0.1"):
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.output = Output(self.proc.stdout)
        self.err = None
        try:
            wait_listening(port, host, family)
        except AssertionError:
            err = self.stop()
            raise AssertionError(f"{os.path.basename(argv[0])} did not listen on {host}:{port} "
                                 f"(exit {self.proc.returncode}); it wrote:\n{err[-3000:]}")

    def stop(self):
        """Stop the server once its sessions have ended and logged; return
        what it wrote (also printed, so that a failure shows it)."""
        if self.err is not None:
            return self.err
        deadline = time.monotonic() + 5
        while children(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            os.killpg(self.proc.pid, 15)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.err = self.output.text(join=True)
        print(f"---- {' '.join(self.argv[:3])} ... wrote:\n{self.err[-3000:]}")
        return self.err


# ------------------------------------------------------------ a private /dev/log

class Syslog:
    """A private /dev/log: a datagram socket in a temporary directory, and
    the command prefix that runs a program with it as /dev/log
    (test/harness/with-devlog).  Close it (the `syslog` fixture does)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="smtp521-syslog-")
        try:
            os.mkdir(os.path.join(self.dir, "dev"))
            self.path = os.path.join(self.dir, "log.sock")
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.bind(self.path)
            os.chmod(self.path, 0o666)  # inetd's child runs as nobody
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.prefix = [os.path.join(HERE, "with-devlog"), os.path.join(self.dir, "dev"), self.path]

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


# ------------------------------------------------------------ a private systemd

# The private systemd shares the host's cgroup hierarchies, and so does
# any other private systemd running at the same time (another test run):
# a test's slice gets a name of this process's own, or two runs would share
# one cgroup and its limits.  It is a slice below smtp521.slice, the only
# ones whose sessions smtp521 counts for its stress signal.
TEST_SLICE = f"smtp521-t{os.getpid()}.slice"

class Systemd:
    """The one private systemd of the tests and benchmarks (test/harness/with-systemd;
    tests get it from conftest's `systemd` fixture) that knows only the
    units in unitdir; its console is collected and printed on stop().
    `wrapper`: a command systemd runs under (it must exec its arguments,
    as test/harness/no-userns does); `prefix`: an argv that runs with-systemd
    (and must exec it: bench/units.py joins a cgroup and binds an /etc)."""

    booted = 0

    def __init__(self, unitdir, binary, timeout=20, wrapper=None, prefix=(), cgroup=None):
        # Its console is a pseudo-terminal (test/harness/with-systemd puts it on
        # /dev/console, where PID 1 writes), read here.
        # It shares the host's cgroup hierarchies, in a cgroup of its own
        # (`cgroup`, or one made here and removed by stop()), and is killed
        # rather than shut down.
        Systemd.booted += 1
        self.own_cgroup = cgroup is None
        self.cgroup = cgroup or Cgroup(f"smtp521-test-{os.getpid()}-{Systemd.booted}")
        master, slave = os.openpty()
        env = dict(os.environ, WITH_SYSTEMD_WRAPPER=wrapper) if wrapper else None
        self.proc = subprocess.Popen(self.cgroup.join_argv() + list(prefix)
                                     + [os.path.join(HERE, "with-systemd"), unitdir, binary],
                                     stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        self.output = Output(os.fdopen(master, "rb"))
        self.pid = None
        self.stopped = False
        try:
            self._boot(timeout)
        except BaseException:
            self.stop()
            raise

    def _boot(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid is None:
            if self.proc.poll() is not None:
                break
            # PID 1 of the namespace: the child of unshare's fork.
            kids = children(self.proc.pid)
            try:
                if kids:
                    with open(f"/proc/{kids[0]}/cmdline", "rb") as f:
                        if f.read().startswith(b"/lib/systemd/systemd\0"):
                            self.pid = kids[0]
            except OSError:
                pass
            time.sleep(0.05)
        if self.pid is None:
            raise AssertionError(f"systemd did not start (with-systemd exit {self.proc.poll()}); "
                                 f"its console:\n{self.console()}")
        state = "?"
        while time.monotonic() < deadline:
            state = self.ctl("is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.1)
        raise AssertionError(f"systemd not running: {state}; its console:\n{self.console()}")

    def console(self):
        return self.output.text()[-4000:]

    def path(self, path):
        """A path of the namespace, seen from the host."""
        return f"/proc/{self.pid}/root{path}"

    def write(self, path, text):
        os.makedirs(os.path.dirname(self.path(path)), exist_ok=True)
        with open(self.path(path), "w") as f:
            f.write(text)

    def state(self, unit):
        return self.ctl("is-active", unit, check=False).stdout.strip()

    def failed(self, pattern="smtp521*"):
        out = self.ctl("list-units", "--all", "--state=failed", "--plain", "--no-legend", pattern).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def ctl(self, *args, check=True, tool="systemctl"):
        # -r -w: the target's root and working directory, not the mount
        # namespace's (they differ when the tests run in a chroot).
        # systemd's tools take --no-pager; others (cat, readlink) run as given.
        pager = ["--no-pager"] if tool.startswith(("systemctl", "systemd-", "journalctl")) else []
        p = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "-r", "-w", tool] + pager
                           + list(args), capture_output=True, text=True, timeout=30)
        if check and p.returncode:
            raise AssertionError(f"{tool} {' '.join(args)}: exit {p.returncode}\n{p.stdout}{p.stderr}")
        return p

    def journal(self, *args):
        """journalctl's entries for `args`, each a dict of its fields."""
        return [json.loads(line) for line in self.ctl(*args, "-o", "json", tool="journalctl").stdout.splitlines()]

    def cpu_stat(self, unit):
        """`unit`'s cgroup v2 cpu.stat as a dict (usage_usec counts without
        CPUAccounting=; the nr_throttled of CPUQuota= where the cpu
        controller is on; {} before the unit has a cgroup), or None without
        a cgroup2 hierarchy."""
        v2, _ = cgroup_mounts()
        if v2 is None:
            return None
        # ControlGroup is the unit's path from the hierarchy's top: systemd
        # puts its root, the cgroup it started in (self.cgroup), in front.
        group = self.ctl("show", "-p", "ControlGroup", "--value", unit).stdout.strip()
        if not group:
            return {}  # no cgroup yet: nothing used
        try:
            with open(f"{v2}{group}/cpu.stat") as f:
                return {k: int(v) for k, v in (line.split() for line in f)}
        except OSError:
            return None

    def stop(self):
        if self.stopped:
            return
        self.stopped = True
        if self.pid and self.proc.poll() is None:
            # What systemd knows of failures, for the test's report.
            for args, tool in ((["list-units", "--all", "--failed", "--plain"], "systemctl"),
                               (["-n", "60", "-o", "short-monotonic"], "journalctl")):
                try:
                    p = self.ctl(*args, check=False, tool=tool)
                    print(f"---- {tool} {' '.join(args)}:\n{p.stdout[-4000:]}{p.stderr[-1000:]}")
                except (OSError, subprocess.TimeoutExpired) as e:
                    print(f"---- {tool}: {e}")
        try:
            if self.pid:
                os.kill(self.pid, 9)  # SIGTERM would make PID 1 re-execute
            else:
                self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        if self.own_cgroup:
            left = self.cgroup.remove()
            if left:
                print(f"---- cgroups still busy, left in place: {left}")
        print(f"---- systemd's console:\n{self.output.text(join=True)[-4000:]}")


def unit_dir(port, slice=None, service=lambda text: text, variants=(), into=None, others=None):
    """The one builder of unit directories for a private systemd
    (test/harness/with-systemd), from the shipped units: smtp521.socket listening
    on 127.0.0.1:PORT and smtp521@.service passed through service() (both
    left out if port is None); with `slice`, the shipped slice under that
    name and the services in it (without, systemd makes a plain
    smtp521.slice); for each (suffix, port, socket_edit, service_edit) in
    `variants`, a socket and service named smtp521-SUFFIX, through those
    edits (None: as is); the package's sysusers file, whose user the
    units run as; and `others`, {name: text} of any other units or files.  Written into `into`, or into a new directory (0755) that
    the caller removes; returns its path."""
    d = into or tempfile.mkdtemp(prefix="smtp521-units-")
    os.chmod(d, 0o755)
    with open(os.path.join(ROOT, "smtp521.socket")) as f:
        sock = f.read()
    with open(os.path.join(ROOT, "smtp521@.service")) as f:
        svc = f.read()
    assert "\nListenStream=25\n" in sock and "\nSlice=smtp521.slice\n" in svc
    listen = lambda p: sock.replace("\nListenStream=25\n", f"\nListenStream=127.0.0.1:{p}\n")  # noqa: E731
    files = {}
    if slice:
        svc = svc.replace("\nSlice=smtp521.slice\n", f"\nSlice={slice}\n")
        with open(os.path.join(ROOT, "smtp521.slice")) as f:
            files[slice] = f.read()
    if port is not None:
        files["smtp521.socket"], files["smtp521@.service"] = listen(port), service(svc)
    for suffix, vport, socket_edit, service_edit in variants:
        files[f"smtp521-{suffix}.socket"] = (socket_edit or (lambda t: t))(listen(vport))
        files[f"smtp521-{suffix}@.service"] = (service_edit or (lambda t: t))(svc)
    # The units' User=, made by test/harness/with-systemd in its namespace only.
    with open(os.path.join(ROOT, "smtp521.sysusers")) as f:
        files["smtp521.sysusers"] = f.read()
    files.update(others or {})
    for name, text in files.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return d


def systemd_units(port_ours, port_limited):
    """The shipped units with only the port changed, and a copy of the
    socket with a trigger limit (20 activations in 2 s, systemd's default
    for Accept=no), for comparison (the `systemd` fixture removes the
    directory)."""
    def limited(sock):
        assert "\nTriggerLimitIntervalSec=0\n" in sock
        return sock.replace("\nTriggerLimitIntervalSec=0\n", "\nTriggerLimitBurst=20\n")
    return unit_dir(port_ours, variants=[("limited", port_limited, limited, None)])


def default_name():
    """The name smtp521 greets with when -H is not given, found as it finds
    it: the first word of /etc/mailname (an MTA's install writes one), else
    the kernel's host name."""
    try:
        with open("/etc/mailname", "rb") as f:
            words = f.readline().split()
        if len(words) == 1 and all(0x20 < c < 0x7f for c in words[0]) and len(words[0]) <= 255:
            return words[0]
    except OSError:
        pass
    return socket.gethostname().encode()
