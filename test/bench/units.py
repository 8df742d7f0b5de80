#!/usr/bin/env python3
"""make bench (BENCH=units): what each systemd sandbox option of
smtp521@.service costs per connection.  A report, not a test.

One private systemd (test/harness/with-systemd) knows one socket and one service
template per variant.  Sequential sessions (EHLO, MAIL, RCPT, QUIT: the
driver's tcp mode) go through each variant in turn; rounds interleave the
variants (the order rotates each round) and the median round is reported,
with the spread of the rounds.  CPU is cgroup v2 accounting (cpu.stat
usage_usec) of a cgroup that holds the whole with-systemd process tree:
systemd PID 1, the instance it forks and sets up, journald and smtp521.
The inetd-style path (systemd-socket-activate --inetd -a) is measured the
same way, in a cgroup of its own.  The client is outside both.

Kernel work deferred to kworker threads (freeing a network, IPC or user
namespace) is charged to no cgroup; the kworker column is the CPU that
all kworkers of the machine used per session, and includes other
programs' work: read it as an upper bound.

Environment: BENCH_UNIT_SESSIONS (sessions per variant and round, 60),
BENCH_UNIT_ROUNDS (5), BENCH_UNITS (a comma-separated subset of the
variant names).  Needs root and cgroup2.
"""
import json
import os
import pwd
import grp
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "harness"))
from harness import ROOT, Cgroup, Systemd, cgroup_mounts, free_port, talk, unit_dir  # noqa: E402

OUT = os.path.join(HERE, "out")
SESSIONS = int(os.environ.get("BENCH_UNIT_SESSIONS", "60"))
ROUNDS = int(os.environ.get("BENCH_UNIT_ROUNDS", "5"))
ONLY = [v for v in os.environ.get("BENCH_UNITS", "").split(",") if v]
SESSION_IN = (b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n"
              b"RCPT TO:<b@mx.test>\r\nQUIT\r\n")
# The user of the static-user variant: present only in the private
# systemd's mount namespace (a copy of /etc/passwd bound over the host's).
STATIC_USER = "smtp521-bench"

# The unit without a sandbox: what a connection costs under systemd at all.
BASE = ["StandardInput=socket", "StandardOutput=socket", "StandardError=journal",
        "SyslogFacility=mail", "SyslogIdentifier=smtp521"]

# Each family on its own, on top of BASE.  (name, what it is, lines)
FAMILIES = [
    ("limits", "RuntimeMaxSec=, MemoryMax=, TasksMax=, LimitNOFILE=",
     ["RuntimeMaxSec=330", "MemoryMax=16M", "TasksMax=2", "LimitNOFILE=16"]),
    ("privileges", "empty CapabilityBoundingSet= and AmbientCapabilities=, NoNewPrivileges=, UMask=, KeyringMode=",
     ["CapabilityBoundingSet=", "AmbientCapabilities=", "NoNewPrivileges=yes", "UMask=0777",
      "KeyringMode=private"]),
    ("user-static", f"User= of an existing system user ({STATIC_USER}), RemoveIPC=",
     [f"User={STATIC_USER}", "RemoveIPC=yes"]),
    ("user-dynamic", "DynamicUser=yes (implies ProtectSystem=strict, ProtectHome=read-only, PrivateTmp=, "
     "RemoveIPC=, NoNewPrivileges=, RestrictSUIDSGID=)",
     ["DynamicUser=yes", "User=smtp521"]),
    ("seccomp", "LockPersonality=, MemoryDenyWriteExecute=, RestrictNamespaces=, RestrictRealtime=, "
     "RestrictSUIDSGID=, RestrictAddressFamilies=none, ProtectClock=",
     ["LockPersonality=yes", "MemoryDenyWriteExecute=yes", "RestrictNamespaces=yes", "RestrictRealtime=yes",
      "RestrictSUIDSGID=yes", "RestrictAddressFamilies=none", "ProtectClock=yes"]),
    ("syscall-filter", "systemd's SystemCallFilter= (@system-service minus @privileged @resources), "
     "SystemCallArchitectures=native, SystemCallErrorNumber=",
     ["SystemCallArchitectures=native", "SystemCallFilter=@system-service",
      "SystemCallFilter=~@privileged @resources", "SystemCallErrorNumber=EPERM"]),
    ("devices", "DevicePolicy=closed (a device cgroup program)", ["DevicePolicy=closed"]),
    ("ip-deny", "IPAddressDeny=any (a cgroup BPF program)", ["IPAddressDeny=any"]),
    ("netns", "PrivateNetwork= (a network namespace)", ["PrivateNetwork=yes"]),
    ("ipc-uts", "PrivateIPC=, ProtectHostname= (IPC and UTS namespaces)",
     ["PrivateIPC=yes", "ProtectHostname=yes"]),
    ("mount-empty", "PrivateMounts= alone (a mount namespace with nothing in it changed)",
     ["PrivateMounts=yes"]),
    ("mount", "ProtectSystem=strict, ProtectHome=, PrivateTmp=, PrivateDevices=, PrivateMounts=, "
     "ProtectKernelTunables=, ProtectKernelModules=, ProtectKernelLogs=, ProtectControlGroups=, "
     "ProtectProc=invisible, ProcSubset=pid",
     ["ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "PrivateDevices=yes", "PrivateMounts=yes",
      "ProtectKernelTunables=yes", "ProtectKernelModules=yes", "ProtectKernelLogs=yes",
      "ProtectControlGroups=yes", "ProtectProc=invisible", "ProcSubset=pid"]),
    ("private-users", "PrivateUsers= (a user namespace)", ["PrivateUsers=yes"]),
]
FAMILY_NAMES = [f[0] for f in FAMILIES]


def family(*names):
    return [l for name, _, lines in FAMILIES if name in names for l in lines]


# Points of the frontier: cheap families together, with each choice of user.
CHEAP = family("privileges", "limits", "ip-deny", "devices")
LEAN_SECCOMP = ["RestrictAddressFamilies=none", "RestrictNamespaces=yes"]
MIXES = [
    ("mix-root", "privileges, limits, ip-deny, devices, RestrictAddressFamilies=none, RestrictNamespaces=; "
     "no User=", CHEAP + LEAN_SECCOMP),
    ("mix-root-seccomp", "privileges, limits, ip-deny, devices, seccomp; no netns, no User=",
     family("privileges", "limits", "ip-deny", "devices", "seccomp")),
    ("mix-static", "mix-root and user-static", CHEAP + LEAN_SECCOMP + family("user-static")),
    ("mix-dynamic", "mix-root and user-dynamic", CHEAP + LEAN_SECCOMP + family("user-dynamic")),
]

# Finer splits, measured only when named in BENCH_UNITS.
PROBES = [
    ("user-static-noipc", "User= of an existing system user, without RemoveIPC=", [f"User={STATIC_USER}"]),
    ("seccomp-arch", "the seccomp family and SystemCallArchitectures=native",
     ["LockPersonality=yes", "MemoryDenyWriteExecute=yes", "RestrictNamespaces=yes", "RestrictRealtime=yes",
      "RestrictSUIDSGID=yes", "RestrictAddressFamilies=none", "ProtectClock=yes", "SystemCallArchitectures=native"]),
    ("raf", "RestrictAddressFamilies=none alone", ["RestrictAddressFamilies=none"]),
    ("rns", "RestrictNamespaces=yes alone", ["RestrictNamespaces=yes"]),
    ("protectclock", "ProtectClock=yes alone", ["ProtectClock=yes"]),
]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------ cgroups

def kworker_ticks():
    """utime+stime (clock ticks) of every kworker thread of the machine."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if comm.startswith("kworker"):
            fields = stat[stat.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    return total


TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------ units

def read(path):
    with open(path) as f:
        return f.read()


def shipped_execstart():
    lines = [l for l in read(os.path.join(ROOT, "smtp521@.service")).splitlines() if l.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    return lines[0]


def variants():
    """(name, description, service text) of every systemd variant."""
    head = "[Unit]\nDescription=smtp521 bench %s %%i\n[Service]\n"
    base = [shipped_execstart()] + BASE
    out = [("no-sandbox", "ExecStart=, Standard*=, Syslog* only", head % "no-sandbox" + "\n".join(base) + "\n")]
    for name, what, lines in FAMILIES:
        out.append((name, what, head % name + "\n".join(base + lines) + "\n"))
    every = [l for name, _, lines in FAMILIES if name not in ("user-static", "mount-empty") for l in lines]
    out.append(("all-families", "every family above but user-static and mount-empty: the unit as it was",
                head % "all" + "\n".join(base + every) + "\n"))
    for name, what, lines in MIXES:
        out.append((name, what, head % name + "\n".join(base + lines) + "\n"))
    for name, what, lines in PROBES:
        if name in ONLY:
            out.append((name, what, head % name + "\n".join(base + lines) + "\n"))
    out.append(("shipped", "smtp521@.service as it is in the tree", read(os.path.join(ROOT, "smtp521@.service"))))
    return out


def exposure(path):
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", path],
                       capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
    return float(m.group(1)) if m else None


def write_units(unitdir, vs):
    """A socket and service smtp521-NAME for each variant, each socket on
    a port of its own, and the shipped slice; the ports by name."""
    ports = {name: free_port() for name, _, _ in vs}
    unit_dir(None, slice="smtp521.slice", variants=[(name, ports[name], None, lambda _, t=text: t)
                                                    for name, _, text in vs], into=unitdir)
    return ports


# ------------------------------------------------------------ super-servers

def private_etc(d):
    """A copy of /etc whose passwd and group know STATIC_USER.  The whole
    directory is bound over /etc: a file bound over /etc/passwd would
    vanish from the namespace as soon as the host replaced its passwd (any
    adduser does)."""
    uid = next(i for i in range(999, 100, -1) if not _exists(pwd.getpwuid, i) and not _exists(grp.getgrgid, i))
    subprocess.run(["cp", "-a", "/etc/.", d], check=True)
    for name, line in (("passwd", f"{STATIC_USER}:x:{uid}:{uid}:smtp521 bench:/nonexistent:/usr/sbin/nologin"),
                       ("group", f"{STATIC_USER}:x:{uid}:")):
        with open(os.path.join(d, name), "a") as f:
            f.write(line + "\n")


def _exists(fn, i):
    try:
        fn(i)
        return True
    except KeyError:
        return False


def private_systemd(unitdir, binary, cg, etc):
    """harness.Systemd inside our cgroup, with a private /etc that knows
    STATIC_USER (bound in a mount namespace of its own, which
    with-systemd's namespace inherits)."""
    bind = f'mount --bind "{etc}" /etc; exec "$@"'
    return Systemd(unitdir, binary, timeout=30, cgroup=cg,
                   prefix=["unshare", "--mount", "--propagation", "private", "sh", "-c", bind, "sh"])


class Inetd:
    """systemd-socket-activate --inetd -a in a cgroup of its own."""

    def __init__(self, binary, cg):
        self.port = free_port()
        self.cg = cg
        self.proc = subprocess.Popen(cg.join_argv() + ["systemd-socket-activate", "--inetd", "-a", "-l",
                                                       f"127.0.0.1:{self.port}", binary, "--log", "stderr"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


# ------------------------------------------------------------ measuring

def expected_reply(binary):
    """What the binary answers SESSION_IN on a pipe: every variant must
    answer the same over TCP."""
    return subprocess.run([binary, "--log", "stderr"], input=SESSION_IN, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, check=True, timeout=10).stdout


def driver(port, n):
    p = subprocess.run([os.path.join(OUT, "driver"), "tcp", str(n), str(port)], capture_output=True, text=True,
                       timeout=1200)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip())
    # The driver prints sessions/s first, then figures of its pipe mode.
    return float(p.stdout.split()[0])


def settle(cg, busy, timeout=20):
    """Wait until busy() is false and the cgroup's CPU use has stopped
    growing: systemd cleans up an instance after the client saw EOF."""
    deadline = time.monotonic() + timeout
    last = cg.usage_usec()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = cg.usage_usec()
        if not busy() and now - last < 200:
            return
        last = now
    log(f"units.py: {cg.v2} did not settle in {timeout} s")


def main():
    if os.geteuid() != 0:
        print("units.py: needs root (a private systemd, cgroups); skipped")
        return 0
    v2, named = cgroup_mounts()
    if v2 is None:
        print("units.py: no cgroup2 hierarchy; skipped")
        return 0
    ctrl = read(os.path.join(v2, "cgroup.controllers")).split()
    os.makedirs(OUT, exist_ok=True)
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-o", f"{OUT}/driver", f"{HERE}/driver.c"], check=True)
    subprocess.run(["make", "-s", "-C", ROOT, "smtp521"], check=True)
    binary = os.path.join(ROOT, "smtp521")

    vs = variants()
    if ONLY:
        vs = [v for v in vs if v[0] in ONLY or v[0] == "no-sandbox"]
    work = tempfile.mkdtemp(prefix="smtp521-units-")
    os.chmod(work, 0o755)
    unitdir = os.path.join(work, "units")
    etc = os.path.join(work, "etc")
    os.mkdir(unitdir)
    os.mkdir(etc)
    private_etc(etc)
    ports = write_units(unitdir, vs)
    expo = {name: exposure(os.path.join(unitdir, f"smtp521-{name}@.service")) for name, _, _ in vs}

    tag = f"smtp521-bench-{os.getpid()}"
    cg_sd, cg_inetd = Cgroup(tag), Cgroup(tag + "-inetd")
    sd = inetd = None
    results = {}
    failed = {}
    errors = {}
    try:
        sd = private_systemd(unitdir, binary, cg_sd, etc)
        sd.ctl("start", "systemd-journald.socket", "systemd-journald.service",
               *[f"smtp521-{name}.socket" for name, _, _ in vs])
        inetd = Inetd(binary, cg_inetd)
        ports["inetd"] = inetd.port
        time.sleep(0.5)

        want = expected_reply(binary)
        names = ["inetd"] + [name for name, _, _ in vs]
        for name in list(names):
            try:
                got, _ = talk(ports[name], SESSION_IN, timeout=10)
            except OSError as e:
                got = repr(e).encode()
            if got != want:
                status = "" if name == "inetd" else sd.ctl("status", f"smtp521-{name}@*", check=False).stdout
                failed[name] = f"reply {got[:80]!r}\n{status[-1500:]}"
                names.remove(name)
                log(f"units.py: variant {name} does not work:\n{failed[name]}")

        def busy_sd(name):
            return lambda: bool(cg_sd.instances(f"smtp521-{name}@"))

        def busy_inetd():
            return len(cg_inetd.procs()) > 1

        # Warm up: load every template, fault in the binary's pages.
        for name in names:
            driver(ports[name], 5)
        settle(cg_sd, lambda: bool(cg_sd.instances("smtp521-")))
        idle0, t0 = cg_sd.usage_usec(), time.monotonic()
        time.sleep(2)
        idle = (cg_sd.usage_usec() - idle0) / (time.monotonic() - t0)

        def measure(name, r):
            """CPU (usec), sessions/s and kworker usec per session, or None."""
            cg = cg_inetd if name == "inetd" else cg_sd
            busy = busy_inetd if name == "inetd" else busy_sd(name)
            settle(cg, busy)
            u0, k0, w0 = cg.usage_usec(), kworker_ticks(), time.monotonic()
            try:
                rate = driver(ports[name], SESSIONS)
            except RuntimeError as e:
                why = "" if name == "inetd" else sd.ctl("list-units", "--failed", "--no-legend", check=False).stdout
                log(f"units.py: {name} round {r + 1}: {e}; failed units: {why.strip() or 'none'}")
                if name != "inetd":
                    sd.ctl("reset-failed", check=False)
                errors[name] = errors.get(name, 0) + 1
                return None
            settle(cg, busy)
            u1, k1, w1 = cg.usage_usec(), kworker_ticks(), time.monotonic()
            # The settle time's idle CPU is not the variant's.
            cpu = (u1 - u0 - idle * (w1 - w0 - SESSIONS / rate)) / SESSIONS
            return cpu, rate, (k1 - k0) * TICK_US / SESSIONS

        # Paired: each variant right after a run of the unit without a
        # sandbox, and its ratio to that run.  The load of a shared machine
        # drifts within a round; it drifts little within a pair.
        others = [n for n in names if n != "no-sandbox"]
        for r in range(ROUNDS):
            order = others[r % len(others):] + others[:r % len(others)]
            for name in order:
                base = measure("no-sandbox", r)
                got = measure(name, r)
                if base:
                    results.setdefault("no-sandbox", []).append(base + (base[0],))
                if base and got:
                    results.setdefault(name, []).append(got + (base[0],))
            log(f"units.py: round {r + 1}/{ROUNDS} done")
    finally:
        if inetd:
            inetd.stop()
        if sd:
            sd.stop()
        cg_sd.remove()
        cg_inetd.remove()
        shutil.rmtree(work, ignore_errors=True)

    for name, n in errors.items():
        failed.setdefault(name, f"{n} of {ROUNDS} rounds had a session without its reply (not counted)")
    report(vs, results, expo, failed, v2, named, ctrl, idle)
    return 0


def report(vs, results, expo, failed, v2, named, ctrl, idle):
    def med(name, i):
        return statistics.median(x[i] for x in results[name])

    def ratios(name):
        return [x[0] / x[3] for x in results[name]]

    def spread(values):
        m = statistics.median(values)
        return max(m - min(values), max(values) - m) / m * 100 if m else 0

    desc = {"inetd": "systemd-socket-activate --inetd -a: a fork and exec, nothing else"}
    desc.update({name: what for name, what, _ in vs})
    names = ["inetd"] + [name for name, _, _ in vs]
    floor = statistics.median(ratios("inetd")) if "inetd" in results else None
    lines = []
    lines.append(f"{SESSIONS} sequential sessions (EHLO, MAIL, RCPT, QUIT) per run; each variant's run follows "
                 f"one of the unit without a sandbox, {ROUNDS} rounds, medians.  CPU from {v2} cpu.stat usage_usec"
                 f" ({'cpu controller enabled there' if 'cpu' in ctrl else 'core accounting: the cpu controller is on cgroup v1'}"
                 f"{', systemd in hybrid mode' if named else ''}); idle tree {idle / 1000:.2f} ms/s, subtracted\n")
    lines.append("| variant | CPU ms/session | × no-sandbox | ± % | × inetd | sessions/s | kworker ms/session "
                 "| exposure |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name in names:
        if name not in results:
            lines.append(f"| {name} | failed | | | | | | {expo.get(name, '')} |")
            continue
        ratio = statistics.median(ratios(name))
        lines.append(f"| {name} | {med(name, 0) / 1000:.2f} | {ratio:.2f} | {spread(ratios(name)):.0f} | "
                     f"{ratio / floor:.1f} | {med(name, 1):.0f} | {med(name, 2) / 1000:.2f} | "
                     f"{'' if name == 'inetd' else expo.get(name)} |")
    lines.append("\n× no-sandbox: median of the ratios to the run just before; ± %: the largest distance of a "
                 "ratio from that median, in % of it.  × inetd: the ratio of the two medians.")
    lines.append("exposure: systemd-analyze security --offline=true (inetd: none applies).\n")
    for name in names:
        lines.append(f"- {name}: {desc[name]}")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(OUT, "units.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(OUT, "units.json"), "w") as f:
        json.dump({"sessions": SESSIONS, "rounds": ROUNDS, "idle_usec_per_s": idle, "exposure": expo,
                   "failed": failed,
                   "rounds_data": {k: [{"cpu_usec": c, "rate": r, "kworker_usec": k_, "base_cpu_usec": b}
                                       for c, r, k_, b in v]
                                   for k, v in results.items()}}, f, indent=1)
    for name, why in failed.items():
        print(f"\nvariant {name} failed: {why}")


if __name__ == "__main__":
    sys.exit(main())
