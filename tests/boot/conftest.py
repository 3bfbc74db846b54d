"""Fixtures of the boot scenarios (``make boot``: ``pytest tests/boot -m boot -s``, as root).

The booted lab reuses the network-namespace lab (``tests/e2e/nslab``) for namespaces, MariaDB,
the load balancers and the query driver, and adds the machines (``nslab.machine``), the fake
cloud (``nslab.fakecloud``) and the "applied" stacks (``nslab.stack``). Its figures are printed
as one table at the end of the run, apart from the emulated lab's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from nslab import report  # noqa: E402
from nslab.proc import interrupt_on_sigterm  # noqa: E402

from tests.boot.report import BOOT_RECORDS, REPORT_ENV  # noqa: E402

_BOOT_SECONDS: list[float] = []


def pytest_configure(config):  # type: ignore[no-untyped-def]
    interrupt_on_sigterm()


def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    if call.when in ("setup", "call", "teardown") and "boot" in item.keywords:
        _BOOT_SECONDS.append(call.duration)


def pytest_terminal_summary(terminalreporter):  # type: ignore[no-untyped-def]
    if not BOOT_RECORDS:
        return
    runtime = sum(_BOOT_SECONDS) if _BOOT_SECONDS else None
    terminalreporter.section("tunnelhub boot report")
    terminalreporter.write_line(report.render(BOOT_RECORDS, runtime_s=runtime).replace("lab runtime", "boot runtime"))
    path = os.environ.get(REPORT_ENV)
    if path:
        import json
        from dataclasses import asdict

        Path(path).write_text(json.dumps({"runtime_s": runtime, "figures": [asdict(f) for f in BOOT_RECORDS]},
                                         indent=2) + "\n")
        terminalreporter.write_line(f"(figures written to {path})")
