"""Every validation rule of the hub spec, with the message it produces."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import (ADMIN_KEY, HUB_VNET_ID, SECOND_TUNNEL_KEY, THIRD_TUNNEL_KEY, TUNNEL_KEY, aws_hub, azure_hub,
                           load_hubs, mutated, spec_errors, spec_text, tunnel_hosts)
from tunnelhub.spec import SpecError, load_spec, validate_spec, validate_text

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hubs.yaml"
ONPREM_PATH = {"onprem_path": {"hub_vnet_id": HUB_VNET_ID}}


# ------------------------------------------------------------------ the example and defaults


def test_example_spec_is_valid_and_resolved():
    report = validate_spec(EXAMPLE)
    assert report.warnings == []
    weu, use = report.spec.hubs
    assert (weu.stack_name, use.stack_name) == ("weu-azure", "use-aws")
    assert [r.tunnel_port for r in weu.routes] == [13306, 15432]
    assert [r.domain for r in weu.routes] == ["orders-mysql.weu.tunnelhub.internal", "billing-pg.weu.tunnelhub.internal"]
    assert [r.probe_mode for r in weu.routes] == ["mysql", "postgresql"]
    aoai = use.route("aoai")
    assert aoai.tunnel_port is None
    assert aoai.domain == "contoso-aoai.openai.azure.com"  # forward routes keep the real name (TLS/SNI)
    assert aoai.probe_mode == "tls"


def test_defaults_are_documented_values():
    hub = load_hubs(azure_hub()).hubs[0]
    assert hub.proxies.count == 2
    assert hub.proxies.health_port == 8080
    assert (hub.proxies.probe_interval_s, hub.proxies.probe_threshold) == (5, 2)
    assert hub.proxy_size == "Standard_D2s_v5"
    assert hub.egress == "nat_gateway"
    assert hub.private_circuit is True
    assert hub.zones == ["1", "2", "3"]
    assert hub.onprem.tunnel_user == "tunnel"
    assert hub.backend.type == "local"
    aws = load_hubs(aws_hub()).hubs[0]
    assert (aws.proxy_size, aws.egress, aws.private_circuit, aws.zones, aws.zone_count) == (
        "t3.small", "slot_eip", False, None, 2)


def test_explicit_false_and_zero_like_values_survive():
    hub = load_hubs(aws_hub(onprem={"source_cidrs": ["203.0.113.0/28"], "private_circuit": True},
                            network={"cidr": "10.70.0.0/24", "availability_zones": ["us-east-1a", "us-east-1b"]})).hubs[0]
    assert hub.private_circuit is True
    az = load_hubs(azure_hub(network={**ONPREM_PATH, "cidr": "10.60.0.0/24", "availability_zones": []})).hubs[0]
    assert az.zones == []


# ------------------------------------------------------------------ error format


def test_error_names_file_line_hub_path_value_and_fix(tmp_path):
    path = tmp_path / "hubs.yaml"
    path.write_text(spec_text(mutated(azure_hub(), lambda h: h["routes"][1].update(port=3306))))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    message = str(exc.value)
    line = [l for l in message.splitlines() if "routes[1].port" in l][0]
    assert line.startswith(f"  {path}:")
    assert re.search(r":\d+: hub \"weu\": hubs\[0\]\.routes\[1\]\.port = 3306: frontend ports must be unique", line)
    assert "routes[0] (orders-mysql) already uses it" in line


def test_every_problem_is_reported_at_once():
    hub = azure_hub(region="eu-west-1")
    hub["routes"][1]["port"] = 22
    message = spec_errors(hub)
    assert "(2 problems)" in message
    assert "region" in message and "routes[1].port" in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("hubs:\n  - name: weu\n    cloud: [azure\n")
    with pytest.raises(SpecError, match=r"bad.yaml:\d+: .*not valid YAML"):
        load_spec(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SpecError, match="the spec is empty"):
        load_spec(empty)


def test_duplicate_yaml_key_is_an_error():
    text = spec_text(azure_hub()).replace("  cloud: azure\n", "  cloud: azure\n  cloud: aws\n", 1)
    assert "key 'cloud' appears twice" in spec_errors(text=text)


# ------------------------------------------------------------------ unknown keys and secrets


def test_unknown_key_suggests_the_right_one():
    message = spec_errors(azure_hub(proxies={"helth_port": 9000}))
    assert "proxies.helth_port: unknown key 'helth_port' (did you mean 'health_port'?)" in message
    assert "allowed keys here: admin_ssh_public_keys, admin_username, count, health_port" in message


def test_literal_password_is_refused_with_the_fix():
    hub = azure_hub(databricks=_databricks(connections=[{"route": "orders-mysql", "user": "u", "password": "hunter2"}]))
    message = spec_errors(hub)
    assert "connections[0].password: literal credentials are not allowed" in message
    assert "password_var" in message
    assert "hunter2" not in message  # the secret itself is never echoed


def test_password_var_must_be_a_variable_name():
    hub = azure_hub(databricks=_databricks(connections=[{"route": "orders-mysql", "user": "u", "password_var": "p@ss w0rd!"}]))
    assert "password_var" in spec_errors(hub) and "Terraform variable name" in spec_errors(hub)


# ------------------------------------------------------------------ names


@pytest.mark.parametrize("name", ["A", "x", "-ab", "ab-", "a--b", "has_underscore", "waytoolongforahubname"])
def test_bad_hub_names(name):
    assert "hubs[0].name" in spec_errors(azure_hub(name=name))


def test_duplicate_hub_names():
    assert "hub names must be unique" in spec_errors(azure_hub(), azure_hub(network={**ONPREM_PATH, "cidr": "10.61.0.0/24"}))


def test_route_names_unique():
    hub = mutated(azure_hub(), lambda h: h["routes"][1].update(name="orders-mysql"))
    assert "routes[1].name = 'orders-mysql': route names must be unique" in spec_errors(hub)


# ------------------------------------------------------------------ ports


def test_frontend_ports_unique():
    hub = mutated(azure_hub(), lambda h: h["routes"][1].update(port=3306))
    assert "frontend ports must be unique" in spec_errors(hub)


def test_port_22_refused_for_routes_and_health():
    hub = mutated(azure_hub(), lambda h: h["routes"][0].update(port=22))
    assert "routes[0].port = 22: port 22 is reserved for the tunnel SSH connection" in spec_errors(hub)
    assert "proxies.health_port = 22: port 22 is the tunnel SSH port" in spec_errors(azure_hub(proxies={"health_port": 22}))


def test_route_port_must_not_be_the_health_port():
    hub = mutated(azure_hub(proxies={"health_port": 5432}), lambda h: None)
    assert "routes[1].port = 5432: port 5432 is the proxies' health port" in spec_errors(hub)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_ports_in_range(port):
    hub = mutated(azure_hub(), lambda h: h["routes"][0].update(port=port))
    assert "routes[0].port" in spec_errors(hub) and "ports must be in 1-65535" in spec_errors(hub)


@pytest.mark.parametrize("port", [22, 1024, 80, 70000])
def test_tunnel_ports_above_1024(port):
    hub = mutated(azure_hub(), lambda h: h["routes"][0].update(tunnel_port=port))
    assert "tunnel ports must be above 1024" in spec_errors(hub)


def test_tunnel_ports_unique():
    hub = mutated(azure_hub(), lambda h: [r.update(tunnel_port=14000) for r in h["routes"]])
    assert "routes[1].tunnel_port = 14000: tunnel ports must be unique" in spec_errors(hub)


def test_tunnel_port_must_differ_from_frontend_and_health_ports():
    hub = mutated(azure_hub(), lambda h: h["routes"][0].update(tunnel_port=5432))
    assert "a tunnel port must differ from every frontend port" in spec_errors(hub)
    hub = mutated(azure_hub(proxies={"health_port": 9090}), lambda h: h["routes"][0].update(tunnel_port=9090))
    assert "this is the proxies' health port" in spec_errors(hub)


def test_forward_route_cannot_have_a_tunnel_port():
    hub = mutated(aws_hub(), lambda h: h["routes"][1].update(tunnel_port=14443))
    assert "routes[1].tunnel_port = 14443: a forward route has no tunnel" in spec_errors(hub)


def test_derived_tunnel_port_avoids_taken_ports():
    hub = azure_hub(routes=[
        {"name": "a1", "kind": "tunnel", "port": 3306, "target": "db:3306", "tunnel_port": 13306},
        {"name": "b1", "kind": "tunnel", "port": 3307, "target": "db:3306"},
        {"name": "c1", "kind": "tunnel", "port": 13307, "target": "db:3306"},
        {"name": "d1", "kind": "tunnel", "port": 60000, "target": "db:3306"},
    ])
    ports = [r.tunnel_port for r in load_hubs(hub).hubs[0].routes]
    # b1 prefers 13307, which is c1's frontend port: it takes the first free from 20000;
    # c1 prefers 23307; d1's preference 70000 is out of range.
    assert ports == [13306, 20000, 23307, 20001]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=65535).filter(lambda p: p not in (22, 8080)),
                min_size=1, max_size=12, unique=True))
def test_derived_tunnel_ports_are_unique_and_valid(frontend_ports):
    routes = [{"name": f"r{i}", "kind": "tunnel", "port": p, "target": "db:1"} for i, p in enumerate(frontend_ports)]
    hub = load_hubs(azure_hub(routes=routes)).hubs[0]
    tunnel = [r.tunnel_port for r in hub.routes]
    assert len(set(tunnel)) == len(tunnel)
    assert all(1024 < t <= 65535 for t in tunnel)
    assert not set(tunnel) & (set(frontend_ports) | {22, 8080})


# ------------------------------------------------------------------ targets and domains


@pytest.mark.parametrize("target", ["db", "db:", ":3306", "db:0", "db:99999", "bad host:1", "[zz]:1"])
def test_bad_targets(target):
    hub = mutated(azure_hub(), lambda h: h["routes"][0].update(target=target))
    assert "routes[0].target" in spec_errors(hub)


def test_ipv6_target_literal_is_accepted():
    hub = mutated(azure_hub(), lambda h: h["routes"][0].update(target="[fd00::15]:3306"))
    assert load_hubs(hub).hubs[0].routes[0].target_host == "fd00::15"


def test_forward_route_to_a_private_address_belongs_in_a_tunnel():
    hub = mutated(aws_hub(), lambda h: h["routes"][1].update(target="10.1.2.3:443"))
    assert "belongs in a tunnel route" in spec_errors(hub)


@pytest.mark.parametrize("domain", ["single", "bad_label.example.com", "-x.example.com", "a." * 130 + "com",
                                    ("x" * 64) + ".example.com", "example.123"])
def test_bad_route_domains(domain):
    hub = mutated(azure_hub(), lambda h: h["routes"][0].update(domain=domain))
    assert "routes[0].domain" in spec_errors(hub) and "not a valid domain name" in spec_errors(hub)


def test_network_policy_domains_allow_leading_wildcard_only():
    ok = azure_hub(databricks=_databricks(network_policy={"allowed_domains": ["*.blob.core.windows.net", "pypi.org"]}))
    assert load_hubs(ok).hubs[0].databricks.network_policy.allowed_domains[0] == "*.blob.core.windows.net"
    bad = azure_hub(databricks=_databricks(network_policy={"allowed_domains": ["pypi.*.org"]}))
    assert "network_policy.allowed_domains[0]" in spec_errors(bad)


# ------------------------------------------------------------------ networks


@pytest.mark.parametrize("cidr, fragment", [
    ("10.60.0.5/24", "host bits are set: did you mean 10.60.0.0/24?"),
    ("10.60.0.0", "needs a prefix length"),
    ("10.60.0.0/33", "not a valid IPv4 CIDR"),
    ("fd00::/64", "only IPv4"),
    ("8.8.8.0/24", "must use a private range"),
])
def test_bad_hub_cidrs(cidr, fragment):
    assert fragment in spec_errors(azure_hub(network={**ONPREM_PATH, "cidr": cidr}))


def test_network_needs_exactly_one_source():
    assert "give exactly one of cidr" in spec_errors(azure_hub(network={}))
    both = azure_hub(network={**ONPREM_PATH, "cidr": "10.60.0.0/24", "existing_vnet": _existing_vnet()})
    assert "given: cidr, existing_vnet" in spec_errors(both)


def test_existing_network_of_the_other_cloud():
    hub = azure_hub(network={"existing_vpc": _existing_vpc()})
    assert "existing_vpc is for AWS hubs" in spec_errors(hub)


def test_existing_vnet_computes_static_addresses():
    hub = load_hubs(azure_hub(network={"existing_vnet": _existing_vnet()})).hubs[0]
    plan = hub.azure_addresses()
    assert str(plan.lb_frontend_ip) == "10.90.1.4"
    assert [str(ip) for ip in plan.proxy_ips] == ["10.90.1.5", "10.90.1.6"]
    bad = _existing_vnet()
    bad["proxy_subnet_id"] = bad["proxy_subnet_id"].replace("hub-vnet", "other-vnet")
    assert "must belong to existing_vnet.vnet_id" in spec_errors(azure_hub(network={"existing_vnet": bad}))


def test_existing_vpc_subnets_inside_the_vpc():
    vpc = _existing_vpc()
    vpc["proxy_subnets"][0]["cidr"] = "10.99.0.0/26"
    assert "not inside the VPC CIDR" in spec_errors(aws_hub(network={"existing_vpc": vpc}))


def test_onprem_must_not_overlap_the_hub():
    hub = azure_hub(onprem={"source_cidrs": ["10.60.0.128/25"]})
    assert "onprem.source_cidrs[0] = '10.60.0.128/25': overlaps the hub network 10.60.0.0/24" in spec_errors(hub)


def test_classic_compute_must_not_overlap_the_hub():
    hub = azure_hub(databricks=_databricks(classic={"network_id": _vnet_id("dbx"), "cidrs": ["10.60.0.0/16"]}))
    assert "classic.cidrs[0]" in spec_errors(hub) and "peered networks must not overlap" in spec_errors(hub)


def test_hubs_must_not_overlap_each_other():
    assert "overlaps hub 'weu'" in spec_errors(azure_hub(), aws_hub(network={"cidr": "10.60.0.0/23"}))


def test_proxy_count_must_fit_the_subnet():
    message = spec_errors(azure_hub(network={**ONPREM_PATH, "cidr": "10.60.0.0/26"}, proxies={"count": 12}))
    assert "room for 10 proxies" in message and "proxies.count is 12" in message


def test_aws_subnets_need_room_for_the_slot_block():
    assert "smaller than /26" in spec_errors(aws_hub(network={"cidr": "10.70.0.0/25"}))


def test_aws_slot_addresses_spread_over_zones():
    plan = load_hubs(aws_hub(proxies={"count": 3})).hubs[0].aws_addresses()
    assert plan.slot_zones == (0, 1, 0)
    assert [str(i) for i in plan.slot_private_ips] == ["10.70.0.16", "10.70.0.80", "10.70.0.17"]


def test_egress_choices_per_cloud():
    assert "azure hubs allow egress: nat_gateway or none" in spec_errors(azure_hub(network={**ONPREM_PATH, "cidr": "10.60.0.0/24", "egress": "slot_eip"}))
    assert "aws hubs allow egress: slot_eip or nat_gateway" in spec_errors(aws_hub(network={"cidr": "10.70.0.0/24", "egress": "none"}))


def test_zones():
    assert "Azure zones are '1', '2' and '3'" in spec_errors(azure_hub(network={**ONPREM_PATH, "cidr": "10.60.0.0/24", "availability_zones": ["4"]}))
    assert "like us-east-1a" in spec_errors(aws_hub(network={"cidr": "10.70.0.0/24", "availability_zones": ["eu-west-1a", "us-east-1b"]}))
    assert "at least two zones" in spec_errors(aws_hub(network={"cidr": "10.70.0.0/24", "availability_zones": ["us-east-1a"]}))


# ------------------------------------------------------------------ regions and cloud blocks


def test_region_of_the_other_cloud():
    assert "'eu-west-1' is an AWS region, but this hub has cloud: azure" in spec_errors(azure_hub(region="eu-west-1"))
    assert "'westeurope' is an Azure region, but this hub has cloud: aws" in spec_errors(aws_hub(region="westeurope"))


def test_unknown_region_suggests():
    assert "did you mean 'westeurope'?" in spec_errors(azure_hub(region="westeurop"))


def test_cloud_settings_block_of_the_other_cloud():
    assert "an 'aws:' block on an azure hub" in spec_errors(azure_hub(aws={}))
    assert "an 'azure:' block on an aws hub" in spec_errors(aws_hub(azure={}))


def test_azure_tunnel_host_needs_a_private_circuit():
    hub = azure_hub(onprem={"source_cidrs": ["192.168.10.0/24"], "private_circuit": False})
    assert "Azure proxies have no public address" in spec_errors(hub)


# ------------------------------------------------------------------ probes


def test_probe_mode_must_match_the_database_type():
    hub = mutated(azure_hub(), lambda h: h["routes"][0].update(probe={"mode": "postgresql"}))
    assert "the route's type is mysql; a postgresql probe would fail" in spec_errors(hub)


def test_probe_bounds():
    hub = mutated(azure_hub(), lambda h: h["routes"][0].update(probe={"interval_s": 0.1}))
    assert "routes[0].probe.interval_s" in spec_errors(hub)
    hub = mutated(azure_hub(), lambda h: h["routes"][0].update(probe={"interval_s": 1, "timeout_s": 10}))
    assert "must not exceed 5 × interval_s" in spec_errors(hub)


def test_lb_probe_limits():
    assert "proxies.probe_interval_s" in spec_errors(azure_hub(proxies={"probe_interval_s": 2}))
    assert "AWS NLB health checks need a threshold of 2-10" in spec_errors(aws_hub(proxies={"probe_threshold": 1}))


def test_auto_probe_modes():
    routes = [
        {"name": "pg1", "kind": "tunnel", "port": 5432, "target": "db:5432", "type": "postgresql"},
        {"name": "raw1", "kind": "tunnel", "port": 9000, "target": "db:9000"},
        {"name": "web1", "kind": "forward", "port": 443, "target": "api.example.com:443"},
        {"name": "ssh1", "kind": "tunnel", "port": 2222, "target": "db:2222", "probe": {"mode": "banner"}},
    ]
    hub = load_hubs(azure_hub(routes=routes)).hubs[0]
    assert [r.probe_mode for r in hub.routes] == ["postgresql", "connect", "tls", "banner"]


# ------------------------------------------------------------------ keys and users


@pytest.mark.parametrize("key, fragment", [
    ("-----BEGIN OPENSSH PRIVATE KEY----- abc", "this is a private key"),
    ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "unsupported SSH key type ssh-dss"),
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9Tna!!", "base64 body is damaged"),
    ('restrict,permitlisten="localhost:13306" ssh-ed25519 AAAA', "options are not allowed here"),
    ("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIG9TnaTPCfkVHI4enHIB/o1Z2+M6vNsVV5AK6J06BCGO", "its body holds a ssh-ed25519 key"),
    ("ssh-ed25519", "not an OpenSSH public key"),
])
def test_bad_tunnel_keys(key, fragment):
    hub = azure_hub(onprem={"source_cidrs": ["192.168.10.0/24"], "tunnel_public_keys": [key]})
    assert fragment in spec_errors(hub)


def test_small_rsa_keys_are_refused(tmp_path):
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(tmp_path / "k")], check=True)
    key = (tmp_path / "k.pub").read_text().strip()
    hub = azure_hub(onprem={"source_cidrs": ["192.168.10.0/24"], "tunnel_public_keys": [key]})
    assert "at least 3072 bits (this one has 2048)" in spec_errors(hub)


def test_admin_keys_validated_too():
    assert load_hubs(azure_hub(proxies={"admin_ssh_public_keys": [ADMIN_KEY]})).hubs[0].proxies.admin_ssh_public_keys
    assert "proxies.admin_ssh_public_keys[0]" in spec_errors(azure_hub(proxies={"admin_ssh_public_keys": ["nope"]}))


@pytest.mark.parametrize("user", ["root", "Tunnel", "9x", "ubuntu"])
def test_tunnel_user(user):
    hub = azure_hub(onprem={"source_cidrs": ["192.168.10.0/24"], "tunnel_user": user})
    assert "onprem.tunnel_user" in spec_errors(hub)


def test_no_tunnel_keys_is_a_warning_not_an_error():
    report = validate_text(spec_text(azure_hub(onprem={"source_cidrs": ["192.168.10.0/24"]})), "t.yaml")
    assert len(report.warnings) == 1
    assert "warning: no tunnel keys yet" in report.warnings[0].render("t.yaml")


# ------------------------------------------------------------------ tunnel hosts (several on-prem hosts)

DC1 = {"name": "dc1", "public_keys": [TUNNEL_KEY]}
DC2 = {"name": "dc2", "public_keys": [SECOND_TUNNEL_KEY]}


def two_hosts(*hosts: dict, **overrides) -> dict:
    return azure_hub(onprem=tunnel_hosts(*(hosts or (DC1, DC2))), **overrides)


def test_the_single_host_form_is_one_host_named_tunnel_host_at_offset_0():
    hub = load_hubs(azure_hub()).hubs[0]
    assert not hub.multi_host
    [host] = hub.tunnel_hosts
    assert (host.name, host.public_keys, host.port_offset) == ("tunnel-host", [TUNNEL_KEY], 0)
    assert [str(c) for c in host.source_cidrs] == ["192.168.10.0/24"]  # onprem.source_cidrs
    assert hub.all_tunnel_keys() == [("tunnel-host", TUNNEL_KEY)]
    plan = hub.port_plan()
    assert [(r["route"], r["tunnel_host"], r["port"], r["tunnel_port"], r["peer_port"]) for r in plan] == [
        ("orders-mysql", "tunnel-host", 3306, 13306, 23306), ("billing-pg", "tunnel-host", 5432, 15432, 25432)]


def test_host_k_holds_the_tunnel_port_plus_1000_k():
    hub = load_hubs(two_hosts(DC1, DC2, {"name": "dc3", "public_keys": [THIRD_TUNNEL_KEY]})).hubs[0]
    assert hub.multi_host and [h.port_offset for h in hub.tunnel_hosts] == [0, 1000, 2000]
    rows = [(r["route"], r["tunnel_host"], r["tunnel_port"], r["peer_port"]) for r in hub.port_plan()]
    assert rows == [("orders-mysql", "dc1", 13306, 23306), ("orders-mysql", "dc2", 14306, 23306),
                    ("orders-mysql", "dc3", 15306, 23306), ("billing-pg", "dc1", 15432, 25432),
                    ("billing-pg", "dc2", 16432, 25432), ("billing-pg", "dc3", 17432, 25432)]
    assert hub.host_tunnel_port(hub.route("billing-pg"), "dc3") == 17432
    assert hub.all_tunnel_keys() == [("dc1", TUNNEL_KEY), ("dc2", SECOND_TUNNEL_KEY), ("dc3", THIRD_TUNNEL_KEY)]


def test_port_offset_overrides_the_position():
    """Removing a host from the middle: the host after it keeps its ports with port_offset."""
    hub = load_hubs(two_hosts(DC1, {**DC2, "port_offset": 2000})).hubs[0]
    assert [hub.host_tunnel_port(hub.route("orders-mysql"), h) for h in hub.tunnel_hosts] == [13306, 15306]


def test_a_forward_route_has_one_row_and_no_tunnel_host():
    hub = load_hubs(aws_hub(onprem=tunnel_hosts(DC1, DC2, source_cidrs=("203.0.113.0/28",)))).hubs[0]
    rows = [(r["route"], r["tunnel_host"], r["tunnel_port"], r["peer_port"]) for r in hub.port_plan()]
    assert rows == [("inventory-mysql", "dc1", 13306, 23306), ("inventory-mysql", "dc2", 14306, 23306),
                    ("aoai", None, None, None)]


def test_a_host_takes_its_own_source_cidrs_inside_the_onprem_ranges():
    hub = load_hubs(two_hosts(DC1, {**DC2, "source_cidrs": ["192.168.10.128/25"]})).hubs[0]
    assert [[str(c) for c in h.source_cidrs] for h in hub.tunnel_hosts] == [["192.168.10.0/24"], ["192.168.10.128/25"]]
    message = spec_errors(two_hosts(DC1, {**DC2, "source_cidrs": ["192.168.11.0/25"]}))
    assert ("onprem.tunnel_hosts[1].source_cidrs[0] = '192.168.11.0/25': lies outside onprem.source_cidrs, the "
            "ranges the network rules admit on port 22: add it there too, or narrow this one") in message


def test_moving_to_the_list_form_keeps_the_first_hosts_ports():
    """The single-host form's host, first in tunnel_hosts, holds the ports it held: its installed
    package stays valid when a second host is added."""
    before = load_hubs(azure_hub()).hubs[0]
    after = load_hubs(azure_hub(onprem=tunnel_hosts({"name": "tunnel-host", "public_keys": [TUNNEL_KEY]}, DC2))).hubs[0]
    ports = [(r["route"], r["tunnel_port"], r["peer_port"]) for r in before.port_plan()]
    assert [(r["route"], r["tunnel_port"], r["peer_port"]) for r in after.port_plan()
            if r["tunnel_host"] == "tunnel-host"] == ports


def test_removing_a_host_from_the_middle_keeps_the_later_hosts_ports_with_port_offset():
    dc3 = {"name": "dc3", "public_keys": [THIRD_TUNNEL_KEY]}
    three = load_hubs(two_hosts(DC1, DC2, dc3)).hubs[0]
    two = load_hubs(two_hosts(DC1, {**dc3, "port_offset": 2000})).hubs[0]
    def ports(hub, host):
        return [hub.host_tunnel_port(r, host) for r in hub.tunnel_routes]
    assert ports(two, "dc3") == ports(three, "dc3") == [15306, 17432]
    assert ports(load_hubs(two_hosts(DC1, dc3)).hubs[0], "dc3") == [14306, 16432]  # unpinned: it would move


def test_both_forms_at_once_are_refused():
    hub = two_hosts()
    hub["onprem"]["tunnel_public_keys"] = [THIRD_TUNNEL_KEY]
    assert ("onprem.tunnel_public_keys: give the keys under onprem.tunnel_hosts[k].public_keys (one list per host) "
            "or here (the single-host form), not both") in spec_errors(hub)


def test_tunnel_host_names_are_unique_and_well_formed():
    message = spec_errors(two_hosts(DC1, {**DC2, "name": "dc1"}))
    assert ("onprem.tunnel_hosts[1].name = 'dc1': tunnel host names must be unique in a hub; tunnel_hosts[0] is "
            "already called that") in message
    assert "a tunnel host name must be 2-24 characters" in spec_errors(two_hosts(DC1, {**DC2, "name": "DC2"}))


def test_peer_n_is_reserved_for_the_proxies_backup_servers():
    message = spec_errors(two_hosts(DC1, {**DC2, "name": "peer1"}))
    assert "onprem.tunnel_hosts[1].name = 'peer1': peer<N> is the name of the other proxies' backup servers" in message
    assert load_hubs(two_hosts(DC1, {**DC2, "name": "peering"})).hubs[0].tunnel_hosts[1].name == "peering"


def test_at_most_eight_tunnel_hosts():
    hosts = [{"name": f"dc{k}"} for k in range(9)]
    assert "onprem.tunnel_hosts" in spec_errors(two_hosts(*hosts))


def test_a_key_is_listed_once():
    message = spec_errors(two_hosts({**DC1, "public_keys": [TUNNEL_KEY, TUNNEL_KEY]}, DC2))
    assert ("onprem.tunnel_hosts[0].public_keys[1] = 'tunnel@test': this key is already listed at "
            "onprem.tunnel_hosts[0].public_keys[0]; remove the duplicate") in message
    single = azure_hub(onprem={"source_cidrs": ["192.168.10.0/24"], "tunnel_public_keys": [TUNNEL_KEY, TUNNEL_KEY]})
    assert "onprem.tunnel_public_keys[1] = 'tunnel@test': this key is already listed at" in spec_errors(single)


def test_a_key_belongs_to_one_host_only():
    """Revoking a host removes its keys; a key shared with another host would cut that one too."""
    renamed = TUNNEL_KEY.rsplit(" ", 1)[0] + " the-same-key@dc2"  # another comment, the same key
    message = spec_errors(two_hosts(DC1, {**DC2, "public_keys": [SECOND_TUNNEL_KEY, renamed]}))
    assert ("onprem.tunnel_hosts[1].public_keys[1] = 'the-same-key@dc2': this key is already tunnel host 'dc1''s "
            "(onprem.tunnel_hosts[0].public_keys[0]): each host needs its own key") in message


def test_a_host_without_keys_is_a_warning_naming_its_package():
    report = validate_text(spec_text(two_hosts(DC1, {"name": "dc2"})), "t.yaml")
    [warning] = [w.render("t.yaml") for w in report.warnings]
    assert ("onprem.tunnel_hosts[1].public_keys: warning: tunnel host 'dc2' has no key yet, so the proxies refuse "
            "its tunnels; install its package (onprem build-deb --tunnel-host dc2)") in warning


def test_two_hosts_cannot_share_a_port_offset():
    message = spec_errors(two_hosts(DC1, {**DC2, "port_offset": 0}))
    assert ("onprem.tunnel_hosts[1].port_offset = 0: tunnel_hosts[0] already uses port offset 0: two hosts cannot "
            "hold the same loopback ports; give this host another port_offset") in message
    three = two_hosts(DC1, {**DC2, "port_offset": 2000}, {"name": "dc3", "public_keys": [THIRD_TUNNEL_KEY]})
    assert "onprem.tunnel_hosts[2].port_offset = 2000: tunnel_hosts[1] already uses port offset 2000" in spec_errors(three)
    assert "port_offset" in spec_errors(two_hosts(DC1, {**DC2, "port_offset": -1000}))


def test_a_host_port_on_another_routes_tunnel_port_is_refused_with_a_free_offset():
    """PostgreSQL on 5432 and its pgbouncer on 6432: host dc2's 15432 + 1000 is the bouncer's 16432."""
    routes = [{"name": "pg", "kind": "tunnel", "port": 5432, "target": "db:5432"},
              {"name": "bouncer", "kind": "tunnel", "port": 6432, "target": "db:6432"}]
    message = spec_errors(two_hosts(routes=routes))
    assert ("onprem.tunnel_hosts[1].port_offset = 1000: tunnel host dc2's tunnel for route pg would be port 16432, "
            "which tunnel host dc1's tunnel for route bouncer already uses on every proxy: give tunnel_hosts[1] "
            "another port_offset (port_offset: 2000 is free), or routes[0] another tunnel_port") in message
    assert "(1 problem)" in message  # one message per host, not one per colliding port
    hub = load_hubs(two_hosts(DC1, {**DC2, "port_offset": 2000}, routes=routes)).hubs[0]
    assert [r["tunnel_port"] for r in hub.port_plan()] == [15432, 17432, 16432, 18432]


def test_a_host_port_on_a_frontend_port_is_refused():
    routes = [{"name": "orders-mysql", "kind": "tunnel", "port": 3306, "target": "db:3306"},
              {"name": "api", "kind": "tunnel", "port": 14306, "target": "api:443", "tunnel_port": 30000}]
    assert ("onprem.tunnel_hosts[1].port_offset = 1000: tunnel host dc2's tunnel for route orders-mysql would be port "
            "14306, which route api's frontend already uses on every proxy") in spec_errors(two_hosts(routes=routes))


def test_a_host_port_out_of_range_is_refused():
    message = spec_errors(two_hosts(DC1, {**DC2, "port_offset": 55000}))
    assert ("onprem.tunnel_hosts[1].port_offset = 55000: gives tunnel host dc2's tunnel for route orders-mysql port "
            "68306, outside 1025-65535") in message


def test_the_first_hosts_explicit_offset_is_checked_like_any_other():
    """Any host may hold offset 0 (the routes' own tunnel ports); a first host moved off it is
    checked like the others, and a later host at offset 0 is not taken for a collision."""
    hub = load_hubs(two_hosts({**DC1, "port_offset": 1000}, {**DC2, "port_offset": 0})).hubs[0]
    assert [r["tunnel_port"] for r in hub.port_plan()][:2] == [14306, 13306]
    message = spec_errors(two_hosts({**DC1, "port_offset": 60000}, DC2))
    assert ("onprem.tunnel_hosts[0].port_offset = 60000: gives tunnel host dc1's tunnel for route orders-mysql port "
            "73306") in message


def test_peer_ports_are_derived_valid_and_unique():
    hub = load_hubs(azure_hub(routes=[
        {"name": "a1", "kind": "tunnel", "port": 3306, "target": "db:3306"},
        {"name": "b1", "kind": "tunnel", "port": 3307, "target": "db:3306", "peer_port": 23306},
        {"name": "c1", "kind": "tunnel", "port": 50000, "target": "db:3306"},
    ])).hubs[0]
    # a1 prefers 23306, which b1 sets: the first free from 40000; c1's preference 70000 is out of range.
    assert [r.peer_port for r in hub.routes] == [40000, 23306, 40001]
    assert hub.forward_routes == [] and all(r.peer_port is not None for r in hub.tunnel_routes)


def test_a_derived_peer_port_avoids_every_hosts_ports():
    """dc2 at offset 10000 holds 13306 + 10000 = 23306 and 15432 + 10000 = 25432, the routes'
    preferred peer ports: both take the first free from 40000."""
    hub = load_hubs(two_hosts(DC1, {**DC2, "port_offset": 10000})).hubs[0]
    assert [r.peer_port for r in hub.routes] == [40000, 40001]
    single = load_hubs(azure_hub()).hubs[0]
    assert single.route("billing-pg").peer_port == 25432


@pytest.mark.parametrize("peer_port, fragment", [
    (1024, "routes[0].peer_port = 1024: peer ports must be above 1024 (and at most 65535)"),
    (5432, "routes[0].peer_port = 5432: route orders-mysql's peer path would be port 5432, which route billing-pg's "
           "frontend already uses on every proxy: set routes[0].peer_port to a free port"),
    (15432, "which tunnel host dc1's tunnel for route billing-pg already uses"),
    (16432, "which tunnel host dc2's tunnel for route billing-pg already uses"),
    (8080, "which the health endpoint already uses"),
])
def test_peer_port_collisions_are_refused(peer_port, fragment):
    hub = mutated(two_hosts(), lambda h: (h["routes"][0].update(peer_port=peer_port),
                                          h["routes"][1].update(tunnel_port=15432)))
    assert fragment in spec_errors(hub)


def test_a_derived_tunnel_port_avoids_an_explicit_peer_port():
    hub = load_hubs(mutated(two_hosts(), lambda h: h["routes"][0].update(peer_port=15432))).hubs[0]
    assert [(r.tunnel_port, r.peer_port) for r in hub.routes] == [(13306, 15432), (20000, 25432)]


def test_two_routes_cannot_share_a_peer_port():
    hub = mutated(two_hosts(), lambda h: [r.update(peer_port=30000) for r in h["routes"]])
    assert ("routes[1].peer_port = 30000: route billing-pg's peer path would be port 30000, which route "
            "orders-mysql's peer path already uses") in spec_errors(hub)


# ------------------------------------------------------------------ databricks


def test_connection_rules():
    hub = azure_hub(databricks=_databricks(connections=[
        {"route": "nope", "user": "u", "password_var": "p"},
        {"route": "orders-mysql", "password_var": "p"},
        {"route": "orders-mysql", "user": "u", "user_var": "v", "password_var": "p"},
    ]))
    message = spec_errors(hub)
    assert "connections[0].route = 'nope': no route with this name" in message
    assert "connections[1]: give exactly one of user" in message
    assert "connections[2].name = 'orders_mysql': connection names must be unique" in message


def test_connection_needs_a_database_route():
    hub = aws_hub(databricks=_databricks(host="https://dbc-1234567.cloud.databricks.com",
                                         connections=[{"route": "aoai", "user": "u", "password_var": "p"}]))
    assert "route 'aoai' has no database type" in spec_errors(hub)


def test_workspace_of_the_other_cloud():
    hub = aws_hub(databricks=_databricks())
    assert "this is an azure workspace URL but the hub is on aws" in spec_errors(hub)


@pytest.mark.parametrize("name", ["ab", "has space", "x" * 31])
def test_ncc_name_rules(name):
    assert "NCC names are 3-30" in spec_errors(azure_hub(databricks=_databricks(ncc_name=name)))


def test_databricks_ids():
    assert "must be a UUID" in spec_errors(azure_hub(databricks=_databricks(account_id="acct-1")))
    assert "numeric workspace id" in spec_errors(azure_hub(databricks=_databricks(workspace_id="adb-12")))
    assert "must be the workspace URL" in spec_errors(azure_hub(databricks=_databricks(host="adb-1.azuredatabricks.net")))


def _tunnel_routes(count: int, **route) -> list[dict]:
    return [{"name": f"db{k:02d}", "kind": "tunnel", "port": 3300 + k, "target": f"db{k:02d}.corp.example:3306",
             **route} for k in range(count)]


def test_serverless_hub_has_at_most_ten_route_domains():
    """Databricks docs (security/network/serverless-network-security/pl-to-internal-network,
    Requirements): "Each private endpoint rule for private connectivity to resources in your VPC
    supports up to 10 domain names". The hub's one NCC rule carries every distinct route domain, so
    an 11th fails at apply: it is refused here, naming the field, the limit, the count and the fix."""
    message = spec_errors(azure_hub(routes=_tunnel_routes(11), databricks=_databricks()))
    assert "routes = 11: the hub's routes have 11 distinct domains" in message
    assert "carries at most 10 domain names" in message and "shared routes[].domain" in message
    assert load_hubs(azure_hub(routes=_tunnel_routes(10), databricks=_databricks()))  # 10 is allowed


def test_route_domain_limit_counts_distinct_resolved_domains():
    """Routes sharing a domain count once; a forward route counts its target host (its derived
    domain); without serverless_enabled there is no rule and no limit."""
    shared = _tunnel_routes(10) + [{"name": "db10", "kind": "tunnel", "port": 3310, "target": "db00.corp.example:1433",
                                    "domain": "db00.weu.tunnelhub.internal"}]
    assert len({r.domain for r in load_hubs(azure_hub(routes=shared, databricks=_databricks())).hubs[0].routes}) == 10
    forward = _tunnel_routes(10) + [{"name": "aoai", "kind": "forward", "port": 443,
                                     "target": "contoso-aoai.openai.azure.com:443"}]
    aws = aws_hub(routes=forward, databricks=_databricks(host="https://dbc-1234567.cloud.databricks.com"))
    assert "the hub's routes have 11 distinct domains" in spec_errors(aws)
    assert load_hubs(azure_hub(routes=_tunnel_routes(11), databricks=_databricks(serverless_enabled=False)))


def test_classic_network_id_per_cloud():
    hub = aws_hub(databricks=_databricks(host="https://dbc-1234567.cloud.databricks.com",
                                         classic={"network_id": "vnet-1", "cidrs": ["10.80.0.0/16"]}))
    assert "must be the workspace VPC id" in spec_errors(hub)
    hub = azure_hub(databricks=_databricks(classic={"network_id": "vpc-0a1b2c3d4e5f60718", "cidrs": ["10.139.0.0/16"]}))
    assert "Azure: must be the workspace VNet's resource id" in spec_errors(hub)


# ------------------------------------------------------------------ backends


def test_cloud_backend_workspaces_are_not_shared():
    backend = {"type": "cloud", "organization": "acme", "workspace": "hub"}
    message = spec_errors(azure_hub(backend=backend), aws_hub(backend=backend))
    assert "hubs[1].backend.workspace" in message and "each hub stack needs its own workspace" in message


def test_backend_type():
    assert "hubs[0].backend" in spec_errors(azure_hub(backend={"type": "s3"}))


# ------------------------------------------------------------------ helpers


def _vnet_id(name: str) -> str:
    return f"/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/{name}"


def _existing_vnet() -> dict:
    vnet = _vnet_id("hub-vnet")
    return {
        "vnet_id": vnet,
        "proxy_subnet_id": vnet + "/subnets/proxies",
        "proxy_subnet_cidr": "10.90.1.0/26",
        "pls_nat_subnet_id": vnet + "/subnets/pls-nat",
    }


def _existing_vpc() -> dict:
    return {
        "vpc_id": "vpc-0123456789abcdef0",
        "vpc_cidr": "10.90.0.0/22",
        "proxy_subnets": [
            {"id": "subnet-0123456789abcdef0", "cidr": "10.90.0.0/26", "availability_zone": "us-east-1a"},
            {"id": "subnet-0123456789abcdef1", "cidr": "10.90.0.64/26", "availability_zone": "us-east-1b"},
        ],
        "nlb_subnets": [
            {"id": "subnet-0123456789abcdef2", "cidr": "10.90.1.0/26", "availability_zone": "us-east-1a"},
            {"id": "subnet-0123456789abcdef3", "cidr": "10.90.1.64/26", "availability_zone": "us-east-1b"},
        ],
    }


def _databricks(host: str = "https://adb-1234567890123456.7.azuredatabricks.net", **overrides) -> dict:
    db = {
        "account_id": "0d2f1a6e-4b7c-4e2a-9c1d-3f5e6a7b8c9d",
        "workspace_id": "1234567890123456",
        "workspace_host": host,
    }
    db.update(overrides)
    return db


# ------------------------------------------------------------------ rules the stacks rely on


def test_aws_nat_gateway_egress_needs_a_private_circuit():
    message = spec_errors(aws_hub(network={"cidr": "10.70.0.0/24", "egress": "nat_gateway"}))
    assert "network.egress = 'nat_gateway': with a NAT gateway" in message
    assert "set onprem.private_circuit: true" in message
    assert load_hubs(aws_hub(network={"cidr": "10.70.0.0/24", "egress": "nat_gateway"},
                             onprem={"source_cidrs": ["192.168.10.0/24"], "private_circuit": True}))


def test_aws_tag_keys_must_fit_instance_metadata():
    assert "tags.cost/center = 'cost/center': the proxies expose their tags" in spec_errors(aws_hub(tags={"cost/center": "1"}))
    assert load_hubs(azure_hub(tags={"cost/center": "1"}))  # Azure has no such rule


def test_uneven_aws_slots_are_a_warning():
    report = validate_text(spec_text(aws_hub(proxies={"count": 3})), "t.yaml")
    assert any("3 slots over 2 zones" in w.message for w in report.warnings)


def test_azure_admin_keys_are_ed25519_or_rsa():
    ecdsa = ("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBG6+PLK6iTYIQIcaJpWPBRJ6Uv4kCJdd6UjDv"
             "OTpRYjGslamstg8M1Auhvl5kuWhbq0aAOJNd7wwAmLoOKMP+h4= admin@test")
    assert "Azure VMs accept only ssh-ed25519 and ssh-rsa" in spec_errors(azure_hub(proxies={"admin_ssh_public_keys": [ecdsa]}))
    assert load_hubs(aws_hub(proxies={"admin_ssh_public_keys": [ecdsa]}))


def test_existing_vnet_ids_must_have_the_right_shape():
    vnet = _existing_vnet()
    vnet["proxy_subnet_id"] = vnet["vnet_id"] + "/subnets/proxies/extra"
    assert "existing_vnet.proxy_subnet_id" in spec_errors(azure_hub(network={"existing_vnet": vnet}))


def test_workspace_side_peering_in_another_subscription():
    other = "99999999-8888-7777-6666-555555555555"
    classic = {"network_id": f"/subscriptions/{other}/resourceGroups/dbx/providers/Microsoft.Network/virtualNetworks/w",
               "cidrs": ["10.139.0.0/16"]}
    hub = azure_hub(azure={"subscription_id": "11111111-2222-3333-4444-555555555555"},
                    databricks=_databricks(classic=classic))
    assert "set remote_peering_enabled: false" in spec_errors(hub)
    classic["remote_peering_enabled"] = False
    report = validate_text(spec_text(azure_hub(azure={"subscription_id": "11111111-2222-3333-4444-555555555555"},
                                               databricks=_databricks(classic=classic))), "t.yaml")
    assert any("get no private DNS zone on the classic network" in w.message for w in report.warnings)


# ------------------------------------------------------------------ the on-prem path (Azure)

_VHUB_ID = "/subscriptions/99999999-8888-7777-6666-555555555555/resourceGroups/vwan/providers/Microsoft.Network/virtualHubs/vh"


def _with_path(**path) -> dict:
    return azure_hub(network={"cidr": "10.60.0.0/24", "onprem_path": path})


def test_a_new_vnet_needs_an_onprem_path_an_existing_one_does_not():
    """A new VNet is isolated: Azure routes a VNet to on-prem only through a gateway it has, one
    a peered VNet shares (gateway transit, learn.microsoft.com/azure/vpn-gateway/
    vpn-gateway-peering-gateway-transit: "Routes to the gateway-connected virtual networks or
    on-premises networks propagate to the routing tables for the peered virtual networks using
    gateway transit") or a Virtual WAN hub connection; an existing VNet already has its routes."""
    message = spec_errors(azure_hub(network={"cidr": "10.60.0.0/24"}))
    assert ("network.onprem_path: a new VNet (network.cidr) has no route to on-prem, so the tunnel host cannot "
            "reach the proxies: add onprem_path with hub_vnet_id") in message
    assert "or virtual_hub_id (your Virtual WAN hub), or use network.existing_vnet" in message
    assert load_hubs(azure_hub(network={"existing_vnet": _existing_vnet()})).hubs[0].network.onprem_path is None
    path = load_hubs(azure_hub()).hubs[0].network.onprem_path
    assert (path.hub_vnet_id, path.use_remote_gateways, path.remote_peering_enabled) == (HUB_VNET_ID, True, True)
    assert "onprem_path is for Azure hubs" in spec_errors(aws_hub(network={"cidr": "10.70.0.0/24", **ONPREM_PATH}))


@pytest.mark.parametrize("path, fragment", [
    ({}, "network.onprem_path: give exactly one of hub_vnet_id (peering to the VNet with your ExpressRoute/VPN "
         "gateway) or virtual_hub_id (a Virtual WAN hub connection); given: none"),
    ({"hub_vnet_id": HUB_VNET_ID, "virtual_hub_id": _VHUB_ID}, "given: hub_vnet_id, virtual_hub_id"),
    ({"hub_vnet_id": HUB_VNET_ID + "/subnets/GatewaySubnet"},
     "onprem_path.hub_vnet_id = '/subscriptions/1111"),
    ({"hub_vnet_id": HUB_VNET_ID + "/subnets/GatewaySubnet"},
     "must be the hub VNet's resource id, ending in .../Microsoft.Network/virtualNetworks/<vnet>"),
    ({"virtual_hub_id": HUB_VNET_ID}, "onprem_path.virtual_hub_id = '/subscriptions/1111"),
    ({"virtual_hub_id": HUB_VNET_ID}, "must be a Virtual WAN hub id ending in .../Microsoft.Network/virtualHubs/<hub>"),
    ({"virtual_hub_id": _VHUB_ID, "use_remote_gateways": True},
     "onprem_path.use_remote_gateways: use_remote_gateways applies to the hub_vnet_id peering only"),
    ({"hub_vnet_id": HUB_VNET_ID, "internet_security_enabled": True},
     "internet_security_enabled applies to a Virtual WAN hub connection (virtual_hub_id) only"),
    ({"hub_vnet_id": "not-an-id"}, "must be an Azure resource id"),
], ids=["neither", "both", "subnet-id", "subnet-id-shape", "vnet-as-vhub", "vnet-as-vhub-shape",
        "peering-flag-on-vwan", "vwan-flag-on-peering", "not-an-id"])
def test_onprem_path_forms_and_id_shapes(path, fragment):
    """Exactly one form; each id of its own resource type: ``remote_virtual_network_id`` is a
    VNet id, ``virtual_hub_id`` a Virtual WAN hub id (azurerm 4.55.0 website/docs/r/
    virtual_network_peering.html.markdown, virtual_hub_connection.html.markdown); the gateway
    flags belong to the peering, ``internet_security_enabled`` to the hub connection."""
    assert fragment in spec_errors(_with_path(**path))


def test_onprem_hub_vnet_peering_in_another_subscription():
    """The provider creates a peering in the stack's subscription
    (internal/services/network/virtual_network_peering_resource.go@v4.55.0 builds the id from the
    client's ``Account.SubscriptionId``), so the remote half in another subscription is the
    user's to create, as for the Databricks workspace peering; a Virtual WAN hub connection is
    created under the hub's own id (virtual_hub_connection_resource.go@v4.55.0), so it may be
    anywhere."""
    other = HUB_VNET_ID.replace("11111111-2222-3333-4444-555555555555", "99999999-8888-7777-6666-555555555555")
    settings = {"subscription_id": "11111111-2222-3333-4444-555555555555"}
    hub = azure_hub(azure=settings, network={"cidr": "10.60.0.0/24", "onprem_path": {"hub_vnet_id": other}})
    assert ("network.onprem_path.remote_peering_enabled = true: the hub VNet is in subscription "
            "99999999-8888-7777-6666-555555555555 but the hub deploys to 11111111-2222-3333-4444-555555555555"
            ) in spec_errors(hub)
    assert "set remote_peering_enabled: false and create that half (allow_gateway_transit: true)" in spec_errors(hub)
    hub["network"]["onprem_path"]["remote_peering_enabled"] = False
    assert load_hubs(hub).hubs[0].network.onprem_path.remote_peering_enabled is False
    assert load_hubs(azure_hub(azure=settings, network={"cidr": "10.60.0.0/24",
                                                        "onprem_path": {"virtual_hub_id": _VHUB_ID}}))


def test_an_existing_vnet_cannot_peer_with_itself():
    vnet = _existing_vnet()
    hub = azure_hub(network={"existing_vnet": vnet, "onprem_path": {"hub_vnet_id": vnet["vnet_id"]}})
    assert "a VNet cannot peer with itself; remove onprem_path" in spec_errors(hub)


_AWS_HOST = "https://dbc-1234567890123456.cloud.databricks.com"
_AWS_CLASSIC = {"network_id": "vpc-0a1b2c3d4e5f60718", "cidrs": ["10.80.0.0/16"]}


def test_aws_classic_in_the_same_account_needs_its_route_tables():
    """Without routes in the workspace VPC, classic compute has no path to the NLB (AWS VPC Peering
    Guide, "Update your route tables": both sides need a route), and its DNS zones would point
    the route names at an unreachable address."""
    hub = aws_hub(databricks=_databricks(_AWS_HOST, classic=dict(_AWS_CLASSIC)))
    message = spec_errors(hub)
    assert "databricks.classic.aws_route_table_ids" in message and "classic compute needs a route to the hub" in message
    assert "remote_peering_enabled: false" in message
    assert load_hubs(aws_hub(databricks=_databricks(_AWS_HOST, classic={**_AWS_CLASSIC, "aws_route_table_ids": [
        "rtb-0a1b2c3d4e5f60718"]})))


def test_aws_classic_in_another_account_leaves_its_half_of_the_peering_to_that_account():
    """aws 6.25.0 docs, r/vpc_peering_connection: auto_accept only within one account and region;
    the accepter side (r/vpc_peering_connection_accepter) needs the owner's credentials."""
    other = {**_AWS_CLASSIC, "aws_account_id": "210987654321"}
    message = spec_errors(aws_hub(databricks=_databricks(_AWS_HOST, classic=other)))
    assert "classic.remote_peering_enabled = true" in message and "account 210987654321" in message
    assert "set remote_peering_enabled: false" in message and "classic_peering_id" in message
    routed = {**other, "remote_peering_enabled": False, "aws_route_table_ids": ["rtb-0a1b2c3d4e5f60718"]}
    assert "classic.aws_route_table_ids: these routes are the workspace side" in spec_errors(
        aws_hub(databricks=_databricks(_AWS_HOST, classic=routed)))
    report = validate_text(spec_text(aws_hub(databricks=_databricks(_AWS_HOST, classic={
        **other, "remote_peering_enabled": False}))), "t.yaml")
    assert any("get no private DNS zone on the classic network" in w.message for w in report.warnings)


def test_existing_vpc_nlb_route_tables():
    vpc = {"vpc_id": "vpc-0123456789abcdef0", "vpc_cidr": "10.100.0.0/16",
           "proxy_subnets": [{"id": f"subnet-0aaaaaaaaaaaaaaa{z}", "cidr": f"10.100.{z}.0/24",
                              "availability_zone": f"us-east-1{'ab'[z]}"} for z in (0, 1)],
           "nlb_subnets": [{"id": f"subnet-0bbbbbbbbbbbbbbb{z}", "cidr": f"10.100.{z + 2}.0/24",
                            "availability_zone": f"us-east-1{'ab'[z]}"} for z in (0, 1)]}
    classic = {**_AWS_CLASSIC, "aws_route_table_ids": ["rtb-0a1b2c3d4e5f60718"]}
    bad = aws_hub(network={"existing_vpc": {**vpc, "nlb_route_table_ids": ["main"]}})
    assert "existing_vpc.nlb_route_table_ids[0] = 'main': must be a route table id" in spec_errors(bad)
    report = validate_text(spec_text(aws_hub(network={"existing_vpc": vpc},
                                             databricks=_databricks(_AWS_HOST, classic=classic))), "t.yaml")
    (warning,) = report.warnings
    assert warning.dotted_path == "hubs[0].network.existing_vpc.nlb_route_table_ids"
    assert "no route from the NLB subnets to databricks.classic.cidrs" in warning.message
    given = {**vpc, "nlb_route_table_ids": ["rtb-0ccccccccccccccc1"]}
    assert validate_text(spec_text(aws_hub(network={"existing_vpc": given},
                                           databricks=_databricks(_AWS_HOST, classic=classic))), "t.yaml").warnings == []


def test_network_policy_name():
    hub = azure_hub(databricks=_databricks(network_policy={"name": "weu egress policy"}))
    assert "network_policy.name = 'weu egress policy': Databricks network policy ids" in spec_errors(hub)


def test_user_variable_must_not_be_a_password_variable_and_catalogs_unique():
    hub = azure_hub(databricks=_databricks(connections=[
        {"route": "orders-mysql", "user": "u", "password_var": "pw1", "foreign_catalog": {"name": "orders"}},
        {"route": "billing-pg", "user_var": "pw1", "password_var": "pw2",
         "foreign_catalog": {"name": "orders", "database": "billing"}},
    ]))
    message = spec_errors(hub)
    assert "connections[1].user_var = 'pw1': this variable also holds a password" in message
    assert "connections[1].foreign_catalog.name = 'orders': foreign catalog names must be unique" in message


def test_foreign_catalog_database_per_type():
    needs = azure_hub(databricks=_databricks(connections=[
        {"route": "billing-pg", "user": "u", "password_var": "p", "foreign_catalog": {"name": "billing"}}]))
    assert "a postgresql foreign catalog needs the remote database" in spec_errors(needs)
    unused = validate_text(spec_text(azure_hub(databricks=_databricks(connections=[
        {"route": "orders-mysql", "user": "u", "password_var": "p", "foreign_catalog": {"name": "o", "database": "x"}}]))),
        "t.yaml")
    assert any("MySQL foreign catalog mirrors every database" in w.message for w in unused.warnings)


def test_two_serverless_hubs_on_one_workspace_warn():
    report = validate_text(spec_text(azure_hub(databricks=_databricks()),
                                     azure_hub(name="weu2", network={**ONPREM_PATH, "cidr": "10.61.0.0/24"}, databricks=_databricks())),
                           "t.yaml")
    assert any("also binds its NCC to this workspace" in w.message for w in report.warnings)


# ------------------------------------------------------------------ issue 13: visibility, teardown, quotas


def test_issue13_defaults():
    """Defaults that let a first deploy work on a stock account: the PLS visible to every
    subscription (azurerm 4.55.0 private_link_service_resource.go: visibility_subscription_ids
    accepts a UUID or "*"; Databricks creates the serverless endpoint from its own subscription),
    no auto-approval, an unreserved slot Lambda (AWS Lambda "Configuring reserved concurrency":
    a function may reserve only the unreserved account concurrency minus 100), a 600 s approval
    wait (terraform-provider-databricks 1.99.0 returns the rule while CREATING; PR #5743 polls it
    for up to 30 minutes), and the destroy guard on."""
    azure = load_hubs(azure_hub(databricks=_databricks())).hubs[0]
    assert azure.azure is None  # defaults come from AzureSettings()
    from tunnelhub.spec import AwsSettings, AzureSettings

    assert AzureSettings().pls_visibility_subscription_ids == ["*"]
    assert AzureSettings().pls_auto_approval_subscription_ids == []
    assert AwsSettings().slot_lambda_reserved_concurrency is None
    assert azure.databricks.approval_wait_s == 600
    assert azure.protect is True
    overridden = load_hubs(azure_hub(protect=False, databricks=_databricks(approval_wait_s=0),
                                     azure={"pls_visibility_subscription_ids": ["*"]})).hubs[0]
    assert (overridden.protect, overridden.databricks.approval_wait_s) == (False, 0)


def test_issue13_bad_overrides_name_the_field_and_the_fix():
    """Values the clouds would reject or that silently break serverless: an approval wait outside
    0-3600 s, a reserved concurrency of 0 (Lambda API Concurrency: minimum 0, and 0 throttles every
    invocation), an empty PLS visibility list on a serverless hub, "*" mixed with ids."""
    wait = spec_errors(azure_hub(databricks=_databricks(approval_wait_s=4000)))
    assert "databricks.approval_wait_s = 4000: must be 0-3600 seconds (default 600" in wait
    assert "databricks.approval_wait_s = -1: must be 0-3600" in spec_errors(
        azure_hub(databricks=_databricks(approval_wait_s=-1)))
    reserved = spec_errors(aws_hub(aws={"slot_lambda_reserved_concurrency": 0}))
    assert "aws.slot_lambda_reserved_concurrency = 0: must be at least 1" in reserved
    assert "remove the key to leave the function unreserved" in reserved
    hidden = spec_errors(azure_hub(databricks=_databricks(), azure={"pls_visibility_subscription_ids": []}))
    assert "azure.pls_visibility_subscription_ids = []: an empty list hides the Private Link Service" in hidden
    mixed = spec_errors(azure_hub(azure={"pls_visibility_subscription_ids": ["*", "11111111-2222-3333-4444-555555555555"]}))
    assert 'give either ["*"] or a list of subscription ids' in mixed
    assert "must be a UUID" in spec_errors(azure_hub(azure={"pls_visibility_subscription_ids": ["everyone"]}))
    # Without serverless nobody needs to see the PLS: an empty list is the user's choice.
    load_hubs(azure_hub(databricks=_databricks(serverless_enabled=False), azure={"pls_visibility_subscription_ids": []}))


def test_ncc_binding_warning_for_every_serverless_hub():
    """A workspace has one NCC and databricks_mws_ncc_binding overwrites it
    (terraform-provider-databricks PR #5401, docs of mws_ncc_binding); whether the workspace already
    has one is only known to the account API, so validate/synth print this line for every
    serverless hub, and none for a hub without serverless."""
    from tunnelhub.spec import ncc_binding_warnings

    spec = load_spec(EXAMPLE)
    lines = ncc_binding_warnings(spec.hubs)
    assert len(lines) == 2
    assert lines[0] == (
        "warning: hub 'weu': binding NCC 'weu-ncc' to workspace 1234567890123456 replaces any NCC the workspace "
        "already has (its serverless private endpoints stop working); this cannot be checked offline: run "
        "`databricks account workspaces get 1234567890123456` and check that network_connectivity_config_id is "
        "empty or already 'weu-ncc' (docs/teardown.md)"
    )
    assert ncc_binding_warnings(load_hubs(azure_hub(databricks=_databricks(serverless_enabled=False))).hubs) == []
    assert ncc_binding_warnings(load_hubs(azure_hub()).hubs) == []


# --------------------------------------------------------------------------------------------
# monitoring (issue 16)
# --------------------------------------------------------------------------------------------


def test_monitoring_defaults_alerts_on_and_nobody_to_notify():
    """Without a monitoring block the alerts exist (visible in Azure Monitor / CloudWatch) and no
    notification goes anywhere: there is no address to send it to."""
    (hub,) = load_hubs(azure_hub()).hubs
    assert hub.monitoring.alerts is True
    assert (hub.monitoring.email, hub.monitoring.webhook, hub.monitoring.scrape_cidrs) == ([], [], [])


def test_monitoring_takes_one_address_or_a_list():
    (hub,) = load_hubs(aws_hub(monitoring={"email": "ops@example.com", "webhook": ["https://hooks.example.com/a"],
                                           "scrape_cidrs": ["10.99.0.0/24"]})).hubs
    assert hub.monitoring.email == ["ops@example.com"]
    assert hub.monitoring.webhook == ["https://hooks.example.com/a"]
    assert [str(c) for c in hub.monitoring.scrape_cidrs] == ["10.99.0.0/24"]


@pytest.mark.parametrize("email", ["ops", "ops@", "@example.com", "ops@example", "a b@example.com", "ops@@example.com",
                                   "ops..x@example.com"])
def test_monitoring_email_must_be_an_address(email):
    message = spec_errors(azure_hub(monitoring={"email": [email]}))
    assert "monitoring.email[0]" in message and "write it like ops@example.com" in message


@pytest.mark.parametrize("url, fragment", [
    ("http://hooks.example.com/x", "must use https://"),
    ("https://", "not a webhook URL"),
    ("ftp://hooks.example.com", "not a webhook URL"),
    ("https://bad host/x", "not a webhook URL"),
])
def test_monitoring_webhook_must_be_https(url, fragment):
    message = spec_errors(aws_hub(monitoring={"webhook": url}))
    assert "monitoring.webhook[0]" in message and fragment in message


def test_monitoring_scrape_cidrs_are_cidrs_and_never_everything():
    assert "host bits are set: did you mean 10.99.0.0/24?" in spec_errors(azure_hub(monitoring={"scrape_cidrs": ["10.99.0.1/24"]}))
    message = spec_errors(aws_hub(monitoring={"scrape_cidrs": ["0.0.0.0/0"]}))
    assert "monitoring.scrape_cidrs[0]" in message and "list the Prometheus servers' networks" in message


def test_monitoring_receivers_without_alerts_or_twice_are_refused():
    message = spec_errors(azure_hub(monitoring={"alerts": False, "email": "ops@example.com"}))
    assert "monitoring.email" in message and "alerts: false creates no alert" in message
    message = spec_errors(aws_hub(monitoring={"email": ["ops@example.com", "OPS@example.com"]}))
    assert "monitoring.email[1]" in message and "listed twice (email[0])" in message
    assert "unknown key 'emails' (did you mean 'email'?)" in spec_errors(azure_hub(monitoring={"emails": ["a@b.co"]}))


@pytest.mark.parametrize("interval, threshold, detection, window, azure, periods", [
    (5, 2, 10, 60, "PT1M", 1),        # the defaults: one metric minute
    (30, 2, 60, 60, "PT1M", 1),
    (30, 5, 150, 180, "PT5M", 3),     # Azure has no 3-minute window: the next allowed one
    (60, 10, 600, 600, "PT15M", 10),
    (300, 10, 3000, 3000, "PT1H", 50),
])
def test_alert_timing_is_the_probe_detection_time_in_whole_metric_minutes(interval, threshold, detection, window,
                                                                         azure, periods):
    """D = probe_interval_s x probe_threshold (the LB takes a proxy out after that long); W = D
    rounded up to whole minutes, at least one (both clouds' LB metrics have a one-minute grain);
    Azure takes the smallest allowed window_size >= W (PT1M, PT5M, PT15M, PT30M, PT1H, PT6H, PT12H,
    P1D: azurerm 4.55.0 monitor_metric_alert_resource.go), AWS W / 60 periods of 60 s."""
    from tunnelhub.constructs.alerting import alert_timing

    (hub,) = load_hubs(aws_hub(proxies={"probe_interval_s": interval, "probe_threshold": threshold})).hubs
    timing = alert_timing(hub)
    assert (timing.detection_s, timing.window_s, timing.azure_window, timing.evaluation_periods) == (
        detection, window, azure, periods)
