"""Slot Lambda: give each proxy the hub's Auto Scaling group launches a free, stable slot.

A slot is the stable identity of one proxy: an Elastic IP from the hub's pool (each EIP tagged
POOL_TAG_KEY=HUB and SLOT_TAG_KEY=<n>), associated with the instance's primary private address
(its egress), and, in private-address mode, a fixed secondary private IP in a given subnet (the
NLB's target). EventBridge delivers "EC2 Instance-launch Lifecycle Action" events here
while the instance waits in Pending:Wait; the handler takes a free slot, tags the instance
SLOT_TAG_KEY=<n> and completes the lifecycle action with CONTINUE, or with ABANDON when no slot
is free. Design, error policy and the exact IAM actions: docs/aws-slots.md.

Environment (set by the AwsHub construct):
  HUB                  required  hub name; the value of POOL_TAG_KEY on the pool's EIPs
  ASG_NAME             required  the proxies' Auto Scaling group; events of other groups are ignored
  LIFECYCLE_HOOK_NAME  optional  the launch hook to answer; default: every launch hook of ASG_NAME
  POOL_TAG_KEY         optional  default "tunnelhub:pool"
  SLOT_TAG_KEY         optional  default "tunnelhub:slot" (on the EIPs and on the instances)
  SLOT_PRIVATE_IPS     optional  JSON {"0": {"subnet_id": "subnet-..", "ip": "10.0.1.10"}, ...};
                                 default empty: EIP-only slots

Runs on the Lambda python3.12 runtime with the runtime's boto3 and nothing else. Everything
above the "AWS side" marker imports only the standard library, so the construct can share it
(environment names, event pattern, SLOT_PRIVATE_IPS encoding, slot order) without boto3.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

try:
    from botocore.exceptions import ClientError
except ModuleNotFoundError:  # the construct imports the pure helpers where boto3 is absent

    class ClientError(Exception):  # type: ignore[no-redef]
        """Stand-in so this module imports without botocore; nothing here raises it."""

        response: ClassVar[dict[str, Any]] = {}
        operation_name: ClassVar[str] = ""


ENV_HUB = "HUB"
ENV_ASG_NAME = "ASG_NAME"
ENV_HOOK_NAME = "LIFECYCLE_HOOK_NAME"
ENV_POOL_TAG_KEY = "POOL_TAG_KEY"
ENV_SLOT_TAG_KEY = "SLOT_TAG_KEY"
ENV_SLOT_PRIVATE_IPS = "SLOT_PRIVATE_IPS"

DEFAULT_POOL_TAG_KEY = "tunnelhub:pool"
DEFAULT_SLOT_TAG_KEY = "tunnelhub:slot"

EVENT_SOURCE = "aws.autoscaling"
LAUNCH_DETAIL_TYPE = "EC2 Instance-launch Lifecycle Action"
LAUNCH_TRANSITION = "autoscaling:EC2_INSTANCE_LAUNCHING"
ASG_INSTANCE_TAG = "aws:autoscaling:groupName"  # set by Auto Scaling on every instance it launches

MAX_SLOTS = 1000
_SLOT_RE = re.compile(r"0|[1-9][0-9]{0,2}")
_INSTANCE_ID_RE = re.compile(r"i-[0-9a-f]{8,17}")
_SUBNET_ID_RE = re.compile(r"subnet-[0-9a-f]{8,17}")
_PRIVATE_IPS_EXAMPLE = '{"0": {"subnet_id": "subnet-0abc12345def67890", "ip": "10.0.1.10"}}'

# A launch the EC2 API does not show yet (it is eventually consistent) is looked up again after
# these pauses, then the error goes to Lambda's own retries.
INSTANCE_LOOKUP_PAUSES_S = (1.0, 2.0, 4.0)


class ConfigError(ValueError):
    """The function's environment is wrong; the message names the variable and the fix."""


class MalformedEvent(ValueError):
    """The event is not a usable launch lifecycle action; the message says which field."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SlotAddress:
    """The fixed private address of one slot: a secondary IP in one subnet (one AZ)."""

    subnet_id: str
    ip: str


@dataclass(frozen=True, kw_only=True)
class SlotConfig:
    """What the handler needs to know about its hub."""

    hub: str
    asg_name: str
    hook_name: str = ""
    """The launch hook to answer; default "": every launch hook of the group."""
    pool_tag_key: str = DEFAULT_POOL_TAG_KEY
    slot_tag_key: str = DEFAULT_SLOT_TAG_KEY
    private_ips: Mapping[int, SlotAddress] = field(default_factory=dict)
    """Slot number -> private address; default empty: EIP-only slots."""

    @property
    def private_mode(self) -> bool:
        return bool(self.private_ips)


def load_config(environ: Mapping[str, str]) -> SlotConfig:
    """Read and check the function's environment (see the module docstring)."""
    hub = _required(environ, ENV_HUB, "the hub name (the value of the pool tag on its EIPs)")
    asg_name = _required(environ, ENV_ASG_NAME, "the name of the proxies' Auto Scaling group")
    pool_tag_key = _tag_key(environ, ENV_POOL_TAG_KEY, DEFAULT_POOL_TAG_KEY)
    slot_tag_key = _tag_key(environ, ENV_SLOT_TAG_KEY, DEFAULT_SLOT_TAG_KEY)
    if pool_tag_key == slot_tag_key:
        raise ConfigError(
            f"{ENV_POOL_TAG_KEY} and {ENV_SLOT_TAG_KEY} are both {pool_tag_key!r}: "
            "give them different keys (defaults: tunnelhub:pool, tunnelhub:slot)"
        )
    return SlotConfig(
        hub=hub,
        asg_name=asg_name,
        hook_name=environ.get(ENV_HOOK_NAME, "").strip(),
        pool_tag_key=pool_tag_key,
        slot_tag_key=slot_tag_key,
        private_ips=parse_slot_private_ips(environ.get(ENV_SLOT_PRIVATE_IPS, "")),
    )


def _required(environ: Mapping[str, str], name: str, what: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is not set: set it to {what}")
    return value


def _tag_key(environ: Mapping[str, str], name: str, default: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        return default
    if len(value) > 128 or value.lower().startswith("aws:"):
        raise ConfigError(
            f"{name} is {value!r}: a tag key has 1-128 characters and cannot start with 'aws:'; "
            f"leave it unset for {default!r}"
        )
    return value


def parse_slot_private_ips(text: str) -> dict[int, SlotAddress]:
    """Decode SLOT_PRIVATE_IPS; empty text means EIP-only slots (an empty mapping)."""
    if not text.strip():
        return {}
    fix = f"expected e.g. {_PRIVATE_IPS_EXAMPLE}, or empty for EIP-only slots"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{ENV_SLOT_PRIVATE_IPS} is not JSON ({exc.msg}); {fix}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{ENV_SLOT_PRIVATE_IPS} must be a non-empty JSON object; {fix}")
    slots: dict[int, SlotAddress] = {}
    seen_ips: dict[str, int] = {}
    for key, value in raw.items():
        where = f"{ENV_SLOT_PRIVATE_IPS}[{key!r}]"
        if not _SLOT_RE.fullmatch(key):
            raise ConfigError(f"{where}: the key must be a slot number 0-{MAX_SLOTS - 1}; {fix}")
        if not isinstance(value, dict) or set(value) != {"subnet_id", "ip"}:
            raise ConfigError(f"{where}: needs exactly 'subnet_id' and 'ip'; {fix}")
        subnet_id, ip = value["subnet_id"], value["ip"]
        if not isinstance(subnet_id, str) or not _SUBNET_ID_RE.fullmatch(subnet_id):
            raise ConfigError(f"{where}: subnet_id {subnet_id!r} is not a subnet id; {fix}")
        try:
            ip = str(ipaddress.IPv4Address(ip))
        except (ipaddress.AddressValueError, ValueError, TypeError):
            raise ConfigError(f"{where}: ip {ip!r} is not an IPv4 address; {fix}") from None
        if ip in seen_ips:
            raise ConfigError(f"{where}: ip {ip} is also slot {seen_ips[ip]}'s; give each slot its own")
        seen_ips[ip] = int(key)
        slots[int(key)] = SlotAddress(subnet_id=subnet_id, ip=ip)
    return slots


def encode_slot_private_ips(slots: Mapping[int, SlotAddress]) -> str:
    """The SLOT_PRIVATE_IPS value for `slots` (the inverse of parse_slot_private_ips)."""
    return json.dumps(
        {str(n): {"subnet_id": a.subnet_id, "ip": a.ip} for n, a in sorted(slots.items())},
        separators=(",", ":"),
    )


def launch_event_pattern(asg_name: str) -> dict[str, Any]:
    """The EventBridge pattern that routes this group's launch lifecycle actions here."""
    return {
        "source": [EVENT_SOURCE],
        "detail-type": [LAUNCH_DETAIL_TYPE],
        "detail": {"AutoScalingGroupName": [asg_name], "LifecycleTransition": [LAUNCH_TRANSITION]},
    }


# --------------------------------------------------------------------------- slots (pure)


@dataclass(frozen=True)
class PoolEip:
    """One EIP of the pool as DescribeAddresses shows it ("" = not associated)."""

    slot: int
    allocation_id: str
    public_ip: str
    association_id: str = ""
    instance_id: str = ""
    eni_id: str = ""
    private_ip: str = ""


def parse_slot_number(value: object) -> int | None:
    """A slot tag value as a number ("0".."999"), or None when it is not one."""
    if isinstance(value, str) and _SLOT_RE.fullmatch(value):
        return int(value)
    return None


def order_pool(addresses: Iterable[Mapping[str, Any]], *, slot_tag_key: str) -> tuple[list[PoolEip], list[str]]:
    """The pool's EIPs in slot order (numeric: 2 before 10) and a note per EIP left out.

    An EIP without a valid slot tag is left out, and so are all EIPs that share a slot number:
    a slot must name exactly one address.
    """
    by_slot: dict[int, list[PoolEip]] = {}
    notes: list[str] = []
    for address in addresses:
        tags = {t["Key"]: t["Value"] for t in address.get("Tags", [])}
        allocation_id = address.get("AllocationId", "")
        slot = parse_slot_number(tags.get(slot_tag_key))
        if slot is None:
            notes.append(f"{allocation_id}: {slot_tag_key}={tags.get(slot_tag_key)!r} is not a slot number")
            continue
        by_slot.setdefault(slot, []).append(
            PoolEip(
                slot=slot,
                allocation_id=allocation_id,
                public_ip=address.get("PublicIp", ""),
                association_id=address.get("AssociationId") or "",
                instance_id=address.get("InstanceId") or "",
                eni_id=address.get("NetworkInterfaceId") or "",
                private_ip=address.get("PrivateIpAddress") or "",
            )
        )
    pool = []
    for slot in sorted(by_slot):
        if len(by_slot[slot]) > 1:
            ids = ", ".join(e.allocation_id for e in by_slot[slot])
            notes.append(f"slot {slot} is tagged on several EIPs ({ids}); none of them is used")
            continue
        pool.append(by_slot[slot][0])
    return pool, notes


def free_slots(pool: Iterable[PoolEip], private_ips: Mapping[int, SlotAddress], subnet_id: str) -> list[PoolEip]:
    """The slots an instance in `subnet_id` may take, in slot order.

    A slot is free when its EIP has no association; with private addresses it must also have
    an address in the instance's own subnet (a subnet lives in one AZ).
    """
    return [
        eip
        for eip in pool
        if not eip.association_id
        and (not private_ips or (eip.slot in private_ips and private_ips[eip.slot].subnet_id == subnet_id))
    ]


@dataclass(frozen=True)
class InstanceView:
    """What the handler needs from DescribeInstances."""

    instance_id: str
    state: str
    subnet_id: str
    eni_id: str
    primary_ip: str
    private_ips: frozenset[str]
    tags: Mapping[str, str]


def instance_view(described: Mapping[str, Any]) -> InstanceView:
    """Reduce one DescribeInstances instance to an InstanceView (primary ENI = device 0)."""
    enis = described.get("NetworkInterfaces", [])
    primary = next((n for n in enis if n.get("Attachment", {}).get("DeviceIndex") == 0), None)
    if primary is None and enis:
        primary = enis[0]
    primary = primary or {}
    return InstanceView(
        instance_id=described["InstanceId"],
        state=described.get("State", {}).get("Name", ""),
        subnet_id=described.get("SubnetId", ""),
        eni_id=primary.get("NetworkInterfaceId", ""),
        primary_ip=primary.get("PrivateIpAddress", described.get("PrivateIpAddress", "")),
        private_ips=frozenset(p["PrivateIpAddress"] for p in primary.get("PrivateIpAddresses", [])),
        tags={t["Key"]: t["Value"] for t in described.get("Tags", [])},
    )


def held_slots(pool: Iterable[PoolEip], instance: InstanceView, private_ips: Mapping[int, SlotAddress]) -> list[int]:
    """Slots of `pool` the instance holds: their EIP is on it, or (private mode) their IP is on its ENI."""
    held = set()
    for eip in pool:
        on_instance = eip.instance_id and eip.instance_id == instance.instance_id
        on_eni = eip.eni_id and eip.eni_id == instance.eni_id
        address = private_ips.get(eip.slot)
        ip_on_eni = address is not None and address.ip in instance.private_ips and address.ip != instance.primary_ip
        if on_instance or on_eni or ip_on_eni:
            held.add(eip.slot)
    return sorted(held)


@dataclass(frozen=True)
class LaunchAction:
    """The fields of an "EC2 Instance-launch Lifecycle Action" event the handler uses."""

    asg_name: str
    hook_name: str
    instance_id: str
    token: str


def parse_launch_event(event: object) -> LaunchAction | str:
    """The launch action, or the transition's name when the event is another transition.

    Raises MalformedEvent naming the field when the event cannot be a lifecycle action.
    """
    if not isinstance(event, Mapping):
        raise MalformedEvent(f"the event is a {type(event).__name__}, not a JSON object")
    detail = event.get("detail")
    if not isinstance(detail, Mapping):
        raise MalformedEvent("the event has no 'detail' object")
    transition = detail.get("LifecycleTransition")
    if not isinstance(transition, str) or not transition:
        raise MalformedEvent("detail.LifecycleTransition is missing")
    if transition != LAUNCH_TRANSITION:
        return transition
    values = {}
    for name in ("AutoScalingGroupName", "LifecycleHookName", "EC2InstanceId", "LifecycleActionToken"):
        value = detail.get(name)
        if not isinstance(value, str) or not value:
            raise MalformedEvent(f"detail.{name} is missing or empty")
        values[name] = value
    if not _INSTANCE_ID_RE.fullmatch(values["EC2InstanceId"]):
        raise MalformedEvent(f"detail.EC2InstanceId {values['EC2InstanceId']!r} is not an instance id")
    return LaunchAction(
        asg_name=values["AutoScalingGroupName"],
        hook_name=values["LifecycleHookName"],
        instance_id=values["EC2InstanceId"],
        token=values["LifecycleActionToken"],
    )


# --------------------------------------------------------------------------- AWS side

# Another launch won the resource: try the next slot. AssociateAddress answers
# Resource.AlreadyAssociated; an in-use private IP is InvalidIPAddress.InUse (some EC2 paths
# phrase it as InvalidParameterValue "... is in use" / "... already assigned").
_CONFLICT_CODES = frozenset({"Resource.AlreadyAssociated", "InvalidIPAddress.InUse", "PrivateIpAddressInUse"})
# Worth Lambda's retry: throttling, server side, and the EC2 API not showing a fresh launch yet.
_RETRYABLE_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "RequestTimeout",
        "RequestTimeoutException",
        "InvalidInstanceID.NotFound",
        "InvalidNetworkInterfaceID.NotFound",
    }
)
_GONE_CODES = frozenset({"InvalidAssociationID.NotFound"})


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _error_message(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Message", ""))


def is_conflict(err: ClientError) -> bool:
    """The resource is another launch's: the slot is taken, try the next one."""
    code = _error_code(err)
    if code in _CONFLICT_CODES:
        return True
    message = _error_message(err).lower()
    return code == "InvalidParameterValue" and ("in use" in message or "already assigned" in message)


def is_retryable(err: ClientError) -> bool:
    """Retrying later can help (throttling, 5xx, not visible yet); anything else is permanent."""
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return _error_code(err) in _RETRYABLE_CODES or (isinstance(status, int) and status >= 500)


def _no_active_action(err: ClientError) -> bool:
    return _error_code(err) == "ValidationError" and "no active lifecycle action" in _error_message(err).lower()


class SlotTaken(Exception):
    """A slot's EIP or private IP belongs to another instance."""

    def __init__(self, slot: int, code: str):
        super().__init__(f"slot {slot} is taken ({code})")
        self.slot = slot
        self.code = code


class SlotUnsettled(Exception):
    """The slot this instance already holds looks taken by another: retry when EC2 agrees."""


def emit(record: Mapping[str, Any]) -> None:
    """Write one JSON log line (CloudWatch Logs Insights discovers its fields)."""
    sys.stdout.write(json.dumps(record, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


class SlotAssigner:
    """Answers launch lifecycle actions of one hub's Auto Scaling group (see module docstring)."""

    def __init__(
        self,
        config: SlotConfig,
        *,
        ec2: Any,
        autoscaling: Any,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[Mapping[str, Any]], None] = emit,
    ):
        self.config = config
        self.ec2 = ec2
        self.autoscaling = autoscaling
        self._sleep = sleep
        self._log = log

    # -- entry

    def handle(self, event: object, *, request_id: str = "") -> dict[str, Any]:
        """Decide for one event; returns the decision record it also logs."""
        cfg = self.config
        base: dict[str, Any] = {"hub": cfg.hub, "asg": cfg.asg_name, "request_id": request_id}
        try:
            action = parse_launch_event(event)
        except MalformedEvent as exc:
            return self._decide("WARNING", "ignored", base, reason="malformed_event", detail=str(exc))
        if isinstance(action, str):
            return self._decide("INFO", "ignored", base, reason="other_transition", transition=action)
        base["instance_id"] = action.instance_id
        if action.asg_name != cfg.asg_name:
            return self._decide("INFO", "ignored", base, reason="other_group", event_asg=action.asg_name)
        if cfg.hook_name and action.hook_name != cfg.hook_name:
            return self._decide("INFO", "ignored", base, reason="other_hook", event_hook=action.hook_name)
        try:
            return self._launch(action, base)
        except SlotUnsettled as exc:
            self._decide("WARNING", "retry", base, reason="held_slot_unsettled", detail=str(exc))
            raise
        except ClientError as err:
            failure = {
                "reason": "aws_error",
                "code": _error_code(err),
                "operation": getattr(err, "operation_name", ""),
                "message": _error_message(err),
            }
            if is_retryable(err):
                self._decide("WARNING", "retry", base, **failure)
                raise
            try:
                lifecycle = self._complete(action, "ABANDON")
            except ClientError as complete_err:
                self._decide(
                    "ERROR",
                    "retry",
                    base,
                    **failure,
                    abandon_code=_error_code(complete_err),
                    abandon_message=_error_message(complete_err),
                )
                raise
            return self._decide("ERROR", "abandoned", base, lifecycle=lifecycle, **failure)

    # -- the launch

    def _launch(self, action: LaunchAction, base: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        instance = self._describe_instance(action.instance_id)
        base["subnet_id"] = instance.subnet_id
        group = instance.tags.get(ASG_INSTANCE_TAG, "")
        if group != cfg.asg_name:
            return self._decide("ERROR", "ignored", base, reason="instance_not_in_group", instance_asg=group)
        if instance.state not in ("pending", "running"):
            return self._decide("WARNING", "ignored", base, reason="instance_not_running", state=instance.state)

        pool, notes = self._read_pool()
        if notes:
            base["pool_notes"] = notes
        by_slot = {eip.slot: eip for eip in pool}

        held = held_slots(pool, instance, cfg.private_ips)
        tagged = parse_slot_number(instance.tags.get(cfg.slot_tag_key))
        if held or (tagged is not None and tagged in by_slot):
            keep = held[0] if held else tagged
            released = [self._release(by_slot[s], instance) for s in held[1:]]
            try:
                eip = self._take(by_slot[keep], instance, rollback=False)
            except SlotTaken as exc:
                raise SlotUnsettled(f"this instance holds slot {keep} but {exc}") from None
            self._tag(instance, keep)
            lifecycle = self._complete(action, "CONTINUE")
            return self._decide(
                "INFO", "already_assigned", base, lifecycle=lifecycle, released=released, **self._slot_fields(eip)
            )

        candidates = free_slots(pool, cfg.private_ips, instance.subnet_id)
        attempts = []
        for candidate in candidates:
            try:
                eip = self._take(candidate, instance, rollback=True)
            except SlotTaken as exc:
                attempts.append({"slot": exc.slot, "code": exc.code})
                self._decide("INFO", "slot_taken", base, slot=exc.slot, code=exc.code)
                continue
            kept, released = self._settle(eip, instance)
            self._tag(instance, kept.slot)
            lifecycle = self._complete(action, "CONTINUE")
            return self._decide(
                "INFO",
                "assigned",
                base,
                lifecycle=lifecycle,
                attempts=attempts,
                released=released,
                **self._slot_fields(kept),
            )

        lifecycle = self._complete(action, "ABANDON")
        return self._decide(
            "WARNING",
            "abandoned",
            base,
            reason="no_free_slot",
            lifecycle=lifecycle,
            pool_size=len(pool),
            free_in_subnet=len(candidates),
            attempts=attempts,
        )

    def _take(self, eip: PoolEip, instance: InstanceView, *, rollback: bool) -> PoolEip:
        """Make `eip`'s slot this instance's: the slot's private IP on its ENI (what the NLB's
        route target groups register), then the EIP on the ENI's **primary** address.

        The EIP goes on the primary address because that is the address the proxy egresses from:
        an internet gateway translates only a private address that has an EIP ("a one-to-one NAT
        ... for instances that have been assigned public IPv4 addresses", VPC user guide, Internet
        gateways), and the OS picks the primary address as the source (the secondary is a /32 the
        proxy adds: tunnelhub_aws_slot.configure_address). IMDS ``public-ipv4`` also shows only the
        primary address's public IP, which the proxy waits for. An EIP on the secondary address
        left every proxy without egress (issue 13, defect 1).

        Raises SlotTaken when another instance holds either; with `rollback`, a private IP
        assigned by this call is given back first.
        """
        address = self.config.private_ips.get(eip.slot)
        if self.config.private_mode and address is None:
            raise SlotTaken(eip.slot, "no private address for this slot")
        mine = bool(eip.association_id) and (eip.eni_id == instance.eni_id or eip.instance_id == instance.instance_id)
        if eip.association_id and not mine:
            raise SlotTaken(eip.slot, "Resource.AlreadyAssociated")
        target_ip = instance.primary_ip
        assigned_here = False
        if address and address.ip not in instance.private_ips:
            try:
                self.ec2.assign_private_ip_addresses(
                    NetworkInterfaceId=instance.eni_id, PrivateIpAddresses=[address.ip], AllowReassignment=False
                )
            except ClientError as err:
                if is_conflict(err):
                    raise SlotTaken(eip.slot, _error_code(err)) from None
                raise
            assigned_here = True
        if mine:
            return eip
        try:
            response = self.ec2.associate_address(
                AllocationId=eip.allocation_id,
                NetworkInterfaceId=instance.eni_id,
                PrivateIpAddress=target_ip,
                AllowReassociation=False,
            )
        except ClientError as err:
            if not is_conflict(err):
                raise
            if rollback and assigned_here:
                self.ec2.unassign_private_ip_addresses(
                    NetworkInterfaceId=instance.eni_id, PrivateIpAddresses=[address.ip]
                )
            raise SlotTaken(eip.slot, _error_code(err)) from None
        return dataclasses.replace(
            eip,
            association_id=response.get("AssociationId", ""),
            instance_id=instance.instance_id,
            eni_id=instance.eni_id,
            private_ip=target_ip,
        )

    def _settle(self, claimed: PoolEip, instance: InstanceView) -> tuple[PoolEip, list[int]]:
        """After a claim: if a twin delivery of the same event claimed another slot for this
        instance meanwhile, keep the lowest slot and release the others (both twins agree)."""
        pool, _ = self._read_pool()
        fresh = self._describe_instance(instance.instance_id)
        by_slot = {eip.slot: eip for eip in pool}
        by_slot[claimed.slot] = claimed  # our own association may not be visible yet
        held = set(held_slots(pool, fresh, self.config.private_ips)) | {claimed.slot}
        keep = min(held)
        released = [self._release(by_slot[s], fresh) for s in sorted(held - {keep})]
        if not released:
            return by_slot[keep], released
        # Every slot's EIP goes on the one primary address, and EC2 disassociates the EIP an
        # address already has when another is associated with it ("If you associate an Elastic
        # IP address with an instance that has an existing Elastic IP address, the existing
        # address is disassociated", EC2 User Guide, Elastic IP addresses): the twin's claim may
        # have pushed the kept slot's EIP off. Put it back. DescribeAddresses is eventually
        # consistent, so a read right after the twin's association may still show the kept EIP
        # here: associate it again without trusting that read. With a private address, the slot's
        # IP on this ENI (AssignPrivateIpAddresses with AllowReassignment=False) is the lock that
        # makes the EIP this instance's, so AllowReassociation=True cannot take another launch's.
        address = self.config.private_ips.get(keep)
        current = self._describe_instance(instance.instance_id)
        if address is not None and address.ip in current.private_ips:
            response = self.ec2.associate_address(
                AllocationId=by_slot[keep].allocation_id,
                NetworkInterfaceId=current.eni_id,
                PrivateIpAddress=current.primary_ip,
                AllowReassociation=True,
            )
            kept = dataclasses.replace(by_slot[keep], association_id=response.get("AssociationId", ""),
                                       instance_id=current.instance_id, eni_id=current.eni_id,
                                       private_ip=current.primary_ip)
            return kept, released
        pool, _ = self._read_pool()
        fresh_eip = {eip.slot: eip for eip in pool}.get(keep, by_slot[keep])
        try:
            kept = self._take(fresh_eip, current, rollback=False)
        except SlotTaken as exc:
            raise SlotUnsettled(f"this instance keeps slot {keep} but {exc}") from None
        return kept, released

    def _release(self, eip: PoolEip, instance: InstanceView) -> int:
        """Give back one extra slot this instance holds (its EIP and its private IP)."""
        if eip.association_id:
            try:
                self.ec2.disassociate_address(AssociationId=eip.association_id)
            except ClientError as err:
                if _error_code(err) not in _GONE_CODES:
                    raise
        address = self.config.private_ips.get(eip.slot)
        if address and address.ip in instance.private_ips | {eip.private_ip}:
            self.ec2.unassign_private_ip_addresses(NetworkInterfaceId=instance.eni_id, PrivateIpAddresses=[address.ip])
        return eip.slot

    def _tag(self, instance: InstanceView, slot: int) -> None:
        if instance.tags.get(self.config.slot_tag_key) == str(slot):
            return
        self.ec2.create_tags(
            Resources=[instance.instance_id], Tags=[{"Key": self.config.slot_tag_key, "Value": str(slot)}]
        )

    def _complete(self, action: LaunchAction, result: str) -> str:
        """Complete the lifecycle action; "already_completed" when it is no longer active."""
        try:
            self.autoscaling.complete_lifecycle_action(
                AutoScalingGroupName=action.asg_name,
                LifecycleHookName=action.hook_name,
                LifecycleActionToken=action.token,
                InstanceId=action.instance_id,
                LifecycleActionResult=result,
            )
        except ClientError as err:
            if _no_active_action(err):
                return "already_completed"
            raise
        return f"completed:{result}"

    # -- reads

    def _describe_instance(self, instance_id: str) -> InstanceView:
        for pause in (*INSTANCE_LOOKUP_PAUSES_S, None):
            try:
                reservations = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
            except ClientError as err:
                if _error_code(err) != "InvalidInstanceID.NotFound" or pause is None:
                    raise
                self._sleep(pause)
                continue
            instances = [i for r in reservations for i in r.get("Instances", [])]
            if instances:
                return instance_view(instances[0])
            if pause is None:
                break
            self._sleep(pause)
        raise ClientError(
            {"Error": {"Code": "InvalidInstanceID.NotFound", "Message": f"{instance_id} is not visible yet"}},
            "DescribeInstances",
        )

    def _read_pool(self) -> tuple[list[PoolEip], list[str]]:
        cfg = self.config
        addresses = self.ec2.describe_addresses(Filters=[{"Name": f"tag:{cfg.pool_tag_key}", "Values": [cfg.hub]}])[
            "Addresses"
        ]
        return order_pool(addresses, slot_tag_key=cfg.slot_tag_key)

    # -- logging

    def _slot_fields(self, eip: PoolEip) -> dict[str, Any]:
        """``private_ip``: the slot's fixed address (the NLB target) when it has one;
        ``eip_private_ip``: the address the EIP is on (the primary, the proxy's egress)."""
        address = self.config.private_ips.get(eip.slot)
        return {
            "slot": eip.slot,
            "public_ip": eip.public_ip,
            "allocation_id": eip.allocation_id,
            "private_ip": address.ip if address else eip.private_ip,
            "eip_private_ip": eip.private_ip,
        }

    def _decide(self, level: str, decision: str, base: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
        record = {"level": level, "decision": decision, **base, **fields}
        self._log(record)
        return record


# --------------------------------------------------------------------------- Lambda entry

_assigner: SlotAssigner | None = None


def aws_clients() -> tuple[Any, Any]:
    """EC2 and Auto Scaling clients with bounded timeouts and the SDK's standard retries."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=15)
    return boto3.client("ec2", config=config), boto3.client("autoscaling", config=config)


def lambda_handler(event: object, context: object) -> dict[str, Any]:
    """Lambda entry point (handler "handler.lambda_handler")."""
    global _assigner
    if _assigner is None:
        try:
            config = load_config(os.environ)
        except ConfigError as exc:
            emit({"level": "ERROR", "decision": "config_error", "message": str(exc)})
            raise
        ec2, autoscaling = aws_clients()
        _assigner = SlotAssigner(config, ec2=ec2, autoscaling=autoscaling)
    return _assigner.handle(event, request_id=getattr(context, "aws_request_id", ""))
