"""The Databricks side of a hub: serverless private endpoint and its approval, workspace
binding, egress policy, one DNS name for both compute types, and Unity Catalog connections.

What one :class:`DatabricksLink` creates (everything comes from the hub's ``databricks:`` block):

- ``serverless_enabled`` (default): a Network Connectivity Configuration (NCC) in the hub's
  region, one private endpoint rule to the hub (Azure: the Private Link Service id; AWS: the VPC
  endpoint service name) whose ``domain_names`` are the hub's route domains, the **approval** of
  the endpoint Databricks creates (Azure: the pending connection on the PLS is set to Approved
  with azapi; AWS: ``aws_vpc_endpoint_connection_accepter``), and the NCC's binding to the
  workspace. See :mod:`tunnelhub.constructs.databricks_azure` and
  :mod:`tunnelhub.constructs.databricks_aws` for how the approval finds the endpoint.
- ``network_policy``: an account network policy with restricted serverless egress that allows the
  forward routes' domains plus ``allowed_domains``, enforced or dry-run, bound to the workspace.
- ``classic`` (when tunnelhub has rights on that network): one private DNS zone per route domain,
  named after the domain itself, whose apex points at the hub's load balancer, visible from the
  classic compute network. Serverless compute resolves the same names through the endpoint rule,
  so one Unity Catalog connection serves both compute types.
- ``connections``: one ``databricks_connection`` per entry (type from the route, host = route
  domain, port = route port), the user a literal or a Terraform variable, the password always a
  sensitive Terraform variable named by ``password_var``; an optional foreign catalog.

Construct ids are stable: ``serverless/*``, ``policy/*``, ``dns/<domain>/*``,
``uc/<connection>/*``. Terraform variables keep exactly the names the spec gives them, so they
are set as ``TF_VAR_<name>`` or as Terraform Cloud workspace variables.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdktf import TerraformProvider, TerraformResource, TerraformVariable, TerraformVariableValidationConfig
from cdktf_cdktf_provider_databricks.account_network_policy import (
    AccountNetworkPolicy,
    AccountNetworkPolicyEgress,
    AccountNetworkPolicyEgressNetworkAccess,
    AccountNetworkPolicyEgressNetworkAccessAllowedInternetDestinations,
    AccountNetworkPolicyEgressNetworkAccessPolicyEnforcement,
)
from cdktf_cdktf_provider_databricks.catalog import Catalog
from cdktf_cdktf_provider_databricks.connection import Connection
from cdktf_cdktf_provider_databricks.mws_ncc_binding import MwsNccBinding
from cdktf_cdktf_provider_databricks.mws_ncc_private_endpoint_rule import MwsNccPrivateEndpointRule
from cdktf_cdktf_provider_databricks.mws_network_connectivity_config import MwsNetworkConnectivityConfig
from cdktf_cdktf_provider_databricks.workspace_network_option import WorkspaceNetworkOption
from constructs import Construct

from tunnelhub import spec as S
from tunnelhub.constructs.protect import protected

CONNECTION_TYPES = {"mysql": "MYSQL", "postgresql": "POSTGRESQL", "sqlserver": "SQLSERVER", "oracle": "ORACLE"}
"""Unity Catalog connection type per route database type."""
FOREIGN_CATALOG_OPTION = {"postgresql": "database", "sqlserver": "database", "oracle": "service_name", "mysql": None}
"""The foreign catalog option naming the remote database. MySQL has a two-level namespace: its
foreign catalog mirrors every database of the server as a schema and takes no database option."""
ENFORCEMENT_MODES = {"enforced": "ENFORCED", "dry_run": "DRY_RUN"}
DEFAULT_APPROVAL_WAIT_S = S.DEFAULT_APPROVAL_WAIT_S


@dataclass(frozen=True, kw_only=True)
class AzureEndpointTarget:
    """The Azure hub as the private endpoint and DNS see it (``AzureHub`` attributes)."""

    private_link_service_id: str
    """The Private Link Service the NCC private endpoint rule targets."""
    lb_frontend_ip: str
    """The internal load balancer's frontend address the DNS records point at."""
    resource_group_name: str
    """The hub resource group: it holds the PLS and receives the private DNS zones."""


@dataclass(frozen=True, kw_only=True)
class AwsEndpointTarget:
    """The AWS hub as the private endpoint and DNS see it (``AwsHub`` attributes)."""

    endpoint_service_id: str
    """The VPC endpoint service id (``vpce-svc-…``): the accepter approves endpoints on it."""
    endpoint_service_name: str
    """The endpoint service name (``com.amazonaws.vpce.<region>.vpce-svc-…``) the rule targets."""
    nlb_dns_name: str
    """The internal NLB's DNS name the Route 53 alias records point at."""
    nlb_zone_id: str
    """The NLB's canonical hosted zone id (for the alias records)."""


EndpointTarget = AzureEndpointTarget | AwsEndpointTarget


@dataclass(frozen=True, kw_only=True)
class DatabricksLinkProps:
    """What a :class:`DatabricksLink` is built from."""

    hub: S.Hub
    """The resolved hub spec; it must have a ``databricks`` block."""
    account_provider: TerraformProvider
    """The account-level Databricks provider (NCC, rule, binding, policy)."""
    workspace_provider: TerraformProvider
    """The workspace-level Databricks provider (connections, catalogs)."""
    target: EndpointTarget
    """The hub's endpoint and load balancer; its type must match ``hub.cloud``."""
    time_provider: TerraformProvider | None = None
    """hashicorp/time, for the wait between creating the rule and looking up its endpoint.
    Required when ``serverless_enabled``; unused otherwise."""
    azapi_provider: TerraformProvider | None = None
    """Azure/azapi, which approves the PLS connection. Required on Azure when
    ``serverless_enabled``; unused otherwise."""
    approval_wait_s: int | None = None
    """Seconds between creating the private endpoint rule and looking up the endpoint Databricks
    creates for it (first deploy only; re-created with the rule). Default: the spec's
    ``databricks.approval_wait_s`` (600 unless set; see ``spec.DEFAULT_APPROVAL_WAIT_S``)."""


class DatabricksLink(Construct):
    """The Databricks wiring of one hub. Uses the stack's default azurerm/aws provider for DNS and
    the approval lookups.

    Read-only attributes:

    ``ncc_id``, ``private_endpoint_rule_id``, ``endpoint_name``
        The NCC, its private endpoint rule to the hub, and the name of the endpoint Databricks
        created (Azure; on AWS the rule's ``vpc_endpoint_id`` identifies it). None without
        ``serverless_enabled``.
    ``approval``
        The resource that approves the endpoint (``azapi_update_resource`` on Azure,
        ``aws_vpc_endpoint_connection_accepter`` on AWS), or None.
    ``domain_names``
        The route domains the rule carries and the DNS zones hold, deduplicated, in route order.
    ``network_policy_id``
        The account network policy bound to the workspace, or None.
    ``dns_zone_names``
        The private DNS zones created for classic compute (empty when they are not created).
    ``connection_names``
        Unity Catalog connection name per connection route.
    ``foreign_catalog_names``
        Foreign catalog names created, in spec order.
    ``password_variables``, ``user_variables``
        Names of the Terraform variables the user must set (passwords: sensitive).
    """

    def __init__(self, scope: Construct, id: str, props: DatabricksLinkProps) -> None:
        super().__init__(scope, id)
        hub = props.hub
        _check(props)
        db = hub.databricks
        assert db is not None  # _check
        self.domain_names: list[str] = list(dict.fromkeys(r.domain for r in hub.routes if r.domain))

        self.ncc_id: str | None = None
        self.private_endpoint_rule_id: str | None = None
        self.endpoint_name: str | None = None
        self.approval = None
        if db.serverless_enabled:
            self._serverless(hub, props)

        self.network_policy_id: str | None = None
        if db.network_policy is not None:
            self._network_policy(hub, db.network_policy, props.account_provider)

        self.dns_zone_names: list[str] = []
        if classic_dns_enabled(hub):
            self._classic_dns(hub, props.target)

        self.connection_names: dict[str, str] = {}
        self.foreign_catalog_names: list[str] = []
        self.password_variables: list[str] = []
        self.user_variables: list[str] = []
        if db.connections:
            self._connections(hub, db.connections, props.workspace_provider)

    # -- serverless: NCC, private endpoint rule, approval, binding ----------------------------

    def _serverless(self, hub: S.Hub, props: DatabricksLinkProps) -> None:
        db = hub.databricks
        assert db is not None
        ns = Construct(self, "serverless")
        account = props.account_provider
        # Guarded (protect): a replaced NCC or rule cuts serverless compute off the hub until the new
        # endpoint is approved and the binding has propagated again.
        ncc = MwsNetworkConnectivityConfig(ns, "ncc", provider=account, name=hub.ncc_name, region=hub.region,
                                           lifecycle=protected(hub))
        target = props.target
        # Azure: the Private Link Service's resource id; AWS: the endpoint service's name.
        rule_target = (
            {"resource_id": target.private_link_service_id}
            if isinstance(target, AzureEndpointTarget)
            else {"endpoint_service": target.endpoint_service_name}
        )
        rule = MwsNccPrivateEndpointRule(
            ns,
            "endpoint_rule",
            provider=account,
            network_connectivity_config_id=ncc.network_connectivity_config_id,
            domain_names=self.domain_names,  # updated in place in databricks 1.99.0 (not ForceNew)
            lifecycle=protected(hub),
            **rule_target,
        )
        binding = MwsNccBinding(
            ns,
            "binding",
            provider=account,
            network_connectivity_config_id=ncc.network_connectivity_config_id,
            workspace_id=0,  # replaced below: a JS number cannot hold every 16+ digit id exactly
        )
        binding.add_override("workspace_id", db.workspace_id)

        assert props.time_provider is not None  # _check
        wait_s = _wait_s(props)
        if isinstance(target, AzureEndpointTarget):
            from tunnelhub.constructs.databricks_azure import approve_pls_connection

            assert props.azapi_provider is not None  # _check
            self.approval = approve_pls_connection(
                ns,
                rule=rule,
                target=target,
                ncc_name=hub.ncc_name,
                time_provider=props.time_provider,
                azapi_provider=props.azapi_provider,
                wait_s=wait_s,
            )
        else:
            from tunnelhub.constructs.databricks_aws import accept_vpc_endpoint

            self.approval = accept_vpc_endpoint(
                ns,
                ncc=ncc,
                rule=rule,
                target=target,
                account_provider=account,
                time_provider=props.time_provider,
                wait_s=wait_s,
            )
        self.ncc_id = ncc.network_connectivity_config_id
        self.private_endpoint_rule_id = rule.rule_id
        self.endpoint_name = rule.endpoint_name

    # -- egress policy ----------------------------------------------------------------------

    def _network_policy(self, hub: S.Hub, policy: S.NetworkPolicy, account: TerraformProvider) -> None:
        db = hub.databricks
        assert db is not None
        ns = Construct(self, "policy")
        allowed = list(dict.fromkeys([*(r.domain for r in hub.forward_routes if r.domain), *policy.allowed_domains]))
        created = AccountNetworkPolicy(
            ns,
            "network_policy",
            provider=account,
            network_policy_id=network_policy_name(hub),
            egress=AccountNetworkPolicyEgress(
                network_access=AccountNetworkPolicyEgressNetworkAccess(
                    restriction_mode="RESTRICTED_ACCESS",
                    allowed_internet_destinations=[
                        AccountNetworkPolicyEgressNetworkAccessAllowedInternetDestinations(
                            destination=d, internet_destination_type="DNS_NAME"
                        )
                        for d in allowed
                    ],
                    policy_enforcement=AccountNetworkPolicyEgressNetworkAccessPolicyEnforcement(
                        enforcement_mode=ENFORCEMENT_MODES[policy.mode]
                    ),
                )
            ),
        )
        option = WorkspaceNetworkOption(
            ns, "workspace_binding", provider=account, network_policy_id=created.network_policy_id, workspace_id=0
        )
        option.add_override("workspace_id", db.workspace_id)
        self.network_policy_id = created.network_policy_id

    # -- one name for both compute types ------------------------------------------------------

    def _classic_dns(self, hub: S.Hub, target: EndpointTarget) -> None:
        db = hub.databricks
        assert db is not None and db.classic is not None
        ns = Construct(self, "dns")
        if isinstance(target, AzureEndpointTarget):
            from tunnelhub.constructs.databricks_azure import private_dns_zone

            for domain in self.domain_names:
                private_dns_zone(
                    Construct(ns, domain),
                    domain=domain,
                    target=target,
                    classic_vnet_id=db.classic.network_id,
                    link_name=f"{hub.name}-databricks-classic",
                )
        else:
            from tunnelhub.constructs.databricks_aws import private_hosted_zone

            for domain in self.domain_names:
                private_hosted_zone(
                    Construct(ns, domain),
                    domain=domain,
                    target=target,
                    classic_vpc_id=db.classic.network_id,
                    comment=f"tunnelhub hub {hub.name}: {domain} for Databricks classic compute",
                )
        self.dns_zone_names = list(self.domain_names)

    # -- Unity Catalog ------------------------------------------------------------------------

    def _connections(self, hub: S.Hub, connections: list[S.Connection], workspace: TerraformProvider) -> None:
        ns = Construct(self, "uc")
        variables: dict[str, TerraformVariable] = {}

        def variable(name: str, *, sensitive: bool, description: str) -> TerraformVariable:
            if name not in variables:
                var = TerraformVariable(
                    ns,
                    f"var_{name}",
                    type="string",
                    sensitive=sensitive,
                    nullable=False,
                    description=description,
                    validation=[
                        TerraformVariableValidationConfig(
                            condition=f"${{length(var.{name}) > 0}}",
                            error_message=f"Set {name} (TF_VAR_{name} or a Terraform Cloud "
                            + ("sensitive " if sensitive else "")
                            + "variable): it must not be empty.",
                        )
                    ],
                )
                var.override_logical_id(name)  # the exact name the spec gives, for TF_VAR_<name>
                variables[name] = var
                (self.password_variables if sensitive else self.user_variables).append(name)
            return variables[name]

        for c in connections:
            route = hub.route(c.route)
            assert route.type is not None and route.domain is not None  # spec check
            name = c.name or route.connection_name
            password = variable(
                c.password_var,
                sensitive=True,
                description=f"Password of the Unity Catalog connection {name} (route {route.name}); sensitive.",
            )
            if c.user is not None:
                user = c.user
            else:
                assert c.user_var is not None  # spec check: exactly one of user / user_var
                user = variable(
                    c.user_var,
                    sensitive=False,
                    description=f"Database user of the Unity Catalog connection {name} (route {route.name}).",
                ).string_value
            child = Construct(ns, name)
            connection = Connection(
                child,
                "connection",
                provider=workspace,
                name=name,
                connection_type=CONNECTION_TYPES[route.type],
                comment=f"tunnelhub hub {hub.name}, {route.kind} route {route.name}",
                options={
                    "host": route.domain,
                    "port": str(route.port),
                    "user": user,
                    "password": password.string_value,
                },
            )
            self.connection_names[route.name] = name
            catalog = c.foreign_catalog
            if catalog is not None:
                option = FOREIGN_CATALOG_OPTION[route.type]
                Catalog(
                    child,
                    "foreign_catalog",
                    provider=workspace,
                    name=catalog.name,
                    connection_name=connection.name,
                    options={option: catalog.database} if option is not None else None,
                    comment=f"tunnelhub hub {hub.name}, route {route.name}",
                )
                self.foreign_catalog_names.append(catalog.name)


def network_policy_name(hub: S.Hub) -> str:
    """The network policy id: the spec's name, else ``<hub>-egress``."""
    db = hub.databricks
    assert db is not None and db.network_policy is not None
    return db.network_policy.name if db.network_policy.name is not None else f"{hub.name}-egress"


def classic_dns_enabled(hub: S.Hub) -> bool:
    """Whether the classic network gets the private DNS zones.

    Only where the stack builds the whole path, since a zone sends every lookup of its name to
    the load balancer (a forward route's name too: that is the route's purpose, the name then goes
    through the hub like serverless does), and a name pointed at an unreachable address breaks
    what worked before. Linking a zone to a network also needs rights on it. So zones are created
    when ``classic`` is set with ``remote_peering_enabled`` (both halves of the peering are the
    stack's) and, on AWS, the VPC is in the hub's account (Route 53 creates a private zone only
    with a VPC of its own account; another account's VPC needs an association authorization and
    an association made in that account) and the stack routes the NLB subnets to the peering (a
    new VPC, or ``existing_vpc.nlb_route_table_ids``). The hub VPC is never associated: the
    proxies resolve forward routes' targets there and would loop back into the NLB.
    """
    db = hub.databricks
    if db is None or db.classic is None or not db.classic.remote_peering_enabled:
        return False
    if hub.cloud != "aws":
        return True
    existing = hub.network.existing_vpc
    return (db.classic.aws_account_id is None and bool(db.classic.aws_route_table_ids)
            and (existing is None or bool(existing.nlb_route_table_ids)))


def _check(props: DatabricksLinkProps) -> None:
    """Wiring mistakes raise TypeError (the spec validates the values Databricks would reject)."""
    hub = props.hub
    db = hub.databricks
    if db is None:
        raise TypeError(f"hub {hub.name!r} has no databricks block: add DatabricksLink only when it has one")
    expected = AzureEndpointTarget if hub.cloud == "azure" else AwsEndpointTarget
    if not isinstance(props.target, expected):
        raise TypeError(f"hub {hub.name!r} is on {hub.cloud}: its target must be an {expected.__name__}, "
                        f"not {type(props.target).__name__}")
    if db.serverless_enabled:
        if props.time_provider is None:
            raise TypeError("serverless_enabled needs time_provider (hashicorp/time) for the approval wait")
        if hub.cloud == "azure" and props.azapi_provider is None:
            raise TypeError("an Azure hub with serverless_enabled needs azapi_provider (Azure/azapi) to approve "
                            "the private endpoint connection")
        if not 0 <= _wait_s(props) <= S.MAX_APPROVAL_WAIT_S:
            raise TypeError(f"approval_wait_s must be 0-{S.MAX_APPROVAL_WAIT_S} seconds, not {_wait_s(props)}")


def _wait_s(props: DatabricksLinkProps) -> int:
    """The approval wait: the props' override, else the spec's ``databricks.approval_wait_s``."""
    assert props.hub.databricks is not None
    return props.approval_wait_s if props.approval_wait_s is not None else props.hub.databricks.approval_wait_s


def approval_wait(
    scope: Construct, rule: MwsNccPrivateEndpointRule, time_provider: TerraformProvider, wait_s: int
) -> TerraformResource:
    """The ``time_sleep`` both clouds' approvals start with: ``wait_s`` after the rule is created
    (again only when the rule is replaced), before the endpoint Databricks makes is looked up."""
    wait = TerraformResource(scope, "approval_wait", terraform_resource_type="time_sleep", provider=time_provider,
                             depends_on=[rule])
    wait.add_override("create_duration", f"{wait_s}s")
    wait.add_override("triggers", {"rule_id": rule.rule_id})
    return wait
