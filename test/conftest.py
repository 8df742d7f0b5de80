"""Fixtures and rules shared by every suite, test/KIND/test_*.py.

- `binary`: the build under test, each test run once per build (plain and
  ASan+UBSan; `--build plain` keeps one); `smtp521`: the plain build.
  SMTP521_BINARY=/usr/sbin/smtp521 makes `binary` that program instead of
  the builds (debian/tests/sessions: the installed package).
- `syslog`, `server`, `systemd`, `world_copy`: the private /dev/log, the
  super-servers, the private systemd (harness.Systemd; every suite boots
  it here), and a copy of the binary every user can run; each is stopped
  and removed after the test, failed or not.
- `@pytest.mark.needs("root", "inetd", ...)`: skip with the reason unless
  available (see harness.CAPABILITIES); each is checked once.
- Under CI=true a skip is a failure: CI must run everything, except where
  the host itself cannot (harness.HOST_LIMIT: the reason says which limit).
- pytest's temporary directories go to one directory removed at the end.
"""
import os
import shutil
import tempfile

import pytest

import harness  # test/harness, on pytest.ini's pythonpath

# "coverage": make coverage's instrumented build (test/scripts/coverage).
BUILDS = {"plain": "smtp521", "asan": "smtp521-asan", "coverage": "coverage/smtp521"}
# An installed smtp521 to test instead of the builds (an absolute path).
INSTALLED = os.environ.get("SMTP521_BINARY")

# Sanitizers fail loudly: any finding makes the process exit non-zero.
os.environ.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:exitcode=86")
os.environ.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1:exitcode=87")


def pytest_addoption(parser):
    parser.addoption("--build", default="plain,asan",
                     help="comma-separated builds to test: plain (./smtp521), asan (./smtp521-asan)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*capabilities): skip unless available (harness.CAPABILITIES)")
    if INSTALLED and not (os.path.isabs(INSTALLED) and os.access(INSTALLED, os.X_OK)):
        raise pytest.UsageError(f"SMTP521_BINARY={INSTALLED}: not an absolute path to an executable")
    if config.option.basetemp is None:
        # pytest keeps its last three temporary trees in /tmp; ours go.
        config.option.basetemp = tempfile.mkdtemp(prefix="smtp521-pytest-")
        config._smtp521_basetemp = config.option.basetemp


def pytest_unconfigure(config):
    base = getattr(config, "_smtp521_basetemp", None)
    if base:
        shutil.rmtree(base, ignore_errors=True)


def builds(config):
    names = [b.strip() for b in config.getoption("build").split(",") if b.strip()]
    unknown = set(names) - set(BUILDS)
    if unknown:
        raise pytest.UsageError(f"--build: unknown {', '.join(sorted(unknown))} ({', '.join(BUILDS)})")
    return names


def pytest_generate_tests(metafunc):
    # A module with a `binary` fixture of its own (a private systemd's
    # test runs the plain build only) keeps it.
    if "binary" in metafunc.fixturenames and not hasattr(metafunc.module, "binary"):
        if INSTALLED:
            metafunc.parametrize("binary", [INSTALLED], ids=["installed"])
            return
        names = builds(metafunc.config)
        metafunc.parametrize("binary", [os.path.join(harness.ROOT, BUILDS[n]) for n in names], ids=names)


def built(path):
    if not os.access(path, os.X_OK):
        pytest.skip(f"{os.path.relpath(path, harness.ROOT)} is not built (make {os.path.relpath(path, harness.ROOT)})")
    return path


@pytest.fixture(scope="session")
def smtp521():
    """The plain build."""
    return built(os.path.join(harness.ROOT, "smtp521"))


def pytest_collection_modifyitems(config, items):
    # What a test needs is known before it runs: mark it skipped, with the
    # reason, at its own line.
    for item in items:
        for mark in item.iter_markers("needs"):
            reasons = [harness.missing(cap) for cap in mark.args]
            reasons = [r for r in reasons if r]
            if reasons:
                item.add_marker(pytest.mark.skip(reason=reasons[0]))
        if hasattr(item, "callspec") and "binary" in item.callspec.params:
            path = item.callspec.params["binary"]
            if not os.access(path, os.X_OK):
                rel = os.path.relpath(path, harness.ROOT)
                item.add_marker(pytest.mark.skip(reason=f"{rel} is not built (make {rel})"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if reason.startswith(("Skipped: " + harness.HOST_LIMIT, harness.HOST_LIMIT)):
            return
        report.outcome = "failed"
        report.longrepr = f"CI=true: nothing may be skipped, and this was: {reason}"


@pytest.fixture(autouse=True)
def _children():
    """No smtp521 a test started outlives it."""
    try:
        yield
    finally:
        harness.Child.close_all()


@pytest.fixture
def syslog():
    """A private /dev/log (harness.Syslog)."""
    harness.need("devlog")
    log = harness.Syslog()
    try:
        yield log
    finally:
        log.close()


@pytest.fixture
def server():
    """server(argv, port, ...) -> a started harness.Server, stopped after the test."""
    started = []

    def start(argv, port, *args, **kw):
        srv = harness.Server(argv, port, *args, **kw)
        started.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in started:
            srv.stop()


@pytest.fixture
def systemd(smtp521):
    """systemd(unitdir, binary=plain build, wrapper=None) -> a booted
    harness.Systemd, the tests' one private systemd; killed after the
    test, its console printed, and unitdir removed."""
    harness.need("systemd")
    booted = []

    def boot(unitdir, binary=smtp521, wrapper=None):
        booted.append((None, unitdir))
        sd = harness.Systemd(unitdir, binary, wrapper=wrapper)
        booted[-1] = (sd, unitdir)
        return sd

    try:
        yield boot
    finally:
        for sd, unitdir in booted:
            if sd:
                sd.stop()
            shutil.rmtree(unitdir, ignore_errors=True)


@pytest.fixture
def world_copy():
    """world_copy(binary) -> a copy in a directory every user can reach
    (inetd runs it as nobody; the work tree may be private)."""
    dirs = []

    def copy(binary):
        d = tempfile.mkdtemp(prefix="smtp521-bin-")
        dirs.append(d)
        os.chmod(d, 0o755)
        path = os.path.join(d, "smtp521")
        shutil.copy(binary, path)
        os.chmod(path, 0o755)
        return path

    try:
        yield copy
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
