"""A slot-exhaustion attack on a super-server, and a real sender beside it:
the clients of test/deploy/test_stress.py and test/bench/stress.py.  Every client
connects from a loopback source address of its own choosing (127.0.0.0/8
is all local on Linux), and every loop is bounded in count and time."""
import asyncio
import os
import time


def source(net, i):
    """The i-th address of 127.NET.0.0/16 (distinct sources beyond
    MaxConnectionsPerSource=)."""
    return f"127.{net}.{i // 250}.{i % 250 + 1}"


async def reply(reader, timeout):
    """One SMTP reply (the lines up to "code SP"), b"" on EOF."""
    out = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        out += line
        if not line or len(line) < 4 or line[3:4] != b"-":
            return out


class Holders:
    """`count` silent clients from `sources` addresses (round robin): each
    reads the greeting and says nothing.  With `reconnect`, a holder that
    is cut connects again at once, one closed before its greeting a second
    later, until stop().  Counts what happened."""

    def __init__(self, port, count, sources, net=8, reconnect=False, host="127.0.0.1"):
        self.port, self.count, self.sources, self.net, self.reconnect, self.host = \
            port, count, sources, net, reconnect, host
        self.connects = 0      # connections made
        self.greeted = 0       # ... that got a greeting
        self.refused = 0       # ... closed before a greeting (MaxConnections=)
        self.cut = 0           # greeted, then closed by the server
        self.cut_with_521 = 0  # ... after a 521 line
        self.cut_without = []  # ... the others: (seconds held, greeting, what came), at most 20
        self.open = 0          # greeted and still open
        self.stopping = False
        self.tasks = []

    def start(self):
        self.tasks = [asyncio.create_task(self._hold(i)) for i in range(self.count)]

    async def _hold(self, i):
        src = source(self.net, i % self.sources)
        while not self.stopping:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, local_addr=(src, 0)), 30)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.1)
                continue
            self.connects += 1
            refused = True
            try:
                greeting = await asyncio.wait_for(reader.readline(), 60)
                if not greeting:
                    self.refused += 1
                else:
                    refused = False
                    self.greeted += 1
                    self.open += 1
                    held = time.monotonic()
                    try:
                        rest = await reader.read()  # all the server sends before it cuts
                    finally:
                        self.open -= 1
                    self.cut += 1
                    if rest.startswith(b"521 "):
                        self.cut_with_521 += 1
                    elif len(self.cut_without) < 20:
                        self.cut_without.append((round(time.monotonic() - held, 3), greeting[:60], rest[:60]))
            except (OSError, asyncio.TimeoutError) as e:
                if refused:
                    self.refused += 1
                else:
                    # Greeted, then reset (or no greeting line in time):
                    # a cut that carried no 521.
                    self.cut += 1
                    if len(self.cut_without) < 20:
                        self.cut_without.append((round(time.monotonic() - held, 3), greeting[:60], repr(e)))
            finally:
                writer.close()
            if not self.reconnect:
                return
            # Closed unanswered (past MaxConnections=): try again in a
            # second, not at once.  At once, the holders would be a flood of
            # refused connections, which a firewall rate limit must stop
            # (under one, PID 1 accepts and closes and starts no session).
            if refused:
                await asyncio.sleep(1)

    async def stop(self):
        self.stopping = True
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def sender(port, src, rtt=0.0, timeout=300, host="127.0.0.1", rcpt=b"b@mx.test"):
    """A real sender: EHLO, MAIL, RCPT, QUIT, each after `rtt` seconds,
    waiting for each reply as long as a real MTA does (RFC 5321 4.5.3.2:
    5 minutes for the greeting, for MAIL and for RCPT): a connection
    accepted while systemd still works through hundreds of sessions cut
    at once waits for its instance, as the sender would.
    Returns (outcome, seconds): "521" (its RCPT refused with 521),
    "521 at MAIL" (or EHLO: cut before RCPT), "no greeting" (closed before
    any), or what went wrong."""
    began = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=(src, 0)), timeout)
    except (OSError, asyncio.TimeoutError) as e:
        return f"connect: {e!r}", time.monotonic() - began
    try:
        greeting = await reply(reader, timeout)
        if not greeting:
            return "no greeting", time.monotonic() - began
        if not greeting.startswith(b"220 "):
            return f"greeting {greeting[:60]!r}", time.monotonic() - began
        got = {}
        for verb, line in ((b"EHLO", b"EHLO client.example"), (b"MAIL", b"MAIL FROM:<a@client.example>"),
                           (b"RCPT", b"RCPT TO:<" + rcpt + b">"), (b"QUIT", b"QUIT")):
            await asyncio.sleep(rtt)
            writer.write(line + b"\r\n")
            got[verb] = await reply(reader, timeout)
            if verb != b"RCPT" and got[verb].startswith(b"521 "):
                # Cut by the stress deadline before RCPT: a permanent
                # refusal all the same, the mail is returned.
                return f"521 at {verb.decode()}", time.monotonic() - began
        # The 221 may be lost to a cut after the 521: the mail is refused.
        ok = got[b"RCPT"].startswith(b"521 ")
        return ("521" if ok else f"replies {got!r}"), time.monotonic() - began
    except (OSError, asyncio.TimeoutError) as e:
        return f"cut: {e!r}", time.monotonic() - began
    finally:
        writer.close()


async def senders(port, tries, every, net=6, rtt=0.0):
    """`tries` senders, one every `every` seconds, each from its own
    address; their outcomes in order."""
    tasks = []
    for i in range(tries):
        tasks.append(asyncio.create_task(sender(port, source(net, i), rtt)))
        await asyncio.sleep(every)
    return await asyncio.gather(*tasks)


async def flood(port, seconds, workers, net=3, data=None):
    """The highest session rate: `workers` clients, each from its own
    address, doing whole sessions back to back for `seconds`.  Returns
    whole sessions a second (a session answered to its QUIT)."""
    end = time.monotonic() + seconds
    whole = 0
    data = data or (b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n"
                    b"RCPT TO:<b@mx.test>\r\nQUIT\r\n")

    async def worker(i):
        nonlocal whole
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, local_addr=(source(net, i), 0)), 30)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.05)
                continue
            try:
                writer.write(data)
                out = await asyncio.wait_for(reader.read(), 30)
                whole += b"\r\n221 " in out
            except (OSError, asyncio.TimeoutError):
                pass
            finally:
                writer.close()

    began = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(workers)))
    return whole / (time.monotonic() - began)


async def wait_until(condition, timeout, step=0.1):
    """Wait for condition() to hold, at most `timeout` seconds; whether it did."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        await asyncio.sleep(step)
    return condition()


def session_pids(pid1):
    """The smtp521 processes in the PID namespace of a private systemd
    whose PID 1 is `pid1` (as the host sees them)."""
    ns = os.readlink(f"/proc/{pid1}/ns/pid")
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if pid != str(pid1) and os.readlink(f"/proc/{pid}/ns/pid") == ns and \
                    os.readlink(f"/proc/{pid}/exe").endswith("/smtp521"):
                found.append(int(pid))
        except OSError:
            pass
    return found


def session_memory(pid1, held, slice=True):
    """Memory of one held session, in KiB: (total, kernel, user), from the
    memory cgroup of the slice that holds the sessions (found through a
    session's own cgroup; with slice=False, that cgroup itself: a
    super-server's service), divided by `held`.  cgroup v2: memory.current,
    memory.stat's kernel and anon; v1 (a hybrid host): usage_in_bytes,
    kmem.usage_in_bytes and total_rss.  None if there is no such cgroup."""
    lines = None
    for pid in session_pids(pid1):
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                lines = [line.rstrip("\n").split(":", 2) for line in f]
            break
        except OSError:
            pass  # it ended meanwhile
    if lines is None:
        return None
    v1 = next((p for _, c, p in lines if "memory" in c.split(",")), None)
    v2 = next((p for i, c, p in lines if i == "0"), None)
    try:
        if v1 is not None:
            d = "/sys/fs/cgroup/memory" + (os.path.dirname(v1) if slice else v1)
            total = int(open(f"{d}/memory.usage_in_bytes").read())
            kernel = int(open(f"{d}/memory.kmem.usage_in_bytes").read())
            stat = dict(line.split() for line in open(f"{d}/memory.stat"))
            user = int(stat["total_rss"])
        else:
            d = "/sys/fs/cgroup" + (os.path.dirname(v2) if slice else v2)
            total = int(open(f"{d}/memory.current").read())
            stat = dict(line.split() for line in open(f"{d}/memory.stat"))
            kernel, user = int(stat["kernel"]), int(stat["anon"])
    except (OSError, KeyError, ValueError) as e:
        print(f"no memory figures: {e!r}")
        return None
    return tuple(v / held / 1024 for v in (total, kernel, user))


# ------------------------------------------------------------ the measurements

def outcome_counts(outcomes):
    counts = {}
    for o in outcomes:
        key = o if o in ("521", "no greeting") else "521 early" if o.startswith("521 at ") else "other"
        counts[key] = counts.get(key, 0) + 1
    return counts


async def hold_then_send(port, holders, sources, settle, tries=10, every=2.0, reconnect=False, net=8):
    """Silent holders (`holders` of them from `sources` addresses) fill the
    slots; once every holder has been answered, or `settle` seconds have
    passed, the hold lasts 15 s more and then a sender arrives every
    `every` seconds.  Returns a dict of what happened: the senders'
    outcomes, the holders' counts, the most held at once, and the
    attacker's new connections a second while the senders tried."""
    h = Holders(port, holders, sources, net=net, reconnect=reconnect)
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, h.open)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    h.start()
    began = time.monotonic()
    # Every holder answered: greeted, or closed unanswered (MaxConnections=).
    await wait_until(lambda: h.greeted + h.refused >= holders, settle)
    filled = time.monotonic() - began
    await asyncio.sleep(15)
    c0, t0 = h.connects, time.monotonic()
    results = await senders(port, tries, every)
    rate = (h.connects - c0) / (time.monotonic() - t0)
    outcomes = [o for o, _ in results]
    watcher.cancel()
    await h.stop()
    return {"outcomes": outcomes, "counts": outcome_counts(outcomes), "peak": peak, "filled": filled,
            "slowest": max(t for _, t in results), "fastest": min(t for _, t in results),
            "rate": rate, "connects": h.connects, "greeted": h.greeted, "refused": h.refused,
            "cut": h.cut, "cut_with_521": h.cut_with_521, "cut_without": h.cut_without}


async def slow_sender_and_probe(port, rtt, net=9):
    """Under stress: a sender that waits `rtt` before each command, and a
    silent client beside it.  Returns the sender's (outcome, seconds) and
    the probe's (seconds until cut, what it got after the greeting)."""

    async def probe():
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source(net, 1), 0)), 30)
        try:
            began = time.monotonic()
            greeting = await asyncio.wait_for(reader.readline(), 30)
            rest = await asyncio.wait_for(reader.read(), 120)
            return time.monotonic() - began, greeting, rest
        finally:
            writer.close()

    got = await asyncio.gather(sender(port, source(net, 2), rtt), probe())
    return got[0], got[1]


async def drain(pid1, timeout=60):
    """Wait until the private systemd runs no session."""
    return await wait_until(lambda: not session_pids(pid1), timeout, step=0.5)
