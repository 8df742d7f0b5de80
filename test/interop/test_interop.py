"""The real-sender suite (test/interop/interop.py, also `make interop`) as pytest
results: it runs once, and each of its checks is reported as an item of its
own, `interop[<check>]`.  It installs and replaces MTAs, so it runs only
under CI=true or SMTP521_INTEROP=1, as root."""
import pytest
from _pytest.reports import TestReport

import interop


@pytest.mark.needs("interop")
def test_interop(request, smtp521):
    interop.main(smtp521)
    item = request.node
    for name, ok, detail in interop.checks:
        report = TestReport(nodeid=f"{item.nodeid}[{name}]", location=item.location, keywords={},
                            outcome="passed" if ok else "failed",
                            longrepr=None if ok else f"{name}: {str(detail)[:2000]}", when="call")
        item.ihook.pytest_runtest_logreport(report=report)
    # This item stands for the run itself; each check above is its own result.
    assert interop.checks, "interop ran no check"
