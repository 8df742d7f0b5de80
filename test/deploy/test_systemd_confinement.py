"""Containment of the systemd units under a private systemd
(test/harness/with-systemd): the shipped unit serves where user namespaces cannot
be created, with and without journald; a failing instance is visible to
the administrator; smtp521.slice holds a flood of connections to its
CPUQuota=, which the same flood exceeds without it; /etc/default/smtp521
changes the options without editing ExecStart=; a socket drop-in binds
one address."""
import asyncio
import os
import re
import resource
import socket
import subprocess
import sys
import time

import pytest

from harness import (BYE, BYE_521, GREET, GREET_521, HERE, ROOT, SESSION_IN, SESSION_OUT, TEST_SLICE, TEXT,
                     default_name, free_port, talk, unit_dir, wait_for)
NAME = default_name()
OUT = SESSION_OUT.replace(b"mx.test", NAME)


# Every test here boots a private systemd; one builds a wrapper.
pytestmark = pytest.mark.needs("systemd", "tool:cc", "tool:nsenter")


@pytest.fixture(scope="module")
def no_userns(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("no-userns") / "no-userns")
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", exe,
                    os.path.join(HERE, "no-userns.c")], check=True)
    # It really refuses a user namespace, and nothing else.
    p = subprocess.run([exe, "unshare", "--user", "true"], capture_output=True, text=True)
    assert p.returncode != 0 and "Operation not permitted" in p.stderr, p
    subprocess.run([exe, "unshare", "--mount", "--propagation", "unchanged", "true"], check=True)
    return exe


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


# What a CPU-bound process outside the slice keeps of its idle throughput
# while a flood runs is printed, not asserted: measured on 2 shared CPUs in
# six runs of this test, 36-59% with the slice and 40-57% without it.  The
# flood here is bound by its own client and by PID 1, which no slice
# holds, so the probe cannot tell the two apart.  What the slice does is
# asserted, against the run without it: its sessions got at most
# CPUQuota= (0.245-0.249 CPU-s a second) where the same flood without it
# took more (0.30-0.34; the less, the busier the host).


def units(port, variants=()):
    """harness.unit_dir with the slice named TEST_SLICE; for each (suffix, port,
    edit) in `variants` a copy of the socket and service named
    smtp521-SUFFIX, the service text passed through edit()."""
    return unit_dir(port, slice=TEST_SLICE, variants=[(suffix, p, None, edit) for suffix, p, edit in variants])


def refused(port):
    """The connection is accepted and closed without a byte (the instance
    failed)."""
    try:
        out, _ = talk(port, b"QUIT\r\n", timeout=30)
    except ConnectionResetError:
        out = b""
    return out == b""


# ------------------------------------------------------------ user namespaces

@pytest.mark.parametrize("journald", [True, False], ids=["journald", "no-journald"])
def test_serves_with_user_namespaces_blocked(systemd, no_userns, journald):
    # Under a filter that refuses CLONE_NEWUSER (a container runtime's
    # default), the shipped unit serves; a copy with PrivateUsers=yes, the
    # unit as it was, fails every instance while its socket stays active.
    port, old = free_port(), free_port()
    unitdir = units(port, [("old", old, lambda s: s.replace("\nNoNewPrivileges=yes\n",
                                                            "\nNoNewPrivileges=yes\nPrivateUsers=yes\n"))])
    sd = systemd(unitdir, wrapper=no_userns)
    if journald:
        sd.ctl("start", "systemd-journald.socket", "systemd-journald.service")
        # PID 1 logs to its console (test/harness/with-systemd); on a host, to the journal.
        sd.ctl("set-log-target", "journal", tool="systemd-analyze")
    sd.ctl("start", "smtp521.socket", "smtp521-old.socket")
    locals_ = []
    for _ in range(3):
        out, local = talk(port, SESSION_IN)
        assert out == OUT, out
        locals_.append(local)
    # Each instance is gone soon after its session ended, and has not failed.
    wait_for(lambda: not sd.ctl("list-units", "--plain", "--no-legend", "smtp521@*").stdout.strip())
    assert sd.failed("smtp521@*") == [], sd.failed()
    if journald:
        lines = [e["MESSAGE"] for e in wait_for(lambda: (lambda j: len(j) >= 3 and j)(sd.journal("-t", "smtp521")))]
        assert len(lines) == 3 and all(f"peer=127.0.0.1:{p} end=quit" in m for m, p in zip(lines, locals_)), lines
    else:
        # No journal to log to: systemd gives the instance /dev/null as
        # stderr (the log line is lost), and the session is unaffected.
        assert not os.path.exists(sd.path("/run/systemd/journal/stdout"))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            assert s.recv(100).startswith(b"220 ")
            ns = os.readlink(f"/proc/{sd.pid}/ns/pid")
            stderr = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if os.readlink(f"/proc/{pid}/ns/pid") == ns and pid != str(sd.pid) and \
                            os.readlink(f"/proc/{pid}/exe").endswith("/smtp521"):
                        stderr.append(os.readlink(f"/proc/{pid}/fd/2"))
                except OSError:
                    pass
            assert stderr == ["/dev/null"], stderr

    # The old unit: connections are accepted and closed unanswered.
    assert refused(old)
    # systemd records the failure soon after the instance died.
    failed = wait_for(lambda: sd.failed("smtp521-old@*"))
    assert len(failed) == 1 and failed[0].startswith("smtp521-old@"), failed
    # What the administrator sees: the socket is fine, the system is not.
    status = sd.ctl("status", "smtp521-old.socket", check=False).stdout
    assert "active (listening)" in status, status
    assert sd.ctl("is-system-running", check=False).stdout.strip() == "degraded"
    instance = sd.ctl("status", failed[0], check=False).stdout
    assert "status=217/USER" in instance, instance
    print(f"\n$ systemctl --failed\n{sd.ctl('--failed', check=False).stdout}"
          f"$ systemctl status smtp521-old.socket\n{status}\n$ systemctl status {failed[0]}\n{instance}")
    if journald:
        # The journal has the failure (the reason, 217/USER, is asserted
        # above).  The instance's own "Failed at step USER spawning" line
        # comes too on an idle host, but systemd 257 with every core busy
        # was seen to lose it, so it is printed, not required.
        warnings = lambda: sd.ctl("-u", failed[0], "-p", "warning", "-o", "cat", tool="journalctl").stdout  # noqa: E731
        log = wait_for(lambda: (lambda text: text if "Failed with result 'exit-code'" in text else "")(warnings()))
        print(f"$ journalctl -u {failed[0]} -p warning\n{log or warnings()}")
        assert log, warnings()
    assert sd.state("smtp521-old.socket") == "active"


# ------------------------------------------------------------ the slice under a flood

PROBE = """import sys, time
n, end = 0, time.perf_counter() + float(sys.argv[1])
while time.perf_counter() < end:
    n += 1
print(n)
"""


def probe(seconds):
    """A CPU-bound loop per CPU, each its own process outside the private
    systemd; returns a function giving their iterations per second."""
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, str(seconds)], stdout=subprocess.PIPE, text=True)
             for _ in range(os.cpu_count() or 1)]
    return lambda: sum(int(p.communicate(timeout=seconds + 30)[0]) for p in procs) / seconds


def idle(seconds=2):
    return probe(seconds)()


async def session(port, source, tally, hold=None):
    """One connection from `source`: a whole session (after `hold`, an
    event, if given: the session is held open after its greeting)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 30)
    except (OSError, asyncio.TimeoutError):
        tally["not connected"] += 1
        return
    out = b""
    try:
        if hold:
            out = await asyncio.wait_for(reader.readline(), 120)
            await hold.wait()
        writer.write(SESSION_IN)
        while chunk := await asyncio.wait_for(reader.read(65536), 120):
            out += chunk
    except (OSError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()
    # Refused by MaxConnections= (closed unanswered) is no session; a
    # session that started must have ended with its whole reply.
    tally["whole" if out == OUT else "no session" if out == b"" else "cut"] += 1


async def flood(port, seconds, workers, holders, quiet):
    """`workers` clients, each from its own loopback address (past
    MaxConnectionsPerSource=), doing whole sessions back to back for
    `seconds`, and `holders` sessions held open meanwhile.  quiet() is
    called with the holders still open, once the workers are done."""
    tally = dict.fromkeys(("whole", "no session", "cut", "not connected"), 0)
    end = time.monotonic() + seconds
    release = asyncio.Event()

    async def worker(i):
        while time.monotonic() < end:
            await session(port, f"127.3.{i // 250}.{i % 250 + 1}", tally)

    held = [asyncio.create_task(session(port, f"127.4.{i // 250}.{i % 250 + 1}", tally, release))
            for i in range(holders)]
    await asyncio.gather(*(worker(i) for i in range(workers)))
    await asyncio.sleep(1)
    result = quiet()
    release.set()
    await asyncio.gather(*held)
    return tally, result


def memory(sd, unit):
    return int(sd.ctl("show", "-p", "MemoryCurrent", "--value", unit).stdout.strip())


def bandwidth_slice():
    """Seconds of runtime a CPU takes from a cgroup's quota at a time."""
    try:
        with open("/proc/sys/kernel/sched_cfs_bandwidth_slice_us") as f:
            return int(f.read()) / 1e6
    except OSError:
        return 0.005  # the kernel's default


def cpu(sd, unit):
    """CPU seconds used so far by `unit` (its cgroup), by the private
    systemd's PID 1, whose work per connection no slice holds, and the
    number of 100 ms periods in which the kernel throttled `unit` (NaN
    where cgroup v2 does not count them)."""
    stat = sd.cpu_stat(unit)
    with open(f"/proc/{sd.pid}/stat") as f:
        ticks = f.read().rsplit(")", 1)[1].split()
    pid1 = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
    if stat is None:
        return float("nan"), pid1, float("nan")
    # No nr_throttled where the cpu controller is cgroup v1's (hybrid layout).
    return stat.get("usage_usec", 0) / 1e6, pid1, stat.get("nr_throttled", 0 if not stat else float("nan"))


@pytest.mark.needs("cpu-quota")
def test_slice_holds_a_flood_to_its_cpu_quota(systemd):
    # The same flood twice: through the shipped units, and through a copy
    # of them without Slice= (so in system.slice, unlimited).  Meanwhile a
    # CPU-bound probe outside runs on every CPU; its throughput is compared
    # to an idle run of it just before and just after each flood.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    port, open_port = free_port(), free_port()
    sd = systemd(units(port, [("open", open_port, lambda s: re.sub(r"\nSlice=\S+\n", "\n", s))]))
    sd.ctl("start", "systemd-journald.socket", "systemd-journald.service", "smtp521.socket", "smtp521-open.socket")
    limits = {k: sd.ctl("show", "-p", k, "--value", TEST_SLICE).stdout.strip()
              for k in ("CPUQuotaPerSecUSec", "MemoryMax", "TasksMax")}
    seconds, workers, holders = 8, 48, 32
    idles, kept, rate_of = [idle()], {}, {}
    for name, p, unit in (("slice", port, TEST_SLICE), ("no slice", open_port, "system-smtp521\\x2dopen.slice")):
        loop = asyncio.new_event_loop()
        started, cpu_before = time.monotonic(), cpu(sd, unit)
        try:
            task = loop.create_task(flood(p, seconds, workers, holders, lambda: memory(sd, unit)))
            loop.run_until_complete(asyncio.sleep(1))
            during = probe(seconds - 2)
            loop.run_until_complete(asyncio.sleep(seconds - 2))
            rate = during()
            tally, mem = loop.run_until_complete(task)
            took = time.monotonic() - started
            used = [b - a for a, b in zip(cpu_before, cpu(sd, unit))]
        finally:
            loop.close()
        idles.append(idle())
        kept[name] = rate / max(idles[-2:])
        rate_of[name] = used[0] / took  # CPU seconds a second, of the sessions
        print(f"\n{name}: probe {rate:.0f}/s, {100 * kept[name]:.0f}% of idle {max(idles[-2:]):.0f}/s;"
              f" connections {tally} in {took:.1f} s; {mem / holders / 1024:.0f} KiB a held session;"
              f" CPU a session: {1000 * used[0] / tally['whole']:.1f} ms in {unit},"
              f" {1000 * used[1] / tally['whole']:.1f} ms in PID 1")
        assert tally["cut"] == 0 and tally["not connected"] == 0 and tally["whole"] > holders, tally
        assert sd.state("smtp521.socket") == "active" and sd.state("smtp521-open.socket") == "active"
        if name == "slice":
            # MaxConnections= held sessions fit in MemoryMax=.
            slots = int(sd.ctl("show", "-p", "MaxConnections", "--value", "smtp521.socket").stdout)
            assert mem / holders * slots < int(limits["MemoryMax"]), (mem, slots, limits)
            # The kernel held the sessions to CPUQuota=: it throttled the
            # slice, and they used no more CPU than the quota grants plus
            # what each CPU may run past it in a 100 ms period: the runtime
            # slice it draws from the slice's pool ahead of use
            # (sched_cfs_bandwidth_slice_us, Documentation/scheduler/
            # sched-bwc.rst), and a tick before the throttle takes.
            assert used[0] == used[0], "no cgroup v2 cpu.stat for the slice"
            quota = int(limits["CPUQuotaPerSecUSec"].removesuffix("ms")) / 1000
            overrun = os.cpu_count() * (bandwidth_slice() + 0.004) * 10
            print(f"slice used {used[0]:.2f} s of CPU in {took:.1f} s, quota {quota * took:.2f} s"
                  f" (+{overrun * took:.2f} s overrun at most), throttled in {used[2]} periods")
            if used[2] == used[2]:
                assert used[2] > 0, ("the kernel never throttled the slice", used)
            assert used[0] <= (quota + overrun) * took, (used, quota, overrun, took)
    print(f"slice {limits}; idle probe runs {[round(i) for i in idles]}")
    assert sd.failed() == [], sd.failed()
    # The slice is what held them: without it the same flood took more,
    # more than the quota too (else this run could show nothing).
    print(f"sessions' CPU seconds a second: {rate_of}")
    quota = int(limits["CPUQuotaPerSecUSec"].removesuffix("ms")) / 1000
    assert rate_of["no slice"] > quota, (rate_of, quota)
    assert rate_of["slice"] < rate_of["no slice"], (rate_of, kept)


# ------------------------------------------------------------ /etc/default/smtp521

def test_environment_file_sets_options(systemd):
    port = free_port()
    sd = systemd(units(port))
    sd.ctl("start", "systemd-journald.socket", "systemd-journald.service", "smtp521.socket")
    # No /etc/default/smtp521: the `-` makes a missing file no error.
    out, _ = talk(port, SESSION_IN)
    assert out == OUT, out
    # Read at every start of an instance: no daemon-reload needed.
    sd.write("/etc/default/smtp521", 'SMTP521_OPTS="-H envfile.test -r greeting"\n')
    out, _ = talk(port, b"QUIT\r\n")
    assert out == (GREET_521 + BYE_521).replace(b"mx.test", b"envfile.test"), out
    # An unquoted $VAR in ExecStart= is split at whitespace, honouring
    # quotes inside the value: quoted, -m's text is one argument; bare, its
    # words become separate arguments, and smtp521 refuses the stray ones
    # (a usage error, exit 64).
    sd.write("/etc/default/smtp521", "SMTP521_OPTS=\"-H envfile.test -m 'no mail here'\"\n")
    out, _ = talk(port, b"QUIT\r\n")
    assert out == (GREET + BYE).replace(b"mx.test", b"envfile.test").replace(TEXT, b"no mail here"), out
    sd.write("/etc/default/smtp521", 'SMTP521_OPTS="-m no mail here"\n')
    assert refused(port)
    failed = sd.failed("smtp521@*")
    assert len(failed) == 1 and "status=64" in sd.ctl("status", failed[0], check=False).stdout, failed
    # The socket checks the options before it listens (ExecStartPre=, with
    # --check): restarted, it fails at once and says why, and port 25 is
    # closed rather than answered by sessions that all exit 64.  What the
    # check said is found by its identifier: journald ties a line to the
    # unit (_SYSTEMD_UNIT=, which -u and systemctl status read) only if it
    # finds the process still alive, and the check ends at once (1 line in
    # 40 was untied, systemd 252).
    restart = sd.ctl("restart", "smtp521.socket", check=False)
    assert restart.returncode != 0 and sd.state("smtp521.socket") == "failed", restart
    said = lambda: [e["MESSAGE"] for e in sd.journal("-t", "smtp521-check") if "MESSAGE" in e]  # noqa: E731
    assert wait_for(lambda: any("unexpected argument 'mail'" in m for m in said())), said()
    status = sd.ctl("status", "smtp521.socket", check=False).stdout
    assert "status=64" in status, status
    print(f"\n$ systemctl status smtp521.socket  # with a bad /etc/default/smtp521\n{status}")
    with pytest.raises(ConnectionRefusedError):
        talk(port, b"QUIT\r\n")
    # Fixed, it starts again, and its check's summary is in its journal.
    os.unlink(sd.path("/etc/default/smtp521"))
    sd.ctl("reset-failed")
    sd.ctl("start", "smtp521.socket")
    out, _ = talk(port, b"QUIT\r\n")
    assert out == (GREET + BYE).replace(b"mx.test", NAME), out
    assert wait_for(lambda: any(m.startswith(f"mode=rcpt hostname={NAME.decode()} ") for m in said())), said()
    # Under an identifier of its own: smtp521's are the sessions' lines.
    assert not [e for e in sd.journal("-t", "smtp521") if e.get("MESSAGE", "").startswith("mode=")]

    # A drop-in with a second ExecStart= (what a naive `systemctl edit`
    # gives): the service no longer loads, the first connection puts the
    # socket into the failed state, and port 25 is closed.
    dropin = "/etc/systemd/system/smtp521@.service.d/options.conf"
    cmd = '/usr/local/sbin/smtp521 --log stderr -H dropin.test -m "takes no mail"'
    sd.write(dropin, f"[Service]\nExecStart={cmd}\n")
    sd.ctl("daemon-reload")
    assert refused(port)
    assert sd.state("smtp521.socket") == "failed"
    print(f"\n$ systemctl status smtp521.socket  # with a second ExecStart=\n"
          f"{sd.ctl('status', 'smtp521.socket', check=False).stdout}")
    # The empty ExecStart= first: the new line replaces the shipped one,
    # and a message with spaces is one argument.
    sd.write(dropin, f"[Service]\nExecStart=\nExecStart={cmd}\n")
    sd.ctl("daemon-reload")
    sd.ctl("reset-failed")
    sd.ctl("start", "smtp521.socket")
    out, _ = talk(port, b"QUIT\r\n")
    assert out == (GREET + BYE).replace(b"mx.test", b"dropin.test").replace(TEXT, b"takes no mail"), out
    assert sd.state("smtp521.socket") == "active"


# ------------------------------------------------------------ one address

def test_socket_dropin_binds_one_address(systemd):
    # Another daemon has port P on 127.0.0.2.  The shipped socket, with a
    # drop-in that empties ListenStream= and binds 127.0.0.1:P, starts and
    # serves; a copy listening on P on every address cannot start.
    port = free_port()
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    other.bind(("127.0.0.2", port))
    other.listen()
    try:
        unitdir = units(port, [("all", port, lambda s: s)])
        with open(os.path.join(unitdir, "smtp521.socket"), "w") as f:
            f.write(read("smtp521.socket"))  # ListenStream=25, as shipped
        with open(os.path.join(unitdir, "smtp521-all.socket"), "w") as f:
            f.write(read("smtp521.socket").replace("\nListenStream=25\n", f"\nListenStream={port}\n"))
        os.mkdir(os.path.join(unitdir, "smtp521.socket.d"))
        with open(os.path.join(unitdir, "smtp521.socket.d", "listen.conf"), "w") as f:
            f.write(f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
        sd = systemd(unitdir)
        assert sd.ctl("start", "smtp521-all.socket", check=False).returncode != 0
        assert sd.state("smtp521-all.socket") == "failed"
        sd.ctl("start", "smtp521.socket")
        listen = sd.ctl("show", "-p", "Listen", "smtp521.socket").stdout.strip()
        assert listen == f"Listen=127.0.0.1:{port} (Stream)", listen
        out, _ = talk(port, SESSION_IN)
        assert out == OUT, out
        assert sd.state("smtp521.socket") == "active"
    finally:
        other.close()
