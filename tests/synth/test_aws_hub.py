"""The AWS hub stack: every resource issue 5 asks for, with the properties that matter, read from
the synthesized Terraform JSON of the example hub (``use``: slot EIPs, new VPC) and of two variants
(``pvt``: NAT gateway, private circuit, three zones, Graviton, custom principals; ``exv``: an
existing VPC). Each spec is synthesized once per session (tests/conftest.py)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
import zipfile
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_SPEC
from tests.helpers import MONITORING, TUNNEL_KEY, aws_hub, load_hubs, monitoring_text, overrides_text, spec_text
from tunnelhub.spec import SpecError, load_spec, validate_text

pytestmark = pytest.mark.synth

# --------------------------------------------------------------------------------------------
# Specs and helpers
# --------------------------------------------------------------------------------------------

EXISTING_VPC = {
    "vpc_id": "vpc-0123456789abcdef0",
    "vpc_cidr": "10.100.0.0/16",
    "proxy_subnets": [
        {"id": "subnet-0aaaaaaaaaaaaaaa1", "cidr": "10.100.0.0/24", "availability_zone": "us-west-2a"},
        {"id": "subnet-0aaaaaaaaaaaaaaa2", "cidr": "10.100.1.0/24", "availability_zone": "us-west-2b"},
    ],
    "nlb_subnets": [
        {"id": "subnet-0bbbbbbbbbbbbbbb1", "cidr": "10.100.2.0/24", "availability_zone": "us-west-2a"},
        {"id": "subnet-0bbbbbbbbbbbbbbb2", "cidr": "10.100.3.0/24", "availability_zone": "us-west-2b"},
    ],
}


def variant_hubs() -> list[dict]:
    pvt = aws_hub(
        name="pvt",
        region="eu-west-1",
        network={"cidr": "10.90.0.0/22", "egress": "nat_gateway",
                 "availability_zones": ["eu-west-1a", "eu-west-1b", "eu-west-1c"]},
        proxies={"count": 3, "size": "t4g.small", "health_port": 9000, "probe_interval_s": 10, "probe_threshold": 3},
        routes=[
            {"name": "ledger-pg", "kind": "tunnel", "port": 5432, "target": "ledger.corp.example:5432",
             "type": "postgresql", "idle_timeout_min": 60},
            {"name": "partner-api", "kind": "forward", "port": 8443, "target": "api.partner.example:8443"},
        ],
        onprem={"source_cidrs": ["172.16.0.0/16", "172.18.0.0/24"], "tunnel_public_keys": [TUNNEL_KEY],
                "private_circuit": True},
        aws={"key_pair_name": "ops", "endpoint_allowed_principals": ["arn:aws:iam::111122223333:root"]},
    )
    exv = aws_hub(name="exv", region="us-west-2", network={"existing_vpc": EXISTING_VPC})
    return [pvt, exv]


def variants_text() -> str:
    """The variant spec (shared with test_aws_checkov.py, so it is synthesized once per session)."""
    return spec_text(*variant_hubs())


@pytest.fixture(scope="session")
def variants(synth_spec):
    return synth_spec(text=variants_text())


CLASSIC_DATABRICKS = {
    "account_id": "0d2f1a6e-4b7c-4e2a-9c1d-3f5e6a7b8c9d",
    "workspace_host": "https://dbc-3456789012345678.cloud.databricks.com",
}


def classic_hubs() -> list[dict]:
    """Databricks classic beyond the example's same-account new VPC: ``xac``, the workspace VPC
    in another account (NAT egress, so the NLB subnets use the internet table); ``exc``, an
    existing hub VPC whose NLB route tables are given, same account."""
    xac = aws_hub(
        name="xac", region="us-east-2", network={"cidr": "10.91.0.0/24", "egress": "nat_gateway"},
        onprem={"source_cidrs": ["172.16.0.0/16"], "tunnel_public_keys": [TUNNEL_KEY], "private_circuit": True},
        databricks={**CLASSIC_DATABRICKS, "workspace_id": "3456789012345678", "classic": {
            "network_id": "vpc-0c1c2c3c4c5c6c7c8", "cidrs": ["10.81.0.0/16", "10.82.0.0/16"],
            "aws_account_id": "210987654321", "remote_peering_enabled": False}},
    )
    exc = aws_hub(
        name="exc", region="us-west-2",
        network={"existing_vpc": {**EXISTING_VPC, "nlb_route_table_ids": ["rtb-0ccccccccccccccc1", "rtb-0ccccccccccccccc2"]}},
        databricks={**CLASSIC_DATABRICKS, "workspace_id": "4567890123456789", "serverless_enabled": False, "classic": {
            "network_id": "vpc-0d1d2d3d4d5d6d7d8", "cidrs": ["10.83.0.0/16"],
            "aws_route_table_ids": ["rtb-0ddddddddddddddd1", "rtb-0ddddddddddddddd2"]}},
    )
    return [xac, exc]


@pytest.fixture(scope="session")
def classic(synth_spec):
    synthesized = synth_spec(text=spec_text(*classic_hubs()))
    spec = validate_text(spec_text(*classic_hubs()), "classic.yaml").spec
    return {name: (synthesized.stack(f"{name}-aws"), spec.hub(name)) for name in ("xac", "exc")}


@pytest.fixture(scope="session")
def hubs():
    spec = load_spec(EXAMPLE_SPEC)
    variant = validate_text(variants_text(), "variants.yaml").spec
    return {"use": spec.hub("use"), "pvt": variant.hub("pvt"), "exv": variant.hub("exv")}


@pytest.fixture(scope="session")
def overrides(synth_spec):
    """Every issue-13 override at once (tests/helpers.py), shared with the Azure and Databricks tests."""
    return synth_spec(text=overrides_text()).stack("ova-aws")


@pytest.fixture(scope="session")
def stacks(example, variants):
    return {"use": example.stack("use-aws"), "pvt": variants.stack("pvt-aws"), "exv": variants.stack("exv-aws")}


def resources(stack: dict, kind: str, *, data: bool = False) -> dict[str, dict]:
    """Resources (or data sources) of one type by construct path below the hub (``slots/eip0``)."""
    out = {}
    for body in stack.get("data" if data else "resource", {}).get(kind, {}).values():
        path = body["//"]["metadata"]["path"].split("/", 2)[2]  # drop "<stack>/hub/"
        out[path] = {k: v for k, v in body.items() if k != "//"}
    return out


def one(stack: dict, kind: str, path: str, *, data: bool = False) -> dict:
    return resources(stack, kind, data=data)[path]


def ref(stack: dict, kind: str, path: str, attribute: str, *, data: bool = False) -> str:
    """The ``${type.logical_id.attribute}`` reference to the resource at ``path``."""
    for logical, body in stack["data" if data else "resource"][kind].items():
        if body["//"]["metadata"]["path"].split("/", 2)[2] == path:
            return "${" + ("data." if data else "") + f"{kind}.{logical}.{attribute}" + "}"
    raise KeyError(path)


def refs_in(value) -> set[str]:
    return set(re.findall(r"\$\{([^}]+)\}", json.dumps(value)))


def logical(reference: str) -> str:
    return reference.strip("${}").rsplit(".", 1)[0]


def policy(stack: dict, path: str) -> list[dict]:
    return one(stack, "aws_iam_policy_document", path, data=True)["statement"]


def partition(stack: dict) -> str:
    return ref(stack, "aws_partition", "partition", "partition", data=True)


def account(stack: dict) -> str:
    return ref(stack, "aws_caller_identity", "account", "account_id", data=True)


def conditions(statement: dict) -> dict[tuple[str, str], list[str]]:
    return {(c["test"], c["variable"]): c["values"] for c in statement.get("condition", [])}


def user_data_text(launch_template: dict) -> str:
    payload = base64.b64decode(launch_template["user_data"])
    return (gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload).decode()


# --------------------------------------------------------------------------------------------
# Slots
# --------------------------------------------------------------------------------------------


def test_each_slot_is_a_pool_eip_tagged_with_its_number(stacks, hubs):
    for name in ("use", "pvt", "exv"):
        eips = resources(stacks[name], "aws_eip")
        slots = {p: e for p, e in eips.items() if p.startswith("slots/")}
        assert sorted(slots) == [f"slots/eip{n}" for n in range(hubs[name].proxies.count)]
        for n in range(hubs[name].proxies.count):
            eip = slots[f"slots/eip{n}"]
            assert eip["domain"] == "vpc"
            assert eip["tags"]["tunnelhub:pool"] == name
            assert eip["tags"]["tunnelhub:slot"] == str(n)
            assert "instance" not in eip and "network_interface" not in eip  # the Lambda associates them


def test_slot_private_addresses_are_reserved_in_their_zones_proxy_subnet(stacks, hubs):
    for name in ("use", "pvt", "exv"):
        plan = hubs[name].aws_addresses()
        reservations = resources(stacks[name], "aws_ec2_subnet_cidr_reservation")
        assert len(reservations) == len(plan.public_subnets)
        for zone, block in enumerate(plan.slot_reserved_blocks):
            r = reservations[f"network/slot-reservations/zone{zone}"]
            assert r["reservation_type"] == "explicit"
            assert r["cidr_block"] == str(block)
            assert block.subnet_of(plan.public_subnets[zone])
        for slot, ip in enumerate(plan.slot_private_ips):
            assert ip in plan.slot_reserved_blocks[plan.slot_zones[slot]]
        reserved = {r["cidr_block"]: r["subnet_id"] for r in reservations.values()}
        if name == "exv":
            assert reserved == {"10.100.0.16/28": "subnet-0aaaaaaaaaaaaaaa1", "10.100.1.16/28": "subnet-0aaaaaaaaaaaaaaa2"}
        else:
            for zone, block in enumerate(plan.slot_reserved_blocks):
                assert reserved[str(block)] == ref(stacks[name], "aws_subnet", f"network/proxy-subnets/zone{zone}", "id")


# --------------------------------------------------------------------------------------------
# Slot Lambda
# --------------------------------------------------------------------------------------------


def test_slot_lambda_is_unreserved_unless_the_spec_reserves_concurrency(stacks, overrides):
    """AWS Lambda "Configuring reserved concurrency" (docs.aws.amazon.com/lambda/latest/dg/
    configuration-concurrency.html): a function can reserve up to the unreserved account
    concurrency minus 100, so ``reserved_concurrent_executions = 1`` fails on accounts at a low
    quota ("decreases account's UnreservedConcurrentExecution below its minimum value"). Absent
    (the aws provider's default -1, unreserved) unless ``aws.slot_lambda_reserved_concurrency``."""
    for name in ("use", "pvt", "exv"):
        assert "reserved_concurrent_executions" not in one(stacks[name], "aws_lambda_function", "slot-function/function")
    assert one(overrides, "aws_lambda_function", "slot-function/function")["reserved_concurrent_executions"] == 5


def test_nlb_and_endpoint_service_prevent_destroy_unless_protect_is_false(stacks, overrides):
    """Terraform's lifecycle meta-argument: ``prevent_destroy = true`` makes Terraform reject any plan
    that would destroy the object, a replacement included (developer.hashicorp.com/terraform/
    language/meta-arguments/lifecycle). A replaced NLB or endpoint service gets a new service name,
    so the Databricks rule (endpoint_service is ForceNew in databricks 1.99.0) would be replaced
    too and serverless cut off. ``protect: false`` removes the guard."""
    use = stacks["use"]
    assert one(use, "aws_lb", "nlb/lb")["lifecycle"] == {"prevent_destroy": True}
    assert one(use, "aws_vpc_endpoint_service", "endpoint-service")["lifecycle"] == {"prevent_destroy": True}
    assert "lifecycle" not in one(overrides, "aws_lb", "nlb/lb")
    assert "lifecycle" not in one(overrides, "aws_vpc_endpoint_service", "endpoint-service")
    # Nothing else is guarded (the proxies, listeners and target groups change in routine deploys).
    guarded = {kind for kind in use["resource"] for body in resources(use, kind).values()
               if body.get("lifecycle", {}).get("prevent_destroy")}
    assert guarded == {"aws_lb", "aws_vpc_endpoint_service", "databricks_mws_network_connectivity_config",
                       "databricks_mws_ncc_private_endpoint_rule"}


def test_slot_lambda_function_and_its_environment(stacks, hubs):
    from tunnelhub.constructs.slot_lambda import handler

    stack = stacks["use"]
    fn = one(stack, "aws_lambda_function", "slot-function/function")
    group = one(stack, "aws_autoscaling_group", "asg")
    assert fn["runtime"] == "python3.12"
    assert fn["handler"] == "handler.lambda_handler"
    assert fn["timeout"] == 60 and fn["memory_size"] == 128
    assert "reserved_concurrent_executions" not in fn  # unreserved by default (test below)
    assert fn["role"] == ref(stack, "aws_iam_role", "slot-function/role", "arn")
    env = fn["environment"]["variables"]
    assert env["HUB"] == "use"
    assert env["ASG_NAME"] == group["name"] == "tunnelhub-use-proxies"
    assert env["LIFECYCLE_HOOK_NAME"] == group["initial_lifecycle_hook"][0]["name"]
    assert (env["POOL_TAG_KEY"], env["SLOT_TAG_KEY"]) == ("tunnelhub:pool", "tunnelhub:slot")
    # Every AWS hub has fixed private addresses: the NLB reaches the proxies there.
    plan = hubs["use"].aws_addresses()
    slots = json.loads(env["SLOT_PRIVATE_IPS"])
    assert {int(k): v["ip"] for k, v in slots.items()} == {n: str(ip) for n, ip in enumerate(plan.slot_private_ips)}
    for n, value in slots.items():
        zone = plan.slot_zones[int(n)]
        assert value["subnet_id"] == ref(stack, "aws_subnet", f"network/proxy-subnets/zone{zone}", "id")
    # With literal subnet ids (an existing VPC), the handler's own parser accepts the value.
    env = one(stacks["exv"], "aws_lambda_function", "slot-function/function")["environment"]["variables"]
    parsed = handler.parse_slot_private_ips(env["SLOT_PRIVATE_IPS"])
    assert parsed == {0: handler.SlotAddress("subnet-0aaaaaaaaaaaaaaa1", "10.100.0.16"),
                      1: handler.SlotAddress("subnet-0aaaaaaaaaaaaaaa2", "10.100.1.16")}


def test_slot_lambda_asset_is_the_handler_in_a_reproducible_zip(example, stacks):
    from tunnelhub.constructs import aws_slot_function
    from tunnelhub.constructs.slot_lambda import handler

    fn = one(stacks["use"], "aws_lambda_function", "slot-function/function")
    archive = example.outdir / "stacks" / "use-aws" / fn["filename"]
    data = archive.read_bytes()
    assert fn["source_code_hash"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert [i.filename for i in z.infolist()] == ["handler.py"]
        info = z.infolist()[0]
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.external_attr >> 16 == 0o100644
        assert z.read("handler.py") == Path(handler.__file__).read_bytes()
    aws_slot_function.slot_lambda_archive.cache_clear()
    assert aws_slot_function.slot_lambda_archive().path.read_bytes() == data  # built again: same bytes


def test_eventbridge_rule_has_the_exact_launch_pattern_and_invokes_the_function(stacks):
    from tunnelhub.constructs.slot_lambda.handler import launch_event_pattern

    stack = stacks["use"]
    rule = one(stack, "aws_cloudwatch_event_rule", "slot-function/rule")
    assert json.loads(rule["event_pattern"]) == launch_event_pattern("tunnelhub-use-proxies") == {
        "source": ["aws.autoscaling"],
        "detail-type": ["EC2 Instance-launch Lifecycle Action"],
        "detail": {"AutoScalingGroupName": ["tunnelhub-use-proxies"],
                   "LifecycleTransition": ["autoscaling:EC2_INSTANCE_LAUNCHING"]},
    }
    target = one(stack, "aws_cloudwatch_event_target", "slot-function/target")
    assert target["rule"] == ref(stack, "aws_cloudwatch_event_rule", "slot-function/rule", "name")
    assert target["arn"] == ref(stack, "aws_lambda_function", "slot-function/function", "arn")
    permission = one(stack, "aws_lambda_permission", "slot-function/permission")
    assert permission["action"] == "lambda:InvokeFunction"
    assert permission["principal"] == "events.amazonaws.com"
    assert permission["source_arn"] == ref(stack, "aws_cloudwatch_event_rule", "slot-function/rule", "arn")
    assert permission["function_name"] == ref(stack, "aws_lambda_function", "slot-function/function", "function_name")
    invoke = one(stack, "aws_lambda_function_event_invoke_config", "slot-function/invoke-config")
    assert (invoke["maximum_retry_attempts"], invoke["maximum_event_age_in_seconds"]) == (2, 600)
    logs = one(stack, "aws_cloudwatch_log_group", "slot-function/logs")
    assert logs["name"] == "/aws/lambda/tunnelhub-use-slots" and logs["retention_in_days"] == 365


def test_slot_lambda_policy_is_least_privilege(stacks):
    stack = stacks["use"]
    statements = {s["sid"]: s for s in policy(stack, "slot-function/policy")}
    assert set(statements) == {"DescribeCannotBeScoped", "PoolAddressesOnly", "ProxySubnetInterfacesOnly",
                               "GroupInstancesOnly", "SlotTagOnGroupInstancesOnly", "OwnGroupLifecycleActions",
                               "OwnLogGroup"}
    actions = {a for s in statements.values() for a in s["actions"]}
    assert actions == {
        "ec2:DescribeAddresses", "ec2:DescribeInstances", "ec2:AssociateAddress", "ec2:DisassociateAddress",
        "ec2:AssignPrivateIpAddresses", "ec2:UnassignPrivateIpAddresses", "ec2:CreateTags",
        "autoscaling:CompleteLifecycleAction", "logs:CreateLogStream", "logs:PutLogEvents",
    }
    assert all(s["effect"] == "Allow" and "*" not in "".join(s["actions"]) for s in statements.values())
    for sid, s in statements.items():
        if s["resources"] == ["*"]:
            assert sid == "DescribeCannotBeScoped"  # Describe* cannot be resource-scoped
    prefix = f"arn:{partition(stack)}:ec2:us-east-1:{account(stack)}:"
    pool = statements["PoolAddressesOnly"]
    assert pool["resources"] == [prefix + "elastic-ip/*"]
    assert conditions(pool) == {("StringEquals", "aws:ResourceTag/tunnelhub:pool"): ["use"]}
    eni = statements["ProxySubnetInterfacesOnly"]
    assert eni["resources"] == [prefix + "network-interface/*"]
    subnets = [prefix + "subnet/" + ref(stack, "aws_subnet", f"network/proxy-subnets/zone{z}", "id") for z in (0, 1)]
    assert conditions(eni) == {("StringEquals", "ec2:Subnet"): subnets}
    in_group = {("StringEquals", "aws:ResourceTag/aws:autoscaling:groupName"): ["tunnelhub-use-proxies"]}
    assert statements["GroupInstancesOnly"]["resources"] == [prefix + "instance/*"]
    assert conditions(statements["GroupInstancesOnly"]) == in_group
    tags = statements["SlotTagOnGroupInstancesOnly"]
    assert conditions(tags) == {**in_group, ("ForAllValues:StringEquals", "aws:TagKeys"): ["tunnelhub:slot"],
                                ("Null", "aws:TagKeys"): ["false"]}
    lifecycle = statements["OwnGroupLifecycleActions"]["resources"]
    assert len(lifecycle) == 1 and lifecycle[0].endswith(":autoScalingGroup:*:autoScalingGroupName/tunnelhub-use-proxies")
    assert statements["OwnLogGroup"]["resources"] == [ref(stack, "aws_cloudwatch_log_group", "slot-function/logs", "arn") + ":*"]
    trust = policy(stack, "slot-function/trust")
    assert trust == [{"actions": ["sts:AssumeRole"], "effect": "Allow",
                      "principals": [{"identifiers": ["lambda.amazonaws.com"], "type": "Service"}]}]
    # The role has exactly one policy: this document; no managed policy is attached.
    role_policies = [p for p in resources(stack, "aws_iam_role_policy").values()
                     if p["role"] == ref(stack, "aws_iam_role", "slot-function/role", "id")]
    assert [p["policy"] for p in role_policies] == [ref(stack, "aws_iam_policy_document", "slot-function/policy",
                                                        "json", data=True)]
    assert "aws_iam_role_policy_attachment" not in stack["resource"]


# --------------------------------------------------------------------------------------------
# Auto Scaling group and launch template
# --------------------------------------------------------------------------------------------


def test_the_launch_hook_is_declared_inside_the_group(stacks, hubs):
    for name in ("use", "pvt", "exv"):
        stack = stacks[name]
        group = one(stack, "aws_autoscaling_group", "asg")
        assert group["initial_lifecycle_hook"] == [{
            "name": "tunnelhub-slot", "lifecycle_transition": "autoscaling:EC2_INSTANCE_LAUNCHING",
            "default_result": "ABANDON", "heartbeat_timeout": 600,
        }]
        assert "aws_autoscaling_lifecycle_hook" not in stack["resource"]
        count = hubs[name].proxies.count
        assert (group["min_size"], group["max_size"], group["desired_capacity"]) == (count, count, count)
        # The function, its trigger and the pool exist before the first launch.
        needed = {logical(ref(stack, "aws_lambda_permission", "slot-function/permission", "id")),
                  logical(ref(stack, "aws_cloudwatch_event_target", "slot-function/target", "id")),
                  logical(ref(stack, "aws_iam_role_policy", "slot-function/role-policy", "id")),
                  logical(ref(stack, "aws_ssm_parameter", "host-key/parameter", "id")),
                  *(logical(ref(stack, "aws_eip", f"slots/eip{n}", "id")) for n in range(count))}
        assert needed <= set(group["depends_on"])


def test_group_health_checks_only_the_instance_health_target_group(stacks, hubs):
    """A database outage makes every proxy answer 503 on that route: the route target groups must
    not decide instance health, or the group would replace every proxy, again and again."""
    for name in ("use", "pvt"):
        stack, hub = stacks[name], hubs[name]
        group = one(stack, "aws_autoscaling_group", "asg")
        assert group["health_check_type"] == "ELB"
        assert group["target_group_arns"] == [ref(stack, "aws_lb_target_group", "nlb/instance-health/target-group", "arn")]
        health = one(stack, "aws_lb_target_group", "nlb/instance-health/target-group")
        assert health["target_type"] == "instance"
        assert health["health_check"]["path"] == "/healthz"
        assert health["health_check"]["protocol"] == "HTTP"
        assert health["health_check"]["port"] == str(hub.proxies.health_port)
        assert health["health_check"]["unhealthy_threshold"] == 10
        listener = one(stack, "aws_lb_listener", "nlb/instance-health/listener")
        assert listener["port"] == hub.proxies.health_port
        for route in hub.routes:
            tg = one(stack, "aws_lb_target_group", f"nlb/routes/{route.name}/target-group")
            assert tg["target_type"] == "ip"
        route_groups = {logical(ref(stack, "aws_lb_target_group", f"nlb/routes/{r.name}/target-group", "arn"))
                        for r in hub.routes}
        assert not route_groups & {logical("${" + r + "}") for r in refs_in(group)}
        for kind in ("aws_autoscaling_attachment", "aws_autoscaling_traffic_source_attachment"):
            assert kind not in stack["resource"]


def test_launch_template(stacks, hubs):
    from tunnelhub.userdata import render_cloud_init

    for name, arch in (("use", "amd64"), ("pvt", "arm64")):
        stack, hub = stacks[name], hubs[name]
        lt = one(stack, "aws_launch_template", "launch-template")
        assert lt["metadata_options"] == {"http_endpoint": "enabled", "http_tokens": "required",
                                          "http_put_response_hop_limit": 1, "instance_metadata_tags": "enabled"}
        ebs = lt["block_device_mappings"][0]["ebs"]
        assert ebs["encrypted"] == "true" and ebs["volume_type"] == "gp3"
        assert lt["block_device_mappings"][0]["device_name"] == ref(stack, "aws_ami", "ubuntu", "root_device_name", data=True)
        assert lt["iam_instance_profile"] == {"arn": ref(stack, "aws_iam_instance_profile", "proxy-profile", "arn")}
        assert lt["instance_type"] == hub.proxy_size
        assert lt["image_id"] == ref(stack, "aws_ami", "ubuntu", "id", data=True)
        nic = lt["network_interfaces"][0]
        assert nic["associate_public_ip_address"] == "false"
        assert nic["security_groups"] == [ref(stack, "aws_security_group", "proxy-sg", "id")]
        assert lt["user_data"] == render_cloud_init(hub, None).base64
        ami = one(stack, "aws_ami", "ubuntu", data=True)
        assert ami["owners"] == ["099720109477"] and ami["most_recent"] is True
        filters = {f["name"]: f["values"] for f in ami["filter"]}
        assert filters["name"] == [f"ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-{arch}-server-*"]
        assert filters["architecture"] == [{"amd64": "x86_64", "arm64": "arm64"}[arch]]
        group = one(stack, "aws_autoscaling_group", "asg")
        assert group["launch_template"] == {"id": ref(stack, "aws_launch_template", "launch-template", "id"),
                                            "version": ref(stack, "aws_launch_template", "launch-template", "latest_version")}
    assert one(stacks["pvt"], "aws_launch_template", "launch-template")["key_name"] == "ops"
    assert "key_name" not in one(stacks["use"], "aws_launch_template", "launch-template")


def test_graviton_instance_types_get_the_arm64_image():
    from tunnelhub.constructs.aws_hub import ubuntu_architecture

    for t in ("t4g.small", "m7g.large", "c7gn.xlarge", "im4gn.large", "r8g.medium", "g5g.xlarge", "x2gd.large"):
        assert ubuntu_architecture(t) == "arm64", t
    for t in ("t3.small", "m6i.large", "g4dn.xlarge", "c5n.large", "m7i-flex.large", "m5zn.large", "inf2.xlarge"):
        assert ubuntu_architecture(t) == "amd64", t


# --------------------------------------------------------------------------------------------
# Host identity
# --------------------------------------------------------------------------------------------


def test_host_key_is_generated_and_stored_for_the_proxies_only(stacks):
    from tunnelhub.userdata import host_key_parameter_name

    stack = stacks["use"]
    key = one(stack, "tls_private_key", "host-key/key")
    assert key == {"algorithm": "ED25519"}
    parameter = one(stack, "aws_ssm_parameter", "host-key/parameter")
    assert parameter["type"] == "SecureString"
    assert parameter["name"] == "/tunnelhub/use/ssh-host-ed25519-key"
    assert parameter["name"] == host_key_parameter_name(load_spec(EXAMPLE_SPEC).hub("use"))
    assert parameter["value"] == ref(stack, "tls_private_key", "host-key/key", "private_key_openssh")
    assert parameter["key_id"] == ref(stack, "aws_kms_key", "host-key/kms-key", "arn")
    kms = one(stack, "aws_kms_key", "host-key/kms-key")
    assert kms["enable_key_rotation"] is True
    assert kms["policy"] == ref(stack, "aws_iam_policy_document", "host-key/kms-policy", "json", data=True)
    statements = {s["sid"]: s for s in policy(stack, "host-key/kms-policy")}
    decrypt = statements["ProxiesDecryptTheHostKeyThroughSsm"]
    assert decrypt["actions"] == ["kms:Decrypt"]
    assert decrypt["principals"] == [{"type": "AWS", "identifiers": [ref(stack, "aws_iam_role", "proxy-role", "arn")]}]
    parameter_arn = next(s for s in policy(stack, "proxy-policy") if s["sid"] == "ReadHostKey")["resources"]
    assert conditions(decrypt) == {("StringEquals", "kms:ViaService"): ["ssm.us-east-1.amazonaws.com"],
                                   ("StringEquals", "kms:EncryptionContext:PARAMETER_ARN"): parameter_arn}
    assert parameter_arn == [f"arn:{partition(stack)}:ssm:us-east-1:{account(stack)}:parameter/tunnelhub/use/ssh-host-ed25519-key"]
    # Only the proxies' role may read the parameter; nothing else in the stack mentions ssm.
    readers = [s for doc in resources(stack, "aws_iam_policy_document", data=True).values()
               for s in doc["statement"] if any(a.startswith("ssm:") for a in s.get("actions", []))]
    assert readers == [{"sid": "ReadHostKey", "effect": "Allow", "actions": ["ssm:GetParameter"],
                        "resources": parameter_arn}]
    output = stack["output"]["host_public_key"]["value"]
    assert output == ref(stack, "tls_private_key", "host-key/key", "public_key_openssh")


KEY_BLOCK = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----\s*[A-Za-z0-9+/=]{16}")


def test_key_block_pattern_finds_a_real_key():
    key = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
           "-----END OPENSSH PRIVATE KEY-----\n")
    assert KEY_BLOCK.search(key)
    assert not KEY_BLOCK.search('if "-----BEGIN OPENSSH PRIVATE KEY-----" not in text:')


def test_no_private_key_material_in_the_stacks_or_the_user_data(example, variants, stacks):
    from tunnelhub.userdata import render_cloud_init

    texts = {"use": example.text("use-aws"), "pvt": variants.text("pvt-aws"), "exv": variants.text("exv-aws")}
    for name, stack in stacks.items():
        lt = one(stack, "aws_launch_template", "launch-template")
        decoded = user_data_text(lt)
        assert decoded.startswith("#cloud-config")
        objects = [o["content"] if "content" in o else base64.b64decode(o["content_base64"]).decode()
                   for o in resources(stack, "aws_s3_object").values()]
        for text in (texts[name], decoded, *objects):
            # A key is a marker followed by its base64 body (the fetch script names the marker it expects).
            assert not KEY_BLOCK.search(text)
            assert "b3BlbnNzaC1rZXktdjE" not in text  # base64 of "openssh-key-v1": the start of a key body
        assert "PRIVATE KEY" not in texts[name]
    hub = load_spec(EXAMPLE_SPEC).hub("use")
    assert "/tunnelhub/use/ssh-host-ed25519-key" in gzip.decompress(render_cloud_init(hub, None).payload).decode()


def test_files_bucket_holds_the_renderers_objects_and_the_document_for_the_proxies(stacks, hubs):
    """The document is one object at a fixed key, with the document's JSON as its content (in
    clear in the plan); aws_s3_object's content is not ForceNew and a change re-uploads it
    (terraform-provider-aws internal/service/s3/object.go: ``content`` Optional, no ForceNew;
    resourceObjectUpdate calls resourceObjectUpload when the content changed), so a routine change
    is an in-place update of this one resource."""
    from tunnelhub.userdata import AWS_DOCUMENT_KEY, render_cloud_init, render_document

    stack, hub = stacks["use"], hubs["use"]
    rendered = render_cloud_init(hub, None)
    assert rendered.s3_objects, "the example's user data no longer needs the bucket: pick a spec that does"
    bucket = one(stack, "aws_s3_bucket", "files/bucket")
    assert bucket["bucket"] == f"tunnelhub-use-{account(stack)}-us-east-1"
    objects = {o["key"]: o for o in resources(stack, "aws_s3_object").values()}
    assert set(objects) == {o.key for o in rendered.s3_objects} | {AWS_DOCUMENT_KEY}
    document = objects[AWS_DOCUMENT_KEY]
    assert document["content"] == render_document(hub).text and document["content_type"] == "application/json"
    assert "lifecycle" not in document  # fixed key: updated in place, never replaced
    assert json.loads(document["content"])["version"] == stack["output"]["config_version"]["value"]
    for o in rendered.s3_objects:
        body = base64.b64decode(objects[o.key]["content_base64"])
        assert body == o.content and hashlib.sha256(body).hexdigest() == o.sha256
    block = one(stack, "aws_s3_bucket_public_access_block", "files/public-access-block")
    assert all(block[k] is True for k in ("block_public_acls", "block_public_policy", "ignore_public_acls",
                                          "restrict_public_buckets"))
    read = [s for s in policy(stack, "proxy-policy") if s["sid"] == "ReadBootFilesAndHubConfig"]
    arn = ref(stack, "aws_s3_bucket", "files/bucket", "arn")
    assert read == [{"sid": "ReadBootFilesAndHubConfig", "effect": "Allow", "actions": ["s3:GetObject"],
                     "resources": [arn + "/proxy/*", arn + "/" + AWS_DOCUMENT_KEY]}]
    group = one(stack, "aws_autoscaling_group", "asg")
    for path in resources(stack, "aws_s3_object"):
        assert logical(ref(stack, "aws_s3_object", path, "id")) in group["depends_on"]


# --------------------------------------------------------------------------------------------
# NLB, target groups, endpoint service
# --------------------------------------------------------------------------------------------


def test_one_listener_and_ip_target_group_per_route_with_its_health_check(stacks, hubs):
    for name in ("use", "pvt", "exv"):
        stack, hub = stacks[name], hubs[name]
        px = hub.proxies
        groups = resources(stack, "aws_lb_target_group")
        assert sorted(groups) == sorted([f"nlb/routes/{r.name}/target-group" for r in hub.routes]
                                        + ["nlb/instance-health/target-group"])
        attachments = resources(stack, "aws_lb_target_group_attachment")
        for route in hub.routes:
            tg = groups[f"nlb/routes/{route.name}/target-group"]
            assert (tg["port"], tg["protocol"], tg["target_type"]) == (route.port, "TCP", "ip")
            assert tg["health_check"] == {
                "enabled": True, "protocol": "HTTP", "port": str(px.health_port), "path": route.health_path,
                "matcher": "200", "interval": px.probe_interval_s, "timeout": 3,
                "healthy_threshold": px.probe_threshold, "unhealthy_threshold": px.probe_threshold,
            }
            assert 2 <= tg["health_check"]["timeout"] < tg["health_check"]["interval"] <= 300
            assert tg["deregistration_delay"] == "10" and tg["connection_termination"] is True
            assert tg["preserve_client_ip"] == "false"
            arn = ref(stack, "aws_lb_target_group", f"nlb/routes/{route.name}/target-group", "arn")
            registered = sorted((a["target_id"], a["port"]) for a in attachments.values() if a["target_group_arn"] == arn)
            assert registered == sorted((str(ip), route.port) for ip in hub.aws_addresses().slot_private_ips)
            listener = one(stack, "aws_lb_listener", f"nlb/routes/{route.name}/listener")
            assert (listener["port"], listener["protocol"]) == (route.port, "TCP")
            assert listener["default_action"] == [{"type": "forward", "target_group_arn": arn}]
            assert listener["tcp_idle_timeout_seconds"] == route.idle_timeout_min * 60
    pvt = one(stacks["pvt"], "aws_lb_target_group", "nlb/routes/ledger-pg/target-group")["health_check"]
    assert (pvt["port"], pvt["interval"], pvt["healthy_threshold"], pvt["path"]) == ("9000", 10, 3, "/routes/ledger-pg")


def test_nlb_is_internal_cross_zone_with_a_security_group(stacks):
    for name in ("use", "exv"):
        stack = stacks[name]
        nlb = one(stack, "aws_lb", "nlb/lb")
        assert nlb["internal"] is True and nlb["load_balancer_type"] == "network"
        assert nlb["enable_cross_zone_load_balancing"] is True
        assert nlb["security_groups"] == [ref(stack, "aws_security_group", "nlb-sg", "id")]
        assert nlb["enforce_security_group_inbound_rules_on_private_link_traffic"] == "off"
    assert one(stacks["exv"], "aws_lb", "nlb/lb")["subnets"] == ["subnet-0bbbbbbbbbbbbbbb1", "subnet-0bbbbbbbbbbbbbbb2"]
    assert one(stacks["use"], "aws_lb", "nlb/lb")["subnets"] == [
        ref(stacks["use"], "aws_subnet", f"network/nlb-subnets/zone{z}", "id") for z in (0, 1)]


def test_endpoint_service_requires_acceptance_and_allows_the_regions_databricks_role(stacks):
    stack = stacks["use"]
    service = one(stack, "aws_vpc_endpoint_service", "endpoint-service")
    assert service["acceptance_required"] is True
    assert service["network_load_balancer_arns"] == [ref(stack, "aws_lb", "nlb/lb", "arn")]
    assert service["allowed_principals"] == ["arn:aws:iam::565502421330:role/private-connectivity-role-us-east-1"]
    exv = one(stacks["exv"], "aws_vpc_endpoint_service", "endpoint-service")
    assert exv["allowed_principals"] == ["arn:aws:iam::565502421330:role/private-connectivity-role-us-west-2"]
    pvt = one(stacks["pvt"], "aws_vpc_endpoint_service", "endpoint-service")
    assert pvt["allowed_principals"] == ["arn:aws:iam::111122223333:root"]


# --------------------------------------------------------------------------------------------
# Security groups
# --------------------------------------------------------------------------------------------


def _rules(stack: dict, kind: str, sg_path: str) -> list[dict]:
    sg = ref(stack, "aws_security_group", sg_path, "id")
    return [r for r in resources(stack, kind).values() if r["security_group_id"] == sg]


def test_security_groups_admit_only_what_each_side_needs(stacks, hubs):
    for name in ("use", "pvt"):
        stack, hub = stacks[name], hubs[name]
        nlb_sg = ref(stack, "aws_security_group", "nlb-sg", "id")
        proxy_sg = ref(stack, "aws_security_group", "proxy-sg", "id")
        for sg in resources(stack, "aws_security_group").values():
            assert "ingress" not in sg and "egress" not in sg  # rules are separate resources, listed below
        ingress = {(r["from_port"], r["to_port"], r.get("cidr_ipv4") or r["referenced_security_group_id"])
                   for r in _rules(stack, "aws_vpc_security_group_ingress_rule", "proxy-sg")}
        expected = {(22, 22, str(c)) for c in hub.onprem.source_cidrs}
        expected |= {(r.port, r.port, nlb_sg) for r in hub.routes}
        expected |= {(hub.proxies.health_port, hub.proxies.health_port, nlb_sg)}
        # the rollout gate: each proxy asks its canary peer's health endpoint
        expected |= {(hub.proxies.health_port, hub.proxies.health_port, proxy_sg)}
        # the peer path: HAProxy's backup servers are the peers' peer ports (docs/proxy-runtime.md)
        expected |= {(r.peer_port, r.peer_port, proxy_sg) for r in hub.tunnel_routes}
        assert hub.tunnel_routes and all(r.peer_port for r in hub.tunnel_routes)
        assert ingress == expected
        egress = {(r["from_port"], r.get("cidr_ipv4") or r["referenced_security_group_id"])
                  for r in _rules(stack, "aws_vpc_security_group_egress_rule", "proxy-sg")}
        assert egress == {(p, "0.0.0.0/0") for p in {80, 443, *(r.target_port for r in hub.forward_routes)}} | {
            (hub.proxies.health_port, proxy_sg)} | {(r.peer_port, proxy_sg) for r in hub.tunnel_routes}
        classic = hub.databricks.classic.cidrs if hub.databricks and hub.databricks.classic else []
        nlb_in = {(r["from_port"], r["cidr_ipv4"]) for r in _rules(stack, "aws_vpc_security_group_ingress_rule", "nlb-sg")}
        assert nlb_in == {(r.port, str(c)) for r in hub.routes for c in classic}
        nlb_out = {(r["from_port"], r["referenced_security_group_id"])
                   for r in _rules(stack, "aws_vpc_security_group_egress_rule", "nlb-sg")}
        assert nlb_out == {(p, proxy_sg) for p in [r.port for r in hub.routes] + [hub.proxies.health_port]}
        every = [*resources(stack, "aws_vpc_security_group_ingress_rule").values(),
                 *resources(stack, "aws_vpc_security_group_egress_rule").values()]
        assert all(r["ip_protocol"] == "tcp" and r["from_port"] == r["to_port"] and r["description"] for r in every)
        assert not [r for r in resources(stack, "aws_vpc_security_group_ingress_rule").values()
                    if r.get("cidr_ipv4") == "0.0.0.0/0"]
    assert one(stacks["use"], "aws_default_security_group", "network/default-sg").keys() == {"vpc_id", "tags"}


# --------------------------------------------------------------------------------------------
# Network and egress
# --------------------------------------------------------------------------------------------


def test_new_vpc_with_slot_eip_egress_routes_proxies_to_the_internet_gateway(stacks, hubs):
    stack, hub = stacks["use"], hubs["use"]
    plan = hub.aws_addresses()
    assert one(stack, "aws_vpc", "network/vpc")["cidr_block"] == "10.70.0.0/24"
    for z in (0, 1):
        proxy = one(stack, "aws_subnet", f"network/proxy-subnets/zone{z}")
        nlb = one(stack, "aws_subnet", f"network/nlb-subnets/zone{z}")
        assert proxy["cidr_block"] == str(plan.public_subnets[z]) and nlb["cidr_block"] == str(plan.private_subnets[z])
        assert proxy["map_public_ip_on_launch"] is False
        zones = logical(ref(stack, "aws_availability_zones", "network/zones", "names", data=True))
        assert proxy["availability_zone"] == nlb["availability_zone"] == "${element(" + zones + ".names, " + str(z) + ")}"
    internet = one(stack, "aws_route_table", "network/internet-routes")
    assert [(r["cidr_block"], r["gateway_id"]) for r in internet["route"]] == [
        ("0.0.0.0/0", ref(stack, "aws_internet_gateway", "network/igw", "id"))]
    assocs = resources(stack, "aws_route_table_association")
    for z in (0, 1):
        assert assocs[f"network/routes/proxy-zone{z}"]["route_table_id"] == ref(stack, "aws_route_table", "network/internet-routes", "id")
        assert assocs[f"network/routes/nlb-zone{z}"]["route_table_id"] == ref(stack, "aws_route_table", "network/nlb-routes", "id")
    # the NLB subnets' table holds only the routes to Databricks classic (test_classic_peering_*)
    assert {r["cidr_block"] for r in one(stack, "aws_route_table", "network/nlb-routes")["route"]} == {
        str(c) for c in hub.databricks.classic.cidrs}
    assert "aws_nat_gateway" not in stack["resource"]
    assert stack["output"]["egress_public_ips"]["value"] == stack["output"]["slot_public_ips"]["value"]


def test_nat_gateway_egress_puts_proxies_behind_one_nat_per_zone(stacks, hubs):
    stack = stacks["pvt"]
    assert hubs["pvt"].egress == "nat_gateway" and hubs["pvt"].zone_count == 3
    nats = resources(stack, "aws_nat_gateway")
    assert len(nats) == 3
    for z in range(3):
        nat = nats[f"network/nat/gateway{z}"]
        assert nat["subnet_id"] == ref(stack, "aws_subnet", f"network/nlb-subnets/zone{z}", "id")
        table = one(stack, "aws_route_table", f"network/nat/proxy-routes{z}")
        assert [(r["cidr_block"], r["nat_gateway_id"]) for r in table["route"]] == [
            ("0.0.0.0/0", ref(stack, "aws_nat_gateway", f"network/nat/gateway{z}", "id"))]
        assoc = one(stack, "aws_route_table_association", f"network/nat/proxy-zone{z}")
        assert assoc["subnet_id"] == ref(stack, "aws_subnet", f"network/proxy-subnets/zone{z}", "id")
        assert one(stack, "aws_route_table_association", f"network/nat/nlb-zone{z}")["route_table_id"] == ref(
            stack, "aws_route_table", "network/internet-routes", "id")
        assert one(stack, "aws_subnet", f"network/proxy-subnets/zone{z}")["availability_zone"] == f"eu-west-1{'abc'[z]}"
    assert stack["output"]["egress_public_ips"]["value"] == [
        ref(stack, "aws_eip", f"network/nat/eip{z}", "public_ip") for z in range(3)]
    assert "aws_availability_zones" not in stack.get("data", {})


def test_existing_vpc_creates_no_network(stacks):
    stack = stacks["exv"]
    for kind in ("aws_vpc", "aws_subnet", "aws_internet_gateway", "aws_route_table", "aws_route_table_association",
                 "aws_nat_gateway", "aws_default_security_group"):
        assert kind not in stack["resource"], kind
    group = one(stack, "aws_autoscaling_group", "asg")
    assert group["vpc_zone_identifier"] == ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0aaaaaaaaaaaaaaa2"]
    for sg in resources(stack, "aws_security_group").values():
        assert sg["vpc_id"] == "vpc-0123456789abcdef0"


# --------------------------------------------------------------------------------------------
# Databricks classic: peering, routes both ways, security group, DNS only with a path
# --------------------------------------------------------------------------------------------


def _peering(stack: dict) -> tuple[dict, str]:
    (body,) = resources(stack, "aws_vpc_peering_connection").values()
    return body, ref(stack, "aws_vpc_peering_connection", "network/classic-peering/peering", "id")


def _routes(stack: dict) -> set[tuple[str, str, str]]:
    return {(r["route_table_id"], r["destination_cidr_block"], r["vpc_peering_connection_id"])
            for r in resources(stack, "aws_route").values()}


def _inline(table: dict) -> set[tuple[str, str]]:
    return {(r["cidr_block"], r["vpc_peering_connection_id"]) for r in table.get("route", []) if r.get("vpc_peering_connection_id")}


def test_classic_peering_in_the_same_account_is_accepted_and_routed_both_ways(stacks, hubs, classic):
    """aws 6.25.0 docs, r/vpc_peering_connection: ``auto_accept`` needs both VPCs in the same account
    and region, ``peer_owner_id`` defaults to the provider's account; r/route: a
    ``vpc_peering_connection_id`` target, and inline ``route`` blocks of an ``aws_route_table`` must
    not be mixed with ``aws_route`` (so the tables the stack creates carry the route inline). AWS VPC
    Peering Guide, "Update your route tables": both sides need a route to the other's CIDR."""
    use, exc = (stacks["use"], hubs["use"]), classic["exc"]
    for (stack, hub), hub_vpc in ((use, ref(stacks["use"], "aws_vpc", "network/vpc", "id")),
                                  (exc, EXISTING_VPC["vpc_id"])):
        cl = hub.databricks.classic
        peering, pcx = _peering(stack)
        assert peering["vpc_id"] == hub_vpc and peering["peer_vpc_id"] == cl.network_id
        assert peering["auto_accept"] is True and "peer_owner_id" not in peering and "peer_region" not in peering
        assert "aws_vpc_peering_connection_accepter" not in stack["resource"]
        # workspace side: every given table routes every NLB subnet (only the NLB answers classic) to the peering
        nlb_cidrs = ([str(c) for c in hub.aws_addresses().private_subnets] if hub.network.cidr else
                     [s["cidr"] for s in EXISTING_VPC["nlb_subnets"]])
        workspace = {(t, c, pcx) for t in cl.aws_route_table_ids for c in nlb_cidrs}
        hub_side = ({(t, str(c), pcx) for t in hub.network.existing_vpc.nlb_route_table_ids for c in cl.cidrs}
                    if hub.network.existing_vpc else set())
        assert _routes(stack) == workspace | hub_side
        if hub.network.cidr:  # hub side of a new VPC: inline in the NLB subnets' own table
            assert _inline(one(stack, "aws_route_table", "network/nlb-routes")) == {(str(c), pcx) for c in cl.cidrs}
            assert not _inline(one(stack, "aws_route_table", "network/internet-routes"))  # the proxies' table
        assert stack["output"]["classic_peering_id"]["value"] == pcx


def test_cross_account_classic_peering_names_the_owner_and_leaves_acceptance_to_it(classic):
    """aws 6.25.0 docs, r/vpc_peering_connection: ``peer_owner_id`` "must be managed if connecting
    cross-account", and "If both VPCs are not in the same AWS account and region do not enable the
    auto_accept attribute" (the accepter side is ``aws_vpc_peering_connection_accepter`` with the
    owner's credentials, which the stack does not have). AWS VPC Peering Guide: a route to a
    pending-acceptance peering is a blackhole until it is active, so the hub side is built now."""
    stack, hub = classic["xac"]
    cl = hub.databricks.classic
    peering, pcx = _peering(stack)
    assert peering["vpc_id"] == ref(stack, "aws_vpc", "network/vpc", "id") and peering["peer_vpc_id"] == cl.network_id
    assert peering["peer_owner_id"] == "210987654321" and "auto_accept" not in peering
    assert "aws_vpc_peering_connection_accepter" not in stack["resource"]
    assert "aws_route" not in stack["resource"]  # nothing in the other account's tables
    # NAT egress: the NLB subnets use the internet table, which gets the routes to classic
    internet = one(stack, "aws_route_table", "network/internet-routes")
    assert _inline(internet) == {(str(c), pcx) for c in cl.cidrs}
    assert ("0.0.0.0/0", ref(stack, "aws_internet_gateway", "network/igw", "id")) in {
        (r["cidr_block"], r["gateway_id"]) for r in internet["route"]}
    for z in range(hub.zone_count):
        assert not _inline(one(stack, "aws_route_table", f"network/nat/proxy-routes{z}"))
    assert stack["output"]["classic_peering_id"]["value"] == pcx


def test_nlb_admits_classic_cidrs_on_every_route_port(stacks, hubs, classic):
    """aws 6.25.0 docs, r/vpc_security_group_ingress_rule (``cidr_ipv4``, ports): an NLB with a
    security group drops what its inbound rules do not allow; peered traffic keeps its source."""
    for stack, hub in ((stacks["use"], hubs["use"]), *classic.values()):
        nlb_in = {(r["from_port"], r["cidr_ipv4"]) for r in _rules(stack, "aws_vpc_security_group_ingress_rule", "nlb-sg")}
        assert nlb_in == {(r.port, str(c)) for r in hub.routes for c in hub.databricks.classic.cidrs}


def test_classic_dns_zones_only_where_the_stack_builds_the_path(stacks, hubs, classic):
    """aws 6.25.0 docs, r/route53_zone (a private zone is created with a ``vpc`` of its own account)
    and r/route53_vpc_association_authorization (another account's VPC needs an authorization here
    and an ``aws_route53_zone_association`` made with that account's provider): zones only with
    both peering halves and both route directions managed, never on another account's VPC. A zone
    hijacks its name for classic compute, a forward route's name too (that is what the route is
    for, as the serverless rule does), so it must never point at an NLB classic cannot reach."""
    from tunnelhub.constructs.databricks_link import classic_dns_enabled

    zones = {z["name"]: z for z in resources(stacks["use"], "aws_route53_zone").values()}
    assert set(zones) == {r.domain for r in hubs["use"].routes}
    assert "contoso-aoai.openai.azure.com" in zones and "openai.azure.com" not in zones  # the name, not its parent
    assert all(z["vpc"] == [{"vpc_id": "vpc-0a1b2c3d4e5f60718"}] for z in zones.values())
    xac, exc = classic["xac"], classic["exc"]
    assert "aws_route53_zone" not in xac[0]["resource"] and not classic_dns_enabled(xac[1])
    assert {z["name"] for z in resources(exc[0], "aws_route53_zone").values()} == {r.domain for r in exc[1].routes}
    # an existing VPC without its NLB route tables: no hub-side route, so no zone (and a warning)
    bare = aws_hub(name="exc", region="us-west-2", network={"existing_vpc": EXISTING_VPC},
                   databricks=classic_hubs()[1]["databricks"])
    report = validate_text(spec_text(bare), "bare.yaml")
    assert not classic_dns_enabled(report.spec.hub("exc"))
    assert any("nlb_route_table_ids" in w.path and "no private DNS zone" in w.message for w in report.warnings)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def test_stack_outputs(stacks, hubs):
    for name in ("use", "pvt"):
        stack, hub = stacks[name], hubs[name]
        out = {k: v["value"] for k, v in stack["output"].items()}
        databricks = {"ncc_id", "private_endpoint_rule_id"} if hub.databricks and hub.databricks.serverless_enabled else set()
        if hub.databricks and hub.databricks.classic:
            databricks.add("classic_peering_id")
        assert set(out) == {"endpoint_service_name", "nlb_dns_name", "slot_public_ips", "slot_private_ips",
                            "tunnel_endpoints", "host_public_key", "asg_name", "egress_public_ips", "port_plan",
                            "config_version", "alerts_topic_arn"} | databricks
        assert out["endpoint_service_name"] == ref(stack, "aws_vpc_endpoint_service", "endpoint-service", "service_name")
        assert out["nlb_dns_name"] == ref(stack, "aws_lb", "nlb/lb", "dns_name")
        assert out["slot_public_ips"] == [ref(stack, "aws_eip", f"slots/eip{n}", "public_ip")
                                          for n in range(hub.proxies.count)]
        assert out["slot_private_ips"] == [str(ip) for ip in hub.aws_addresses().slot_private_ips]
        assert out["asg_name"] == f"tunnelhub-{name}-proxies"
        assert out["tunnel_endpoints"] == (out["slot_private_ips"] if hub.private_circuit else out["slot_public_ips"])
        assert not any(v.get("sensitive") for v in stack["output"].values())
    assert hubs["pvt"].private_circuit and not hubs["use"].private_circuit
    assert [str(ip_address(ip)) for ip in stacks["pvt"]["output"]["tunnel_endpoints"]["value"]] == [
        "10.90.0.16", "10.90.0.144", "10.90.1.16"]
    assert all(ip_address(ip) in ip_network("10.90.0.0/22") for ip in stacks["pvt"]["output"]["tunnel_endpoints"]["value"])


def test_construct_exposes_what_the_databricks_wiring_needs(hubs):
    """Built in a throw-away stack: the attributes the other constructs read are set and are
    tokens of the right resources (the stack JSON above checks their values)."""
    from cdktf import TerraformStack, Testing
    from cdktf_cdktf_provider_aws.provider import AwsProvider
    from cdktf_cdktf_provider_tls.provider import TlsProvider

    from tunnelhub.constructs.aws_hub import AwsHub, AwsHubProps
    from tunnelhub.userdata import render_cloud_init

    hub = hubs["use"]
    stack = TerraformStack(Testing.app(), "test")
    AwsProvider(stack, "aws", region=hub.region)
    TlsProvider(stack, "tls")
    aws = AwsHub(stack, "hub", AwsHubProps(hub=hub, user_data=render_cloud_init(hub, None)))
    for attribute in ("vpc_id", "endpoint_service_id", "endpoint_service_name", "nlb_dns_name", "nlb_zone_id",
                      "nlb_arn", "nlb_security_group_id", "proxy_security_group_id", "asg_arn"):
        assert isinstance(getattr(aws, attribute), str) and "TOKEN" in getattr(aws, attribute), attribute
    assert len(aws.nlb_route_table_ids) == 1 and len(aws.proxy_subnet_ids) == len(aws.nlb_subnet_ids) == 2
    assert aws.asg_name == "tunnelhub-use-proxies" and aws.lifecycle_hook_name == "tunnelhub-slot"
    assert aws.host_key_parameter_name == "/tunnelhub/use/ssh-host-ed25519-key"
    assert set(aws.route_target_group_arns) == {"inventory-mysql", "aoai"}
    synthesized = json.loads(Testing.synth(stack))
    assert "aws_lb" in synthesized["resource"] and "output" not in synthesized  # outputs are the stack's


# --------------------------------------------------------------------------------------------
# Props validation and contracts with the other parts
# --------------------------------------------------------------------------------------------


def _props(hub_dict):
    from tunnelhub.constructs.aws_hub import AwsHubProps
    from tunnelhub.userdata import render_cloud_init

    hub = load_hubs(hub_dict).hubs[0]
    return AwsHubProps(hub=hub, user_data=render_cloud_init(hub, None))


# The spec rules AWS stacks rely on (NAT egress needs a private circuit, tag keys that fit instance
# metadata) are tested in tests/unit/test_spec.py: they fail at load time, before any construct.


def test_azure_hubs_are_refused():
    from tests.helpers import azure_hub
    from tunnelhub.constructs.aws_hub import AwsHubProps

    spec = load_hubs(azure_hub(), aws_hub())
    with pytest.raises(SpecError, match="AwsHub builds aws hubs only"):
        AwsHubProps(hub=spec.hub("weu"), user_data=_props(aws_hub()).user_data)


def test_oversized_user_data_is_refused():
    import dataclasses

    props = _props(aws_hub())
    big = dataclasses.replace(props.user_data, base64=base64.b64encode(b"x" * 16385).decode())
    with pytest.raises(ValueError, match="the proxies' user data is 16385 bytes; EC2 takes 1-16384"):
        type(props)(hub=props.hub, user_data=big)


def test_tag_and_parameter_contracts_with_the_cloud_init():
    from tunnelhub.constructs.slot_lambda import handler
    from tunnelhub.userdata import AWS_SLOT_TAG

    assert handler.DEFAULT_SLOT_TAG_KEY == AWS_SLOT_TAG


# --------------------------------------------------------------------------------------------
# Alarms (issue 16)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def monitored(synth_spec):
    """The monitoring variant of tests/helpers.py (shared with the Azure and checkov tests): two
    emails and a webhook, scrape CIDRs, probes every 30 s x 5, three proxies."""
    spec = validate_text(monitoring_text(), "monitoring.yaml").spec
    return synth_spec(text=monitoring_text()).stack("moa-aws"), spec.hub("moa")


def _alarms(stack: dict) -> dict[str, dict]:
    return {b["alarm_name"]: b for b in resources(stack, "aws_cloudwatch_metric_alarm").values()}


def test_every_route_target_group_has_a_down_and_a_degraded_alarm(stacks, hubs, monitored):
    """aws 6.25.0 cloudwatch_metric_alarm: namespace, metric_name, statistic, dimensions (map),
    period (10, 20, 30 or a multiple of 60), evaluation_periods and datapoints_to_alarm (>= 1),
    comparison_operator, threshold, treat_missing_data (default "missing"); alarm_name is ForceNew
    (terraform-provider-aws internal/service/cloudwatch/metric_alarm.go). NLB metrics: namespace
    AWS/NetworkELB, HealthyHostCount by the TargetGroup and LoadBalancer dimensions, whose values
    are the ARN suffixes (targetgroup/..., net/...) (Elastic Load Balancing docs, "CloudWatch
    metrics for your Network Load Balancer"). Down: fewer than 1 healthy proxy; degraded: fewer
    than proxies.count. Default probes (D = 10 s) give one 60-second period; probes every 30 s x 5
    (D = 150 s) three, every one of them breaching."""
    for stack, hub, periods in ((stacks["use"], hubs["use"], 1), (stacks["pvt"], hubs["pvt"], 1), (*monitored, 3)):
        alarms = _alarms(stack)
        name = f"tunnelhub-{hub.name}"
        topic = ref(stack, "aws_sns_topic", "alarms/topic", "arn")
        for route in hub.routes:
            group = ref(stack, "aws_lb_target_group", f"nlb/routes/{route.name}/target-group", "arn_suffix")
            for kind, threshold in (("down", 1), ("degraded", hub.proxies.count)):
                alarm = alarms[f"{name}-route-{route.name}-{kind}"]
                assert {k: alarm[k] for k in ("namespace", "metric_name", "statistic", "comparison_operator",
                                              "threshold", "period", "evaluation_periods", "datapoints_to_alarm",
                                              "treat_missing_data")} == {
                    "namespace": "AWS/NetworkELB", "metric_name": "HealthyHostCount", "statistic": "Maximum",
                    "comparison_operator": "LessThanThreshold", "threshold": threshold, "period": 60,
                    "evaluation_periods": periods, "datapoints_to_alarm": periods, "treat_missing_data": "missing"}
                assert alarm["dimensions"] == {"TargetGroup": group,
                                               "LoadBalancer": ref(stack, "aws_lb", "nlb/lb", "arn_suffix")}
                assert alarm["alarm_actions"] == alarm["ok_actions"] == [topic]
        assert len(alarms) == 2 * len(hub.routes) + 1  # and the abandoned-launch alarm


def test_an_abandoned_launch_alarms_through_a_metric_filter_on_the_slot_lambdas_log(stacks):
    """The slot Lambda logs one JSON line per decision with ``decision`` and ``asg``
    (docs/aws-slots.md, "Logs"; handler.emit). aws 6.25.0 cloudwatch_log_metric_filter:
    log_group_name, pattern, metric_transformation {name, namespace, value, dimensions} (at most
    three dimensions; CloudWatch Logs filter syntax ``{ $.field = "value" }`` for JSON events). The
    alarm reads that metric by the group's name; no data means no abandoned launch."""
    stack = stacks["use"]
    (flt,) = resources(stack, "aws_cloudwatch_log_metric_filter").values()
    assert flt["log_group_name"] == ref(stack, "aws_cloudwatch_log_group", "slot-function/logs", "name")
    assert flt["pattern"] == '{ $.decision = "abandoned" }'
    assert flt["metric_transformation"] == {"namespace": "tunnelhub", "name": "AbandonedLaunches", "value": "1",
                                            "dimensions": {"AutoScalingGroupName": "$.asg"}}
    alarm = _alarms(stack)["tunnelhub-use-abandoned-launches"]
    assert {k: alarm[k] for k in ("namespace", "metric_name", "statistic", "dimensions", "period", "evaluation_periods",
                                  "threshold", "comparison_operator", "treat_missing_data")} == {
        "namespace": "tunnelhub", "metric_name": "AbandonedLaunches", "statistic": "Sum",
        "dimensions": {"AutoScalingGroupName": one(stack, "aws_autoscaling_group", "asg")["name"]},
        "period": 300, "evaluation_periods": 1, "threshold": 1,
        "comparison_operator": "GreaterThanOrEqualToThreshold", "treat_missing_data": "notBreaching"}
    assert alarm["alarm_actions"] == [ref(stack, "aws_sns_topic", "alarms/topic", "arn")]


def test_the_topic_takes_the_specs_subscriptions_and_is_an_output(stacks, monitored):
    """aws 6.25.0 sns_topic_subscription: topic_arn, protocol (email, https, ...), endpoint. An email
    or http/s endpoint must confirm the subscription before SNS delivers to it (Amazon SNS API,
    Subscribe); the stack cannot confirm it (docs/aws.md, "Alerts"). Without receivers the topic
    exists with no subscription (add your own)."""
    stack, _ = monitored
    topic = ref(stack, "aws_sns_topic", "alarms/topic", "arn")
    subs = sorted((s["protocol"], s["endpoint"]) for s in resources(stack, "aws_sns_topic_subscription").values()
                  if s["topic_arn"] == topic)
    assert subs == sorted([("email", e) for e in MONITORING["email"]] + [("https", MONITORING["webhook"])])
    assert resources(stacks["use"], "aws_sns_topic_subscription") == {}
    assert one(stacks["use"], "aws_sns_topic", "alarms/topic")["name"] == "tunnelhub-use-alerts"
    assert stacks["use"]["output"]["alerts_topic_arn"]["value"] == ref(stacks["use"], "aws_sns_topic", "alarms/topic", "arn")


def test_scrape_cidrs_reach_the_proxies_health_port_only(monitored):
    """monitoring.scrape_cidrs: one ingress rule per CIDR on the proxies' security group, on the
    health port (Prometheus scrapes GET /metrics there), nothing else."""
    stack, hub = monitored
    scraped = [r for r in _rules(stack, "aws_vpc_security_group_ingress_rule", "proxy-sg")
               if r.get("cidr_ipv4") in MONITORING["scrape_cidrs"]]
    assert [(r["from_port"], r["to_port"], r["ip_protocol"]) for r in scraped] == [
        (hub.proxies.health_port, hub.proxies.health_port, "tcp")]
