#!/usr/bin/env python3
"""make bench: the per-session cost of smtp521 as ratios to a floor measured
in the same run.  A report, not a test: nothing here passes or fails.

Programs: a minimal static C program holding the same conversation (the
floor), smtp521 as `make` builds it (static-pie), smtp521 linked
dynamically, and rblsmtpd (ucspi-tcp, refusing every session), where
installed.  Each in pipe mode (spawn to exit, one per session) and over TCP
through systemd-socket-activate --inetd -a; rounds interleave the programs,
and the median round is reported.
"""
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # test/
from harness import TEXT, free_port  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "test", "bench", "out")
SESSIONS = int(os.environ.get("BENCH_SESSIONS", "2000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))


def build():
    os.makedirs(OUT, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-static", "-o", f"{OUT}/baseline", f"{HERE}/baseline.c"], check=True)
    subprocess.run([cc, "-O2", "-o", f"{OUT}/driver", f"{HERE}/driver.c"], check=True)
    subprocess.run(["make", "-s", "-C", ROOT, "smtp521"], check=True)
    subprocess.run(["make", "-s", "-C", ROOT, "smtp521-dynamic"], check=True)


def programs():
    args = ["-H", "mx.test", "-l", "none"]
    progs = [("static C floor", [f"{OUT}/baseline"], {}),
             ("smtp521 (make: static-pie)", [f"{ROOT}/smtp521"] + args, {}),
             ("smtp521 dynamic", [f"{ROOT}/smtp521-dynamic"] + args, {})]
    rbl = shutil.which("rblsmtpd")
    if rbl:
        # RBLSMTPD starting with '-': refuse every session with a 553.
        progs.append(("rblsmtpd", [rbl, "/bin/true"], {"RBLSMTPD": "-" + TEXT.decode(),
                                                       "TCPREMOTEIP": "127.0.0.1"}))
    return progs


def driver(mode, n, target, env):
    p = subprocess.run([f"{OUT}/driver", mode, str(n)] + target, capture_output=True, text=True,
                       env=dict(os.environ, **env), timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"driver {mode} {target[0]}: {p.stderr.strip()}")
    rate, p50, p99, rss = p.stdout.split()
    return float(rate), float(p50), float(p99), int(rss)


def tcp(argv, env, n):
    port = free_port()
    # systemd-socket-activate passes on only the environment given with -E.
    setenv = [a for k, v in env.items() for a in ("-E", f"{k}={v}")]
    srv = subprocess.Popen(["systemd-socket-activate", "--inetd", "-a", "-l", f"127.0.0.1:{port}"] + setenv + argv,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(0.2)
        return driver("tcp", str(n), [str(port)], {})
    finally:
        srv.terminate()
        srv.wait()


def main():
    build()
    progs = programs()
    results = {}
    for r in range(ROUNDS):
        for name, argv, env in progs:
            results.setdefault((name, "pipe"), []).append(driver("pipe", SESSIONS, argv, env))
            results.setdefault((name, "tcp"), []).append(tcp(argv, env, SESSIONS // 2))
    rss = {name: driver("rss", 20, argv, env)[3] for name, argv, env in progs}

    def median(key, i):
        return statistics.median(v[i] for v in results[key])

    print(f"{SESSIONS} sessions a run (tcp: {SESSIONS // 2}), median of {ROUNDS} rounds; "
          "session: EHLO, MAIL, RCPT, QUIT pipelined\n")
    print("| program | mode | sessions/s | p50 µs | p99 µs | peak RSS KiB | p50 / floor | sessions/s / floor |")
    print("|---|---|---|---|---|---|---|---|")
    floor = progs[0][0]
    for mode in ("pipe", "tcp"):
        for name, _, _ in progs:
            key = (name, mode)
            ratio = median(key, 1) / median((floor, mode), 1)
            rate_ratio = median(key, 0) / median((floor, mode), 0)
            print(f"| {name} | {mode} | {median(key, 0):.0f} | {median(key, 1):.0f} | {median(key, 2):.0f} | "
                  f"{rss[name]} | {ratio:.2f}x | {rate_ratio:.2f}x |")
    print("\npeak RSS: VmHWM of one session after its replies, before QUIT (max of 20 sessions)")


if __name__ == "__main__":
    sys.exit(main())
