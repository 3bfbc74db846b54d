"""The change report's judgement (tunnelhub/changes.py) on hand-made stack bodies: which attribute
changes replace a VM, power it off, give a launch template a new version, or are plain updates.
(The synthesized stacks are judged in tests/synth/test_live_config.py.)"""

from __future__ import annotations

import base64
import json

import pytest

from tunnelhub.changes import diff_stacks, document_of, live_config_change

VM = {"size": "Standard_D2s_v5", "custom_data": "AAAA", "user_data": "", "tags": {"a": "1"},
      "os_disk": {"name": "d", "caching": "ReadWrite", "storage_account_type": "StandardSSD_LRS"}, "depends_on": []}
LT = {"name": "lt", "user_data": "AAAA", "instance_type": "t3.small", "tags": {"a": "1"}}


def stack(vm: dict | None = None, lt: dict | None = None) -> dict:
    resource: dict = {}
    if vm is not None:
        resource["azurerm_linux_virtual_machine"] = {"vm": vm}
    if lt is not None:
        resource["aws_launch_template"] = {"lt": lt}
    return {"resource": resource}


@pytest.mark.parametrize(("change", "action", "attributes"), [
    ({"custom_data": "BBBB"}, "replace", ("custom_data",)),
    ({"os_disk": dict(VM["os_disk"], name="e")}, "replace", ("os_disk",)),
    ({"os_disk": dict(VM["os_disk"], caching="ReadOnly")}, "update", ("os_disk",)),
    ({"size": "Standard_D4s_v5"}, "restart", ("size",)),
    ({"user_data": "Q0ND", "tags": {"a": "2"}}, "update", ("tags", "user_data")),
    ({"depends_on": ["x"]}, None, ()),
    # The lifecycle meta-argument is Terraform's, not the provider's: adding or removing
    # prevent_destroy (protect: false) plans no change (Terraform docs, meta-arguments/lifecycle).
    ({"lifecycle": {"prevent_destroy": True}}, None, ()),
    ({"lifecycle": {"prevent_destroy": True}, "custom_data": "BBBB"}, "replace", ("custom_data",)),
])
def test_vm_changes(change, action, attributes):
    changes = diff_stacks(stack(vm=VM), stack(vm={**VM, **change}))
    assert [(c.action, c.attributes) for c in changes] == ([(action, attributes)] if action else [])


@pytest.mark.parametrize(("change", "action"), [
    ({"user_data": "BBBB"}, "new-version"), ({"instance_type": "t3.medium"}, "new-version"), ({"tags": {"a": "2"}}, "update"),
])
def test_launch_template_changes(change, action):
    (found,) = diff_stacks(stack(lt=LT), stack(lt={**LT, **change}))
    assert found.action == action


def test_documents_are_read_from_either_channel_and_diffed():
    old = {"version": "a", "payload": {"routes": [{"name": "r1", "port": 1}], "tunnel_keys": [{"fingerprint": "F1"}],
                                        "peers": [{"slot": 0}]}}
    new = {"version": "b", "payload": {"routes": [{"name": "r1", "port": 2}, {"name": "r2"}],
                                        "tunnel_keys": [{"fingerprint": "F2", "comment": "c"}], "peers": [{"slot": 0}, {"slot": 1}]}}
    azure = stack(vm={**VM, "user_data": base64.b64encode(json.dumps(new).encode()).decode()})
    aws = {"resource": {"aws_s3_object": {"d": {"key": "config/hub-config.json", "content": json.dumps(new)}}}}
    assert document_of(azure) == document_of(aws) == new
    change = live_config_change(old, new)
    assert (change.routes_added, change.routes_changed, change.keys_added, change.keys_removed, change.peers) == (
        ("r2",), ("r1",), ("F2 (c)",), ("F1",), (1, 2))
    assert change.describe() == "route added: r2; route changed: r1; key added: F2 (c); key removed: F1; proxies: 1 -> 2"
    assert document_of(stack(vm={**VM, "user_data": "not base64!"})) is None
    hosts = {"version": "c", "payload": {"tunnel_keys": [{"fingerprint": "F3", "comment": "c", "host": "dc2"},
                                                         {"fingerprint": "F4", "host": "tunnel-host"}]}}
    assert live_config_change(old, hosts).keys_added == ("F3 (c) of tunnel host dc2", "F4")
