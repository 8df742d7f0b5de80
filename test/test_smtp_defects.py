"""The defects and SMTP details of issue 10, black-box: the real binary, as a
super-server starts it.  Self-contained; run with
    /usr/bin/python3 -m pytest -q test/test_smtp_defects.py
It tests ./smtp521 and, when built, ./smtp521-asan (SMTP521_BINARY names
another).  Tests that need root skip without it, except under CI=true."""
import fcntl
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from harness import LOG_FIELDS, PRIVATE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"PATH": "/usr/bin:/bin"}
GREET = b"220 mx.test ESMTP does not accept mail\r\n"
GREET_521 = b"521 mx.test does not accept mail\r\n"
EHLO = b"250-mx.test\r\n250 ENHANCEDSTATUSCODES\r\n"
REFUSAL = b"521 5.3.2 mx.test does not accept mail\r\n"
BYE = b"221 2.0.0 mx.test closing connection\r\n"
BYE_521 = b"221 mx.test closing connection\r\n"


def binaries():
    if os.environ.get("SMTP521_BINARY"):
        return [os.environ["SMTP521_BINARY"]]
    found = [os.path.join(ROOT, b) for b in ("smtp521", "smtp521-asan") if os.path.exists(os.path.join(ROOT, b))]
    return found or [os.path.join(ROOT, "smtp521")]


@pytest.fixture(params=binaries(), ids=os.path.basename)
def binary(request):
    if not os.path.exists(request.param):
        pytest.fail(f"{request.param} is not built: run make")
    return request.param


def crlf(*lines):
    return b"".join(line.encode() + b"\r\n" for line in lines)


def run(binary, args, stdin=b"", env=None, **kw):
    return subprocess.run([binary] + args, input=stdin, capture_output=True, timeout=30,
                          env=env if env is not None else ENV, **kw)


def log_fields(stderr):
    line = stderr.decode("ascii")
    assert line.count("\n") == 1 and line.endswith("\n"), line
    pairs = [f.split("=", 1) for f in line.rstrip("\n").split(" ")]
    assert all(len(p) == 2 for p in pairs), line
    return dict(pairs), [k for k, _ in pairs]


# ------------------------------------------------------------ defects

def test_worst_case_log_line_keeps_every_field(binary):
    # Five hostile arguments of the longest line (each octet escapes to
    # four), a fourth RCPT, and a hostile REMOTE_ADDR: today's line was cut
    # at 2048 octets in the middle of an escape, and rcpts= was gone.
    junk = b"\x01" * 505  # "HELO " + 505 = 510 octets, the longest command line
    stdin = b"HELO " + junk + b"\r\nMAIL " + junk + b"\r\n" + b"".join(b"RCPT " + junk + b"\r\n" for _ in range(4))
    env = dict(ENV, REMOTE_ADDR=":" * 300, REMOTE_PORT="\x7f" * 300)
    p = run(binary, ["-H", "mx.test", "-l", "stderr"], stdin + b"QUIT\r\n", env)
    assert p.returncode == 0
    f, order = log_fields(p.stderr)
    assert order == LOG_FIELDS, order
    assert f["rcpts"] == "4" and f["end"] == "quit" and f["commands"] == "7", f
    cut = "\\x01" * 25 + "..."
    assert f["helo"] == cut and f["mail"] == cut and f["rcpt"] == ",".join([cut] * 3), f
    assert f["peer"] == "[" + ":" * 64 + "...]:" + "\\x7f\\x7f...", f["peer"]
    # With room for one more field, the line fits one RFC 3164 packet.
    assert len(p.stderr) < 1024 - 40, len(p.stderr)


@pytest.mark.parametrize("args, first, closes", [
    (["-r", "rcpt", "-r", "greeting", "-c"], GREET_521, True),
    (["-c", "-r", "rcpt"], GREET, False),
    (["-c", "-r", "greeting"], GREET_521, False),
    (["--close", "--refuse-at=greeting", "--close"], GREET_521, True),
])
def test_later_options_override_earlier_ones(binary, args, first, closes):
    p = run(binary, ["-H", "first.test"] + args + ["-H", "mx.test", "-t", "9", "-t", "5", "-l", "stderr"],
            crlf("QUIT"))
    assert p.returncode == 0, p.stderr
    bye = BYE_521 if first == GREET_521 else BYE
    assert p.stdout == (first if closes else first + bye), p.stdout
    assert log_fields(p.stderr)[0]["end"] == ("close" if closes else "quit")


def test_closed_stdin_ends_at_once(binary):
    # fd 0 closed: poll() says POLLNVAL.  The session must end with
    # read-error at once (not spin on a stale errno until the deadline).
    t0 = time.monotonic()
    p = subprocess.run(["/bin/sh", "-c", 'exec "$0" -H mx.test -t 60 -l stderr 0<&-', binary],
                       capture_output=True, timeout=30, env=ENV)
    took = time.monotonic() - t0
    assert p.returncode == 0
    assert p.stdout == GREET
    assert log_fields(p.stderr)[0]["end"] == "read-error"
    assert took < 60 / 4, took  # far from the deadline


def fill_pipe():
    """A pipe whose buffer is full: (read end, write end, octets in it)."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, os.O_NONBLOCK)
    n = 0
    try:
        while True:
            n += os.write(w, b"x" * 4096)
    except BlockingIOError:
        pass
    fcntl.fcntl(w, fcntl.F_SETFL, 0)
    return r, w, n


def current_syscall(pid):
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return None


def test_alarm_backstop_leaves_a_log_line_and_exits_0(binary):
    # The log target (stderr, a pipe nobody reads) blocks the session's log
    # line past the deadline.  The alarm, 2 s after it, must write its
    # prepared line (end=alarm) and exit 0, not die of SIGALRM silently.
    r, w, filled = fill_pipe()
    t0 = time.monotonic()
    p = subprocess.Popen([binary, "-H", "mx.test", "-t", "1", "-l", "stderr"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=w, env=ENV)
    os.close(w)
    # Wait until the handler runs: the process, blocked in write(2) (1),
    # is then in poll(2) (7, or ppoll 271) waiting for the pipe.  Only then
    # make room: earlier, the blocked write would simply complete.
    seen = []
    while p.poll() is None and time.monotonic() - t0 < 20:
        call = current_syscall(p.pid)
        if call and (not seen or seen[-1] != call):
            seen.append(call)
        if "1" in seen and call in ("7", "271"):
            break
        time.sleep(0.005)
    # Make room, then read until the process has exited and the pipe is empty.
    data = b""
    fcntl.fcntl(r, fcntl.F_SETFL, os.O_NONBLOCK)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        exited = p.poll() is not None
        try:
            chunk = os.read(r, 1 << 16)
        except BlockingIOError:
            chunk = None
        if chunk:
            data += chunk
        elif exited or chunk == b"":
            break
        else:
            time.sleep(0.005)
    status = p.wait(timeout=20)
    os.close(r)
    took = time.monotonic() - t0
    assert status == 0, (status, seen)
    line = data[filled:]
    f, order = log_fields(line)
    assert order == LOG_FIELDS and f["end"] == "alarm", line
    assert took >= 2.5, took  # the alarm comes 2 s after the 1 s deadline


def test_quit_with_trailing_blanks_ends_the_session(binary):
    for quit in (b"QUIT\t", b"QUIT \t ", b"quit\t\t"):
        p = run(binary, ["-H", "mx.test", "-r", "greeting", "-l", "stderr"], quit + b"\r\nNOOP\r\n")
        assert p.stdout == GREET_521 + BYE_521, (quit, p.stdout)
        assert log_fields(p.stderr)[0]["end"] == "quit"


def test_blanks_after_any_verb(binary):
    p = run(binary, ["-H", "mx.test", "-l", "stderr"], b"EHLO\tc.example\r\nMAIL\tFROM:\t<a@b>\t\r\nNOOP\t\r\n")
    assert p.stdout == GREET + EHLO + b"250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n", p.stdout
    f = log_fields(p.stderr)[0]
    assert f["helo"] == "c.example" and f["mail"] == "<a@b>", f


# ------------------------------------------------------------ SMTP details

def test_ehlo_advertises_enhancedstatuscodes_and_replies_carry_them(binary):
    p = run(binary, ["-H", "mx.test", "-l", "none"],
            crlf("EHLO c", "MAIL FROM:<a@b>", "RCPT TO:<c@d>", "RSET", "VRFY x", "QUIT"))
    assert p.stdout == (GREET + EHLO + b"250 2.1.0 Ok\r\n" + REFUSAL + b"250 2.0.0 Ok\r\n" + REFUSAL + BYE), p.stdout


def test_helo_stays_one_line_and_codes_follow_anyway(binary):
    # RFC 2034 4: enhanced codes whether or not the client used EHLO.
    p = run(binary, ["-H", "mx.test", "-l", "none"], crlf("HELO c", "MAIL FROM:<a@b>", "QUIT"))
    assert p.stdout == GREET + b"250 mx.test\r\n250 2.1.0 Ok\r\n" + BYE, p.stdout


@pytest.mark.parametrize("mode", [["-r", "greeting"], ["-c"]])
def test_521_modes_send_no_enhanced_code(binary, mode):
    p = run(binary, ["-H", "mx.test", "-l", "none"] + mode, crlf("EHLO c", "HELO c", "MAIL FROM:<a@b>", "QUIT"))
    want = GREET_521 if mode == ["-c"] else GREET_521 * 4 + BYE_521
    assert p.stdout == want, p.stdout


def in_private_etc(binary, script_before, args, stdin, hostname="kernel.test"):
    """Run the binary in a private mount and UTS namespace: the kernel's
    host name is `hostname`, /etc is an overlay of the real one where
    `script_before` (sh) may write; nothing on the host changes.
    test/private-mounts makes the namespace's mounts private, in a chroot too."""
    d = tempfile.mkdtemp(prefix="smtp521-etc-")
    try:
        os.mkdir(os.path.join(d, "u"))
        os.mkdir(os.path.join(d, "w"))
        script = ('hostname "$3" && mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1/u,workdir=$1/w" /etc && '
                  + script_before + ' && shift 3 && exec "$@"')
        return subprocess.run(["unshare", "--mount", "--uts", "--propagation", "unchanged", PRIVATE, "sh", "-ec", script, "sh",
                               d, binary, hostname, binary] + args,
                              input=stdin, capture_output=True, timeout=30, env=ENV)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.needs("root", "mountns")
def test_default_hostname_is_etc_mailname(binary):
    p = in_private_etc(binary, 'printf "mx.mailname.test\\n" > /etc/mailname', ["-l", "none"], crlf("EHLO c", "QUIT"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(b"220 mx.mailname.test ESMTP "), p.stdout
    assert b"250-mx.mailname.test\r\n" in p.stdout and b"221 2.0.0 mx.mailname.test " in p.stdout, p.stdout


@pytest.mark.needs("root", "mountns")
def test_default_hostname_falls_back_to_the_kernels(binary):
    p = in_private_etc(binary, 'rm -f /etc/mailname', ["-l", "none"], crlf("QUIT"))
    assert p.stdout == b"220 kernel.test ESMTP does not accept mail\r\n221 2.0.0 kernel.test closing connection\r\n"
    p = in_private_etc(binary, 'printf "two words\\n" > /etc/mailname', ["-l", "none"], crlf("QUIT"))
    assert p.stdout.startswith(b"220 kernel.test "), p.stdout


@pytest.mark.needs("root", "mountns")
def test_hostname_option_wins_over_etc_mailname(binary):
    p = in_private_etc(binary, 'printf "mx.mailname.test\\n" > /etc/mailname', ["-H", "mx.test", "-l", "none"],
                       crlf("QUIT"))
    assert p.stdout == GREET + BYE, p.stdout
