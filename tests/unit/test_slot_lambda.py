"""The AWS slot Lambda against moto (EC2 + Auto Scaling).

What moto 5.2.5 models faithfully and what these tests add (see docs/aws-slots.md):
- EIP pool, tags, DescribeAddresses tag filters, DescribeInstances, CreateTags: real moto.
- AssociateAddress with AllowReassociation=False: moto answers Resource.AlreadyAssociated when
  the EIP is associated elsewhere (checked in test_moto_refuses_reassociation), so the race
  test's conflict comes from moto, not from the test.
- Not modelled by moto, added here as thin, documented test doubles:
  * CompleteLifecycleAction is not implemented (NotImplementedError), instances go straight to
    InService, and LifecycleHookSpecificationList on CreateAutoScalingGroup is ignored.
    `LifecycleActions` keeps pending actions per token and completes each once; a second
    completion is the ValidationError "No active Lifecycle Action found ..." AWS returns.
  * AssignPrivateIpAddresses ignores AllowReassignment=False (two ENIs can hold one IP);
    `exclusive_private_ips` refuses an IP another ENI holds (InvalidIPAddress.InUse).
  * AssociateAddress ignores PrivateIpAddress (the EIP maps to the ENI's primary IP) and leaves
    InstanceId empty when associating by ENI: tests assert on the request the handler sent.
    It also keeps two EIPs on one address, where EC2 disassociates the address's existing EIP
    ("If you associate an Elastic IP address with an instance that has an existing Elastic IP
    address, the existing address is disassociated from the instance", EC2 User Guide, Elastic
    IP addresses): `Lab.model_association` does that for every association, the handler's and
    the tests' own (`Lab.associate`). The handler puts every slot's EIP on the primary address
    (issue 13, defect 1), so a twin delivery's claim displaces the other twin's EIP.
  * moto's backend has no locks: the spy runs one moto call at a time (AWS's API calls are
    atomic) and the race is forced with a barrier between the pool read and the association.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("moto")
import boto3
from botocore.exceptions import ClientError
from moto import mock_aws

from tunnelhub.constructs.slot_lambda import handler
from tunnelhub.constructs.slot_lambda.handler import (
    ConfigError,
    SlotAddress,
    SlotAssigner,
    SlotConfig,
)

REGION = "eu-west-1"
ACCOUNT = "123456789012"
HUB = "hub1"
ASG = "hub1-proxies"
HOOK = "slot-assign"
POOL_KEY = "tunnelhub:pool"
SLOT_KEY = "tunnelhub:slot"


# --------------------------------------------------------------------------- test doubles


class LifecycleActions:
    """moto's Auto Scaling client plus CompleteLifecycleAction as AWS documents it."""

    def __init__(self, client: Any):
        self._client = client
        self._lock = threading.Lock()
        self.pending: dict[str, str] = {}  # token -> instance id
        self.completed: list[dict[str, str]] = []
        self.refused: list[dict[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def open(self, instance_id: str) -> str:
        """The instance enters Pending:Wait: one pending action with a fresh token."""
        token = str(uuid.uuid4())
        with self._lock:
            self.pending[token] = instance_id
        return token

    def complete_lifecycle_action(self, **kwargs: str) -> dict[str, Any]:
        group, hook = kwargs["AutoScalingGroupName"], kwargs["LifecycleHookName"]
        hooks = self._client.describe_lifecycle_hooks(AutoScalingGroupName=group, LifecycleHookNames=[hook])
        if not hooks["LifecycleHooks"]:
            raise ClientError(
                {"Error": {"Code": "ValidationError", "Message": f"No Lifecycle Hook named {hook} on {group}"}},
                "CompleteLifecycleAction",
            )
        token, instance_id = kwargs.get("LifecycleActionToken"), kwargs.get("InstanceId")
        with self._lock:
            if self.pending.get(token) != instance_id:
                self.refused.append(dict(kwargs))
                raise ClientError(
                    {
                        "Error": {
                            "Code": "ValidationError",
                            "Message": f"No active Lifecycle Action found with token {token}",
                        }
                    },
                    "CompleteLifecycleAction",
                )
            del self.pending[token]
            self.completed.append(dict(kwargs))
        return {}

    def results_for(self, instance_id: str) -> list[str]:
        return [c["LifecycleActionResult"] for c in self.completed if c["InstanceId"] == instance_id]


@dataclass
class Call:
    name: str
    kwargs: dict[str, Any]
    error: str | None
    thread: int


class Ec2Spy:
    """Forwards to moto's EC2 client one call at a time, records calls, runs per-call hooks.

    A hook is hook(call, kwargs) where call(**kwargs) performs the real moto call.
    """

    def __init__(self, client: Any):
        self._client = client
        self._moto_lock = threading.Lock()
        self._record_lock = threading.Lock()
        self.calls: list[Call] = []
        self.hooks: dict[str, Any] = {}
        self.after: dict[str, Any] = {}  # name -> fn(kwargs) after a successful call

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def atomic(**kwargs: Any) -> Any:
            with self._moto_lock:
                return method(**kwargs)

        def call(**kwargs: Any) -> Any:
            hook = self.hooks.get(name)
            try:
                result = hook(atomic, kwargs) if hook else atomic(**kwargs)
            except ClientError as err:
                self._record(name, kwargs, err.response["Error"]["Code"])
                raise
            self._record(name, kwargs, None)
            if name in self.after:
                self.after[name](kwargs)
            return result

        return call

    def _record(self, name: str, kwargs: dict[str, Any], error: str | None) -> None:
        with self._record_lock:
            self.calls.append(Call(name, kwargs, error, threading.get_ident()))

    def writes(self) -> list[Call]:
        return [c for c in self.calls if not c.name.startswith("describe_")]

    def named(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]


@dataclass
class Lab:
    ec2: Any
    autoscaling: LifecycleActions
    spy: Ec2Spy
    subnet_a: str
    subnet_b: str
    pool: dict[int, str] = field(default_factory=dict)  # slot -> allocation id
    records: list[dict[str, Any]] = field(default_factory=list)
    addressed: dict[str, tuple[str, str]] = field(default_factory=dict)  # allocation -> (ENI, private IP)

    def primary_of(self, eni_id: str) -> str:
        (eni,) = self.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"]
        return next(p["PrivateIpAddress"] for p in eni["PrivateIpAddresses"] if p.get("Primary"))

    def model_association(self, kwargs: dict[str, Any]) -> None:
        """After AssociateAddress: the private address it asked for (default: the primary) now
        has this EIP only; an EIP that address had before is disassociated, as EC2 does."""
        eni = kwargs["NetworkInterfaceId"]
        target = (eni, kwargs.get("PrivateIpAddress") or self.primary_of(eni))
        for allocation, where in list(self.addressed.items()):
            if allocation == kwargs["AllocationId"] or where != target:
                continue
            del self.addressed[allocation]
            (old,) = self.ec2.describe_addresses(AllocationIds=[allocation])["Addresses"]
            if old.get("AssociationId") and old.get("NetworkInterfaceId") == eni:
                self.ec2.disassociate_address(AssociationId=old["AssociationId"])
        self.addressed[kwargs["AllocationId"]] = target

    def associate(self, allocation_id: str, eni_id: str, private_ip: str | None = None) -> str:
        """A test's own association (another launch, a twin delivery), modelled like the handler's."""
        kwargs = {"AllocationId": allocation_id, "NetworkInterfaceId": eni_id}
        if private_ip:
            kwargs["PrivateIpAddress"] = private_ip
        association = self.ec2.associate_address(**kwargs)["AssociationId"]
        self.model_association(kwargs)
        return association

    def allocate_pool(self, count: int, hub: str = HUB) -> dict[int, str]:
        for slot in range(count):
            allocation = self.ec2.allocate_address(
                Domain="vpc",
                TagSpecifications=[
                    {
                        "ResourceType": "elastic-ip",
                        "Tags": [{"Key": POOL_KEY, "Value": hub}, {"Key": SLOT_KEY, "Value": str(slot)}],
                    }
                ],
            )
            if hub == HUB:
                self.pool[slot] = allocation["AllocationId"]
        return self.pool

    def group_instances(self) -> set[str]:
        group = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[ASG])["AutoScalingGroups"][0]
        return {i["InstanceId"] for i in group["Instances"]}

    def launch(self, subnet_id: str | None = None) -> tuple[str, str]:
        """Scale the group out by one into `subnet_id` (moto uses the first listed subnet)."""
        first = subnet_id or self.subnet_a
        second = self.subnet_b if first == self.subnet_a else self.subnet_a
        before = self.group_instances()
        self.autoscaling.update_auto_scaling_group(AutoScalingGroupName=ASG, VPCZoneIdentifier=f"{first},{second}")
        self.autoscaling.set_desired_capacity(AutoScalingGroupName=ASG, DesiredCapacity=len(before) + 1)
        (instance_id,) = self.group_instances() - before
        return instance_id, self.autoscaling.open(instance_id)

    def instance(self, instance_id: str) -> dict[str, Any]:
        return self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]

    def eni(self, instance_id: str) -> str:
        return self.instance(instance_id)["NetworkInterfaces"][0]["NetworkInterfaceId"]

    def private_ips(self, instance_id: str) -> set[str]:
        eni = self.instance(instance_id)["NetworkInterfaces"][0]
        return {p["PrivateIpAddress"] for p in eni["PrivateIpAddresses"]}

    def slot_tag(self, instance_id: str) -> str | None:
        return {t["Key"]: t["Value"] for t in self.instance(instance_id).get("Tags", [])}.get(SLOT_KEY)

    def eip(self, slot: int) -> dict[str, Any]:
        return self.ec2.describe_addresses(AllocationIds=[self.pool[slot]])["Addresses"][0]

    def slots_on(self, instance_id: str) -> list[int]:
        eni = self.eni(instance_id)
        return [slot for slot in sorted(self.pool) if self.eip(slot).get("NetworkInterfaceId") == eni]

    def assigner(self, **config: Any) -> SlotAssigner:
        settings = {"hub": HUB, "asg_name": ASG, **config}
        return SlotAssigner(
            SlotConfig(**settings),
            ec2=self.spy,
            autoscaling=self.autoscaling,
            sleep=lambda _s: None,
            log=self.records.append,
        )


def launch_event(instance_id: str, token: str, *, asg: str = ASG, hook: str = HOOK) -> dict[str, Any]:
    """An EventBridge event as the Auto Scaling event reference documents it."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "EC2 Instance-launch Lifecycle Action",
        "source": "aws.autoscaling",
        "account": ACCOUNT,
        "time": "2026-01-01T00:00:00Z",
        "region": REGION,
        "resources": [
            f"arn:aws:autoscaling:{REGION}:{ACCOUNT}:autoScalingGroup:{uuid.uuid4()}:autoScalingGroupName/{asg}"
        ],
        "detail": {
            "LifecycleActionToken": token,
            "AutoScalingGroupName": asg,
            "LifecycleHookName": hook,
            "EC2InstanceId": instance_id,
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
            "NotificationMetadata": "",
            "Origin": "EC2",
            "Destination": "AutoScalingGroup",
        },
    }


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        autoscaling = LifecycleActions(boto3.client("autoscaling", region_name=REGION))
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet_a = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone=f"{REGION}a")["Subnet"]
        subnet_b = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.2.0/24", AvailabilityZone=f"{REGION}b")["Subnet"]
        ec2.create_launch_template(
            LaunchTemplateName="hub1-proxy",
            LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "t3.micro"},
        )
        hook_spec = {
            "LifecycleHookName": HOOK,
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
            "HeartbeatTimeout": 600,
            "DefaultResult": "ABANDON",
        }
        autoscaling.create_auto_scaling_group(
            AutoScalingGroupName=ASG,
            MinSize=0,
            MaxSize=8,
            DesiredCapacity=0,
            LaunchTemplate={"LaunchTemplateName": "hub1-proxy", "Version": "$Latest"},
            VPCZoneIdentifier=f"{subnet_a['SubnetId']},{subnet_b['SubnetId']}",
            LifecycleHookSpecificationList=[hook_spec],
        )
        # moto ignores LifecycleHookSpecificationList; declare the hook the way moto stores it.
        assert autoscaling.describe_lifecycle_hooks(AutoScalingGroupName=ASG)["LifecycleHooks"] == []
        autoscaling.put_lifecycle_hook(AutoScalingGroupName=ASG, **hook_spec)
        lab = Lab(ec2, autoscaling, Ec2Spy(ec2), subnet_a["SubnetId"], subnet_b["SubnetId"])
        lab.spy.after["associate_address"] = lab.model_association
        yield lab


def private_plan(lab: Lab) -> dict[int, SlotAddress]:
    """Slots alternate between the two subnets, as the construct spreads them over AZs."""
    return {
        0: SlotAddress(lab.subnet_a, "10.0.1.10"),
        1: SlotAddress(lab.subnet_b, "10.0.2.10"),
        2: SlotAddress(lab.subnet_a, "10.0.1.11"),
        3: SlotAddress(lab.subnet_b, "10.0.2.11"),
    }


def exclusive_private_ips(lab: Lab) -> Any:
    """AllowReassignment=False as AWS enforces it (moto ignores it): an IP is one ENI's."""

    def hook(call: Any, kwargs: dict[str, Any]) -> Any:
        if kwargs.get("AllowReassignment") is False:
            for eni in lab.ec2.describe_network_interfaces()["NetworkInterfaces"]:
                if eni["NetworkInterfaceId"] == kwargs["NetworkInterfaceId"]:
                    continue
                held = {p["PrivateIpAddress"] for p in eni["PrivateIpAddresses"]}
                for ip in kwargs["PrivateIpAddresses"]:
                    if ip in held:
                        raise ClientError(
                            {"Error": {"Code": "InvalidIPAddress.InUse", "Message": f"Address {ip} is in use."}},
                            "AssignPrivateIpAddresses",
                        )
        return call(**kwargs)

    return hook


# --------------------------------------------------------------------------- slot assignment


def test_free_slot_is_assigned_tagged_and_continued(lab: Lab) -> None:
    # GIVEN a pool of three slots and one launching instance
    lab.allocate_pool(3)
    instance_id, token = lab.launch()
    # WHEN the launch event arrives
    record = lab.assigner().handle(launch_event(instance_id, token))
    # THEN it holds the lowest slot, is tagged with it, and the launch continues
    assert record["decision"] == "assigned"
    assert record["slot"] == 0
    assert lab.slots_on(instance_id) == [0]
    assert lab.slot_tag(instance_id) == "0"
    assert lab.autoscaling.completed == [
        {
            "AutoScalingGroupName": ASG,
            "LifecycleHookName": HOOK,
            "LifecycleActionToken": token,
            "InstanceId": instance_id,
            "LifecycleActionResult": "CONTINUE",
        }
    ]
    (associate,) = lab.spy.named("associate_address")
    assert associate.kwargs["AllowReassociation"] is False
    assert associate.kwargs["AllocationId"] == lab.pool[0]
    assert record["public_ip"] == lab.eip(0)["PublicIp"]


def test_slots_fill_in_numeric_order(lab: Lab) -> None:
    # GIVEN eleven slots, slot 0 and 1 taken: the next is 2, not "10" (text order)
    lab.allocate_pool(11)
    for expected in (0, 1, 2):
        instance_id, token = lab.launch()
        assert lab.assigner().handle(launch_event(instance_id, token))["slot"] == expected


def test_second_delivery_of_the_same_event_changes_nothing(lab: Lab) -> None:
    # GIVEN an instance that got slot 0 from the first delivery
    lab.allocate_pool(3)
    instance_id, token = lab.launch()
    event = launch_event(instance_id, token)
    lab.assigner().handle(event)
    writes_before = len(lab.spy.writes())
    # WHEN EventBridge delivers the same event again
    record = lab.assigner().handle(event)
    # THEN no second EIP, same slot, no error, and the inactive action counts as done
    assert record["decision"] == "already_assigned"
    assert record["slot"] == 0
    assert record["lifecycle"] == "already_completed"
    assert len(lab.spy.writes()) == writes_before
    assert lab.slots_on(instance_id) == [0]
    assert [lab.eip(s).get("AssociationId") for s in (1, 2)] == [None, None]
    assert lab.autoscaling.results_for(instance_id) == ["CONTINUE"]
    assert len(lab.autoscaling.refused) == 1


def test_redelivery_after_a_crash_before_completion_resumes_the_held_slot(lab: Lab) -> None:
    # GIVEN a first run that associated slot 1's EIP and died before tagging and completing
    lab.allocate_pool(3)
    instance_id, token = lab.launch()
    lab.associate(lab.pool[1], lab.eni(instance_id))
    # WHEN the event is delivered again
    record = lab.assigner().handle(launch_event(instance_id, token))
    # THEN it keeps slot 1, takes no other, tags and continues
    assert (record["decision"], record["slot"]) == ("already_assigned", 1)
    assert lab.spy.named("associate_address") == []
    assert lab.slot_tag(instance_id) == "1"
    assert lab.autoscaling.results_for(instance_id) == ["CONTINUE"]


def test_exhausted_pool_abandons_the_launch_without_association(lab: Lab) -> None:
    # GIVEN a pool of one slot, held by the first proxy
    lab.allocate_pool(1)
    first, first_token = lab.launch()
    lab.assigner().handle(launch_event(first, first_token))
    # WHEN a second proxy launches
    second, token = lab.launch()
    record = lab.assigner().handle(launch_event(second, token))
    # THEN its launch is abandoned, nothing is associated to it, the first keeps its slot
    assert record["decision"] == "abandoned"
    assert record["reason"] == "no_free_slot"
    assert (record["pool_size"], record["free_in_subnet"]) == (1, 0)
    assert lab.autoscaling.results_for(second) == ["ABANDON"]
    assert [c for c in lab.spy.named("associate_address") if c.kwargs["NetworkInterfaceId"] == lab.eni(second)] == []
    assert lab.slots_on(first) == [0]
    assert lab.slot_tag(second) is None


def test_eips_of_another_hub_are_never_taken(lab: Lab) -> None:
    # GIVEN only another hub's EIPs are free
    lab.allocate_pool(2, hub="hub2")
    instance_id, token = lab.launch()
    # WHEN a proxy of hub1 launches
    record = lab.assigner().handle(launch_event(instance_id, token))
    # THEN it is abandoned
    assert (record["decision"], record["pool_size"]) == ("abandoned", 0)
    assert lab.spy.named("associate_address") == []


def test_moto_refuses_reassociation() -> None:
    # The race test relies on moto answering AllowReassociation=False like AWS does.
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"]
        one, two = (
            i["InstanceId"]
            for i in ec2.run_instances(ImageId="ami-12c6146b", MinCount=2, MaxCount=2, SubnetId=subnet)["Instances"]
        )
        allocation = ec2.allocate_address(Domain="vpc")["AllocationId"]
        ec2.associate_address(AllocationId=allocation, InstanceId=one, AllowReassociation=False)
        with pytest.raises(ClientError) as refused:
            ec2.associate_address(AllocationId=allocation, InstanceId=two, AllowReassociation=False)
        assert refused.value.response["Error"]["Code"] == "Resource.AlreadyAssociated"


def test_two_launches_racing_for_one_eip_end_with_different_slots(lab: Lab) -> None:
    # GIVEN two proxies launching at once, both reading the pool before either associates
    lab.allocate_pool(3)
    (one, token_one), (two, token_two) = lab.launch(), lab.launch()
    barrier = threading.Barrier(2, timeout=20)
    first_read_done: set[int] = set()
    order: list[tuple[str, int]] = []  # moto calls in the order they ran

    def read_then_wait(call: Any, kwargs: dict[str, Any]) -> Any:
        result = call(**kwargs)
        if threading.get_ident() not in first_read_done:
            first_read_done.add(threading.get_ident())
            order.append(("read", threading.get_ident()))
            barrier.wait()
        return result

    def associate(call: Any, kwargs: dict[str, Any]) -> Any:
        order.append(("associate", threading.get_ident()))
        return call(**kwargs)

    lab.spy.hooks["describe_addresses"] = read_then_wait
    lab.spy.hooks["associate_address"] = associate
    records: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def run(instance_id: str, token: str) -> None:
        try:
            records[instance_id] = lab.assigner().handle(launch_event(instance_id, token))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=args) for args in ((one, token_one), (two, token_two))]
    # WHEN both handlers run concurrently
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # THEN the race was real: both tried slot 0 after both read the pool, moto refused one
    assert errors == []
    associations = lab.spy.named("associate_address")
    first_two = associations[:2]
    assert [c.kwargs["AllocationId"] for c in first_two] == [lab.pool[0], lab.pool[0]]
    assert sorted(str(c.error) for c in first_two) == ["None", "Resource.AlreadyAssociated"]
    assert [kind for kind, _ in order[:3]] == ["read", "read", "associate"]
    assert order[0][1] != order[1][1]
    # AND they ended with two different slots, each EIP on its own proxy, both continued
    assert sorted(r["slot"] for r in records.values()) == [0, 1]
    assert {records[one]["slot"], records[two]["slot"]} == {lab.slots_on(one)[0], lab.slots_on(two)[0]}
    assert {lab.slot_tag(one), lab.slot_tag(two)} == {"0", "1"}
    loser = one if records[one]["attempts"] else two
    assert records[loser]["attempts"] == [{"slot": 0, "code": "Resource.AlreadyAssociated"}]
    assert lab.autoscaling.results_for(one) == lab.autoscaling.results_for(two) == ["CONTINUE"]


# --------------------------------------------------------------------------- private addresses


def test_private_mode_takes_only_slots_of_the_instance_subnet(lab: Lab) -> None:
    # GIVEN four slots alternating between subnets a and b, and a proxy launching in b
    lab.allocate_pool(4)
    plan = private_plan(lab)
    lab.spy.hooks["assign_private_ip_addresses"] = exclusive_private_ips(lab)
    instance_id, token = lab.launch(lab.subnet_b)
    # WHEN the event arrives
    record = lab.assigner(private_ips=plan).handle(launch_event(instance_id, token))
    # THEN it takes slot 1 (the lowest in b), its IP is a secondary on the primary ENI,
    # and the EIP was asked onto that IP without re-association
    assert (record["decision"], record["slot"], record["private_ip"]) == ("assigned", 1, "10.0.2.10")
    assert "10.0.2.10" in lab.private_ips(instance_id)
    (assign,) = lab.spy.named("assign_private_ip_addresses")
    assert assign.kwargs == {
        "NetworkInterfaceId": lab.eni(instance_id),
        "PrivateIpAddresses": ["10.0.2.10"],
        "AllowReassignment": False,
    }
    (associate,) = lab.spy.named("associate_address")
    # the EIP goes on the primary address, the one the proxy egresses from (issue 13, defect 1;
    # moto ignores PrivateIpAddress: see module doc)
    assert associate.kwargs["PrivateIpAddress"] == lab.primary_of(lab.eni(instance_id)) != "10.0.2.10"
    assert associate.kwargs["AllowReassociation"] is False
    assert lab.slots_on(instance_id) == [1]
    assert lab.slot_tag(instance_id) == "1"
    assert lab.autoscaling.results_for(instance_id) == ["CONTINUE"]


def test_private_mode_abandons_when_only_other_subnets_have_free_slots(lab: Lab) -> None:
    # GIVEN both subnet-b slots taken, slots 0 and 2 (subnet a) free
    lab.allocate_pool(4)
    plan = private_plan(lab)
    lab.spy.hooks["assign_private_ip_addresses"] = exclusive_private_ips(lab)
    for expected in (1, 3):
        instance_id, token = lab.launch(lab.subnet_b)
        assert lab.assigner(private_ips=plan).handle(launch_event(instance_id, token))["slot"] == expected
    # WHEN a third proxy launches in subnet b
    third, token = lab.launch(lab.subnet_b)
    record = lab.assigner(private_ips=plan).handle(launch_event(third, token))
    # THEN it is abandoned and slots 0 and 2 stay free
    assert (record["decision"], record["pool_size"], record["free_in_subnet"]) == ("abandoned", 4, 0)
    assert lab.autoscaling.results_for(third) == ["ABANDON"]
    assert lab.eip(0).get("AssociationId") is None and lab.eip(2).get("AssociationId") is None


def test_private_ip_held_by_another_interface_moves_to_the_next_slot(lab: Lab) -> None:
    # GIVEN slot 0's private IP already on another interface in subnet a (a launch mid-claim)
    lab.allocate_pool(4)
    plan = private_plan(lab)
    lab.spy.hooks["assign_private_ip_addresses"] = exclusive_private_ips(lab)
    stray = lab.ec2.create_network_interface(SubnetId=lab.subnet_a)["NetworkInterface"]["NetworkInterfaceId"]
    lab.ec2.assign_private_ip_addresses(NetworkInterfaceId=stray, PrivateIpAddresses=["10.0.1.10"])
    instance_id, token = lab.launch(lab.subnet_a)
    # WHEN the event arrives
    record = lab.assigner(private_ips=plan).handle(launch_event(instance_id, token))
    # THEN slot 0 is skipped on the conflict and slot 2 is taken
    assert record["attempts"] == [{"slot": 0, "code": "InvalidIPAddress.InUse"}]
    assert (record["slot"], record["private_ip"]) == (2, "10.0.1.11")
    assert lab.private_ips(instance_id) >= {"10.0.1.11"} and "10.0.1.10" not in lab.private_ips(instance_id)
    assert lab.eip(0).get("AssociationId") is None


def test_private_ip_is_given_back_when_the_eip_was_taken_meanwhile(lab: Lab) -> None:
    # GIVEN slot 0's EIP gets associated elsewhere between the pool read and our association
    lab.allocate_pool(4)
    plan = private_plan(lab)
    stray = lab.ec2.create_network_interface(SubnetId=lab.subnet_a)["NetworkInterface"]["NetworkInterfaceId"]
    stolen = {"done": False}

    def steal_first(call: Any, kwargs: dict[str, Any]) -> Any:
        if not stolen["done"]:
            stolen["done"] = True
            lab.associate(lab.pool[0], stray)
        return call(**kwargs)

    lab.spy.hooks["associate_address"] = steal_first
    instance_id, token = lab.launch(lab.subnet_a)
    # WHEN the event arrives
    record = lab.assigner(private_ips=plan).handle(launch_event(instance_id, token))
    # THEN slot 0's IP is unassigned again and slot 2 is taken
    assert record["attempts"] == [{"slot": 0, "code": "Resource.AlreadyAssociated"}]
    assert record["slot"] == 2
    assert "10.0.1.10" not in lab.private_ips(instance_id)
    (unassign,) = lab.spy.named("unassign_private_ip_addresses")
    assert unassign.kwargs["PrivateIpAddresses"] == ["10.0.1.10"]


def test_an_instance_holding_two_slots_keeps_the_lowest(lab: Lab) -> None:
    # GIVEN two concurrent deliveries left the instance with slots 0 and 2 (subnet a): both
    # private IPs, and slot 2's EIP on the primary address, where it displaced slot 0's
    lab.allocate_pool(4)
    plan = private_plan(lab)
    instance_id, token = lab.launch(lab.subnet_a)
    eni = lab.eni(instance_id)
    for slot in (0, 2):
        lab.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni, PrivateIpAddresses=[plan[slot].ip])
        lab.associate(lab.pool[slot], eni)
    assert lab.slots_on(instance_id) == [2]
    # WHEN the event is handled
    record = lab.assigner(private_ips=plan).handle(launch_event(instance_id, token))
    # THEN slot 0 stays, slot 2's EIP and IP are given back
    assert (record["decision"], record["slot"], record["released"]) == ("already_assigned", 0, [2])
    assert lab.slots_on(instance_id) == [0]
    assert lab.eip(2).get("AssociationId") is None
    assert lab.private_ips(instance_id) >= {"10.0.1.10"} and "10.0.1.11" not in lab.private_ips(instance_id)
    assert lab.slot_tag(instance_id) == "0"


def test_a_twin_delivery_that_took_a_lower_slot_meanwhile_wins(lab: Lab) -> None:
    # GIVEN slot 0 is another interface's when the pool is read, so the handler claims slot 2,
    # and before it settles a twin delivery of the same event moves slot 0 onto this instance
    lab.allocate_pool(4)
    plan = private_plan(lab)
    stray = lab.ec2.create_network_interface(SubnetId=lab.subnet_a)["NetworkInterface"]["NetworkInterfaceId"]
    lab.ec2.assign_private_ip_addresses(NetworkInterfaceId=stray, PrivateIpAddresses=["10.0.1.10"])
    stray_association = lab.associate(lab.pool[0], stray)
    instance_id, token = lab.launch(lab.subnet_a)
    reads = {"count": 0}

    def twin_moves_slot_0_here(call: Any, kwargs: dict[str, Any]) -> Any:
        reads["count"] += 1
        if reads["count"] == 2:  # the settle step's read, after the claim of slot 2
            lab.ec2.disassociate_address(AssociationId=stray_association)
            lab.ec2.unassign_private_ip_addresses(NetworkInterfaceId=stray, PrivateIpAddresses=["10.0.1.10"])
            eni = lab.eni(instance_id)
            lab.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni, PrivateIpAddresses=["10.0.1.10"])
            lab.associate(lab.pool[0], eni)  # onto the primary address: slot 2's EIP is pushed off
        return call(**kwargs)

    lab.spy.hooks["describe_addresses"] = twin_moves_slot_0_here
    # WHEN the handler claims and settles
    record = lab.assigner(private_ips=plan).handle(launch_event(instance_id, token))
    # THEN both twins agree on the lowest slot: slot 0 stays, the handler's own slot 2 goes back
    assert (record["decision"], record["slot"], record["released"]) == ("assigned", 0, [2])
    assert lab.slots_on(instance_id) == [0]
    assert lab.eip(2).get("AssociationId") is None
    assert "10.0.1.11" not in lab.private_ips(instance_id)
    assert lab.slot_tag(instance_id) == "0"


def test_a_twin_that_pushed_the_kept_slots_eip_off_gets_it_put_back(lab: Lab) -> None:
    """Both twins' EIPs go on the one primary address, so the twin claiming a higher slot after
    ours displaces our EIP (EC2: the address's existing EIP is disassociated). The settle step
    keeps the lowest slot, releases the other and must associate the kept EIP again, or the
    proxy waits for a public IPv4 that never comes."""
    lab.allocate_pool(4)
    plan = private_plan(lab)
    instance_id, token = lab.launch(lab.subnet_a)
    reads = {"count": 0}

    def twin_claims_slot_2(call: Any, kwargs: dict[str, Any]) -> Any:
        reads["count"] += 1
        if reads["count"] == 2:  # the settle step's read, after our claim of slot 0
            eni = lab.eni(instance_id)
            lab.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni, PrivateIpAddresses=[plan[2].ip])
            lab.associate(lab.pool[2], eni)
        return call(**kwargs)

    lab.spy.hooks["describe_addresses"] = twin_claims_slot_2
    record = lab.assigner(private_ips=plan).handle(launch_event(instance_id, token))
    assert (record["decision"], record["slot"], record["released"]) == ("assigned", 0, [2])
    assert lab.slots_on(instance_id) == [0]
    assert lab.eip(2).get("AssociationId") is None
    assert plan[2].ip not in lab.private_ips(instance_id) and plan[0].ip in lab.private_ips(instance_id)
    assert [c.kwargs["AllocationId"] for c in lab.spy.named("associate_address")] == [lab.pool[0], lab.pool[0]]


def test_a_stale_read_after_a_twin_displaced_the_kept_eip_still_puts_it_back(lab: Lab) -> None:
    """DescribeAddresses is eventually consistent ("the results of the API calls ... might not
    immediately reflect", EC2 API reference, Eventual consistency): right after the twin's claim
    of slot 2 displaced our slot 0 EIP, the settle step's reads may still show the old picture
    (EIP 0 on this ENI, EIP 2 free). The restore must associate EIP 0 again without trusting
    them, or the proxy is left with no EIP of its own slot (issue 13 review)."""
    lab.allocate_pool(4)
    plan = private_plan(lab)
    instance_id, token = lab.launch(lab.subnet_a)
    reads = {"count": 0}
    stale: dict[str, Any] = {}

    def twin_claims_slot_2_and_reads_go_stale(call: Any, kwargs: dict[str, Any]) -> Any:
        reads["count"] += 1
        if reads["count"] == 2:  # the settle step's read, after our claim of slot 0
            before = call(**kwargs)
            stale["addresses"] = before["Addresses"]  # EIP 0 on this ENI, EIP 2 free
            eni = lab.eni(instance_id)
            lab.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni, PrivateIpAddresses=[plan[2].ip])
            lab.associate(lab.pool[2], eni)  # displaces EIP 0
        if reads["count"] >= 2:
            return {**call(**kwargs), "Addresses": stale["addresses"]}
        return call(**kwargs)

    lab.spy.hooks["describe_addresses"] = twin_claims_slot_2_and_reads_go_stale
    record = lab.assigner(private_ips=plan).handle(launch_event(instance_id, token))
    assert (record["decision"], record["slot"]) == ("assigned", 0)
    assert lab.slots_on(instance_id) == [0]
    assert lab.eip(2).get("AssociationId") is None
    assert plan[2].ip not in lab.private_ips(instance_id)


def test_a_tagged_slot_whose_eip_looks_free_is_taken_again(lab: Lab) -> None:
    # GIVEN an earlier delivery tagged slot 1, but its association is not visible (lost, or
    # EC2's eventual consistency)
    lab.allocate_pool(3)
    instance_id, token = lab.launch()
    lab.ec2.create_tags(Resources=[instance_id], Tags=[{"Key": SLOT_KEY, "Value": "1"}])
    # WHEN the event is delivered again
    record = lab.assigner().handle(launch_event(instance_id, token))
    # THEN it takes slot 1 again, not the lowest free slot 0
    assert (record["decision"], record["slot"]) == ("already_assigned", 1)
    assert lab.slots_on(instance_id) == [1]
    assert lab.eip(0).get("AssociationId") is None


def test_a_tagged_slot_held_by_another_instance_is_left_to_a_retry(lab: Lab) -> None:
    # GIVEN the instance is tagged slot 0 but slot 0's EIP is on another proxy
    lab.allocate_pool(3)
    other, other_token = lab.launch()
    lab.assigner().handle(launch_event(other, other_token))
    instance_id, token = lab.launch()
    lab.ec2.create_tags(Resources=[instance_id], Tags=[{"Key": SLOT_KEY, "Value": "0"}])
    # WHEN its event is handled
    with pytest.raises(handler.SlotUnsettled, match="holds slot 0"):
        lab.assigner().handle(launch_event(instance_id, token))
    # THEN nothing is taken or completed; Lambda retries, the hook's default result is the backstop
    assert lab.records[-1]["decision"] == "retry"
    assert lab.slots_on(instance_id) == [] and lab.slots_on(other) == [0]
    assert lab.autoscaling.results_for(instance_id) == []


# --------------------------------------------------------------------------- ignored events


def test_event_for_another_group_is_ignored(lab: Lab) -> None:
    lab.allocate_pool(2)
    instance_id, token = lab.launch()
    record = lab.assigner().handle(launch_event(instance_id, token, asg="someone-elses-asg"))
    assert (record["decision"], record["reason"], record["event_asg"]) == (
        "ignored",
        "other_group",
        "someone-elses-asg",
    )
    assert lab.spy.calls == []
    assert lab.autoscaling.completed == [] and lab.autoscaling.pending


def test_event_for_another_hook_is_ignored_when_the_hook_is_named(lab: Lab) -> None:
    lab.allocate_pool(2)
    instance_id, token = lab.launch()
    record = lab.assigner(hook_name=HOOK).handle(launch_event(instance_id, token, hook="drain-hook"))
    assert (record["decision"], record["reason"]) == ("ignored", "other_hook")
    assert lab.spy.calls == []


def test_terminate_transition_is_ignored(lab: Lab) -> None:
    instance_id, token = lab.launch()
    event = launch_event(instance_id, token)
    event["detail-type"] = "EC2 Instance-terminate Lifecycle Action"
    event["detail"]["LifecycleTransition"] = "autoscaling:EC2_INSTANCE_TERMINATING"
    record = lab.assigner().handle(event)
    assert (record["decision"], record["reason"]) == ("ignored", "other_transition")
    assert lab.spy.calls == [] and lab.autoscaling.completed == []


def _without(field_name: str) -> dict[str, Any]:
    event = launch_event("i-0123456789abcdef0", "token")
    del event["detail"][field_name]
    return event


@pytest.mark.parametrize(
    ("event", "named"),
    [
        ("not an event", "not a JSON object"),
        ({"detail-type": "EC2 Instance-launch Lifecycle Action"}, "'detail'"),
        ({"detail": {"EC2InstanceId": "i-0123456789abcdef0"}}, "LifecycleTransition"),
        (_without("EC2InstanceId"), "detail.EC2InstanceId"),
        (_without("LifecycleActionToken"), "detail.LifecycleActionToken"),
        (_without("LifecycleHookName"), "detail.LifecycleHookName"),
        (launch_event("instance-1", "token"), "not an instance id"),
    ],
)
def test_malformed_event_is_ignored_with_the_field_named(event: Any, named: str) -> None:
    class NoAws:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"a malformed event must not reach AWS ({name})")

    records: list[dict[str, Any]] = []
    assigner = SlotAssigner(SlotConfig(hub=HUB, asg_name=ASG), ec2=NoAws(), autoscaling=NoAws(), log=records.append)
    record = assigner.handle(event)
    assert (record["decision"], record["reason"]) == ("ignored", "malformed_event")
    assert named in record["detail"]
    assert records == [record]


def test_instance_outside_the_group_is_ignored(lab: Lab) -> None:
    # GIVEN an instance the group did not launch (no aws:autoscaling:groupName tag)
    lab.allocate_pool(2)
    stray = lab.ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=lab.subnet_a)
    instance_id = stray["Instances"][0]["InstanceId"]
    record = lab.assigner().handle(launch_event(instance_id, lab.autoscaling.open(instance_id)))
    assert (record["decision"], record["reason"]) == ("ignored", "instance_not_in_group")
    assert lab.spy.writes() == [] and lab.autoscaling.completed == []


# --------------------------------------------------------------------------- AWS errors


def _failing(code: str, status: int) -> Any:
    def hook(call: Any, kwargs: dict[str, Any]) -> Any:
        raise ClientError(
            {"Error": {"Code": code, "Message": "injected"}, "ResponseMetadata": {"HTTPStatusCode": status}},
            "AssociateAddress",
        )

    return hook


def test_throttling_is_raised_for_lambda_to_retry(lab: Lab) -> None:
    lab.allocate_pool(2)
    instance_id, token = lab.launch()
    lab.spy.hooks["associate_address"] = _failing("RequestLimitExceeded", 503)
    with pytest.raises(ClientError):
        lab.assigner().handle(launch_event(instance_id, token))
    assert lab.autoscaling.completed == []
    assert lab.records[-1]["decision"] == "retry"
    assert lab.records[-1]["code"] == "RequestLimitExceeded"
    # AND the retry, once EC2 answers again, assigns the slot
    del lab.spy.hooks["associate_address"]
    assert lab.assigner().handle(launch_event(instance_id, token))["slot"] == 0


def test_permission_error_abandons_the_launch(lab: Lab) -> None:
    lab.allocate_pool(2)
    instance_id, token = lab.launch()
    lab.spy.hooks["associate_address"] = _failing("UnauthorizedOperation", 403)
    record = lab.assigner().handle(launch_event(instance_id, token))
    assert (record["decision"], record["reason"], record["code"]) == ("abandoned", "aws_error", "UnauthorizedOperation")
    assert record["operation"] == "AssociateAddress"
    assert lab.autoscaling.results_for(instance_id) == ["ABANDON"]


def test_when_abandoning_fails_too_the_error_goes_to_lambda_retry(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    lab.allocate_pool(2)
    instance_id, token = lab.launch()
    lab.spy.hooks["associate_address"] = _failing("UnauthorizedOperation", 403)

    def denied(**kwargs: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "CompleteLifecycleAction")

    monkeypatch.setattr(lab.autoscaling, "complete_lifecycle_action", denied)
    with pytest.raises(ClientError):
        lab.assigner().handle(launch_event(instance_id, token))
    last = lab.records[-1]
    assert (last["decision"], last["code"], last["abandon_code"]) == ("retry", "UnauthorizedOperation", "AccessDenied")


def test_an_instance_already_terminating_is_left_alone(lab: Lab) -> None:
    lab.allocate_pool(2)
    instance_id, token = lab.launch()
    lab.ec2.terminate_instances(InstanceIds=[instance_id])
    record = lab.assigner().handle(launch_event(instance_id, token))
    assert (record["decision"], record["reason"]) == ("ignored", "instance_not_running")
    assert record["state"] in ("shutting-down", "terminated")
    assert lab.spy.writes() == [] and lab.autoscaling.completed == []


def test_a_launch_ec2_does_not_show_yet_is_looked_up_again(lab: Lab) -> None:
    lab.allocate_pool(1)
    instance_id, token = lab.launch()
    misses = {"left": 2}

    def not_yet(call: Any, kwargs: dict[str, Any]) -> Any:
        if misses["left"]:
            misses["left"] -= 1
            raise ClientError({"Error": {"Code": "InvalidInstanceID.NotFound", "Message": "x"}}, "DescribeInstances")
        return call(**kwargs)

    lab.spy.hooks["describe_instances"] = not_yet
    pauses: list[float] = []
    assigner = lab.assigner()
    assigner._sleep = pauses.append
    assert assigner.handle(launch_event(instance_id, token))["slot"] == 0
    assert pauses == [1.0, 2.0]


def test_a_launch_never_visible_goes_to_lambda_retry(lab: Lab) -> None:
    instance_id, token = lab.launch()
    lab.spy.hooks["describe_instances"] = lambda call, kwargs: (_ for _ in ()).throw(
        ClientError({"Error": {"Code": "InvalidInstanceID.NotFound", "Message": "x"}}, "DescribeInstances")
    )
    pauses: list[float] = []
    assigner = lab.assigner()
    assigner._sleep = pauses.append
    with pytest.raises(ClientError):
        assigner.handle(launch_event(instance_id, token))
    assert pauses == list(handler.INSTANCE_LOOKUP_PAUSES_S)
    assert lab.records[-1]["decision"] == "retry"
    assert lab.autoscaling.completed == []


# --------------------------------------------------------------------------- Lambda entry


def test_lambda_handler_reads_its_environment_and_logs_json(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lab.allocate_pool(2)
    instance_id, token = lab.launch()
    monkeypatch.setenv("HUB", HUB)
    monkeypatch.setenv("ASG_NAME", ASG)
    monkeypatch.setenv("LIFECYCLE_HOOK_NAME", HOOK)
    monkeypatch.setattr(handler, "_assigner", None)
    monkeypatch.setattr(handler, "aws_clients", lambda: (lab.ec2, lab.autoscaling))

    class Context:
        aws_request_id = "req-1"

    result = handler.lambda_handler(launch_event(instance_id, token), Context())
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert result["decision"] == "assigned"
    assert lines == [result]
    assert (lines[0]["request_id"], lines[0]["hub"], lines[0]["slot"]) == ("req-1", HUB, 0)


def test_lambda_handler_with_a_bad_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HUB", raising=False)
    monkeypatch.setenv("ASG_NAME", ASG)
    monkeypatch.setattr(handler, "_assigner", None)
    with pytest.raises(ConfigError, match="HUB is not set"):
        handler.lambda_handler(launch_event("i-0123456789abcdef0", "t"), None)
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["decision"] == "config_error"


# --------------------------------------------------------------------------- configuration


def test_config_defaults_and_private_addresses_round_trip() -> None:
    plan = {1: SlotAddress("subnet-0bbbbbbbbbbbbbbbb", "10.0.2.10"), 0: SlotAddress("subnet-0aaaaaaaa", "10.0.1.10")}
    config = handler.load_config(
        {"HUB": "hub1", "ASG_NAME": ASG, "SLOT_PRIVATE_IPS": handler.encode_slot_private_ips(plan)}
    )
    assert (config.pool_tag_key, config.slot_tag_key, config.hook_name) == (POOL_KEY, SLOT_KEY, "")
    assert config.private_ips == plan and config.private_mode
    assert not handler.load_config({"HUB": "h", "ASG_NAME": "g", "SLOT_PRIVATE_IPS": " "}).private_mode


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"ASG_NAME": "g"}, "HUB is not set"),
        ({"HUB": "h"}, "ASG_NAME is not set"),
        ({"HUB": "h", "ASG_NAME": "g", "POOL_TAG_KEY": "aws:pool"}, "POOL_TAG_KEY is 'aws:pool'"),
        ({"HUB": "h", "ASG_NAME": "g", "SLOT_TAG_KEY": "tunnelhub:pool"}, "both 'tunnelhub:pool'"),
        ({"HUB": "h", "ASG_NAME": "g", "SLOT_PRIVATE_IPS": "{0: 1}"}, "SLOT_PRIVATE_IPS is not JSON"),
        ({"HUB": "h", "ASG_NAME": "g", "SLOT_PRIVATE_IPS": "[]"}, "non-empty JSON object"),
        (
            {
                "HUB": "h",
                "ASG_NAME": "g",
                "SLOT_PRIVATE_IPS": '{"a": {"subnet_id": "subnet-0aaaaaaaa", "ip": "10.0.0.1"}}',
            },
            "SLOT_PRIVATE_IPS['a']: the key must be a slot number",
        ),
        (
            {"HUB": "h", "ASG_NAME": "g", "SLOT_PRIVATE_IPS": '{"0": {"subnet_id": "subnet-0aaaaaaaa"}}'},
            "needs exactly 'subnet_id' and 'ip'",
        ),
        (
            {"HUB": "h", "ASG_NAME": "g", "SLOT_PRIVATE_IPS": '{"0": {"subnet_id": "sn-1", "ip": "10.0.0.1"}}'},
            "subnet_id 'sn-1' is not a subnet id",
        ),
        (
            {
                "HUB": "h",
                "ASG_NAME": "g",
                "SLOT_PRIVATE_IPS": '{"0": {"subnet_id": "subnet-0aaaaaaaa", "ip": "10.0.0.300"}}',
            },
            "ip '10.0.0.300' is not an IPv4 address",
        ),
        (
            {
                "HUB": "h",
                "ASG_NAME": "g",
                "SLOT_PRIVATE_IPS": json.dumps(
                    {
                        "0": {"subnet_id": "subnet-0aaaaaaaa", "ip": "10.0.0.1"},
                        "1": {"subnet_id": "subnet-0aaaaaaaa", "ip": "10.0.0.1"},
                    }
                ),
            },
            "ip 10.0.0.1 is also slot 0's",
        ),
    ],
)
def test_bad_configuration_names_the_variable_and_the_fix(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        handler.load_config(environ)
    assert message in str(error.value)


# --------------------------------------------------------------------------- pure helpers


def _address(allocation: str, slot: str | None, **extra: str) -> dict[str, Any]:
    tags = [{"Key": POOL_KEY, "Value": HUB}] + ([{"Key": SLOT_KEY, "Value": slot}] if slot is not None else [])
    return {"AllocationId": allocation, "PublicIp": "198.51.100.1", "Tags": tags, **extra}


def test_order_pool_sorts_numerically_and_leaves_out_ambiguous_eips() -> None:
    pool, notes = handler.order_pool(
        [
            _address("a10", "10"),
            _address("a2", "2"),
            _address("bad", "two"),
            _address("none", None),
            _address("dup1", "5"),
            _address("dup2", "5"),
            _address("a0", "0", AssociationId="eipassoc-1", NetworkInterfaceId="eni-1"),
        ],
        slot_tag_key=SLOT_KEY,
    )
    assert [(e.slot, e.allocation_id) for e in pool] == [(0, "a0"), (2, "a2"), (10, "a10")]
    assert pool[0].association_id == "eipassoc-1"
    assert len(notes) == 3
    assert any("slot 5 is tagged on several EIPs" in n for n in notes)


def test_slot_numbers_are_canonical_decimals() -> None:
    assert [handler.parse_slot_number(v) for v in ("0", "7", "999", "07", "-1", "1000", "", None)] == [
        0,
        7,
        999,
        None,
        None,
        None,
        None,
        None,
    ]


def test_free_slots_in_private_mode_are_those_of_the_subnet() -> None:
    pool = [
        handler.PoolEip(slot=0, allocation_id="a0", public_ip="x"),
        handler.PoolEip(slot=1, allocation_id="a1", public_ip="x"),
        handler.PoolEip(slot=2, allocation_id="a2", public_ip="x", association_id="eipassoc-2"),
        handler.PoolEip(slot=3, allocation_id="a3", public_ip="x"),
    ]
    plan = {
        0: SlotAddress("subnet-a", "10.0.1.10"),
        1: SlotAddress("subnet-b", "10.0.2.10"),
        2: SlotAddress("subnet-a", "10.0.1.11"),
    }
    assert [e.slot for e in handler.free_slots(pool, {}, "subnet-a")] == [0, 1, 3]
    assert [e.slot for e in handler.free_slots(pool, plan, "subnet-a")] == [0]  # 3 has no address
    assert [e.slot for e in handler.free_slots(pool, plan, "subnet-b")] == [1]


def test_event_pattern_matches_the_documented_launch_event() -> None:
    pattern = handler.launch_event_pattern(ASG)
    event = launch_event("i-0123456789abcdef0", "t")
    assert event["source"] in pattern["source"]
    assert event["detail-type"] in pattern["detail-type"]
    for key, values in pattern["detail"].items():
        assert event["detail"][key] in values


def test_the_construct_can_import_the_helpers_without_boto3() -> None:
    # The construct shares the environment names, event pattern and encoding; it has no boto3.
    script = (
        "import sys\n"
        "sys.modules['botocore'] = sys.modules['botocore.exceptions'] = sys.modules['boto3'] = None\n"
        "from tunnelhub.constructs.slot_lambda import handler\n"
        "print(handler.launch_event_pattern('g')['detail-type'][0])\n"
    )
    root = Path(handler.__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "EC2 Instance-launch Lifecycle Action"


def test_held_slots_come_from_the_pool_only() -> None:
    pool = [
        handler.PoolEip(slot=0, allocation_id="a0", public_ip="x", association_id="eipassoc-0", eni_id="eni-other"),
        handler.PoolEip(slot=1, allocation_id="a1", public_ip="x", association_id="eipassoc-1", eni_id="eni-1"),
        handler.PoolEip(slot=2, allocation_id="a2", public_ip="x"),
    ]
    instance = handler.InstanceView(
        instance_id="i-0123456789abcdef0",
        state="pending",
        subnet_id="subnet-a",
        eni_id="eni-1",
        primary_ip="10.0.1.4",
        private_ips=frozenset({"10.0.1.4", "10.0.1.11", "10.0.1.12"}),
        tags={},
    )
    plan = {
        2: SlotAddress("subnet-a", "10.0.1.11"),
        7: SlotAddress("subnet-a", "10.0.1.12"),  # not in the pool (e.g. its EIP lost its tag)
    }
    assert handler.held_slots(pool, instance, plan) == [1, 2]
    assert handler.held_slots(pool, instance, {}) == [1]
