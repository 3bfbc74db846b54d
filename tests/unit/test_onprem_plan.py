"""What the on-prem package holds: addresses, host key, forwards, version, and the timing it sets."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import TUNNEL_KEY, aws_hub, azure_hub, load_hubs
from tunnelhub import __version__
from tunnelhub.onprem import (
    OnpremError,
    StackOutputs,
    check_version,
    default_version,
    host_version,
    inputs_epoch,
    plan_package,
)
from tunnelhub.onprem.package import MAX_SLOTS
from tunnelhub.onprem.timing import (
    AUTOSSH_DEFAULT_POLL_S,
    DEFAULT_TIMING,
    autossh_grace_sleep,
    autossh_grace_sleeps,
    autossh_min_time_s,
)
from tunnelhub.spec import Proxies

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOaN3cWyvjBGr4otYDaxEsCyHJdGDD93vvrXcCU/lvrx"


def hub_of(data):
    return load_hubs(data).hubs[0]


def outputs(endpoints=None, key=HOST_KEY) -> StackOutputs:
    return StackOutputs(source="out.json", tunnel_endpoints=tuple(endpoints) if endpoints else None, host_public_key=key)


def dpkg_gt(a: str, b: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", a, "gt", b], check=False).returncode == 0


# --------------------------------------------------------------------------------------------
# Addresses and host key
# --------------------------------------------------------------------------------------------


def test_azure_dials_the_proxies_static_ips_from_the_spec():
    plan = plan_package(hub_of(azure_hub()), outputs())
    assert plan.endpoints == ("10.60.0.5", "10.60.0.6")
    assert "static private IPs" in plan.endpoints_source
    assert plan.host_key.line == HOST_KEY and not plan.tofu and plan.warnings == ()


def test_outputs_endpoints_are_authoritative_and_a_mismatch_is_a_warning():
    plan = plan_package(hub_of(azure_hub()), outputs(["10.60.0.9", "10.60.0.10"]))
    assert plan.endpoints == ("10.60.0.9", "10.60.0.10") and plan.endpoints_source == "out.json: tunnel_endpoints"
    assert any("differ from the addresses the spec gives (10.60.0.5, 10.60.0.6)" in w for w in plan.warnings)


def test_aws_over_a_private_circuit_dials_the_slots_fixed_private_ips():
    hub = hub_of(aws_hub(onprem={"source_cidrs": ["192.168.10.0/24"], "private_circuit": True}))
    plan = plan_package(hub, outputs())
    assert plan.endpoints == tuple(str(ip) for ip in hub.aws_addresses().slot_private_ips)


def test_aws_over_the_internet_needs_the_elastic_ips_from_the_outputs():
    hub = hub_of(aws_hub())
    with pytest.raises(OnpremError) as exc:
        plan_package(hub, None, trust_on_first_use=True)
    message = str(exc.value)
    assert "the slots' Elastic IPs (tunnel_endpoints), known only after deploy" in message
    assert "pass --outputs FILE, written by `cdktf output use-aws --outputs-file FILE`" in message
    assert "--trust-on-first-use" not in message, "trust on first use does not give addresses"
    assert plan_package(hub, outputs(["198.51.100.10", "198.51.100.11"])).endpoints == ("198.51.100.10", "198.51.100.11")


def test_without_a_host_key_the_error_names_outputs_and_trust_on_first_use():
    with pytest.raises(OnpremError) as exc:
        plan_package(hub_of(azure_hub()), None)
    assert "needs the hub host key (host_public_key) to pin; pass --outputs FILE" in str(exc.value)
    assert "or --trust-on-first-use" in str(exc.value)
    with pytest.raises(OnpremError, match=r"\(out.json lacks it\)"):
        plan_package(hub_of(azure_hub()), outputs(key=None))


def test_both_missing_is_one_error():
    with pytest.raises(OnpremError) as exc:
        plan_package(hub_of(aws_hub()), None)
    assert str(exc.value).count("pass --outputs") == 1
    assert "Elastic IPs" in str(exc.value) and "host key" in str(exc.value)


def test_trust_on_first_use_is_loud_and_a_known_key_still_wins():
    tofu = plan_package(hub_of(azure_hub()), None, trust_on_first_use=True)
    assert tofu.tofu and tofu.host_key is None
    assert any(w.startswith("WARNING: --trust-on-first-use: the hub host key is NOT pinned") for w in tofu.warnings)
    assert tofu.known_hosts == "/var/lib/tunnelhub-weu/known_hosts", "ssh must be able to write it"
    pinned = plan_package(hub_of(azure_hub()), outputs(), trust_on_first_use=True)
    assert not pinned.tofu and pinned.known_hosts == "/etc/tunnelhub/weu/known_hosts"
    assert any("--trust-on-first-use ignored" in w for w in pinned.warnings)


@pytest.mark.parametrize("endpoints, fragment", [
    (["10.60.0.5"], "lists 1 address(es) but hub 'weu' has proxies.count 2"),
    (["10.60.0.5", "10.60.0.5"], "lists an address twice"),
])
def test_outputs_that_do_not_fit_the_spec_are_refused(endpoints, fragment):
    with pytest.raises(OnpremError) as exc:
        plan_package(hub_of(azure_hub()), outputs(endpoints))
    assert fragment in str(exc.value)


def test_a_hub_without_tunnel_routes_needs_no_package():
    hub = hub_of(aws_hub(routes=[{"name": "aoai", "kind": "forward", "port": 443, "target": "x.openai.azure.com:443"}]))
    with pytest.raises(OnpremError, match="has no tunnel routes"):
        plan_package(hub, outputs(["198.51.100.10", "198.51.100.11"]))


# --------------------------------------------------------------------------------------------
# Forwards and units
# --------------------------------------------------------------------------------------------


def test_every_tunnel_route_is_one_remote_forward_on_localhost():
    hub = hub_of(azure_hub(routes=[
        {"name": "orders-mysql", "kind": "tunnel", "port": 3306, "target": "orders-db.corp.example:3306"},
        {"name": "billing-pg", "kind": "tunnel", "port": 5432, "target": "[fd00::15]:5432", "tunnel_port": 25432},
        {"name": "aoai", "kind": "forward", "port": 443, "target": "x.openai.azure.com:443"},
    ]))
    plan = plan_package(hub, outputs())
    assert [f.remote_forward for f in plan.forwards] == [
        "localhost:13306:orders-db.corp.example:3306",
        "localhost:25432:[fd00::15]:5432",
    ]
    assert plan.exec_start() == [
        "/usr/bin/autossh", "-M", "0", "-N", "-F", "/etc/tunnelhub/weu/ssh_config",
        "-R", "localhost:13306:orders-db.corp.example:3306",
        "-R", "localhost:25432:[fd00::15]:5432",
        "-L", "${RUNTIME_DIRECTORY}/health.sock:127.0.0.1:8080",  # the proxy's health endpoint, for -status
        "${TUNNELHUB_ENDPOINT}",
    ]


def test_instances_and_the_slots_an_upgrade_stops():
    plan = plan_package(hub_of(azure_hub()), outputs())
    assert plan.instances == ["tunnelhub-weu@0.service", "tunnelhub-weu@1.service"]
    assert plan.stale_instances[0] == "tunnelhub-weu@2.service"
    assert len(plan.instances) + len(plan.stale_instances) == MAX_SLOTS == Proxies.model_fields["count"].metadata[1].le


# --------------------------------------------------------------------------------------------
# Version
# --------------------------------------------------------------------------------------------


def test_default_version_orders_by_date_and_identifies_content():
    plan = plan_package(hub_of(azure_hub()), outputs())
    v1 = default_version(plan, 1_747_700_000)
    assert re.fullmatch(rf"{re.escape(__version__)}\+20250520\.001320\.[0-9a-f]{{8}}-1", v1)
    assert default_version(plan, 1_747_700_000) == v1, "same inputs, same version"
    changed = plan_package(hub_of(azure_hub(routes=[
        {"name": "orders-mysql", "kind": "tunnel", "port": 3306, "target": "orders-db.corp.example:3306"},
    ])), outputs())
    v2 = default_version(changed, 1_747_700_000 + 1)
    assert v2.split(".")[-1] != v1.split(".")[-1], "another content, another digest"
    assert dpkg_gt(v2, v1), "a later spec or outputs file makes a newer package"
    assert dpkg_gt(default_version(plan, 1_747_700_000 + 1), v1)


@pytest.mark.parametrize("version", ["1.2-1", "2:0.1.0+20250520.001320.abcdef01-1", "1.0", "1.0~rc1-0.1"])
def test_check_version_accepts_debian_versions(version):
    assert check_version(version) == version
    assert subprocess.run(["dpkg", "--validate-version", version], check=False).returncode == 0


@pytest.mark.parametrize("version", ["v1.2", "1.2_3", "", "1.2-", "1:2:3", "1.0-1-", "a-1"])
def test_check_version_refuses_the_rest_with_the_fix(version):
    with pytest.raises(OnpremError, match=r"is not a Debian version: write \[epoch:\]upstream\[-revision\]"):
        check_version(version)


def test_inputs_epoch_from_source_date_epoch_else_the_newest_input(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    os.utime(a, (1000, 1000))
    os.utime(b, (2000, 2000))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert inputs_epoch(a, b, None) == 2000
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234")
    assert inputs_epoch(a, b) == 1234
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(OnpremError, match="SOURCE_DATE_EPOCH='yesterday' is not a number"):
        inputs_epoch(a)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def test_a_dead_path_is_noticed_well_before_the_reference_90_s():
    assert DEFAULT_TIMING.dead_path_detection_s == 20
    assert DEFAULT_TIMING.connect_timeout_s == 10 and DEFAULT_TIMING.autossh_max_backoff_s == 10


def test_backoff_model_matches_autossh_defaults_measured_in_the_lab():
    # LAB-FINDINGS: "autossh after 5 quick failures sleeps 2, 8, 18 s…" (default AUTOSSH_POLL 600)
    assert autossh_grace_sleeps(AUTOSSH_DEFAULT_POLL_S, 8) == [0, 0, 0, 0, 0, 2, 8, 18]
    assert max(autossh_grace_sleeps(AUTOSSH_DEFAULT_POLL_S, 60)) == 600
    assert max(autossh_grace_sleeps(DEFAULT_TIMING.autossh_poll_s, 60)) == DEFAULT_TIMING.autossh_poll_s
    assert autossh_min_time_s(600) == 60 and autossh_min_time_s(DEFAULT_TIMING.autossh_poll_s) == 10


FAKE_SSH = "#!/bin/sh\nsleep 0.2\nexit {status}\n"  # quick, but slow enough that autossh waits for it
AUTOSSH_BIN = Path("/usr/lib/autossh/autossh")  # Debian's real binary behind the /usr/bin wrapper


@pytest.mark.skipif(not AUTOSSH_BIN.exists(), reason="needs autossh (make test installs it)")
def test_real_autossh_backs_off_as_modelled(tmp_path):
    # GIVEN an "ssh" that fails at once, AUTOSSH_POLL=10 and no start gate
    fake = tmp_path / "ssh"
    fake.write_text(FAKE_SSH.format(status=255))
    fake.chmod(0o755)
    starts = 14  # 13 quick failures in a row: sleeps 1, 1, 2 s (about 4 s in all)
    env = {"PATH": "/usr/bin:/bin", "AUTOSSH_PATH": str(fake), "AUTOSSH_POLL": "10", "AUTOSSH_GATETIME": "0",
           "AUTOSSH_MAXSTART": str(starts), "AUTOSSH_DEBUG": "1"}
    # WHEN autossh runs until its start limit
    result = subprocess.run([str(AUTOSSH_BIN), "-M", "0", "-N", "proxy.invalid"], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    # THEN it restarted ssh every time and, for each value of its quick-failure counter, slept
    # exactly as the model says (the counter can reset when autossh misses a SIGCHLD: see timing.py)
    assert result.stderr.count("starting ssh (count") == starts
    events = re.findall(r"tries = (\d+)|sleeping for grace time (\d+) secs", result.stderr)
    observed, expected = [], []
    for tries, slept in events:
        if tries:
            expected += [autossh_grace_sleep(10, int(tries))] if autossh_grace_sleep(10, int(tries)) else []
        else:
            observed.append(int(slept))
    assert observed == expected and observed, result.stderr[-2000:]
    assert autossh_grace_sleeps(10, starts - 1) == [0] * 10 + [1, 1, 2]


@pytest.mark.skipif(not AUTOSSH_BIN.exists(), reason="needs autossh (make test installs it)")
def test_real_autossh_exits_0_when_ssh_does_so_systemd_must_restart_always(tmp_path):
    fake = tmp_path / "ssh"
    fake.write_text(FAKE_SSH.format(status=0))
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "AUTOSSH_PATH": str(fake), "AUTOSSH_GATETIME": "0", "AUTOSSH_POLL": "10"}
    result = subprocess.run([str(AUTOSSH_BIN), "-M", "0", "-N", "proxy.invalid"], env=env, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0, "Restart=on-failure would leave the tunnel down"


def test_tunnel_key_fixture_is_not_the_host_key():
    assert TUNNEL_KEY.split()[1] != HOST_KEY.split()[1]


# --------------------------------------------------------------------------------------------
# Several tunnel hosts: one package each
# --------------------------------------------------------------------------------------------

SECOND_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ3b6Y1lV2fQ9m6Xb9y0aZk0K8yYb5j3v5m9v2Yk0xQf tunnel@second"


def two_host_hub():
    return hub_of(azure_hub(onprem={"source_cidrs": ["192.168.10.0/24"], "tunnel_hosts": [
        {"name": "dc1", "public_keys": [TUNNEL_KEY]}, {"name": "dc2", "public_keys": [SECOND_KEY]}]}))


def test_each_hosts_plan_forwards_that_hosts_ports():
    hub = two_host_hub()
    for host, k, ports in (("dc1", 0, [13306, 15432]), ("dc2", 1, [14306, 16432])):
        plan = plan_package(hub, outputs(), tunnel_host=host)
        assert [f.tunnel_port for f in plan.forwards] == ports
        assert [f.remote_forward.split(":")[1] for f in plan.forwards] == [str(p) for p in ports]
        assert (plan.tunnel_host, plan.tunnel_host_index, plan.tunnel_hosts) == (host, k, ("dc1", "dc2"))
        assert plan.key_field == f"onprem.tunnel_hosts[{k}].public_keys"
        assert plan.status_config()["tunnel_host"] == host
        assert plan.package == "tunnelhub-weu" and plan.instances == ["tunnelhub-weu@0.service", "tunnelhub-weu@1.service"]


def test_the_single_host_form_plans_as_before():
    plan = plan_package(hub_of(azure_hub()), outputs())
    assert (plan.tunnel_host, plan.tunnel_hosts, plan.key_field) == (None, (), "onprem.tunnel_public_keys")
    assert "tunnel_host" not in plan.status_config()
    assert plan_package(hub_of(azure_hub()), outputs(), tunnel_host="tunnel-host") == plan


def test_a_hub_in_the_list_form_with_one_host_records_it_and_needs_no_name():
    hub = hub_of(azure_hub(onprem={"source_cidrs": ["192.168.10.0/24"], "tunnel_hosts": [
        {"name": "dc1", "public_keys": [TUNNEL_KEY]}]}))
    plan = plan_package(hub, outputs())
    assert (plan.tunnel_host, plan.key_field) == ("dc1", "onprem.tunnel_hosts[0].public_keys")


def test_the_tunnel_host_must_be_named_on_a_hub_with_several_and_known():
    with pytest.raises(OnpremError, match=r"hub 'weu' has 2 tunnel hosts \(dc1, dc2\): each gets its own package"):
        plan_package(two_host_hub(), outputs())
    with pytest.raises(OnpremError, match=r"hub 'weu' has no tunnel host 'dc3'; its tunnel hosts: dc1, dc2$"):
        plan_package(two_host_hub(), outputs(), tunnel_host="dc3")
    with pytest.raises(OnpremError, match=r"its tunnel hosts: tunnel-host \(the single-host form"):
        plan_package(hub_of(azure_hub()), outputs(), tunnel_host="dc1")


@pytest.mark.parametrize("version, host, expected", [
    ("1.4-3", "dc2", "1.4+dc2-3"),
    ("2:1.4-3", "ams-tunnel-02", "2:1.4+ams-tunnel-02-3"),
    ("1.4", "dc2", "1.4+dc2"),
    ("0.1.0+20250520.001320.abcdef01-1", "dc2", "0.1.0+20250520.001320.abcdef01+dc2-1"),
])
def test_host_version_ends_the_upstream_part_with_the_host(version, host, expected):
    hub = hub_of(azure_hub(onprem={"source_cidrs": ["192.168.10.0/24"], "tunnel_hosts": [
        {"name": "dc1", "public_keys": [TUNNEL_KEY]}, {"name": host, "public_keys": [SECOND_KEY]}]}))
    plan = plan_package(hub, outputs(), tunnel_host=host)
    assert host_version(version, plan) == expected
    assert subprocess.run(["dpkg", "--validate-version", expected], check=False).returncode == 0
    assert host_version(version, plan_package(hub_of(azure_hub()), outputs())) == version  # single-host: as is


def test_host_version_refuses_a_hyphenated_host_without_a_revision():
    hub = hub_of(azure_hub(onprem={"source_cidrs": ["192.168.10.0/24"], "tunnel_hosts": [
        {"name": "dc-1", "public_keys": [TUNNEL_KEY]}]}))
    with pytest.raises(OnpremError, match=r"--version '1.4' has no revision.*for example 1.4-1"):
        host_version("1.4", plan_package(hub, outputs()))


def test_default_versions_of_two_hosts_differ_and_each_orders_by_date():
    hub = two_host_hub()
    one, two = (plan_package(hub, outputs(), tunnel_host=h) for h in ("dc1", "dc2"))
    v1, v2 = default_version(one, 1_747_700_000), default_version(two, 1_747_700_000)
    assert v1.endswith("+dc1-1") and v2.endswith("+dc2-1") and v1 != v2
    assert dpkg_gt(default_version(one, 1_747_700_000 + 1), v1)
