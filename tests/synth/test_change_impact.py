"""What each routine change does to a deployed hub (issue 13, "change-impact test"): synthesize the
example, apply each change of the routine catalogue (tests/helpers.py: add a route, add or rotate
a tunnel key, more proxies, probe settings, ...) and judge the diff with tunnelhub.changes, whose
ForceNew table is read from the pinned providers' source.

Two rules, on both example stacks:

1. **The traffic path is never replaced, deleted or even touched**, except for the attributes
   listed in ``IN_PLACE`` (each updated in place by its provider): the resources whose
   replacement cuts every route of the hub — the Azure load balancer, its backend pool, the
   Private Link Service, the NSG, the Key Vault with the host key; the AWS NLB, the endpoint
   service, the Auto Scaling group, the host key parameter; on Databricks the NCC, its binding
   and the private endpoint rule (a new rule means a new endpoint to approve: serverless is cut
   until it is). An unchanged resource is never replaced, whatever its provider's ForceNew
   table says, so this needs no table for them.
2. **Each route's own resources** (LB rule and probe, NLB listener, target group and its
   attachments, the route's alerts) are never replaced, and deleted only for the route the change removes; new
   ones are created only for an added route or an added proxy.

The proxies themselves (Azure VMs, the AWS launch template) are judged by
tests/synth/test_live_config.py: a routine change reaches them through the live configuration
document, never by a replacement (Azure ``custom_data`` is byte-identical; that was issue 14).

What this cannot see: a change Terraform plans from state the JSON does not show (drift, a
provider default that differs from the API's); and what an update in place does while it runs
(the LB rule update itself is hitless on Azure and AWS as their docs describe it, not measured
here).
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.helpers import ROUTINE_CHANGES
from tests.synth.test_live_config import STACKS, spec_with
from tunnelhub.changes import FORCE_NEW, diff_stacks, resources

pytestmark = pytest.mark.synth

IN_PLACE: dict[str, frozenset[str]] = {
    # Traffic path: what a routine change may update in place (anything else fails the test).
    "azurerm_lb": frozenset(),
    "azurerm_lb_backend_address_pool": frozenset(),
    "azurerm_private_link_service": frozenset(),
    "azurerm_network_security_group": frozenset(),
    "azurerm_key_vault": frozenset(),
    "azurerm_key_vault_secret": frozenset(),
    "azurerm_virtual_network": frozenset(),
    "azurerm_subnet": frozenset(),
    "azurerm_nat_gateway": frozenset(),
    "aws_lb": frozenset(),
    "aws_vpc_endpoint_service": frozenset(),
    "aws_ssm_parameter": frozenset(),
    "aws_kms_key": frozenset(),
    "aws_vpc": frozenset(),
    "aws_subnet": frozenset(),
    # min/max/desired follow proxies.count and the slot tags name it: updated in place, no
    # instance refresh (tests/synth/test_live_config.py cites the provider docs).
    "aws_autoscaling_group": frozenset({"min_size", "max_size", "desired_capacity", "tag"}),
    "databricks_mws_network_connectivity_config": frozenset(),
    "databricks_mws_ncc_binding": frozenset(),
    # domain_names is in the update mask, not ForceNew: terraform-provider-databricks
    # mws/resource_mws_ncc_private_endpoint_rule.go@v1.106.0 and @v1.118.0 (ForceNew only endpoint_service,
    # group_id, resource_id, network_connectivity_config_id; `if d.HasChange("domain_names")`
    # appends it to the update mask). 1.99.0 sent `enabled` too, which Azure refuses: hence the
    # >= 1.118.0 floor (tunnelhub/providers.py; #5347 too).
    "databricks_mws_ncc_private_endpoint_rule": frozenset({"domain_names"}),
}
PER_ROUTE = ("azurerm_lb_rule", "azurerm_lb_probe", "aws_lb_listener", "aws_lb_target_group",
             "aws_lb_target_group_attachment", "azurerm_monitor_metric_alert", "aws_cloudwatch_metric_alarm")
"""Each route's own resources, its alerts among them (issue 16: a probe-down and a data-path alert on
Azure, a down and a degraded alarm on AWS; their timing follows the probe settings, so lb-probe
updates them in place)."""
ADDS_ROUTE = {"add-tunnel-route": "erp-mssql", "add-forward-route": "partner-api"}
REMOVED_ROUTE = {"weu-azure": "billing-pg", "use-aws": "aoai"}  # _remove_route pops the last route
PROXY_TYPES = {"azurerm_linux_virtual_machine", "azurerm_network_interface",
               "azurerm_network_interface_backend_address_pool_association", "azurerm_role_assignment",
               "aws_eip", "aws_lb_target_group_attachment"}


def kind(address: str) -> str:
    return address.split(".", 1)[0]


def squash(text: str) -> str:
    """Construct ids spell a route name with - or _ (``billing-pg``, ``uc_billing_pg``)."""
    return text.replace("-", "").replace("_", "")


@pytest.fixture(scope="module")
def impact(synth_spec, example):
    """change name -> stack -> [ResourceChange] (the synthesis is shared with test_live_config)."""
    out = {}
    for name, change in ROUTINE_CHANGES.items():
        after = synth_spec(text=spec_with(change))
        out[name] = {s: diff_stacks(example.stack(s), after.stack(s)) for s in STACKS}
    return out


def test_the_table_covers_the_traffic_path_of_both_stacks(example):
    """Every traffic-path type is in the example stacks, so rule 1 judges something real."""
    present = {kind(a) for s in STACKS for a in resources(example.stack(s))}
    missing = {t for t in IN_PLACE if t not in present} - {"azurerm_subnet", "aws_kms_key", "aws_ssm_parameter",
                                                           "azurerm_key_vault_secret", "azurerm_nat_gateway"}
    assert not missing, missing


@pytest.mark.parametrize("name", list(ROUTINE_CHANGES))
def test_a_routine_change_never_touches_the_traffic_path(impact, name):
    for stack, changes in impact[name].items():
        for change in changes:
            rtype = kind(change.address)
            if rtype not in IN_PLACE:
                continue
            assert change.action == "update", (name, stack, change)
            assert set(change.attributes) <= IN_PLACE[rtype], (name, stack, change)


@pytest.mark.parametrize("name", list(ROUTINE_CHANGES))
def test_a_routine_change_replaces_nothing_and_deletes_only_a_removed_route(impact, name):
    for stack, changes in impact[name].items():
        replaced = [c for c in changes if c.action == "replace"]
        assert not replaced, (name, stack, replaced)
        for change in (c for c in changes if c.action == "delete"):
            assert name == "remove-route", (name, stack, change)
            assert squash(REMOVED_ROUTE[stack]) in squash(change.address), (name, stack, change)
        for change in (c for c in changes if c.action == "update" and kind(c.address) in PER_ROUTE):
            assert not set(change.attributes) & FORCE_NEW.get(kind(change.address), frozenset()), (name, change)


@pytest.mark.parametrize("name", list(ROUTINE_CHANGES))
def test_resources_are_created_only_for_what_the_change_adds(impact, name):
    for stack, changes in impact[name].items():
        created = [c.address for c in changes if c.action == "create"]
        if name in ADDS_ROUTE:
            route = ADDS_ROUTE[name]
            per_route = Counter(kind(a) for a in created if kind(a) in PER_ROUTE)
            if stack == "weu-azure":
                assert per_route == Counter({"azurerm_lb_rule": 1, "azurerm_lb_probe": 1,
                                             "azurerm_monitor_metric_alert": 2}), per_route
            else:  # a listener and a target group, one attachment per slot, the down and degraded alarms
                assert per_route == Counter({"aws_lb_listener": 1, "aws_lb_target_group": 1,
                                             "aws_lb_target_group_attachment": 2,
                                             "aws_cloudwatch_metric_alarm": 2}), per_route
            assert all(squash(route) in squash(a) for a in created if kind(a) in PER_ROUTE), created
        elif name == "more-proxies":  # two more slots
            assert {kind(a) for a in created} <= PROXY_TYPES, created
            if stack == "weu-azure":
                assert Counter(kind(a) for a in created)["azurerm_linux_virtual_machine"] == 2
            else:
                assert Counter(kind(a) for a in created)["aws_eip"] == 2
        elif name == "source-cidrs":  # AWS: one more SSH ingress rule; Azure updates its NSG rule
            assert {kind(a) for a in created} <= {"aws_vpc_security_group_ingress_rule"}, created
        else:
            assert created == [], (name, stack, created)


def test_synth_refuses_to_drop_a_guarded_resource_while_the_hub_is_protected(tmp_path):
    """``prevent_destroy`` "does not prevent the remote object from being destroyed if the resource
    block were removed from configuration entirely" (Terraform docs, The lifecycle meta-argument):
    turning serverless off removes the NCC and its endpoint rule from the stack, and the next
    apply would destroy them without a question. ``tunnelhub synth`` compares with the previous
    output and refuses (writing nothing) until the hub says ``protect: false``."""
    import json

    import yaml
    from click.testing import CliRunner

    from tests.conftest import EXAMPLE_SPEC
    from tunnelhub.cli import main

    out = tmp_path / "cdktf.out"
    runner = CliRunner()
    first = runner.invoke(main, ["synth", str(EXAMPLE_SPEC), "--hub", "weu", "--out", str(out), "--jobs", "1"])
    assert first.exit_code == 0, first.output
    manifest = (out / "manifest.json").read_text()
    stack = json.loads((out / "stacks" / "weu-azure" / "cdk.tf.json").read_text())

    def without_serverless(protect: bool) -> str:
        data = yaml.safe_load(EXAMPLE_SPEC.read_text())
        for hub in data["hubs"]:
            hub["databricks"]["serverless_enabled"] = False
            hub["databricks"].pop("network_policy", None)
            if not protect:
                hub["protect"] = False
        path = tmp_path / f"off-{protect}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return str(path)

    refused = runner.invoke(main, ["synth", without_serverless(True), "--hub", "weu", "--out", str(out), "--jobs", "1"])
    assert refused.exit_code != 0
    assert "removes resources the protect guard covers" in refused.output
    ncc = next(iter(stack["resource"]["databricks_mws_network_connectivity_config"]))
    assert f"weu-azure: databricks_mws_network_connectivity_config.{ncc}" in refused.output
    assert "set protect: false" in refused.output and "Traceback" not in refused.output
    assert (out / "manifest.json").read_text() == manifest  # nothing was written
    assert json.loads((out / "stacks" / "weu-azure" / "cdk.tf.json").read_text()) == stack
    allowed = runner.invoke(main, ["synth", without_serverless(False), "--hub", "weu", "--out", str(out), "--jobs", "1"])
    assert allowed.exit_code == 0, allowed.output
    after = json.loads((out / "stacks" / "weu-azure" / "cdk.tf.json").read_text())
    assert "databricks_mws_network_connectivity_config" not in after.get("resource", {})


def test_more_proxies_updates_the_degraded_alarms_threshold_in_place(impact):
    """The degraded alarm's threshold is proxies.count (issue 16): two more slots update it in place
    (``threshold`` is not ForceNew, terraform-provider-aws internal/service/cloudwatch/metric_alarm.go:
    the update is one PutMetricAlarm), and nothing else of any route's alerts changes."""
    alarms = [c for c in impact["more-proxies"]["use-aws"] if kind(c.address) == "aws_cloudwatch_metric_alarm"]
    assert len(alarms) == 2 and all(c.action == "update" and set(c.attributes) == {"threshold", "alarm_description"}
                                    for c in alarms), alarms
    assert all("degraded" in c.address for c in alarms)
    assert not [c for c in impact["more-proxies"]["weu-azure"] if kind(c.address) == "azurerm_monitor_metric_alert"]
