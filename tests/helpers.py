"""Shared test helpers: a minimal valid spec to mutate, and spec validation shortcuts."""

from __future__ import annotations

import copy
from typing import Any, Callable

import yaml

from tunnelhub.spec import SpecError, SpecFile, validate_text

TUNNEL_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9TnaTPCfkVHI4enHIB/o1Z2+M6vNsVV5AK6J06BCGO tunnel@test"
ADMIN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP+AblpMjOtzFvfeyo3AcFmgH6jHTRl1IJn/pxPRZBhL admin@test"


def azure_hub(**overrides: Any) -> dict[str, Any]:
    hub: dict[str, Any] = {
        "name": "weu",
        "cloud": "azure",
        "region": "westeurope",
        "network": {"cidr": "10.60.0.0/24"},
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
