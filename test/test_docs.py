"""Facts that live in two files stay equal: the man page quotes
inetd.conf.example, and documents what the binary prints.  Run with
    /usr/bin/python3 -m pytest -q test/test_docs.py"""
import os
import re
import subprocess

import pytest

from harness import LOG_FIELDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def literal_blocks(man):
    """The text of every .Bd -literal ... .Ed display of the page."""
    return [m.group(1).splitlines() for m in re.finditer(r"^\.Bd -literal[^\n]*\n(.*?)^\.Ed$", man, re.M | re.S)]


def example():
    lines = read("inetd.conf.example").splitlines()
    inetd = [line for line in lines if line and not line.startswith("#")]
    start = lines.index("# service smtp")
    stanza = [line[2:] if line.startswith("# ") else line[1:] for line in lines[start:] if line.startswith("#")]
    return inetd, stanza


def test_man_page_quotes_the_inetd_lines_of_the_example():
    inetd, _ = example()
    assert len(inetd) == 2, inetd
    assert inetd in literal_blocks(read("man", "smtp521.8")), "the man page's inetd lines differ from inetd.conf.example"


def test_man_page_quotes_the_xinetd_stanza_of_the_example():
    _, stanza = example()
    assert stanza[0] == "service smtp" and stanza[-1] == "}", stanza
    assert stanza in literal_blocks(read("man", "smtp521.8")), "the man page's xinetd stanza differs from the example"


def test_man_page_says_tcpserver_is_ipv4_only():
    man = read("man", "smtp521.8")
    section = man[man.index(".Ss tcpserver"):man.index(".Sh", man.index(".Ss tcpserver"))]
    assert "IPv4-only" in section


def test_man_page_documents_every_end_reason():
    man = read("man", "smtp521.8")
    source = read("smtp521.cpp")
    names = re.findall(r'case EndReason::\w+: return "([\w-]+)";', source)
    assert "alarm" in names, names
    for name in names:
        if name != "none":
            assert re.search(rf"^\.Cm {re.escape(name)}\b", man, re.M), name


def test_man_page_documents_the_log_fields_in_their_order():
    man = read("man", "smtp521.8")
    logging = man[man.index("\n.Sh LOGGING\n"):man.index("\n.Sh ENVIRONMENT\n")]
    documented = [f for f in re.findall(r"^\.It Cm ([\w-]+)$", logging, re.M) if f in LOG_FIELDS]
    assert documented == LOG_FIELDS, documented
    # and the source writes them in that order
    source = read("smtp521.cpp")
    body = source[source.index("void format_log("):]
    body = body[:body.index("\n}\n")]
    written = list(dict.fromkeys(re.findall(r'" ?([a-z]+)=', body)))
    assert written == LOG_FIELDS, written


def test_man_page_counts_the_filters_calls():
    source = read("smtp521.cpp")
    table = source[source.index("constexpr int allowed_syscalls[] = {"):]
    table = table[:table.index("};")]
    # x86-64 has them all (the #ifdef is for poll-less architectures)
    allowed = re.findall(r"\bSYS_(\w+)", re.sub(r"^#.*$", "", table, flags=re.M))
    man = read("man", "smtp521.8")
    assert f"The filter allows {len(allowed)} calls" in man, allowed
    listed = re.search(r"The filter allows only the calls a session makes: (.*?)\.\n", man, re.S).group(1)
    assert set(re.findall(r"\w+", listed)) - {"and"} == set(allowed), (listed, allowed)


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


def test_readme_keeps_the_rationale_short_and_points_to_the_man_page():
    readme = read("README.md")
    assert "Why the default greets with 220" not in readme
    assert "man 8 smtp521" in readme or "smtp521(8)" in readme
