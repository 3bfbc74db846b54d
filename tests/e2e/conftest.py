"""Fixtures for the network-namespace lab (``pytest tests/e2e -m e2e``, as root).

The ``lab`` fixture gives a test a fresh :class:`nslab.lab.Lab`; :func:`module_lab` gives a
module one lab shared by its tests (the scenario modules: reset between tests by the module).
Namespaces, daemons and temporary files are removed when the test (module) ends, pass or fail;
on failure the tail of every daemon's log is printed and the work directory is kept.

At the end of the run the scenarios' measured figures are printed as one table
(:mod:`nslab.report`), with the lab's runtime (setup, tests and teardown of every e2e test).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nslab import report  # noqa: E402
from nslab.fixtures import close_lab, require_lab  # noqa: E402
from nslab.lab import Lab  # noqa: E402
from nslab.proc import interrupt_on_sigterm  # noqa: E402

_E2E_SECONDS: list[float] = []

@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def lab_requirements() -> None:
    require_lab()


@pytest.fixture
def lab(request, lab_requirements):  # type: ignore[no-untyped-def]
    """A two-proxy lab; torn down after the test, logs printed when it failed."""
    marker = request.node.get_closest_marker("lab")
    options = dict(marker.kwargs) if marker else {}
    instance = Lab(**options)
    instance.open()
    try:
        yield instance
    finally:
        failed = any(
            getattr(request.node, f"rep_{when}", None) is not None
            and getattr(request.node, f"rep_{when}").failed
            for when in ("setup", "call")
        )
        close_lab(instance, failed=failed)


def pytest_configure(config):  # type: ignore[no-untyped-def]
    interrupt_on_sigterm()
    config.addinivalue_line("markers", "lab(**options): options for the lab fixture "
                            "(proxies=, client_to_db=, tunnel_user=)")


def pytest_runtest_logreport(report):  # type: ignore[no-untyped-def]
    if "e2e" in report.keywords:
        _E2E_SECONDS.append(report.duration)


def pytest_terminal_summary(terminalreporter):  # type: ignore[no-untyped-def]
    runtime = sum(_E2E_SECONDS) if _E2E_SECONDS else None
    table = report.render(runtime_s=runtime)
    if table:
        terminalreporter.section("tunnelhub lab report")
        terminalreporter.write_line(table)
    path = report.report_path()
    if path is not None and report.RECORDS:
        report.save(path, runtime_s=runtime)
        terminalreporter.write_line(f"(figures written to {path})")
