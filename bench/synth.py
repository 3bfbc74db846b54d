"""Synthesis time of the example spec: tunnelhub against the naive cdktf app, in one run.

Each case is a whole process (start to exit), run several times, interleaved so load drift hits
every case alike; the table gives min and median wall time and the ratio to the naive baseline:

1. naive: one process that imports cdktf and the aws, azurerm and databricks provider packages at
   module top (the way most cdktf apps are written), then synthesizes the example spec with
   tunnelhub's own stacks — no lazy loading, ``node`` from PATH;
2. ``tunnelhub synth`` of the example spec (all hubs), into a fresh directory;
3. ``tunnelhub synth --hub <the Azure hub>``, into a fresh directory;
4. a second ``tunnelhub synth`` with nothing changed (reuses the previous output).

Targets (issue 9): all hubs ≤ 0.6×, one Azure hub ≤ 0.5×, unchanged re-synth ≤ 0.05× the naive
baseline. A warm-up run of each case first fills jsii's package cache.

    python bench/synth.py [--runs N] [--spec FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNNELHUB = Path(sys.executable).with_name("tunnelhub")

NAIVE_APP = """
import sys
import cdktf
import cdktf_cdktf_provider_aws
import cdktf_cdktf_provider_azurerm
import cdktf_cdktf_provider_databricks
import cdktf_cdktf_provider_tls

from tunnelhub.app import build_app
from tunnelhub.spec import load_spec

build_app(load_spec(sys.argv[1]), outdir=sys.argv[2]).synth()
"""

TARGETS = {"all hubs": 0.6, "one Azure hub": 0.5, "unchanged re-synth": 0.05}


def run(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case (default 3)")
    parser.add_argument("--spec", type=Path, default=ROOT / "examples" / "hubs.yaml")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    sys.path.insert(0, str(ROOT))
    from tunnelhub.spec import load_spec

    spec = load_spec(args.spec)
    azure = next((h.name for h in spec.hubs if h.cloud == "azure"), None)
    if azure is None:
        parser.error(f"{args.spec} has no Azure hub")

    work = Path(tempfile.mkdtemp(prefix="tunnelhub-bench-synth-"))
    naive_env = {k: v for k, v in os.environ.items() if k not in ("JSII_NODE", "NODE_OPTIONS")}
    naive_env.update({"TUNNELHUB_JSII_LAZY": "0", "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
                      "JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION": "1"})
    env = dict(os.environ)
    reused = work / "reused" / "cdktf.out"
    counter = iter(range(10**6))

    def fresh() -> str:
        parent = work / f"out{next(counter)}"
        parent.mkdir()
        return str(parent / "cdktf.out")

    cases = {
        "naive": lambda: run([sys.executable, "-c", NAIVE_APP, str(args.spec), fresh()], naive_env),
        "all hubs": lambda: run([str(TUNNELHUB), "synth", str(args.spec), "--out", fresh()], env),
        "one Azure hub": lambda: run([str(TUNNELHUB), "synth", str(args.spec), "--hub", azure, "--out", fresh()], env),
        "unchanged re-synth": lambda: run([str(TUNNELHUB), "synth", str(args.spec), "--out", str(reused)], env),
    }
    try:
        print(f"synthesis benchmark: {args.spec.relative_to(ROOT) if args.spec.is_relative_to(ROOT) else args.spec}, "
              f"{args.runs} runs per case, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
        for name, case in cases.items():  # warm-up: jsii package cache, the reused output
            case()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for round_no in range(args.runs):
            for name, case in cases.items():
                times[name].append(case())
            print(f"  round {round_no + 1}/{args.runs}: "
                  + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    naive_min, naive_median = min(times["naive"]), statistics.median(times["naive"])
    print()
    print(f"| case | min s | median s | ratio to naive (min) | ratio (median) | target |")
    print("|---|---|---|---|---|---|")
    failed = []
    for name, values in times.items():
        ratio_min, ratio_median = min(values) / naive_min, statistics.median(values) / naive_median
        target = TARGETS.get(name)
        verdict = "baseline" if target is None else (f"≤ {target}× " + ("met" if ratio_median <= target else "MISSED"))
        if target is not None and ratio_median > target:
            failed.append(name)
        print(f"| {name} | {min(values):.2f} | {statistics.median(values):.2f} | {ratio_min:.3f} | "
              f"{ratio_median:.3f} | {verdict} |")
    if failed:
        print(f"\ntargets missed: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
