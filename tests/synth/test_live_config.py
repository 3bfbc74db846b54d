"""Routine changes reach the proxies live; only machine changes replace them (issue 14), judged on
the synthesized stacks of both example hubs, before and after each change of the catalogue in
tests/helpers.py.

For every routine change: no ``azurerm_linux_virtual_machine`` attribute that forces a
replacement (``custom_data`` among them: ForceNew, terraform-provider-azurerm v4.55.0
internal/services/compute/linux_virtual_machine_resource.go) or powers the VM off changes; the VMs'
``custom_data`` and the launch template's ``user_data`` are byte-identical; the launch template
does not change at all (so no new version, and the Auto Scaling group, whose ``launch_template``
follows ``latest_version``, starts no instance refresh: "A refresh will always be triggered by a
change in any of launch_configuration, launch_template, or mixed_instances_policy",
terraform-provider-aws docs, aws_autoscaling_group); the document changes as an in-place update
(Azure: ``user_data``, which the provider updates without ForceNew, and the version tag; AWS: the
``aws_s3_object`` content). A size change is reported: on AWS a new launch template version
(instance refresh), on Azure a power-off resize (``size`` sets shouldShutDown in the same file's
update). And ``tunnelhub synth`` prints all of it.
"""

from __future__ import annotations

import base64
import copy
import json

import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import EXAMPLE_SPEC
from tests.helpers import MACHINE_CHANGES, ROUTINE_CHANGES
from tunnelhub.changes import AZURE_VM, diff_stacks, document_of, resources, stack_reports
from tunnelhub.cli import main

pytestmark = pytest.mark.synth

STACKS = ("weu-azure", "use-aws")


def spec_with(change) -> str:
    data = yaml.safe_load(EXAMPLE_SPEC.read_text())
    for hub in data["hubs"]:
        change(hub)
    return yaml.safe_dump(data, sort_keys=False)


def of_type(stack: dict, rtype: str) -> dict[str, dict]:
    return stack.get("resource", {}).get(rtype, {})


@pytest.fixture(scope="module")
def before(example):
    return {name: example.stack(name) for name in STACKS}


@pytest.mark.parametrize("name", list(ROUTINE_CHANGES))
def test_a_routine_change_replaces_no_proxy(synth_spec, before, name):
    after_out = synth_spec(text=spec_with(ROUTINE_CHANGES[name]))
    for stack in STACKS:
        old, new = before[stack], after_out.stack(stack)
        changes = diff_stacks(old, new)
        proxy_changes = [c for c in changes if c.address.startswith((AZURE_VM + ".", "aws_launch_template.",
                                                                     "aws_autoscaling_group."))]
        assert not [c for c in proxy_changes if c.action in ("replace", "restart", "new-version", "delete")], \
            (name, stack, proxy_changes)
        for address, body in resources(old).items():
            if address.startswith(AZURE_VM + "."):
                assert resources(new)[address]["custom_data"] == body["custom_data"], (name, address)
            if address.startswith("aws_launch_template."):
                assert resources(new)[address] == body, (name, address)  # not a byte of it: no new version
            if address.startswith("aws_autoscaling_group."):
                changed = {k for k in set(body) | set(resources(new)[address]) if body.get(k) != resources(new)[address].get(k)}
                # the size and the slot tags (the count): none of them starts an instance refresh
                assert changed <= {"tag", "depends_on", "min_size", "max_size", "desired_capacity"}, (name, changed)
        old_doc, new_doc = document_of(old), document_of(new)
        if name == "lb-probe":
            assert new_doc == old_doc  # the load balancer's probes only
            continue
        assert new_doc["version"] != old_doc["version"], (name, stack)
        # The document is an in-place update: Azure user_data and tag of every VM, AWS the object's content.
        for change in (c for c in proxy_changes if c.action != "create"):  # a new proxy is created
            assert change.action == "update" and set(change.attributes) <= {
                "user_data", "tags", "tag", "min_size", "max_size", "desired_capacity"}, change
        if stack == "weu-azure":
            for body in of_type(new, AZURE_VM).values():
                assert json.loads(base64.b64decode(body["user_data"]))["version"] == new_doc["version"]
                assert body["tags"]["tunnelhub-config-version"] == new_doc["version"]


@pytest.mark.parametrize("name", list(MACHINE_CHANGES))
def test_a_machine_change_is_reported_as_replacing_the_proxies(synth_spec, before, name):
    after = synth_spec(text=spec_with(MACHINE_CHANGES[name]))
    reports = {r.stack: r for r in stack_reports(before, {s: after.stack(s) for s in STACKS})}
    azure, aws = reports["weu-azure"], reports["use-aws"]
    assert len(azure.proxies_replaced) == 2 and all(c.action == "replace" for c in azure.proxies_replaced)
    assert any("custom_data" in c.attributes for c in azure.proxies_replaced)
    assert [c.action for c in aws.proxies_replaced] == ["new-version"]
    assert "user_data" in aws.proxies_replaced[0].attributes


def test_a_size_change_is_a_restart_on_azure_and_an_instance_refresh_on_aws(synth_spec, before):
    def bigger(hub: dict) -> None:
        hub["proxies"]["size"] = "Standard_D4s_v5" if hub["cloud"] == "azure" else "t3.medium"

    after = synth_spec(text=spec_with(bigger))
    reports = {r.stack: r for r in stack_reports(before, {s: after.stack(s) for s in STACKS})}
    azure, aws = reports["weu-azure"], reports["use-aws"]
    assert [c.attributes for c in azure.proxies_restarted] == [("size",), ("size",)] and not azure.proxies_replaced
    assert [(c.action, c.attributes) for c in aws.proxies_replaced] == [("new-version", ("instance_type",))]
    assert not azure.live.changed and not aws.live.changed
    text = "\n".join(azure.lines() + aws.lines())
    assert "PROXY RESTARTED" in text and "PROXIES REPLACED, one at a time by the Auto Scaling group's instance refresh" in text


def test_synth_prints_the_live_change_and_that_no_proxy_is_replaced(tmp_path):
    out = tmp_path / "cdktf.out"
    runner = CliRunner()
    first = runner.invoke(main, ["synth", str(EXAMPLE_SPEC), "--hub", "weu", "--out", str(out), "--jobs", "1"])
    assert first.exit_code == 0, first.output
    assert "weu-azure: new output (nothing to compare with); live configuration " in first.output
    def routine(hub: dict) -> None:
        ROUTINE_CHANGES["add-tunnel-route"](hub)
        ROUTINE_CHANGES["add-tunnel-key"](hub)

    spec = tmp_path / "hubs.yaml"
    spec.write_text(spec_with(routine))
    second = runner.invoke(main, ["synth", str(spec), "--hub", "weu", "--out", str(out), "--jobs", "1"])
    assert second.exit_code == 0, second.output
    assert ("route added: erp-mssql; key added: SHA256:2QxLEj7gmyu9+St58AXD1cmE5W5SD7mXOYrRTQ6Sjac (tunnel@second) "
            "of tunnel host ams-tunnel-01") in second.output
    assert "applied in place by the proxies' reconcilers" in second.output
    assert "no proxy replaced or restarted" in second.output
    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(spec_with(lambda h: (routine(h), h["proxies"].update(size="Standard_D4s_v5"))))
    third = runner.invoke(main, ["synth", str(bigger), "--hub", "weu", "--out", str(out), "--jobs", "1", "--json"])
    assert third.exit_code == 0, third.output
    (stack,) = json.loads(third.stdout)["stacks"]
    assert stack["changes"]["proxies_restarted"] and stack["changes"]["live_config"]["changed"] is False
    again = runner.invoke(main, ["synth", str(bigger), "--hub", "weu", "--out", str(out), "--jobs", "1"])
    assert "weu-azure: no change" in again.output


def test_the_report_holds_no_secret_and_copes_with_stacks_without_a_document(before):
    empty = copy.deepcopy(before["weu-azure"])
    for body in of_type(empty, AZURE_VM).values():
        body.pop("user_data")
    (report,) = stack_reports({"weu-azure": empty}, {"weu-azure": before["weu-azure"]})
    assert report.live.old_version is None and report.live.changed
    assert "live configuration none -> " in report.lines()[0]
