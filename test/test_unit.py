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
# The confinement also on i386, where the filter has socketcall(2) rules.
UNITS = {"plain": ["test/unit", "test/sandbox", "test/sandbox-i386"], "asan": ["test/unit-asan", "test/sandbox-asan"]}


def case_names(path):
    if not os.access(path, os.X_OK):
        return []
    p = subprocess.run([path, "--list-test-names-only"], capture_output=True, text=True, timeout=60)
    return [line for line in p.stdout.splitlines() if line.strip()]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    params = []
    for build in [b.strip() for b in metafunc.config.getoption("build").split(",")]:
        for unit in UNITS[build]:
            path = os.path.join(ROOT, unit)
            label = f"{build}-{os.path.basename(unit)}"
            names = case_names(path)
            if not names:  # not built: one item that says so
                params.append(pytest.param(path, None, id=f"{label}-not-built"))
            params += [pytest.param(path, name, id=f"{label}-{name}") for name in names]
    metafunc.parametrize("unit, case", params)


@functools.lru_cache(maxsize=None)
def run(path):
    """Run the binary once: {test case name: failure text or None}, and its output."""
    p = subprocess.run([path, "-r", "xml"], capture_output=True, text=True, timeout=600)
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
    if case is None:
        pytest.skip(f"{os.path.relpath(unit, ROOT)} is not built (make {os.path.relpath(unit, ROOT)})")
    results, p = run(unit)
    if case not in results:
        pytest.fail(f"no result for this test case: {os.path.relpath(unit, ROOT)} exited {p.returncode}\n"
                    f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}", pytrace=False)
    if results[case]:
        pytest.fail(results[case], pytrace=False)
    assert p.returncode == 0 or any(results.values()), f"exit {p.returncode}\n{p.stderr[-3000:]}"
