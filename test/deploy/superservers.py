"""The super-servers Debian ships, each installed by its own package in a
debootstrap chroot of the release the tests run on, and run there in a
private mount, network and PID namespace (test/deploy/superserver-root), so that
they conflict neither with the host's nor with each other (every
inet-superserver package conflicts with every other, ucspi-tcp with
ucspi-tcp-ipv6).

The chroots are cached under ~/.cache/smtp521-superservers/RELEASE: a
minbase debootstrap ("base"), and for each set of packages an overlay
upper directory holding what apt-get installed over the base.  A run
stacks its own throw-away upper directory on top, so a test never changes
the cache.  The tests reach the servers by entering their network
namespace (netns()), where port 25 and ::1 are theirs alone."""
import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading

import harness

CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "smtp521-superservers")
MIRROR = os.environ.get("DEB_MIRROR", "http://deb.debian.org/debian")
ENTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "superserver-root")
# netbase: /etc/services, which every inetd reads (Priority: important, so
# on every Debian but minbase).
# Nothing an install starts may run: the chroot's services start only
# when a test starts them.
POLICY_RC = "#!/bin/sh\nexit 101\n"


def release():
    """The codename of the Debian release the tests run on, or of
    SMTP521_SUPERSERVERS_RELEASE (to try another release's servers)."""
    if os.environ.get("SMTP521_SUPERSERVERS_RELEASE"):
        return os.environ["SMTP521_SUPERSERVERS_RELEASE"]
    with open("/etc/os-release") as f:
        found = re.search(r"^VERSION_CODENAME=\"?(\w+)", f.read(), re.M)
    return found.group(1) if found else None


def _run(argv, log, **kw):
    with open(log, "a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kw)
    if p.returncode:
        with open(log) as f:
            raise AssertionError(f"{' '.join(argv[:4])} ...: exit {p.returncode}\n{f.read()[-3000:]}")


def _base(rel, log):
    base = os.path.join(CACHE, rel, "base")
    if os.path.exists(os.path.join(base, ".ready")):
        return base
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    os.chmod(base, 0o755)  # nobody must reach the chroot's files
    _run(["debootstrap", "--variant=minbase", "--include=netbase", rel, base, MIRROR], log, timeout=1200)
    # The release as Debian ships it today: with its updates and security fixes.
    security = "http://deb.debian.org/debian-security"
    with open(os.path.join(base, "etc/apt/sources.list"), "w") as f:
        f.write(f"deb {MIRROR} {rel} main\ndeb {MIRROR} {rel}-updates main\n"
                f"deb {security} {rel}-security main\n")
    with open(os.path.join(base, "usr/sbin/policy-rc.d"), "w") as f:
        f.write(POLICY_RC)
    os.chmod(os.path.join(base, "usr/sbin/policy-rc.d"), 0o755)
    shutil.copy("/etc/resolv.conf", os.path.join(base, "etc/resolv.conf"))
    _in_base(base, log, "apt-get", "update", "-q")
    _in_base(base, log, "apt-get", "-y", "-q", "upgrade")
    _in_base(base, log, "apt-get", "clean")
    open(os.path.join(base, ".ready"), "w").close()
    return base


def _in_base(root, log, *argv):
    _run(["unshare", "--mount", "--propagation", "unchanged", harness.PRIVATE,
          "sh", "-ec", 'mount -t proc proc "$0/proc"; exec chroot "$0" "$@"', root]
         + ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive", "LANG=C.UTF-8"]
         + list(argv), log, timeout=1200)


def root(packages):
    """The overlay layers (upper first) of a chroot of this release with
    `packages` installed, built if the cache lacks it; the build's log is
    kept beside it."""
    rel = release()
    key = "+".join(sorted(packages))
    os.makedirs(os.path.join(CACHE, rel), exist_ok=True)
    with open(os.path.join(CACHE, rel, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        log = os.path.join(CACHE, rel, f"{key}.log")
        base = _base(rel, log)
        layer = os.path.join(CACHE, rel, key)
        if not os.path.exists(os.path.join(layer, ".ready")):
            shutil.rmtree(layer, ignore_errors=True)
            os.makedirs(os.path.join(layer, "upper"))
            # The install's upper directory is on a tmpfs, copied to the
            # cache after: overlayfs refuses an upper directory on
            # overlayfs, where the cache may be (a container's root).
            script = ('base=$1; shift; mkdir -p "$0/build"; mount -t tmpfs build "$0/build"; '
                      'mkdir "$0/build/upper" "$0/build/work" "$0/build/root"; r=$0/build/root; '
                      'mount -t overlay overlay -o "lowerdir=$base,upperdir=$0/build/upper,workdir=$0/build/work" "$r"; '
                      'mount -t proc proc "$r/proc"; '
                      'chroot "$r" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive '
                      'LANG=C.UTF-8 apt-get install -y -q --no-install-recommends "$@"; '
                      'chroot "$r" apt-get clean; '
                      'chroot "$r" dpkg-query -W -f "\\${Package} \\${Version}\\n" "$@" > "$0/versions"; '
                      'umount "$r/proc" "$r"; cp -a "$0/build/upper/." "$0/upper/"')
            _run(["unshare", "--mount", "--propagation", "unchanged", harness.PRIVATE,
                  "sh", "-ec", script, layer, base] + sorted(packages), log, timeout=1200)
            os.rmdir(os.path.join(layer, "build"))
            open(os.path.join(layer, ".ready"), "w").close()
        return [os.path.join(layer, "upper"), base]


def versions(layers):
    """{package: version} of what root() installed."""
    with open(os.path.join(os.path.dirname(layers[0]), "versions")) as f:
        return dict(line.split() for line in f if line.strip())


# ------------------------------------------------------------ the namespaces

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def netns(pid):
    """This thread in the network namespace of process `pid`: the sockets
    made meanwhile stay in it.  (/proc/net of this process shows it, too.)"""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(there, CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if libc.setns(here, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(here)
        os.close(there)


class Jail:
    """`command` (a shell command line) run in a chroot of root(packages)
    in private namespaces (test/deploy/superserver-root), with `files`
    ({path: text}) written into it, the system user of smtp521.sysusers
    made there, and BINARY as /usr/local/sbin/smtp521;
    /dev/log is `devlog` (a harness.Syslog's socket).  pid is the
    namespace's first process, its network namespace the servers'."""

    def __init__(self, packages, files, command, binary, devlog):
        self.layers = root(packages)
        self.dir = tempfile.mkdtemp(prefix="smtp521-jail-")
        os.chmod(self.dir, 0o755)
        tree = os.path.join(self.dir, "files")
        # The configurations' user (superserver-root makes it from this).
        with open(os.path.join(harness.ROOT, "smtp521.sysusers")) as f:
            files = {"/usr/lib/sysusers.d/smtp521.conf": f.read(), **files}
        for path, text in files.items():
            full = os.path.join(tree, path.lstrip("/"))
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(text)
        os.makedirs(tree, exist_ok=True)
        os.mkdir(os.path.join(self.dir, "run"))
        self.argv = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--propagation", "unchanged",
                     harness.PRIVATE, ENTER, ":".join(self.layers), os.path.join(self.dir, "run"), binary,
                     devlog, tree, command]
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.output = harness.Output(self.proc.stdout)
        self.pid = harness.wait_for(lambda: self._first() if self.proc.poll() is None else "gone", timeout=30)
        if self.pid in (None, "gone"):
            out = self.output.text(join=True)
            self.close()
            raise AssertionError(f"the chroot did not start: {out[-3000:]}")

    def _first(self):
        """The namespace's PID 1 once it runs the command in the chroot."""
        kids = harness.children(self.proc.pid)
        if kids:
            try:
                if os.readlink(f"/proc/{kids[0]}/root") != "/":
                    return kids[0]
            except OSError:
                pass
        return None

    def path(self, path):
        """A path of the chroot, as seen from outside."""
        return f"/proc/{self.pid}/root/{path.lstrip('/')}"

    def read(self, path):
        try:
            with open(self.path(path), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def processes(self):
        """(pid, uid, command line) of every process in the namespace."""
        found = []
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                with open(f"/proc/{p}/status") as f:
                    status = f.read()
                uid = int(re.search(r"^Uid:\t(\d+)", status, re.M).group(1))
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                if os.readlink(f"/proc/{p}/ns/pid") == os.readlink(f"/proc/{self.pid}/ns/pid"):
                    found.append((int(p), uid, cmd))
            except (OSError, AttributeError):
                continue
        return found

    def close(self):
        """Kill everything in the namespaces; what the command wrote."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        out = self.output.text(join=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        return out


class Syslog:
    """A /dev/log for a chroot: a datagram socket read by a thread into
    `messages`, all of them (the servers' own too).  Read at once, since a
    full socket blocks every sender: smtp521 would wait in syslog(3)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="smtp521-syslog-")
        self.path = os.path.join(self.dir, "log.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.dir, 0o755)
        os.chmod(self.path, 0o666)  # the sessions run as nobody
        self.messages = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while True:
            try:
                msg = self.sock.recv(8192)
            except OSError:
                return
            if not msg:
                return
            self.messages.append(msg.decode("ascii", "replace"))

    def lines(self, ident):
        """The text of the messages from program `ident`."""
        found = (re.match(r"<\d+>\w{3} [ \d]\d \d\d:\d\d:\d\d ([\w.-]+)(?:\[\d+\])?: (.*)", m, re.S)
                 for m in list(self.messages))
        return [f.group(2).rstrip("\n") for f in found if f and f.group(1) == ident]

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
