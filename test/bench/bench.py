#!/usr/bin/env python3
"""make bench: the per-session cost of smtp521 as ratios to a floor measured
in the same run.  A report, not a test: nothing here passes or fails.

Programs: a minimal C program holding the same conversation (the floor,
baseline.c), linked statically and dynamically, each also under smtp521's
own seccomp filter (floor-filter.cpp calls smtp521's confine() before it);
smtp521 linked dynamically (what `make` and the Debian package build) and
as a static PIE where glibc can (LINKMODE=-static-pie), both with Debian's
build flags (dpkg-buildflags, hardening=+all) as the package has them; and
rblsmtpd (ucspi-tcp, refusing every session), where installed.  Every
dynamic program is linked with the same flags.  Each in pipe mode (spawn to
exit, one per session) and over TCP through systemd-socket-activate
--inetd -a; rounds interleave the programs, and the median round is
reported.  The link's cost, the ratios that matter, closes the report.
"""
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "harness"))
from harness import ROOT, TEXT, free_port  # noqa: E402

OUT = os.path.join(HERE, "out")
SESSIONS = int(os.environ.get("BENCH_SESSIONS", "1000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
FLOOR = "static C floor"
DYN_FLOOR_FILTER = "dynamic C floor + filter"
DEBIAN = "smtp521 dynamic (make, Debian)"
STATIC_PIE = "smtp521 static-pie"


def debian_flags():
    """CXXFLAGS, CPPFLAGS, LDFLAGS as debian/rules gets them; empty without
    dpkg-dev."""
    if not shutil.which("dpkg-buildflags"):
        return {}
    env = dict(os.environ, DEB_BUILD_MAINT_OPTIONS="hardening=+all")
    return {v: subprocess.run(["dpkg-buildflags", "--get", v], env=env, capture_output=True, text=True,
                              check=True).stdout.strip() for v in ("CXXFLAGS", "CPPFLAGS", "LDFLAGS")}


def build():
    os.makedirs(OUT, exist_ok=True)
    cc, cxx = os.environ.get("CC", "cc"), os.environ.get("CXX", "g++")
    flags = debian_flags()
    ld = ["-pie", "-Wl,-z,relro", "-Wl,-z,now"] + flags.get("LDFLAGS", "").split()
    subprocess.run([cc, "-O2", "-o", f"{OUT}/driver", f"{HERE}/driver.c"], check=True)
    subprocess.run([cc, "-O2", "-static", "-o", f"{OUT}/floor-static", f"{HERE}/baseline.c"], check=True)
    subprocess.run([cc, "-O2", "-fPIE", "-o", f"{OUT}/floor-dynamic", f"{HERE}/baseline.c"] + ld, check=True)
    subprocess.run([cc, "-O2", "-fPIE", "-Dmain=floor_main", "-c", "-o", f"{OUT}/floor.o", f"{HERE}/baseline.c"],
                   check=True)
    filtered = [cxx, "-std=c++17", "-O2", "-fPIE", "-DSMTP521_VERSION=\"bench\"", f"{HERE}/floor-filter.cpp",
                f"{OUT}/floor.o"]
    subprocess.run(filtered + ["-static", "-o", f"{OUT}/floor-static-filter"], check=True)
    subprocess.run(filtered + ld + ["-o", f"{OUT}/floor-dynamic-filter"], check=True)
    # Rebuilt each run: the tree's copies may have other flags.
    subprocess.run(["make", "-s", "-B", "-C", ROOT, "smtp521-dynamic", "smtp521-static-pie"]
                   + [f"{k}={v}" for k, v in flags.items()], check=True)


def programs():
    args = ["-H", "mx.test", "-l", "none"]
    progs = [(FLOOR, [f"{OUT}/floor-static"], {}),
             ("static C floor + filter", [f"{OUT}/floor-static-filter"], {}),
             ("dynamic C floor", [f"{OUT}/floor-dynamic"], {}),
             (DYN_FLOOR_FILTER, [f"{OUT}/floor-dynamic-filter"], {}),
             (STATIC_PIE, [f"{ROOT}/smtp521-static-pie"] + args, {}),
             (DEBIAN, [f"{ROOT}/smtp521-dynamic"] + args, {})]
    rbl = shutil.which("rblsmtpd")
    if rbl:
        # RBLSMTPD starting with '-': refuse every session with a 553.
        progs.append(("rblsmtpd", [rbl, "/bin/true"], {"RBLSMTPD": "-" + TEXT.decode(),
                                                       "TCPREMOTEIP": "127.0.0.1"}))
    return progs


def elf_facts(path):
    """What the loader maps (the PT_LOAD segments' memory size, bytes), the
    relocations it or the static start code applies (readelf -r), and the
    NEEDED libraries."""
    if not shutil.which("readelf"):
        return None, None, None
    heads = subprocess.run(["readelf", "-lW", path], capture_output=True, text=True).stdout
    loaded = sum(int(line.split()[5], 16) for line in heads.splitlines() if line.split()[:1] == ["LOAD"])
    rel = subprocess.run(["readelf", "-rW", path], capture_output=True, text=True).stdout
    relocs = sum(1 for line in rel.splitlines() if " R_" in line and line[:1] in "0123456789abcdef")
    dyn = subprocess.run(["readelf", "-dW", path], capture_output=True, text=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dyn.splitlines() if "(NEEDED)" in line]
    return loaded, relocs, needed


def driver(mode, n, target, env):
    p = subprocess.run([f"{OUT}/driver", mode, str(n)] + target, capture_output=True, text=True,
                       env=dict(os.environ, **env), timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"driver {mode} {target[0]}: {p.stderr.strip()}")
    rate, p50, p99, rss, cpu, faults = p.stdout.split()
    return float(rate), float(p50), float(p99), int(rss), float(cpu), float(faults)


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
    for mode in ("pipe", "tcp"):
        for name, _, _ in progs:
            key = (name, mode)
            ratio = median(key, 1) / median((FLOOR, mode), 1)
            rate_ratio = median(key, 0) / median((FLOOR, mode), 0)
            print(f"| {name} | {mode} | {median(key, 0):.0f} | {median(key, 1):.0f} | {median(key, 2):.0f} | "
                  f"{rss[name]} | {ratio:.2f}x | {rate_ratio:.2f}x |")
    print("\npeak RSS: VmHWM of one session after its replies, before QUIT (max of 20 sessions)")

    # The link: each build's p50 and CPU (pipe) against the dynamic floor
    # under the same filter, and what may explain the rest.
    print(f"\nThe link (pipe; p50 and the mean CPU time of the program per session, as ratios to the "
          f"{DYN_FLOOR_FILTER}, same run):\n")
    print("| program | p50 µs | p50 / dyn. floor + filter | CPU µs | CPU / dyn. floor + filter "
          "| page faults | mapped bytes | relocations | NEEDED |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, argv, _ in progs:
        if name == "rblsmtpd":
            continue
        loaded, relocs, needed = elf_facts(argv[0])
        print(f"| {name} | {median((name, 'pipe'), 1):.0f} | "
              f"{median((name, 'pipe'), 1) / median((DYN_FLOOR_FILTER, 'pipe'), 1):.3f}x | "
              f"{median((name, 'pipe'), 4):.0f} | "
              f"{median((name, 'pipe'), 4) / median((DYN_FLOOR_FILTER, 'pipe'), 4):.3f}x | "
              f"{median((name, 'pipe'), 5):.0f} | {loaded} | {relocs} | {' '.join(needed or []) or '-'} |")

    def cpu(name):
        return median((name, "pipe"), 4)

    def faults(name):
        return median((name, "pipe"), 5)
    print(f"\nCPU per session: dynamic linking costs the floor + filter "
          f"{cpu(DYN_FLOOR_FILTER) - cpu('static C floor + filter'):.0f} µs and "
          f"{faults(DYN_FLOOR_FILTER) - faults('static C floor + filter'):.0f} page faults, smtp521 "
          f"{cpu(DEBIAN) - cpu(STATIC_PIE):.0f} µs and {faults(DEBIAN) - faults(STATIC_PIE):.0f} page faults "
          f"(dynamic - static); smtp521's own start (options, /proc/self/cgroup for --stress-at, signals, the "
          f"alarm) costs {cpu(STATIC_PIE) - cpu('static C floor + filter'):.0f} µs and "
          f"{faults(STATIC_PIE) - faults('static C floor + filter'):.0f} page faults (static-pie - static floor + "
          f"filter). The floor + filter holds all of smtp521.cpp: the same mapped bytes and relocations.")


if __name__ == "__main__":
    sys.exit(main())
