"""The Debian package (debian/): built from this tree with `make deb`, its
file list, its version, its build flags, and the units and maintainer
scripts from the .deb under a private systemd (test/harness/with-systemd).

Run: /usr/bin/python3 -m pytest -q test/deploy/test_package.py (root for the
systemd tests; debhelper, dpkg-dev, fakeroot, lintian, blhc, file from
test/packages).  lintian and piuparts are not run here but by `make deb-check`.
"""
import datetime
import glob
import gzip
import os
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time

import pytest

from harness import (ROOT, SESSION_IN, SESSION_OUT, TEXT, check_default_file, default_name, free_port, option_range,
                     read_to_eof, talk)

# Every test here reads the package that `make deb` builds.
pytestmark = pytest.mark.needs("debian", "tool:dpkg-buildpackage", "tool:dh", "tool:fakeroot")


def changelog_version():
    with open(os.path.join(ROOT, "debian", "changelog")) as f:
        m = re.match(r"smtp521 \(([^)]+)\) ", f.readline())
    assert m, "debian/changelog: first line is not `smtp521 (VERSION) ...`"
    return m.group(1)


def upstream_version(version):
    """The upstream part of a Debian version: no epoch, no revision."""
    m = re.fullmatch(r"(?:\d+:)?(.+)-[^-]+", version)
    assert m, f"{version}: a non-native version (UPSTREAM-REVISION) for source format 3.0 (quilt)"
    return m.group(1)


# Where the package's units go: what this release's systemd.pc says, as
# debian/rules asks it (lib/systemd/system on Debian 12, usr/lib/... on 13).
UNITDIR = subprocess.run(["pkg-config", "--variable=systemdsystemunitdir", "systemd"],
                         capture_output=True, text=True).stdout.strip().strip("/") \
    if shutil.which("pkg-config") else "lib/systemd/system"

# The system user the unit runs as, made by the postinst (dh_installsysusers).
SYSUSERS = "usr/lib/sysusers.d/smtp521.conf"

# What the package holds, and its modes: every file the package must ship.
FILES = {
    "etc/default/smtp521": 0o644,
    f"{UNITDIR}/smtp521.slice": 0o644,
    f"{UNITDIR}/smtp521.socket": 0o644,
    f"{UNITDIR}/smtp521@.service": 0o644,
    "usr/sbin/smtp521": 0o755,
    "usr/share/doc/smtp521/README.Debian": 0o644,
    "usr/share/doc/smtp521/README.md.gz": 0o644,
    "usr/share/doc/smtp521/changelog.Debian.gz": 0o644,
    "usr/share/doc/smtp521/copyright": 0o644,
    "usr/share/doc/smtp521/inetd.conf.example": 0o644,
    "usr/share/lintian/overrides/smtp521": 0o644,
    "usr/share/man/man8/smtp521.8.gz": 0o644,
    SYSUSERS: 0o644,
}

# What dpkg-buildpackage leaves behind when run in the tree itself.
LITTER = re.compile(r"smtp521[-_].*\.(deb|changes|buildinfo|dsc|tar\.xz)$|^smtp521_.*\.orig\.tar\.gz$"
                    r"|^debian/(smtp521|\.debhelper|files|debhelper-build-stamp|.*\.substvars|.*\.debhelper\.log)$")


def litter():
    found = set()
    for d in (ROOT, os.path.dirname(ROOT)):
        found |= {os.path.join(d, n) for n in os.listdir(d) if LITTER.search(n)}
    found |= {os.path.join(ROOT, "debian", n) for n in os.listdir(os.path.join(ROOT, "debian"))
              if LITTER.search("debian/" + n)}
    return found


@pytest.mark.needs("tool:git")
def test_git_tracks_no_built_binary():
    # `make deb` ships every tracked file in the source package, and a
    # clone carries them all: nothing built (ELF) may be tracked.
    p = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if p.returncode or not p.stdout:
        pytest.skip("not a git work tree (an unpacked release tarball or source package): nothing is tracked")
    elf = []
    for name in p.stdout.decode().split("\0"):
        path = os.path.join(ROOT, name)
        if name and os.path.isfile(path):
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    elf.append(name)
    assert elf == [], f"git tracks built binaries: {elf} (git rm --cached, and .gitignore them)"


class Package:
    def __init__(self, out, log):
        self.out, self.log = out, log
        self.version = changelog_version()
        arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                              check=True).stdout.strip()
        self.deb = os.path.join(out, f"smtp521_{self.version}_{arch}.deb")
        self.changes = os.path.join(out, f"smtp521_{self.version}_{arch}.changes")
        self.tree = os.path.join(out, "tree")
        subprocess.run(["dpkg-deb", "-x", self.deb, self.tree], check=True)
        self.control = os.path.join(out, "control")
        subprocess.run(["dpkg-deb", "-e", self.deb, self.control], check=True)

    def path(self, rel):
        return os.path.join(self.tree, rel)

    def read(self, rel):
        with open(self.path(rel)) as f:
            return f.read()


@pytest.fixture(scope="module")
def package():
    before = litter()
    out = tempfile.mkdtemp(prefix="smtp521-deb-")
    os.chmod(out, 0o755)
    try:
        p = subprocess.run(["make", "-s", "deb", f"DEBOUT={out}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
        log = p.stdout + p.stderr
        assert p.returncode == 0, log[-4000:]
        assert litter() == before, f"the build left files in the tree: {litter() - before}"
        yield Package(out, log)
    finally:
        shutil.rmtree(out)


# ------------------------------------------------------------ contents

def test_deb_lists_every_file(package):
    listing = subprocess.run(["dpkg-deb", "-c", package.deb], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    files = {}
    for line in listing:
        mode, owner, _size, _date, _time, path = line.split(None, 5)
        assert owner == "root/root", line
        if not mode.startswith("d"):
            files[path.removeprefix("./")] = mode
    assert set(files) == set(FILES), sorted(set(files) ^ set(FILES))
    for path, mode in FILES.items():
        want = "-" + "".join(c if int(b) else "-" for b, c in zip(f"{mode:09b}", "rwxrwxrwx"))
        assert files[path] == want, (path, files[path])
    with open(os.path.join(package.control, "conffiles")) as f:
        assert f.read().split() == ["/etc/default/smtp521"]


def test_system_user_is_upstreams_made_once(package):
    # The user's one home is upstream's smtp521.sysusers, which make
    # install puts where dh_installsysusers finds it: the postinst makes it
    # once (a debian/smtp521.sysusers as well would add a second call).
    with open(os.path.join(ROOT, "smtp521.sysusers")) as f:
        assert package.read(SYSUSERS) == f.read()
    with open(os.path.join(package.control, "postinst")) as f:
        calls = re.findall(r"^\s*systemd-sysusers\b.*$", f.read(), re.M)
    assert len(calls) == 1 and calls[0].endswith(" smtp521.conf"), calls


def test_units_and_examples_name_usr_sbin(package):
    svc = package.read(f"{UNITDIR}/smtp521@.service")
    assert re.search(r"^ExecStart=/usr/sbin/smtp521 --log stderr \$SMTP521_OPTS$", svc, re.M), svc
    assert "\nEnvironmentFile=-/etc/default/smtp521\n" in svc and "\nSlice=smtp521.slice\n" in svc
    sock = package.read(f"{UNITDIR}/smtp521.socket")
    assert re.search(r"^ExecStartPre=/usr/sbin/smtp521 --check --log stderr \$SMTP521_OPTS$", sock, re.M), sock
    inetd = package.read("usr/share/doc/smtp521/inetd.conf.example")
    assert "/usr/sbin/smtp521" in inetd and "/usr/local" not in inetd


def test_version_agrees_everywhere(package):
    # The package's version is debian/changelog's; the program, its man
    # page and the release tarball carry its upstream part.
    field = subprocess.run(["dpkg-deb", "-f", package.deb, "Version"], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert field == package.version
    v = upstream_version(package.version)
    assert os.path.exists(os.path.join(package.out, f"smtp521_{v}.orig.tar.gz")), os.listdir(package.out)
    out = subprocess.run([package.path("usr/sbin/smtp521"), "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out == f"smtp521 {v}\n", out
    # The tree's own build, by `make` alone.
    subprocess.run(["make", "-s", "smtp521"], cwd=ROOT, check=True, capture_output=True)
    out = subprocess.run([os.path.join(ROOT, "smtp521"), "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out == f"smtp521 {v}\n", out
    with gzip.open(package.path("usr/share/man/man8/smtp521.8.gz"), "rt") as f:
        man = f.read()
    assert re.search(r"^\.Os smtp521 (\S+)$", man, re.M).group(1) == v
    # Its paths are the package's: a drop-in copied from it runs /usr/sbin/smtp521.
    assert "/usr/local/sbin" not in man and "Ql /usr/sbin/smtp521 --log stderr $SMTP521_OPTS" in man
    assert f".It Pa /{UNITDIR}/\n" in man
    with gzip.open(package.path("usr/share/doc/smtp521/changelog.Debian.gz"), "rt") as f:
        assert f.readline().startswith(f"smtp521 ({package.version}) ")


def test_release_tarball_is_the_tracked_files(package):
    # The .orig.tar.gz is `make dist`'s tarball: every file git tracks but
    # debian/ (the .debian.tar's), and its MANIFEST (which lets `make dist`
    # work where git is not), under smtp521-VERSION/, owned by root, dated
    # as VERSION's release date.
    v = upstream_version(package.version)
    with tarfile.open(os.path.join(package.out, f"smtp521_{v}.orig.tar.gz")) as tar:
        members = tar.getmembers()
        manifest = tar.extractfile(f"smtp521-{v}/MANIFEST").read().decode().split()
    names = [m.name for m in members]
    assert names == sorted(names) and all(n.startswith(f"smtp521-{v}/") for n in names), names
    assert [n[len(f"smtp521-{v}/"):] for n in names] == manifest
    p = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    assert not [n for n in manifest if n.startswith("debian/")], manifest
    if p.returncode == 0 and p.stdout:
        assert manifest == sorted([n for n in p.stdout.split() if not n.startswith("debian/")] + ["MANIFEST"])
    assert {(m.uid, m.gid) for m in members} == {(0, 0)}
    with open(os.path.join(ROOT, "VERSION")) as f:
        version, date = f.read().split()
    assert version == v
    midnight = datetime.datetime.fromisoformat(date).replace(tzinfo=datetime.timezone.utc)
    assert {m.mtime for m in members} == {int(midnight.timestamp())}
    # Debian's packaging is the .debian.tar's, all of it: what git tracks in debian/.
    debtar = glob.glob(os.path.join(package.out, f"smtp521_{package.version}.debian.tar.*"))
    assert len(debtar) == 1, os.listdir(package.out)
    with tarfile.open(debtar[0]) as tar:
        files = sorted(m.name for m in tar.getmembers() if m.isfile())
    if p.returncode == 0 and p.stdout:
        assert files == sorted(n for n in p.stdout.split() if n.startswith("debian/")), files


def test_source_declares_its_dep8_tests(package):
    # dpkg-source adds `Testsuite: autopkgtest` to the .dsc when the source
    # has debian/tests/control: what tells Debian's CI to run the DEP-8
    # tests (make autopkgtest runs them here).
    dsc = glob.glob(os.path.join(package.out, "*.dsc"))
    assert len(dsc) == 1, os.listdir(package.out)
    with open(dsc[0]) as f:
        fields = dict(line.split(": ", 1) for line in f.read().splitlines() if re.match(r"^[\w-]+: ", line))
    assert fields.get("Testsuite") == "autopkgtest", fields


def test_default_file_lists_every_option_with_its_default(package):
    check_default_file(package.read("etc/default/smtp521"))


@pytest.mark.needs("tool:blhc", "tool:readelf", "tool:file")
def test_build_flags_and_dynamic_pie(package):
    # The compile line has the Makefile's flags and dpkg-buildflags'.
    line = next(ln for ln in package.log.splitlines() if re.match(r"\S*g\+\+ .* -o smtp521 smtp521\.cpp$", ln))
    for flag in ("-pie", "-fPIE", "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong",
                 "-fstack-clash-protection", "-Wl,-z,relro", "-Wl,-z,now", "-Wl,-z,noexecstack",
                 "-Werror=format-security", "-Wdate-time", "-O2"):
        assert flag in line.split(), (flag, line)
    assert "-static" not in line.split() and "-static-pie" not in line.split(), line
    with tempfile.NamedTemporaryFile("w", suffix=".log") as log:
        log.write(package.log)
        log.flush()
        p = subprocess.run(["blhc", "--all", "--debian", log.name], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    # glibc linked dynamically (Debian Policy 10.1), and nothing else:
    # the program needs no libstdc++.
    exe = package.path("usr/sbin/smtp521")
    p = subprocess.run(["file", "-b", exe], capture_output=True, text=True)
    assert "dynamically linked" in p.stdout and "pie executable" in p.stdout, p.stdout
    head = subprocess.run(["readelf", "-hdlW", exe], capture_output=True, text=True, check=True).stdout
    assert re.search(r"Type:\s+DYN", head), "not position independent"
    assert re.findall(r"\(NEEDED\)\s+Shared library: \[(.*)\]", head) == ["libc.so.6"], head
    assert re.search(r"\(FLAGS\)\s+BIND_NOW", head) and "GNU_RELRO" in head
    stack = re.search(r"GNU_STACK.*", head).group(0)
    assert stack.split()[-2] == "RW", stack
    # ... and the package depends on the libc it was linked with.
    depends = subprocess.run(["dpkg-deb", "-f", package.deb, "Depends"], capture_output=True, text=True,
                             check=True).stdout
    assert re.match(r"libc6 \(>= [\d.]+\)", depends), depends
    assert "Built-Using" not in subprocess.run(["dpkg-deb", "-f", package.deb], capture_output=True,
                                               text=True, check=True).stdout


# ------------------------------------------------------------ under systemd

def unit_copy(package, name, port, envfile=None):
    """A unit from the package with only what the private systemd needs
    changed: the port (ListenStream=25), the binary's path (test/harness/with-systemd
    puts it at /usr/local/sbin), and optionally the environment file."""
    text = package.read(f"{UNITDIR}/{name}")
    if name == "smtp521.socket":
        assert "\nListenStream=25\n" in text and "\nExecStartPre=/usr/sbin/smtp521 " in text
        text = text.replace("\nListenStream=25\n", f"\nListenStream={port}\n")
        text = text.replace("\nExecStartPre=/usr/sbin/smtp521 ", "\nExecStartPre=/usr/local/sbin/smtp521 ")
    if name == "smtp521@.service":
        assert "\nExecStart=/usr/sbin/smtp521 " in text
        text = text.replace("\nExecStart=/usr/sbin/smtp521 ", "\nExecStart=/usr/local/sbin/smtp521 ")
    if envfile and name in ("smtp521.socket", "smtp521@.service"):
        # Both: the socket checks what the service will run.
        assert "\nEnvironmentFile=-/etc/default/smtp521\n" in text, name
        text = text.replace("\nEnvironmentFile=-/etc/default/smtp521\n", f"\nEnvironmentFile=-{envfile}\n")
    return text


UNITS = ("smtp521.socket", "smtp521@.service", "smtp521.slice")


def expected(name, text=TEXT):
    return SESSION_OUT.replace(b"mx.test", name).replace(TEXT, text)


def start_session(port, host="127.0.0.1"):
    """A session held open after EHLO."""
    c = socket.create_connection((host, port), timeout=30)
    got = b""
    while got.count(b"\r\n") < 1:
        got += c.recv(1000)
    c.sendall(SESSION_IN.split(b"\r\n")[0] + b"\r\n")
    while got.count(b"\r\n") < 2:
        got += c.recv(1000)
    return c, got


def finish_session(c, got):
    c.sendall(b"\r\n".join(SESSION_IN.split(b"\r\n")[1:]))
    got = read_to_eof(c, got=got)
    c.close()
    return got


@pytest.mark.needs("systemd")
def test_units_from_the_package_serve_a_session(package, systemd):
    # The units as shipped, the port and the binary's path aside, under a
    # real systemd; the environment file is the package's conffile.
    port = free_port()
    d = tempfile.mkdtemp(prefix="smtp521-pkgunits-")
    os.chmod(d, 0o755)
    env = os.path.join(d, "default")
    shutil.copy(package.path("etc/default/smtp521"), env)
    units = os.path.join(d, "units")
    os.mkdir(units)
    for name in UNITS:
        with open(os.path.join(units, name), "w") as f:
            f.write(unit_copy(package, name, f"127.0.0.1:{port}", envfile=env))
    shutil.copy(package.path(SYSUSERS), os.path.join(units, "smtp521.sysusers"))  # its user, made by with-systemd
    sd = systemd(units, package.path("usr/sbin/smtp521"))
    try:
        sd.ctl("start", "systemd-journald.socket", "systemd-journald.service", "smtp521.socket")
        name = default_name()
        c, got = start_session(port)
        instances = sd.ctl("list-units", "--plain", "--no-legend", "smtp521@*").stdout.split()
        slice_ = sd.ctl("show", "-p", "Slice", "--value", instances[0]).stdout.strip()
        assert finish_session(c, got) == expected(name)
        assert slice_ == "smtp521.slice", (instances, slice_)
        # The environment file is read for each session: options with a
        # quoted argument reach smtp521 as words.
        with open(env) as f:
            text = f.read()
        with open(env, "w") as f:
            f.write(text.replace('\nSMTP521_OPTS=""\n', "\nSMTP521_OPTS=\"-H mx.test --message 'takes no mail'\"\n"))
        out, _ = talk(port, SESSION_IN, timeout=30)
        assert out == expected(b"mx.test", b"takes no mail"), out
    finally:
        sd.stop()
        shutil.rmtree(d)


class Namespace:
    """The package's units installed under /lib/systemd/system of a private
    systemd's mount namespace, and its maintainer scripts run there as
    dpkg runs them.  deb-systemd-helper's state and policy-rc.d (Docker's
    forbids starting services) are private to the namespace too."""

    def __init__(self, package, port, systemd):
        self.package, self.port = package, port
        self.dir = tempfile.mkdtemp(prefix="smtp521-pkgns-")
        os.chmod(self.dir, 0o755)
        # test/harness/with-systemd wants one unit of its own: the package's are
        # installed by the test.
        own = os.path.join(self.dir, "own")
        os.mkdir(own)
        with open(os.path.join(own, "smtp521-pkgtest-idle.target"), "w") as f:
            f.write("[Unit]\nDescription=placeholder\n")
        self.units = os.path.join(self.dir, "units")
        os.mkdir(self.units)
        for name in UNITS:
            with open(os.path.join(self.units, name), "w") as f:
                f.write(unit_copy(package, name, port))
        self.sd = systemd(own, package.path("usr/sbin/smtp521"))
        # The namespace's /etc is an overlay of the host's (test/harness/with-systemd):
        # a host that has the package's user (it runs the package) must not
        # hide whether the postinst makes it; deleted here, it stays there.
        self.sh("mount -t tmpfs tmpfs /var/lib/systemd; "
                "if [ -e /usr/sbin/policy-rc.d ]; then mount --bind /bin/true /usr/sbin/policy-rc.d; fi; "
                f"if getent passwd {self.user_name()} >/dev/null; then userdel {self.user_name()}; fi; "
                f"if getent group {self.user_name()} >/dev/null; then groupdel {self.user_name()}; fi")
        self.sd.ctl("start", "systemd-journald.socket", "systemd-journald.service")

    def sh(self, script, env=None):
        return subprocess.run(["nsenter", "-t", str(self.sd.pid), "-m", "-p", "-r", "-w", "sh", "-ec", script],
                              capture_output=True, text=True, timeout=120, env=env)

    def unpack(self):
        # /usr/lib/sysusers.d is the namespace's own (test/harness/with-systemd).
        self.sh(f"cp {self.units}/* /lib/systemd/system/; cp {self.package.path(SYSUSERS)} /{SYSUSERS}")

    def delete(self):
        self.sh("rm -f " + " ".join(f"/lib/systemd/system/{n}" for n in UNITS) + f" /{SYSUSERS}")

    def user_name(self):
        with open(self.package.path(SYSUSERS)) as f:
            return re.search(r"^u (\S+) ", f.read(), re.M).group(1)

    def user(self):
        """The package's system user in the namespace's /etc/passwd (an
        overlay: the host's stays as it was), or None."""
        p = self.sh(f"getent passwd {self.user_name()}")
        return p.stdout.split(":") if p.returncode == 0 else None

    def script(self, name, *args):
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DPKG_MAINTSCRIPT_PACKAGE": "smtp521",
               "DPKG_MAINTSCRIPT_NAME": name}
        p = self.sh(f"{self.package.control}/{name} " + " ".join(args), env)
        assert p.returncode == 0, (name, args, p.stdout, p.stderr)
        return p

    def state(self):
        active = self.sd.ctl("is-active", "smtp521.socket", check=False).stdout.strip()
        enabled = self.sd.ctl("is-enabled", "smtp521.socket", check=False).stdout.strip()
        return active, enabled

    def close(self):
        self.sd.stop()
        shutil.rmtree(self.dir)


def wait_state(ns, want, timeout=30):
    deadline = time.monotonic() + timeout
    while ns.state() != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return ns.state()


@pytest.mark.needs("systemd", "tool:deb-systemd-helper", "tool:deb-systemd-invoke")
def test_install_upgrade_remove_purge_under_systemd(package, systemd):
    # What dpkg runs, in order, against a real systemd: install enables
    # and starts the socket; an upgrade restarts it while a session is held
    # open, and the session goes on to its end; remove stops it and keeps
    # its enable symlink (a reinstall keeps it enabled or disabled); purge
    # leaves no symlink behind.
    port = free_port()
    ns = Namespace(package, str(port), systemd)
    v = package.version
    name = default_name()
    try:
        ns.unpack()
        assert ns.user() is None
        ns.script("postinst", "configure")
        assert wait_state(ns, ("active", "enabled")) == ("active", "enabled")
        out, _ = talk(port, SESSION_IN, timeout=30)
        assert out == expected(name), out
        # The postinst made the system user, and a session runs as it.
        user = ns.user()
        assert user and int(user[2]) != 0 and user[6].strip().endswith("nologin"), user

        held, got = start_session(port)
        instance = ns.sd.ctl("list-units", "--plain", "--no-legend", "smtp521@*").stdout.split()[0]
        pid = ns.sd.ctl("show", "-p", "MainPID", "--value", instance).stdout.strip()
        status = ns.sh(f"cat /proc/{pid}/status").stdout
        assert re.search(rf"^Uid:\t{user[2]}\t{user[2]}\t{user[2]}\t{user[2]}$", status, re.M), status
        before = ns.sd.ctl("show", "-p", "InvocationID", "--value", "smtp521.socket").stdout.strip()
        ns.script("prerm", "upgrade", v)
        ns.unpack()
        ns.script("postrm", "upgrade", v)
        ns.script("postinst", "configure", v)
        after = ns.sd.ctl("show", "-p", "InvocationID", "--value", "smtp521.socket").stdout.strip()
        assert before and after and before != after, "the upgrade did not restart the socket"
        assert finish_session(held, got) == expected(name), "the upgrade cut off a running session"
        assert ns.state() == ("active", "enabled")
        out, _ = talk(port, SESSION_IN, timeout=30)
        assert out == expected(name), out

        # What README.Debian says of removal and purge, each sentence beside
        # the check of what the maintainer scripts do.
        readme = " ".join(package.read("usr/share/doc/smtp521/README.Debian").split())
        link = "/etc/systemd/system/sockets.target.wants/smtp521.socket"

        def links():
            return ns.sh("find /etc/systemd/system /var/lib/systemd -name '*smtp521*'").stdout.split()

        def remove():
            ns.script("prerm", "remove")
            ns.delete()
            ns.script("postrm", "remove")

        assert "Removing the package stops the socket but leaves it enabled:" in readme, readme
        assert f"its symlink in {os.path.dirname(link)} stays," in readme, readme
        remove()
        assert ns.state()[0] == "inactive", ns.state()
        with pytest.raises(OSError):
            talk(port, SESSION_IN, timeout=5)
        assert link in links(), links()
        assert "so that installing the package again keeps the socket enabled or disabled as it was." \
            in readme, readme
        ns.unpack()
        ns.script("postinst", "configure")
        assert wait_state(ns, ("active", "enabled")) == ("active", "enabled")
        ns.sd.ctl("disable", "--now", "smtp521.socket")
        remove()
        ns.unpack()
        ns.script("postinst", "configure")
        assert ns.state() == ("inactive", "disabled"), ns.state()
        ns.sd.ctl("enable", "smtp521.socket")
        remove()
        assert link in links(), links()
        assert "Purging removes that symlink and /etc/default/smtp521." in readme, readme
        ns.script("postrm", "purge")
        assert links() == [], links()
        # Debian keeps a system user at purge: a uid given to another user
        # later would own what the old one left.
        assert ns.user() == user, ns.user()
    finally:
        ns.close()


@pytest.mark.needs("systemd", "tool:deb-systemd-helper", "tool:deb-systemd-invoke")
def test_install_where_policy_rc_d_forbids_the_start_blames_no_port(package, systemd):
    # policy-rc.d (a chroot, a container build) may forbid starting the
    # socket: it stays enabled and inactive, with the port free, and the
    # postinst says nothing about a port held by another program.
    port = free_port()
    ns = Namespace(package, str(port), systemd)
    try:
        policy = os.path.join(ns.dir, "policy")
        os.mkdir(policy)
        with open(os.path.join(policy, "policy-rc.d"), "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(os.path.join(policy, "policy-rc.d"), 0o755)
        p = ns.sh(f"mount -t overlay overlay -o lowerdir={policy}:/usr/sbin /usr/sbin")
        assert p.returncode == 0, p.stderr
        ns.unpack()
        p = ns.script("postinst", "configure")
        assert ns.state() == ("inactive", "enabled"), ns.state()
        assert "could not listen" not in p.stderr and "holds the port" not in p.stderr, p.stderr
    finally:
        ns.close()


@pytest.mark.needs("systemd", "tool:deb-systemd-helper", "tool:deb-systemd-invoke")
def test_install_with_bad_options_succeeds_and_says_what_to_do(package, systemd):
    # A bad /etc/default/smtp521 (kept from before an upgrade): the
    # socket's check fails it, and the postinst says so, not that the port
    # is taken.
    ns = Namespace(package, str(free_port()), systemd)
    try:
        ns.unpack()
        assert ns.sh("printf 'SMTP521_OPTS=\"-t 0\"\\n' > /etc/default/smtp521").returncode == 0
        p = ns.script("postinst", "configure")
        assert ns.state() == ("failed", "enabled"), ns.state()
        msg = " ".join(p.stderr.split())
        assert "its check of the options in /etc/default/smtp521 failed" in msg, msg
        assert "`journalctl -t smtp521-check`" in msg and "could not listen" not in msg, msg
        status = ns.sd.ctl("status", "smtp521.socket", check=False).stdout
        assert "status=64" in status, status
    finally:
        ns.close()


@pytest.mark.needs("systemd", "tool:deb-systemd-helper", "tool:deb-systemd-invoke")
def test_install_with_the_port_taken_succeeds_and_says_what_to_do(package, systemd):
    # Debian's exim4 holds 127.0.0.1:25; a socket on all addresses of the
    # port cannot start.  The installation succeeds, prints what to do, and
    # what it prints (the drop-in, with another address) works.
    port = free_port()
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", port))
    holder.listen()
    ns = Namespace(package, str(port), systemd)
    try:
        ns.unpack()
        p = ns.script("postinst", "configure")
        assert ns.state()[1] == "enabled" and ns.state()[0] != "active", ns.state()
        msg = p.stderr
        # The port the socket has (a drop-in may have moved it), not 25.
        assert f"could not listen on port {port}," in msg and f"sport = :{port}`" in msg, msg
        assert "README.Debian" in msg, msg
        # It points to the drop-in's one home, the man page; the commands
        # there, from the package's page, with 127.0.0.2 as the address.
        assert "man 8 smtp521" in msg and '"Listening on one address"' in " ".join(msg.split()), msg
        with gzip.open(package.path("usr/share/man/man8/smtp521.8.gz"), "rt") as f:
            man = f.read()
        m = re.search(r"^\.Ss Listening on one address\n.*?^\.Bd -literal[^\n]*\n(.*?)^\.Ed$", man, re.M | re.S)
        assert m and "ListenStream=192.0.2.1:25\n" in m.group(1), man
        commands = m.group(1).replace("\\e", "\\").replace("\\&", "").replace("192.0.2.1:25", f"127.0.0.2:{port}")
        p = ns.sh(commands)
        assert p.returncode == 0, p.stderr
        assert wait_state(ns, ("active", "enabled")) == ("active", "enabled")
        out, _ = talk(port, SESSION_IN, host="127.0.0.2", timeout=30)
        assert out == expected(default_name()), out
    finally:
        ns.close()
        holder.close()
