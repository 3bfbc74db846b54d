"""The Azure hub stack: every resource issue 4 lists, read from the synthesized Terraform JSON.

GIVEN the example spec's ``weu`` hub (synthesized once per session by the ``example`` fixture)
and four variants of it (each synthesized once), WHEN the stack is built, THEN the JSON holds
exactly the resources and properties the hub needs, no private key material, and a spec change
touches only the resources it should.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
import re

import pytest
import yaml

from tests.conftest import EXAMPLE_SPEC
from tests.helpers import MONITORING, monitoring_text, overrides_text, spec_text
from tunnelhub.spec import SpecError, load_spec, validate_text

pytestmark = pytest.mark.synth

STACK = "weu-azure"
OUTPUTS = {"lb_frontend_ip", "pls_id", "pls_alias", "proxy_private_ips", "tunnel_endpoints", "nat_public_ip",
           "host_public_key", "port_plan", "ncc_id", "private_endpoint_rule_id", "config_version"}


# --------------------------------------------------------------------------------------------
# Helpers over the synthesized JSON
# --------------------------------------------------------------------------------------------


def of_type(stack: dict, rtype: str) -> dict[str, dict]:
    """Resources of one type, by logical name."""
    return stack.get("resource", {}).get(rtype, {})


def one(stack: dict, rtype: str) -> tuple[str, dict]:
    found = of_type(stack, rtype)
    assert len(found) == 1, f"expected one {rtype}, found {sorted(found)}"
    return next(iter(found.items()))


def by_path(stack: dict, rtype: str, path_suffix: str) -> tuple[str, dict]:
    """The resource of ``rtype`` whose construct path ends with ``path_suffix``."""
    hits = [(n, b) for n, b in of_type(stack, rtype).items() if b["//"]["metadata"]["path"].endswith(path_suffix)]
    assert len(hits) == 1, f"{rtype} at */{path_suffix}: {[n for n, _ in hits]}"
    return hits[0]


def ref(rtype: str, name: str, attr: str) -> str:
    return "${" + f"{rtype}.{name}.{attr}" + "}"


def addresses(stack: dict) -> dict[str, dict]:
    """Every resource and data source by Terraform address, bodies without cdktf metadata."""
    out = {}
    for kind, prefix in (("resource", ""), ("data", "data.")):
        for rtype, items in stack.get(kind, {}).items():
            for name, body in items.items():
                out[f"{prefix}{rtype}.{name}"] = {k: v for k, v in body.items() if k != "//"}
    return out


def decoded_custom_data(vm: dict) -> str:
    raw = base64.b64decode(vm["custom_data"], validate=True)
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode()


def example_hub_dict() -> dict:
    return copy.deepcopy(yaml.safe_load(EXAMPLE_SPEC.read_text())["hubs"][0])


def hub_model(hub: dict):
    return validate_text(spec_text(hub), "test.yaml").spec.hubs[0]


# --------------------------------------------------------------------------------------------
# Spec variants (each synthesized once per session through the shared fixture)
# --------------------------------------------------------------------------------------------


def with_new_route(hub: dict) -> dict:
    hub["routes"].append({"name": "erp-mssql", "kind": "tunnel", "port": 1433, "target": "erp-db.corp.example:1433",
                          "type": "sqlserver"})
    return hub


def with_third_proxy(hub: dict) -> dict:
    hub["proxies"]["count"] = 3
    return hub


WORKSPACE_SUB = "99999999-8888-7777-6666-555555555555"
EXISTING_VNET = "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/net-rg/providers/Microsoft.Network/virtualNetworks/shared-vnet"


def alternative(hub: dict) -> dict:
    """Every other branch at once: existing VNet, no egress, no zones, no admin key, PLS lists,
    a workspace VNet in another subscription without the remote half, a named resource group, no
    alerts."""
    hub["network"] = {
        "existing_vnet": {
            "vnet_id": EXISTING_VNET,
            "proxy_subnet_id": EXISTING_VNET + "/subnets/proxies",
            "proxy_subnet_cidr": "10.61.4.0/27",
            "pls_nat_subnet_id": EXISTING_VNET + "/subnets/pls-nat",
        },
        "egress": "none",
        "availability_zones": [],
    }
    hub["proxies"] = {"count": 1, "health_port": 9000, "probe_interval_s": 10, "probe_threshold": 3}
    hub["monitoring"] = {"alerts": False}
    hub["routes"][0]["idle_timeout_min"] = 60
    hub["databricks"]["classic"]["network_id"] = (
        f"/subscriptions/{WORKSPACE_SUB}/resourceGroups/dbx-rg/providers/Microsoft.Network/virtualNetworks/dbx-vnet")
    hub["databricks"]["classic"]["remote_peering_enabled"] = False
    hub["azure"].update({
        "resource_group": "proxy-hub-weu",
        "pls_visibility_subscription_ids": [WORKSPACE_SUB],
        "pls_auto_approval_subscription_ids": [WORKSPACE_SUB],
    })
    return hub


VIRTUAL_HUB_ID = (f"/subscriptions/{WORKSPACE_SUB}/resourceGroups/vwan-rg/providers/Microsoft.Network/"
                  "virtualHubs/vhub-weu")


def with_virtual_wan(hub: dict) -> dict:
    """The on-prem path through a Virtual WAN hub (in another subscription) instead of peering."""
    hub["network"]["onprem_path"] = {"virtual_hub_id": VIRTUAL_HUB_ID}
    return hub


@pytest.fixture(scope="module")
def weu(example) -> dict:
    return example.stack(STACK)


@pytest.fixture(scope="module")
def alt(synth_spec) -> dict:
    return synth_spec(text=spec_text(alternative(example_hub_dict()))).stack(STACK)


@pytest.fixture(scope="module")
def hub():
    return load_spec(EXAMPLE_SPEC).hub("weu")


@pytest.fixture(scope="module")
def overrides(synth_spec):
    """Every issue-13 override at once (tests/helpers.py), shared with the AWS and Databricks tests."""
    return synth_spec(text=overrides_text())


# --------------------------------------------------------------------------------------------
# Network, NSG, egress
# --------------------------------------------------------------------------------------------


def test_resource_group_vnet_and_the_two_subnets(weu):
    rg_name, rg = one(weu, "azurerm_resource_group")
    assert (rg["name"], rg["location"]) == ("weu-rg", "westeurope")
    vnet_name, vnet = one(weu, "azurerm_virtual_network")
    assert vnet["address_space"] == ["10.60.0.0/24"]
    _, proxies = by_path(weu, "azurerm_subnet", "/proxy_subnet")
    _, pls_nat = by_path(weu, "azurerm_subnet", "/pls_nat_subnet")
    assert proxies["address_prefixes"] == ["10.60.0.0/26"]
    assert pls_nat["address_prefixes"] == ["10.60.0.64/26"]
    assert pls_nat["private_link_service_network_policies_enabled"] is False
    assert "private_link_service_network_policies_enabled" not in proxies
    for subnet in (proxies, pls_nat):
        assert subnet["virtual_network_name"] == ref("azurerm_virtual_network", vnet_name, "name")
        assert subnet["resource_group_name"] == ref("azurerm_resource_group", rg_name, "name")
        assert subnet["default_outbound_access_enabled"] is False


def test_nsg_allows_exactly_ssh_routes_and_health_then_denies_everything(weu):
    nsg_name, _nsg = by_path(weu, "azurerm_network_security_group", "/proxy_nsg")
    rules = {r["name"]: r for r in of_type(weu, "azurerm_network_security_rule").values()}
    for r in rules.values():
        assert r["network_security_group_name"] == ref("azurerm_network_security_group", nsg_name, "name")
        assert r["direction"] == "Inbound"

    def shape(r):
        return (r["priority"], r["access"], r["protocol"],
                tuple(r.get("source_address_prefixes") or [r.get("source_address_prefix")]),
                tuple(r.get("destination_port_ranges") or [r.get("destination_port_range")]),
                r["destination_address_prefix"])

    assert {name: shape(r) for name, r in rules.items()} == {
        "allow-ssh-from-onprem": (100, "Allow", "Tcp", ("192.168.10.0/24",), ("22",), "10.60.0.0/26"),
        "allow-routes": (110, "Allow", "Tcp", ("10.139.0.0/16", "10.60.0.64/26"), ("3306", "5432"), "10.60.0.0/26"),
        "allow-health-probe": (120, "Allow", "Tcp", ("AzureLoadBalancer",), ("8080",), "10.60.0.0/26"),
        # the rollout gate: a proxy's reconciler asks its canary peer (docs/live-config.md)
        "allow-health-from-proxies": (125, "Allow", "Tcp", ("10.60.0.0/26",), ("8080",), "10.60.0.0/26"),
        # the peer path: HAProxy's backup servers are the peers' peer ports (docs/proxy-runtime.md)
        "allow-peer-ports-from-proxies": (127, "Allow", "Tcp", ("10.60.0.0/26",), ("23306", "25432"), "10.60.0.0/26"),
        "deny-all-inbound": (4096, "Deny", "*", ("*",), ("*",), "*"),
    }
    # The deny rule sits below every allow rule and above Azure's AllowVnetInBound (65000).
    allows = [r["priority"] for r in rules.values() if r["access"] == "Allow"]
    assert max(allows) < rules["deny-all-inbound"]["priority"] < 65000
    _, proxy_subnet_assoc = by_path(weu, "azurerm_subnet_network_security_group_association", "/proxy_nsg_association")
    proxy_subnet, _ = by_path(weu, "azurerm_subnet", "/proxy_subnet")
    assert proxy_subnet_assoc["subnet_id"] == ref("azurerm_subnet", proxy_subnet, "id")
    assert proxy_subnet_assoc["network_security_group_id"] == ref("azurerm_network_security_group", nsg_name, "id")
    # The PLS NAT subnet has an NSG too (policy hygiene), with Azure's default rules only.
    pls_nsg, _ = by_path(weu, "azurerm_network_security_group", "/pls_nat_nsg")
    _, pls_assoc = by_path(weu, "azurerm_subnet_network_security_group_association", "/pls_nat_nsg_association")
    pls_subnet, _ = by_path(weu, "azurerm_subnet", "/pls_nat_subnet")
    assert pls_assoc["subnet_id"] == ref("azurerm_subnet", pls_subnet, "id")
    assert pls_assoc["network_security_group_id"] == ref("azurerm_network_security_group", pls_nsg, "id")


def test_nat_gateway_with_a_static_ip_on_the_proxy_subnet(weu):
    ip_name, ip = one(weu, "azurerm_public_ip")
    assert (ip["allocation_method"], ip["sku"], ip["zones"]) == ("Static", "Standard", ["1", "2", "3"])
    nat_name, nat = one(weu, "azurerm_nat_gateway")
    assert nat["sku_name"] == "Standard"
    _, ip_assoc = one(weu, "azurerm_nat_gateway_public_ip_association")
    assert ip_assoc == {**ip_assoc, "nat_gateway_id": ref("azurerm_nat_gateway", nat_name, "id"),
                        "public_ip_address_id": ref("azurerm_public_ip", ip_name, "id")}
    assoc_name, assoc = one(weu, "azurerm_subnet_nat_gateway_association")
    proxy_subnet, _ = by_path(weu, "azurerm_subnet", "/proxy_subnet")
    assert assoc["subnet_id"] == ref("azurerm_subnet", proxy_subnet, "id")
    assert assoc["nat_gateway_id"] == ref("azurerm_nat_gateway", nat_name, "id")
    assert weu["output"]["nat_public_ip"]["value"] == ref("azurerm_public_ip", ip_name, "ip_address")
    # Proxies install packages at first boot: they are created only once egress is in place.
    for vm in of_type(weu, "azurerm_linux_virtual_machine").values():
        assert f"azurerm_subnet_nat_gateway_association.{assoc_name}" in vm["depends_on"]


# --------------------------------------------------------------------------------------------
# Proxies and host identity
# --------------------------------------------------------------------------------------------


def test_proxy_vms_static_ips_zones_image_and_hardening(weu, hub):
    from tunnelhub.userdata import render_cloud_init, render_document

    vms = of_type(weu, "azurerm_linux_virtual_machine")
    assert len(vms) == 2
    _, _pool = one(weu, "azurerm_lb_backend_address_pool")
    pool_name = next(iter(of_type(weu, "azurerm_lb_backend_address_pool")))
    for slot, (address, zone) in enumerate((("10.60.0.5", "1"), ("10.60.0.6", "2"))):
        nic_name, nic = by_path(weu, "azurerm_network_interface", f"/slot{slot}/nic")
        (ipc,) = nic["ip_configuration"]
        assert (ipc["private_ip_address_allocation"], ipc["private_ip_address"]) == ("Static", address)
        assert "public_ip_address_id" not in ipc
        assert nic["ip_forwarding_enabled"] is False
        _, vm = by_path(weu, "azurerm_linux_virtual_machine", f"/slot{slot}/vm")
        assert vm["name"] == f"weu-proxy-{slot}"
        assert vm["zone"] == zone
        assert vm["network_interface_ids"] == [ref("azurerm_network_interface", nic_name, "id")]
        assert vm["size"] == "Standard_D2s_v5"
        assert vm["source_image_reference"] == {"publisher": "Canonical", "offer": "ubuntu-24_04-lts",
                                                "sku": "server", "version": "latest"}
        assert vm["disable_password_authentication"] is True
        assert "admin_password" not in vm
        assert vm["admin_username"] == "tunnelhub"
        assert vm["admin_ssh_key"] == [{"username": "tunnelhub", "public_key": hub.proxies.admin_ssh_public_keys[0]}]
        assert vm["encryption_at_host_enabled"] is True
        assert vm["boot_diagnostics"] == {}  # managed boot diagnostics storage
        assert vm["identity"] == {"type": "SystemAssigned"}
        assert vm["custom_data"] == render_cloud_init(hub, slot).base64
        # The hub configuration document: user_data (updatable in place), its version as a tag.
        document = render_document(hub)
        assert base64.b64decode(vm["user_data"]) == document.text.encode()
        assert vm["tags"]["tunnelhub-config-version"] == document.version == weu["output"]["config_version"]["value"]
        _, assoc = by_path(weu, "azurerm_network_interface_backend_address_pool_association", f"/slot{slot}/pool_association")
        assert assoc["network_interface_id"] == ref("azurerm_network_interface", nic_name, "id")
        assert assoc["backend_address_pool_id"] == ref("azurerm_lb_backend_address_pool", pool_name, "id")
        assert assoc["ip_configuration_name"] == ipc["name"]


def test_host_key_lives_in_key_vault_and_only_the_proxies_read_it(weu):
    key_name, key = one(weu, "tls_private_key")  # only the host key: the spec gives an admin key
    assert key["algorithm"] == "ED25519"
    vault_name, vault = one(weu, "azurerm_key_vault")
    assert vault["rbac_authorization_enabled"] is True
    assert vault["purge_protection_enabled"] is True
    assert "access_policy" not in vault
    secret_name, secret = one(weu, "azurerm_key_vault_secret")
    assert secret["value"] == ref("tls_private_key", key_name, "private_key_openssh")
    assert secret["key_vault_id"] == ref("azurerm_key_vault", vault_name, "id")
    versionless = ref("azurerm_key_vault_secret", secret_name, "versionless_id")
    assignments = of_type(weu, "azurerm_role_assignment")
    readers = {}
    for name, vm in of_type(weu, "azurerm_linux_virtual_machine").items():
        assert vm["tags"]["tunnelhub-host-key-secret"] == versionless
        (reader,) = [a for a in assignments.values()
                     if a["principal_id"] == ref("azurerm_linux_virtual_machine", name, "identity[0].principal_id")]
        readers[name] = reader
    for reader in readers.values():
        assert reader["role_definition_name"] == "Key Vault Secrets User"
        assert reader["scope"] == ref("azurerm_key_vault_secret", secret_name, "resource_versionless_id")
        assert reader["principal_type"] == "ServicePrincipal"
    # The only other assignment lets the deployer write secrets into this vault (and nothing wider).
    (deployer,) = [a for a in assignments.values() if a not in readers.values()]
    assert deployer["role_definition_name"] == "Key Vault Secrets Officer"
    assert deployer["scope"] == ref("azurerm_key_vault", vault_name, "id")
    assert weu["output"]["host_public_key"]["value"] == ref("tls_private_key", key_name, "public_key_openssh")


# Key material, not the words: a PEM block with a body, or the base64 of "openssh-key-v1\0" that
# starts every OpenSSH private key (the proxy's fetch script names the header to check a value).
KEY_MATERIAL = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----\s*[A-Za-z0-9+/=]{16}|b3BlbnNzaC1rZXktdjE")


def test_key_material_pattern_finds_a_real_key():
    sample = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAAB\n"
              "-----END OPENSSH PRIVATE KEY-----\n")
    assert KEY_MATERIAL.search(sample) and KEY_MATERIAL.search(json.dumps({"v": sample}))
    assert not KEY_MATERIAL.search('if "-----BEGIN OPENSSH PRIVATE KEY-----" not in text:')


def test_no_private_key_material_in_the_stack_or_in_any_custom_data(example, weu):
    text = example.text(STACK)
    assert "PRIVATE KEY" not in text and not KEY_MATERIAL.search(text)
    # Private key attributes are referenced only by the Key Vault secrets.
    users = [(t, n) for t, items in weu["resource"].items() for n, b in items.items() if "private_key_" in json.dumps(b)]
    assert {t for t, _ in users} == {"azurerm_key_vault_secret"}
    assert "private_key" not in json.dumps(weu["output"]).replace("tls_private_key.", "")
    for vm in of_type(weu, "azurerm_linux_virtual_machine").values():
        cloud_init = decoded_custom_data(vm)
        assert cloud_init.startswith("#cloud-config")
        assert not KEY_MATERIAL.search(cloud_init)
        assert "${" not in vm["custom_data"]  # a literal: nothing Terraform-generated is embedded


# --------------------------------------------------------------------------------------------
# Load balancer and Private Link Service
# --------------------------------------------------------------------------------------------


def test_internal_standard_lb_with_a_static_frontend_in_the_proxy_subnet(weu):
    _lb_name, lb = one(weu, "azurerm_lb")
    assert lb["sku"] == "Standard"
    (frontend,) = lb["frontend_ip_configuration"]
    proxy_subnet, _ = by_path(weu, "azurerm_subnet", "/proxy_subnet")
    assert frontend["subnet_id"] == ref("azurerm_subnet", proxy_subnet, "id")
    assert (frontend["private_ip_address_allocation"], frontend["private_ip_address"]) == ("Static", "10.60.0.4")
    assert "public_ip_address_id" not in frontend and "public_ip_address_id" not in lb
    assert frontend["zones"] == ["1", "2", "3"]


def test_one_http_probe_and_one_tcp_rule_per_route(weu, hub):
    lb_name = next(iter(of_type(weu, "azurerm_lb")))
    pool_name = next(iter(of_type(weu, "azurerm_lb_backend_address_pool")))
    probes = of_type(weu, "azurerm_lb_probe")
    rules = of_type(weu, "azurerm_lb_rule")
    assert len(probes) == len(rules) == len(hub.routes) == 2
    for route in hub.routes:
        probe_name, probe = by_path(weu, "azurerm_lb_probe", f"/route-{route.name}/probe")
        assert {k: probe[k] for k in ("protocol", "port", "request_path", "interval_in_seconds", "probe_threshold",
                                      "number_of_probes", "loadbalancer_id")} == {
            "protocol": "Http", "port": 8080, "request_path": f"/routes/{route.name}", "interval_in_seconds": 5,
            "probe_threshold": 2, "number_of_probes": 2, "loadbalancer_id": ref("azurerm_lb", lb_name, "id")}
        _, rule = by_path(weu, "azurerm_lb_rule", f"/route-{route.name}/rule")
        assert {k: v for k, v in rule.items() if k not in ("//", "name", "loadbalancer_id")} == {
            "protocol": "Tcp",
            "frontend_ip_configuration_name": "frontend",
            "frontend_port": route.port,
            "backend_port": route.port,
            "backend_address_pool_ids": [ref("azurerm_lb_backend_address_pool", pool_name, "id")],
            "probe_id": ref("azurerm_lb_probe", probe_name, "id"),
            "tcp_reset_enabled": True,
            "idle_timeout_in_minutes": 30,
            "disable_outbound_snat": True,
            "floating_ip_enabled": False,
            "load_distribution": "Default",
        }


def test_private_link_service_on_the_frontend_with_nat_in_its_own_subnet(weu):
    lb_name = next(iter(of_type(weu, "azurerm_lb")))
    _, pls = one(weu, "azurerm_private_link_service")
    assert pls["load_balancer_frontend_ip_configuration_ids"] == [
        ref("azurerm_lb", lb_name, "frontend_ip_configuration[0].id")]
    (nat,) = pls["nat_ip_configuration"]
    pls_subnet, _ = by_path(weu, "azurerm_subnet", "/pls_nat_subnet")
    assert nat["subnet_id"] == ref("azurerm_subnet", pls_subnet, "id") and nat["primary"] is True
    assert "auto_approval_subscription_ids" not in pls  # approval is the stack's own, for its rule only


def test_pls_is_visible_to_every_subscription_by_default_and_the_spec_list_replaces_it(weu, overrides):
    """Databricks creates the serverless endpoint from its own subscription, whose id is not
    published; azurerm 4.55.0 (internal/services/network/private_link_service_resource.go) takes
    ``visibility_subscription_ids`` elements that are a UUID or "*" and sends them as
    ``visibility.subscriptions``. Default ``["*"]``, no auto-approval; a spec list is sent as given."""
    _, pls = one(weu, "azurerm_private_link_service")
    assert pls["visibility_subscription_ids"] == ["*"]
    assert "auto_approval_subscription_ids" not in pls
    _, pls = one(overrides.stack("ovz-azure"), "azurerm_private_link_service")
    assert pls["visibility_subscription_ids"] == ["11111111-2222-3333-4444-555555555555"]
    assert pls["auto_approval_subscription_ids"] == ["11111111-2222-3333-4444-555555555555"]


GUARDED = ("azurerm_lb", "azurerm_private_link_service", "azurerm_key_vault",
           "databricks_mws_network_connectivity_config", "databricks_mws_ncc_private_endpoint_rule")


def test_lb_pls_vault_ncc_and_rule_prevent_destroy_unless_protect_is_false(weu, overrides):
    """Terraform's lifecycle meta-argument: with ``prevent_destroy = true`` Terraform rejects with an
    error any plan that would destroy the object (a replacement included, and ``terraform destroy``),
    as long as the setting stays in the configuration (developer.hashicorp.com/terraform/language/
    meta-arguments/lifecycle). A replaced LB or PLS drops the Databricks endpoint; a replaced vault
    fails (purge protection keeps its name 90 days). ``protect: false`` removes the guard."""
    for rtype in GUARDED:
        _, body = one(weu, rtype)
        assert body["lifecycle"] == {"prevent_destroy": True}, rtype
        _, body = one(overrides.stack("ovz-azure"), rtype)
        assert "lifecycle" not in body, rtype
    # Nothing else is guarded: the proxies, probes and rules change in routine deploys.
    guarded = {rtype for rtype, items in weu["resource"].items()
               for body in items.values() if body.get("lifecycle", {}).get("prevent_destroy")}
    assert guarded == set(GUARDED)


def test_peering_both_halves_with_the_workspace_vnet(weu, hub):
    vnet_name = next(iter(of_type(weu, "azurerm_virtual_network")))
    workspace_vnet = hub.databricks.classic.network_id
    _, local = by_path(weu, "azurerm_virtual_network_peering", "/hub_to_workspace")
    _, remote = by_path(weu, "azurerm_virtual_network_peering", "/workspace_to_hub")
    assert local["virtual_network_name"] == ref("azurerm_virtual_network", vnet_name, "name")
    assert local["remote_virtual_network_id"] == workspace_vnet
    assert (remote["resource_group_name"], remote["virtual_network_name"]) == ("dbx-weu-rg", "dbx-weu-vnet")
    assert remote["remote_virtual_network_id"] == ref("azurerm_virtual_network", vnet_name, "id")
    for half in (local, remote):
        assert (half["allow_virtual_network_access"], half["allow_forwarded_traffic"]) == (True, False)
    (pre,) = remote["lifecycle"]["precondition"]
    assert '"11111111-2222-3333-4444-555555555555"' in pre["condition"]


def test_onprem_path_peers_both_ways_with_gateway_transit_remote_half_first(weu, hub):
    """A new VNet reaches on-prem only once peered with the VNet holding the ExpressRoute/VPN
    gateway: that VNet's half allows gateway transit, ours uses the remote gateways and accepts
    forwarded traffic (azurerm 4.55.0 website/docs/r/virtual_network_peering.html.markdown:
    ``use_remote_gateways`` takes effect when "``allow_gateway_transit`` on the remote peering is
    also ``true``"; learn.microsoft.com/azure/vpn-gateway/vpn-gateway-peering-gateway-transit).
    Azure rejects ours while the remote half lacks AllowGatewayTransit
    (hashicorp/terraform-provider-azurerm#2872: "Peering-to-Gateway cannot have UseRemoteGateways
    flag set to true, because corresponding remote peering has AllowGatewayTransit flag set to
    false"), so ours depends on it. The provider creates a peering in the stack's subscription
    (virtual_network_peering_resource.go@v4.55.0: ``NewVirtualNetworkPeeringID(subscriptionId``
    from the client account), hence the precondition on the remote half."""
    vnet_name = next(iter(of_type(weu, "azurerm_virtual_network")))
    remote_vnet = hub.network.onprem_path.hub_vnet_id
    ours_name, ours = by_path(weu, "azurerm_virtual_network_peering", "/onprem_path/hub_to_onprem_hub")
    theirs_name, theirs = by_path(weu, "azurerm_virtual_network_peering", "/onprem_path/onprem_hub_to_hub")
    flags = ("allow_virtual_network_access", "allow_forwarded_traffic", "allow_gateway_transit", "use_remote_gateways")
    assert ours["virtual_network_name"] == ref("azurerm_virtual_network", vnet_name, "name")
    assert ours["remote_virtual_network_id"] == remote_vnet
    assert tuple(ours[f] for f in flags) == (True, True, False, True)
    assert (theirs["resource_group_name"], theirs["virtual_network_name"]) == ("connectivity-weu-rg", "hub-weu-vnet")
    assert theirs["remote_virtual_network_id"] == ref("azurerm_virtual_network", vnet_name, "id")
    assert tuple(theirs[f] for f in flags) == (True, False, True, False)
    assert ours["depends_on"] == [f"azurerm_virtual_network_peering.{theirs_name}"]
    (pre,) = theirs["lifecycle"]["precondition"]
    assert '"11111111-2222-3333-4444-555555555555"' in pre["condition"]
    assert "onprem_path.remote_peering_enabled: false" in pre["error_message"]
    # Only one peering of a VNet may use remote gateways (the same provider doc).
    assert [n for n, b in of_type(weu, "azurerm_virtual_network_peering").items() if b["use_remote_gateways"]] == [ours_name]
    assert not of_type(weu, "azurerm_virtual_hub_connection")


def test_onprem_path_through_a_virtual_wan_hub_is_one_hub_connection(synth_spec):
    """The Virtual WAN form: one ``azurerm_virtual_hub_connection`` of the hub VNet to the vWAN
    hub, no peering to on-prem (azurerm 4.55.0 website/docs/r/virtual_hub_connection.html.markdown:
    ``virtual_hub_id``, ``remote_virtual_network_id``, ``internet_security_enabled`` defaults to
    false). The connection is created under the vWAN hub's own id, so a hub in another subscription
    works (virtual_hub_connection_resource.go@v4.55.0: ``NewHubVirtualNetworkConnectionID(
    virtualHubId.SubscriptionId, ...``)."""
    stack = synth_spec(text=spec_text(with_virtual_wan(example_hub_dict()))).stack(STACK)
    vnet_name = next(iter(of_type(stack, "azurerm_virtual_network")))
    _, conn = one(stack, "azurerm_virtual_hub_connection")
    assert conn["virtual_hub_id"] == VIRTUAL_HUB_ID
    assert conn["remote_virtual_network_id"] == ref("azurerm_virtual_network", vnet_name, "id")
    assert conn["internet_security_enabled"] is False
    assert conn["name"] == "weu-tunnelhub"
    peerings = of_type(stack, "azurerm_virtual_network_peering").values()
    assert sorted(p["//"]["metadata"]["path"].rsplit("/", 1)[1] for p in peerings) == ["hub_to_workspace",
                                                                                       "workspace_to_hub"]


def test_outputs_and_tags(weu):
    outputs = weu["output"]
    assert set(outputs) == OUTPUTS
    assert outputs["lb_frontend_ip"]["value"] == "10.60.0.4"
    assert outputs["proxy_private_ips"]["value"] == ["10.60.0.5", "10.60.0.6"]
    assert outputs["tunnel_endpoints"]["value"] == ["10.60.0.5", "10.60.0.6"]
    pls_name = next(iter(of_type(weu, "azurerm_private_link_service")))
    assert outputs["pls_id"]["value"] == ref("azurerm_private_link_service", pls_name, "id")
    assert outputs["pls_alias"]["value"] == ref("azurerm_private_link_service", pls_name, "alias")
    taggable = 0
    for rtype, items in weu["resource"].items():
        for body in items.values():
            if "tags" in body:
                taggable += 1
                assert {"tunnelhub:hub": "weu", "owner": "data-platform"}.items() <= body["tags"].items(), rtype
    assert taggable >= 13


# --------------------------------------------------------------------------------------------
# The other branches (one synthesized variant)
# --------------------------------------------------------------------------------------------


def test_existing_vnet_no_egress_no_zones_generated_admin_key(alt):
    assert not of_type(alt, "azurerm_virtual_network") and not of_type(alt, "azurerm_subnet")
    assert not of_type(alt, "azurerm_nat_gateway") and not of_type(alt, "azurerm_public_ip")
    assert "nat_public_ip" not in alt["output"]
    _, rg = one(alt, "azurerm_resource_group")
    assert rg["name"] == "proxy-hub-weu"
    # The proxy subnet is the existing one; its addresses come from proxy_subnet_cidr.
    _, nic = one(alt, "azurerm_network_interface")
    assert nic["ip_configuration"][0]["subnet_id"] == EXISTING_VNET + "/subnets/proxies"
    assert nic["ip_configuration"][0]["private_ip_address"] == "10.61.4.5"
    _, lb = one(alt, "azurerm_lb")
    assert lb["frontend_ip_configuration"][0]["private_ip_address"] == "10.61.4.4"
    assert "zones" not in lb["frontend_ip_configuration"][0]
    _, vm = one(alt, "azurerm_linux_virtual_machine")
    assert "zone" not in vm
    assert alt["output"]["tunnel_endpoints"]["value"] == ["10.61.4.5"]
    # The PLS NAT subnet's ranges are read from Azure to open the route ports to them.
    (lookup_name, lookup), = alt["data"]["azurerm_subnet"].items()
    assert (lookup["name"], lookup["virtual_network_name"], lookup["resource_group_name"]) == (
        "pls-nat", "shared-vnet", "net-rg")
    rules = {r["name"]: r for r in of_type(alt, "azurerm_network_security_rule").values()}
    assert rules["allow-routes"]["source_address_prefixes"] == (
        '${concat(["10.139.0.0/16"], data.azurerm_subnet.' + lookup_name + '.address_prefixes)}')
    assert rules["allow-health-probe"]["destination_port_range"] == "9000"
    assert rules["allow-ssh-from-onprem"]["destination_address_prefix"] == "10.61.4.0/27"
    _, assoc = one(alt, "azurerm_subnet_network_security_group_association")
    assert assoc["subnet_id"] == EXISTING_VNET + "/subnets/proxies"
    # Probe settings and idle timeout come from the spec.
    probes = list(of_type(alt, "azurerm_lb_probe").values())
    assert {(p["port"], p["interval_in_seconds"], p["probe_threshold"]) for p in probes} == {(9000, 10, 3)}
    assert sorted(r["idle_timeout_in_minutes"] for r in of_type(alt, "azurerm_lb_rule").values()) == [30, 60]
    # No admin key in the spec: a generated one, its private half in the vault only.
    keys = of_type(alt, "tls_private_key")
    admin = [n for n, b in keys.items() if b["//"]["metadata"]["path"].endswith("/admin_key")]
    assert len(keys) == 2 and len(admin) == 1
    assert vm["admin_ssh_key"] == [{"username": "tunnelhub", "public_key": ref("tls_private_key", admin[0],
                                                                               "public_key_openssh")}]
    _, admin_secret = by_path(alt, "azurerm_key_vault_secret", "/admin_key_secret")
    assert admin_secret["value"] == ref("tls_private_key", admin[0], "private_key_openssh")
    # PLS visibility / auto-approval from the spec; peering only the hub half, in the existing VNet.
    _, pls = one(alt, "azurerm_private_link_service")
    assert pls["visibility_subscription_ids"] == [WORKSPACE_SUB]
    assert pls["auto_approval_subscription_ids"] == [WORKSPACE_SUB]
    _, peering = one(alt, "azurerm_virtual_network_peering")
    assert (peering["resource_group_name"], peering["virtual_network_name"]) == ("net-rg", "shared-vnet")
    assert peering["remote_virtual_network_id"].startswith(f"/subscriptions/{WORKSPACE_SUB}/")


ECDSA_KEY = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBG6+PLK6iTYIQIcaJpWPBRJ6Uv4kCJdd6UjDvOTpRYjGslamstg8M1Auhvl5kuWhbq0aAOJNd7wwAmLoOKMP+h4= admin@test"


@pytest.mark.parametrize("change, message", [
    (lambda h: h["databricks"]["classic"].update(network_id=(
        f"/subscriptions/{WORKSPACE_SUB}/resourceGroups/dbx-rg/providers/Microsoft.Network/virtualNetworks/dbx-vnet")),
     (r"databricks\.classic\.remote_peering_enabled = true: the workspace VNet is in subscription 99999999-.*"
     r"set remote_peering_enabled: false")),
    (lambda h: h["proxies"].update(admin_ssh_public_keys=[ECDSA_KEY]),
     r"proxies\.admin_ssh_public_keys\[0\] = 'ecdsa-sha2-nistp256': Azure VMs accept only ssh-ed25519 and ssh-rsa"),
    (lambda h: h["network"].pop("onprem_path"),
     r"network\.onprem_path: a new VNet \(network\.cidr\) has no route to on-prem.*add onprem_path with hub_vnet_id"),
], ids=["remote-peering-in-another-subscription", "ecdsa-admin-key", "new-vnet-without-onprem-path"])
def test_what_azure_cannot_build_is_a_spec_error_before_any_output(tmp_path, change, message):
    from tunnelhub.synth import synthesize

    hub = example_hub_dict()
    change(hub)
    with pytest.raises(SpecError, match=message):
        synthesize(validate_text(spec_text(hub), "test.yaml").spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Spec changes touch only what they should
# --------------------------------------------------------------------------------------------


def _diff(before: dict, after: dict) -> tuple[set[str], set[str], dict[str, set[str]]]:
    a, b = addresses(before), addresses(after)
    changed = {k: {f for f in set(a[k]) | set(b[k]) if a[k].get(f) != b[k].get(f)} for k in set(a) & set(b) if a[k] != b[k]}
    return set(b) - set(a), set(a) - set(b), changed


def test_a_new_route_adds_one_probe_and_one_rule_and_opens_its_port(synth_spec, weu):
    after = synth_spec(text=spec_text(with_new_route(example_hub_dict()))).stack(STACK)
    added, removed, changed = _diff(weu, after)
    assert removed == set()
    hub_parts = {a for a in added if a.startswith(("azurerm_lb_probe.", "azurerm_lb_rule.", "azurerm_monitor_metric_alert."))}
    assert sorted(a.split(".")[0] for a in hub_parts) == [
        "azurerm_lb_probe", "azurerm_lb_rule", "azurerm_monitor_metric_alert", "azurerm_monitor_metric_alert"]
    assert all("route-erp-mssql" in a for a in hub_parts)  # its probe-down and data-path alerts too
    # The Databricks wiring gives the new route's domain its private DNS zone (one name for classic
    # and serverless) and adds the domain to the NCC private endpoint rule.
    dns = added - hub_parts
    assert sorted(a.split(".")[0] for a in dns) == [
        "azurerm_private_dns_a_record", "azurerm_private_dns_zone", "azurerm_private_dns_zone_virtual_network_link"]
    rule = next(k for k in changed if k.startswith("databricks_mws_ncc_private_endpoint_rule."))
    assert changed.pop(rule) == {"domain_names"}
    assert "erp-mssql.weu.tunnelhub.internal" in addresses(after)[rule]["domain_names"]
    routes_rule = next(f"azurerm_network_security_rule.{n}" for n, r in of_type(weu, "azurerm_network_security_rule").items()
                       if r["name"] == "allow-routes")
    assert changed.pop(routes_rule) == {"destination_port_ranges"}
    peer_rule = next(f"azurerm_network_security_rule.{n}" for n, r in of_type(weu, "azurerm_network_security_rule").items()
                     if r["name"] == "allow-peer-ports-from-proxies")
    assert changed.pop(peer_rule) == {"destination_port_ranges"}  # the new route's peer port, in place
    # The proxies get the new route through the hub configuration document (user_data, applied
    # live) and its version tag, both updated in place; custom_data (ForceNew) does not change.
    assert all(k.startswith("azurerm_linux_virtual_machine.") and fields == {"user_data", "tags"}
               for k, fields in changed.items())
    new_rule = addresses(after)[next(a for a in added if a.startswith("azurerm_lb_rule."))]
    assert (new_rule["frontend_port"], new_rule["backend_port"]) == (1433, 1433)


def test_a_third_proxy_adds_its_vm_nic_pool_association_and_role_assignment_only(synth_spec, weu):
    after = synth_spec(text=spec_text(with_third_proxy(example_hub_dict()))).stack(STACK)
    added, removed, changed = _diff(weu, after)
    assert removed == set()
    assert sorted(a.split(".")[0] for a in added) == sorted([
        "azurerm_linux_virtual_machine", "azurerm_network_interface",
        "azurerm_network_interface_backend_address_pool_association", "azurerm_role_assignment"])
    assert all("_slot2_" in a for a in added)
    # The existing proxies learn their new peer through the document (in place); their bootstrap stays.
    assert all(k.startswith("azurerm_linux_virtual_machine.") and fields == {"user_data", "tags"}
               for k, fields in changed.items()), changed
    vm = addresses(after)[next(a for a in added if a.startswith("azurerm_linux_virtual_machine."))]
    assert vm["zone"] == "3"
    assert after["output"]["proxy_private_ips"]["value"] == ["10.60.0.5", "10.60.0.6", "10.60.0.7"]


# --------------------------------------------------------------------------------------------
# Alerts (issue 16)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def monitored(synth_spec) -> dict:
    """The monitoring variant of tests/helpers.py (shared with the AWS and checkov tests): email and
    webhook receivers, scrape CIDRs, probes every 30 s x 5, three proxies."""
    return synth_spec(text=monitoring_text()).stack("mon-azure")


def _alerts(stack: dict) -> dict[str, dict]:
    return {b["name"]: b for b in of_type(stack, "azurerm_monitor_metric_alert").values()}


def test_every_route_has_a_probe_down_and_a_data_path_alert_split_by_its_frontend_port(weu, hub):
    """azurerm 4.55.0 monitor_metric_alert: criteria with metric_namespace, metric_name, aggregation
    (Average/Count/Minimum/Maximum/Total), operator, threshold, dimension {name, operator Include,
    values}; frequency PT1M..PT1H, window_size PT1M..P1D (internal/services/monitor/
    monitor_metric_alert_resource.go@v4.55.0). Metric names and dimensions: Azure Monitor "Supported
    metrics for Microsoft.Network/loadBalancers" (DipAvailability = Health Probe Status, dimensions
    ProtocolType, BackendPort, FrontendIPAddress, FrontendPort, BackendIPAddress; VipAvailability =
    Data Path Availability, FrontendIPAddress, FrontendPort; time grain PT1M). Default probes (5 s x 2
    = 10 s) give the one-minute window; without receivers there is no action group and no action."""
    alerts = _alerts(weu)
    lb = ref("azurerm_lb", one(weu, "azurerm_lb")[0], "id")
    assert set(alerts) == {f"weu-route-{r.name}-{kind}" for r in hub.routes for kind in ("down", "data-path")}
    for route in hub.routes:
        down, data_path = alerts[f"weu-route-{route.name}-down"], alerts[f"weu-route-{route.name}-data-path"]
        for alert in (down, data_path):
            assert alert["scopes"] == [lb]
            assert (alert["frequency"], alert["window_size"], alert["auto_mitigate"]) == ("PT1M", "PT1M", True)
            (criteria,) = alert["criteria"]
            assert criteria["metric_namespace"] == "Microsoft.Network/loadBalancers"
            assert criteria["dimension"] == [{"name": "FrontendPort", "operator": "Include", "values": [str(route.port)]}]
            assert "action" not in alert
        assert {k: down["criteria"][0][k] for k in ("metric_name", "aggregation", "operator", "threshold")} == {
            "metric_name": "DipAvailability", "aggregation": "Maximum", "operator": "LessThan", "threshold": 1}
        assert {k: data_path["criteria"][0][k] for k in ("metric_name", "aggregation", "operator", "threshold")} == {
            "metric_name": "VipAvailability", "aggregation": "Average", "operator": "LessThan", "threshold": 90}
    assert of_type(weu, "azurerm_monitor_action_group") == {}


def test_the_action_group_carries_the_specs_receivers_and_every_alert_uses_it(monitored):
    """azurerm 4.55.0 monitor_action_group: email_receiver {name, email_address,
    use_common_alert_schema}, webhook_receiver {name, service_uri, use_common_alert_schema};
    short_name 1-12 characters, location "global" by default (monitor_action_group_resource.go@v4.55.0)."""
    name, group = one(monitored, "azurerm_monitor_action_group")
    assert len(group["short_name"]) <= 12 and group["location"] == "global"
    assert group["email_receiver"] == [
        {"name": f"email-{k}", "email_address": e, "use_common_alert_schema": True} for k, e in enumerate(MONITORING["email"])]
    assert group["webhook_receiver"] == [
        {"name": "webhook-0", "service_uri": MONITORING["webhook"], "use_common_alert_schema": True}]
    alerts = _alerts(monitored)
    assert len(alerts) == 4
    assert all(a["action"] == [{"action_group_id": ref("azurerm_monitor_action_group", name, "id")}] for a in alerts.values())


def test_the_alert_window_follows_the_probe_settings(monitored):
    """Probes every 30 s, 5 failures to mark a proxy down: D = 150 s, W = 180 s (whole metric
    minutes), and Azure's smallest allowed window of at least 180 s is PT5M (window_size values in
    monitor_metric_alert_resource.go@v4.55.0); the frequency stays PT1M."""
    from tunnelhub.constructs.alerting import alert_timing

    timing = alert_timing(validate_text(monitoring_text(), "m.yaml").spec.hub("mon"))
    assert (timing.detection_s, timing.window_s, timing.azure_window) == (150, 180, "PT5M")
    assert {(a["frequency"], a["window_size"]) for a in _alerts(monitored).values()} == {("PT1M", "PT5M")}


def test_scrape_cidrs_reach_the_health_port_only_and_alerts_false_creates_none(monitored, weu, alt):
    """monitoring.scrape_cidrs: one NSG rule admitting them to the health port (Prometheus scrapes
    GET /metrics there), below the deny-all; absent without scrape_cidrs. alerts: false leaves no
    alert and no action group."""
    rules = {r["name"]: r for r in of_type(monitored, "azurerm_network_security_rule").values()}
    scrape = rules["allow-health-from-scrapers"]
    assert scrape["source_address_prefixes"] == MONITORING["scrape_cidrs"]
    assert (scrape["destination_port_range"], scrape["access"], scrape["protocol"]) == ("8080", "Allow", "Tcp")
    assert scrape["priority"] < rules["deny-all-inbound"]["priority"]
    assert "allow-health-from-scrapers" not in {r["name"] for r in of_type(weu, "azurerm_network_security_rule").values()}
    assert of_type(alt, "azurerm_monitor_metric_alert") == {} and of_type(alt, "azurerm_monitor_action_group") == {}
