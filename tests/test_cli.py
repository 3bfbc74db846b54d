"""The tunnelhub command: exit codes, messages without tracebacks, tables and JSON."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.conftest import EXAMPLE_SPEC
from tests.helpers import azure_hub, mutated, spec_text
from tunnelhub.cli import main


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def write(tmp_path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


def test_validate_example():
    result = run("validate", str(EXAMPLE_SPEC))
    assert result.exit_code == 0, result.output
    assert "valid, 2 hubs" in result.output
    assert "weu: azure westeurope, 2 proxies, 2 routes -> stack weu-azure" in result.output
    assert "use: aws us-east-1, 2 slots, 2 routes -> stack use-aws" in result.output
    # The NCC binding replaces any NCC the workspace has: not checkable offline, so always said.
    assert "warning: hub 'weu': binding NCC 'weu-ncc' to workspace 1234567890123456 replaces any NCC" in result.output
    assert "databricks account workspaces get 2345678901234567" in result.output


def test_validate_defaults_to_tunnelhub_spec_env(tmp_path):
    path = write(tmp_path, spec_text(azure_hub()))
    result = run("validate", env={"TUNNELHUB_SPEC": path})
    assert result.exit_code == 0 and path in result.output


@pytest.mark.parametrize("change, fragment", [
    (lambda h: h["routes"][1].update(port=3306), "routes[1].port = 3306: frontend ports must be unique"),
    (lambda h: h["onprem"].update(source_cidrs=["10.60.0.0/16"]), "onprem.source_cidrs[0] = '10.60.0.0/16': overlaps the hub network"),
    (lambda h: h.update(databricks={"account_id": "0d2f1a6e-4b7c-4e2a-9c1d-3f5e6a7b8c9d", "workspace_id": "1234567",
                                    "workspace_host": "https://adb-1234567.7.azuredatabricks.net",
                                    "connections": [{"route": "orders-mysql", "user": "u", "password": "s3cret"}]}),
     "connections[0].password: literal credentials are not allowed"),
    (lambda h: h.update(colour="blue"), "hubs[0].colour: unknown key 'colour'"),
])
def test_validate_rejects_with_the_field_named(tmp_path, change, fragment):
    path = write(tmp_path, spec_text(mutated(azure_hub(), change)))
    result = run("validate", path)
    assert result.exit_code == 1
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_ports_table_and_json():
    """One row per (tunnel route, tunnel host): weu has two tunnel hosts, use the single-host form."""
    table = run("ports", str(EXAMPLE_SPEC))
    assert table.exit_code == 0
    header, *rows = table.output.splitlines()
    assert header.split() == ["HUB", "ROUTE", "KIND", "PORT", "TUNNEL_HOST", "TUNNEL_PORT", "PEER_PORT", "TARGET",
                              "DOMAIN", "PROBE"]
    assert [r.split()[:7] for r in rows if r.startswith("weu ")] == [
        ["weu", "orders-mysql", "tunnel", "3306", "ams-tunnel-01", "13306", "23306"],
        ["weu", "orders-mysql", "tunnel", "3306", "ams-tunnel-02", "14306", "23306"],
        ["weu", "billing-pg", "tunnel", "5432", "ams-tunnel-01", "15432", "25432"],
        ["weu", "billing-pg", "tunnel", "5432", "ams-tunnel-02", "16432", "25432"]]
    assert any(r.split()[:7] == ["use", "inventory-mysql", "tunnel", "3306", "tunnel-host", "13306", "23306"]
               for r in rows)
    assert any(r.split()[:7] == ["use", "aoai", "forward", "443", "-", "-", "-"] for r in rows)
    data = json.loads(run("ports", str(EXAMPLE_SPEC), "--json").output)
    assert {(r["hub"], r["route"], r["tunnel_host"], r["tunnel_port"], r["peer_port"]) for r in data} == {
        ("weu", "orders-mysql", "ams-tunnel-01", 13306, 23306), ("weu", "orders-mysql", "ams-tunnel-02", 14306, 23306),
        ("weu", "billing-pg", "ams-tunnel-01", 15432, 25432), ("weu", "billing-pg", "ams-tunnel-02", 16432, 25432),
        ("use", "inventory-mysql", "tunnel-host", 13306, 23306), ("use", "aoai", None, None, None)}
    assert len(data) == 6


def test_synth_bad_spec_and_unknown_hub(tmp_path):
    bad = write(tmp_path, spec_text(mutated(azure_hub(), lambda h: h["routes"][0].update(port=22))))
    result = run("synth", bad, "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "port 22 is reserved" in result.output
    assert not (tmp_path / "out").exists()


def test_missing_spec_file(tmp_path):
    result = run("validate", str(tmp_path / "missing.yaml"))
    assert result.exit_code == 1 and "does not exist" in result.output


def test_bad_option_is_a_usage_error():
    assert run("ports", "--nope").exit_code == 2
