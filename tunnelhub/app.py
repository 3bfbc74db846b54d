"""The cdktf App: one stack per hub (``<hub>-<cloud>``), each with only the providers it uses.

Provider packages cost seconds to import (aws ≈ 20 s, azurerm ≈ 15 s, databricks ≈ 3 s), so
they are imported inside the functions that configure a stack of that cloud, never at module
top: a spec with only Azure hubs never loads the AWS bindings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cdktf import (
    App,
    CloudBackend,
    LocalBackend,
    NamedCloudWorkspace,
    TerraformOutput,
    TerraformProvider,
    TerraformProviderGeneratorMetadata,
    TerraformStack,
)
from constructs import Construct

from tunnelhub import spec as S
from tunnelhub.providers import PROVIDER_VERSIONS, pin_provider_versions

if TYPE_CHECKING:
    from tunnelhub.constructs.databricks_link import EndpointTarget

DATABRICKS_ACCOUNT_ALIAS = "account"
DATABRICKS_WORKSPACE_ALIAS = "workspace"
AZAPI_PROVIDER_VERSION = PROVIDER_VERSIONS["azapi"]
TIME_PROVIDER_VERSION = PROVIDER_VERSIONS["time"]


class HubStack(TerraformStack):
    """One hub's Terraform stack: backend, providers, the hub's constructs and its outputs.

    Attributes set for the constructs (constructs never create providers themselves):
    ``hub`` (the resolved spec), ``cloud_provider`` (azurerm or aws), ``tls_provider``, and, when
    the hub has a ``databricks`` section, ``databricks_account`` / ``databricks_workspace``.
    ``hub_construct`` is the cloud hub construct (``AzureHub`` or ``AwsHub``) once built, for the Databricks
    wiring to read its documented attributes. The providers' version constraints come from
    :data:`tunnelhub.providers.PROVIDER_VERSIONS`, not from the bindings.
    """

    def __init__(self, scope: Construct, hub: S.Hub):
        super().__init__(scope, hub.stack_name)
        self.hub = hub
        self.databricks_account: TerraformProvider | None = None
        self.databricks_workspace: TerraformProvider | None = None
        self.hub_construct: Construct | None = None
        _configure_backend(self, hub)
        if hub.cloud == "azure":
            self.cloud_provider = _azure_provider(self, hub)
        else:
            self.cloud_provider = _aws_provider(self, hub)
        self.tls_provider = _tls_provider(self)
        if hub.databricks is not None:
            self.databricks_account, self.databricks_workspace = _databricks_providers(self, hub)
        _add_hub_constructs(self, hub)
        TerraformOutput(
            self,
            "port_plan",
            value=[{k: v for k, v in row.items() if v is not None} for row in hub.port_plan()],
            description="Routes of this hub: frontend port, tunnel port, target, domain, probe.",
        )
        pin_provider_versions(self)  # after every provider exists: the one version table


def _configure_backend(stack: TerraformStack, hub: S.Hub) -> None:
    backend = hub.backend
    if isinstance(backend, S.CloudBackend):
        CloudBackend(
            stack,
            hostname=backend.hostname,
            organization=backend.organization,
            workspaces=NamedCloudWorkspace(backend.workspace, backend.project),
        )
    else:
        LocalBackend(stack, path=backend.path if backend.path is not None else f"terraform.{hub.stack_name}.tfstate")


def _azure_provider(stack: TerraformStack, hub: S.Hub) -> TerraformProvider:
    from cdktf_cdktf_provider_azurerm.provider import AzurermProvider, AzurermProviderFeatures

    settings = hub.azure or S.AzureSettings()
    return AzurermProvider(
        stack,
        "azurerm",
        features=[AzurermProviderFeatures()],
        subscription_id=settings.subscription_id,
    )


def _aws_provider(stack: TerraformStack, hub: S.Hub) -> TerraformProvider:
    from cdktf_cdktf_provider_aws.provider import AwsProvider, AwsProviderDefaultTags

    tags = {"tunnelhub:hub": hub.name, **hub.tags}
    return AwsProvider(stack, "aws", region=hub.region, default_tags=[AwsProviderDefaultTags(tags=tags)])


def _tls_provider(stack: TerraformStack) -> TerraformProvider:
    from cdktf_cdktf_provider_tls.provider import TlsProvider

    return TlsProvider(stack, "tls")


def _databricks_providers(stack: TerraformStack, hub: S.Hub) -> tuple[TerraformProvider, TerraformProvider]:
    """Account- and workspace-level providers; credentials come from the environment only."""
    from cdktf_cdktf_provider_databricks.provider import DatabricksProvider

    assert hub.databricks is not None
    account = DatabricksProvider(
        stack,
        "databricks_account",
        alias=DATABRICKS_ACCOUNT_ALIAS,
        host=S.DATABRICKS_ACCOUNT_HOST[hub.cloud],
        account_id=hub.databricks.account_id,
    )
    workspace = DatabricksProvider(
        stack,
        "databricks_workspace",
        alias=DATABRICKS_WORKSPACE_ALIAS,
        host=hub.databricks.workspace_host,
    )
    return account, workspace


def _approval_providers(stack: TerraformStack, hub: S.Hub) -> tuple[TerraformProvider, TerraformProvider | None]:
    """hashicorp/time (the wait before the endpoint lookup) and, on Azure, Azure/azapi (the PLS
    approval): raw providers, since neither has a prebuilt binding here. azapi authenticates like
    azurerm (``ARM_*`` variables, or the Azure CLI login), time needs nothing."""
    time = TerraformProvider(
        stack,
        "time",
        terraform_resource_type="time",
        terraform_provider_source="hashicorp/time",
        terraform_generator_metadata=TerraformProviderGeneratorMetadata(
            provider_name="time", provider_version_constraint=TIME_PROVIDER_VERSION
        ),
    )
    azapi = None
    if hub.cloud == "azure":
        azapi = TerraformProvider(
            stack,
            "azapi",
            terraform_resource_type="azapi",
            terraform_provider_source="Azure/azapi",
            terraform_generator_metadata=TerraformProviderGeneratorMetadata(
                provider_name="azapi", provider_version_constraint=AZAPI_PROVIDER_VERSION
            ),
        )
    return time, azapi


def add_databricks_link(stack: HubStack, hub: S.Hub, target: EndpointTarget) -> Construct:
    """The hub's Databricks wiring (``DatabricksLink``, id ``databricks``) against ``target``, an
    ``AzureEndpointTarget`` / ``AwsEndpointTarget`` built from the hub construct's attributes.
    Creates the approval providers it needs when ``serverless_enabled``."""
    from tunnelhub.constructs.databricks_link import DatabricksLink, DatabricksLinkProps

    assert hub.databricks is not None and stack.databricks_account is not None
    assert stack.databricks_workspace is not None
    time, azapi = _approval_providers(stack, hub) if hub.databricks.serverless_enabled else (None, None)
    return DatabricksLink(
        stack,
        "databricks",
        DatabricksLinkProps(
            hub=hub,
            account_provider=stack.databricks_account,
            workspace_provider=stack.databricks_workspace,
            target=target,
            time_provider=time,
            azapi_provider=azapi,
        ),
    )


def _add_hub_constructs(stack: HubStack, hub: S.Hub) -> None:
    """The hub's cloud resources and its Databricks wiring (filled in by the hub constructs)."""
    if hub.cloud == "azure":
        _add_azure_hub(stack, hub)
    else:
        _add_aws_hub(stack, hub)
    if hub.databricks is not None:
        _add_databricks(stack, hub)


def _add_azure_hub(stack: HubStack, hub: S.Hub) -> None:
    from tunnelhub.constructs.azure_hub import AzureHub, AzureHubProps

    stack.hub_construct = AzureHub(stack, "hub", AzureHubProps(hub=hub))


def _add_aws_hub(stack: HubStack, hub: S.Hub) -> None:
    """The AwsHub construct and the AWS stack's outputs (docs/aws.md)."""
    from tunnelhub.constructs.aws_hub import AwsHub, AwsHubProps
    from tunnelhub.userdata import render_cloud_init

    aws = AwsHub(stack, "hub", AwsHubProps(hub=hub, user_data=render_cloud_init(hub, None)))
    stack.hub_construct = aws
    outputs = {
        "endpoint_service_name": (aws.endpoint_service_name, "VPC endpoint service for the Databricks NCC private endpoint rule."),
        "nlb_dns_name": (aws.nlb_dns_name, "Internal NLB DNS name (Databricks classic compute, through the peering)."),
        "slot_public_ips": (aws.slot_public_ips, "Elastic IP of each slot, by slot number."),
        "slot_private_ips": (aws.slot_private_ips, "Fixed private address of each slot, by slot number."),
        "tunnel_endpoints": (aws.tunnel_endpoints, (
            "What the on-prem tunnel host dials, by slot: the private addresses over a private circuit, "
            "else the Elastic IPs.")),
        "egress_public_ips": (aws.egress_public_ips, (
            "Where the proxies reach the internet from (allow-lists of forward routes): the slot Elastic IPs, "
            "or the NAT gateways'.")),
        "host_public_key": (aws.host_public_key, "The hub's SSH host public key (every proxy presents it)."),
        "asg_name": (aws.asg_name, "The proxies' Auto Scaling group."),
        "config_version": (aws.config_version, (
            "Version of the hub configuration document the proxies apply live (GET / on a proxy's health port).")),
    }
    if aws.classic_peering_id is not None:
        outputs["classic_peering_id"] = (aws.classic_peering_id, (
            "VPC peering connection to the Databricks classic VPC (pcx-...). Without "
            "databricks.classic.remote_peering_enabled its owner accepts it and routes the NLB subnets to it."))
    if aws.alerts_topic_arn is not None:
        outputs["alerts_topic_arn"] = (aws.alerts_topic_arn, (
            "SNS topic of the hub's alarms (monitoring.email / monitoring.webhook are subscribed; add others here)."))
    for name, (value, description) in outputs.items():
        TerraformOutput(stack, name, value=value, description=description)


def _add_databricks(stack: HubStack, hub: S.Hub) -> None:
    """The Databricks wiring, against the hub construct's private endpoint target."""
    from tunnelhub.constructs.databricks_link import AwsEndpointTarget, AzureEndpointTarget

    h: Any = stack.hub_construct
    target: EndpointTarget
    if hub.cloud == "azure":
        target = AzureEndpointTarget(
            private_link_service_id=h.pls_id,
            lb_frontend_ip=h.lb_frontend_ip,
            resource_group_name=h.resource_group_name,
        )
    else:
        target = AwsEndpointTarget(
            endpoint_service_id=h.endpoint_service_id,
            endpoint_service_name=h.endpoint_service_name,
            nlb_dns_name=h.nlb_dns_name,
            nlb_zone_id=h.nlb_zone_id,
        )
    link: Any = add_databricks_link(stack, hub, target)
    if link.ncc_id is not None:
        TerraformOutput(stack, "ncc_id", value=link.ncc_id, description="The Databricks Network Connectivity Configuration.")
        TerraformOutput(stack, "private_endpoint_rule_id", value=link.private_endpoint_rule_id,
                        description="The NCC private endpoint rule to this hub.")


def new_app(**app_kwargs: Any) -> App:
    """A cdktf App with deterministic output (no stack traces in the JSON metadata)."""
    return App(stack_traces=False, **app_kwargs)


def build_app(spec: S.SpecFile, *, hubs: list[str] | None = None, **app_kwargs: Any) -> App:
    """An App holding one :class:`HubStack` per selected hub (all hubs when ``hubs`` is None)."""
    app = new_app(**app_kwargs)
    for hub in spec.select(hubs):
        HubStack(app, hub)
    return app
