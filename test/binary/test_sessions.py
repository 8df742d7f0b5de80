"""Scripted sessions: each file under test/sessions/ is piped through the real
binary and its output compared byte for byte.

File format, one directive a line:
    # comment
    args: -H mx.test ...     the command line (default: -H mx.test)
    C: text                  a client line, sent with CRLF
    L: text                  a client line, sent with a bare LF
    P: text                  client bytes with no line end
    S: text                  a reply line expected, CRLF added
    log: key=value ...       fields the log line must have
    exit: N                  expected exit status (default 0)
In C/L/P/S text, \\xHH is a byte and \\\\ a backslash.
"""
import glob
import os
import re
import shlex
import subprocess

import pytest

from harness import TEST, fields


def unescape(text):
    return re.sub(rb"\\(x[0-9a-fA-F]{2}|\\)",
                  lambda m: b"\\" if m.group(1) == b"\\" else bytes([int(m.group(1)[1:], 16)]),
                  text.encode("latin-1"))


def parse(path):
    script = {"args": ["-H", "mx.test"], "input": b"", "output": b"", "log": {}, "exit": 0}
    with open(path, encoding="latin-1") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition(": ")
            if key == "args":
                script["args"] = shlex.split(value)
            elif key == "C":
                script["input"] += unescape(value) + b"\r\n"
            elif key == "L":
                script["input"] += unescape(value) + b"\n"
            elif key == "P":
                script["input"] += unescape(value)
            elif key == "S":
                script["output"] += unescape(value) + b"\r\n"
            elif key == "log":
                script["log"] = fields(value)
            elif key == "exit":
                script["exit"] = int(value)
            else:
                raise ValueError(f"{path}: unknown directive {line!r}")
    return script


SESSIONS = sorted(glob.glob(os.path.join(TEST, "sessions", "*.session")))


@pytest.mark.parametrize("path", SESSIONS, ids=[os.path.basename(p)[:-len(".session")] for p in SESSIONS])
def test_session(binary, path):
    s = parse(path)
    p = subprocess.run([binary, "-l", "stderr"] + s["args"], input=s["input"],
                       capture_output=True, timeout=20, env={"PATH": "/usr/bin:/bin"})
    assert p.stdout == s["output"], f"output\n got  {p.stdout!r}\n want {s['output']!r}\n stderr {p.stderr!r}"
    assert p.returncode == s["exit"], f"exit {p.returncode}, want {s['exit']}; stderr {p.stderr!r}"
    if s["log"]:
        log = p.stderr.decode("ascii").rstrip("\n")
        assert "\n" not in log, f"one log line expected: {log!r}"
        got = fields(log)
        for k, v in s["log"].items():
            assert got.get(k) == v, f"log {k}={got.get(k)!r}, want {v!r} in {log!r}"


def test_sessions_found():
    assert SESSIONS, "no test/sessions/*.session"
