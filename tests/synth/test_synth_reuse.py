"""Parallel synthesis gives the same output as a sequential one; an unchanged re-synth reuses
the previous output; any change to an input re-synthesizes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_SPEC, ROOT
from tests.helpers import azure_hub, mutated, spec_text
from tunnelhub import synth as synth_module
from tunnelhub.spec import load_spec, validate_text
from tunnelhub.synth import INDEX, package_digest, synthesize

pytestmark = pytest.mark.synth


def tree(outdir: Path) -> dict[str, bytes]:
    """Every generated file of an output directory (the reuse index aside)."""
    return {p.relative_to(outdir).as_posix(): p.read_bytes()
            for p in sorted(outdir.rglob("*")) if p.is_file() and p.name != INDEX}


def copy_output(example, tmp_path: Path) -> Path:
    out = tmp_path / "cdktf.out"
    shutil.copytree(example.outdir, out)
    return out


def test_parallel_workers_produce_the_sequential_output(tmp_path, example):
    out = tmp_path / "cdktf.out"
    messages: list[str] = []
    results = synthesize(load_spec(EXAMPLE_SPEC), out, jobs=2, progress=messages.append)
    assert any("worker process" in m for m in messages)
    assert [r.name for r in results] == ["weu-azure", "use-aws"]
    assert tree(out) == tree(example.outdir)


def test_unchanged_resynth_reuses_everything_without_loading_cdktf(tmp_path, example):
    out = copy_output(example, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from tunnelhub.spec import load_spec
        from tunnelhub.synth import synthesize
        start = time.monotonic()
        results = synthesize(load_spec({str(EXAMPLE_SPEC)!r}), Path({str(out)!r}))
        print(time.monotonic() - start, [r.reused for r in results],
              sorted(m for m in sys.modules if m == 'cdktf' or m.startswith('cdktf_cdktf_provider_')))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seconds, reused, modules = done.stdout.strip().rsplit(" [", 2)[0], *done.stdout.strip().split(" [")[1:]
    assert reused == "True, True]"
    assert modules == "]"  # nothing of cdktf or a provider was imported
    assert float(seconds) < 5  # generous bound for a loaded CI machine; the benchmark prints the real figure
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_spec_change_resynthesizes_only_that_hub(tmp_path, example):
    out = copy_output(example, tmp_path)
    text = EXAMPLE_SPEC.read_text().replace("        target: 192.168.20.15:5432\n",
                                            "        target: 192.168.20.16:5432\n")
    results = synthesize(validate_text(text, "changed.yaml").spec, out, jobs=1)
    assert {r.name: r.reused for r in results} == {"weu-azure": False, "use-aws": True}
    plan = json.loads((out / "stacks" / "weu-azure" / "cdk.tf.json").read_text())["output"]["port_plan"]["value"]
    assert {row["target"] for row in plan if row["route"] == "billing-pg"} == {"192.168.20.16:5432"}
    assert tree(out)["stacks/use-aws/cdk.tf.json"] == tree(example.outdir)["stacks/use-aws/cdk.tf.json"]


def test_a_dependency_version_change_resynthesizes(tmp_path, example, monkeypatch):
    out = copy_output(example, tmp_path)
    real = synth_module.metadata.version
    monkeypatch.setattr(synth_module.metadata, "version",
                        lambda dist: "99.0.0" if dist == "cdktf-cdktf-provider-tls" else real(dist))
    results = synthesize(load_spec(EXAMPLE_SPEC), out, jobs=1)
    assert [r.reused for r in results] == [False, False]


def test_a_code_or_template_change_resynthesizes(tmp_path, example, monkeypatch):
    package = tmp_path / "pkg"
    shutil.copytree(ROOT / "tunnelhub", package, ignore=shutil.ignore_patterns("__pycache__"))
    digest = package_digest(package)
    template = next(p for p in sorted(package.rglob("*")) if p.is_file() and p.suffix in (".j2", ".py"))
    template.write_text(template.read_text() + "\n# changed\n")
    package_digest.cache_clear()
    edited = package_digest(package)
    assert edited != digest

    out = copy_output(example, tmp_path)
    monkeypatch.setattr(synth_module, "package_digest", lambda: edited)  # the package as it is after the edit
    results = synthesize(load_spec(EXAMPLE_SPEC), out, jobs=1, hubs=["use"])
    assert [r.reused for r in results] == [False]


def test_an_edited_output_is_resynthesized(tmp_path, example):
    out = copy_output(example, tmp_path)
    stack = out / "stacks" / "use-aws" / "cdk.tf.json"
    stack.write_text(stack.read_text().replace("us-east-1", "us-west-2"))
    results = synthesize(load_spec(EXAMPLE_SPEC), out, jobs=1)
    assert {r.name: r.reused for r in results} == {"weu-azure": True, "use-aws": False}
    assert stack.read_bytes() == tree(example.outdir)["stacks/use-aws/cdk.tf.json"]


def test_no_reuse_forces_synthesis(tmp_path, example):
    out = copy_output(example, tmp_path)
    results = synthesize(load_spec(EXAMPLE_SPEC), out, jobs=1, reuse=False, hubs=["weu"])
    assert [r.reused for r in results] == [False]


def test_a_new_hub_spec_gets_its_own_key():
    base = validate_text(spec_text(azure_hub()), "a.yaml").spec.hubs[0]
    other = validate_text(spec_text(mutated(azure_hub(), lambda h: h["proxies"].update(count=3)
                                            if "proxies" in h else h.update(proxies={"count": 3}))), "b.yaml").spec.hubs[0]
    assert synth_module.stack_key(base) != synth_module.stack_key(other)
    assert synth_module.stack_key(base) == synth_module.stack_key(validate_text(spec_text(azure_hub()), "c.yaml").spec.hubs[0])
