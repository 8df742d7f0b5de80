"""The real binary, started as a super-server starts it: fds 0 and 1 are one
end of a socketpair or of an accepted loopback TCP connection."""
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from harness import (BYE, BYE_521, EHLO, GREET, GREET_521, LOG_FIELDS, MODES, OK_MAIL, PRIVATE, REFUSAL, ROOT,
                     SESSION_IN, SESSION_OUT, Child, Syslog, crlf, current_syscall, cut_by, default_name, fields, fill,
                     help_text, option_range, read_to_eof, serving, started)

ENV = {"PATH": "/usr/bin:/bin"}


def log_fields(stderr):
    """The fields of the one log line in `stderr`, and their order."""
    line = stderr.decode("ascii")
    assert line.count("\n") == 1 and line.endswith("\n"), f"one log line expected: {line!r}"
    pairs = [f.split("=", 1) for f in line.rstrip("\n").split(" ")]
    assert all(len(p) == 2 for p in pairs), line
    return dict(pairs), [k for k, _ in pairs]


def log_of(child):
    return log_fields(child.stderr)[0]


def test_dialog_over_a_socket(binary):
    c = Child(binary, ["-H", "mx.test", "-l", "stderr"])
    c.send(crlf("EHLO a", "MAIL FROM:<x@y>", "RCPT TO:<u@v>", "DATA", "QUIT"))
    out = c.read_until_eof()
    assert out == GREET + EHLO + OK_MAIL + REFUSAL + REFUSAL + BYE, out
    assert c.wait() == 0
    log = log_of(c)
    assert log["end"] == "quit" and log["commands"] == "5" and log["rcpt"] == "<u@v>", log


def test_greeting_comes_before_any_input(binary):
    c = Child(binary, ["-H", "mx.test", "-r", "greeting", "-l", "none"])
    assert c.read_lines(1) == GREET_521
    c.send(crlf("QUIT"))
    assert c.read_until_eof() == BYE_521
    assert c.wait() == 0


def test_early_talker_is_greeted_first(binary):
    c = Child(binary, ["-H", "mx.test", "-l", "none"])
    c.send(crlf("EHLO early", "QUIT"))
    assert c.read_until_eof() == GREET + EHLO + BYE
    assert c.wait() == 0


def test_replies_of_one_batch_come_in_one_write(binary):
    # RFC 2920 3.1: 19 pipelined commands sent at once get their 19
    # replies in one write.  On a SOCK_SEQPACKET pair one recv() returns
    # what one write() sent, no more: a reply per write would come back as
    # 19 records, the first of one line.
    c = Child(binary, ["-H", "mx.test", "-l", "none"], sock_kind="seqpacket")
    c.client.settimeout(10)
    assert c.client.recv(65536) == GREET
    c.send(crlf(*(["NOOP"] * 19)))
    chunk = c.client.recv(65536)
    assert chunk == b"250 2.0.0 Ok\r\n" * 19, chunk
    c.send(crlf("QUIT"))
    assert c.read_until_eof() == BYE
    assert c.wait() == 0


def test_close_mode_closes_after_greeting(binary):
    # At once: far from the deadline.
    c = Child(binary, ["-H", "mx.test", "-c", "-t", "60", "-l", "stderr"])
    assert c.read_until_eof(timeout=30) == GREET_521
    assert c.wait() == 0
    assert c.elapsed < 60 / 4, c.elapsed
    assert log_of(c)["end"] == "close"


@pytest.mark.parametrize("mode", ["rcpt", "helo", "greeting"])
def test_silent_client_cut_at_deadline(binary, mode):
    # RFC 1846 4.2: -t 1 closes at the deadline: not before it (the
    # client's clock), not long after it (the session's own, its log),
    # with nothing sent after the greeting, in every mode that waits.
    args, greeting, _ = MODES[mode]
    c = Child(binary, ["-H", "mx.test", "-t", "1", "-l", "stderr"] + args)
    t0 = time.monotonic()
    out = c.read_until_eof(timeout=cut_by(1) + 10)
    took = time.monotonic() - t0
    assert out == greeting
    assert took >= 0.9, took
    assert c.wait() == 0
    log = log_of(c)
    assert log["end"] == "timeout" and 1 <= float(log["duration"]) <= cut_by(1), log


def test_trickling_client_cut_at_deadline(binary):
    # RFC 1846 4.2: the deadline is for the session, not for silence: one
    # byte every 200 ms does not keep it open.
    c = Child(binary, ["-H", "mx.test", "-t", "1", "-l", "stderr"])
    t0 = time.monotonic()
    c.client.setblocking(False)
    got = b""
    closed_at = None
    while time.monotonic() - t0 < cut_by(1) + 10:
        try:
            c.client.send(b"N")
        except OSError:
            pass
        time.sleep(0.2)
        try:
            chunk = c.client.recv(4096)
            if chunk == b"":
                closed_at = time.monotonic() - t0
                break
            got += chunk
        except BlockingIOError:
            pass
        except OSError:
            closed_at = time.monotonic() - t0
            break
    assert closed_at is not None, "never closed"
    assert got == GREET
    assert c.wait() == 0
    log = log_of(c)
    assert log["end"] == "timeout" and 1 <= float(log["duration"]) <= cut_by(1), log


# Starvation, made real and repeatable: the session runs at SCHED_IDLE
# pinned to the CPU of a client that sends without pause, so it runs only
# while the client is blocked on a full socket buffer, reads, and is
# preempted as soon as the client can send again: there is always input
# waiting, the state of a session under the slice's CPUQuota= in a flood.
STARVED_CPU = max(os.sched_getaffinity(0))
ENDLESS_LINE = b"X" * 65536  # no LF, ever
# Commands without pause, each answered: 1.5 KiB each, overlong (the 521
# answers them), so that -n's maximum, 100,000, lies over 150 MB away (at
# 512 octets it came at 1.3 s, too near -T 1).
FLOOD_COMMANDS = (b"NOOP " + b"x" * 1500 + b"\r\n") * 64


def starved(binary, args):
    """argv prefix and args for Child: the binary at SCHED_IDLE on STARVED_CPU."""
    return shutil.which("taskset"), ["-c", str(STARVED_CPU), shutil.which("chrt"), "--idle", "0", binary] + args


def flood(child, payload):
    """Send `payload` over and over from a thread on STARVED_CPU until the
    session closes; return everything it sent back."""
    def sender():
        os.sched_setaffinity(0, {STARVED_CPU})  # this thread only
        try:
            while True:
                child.client.sendall(payload)
        except OSError:  # EPIPE, ECONNRESET: the session is gone
            pass
    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    got = b""
    child.client.settimeout(60)
    while True:
        try:
            chunk = child.client.recv(65536)
        except ConnectionResetError:  # AF_UNIX: closed with our bytes unread, after its own
            break
        if not chunk:
            break
        got += chunk
    thread.join(timeout=60)
    return got


@pytest.mark.parametrize("payload", [ENDLESS_LINE, FLOOD_COMMANDS], ids=["endless-line", "commands"])
def test_a_starved_session_fed_without_pause_is_cut_at_deadline(binary, payload):
    # RFC 1846 4.2: -t bounds the session whatever the client sends; input
    # always waiting must not keep it open until the alarm (-t + 2 s) or,
    # at about 30,000 commands a second, the limit (-n, at about 3 s).
    c = Child(*starved(binary, ["-H", "mx.test", "-t", "1", "-n", "100000", "-l", "stderr"]))
    out = flood(c, payload)
    assert c.wait(timeout=30) == 0
    log = log_of(c)
    assert log["end"] == "timeout" and 1 <= float(log["duration"]) <= cut_by(1), log
    assert out.startswith(GREET), out[:200]


def anonymous_kib(binary, payload, reply):
    """Anonymous memory (KiB) of a session once `payload` has been answered
    with `reply`: its stack, bss, heap and written data, where a buffer
    holding the line would be; not the file pages (libc's code) it maps.
    From /proc/PID/smaps_rollup, which walks the page tables: exact on any
    kernel, where the counters of /proc/PID/status may lag the process's
    own faults (per task until Linux 6.2, per CPU since).  Under its
    seccomp filter the shipped build can neither map nor unmap memory (no
    mmap, brk, munmap or madvise): what a session touched is still mapped
    here, so this is also its peak.  ASan's fake stacks (Debian 13's
    libasan detects use after return by default) take a frame for calls
    in turn, so its memory grows with the number of reads, which timing
    decides (76 KiB more for 1 MiB in 4 KiB reads, 1,150 in 256-octet
    ones): off here, as ASan's bookkeeping is not the program's."""
    env = {"PATH": "/usr/bin:/bin", "ASAN_OPTIONS": "detect_stack_use_after_return=0"}
    c = Child(binary, ["-H", "mx.test", "-l", "none"], env=env)
    c.send(payload)
    assert c.read_lines(2, timeout=20) == GREET + reply
    with open(f"/proc/{c.proc.pid}/smaps_rollup") as f:
        anonymous = int(next(line for line in f if line.startswith("Anonymous:")).split()[1])
    c.send(crlf("QUIT"))
    assert c.read_until_eof() == BYE
    assert c.wait(timeout=20) == 0
    return anonymous


def test_megabyte_line_keeps_memory_bounded(binary):
    # RFC 5321 4.5.3.1.4: a 1 MiB line is answered once, and holds no more
    # anonymous memory than a plain session of the same binary: a buffer
    # that kept the line would add its 1024 KiB (a mutant keeping 128 KiB
    # of it added 124 to 136).  The two sessions differ only by where Linux placed
    # each process: 0 to 4 KiB under setarch -R; over 2,800 pairs (Debian
    # 12 and 13, idle and beside two compile loops; 12 also after
    # drop_caches), -8 to +8 KiB plain (the stack pointer's random shift of up to 8 KiB,
    # arch_align_stack(), spans up to two more pages) and -28 to +28 ASan:
    # the bound, 64 KiB, is over twice that, and a sixteenth of the line.
    # Peak RSS (VmHWM), compared before, also counted libc's code pages,
    # which vary with where libc lands against the kernel's 64 KiB
    # fault-around windows: -204 to +188 KiB between two such sessions.
    base = anonymous_kib(binary, crlf("NOOP"), b"250 2.0.0 Ok\r\n")
    big = anonymous_kib(binary, b"MAIL FROM:<" + b"a" * (1 << 20) + b">\r\n", REFUSAL)
    assert big - base < 64, (base, big)


def test_peer_closes_at_once(binary):
    c = Child(binary, ["-H", "mx.test", "-t", "60", "-l", "stderr"])
    c.client.close()
    assert c.wait(timeout=30) == 0
    assert c.elapsed < 60 / 4, c.elapsed
    end = log_of(c)["end"]
    # Which syscall notices first depends on timing: EOF, EPIPE or ECONNRESET.
    assert end in ("eof", "read-error", "write-error"), end


def test_peer_resets_mid_session(binary):
    c = Child(binary, ["-H", "mx.test", "-t", "60", "-l", "stderr"], sock_kind="tcp")
    c.send(crlf("EHLO a", "NOOP"))
    c.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.client.close()  # RST
    assert c.wait(timeout=30) == 0
    assert c.elapsed < 60 / 4, c.elapsed
    assert log_of(c)["end"] in ("eof", "read-error", "write-error")


def test_reset_while_waiting_for_a_command_is_a_read_error(binary):
    # Greeted, nothing unsent or unread on either side, then a reset: the
    # next read(2) fails with ECONNRESET (RFC 793 3.4 "reset processing").
    c = Child(binary, ["-H", "mx.test", "-t", "60", "-l", "stderr"], sock_kind="tcp")
    assert c.read_lines(1) == GREET
    c.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.client.close()  # RST
    assert c.wait(timeout=30) == 0
    assert log_of(c)["end"] == "read-error"


def test_peer_that_never_reads_is_cut_at_deadline(binary):
    # The client floods commands and reads nothing: our writes fill the
    # socket buffer, and the deadline still ends the session.
    c = Child(binary, ["-H", "mx.test", "-t", "2", "-n", "100000", "-l", "stderr"])
    c.client.setblocking(False)
    t0 = time.monotonic()
    payload = b"NOOP\r\n" * 20000
    while c.alive() and time.monotonic() - t0 < cut_by(2) + 10:
        try:
            c.client.send(payload)
        except (BlockingIOError, OSError):
            time.sleep(0.05)
    assert c.wait(timeout=10) == 0
    log = log_of(c)
    assert log["end"] == "timeout" and 2 <= float(log["duration"]) <= cut_by(2), log


def test_closed_peer_causes_no_sigpipe(binary):
    # Many commands, then the peer vanishes while replies are due: the
    # process must exit 0 (EPIPE handled), not die of SIGPIPE.
    c = Child(binary, ["-H", "mx.test", "-n", "100000", "-l", "stderr"])
    c.send(b"NOOP\r\n" * 5000)
    c.client.close()
    assert c.wait(timeout=5) == 0, c.returncode
    assert log_of(c)["end"] in ("write-error", "eof")


def test_last_reply_survives_pipelined_data_after_quit(binary):
    # R17 over real TCP: QUIT followed at once by 200 KiB the server never
    # reads.  Without half-close and drain, the kernel resets the connection
    # and the 221 is lost.
    c = Child(binary, ["-H", "mx.test", "-l", "stderr"], sock_kind="tcp")
    assert c.read_lines(1) == GREET
    c.send(crlf("QUIT") + b"X" * (200 * 1024))
    out = c.read_until_eof(timeout=5)
    assert out == BYE, out
    assert c.wait() == 0
    assert log_of(c)["end"] == "quit"


def test_the_drain_keeps_replies_in_flight_from_a_reset(binary):
    # Replies the client has not yet taken (its receive window shut: a small
    # buffer it does not read until the server has exited), and data the
    # server has not read when it exits: without the drain, the close resets
    # the connection, and the kernel drops the replies still queued, the
    # 221 with them (RFC 1122 4.2.2.13).  With it, they all arrive, then EOF.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    with client, serving([binary, "-H", "mx.test", "-n", "1000", "-l", "none"], server, env=ENV) as p:
        commands = 600  # 8.4 KB of replies: more than the client's window, less than the server's buffer
        client.sendall(crlf(*["NOOP"] * commands, "QUIT") + b"X" * (64 * 1024))
        assert p.wait(timeout=30) == 0
        out = read_to_eof(client, timeout=10)
    assert out == GREET + b"250 2.0.0 Ok\r\n" * commands + BYE, (len(out), out[-60:])


@pytest.mark.parametrize("payload, end", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http"),
    (b"\x16\x03\x01\x00\xf1\x01\x00\x00\xed\x03\x03" + bytes(range(200)), "tls"),
], ids=["http", "tls"])
def test_http_and_tls_closed_at_once(binary, payload, end):
    c = Child(binary, ["-H", "mx.test", "-t", "60", "-l", "stderr"], sock_kind="tcp")
    c.send(payload)
    out = c.read_until_eof(timeout=30)
    assert out == GREET, out
    assert c.wait() == 0
    assert c.elapsed < 60 / 4, c.elapsed
    assert log_of(c)["end"] == end


@pytest.mark.parametrize("kind, peer", [
    ("tcp", "127.0.0.1:{}"),
    pytest.param("tcp6", "[::1]:{}", marks=pytest.mark.needs("ipv6")),
    # A dual-stack socket's IPv4 peer is logged as IPv4.
    pytest.param("tcp4-mapped", "127.0.0.1:{}", marks=pytest.mark.needs("ipv6")),
])
def test_peer_address_from_getpeername(binary, kind, peer):
    c = Child(binary, ["-H", "mx.test", "-l", "stderr"], sock_kind=kind,
              env={"REMOTE_ADDR": "192.0.2.9", "REMOTE_PORT": "9"})
    port = c.client.getsockname()[1]
    c.send(crlf("QUIT"))
    c.read_until_eof()
    c.client.close()  # the connection is gone by the time the log is written
    assert c.wait() == 0
    assert log_of(c)["peer"] == peer.format(port)


def run_pipe(binary, args, stdin=b"", env=None):
    return subprocess.run([binary] + args, input=stdin, capture_output=True, timeout=30,
                          env=env if env is not None else ENV)


@pytest.mark.parametrize("env, peer", [
    ({"REMOTE_ADDR": "192.0.2.7", "REMOTE_PORT": "4242"}, "192.0.2.7:4242"),
    ({"REMOTE_ADDR": "2001:db8::7", "REMOTE_PORT": "25"}, "[2001:db8::7]:25"),
    ({"TCPREMOTEIP": "198.51.100.3", "TCPREMOTEPORT": "1025"}, "198.51.100.3:1025"),
    ({"REMOTE_ADDR": "evil addr\n"}, "evil\\x20addr\\x0a"),
    ({}, "local"),
    ({"REMOTE_ADDR": "-", "REMOTE_PORT": "-"}, "\\x2d:\\x2d"),
    # Cut at 64 octets of address and 8 of port (the man page's LOGGING).
    ({"REMOTE_ADDR": "a" * 65, "REMOTE_PORT": "123456789"}, "a" * 64 + "...:12345678..."),
    ({"REMOTE_ADDR": "a" * 64, "REMOTE_PORT": "12345678"}, "a" * 64 + ":12345678"),
], ids=["inetd-ipv4", "inetd-ipv6", "tcpserver", "escaped", "none", "dash", "cut", "longest"])
def test_peer_address_from_environment(binary, env, peer):
    p = run_pipe(binary, ["-H", "mx.test", "-l", "stderr"], crlf("QUIT"), dict(ENV, **env))
    assert p.returncode == 0, p
    assert fields(p.stderr.decode().rstrip("\n"))["peer"] == peer, (env, p.stderr)


def test_a_dash_the_client_sent_is_told_from_a_value_absent(binary):
    # HELO -, MAIL FROM:-, RCPT TO:- against NOOP, NOOP, RCPT TO: (before:
    # both logged helo=- mail=- rcpt=- rcpts=1).
    sent = log_fields(run_pipe(binary, ["-H", "mx.test", "-l", "stderr"],
                               crlf("HELO -", "MAIL FROM:-", "RCPT TO:-", "QUIT")).stderr)[0]
    absent = log_fields(run_pipe(binary, ["-H", "mx.test", "-l", "stderr"],
                                 crlf("NOOP", "NOOP", "RCPT TO:", "QUIT")).stderr)[0]
    assert [sent[k] for k in ("helo", "mail", "rcpt", "rcpts")] == ["\\x2d"] * 3 + ["1"], sent
    assert [absent[k] for k in ("helo", "mail", "rcpt", "rcpts")] == ["-"] * 3 + ["1"], absent


def test_log_line_is_one_printable_line(binary):
    junk = bytes(range(256)) * 4 + b"\r\n" + b"HELO " + bytes(range(1, 256)) + b"\r\nMAIL FROM:<\x00\n>\r\n"
    p = run_pipe(binary, ["-H", "mx.test", "-l", "stderr"], junk)
    assert p.returncode == 0
    line = p.stderr
    assert line.endswith(b"\n") and line.count(b"\n") == 1, line
    assert all(0x20 <= b < 0x7f for b in line[:-1]), line


def test_help_is_the_text_the_tests_read(binary):
    # harness.help_text() reads it from the source, for collection.
    p = run_pipe(binary, ["--help"], b"")
    assert p.returncode == 0 and p.stdout.decode() == help_text(), p.stdout


def test_log_none_writes_nothing(binary):
    p = run_pipe(binary, ["-H", "mx.test", "-l", "none"], crlf("QUIT"))
    assert p.returncode == 0 and p.stderr == b"" and p.stdout == GREET + BYE


# One past each end of the ranges --help gives.
TIMEOUT, COMMANDS = option_range("timeout"), option_range("max-commands")
STRESS_AT, STRESS_TIMEOUT = option_range("stress-at"), option_range("stress-timeout")
BAD_OPTIONS = [
    ["-t", "abc"], ["-t", str(TIMEOUT[0] - 1)], ["-t", "-5"], ["-t", str(TIMEOUT[1] + 1)],
    ["-t", "99999999999999999999"], ["-t", ""],
    ["-n", str(COMMANDS[0] - 1)], ["-n", "x"], ["-n", str(COMMANDS[1] + 1)], ["-H", "two words"], ["-H", "tab\there"], ["-H", ""],
    ["-H", "a" * 256], ["-m", "line\r\nbreak"], ["-m", ""], ["-m", "bell\a"], ["-l", "file"], ["-r", "mail"],
    ["-s", "x"], ["-s", str(STRESS_AT[1] + 1)], ["-T", str(STRESS_TIMEOUT[0] - 1)], ["-T", "y"],
    ["-x"], ["--bogus"], ["-t"], ["extra-argument"],
    ["-H", "n" * 255, "-m", "t" * 250], ["-r", "x\n<0>forged"], ["-l", "a\rb\nc"], ["-H", "del\x7fname"],
    # --check refuses what a session refuses, and says so the same way.
    ["-C", "-t", "0"], ["--check", "-m", ""], ["-C", "-H", "n" * 255, "-m", "t" * 250], ["-C", "extra"],
]


@pytest.mark.parametrize("args", BAD_OPTIONS, ids=lambda a: " ".join(a)[:40])
def test_bad_option_exits_64_with_one_line(binary, args):
    p = run_pipe(binary, args, crlf("QUIT"))
    assert p.returncode == 64, (args, p.returncode, p.stderr)
    assert p.stdout == b"", (args, p.stdout)
    err = p.stderr.decode()
    assert err.startswith("smtp521: ") and err.count("\n") == 1, (args, err)


# What the error names: what was typed, the long form included.
NAMED = [(["--close=yes"], "option '--close=yes' takes no value"),
         (["--version=2"], "option '--version=2' takes no value"),
         (["--bogus"], "unknown or ambiguous option '--bogus'"),
         (["--stress"], "unknown or ambiguous option '--stress'"),  # --stress-at or --stress-timeout
         (["-cx"], "unknown option '-x'"), (["--timeout"], "option '--timeout' needs a value"),
         (["-t"], "option '-t' needs a value"),
         # Escaped as the log escapes: one line, whatever was typed.
         (["-r", "x\n<0>forged\\"], "invalid --refuse-at 'x\\x0a<0>forged\\x5c': expected rcpt, helo or greeting"),
         (["-t", "\x1b[2J\u00ff"],  # UTF-8: c3 bf
          f"invalid --timeout '\\x1b[2J\\xc3\\xbf': expected whole seconds from {TIMEOUT[0]} to {TIMEOUT[1]}"),
         (["-r", "ehlo"], "invalid --refuse-at 'ehlo': expected rcpt, helo or greeting"),
         (["-m", ""], "invalid --message '': expected text, printable ASCII, after the name"),
         (["-m", "bell\a"], "invalid --message: expected printable ASCII text, no control characters (no CR or LF)")]


@pytest.mark.parametrize("args,message", NAMED, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bad_option_error_names_what_was_typed(binary, args, message):
    p = run_pipe(binary, args, crlf("QUIT"))
    assert p.returncode == 64, (args, p.returncode, p.stderr)
    assert p.stderr.decode() == f"smtp521: {message} (see smtp521 --help)\n", p.stderr


@pytest.mark.parametrize("args", [["-t", "abc"], ["--bogus"], ["-H", "two words"]], ids=" ".join)
def test_bad_option_never_reaches_the_connection(binary, args):
    # Under inetd fd 2 is the connection too: the error must not go there.
    c = Child(binary, args, stderr_is_socket=True)
    out = c.read_until_eof(timeout=3)
    assert c.wait() == 64
    assert out == b"", (args, out)


def test_log_to_stderr_never_reaches_the_connection(binary):
    # -l stderr when fd 2 is the connection falls back to syslog.
    c = Child(binary, ["-H", "mx.test", "-l", "stderr", "-r", "greeting"], stderr_is_socket=True)
    c.send(crlf("QUIT"))
    out = c.read_until_eof()
    assert c.wait() == 0
    assert out == GREET_521 + BYE_521, out


def test_log_to_stderr_reaches_a_socket_that_is_not_the_connection(binary):
    # Under systemd, StandardError=journal makes fd 2 a socket of its own:
    # every socket shares one st_dev, and only the inode tells it from the
    # connection.
    journal, err = socket.socketpair()
    client, server = socket.socketpair()
    with client, journal, serving([binary, "-H", "mx.test", "-l", "stderr"], server, stderr=err.fileno(),
                                  env=ENV) as p:
        err.close()
        client.sendall(crlf("QUIT"))
        assert read_to_eof(client, timeout=10) == GREET + BYE
        assert p.wait(timeout=10) == 0
        line = read_to_eof(journal, timeout=10)
    assert log_fields(line)[0]["end"] == "quit", line


def test_a_usage_error_reaches_the_journal_that_stdout_shares(binary):
    # A unit's ExecStartPre= (the socket's --check): stdin /dev/null, stdout
    # and stderr one journal stream.  The connection is what smtp521 reads,
    # fd 0, so this stderr is none, and a bad option is said there, not
    # only by syslog, whose message journald ties to the unit only if it
    # finds the process still alive (systemctl status then lacks the why).
    journal, stream = socket.socketpair()
    with journal, started([binary, "--check", "-l", "stderr", "-m", "no", "mail"], stdin=subprocess.DEVNULL,
                          stdout=stream.fileno(), stderr=stream.fileno(), env=ENV) as p:
        stream.close()
        assert p.wait(timeout=10) == 64
        said = read_to_eof(journal, timeout=10)
    assert said == b"smtp521: unexpected argument 'mail' (see smtp521 --help)\n", said


def test_help_and_version(binary):
    p = run_pipe(binary, ["--help"])
    assert p.returncode == 0 and p.stderr == b""
    text = p.stdout.decode()
    for opt in ("--refuse-at", "--close", "--hostname", "--message", "--timeout", "--max-commands", "--log",
                "--version", "--help"):
        assert opt in text, opt
    p = run_pipe(binary, ["-V"])
    assert p.returncode == 0 and p.stdout.startswith(b"smtp521 ") and p.stdout.count(b"\n") == 1


def test_version_writes_what_it_formatted(tmp_path):
    # -V formats into 64 octets: a longer version is cut there, and no
    # octet past what was formatted goes out (before: 79 for a 70-character
    # version, 15 of them from the stack).
    version = "7" * 70
    binary = str(tmp_path / "smtp521")
    subprocess.run(["g++", "-std=c++17", "-O1", f'-DSMTP521_VERSION="{version}"', "-o", binary,
                    os.path.join(ROOT, "smtp521.cpp")], check=True, capture_output=True, timeout=300)
    p = run_pipe(binary, ["-V"])
    assert p.returncode == 0 and p.stdout == (b"smtp521 " + version.encode())[:63], p.stdout


def test_default_hostname_is_the_mailname_or_the_kernels(binary):
    p = run_pipe(binary, ["-l", "none"], crlf("QUIT"))
    name = default_name()
    assert p.stdout == (GREET + BYE).replace(b"mx.test", name), p.stdout


def test_long_options_work(binary):
    p = run_pipe(binary, ["--hostname=mx.test", "--refuse-at=greeting", "--message", "no mail here",
                          "--timeout", "5", "--max-commands", "2", "--log", "stderr"], crlf("NOOP", "NOOP", "NOOP"))
    assert p.stdout == (b"521 mx.test no mail here\r\n" * 3), p.stdout
    assert fields(p.stderr.decode().rstrip())["end"] == "limit"


# ------------------------------------------------------------ the log line, the backstop, the host's name

def test_worst_case_log_line_keeps_every_field(binary):
    # Five hostile arguments of the longest line (each octet escapes to
    # four), a fourth RCPT, and a hostile REMOTE_ADDR: today's line was cut
    # at 2048 octets in the middle of an escape, and rcpts= was gone.
    junk = b"\x01" * 505  # "HELO " + 505 = 510 octets, the longest command line
    stdin = b"HELO " + junk + b"\r\nMAIL " + junk + b"\r\n" + b"".join(b"RCPT " + junk + b"\r\n" for _ in range(4))
    env = dict(ENV, REMOTE_ADDR=":" * 300, REMOTE_PORT="\x7f" * 300)
    p = run_pipe(binary, ["-H", "mx.test", "-l", "stderr"], stdin + b"QUIT\r\n", env)
    assert p.returncode == 0
    f = log_fields(p.stderr)[0]
    assert set(f) == set(LOG_FIELDS), f  # every field (their order: test_docs)
    assert f["rcpts"] == "4" and f["end"] == "quit" and f["commands"] == "7", f
    cut = "\\x01" * 25 + "..."
    assert f["helo"] == cut and f["mail"] == cut and f["rcpt"] == ",".join([cut] * 3), f
    assert f["peer"] == "[" + ":" * 64 + "...]:" + "\\x7f\\x7f...", f["peer"]
    # With room for one more field, the line fits one RFC 3164 packet.
    assert len(p.stderr) < 1024 - 40, len(p.stderr)


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
    return r, w, fill(w)


@pytest.mark.parametrize("blocked", [False, True], ids=["", "sigalrm-blocked"])
def test_alarm_backstop_leaves_a_log_line_and_exits_0(binary, blocked):
    # The log target (stderr, a pipe nobody reads) blocks the session's log
    # line past the deadline.  The alarm, 2 s after it, must write its
    # prepared line (end=alarm) and exit 0, not die of SIGALRM silently;
    # also when exec'ed with SIGALRM blocked (the mask survives exec).
    r, w, filled = fill_pipe()
    t0 = time.monotonic()
    p = subprocess.Popen([binary, "-H", "mx.test", "-t", "1", "-l", "stderr"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=w, env=ENV,
                         preexec_fn=(lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})) if blocked
                         else None)
    os.close(w)
    # Wait until the handler runs: the process, blocked in write(2) (1),
    # is then in poll(2) (7, or ppoll 271) waiting for the pipe.  Only then
    # make room: earlier, the blocked write would simply complete.
    seen = []
    while p.poll() is None and time.monotonic() - t0 < 20:
        call = (current_syscall(p.pid) or [None])[0]
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
    f = log_fields(line)[0]
    assert set(f) == set(LOG_FIELDS) and f["end"] == "alarm", line
    assert took >= 2.5, took  # the alarm comes 2 s after the 1 s deadline


def in_private_etc(binary, script_before, args, stdin, hostname="kernel.test"):
    """Run the binary in a private mount and UTS namespace: the kernel's
    host name is `hostname`, /etc is an overlay of the real one where
    `script_before` (sh) may write; nothing on the host changes.
    test/harness/private-mounts makes the namespace's mounts private, in a chroot too."""
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
    assert p.stdout == (GREET + BYE).replace(b"mx.test", b"kernel.test"), p.stdout
    p = in_private_etc(binary, 'printf "two words\\n" > /etc/mailname', ["-l", "none"], crlf("QUIT"))
    assert p.stdout.startswith(b"220 kernel.test "), p.stdout
    # Neither a valid /etc/mailname nor a kernel's name that is one word
    # of printable ASCII: "localhost".
    # (hostname(1) would refuse the name; the kernel takes it.)
    p = in_private_etc(binary, 'rm -f /etc/mailname && printf "two words" > /proc/sys/kernel/hostname',
                       ["-l", "none"], crlf("QUIT"))
    assert p.stdout == (GREET + BYE).replace(b"mx.test", b"localhost"), p.stdout


@pytest.mark.needs("root", "mountns")
def test_hostname_option_wins_over_etc_mailname(binary):
    p = in_private_etc(binary, 'printf "mx.mailname.test\\n" > /etc/mailname', ["-H", "mx.test", "-l", "none"],
                       crlf("QUIT"))
    assert p.stdout == GREET + BYE, p.stdout


def in_fake_cgroup(binary, cgroup, pids, args, flooded_with=None):
    """Run the binary as PID 1 of a private PID and mount namespace whose
    /proc/self/cgroup reads `cgroup` and whose /sys/fs/cgroup holds
    `pids` as the pids.current of every cgroup `cgroup` names: the
    stress signal as systemd's cgroups give it, without systemd.  The
    client sends nothing, or, starved (see starved()), floods the session
    with `flooded_with`; returns the output and the log line's fields."""
    d = tempfile.mkdtemp(prefix="smtp521-cgroup-")
    try:
        with open(os.path.join(d, "cgroup"), "w") as f:
            f.write(cgroup)
        for line in cgroup.splitlines():
            controllers, path = line.split(":", 2)[1:]
            base = os.path.join(d, "sys", "pids" if controllers == "pids" else "")
            parent = os.path.join(base, os.path.dirname(path).lstrip("/"))
            os.makedirs(parent, exist_ok=True)
            with open(os.path.join(parent, "pids.current"), "w") as f:
                f.write(f"{pids}\n")
        script = 'mount -t proc proc /proc && mount --bind "$1/cgroup" /proc/1/cgroup && ' \
                 'mount --bind "$1/sys" /sys/fs/cgroup && shift && exec "$@"'
        argv = [shutil.which("unshare"), "--mount", "--pid", "--fork", "--propagation", "unchanged", PRIVATE,
                "sh", "-ec", script, "sh", d, binary, "-H", "mx.test", "-l", "stderr"] + args
        c = Child(*(starved(argv[0], argv[1:]) if flooded_with else (argv[0], argv[1:])))
        out = flood(c, flooded_with) if flooded_with else c.read_until_eof(timeout=30)
        assert c.wait(timeout=30) == 0, c.stderr
        return out, log_of(c)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# A hybrid host (cgroup v1 controllers beside the unified hierarchy), a
# session of an IPv6 peer: 13 lines, the pids line last, past the first
# 1,800 octets.
IPV6_SESSION = "/smtp521.slice/smtp521@17-2001:db8:1234:5678:9abc:def0:1234:5678:25-2001:db8:8765:4321:fedc:ba98:7654:3210:61234.service"
HYBRID = "0::/\n" + "".join(f"{n}:{c}:{IPV6_SESSION}\n" for n, c in enumerate(
    ["name=systemd", "cpu,cpuacct", "blkio", "memory", "devices", "freezer", "net_cls,net_prio", "perf_event",
     "hugetlb", "cpuset", "rdma"], start=2)) + f"1:pids:{IPV6_SESSION}\n"


@pytest.mark.needs("root", "mountns")
@pytest.mark.parametrize("cgroup, pids, stressed", [
    ("0::/smtp521.slice/smtp521@1-127.0.0.1:25-127.0.0.1:4000.service\n", 32, True),
    ("0::/smtp521.slice/smtp521@1.service\n", 31, False),
    # cgroup v1's pids hierarchy, where the unified one names no service.
    ("8:pids:/smtp521.slice/smtp521@1.service\n0::/\n", 40, True),
    ("0::/user.slice/session-1.scope\n", 40, False),
    ("0::/smtp521.slice/smtp521.service\n", 40, False),
    ("0::/\n", 40, False),
    # A slice below smtp521.slice is smtp521's own; only a slice is.
    ("0::/smtp521.slice/smtp521-t1.slice/smtp521@1.service\n", 40, True),
    ("0::/smtp521.slice/smtp521-t1.scope/smtp521@1.service\n", 40, False),
    ("0::/system.slice/foreign@1.service\n", 40, False),
    (HYBRID, 40, True),
], ids=["v2-at-limit", "v2-below", "v1-pids", "scope", "no-instance", "root", "own-subslice", "subscope",
        "foreign-slice", "hybrid-ipv6"])
def test_stress_is_read_from_the_slices_pids(binary, cgroup, pids, stressed):
    # -s 32: a session that starts when its slice holds 32 or more is
    # under stress, and -T 1 ends it with a 521 (end=stress); else -t 2
    # ends it (end=timeout).
    out, log = in_fake_cgroup(binary, cgroup, pids, ["-s", "32", "-T", "1", "-t", "2"])
    if stressed:
        assert out == GREET + REFUSAL and log["end"] == "stress", (out, log)
        assert 1 <= float(log["duration"]) <= cut_by(1), log
    else:
        assert out == GREET and log["end"] == "timeout", (out, log)


@pytest.mark.needs("root", "mountns")
@pytest.mark.parametrize("payload", [ENDLESS_LINE, FLOOD_COMMANDS], ids=["endless-line", "commands"])
def test_a_starved_session_fed_without_pause_is_cut_at_stress_deadline(binary, payload):
    # Under stress, -T bounds the session whatever the client sends, and it
    # ends as an idle one does: with the 521.  Not at -t's alarm (10 s).
    out, log = in_fake_cgroup(binary, "0::/smtp521.slice/smtp521@1.service\n", 100,
                              ["-s", "32", "-T", "1", "-t", "8", "-n", "100000"], flooded_with=payload)
    assert log["end"] == "stress" and 1 <= float(log["duration"]) <= cut_by(1), log
    # Every command answered, then the cut's 521: one line more.
    assert out.startswith(GREET) and out.endswith(REFUSAL), (out[:100], out[-100:])
    assert out.count(b"\r\n") == 1 + int(log["commands"]) + 1, (out.count(b"\r\n"), log)


@pytest.mark.needs("root", "mountns")
@pytest.mark.parametrize("mode", ["rcpt", "helo", "greeting"])
def test_stress_cut_sends_each_modes_refusal(binary, mode):
    # The cut is the mode's answer to any command: after a 220 greeting
    # (rcpt, helo) the client reads greeting and 521; after a 521 greeting,
    # a second 521.  The deadline is -T's, the log says end=stress.
    args, greeting, refusal = MODES[mode]
    out, log = in_fake_cgroup(binary, "0::/smtp521.slice/smtp521@1.service\n", 32,
                              ["-s", "32", "-T", "1", "-t", "60"] + args)
    assert out == greeting + refusal and log["end"] == "stress", (out, log)
    assert 1 <= float(log["duration"]) <= cut_by(1), log


# ------------------------------------------------------------ --check

def check_output(mode, greeting, log="stderr", name=b"mx.test", **values):
    """What --check prints: the settings, then the greeting (with LF)."""
    settings = {k: option_range(k)[2] for k in ("timeout", "max-commands", "stress-at", "stress-timeout")}
    settings.update({k.replace("_", "-"): v for k, v in values.items()})
    line = f"mode={mode} hostname={name.decode()} " + " ".join(f"{k}={v}" for k, v in settings.items())
    return f"{line} log={log}\n".encode() + greeting.replace(b"mx.test", name).replace(b"\r\n", b"\n")


@pytest.mark.parametrize("mode", MODES)
def test_check_prints_the_settings_and_the_greeting(binary, mode):
    # --check parses every option and builds every reply as a session
    # would, prints what it found, and exits 0; it reads no input and
    # writes no log line.
    args, greeting, _ = MODES[mode]
    p = run_pipe(binary, ["--check", "-H", "mx.test", "-l", "stderr"] + args, crlf("QUIT"))
    assert p.returncode == 0 and p.stderr == b"", p
    assert p.stdout == check_output(mode, greeting), p.stdout


def test_check_shows_the_values_given_and_the_default_name(binary):
    p = run_pipe(binary, ["-t", "60", "-C", "-n", "5", "-s", "0", "-T", "3", "-l", "none", "-m", "no mail here"])
    assert p.returncode == 0 and p.stderr == b"", p
    assert p.stdout == check_output("rcpt", GREET.replace(b"does not accept mail", b"no mail here"), log="none",
                                    name=default_name(), timeout=60, max_commands=5, stress_at=0,
                                    stress_timeout=3), p.stdout


@pytest.mark.needs("devlog")
def test_without_dev_log_the_line_goes_to_stderr_and_check_fails(binary):
    # A syslog socket that nobody reads: connect() is refused, as where
    # no syslog daemon runs (a container).  syslog(3) would drop every
    # line unseen: the session writes it to stderr instead, and --check
    # fails (64), naming /dev/log.
    log = Syslog()
    try:
        p = subprocess.run(log.prefix + [binary, "-C", "-H", "mx.test"], capture_output=True, timeout=30)
        assert p.returncode == 0 and p.stdout == check_output("rcpt", GREET, log="syslog"), p
        log.sock.close()
        p = subprocess.run(log.prefix + [binary, "-H", "mx.test"], input=SESSION_IN, capture_output=True, timeout=30)
        assert p.returncode == 0 and p.stdout == SESSION_OUT, p
        assert fields(p.stderr.decode())["end"] == "quit", p.stderr
        p = subprocess.run(log.prefix + [binary, "-C", "-H", "mx.test"], capture_output=True, timeout=30)
        assert p.returncode == 64 and p.stdout == b"", p
        assert p.stderr.decode().startswith("smtp521: --log syslog: /dev/log: Connection refused"), p.stderr
        # Where stderr is the connection too (inetd), the line is lost:
        # never sent to the client.
        c = Child(log.prefix[0], log.prefix[1:] + [binary, "-H", "mx.test"], stderr_is_socket=True)
        c.send(crlf("QUIT"))
        assert c.read_until_eof() == GREET + BYE
        assert c.wait() == 0
    finally:
        log.close()
