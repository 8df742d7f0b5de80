"""The documents against the program: the man page documents what the
compiled binary prints and does (its --help, its exit statuses, its log
line, its end reasons, its seccomp filter), points to inetd.conf.example, and
is the one home of the listen-address drop-in; the README stays a short
pointer.  Facts are taken from the binary or from its compiled tables,
never from the source text.  Run with
    /usr/bin/python3 -m pytest -q test/binary/test_docs.py"""
import os
import re
import shlex
import subprocess

import pytest

from harness import LOG_FIELDS, ROOT, TEST, SESSION_IN, check_default_file, crlf, fields, free_port


def read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


MAN = read("man", "smtp521.8")


def literal_blocks(man):
    """The text of every .Bd -literal ... .Ed display of the page."""
    return [m.group(1).splitlines() for m in re.finditer(r"^\.Bd -literal[^\n]*\n(.*?)^\.Ed$", man, re.M | re.S)]


def section(man, title):
    """The source of the .Sh or .Ss called `title`, up to the next one."""
    m = re.search(rf"^\.S[sh] {re.escape(title)}\n(.*?)(?=^\.S[sh] |\Z)", man, re.M | re.S)
    assert m, f"no section {title!r}"
    return m.group(1)


def option_items(man):
    """{"-t": source of its .It item} for the options list of DESCRIPTION."""
    items = re.findall(r"^\.It Fl (\w)\b[^\n]*?Fl \\-[\w-]+[^\n]*\n(.*?)(?=^\.It |^\.El)", man, re.M | re.S)
    return {f"-{letter}": body for letter, body in items}


# ------------------------------------------------------------ the compiled tables

@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """What the compiled program holds: its end reasons' log names and the
    system calls its filter allows, by name (this machine's numbering)."""
    cxx = os.environ.get("CXX", "g++")
    work = tmp_path_factory.mktemp("tables")
    src = work / "tables.cpp"
    src.write_text(
        "#define SMTP521_NO_MAIN\n"
        f'#include "{os.path.join(ROOT, "smtp521.cpp")}"\n'
        "int main() {\n"
        "    for (const auto& r : smtp521::end_reasons)\n"
        "        std::printf(\"end %.*s\\n\", static_cast<int>(r.name.size()), r.name.data());\n"
        "    for (int nr : smtp521::allowed_syscalls) std::printf(\"call %d\\n\", nr);\n"
        "    std::printf(\"call %d\\n\", smtp521::sendto_unaddressed);\n"
        "    std::printf(\"alarm %d\\nwait %d\\ndrain %lld\\ndrained %zu\\n\", smtp521::backstop_seconds,\n"
        "                smtp521::backstop_wait_seconds, smtp521::drain_ms, smtp521::drain_bytes);\n"
        "}\n")
    subprocess.run([cxx, "-std=c++17", "-DSMTP521_VERSION=\"docs\"", "-o", str(work / "tables"), str(src)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(work / "tables")], check=True, capture_output=True, text=True).stdout
    # __NR_<name> <number>, as the C library's headers define them here.
    macros = subprocess.run([cxx, "-E", "-dM", "-x", "c", "-"], input="#include <sys/syscall.h>\n",
                            check=True, capture_output=True, text=True).stdout
    names = {int(n): name for name, n in re.findall(r"^#define __NR_(\w+) (\d+)$", macros, re.M)}
    lines = [line.split(" ", 1) for line in out.splitlines()]
    return {"end": [v for k, v in lines if k == "end"],
            "calls": [names[int(v)] for k, v in lines if k == "call"],
            **{k: int(v) for k, v in lines if k in ("alarm", "wait", "drain", "drained")}}


def test_man_page_documents_every_end_reason(tables):
    names = tables["end"]
    assert "quit" in names and "alarm" in names, names
    end = re.search(r"^\.It Cm end\n(.*?)(?=^\.It Cm )", section(MAN, "LOGGING"), re.M | re.S).group(1)
    documented = set(re.findall(r"^\.Cm ([\w-]+)", end, re.M))
    assert documented == set(names) - {"none"}, documented ^ (set(names) - {"none"})


def test_man_page_lists_the_filters_calls(tables):
    calls = tables["calls"]
    assert "read" in calls and "write" in calls, calls
    listed = re.search(r"The filter allows only the calls a session makes: (.*?);", MAN, re.S).group(1)
    listed = set(re.findall(r"\w+", re.sub(r"\(.*?\)", "", listed, flags=re.S))) - {"and"}
    assert listed == set(calls), listed ^ set(calls)


def test_the_times_past_the_deadline_are_the_programs(tables):
    # The alarm, its wait for the log, and so the most a process outlives
    # its deadline, which the unit's RuntimeMaxSec= must allow for.
    words = {1: "a second", 2: "2 seconds", 3: "3 seconds"}
    man = " ".join(MAN.split())
    alarm, wait = tables["alarm"], tables["wait"]
    assert f"an alarm {words[alarm]} after the deadline" in man, (alarm, man)
    assert f"waited at most {words[wait]} for the log" in man, (wait, man)
    assert f"at most {words[alarm + wait]} after its deadline" in man
    service = " ".join(read("smtp521@.service").replace("#", " ").split())
    assert f"at most {alarm + wait} s later" in service
    runtime = int(re.search(r"^RuntimeMaxSec=(\d+)$", read("smtp521@.service"), re.M).group(1))
    assert f"above {runtime - alarm - wait} needs" in man, runtime
    # The drain before close.
    assert tables["drain"] == 500 and "at most half a second" in man, tables["drain"]
    assert f"and {tables['drained'] // 1024} KiB" in man and tables["drained"] % 1024 == 0, tables["drained"]


# ------------------------------------------------------------ the binary's own output

def test_man_page_documents_the_log_fields_in_the_order_the_binary_writes_them(smtp521):
    p = subprocess.run([smtp521, "-H", "mx.test", "-l", "stderr"], input=SESSION_IN, capture_output=True,
                       timeout=30)
    line = p.stderr.decode().strip()
    written = [f.split("=", 1)[0] for f in line.split(" ")]
    assert written == LOG_FIELDS, line
    assert fields(line)["end"] == "quit", line
    logging = section(MAN, "LOGGING")
    documented = [f for f in re.findall(r"^\.It Cm ([\w-]+)$", logging, re.M)]
    assert documented == written, documented


def test_man_page_documents_every_exit_status(smtp521):
    statuses = {subprocess.run([smtp521] + args, input=b"QUIT\r\n", capture_output=True, timeout=30).returncode
                for args in (["-l", "none"], ["-h"], ["-V"], ["--bogus"], ["-t", "0"], ["extra"], ["-C", "-l", "none"],
                             ["-C", "-t", "0"])}
    assert statuses == {0, 64}, statuses
    documented = set(int(s) for s in re.findall(r"^\.It (\d+)$", section(MAN, "EXIT STATUS"), re.M))
    assert documented == statuses, documented


def test_man_page_gives_every_default_and_range_of_help(smtp521):
    # Each number and quoted default that --help gives for an option is in
    # that option's item of the man page.
    help_text = subprocess.run([smtp521, "--help"], capture_output=True, text=True, check=True).stdout
    entries = re.findall(r"^  (-\w), --[\w-]+(?: [A-Z]+)?\s+(.*?)(?=^  -|^\S|\Z)", help_text, re.M | re.S)
    items = option_items(MAN)
    assert {o for o, _ in entries} == set(items), (entries, items.keys())
    checked = 0
    for option, text in entries:
        text = " ".join(text.split())
        wanted = re.findall(r"\d+", text) + re.findall(r'"([^"]+)"', text)
        for value in wanted:
            assert value in " ".join(items[option].split()), (option, value)
            checked += 1
    assert checked >= 6, checked


@pytest.mark.needs("debian")
def test_man_page_says_the_last_of_c_and_r_wins(smtp521):
    # What the binary does ...
    out = lambda *args: subprocess.run([smtp521, "-H", "mx.test", "-l", "none", *args], input=b"QUIT\r\n",
                                       capture_output=True, timeout=30).stdout
    assert out("-r", "rcpt", "-c").startswith(b"521 ") and out("-c", "-r", "rcpt").startswith(b"220 ")
    # ... is what every document says.
    assert "the last of them wins" in " ".join(MAN.split())
    default = read("debian", "smtp521.default")
    assert "last of them wins" in " ".join(default.split()) and "implies" not in default


def test_default_file_has_one_options_line_and_every_option():
    # What the package installs as /etc/default/smtp521 (test_package checks
    # the installed copy the same way).
    check_default_file(read("debian", "smtp521.default"))


# ------------------------------------------------------------ files the page quotes

def example():
    lines = read("inetd.conf.example").splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def test_man_page_points_to_the_example_for_each_server():
    # The example is the one home of the inet family's lines, the xinetd
    # stanza and the tcpsvd line (test_superservers runs them from there):
    # the page names each server and quotes none of them.
    text = " ".join(section(MAN, "inetd, xinetd, tcpsvd").split())
    for server in ("openbsd-inetd", "inetutils-inetd", "rlinetd", "xinetd", "tcpsvd", "busybox"):
        assert server in text, server
    assert "inetd.conf.example" in text
    for line in example():
        assert line not in MAN, line
    assert len(example()) == 2, example()


def test_man_page_says_which_tcpserver_listens_on_ipv6():
    # Debian ships both: ucspi-tcp listens on IPv4 only, ucspi-tcp-ipv6 on
    # both (test_superservers runs the line under each).
    text = " ".join(section(MAN, "tcpserver").split())
    assert "IPv4 only from ucspi-tcp, IPv4 and IPv6 from ucspi-tcp-ipv6" in text, text
    assert "IPv4-only" not in MAN


@pytest.mark.needs("debian")
def test_the_listen_address_drop_in_has_one_home():
    # The man page has it; the README, README.Debian and the postinst
    # message point to that section, and write no drop-in of their own.
    block = [b for b in literal_blocks(section(MAN, "Listening on one address")) if "[Socket]" in b]
    assert len(block) == 1, block
    assert {"ListenStream=", "ListenStream=192.0.2.1:25", "FreeBind=yes"} <= set(block[0]), block
    for path in (("README.md",), ("debian", "README.Debian"), ("debian", "postinst")):
        text = " ".join(read(*path).split())
        assert '"Listening on one address"' in text, path
        assert "ListenStream=" not in text and "listen.conf" not in text, path


# ------------------------------------------------------------ the version

@pytest.mark.needs("debian")
def test_debian_changelog_agrees_with_version(smtp521):
    # VERSION is the version's home ("1.0.0 2026-12-02": version, release
    # date); Debian's changelog names it plus a revision, and the program
    # says it.
    version, date = read("VERSION").split()
    assert re.fullmatch(r"\d+(\.\d+)+", version) and re.fullmatch(r"\d{4}-\d\d-\d\d", date), (version, date)
    first = read("debian", "changelog").splitlines()[0]
    m = re.match(r"smtp521 \((?:\d+:)?(.+)-([^-]+)\) ", first)
    assert m, f"debian/changelog: {first!r} is not `smtp521 (UPSTREAM-REVISION) ...`"
    assert m.group(1) == version, f"debian/changelog is at {m.group(1)}, VERSION at {version}"
    out = subprocess.run([smtp521, "--version"], capture_output=True, text=True, check=True).stdout
    assert out == f"smtp521 {version}\n", out


# ------------------------------------------------------------ the page itself

@pytest.mark.needs("man")
def test_man_page_fits_its_reader():
    # A sysadmin's page: at most 300 lines at 80 columns; the numbers live
    # in test/bench/RESULTS.md, which is not installed: the page does not
    # cite it, and the installed units cite it as the source's.
    env = dict(os.environ, LC_ALL="C.UTF-8", MANROFFSEQ="", MANWIDTH="80", MANPAGER="cat", PAGER="cat")
    out = subprocess.run(["man", "-l", os.path.join(ROOT, "man", "smtp521.8")],
                         capture_output=True, text=True, check=True, env=env).stdout
    assert len(out.splitlines()) <= 300, len(out.splitlines())
    assert os.path.exists(os.path.join(TEST, "bench", "RESULTS.md"))
    assert "test/" not in MAN and "RESULTS" not in MAN
    for unit in ("smtp521.socket", "smtp521@.service", "smtp521.slice"):
        text = " ".join(read(unit).replace("#", " ").split())
        assert text.count("test/bench/RESULTS.md") == text.count("source, test/bench/RESULTS.md") + \
            text.count("source's test/bench/RESULTS.md"), unit


@pytest.mark.needs("mandoc")
def test_man_page_is_lint_clean():
    p = subprocess.run(["mandoc", "-Tlint", "-Wwarning", os.path.join(ROOT, "man", "smtp521.8")],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p.stdout + p.stderr


@pytest.mark.needs("man")
def test_man_page_renders_without_groff_warnings():
    # What lintian's groff-message check runs: man-db's groff at 80 columns.
    # mandoc -Tlint does not see a table cell too wide to break.
    env = dict(os.environ, LC_ALL="C.UTF-8", MANROFFSEQ="", MANWIDTH="80")
    p = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z",
                        os.path.join(ROOT, "man", "smtp521.8")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_readme_is_short_and_points_to_the_man_page():
    readme = read("README.md")
    assert len(readme.splitlines()) <= 150, len(readme.splitlines())
    assert "Why the default greets with 220" not in readme
    assert "man 8 smtp521" in readme or "smtp521(8)" in readme
    # make readme splices the interop table between these markers.
    assert readme.count("<!-- interop:begin -->\n") == 1 and readme.count("<!-- interop:end -->") == 1


def test_quickstart_prints_the_readmes_two_commands_and_nothing_else():
    # CI and make check-in run the README's commands through
    # test/scripts/quickstart: it prints each, and fails past the last.
    block = re.search(r"^## Quick start\n.*?^```sh\n(.*?)^```$", read("README.md"), re.M | re.S).group(1)
    lines = block.splitlines()
    assert len(lines) == 2, lines
    script = os.path.join(TEST, "scripts", "quickstart")
    for n, line in enumerate(lines, 1):
        p = subprocess.run([script, str(n)], capture_output=True, text=True, timeout=30, cwd="/")
        assert p.returncode == 0 and p.stdout == line + "\n", (n, p)
    p = subprocess.run([script, "3"], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and p.stdout == "" and "no line 3" in p.stderr, p


def test_readme_shows_what_the_binary_prints(smtp521):
    # The README's sample session is the binary's output (the duration aside).
    readme = read("README.md")
    block = re.search(r"^```\n\$ printf '(.*?)' \| \./smtp521 (.*?)\n(.*?)^```$", readme, re.M | re.S)
    assert block, "no sample session in README.md"
    session = block.group(1).encode().decode("unicode_escape").encode()
    p = subprocess.run([smtp521] + block.group(2).split(), input=session, capture_output=True, timeout=30)
    shown = block.group(3).splitlines()
    printed = p.stdout.decode().split("\r\n")[:-1] + p.stderr.decode().splitlines()
    duration = re.compile(r"duration=\d+\.\d+")
    assert [duration.sub("duration=-", line) for line in printed] == [duration.sub("duration=-", line) for line in shown]


# ------------------------------------------------------------ the README's deploy and verify

def deploy_section():
    m = re.search(r"^## Deploy and verify\n(.*?)(?=^## )", read("README.md"), re.M | re.S)
    assert m, "no section 'Deploy and verify' in README.md"
    return m.group(1)


def deploy_commands():
    """The command lines of each sh block of the section."""
    blocks = re.findall(r"^ *```sh\n(.*?)^ *```$", deploy_section(), re.M | re.S)
    assert len(blocks) == 2, blocks
    return [[line.strip() for line in block.splitlines()] for block in blocks]


def deployed_options():
    """The options the section checks and then installs."""
    argv = shlex.split(deploy_commands()[0][0])
    assert argv[:2] == ["smtp521", "--check"], argv
    return argv[2:]


def test_readme_deploy_section_is_first_and_names_the_rule():
    readme = read("README.md")
    assert readme.index("## Deploy and verify") < readme.index("## Quick start")
    text = " ".join(deploy_section().split())
    assert '"Choosing the mode"' in text and ".Ss Choosing the mode" in MAN
    for mode in ("-r helo", "-r greeting"):
        assert mode in text, mode


@pytest.mark.needs("devlog")
def test_readme_deploy_checks_the_options_it_then_installs(smtp521, syslog, tmp_path):
    check, echo, restart = deploy_commands()[0]
    options = deployed_options()
    # smtp521 --check, as typed on a host with syslog (journald's /dev/log).
    p = subprocess.run(syslog.prefix + [smtp521] + shlex.split(check)[1:], capture_output=True, text=True,
                       timeout=30)
    mode = options[options.index("-r") + 1] if "-r" in options else "rcpt"
    assert p.returncode == 0 and p.stdout.startswith(f"mode={mode} hostname={options[options.index('-H') + 1]} "), p
    # The echo writes the same options, as the one SMTP521_OPTS line of
    # /etc/default/smtp521, which systemd splits as sh does here.
    m = re.fullmatch(r"echo '(SMTP521_OPTS=\"[^\"']*\")' > /etc/default/smtp521", echo)
    assert m, echo
    written = tmp_path / "smtp521"
    subprocess.run(["sh", "-c", echo.replace("/etc/default/smtp521", str(written))], check=True)
    value = re.fullmatch(r'SMTP521_OPTS="(.*)"\n', written.read_text()).group(1)
    assert shlex.split(value) == options, (value, options)
    # The restart runs the socket's check (test_deploy: the ExecStartPre=
    # is the service's command line with --check; test_systemd_confinement:
    # a bad option fails the restart).
    assert restart == "systemctl restart smtp521.socket", restart
    assert re.search(r"^ExecStartPre=/usr/local/sbin/smtp521 --check ", read("smtp521.socket"), re.M)


@pytest.mark.needs("tool:swaks", "tool:nc", "systemd-socket-activate")
def test_readme_deploy_verifies_from_another_host(smtp521, server):
    # The section's swaks and nc lines, against smtp521 run with its
    # options by a super-server on a loopback port instead of HOST:25.
    swaks, nc = deploy_commands()[1]
    options = deployed_options()
    host = options[options.index("-H") + 1]
    port = free_port()
    server(["systemd-socket-activate", "--inetd", "-a", "-l", f"127.0.0.1:{port}", smtp521, "-l", "none"] + options,
           port)
    assert f"--server {host} " in swaks and nc.endswith(f"nc {host} 25"), (swaks, nc)
    p = subprocess.run(shlex.split(swaks.replace(f"--server {host} ", f"--server 127.0.0.1:{port} ")),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and f"<** 521 {host} does not accept mail" in p.stdout, p
    p = subprocess.run(["sh", "-c", nc.replace(f"nc {host} 25", f"nc 127.0.0.1 {port}")], capture_output=True,
                       timeout=60)
    session = subprocess.run([smtp521, "-l", "none"] + options, input=crlf("QUIT"), capture_output=True, timeout=30)
    assert p.returncode == 0 and p.stdout == session.stdout and p.stdout.startswith(f"220 {host} ".encode()), p


def test_readme_deploy_commands_name_what_the_tree_has():
    # The section's inline commands, which only a fresh host can run
    # (install, enable, read the journal): each names a make target that
    # exists, a shipped unit, the service's log identifier, the package
    # make deb leaves here.
    prose = re.sub(r"^ *```sh\n.*?^ *```$", "", deploy_section(), flags=re.M | re.S)  # the blocks: above
    spans = [" ".join(c.split()) for c in re.findall(r"`([^`]+)`", prose, re.S)]
    commands = [c for c in spans if re.match(r"(apt-get|apt|make|systemctl|journalctl) ", c)]
    assert len(commands) >= 5, spans
    checked = set()
    for command in commands:
        for part in command.split(" && "):
            words = part.split()
            if words[0] == "make":
                p = subprocess.run(["make", "-n"] + words[1:], cwd=ROOT, capture_output=True, text=True)
                assert p.returncode == 0, (part, p.stderr)
            elif words[0] == "systemctl":
                assert words[1] in ("daemon-reload", "enable", "disable", "restart", "status"), part
                for unit in [w for w in words[2:] if not w.startswith("-")]:
                    assert os.path.exists(os.path.join(ROOT, unit)), part
                    if words[1] in ("enable", "disable"):
                        assert "\nWantedBy=sockets.target\n" in read(unit), unit
            elif words[0] == "journalctl":
                # The sessions' identifier, or the socket's check's.
                idents = [re.search(r"^SyslogIdentifier=(\S+)$", read(unit), re.M).group(1)
                          for unit in ("smtp521@.service", "smtp521.socket")]
                assert words[1] == "-t" and words[2:] and words[2] in idents and words[3:] == [], part
            elif part == "apt install ./smtp521_*.deb":
                assert re.search(r"^DEBOUT \?= \.$", read("Makefile"), re.M), "make deb leaves the .deb elsewhere"
            else:
                assert words[:2] in (["apt-get", "update"], ["apt-get", "install"], ["apt-get", "build-dep"]), part
                if words[1] == "build-dep":
                    assert words[2:] == ["-y", "./"] and os.path.exists(os.path.join(ROOT, "debian", "control"))
            checked.add(words[0])
    assert checked == {"apt-get", "apt", "make", "systemctl", "journalctl"}, checked


def test_readme_deploy_reads_the_log_as_it_is(smtp521):
    # Every field the section names is the log's; and what it says of a
    # sender that quits before RCPT is what the log line shows of one
    # (Postfix requiring TLS: EHLO, no STARTTLS offered, QUIT).
    text = deploy_section()
    named = set(re.findall(r"`(\w+)=", text))
    assert named and named <= set(LOG_FIELDS), named
    m = re.search(r"Under `mode=(\w+)`, `((?:\w+=\S+ ?)+)` is\s+a sender that quit unrefused", text)
    assert m, text
    p = subprocess.run([smtp521, "-H", "mx.test", "-l", "stderr", "-r", m.group(1)],
                       input=crlf("EHLO sender.example", "QUIT"), capture_output=True, timeout=30)
    log = fields(p.stderr.decode().strip())
    assert log["mode"] == m.group(1), log
    for field in m.group(2).split():
        key, value = field.split("=", 1)
        assert log[key] == value, (field, log)
    assert b"521" not in p.stdout, p.stdout  # unrefused
