"""Lazy provider loading (tunnelhub/jsii_env.py) changes how fast a stack synthesizes, never what
it synthesizes; both levers (Python submodules, Node exports) are really in use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import EXAMPLE_SPEC, ROOT
from tests.helpers import azure_hub, spec_text

pytestmark = pytest.mark.synth


def _tree(outdir):
    return {p.relative_to(outdir).as_posix(): p.read_bytes() for p in sorted(outdir.rglob("*")) if p.is_file()}


def _synth_in_subprocess(spec, out, **env):
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from tunnelhub.spec import load_spec
        from tunnelhub.synth import synthesize
        synthesize(load_spec({str(spec)!r}), Path({str(out)!r}), jobs=1)
        print(json.dumps({{
            "assemblies": sorted(m.split('.')[0] for m in sys.modules
                                 if m.startswith('cdktf_cdktf_provider_') and m.endswith('._jsii')),
            "azurerm_modules": sum(1 for m in sys.modules if m.startswith('cdktf_cdktf_provider_azurerm.')),
        }}))
    """).replace("import sys\n", "import sys, json\n", 1)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_plain_synthesis_writes_exactly_what_the_lazy_one_writes(tmp_path, example):
    # the session's `example` fixture synthesized with lazy loading (tests/conftest.py)
    _, _ = _synth_in_subprocess(EXAMPLE_SPEC, tmp_path / "cdktf.out", TUNNELHUB_JSII_LAZY="0")
    assert _tree(tmp_path / "cdktf.out") == _tree(example.outdir)


def test_both_levers_load_only_what_the_stack_uses(tmp_path):
    spec = tmp_path / "azure.yaml"
    spec.write_text(spec_text(azure_hub()))
    info, stderr = _synth_in_subprocess(spec, tmp_path / "out", JSII_LAZY_EXPORTS_DEBUG="1")
    assert info["assemblies"] == ["cdktf_cdktf_provider_azurerm", "cdktf_cdktf_provider_tls"]
    # Python side: a handful of azurerm's 1,500 submodules; Node side: the hook rewrote its index.js.
    assert 0 < info["azurerm_modules"] < 80, info
    assert "provider-azurerm" in stderr and "submodules made lazy" in stderr


def test_the_type_map_points_every_provider_submodule_at_its_jsii_namespace():
    code = textwrap.dedent("""
        import importlib.util, json, re
        from pathlib import Path
        from jsii import _reference_map as rm
        from tunnelhub import jsii_env
        out = {}
        for pkg in jsii_env.PROVIDER_PACKAGES:
            jsii_env._lazy_package(pkg)
            inverse = {v: k for k, v in rm._submodule_fqn_map.items()}
            base = Path(importlib.util.find_spec(pkg).submodule_search_locations[0])
            ok = bad = 0
            for init in sorted(base.glob('*/__init__.py')):
                if init.parent.name == '_jsii':
                    continue
                with open(init, encoding='utf-8') as fh:
                    m = re.search(r'jsii_type="([^"]+)"', fh.read(200000))
                if not m:
                    continue
                if inverse.get(f'{pkg}.{init.parent.name}') == m.group(1).rsplit('.', 1)[0]:
                    ok += 1
                else:
                    bad += 1
            out[pkg] = [ok, bad]
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout)
    for package, (ok, bad) in counts.items():
        assert bad == 0 and ok > 0, (package, ok, bad)
    assert counts["cdktf_cdktf_provider_aws"][0] > 1000
