"""The seccomp tests can fail: built with a confine() that installs no
filter yet reports success (-DSMTP521_TEST_NO_FILTER, a switch only this
test sets), smtp521 and test/unit/seccomp fail every test of
test_seccomp.py that ran, but the controls named below, which test what
the filter lets through."""
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from harness import ROOT

# What passes without a filter, by design: that the filter lets the
# session's own calls through (and those the kernel makes it call after a
# stop, a tracer or the freezer; the backstop's send on its connected
# socket, and its alarm, armed before syslog's connect), and that ASan
# still reports under it.
CONTROLS = ("the filter lets the session's own calls through",
            "under the filter, AddressSanitizer still reports",
            "restart_syscall, which the kernel makes a stopped poll() call, is allowed",
            "test_a_stopped_traced_or_frozen_session_still_answers",
            "test_the_backstop_reaches_syslog_through_its_connected_socket",
            "test_the_backstop_reaches_a_stream_syslog",
            "test_a_stream_syslog_that_accepts_no_one_cannot_hold_a_session")


def tracked_tree(dest):
    """The files git tracks or would track (as in the work tree), not the
    build products; in an unpacked release tarball, which has no git, the
    files its MANIFEST names (make dist)."""
    if os.path.isdir(os.path.join(ROOT, ".git")) or not os.path.exists(os.path.join(ROOT, "MANIFEST")):
        names = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               capture_output=True, check=True).stdout.decode().split("\0")
    else:
        with open(os.path.join(ROOT, "MANIFEST")) as f:
            names = f.read().splitlines()
    for name in names:
        if name and os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))


@pytest.mark.needs("tool:git", "tool:make", "strace")
def test_the_seccomp_tests_fail_without_the_filter(tmp_path):
    src = tmp_path / "src"
    tracked_tree(str(src))
    subprocess.run(["make", "-s", "-C", str(src), "CPPFLAGS=-DSMTP521_TEST_NO_FILTER", "smtp521", "test/unit/seccomp"],
                   check=True, capture_output=True, timeout=600)
    report = tmp_path / "report.xml"
    # CI=true would turn the mutant tree's skips (no ASan or i386 build
    # there) into failures, which are not the ones sought.
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--build", "plain",
                        f"--junitxml={report}", str(src / "test" / "binary" / "test_seccomp.py")],
                       capture_output=True, text=True, timeout=900, env=env, cwd=str(src))
    assert p.returncode == 1, f"pytest exit {p.returncode}, expected 1 (tests failed):\n{p.stdout[-3000:]}"
    outcome = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kind = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        outcome[name] = kind[0] if kind else "passed"
    passed = [n for n, k in outcome.items() if k == "passed" and not any(c in n for c in CONTROLS)]
    failed = [n for n, k in outcome.items() if k in ("failure", "error")]
    assert not passed, "these pass without a filter:\n" + "\n".join(passed)
    # The filter's own cases and the binary's: both kinds ran and failed.
    assert any("test_filter_case" in n for n in failed), outcome
    assert any("test_filter_case" not in n for n in failed), outcome
