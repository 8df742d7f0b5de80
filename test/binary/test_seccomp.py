"""The process confines itself: a seccomp filter is on before the greeting,
the calls it allows are all a session makes (strace in every situation
finds no refused call), and a kernel that refuses the filter costs the
filter, not the session.  The Catch2 cases of test/unit/seccomp.cpp test the
filter itself: what it refuses, on every architecture (test_arch.py runs
the other architectures' builds under their own kernels)."""
import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

import catch2
from harness import (BYE, BYE_521, GREET, HERE, HOST_LIMIT, ROOT, Child, build, cgroup_hierarchies, cgroup_mounts, crlf,
                     cut_by, fields, need, read_to_eof, started, wait_for)

BINARIES = [build("smtp521"), build("smtp521-asan")]
# i386's glibc sends socket calls through socketcall(2), which the filter
# allows for the session's calls only: the traces run there too.
I386 = build("smtp521-i386", "i386")
TRACED_BINARIES = BINARIES + [I386]
SESSION = crlf("EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<b@mx.test>", "QUIT")
STRACE = shutil.which("strace") or "/usr/bin/strace"
FILTER_TESTS = {"plain": "test/unit/seccomp", "asan": "test/unit/seccomp-asan"}


def pytest_generate_tests(metafunc):
    catch2.parametrize(metafunc, FILTER_TESTS)


def test_filter_case(program, case):
    # One item per case of test/unit/seccomp.cpp and build.
    catch2.check(program, case)


def binary_path(name):
    return os.path.join(ROOT, name)


def seccomp_state(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    raise AssertionError("no Seccomp: line in /proc/PID/status")


@pytest.mark.parametrize("name", BINARIES)
def test_filter_is_on_while_the_session_waits(name):
    # Seccomp: 2 is SECCOMP_MODE_FILTER.  The greeting is out, so the
    # filter was installed before the first byte of client input.
    c = Child(binary_path(name), ["-H", "mx.test", "-l", "stderr"])
    try:
        greeting = c.read_lines(1)
        assert greeting == GREET, greeting
        assert seccomp_state(c.proc.pid) == 2
        c.send(SESSION)
        out = c.read_until_eof()
        assert out.endswith(BYE), out
        assert c.wait() == 0
        assert fields(c.stderr.decode().strip())["sandbox"] == "on", c.stderr
    finally:
        if c.returncode is None:
            c.proc.kill()
            c.wait()


# LeakSanitizer cannot run under ptrace; the leak check is not what these
# traces are for.
TRACED_ENV = {"PATH": "/usr/bin:/bin", "ASAN_OPTIONS": "detect_leaks=0"}


@contextlib.contextmanager
def devlog(tmp_path, kind=socket.SOCK_DGRAM, backlog=None):
    """A /dev/log of the test's own: yields the listening socket and the
    argv prefix that runs a command with it bind-mounted on /dev/log, in a
    mount namespace of its own (HERE/with-devlog); closes it at the end."""
    dev = tmp_path / "dev"
    dev.mkdir()
    path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, kind) as listener:
        listener.bind(path)
        if backlog is not None:
            listener.listen(backlog)
        yield listener, [os.path.join(HERE, "with-devlog"), str(dev), path]


def session_of(p):
    """The smtp521 process that p is or started (with-devlog forks)."""
    session = wait_for(lambda: [c for c in [p.pid] + children_of(p.pid) if comm(c).startswith("smtp521")],
                       timeout=20)
    assert session, "no smtp521 process"
    return session[0]


def traced(argv, trace):
    """argv under strace -f, its trace written to `trace`."""
    return [STRACE, "-f", "-qq", "-o", trace] + argv


def refused_after_filter(trace):
    """The system calls refused after the filter went on (none expected),
    and whether the seccomp() call itself succeeded."""
    with open(trace) as f:
        lines = f.read().splitlines()
    start = [i for i, line in enumerate(lines) if re.search(r"\bseccomp\(SECCOMP_SET_MODE_FILTER", line)]
    assert start, "no seccomp() call in the trace:\n" + "\n".join(lines[-40:])
    installed = lines[start[0]].rstrip().endswith("= 0")
    refused = [line for line in lines[start[0] + 1:] if "EPERM" in line]
    return installed, refused


def scenario_pipe(binary, trace):
    p = subprocess.run(traced([binary, "-H", "mx.test", "-l", "stderr"], trace), input=SESSION,
                       capture_output=True, timeout=30, env=TRACED_ENV)
    assert p.returncode == 0, p.stderr
    assert p.stdout.endswith(BYE), p.stdout
    return p.stderr.decode()


def child_scenario(binary, trace, args, script, sock_kind="pair"):
    c = Child(STRACE, ["-f", "-qq", "-o", trace, binary, "-H", "mx.test", "-l", "stderr"] + args,
              sock_kind=sock_kind, env=TRACED_ENV)
    try:
        script(c)
    finally:
        if c.returncode is None:
            try:
                c.wait(timeout=20)
            except AssertionError:
                pass
    assert c.returncode == 0, c.stderr
    return c.stderr.decode()


def full_session(c):
    c.send(SESSION)
    out = c.read_until_eof()
    assert out.endswith((b"\r\n" + BYE, b"\r\n" + BYE_521)), out


def pipelined_after_quit(c):
    # QUIT with more data behind it: the drain reads it (recv) before close.
    c.send(SESSION + b"NOOP\r\n" * 2000)
    out = c.read_until_eof()
    assert BYE in out, out


def silent_until_timeout(c):
    out = c.read_until_eof(timeout=15)
    assert out.startswith(b"220 "), out


def reset_by_client(c):
    c.read_lines(1)
    c.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    c.client.close()
    c.client = socket.socket()  # wait() closes it


def close_mode(c):
    out = c.read_until_eof()
    assert out.startswith(b"521 mx.test"), out


SCENARIOS = {
    "pipe": None,
    "socketpair": ([], full_session, "pair"),
    "tcp-pipelined-after-quit": ([], pipelined_after_quit, "tcp"),
    "timeout": (["-t", "1"], silent_until_timeout, "pair"),
    "client-reset": ([], reset_by_client, "tcp"),
    "close-mode": (["-c"], close_mode, "tcp"),
    "greeting-mode": (["-r", "greeting"], full_session, "tcp"),
    "helo-mode": (["-r", "helo"], full_session, "tcp"),
}


@pytest.mark.needs("strace")
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("name", TRACED_BINARIES)
def test_no_call_is_refused(name, scenario, tmp_path):
    # The allowlist was found with strace; this keeps it complete: in every
    # situation a session meets, no call after the filter is refused.
    binary = binary_path(name)
    trace = str(tmp_path / "trace")
    if SCENARIOS[scenario] is None:
        log = scenario_pipe(binary, trace)
    else:
        args, script, kind = SCENARIOS[scenario]
        log = child_scenario(binary, trace, args, script, kind)
    installed, refused = refused_after_filter(trace)
    assert installed
    assert refused == [], refused
    assert fields(log.strip().splitlines()[-1])["sandbox"] == "on", log


@pytest.mark.needs("strace", "root", "mountns")
@pytest.mark.parametrize("name", [build("smtp521"), I386])
def test_no_call_is_refused_when_logging_to_syslog(name, tmp_path):
    # syslog(3) after the filter: the socket was opened and connected
    # before it (LOG_NDELAY), the time zone read; only send and getpid remain.
    binary = binary_path(name)
    trace = str(tmp_path / "trace")
    with devlog(tmp_path) as (listener, under_devlog):
        p = subprocess.run(under_devlog + traced([binary, "-H", "mx.test"], trace), input=SESSION,
                           capture_output=True, timeout=30)
        assert p.returncode == 0, p.stderr
        listener.settimeout(5)
        message = listener.recv(8192).decode()
    assert re.match(r"<22>\w{3} [ \d]\d \d\d:\d\d:\d\d smtp521\[\d+\]: peer=local end=quit ", message), message
    assert fields(message)["sandbox"] == "on", message
    installed, refused = refused_after_filter(trace)
    assert installed and refused == [], refused


@pytest.mark.needs("strace")
@pytest.mark.parametrize("name", BINARIES)
def test_a_kernel_that_refuses_the_filter_costs_only_the_filter(name):
    # strace makes seccomp() fail as an old or locked-down kernel would:
    # the session is the same, and the log line says sandbox=off.
    binary = binary_path(name)
    with tempfile.TemporaryDirectory(prefix="smtp521-strace-") as work:
        p = subprocess.run([STRACE, "-f", "-qq", "-o", os.path.join(work, "trace"),
                            "-e", "inject=seccomp:error=EINVAL", binary, "-H", "mx.test", "-l", "stderr"],
                           input=SESSION, capture_output=True, timeout=30, env=TRACED_ENV)
    plain = subprocess.run([binary, "-H", "mx.test", "-l", "stderr"], input=SESSION, capture_output=True,
                           timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout == plain.stdout
    assert fields(p.stderr.decode().strip().splitlines()[-1])["sandbox"] == "off", p.stderr
    assert fields(plain.stderr.decode().strip().splitlines()[-1])["sandbox"] == "on", plain.stderr


# ------------------------------------------------------------ stopped, traced, frozen

# A session waits in poll() with a timeout.  A stop interrupts that wait,
# and the kernel resumes it through restart_syscall (signal(7)): the
# filter must let it through, or the session ends end=read-error with no
# reply.  Each case stops the session while it waits for a command, lets
# it go, then sends QUIT: it must answer 221 and log end=quit.

def state(pid):
    """The process's state letter (/proc/PID/stat), T when stopped."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def waits_in_poll(pid):
    with open(f"/proc/{pid}/wchan") as f:
        return "poll" in f.read()


def tracer(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^TracerPid:\s+(\d+)", f.read(), re.M).group(1))


def stop_and_continue(pid):
    os.kill(pid, signal.SIGSTOP)
    assert wait_for(lambda: state(pid) == "T"), state(pid)
    os.kill(pid, signal.SIGCONT)
    assert wait_for(lambda: state(pid) != "T"), state(pid)


def attach_and_detach_strace(pid):
    # strace seizes the process, which interrupts its poll() (strace shows
    # it resumed as restart_syscall), and detaches on SIGINT.
    with tempfile.TemporaryDirectory(prefix="smtp521-strace-") as work:
        trace = os.path.join(work, "trace")
        s = subprocess.Popen([STRACE, "-qq", "-o", trace, "-p", str(pid)], stderr=subprocess.PIPE)
        try:
            assert wait_for(lambda: tracer(pid) == s.pid), tracer(pid)
            assert wait_for(lambda: os.path.exists(trace) and "restart_syscall" in open(trace).read()), \
                open(trace).read() if os.path.exists(trace) else "no trace"
        finally:
            s.send_signal(signal.SIGINT)
            s.wait(timeout=20)
        assert tracer(pid) == 0
        with open(trace) as f:
            text = f.read()
    assert "EPERM" not in text, text


def freezer():
    """The cgroup freezer here: ("v1", mount) with freezer.state, ("v2",
    mount) with cgroup.freeze, or (None, why neither)."""
    for mount, fstype, opts in cgroup_hierarchies():
        if fstype == "cgroup" and "freezer" in opts:
            return "v1", mount
    v2, _ = cgroup_mounts()
    if v2 and glob.glob(os.path.join(v2, "*", "cgroup.freeze")):
        return "v2", v2
    return None, HOST_LIMIT + "no cgroup freezer (neither v1's freezer hierarchy nor v2's cgroup.freeze)"


def freeze_and_thaw(pid):
    kind, root = freezer()
    with open(f"/proc/{pid}/cgroup") as f:
        # "0::/path" on v2, "N:freezer:/path" on v1: where it goes back to.
        home = next(line.split(":", 2)[2] for line in f.read().splitlines()
                    if (kind == "v2" and line.startswith("0::")) or (kind == "v1" and ":freezer:" in line))
    group = tempfile.mkdtemp(prefix="smtp521-freeze-", dir=root)
    control, frozen, thawed = (("cgroup.freeze", "1", "0") if kind == "v2" else
                               ("freezer.state", "FROZEN", "THAWED"))

    def write(directory, name, value):
        with open(os.path.join(directory, name), "w") as f:
            f.write(value)

    def frozen_now():
        if kind == "v2":
            with open(os.path.join(group, "cgroup.events")) as f:
                return "frozen 1" in f.read().splitlines()
        with open(os.path.join(group, "freezer.state")) as f:
            return f.read().strip() == "FROZEN"

    try:
        write(group, "cgroup.procs", str(pid))
        write(group, control, frozen)
        assert wait_for(frozen_now), "not frozen"
        assert state(pid) in "DST", state(pid)
        write(group, control, thawed)
        assert wait_for(lambda: not frozen_now()), "not thawed"
    finally:
        write(root + home.rstrip("/") if home != "/" else root, "cgroup.procs", str(pid))
        os.rmdir(group)


def run_interrupted(binary, kind, interrupt):
    """A session on a pipe or a socket, interrupted while it waits for a
    command; returns what the client read and the log line."""
    argv = [binary, "-H", "mx.test", "-l", "stderr"]
    if kind == "pipe":
        with started(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     env=TRACED_ENV) as p:
            greeting = p.stdout.readline()
            assert wait_for(lambda: waits_in_poll(p.pid)), "not waiting in poll()"
            interrupt(p.pid)
            out, err = p.communicate(b"QUIT\r\n", timeout=30)
        return greeting + out, err.decode()
    c = Child(binary, argv[1:], sock_kind=kind, env=TRACED_ENV)
    greeting = c.read_lines(1)
    assert wait_for(lambda: waits_in_poll(c.proc.pid)), "not waiting in poll()"
    interrupt(c.proc.pid)
    c.send(b"QUIT\r\n")
    out = c.read_until_eof(timeout=30)
    assert c.wait(timeout=30) == 0
    return greeting + out, c.stderr.decode()


INTERRUPTS = {
    "stop-continue": (stop_and_continue, ()),
    "strace-attach": (attach_and_detach_strace, ("strace",)),
    "freezer": (freeze_and_thaw, ("root",)),
}


@pytest.mark.parametrize("kind", ["pipe", "pair", "tcp"])
@pytest.mark.parametrize("interrupt", sorted(INTERRUPTS))
@pytest.mark.parametrize("name", TRACED_BINARIES)
def test_a_stopped_traced_or_frozen_session_still_answers(name, interrupt, kind):
    action, needs = INTERRUPTS[interrupt]
    need(*needs)
    if interrupt == "freezer" and freezer()[0] is None:
        pytest.skip(freezer()[1])
    out, log = run_interrupted(binary_path(name), kind, action)
    assert out == GREET + BYE, out
    line = fields(log.strip().splitlines()[-1])
    assert line["end"] == "quit" and line["sandbox"] == "on", log


def alarm_handler_running(pid):
    """SIGALRM is in the blocked mask only while its handler runs."""
    with open(f"/proc/{pid}/status") as f:
        blocked = int(re.search(r"^SigBlk:\s+([0-9a-f]+)$", f.read(), re.M).group(1), 16)
    return blocked & (1 << (signal.SIGALRM - 1))


@pytest.mark.needs("root", "mountns")
@pytest.mark.parametrize("name", BINARIES + [I386])
def test_the_backstop_reaches_syslog_through_its_connected_socket(name, tmp_path):
    # A syslog daemon that stopped reading: /dev/log's queue is full, so
    # the session's own line blocks past its deadline.  The alarm's handler
    # then sends the prepared end=alarm line on the backstop's socket,
    # connected to /dev/log before the filter (which refuses a send to an
    # address): once the queue drains, that line arrives.
    with devlog(tmp_path) as (listener, under_devlog), contextlib.ExitStack() as fillers:
        # One sender's own buffer runs out first: senders until the
        # listener's queue is full (net.unix.max_dgram_qlen), which blocks
        # every sender.
        queued, sent = 0, None
        while sent != 0:
            filler = fillers.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
            filler.connect(listener.getsockname())
            filler.setblocking(False)
            sent = 0
            try:
                while True:
                    filler.send(b"filler")
                    sent += 1
            except BlockingIOError:
                pass
            queued += sent
        with started(under_devlog + [binary_path(name), "-H", "mx.test", "-t", "1"], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=TRACED_ENV) as p:
            assert p.stdout.readline() == GREET
            assert wait_for(lambda: alarm_handler_running(session_of(p)), timeout=20), "the alarm did not ring"
            listener.settimeout(10)
            lines = []
            while not lines or b"filler" in lines[-1]:
                lines.append(listener.recv(8192))
            assert p.wait(timeout=20) == 0
    assert len(lines) == queued + 1, (queued, lines[-3:])
    message = lines[-1].decode()
    assert re.match(r"<22>smtp521\[\d+\]: peer=local end=alarm ", message), message
    assert fields(message)["sandbox"] == "on", message


def alarm_pending(pid):
    """SIGALRM has come and waits for delivery (the process is stopped)."""
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    pending = int(re.search(r"^ShdPnd:\s+([0-9a-f]+)$", status, re.M).group(1), 16)
    return pending & (1 << (signal.SIGALRM - 1))


@pytest.mark.needs("root", "mountns")
@pytest.mark.parametrize("name", BINARIES + [I386])
def test_the_backstop_reaches_a_stream_syslog(name, tmp_path):
    # /dev/log a stream socket (rsyslog, syslog-ng can be set up so): the
    # datagram connect fails with EPROTOTYPE, and the backstop connects a
    # stream, as glibc does.  The listener accepts and reads nothing until
    # the process is gone; the session is held past its alarm (stopped, as
    # a blocked log holds it), so the handler runs at SIGCONT.  Its line
    # arrives framed as glibc frames it (glibc 2.36 seen: a NUL after it).
    received = b""
    with devlog(tmp_path, socket.SOCK_STREAM, backlog=8) as (listener, under_devlog), \
            started(under_devlog + [binary_path(name), "-H", "mx.test", "-t", "1"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=TRACED_ENV) as p:
        assert p.stdout.readline() == GREET
        session = session_of(p)
        os.kill(session, signal.SIGSTOP)
        assert wait_for(lambda: alarm_pending(session), timeout=20), "the alarm did not come"
        os.kill(session, signal.SIGCONT)
        assert p.wait(timeout=20) == 0
        listener.setblocking(False)
        while True:
            try:
                connection = listener.accept()[0]
            except BlockingIOError:
                break
            with connection:
                received += read_to_eof(connection, timeout=10)
    messages = received.split(b"\0")
    assert messages[-1] == b"", received  # every message ends in a NUL
    alarms = [m.decode() for m in messages if b" end=alarm " in m]
    assert len(alarms) == 1 and re.match(r"<22>smtp521\[\d+\]: peer=local end=alarm ", alarms[0]), received
    assert fields(alarms[0])["sandbox"] == "on", alarms


@pytest.mark.needs("root", "mountns")
@pytest.mark.parametrize("name", BINARIES)
def test_a_stream_syslog_that_accepts_no_one_cannot_hold_a_session(name, tmp_path):
    # A stream /dev/log whose accept queue is full (a daemon that stopped
    # accepting): syslog(3)'s connect, made before the first byte to the
    # client, blocks.  The alarm is armed before it, so the process still
    # ends by -t's deadline and the backstop's 2 seconds, having told the
    # client nothing (there is no session to refuse), where it once waited
    # for the daemon for ever.
    # smtp521(8): "a process ends at most 3 seconds after its deadline".
    timeout, past_deadline = 1, 3
    # A backlog of 0 holds one connection that no one accepts; the next
    # connect blocks (a non-blocking one says EAGAIN: the queue is full).
    with devlog(tmp_path, socket.SOCK_STREAM, backlog=0) as (listener, under_devlog), \
            contextlib.ExitStack() as fillers:
        while True:
            filler = fillers.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            filler.setblocking(False)
            try:
                filler.connect(listener.getsockname())
            except BlockingIOError:
                break
        t0 = time.monotonic()
        with started(under_devlog + [binary_path(name), "-H", "mx.test", "-t", str(timeout)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
            try:
                out, _ = p.communicate(timeout=cut_by(timeout) + past_deadline)
            except subprocess.TimeoutExpired:
                pytest.fail("still held by syslog's connect")
            took = time.monotonic() - t0
    assert p.returncode == 0 and out == b"", (p.returncode, out)
    assert timeout < took, took  # ended by the alarm, not before its deadline


def children_of(pid):
    """Every descendant of pid."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                with open(task) as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""
