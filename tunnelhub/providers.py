"""The Terraform provider versions every synthesized stack requires: one table, applied to
``terraform.required_providers`` of each :class:`~tunnelhub.app.HubStack` (docs/databricks.md,
"Provider versions").

The prebuilt bindings (``cdktf-cdktf-provider-*`` in pyproject.toml) write the exact provider
version they were generated from (databricks 1.99.0, ...). The bindings only shape the JSON, so
the stacks may run on any later release of the same major: each entry is a floor (the release
checked against, or the first with a fix the stacks need) and the next major as ceiling, in Terraform's constraint syntax. ``terraform init`` picks the newest
release that fits (or the one ``.terraform.lock.hcl`` pins).
"""

from __future__ import annotations

from cdktf import TerraformProvider, TerraformStack

PROVIDER_VERSIONS: dict[str, str] = {
    # databricks 1.99.0 (the bindings' version) sends `enabled` in the update mask of every
    # databricks_mws_ncc_private_endpoint_rule update (mws/resource_mws_ncc_private_endpoint_rule.go
    # @v1.99.0: `updateMask := []string{"enabled"}`), which the API refuses for Azure rules
    # ("Updating fields enabled for Azure private endpoint rule ... is not supported",
    # databricks/terraform-provider-databricks issue #5306): a new route changes the rule's
    # domain_names and the apply fails. Fixed by PR #5326 ("Only set 'enabled' when the field is
    # updated for ncc endpoint rules"), released in v1.106.0 (CHANGELOG.md, "Release v1.106.0":
    # "Fix the databricks_mws_ncc_private_endpoint_rule resource to support updates for non-S3
    # endpoint rules"); @v1.106.0 the mask holds `enabled` only `if d.HasChange("enabled")`, and
    # domain_names stays updatable in place (not ForceNew). And 1.106.0-1.117.x still fail an
    # update of the same rule once the API's echoed `account_id` is in state (a plan shows
    # `account_id -> null`, the apply fails with "Update mask must be specified": issue #5347),
    # fixed by PR #5795 (`account_id` Computed), released in v1.118.0 (CHANGELOG.md, "Release
    # v1.118.0"). CHANGELOG 1.100.0-1.118.0 changes none of the other resources or attributes these
    # stacks use (NCC, binding, network policy and option, connection, catalog) and lists no breaking
    # change for them. A stack whose .terraform.lock.hcl holds an older release needs
    # `terraform init -upgrade` once (docs/databricks.md).
    "databricks": ">= 1.118.0, < 2.0.0",
    # azurerm 4.55.0: the version the bindings (cdktf-cdktf-provider-azurerm 14.23.1) and the
    # ForceNew citations in tunnelhub/changes.py and docs/live-config.md were checked against.
    "azurerm": ">= 4.55.0, < 5.0.0",
    # aws 6.25.0: the version of cdktf-cdktf-provider-aws 21.22.1.
    "aws": ">= 6.25.0, < 7.0.0",
    # tls 4.1.0: the version of cdktf-cdktf-provider-tls 11.0.1.
    "tls": ">= 4.1.0, < 5.0.0",
    # azapi 2.4: azapi_update_resource as the PLS approval uses it (no prebuilt binding; was "~> 2.4").
    "azapi": ">= 2.4.0, < 3.0.0",
    # time 0.12: time_sleep with create_duration and triggers (no prebuilt binding; was "~> 0.12").
    # A 0.x provider: "< 1.0.0" is the major ceiling.
    "time": ">= 0.12.0, < 1.0.0",
}
"""Terraform version constraint per provider (the ``required_providers`` key)."""


def pin_provider_versions(stack: TerraformStack) -> None:
    """Set ``terraform.required_providers.<name>.version`` from :data:`PROVIDER_VERSIONS` for every
    provider construct directly in ``stack`` (where the stacks create them), replacing the
    bindings' exact version. A provider missing from the table is a programming error."""
    for child in stack.node.children:
        if not isinstance(child, TerraformProvider):
            continue
        name = child.terraform_resource_type
        if name not in PROVIDER_VERSIONS:
            raise KeyError(f"provider {name!r} has no entry in tunnelhub.providers.PROVIDER_VERSIONS: add one")
        stack.add_override(f"terraform.required_providers.{name}.version", PROVIDER_VERSIONS[name])
