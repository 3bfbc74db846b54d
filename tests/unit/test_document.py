"""The hub configuration document (tunnelhub/userdata/document.py) and the static bootstrap.

The claims of issue 14 on the rendering side: every routine change (routes, keys, probe settings,
limits, timeouts, source ranges, more proxies) changes the document and leaves the bootstrap
user data of every slot byte-identical; a machine change (admin key, tunnel user, health port)
changes the bootstrap. The document is deterministic, self-verifying (the reconciler's own
verification accepts every rendered document and computes the same checksum), holds no secret,
and fits Azure's user data limit.
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import MACHINE_CHANGES, ROUTINE_CHANGES, SECOND_TUNNEL_KEY, spec_text
from tunnelhub.changes import live_config_change
from tunnelhub.spec import load_spec, validate_text
from tunnelhub.userdata import document as D
from tunnelhub.userdata import render_cloud_init, render_document
from tunnelhub.userdata.render import reconcile_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hubs.yaml"
FILES = ROOT / "tunnelhub" / "userdata" / "files"
sys.path.insert(0, str(FILES))

import tunnelhub_reconcile as reconcile  # noqa: E402

EXAMPLE_HUBS = yaml.safe_load(EXAMPLE.read_text())["hubs"]
HUB_IDS = [h["name"] for h in EXAMPLE_HUBS]


def hub_of(data: dict):
    return validate_text(spec_text(data), "test.yaml").spec.hubs[0]


def changed(data: dict, change) -> dict:
    data = copy.deepcopy(data)
    change(data)
    return data


def settings_for(hub) -> reconcile.Settings:
    return reconcile.parse_settings(reconcile_config(hub, 0 if hub.cloud == "azure" else None))


# ---------------------------------------------------------------------------------- routine changes


@pytest.mark.parametrize("data", EXAMPLE_HUBS, ids=HUB_IDS)
@pytest.mark.parametrize("name", list(ROUTINE_CHANGES))
def test_a_routine_change_changes_the_document_and_no_bootstrap(data, name):
    before, after = hub_of(data), hub_of(changed(data, ROUTINE_CHANGES[name]))
    if name == "lb-probe":  # the load balancer's probes only: nothing on the proxies changes at all
        assert render_document(after).version == render_document(before).version
    else:
        assert render_document(after).version != render_document(before).version
    for slot in range(before.proxies.count) if before.cloud == "azure" else [None]:
        assert render_cloud_init(after, slot).payload == render_cloud_init(before, slot).payload, (name, slot)


@pytest.mark.parametrize("data", EXAMPLE_HUBS, ids=HUB_IDS)
@pytest.mark.parametrize("name", list(MACHINE_CHANGES))
def test_a_machine_change_changes_the_bootstrap(data, name):
    """The negative control of the test above: the same comparison does see a machine change."""
    before, after = hub_of(data), hub_of(changed(data, MACHINE_CHANGES[name]))
    slot = 0 if before.cloud == "azure" else None
    assert render_cloud_init(after, slot).payload != render_cloud_init(before, slot).payload


def test_a_new_proxy_gets_its_own_bootstrap_and_every_proxy_learns_its_peer():
    data = EXAMPLE_HUBS[0]
    more = hub_of(changed(data, ROUTINE_CHANGES["more-proxies"]))
    peers = render_document(more).payload["peers"]
    assert peers == [{"slot": n, "address": f"10.60.0.{5 + n}"} for n in range(4)]
    assert render_cloud_init(more, 3).payload != render_cloud_init(more, 0).payload  # its own slot number


# ---------------------------------------------------------------------------------- the document


@pytest.mark.parametrize("data", EXAMPLE_HUBS, ids=HUB_IDS)
def test_the_document_verifies_itself(data):
    hub = hub_of(data)
    document = render_document(hub)
    parsed = json.loads(document.text)
    assert set(parsed) == {"schema", "hub", "version", "checksum", "payload"}
    assert (parsed["schema"], parsed["hub"]) == (1, hub.name)
    digest = hashlib.sha256(D.canonical(parsed["payload"])).hexdigest()
    assert parsed["checksum"] == f"sha256:{digest}" and parsed["version"] == digest[:12] == document.version
    # The reconciler's own checks (same directory as on the proxy) accept it and agree on the checksum.
    verified = reconcile.verify(document.text.encode(), settings_for(hub))
    assert (verified.version, verified.checksum) == (document.version, document.checksum)
    assert reconcile.canonical(parsed["payload"]) == D.canonical(parsed["payload"])


def test_rendering_is_deterministic_and_the_version_follows_the_content_only():
    hub = load_spec(EXAMPLE).hub("weu")
    assert render_document(hub).text == render_document(hub).text
    retagged = changed(EXAMPLE_HUBS[0], lambda h: h.update(tags={"owner": "someone-else"}))
    assert render_document(hub_of(retagged)).version == render_document(hub).version  # tags are not the proxy's


def test_the_document_carries_every_live_part():
    hub = load_spec(EXAMPLE).hub("use")
    payload = render_document(hub).payload
    assert payload["haproxy_routes"] == D.haproxy_routes_config(hub)
    assert payload["health"] == D.health_config(hub)
    assert payload["authorized_keys"] == D.tunnel_authorized_keys(hub)
    assert payload["sshd_tunnel_forwarding"] == D.sshd_tunnel_forwarding(hub)
    assert [r["name"] for r in payload["routes"]] == ["inventory-mysql", "aoai"]
    assert payload["routes"][0] == {"name": "inventory-mysql", "kind": "tunnel", "port": 3306,
                                    "target": "inventory-db.corp.example:3306", "tunnel_port": 13306,
                                    "tunnel_hosts": [{"host": "tunnel-host", "tunnel_port": 13306}],
                                    "peer_port": 23306, "max_connections": 1000, "idle_timeout_min": 30,
                                    "probe": {"mode": "mysql", "interval_s": 2.0, "timeout_s": 2.0,
                                              "check_user": "tunnelhub_check"}}
    assert payload["peers"] == [{"slot": 0, "address": "10.70.0.16"}, {"slot": 1, "address": "10.70.0.80"}]
    assert payload["tunnel_keys"] == [{"type": "ssh-ed25519", "comment": "tunnel@onprem-tunnel-01 (example)",
                                       "fingerprint": D.key_fingerprint(hub.onprem.tunnel_public_keys[0]),
                                       "host": "tunnel-host"}]
    assert (payload["tunnel_user"], payload["health_port"]) == ("tunnel", 8080)


def test_key_fingerprints_are_openssh_s(tmp_path):
    path = tmp_path / "k.pub"
    path.write_text(SECOND_TUNNEL_KEY + "\n")
    shown = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True, check=True).stdout
    assert shown.split()[1] == D.key_fingerprint(SECOND_TUNNEL_KEY) == "SHA256:2QxLEj7gmyu9+St58AXD1cmE5W5SD7mXOYrRTQ6Sjac"


SECRET = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|b3BlbnNzaC1rZXktdjE|password|secret", re.IGNORECASE)


@pytest.mark.parametrize("data", EXAMPLE_HUBS, ids=HUB_IDS)
def test_document_holds_no_secret(data):
    """Azure documents user data as unencrypted and readable by every process on the VM; the S3
    object is in clear in the plan. So: no private key, no password, no secret variable name, and
    every key in it is a public key."""
    document = render_document(hub_of(data))
    assert not SECRET.search(document.text), SECRET.search(document.text)
    for line in document.payload["authorized_keys"].splitlines():
        if line and not line.startswith("#"):
            assert re.search(r" ssh-ed25519 AAAA[A-Za-z0-9+/=]+ ", line)


def test_the_secret_detector_can_fail(tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    assert SECRET.search((tmp_path / "k").read_text())
    assert SECRET.search('{"password_var": "x"}')


def test_sizes_fit_azure_user_data_and_a_large_document_is_gzipped(monkeypatch):
    hub = load_spec(EXAMPLE).hub("weu")
    document = render_document(hub)
    user_data = document.azure_user_data()
    assert base64.b64decode(user_data) == document.text.encode()  # plain while it fits
    monkeypatch.setattr(D, "AZURE_USER_DATA_LIMIT_BYTES", len(user_data) - 1)
    packed = document.azure_user_data()
    assert gzip.decompress(base64.b64decode(packed)) == document.text.encode()
    assert reconcile.verify(base64.b64decode(packed), settings_for(hub)).version == document.version
    monkeypatch.setattr(D, "AZURE_USER_DATA_LIMIT_BYTES", 100)
    with pytest.raises(D.UserDataError, match="over Azure's 100-byte user data limit; fewer routes or tunnel keys"):
        document.azure_user_data()


# ---------------------------------------------------------------------------------- several tunnel hosts


def test_the_two_host_example_lists_every_host_in_the_route_and_key_summaries():
    payload = render_document(load_spec(EXAMPLE).hub("weu")).payload
    assert [(r["name"], r["tunnel_hosts"], r["peer_port"]) for r in payload["routes"]] == [
        ("orders-mysql", [{"host": "ams-tunnel-01", "tunnel_port": 13306}, {"host": "ams-tunnel-02", "tunnel_port": 14306}],
         23306),
        ("billing-pg", [{"host": "ams-tunnel-01", "tunnel_port": 15432}, {"host": "ams-tunnel-02", "tunnel_port": 16432}],
         25432)]
    assert [(k["host"], k["comment"]) for k in payload["tunnel_keys"]] == [
        ("ams-tunnel-01", "tunnel@ams-tunnel-01 (example)"), ("ams-tunnel-02", "tunnel@ams-tunnel-02 (example)")]
    assert [(r["route"], r["tunnel_host"], r["tunnel_port"]) for r in payload["port_plan"]] == [
        ("orders-mysql", "ams-tunnel-01", 13306), ("orders-mysql", "ams-tunnel-02", 14306),
        ("billing-pg", "ams-tunnel-01", 15432), ("billing-pg", "ams-tunnel-02", 16432)]


@pytest.mark.parametrize("name, change", [
    ("a host's ports move", lambda h: h["onprem"]["tunnel_hosts"][1].update(port_offset=2000)),
    ("a host is added", ROUTINE_CHANGES["add-tunnel-host"]),
    ("a host is removed", lambda h: h["onprem"]["tunnel_hosts"].pop()),
    ("a peer port moves", lambda h: [r.update(peer_port=30000 + k) for k, r in enumerate(h["routes"])]),
])
def test_a_tunnel_host_or_peer_port_change_changes_every_tunnel_routes_summary(name, change):
    """The rollout gate compares route summaries: a change of the tunnel hosts' ports (or the
    peer port) changes each tunnel route's listener, so each must count as changed."""
    before = render_document(hub_of(EXAMPLE_HUBS[0]))
    after = render_document(hub_of(changed(EXAMPLE_HUBS[0], change)))
    diff = live_config_change(before.data, after.data)
    assert diff.routes_changed == ("orders-mysql", "billing-pg"), name
    reconcile.verify(after.text.encode(), settings_for(hub_of(EXAMPLE_HUBS[0])))


def test_the_reconciler_refuses_forwarding_rules_missing_a_hosts_ports():
    hub = load_spec(EXAMPLE).hub("weu")
    data = json.loads(render_document(hub).text)
    payload = data["payload"]
    payload["sshd_tunnel_forwarding"] = payload["sshd_tunnel_forwarding"].replace(" localhost:14306 localhost:16432", "")
    digest = hashlib.sha256(D.canonical(payload)).hexdigest()
    data.update(checksum=f"sha256:{digest}", version=digest[:12])
    with pytest.raises(reconcile.Refused, match="the tunnel routes need .*PermitListen localhost:13306 localhost:15432 "
                                                "localhost:14306 localhost:16432"):
        reconcile.verify(json.dumps(data).encode(), settings_for(hub))
