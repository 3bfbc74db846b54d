"""The boot scenarios' figures: recorded like the emulated lab's (``nslab.report``), printed as
their own table at the end of the run (``tests/boot/conftest.py``), and written as JSON when
``TUNNELHUB_BOOT_REPORT`` names a file (the README's figures come from it)."""

from __future__ import annotations

from nslab import report

REPORT_ENV = "TUNNELHUB_BOOT_REPORT"
BOOT_RECORDS: list[report.Figure] = []


def record(scenario: str, measure: str, value: float | int | str, **kwargs: str) -> report.Figure:
    """Like :func:`nslab.report.record`, into the boot report."""
    figure = report.record(scenario, measure, value, **kwargs)
    report.RECORDS.remove(figure)  # the emulated lab's table stays its own
    BOOT_RECORDS.append(figure)
    return figure
