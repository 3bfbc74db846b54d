"""The ``protect`` guard shared by both hubs and the Databricks wiring (docs/teardown.md).

``lifecycle { prevent_destroy = true }`` makes Terraform reject any plan that would destroy the
resource, a replacement included, as long as the setting stays in the configuration; so a routine
change can never replace the load balancer, the Private Link Service / endpoint service, the
Key Vault, the NCC or its endpoint rule, and ``terraform destroy`` stops too. ``protect: false`` in
the hub spec removes it for a planned destroy or replace.
"""

from __future__ import annotations

from cdktf import TerraformResourceLifecycle

from tunnelhub import spec as S


def protected(hub: S.Hub, **lifecycle: object) -> TerraformResourceLifecycle | None:
    """The lifecycle block of a guarded resource: ``prevent_destroy`` unless ``hub.protect`` is
    false, plus any other lifecycle arguments given."""
    if hub.protect:
        lifecycle["prevent_destroy"] = True
    return TerraformResourceLifecycle(**lifecycle) if lifecycle else None  # type: ignore[arg-type]
