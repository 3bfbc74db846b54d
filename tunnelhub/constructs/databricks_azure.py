"""Azure half of the Databricks wiring: approving the NCC's private endpoint on the hub's Private
Link Service, and the private DNS zones for classic compute.

**Approval.** Databricks creates the private endpoint in its own subscription and names it (the
rule's computed ``endpoint_name``); the request shows up on the PLS as a *pending* private
endpoint connection named ``<endpoint name>.<guid>``. No azurerm resource can approve it, so:

1. ``time_sleep`` (``triggers = {rule_id}``) waits ``wait_s`` seconds after the rule is created,
   so the connection has reached the PLS;
2. ``data azurerm_private_link_service_endpoint_connections`` (``depends_on`` the wait, so on the
   first deploy it is read during apply, after the wait) lists the PLS's connections;
3. a local picks the one whose ``private_endpoint_name`` is the rule's ``endpoint_name``;
4. ``azapi_update_resource`` on
   ``Microsoft.Network/privateLinkServices/privateEndpointConnections`` sets its state to
   ``Approved``. A precondition stops with an explicit message (run the deploy again, or the exact
   ``az`` command) when the connection is not there yet, instead of failing on an empty id.

On a later deploy nothing changes (same connection id); a rule replaced by a new PLS id gets a new
wait, lookup and approval. Deleting the approval resource changes nothing in Azure (azapi
semantics); deleting the rule removes the endpoint and its connection.
"""

from __future__ import annotations

from cdktf import (
    Precondition,
    TerraformLocal,
    TerraformProvider,
    TerraformResource,
    TerraformResourceLifecycle,
)
from cdktf_cdktf_provider_azurerm.data_azurerm_private_link_service_endpoint_connections import (
    DataAzurermPrivateLinkServiceEndpointConnections,
)
from cdktf_cdktf_provider_azurerm.private_dns_a_record import PrivateDnsARecord
from cdktf_cdktf_provider_azurerm.private_dns_zone import PrivateDnsZone
from cdktf_cdktf_provider_azurerm.private_dns_zone_virtual_network_link import PrivateDnsZoneVirtualNetworkLink
from cdktf_cdktf_provider_databricks.mws_ncc_private_endpoint_rule import MwsNccPrivateEndpointRule
from constructs import Construct

from tunnelhub.constructs.databricks_link import AzureEndpointTarget, approval_wait

PLS_CONNECTION_TYPE = "Microsoft.Network/privateLinkServices/privateEndpointConnections@2023-11-01"
DNS_TTL_S = 300


def approve_pls_connection(
    scope: Construct,
    *,
    rule: MwsNccPrivateEndpointRule,
    target: AzureEndpointTarget,
    ncc_name: str,
    time_provider: TerraformProvider,
    azapi_provider: TerraformProvider,
    wait_s: int,
) -> TerraformResource:
    """Approve the PLS connection of ``rule``'s endpoint; return the ``azapi_update_resource``."""
    wait = approval_wait(scope, rule, time_provider, wait_s)
    connections = DataAzurermPrivateLinkServiceEndpointConnections(
        scope,
        "pls_connections",
        service_id=target.private_link_service_id,
        resource_group_name=target.resource_group_name,
        depends_on=[wait],
    )
    listed = connections.fqn + ".private_endpoint_connections"
    match = TerraformLocal(
        scope,
        "pls_connection_id",
        "${try(one([for c in " + listed + " : c.connection_id if c.private_endpoint_name == "
        + rule.fqn + ".endpoint_name]), \"\")}",
    )
    manual = (
        f"az network private-link-service show --ids {target.private_link_service_id} "
        "--query \"privateEndpointConnections[].{name: name, endpoint: privateEndpoint.id}\" to find the "
        "connection whose endpoint ends with that name, then az network private-link-service connection update "
        f"--resource-group {target.resource_group_name} --service-name <the PLS name> --name <that connection> "
        "--connection-status Approved"
    )
    approval = TerraformResource(
        scope,
        "approval",
        terraform_resource_type="azapi_update_resource",
        provider=azapi_provider,
        lifecycle=TerraformResourceLifecycle(
            precondition=[
                Precondition(
                    condition="${" + match.fqn + " != \"\"}",
                    error_message="The private endpoint ${" + rule.fqn + ".endpoint_name} of the Databricks NCC "
                    f"{ncc_name} is not on the Private Link Service yet (its rule is "
                    "${" + rule.fqn + ".connection_state}). Run the deploy again in a minute; or approve it "
                    f"yourself: {manual}.",
                )
            ]
        ),
    )
    approval.add_override("type", PLS_CONNECTION_TYPE)
    approval.add_override("resource_id", match.as_string)
    approval.add_override(
        "body",
        {
            "properties": {
                "privateLinkServiceConnectionState": {
                    "status": "Approved",
                    "description": f"Approved by tunnelhub for Databricks NCC {ncc_name}",
                    "actionsRequired": "None",
                }
            }
        },
    )
    return approval


def private_dns_zone(
    scope: Construct, *, domain: str, target: AzureEndpointTarget, classic_vnet_id: str, link_name: str
) -> PrivateDnsZone:
    """A private zone named ``domain`` whose apex A record is the LB frontend, linked to the classic VNet.

    The zone is the full name, not its parent: a forward route's real name (say
    ``contoso.openai.azure.com``) then overrides only that name for the classic VNet.
    """
    zone = PrivateDnsZone(scope, "zone", name=domain, resource_group_name=target.resource_group_name)
    PrivateDnsARecord(
        scope,
        "apex",
        name="@",
        zone_name=zone.name,
        resource_group_name=target.resource_group_name,
        ttl=DNS_TTL_S,
        records=[target.lb_frontend_ip],
    )
    PrivateDnsZoneVirtualNetworkLink(
        scope,
        "classic_link",
        name=link_name,
        private_dns_zone_name=zone.name,
        resource_group_name=target.resource_group_name,
        virtual_network_id=classic_vnet_id,
        registration_enabled=False,
    )
    return zone
