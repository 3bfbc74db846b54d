"""What a new synthesis changes on a running hub, before anyone runs ``terraform plan``.

``tunnelhub synth`` compares each stack it wrote with the stack the output directory held
before and prints, per hub (docs/live-config.md, "What synth tells you"):

- whether the **live configuration** changes: the hub configuration document's version, old ->
  new, and what moved (routes added, removed, changed; tunnel keys added, removed; peers). The
  proxies' reconcilers apply it in place;
- which **proxies** would be replaced or restarted, and why (the attributes), and how many
  resources would be created, updated, replaced and deleted.

The resource diff is behind a small interface, :data:`StackDiffer` (``before``, ``after`` ->
:class:`ResourceChange` list), so a fuller planner (a ForceNew table of every resource type)
can take the place of :func:`diff_stacks`, whose table covers what decides a proxy's fate:
``azurerm_linux_virtual_machine`` (ForceNew and power-off attributes read from
terraform-provider-azurerm v4.55.0, internal/services/compute/linux_virtual_machine_resource.go)
and ``aws_launch_template`` (every change but its tags is a new version, and the Auto Scaling
group, which follows ``latest_version``, then starts an instance refresh: terraform-provider-aws
docs, aws_autoscaling_group ``instance_refresh``). Other resources are reported as updated when
their body changes, without judging replacement.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunnelhub.spec import DEFAULT_TUNNEL_HOST
from tunnelhub.userdata.layout import AWS_DOCUMENT_KEY

AZURE_VM = "azurerm_linux_virtual_machine"
AWS_LAUNCH_TEMPLATE = "aws_launch_template"
IGNORED_KEYS = {"//", "depends_on", "lifecycle"}
"""Keys Terraform plans no action for: cdktf metadata, ordering, and the lifecycle meta-argument
(turning ``prevent_destroy`` off with ``protect: false`` changes no resource)."""

FORCE_NEW: dict[str, frozenset[str]] = {
    # linux_virtual_machine_resource.go@v4.55.0: ForceNew: true (admin_ssh_key through
    # SSHKeysSchema(isVirtualMachine=true); zone through ZoneSingleOptionalForceNew; the image).
    AZURE_VM: frozenset({
        "name", "resource_group_name", "location", "admin_username", "admin_password", "admin_ssh_key",
        "availability_set_id", "computer_name", "custom_data", "disable_password_authentication", "edge_zone",
        "eviction_policy", "os_managed_disk_id", "platform_fault_domain", "priority", "provision_vm_agent",
        "secure_boot_enabled", "source_image_id", "source_image_reference", "vtpm_enabled", "zone",
    }),
    # Each route's own resources (issue 13's change-impact test, tests/synth/test_change_impact.py):
    # internal/services/loadbalancer/lb_rule_resource.go and lb_probe_resource.go@v4.55.0 (ForceNew:
    # name, loadbalancer_id; every other attribute is updated in place).
    "azurerm_lb_rule": frozenset({"name", "loadbalancer_id"}),
    "azurerm_lb_probe": frozenset({"name", "loadbalancer_id"}),
    # terraform-provider-aws internal/service/elbv2/target_group.go and target_group_attachment.go
    # (read from the search index's stored copy, not at the v6.25.0 tag, which could not be fetched
    # here: confirm there when a plan disagrees): a target group's name, name_prefix, port, protocol, protocol_version,
    # target_type and vpc_id are ForceNew, its health_check is not; an attachment has no update at all.
    "aws_lb_target_group": frozenset({"name", "name_prefix", "port", "protocol", "protocol_version", "target_type",
                                      "vpc_id"}),
    "aws_lb_target_group_attachment": frozenset({"availability_zone", "target_group_arn", "target_id", "port"}),
    # Each route's alerts (issue 16): internal/services/monitor/monitor_metric_alert_resource.go@v4.55.0
    # (ForceNew: name; resource_group_name through commonschema.ResourceGroupName(); scopes, criteria,
    # window_size, frequency are updated in place); terraform-provider-aws internal/service/cloudwatch/
    # metric_alarm.go (the search index's stored copy, not the v6.25.0 tag): alarm_name alone is ForceNew,
    # the update is one PutMetricAlarm of the whole alarm.
    "azurerm_monitor_metric_alert": frozenset({"name", "resource_group_name"}),
    "aws_cloudwatch_metric_alarm": frozenset({"alarm_name"}),
    # terraform-provider-databricks mws/resource_mws_ncc_private_endpoint_rule.go@v1.106.0 and @v1.118.0: domain_names is
    # in the update mask; these force a new rule (a new endpoint to approve).
    "databricks_mws_ncc_private_endpoint_rule": frozenset({"network_connectivity_config_id", "endpoint_service",
                                                           "group_id", "resource_id"}),
}
FORCE_NEW_NESTED: dict[str, dict[str, frozenset[str]]] = {
    # internal/services/compute/virtual_machine.go@v4.55.0, virtualMachineOSDiskSchema: the disk's name,
    # storage_account_type and diff_disk_settings are ForceNew, its caching is not.
    AZURE_VM: {"os_disk": frozenset({"name", "storage_account_type", "diff_disk_settings"})},
}
POWER_OFF: dict[str, frozenset[str]] = {
    # The same file's update: these set shouldShutDown / shouldDeallocate (a size change powers the VM
    # off, resizes it and starts it again; Terraform does so for every proxy at once).
    AZURE_VM: frozenset({"size", "encryption_at_host_enabled", "additional_capabilities",
                         "proximity_placement_group_id", "dedicated_host_id", "dedicated_host_group_id"}),
}
NEW_VERSION_EXEMPT = frozenset({"tags", "tags_all", "name"})
"""aws_launch_template: what changes the template without a new version."""


@dataclass(frozen=True)
class ResourceChange:
    """One resource's planned action, judged from two synthesized stacks."""

    address: str
    """``<type>.<name>`` as Terraform addresses it in the stack."""
    action: str
    """``create``, ``update``, ``replace``, ``delete``; ``restart`` (updated in place with a power-off);
    ``new-version`` (an AWS launch template: the group's instance refresh replaces its instances)."""
    attributes: tuple[str, ...] = ()
    """The changed top-level attributes (for a replace: those that force it)."""


StackDiffer = Callable[[dict, dict], list[ResourceChange]]
"""``(stack before, stack after) -> changes``: :func:`diff_stacks`, or a fuller planner."""


def resources(stack: dict) -> dict[str, dict]:
    return {f"{rtype}.{name}": body for rtype, items in stack.get("resource", {}).items()
            for name, body in items.items()}


def diff_stacks(before: dict, after: dict) -> list[ResourceChange]:
    """The changes from ``before`` to ``after`` (see the module docstring for what is judged)."""
    old, new = resources(before), resources(after)
    changes = [ResourceChange(a, "create") for a in sorted(set(new) - set(old))]
    changes += [ResourceChange(a, "delete") for a in sorted(set(old) - set(new))]
    for address in sorted(set(old) & set(new)):
        a, b = old[address], new[address]
        changed = tuple(sorted(k for k in (set(a) | set(b)) - IGNORED_KEYS if a.get(k) != b.get(k)))
        if not changed:
            continue
        rtype = address.split(".", 1)[0]
        forcing = tuple(k for k in changed if k in FORCE_NEW.get(rtype, ()) or _nested_forces(rtype, k, a.get(k), b.get(k)))
        if forcing:
            changes.append(ResourceChange(address, "replace", forcing))
        elif rtype == AWS_LAUNCH_TEMPLATE and set(changed) - NEW_VERSION_EXEMPT:
            changes.append(ResourceChange(address, "new-version", tuple(k for k in changed if k not in NEW_VERSION_EXEMPT)))
        elif any(k in POWER_OFF.get(rtype, ()) for k in changed):
            changes.append(ResourceChange(address, "restart", tuple(k for k in changed if k in POWER_OFF[rtype])))
        else:
            changes.append(ResourceChange(address, "update", changed))
    return changes


def _nested_forces(rtype: str, key: str, old: Any, new: Any) -> bool:
    inner = FORCE_NEW_NESTED.get(rtype, {}).get(key)
    if inner is None:
        return False
    if not isinstance(old, dict) or not isinstance(new, dict):
        return True
    return any(old.get(k) != new.get(k) for k in inner)


# ---------------------------------------------------------------------------------------------
# The live configuration
# ---------------------------------------------------------------------------------------------


def document_of(stack: dict) -> dict | None:
    """The hub configuration document a synthesized stack delivers (Azure: the VMs' ``user_data``;
    AWS: the files bucket's document object), or None."""
    for body in stack.get("resource", {}).get(AZURE_VM, {}).values():
        raw = body.get("user_data")
        if isinstance(raw, str):
            try:
                data = base64.b64decode(raw, validate=True)
                return json.loads(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
            except (binascii.Error, ValueError, OSError):
                return None
    for body in stack.get("resource", {}).get("aws_s3_object", {}).values():
        if body.get("key") == AWS_DOCUMENT_KEY and isinstance(body.get("content"), str):
            try:
                return json.loads(body["content"])
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class LiveConfigChange:
    old_version: str | None
    new_version: str | None
    routes_added: tuple[str, ...] = ()
    routes_removed: tuple[str, ...] = ()
    routes_changed: tuple[str, ...] = ()
    keys_added: tuple[str, ...] = ()
    keys_removed: tuple[str, ...] = ()
    peers: tuple[int, int] | None = None

    @property
    def changed(self) -> bool:
        return self.old_version != self.new_version

    def describe(self) -> str:
        parts = []
        for what, items in (("route added", self.routes_added), ("route removed", self.routes_removed),
                            ("route changed", self.routes_changed), ("key added", self.keys_added),
                            ("key removed", self.keys_removed)):
            if items:
                parts.append(f"{what}: {', '.join(items)}")
        if self.peers is not None:
            parts.append(f"proxies: {self.peers[0]} -> {self.peers[1]}")
        return "; ".join(parts) or "settings of the routes (probes, limits, timeouts, source ranges)"


def _key_label(key: dict) -> str:
    """``<fingerprint> (<comment>)``, and ``of tunnel host <name>`` on a hub that names its hosts."""
    label = f"{key['fingerprint']} ({key['comment']})" if key.get("comment") else key["fingerprint"]
    host = key.get("host")
    return f"{label} of tunnel host {host}" if host and host != DEFAULT_TUNNEL_HOST else label


def live_config_change(before: dict | None, after: dict | None) -> LiveConfigChange | None:
    """The difference of two documents (None when neither stack has one)."""
    if before is None and after is None:
        return None
    old = (before or {}).get("payload", {})
    new = (after or {}).get("payload", {})
    old_routes = {r["name"]: r for r in old.get("routes", [])}
    new_routes = {r["name"]: r for r in new.get("routes", [])}
    old_keys = {k["fingerprint"]: k for k in old.get("tunnel_keys", [])}
    new_keys = {k["fingerprint"]: k for k in new.get("tunnel_keys", [])}
    peers = (len(old.get("peers", [])), len(new.get("peers", [])))
    return LiveConfigChange(
        old_version=(before or {}).get("version"), new_version=(after or {}).get("version"),
        routes_added=tuple(n for n in new_routes if n not in old_routes),
        routes_removed=tuple(n for n in old_routes if n not in new_routes),
        routes_changed=tuple(n for n in new_routes if n in old_routes and old_routes[n] != new_routes[n]),
        keys_added=tuple(_key_label(k) for f, k in new_keys.items() if f not in old_keys),
        keys_removed=tuple(_key_label(k) for f, k in old_keys.items() if f not in new_keys),
        peers=peers if before is not None and after is not None and peers[0] != peers[1] else None,
    )


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclass
class StackReport:
    stack: str
    first: bool
    """No previous stack to compare with (the first synthesis into this directory)."""
    live: LiveConfigChange | None = None
    changes: list[ResourceChange] = field(default_factory=list)

    def of_action(self, *actions: str) -> list[ResourceChange]:
        return [c for c in self.changes if c.action in actions]

    @property
    def proxies_replaced(self) -> list[ResourceChange]:
        """Proxy VMs replaced, or launch template versions that refresh every instance."""
        return [c for c in self.changes if (c.address.startswith(AZURE_VM + ".") and c.action in ("replace", "delete"))
                or (c.address.startswith(AWS_LAUNCH_TEMPLATE + ".") and c.action in ("new-version", "replace"))]

    @property
    def proxies_restarted(self) -> list[ResourceChange]:
        return [c for c in self.changes if c.address.startswith(AZURE_VM + ".") and c.action == "restart"]

    def as_dict(self) -> dict[str, Any]:
        live = self.live
        return {
            "stack": self.stack, "first": self.first,
            "live_config": None if live is None else {
                "old_version": live.old_version, "new_version": live.new_version, "changed": live.changed,
                "routes_added": list(live.routes_added), "routes_removed": list(live.routes_removed),
                "routes_changed": list(live.routes_changed), "keys_added": list(live.keys_added),
                "keys_removed": list(live.keys_removed)},
            "proxies_replaced": [c.address for c in self.proxies_replaced],
            "proxies_restarted": [c.address for c in self.proxies_restarted],
            "resources": {a: len(self.of_action(*group)) for a, group in (
                ("create", ("create",)), ("update", ("update", "new-version", "restart")),
                ("replace", ("replace",)), ("delete", ("delete",)))},
        }

    def lines(self) -> list[str]:
        if self.first:
            version = self.live.new_version if self.live else None
            return [f"{self.stack}: new output (nothing to compare with)"
                    + (f"; live configuration {version}" if version else "")]
        if not self.changes:
            return [f"{self.stack}: no change"]
        out = []
        replaced, restarted = self.proxies_replaced, self.proxies_restarted
        live = self.live
        if live is not None and live.changed:
            out.append(f"{self.stack}: live configuration {live.old_version or 'none'} -> {live.new_version or 'none'}: "
                       f"{live.describe()}; applied in place by the proxies' reconcilers")
        elif live is not None:
            out.append(f"{self.stack}: live configuration unchanged ({live.new_version})")
        for change in replaced:
            if change.address.startswith(AWS_LAUNCH_TEMPLATE):
                out.append(f"  PROXIES REPLACED, one at a time by the Auto Scaling group's instance refresh: "
                           f"{change.address} gets a new version ({', '.join(change.attributes)})")
            else:
                why = ", ".join(change.attributes) if change.action == "replace" else "removed"
                out.append(f"  PROXY REPLACED: {change.address} ({why})")
        for change in restarted:
            out.append(f"  PROXY RESTARTED (powered off, changed, started; Terraform does every proxy at once): "
                       f"{change.address} ({', '.join(change.attributes)})")
        if not replaced and not restarted:
            out.append("  no proxy replaced or restarted")
        counts = self.as_dict()["resources"]
        out.append(f"  resources: {counts['create']} to create, {counts['update']} to update in place, "
                   f"{counts['replace']} to replace, {counts['delete']} to delete")
        return out


def read_stacks(out: Path) -> dict[str, dict]:
    """The synthesized stacks of an output directory, by name (empty when there is none)."""
    try:
        manifest = json.loads((Path(out) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    stacks = {}
    for name, entry in manifest.get("stacks", {}).items():
        try:
            stacks[name] = json.loads((Path(out) / entry["synthesizedStackPath"]).read_text())
        except (OSError, ValueError, KeyError):
            continue
    return stacks


def stack_reports(previous: dict[str, dict], current: dict[str, dict], *, names: list[str] | None = None,
                  differ: StackDiffer = diff_stacks) -> list[StackReport]:
    """One report per stack of ``current`` (or the ``names`` given), against ``previous``."""
    reports = []
    for name in names if names is not None else list(current):
        after = current.get(name)
        if after is None:
            continue
        before = previous.get(name)
        live = live_config_change(document_of(before) if before else None, document_of(after))
        if before is None:
            reports.append(StackReport(name, True, live))
            continue
        reports.append(StackReport(name, False, live, differ(before, after)))
    return reports


def guarded_removals(previous: dict[str, dict], current: dict[str, dict], *,
                     protected: dict[str, bool]) -> list[str]:
    """What a new synthesis removes that ``prevent_destroy`` cannot guard: a resource the previous
    output held with ``lifecycle.prevent_destroy`` whose block is gone from the new one (its stack
    still synthesized, its hub still ``protect: true``). Terraform's guard "does not prevent the
    remote object from being destroyed if the resource block were removed from configuration
    entirely" (Terraform docs, The lifecycle meta-argument): ``serverless_enabled: false`` or a
    removed ``databricks:`` block would destroy the NCC and its endpoint rule on the next apply with
    no question asked. One line per removal, naming the stack and the address."""
    out = []
    for name, after in current.items():
        before = previous.get(name)
        if before is None or not protected.get(name, True):
            continue
        kept = resources(after)
        for address, body in resources(before).items():
            lifecycle = body.get("lifecycle") or {}
            if lifecycle.get("prevent_destroy") is True and address not in kept:
                out.append(f"{name}: {address}")
    return out
