"""Run checkov on a synthesized stack and hold every failed check to a written reason.

checkov pins older libraries (boto3 1.35) than the test extras (moto needs boto3 1.44), so it lives
in its own virtualenv, `.venv-checkov`, built by `make test` from `requirements-checkov.txt`.
Suppressions live in `checkov/<cloud>.yaml`: one entry per check id with a non-empty `reason`;
an entry that no longer matches a failure is reported too (a suppression list must stay honest).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHECKOV = Path(os.environ.get("TUNNELHUB_CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))


@dataclass(frozen=True)
class FailedCheck:
    check_id: str
    name: str
    resource: str


def run_checkov(stack_json: Path) -> tuple[int, list[FailedCheck]]:
    """Run checkov offline on one stack's Terraform JSON; return (passed count, failed checks)."""
    if not CHECKOV.exists():
        raise AssertionError(f"checkov is not installed at {CHECKOV}: run `make test` (it builds .venv-checkov)")
    done = subprocess.run(
        [str(CHECKOV), "-f", str(stack_json), "--framework", "terraform_json", "-o", "json", "--quiet",
         "--skip-download", "--compact"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_NO_UPDATE": "true"},
    )
    if done.returncode not in (0, 1):
        raise AssertionError(f"checkov failed to run (exit {done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    if isinstance(report, list):  # one report per framework
        report = next(r for r in report if r.get("check_type") == "terraform_json")
    if "results" not in report:  # nothing to check at all
        return 0, []
    results = report["results"]
    failed = [FailedCheck(c["check_id"], c["check_name"], c["resource"]) for c in results.get("failed_checks", [])]
    # --quiet leaves the passed checks out of "results"; the summary still counts them.
    return report.get("summary", {}).get("passed", len(results.get("passed_checks", []))), failed


def load_suppressions(name: str) -> dict[str, str]:
    """`checkov/<name>.yaml`: {check_id: reason}; every reason must be written out."""
    path = ROOT / "checkov" / f"{name}.yaml"
    entries = yaml.safe_load(path.read_text()) or {}
    for check_id, entry in entries.items():
        reason = (entry or {}).get("reason", "") if isinstance(entry, dict) else ""
        if len(reason.strip()) < 20:
            raise AssertionError(f"{path}: suppression {check_id} needs a written reason")
    return {k: v["reason"] for k, v in entries.items()}


def unexplained_failures(stack_json: Path, suppressions_name: str) -> tuple[list[FailedCheck], list[str], int]:
    """(failed checks without a reason, suppressions that matched nothing, passed count)."""
    passed, failed = run_checkov(stack_json)
    suppressions = load_suppressions(suppressions_name)
    unexplained = [f for f in failed if f.check_id not in suppressions]
    stale = sorted(set(suppressions) - {f.check_id for f in failed})
    return unexplained, stale, passed
