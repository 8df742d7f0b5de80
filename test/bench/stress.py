"""make bench BENCH=stress: slot exhaustion of the shipped units under a
private systemd (test/harness/with-systemd), as smtp521(8) "Under stress" and
test/bench/RESULTS.md report it.  Root.  Every client is on loopback.

  memory     one held session's memory (total, kernel, user) with the
             shipped service, and with PrivateNetwork=yes added (the unit
             before), 200 sessions held with the stress mode off
  flood      whole sessions a second, 48 clients back to back: the highest
             session rate this private systemd sustains here
  hold       silent holders for every slot plus 32, not reconnecting; a
             sender every 2 s once the hold has lasted 15 s (10 tries);
             with the stress mode (the default) and without (-s 0)
  reconnect  the same holders reconnecting as soon as they are cut: their
             new connections a second, against the flood's rate
  slow       a sender waiting 1 s before each command, every session under
             stress (-s 1), and a silent client beside it
  inetd      the hold under openbsd-inetd (the lines of inetd.conf.example):
             no cap on sessions, so what one costs the host (the memory
             of the super-server's cgroup, divided) is the limit
  tcpserver  the hold under tcpserver (smtp521(8)'s line, -c 512 -b 1024,
             -t 60), then holders reconnecting; then the hold with the
             default -t: past -c tcpserver accepts nothing, and a sender
             waits in the backlog until a holder's -t ends it

`test/bench/stress.py superservers` runs only the last two.
Ratios are within this run; rerun if the host was busy (the figures say
how long spawning took)."""
import asyncio
import os
import resource
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "harness"))
from harness import ROOT, Systemd, free_port, inetd_conf, tcpserver_line, unit_dir, wait_listening  # noqa: E402
import slot_attack  # noqa: E402

SLICE = f"smtp521-b{os.getpid()}.slice"  # below smtp521.slice: counted for stress


def unitdir(port, service_extra=""):
    """The shipped units in a slice of this run, `service_extra` added to
    the service."""
    return unit_dir(port, slice=SLICE, service=lambda s: s.replace(
        "\nIPAddressDeny=any\n", f"\nIPAddressDeny=any\n{service_extra}"))


def boot(service_extra="", opts=None):
    port = free_port()
    d = unitdir(port, service_extra)
    sd = Systemd(d, os.path.join(ROOT, "smtp521"))
    sd.ctl("start", "systemd-journald.socket", "systemd-journald.service", "smtp521.socket")
    if opts:
        path = f"/proc/{sd.pid}/root/etc/default/smtp521"
        with open(path, "w") as f:
            f.write(f'SMTP521_OPTS="{opts}"\n')
    return sd, port, d


def stop(sd, d):
    sd.stop()
    shutil.rmtree(d, ignore_errors=True)


def quiet(f):
    """Run f with stdout (Systemd.stop's report) silenced."""
    saved = sys.stdout
    sys.stdout = open(os.devnull, "w")
    try:
        return f()
    finally:
        sys.stdout.close()
        sys.stdout = saved


def memory(extra, held=200):
    sd, port, d = boot(extra, "-s 0")
    try:
        async def go():
            h = slot_attack.Holders(port, held, held)
            h.start()
            await slot_attack.wait_until(lambda: h.open >= held, 120)
            await asyncio.sleep(1)
            m, now = slot_attack.session_memory(sd.pid, held), h.open
            await h.stop()
            return m, now
        return asyncio.run(go())
    finally:
        quiet(lambda: stop(sd, d))


def superserver(name, argv, port, holders, setup=None, held=200, reconnect=False):
    """The attack on smtp521 under inetd or tcpserver (argv; {dir} is the
    run's directory, where setup(dir) writes any configuration), run as a
    service of a private systemd so that its cgroup holds the sessions:
    the memory of `held` silent sessions (the super-server's own included;
    held=0 skips it), then `holders` silent holders and a sender every 2 s
    that waits for its greeting as long as an MTA does (5 minutes), then
    with `reconnect` the same holders reconnecting."""
    d = tempfile.mkdtemp(prefix="smtp521-bench-super-")
    unit_dir(None, into=d, others={"bench-super.service": f"[Service]\nExecStart={' '.join(argv).format(dir=d)}\n"
                                                          "StandardOutput=null\nStandardError=null\n"})
    if setup:
        setup(d)
    sd = Systemd(d, os.path.join(ROOT, "smtp521"))
    try:
        sd.ctl("start", "bench-super.service")
        wait_listening(port)

        async def memory():
            h = slot_attack.Holders(port, held, held)
            h.start()
            ok = await slot_attack.wait_until(lambda: h.open >= held, 120)
            await asyncio.sleep(1)
            m = slot_attack.session_memory(sd.pid, held, slice=False) if ok else None
            await h.stop()
            return m

        m = asyncio.run(memory()) if held else None
        if m:
            print(f"{name:9} memory {m[0]:6.0f} KiB a held session: kernel {m[1]:.0f}, user {m[2]:.0f} "
                  f"({held} held)", flush=True)
        for again in (False, True) if reconnect else (False,):
            asyncio.run(slot_attack.drain(sd.pid))
            r = asyncio.run(slot_attack.hold_then_send(port, holders, holders, 120, reconnect=again))
            other = sorted({o[:40] for o in r["outcomes"] if o not in ("521", "no greeting")})
            print(f"{name:9} {'reconnect' if again else 'hold'} {holders} from {holders} sources: sender "
                  f"{r['counts']} of 10 {other or ''}, waits {r['fastest']:.0f} to {r['slowest']:.0f} s; "
                  f"most held at once {r['peak']}; holders {r['connects']} connects, {r['cut']} cut, "
                  f"{r['refused']} closed or unanswered in 60 s; attacker {r['rate']:.0f} connections/s", flush=True)
    finally:
        quiet(lambda: stop(sd, d))


def superservers(slots_):
    """smtp521 under openbsd-inetd (the lines of inetd.conf.example) and
    under tcpserver (smtp521(8)'s line)."""
    if os.access("/usr/sbin/inetd", os.X_OK):
        port = free_port()
        superserver("inetd", ["/usr/sbin/inetd", "-d", "{dir}/inetd.conf"], port, slots_ + 32,
                    setup=lambda d: inetd_conf(os.path.join(d, "inetd.conf"), port, "/usr/local/sbin/smtp521",
                                               ["-l", "none"]))
    else:
        print("inetd     not run: needs openbsd-inetd")
    if not shutil.which("tcpserver"):
        print("tcpserver not run: needs ucspi-tcp")
        return
    # smtp521(8)'s line, then the same without its -t (the default).
    for drop, held in (([], 200), (["-t"], 0)):
        port = free_port()
        argv = tcpserver_line(port, "/usr/local/sbin/smtp521", drop=drop)
        argv[0] = shutil.which(argv[0])
        limit = int(argv[argv.index("-c") + 1])
        print(f"tcpserver: {' '.join(argv[argv.index('-c'):])}", flush=True)
        superserver("tcpserver", argv, port, limit + 32, held=held, reconnect=not drop)


def main():
    if os.geteuid() != 0:
        print("bench stress: needs root (a private systemd)")
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))
    if sys.argv[1:] == ["superservers"]:
        with open(os.path.join(ROOT, "smtp521.socket")) as f:
            superservers(int(next(line.split("=")[1] for line in f if line.startswith("MaxConnections="))))
        return 0
    print("== slot exhaustion (BENCH=stress), the shipped units under a private systemd")
    for name, extra in (("shipped", ""), ("with PrivateNetwork=yes", "PrivateNetwork=yes\n")):
        m, held = memory(extra)
        if m:
            print(f"memory  {name:26} {m[0]:6.0f} KiB a held session: kernel {m[1]:.0f}, user {m[2]:.0f} "
                  f"({held} held)", flush=True)
    sd, port, d = boot()
    try:
        slots_ = int(sd.ctl("show", "-p", "MaxConnections", "--value", "smtp521.socket").stdout)
        flood = asyncio.run(slot_attack.flood(port, 8, 48))
        print(f"flood   {flood:.0f} whole sessions/s (48 clients, 8 s); MaxConnections={slots_}", flush=True)
        for label, sources, reconnect in (("hold, 16 sources", 16, False),
                                          (f"hold, {slots_ + 32} sources", slots_ + 32, False),
                                          ("reconnect", slots_ + 32, True)):
            asyncio.run(slot_attack.drain(sd.pid))
            holders = slots_ if reconnect else slots_ + 32
            r = asyncio.run(slot_attack.hold_then_send(port, holders, sources, 120, reconnect=reconnect))
            other = sorted({o[:40] for o in r["outcomes"] if o not in ("521", "no greeting")})
            print(f"{label:24} sender {r['counts']} of 10 {other or ''}, slowest {r['slowest']:.0f} s; "
                  f"most held at once {r['peak']}; attacker "
                  f"{r['rate']:.0f} connections/s = {r['rate'] / flood:.2f} x flood; holders {r['connects']} "
                  f"connects, {r['cut']} cut ({r['cut_with_521']} with 521), {r['refused']} refused; "
                  f"all connected in {r['filled']:.0f} s", flush=True)
    finally:
        quiet(lambda: stop(sd, d))
    # Without the stress mode: the attack as it was.
    sd, port, d = boot(opts="-s 0")
    try:
        slots_ = int(sd.ctl("show", "-p", "MaxConnections", "--value", "smtp521.socket").stdout)
        r = asyncio.run(slot_attack.hold_then_send(port, slots_ + 32, slots_ + 32, 180))
        print(f"{'hold, -s 0 (no stress)':24} sender {r['counts']} of 10; most held at once {r['peak']}; "
              f"all connected in {r['filled']:.0f} s", flush=True)
    finally:
        quiet(lambda: stop(sd, d))
    sd, port, d = boot(opts="-s 1")
    try:
        (outcome, took), (cut, _, rest) = asyncio.run(slot_attack.slow_sender_and_probe(port, 1.0))
        print(f"slow    sender with 1 s before each command under stress: {outcome} in {took:.1f} s; "
              f"silent client cut after {cut:.1f} s with {rest[:40]!r}", flush=True)
    finally:
        quiet(lambda: stop(sd, d))
    superservers(slots_)
    return 0


if __name__ == "__main__":
    sys.exit(main())
