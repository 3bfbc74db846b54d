"""Shared test helpers: a minimal valid spec to mutate, and spec validation shortcuts."""

from __future__ import annotations

import copy
from typing import Any, Callable

import yaml

from tunnelhub.spec import SpecError, SpecFile, validate_text

TUNNEL_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9TnaTPCfkVHI4enHIB/o1Z2+M6vNsVV5AK6J06BCGO tunnel@test"
ADMIN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP+AblpMjOtzFvfeyo3AcFmgH6jHTRl1IJn/pxPRZBhL admin@test"

HUB_VNET_ID = ("/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/connectivity-rg/providers/"
               "Microsoft.Network/virtualNetworks/hub-vnet")
"""The connectivity VNet (ExpressRoute/VPN gateway) a new Azure hub VNet peers with."""


def azure_hub(**overrides: Any) -> dict[str, Any]:
    hub: dict[str, Any] = {
        "name": "weu",
        "cloud": "azure",
        "region": "westeurope",
        "network": {"cidr": "10.60.0.0/24", "onprem_path": {"hub_vnet_id": HUB_VNET_ID}},
        "routes": [
            {"name": "orders-mysql", "kind": "tunnel", "port": 3306, "target": "orders-db.corp.example:3306", "type": "mysql"},
            {"name": "billing-pg", "kind": "tunnel", "port": 5432, "target": "192.168.20.15:5432", "type": "postgresql"},
        ],
        "onprem": {"source_cidrs": ["192.168.10.0/24"], "tunnel_public_keys": [TUNNEL_KEY]},
    }
    hub.update(overrides)
    return hub


def aws_hub(**overrides: Any) -> dict[str, Any]:
    hub: dict[str, Any] = {
        "name": "use",
        "cloud": "aws",
        "region": "us-east-1",
        "network": {"cidr": "10.70.0.0/24"},
        "routes": [
            {"name": "inventory-mysql", "kind": "tunnel", "port": 3306, "target": "inventory-db.corp.example:3306", "type": "mysql"},
            {"name": "aoai", "kind": "forward", "port": 443, "target": "contoso-aoai.openai.azure.com:443"},
        ],
        "onprem": {"source_cidrs": ["203.0.113.0/28"], "tunnel_public_keys": [TUNNEL_KEY]},
    }
    hub.update(overrides)
    return hub


def spec_text(*hubs: dict[str, Any]) -> str:
    return yaml.safe_dump({"version": 1, "hubs": list(hubs)}, sort_keys=False)


def load_hubs(*hubs: dict[str, Any]) -> SpecFile:
    return validate_text(spec_text(*hubs), "test.yaml").spec


def spec_errors(*hubs: dict[str, Any], text: str | None = None) -> str:
    """The rendered SpecError for an invalid spec (fails the test if the spec is valid)."""
    try:
        validate_text(text if text is not None else spec_text(*hubs), "test.yaml")
    except SpecError as exc:
        return str(exc)
    raise AssertionError("the spec was accepted, but it should have been rejected")


def mutated(hub: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    hub = copy.deepcopy(hub)
    change(hub)
    return hub


# ---------------------------------------------------------------------------------------------
# Routine and machine changes (issue 14): the same catalogue for the document tests, the synth
# tests and the e2e lab. A routine change must reach the proxies live (the bootstrap user data is
# byte-identical); a machine change replaces them.
# ---------------------------------------------------------------------------------------------

SECOND_TUNNEL_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ3b6Y1lV2fQ9m6Xb9y0aZk0K8yYb5j3v5m9v2Yk0xQf tunnel@second"
THIRD_TUNNEL_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPmAX4lMsC1a80G3W9G2nKtRwND9ECIx9NwNvNbitm4c tunnel@third"


def tunnel_hosts(*hosts: dict[str, Any], source_cidrs: tuple[str, ...] = ("192.168.10.0/24",)) -> dict[str, Any]:
    """An ``onprem`` block in the several-hosts form (``onprem.tunnel_hosts``)."""
    return {"source_cidrs": list(source_cidrs), "tunnel_hosts": [dict(h) for h in hosts]}


def first_host_keys(hub: dict[str, Any]) -> list[str]:
    """The key list of a hub's first tunnel host, in either form of the spec (to mutate)."""
    onprem = hub["onprem"]
    if onprem.get("tunnel_hosts"):
        return onprem["tunnel_hosts"][0].setdefault("public_keys", [])
    return onprem.setdefault("tunnel_public_keys", [])


def _add_tunnel_route(hub: dict[str, Any]) -> None:
    hub["routes"].append({"name": "erp-mssql", "kind": "tunnel", "port": 1433, "target": "erp-db.corp.example:1433",
                          "type": "sqlserver"})


def _add_forward_route(hub: dict[str, Any]) -> None:
    hub["routes"].append({"name": "partner-api", "kind": "forward", "port": 8443, "target": "api.partner.example:443"})


def _remove_route(hub: dict[str, Any]) -> None:
    gone = hub["routes"].pop()["name"]
    databricks = hub.get("databricks") or {}
    databricks["connections"] = [c for c in databricks.get("connections", []) if c["route"] != gone]


def _rotate_tunnel_key(hub: dict[str, Any]) -> None:
    first_host_keys(hub)[:] = [SECOND_TUNNEL_KEY]  # the new key in, the old one revoked


def _add_tunnel_host(hub: dict[str, Any]) -> None:
    """Another tunnel host (a hub in the single-host form is written in the several-hosts form,
    its host keeping the default name and so its ports)."""
    onprem = hub["onprem"]
    if not onprem.get("tunnel_hosts"):
        onprem["tunnel_hosts"] = [{"name": "tunnel-host", "public_keys": onprem.pop("tunnel_public_keys", [])}]
    onprem["tunnel_hosts"].append({"name": "dc-added", "public_keys": [THIRD_TUNNEL_KEY]})


ROUTINE_CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "add-tunnel-route": _add_tunnel_route,
    "add-forward-route": _add_forward_route,
    "remove-route": _remove_route,
    "max-connections": lambda h: h["routes"][0].update(max_connections=250),
    "idle-timeout": lambda h: h["routes"][0].update(idle_timeout_min=45),
    "route-probe": lambda h: h["routes"][0].update(probe={"interval_s": 3, "timeout_s": 1.5}),
    "lb-probe": lambda h: h.setdefault("proxies", {}).update(probe_interval_s=10, probe_threshold=3),
    "add-tunnel-key": lambda h: first_host_keys(h).append(SECOND_TUNNEL_KEY),
    "rotate-tunnel-key": _rotate_tunnel_key,
    "add-tunnel-host": _add_tunnel_host,
    "source-cidrs": lambda h: h["onprem"]["source_cidrs"].append("198.51.100.0/24"),
    "more-proxies": lambda h: h.setdefault("proxies", {}).update(count=4),
}
"""Routine changes of a hub: every one reaches the running proxies through the document."""

MACHINE_CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "admin-key": lambda h: h.setdefault("proxies", {}).update(admin_ssh_public_keys=[SECOND_TUNNEL_KEY]),
    "tunnel-user": lambda h: h["onprem"].update(tunnel_user="tunnel2"),
    "health-port": lambda h: h.setdefault("proxies", {}).update(health_port=8099),
}
"""Changes of the machine's bootstrap: the proxies are replaced (and the synth report says so)."""


DATABRICKS_OVERRIDE_WAIT_S = 900


def overrides_text() -> str:
    """One spec with every issue-13 override at once (an Azure and an AWS hub, both
    ``protect: false``, an explicit PLS visibility and auto-approval list, a reserved slot Lambda
    concurrency, a longer approval wait): synthesized once per session, shared by the synth tests."""
    databricks = {
        "account_id": "0d2f1a6e-4b7c-4e2a-9c1d-3f5e6a7b8c9d",
        "approval_wait_s": DATABRICKS_OVERRIDE_WAIT_S,
    }
    azure = azure_hub(
        name="ovz", network={"cidr": "10.61.0.0/24", "onprem_path": {"hub_vnet_id": HUB_VNET_ID}}, protect=False,
        databricks={**databricks, "workspace_id": "1234567890123457",
                    "workspace_host": "https://adb-1234567890123457.7.azuredatabricks.net"},
        azure={"pls_visibility_subscription_ids": ["11111111-2222-3333-4444-555555555555"],
               "pls_auto_approval_subscription_ids": ["11111111-2222-3333-4444-555555555555"]},
    )
    aws = aws_hub(
        name="ova", network={"cidr": "10.71.0.0/24"}, protect=False,
        databricks={**databricks, "workspace_id": "2345678901234568",
                    "workspace_host": "https://dbc-2345678901234568.cloud.databricks.com"},
        aws={"slot_lambda_reserved_concurrency": 5},
    )
    return spec_text(azure, aws)


# ---------------------------------------------------------------------------------------------
# Monitoring (issue 16): one spec with a monitoring block and non-default probe settings on
# both clouds, synthesized once per session and shared by the hub and checkov tests.
# ---------------------------------------------------------------------------------------------

MONITORING = {
    "email": ["oncall@example.com", "dba@example.com"],
    "webhook": "https://hooks.example.com/tunnelhub/alerts",
    "scrape_cidrs": ["10.99.0.0/24"],
}
MONITORING_PROBES = {"probe_interval_s": 30, "probe_threshold": 5}
"""D = 30 s x 5 = 150 s: W = 180 s (AWS: 3 one-minute periods; Azure: the next allowed window, PT5M)."""


def monitoring_text() -> str:
    azure = azure_hub(name="mon", network={"cidr": "10.62.0.0/24", "onprem_path": {"hub_vnet_id": HUB_VNET_ID}},
                      proxies={"count": 3, **MONITORING_PROBES}, monitoring=MONITORING)
    aws = aws_hub(name="moa", network={"cidr": "10.72.0.0/24"}, proxies={"count": 3, **MONITORING_PROBES},
                  monitoring=MONITORING)
    return spec_text(azure, aws)
