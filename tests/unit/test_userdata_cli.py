"""``tunnelhub render-userdata``: output, the size report, and one clear error per bad argument."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tunnelhub.cli import main
from tunnelhub.spec import load_spec
from tunnelhub.userdata import render_cloud_init

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hubs.yaml"


def invoke(*args: str):
    return CliRunner().invoke(main, ["render-userdata", str(EXAMPLE), *args])


def test_azure_hub_prints_the_cloud_config_and_reports_the_size():
    result = invoke("--hub", "weu", "--slot", "1")
    assert result.exit_code == 0, result.output
    expected = render_cloud_init(load_spec(EXAMPLE).hub("weu"), 1)
    assert result.stdout == expected.cloud_config
    assert yaml.safe_load(result.stdout)["write_files"]
    assert (f"tunnelhub: hub weu slot 1: user data {expected.size_bytes} bytes (gzip-compressed from "
            f"{len(expected.cloud_config.encode())} bytes), limit 65535 bytes on azure") in result.stderr


def test_aws_hub_reports_the_objects_for_the_bucket(tmp_path):
    out = tmp_path / "use.yaml"
    result = invoke("--hub", "use", "--out", str(out))
    assert result.exit_code == 0, result.output
    expected = render_cloud_init(load_spec(EXAMPLE).hub("use"), None)
    assert out.read_text() == expected.cloud_config == gzip.decompress(expected.payload).decode()
    assert result.stdout == ""
    assert "limit 16384 bytes on aws" in result.stderr
    assert (f"/usr/local/lib/tunnelhub/tunnelhub_health.py does not fit: upload it to the hub files bucket as "
            f"{expected.s3_objects[0].key}") in result.stderr
    assert f"wrote {out}" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--hub", "weu"], "hub weu is an azure hub: give --slot N, the proxy index from 0 to 1"),
    (["--hub", "weu", "--slot", "2"], "Invalid value for --slot: hub weu has 2 proxies: give 0 to 1"),
    (["--hub", "weu", "--slot", "-1"], "Invalid value for '--slot'"),
    (["--hub", "use", "--slot", "0"], "hub use is an aws hub: its proxies share one launch template and learn "
                                      "their slot at boot; leave out --slot"),
    (["--hub", "nope"], "Invalid value for --hub: no hub named 'nope'; hubs in this spec: weu, use"),
    ([], "the spec has several hubs (weu, use): choose one with --hub NAME"),
])
def test_bad_arguments_exit_2_with_one_message(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_bad_spec_exits_1_without_traceback(tmp_path):
    result = CliRunner().invoke(main, ["render-userdata", str(tmp_path / "missing.yaml"), "--hub", "weu"])
    assert result.exit_code == 1
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_render_config_prints_the_document_and_its_version(tmp_path):
    import json

    from tunnelhub.userdata import render_document

    result = CliRunner().invoke(main, ["render-config", str(EXAMPLE), "--hub", "weu"])
    assert result.exit_code == 0, result.output
    document = render_document(load_spec(EXAMPLE).hub("weu"))
    assert result.stdout == document.text and json.loads(result.stdout)["version"] == document.version
    assert f"configuration document {document.version}" in result.stderr and "Azure user_data" in result.stderr
    assert "2 route(s), 2 tunnel key(s) of 2 tunnel host(s)" in result.stderr
    out = tmp_path / "doc.json"
    assert CliRunner().invoke(main, ["render-config", str(EXAMPLE), "--hub", "use", "--out", str(out)]).exit_code == 0
    assert json.loads(out.read_text())["hub"] == "use"
    bad = CliRunner().invoke(main, ["render-config", str(EXAMPLE)])
    assert bad.exit_code == 2 and "choose one with --hub" in bad.output
