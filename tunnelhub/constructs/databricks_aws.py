"""AWS half of the Databricks wiring: accepting the NCC's VPC endpoint on the hub's endpoint
service, and the Route 53 private hosted zones for classic compute.

**Acceptance.** ``aws_vpc_endpoint_connection_accepter`` needs the id of the VPC endpoint that
Databricks creates for the private endpoint rule. The rule's ``vpc_endpoint_id`` is computed, but
the create call returns while the rule is still ``CREATING`` and the provider writes what the API
returned: right after create it is often empty, and it is filled only by a later refresh. So:

1. ``time_sleep`` (``triggers = {rule_id}``) waits ``wait_s`` seconds after the rule is created;
2. ``data databricks_mws_network_connectivity_config`` (by the NCC's name, ``depends_on`` the
   wait, so on the first deploy it is read during apply, after the wait) re-reads the NCC, whose
   ``egress_config[0].target_rules[0].aws_private_endpoint_rules`` carry each rule's current
   ``vpc_endpoint_id``;
3. a local takes the rule's own ``vpc_endpoint_id`` when the provider already has it, else the one
   the data source reports for the same ``rule_id``;
4. the accepter accepts that endpoint on the hub's endpoint service. A precondition stops with an
   explicit message (run the deploy again, or the exact ``aws ec2`` commands) when the id is still
   empty, instead of sending an empty id to AWS.

Later deploys read the same id at plan time and change nothing. Destroying the accepter rejects
the endpoint connection (AWS provider semantics).
"""

from __future__ import annotations

from cdktf import (
    Precondition,
    TerraformLocal,
    TerraformProvider,
    TerraformResourceLifecycle,
)
from cdktf_cdktf_provider_aws.route53_record import Route53Record, Route53RecordAlias
from cdktf_cdktf_provider_aws.route53_zone import Route53Zone, Route53ZoneVpc
from cdktf_cdktf_provider_aws.vpc_endpoint_connection_accepter import VpcEndpointConnectionAccepter
from cdktf_cdktf_provider_databricks.data_databricks_mws_network_connectivity_config import (
    DataDatabricksMwsNetworkConnectivityConfig,
)
from cdktf_cdktf_provider_databricks.mws_ncc_private_endpoint_rule import MwsNccPrivateEndpointRule
from cdktf_cdktf_provider_databricks.mws_network_connectivity_config import MwsNetworkConnectivityConfig
from constructs import Construct

from tunnelhub.constructs.databricks_link import AwsEndpointTarget, approval_wait


def accept_vpc_endpoint(
    scope: Construct,
    *,
    ncc: MwsNetworkConnectivityConfig,
    rule: MwsNccPrivateEndpointRule,
    target: AwsEndpointTarget,
    account_provider: TerraformProvider,
    time_provider: TerraformProvider,
    wait_s: int,
) -> VpcEndpointConnectionAccepter:
    """Accept the VPC endpoint Databricks creates for ``rule``; return the accepter."""
    wait = approval_wait(scope, rule, time_provider, wait_s)
    state = DataDatabricksMwsNetworkConnectivityConfig(
        scope, "ncc_state", provider=account_provider, name=ncc.name, depends_on=[wait]
    )
    rules = state.fqn + ".egress_config[0].target_rules[0].aws_private_endpoint_rules"
    endpoint = TerraformLocal(
        scope,
        "vpc_endpoint_id",
        "${try(coalesce(" + rule.fqn + ".vpc_endpoint_id, one([for r in " + rules + " : r.vpc_endpoint_id if "
        "r.rule_id == " + rule.fqn + ".rule_id])), \"\")}",
    )
    service = target.endpoint_service_id
    return VpcEndpointConnectionAccepter(
        scope,
        "approval",
        vpc_endpoint_service_id=service,
        vpc_endpoint_id=endpoint.as_string,
        lifecycle=TerraformResourceLifecycle(
            precondition=[
                Precondition(
                    condition="${" + endpoint.fqn + " != \"\"}",
                    error_message="Databricks has not reported the VPC endpoint of NCC private endpoint rule "
                    "${" + rule.fqn + ".rule_id} yet (state ${" + rule.fqn + ".connection_state}). Run the deploy "
                    "again in a minute; or accept it yourself: aws ec2 describe-vpc-endpoint-connections --filters "
                    f"Name=service-id,Values={service} Name=vpc-endpoint-state,Values=pendingAcceptance, then "
                    f"aws ec2 accept-vpc-endpoint-connections --service-id {service} --vpc-endpoint-ids <that id>.",
                )
            ]
        ),
    )


def private_hosted_zone(
    scope: Construct, *, domain: str, target: AwsEndpointTarget, classic_vpc_id: str, comment: str
) -> Route53Zone:
    """A private hosted zone named ``domain`` on the classic VPC whose apex aliases the NLB.

    The zone is the full name, not its parent: a forward route's real name then overrides only
    that name for the classic VPC. It is never associated with the hub VPC (the proxies resolve
    forward targets there).
    """
    zone = Route53Zone(scope, "zone", name=domain, comment=comment, vpc=[Route53ZoneVpc(vpc_id=classic_vpc_id)])
    Route53Record(
        scope,
        "apex",
        zone_id=zone.zone_id,
        name=domain,
        type="A",
        alias=Route53RecordAlias(name=target.nlb_dns_name, zone_id=target.nlb_zone_id, evaluate_target_health=False),
    )
    return zone
