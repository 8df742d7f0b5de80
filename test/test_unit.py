"""The Catch2 unit tests of the session core (test/unit.cpp), one pytest
item per Catch2 test case and build.  Each binary runs once, with Catch2's
XML reporter; an item fails with its failed expressions, or, if the binary
crashed before reaching it (a sanitizer finding), with its output."""
import functools
import os
import subprocess
import xml.etree.ElementTree as ET

import pytest

from harness import ROOT

# The session core (test/unit.cpp) and the confinement (test/sandbox.cpp).
# The confinement of the other architectures (test/sandbox-ARCH) runs
# under their own kernels (test_arch.py).
UNITS = {"plain": ["test/unit", "test/sandbox"], "asan": ["test/unit-asan", "test/sandbox-asan"]}


def case_names(path):
    # Catch2 v2 lists names with --list-test-names-only; v3 dropped it for
    # --list-tests at quiet verbosity.
    for flags in (["--list-test-names-only"], ["--list-tests", "--verbosity", "quiet"]):
        p = subprocess.run([path] + flags, capture_output=True, text=True, timeout=60)
        if p.returncode == 0 or p.stdout.strip():
            return [line.strip() for line in p.stdout.splitlines() if line.strip()]
    raise AssertionError(f"{path} lists no test case: {p.stderr.strip()}")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    params = []
    for build in [b.strip() for b in metafunc.config.getoption("build").split(",")]:
        for unit in UNITS[build]:
            path = os.path.join(ROOT, unit)
            label = f"{build}-{os.path.basename(unit)}"
            # Decided before the binary is run to list its cases: one that
            # is not built is one skipped item that says why.
            reason = None if os.access(path, os.X_OK) else f"{unit} is not built (make {unit})"
            if reason:
                params.append(pytest.param(path, None, id=label, marks=pytest.mark.skip(reason=reason)))
                continue
            params += [pytest.param(path, name, id=f"{label}-{name}") for name in case_names(path)]
    metafunc.parametrize("unit, case", params)


@functools.lru_cache(maxsize=None)
def run(path):
    """Run the binary once: {test case name: failure text or None}, and its output."""
    # unit.cpp replays the scripted sessions of test/sessions.
    env = dict(os.environ, SMTP521_SESSIONS=os.path.join(ROOT, "test", "sessions"))
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


def test_catch2(unit, case):
    results, p = run(unit)
    if case not in results:
        pytest.fail(f"no result for this test case: {os.path.relpath(unit, ROOT)} exited {p.returncode}\n"
                    f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}", pytrace=False)
    if results[case]:
        pytest.fail(results[case], pytrace=False)
    assert p.returncode == 0 or any(results.values()), f"exit {p.returncode}\n{p.stderr[-3000:]}"
