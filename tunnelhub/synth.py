"""Synthesize hub stacks into a cdktf output directory: atomically, in parallel, and only when
something changed.

- **Atomic.** Stacks are synthesized into a temporary directory beside the output and swapped
  into place only when every stack succeeded. Files Terraform keeps in a stack's working
  directory (``.terraform/``, the lock file, local state) are carried over, so a re-synth never
  loses local state.
- **Only what a stack needs.** Each stack imports only its cloud's provider bindings (see
  :mod:`tunnelhub.app`). Independent hubs are synthesized in parallel worker processes (one per
  hub, up to the number of cores) when more than one hub needs it; the result is the same
  ``manifest.json`` and the same stack files as a sequential synthesis.
- **Reuse.** Every stack is keyed by everything that can change its output: the hub's resolved
  spec, the tunnelhub package's files (code, templates, scripts, the Lambda source), the versions
  of cdktf, constructs, jsii and the provider packages, Python and Node. A stack whose key and
  files are unchanged since the last synthesis into the same directory is reused as it is; any
  change to an input re-synthesizes it. ``--no-reuse`` turns this off.
- ``--hub`` synthesizes only the named hubs and keeps the other hubs' stacks of the previous
  output (as long as they are still in the spec), with one merged manifest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import tunnelhub
from tunnelhub import spec as S

MANIFEST = "manifest.json"
INDEX = ".tunnelhub-synth.json"
INDEX_VERSION = 1
KEYED_DISTRIBUTIONS = (
    "tunnelhub",
    "cdktf",
    "constructs",
    "jsii",
    "cdktf-cdktf-provider-aws",
    "cdktf-cdktf-provider-azurerm",
    "cdktf-cdktf-provider-databricks",
    "cdktf-cdktf-provider-tls",
)
JOBS_ENV = "TUNNELHUB_SYNTH_JOBS"

Progress = Callable[[str], None]


class SynthError(RuntimeError):
    """A stack failed to synthesize (the message carries the worker's error output)."""


@dataclass(frozen=True)
class StackResult:
    """One stack of the output."""

    name: str
    hub: str
    directory: Path
    resources: int
    seconds: float
    reused: bool = False


def synthesize(
    spec: S.SpecFile,
    out: Path,
    *,
    hubs: list[str] | None = None,
    progress: Progress = lambda message: None,
    jobs: int | None = None,
    reuse: bool = True,
    guard: Callable[[Path], None] | None = None,
) -> list[StackResult]:
    """Synthesize the selected hubs (all by default) into ``out``; return one result per stack.

    ``jobs``: worker processes for hubs that need synthesis (default: ``$TUNNELHUB_SYNTH_JOBS``,
    else the number of CPUs); 1 synthesizes in this process. ``guard`` is called with the new
    output directory before it replaces ``out``; a :class:`SynthError` it raises leaves ``out``
    as it was.
    """
    selected = spec.select(hubs)
    out = Path(out).resolve()
    index = _read_index(out)
    keys = {h.stack_name: stack_key(h) for h in selected}
    reused = {h.stack_name for h in selected if reuse and _reusable(out, index, h.stack_name, keys[h.stack_name])}
    todo = [h for h in selected if h.stack_name not in reused]
    all_stacks = [h.stack_name for h in spec.hubs]
    if not todo and (hubs or list(read_manifest(out).get("stacks", {})) == all_stacks):
        progress("every stack is up to date: reusing the previous output")
        return [_result(out, h, 0.0, reused=True) for h in selected]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest: dict = {"stacks": {}}
        timings: dict[str, float] = {}
        if todo:
            manifest, timings = _synth(spec, todo, tmp, progress, _jobs(jobs, len(todo)))
        old_manifest = read_manifest(out)
        keep = {h.stack_name for h in selected if h.stack_name in reused}
        if hubs:  # keep the other hubs' stacks, if they are still in the spec
            keep |= {n for n in old_manifest.get("stacks", {}) if n in all_stacks and n not in keys}
        for name in sorted(keep):
            entry = old_manifest["stacks"][name]
            shutil.copytree(out / entry["workingDirectory"], tmp / entry["workingDirectory"],
                            symlinks=True, ignore=_ignore_runtime_files)
            manifest["stacks"][name] = entry
        manifest.setdefault("version", old_manifest.get("version"))
        _write_manifest(tmp, manifest, all_stacks)
        _write_index(tmp, {n: keys.get(n) or index.get(n, {}).get("key") for n in manifest["stacks"]})
        if guard is not None:
            guard(tmp)
        _swap_into_place(tmp, out, progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [_result(out, h, timings.get(h.stack_name, 0.0), reused=h.stack_name in reused) for h in selected]


# --------------------------------------------------------------------------------------------
# Synthesis proper: in this process, or one worker process per hub
# --------------------------------------------------------------------------------------------


def _jobs(requested: int | None, work: int) -> int:
    if requested is None:
        env = os.environ.get(JOBS_ENV)
        requested = int(env) if env and env.isdigit() else (os.cpu_count() or 1)
    return max(1, min(requested, work))


def _synth(spec: S.SpecFile, hubs: list[S.Hub], outdir: Path, progress: Progress, jobs: int) -> tuple[dict, dict[str, float]]:
    if jobs == 1:
        return _synth_in_process(hubs, outdir, progress)
    return _synth_in_workers(spec, hubs, outdir, progress, jobs)


def _synth_in_process(hubs: list[S.Hub], outdir: Path, progress: Progress) -> tuple[dict, dict[str, float]]:
    from tunnelhub.jsii_env import prepare_jsii_environment

    prepare_jsii_environment()
    from tunnelhub.app import HubStack, new_app

    app = new_app(outdir=str(outdir))
    timings: dict[str, float] = {}
    for i, hub in enumerate(hubs, 1):
        progress(f"[{i}/{len(hubs)}] {hub.stack_name}: building (loads the {hub.cloud} provider bindings)")
        start = time.monotonic()
        HubStack(app, hub)
        timings[hub.stack_name] = time.monotonic() - start
    progress("writing Terraform JSON")
    start = time.monotonic()
    app.synth()
    for name in timings:
        timings[name] += (time.monotonic() - start) / len(timings)
    return read_manifest(outdir), timings


def _synth_in_workers(
    spec: S.SpecFile, hubs: list[S.Hub], outdir: Path, progress: Progress, jobs: int
) -> tuple[dict, dict[str, float]]:
    """One process per hub (at most ``jobs`` at once); each writes its own cdktf output, merged here."""
    spec_file = outdir / ".spec.json"
    spec_file.write_text(spec.model_dump_json())
    pending = list(hubs)
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    manifest: dict = {"stacks": {}}
    timings: dict[str, float] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                hub = pending.pop(0)
                part = outdir / ".parts" / hub.stack_name
                part.parent.mkdir(parents=True, exist_ok=True)
                progress(f"{hub.stack_name}: synthesizing in a worker process ({hub.cloud} provider bindings)")
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tunnelhub.synth", str(spec_file), hub.name, str(part)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                )
                running[hub.stack_name] = (proc, time.monotonic(), part)
            name, (proc, started, part) = _wait_any(running)
            del running[name]
            stderr = proc.stderr.read() if proc.stderr else ""
            if proc.returncode != 0:
                raise SynthError(f"{name}: synthesis failed (exit {proc.returncode}):\n{stderr.strip()[-4000:]}")
            timings[name] = time.monotonic() - started
            part_manifest = read_manifest(part)
            entry = part_manifest["stacks"][name]
            (outdir / "stacks").mkdir(exist_ok=True)
            os.replace(part / entry["workingDirectory"], outdir / entry["workingDirectory"])
            manifest["stacks"][name] = entry
            manifest.setdefault("version", part_manifest.get("version"))
            progress(f"{name}: done in {timings[name]:.1f} s")
    finally:
        for proc, _, _ in running.values():
            proc.kill()
            proc.wait()
        shutil.rmtree(outdir / ".parts", ignore_errors=True)
        spec_file.unlink(missing_ok=True)
    return manifest, timings


def _wait_any(running: dict[str, tuple[subprocess.Popen, float, Path]]) -> tuple[str, tuple[subprocess.Popen, float, Path]]:
    while True:
        for name, item in running.items():
            if item[0].poll() is not None:
                return name, item
        time.sleep(0.05)


def _worker_main(argv: list[str]) -> int:
    """Worker entry: ``python -m tunnelhub.synth SPEC_JSON HUB OUTDIR``."""
    spec_json, hub_name, outdir = argv
    spec = S.SpecFile.model_validate_json(Path(spec_json).read_text())
    _synth_in_process([spec.hub(hub_name)], Path(outdir), lambda message: None)
    return 0


# --------------------------------------------------------------------------------------------
# Reuse: stack keys and the index of what the output holds
# --------------------------------------------------------------------------------------------


def stack_key(hub: S.Hub) -> str:
    """A digest of every input that can change this hub's synthesized stack."""
    digest = hashlib.sha256()
    for part in (str(INDEX_VERSION), hub.model_dump_json(), package_digest(), _versions(), sys.version, node_identity()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def package_digest(root: Path | None = None) -> str:
    """A digest of every file of the tunnelhub package (code, templates, VM scripts, Lambda source)."""
    root = root or Path(tunnelhub.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _versions() -> str:
    versions = []
    for dist in KEYED_DISTRIBUTIONS:
        try:
            versions.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} missing")
    return ";".join(versions)


@functools.lru_cache(maxsize=None)
def node_identity() -> str:
    """The Node.js that jsii will run (its path and version)."""
    from tunnelhub.jsii_env import node_binary

    node = node_binary()
    if node is None:
        return "no node"
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = "unknown"
    return f"{node} {version}"


def _read_index(out: Path) -> dict[str, dict]:
    try:
        data = json.loads((out / INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return data.get("stacks", {}) if data.get("version") == INDEX_VERSION else {}


def _write_index(outdir: Path, keys: dict[str, str | None]) -> None:
    stacks = {}
    for name, key in keys.items():
        if key is None:
            continue
        stacks[name] = {"key": key, "files": _file_digests(outdir / "stacks" / name)}
    (outdir / INDEX).write_text(json.dumps({"version": INDEX_VERSION, "stacks": stacks}, indent=2, sort_keys=True) + "\n")


def _file_digests(stack_dir: Path) -> dict[str, str]:
    return {
        p.relative_to(stack_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(stack_dir.rglob("*"))
        if p.is_file() and not _is_runtime_path(p.relative_to(stack_dir))
    }


def _reusable(out: Path, index: dict[str, dict], name: str, key: str) -> bool:
    entry = index.get(name)
    stack_dir = out / "stacks" / name
    if not entry or entry.get("key") != key or not stack_dir.is_dir():
        return False
    return _file_digests(stack_dir) == entry.get("files")


# --------------------------------------------------------------------------------------------
# Output directory
# --------------------------------------------------------------------------------------------


def count_resources(stack_json: Path) -> int:
    """How many resources and data sources a synthesized stack declares."""
    doc = json.loads(stack_json.read_text())
    return sum(len(v) for v in doc.get("resource", {}).values()) + sum(len(v) for v in doc.get("data", {}).values())


def read_manifest(outdir: Path) -> dict:
    try:
        return json.loads((Path(outdir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _write_manifest(outdir: Path, manifest: dict, order: list[str]) -> None:
    """The manifest with stacks in spec order (the same whichever way they were synthesized)."""
    rank = {name: i for i, name in enumerate(order)}
    stacks = manifest.get("stacks", {})
    ordered = {k: stacks[k] for k in sorted(stacks, key=lambda k: rank.get(k, len(rank)))}
    (outdir / MANIFEST).write_text(json.dumps({"version": manifest.get("version"), "stacks": ordered}, indent=2) + "\n")


def _result(out: Path, hub: S.Hub, seconds: float, *, reused: bool) -> StackResult:
    directory = out / "stacks" / hub.stack_name
    return StackResult(hub.stack_name, hub.name, directory, count_resources(directory / "cdk.tf.json"), seconds, reused)


_RUNTIME_NAMES = (".terraform", ".terraform.lock.hcl")


def _is_runtime_file(name: str) -> bool:
    """Files Terraform itself keeps in a stack directory (never generated by synthesis)."""
    return name in _RUNTIME_NAMES or ".tfstate" in name or name.endswith(".tfplan")


def _is_runtime_path(relative: Path) -> bool:
    return _is_runtime_file(relative.parts[0])


def _ignore_runtime_files(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if _is_runtime_file(n)]


def _swap_into_place(new: Path, out: Path, progress: Progress) -> None:
    """Move Terraform's own files from the old output into the new one, then swap directories."""
    if not out.exists():
        os.replace(new, out)
        return
    old_stacks = out / "stacks"
    for stack_dir in sorted(old_stacks.iterdir()) if old_stacks.is_dir() else []:
        runtime = [p for p in stack_dir.iterdir() if _is_runtime_file(p.name)]
        if not runtime:
            continue
        target = new / "stacks" / stack_dir.name
        if not target.is_dir():
            if any(".tfstate" in p.name for p in runtime):
                progress(f"kept {stack_dir.name}: no longer synthesized, but its directory holds Terraform state")
                shutil.copytree(stack_dir, target, symlinks=True)
            continue
        for p in runtime:
            if not (target / p.name).exists():
                os.replace(p, target / p.name)
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, trash / out.name)
    os.replace(new, out)
    shutil.rmtree(trash, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
