"""Real senders against smtp521: does the mail come back at once?

smtp521 runs under systemd-socket-activate in each mode on a loopback port.
Each sender sends one message to a test domain routed there (no DNS), and
the verdict is read from the sender itself: returned at once (a permanent
failure on the first attempt), deferred (requeued), or delivered to the
second host (for senders given two).  Each sender runs as it comes and
in its setting that requires TLS (RFC 3207).  Postfix, Exim, OpenSMTPD,
sendmail and nullmailer replace one another in Debian, so each is
installed in its own phase, and at the end the machine is put back as it
was found: the packages the suite installed are purged, those it
displaced are reinstalled, and the files the MTAs' maintainer scripts
create are restored; checks compare the
MTAs' privileged files, dpkg's stat overrides and the alternatives before
and after.  The table records no ports, queue ids or dates, so that it comes
out the same on every run.  This suite installs and removes MTAs and
rewrites their configuration, so it runs only where that is wanted: CI=true
or SMTP521_INTEROP=1.
"""
import grp
import json
import os
import pwd
import re
import shutil
import smtplib
import socket
import socketserver
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "harness"))
from harness import HERE, ROOT, TEST, TEXT, free_port, listening, wait_for

MODES = [("rcpt", []), ("greeting", ["-r", "greeting"]), ("close", ["-c"]), ("helo", ["-r", "helo"])]
# A measurement, not a mode smtp521 has: a stand-in (StartTLSHandler) that
# offers STARTTLS in its EHLO reply and answers STARTTLS with 521 5.3.2,
# otherwise as rcpt; its column is added only when
# SMTP521_INTEROP_STARTTLS=1.
STANDIN = "starttls"
if os.environ.get("SMTP521_INTEROP_STARTTLS") == "1":
    MODES.append((STANDIN, None))
NAME = "mx.test"
SENDER = "alice@sender.test"
MESSAGE = b"From: alice@sender.test\r\nTo: bob\r\nSubject: interop\r\n\r\nThis host takes no mail.\r\n"
ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive")

rows = []  # sender, version, setting, mode, verdict, what the sender reports
checks = []  # (name, ok, detail)
counter = iter(range(1, 1 << 30))


def run(argv, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 300)
    return subprocess.run(argv, env=kw.pop("env", ENV), **kw)


# Packages whose state an apt-get run of this suite changed: the ones to
# put back at the end.
touched = set()


def package_states():
    """{package: (dpkg status, version)} for every package dpkg knows."""
    out = run(["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Status}\t${Version}\n"]).stdout
    return {f[0]: (f[1], f[2]) for f in (line.split("\t") for line in out.splitlines()) if len(f) == 3}


def apt(verb, *packages):
    """apt-get VERB, waiting up to 10 minutes for another run's dpkg lock;
    what is installed already stays at its version (--no-upgrade), so that
    it can be left as it was."""
    before = package_states()
    p = run(["apt-get", verb, "-y", "-q", "--no-install-recommends", "--no-upgrade",
             "-o", "DPkg::Lock::Timeout=600"] + list(packages), timeout=1500)
    after = package_states()
    touched.update(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    if p.returncode != 0:
        raise RuntimeError(f"apt-get {verb} {packages}: {p.stdout[-1000:]}{p.stderr[-1000:]}")


def apt_install(*packages):
    apt("install", *packages)


def version(package):
    return run(["dpkg-query", "-W", "-f", "${Version}", package]).stdout.strip()


# ------------------------------------------------------------ the machine

# What the MTAs share: the names every MTA provides, and the files their
# maintainer scripts create outside dpkg's file lists.
SHARED = ["/usr/sbin/sendmail", "/usr/lib/sendmail", "/usr/bin/mailq", "/usr/bin/newaliases",
          "/usr/sbin/newaliases", "/usr/sbin/runq", "/usr/bin/rmail", "/etc/aliases", "/etc/mailname",
          "/var/mail", "/var/spool/mail"]
CREATED = ["/etc/aliases", "/etc/aliases.db", "/etc/mailname"]
# sendmail's postinst makes TLS certificates and links them here; its purge
# leaves the links.
CERTS = "/etc/ssl/certs"
# The mail spool: an MTA's postinst may change its mode (on Debian 13 one
# leaves /var/mail 3777), and its purge does not change it back.
MAIL_DIRS = ["/var/mail"]
# Each MTA's setgid/setuid files and spool directories, as Debian ships
# them (in the package, or by dpkg-statoverride in its postinst).  Postfix
# on Debian 13 makes its queue directories when it first starts, not at
# install.
with open("/etc/debian_version") as f:
    RELEASE = f.read().split(".")[0]  # "12", "13"
PRIVILEGED = {
    "Postfix": {"/usr/sbin/postdrop": "2555 root:postdrop", "/usr/sbin/postqueue": "2555 root:postdrop",
                **({"/var/spool/postfix/maildrop": "1730 postfix:postdrop",
                    "/var/spool/postfix/public": "2710 postfix:postdrop"} if RELEASE == "12" else {})},
    "Exim": {"/usr/sbin/exim4": "4755 root:root"},
    "OpenSMTPD": {"/usr/sbin/smtpctl": "2755 root:opensmtpq"},
    "nullmailer": {"/usr/sbin/nullmailer-queue": "4755 mail:root"},
    "sendmail": {"/usr/libexec/sendmail/sendmail": "2755 root:smmsp",
                 "/usr/libexec/sendmail/mailstats": "2755 root:smmsp",
                 "/var/spool/mqueue": "2750 smmta:smmsp", "/var/spool/mqueue-client": "2770 smmsp:smmsp"},
}


def describe(path):
    """'2555 root:postdrop', '-> target' or 'absent': what a check compares."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    if stat.S_ISLNK(st.st_mode):
        return f"-> {os.readlink(path)}"
    try:
        owner = f"{pwd.getpwuid(st.st_uid).pw_name}:{grp.getgrgid(st.st_gid).gr_name}"
    except KeyError:
        owner = f"{st.st_uid}:{st.st_gid}"
    return f"{stat.S_IMODE(st.st_mode):04o} {owner}"


def mail_files():
    """The state a change of MTA may leave behind: the shared names, every
    MTA's privileged files, dpkg's stat overrides, the mail alternatives."""
    paths = SHARED + [path for files in PRIVILEGED.values() for path in files]
    state = {path: describe(path) for path in paths}
    state["dpkg-statoverride"] = sorted(run(["dpkg-statoverride", "--list"]).stdout.splitlines())
    state["alternatives"] = sorted(line for line in run(["update-alternatives", "--get-selections"]).stdout
                                   .splitlines() if re.search(r"mail|mta|sendmail|runq", line.split()[0]))
    return state


def accounts():
    """The system users and groups (ids 100-999): MTAs add their own, and
    not every purge removes them."""
    return ({u.pw_name for u in pwd.getpwall() if 100 <= u.pw_uid < 1000},
            {g.gr_name for g in grp.getgrall() if 100 <= g.gr_gid < 1000})


def backup_created():
    saved = {CERTS: set(os.listdir(CERTS)) if os.path.isdir(CERTS) else set(), "accounts": accounts(),
             "dirs": {d: (lambda st: (st.st_mode, st.st_uid, st.st_gid))(os.stat(d))
                      for d in MAIL_DIRS if os.path.isdir(d)}}
    for path in CREATED:
        try:
            st = os.lstat(path)
            with open(path, "rb") as f:
                saved[path] = (f.read(), st.st_mode, st.st_uid, st.st_gid)
        except FileNotFoundError:
            saved[path] = None
    return saved


def restore_created(saved):
    saved = dict(saved)
    certs = saved.pop(CERTS)
    for name in set(os.listdir(CERTS)) - certs if os.path.isdir(CERTS) else set():
        link = os.path.join(CERTS, name)
        if os.path.islink(link) and not os.path.exists(link):
            os.remove(link)
    for d, (mode, uid, gid) in saved.pop("dirs").items():
        if os.path.isdir(d):
            os.chown(d, uid, gid)
            os.chmod(d, stat.S_IMODE(mode))
    users, groups = saved.pop("accounts")
    refused = []
    for user in sorted(accounts()[0] - users):
        p = run(["userdel", user])
        if p.returncode:
            refused.append(f"userdel {user}: {p.stderr.strip()}")
    for group in sorted(accounts()[1] - groups):
        p = run(["groupdel", group])
        if p.returncode:
            refused.append(f"groupdel {group}: {p.stderr.strip()}")
    for path, was in saved.items():
        if was is None:
            if os.path.lexists(path):
                os.remove(path)
            continue
        data, mode, uid, gid = was
        if os.path.islink(path):
            os.remove(path)
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, uid, gid)
        os.chmod(path, stat.S_IMODE(mode))
    if refused:
        raise RuntimeError("; ".join(refused))


def mta_installed(name, package):
    """After an MTA's install: its privileged files as Debian ships them,
    /usr/sbin/sendmail its own, and no other MTA's privileged file left."""
    got = {path: describe(path) for path in PRIVILEGED[name]}
    checks.append((f"{name} installed: its privileged files as Debian ships them",
                   got == PRIVILEGED[name], got))
    target = os.path.realpath("/usr/sbin/sendmail")
    owner = run(["dpkg-query", "-S", target]).stdout.split(":")[0]
    checks.append((f"{name} installed: /usr/sbin/sendmail is {package}'s", owner == package,
                   f"{target} belongs to {owner or 'no package'}"))
    left = {path: describe(path) for other, files in PRIVILEGED.items() if other != name
            for path in files if not path.startswith("/var/") and describe(path) != "absent"}
    checks.append((f"{name} installed: no other MTA's setuid/setgid program left", not left, left))


def put_back(packages, files, created):
    """Purge what the suite installed, reinstall what it displaced, restore
    the files the maintainer scripts created; then compare with the start."""
    absent = ("not-installed", "")
    done = {}
    steps = [
        ("purge", lambda now: [p for p in touched if packages.get(p, absent)[0] == "not-installed" and
                               now.get(p, absent)[0] != "not-installed"]),
        ("remove", lambda now: [p for p in touched if packages.get(p, absent)[0] == "config-files" and
                                now.get(p, absent)[0] == "installed"]),
        ("install", lambda now: [f"{p}={packages[p][1]}" for p in touched
                                 if packages.get(p, absent)[0] == "installed" and now.get(p) != packages[p]]),
    ]
    for verb, which in steps:
        names = sorted(which(package_states()))
        done[verb] = len(names)
        try:
            if names:
                apt(verb, *names)
        except Exception as e:  # noqa: BLE001 -- the next step and the checks still run
            checks.append((f"machine put back: apt-get {verb}", False, repr(e)))
    try:
        restore_created(created)
    except Exception as e:  # noqa: BLE001
        checks.append(("machine put back: files and accounts", False, repr(e)))
    now = package_states()
    changed = {p: (packages.get(p, absent), now.get(p, absent)) for p in touched
               if packages.get(p, absent)[0] != now.get(p, absent)[0] or
               (now.get(p, absent)[0] == "installed" and packages[p] != now[p])}
    checks.append(("machine put back: every package the suite touched as it was", not changed, changed))
    after = mail_files()
    diff = {k: (files[k], after[k]) for k in files if files[k] != after[k]}
    checks.append(("machine put back: MTA files, stat overrides and alternatives as they were",
                   not diff, diff))
    left = {k: v for k, v in backup_created().items() if k in CREATED and v != created[k]}
    for kind, was, now in zip(("users", "groups"), created["accounts"], accounts()):
        if was != now:
            left[kind] = {"added": sorted(now - was), "gone": sorted(was - now)}
    checks.append(("machine put back: /etc/aliases, /etc/mailname, system accounts as they were",
                   not left, left))
    print(f"     put back: purged {done['purge']}, removed {done['remove']}, "
          f"reinstalled {done['install']} packages")


# ------------------------------------------------------------ the servers

class Responders:
    """smtp521 in each mode on 127.0.0.1:port, and an accepting sink on
    127.0.0.2 at the same port: the 'second host' for two-host routes.  The
    sink offers STARTTLS, with a certificate made for the run, so that a
    sender that requires TLS can move the mail there."""

    def __init__(self, binary):
        self.port = {}
        self.procs = []
        self.sinks = []
        self.certdir = tempfile.mkdtemp(prefix="smtp521-interop-tls-")
        cert, key = (os.path.join(self.certdir, n) for n in ("cert.pem", "key.pem"))
        run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
             "-days", "2", "-subj", "/CN=sink.test"], check=True)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        for mode, args in MODES:
            port = free_port()
            self.port[mode] = port
            if args is None:
                standin = Server(("127.0.0.1", port), StartTLSHandler)
                threading.Thread(target=standin.serve_forever, daemon=True).start()
                self.sinks.append(standin)
            else:
                self.procs.append(subprocess.Popen(
                    ["systemd-socket-activate", "--inetd", "-a", "-l", f"127.0.0.1:{port}",
                     binary, "-H", NAME, "-l", "none"] + args,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            sink = Server(("127.0.0.2", port), SinkHandler)
            sink.tls = self.tls
            threading.Thread(target=sink.serve_forever, daemon=True).start()
            self.sinks.append(sink)
        for port in self.port.values():
            assert wait_for(lambda: listening(port), 10), port
        self.delivered = set()
        for sink in self.sinks:
            sink.delivered = self.delivered

    def stop(self):
        for p in self.procs:
            p.terminate()
            p.wait(timeout=10)
        for s in self.sinks:
            s.shutdown()
            s.server_close()
        shutil.rmtree(self.certdir, ignore_errors=True)


class SinkHandler(socketserver.StreamRequestHandler):
    """An SMTP server that takes everything: the 'second host'."""

    def handle(self):
        self.wfile.write(b"220 sink.test ESMTP\r\n")
        rcpts = []
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            w = self.wfile.write
            if verb == b"EHLO":
                w(b"250-sink.test\r\n250 STARTTLS\r\n")
            elif verb == b"HELO":
                w(b"250 sink.test\r\n")
            elif line[:8].upper() == b"STARTTLS":
                w(b"220 2.0.0 Ready to start TLS\r\n")
                # RFC 3207 section 4.2: the session starts over inside TLS.
                self.connection = self.server.tls.wrap_socket(self.connection, server_side=True)
                self.rfile = self.connection.makefile("rb")
                self.wfile = self.connection.makefile("wb", buffering=0)
            elif verb == b"RCPT":
                rcpts.append(line[8:].strip().strip(b"<>").decode("ascii", "replace"))
                w(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                w(b"354 go on\r\n")
                while self.rfile.readline() not in (b".\r\n", b".\n", b""):
                    pass
                self.server.delivered.update(rcpts)
                w(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                w(b"221 2.0.0 Bye\r\n")
                return
            else:
                w(b"250 2.0.0 Ok\r\n")


class StartTLSHandler(socketserver.StreamRequestHandler):
    """The measurement's stand-in, not smtp521: rcpt mode's replies
    (smtp521.cpp's Replies), but EHLO offers STARTTLS (RFC 3207 section 4)
    and STARTTLS, like every command but HELO, EHLO, MAIL, RSET, NOOP and
    QUIT, gets 521 5.3.2."""

    def handle(self):
        w = self.wfile.write
        refusal = f"521 5.3.2 {NAME} {TEXT.decode()}\r\n".encode()
        w(f"220 {NAME} ESMTP\r\n".encode())
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"EHLO":
                w(f"250-{NAME}\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n".encode())
            elif verb == b"HELO":
                w(f"250 {NAME}\r\n".encode())
            elif verb == b"MAIL":
                w(b"250 2.1.0 Ok\r\n")
            elif verb in (b"RSET", b"NOOP"):
                w(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                w(f"221 2.0.0 {NAME} closing connection\r\n".encode())
                return
            else:
                w(refusal)


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self.delivered = set()


def record(sender, ver, setting, mode, verdict, detail):
    rows.append((sender, ver, setting, mode, verdict, " ".join(detail.split())[:160]))
    print(f"     {sender} {setting} [{mode}]: {verdict} -- {detail.strip()[:160]}")
    sys.stdout.flush()


def recipient(domain):
    return f"bob-{next(counter)}@{domain}"


# ------------------------------------------------------------ direct clients

# Each client as it comes, and in its setting that requires TLS (RFC 3207):
# without a queue, each fails at once; whether it says 'try again later'
# (msmtp's EX_TEMPFAIL, 75) is what the table shows.
def direct_clients(r):
    for tls in (False, True):
        for mode, _ in MODES:
            direct_clients_once(r, mode, tls)


def direct_clients_once(r, mode, tls):
    port = r.port[mode]
    rcpt = recipient(f"{mode}.test.invalid")
    with tempfile.NamedTemporaryFile("wb", suffix=".eml") as msg:
        msg.write(MESSAGE)
        msg.flush()

        p = run(["swaks", "--server", "127.0.0.1", "--port", str(port), "--from", SENDER, "--to", rcpt,
                 "--timeout", "20", "--data", f"@{msg.name}"] + (["--tls"] if tls else []))
        said = [l[4:] for l in (p.stdout + p.stderr).splitlines() if l.startswith(("<** ", "*** "))]
        record("swaks", version("swaks"), "`--tls`" if tls else "default", mode,
               f"fails at once (exit {p.returncode})", " / ".join(said) if said else p.stdout[-200:])
        # swaks's exit codes: 21-24, an error reply to the greeting, HELO,
        # MAIL, RCPT (checked to be a 5yz); 29, STARTTLS not offered or
        # refused.
        refused = any(l.startswith("5") for l in said) or tls and p.returncode == 29
        checks.append((f"swaks {'--tls ' if tls else ''}[{mode}] fails with a 5yz or for want of TLS",
                       p.returncode in (21, 22, 23, 24, 29) and refused, p.stdout[-300:]))

        p = run(["msmtp", "--host=127.0.0.1", f"--port={port}", "--auth=off"] +
                (["--tls=on", "--tls-starttls=on"] if tls else ["--tls=off"]) +
                [f"--from={SENDER}", "--", rcpt], input=MESSAGE.decode())
        said = [l for l in p.stderr.splitlines() if "server message" in l or "not accepted" in l or "TLS" in l]
        record("msmtp", version("msmtp"), "`--tls=on --tls-starttls=on`" if tls else "default", mode,
               f"fails at once (exit {p.returncode})", " / ".join(said) if said else p.stderr.strip()[-200:])
        # EX_TEMPFAIL (75) would mean 'try again later'.
        checks.append((f"msmtp {'tls ' if tls else ''}[{mode}] fails permanently", p.returncode not in (0, 75),
                       p.stderr[-300:]))

        p = run(["curl", "-sS", f"smtp://127.0.0.1:{port}", "--mail-from", SENDER, "--mail-rcpt", rcpt,
                 "-T", msg.name, "--max-time", "20"] + (["--ssl-reqd"] if tls else []))
        record("curl", version("curl"), "`--ssl-reqd`" if tls else "default", mode,
               f"fails at once (exit {p.returncode})", p.stderr.strip())
        # 8: a reply it did not expect; 9: access denied (the reply to
        # EHLO); 55, 56: failed to send, to receive; 64: TLS required and
        # not offered.
        checks.append((f"curl {'--ssl-reqd ' if tls else ''}[{mode}] fails",
                       p.returncode in (8, 9, 55, 56, 64),
                       p.stderr[-300:]))

    verdict, detail = smtplib_send(port, rcpt, tls)
    record("python smtplib", sys.version.split()[0], "`starttls()` first" if tls else "default", mode,
           verdict, detail)
    checks.append((f"smtplib {'starttls ' if tls else ''}[{mode}] gets a 5yz or no STARTTLS",
                   verdict.startswith("fails at once") and (" 5" in f" {detail}" or "STARTTLS" in detail), detail))


def smtplib_send(port, rcpt, tls):
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            if tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                s.starttls(context=context)
            s.sendmail(SENDER, [rcpt], MESSAGE)
        return "delivered", ""
    except smtplib.SMTPRecipientsRefused as e:
        code, text = next(iter(e.recipients.values()))
        return "fails at once (SMTPRecipientsRefused)", f"{code} {text.decode()}"
    except smtplib.SMTPServerDisconnected as e:
        return "fails at once (SMTPServerDisconnected)", str(e)
    except smtplib.SMTPNotSupportedError as e:
        return "fails at once (SMTPNotSupportedError)", str(e)
    except smtplib.SMTPResponseException as e:
        return f"fails at once ({type(e).__name__})", f"{e.smtp_code} {e.smtp_error.decode()}"


# ------------------------------------------------------------ Postfix

POSTFIX_LOG = "/var/log/postfix-interop.log"


def postfix_phase(r, binary):
    for line in ("postfix postfix/main_mailer_type select Local only", "postfix postfix/mailname string sender.test"):
        run(["debconf-set-selections"], input=line + "\n")
    apt_install("postfix")
    mta_installed("Postfix", "postfix")
    ver = version("postfix")
    relay_port = free_port()
    transport = "".join(
        f"{mode}.test.invalid smtp:[127.0.0.1]:{r.port[mode]}\n"
        f"two-{mode}.test.invalid smtp:[127.0.0.1]:{r.port[mode]}, [127.0.0.2]:{r.port[mode]}\n"
        for mode, _ in MODES)
    with open("/etc/postfix/interop_transport", "w") as f:
        f.write(transport)
    # The MX-relay alternative of RFC 1846 section 3, as the man page gives it.
    with open("/etc/postfix/nomail", "w") as f:
        f.write(f"nomail.test.invalid  556 5.1.10 nomail.test.invalid {TEXT.decode()}\n")
    run(["postmap", "/etc/postfix/nomail"], check=True)
    with open("/etc/postfix/master.cf") as f:
        master = f.read().split("# smtp521 interop\n")[0]
    with open("/etc/postfix/master.cf", "w") as f:
        f.write(master + "# smtp521 interop\n"
                f"127.0.0.1:{relay_port} inet n - n - - smtpd\n"
                "  -o smtpd_recipient_restrictions=check_recipient_access,hash:/etc/postfix/nomail,"
                "permit_mynetworks,reject_unauth_destination\n")
    settings = {
        "myhostname": "sender.test", "mydestination": "localhost", "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4", "relayhost": "", "transport_maps": "texthash:/etc/postfix/interop_transport",
        "maillog_file": POSTFIX_LOG, "smtp_tls_security_level": "none", "smtpd_tls_security_level": "none",
        "smtp_skip_5xx_greeting": "yes", "compatibility_level": "3.6",
    }
    run(["postconf", "-e"] + [f"{k}={v}" for k, v in settings.items()], check=True)
    # No listener on port 25 (the machine is shared): the mail comes in by
    # /usr/sbin/sendmail, and the MX relay has its own port.
    run(["postconf", "-M#", "smtp/inet"], check=True)
    if os.path.exists(POSTFIX_LOG):
        os.remove(POSTFIX_LOG)
    run(["postfix", "stop"])
    p = run(["postfix", "start"])
    assert p.returncode == 0, p.stderr
    try:
        # A setting, its main.cf values, the domain prefix (two- routes to
        # smtp521, then the sink).
        for setting, values, prefix in (
                ("default", {}, ""),
                ("`smtp_tls_security_level = encrypt`", {"smtp_tls_security_level": "encrypt"}, ""),
                ("`smtp_skip_5xx_greeting = no`", {"smtp_skip_5xx_greeting": "no"}, ""),
                ("two destinations", {}, "two-"),
                ("two destinations, `encrypt`", {"smtp_tls_security_level": "encrypt"}, "two-")):
            values = {**{"smtp_tls_security_level": "none", "smtp_skip_5xx_greeting": "yes"}, **values}
            run(["postconf", "-e"] + [f"{k}={v}" for k, v in values.items()], check=True)
            run(["postfix", "reload"], check=True)
            time.sleep(1)
            for mode, _ in MODES:
                verdict, detail = postfix_send(f"{prefix}{mode}.test.invalid", r)
                record("Postfix", ver, setting, mode, verdict, detail)
                if (mode == "rcpt" and values["smtp_tls_security_level"] == "none" and not prefix) or \
                        (mode == "helo" and values["smtp_tls_security_level"] == "encrypt" and not prefix):
                    checks.append((f"Postfix {setting.replace('`', '')} [{mode}] returns the mail at once",
                                   verdict.startswith("returned at once"), detail))
                # A secondary MX in the greeting mode passes the mail on.
                if prefix and mode == "greeting" and values["smtp_tls_security_level"] == "none":
                    checks.append(("Postfix two destinations [greeting] moves the mail to the 2nd host",
                                   verdict.startswith("moved"), detail))
            run(["postsuper", "-d", "ALL"])
        # The MX relay: Postfix's smtpd refuses RCPT for the mailless host.
        p = run(["swaks", "--server", "127.0.0.1", "--port", str(relay_port), "--from", SENDER,
                 "--to", "bob@nomail.test.invalid", "--timeout", "20"])
        refusal = [l for l in p.stdout.splitlines() if l.startswith("<** ")]
        record("Postfix smtpd as MX relay", ver, "`check_recipient_access`", "-",
               "refuses the recipient" if refusal else "accepts", refusal[-1][4:] if refusal else p.stdout[-200:])
        # Postfix 3.7 does not pass on the detail 10 of 5.1.10: it sends 5.1.0.
        checks.append(("Postfix MX-relay access map refuses with 556",
                       bool(refusal) and refusal[-1][4:].startswith("556 5.1.") and
                       TEXT.decode() in refusal[-1], p.stdout[-400:]))
    finally:
        run(["postfix", "stop"])


def postfix_send(domain, r):
    rcpt = recipient(domain)
    run(["/usr/sbin/sendmail", "-f", SENDER, rcpt], input=MESSAGE.decode(), check=True)

    def verdict_line():
        try:
            with open(POSTFIX_LOG) as f:
                for line in f:
                    if f"to=<{rcpt}>" in line and "status=" in line:
                        return line
        except FileNotFoundError:
            pass
        return None

    line = wait_for(verdict_line, 60)
    if line is None:
        return "no verdict in 60 s", ""
    m = re.search(r"relay=(\S+), .*dsn=([\d.]+), status=(\w+) \((.*)\)$", line.strip())
    relay, dsn, status, text = m.groups() if m else ("?", "?", "?", line)
    if status == "bounced":
        return f"returned at once ({dsn})", text
    if status == "sent":
        # relay=127.0.0.2[127.0.0.2]:port: the port is the sink's, new every run.
        return f"moved to the 2nd host ({relay.split('[')[0]})", text
    return f"{status} ({dsn})", text


# ------------------------------------------------------------ Exim

def exim_phase(r):
    apt_install("exim4-daemon-light")
    mta_installed("Exim", "exim4-daemon-light")
    ver = version("exim4-daemon-light")
    d = tempfile.mkdtemp(prefix="smtp521-exim-")
    os.chmod(d, 0o755)
    conf = os.path.join(d, "exim.conf")
    routers = []
    transports = []
    for mode, _ in MODES:
        port = r.port[mode]
        for tls in ("", "tls-"):
            # Driver names: letters, digits and underscores.
            name = f"{tls.replace('-', '_')}{mode}"
            transports.append(f"t_{name}:\n  driver = smtp\n  port = {port}\n  allow_localhost\n"
                              "  hosts_randomize = false\n" + "  hosts_require_tls = *\n" * bool(tls))
            for prefix, hosts in (("", "127.0.0.1"), ("two-", "127.0.0.1 : 127.0.0.2")):
                routers.append(f"r_{prefix.strip('-') or 'one'}_{name}:\n  driver = manualroute\n"
                               f"  domains = {prefix}{tls}{mode}.test.invalid\n"
                               f"  route_list = * \"{hosts}\" byname\n"
                               f"  self = send\n  transport = t_{name}\n  no_more\n")
    with open(conf, "w") as f:
        f.write("primary_hostname = sender.test\nqualify_domain = sender.test\n"
                "exim_user = Debian-exim\nexim_group = Debian-exim\n"
                f"spool_directory = {d}/spool\n"
                f"log_file_path = {d}/%slog\n"
                "host_lookup = \nrfc1413_hosts = \n"
                "begin routers\n" + "".join(routers) +
                "begin transports\n" + "".join(transports) +
                "begin retry\n* * F,2d,15m\n")
    os.chmod(conf, 0o644)
    shutil.chown(d, "Debian-exim", "Debian-exim")
    try:
        for prefix, setting in (("", "default"), ("tls-", "`hosts_require_tls = *`"),
                                ("two-", "two destinations"), ("two-tls-", "two destinations, `hosts_require_tls`")):
            for mode, _ in MODES:
                rcpt = recipient(f"{prefix}{mode}.test.invalid")
                # Each message meets a fresh retry database: Exim keeps
                # 127.0.0.1's failures per IP address, whatever the port,
                # and would skip that host for the next mode.
                shutil.rmtree(os.path.join(d, "spool", "db"), ignore_errors=True)
                p = run(["exim4", "-C", conf, "-odf", "-f", SENDER, rcpt], input=MESSAGE.decode(), timeout=120)
                verdict, detail = exim_verdict(os.path.join(d, "mainlog"), rcpt)
                detail = detail or p.stderr.strip()[-200:]
                record("Exim", ver, setting, mode, verdict, detail)
                if (prefix, mode) in (("", "rcpt"), ("tls-", "helo")):
                    checks.append((f"Exim {setting.replace('`', '')} [{mode}] returns the mail at once",
                                   verdict.startswith("returned at once"), detail))
                if (prefix, mode) == ("two-", "greeting"):
                    checks.append(("Exim two destinations [greeting] moves the mail to the 2nd host",
                                   verdict.startswith("moved"), detail))
    finally:
        # Whatever is left queued (bounces to the test sender): by message id.
        queued = re.findall(r"\b\w{6}-\w{6,11}-\w{2,4}\b", run(["exim4", "-C", conf, "-bp"]).stdout)
        if queued:
            run(["exim4", "-C", conf, "-Mrm"] + queued)
        shutil.rmtree(d, ignore_errors=True)


def exim_verdict(log, rcpt):
    try:
        with open(log) as f:
            lines = [line for line in f if f" {rcpt}" in line]
    except FileNotFoundError:
        return "no verdict", ""
    for line in lines:
        if " ** " in line:
            return "returned at once", line.split(": ", 1)[-1].strip()
        if " => " in line:
            return "moved to the 2nd host", line.split(" => ", 1)[-1].strip()
        if " == " in line:
            return "deferred", line.split(": ", 1)[-1].strip()
    return "no verdict", "".join(lines)[-200:]


# ------------------------------------------------------------ OpenSMTPD

def opensmtpd_phase(r):
    apt_install("opensmtpd")
    mta_installed("OpenSMTPD", "opensmtpd")
    ver = version("opensmtpd")
    # One smtpd per mode, each with an empty queue: after a refused greeting
    # OpenSMTPD disables its route to 127.0.0.1 (all ports) for a while, so
    # one mode's verdict must not delay the next.
    for scheme, setting in (("smtp", "default"), ("smtp+tls", "`relay host smtp+tls://`")):
        for mode, _ in MODES:
            verdict, detail = opensmtpd_send(r, mode, scheme)
            record("OpenSMTPD", ver, setting, mode, verdict, detail)
            if mode == "rcpt" and scheme == "smtp":
                checks.append(("OpenSMTPD default [rcpt] returns the mail at once",
                               verdict.startswith("returned at once"), detail))


def opensmtpd_send(r, mode, scheme):
    # No listen directive: this smtpd takes mail from /usr/sbin/sendmail
    # only, and listens on no port.
    for sub in ("queue", "incoming", "corrupt", "temporary"):
        path = os.path.join("/var/spool/smtpd", sub)
        for entry in os.listdir(path) if os.path.isdir(path) else []:
            shutil.rmtree(os.path.join(path, entry), ignore_errors=True)
    d = tempfile.mkdtemp(prefix="smtp521-smtpd-")
    conf = os.path.join(d, "smtpd.conf")
    with open(conf, "w") as f:
        f.write(f'action "relay521" relay host {scheme}://127.0.0.1:{r.port[mode]}\n'
                f'match from local for domain "{mode}.test.invalid" action "relay521"\n')
    os.chmod(conf, 0o644)
    log = os.path.join(d, "smtpd.log")
    with open(log, "w") as logf:
        proc = subprocess.Popen(["smtpd", "-d", "-f", conf], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    try:
        assert wait_for(lambda: "starting" in open(log).read(), 20), open(log).read()[-1000:]
        time.sleep(1)
        rcpt = recipient(f"{mode}.test.invalid")
        p = run(["/usr/sbin/sendmail", "-f", SENDER, rcpt], input=MESSAGE.decode(), timeout=60)
        assert p.returncode == 0, p.stderr

        def verdict_line():
            with open(log) as f:
                for line in f:
                    if f"to=<{rcpt}>" in line and "result=" in line:
                        return line
                    if "mta error reason=" in line:
                        return line
            return None

        line = wait_for(verdict_line, 30)
        if line is None:
            return "no verdict in 30 s", ""
        if "result=" not in line:
            # A refused greeting gives no result: the route is disabled and
            # the envelope waits in the queue.
            queued = rcpt in run(["smtpctl", "show", "queue"]).stdout
            return ("deferred" if queued else "gone from the queue"), line.split("reason=", 1)[-1]
        result = re.search(r'result="?(\w+)"?', line).group(1)
        stat = re.search(r'stat="?(.*?)"?$', line.strip())
        detail = stat.group(1) if stat else line
        return {"PermFail": "returned at once", "TempFail": "deferred", "Ok": "delivered"}.get(result, result), detail
    finally:
        run(["smtpctl", "remove", "all"])
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------ sendmail

# One configuration per mode, built from Debian's sendmail-cf: the esmtp
# mailer with smtp521's port in its arguments, the test domains routed by a
# mailertable to [127.0.0.1] (and [127.0.0.2], the sink, for two), no DNS
# (nocanonify, hosts from files only), and a local mailer that keeps every
# delivery status notification in a file, so that a returned message can be
# read back.
SENDMAIL_MC = """divert(-1)
include(`/usr/share/sendmail/cf/m4/cf.m4')
divert(0)dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `sender.test')dnl
define(`confSERVICE_SWITCH_FILE', `{d}/service.switch')dnl
define(`confHOSTS_FILE', `{d}/hosts')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl
define(`QUEUE_DIR', `{d}/queue')dnl
define(`STATUS_FILE', `{d}/statistics')dnl
define(`ALIAS_FILE', `{d}/aliases')dnl
define(`confPID_FILE', `{d}/sendmail.pid')dnl
dnl A busy machine must not make sendmail queue instead of deliver.
define(`confQUEUE_LA', `10000')dnl
define(`confREFUSE_LA', `10000')dnl
define(`confDELAY_LA', `0')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {port}')dnl
define(`LOCAL_MAILER_PATH', `{d}/deliver')dnl
define(`LOCAL_MAILER_ARGS', `deliver $u')dnl
MODIFY_MAILER_FLAGS(`LOCAL', `-w')dnl
FEATURE(`nocanonify')dnl
FEATURE(`mailertable', `hash {d}/mailertable-{mode}')dnl
dnl The access map's TLS requirement, per recipient domain (TLS_Rcpt:).
FEATURE(`access_db', `hash {d}/access')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
"""


class Syslog:
    """A datagram socket that sendmail, in its namespace, has as /dev/log."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.lines = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            self.lines.append(data.decode("utf-8", "replace").strip())

    def close(self):
        self.sock.close()


def sendmail_phase(r):
    apt_install("sendmail-bin")
    mta_installed("sendmail", "sendmail-bin")
    ver = version("sendmail-bin")
    d = tempfile.mkdtemp(prefix="smtp521-sendmail-")
    for sub in ("queue", "mail", "dev"):
        os.mkdir(os.path.join(d, sub), 0o700)
    with open(os.path.join(d, "deliver"), "w") as f:
        f.write(f'#!/bin/sh\nexec cat > "$(mktemp {d}/mail/dsn.XXXXXX)"\n')
    os.chmod(os.path.join(d, "deliver"), 0o755)
    # The private /etc/hosts gives sendmail its own name on loopback; the
    # private nsswitch.conf and service.switch leave DNS out.
    with open(os.path.join(d, "hosts"), "w") as f:
        f.write(f"127.0.0.1 localhost sender.test {socket.gethostname()}\n")
    with open("/etc/nsswitch.conf") as f:
        nss = re.sub(r"(?m)^hosts:.*$", "hosts: files", f.read())
    with open(os.path.join(d, "nsswitch.conf"), "w") as f:
        f.write(nss)
    with open(os.path.join(d, "service.switch"), "w") as f:
        f.write("hosts files\naliases files\n")
    with open(os.path.join(d, "aliases"), "w") as f:
        f.write("postmaster: root\n")
    log = Syslog(os.path.join(d, "log.sock"))
    configs = {}
    try:
        for mode, _ in MODES:
            table_file = os.path.join(d, f"mailertable-{mode}")
            with open(table_file, "w") as f:
                for tls in ("", "tls-"):
                    f.write(f"{tls}{mode}.test.invalid esmtp:[127.0.0.1]\n"
                            f"two-{tls}{mode}.test.invalid esmtp:[127.0.0.1]:[127.0.0.2]\n")
            run(["makemap", "hash", table_file], input=open(table_file).read(), check=True)
            cf = os.path.join(d, f"{mode}.cf")
            with open(cf, "w") as f:
                f.write(run(["m4"], input=SENDMAIL_MC.format(d=d, port=r.port[mode], mode=mode),
                            check=True).stdout)
            configs[mode] = cf
        # Mail to these domains goes only over TLS: a 4yz before RCPT
        # otherwise (cf/m4/proto.m4, tls_rcpt).
        access = os.path.join(d, "access")
        with open(access, "w") as f:
            f.write("".join(f"TLS_Rcpt:{two}tls-{mode}.test.invalid ENCR:1\n" for mode, _ in MODES
                            for two in ("", "two-")))
        run(["makemap", "hash", access], input=open(access).read(), check=True)
        p = sendmail_run(d, [configs["rcpt"], "-bi"])
        assert p.returncode == 0, p.stdout + p.stderr
        for prefix, setting in (("", "default"), ("tls-", "access map `TLS_Rcpt:domain ENCR:1`"),
                                ("two-", "two destinations"), ("two-tls-", "two destinations, `TLS_Rcpt:`")):
            for mode, _ in MODES:
                rcpt = recipient(f"{prefix}{mode}.test.invalid")
                verdict, detail = sendmail_send(d, configs[mode], log, rcpt)
                record("sendmail", ver, setting, mode, verdict, detail)
                if mode == "rcpt" and "tls" not in prefix:
                    checks.append((f"sendmail {setting} [rcpt] returns the mail at once",
                                   verdict == "returned at once" and rcpt not in r.delivered, detail))
                if (prefix, mode) == ("two-", "greeting"):
                    checks.append(("sendmail two destinations [greeting] moves the mail to the 2nd host",
                                   verdict.startswith("moved") and rcpt in r.delivered, detail))
    finally:
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def sendmail_run(d, args, **kw):
    """/usr/sbin/sendmail -C ARGS in a mount namespace with the private
    /etc/hosts, /etc/nsswitch.conf and /dev/log."""
    inner = 'mount --bind "$1" /etc/hosts; mount --bind "$2" /etc/nsswitch.conf; shift 2; exec "$@"'
    return run([os.path.join(HERE, "with-devlog"), os.path.join(d, "dev"), os.path.join(d, "log.sock"),
                "sh", "-euc", inner, "sh", os.path.join(d, "hosts"), os.path.join(d, "nsswitch.conf"),
                "/usr/sbin/sendmail", "-C"] + args, **kw)


def sendmail_send(d, cf, log, rcpt):
    # -odi: deliver before exiting, so that the first attempt is over when
    # sendmail exits; -oem: return errors by mail, as a queue run does.
    sendmail_run(d, [cf, "-odi", "-oem", "-f", SENDER, rcpt], input=MESSAGE.decode(), timeout=120)

    def verdict_line():
        # The last: a host that fails the TLS requirement logs a line of
        # its own before the next host is tried.
        lines = [line for line in log.lines if f" to={rcpt}," in line or f" to=<{rcpt}>," in line]
        return lines[-1] if lines else None

    line = wait_for(verdict_line, 30)
    if line is None:
        return "no verdict in 30 s", ""
    fields = dict(re.findall(r"(\w+)=(.*?)(?=, \w+=|$)", line.split(": ", 2)[-1]))
    status = fields.get("stat", "")
    if status.startswith("Sent"):
        host = fields.get("relay", "?").split()[0].strip("[]")
        return ("moved to the 2nd host" if host == "127.0.0.2" else "delivered") + f" ({host})", status
    if fields.get("dsn", "").startswith("5."):
        dsn = wait_for(lambda: returned(d, rcpt), 10)
        if dsn:
            return "returned at once", dsn
        return "refused, no DSN", fields.get("reply", status)
    queued = rcpt in sendmail_run(d, [cf, "-bp"]).stdout
    # A TLS requirement not met is logged by the ruleset, not in the to= line.
    tls = [l.split("reject=", 1)[-1] for l in log.lines if "ruleset=tls_rcpt" in l and rcpt in l]
    return ("deferred" if queued else f"gone from the queue ({status})"), \
        fields.get("reply", tls[-1] if tls else status)


def returned(d, rcpt):
    """'Status: 5.0.0; Diagnostic-Code: ...' from the DSN that sendmail
    delivered to the sender for rcpt, or None."""
    mail = os.path.join(d, "mail")
    for name in sorted(os.listdir(mail)):
        with open(os.path.join(mail, name), errors="replace") as f:
            text = f.read()
        if re.search(rf"(?mi)^Final-Recipient: rfc822; *{re.escape(rcpt)}$", text):
            fields = dict(re.findall(r"(?m)^(Status|Diagnostic-Code): *(.*)$", text))
            return "; ".join(f"{k}: {v}" for k, v in fields.items())
    return None


# ------------------------------------------------------------ nullmailer

NULLMAILER_SPOOL = "/var/spool/nullmailer"


def nullmailer_phase(r):
    run(["debconf-set-selections"], input="nullmailer shared/mailname string sender.test\n")
    apt_install("nullmailer")
    mta_installed("nullmailer", "nullmailer")
    ver = version("nullmailer")
    with open("/etc/nullmailer/me", "w") as f:
        f.write("sender.test\n")
    for two, tls, setting in ((False, False, "default"), (False, True, "`--starttls` in remotes"),
                              (True, False, "two destinations"), (True, True, "two destinations, `--starttls`")):
        for mode, _ in MODES:
            verdict, detail = nullmailer_send(r, mode, two, tls)
            record("nullmailer", ver, setting, mode, verdict, detail)
            if mode == "rcpt" and not two and not tls:
                checks.append(("nullmailer default [rcpt] returns the mail at once",
                               verdict == "returned at once", detail))


def nullmailer_send(r, mode, two, tls):
    """One message through nullmailer-send, run in the foreground for its
    first pass over a queue that holds only this message."""
    for sub in ("queue", "failed", "tmp"):
        path = os.path.join(NULLMAILER_SPOOL, sub)
        for entry in os.listdir(path) if os.path.isdir(path) else []:
            os.remove(os.path.join(path, entry))
    # --insecure: the sink's certificate is made for the run; smtp521 never
    # gets that far.
    options = f" smtp --port={r.port[mode]}" + (" --starttls --insecure" if tls else "")
    with open("/etc/nullmailer/remotes", "w") as f:
        f.write(f"127.0.0.1{options}\n" + (f"127.0.0.2{options}\n" if two else ""))
    rcpt = recipient(f"{mode}.test.invalid")
    p = run(["/usr/sbin/sendmail", "-f", SENDER, rcpt], input=MESSAGE.decode(), timeout=60)
    assert p.returncode == 0, p.stderr
    out = []
    proc = subprocess.Popen(["nullmailer-send"], user="mail", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # Its first pass ends with "Delivery complete, N message(s) remain."
        reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
        reader.start()
        wait_for(lambda: any(line.startswith("Delivery complete") for line in out), 60)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    said = [line.strip() for line in out if line.startswith(("smtp: ", "Sending failed"))]
    detail = " / ".join(said) or "".join(out)[-200:]
    if rcpt in r.delivered:
        return "moved to the 2nd host", detail
    if any(line.startswith("Generating bounce") for line in out):
        return "returned at once", detail
    queued = any(rcpt in open(os.path.join(NULLMAILER_SPOOL, "queue", name), errors="replace").read()
                 for name in os.listdir(os.path.join(NULLMAILER_SPOOL, "queue")))
    return ("deferred" if queued else "gone from the queue"), detail


# ------------------------------------------------------------ the daemons

POLICY = "/usr/sbin/policy-rc.d"


def hold_daemons():
    """An MTA's maintainer scripts start its daemon on port 25, unless
    policy-rc.d says no (invoke-rc.d(8)): where the machine has no policy
    of its own, one for the run keeps the MTAs' daemons from starting (the
    suite starts what it uses, on ports of its own).  Returns the file to
    remove at the end, or None."""
    if os.path.lexists(POLICY):
        return None
    with open(POLICY, "w") as f:
        f.write("#!/bin/sh\n# smtp521's test/interop/interop.py, for its run: no MTA daemon starts.\n"
                'case "$1" in postfix|exim4|opensmtpd|sendmail|courier-*|dma|nullmailer) exit 101;; esac\n'
                "exit 0\n")
    os.chmod(POLICY, 0o755)
    return POLICY


# ------------------------------------------------------------ the table

# Untracked, generated: each release's rows (make interop on it), the
# README's table of all of them, and the senders' own words.
OUT = os.path.join(TEST, "interop")
RESULTS = os.path.join(OUT, f"results-{RELEASE}.json")
MODE_TITLES = {"rcpt": "rcpt (default)", "greeting": "`-r greeting`", "close": "`-c`", "helo": "`-r helo`"}


def short(verdict):
    """A cell: the verdict in a few words.  A direct client has no queue:
    it fails at once, unless it says 'try again later' (msmtp's 75)."""
    for start, cell in (("returned at once", "returned at once"), ("moved", "moved"),
                        ("deferred", "**deferred**"), ("fails at once (exit 75)", "**fails, temporary**"),
                        ("fails at once", "fails at once")):
        if verdict.startswith(start):
            return cell
    return verdict


def load_results():
    """{release: rows} of every results-*.json there is."""
    results = {}
    for name in sorted(os.listdir(OUT)):
        m = re.fullmatch(r"results-(\d+)\.json", name)
        if m:
            with open(os.path.join(OUT, name)) as f:
                results[m.group(1)] = [tuple(row) for row in json.load(f)]
    return dict(sorted(results.items(), key=lambda kv: int(kv[0])))


# The MTAs first: what a host's mail comes from.
SENDERS = ["Postfix", "Exim", "OpenSMTPD", "sendmail", "nullmailer", "swaks", "msmtp", "curl", "python smtplib"]


def table(results):
    """The README's table: a row per sender and setting, a column per mode;
    a cell that differs between releases names each; a sender's settings
    that every cell treats alike share a row."""
    releases = list(results)
    # The stand-in's rows, a measurement, are in interop-words.md only.
    modes = [m for m, _ in MODES if m != STANDIN]
    keys, versions, cells, relay = [], {}, {}, {}
    for release, rows_ in results.items():
        for sender, ver, setting, mode, verdict, words in rows_:
            if mode == STANDIN:
                continue
            if mode == "-":
                relay.setdefault(words, []).append(release)
                continue
            if (sender, setting) not in keys:
                keys.append((sender, setting))
            versions[sender, release] = ver
            cells.setdefault((sender, setting, mode), {})[release] = short(verdict)
    keys.sort(key=lambda k: SENDERS.index(k[0]) if k[0] in SENDERS else len(SENDERS))
    lines = {}  # (sender, the row's cells): its settings
    for sender, setting in keys:
        row = []
        for mode in modes:
            by = cells.get((sender, setting, mode), {})
            values = set(by.values())
            row.append(next(iter(values)) if len(values) == 1 and len(by) == len(releases) else
                       "; ".join(f"{r}: {by.get(r, '-')}" for r in releases))
        lines.setdefault((sender, tuple(row)), []).append(setting)
    out = ["| sender | setting | " + " | ".join(f"Debian {r}" for r in releases) + " | " +
           " | ".join(MODE_TITLES[m] for m in modes) + " |",
           "|---" * (2 + len(releases) + len(modes)) + "|"]
    for (sender, row), settings in lines.items():
        line = [sender, " and ".join(filter(None, [", ".join(settings[:-1]), settings[-1]]))] + [versions.get((sender, r), "-") for r in releases] + list(row)
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |")
    for words_, where in relay.items():
        out.append("")
        out.append("Postfix's smtpd as the MX relay (smtp521(8)'s `check_recipient_access` recipe), Debian "
                   f"{' and '.join(where)}: {words_}")
    return "\n".join(out) + "\n"


def words(results):
    """Every row with what the sender said, per release: the file
    interop-words.md, which the README's table points to."""
    out = []
    if any(row[3] == STANDIN for rows_ in results.values() for row in rows_):
        out += [f"Mode {STANDIN}: not smtp521 but interop.py's stand-in, which offers STARTTLS and refuses it "
                "with 521 5.3.2 (SMTP521_INTEROP_STARTTLS=1), measured to decide whether smtp521 should.", ""]
    for release, rows_ in results.items():
        out += [f"## Debian {release}", "", "| sender | version | setting | smtp521 mode | verdict | "
                "what the sender reports |", "|---|---|---|---|---|---|"]
        out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows_]
        out.append("")
    return "\n".join(out)


def render():
    results = load_results()
    for name, text in (("interop-table.md", table(results)), ("interop-words.md", words(results))):
        with open(os.path.join(OUT, name), "w") as f:
            f.write(text)
    return results


# ------------------------------------------------------------ main

def main(binary):
    started = time.monotonic()
    packages, files, created = package_states(), mail_files(), backup_created()
    r = None
    policy = hold_daemons()
    try:
        # swaks --tls needs Net::SSLeay, which swaks only recommends.
        apt_install("swaks", "libnet-ssleay-perl", "msmtp", "curl")
        r = Responders(binary)
        phases = [("direct clients", lambda: direct_clients(r)), ("Postfix", lambda: postfix_phase(r, binary)),
                  ("Exim", lambda: exim_phase(r)), ("OpenSMTPD", lambda: opensmtpd_phase(r)),
                  ("sendmail", lambda: sendmail_phase(r)), ("nullmailer", lambda: nullmailer_phase(r))]
        # For work on some phases: SMTP521_INTEROP_ONLY=Exim,sendmail (the
        # results file then holds their rows only).
        only = os.environ.get("SMTP521_INTEROP_ONLY")
        phases = [phase for phase in phases if only is None or phase[0] in only.split(",")]
        try:
            for name, phase in phases:
                print(f"---- {name}")
                sys.stdout.flush()
                phase_start = time.monotonic()
                try:
                    phase()
                except Exception as e:  # noqa: BLE001 -- a phase that breaks is a failed check
                    checks.append((f"{name} phase ran", False, repr(e)))
                print(f"     {name}: {time.monotonic() - phase_start:.0f} s")
        finally:
            r.stop()
    finally:
        # Before the put-back: an MTA it reinstalls starts as it did.
        if policy:
            os.remove(policy)
        print("---- putting the machine back")
        sys.stdout.flush()
        try:
            put_back(packages, files, created)
        except Exception as e:  # noqa: BLE001 -- as for a phase
            checks.append(("machine put back", False, repr(e)))
    # Nothing that changes from run to run: no responder port, no queue id.
    ports = [str(port) for port in (r.port.values() if r else [])]
    varying = [row for row in rows if any(re.search(rf"(?<!\d){port}(?!\d)", " ".join(row)) for port in ports)
               or re.search(r"\b\d\d:\d\d:\d\d\b|\b[0-9A-Za-z]{8}\d{6}\b", " ".join(row))]
    checks.append(("the table records no port, time or queue id", not varying, varying))
    with open(RESULTS, "w") as f:
        json.dump(rows, f, indent=0)
    print(table(render()))
    passed = failed = 0
    for name, ok, detail in checks:
        if ok:
            passed += 1
            print(f"ok   interop: {name}")
        else:
            failed += 1
            print(f"FAIL interop: {name}\n     {str(detail)[:400]}")
    print(f"interop: {time.monotonic() - started:.0f} s on Debian {RELEASE}")
    return passed, failed


if __name__ == "__main__":
    if sys.argv[1:] == ["--render"]:
        # The table from the results there are (this release's, and one
        # copied from another release's run: test/scripts/interop-in).
        print(table(render()))
        sys.exit(0)
    p, f = main(os.path.abspath(sys.argv[1]) if sys.argv[1:] else os.path.join(ROOT, "smtp521"))
    print(f"{p} passed, {f} failed")
    sys.exit(1 if f else 0)
