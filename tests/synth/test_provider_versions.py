"""The provider versions the synthesized stacks require: the one table in tunnelhub/providers.py,
not the exact versions the prebuilt bindings were generated from.

Why the databricks floor is 1.106.0: terraform-provider-databricks issue #5306 (an update of an
Azure ``databricks_mws_ncc_private_endpoint_rule``, such as a new route's ``domain_names``, fails
with "Updating fields enabled for Azure private endpoint rule ... is not supported"), because
``mws/resource_mws_ncc_private_endpoint_rule.go`` @v1.99.0 always puts ``enabled`` in the update
mask; fixed by PR #5326, released in v1.106.0 (CHANGELOG.md, "Release v1.106.0"); and until
v1.118.0 the same update failed with "Update mask must be specified" once the API's echoed
``account_id`` was in state (issue #5347, PR #5795, CHANGELOG.md "Release v1.118.0"): the floor
is 1.118.0.
"""

from __future__ import annotations

import re

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tunnelhub.providers import PROVIDER_VERSIONS

pytestmark = pytest.mark.synth

# The versions the prebuilt bindings pin (pyproject.toml's cdktf-cdktf-provider-* packages; azapi
# and time were "~> 2.4" / "~> 0.12" before the table): each must stay inside its constraint.
BINDING_VERSIONS = {"azurerm": "4.55.0", "aws": "6.25.0", "tls": "4.1.0", "azapi": "2.4.0", "time": "0.12.0"}


def specifier(constraint: str) -> SpecifierSet:
    """A Terraform constraint (``>= 1.2.0, < 2.0.0``) as a PEP 440 specifier set. Only the
    operators the table uses are accepted, so a ``~>`` or bare version fails here loudly."""
    parts = [p.strip() for p in constraint.split(",")]
    for p in parts:
        assert re.fullmatch(r"(>=|<) ?\d+\.\d+\.\d+", p), f"unexpected constraint part {p!r} in {constraint!r}"
    return SpecifierSet(",".join(p.replace(" ", "") for p in parts))


def test_every_stack_requires_exactly_the_tables_versions(example):
    seen = set()
    for name, stack in example.stacks.items():
        required = stack["terraform"]["required_providers"]
        for provider, entry in required.items():
            assert entry["version"] == PROVIDER_VERSIONS[provider], (name, provider)
            seen.add(provider)
    # the example exercises every provider of the table (Azure and AWS hubs, both with serverless)
    assert seen == set(PROVIDER_VERSIONS)


def test_databricks_floor_admits_the_fix_and_refuses_the_broken_release():
    databricks = specifier(PROVIDER_VERSIONS["databricks"])
    assert Version("1.118.0") in databricks
    assert Version("1.99.0") not in databricks and Version("1.105.0") not in databricks
    assert Version("1.117.0") not in databricks  # issue #5347, fixed by PR #5795 in v1.118.0
    assert Version("2.0.0") not in databricks


@pytest.mark.parametrize("provider", sorted(PROVIDER_VERSIONS))
def test_each_constraint_is_a_floor_within_one_major(provider):
    spec = specifier(PROVIDER_VERSIONS[provider])
    floor = next(Version(s.version) for s in spec if s.operator == ">=")
    ceiling = next(Version(s.version) for s in spec if s.operator == "<")
    assert ceiling == Version(f"{floor.major + 1}.0.0"), "the ceiling is the next major"
    assert floor in spec and Version(f"{floor.major}.{floor.minor + 5}.0") in spec
    if provider in BINDING_VERSIONS:
        assert Version(BINDING_VERSIONS[provider]) in spec
