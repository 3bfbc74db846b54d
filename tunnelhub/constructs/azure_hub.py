"""The Azure hub: proxy VMs behind an internal Standard Load Balancer, published to Databricks
serverless through a Private Link Service and to classic compute through VNet peering.

What one :class:`AzureHub` creates (the ``cloud: azure`` half of a hub stack):

- a resource group; a new VNet from ``network.cidr`` with the proxy subnet and the PLS NAT
  subnet (or the existing VNet and subnets named in ``network.existing_vnet``);
- the proxy subnet's NSG: SSH only from the on-prem source CIDRs, the route ports only from the
  Databricks classic CIDRs and the PLS NAT subnet, the health port only from the
  ``AzureLoadBalancer`` tag and from the proxy subnet itself (the rollout gate: a proxy asks its
  canary peer), and an explicit deny-all-inbound above Azure's AllowVnetInBound;
- a NAT gateway with a static public IP on the proxy subnet (``network.egress: nat_gateway``);
- the hub SSH host key (tls provider) in a Key Vault secret that only the proxies' managed
  identities may read, and, when the spec gives no admin key, a generated admin key whose
  private half goes to the same vault;
- ``proxies.count`` Ubuntu 24.04 VMs with static private IPs, spread over the zones: ``custom_data``
  is the bootstrap cloud-init (static: changing it replaces the VM), ``user_data`` the hub
  configuration document (updated in place; the proxies' reconcilers apply it live), and the tag
  ``tunnelhub-config-version`` its version, so a plan shows a routine change as an in-place update;
- the internal Standard LB: one HTTP probe (``/routes/<name>`` on the health port) and one TCP
  rule per route; the Private Link Service on its frontend;
- the on-prem path (``network.onprem_path``): the peering pair with the customer's connectivity
  VNet (gateway transit: the hub VNet's half allows it, ours uses the remote gateways), or a
  Virtual WAN hub connection;
- the peering with the Databricks workspace VNet when ``databricks.classic`` is set;
- with ``monitoring.alerts`` (default) per route a metric alert on the LB's health-probe status and
  one on its data-path availability, and the action group of ``monitoring.email`` / ``webhook``;
  ``monitoring.scrape_cidrs`` adds an NSG rule for the health port;
- the stack outputs the on-prem builder and the Databricks wiring read.

The proxies learn which secret holds the host key from their own ``tunnelhub-host-key-secret``
tag (Azure IMDS); the key itself never appears in the synthesized JSON or in ``custom_data``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdktf import Fn, Op, Precondition, TerraformOutput, TerraformResourceLifecycle, Token
from cdktf_cdktf_provider_azurerm.data_azurerm_client_config import DataAzurermClientConfig
from cdktf_cdktf_provider_azurerm.data_azurerm_subnet import DataAzurermSubnet
from cdktf_cdktf_provider_azurerm.key_vault import KeyVault, KeyVaultNetworkAcls
from cdktf_cdktf_provider_azurerm.key_vault_secret import KeyVaultSecret
from cdktf_cdktf_provider_azurerm.lb import Lb, LbFrontendIpConfiguration
from cdktf_cdktf_provider_azurerm.lb_backend_address_pool import LbBackendAddressPool
from cdktf_cdktf_provider_azurerm.lb_probe import LbProbe
from cdktf_cdktf_provider_azurerm.lb_rule import LbRule
from cdktf_cdktf_provider_azurerm.linux_virtual_machine import (
    LinuxVirtualMachine,
    LinuxVirtualMachineAdminSshKey,
    LinuxVirtualMachineBootDiagnostics,
    LinuxVirtualMachineIdentity,
    LinuxVirtualMachineOsDisk,
    LinuxVirtualMachineSourceImageReference,
)
from cdktf_cdktf_provider_azurerm.monitor_action_group import (
    MonitorActionGroup,
    MonitorActionGroupEmailReceiver,
    MonitorActionGroupWebhookReceiver,
)
from cdktf_cdktf_provider_azurerm.monitor_metric_alert import (
    MonitorMetricAlert,
    MonitorMetricAlertAction,
    MonitorMetricAlertCriteria,
    MonitorMetricAlertCriteriaDimension,
)
from cdktf_cdktf_provider_azurerm.nat_gateway import NatGateway
from cdktf_cdktf_provider_azurerm.nat_gateway_public_ip_association import NatGatewayPublicIpAssociation
from cdktf_cdktf_provider_azurerm.network_interface import NetworkInterface, NetworkInterfaceIpConfiguration
from cdktf_cdktf_provider_azurerm.network_interface_backend_address_pool_association import (
    NetworkInterfaceBackendAddressPoolAssociation,
)
from cdktf_cdktf_provider_azurerm.network_security_group import NetworkSecurityGroup
from cdktf_cdktf_provider_azurerm.network_security_rule import NetworkSecurityRule
from cdktf_cdktf_provider_azurerm.private_link_service import (
    PrivateLinkService,
    PrivateLinkServiceNatIpConfiguration,
)
from cdktf_cdktf_provider_azurerm.public_ip import PublicIp
from cdktf_cdktf_provider_azurerm.resource_group import ResourceGroup
from cdktf_cdktf_provider_azurerm.role_assignment import RoleAssignment
from cdktf_cdktf_provider_azurerm.subnet import Subnet
from cdktf_cdktf_provider_azurerm.subnet_nat_gateway_association import SubnetNatGatewayAssociation
from cdktf_cdktf_provider_azurerm.subnet_network_security_group_association import (
    SubnetNetworkSecurityGroupAssociation,
)
from cdktf_cdktf_provider_azurerm.virtual_hub_connection import VirtualHubConnection
from cdktf_cdktf_provider_azurerm.virtual_network import VirtualNetwork
from cdktf_cdktf_provider_azurerm.virtual_network_peering import VirtualNetworkPeering
from cdktf_cdktf_provider_tls.private_key import PrivateKey
from constructs import Construct

from tunnelhub import spec as S
from tunnelhub.constructs.alerting import AZURE_FREQUENCY, alert_timing
from tunnelhub.constructs.protect import protected
from tunnelhub.userdata import AZURE_CONFIG_VERSION_TAG, AZURE_HOST_KEY_TAG, render_cloud_init, render_document

HOST_KEY_TAG = AZURE_HOST_KEY_TAG
"""VM tag holding the versionless URL of the Key Vault secret with the hub SSH host key (the
proxy's boot script reads it from the instance metadata service)."""
HUB_TAG = "tunnelhub:hub"
UBUNTU_IMAGE = {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server", "version": "latest"}
LB_FRONTEND_NAME = "frontend"
NIC_IP_CONFIGURATION_NAME = "primary"
"""The admin key types Azure accepts for a Linux VM (the spec allows more for the tunnel keys)."""
KEY_VAULT_SECRETS_USER = "Key Vault Secrets User"
KEY_VAULT_SECRETS_OFFICER = "Key Vault Secrets Officer"
LB_METRIC_NAMESPACE = "Microsoft.Network/loadBalancers"
PROBE_METRIC = "DipAvailability"
"""Health probe status: per backend endpoint, the percentage of successful probes (Azure Monitor
supported metrics, Microsoft.Network/loadBalancers: dimensions ProtocolType, BackendPort,
FrontendIPAddress, FrontendPort, BackendIPAddress; time grain PT1M)."""
DATA_PATH_METRIC = "VipAvailability"
"""Data path availability of a frontend IP and port (dimensions FrontendIPAddress, FrontendPort)."""
DATA_PATH_THRESHOLD = 90
"""Percent: the Azure Monitor Baseline Alerts' threshold for load balancer availability."""

# NSG priorities (lower wins). Azure's default rules start at 65000 (AllowVnetInBound), so the
# explicit deny at 4096 (the highest number a user rule may take) closes everything not allowed
# above it, including the ports peering would otherwise open to the whole Databricks VNet.
PRIORITY_SSH = 100
PRIORITY_ROUTES = 110
PRIORITY_HEALTH = 120
PRIORITY_PEER_HEALTH = 125
PRIORITY_PEER_PATH = 127
PRIORITY_SCRAPE = 130
PRIORITY_DENY_ALL = 4096

@dataclass(frozen=True, kw_only=True)
class AzureHubProps:
    """What an :class:`AzureHub` is built from."""

    hub: S.Hub
    """The resolved hub spec (``cloud: azure``). Everything else is derived from it."""


class AzureHub(Construct):
    """One Azure proxy hub. Uses the stack's default ``azurerm`` and ``tls`` providers.

    Read-only attributes (for the Databricks wiring and tests):

    ``resource_group_name``, ``location``
        The hub's resource group and Azure region.
    ``vnet_id``, ``vnet_name``
        The hub VNet (created, or the existing one).
    ``proxy_subnet_id``
        The subnet holding the proxy NICs and the LB frontend.
    ``lb_frontend_ip``
        The internal load balancer's static frontend address (a literal).
    ``pls_id``, ``pls_alias``
        The Private Link Service the Databricks NCC private endpoint targets.
    ``proxy_private_ips``
        The proxies' static addresses, by slot (literals).
    ``host_public_key``
        The hub SSH host public key (OpenSSH format) the tunnel host pins.
    ``nat_public_ip``
        The egress address, or None when ``network.egress`` is ``none``.
    ``config_version``
        The version of the hub configuration document in the VMs' ``user_data``.
    """

    def __init__(self, scope: Construct, id: str, props: AzureHubProps) -> None:
        super().__init__(scope, id)
        hub = props.hub
        _check(hub)
        self._hub = hub
        self._plan = hub.azure_addresses()
        self._settings = hub.azure or S.AzureSettings()
        self._tags = {HUB_TAG: hub.name, **hub.tags}
        self._group = ResourceGroup(
            self,
            "resource_group",
            name=self._settings.resource_group if self._settings.resource_group is not None else f"{hub.name}-rg",
            location=hub.region,
            tags=self._tags,
        )
        self._client = DataAzurermClientConfig(self, "client_config")

        self.location: str = hub.region
        self.resource_group_name: str = self._group.name
        self._network()  # sets vnet_id, vnet_name, proxy_subnet_id
        boot_prerequisites = [self._proxy_nsg()]
        self.nat_public_ip: str | None = None
        if hub.egress == "nat_gateway":
            boot_prerequisites.append(self._nat_egress())  # sets nat_public_ip
        host_key_secret, admin_keys = self._identity()  # sets host_public_key
        pool = self._load_balancer()  # sets lb_frontend_ip, pls_id, pls_alias
        self._proxies(pool, host_key_secret, admin_keys, boot_prerequisites)  # sets proxy_private_ips
        if hub.monitoring.alerts:
            self._alerts()
        if hub.network.onprem_path is not None:
            self._onprem_path(hub.network.onprem_path)
        if hub.databricks is not None and hub.databricks.classic is not None:
            self._peering(hub.databricks.classic)
        self._outputs()

    # -- network ----------------------------------------------------------------------------

    def _network(self) -> None:
        """The VNet and its two subnets: created from ``network.cidr``, or the existing ones."""
        hub, plan, group = self._hub, self._plan, self._group
        net = Construct(self, "network")
        self._net = net
        existing = hub.network.existing_vnet
        if existing is not None:
            vnet_parts = S.parse_azure_network_id(existing.vnet_id)
            pls_parts = S.parse_azure_network_id(existing.pls_nat_subnet_id)
            assert vnet_parts is not None and pls_parts is not None and pls_parts.subnet_name  # checked in _check
            self.vnet_id: str = existing.vnet_id
            self.vnet_name: str = vnet_parts.vnet_name
            self._vnet_group: str = vnet_parts.resource_group
            self.proxy_subnet_id: str = existing.proxy_subnet_id
            self._pls_subnet_id: str = existing.pls_nat_subnet_id
            # The spec names the PLS NAT subnet by id only: read its ranges for the NSG.
            lookup = DataAzurermSubnet(
                net,
                "pls_nat_subnet",
                name=pls_parts.subnet_name,
                virtual_network_name=pls_parts.vnet_name,
                resource_group_name=pls_parts.resource_group,
            )
            self._pls_nat_prefixes: list[str] = lookup.address_prefixes  # a token list
            return
        vnet = VirtualNetwork(
            net,
            "vnet",
            name=f"{hub.name}-vnet",
            resource_group_name=group.name,
            location=hub.region,
            address_space=[str(hub.network.cidr)],
            tags=self._tags,
        )
        proxy_subnet = Subnet(
            net,
            "proxy_subnet",
            name="proxies",
            resource_group_name=group.name,
            virtual_network_name=vnet.name,
            address_prefixes=[str(plan.proxy_subnet)],
            default_outbound_access_enabled=False,
        )
        pls_subnet = Subnet(
            net,
            "pls_nat_subnet",
            name="pls-nat",
            resource_group_name=group.name,
            virtual_network_name=vnet.name,
            address_prefixes=[str(plan.pls_nat_subnet)],
            private_link_service_network_policies_enabled=False,
            default_outbound_access_enabled=False,
        )
        # No NIC lives in the PLS NAT subnet and NSGs do not filter Private Link NAT traffic;
        # an NSG with Azure's default rules keeps "every subnet has an NSG" policies satisfied.
        pls_nsg = NetworkSecurityGroup(
            net,
            "pls_nat_nsg",
            name=f"{hub.name}-pls-nat-nsg",
            resource_group_name=group.name,
            location=hub.region,
            tags=self._tags,
        )
        SubnetNetworkSecurityGroupAssociation(
            net, "pls_nat_nsg_association", subnet_id=pls_subnet.id, network_security_group_id=pls_nsg.id
        )
        self.vnet_id = vnet.id
        self.vnet_name = vnet.name
        self._vnet_group = group.name
        self.proxy_subnet_id = proxy_subnet.id
        self._pls_subnet_id = pls_subnet.id
        self._pls_nat_prefixes = [str(plan.pls_nat_subnet)]

    def _proxy_nsg(self) -> SubnetNetworkSecurityGroupAssociation:
        """The proxy subnet's NSG: what may reach the proxies, and nothing else."""
        hub, group = self._hub, self._group
        nsg = NetworkSecurityGroup(
            self._net,
            "proxy_nsg",
            name=f"{hub.name}-proxies-nsg",
            resource_group_name=group.name,
            location=hub.region,
            tags=self._tags,
        )
        classic = [str(c) for c in hub.databricks.classic.cidrs] if hub.databricks and hub.databricks.classic else []
        if hub.network.existing_vnet is not None:
            route_sources = Token.as_list(Fn.concat([classic, self._pls_nat_prefixes]))
        else:
            route_sources = classic + self._pls_nat_prefixes
        rules = Construct(self._net, "nsg_rules")
        common = {
            "network_security_group_name": nsg.name,
            "resource_group_name": group.name,
            "direction": "Inbound",
            "source_port_range": "*",
            "destination_address_prefix": str(self._plan.proxy_subnet),
        }
        NetworkSecurityRule(
            rules,
            "ssh",
            name="allow-ssh-from-onprem",
            description="Tunnel hosts' SSH (the reverse tunnels), from onprem.source_cidrs only.",
            priority=PRIORITY_SSH,
            access="Allow",
            protocol="Tcp",
            source_address_prefixes=[str(c) for c in hub.onprem.source_cidrs],
            destination_port_range=str(S.SSH_PORT),
            **common,
        )
        NetworkSecurityRule(
            rules,
            "routes",
            name="allow-routes",
            description="Route ports, from Databricks classic compute and the Private Link Service NAT subnet.",
            priority=PRIORITY_ROUTES,
            access="Allow",
            protocol="Tcp",
            source_address_prefixes=route_sources,
            destination_port_ranges=[str(r.port) for r in sorted(hub.routes, key=lambda r: r.port)],
            **common,
        )
        NetworkSecurityRule(
            rules,
            "health",
            name="allow-health-probe",
            description="The load balancer's HTTP health probes.",
            priority=PRIORITY_HEALTH,
            access="Allow",
            protocol="Tcp",
            source_address_prefix="AzureLoadBalancer",
            destination_port_range=str(hub.proxies.health_port),
            **common,
        )
        NetworkSecurityRule(
            rules,
            "peer_health",
            name="allow-health-from-proxies",
            description="The proxies' reconcilers ask their canary peer's health endpoint (rollout gate).",
            priority=PRIORITY_PEER_HEALTH,
            access="Allow",
            protocol="Tcp",
            source_address_prefix=str(self._plan.proxy_subnet),
            destination_port_range=str(hub.proxies.health_port),
            **common,
        )
        if hub.tunnel_routes:
            NetworkSecurityRule(
                rules,
                "peer_path",
                name="allow-peer-ports-from-proxies",
                description="The peer path: a proxy whose own tunnels are down carries a route through a "
                "peer's peer port (HAProxy backup servers; docs/proxy-runtime.md).",
                priority=PRIORITY_PEER_PATH,
                access="Allow",
                protocol="Tcp",
                source_address_prefix=str(self._plan.proxy_subnet),
                destination_port_ranges=[str(r.peer_port) for r in sorted(hub.tunnel_routes, key=lambda r: r.peer_port)],
                **common,
            )
        if hub.monitoring.scrape_cidrs:
            NetworkSecurityRule(
                rules,
                "scrape_health",
                name="allow-health-from-scrapers",
                description="Prometheus scrapers of GET /metrics (monitoring.scrape_cidrs), health port only.",
                priority=PRIORITY_SCRAPE,
                access="Allow",
                protocol="Tcp",
                source_address_prefixes=[str(c) for c in hub.monitoring.scrape_cidrs],
                destination_port_range=str(hub.proxies.health_port),
                **common,
            )
        NetworkSecurityRule(
            rules,
            "deny_all",
            name="deny-all-inbound",
            description="Everything else, above Azure's AllowVnetInBound (peering would open every port).",
            priority=PRIORITY_DENY_ALL,
            access="Deny",
            protocol="*",
            source_address_prefix="*",
            destination_port_range="*",
            **{**common, "destination_address_prefix": "*"},
        )
        return SubnetNetworkSecurityGroupAssociation(
            self._net, "proxy_nsg_association", subnet_id=self.proxy_subnet_id, network_security_group_id=nsg.id
        )

    def _nat_egress(self) -> SubnetNatGatewayAssociation:
        """A NAT gateway with a static public IP on the proxy subnet."""
        hub, group = self._hub, self._group
        egress = Construct(self, "egress")
        public_ip = PublicIp(
            egress,
            "public_ip",
            name=f"{hub.name}-nat-pip",
            resource_group_name=group.name,
            location=hub.region,
            allocation_method="Static",
            sku="Standard",
            zones=list(S.DEFAULT_AZURE_ZONES) if hub.zones else None,
            tags=self._tags,
        )
        nat = NatGateway(
            egress,
            "nat_gateway",
            name=f"{hub.name}-nat",
            resource_group_name=group.name,
            location=hub.region,
            sku_name="Standard",
            tags=self._tags,
        )
        NatGatewayPublicIpAssociation(
            egress, "public_ip_association", nat_gateway_id=nat.id, public_ip_address_id=public_ip.id
        )
        self.nat_public_ip = public_ip.ip_address
        return SubnetNatGatewayAssociation(
            egress, "subnet_association", subnet_id=self.proxy_subnet_id, nat_gateway_id=nat.id
        )

    # -- host identity ----------------------------------------------------------------------

    def _identity(self) -> tuple[KeyVaultSecret, list[str]]:
        """The Key Vault, the hub host key secret, and the admin keys the VMs get."""
        hub, group = self._hub, self._group
        identity = Construct(self, "identity")
        vault = KeyVault(
            identity,
            "key_vault",
            # Vault names are global: <hub>-<7 hex of the resource group id> (at most 24 characters).
            name=f"{hub.name}-{Fn.substr(Fn.sha1(group.id), 0, 7)}",
            resource_group_name=group.name,
            location=hub.region,
            tenant_id=self._client.tenant_id,
            sku_name="standard",
            rbac_authorization_enabled=True,
            purge_protection_enabled=True,
            soft_delete_retention_days=90,
            public_network_access_enabled=True,
            network_acls=KeyVaultNetworkAcls(bypass="AzureServices", default_action="Allow"),
            tags=self._tags,
            # Purge protection keeps a deleted vault's name taken for 90 days: a replacement fails.
            lifecycle=protected(hub),
        )
        deployer_access = RoleAssignment(
            identity,
            "deployer_secrets_officer",
            scope=vault.id,
            role_definition_name=KEY_VAULT_SECRETS_OFFICER,
            principal_id=self._client.object_id,
            description="Lets the identity running Terraform write the hub's secrets.",
        )
        host_key = PrivateKey(identity, "host_key", algorithm="ED25519")
        host_key_secret = KeyVaultSecret(
            identity,
            "host_key_secret",
            name="hub-ssh-host-key",
            key_vault_id=vault.id,
            value=host_key.private_key_openssh,
            content_type="openssh-private-key",
            tags=self._tags,
            depends_on=[deployer_access],
        )
        self.host_public_key: str = host_key.public_key_openssh
        if hub.proxies.admin_ssh_public_keys:
            return host_key_secret, list(hub.proxies.admin_ssh_public_keys)
        # Azure needs one admin key: generate it, keep the private half in the vault only.
        admin_key = PrivateKey(identity, "admin_key", algorithm="ED25519")
        KeyVaultSecret(
            identity,
            "admin_key_secret",
            name="proxy-admin-ssh-key",
            key_vault_id=vault.id,
            value=admin_key.private_key_openssh,
            content_type="openssh-private-key",
            tags=self._tags,
            depends_on=[deployer_access],
        )
        return host_key_secret, [admin_key.public_key_openssh]

    # -- load balancer and Private Link Service ---------------------------------------------

    def _load_balancer(self) -> LbBackendAddressPool:
        """The internal Standard LB (a probe and a rule per route) and the PLS on its frontend."""
        hub, group = self._hub, self._group
        lb_scope = Construct(self, "load_balancer")
        lb = Lb(
            lb_scope,
            "lb",
            name=f"{hub.name}-lb",
            resource_group_name=group.name,
            location=hub.region,
            sku="Standard",
            frontend_ip_configuration=[
                LbFrontendIpConfiguration(
                    name=LB_FRONTEND_NAME,
                    subnet_id=self.proxy_subnet_id,
                    private_ip_address_allocation="Static",
                    private_ip_address=str(self._plan.lb_frontend_ip),
                    private_ip_address_version="IPv4",
                    zones=list(S.DEFAULT_AZURE_ZONES) if hub.zones else None,
                )
            ],
            tags=self._tags,
            lifecycle=protected(hub),
        )
        pool = LbBackendAddressPool(lb_scope, "backend_pool", name="proxies", loadbalancer_id=lb.id)
        for route in hub.routes:
            at = Construct(lb_scope, f"route-{route.name}")
            probe = LbProbe(
                at,
                "probe",
                name=f"route-{route.name}",
                loadbalancer_id=lb.id,
                protocol="Http",
                port=hub.proxies.health_port,
                request_path=route.health_path,
                interval_in_seconds=hub.proxies.probe_interval_s,
                probe_threshold=hub.proxies.probe_threshold,
                number_of_probes=hub.proxies.probe_threshold,
            )
            LbRule(
                at,
                "rule",
                name=f"route-{route.name}",
                loadbalancer_id=lb.id,
                frontend_ip_configuration_name=LB_FRONTEND_NAME,
                protocol="Tcp",
                frontend_port=route.port,
                backend_port=route.port,
                backend_address_pool_ids=[pool.id],
                probe_id=probe.id,
                floating_ip_enabled=False,
                tcp_reset_enabled=True,
                idle_timeout_in_minutes=route.idle_timeout_min,
                disable_outbound_snat=True,
                load_distribution="Default",
            )
        pls = PrivateLinkService(
            lb_scope,
            "private_link_service",
            name=f"{hub.name}-pls",
            resource_group_name=group.name,
            location=hub.region,
            load_balancer_frontend_ip_configuration_ids=[lb.frontend_ip_configuration.get(0).id],
            nat_ip_configuration=[
                PrivateLinkServiceNatIpConfiguration(name="pls-nat", subnet_id=self._pls_subnet_id, primary=True)
            ],
            # Default ["*"]: Databricks' endpoint comes from its own subscription (spec.AzureSettings).
            visibility_subscription_ids=list(self._settings.pls_visibility_subscription_ids) or None,
            auto_approval_subscription_ids=list(self._settings.pls_auto_approval_subscription_ids) or None,
            tags=self._tags,
            lifecycle=protected(hub),
        )
        self._lb = lb
        self.lb_frontend_ip: str = str(self._plan.lb_frontend_ip)
        self.pls_id: str = pls.id
        self.pls_alias: str = pls.alias
        return pool

    # -- alerts -----------------------------------------------------------------------------

    def _alerts(self) -> None:
        """Per route, a metric alert on the LB's health-probe status and one on its data-path
        availability, both split to the route by its frontend port; and the action group of
        ``monitoring.email`` / ``monitoring.webhook`` when there is anyone to notify.

        Timing (tunnelhub.constructs.alerting): window W = the probe detection time rounded up to
        metric minutes, evaluated every minute. ``DipAvailability`` is the raw probe result, so
        the "down" alert takes its **Maximum** over W: below 1 % means no proxy passed a single
        probe for a window at least as long as the LB's detection time, i.e. the LB has taken
        every proxy out of the route. Alert names are per route and static: a routine change
        updates them in place (name and resource group are their only ForceNew attributes)."""
        hub, group, mon = self._hub, self._group, self._hub.monitoring
        scope = Construct(self, "alerts")
        timing = alert_timing(hub)
        self.alert_timing = timing
        self.action_group_id: str | None = None
        actions = None
        if mon.email or mon.webhook:
            action_group = MonitorActionGroup(
                scope,
                "action_group",
                name=f"{hub.name}-alerts",
                short_name=f"th-{hub.name}"[:12],  # Azure: at most 12 characters (shown in SMS and mail)
                resource_group_name=group.name,
                location="global",
                email_receiver=[
                    MonitorActionGroupEmailReceiver(name=f"email-{k}", email_address=email, use_common_alert_schema=True)
                    for k, email in enumerate(mon.email)
                ],
                webhook_receiver=[
                    MonitorActionGroupWebhookReceiver(name=f"webhook-{k}", service_uri=url, use_common_alert_schema=True)
                    for k, url in enumerate(mon.webhook)
                ],
                tags=self._tags,
            )
            self.action_group_id = action_group.id
            actions = [MonitorMetricAlertAction(action_group_id=action_group.id)]
        common = {
            "resource_group_name": group.name,
            "scopes": [self._lb.id],
            "frequency": AZURE_FREQUENCY,
            "window_size": timing.azure_window,
            "auto_mitigate": True,
            "action": actions,
            "tags": self._tags,
        }
        for route in hub.routes:
            at = Construct(scope, f"route-{route.name}")
            port = [MonitorMetricAlertCriteriaDimension(name="FrontendPort", operator="Include", values=[str(route.port)])]
            MonitorMetricAlert(
                at,
                "probe_down",
                name=f"{hub.name}-route-{route.name}-down",
                description=(f"Route {route.name} (port {route.port}) is down: no proxy passed its health probe "
                             f"({route.health_path}) for {timing.azure_window}."),
                severity=1,
                criteria=[MonitorMetricAlertCriteria(
                    metric_namespace=LB_METRIC_NAMESPACE, metric_name=PROBE_METRIC, aggregation="Maximum",
                    operator="LessThan", threshold=1, dimension=port,
                )],
                **common,
            )
            MonitorMetricAlert(
                at,
                "data_path",
                name=f"{hub.name}-route-{route.name}-data-path",
                description=(f"Route {route.name}: the load balancer's data path availability on port {route.port} "
                             f"is below {DATA_PATH_THRESHOLD} %."),
                severity=1,
                criteria=[MonitorMetricAlertCriteria(
                    metric_namespace=LB_METRIC_NAMESPACE, metric_name=DATA_PATH_METRIC, aggregation="Average",
                    operator="LessThan", threshold=DATA_PATH_THRESHOLD, dimension=port,
                )],
                **common,
            )

    # -- proxies ----------------------------------------------------------------------------

    def _proxies(
        self,
        pool: LbBackendAddressPool,
        host_key_secret: KeyVaultSecret,
        admin_keys: list[str],
        boot_prerequisites: list,
    ) -> None:
        """One NIC, VM, pool association and host-key role assignment per slot."""
        hub, group = self._hub, self._group
        proxies = Construct(self, "proxies")
        zones = hub.zones or []
        self.proxy_private_ips: list[str] = [str(ip) for ip in self._plan.proxy_ips]
        document = render_document(hub)
        self.config_version: str = document.version
        user_data = document.azure_user_data()
        for slot, address in enumerate(self.proxy_private_ips):
            at = Construct(proxies, f"slot{slot}")
            name = f"{hub.name}-proxy-{slot}"
            nic = NetworkInterface(
                at,
                "nic",
                name=f"{name}-nic",
                resource_group_name=group.name,
                location=hub.region,
                accelerated_networking_enabled=True,
                ip_forwarding_enabled=False,
                ip_configuration=[
                    NetworkInterfaceIpConfiguration(
                        name=NIC_IP_CONFIGURATION_NAME,
                        subnet_id=self.proxy_subnet_id,
                        private_ip_address_allocation="Static",
                        private_ip_address=address,
                        private_ip_address_version="IPv4",
                        primary=True,
                    )
                ],
                tags=self._tags,
            )
            NetworkInterfaceBackendAddressPoolAssociation(
                at,
                "pool_association",
                network_interface_id=nic.id,
                ip_configuration_name=NIC_IP_CONFIGURATION_NAME,
                backend_address_pool_id=pool.id,
            )
            vm = LinuxVirtualMachine(
                at,
                "vm",
                name=name,
                computer_name=name,
                resource_group_name=group.name,
                location=hub.region,
                size=hub.proxy_size,
                zone=zones[slot % len(zones)] if zones else None,
                network_interface_ids=[nic.id],
                admin_username=hub.proxies.admin_username,
                admin_ssh_key=[
                    LinuxVirtualMachineAdminSshKey(username=hub.proxies.admin_username, public_key=key)
                    for key in admin_keys
                ],
                disable_password_authentication=True,
                source_image_reference=LinuxVirtualMachineSourceImageReference(**UBUNTU_IMAGE),
                os_disk=LinuxVirtualMachineOsDisk(
                    name=f"{name}-os", caching="ReadWrite", storage_account_type="StandardSSD_LRS"
                ),
                custom_data=render_cloud_init(hub, slot).base64,  # the bootstrap: static per slot
                user_data=user_data,  # the hub configuration document: updated in place, applied live
                identity=LinuxVirtualMachineIdentity(type="SystemAssigned"),
                boot_diagnostics=LinuxVirtualMachineBootDiagnostics(),
                encryption_at_host_enabled=True,
                secure_boot_enabled=True,
                vtpm_enabled=True,
                allow_extension_operations=False,
                tags={**self._tags, HOST_KEY_TAG: host_key_secret.versionless_id,
                      AZURE_CONFIG_VERSION_TAG: document.version},
                # Cloud-init installs packages at first boot: egress and the NSG come first.
                depends_on=boot_prerequisites,
            )
            RoleAssignment(
                at,
                "host_key_reader",
                scope=host_key_secret.resource_versionless_id,
                role_definition_name=KEY_VAULT_SECRETS_USER,
                principal_id=vm.identity.principal_id,
                principal_type="ServicePrincipal",
                description=f"{name} reads the hub SSH host key at boot.",
            )

    def _in_stack_subscription(self, subscription_id: str, error_message: str) -> TerraformResourceLifecycle:
        """A remote VNet's half of a peering: the provider creates a peering in the stack's own
        subscription (virtual_network_peering_resource.go@v4.55.0), so refuse to plan it when the
        remote VNet is elsewhere."""
        return TerraformResourceLifecycle(precondition=[Precondition(
            condition=Op.eq(Fn.lower(self._client.subscription_id), subscription_id), error_message=error_message)])

    # -- on-prem path -----------------------------------------------------------------------

    def _onprem_path(self, path: S.OnPremPath) -> None:
        """The route from the tunnel host to the proxies' private addresses: the new VNet is
        isolated until it is peered with the VNet holding the ExpressRoute/VPN gateway (gateway
        transit) or connected to a Virtual WAN hub. Azure advertises the hub VNet's range to
        on-prem over that gateway; the NSG admits SSH from ``onprem.source_cidrs`` only."""
        hub = self._hub
        scope = Construct(self, "onprem_path")
        if path.virtual_hub_id is not None:
            VirtualHubConnection(
                scope,
                "virtual_hub_connection",
                name=f"{hub.name}-tunnelhub",
                virtual_hub_id=path.virtual_hub_id,
                remote_virtual_network_id=self.vnet_id,
                internet_security_enabled=path.internet_security_enabled,
            )
            return
        assert path.hub_vnet_id is not None  # exactly one form: checked in the spec
        remote = S.parse_azure_network_id(path.hub_vnet_id)
        assert remote is not None  # checked in the spec
        transit = path.use_remote_gateways
        depends_on = []
        if path.remote_peering_enabled:
            depends_on.append(VirtualNetworkPeering(
                scope,
                "onprem_hub_to_hub",
                name=f"to-tunnelhub-{hub.name}",
                resource_group_name=remote.resource_group,
                virtual_network_name=remote.vnet_name,
                remote_virtual_network_id=self.vnet_id,
                allow_virtual_network_access=True,
                allow_forwarded_traffic=False,  # the proxies forward nothing into the hub VNet
                allow_gateway_transit=transit,
                use_remote_gateways=False,
                lifecycle=self._in_stack_subscription(
                    remote.subscription_id,
                    f"The on-prem hub VNet is in subscription {remote.subscription_id}, not the one "
                    "this stack deploys to: set network.onprem_path.remote_peering_enabled: false "
                    "and create that VNet's peering (allow_gateway_transit) there.",
                ),
            ))
        VirtualNetworkPeering(
            scope,
            "hub_to_onprem_hub",
            name=f"{hub.name}-to-onprem-hub",
            resource_group_name=self._vnet_group,
            virtual_network_name=self.vnet_name,
            remote_virtual_network_id=path.hub_vnet_id,
            allow_virtual_network_access=True,
            allow_forwarded_traffic=True,  # on-prem traffic arrives forwarded by the remote gateway/NVA
            allow_gateway_transit=False,
            use_remote_gateways=transit,
            # Azure rejects UseRemoteGateways while the remote half lacks AllowGatewayTransit.
            depends_on=depends_on or None,
        )

    # -- peering ----------------------------------------------------------------------------

    def _peering(self, classic: S.ClassicCompute) -> None:
        """Hub VNet ↔ Databricks workspace VNet (the workspace half only when enabled)."""
        hub = self._hub
        workspace = S.parse_azure_network_id(classic.network_id)
        assert workspace is not None  # checked in _check
        peering = Construct(self, "peering")
        VirtualNetworkPeering(
            peering,
            "hub_to_workspace",
            name=f"{hub.name}-to-databricks",
            resource_group_name=self._vnet_group,
            virtual_network_name=self.vnet_name,
            remote_virtual_network_id=classic.network_id,
            allow_virtual_network_access=True,
            allow_forwarded_traffic=False,
            allow_gateway_transit=False,
            use_remote_gateways=False,
        )
        if not classic.remote_peering_enabled:
            return
        VirtualNetworkPeering(
            peering,
            "workspace_to_hub",
            name=f"databricks-to-{hub.name}",
            resource_group_name=workspace.resource_group,
            virtual_network_name=workspace.vnet_name,
            remote_virtual_network_id=self.vnet_id,
            allow_virtual_network_access=True,
            allow_forwarded_traffic=False,
            allow_gateway_transit=False,
            use_remote_gateways=False,
            lifecycle=self._in_stack_subscription(
                workspace.subscription_id,
                f"The Databricks workspace VNet is in subscription {workspace.subscription_id}, "
                "not the one this stack deploys to: set databricks.classic.remote_peering_enabled: "
                "false and create the workspace-side peering there.",
            ),
        )

    # -- stack outputs ----------------------------------------------------------------------

    def _outputs(self) -> None:
        """The named stack outputs the on-prem builder and the Databricks wiring read."""
        outputs = Construct(self, "outputs")
        _output(outputs, "lb_frontend_ip", self.lb_frontend_ip,
                "Static private address of the internal load balancer frontend (what classic compute connects to).")
        _output(outputs, "pls_id", self.pls_id, "Private Link Service id (the NCC private endpoint rule's target).")
        _output(outputs, "pls_alias", self.pls_alias, "Private Link Service alias.")
        _output(outputs, "proxy_private_ips", self.proxy_private_ips, "The proxies' static private addresses, by slot.")
        _output(outputs, "tunnel_endpoints", self.proxy_private_ips,
                "The addresses the tunnel host dials (SSH, port 22), by slot.")
        if self.nat_public_ip is not None:
            _output(outputs, "nat_public_ip", self.nat_public_ip,
                    "The hub's egress address (NAT gateway): allow-list it on remote services.")
        _output(outputs, "host_public_key", self.host_public_key,
                "The hub SSH host public key (OpenSSH); the on-prem package pins it in known_hosts.")
        _output(outputs, "config_version", self.config_version,
                "Version of the hub configuration document the proxies apply live (GET / on a proxy's health port).")


def _output(scope: Construct, name: str, value: object, description: str) -> None:
    TerraformOutput(scope, name, value=value, description=description, static_id=True)


def _check(hub: S.Hub) -> None:
    """The spec validates every rule of an Azure hub at load time; this only guards the cloud."""
    if hub.cloud != "azure":
        raise S.SpecError([S.SpecIssue(("cloud",), f"AzureHub builds azure hubs only; this hub has cloud: {hub.cloud}",
                                       hub.cloud, hub.name)], source=None)
