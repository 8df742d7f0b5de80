"""Catch2 programs as pytest items: one item per test case and build.  Each
program runs once, with Catch2's XML reporter; an item fails with its failed
expressions, or, if the program crashed before reaching it (a sanitizer
finding), with its output.  test/unit/test_unit.py runs the session core's
program this way, test/binary/test_seccomp.py the filter's."""
import functools
import os
import subprocess
import xml.etree.ElementTree as ET

import pytest

from harness import ROOT, TEST


def case_names(path):
    # Catch2 v2 lists names with --list-test-names-only; v3 dropped it for
    # --list-tests at quiet verbosity.
    for flags in (["--list-test-names-only"], ["--list-tests", "--verbosity", "quiet"]):
        p = subprocess.run([path] + flags, capture_output=True, text=True, timeout=60)
        if p.returncode == 0 or p.stdout.strip():
            return [line.strip() for line in p.stdout.splitlines() if line.strip()]
    raise AssertionError(f"{path} lists no test case: {p.stderr.strip()}")


def params(config, programs):
    """pytest.param(path, case) for each case of programs[build] (a path
    relative to the top of the tree) of every build --build names."""
    out = []
    for build in [b.strip() for b in config.getoption("build").split(",")]:
        if build not in programs:
            continue
        rel = programs[build]
        path = os.path.join(ROOT, rel)
        label = f"{build}-{os.path.basename(rel)}"
        # Decided before the program is run to list its cases: one that
        # is not built is one skipped item that says why.
        if not os.access(path, os.X_OK):
            out.append(pytest.param(path, None, id=label,
                                    marks=pytest.mark.skip(reason=f"{rel} is not built (make {rel})")))
            continue
        out += [pytest.param(path, name, id=f"{label}-{name}") for name in case_names(path)]
    return out


def parametrize(metafunc, programs):
    """pytest_generate_tests of a suite whose test takes (program, case)."""
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("program, case", params(metafunc.config, programs))


@functools.lru_cache(maxsize=None)
def run(path):
    """Run the program once: {test case name: failure text or None}, and its output."""
    # test/unit/unit.cpp replays the scripted sessions of test/sessions.
    env = dict(os.environ, SMTP521_SESSIONS=os.path.join(TEST, "sessions"))
    p = subprocess.run([path, "-r", "xml"], capture_output=True, text=True, timeout=600, env=env)
    results = {}
    try:
        root = ET.fromstring(p.stdout)
    except ET.ParseError:
        return results, p
    for tc in root.iter("TestCase"):
        failures = []
        for expr in tc.iter("Expression"):
            if expr.get("success") == "false":
                failures.append(f"{expr.get('filename')}:{expr.get('line')}: {expr.get('type')}"
                                f"({(expr.findtext('Original') or '').strip()}) with expansion "
                                f"{(expr.findtext('Expanded') or '').strip()}")
        for tag in ("FatalErrorCondition", "Exception"):
            for e in tc.iter(tag):
                failures.append(f"{e.get('filename')}:{e.get('line')}: {tag}: {(e.text or '').strip()}")
        ok = tc.find("OverallResult")
        if ok is not None and ok.get("success") == "true":
            results[tc.get("name")] = None
        else:
            results[tc.get("name")] = "\n".join(failures) or "failed"
    return results, p


def check(path, case):
    """Fail the current item unless `case` of the program at `path` passed."""
    results, p = run(path)
    if case not in results:
        pytest.fail(f"no result for this test case: {os.path.relpath(path, ROOT)} exited {p.returncode}\n"
                    f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}", pytrace=False)
    if results[case]:
        pytest.fail(results[case], pytrace=False)
    assert p.returncode == 0 or any(results.values()), f"exit {p.returncode}\n{p.stderr[-3000:]}"
