"""The cdktf app: one stack per hub, its providers and backend, the port plan output, and the
atomic, merging, state-preserving output directory."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import EXAMPLE_SPEC, ROOT
from tests.helpers import azure_hub, spec_text
from tunnelhub.spec import SpecError, load_spec

pytestmark = pytest.mark.synth


def test_manifest_lists_one_stack_per_hub_in_spec_order(example):
    assert list(example.manifest["stacks"]) == ["weu-azure", "use-aws"]
    for name, entry in example.manifest["stacks"].items():
        assert entry["synthesizedStackPath"] == f"stacks/{name}/cdk.tf.json"


def test_each_stack_configures_only_its_clouds_providers(example):
    azure = example.stack("weu-azure")["provider"]
    aws = example.stack("use-aws")["provider"]
    assert "azurerm" in azure and "aws" not in azure
    assert "aws" in aws and "azurerm" not in aws
    assert azure["azurerm"][0]["subscription_id"] == "11111111-2222-3333-4444-555555555555"
    assert aws["aws"][0]["region"] == "us-east-1"
    assert aws["aws"][0]["default_tags"][0]["tags"] == {"tunnelhub:hub": "use", "owner": "data-platform"}
    for providers, account_host in ((azure, "https://accounts.azuredatabricks.net"),
                                    (aws, "https://accounts.cloud.databricks.com")):
        by_alias = {p["alias"]: p for p in providers["databricks"]}
        assert by_alias["account"]["host"] == account_host
        assert set(by_alias["account"]) == {"alias", "host", "account_id"}  # no credentials in the JSON
        assert set(by_alias["workspace"]) == {"alias", "host"}


def test_backends(example):
    assert example.stack("weu-azure")["terraform"]["backend"] == {"local": {"path": "terraform.weu-azure.tfstate"}}
    assert example.stack("use-aws")["terraform"]["cloud"] == {
        "hostname": "app.terraform.io",
        "organization": "example-org",
        "workspaces": {"name": "tunnelhub-use"},
    }


def test_port_plan_output_matches_the_spec(example):
    spec = load_spec(EXAMPLE_SPEC)
    for hub in spec.hubs:
        output = example.stack(hub.stack_name)["output"]["port_plan"]["value"]
        expected = [{k: v for k, v in row.items() if v is not None} for row in hub.port_plan()]
        assert output == expected


def _values_of(doc, key: str):
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == key:
                yield v
            yield from _values_of(v, key)
    elif isinstance(doc, list):
        for item in doc:
            yield from _values_of(item, key)


def test_no_secret_material_in_any_stack(example):
    for name, stack in example.stacks.items():
        assert "PRIVATE KEY" not in example.text(name)
        passwords = list(_values_of(stack, "password"))
        assert passwords, "the example wires Unity Catalog connections with passwords"
        for value in passwords:  # every password is a reference to a sensitive variable
            assert re.fullmatch(r"\$\{var\.[A-Za-z_][A-Za-z0-9_-]*\}", value), value
            assert stack["variable"][value[6:-1]]["sensitive"] is True


def test_hub_option_resynthesizes_one_hub_and_keeps_the_rest_and_the_state(tmp_path, example):
    from tunnelhub.synth import synthesize

    spec = load_spec(EXAMPLE_SPEC)
    out = tmp_path / "cdktf.out"
    synthesize(spec, out, jobs=1)
    state = out / "stacks" / "use-aws" / "terraform.use-aws.tfstate"
    state.write_text('{"version": 4}')
    (out / "stacks" / "weu-azure" / ".terraform").mkdir()
    (out / "stacks" / "weu-azure" / "terraform.weu-azure.tfstate").write_text('{"version": 4, "serial": 7}')
    results = synthesize(spec, out, hubs=["weu"], jobs=1, reuse=False)
    assert [r.name for r in results] == ["weu-azure"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["stacks"]) == ["weu-azure", "use-aws"]
    assert state.read_text() == '{"version": 4}'
    assert (out / "stacks" / "weu-azure" / ".terraform").is_dir()
    assert json.loads((out / "stacks" / "weu-azure" / "terraform.weu-azure.tfstate").read_text())["serial"] == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cdktf.out.")]


def test_unknown_hub_is_a_spec_error(tmp_path):
    from tunnelhub.synth import synthesize

    with pytest.raises(SpecError, match="no hub named 'nope'; hubs in this spec: weu, use"):
        synthesize(load_spec(EXAMPLE_SPEC), tmp_path / "out", hubs=["nope"])


def test_a_failing_synth_leaves_the_previous_output_untouched(tmp_path, monkeypatch, example):
    from tunnelhub import app as app_module
    from tunnelhub.synth import synthesize

    out = tmp_path / "cdktf.out"
    synthesize(load_spec(EXAMPLE_SPEC), out, hubs=["weu"], jobs=1)
    before = (out / "stacks" / "weu-azure" / "cdk.tf.json").read_text()

    def broken(self, scope, hub):
        raise RuntimeError("boom")

    monkeypatch.setattr(app_module.HubStack, "__init__", broken)
    with pytest.raises(RuntimeError, match="boom"):
        synthesize(load_spec(EXAMPLE_SPEC), out, jobs=1, reuse=False)
    assert (out / "stacks" / "weu-azure" / "cdk.tf.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cdktf.out"]


def test_an_azure_only_spec_never_imports_the_aws_bindings(tmp_path):
    spec = tmp_path / "azure.yaml"
    spec.write_text(spec_text(azure_hub()))
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from tunnelhub.spec import load_spec
        from tunnelhub.synth import synthesize
        synthesize(load_spec({str(spec)!r}), Path({str(tmp_path / 'out')!r}), jobs=1)
        # A provider's assembly reaches the jsii kernel when its _jsii module is imported.
        print(sorted(m.split('.')[0] for m in sys.modules
                     if m.startswith('cdktf_cdktf_provider_') and m.endswith('._jsii')))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "['cdktf_cdktf_provider_azurerm', 'cdktf_cdktf_provider_tls']"
