"""The lab's report: every scenario records what it measured, the run prints one table.

A test calls :func:`record` for each figure (a duration, a count, a yes/no) with the issue's target
and the bound the test asserts; ``conftest.py`` prints :func:`render` at the end of the run
(``make lab`` = ``pytest tests/e2e -m e2e -s``) and, when ``TUNNELHUB_LAB_REPORT`` names a file,
writes the records there as JSON (:func:`load` reads them back, for the README).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

REPORT_ENV = "TUNNELHUB_LAB_REPORT"


@dataclass(frozen=True)
class Figure:
    scenario: str
    measure: str
    value: float | int | str
    unit: str = "s"
    target: str = ""
    """What the issue asks for (``<= 12 s``), empty when it sets none."""
    bound: str = ""
    """What the test asserts (the target plus a stated margin for a loaded machine)."""
    reference: str = ""
    """The reference design's figure for the same thing (``../shared/LAB-FINDINGS.md`` or the
    lab's negative control)."""

    def shown(self) -> str:
        if isinstance(self.value, float):
            return f"{self.value:.2f} {self.unit}".strip()
        return f"{self.value} {self.unit}".strip() if self.unit != "s" else str(self.value)


RECORDS: list[Figure] = []


def record(scenario: str, measure: str, value: float | int | str, *, unit: str = "s",
           target: str = "", bound: str = "", reference: str = "") -> Figure:
    figure = Figure(scenario, measure, value, unit, target, bound, reference)
    RECORDS.append(figure)
    print(f"[{scenario}] {measure}: {figure.shown()}"
          + (f" (target {target})" if target else "") + (f" [reference: {reference}]" if reference else ""),
          flush=True)
    return figure


def render(records: list[Figure] | None = None, *, runtime_s: float | None = None) -> str:
    rows = RECORDS if records is None else records
    if not rows:
        return ""
    lines = ["| scenario | measured | value | target | asserted bound | reference design |",
             "|---|---|---|---|---|---|"]
    for f in rows:
        lines.append(f"| {f.scenario} | {f.measure} | {f.shown()} | {f.target or '-'} | "
                     f"{f.bound or '-'} | {f.reference or '-'} |")
    if runtime_s is not None:
        lines.append("")
        lines.append(f"lab runtime: {runtime_s:.0f} s")
    return "\n".join(lines)


def save(path: Path, *, runtime_s: float | None = None) -> None:
    path.write_text(json.dumps({"runtime_s": runtime_s, "figures": [asdict(f) for f in RECORDS]},
                               indent=2) + "\n")


def load(path: Path) -> tuple[list[Figure], float | None]:
    data = json.loads(path.read_text())
    return [Figure(**f) for f in data["figures"]], data.get("runtime_s")


def report_path() -> Path | None:
    value = os.environ.get(REPORT_ENV)
    return Path(value) if value else None
