"""A small test harness: tests are functions, a failed assert fails the test.

Every suite module registers its tests with @test; test/run runs the suites
and prints the totals as one line `N passed, M failed`.
"""
import os
import socket
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def run_tests(suite, tests, *args):
    """Run each test; print one line a test and return (passed, failed)."""
    passed = failed = 0
    for fn in tests:
        name = f"{suite}: {fn.__name__}"
        start = time.monotonic()
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 -- a test's failure, whatever it is
            failed += 1
            print(f"FAIL {name}")
            print("     " + traceback.format_exc().strip().replace("\n", "\n     "))
        else:
            passed += 1
            print(f"ok   {name} ({time.monotonic() - start:.2f}s)")
        sys.stdout.flush()
    return passed, failed


class Child:
    """smtp521 started the way a super-server starts it, on one end of a
    socketpair (or of an accepted TCP connection); the test holds the other."""

    def __init__(self, binary, args, sock_kind="pair", stderr_is_socket=False, env=None):
        if sock_kind == "pair":
            self.client, server = socket.socketpair()
        else:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            self.client = socket.create_connection(listener.getsockname())
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
        self.rusage = None
        self.returncode = None
        self.stderr = b""

    def send(self, data):
        self.client.sendall(data)

    def read_until_eof(self, timeout=10):
        """Everything the server sends until it closes; the time it took."""
        self.client.settimeout(timeout)
        data = b""
        while True:
            try:
                chunk = self.client.recv(65536)
            except socket.timeout:
                raise AssertionError(f"no EOF within {timeout}s; got {data[:200]!r}")
            if not chunk:
                return data
            data += chunk

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


def fields(log_line):
    """key=value fields of a log line."""
    return dict(f.split("=", 1) for f in log_line.split(" ") if "=" in f)


def crlf(*lines):
    return b"".join(line.encode() + b"\r\n" for line in lines)
