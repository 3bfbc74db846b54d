"""The hub spec: one YAML file, validated at load time, that drives every generated artifact.

``load_spec(path)`` returns a resolved :class:`SpecFile` (every derivable default filled in:
tunnel ports, route domains, probe modes) or raises :class:`SpecError`, whose message names the
file and line, the hub, the field path, the bad value and what is allowed. ``validate_spec``
also returns the warnings (things that work but are probably not what the user wants).

Structure and field-level rules live in the pydantic models (``extra="forbid"`` everywhere);
rules that relate fields to each other live in :func:`_check_hub` / :func:`_check_spec`, which
collect every problem instead of stopping at the first one.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import re
import struct
import types
import typing
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from tunnelhub import addressing
from tunnelhub.regions import REGIONS, cloud_of_region

# --------------------------------------------------------------------------------------------
# Constants shared by every consumer of the spec
# --------------------------------------------------------------------------------------------

SSH_PORT = 22
DEFAULT_HEALTH_PORT = 8080
DEFAULT_DOMAIN_ROOT = "tunnelhub.internal"
TUNNEL_PORT_OFFSET = 10000  # preferred derived tunnel port: frontend port + 10000
TUNNEL_PORT_FALLBACK_START = 20000
PEER_PORT_OFFSET = 20000  # preferred derived peer port: frontend port + 20000
PEER_PORT_FALLBACK_START = 40000
HOST_PORT_STRIDE = 1000
"""Tunnel host ``k`` of a hub (spec order) holds route ``r``'s tunnel on ``r.tunnel_port + k × 1000``
unless the host sets ``port_offset``: the first host keeps the route's own tunnel port, so a hub
that names one tunnel host has the port plan it had before several were possible."""
DEFAULT_TUNNEL_HOST = "tunnel-host"
"""The name of the one tunnel host of a hub written in the single-host form
(``onprem.tunnel_public_keys``)."""
MAX_TUNNEL_HOSTS = 8
DATABASE_TYPES = ("mysql", "postgresql", "sqlserver", "oracle")
DEFAULT_PROXY_SIZE = {"azure": "Standard_D2s_v5", "aws": "t3.small"}
DEFAULT_AZURE_ZONES = ("1", "2", "3")
DEFAULT_AWS_ZONE_COUNT = 2
DATABRICKS_ACCOUNT_HOST = {
    "azure": "https://accounts.azuredatabricks.net",
    "aws": "https://accounts.cloud.databricks.com",
}
WORKSPACE_HOST_SUFFIX = {"azure": ".azuredatabricks.net", "aws": ".cloud.databricks.com"}
MAX_ENDPOINT_RULE_DOMAINS = 10
"""Domain names one NCC private endpoint rule may carry ("Each private endpoint rule for private
connectivity to resources in your VPC supports up to 10 domain names", Databricks docs,
security/network/serverless-network-security/pl-to-internal-network, Requirements). The hub's one
rule carries every distinct route domain, so a serverless hub has at most this many."""
DEFAULT_EGRESS = {"azure": "nat_gateway", "aws": "slot_eip"}
ALLOWED_EGRESS = {"azure": ("nat_gateway", "none"), "aws": ("slot_eip", "nat_gateway")}
DEFAULT_APPROVAL_WAIT_S = 600
"""The wait before looking up the endpoint Databricks creates for a new rule. Databricks
documents no creation time; databricks provider 1.99.0 returns the rule while it is still
CREATING, and an open, unreleased provider change (terraform-provider-databricks PR #5743) would poll that state
for up to 30 minutes. 60 s usually ended before the endpoint existed; 10 minutes covers a typical
endpoint creation (a few minutes) with margin. Only a first deploy or a replaced rule waits."""
MAX_APPROVAL_WAIT_S = 3600

_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$")
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_TF_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_UC_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NCC_NAME_RE = re.compile(r"^[0-9a-zA-Z_-]{3,30}$")
_POLICY_NAME_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,32}$")
_IMDS_TAG_KEY_RE = re.compile(r"^[A-Za-z0-9+\-=.,_:@]{1,128}$")
AZURE_ADMIN_KEY_TYPES = ("ssh-ed25519", "ssh-rsa")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_LINUX_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_RESERVED_USERS = frozenset({"root", "daemon", "bin", "sys", "sync", "nobody", "sshd", "admin", "ubuntu"})
_SECRET_KEY_RE = re.compile(r"(pass(word|wd)?|secret|token|credential)s?$", re.IGNORECASE)
_SSH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)


# --------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------


def _err(kind: str, message: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError(kind, message, ctx or None)


def _check_name(value: str, what: str, max_len: int) -> str:
    if not (2 <= len(value) <= max_len) or not _NAME_RE.match(value) or "--" in value:
        raise _err(
            "name",
            "{what} must be 2-{max_len} characters of lowercase letters, digits and single hyphens, "
            "starting with a letter and not ending with a hyphen",
            what=what,
            max_len=max_len,
        )
    return value


def _hub_name(value: str) -> str:
    return _check_name(value, "a hub name", 16)


def _route_name(value: str) -> str:
    return _check_name(value, "a route name", 32)


def _tunnel_host_name(value: str) -> str:
    return _check_name(value, "a tunnel host name", 24)


def is_valid_domain(value: str, *, wildcard: bool = False) -> bool:
    """An FQDN of at least two labels (RFC 1123), optionally with a leading ``*.``."""
    name = value[2:] if wildcard and value.startswith("*.") else value
    if not name or len(name) > 253 or name.endswith("."):
        return False
    labels = name.split(".")
    if len(labels) < 2 or labels[-1].isdigit():
        return False
    return all(_LABEL_RE.match(label) for label in labels)


def _domain(value: str) -> str:
    value = value.lower()
    if not is_valid_domain(value):
        raise _err(
            "domain",
            "not a valid domain name: use a fully qualified name of at least two labels, each "
            "1-63 letters, digits or hyphens (for example orders.db.example.internal)",
        )
    return value


def _wildcard_domain(value: str) -> str:
    value = value.lower()
    if not is_valid_domain(value, wildcard=True):
        raise _err(
            "domain",
            "not a valid destination domain: use a fully qualified name such as pypi.org, "
            "optionally with a leading '*.' wildcard",
        )
    return value


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise _err("port", "ports must be in 1-65535")
    return value


def _ipv4_network(value: Any) -> IPv4Network:
    if isinstance(value, IPv4Network):
        return value
    if not isinstance(value, str):
        raise _err("cidr", "expected an IPv4 CIDR string such as 10.60.0.0/24")
    try:
        net = ip_network(value.strip(), strict=False)
    except ValueError:
        raise _err("cidr", "not a valid IPv4 CIDR: write it like 10.60.0.0/24") from None
    if net.version != 4:
        raise _err("cidr", "only IPv4 CIDRs are supported")
    if str(net) != value.strip() and "/" in value:
        raise _err("cidr", "host bits are set: did you mean {fixed}?", fixed=str(net))
    if "/" not in value:
        raise _err("cidr", "a CIDR needs a prefix length: write {fixed}/32 for a single address", fixed=value)
    return net


def _ssh_public_key(value: str) -> str:
    value = " ".join(value.split())
    if "PRIVATE KEY" in value:
        raise _err("ssh_key", "this is a private key: paste the public key (the .pub file) instead")
    parts = value.split(" ")
    if len(parts) < 2:
        raise _err("ssh_key", "not an OpenSSH public key: expected '<type> <base64> [comment]'")
    key_type, blob_b64 = parts[0], parts[1]
    if key_type not in _SSH_KEY_TYPES:
        if "=" in key_type or "," in key_type:
            raise _err(
                "ssh_key",
                "authorized_keys options are not allowed here (tunnelhub generates them): give only "
                "'<type> <base64> [comment]'",
            )
        raise _err(
            "ssh_key",
            "unsupported SSH key type {key_type}: use one of {allowed}",
            key_type=key_type,
            allowed=", ".join(sorted(_SSH_KEY_TYPES)),
        )
    try:
        blob = base64.b64decode(blob_b64, validate=True)
        (inner_len,) = struct.unpack(">I", blob[:4])
        inner_type = blob[4 : 4 + inner_len].decode()
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        raise _err("ssh_key", "the key's base64 body is damaged: copy the whole .pub line again") from None
    if inner_type != key_type:
        raise _err(
            "ssh_key",
            "the key says {key_type} but its body holds a {inner_type} key: copy the .pub line again",
            key_type=key_type,
            inner_type=inner_type,
        )
    if key_type == "ssh-rsa":
        bits = _rsa_bits(blob)
        if bits < 3072:
            raise _err(
                "ssh_key",
                "RSA keys must have at least 3072 bits (this one has {bits}); ed25519 is recommended",
                bits=bits,
            )
    return value


def _rsa_bits(blob: bytes) -> int:
    offset = 0
    fields = []
    for _ in range(3):
        (length,) = struct.unpack(">I", blob[offset : offset + 4])
        fields.append(blob[offset + 4 : offset + 4 + length])
        offset += 4 + length
    modulus = fields[2].lstrip(b"\x00")
    return len(modulus) * 8 - (8 - modulus[0].bit_length()) if modulus else 0


_AZURE_NETWORK_ID_RE = re.compile(
    r"^/subscriptions/(?P<subscription>[^/]+)/resourceGroups/(?P<group>[^/]+)/providers/"
    r"Microsoft\.Network/virtualNetworks/(?P<vnet>[^/]+)(?:/subnets/(?P<subnet>[^/]+))?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class AzureNetworkId:
    """The parts of a VNet or subnet resource id."""

    subscription_id: str
    resource_group: str
    vnet_name: str
    subnet_name: str | None


_AZURE_VIRTUAL_HUB_ID_RE = re.compile(
    r"^/subscriptions/(?P<subscription>[^/]+)/resourceGroups/(?P<group>[^/]+)/providers/"
    r"Microsoft\.Network/virtualHubs/(?P<hub>[^/]+)$",
    re.IGNORECASE,
)


def is_azure_virtual_hub_id(resource_id: str) -> bool:
    """``/subscriptions/<s>/resourceGroups/<g>/providers/Microsoft.Network/virtualHubs/<h>`` (a Virtual WAN hub)."""
    return _AZURE_VIRTUAL_HUB_ID_RE.match(resource_id) is not None


def parse_azure_network_id(resource_id: str) -> AzureNetworkId | None:
    """Split ``/subscriptions/<s>/resourceGroups/<g>/providers/Microsoft.Network/virtualNetworks/<v>[/subnets/<n>]``."""
    m = _AZURE_NETWORK_ID_RE.match(resource_id)
    if m is None:
        return None
    return AzureNetworkId(m["subscription"].lower(), m["group"], m["vnet"], m["subnet"])


def _tf_var(value: str) -> str:
    if not _TF_VAR_RE.match(value):
        raise _err(
            "tf_var",
            "must be a Terraform variable name (letters, digits, '_' or '-', not starting with a "
            "digit); the value itself is set outside the spec as a sensitive variable",
        )
    return value


def _uuid(value: str) -> str:
    value = value.lower()
    if not _UUID_RE.match(value):
        raise _err("uuid", "must be a UUID such as 01234567-89ab-cdef-0123-456789abcdef")
    return value


def _azure_resource_id(value: str) -> str:
    if not re.match(r"^/subscriptions/[0-9a-fA-F-]{36}/resourceGroups/[^/]+/providers/.+/.+$", value):
        raise _err(
            "azure_id",
            "must be an Azure resource id like /subscriptions/<uuid>/resourceGroups/<rg>/providers/"
            "Microsoft.Network/virtualNetworks/<name>",
        )
    return value


def _prefixed_id(prefix: str) -> Any:
    def check(value: str) -> str:
        if not re.match(rf"^{prefix}-[0-9a-f]{{8,17}}$", value):
            raise _err("aws_id", "must be an AWS id like {prefix}-0123456789abcdef0", prefix=prefix)
        return value

    return check


def _linux_user(v: str) -> str:
    if not _LINUX_USER_RE.match(v) or v in _RESERVED_USERS:
        raise _err("user", "must be a Linux user name (lowercase, up to 32 characters) other than "
                   "root, admin, ubuntu and the system accounts")
    return v


def _aws_account(v: str) -> str:
    if not re.match(r"^\d{12}$", v):
        raise _err("aws_account", "must be a 12-digit AWS account id")
    return v


def _uc_name(v: str) -> str:
    if not _UC_NAME_RE.match(v):
        raise _err("uc_name", "must be a Unity Catalog name: letters, digits and underscores")
    return v


def _workspace_id(v: str) -> str:
    if not re.match(r"^\d{6,20}$", v):
        raise _err("workspace_id", "must be the numeric workspace id (the digits after adb- in an Azure "
                   "workspace URL, or from the account console)")
    return v


def _workspace_url(v: str) -> str:
    m = re.match(r"^https://([a-z0-9.-]+)/?$", v)
    if not m or not is_valid_domain(m[1]):
        raise _err("url", "must be the workspace URL, like https://adb-1234567890123456.7.azuredatabricks.net")
    return v.rstrip("/")


def _ncc_name(v: str) -> str:
    if not _NCC_NAME_RE.match(v):
        raise _err("ncc_name", "Databricks NCC names are 3-30 letters, digits, '-' or '_'")
    return v


HubName = Annotated[str, AfterValidator(_hub_name)]
RouteName = Annotated[str, AfterValidator(_route_name)]
TunnelHostName = Annotated[str, AfterValidator(_tunnel_host_name)]
Port = Annotated[int, AfterValidator(_port)]
DomainName = Annotated[str, AfterValidator(_domain)]
DestinationDomain = Annotated[str, AfterValidator(_wildcard_domain)]
Cidr = Annotated[IPv4Network, BeforeValidator(_ipv4_network)]
SshPublicKey = Annotated[str, AfterValidator(_ssh_public_key)]
TfVarName = Annotated[str, AfterValidator(_tf_var)]
Uuid = Annotated[str, AfterValidator(_uuid)]
AzureResourceId = Annotated[str, AfterValidator(_azure_resource_id)]
SubnetId = Annotated[str, AfterValidator(_prefixed_id("subnet"))]
VpcId = Annotated[str, AfterValidator(_prefixed_id("vpc"))]
LinuxUser = Annotated[str, AfterValidator(_linux_user)]
AwsAccountId = Annotated[str, AfterValidator(_aws_account)]
UcName = Annotated[str, AfterValidator(_uc_name)]
WorkspaceId = Annotated[str, AfterValidator(_workspace_id)]
WorkspaceUrl = Annotated[str, AfterValidator(_workspace_url)]
NccName = Annotated[str, AfterValidator(_ncc_name)]
Cloud = Literal["azure", "aws"]
DatabaseType = Literal["mysql", "postgresql", "sqlserver", "oracle"]
ProbeMode = Literal["auto", "mysql", "postgresql", "sqlserver", "oracle", "tls", "banner", "connect"]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Probe(_Model):
    """How a proxy judges whether a route can carry traffic (its answer to the LB probe)."""

    mode: ProbeMode = "auto"
    """auto: by the route's database type (mysql, postgresql, sqlserver, oracle); otherwise tls
    for a target on port 443 and connect for anything else."""
    interval_s: float = Field(2.0, ge=0.5, le=60)
    """How often each proxy checks the target (the LB's probes read the cached result)."""
    timeout_s: float = Field(2.0, ge=0.2, le=30)
    """Bound on one check, connect included: a hanging tunnel fails after this."""
    check_user: str = "tunnelhub_check"
    """mysql: the password-less, privilege-less user the check logs in as (then quits cleanly)."""
    server_name: str | None = None
    """tls: the SNI name sent (default: the target host)."""


class Route(_Model):
    """One thing Databricks connects to, on one frontend port of the hub."""

    name: RouteName
    kind: Literal["tunnel", "forward"]
    port: Port
    """Frontend port: on the load balancer and on every proxy NIC."""
    target: str
    """host:port. tunnel: resolved on the tunnel host; forward: resolved by the proxy at connect time."""
    tunnel_port: int | None = None
    """tunnel routes: the loopback port the on-prem ssh -R holds on each proxy (default: port + 10000
    when free and valid, else the first free port from 20000). With several tunnel hosts this is the
    first host's port; host ``k`` holds ``tunnel_port + port_offset`` (default offset 1000 × k)."""
    peer_port: int | None = None
    """tunnel routes: the port on each proxy's private address where its peers reach this route
    through that proxy's own tunnels only (the backup path when a proxy's local tunnels are dead;
    default: port + 20000 when free and valid, else the first free port from 40000)."""
    type: DatabaseType | None = None
    """Database type, for the probe and the Unity Catalog connection."""
    domain: DomainName | None = None
    """The name Databricks uses (default: <route>.<hub>.tunnelhub.internal for tunnel routes, the
    target host for forward routes)."""
    probe: Probe = Probe()
    max_connections: int = Field(1000, ge=1, le=100000)
    """Connections the proxy's data plane accepts on this route at once."""
    idle_timeout_min: int = Field(30, ge=4, le=100)
    """Idle TCP timeout on the load balancer and the proxy data plane (Azure LB allows 4-100)."""

    @field_validator("tunnel_port", "peer_port")
    @classmethod
    def _check_tunnel_port(cls, v: int | None, info: Any) -> int | None:
        if v is not None and not 1024 < v <= 65535:
            raise _err(info.field_name, f"{info.field_name.replace('_', ' ')}s must be above 1024 (and at most 65535)")
        return v

    @field_validator("target")
    @classmethod
    def _check_target(cls, v: str) -> str:
        parse_target(v)
        return v

    @property
    def target_host(self) -> str:
        return parse_target(self.target)[0]

    @property
    def target_port(self) -> int:
        return parse_target(self.target)[1]

    @property
    def probe_mode(self) -> str:
        """The probe mode in effect (``auto`` resolved)."""
        if self.probe.mode != "auto":
            return self.probe.mode
        if self.type is not None:
            return self.type
        return "tls" if self.target_port == 443 else "connect"

    @property
    def health_path(self) -> str:
        return f"/routes/{self.name}"

    @property
    def connection_name(self) -> str:
        return self.name.replace("-", "_")


def parse_target(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6 literals); raise a field error when invalid."""
    m = re.match(r"^\[(?P<v6>[0-9a-fA-F:.]+)\]:(?P<port>\d+)$", value) or re.match(
        r"^(?P<host>[^:\s\[\]]+):(?P<port>\d+)$", value
    )
    if not m:
        raise _err("target", "must be host:port, for example db1.corp.example:3306 or 10.1.2.3:5432")
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise _err("target", "the target port must be in 1-65535")
    host = m.groupdict().get("v6") or m["host"]
    try:
        ip_address(host)
    except ValueError:
        if not is_valid_domain(host.lower()) and not _LABEL_RE.match(host.lower()):
            raise _err("target", "the target host is neither an IP address nor a valid host name") from None
    return host, port


class AzureExistingNetwork(_Model):
    """Use an existing VNet instead of creating one (Azure hubs)."""

    vnet_id: AzureResourceId
    proxy_subnet_id: AzureResourceId
    proxy_subnet_cidr: Cidr
    """The proxy subnet's CIDR, to compute the static addresses."""
    pls_nat_subnet_id: AzureResourceId
    """A subnet with private_link_service_network_policies_enabled = false."""


class AwsSubnet(_Model):
    id: SubnetId
    cidr: Cidr
    availability_zone: str


class AwsExistingNetwork(_Model):
    """Use an existing VPC instead of creating one (AWS hubs)."""

    vpc_id: VpcId
    vpc_cidr: Cidr
    proxy_subnets: list[AwsSubnet] = Field(min_length=2)
    """Public subnets (route to an internet gateway), one per zone, for the proxies."""
    nlb_subnets: list[AwsSubnet] = Field(min_length=2)
    """Private subnets, one per zone, for the internal NLB."""
    nlb_route_table_ids: list[str] = []
    """The route tables of the NLB subnets: with ``databricks.classic`` the stack adds to each a
    route to the classic CIDRs through the peering (the NLB answers classic clients from these
    subnets). Empty: the stack adds no hub-side route (you add them) and no classic DNS zone."""


class OnPremPath(_Model):
    """How a new Azure hub VNet reaches on-prem: peering to the VNet that holds the customer's
    ExpressRoute/VPN gateway (gateway transit), or a connection to a Virtual WAN hub. Give
    exactly one of ``hub_vnet_id`` or ``virtual_hub_id``."""

    hub_vnet_id: AzureResourceId | None = None
    """The connectivity hub VNet with the ExpressRoute/VPN gateway: the stack peers both ways,
    the hub VNet's half with allow_gateway_transit, ours with use_remote_gateways."""
    use_remote_gateways: bool = True
    """hub_vnet_id: route to on-prem through the remote VNet's gateway (it must have one). false:
    the hub VNet forwards on-prem traffic itself (a firewall/NVA you route with UDRs)."""
    remote_peering_enabled: bool = True
    """hub_vnet_id: create the hub VNet's half too (needs rights there, and the stack's
    subscription); false: you create it, with allow_gateway_transit, once the hub VNet exists (our
    half fails until then: apply again after it)."""
    virtual_hub_id: AzureResourceId | None = None
    """A Virtual WAN hub with the ExpressRoute/VPN gateway: the stack connects the VNet to it."""
    internet_security_enabled: bool = False
    """virtual_hub_id: send the VNet's internet traffic through the hub's secured route (Azure
    Firewall Manager); off by default, as the hub's own egress is ``network.egress``."""


class Network(_Model):
    """The hub network: a new VNet/VPC from ``cidr``, or an existing one."""

    cidr: Cidr | None = None
    existing_vnet: AzureExistingNetwork | None = None
    onprem_path: OnPremPath | None = None
    """Azure: how the VNet reaches on-prem (required with ``cidr``; an existing VNet already routes)."""
    existing_vpc: AwsExistingNetwork | None = None
    egress: Literal["nat_gateway", "slot_eip", "none"] | None = None
    """How proxies reach the internet (packages at boot, forward routes). Azure: nat_gateway
    (default) or none (you bring a firewall/UDR). AWS: slot_eip (default: each proxy egresses from
    its slot's Elastic IP) or nat_gateway."""
    availability_zones: list[str] | None = None
    """Azure: zone numbers (default 1, 2, 3; [] for a region without zones). AWS: zone names
    (default: the first two zones the region reports)."""


class Proxies(_Model):
    """The proxy VMs (Azure) or Auto Scaling slots (AWS)."""

    count: int = Field(2, ge=1, le=16)
    size: str | None = None
    """VM size / instance type (default: Standard_D2s_v5 on Azure, t3.small on AWS)."""
    image: Literal["ubuntu-24.04"] = "ubuntu-24.04"
    health_port: Port = DEFAULT_HEALTH_PORT
    probe_interval_s: int = Field(5, ge=5, le=300)
    """Load balancer probe interval."""
    probe_threshold: int = Field(2, ge=1, le=10)
    """Consecutive failed probes before the LB takes a proxy out of a route."""
    admin_username: LinuxUser = "tunnelhub"
    admin_ssh_public_keys: list[SshPublicKey] = []
    """Break-glass admin access. Azure needs one key for the VM: when empty, the stack generates one
    and keeps its private half in the hub Key Vault."""


class TunnelHost(_Model):
    """One on-prem tunnel host. Every host carries every tunnel route, on ports of its own."""

    name: TunnelHostName
    """Names the host's package (``onprem build-deb --tunnel-host NAME``) and its servers in the
    proxies' data plane; keep it stable (renaming is removing one host and adding another)."""
    public_keys: list[SshPublicKey] = []
    """This host's tunnel keys (printed by its package's postinst). A key belongs to one host only,
    so revoking a host revokes exactly its tunnels."""
    source_cidrs: list[Cidr] = []
    """Where this host's SSH connections come from (default: onprem.source_cidrs); each must lie
    inside onprem.source_cidrs, the ranges the network rules admit."""
    port_offset: int | None = Field(None, ge=0, le=60000)
    """Added to every route's tunnel_port to give this host's loopback ports on the proxies (default:
    1000 × its position in the list). Set it when removing a host from the middle of the list, so the
    hosts after it keep their ports (and their installed packages stay valid)."""


class OnPrem(_Model):
    """The on-prem tunnel host side."""

    source_cidrs: list[Cidr] = Field(min_length=1)
    """Where the tunnel hosts' SSH connections come from (the only sources allowed on port 22)."""
    tunnel_public_keys: list[SshPublicKey] = []
    """Single-host form: the public keys of the hub's one tunnel host (printed by the on-prem
    package's postinst). Use tunnel_hosts instead for two or more hosts."""
    tunnel_hosts: list[TunnelHost] = Field([], max_length=MAX_TUNNEL_HOSTS)
    """Two or more tunnel hosts, active/active: each carries every tunnel route on its own ports,
    and the proxies spread connections over the hosts that are up (docs/onprem.md)."""
    tunnel_user: LinuxUser = "tunnel"
    private_circuit: bool | None = None
    """The tunnel host reaches the proxies' private addresses (ExpressRoute, VPN, Direct Connect).
    Azure: always (the proxies have no public address). AWS default: false (it dials the slots'
    Elastic IPs)."""
    tcp_quickack: bool = True
    """The on-prem package routes each proxy address with ``quickack 1``, so the tunnel host
    acknowledges at once and a new tunneled connection does not wait ~40 ms on the proxy's
    Nagle/delayed-ACK interplay (sshd leaves Nagle on for sessions without a terminal)."""


class ClassicCompute(_Model):
    """The Databricks classic compute network to peer the hub with."""

    network_id: str
    """Azure: the workspace VNet's resource id. AWS: the workspace VPC id."""
    cidrs: list[Cidr] = Field(min_length=1)
    """Its address ranges (allowed to reach the route ports)."""
    aws_account_id: AwsAccountId | None = None
    """AWS: the VPC owner's account when it is not the hub's (set it only then). The peering
    request names it as peer owner; that account accepts it and adds the routes to the hub."""
    aws_route_table_ids: list[str] = []
    """AWS: route tables of the workspace VPC (those of the cluster subnets) that get a route to the
    hub's NLB subnets through the peering. Required with remote_peering_enabled (same account)."""
    remote_peering_enabled: bool = True
    """Create the workspace-side half of the peering too (needs rights on that network). AWS:
    accept the peering and add the routes in aws_route_table_ids (same account only)."""


class NetworkPolicy(_Model):
    """A Databricks account network policy restricting serverless egress."""

    name: str | None = None
    """Default: <hub>-egress."""
    mode: Literal["enforced", "dry_run"] = "enforced"
    allowed_domains: list[DestinationDomain] = []
    """Extra internet destinations (the forward routes' domains are always allowed)."""


class ForeignCatalog(_Model):
    name: UcName
    database: str | None = None
    """The remote database (postgresql, sqlserver) or service name (oracle); required for those,
    not used for mysql (a MySQL foreign catalog mirrors every database as a schema)."""


class Connection(_Model):
    """A Unity Catalog connection to one database route."""

    route: str
    name: UcName | None = None
    """Default: the route name with '-' turned into '_'."""
    user: str | None = None
    """A literal user name, or give user_var."""
    user_var: TfVarName | None = None
    password_var: TfVarName
    """Name of the sensitive Terraform variable holding the password (never the password)."""
    foreign_catalog: ForeignCatalog | None = None


class Databricks(_Model):
    """Databricks wiring: NCC, private endpoint rule, binding, policy, DNS, connections."""

    account_id: Uuid
    workspace_id: WorkspaceId
    workspace_host: WorkspaceUrl
    serverless_enabled: bool = True
    """Create the NCC, its private endpoint rule to the hub and the approval."""
    ncc_name: NccName | None = None
    """Default: <hub>-ncc. 3-30 letters, digits, '-' or '_'."""
    classic: ClassicCompute | None = None
    network_policy: NetworkPolicy | None = None
    connections: list[Connection] = []
    approval_wait_s: int = DEFAULT_APPROVAL_WAIT_S
    """Seconds between creating the private endpoint rule and looking up the endpoint Databricks
    creates for it, before approving it (first deploy, or a replaced rule). 0-3600."""


class LocalBackend(_Model):
    type: Literal["local"] = "local"
    path: str | None = None
    """State file path (default: terraform.<stack>.tfstate in the stack's directory)."""


class CloudBackend(_Model):
    type: Literal["cloud"]
    organization: str
    workspace: str
    hostname: str = "app.terraform.io"
    project: str | None = None


Backend = Annotated[Union[LocalBackend, CloudBackend], Field(discriminator="type")]


class AzureSettings(_Model):
    """Azure-only settings."""

    subscription_id: Uuid | None = None
    """Default: from the environment (ARM_SUBSCRIPTION_ID)."""
    resource_group: str | None = None
    """Created by the stack (default: <hub>-rg)."""
    pls_visibility_subscription_ids: list[Union[Uuid, Literal["*"]]] = ["*"]
    """Who may see the Private Link Service and request a connection to it. Default ``["*"]``:
    Databricks creates the serverless endpoint from its own subscription, whose id is not
    published, so the PLS must be visible to every subscription (azurerm 4.55.0 accepts "*").
    Connections still wait for approval, which the stack gives only to its own rule's endpoint."""
    pls_auto_approval_subscription_ids: list[Uuid] = []
    """Subscriptions whose endpoints are approved without asking. Default: none (the stack
    approves the Databricks endpoint itself, inside Terraform)."""


class AwsSettings(_Model):
    """AWS-only settings."""

    key_pair_name: str | None = None
    """An EC2 key pair for break-glass access (default: none; admin keys go through cloud-init)."""
    endpoint_allowed_principals: list[str] | None = None
    """Default: the Databricks serverless role of the hub's region."""
    slot_lambda_reserved_concurrency: int | None = None
    """Reserved concurrency of the slot Lambda. Default: none (the function draws on the account's
    unreserved pool). AWS lets a function reserve only what leaves the account's minimum
    unreserved concurrency free (100 at the default quota of 1,000; new accounts often start far
    lower), so reserving fails on low-quota accounts. 1 serializes slot decisions; the handler is
    correct without it."""


_EMAIL_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@([A-Za-z0-9-]+\.)+[A-Za-z]{2,63}$")


def _one_or_many(value: Any) -> Any:
    """``email: ops@example.com`` and ``email: [a@x, b@y]`` both mean a list."""
    return [value] if isinstance(value, str) else value


def _email(value: str) -> str:
    if len(value) > 254 or not _EMAIL_RE.match(value) or ".." in value:
        raise _err("email", "not an email address: write it like ops@example.com")
    return value


def _https_webhook(value: str) -> str:
    m = re.match(r"^https://([A-Za-z0-9.-]+)(:\d{1,5})?(/[^\s]*)?$", value)
    if value.lower().startswith("http://"):
        raise _err("webhook", "webhooks must use https:// (alert payloads name the hub and its routes)")
    if not m or not (is_valid_domain(m[1].lower()) or _is_ipv4(m[1])):
        raise _err("webhook", "not a webhook URL: write it like https://hooks.example.com/tunnelhub")
    return value


def _is_ipv4(value: str) -> bool:
    try:
        return ip_address(value).version == 4
    except ValueError:
        return False


EmailAddress = Annotated[str, AfterValidator(_email)]
HttpsWebhook = Annotated[str, AfterValidator(_https_webhook)]


class Monitoring(_Model):
    """Cloud alerts on the hub's load balancer, where they go, and who may scrape the proxies'
    metrics (docs/azure.md, docs/aws.md "Alerts")."""

    alerts: bool = True
    """Create the per-route alerts (Azure metric alerts, AWS CloudWatch alarms) and, on AWS, the
    slot Lambda's abandoned-launch alarm. On by default: an alert that notifies nobody still shows
    in Azure Monitor / the CloudWatch console and costs cents a month."""
    email: Annotated[list[EmailAddress], BeforeValidator(_one_or_many)] = []
    """Addresses notified of every alert (AWS: each must confirm the SNS subscription mail)."""
    webhook: Annotated[list[HttpsWebhook], BeforeValidator(_one_or_many)] = []
    """https endpoints that receive each alert (Azure common alert schema; AWS SNS https
    subscription, which must confirm itself)."""
    scrape_cidrs: list[Cidr] = []
    """Prometheus scrapers of ``GET /metrics``: admitted to the proxies' health port only."""


class Hub(_Model):
    """One proxy hub: one cloud stack with its Databricks wiring."""

    name: HubName
    cloud: Cloud
    region: str
    network: Network
    proxies: Proxies = Proxies()
    routes: list[Route] = Field(min_length=1)
    onprem: OnPrem
    databricks: Databricks | None = None
    backend: Backend = LocalBackend()
    domain_suffix: DomainName | None = None
    """Suffix of the derived route domains (default: <hub>.tunnelhub.internal)."""
    azure: AzureSettings | None = None
    aws: AwsSettings | None = None
    tags: dict[str, str] = {}
    monitoring: Monitoring = Monitoring()
    protect: bool = True
    """``lifecycle.prevent_destroy`` on what a replacement would silently break: the load
    balancer, the Private Link Service / VPC endpoint service, the Key Vault, the NCC and its
    private endpoint rule. Set false only for a planned destroy or replace (docs/teardown.md)."""

    # -- derived values -----------------------------------------------------------------------

    @property
    def stack_name(self) -> str:
        return f"{self.name}-{self.cloud}"

    @property
    def proxy_size(self) -> str:
        return self.proxies.size if self.proxies.size is not None else DEFAULT_PROXY_SIZE[self.cloud]

    @property
    def egress(self) -> str:
        return self.network.egress if self.network.egress is not None else DEFAULT_EGRESS[self.cloud]

    @property
    def private_circuit(self) -> bool:
        if self.onprem.private_circuit is not None:
            return self.onprem.private_circuit
        return self.cloud == "azure"

    @property
    def zones(self) -> list[str] | None:
        """Azure zone numbers, or AWS zone names; None for AWS when the region picks them."""
        if self.network.availability_zones is not None:
            return list(self.network.availability_zones)
        return list(DEFAULT_AZURE_ZONES) if self.cloud == "azure" else None

    @property
    def zone_count(self) -> int:
        zones = self.zones
        if zones is None:
            return DEFAULT_AWS_ZONE_COUNT
        return max(1, len(zones))

    @property
    def tunnel_routes(self) -> list[Route]:
        return [r for r in self.routes if r.kind == "tunnel"]

    @property
    def tunnel_hosts(self) -> list[TunnelHost]:
        """The hub's tunnel hosts with every default filled in (``port_offset``, ``source_cidrs``).
        The single-host form (``onprem.tunnel_public_keys``) is one host named ``tunnel-host``."""
        op = self.onprem
        hosts = op.tunnel_hosts or [TunnelHost(name=DEFAULT_TUNNEL_HOST, public_keys=list(op.tunnel_public_keys))]
        return [
            h.model_copy(update={
                "port_offset": HOST_PORT_STRIDE * k if h.port_offset is None else h.port_offset,
                "source_cidrs": list(h.source_cidrs) or list(op.source_cidrs),
            })
            for k, h in enumerate(hosts)
        ]

    @property
    def multi_host(self) -> bool:
        """True when the spec names tunnel hosts (``onprem.tunnel_hosts``)."""
        return bool(self.onprem.tunnel_hosts)

    def tunnel_host(self, name: str) -> TunnelHost:
        for h in self.tunnel_hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def host_tunnel_port(self, route: Route, host: TunnelHost | str) -> int:
        """The loopback port tunnel host ``host`` holds for ``route`` on every proxy."""
        if route.tunnel_port is None:
            raise ValueError(f"route {route.name!r} has no tunnel port (a forward route, or an unresolved spec)")
        h = self.tunnel_host(host) if isinstance(host, str) else host
        offset = h.port_offset
        if offset is None:  # an unresolved host: its position gives the default
            offset = HOST_PORT_STRIDE * [x.name for x in self.tunnel_hosts].index(h.name)
        return route.tunnel_port + offset

    def all_tunnel_keys(self) -> list[tuple[str, str]]:
        """``(host name, public key)`` for every tunnel key of the hub, in spec order."""
        return [(h.name, key) for h in self.tunnel_hosts for key in h.public_keys]

    @property
    def forward_routes(self) -> list[Route]:
        return [r for r in self.routes if r.kind == "forward"]

    @property
    def ncc_name(self) -> str:
        if self.databricks is not None and self.databricks.ncc_name is not None:
            return self.databricks.ncc_name
        return f"{self.name}-ncc"

    def route(self, name: str) -> Route:
        for r in self.routes:
            if r.name == name:
                return r
        raise KeyError(name)

    def azure_addresses(self) -> addressing.AzureAddressPlan:
        existing = self.network.existing_vnet
        return addressing.azure_plan(
            proxy_count=self.proxies.count,
            vnet_cidr=self.network.cidr,
            proxy_subnet=existing.proxy_subnet_cidr if existing else None,
        )

    def aws_addresses(self) -> addressing.AwsAddressPlan:
        existing = self.network.existing_vpc
        return addressing.aws_plan(
            proxy_count=self.proxies.count,
            zone_count=self.zone_count,
            vpc_cidr=self.network.cidr,
            public_subnets=tuple(s.cidr for s in existing.proxy_subnets) if existing else None,
        )

    def hub_cidrs(self) -> list[IPv4Network]:
        """The address ranges the hub occupies (for overlap checks)."""
        if self.network.cidr is not None:
            return [self.network.cidr]
        if self.network.existing_vnet is not None:
            return [self.network.existing_vnet.proxy_subnet_cidr]
        if self.network.existing_vpc is not None:
            return [self.network.existing_vpc.vpc_cidr]
        return []

    def port_plan(self) -> list[dict[str, Any]]:
        """What listens where (the ``tunnelhub ports`` table): one row per (tunnel route, tunnel
        host) and one per forward route. ``tunnel_port`` is that host's loopback port on every
        proxy; ``peer_port`` the route's backup path between proxies (None for forward routes)."""
        rows = []
        for r in self.routes:
            hosts: list[TunnelHost | None] = list(self.tunnel_hosts) if r.kind == "tunnel" else [None]
            for h in hosts:
                rows.append({
                    "hub": self.name,
                    "route": r.name,
                    "kind": r.kind,
                    "port": r.port,
                    "tunnel_host": h.name if h is not None else None,
                    "tunnel_port": self.host_tunnel_port(r, h) if h is not None and r.tunnel_port is not None else None,
                    "peer_port": r.peer_port,
                    "target": r.target,
                    "domain": r.domain,
                    "type": r.type,
                    "probe": r.probe_mode,
                    "health_path": r.health_path,
                })
        return rows


class SpecFile(_Model):
    """A spec file: one or more hubs."""

    version: Literal[1] = 1
    hubs: list[Hub] = Field(min_length=1)

    def select(self, names: list[str] | None) -> list[Hub]:
        """The named hubs in spec order (all when ``names`` is empty); an unknown name is a SpecError."""
        if not names:
            return list(self.hubs)
        wanted = {self.hub(n).name for n in names}
        return [h for h in self.hubs if h.name in wanted]

    def hub(self, name: str) -> Hub:
        for h in self.hubs:
            if h.name == name:
                return h
        raise SpecError(
            [SpecIssue(path=("hubs",), message=f"no hub named {name!r}; hubs in this spec: "
                       + ", ".join(h.name for h in self.hubs))],
            source=None,
        )


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

_NO_VALUE = object()


@dataclass(frozen=True)
class SpecIssue:
    """One problem (or warning) in a spec, located by its field path."""

    path: tuple[str | int, ...]
    message: str
    value: Any = _NO_VALUE
    hub: str | None = None
    line: int | None = None

    @property
    def dotted_path(self) -> str:
        return format_path(self.path)

    def render(self, source: str | None) -> str:
        where = source or "<spec>"
        if self.line is not None:
            where += f":{self.line}"
        hub = f' hub "{self.hub}":' if self.hub else ""
        value = "" if self.value is _NO_VALUE else f" = {_short(self.value)}"
        return f"{where}:{hub} {self.dotted_path}{value}: {self.message}"


class SpecError(Exception):
    """The spec is invalid; ``issues`` holds every problem found."""

    def __init__(self, issues: list[SpecIssue], source: str | None):
        self.issues = issues
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        head = f"{self.source or 'the spec'} is invalid ({len(self.issues)} problem{'s' if len(self.issues) != 1 else ''}):"
        return "\n".join([head, *("  " + i.render(self.source) for i in self.issues)])


def format_path(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _short(value: Any) -> str:
    if isinstance(value, (IPv4Network, IPv4Address)):
        value = str(value)
    text = repr(value) if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    if text.endswith("\n..."):
        text = text[:-4]
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    spec: SpecFile
    warnings: list[SpecIssue] = field(default_factory=list)
    source: str | None = None


def load_spec(path: str | Path) -> SpecFile:
    """Load, validate and resolve a spec file; raise :class:`SpecError` when it is invalid."""
    return validate_spec(path).spec


def validate_spec(path: str | Path) -> ValidationReport:
    """Like :func:`load_spec`, and also return the warnings."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([SpecIssue(("file",), f"spec file {source} does not exist")], source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([SpecIssue(("file",), f"cannot read spec file {source}: {exc}")], source) from None
    return validate_text(text, source)


def validate_text(text: str, source: str | None = None) -> ValidationReport:
    """Validate spec YAML text (``source`` names it in messages)."""
    data, lines = _parse_yaml(text, source)
    try:
        spec = SpecFile.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_issues_from_pydantic(exc, data, lines), source) from None
    issues = _check_spec(spec)
    errors = [i for i in issues if not i.message.startswith("warning:")]
    if errors:
        raise SpecError([_locate(i, lines) for i in errors], source)
    spec = _resolve(spec)
    warnings = [_locate(i, lines) for i in issues if i.message.startswith("warning:")]
    return ValidationReport(spec=spec, warnings=warnings, source=source)


def _parse_yaml(text: str, source: str | None) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML and record the line of every key (for messages); reject duplicate keys."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([SpecIssue(("yaml",), f"not valid YAML: {problem}", line=line)], source) from None
    if node is None:
        raise SpecError([SpecIssue(("hubs",), "the spec is empty: it needs a 'hubs:' list")], source)
    lines: dict[tuple, int] = {}
    dupes: list[SpecIssue] = []

    def walk(n: yaml.Node, path: tuple) -> None:
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in n.value:
                key = k.value
                if key in seen:
                    dupes.append(SpecIssue(path + (key,), f"key {key!r} appears twice in the same block; keep one",
                                           line=k.start_mark.line + 1))
                seen.add(key)
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, path + (i,))

    walk(node, ())
    if dupes:
        raise SpecError(dupes, source)
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise SpecError([SpecIssue((), "the spec must be a mapping with a 'hubs:' list", line=1)], source)
    return data, lines


def _locate(issue: SpecIssue, lines: dict[tuple, int]) -> SpecIssue:
    path = issue.path
    while path and path not in lines:
        path = path[:-1]
    line = lines.get(path)
    return SpecIssue(issue.path, issue.message, issue.value, issue.hub, line)


def _hub_name_at(data: Any, loc: tuple) -> str | None:
    if len(loc) >= 2 and loc[0] == "hubs" and isinstance(loc[1], int):
        try:
            name = data["hubs"][loc[1]].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
        return name if isinstance(name, str) else None
    return None


def _value_at(data: Any, loc: tuple) -> Any:
    cur = data
    for part in loc:
        try:
            cur = cur[part]
        except (KeyError, IndexError, TypeError):
            return _NO_VALUE
    return cur


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model class that holds the last element of ``loc`` (for 'allowed keys' hints)."""
    current: Any = SpecFile
    for part in loc[:-1]:
        current = _unwrap(current)
        if isinstance(current, list):
            current = _choose_model(current, part)
        if current is None:
            return None
        if isinstance(part, int):
            continue
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        elif isinstance(current, list):
            continue
        else:
            return None
    current = _unwrap(current)
    if isinstance(current, list):
        current = _choose_model(current, loc[-1] if loc else None)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    """Strip Optional / list / Annotated until a model (or a list of candidate models) remains."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (list, tuple):
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            models = [a for a in typing.get_args(tp) if isinstance(a, type) and issubclass(a, BaseModel)]
            if len(models) == 1:
                tp = models[0]
            elif models:
                return models
            else:
                return tp
        else:
            return tp


def _choose_model(models: list, hint: Any) -> Any:
    for m in models:
        if isinstance(hint, str) and hint in m.model_fields:
            return m
    return models[0] if models else None


def _issues_from_pydantic(exc: ValidationError, data: Any, lines: dict[tuple, int]) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    for e in exc.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in ("local", "cloud")))
        kind = e["type"]
        value: Any = _value_at(data, loc)
        if kind == "extra_forbidden":
            key = loc[-1]
            model = _model_at(loc)
            allowed = sorted(model.model_fields) if model else []
            if isinstance(key, str) and _SECRET_KEY_RE.search(key):
                msg = (
                    "literal credentials are not allowed in the spec: name a sensitive Terraform "
                    "variable instead (password_var: my_db_password) and set its value in Terraform "
                    "Cloud or as TF_VAR_my_db_password"
                )
            else:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                msg = f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                if allowed:
                    msg += "; allowed keys here: " + ", ".join(allowed)
            issues.append(SpecIssue(loc, msg, _NO_VALUE, _hub_name_at(data, loc)))
            continue
        if kind == "missing":
            msg = f"required key {loc[-1]!r} is missing"
            value = _NO_VALUE
        elif kind == "union_tag_invalid" and loc and loc[-1] == "backend":
            msg = "backend.type must be 'local' or 'cloud'"
        else:
            msg = e["msg"]
        issues.append(SpecIssue(loc, msg, value, _hub_name_at(data, loc)))
    return [_locate(i, lines) for i in issues]


# --------------------------------------------------------------------------------------------
# Cross-field rules
# --------------------------------------------------------------------------------------------


def _check_spec(spec: SpecFile) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    seen: dict[str, int] = {}
    workspaces: dict[tuple[str, str, str], int] = {}
    for i, hub in enumerate(spec.hubs):
        if hub.name in seen:
            issues.append(SpecIssue(("hubs", i, "name"), f"hub names must be unique; hubs[{seen[hub.name]}] "
                                    "already uses this name", hub.name, hub.name))
        seen.setdefault(hub.name, i)
        if isinstance(hub.backend, CloudBackend):
            key = (hub.backend.hostname, hub.backend.organization, hub.backend.workspace)
            if key in workspaces:
                issues.append(SpecIssue(("hubs", i, "backend", "workspace"),
                                        f"hubs[{workspaces[key]}] already keeps its state in this Terraform Cloud "
                                        "workspace; each hub stack needs its own workspace", hub.backend.workspace, hub.name))
            workspaces.setdefault(key, i)
        issues.extend(_check_hub(hub, ("hubs", i)))
    # A workspace has one NCC: two serverless hubs binding theirs to it would take it from each other.
    serverless: dict[str, int] = {}
    catalogs: dict[tuple[str, str], int] = {}
    for i, hub in enumerate(spec.hubs):
        db = hub.databricks
        if db is None:
            continue
        if db.serverless_enabled:
            if db.workspace_id in serverless:
                other = spec.hubs[serverless[db.workspace_id]].name
                issues.append(SpecIssue(("hubs", i, "databricks", "workspace_id"),
                                        f"warning: hub {other!r} also binds its NCC to this workspace, and a workspace "
                                        "has one NCC: the last deploy wins; give both hubs the same ncc_name only if "
                                        "you manage that NCC elsewhere", db.workspace_id, hub.name))
            serverless.setdefault(db.workspace_id, i)
        for k, c in enumerate(db.connections):
            if c.foreign_catalog is None:
                continue
            key = (db.workspace_id, c.foreign_catalog.name)
            if key in catalogs and catalogs[key] != i:
                issues.append(SpecIssue(("hubs", i, "databricks", "connections", k, "foreign_catalog", "name"),
                                        f"hub {spec.hubs[catalogs[key]].name!r} creates a foreign catalog of this name "
                                        "in the same workspace; catalog names must be unique", c.foreign_catalog.name,
                                        hub.name))
            catalogs.setdefault(key, i)
    # Hubs reached from the same on-prem network must not overlap each other.
    for i, a in enumerate(spec.hubs):
        for j in range(i):
            b = spec.hubs[j]
            for ca in a.hub_cidrs():
                for cb in b.hub_cidrs():
                    if ca.overlaps(cb):
                        issues.append(SpecIssue(("hubs", i, "network", "cidr"),
                                                f"overlaps hub {b.name!r} ({cb}); the tunnel host routes to every hub "
                                                "of the spec, so their networks must not overlap", str(ca), a.name))
    return issues


def _check_hub(hub: Hub, at: tuple) -> list[SpecIssue]:  # noqa: C901 - one rule per block, in order
    out: list[SpecIssue] = []

    def issue(path: tuple, message: str, value: Any = _NO_VALUE) -> None:
        out.append(SpecIssue(at + path, message, value, hub.name))

    # region and cloud-specific blocks
    if hub.region not in REGIONS[hub.cloud]:
        other = cloud_of_region(hub.region)
        if other:
            issue(("region",), f"{hub.region!r} is an {other.upper() if other == 'aws' else other.title()} region, "
                  f"but this hub has cloud: {hub.cloud}; use a region of {hub.cloud}, such as "
                  f"{'westeurope' if hub.cloud == 'azure' else 'eu-west-1'}", hub.region)
        else:
            close = difflib.get_close_matches(hub.region, sorted(REGIONS[hub.cloud]), n=1)
            issue(("region",), f"not a known {hub.cloud} region" + (f" (did you mean {close[0]!r}?)" if close else "")
                  + f"; {hub.cloud} regions look like {'westeurope, eastus2' if hub.cloud == 'azure' else 'eu-west-1, us-east-2'}",
                  hub.region)
    if hub.cloud == "aws" and hub.azure is not None:
        issue(("azure",), "an 'azure:' block on an aws hub: move these settings to an azure hub or remove them")
    if hub.cloud == "azure" and hub.aws is not None:
        issue(("aws",), "an 'aws:' block on an azure hub: move these settings to an aws hub or remove them")
    if hub.azure is not None:
        visible = hub.azure.pls_visibility_subscription_ids
        serverless = hub.databricks is not None and hub.databricks.serverless_enabled
        if not visible and serverless:
            issue(("azure", "pls_visibility_subscription_ids"), "an empty list hides the Private Link Service from "
                  "Databricks, whose serverless endpoint comes from its own subscription: remove the key (default "
                  "[\"*\"], every connection still needs approval) or list the subscriptions", visible)
        if "*" in visible and len(visible) > 1:
            issue(("azure", "pls_visibility_subscription_ids"), "\"*\" already makes the Private Link Service visible "
                  "to every subscription: give either [\"*\"] or a list of subscription ids", visible)
    if hub.aws is not None and hub.aws.slot_lambda_reserved_concurrency is not None:
        reserved = hub.aws.slot_lambda_reserved_concurrency
        if reserved < 1:
            issue(("aws", "slot_lambda_reserved_concurrency"), "must be at least 1 (0 would stop the slot Lambda, so no "
                  "proxy gets a slot); remove the key to leave the function unreserved", reserved)

    # network
    net = hub.network
    given = [k for k in ("cidr", "existing_vnet", "existing_vpc") if getattr(net, k) is not None]
    if len(given) != 1:
        issue(("network",), "give exactly one of cidr (create a new network), existing_vnet (Azure) or "
              f"existing_vpc (AWS); given: {', '.join(given) or 'none'}")
    if hub.cloud == "azure" and net.existing_vpc is not None:
        issue(("network", "existing_vpc"), "existing_vpc is for AWS hubs; an azure hub takes existing_vnet")
    if hub.cloud == "aws" and net.existing_vnet is not None:
        issue(("network", "existing_vnet"), "existing_vnet is for Azure hubs; an aws hub takes existing_vpc")
    if net.cidr is not None and not net.cidr.is_private:
        issue(("network", "cidr"), "the hub network must use a private range (RFC 1918 or 100.64.0.0/10)", str(net.cidr))
    if net.egress is not None and net.egress not in ALLOWED_EGRESS[hub.cloud]:
        issue(("network", "egress"), f"{hub.cloud} hubs allow egress: " + " or ".join(ALLOWED_EGRESS[hub.cloud]), net.egress)
    if net.availability_zones is not None:
        if hub.cloud == "azure":
            bad = [z for z in net.availability_zones if z not in DEFAULT_AZURE_ZONES]
            if bad:
                issue(("network", "availability_zones"), "Azure zones are '1', '2' and '3' ([] for none)", bad)
        else:
            if len(net.availability_zones) < 2:
                issue(("network", "availability_zones"), "an AWS hub needs at least two zones (the NLB and the "
                      "endpoint service span them)", net.availability_zones)
            bad = [z for z in net.availability_zones if not z.startswith(hub.region) or len(z) != len(hub.region) + 1]
            if bad:
                issue(("network", "availability_zones"), f"AWS zone names are the region plus a letter, like {hub.region}a", bad)
    if len(given) == 1:
        try:
            if hub.cloud == "azure" and net.existing_vpc is None:
                hub.azure_addresses()
            elif hub.cloud == "aws" and net.existing_vnet is None:
                hub.aws_addresses()
        except addressing.AddressPlanError as exc:
            issue(("network",), str(exc))
    if net.existing_vpc is not None:
        for key in ("proxy_subnets", "nlb_subnets"):
            for k, sub in enumerate(getattr(net.existing_vpc, key)):
                if not sub.cidr.subnet_of(net.existing_vpc.vpc_cidr):
                    issue(("network", "existing_vpc", key, k, "cidr"), f"not inside the VPC CIDR {net.existing_vpc.vpc_cidr}", str(sub.cidr))
        for k, rt in enumerate(net.existing_vpc.nlb_route_table_ids):
            if not re.match(r"^rtb-[0-9a-f]{8,17}$", rt):
                issue(("network", "existing_vpc", "nlb_route_table_ids", k), "must be a route table id like "
                      "rtb-0123456789abcdef0", rt)
    if net.existing_vnet is not None and not net.existing_vnet.proxy_subnet_id.startswith(net.existing_vnet.vnet_id + "/subnets/"):
        issue(("network", "existing_vnet", "proxy_subnet_id"), "the proxy subnet must belong to existing_vnet.vnet_id",
              net.existing_vnet.proxy_subnet_id)

    # proxies
    px = hub.proxies
    if px.health_port == SSH_PORT:
        issue(("proxies", "health_port"), "port 22 is the tunnel SSH port; pick another health port (default 8080)", px.health_port)
    if hub.cloud == "aws" and px.probe_threshold < 2:
        issue(("proxies", "probe_threshold"), "AWS NLB health checks need a threshold of 2-10", px.probe_threshold)

    # routes
    names: dict[str, int] = {}
    ports: dict[int, int] = {}
    for k, r in enumerate(hub.routes):
        rp = ("routes", k)
        if r.name in names:
            issue(rp + ("name",), f"route names must be unique in a hub; routes[{names[r.name]}] already uses it", r.name)
        names.setdefault(r.name, k)
        if r.port in ports:
            issue(rp + ("port",), f"frontend ports must be unique in a hub; routes[{ports[r.port]}] "
                  f"({hub.routes[ports[r.port]].name}) already uses it", r.port)
        ports.setdefault(r.port, k)
        if r.port == SSH_PORT:
            issue(rp + ("port",), "port 22 is reserved for the tunnel SSH connection; pick another frontend port", r.port)
        if r.port == px.health_port:
            issue(rp + ("port",), f"port {px.health_port} is the proxies' health port (proxies.health_port); "
                  "pick another frontend port or move the health port", r.port)
        if r.kind == "forward" and r.tunnel_port is not None:
            issue(rp + ("tunnel_port",), "a forward route has no tunnel: remove tunnel_port (only tunnel routes take one)",
                  r.tunnel_port)
        if r.probe.mode in DATABASE_TYPES and r.type is not None and r.probe.mode != r.type:
            issue(rp + ("probe", "mode"), f"the route's type is {r.type}; a {r.probe.mode} probe would fail against it "
                  f"(use mode: auto or {r.type})", r.probe.mode)
        if r.probe.timeout_s > r.probe.interval_s * 5:
            issue(rp + ("probe", "timeout_s"), "the check timeout must not exceed 5 × interval_s", r.probe.timeout_s)
        if r.kind == "forward":
            host = r.target_host
            try:
                addr = ip_address(host)
                if addr.is_private or addr.is_loopback:
                    issue(rp + ("target",), "a forward route reaches a remote service from the proxy; a private or "
                          "loopback target belongs in a tunnel route", r.target)
            except ValueError:
                pass
    tunnel_ports: dict[int, int] = {}
    for k, r in enumerate(hub.routes):
        if r.tunnel_port is None:
            continue
        rp = ("routes", k, "tunnel_port")
        if r.tunnel_port in tunnel_ports:
            issue(rp, f"tunnel ports must be unique in a hub; routes[{tunnel_ports[r.tunnel_port]}] already uses it", r.tunnel_port)
        tunnel_ports.setdefault(r.tunnel_port, k)
        if r.tunnel_port in ports:
            issue(rp, f"the proxies listen on this port for route {hub.routes[ports[r.tunnel_port]].name!r}; "
                  "a tunnel port must differ from every frontend port", r.tunnel_port)
        if r.tunnel_port == px.health_port:
            issue(rp, "this is the proxies' health port; pick another tunnel port", r.tunnel_port)

    # cloud-specific rules
    if hub.cloud == "aws":
        if hub.egress == "nat_gateway" and not hub.private_circuit:
            issue(("network", "egress"), "with a NAT gateway the proxies sit in subnets without an inbound path from "
                  "the internet, so the tunnel host cannot dial their Elastic IPs: set onprem.private_circuit: true "
                  "(Direct Connect or VPN to the proxies' private addresses), or use egress: slot_eip", hub.egress)
        for key in sorted(hub.tags):
            if not _IMDS_TAG_KEY_RE.match(key) or key in (".", "..", "_index"):
                issue(("tags", key), "the proxies expose their tags in instance metadata (they read their slot "
                      "there), which allows tag keys of letters, digits and + - = . , _ : @ only; rename this tag", key)
        if px.count % hub.zone_count:
            issue(("proxies", "count"), f"warning: {px.count} slots over {hub.zone_count} zones leaves the zones "
                  "uneven; when the Auto Scaling group balances a launch into a zone whose slots are all taken, "
                  "the launch is abandoned and retried elsewhere (use a multiple of the zone count)", px.count)
    else:
        for k, key in enumerate(px.admin_ssh_public_keys):
            if key.split(" ", 1)[0] not in AZURE_ADMIN_KEY_TYPES:
                issue(("proxies", "admin_ssh_public_keys", k), "Azure VMs accept only ssh-ed25519 and ssh-rsa admin "
                      "keys; give one of those (ssh-keygen -t ed25519)", key.split(" ", 1)[0])
        existing = net.existing_vnet
        if existing is not None:
            for key in ("vnet_id", "proxy_subnet_id", "pls_nat_subnet_id"):
                parts = parse_azure_network_id(getattr(existing, key))
                if parts is None or (key != "vnet_id") != (parts.subnet_name is not None):
                    shape = ".../virtualNetworks/<vnet>" + ("" if key == "vnet_id" else "/subnets/<subnet>")
                    issue(("network", "existing_vnet", key), f"must be a Microsoft.Network id ending in {shape}",
                          getattr(existing, key))

    # the on-prem path (Azure: a new VNet is isolated until peered or connected)
    path = net.onprem_path
    pp = ("network", "onprem_path")
    if hub.cloud == "aws" and path is not None:
        issue(pp, "onprem_path is for Azure hubs; an AWS hub reaches on-prem through the slots' Elastic IPs or "
              "your Direct Connect/VPN routes to the VPC")
    elif hub.cloud == "azure" and path is None and net.cidr is not None:
        issue(pp, "a new VNet (network.cidr) has no route to on-prem, so the tunnel host cannot reach the "
              "proxies: add onprem_path with hub_vnet_id (the VNet holding your ExpressRoute/VPN gateway) or "
              "virtual_hub_id (your Virtual WAN hub), or use network.existing_vnet (a VNet that already routes)")
    elif hub.cloud == "azure" and path is not None:
        forms = [k for k in ("hub_vnet_id", "virtual_hub_id") if getattr(path, k) is not None]
        if len(forms) != 1:
            issue(pp, "give exactly one of hub_vnet_id (peering to the VNet with your ExpressRoute/VPN gateway) "
                  f"or virtual_hub_id (a Virtual WAN hub connection); given: {', '.join(forms) or 'none'}")
        if path.virtual_hub_id is not None:
            if not is_azure_virtual_hub_id(path.virtual_hub_id):
                issue(pp + ("virtual_hub_id",), "must be a Virtual WAN hub id ending in "
                      ".../Microsoft.Network/virtualHubs/<hub>", path.virtual_hub_id)
            for key in sorted({"use_remote_gateways", "remote_peering_enabled"} & path.model_fields_set):
                issue(pp + (key,), f"{key} applies to the hub_vnet_id peering only; a Virtual WAN hub "
                      "connection routes through the hub's gateways: remove it")
        if path.hub_vnet_id is not None:
            if path.internet_security_enabled:
                issue(pp + ("internet_security_enabled",), "internet_security_enabled applies to a Virtual WAN "
                      "hub connection (virtual_hub_id) only: remove it", True)
            remote = parse_azure_network_id(path.hub_vnet_id)
            if remote is None or remote.subnet_name is not None:
                issue(pp + ("hub_vnet_id",), "must be the hub VNet's resource id, ending in "
                      ".../Microsoft.Network/virtualNetworks/<vnet>", path.hub_vnet_id)
            else:
                own = hub.azure.subscription_id if hub.azure is not None else None
                if path.remote_peering_enabled and own is not None and own != remote.subscription_id:
                    issue(pp + ("remote_peering_enabled",), f"the hub VNet is in subscription "
                          f"{remote.subscription_id} but the hub deploys to {own}; the stack cannot create the "
                          "hub VNet's peering there: set remote_peering_enabled: false and create that half "
                          "(allow_gateway_transit: true) with rights in that subscription", True)
                if net.existing_vnet is not None and path.hub_vnet_id.lower() == net.existing_vnet.vnet_id.lower():
                    issue(pp + ("hub_vnet_id",), "this is the hub's own VNet (existing_vnet.vnet_id): a VNet cannot "
                          "peer with itself; remove onprem_path (the VNet already routes)", path.hub_vnet_id)

    # monitoring
    mon = hub.monitoring
    mp = ("monitoring",)
    if not mon.alerts:
        for key in ("email", "webhook"):
            if getattr(mon, key):
                issue(mp + (key,), f"alerts: false creates no alert, so nothing is sent to {key}: remove {key} "
                      "or set alerts: true", getattr(mon, key))
    for key in ("email", "webhook"):
        seen_at: dict[str, int] = {}
        for k, value in enumerate(getattr(mon, key)):
            if value.lower() in seen_at:
                issue(mp + (key, k), f"listed twice ({key}[{seen_at[value.lower()]}]); keep one", value)
            seen_at.setdefault(value.lower(), k)
    for k, c in enumerate(mon.scrape_cidrs):
        if c.prefixlen == 0:
            issue(mp + ("scrape_cidrs", k), "0.0.0.0/0 would open the proxies' health port (route health, "
                  "metrics) to every address: list the Prometheus servers' networks", str(c))

    # on-prem
    op = hub.onprem
    if hub.cloud == "azure" and op.private_circuit is False:
        issue(("onprem", "private_circuit"), "Azure proxies have no public address: the tunnel host must reach them "
              "over ExpressRoute/VPN (private_circuit: true, the default)", False)
    for k, c in enumerate(op.source_cidrs):
        for hc in hub.hub_cidrs():
            if c.overlaps(hc) and hub.private_circuit:
                issue(("onprem", "source_cidrs", k), f"overlaps the hub network {hc}; the on-prem network and the hub "
                      "must use distinct ranges to route between them", str(c))
    if op.tunnel_hosts and op.tunnel_public_keys:
        issue(("onprem", "tunnel_public_keys"), "give the keys under onprem.tunnel_hosts[k].public_keys (one list per "
              "host) or here (the single-host form), not both: move these keys to the host they belong to")
    names: dict[str, int] = {}
    offsets: dict[int, int] = {}
    key_owner: dict[str, tuple] = {}
    for k, h in enumerate(op.tunnel_hosts):
        hp = ("onprem", "tunnel_hosts", k)
        if h.name in names:
            issue(hp + ("name",), f"tunnel host names must be unique in a hub; tunnel_hosts[{names[h.name]}] is "
                  "already called that", h.name)
        names.setdefault(h.name, k)
        if re.fullmatch(r"peer[0-9]+", h.name):
            issue(hp + ("name",), "peer<N> is the name of the other proxies' backup servers in every tunnel "
                  "route's backend on the proxies; give the host another name", h.name)
        offset = HOST_PORT_STRIDE * k if h.port_offset is None else h.port_offset
        if offset in offsets:
            issue(hp + ("port_offset",), f"tunnel_hosts[{offsets[offset]}] already uses port offset {offset}: two "
                  "hosts cannot hold the same loopback ports; give this host another port_offset", offset)
        offsets.setdefault(offset, k)
        for j, c in enumerate(h.source_cidrs):
            if not any(c.subnet_of(o) for o in op.source_cidrs):
                issue(hp + ("source_cidrs", j), "lies outside onprem.source_cidrs, the ranges the network rules admit "
                      "on port 22: add it there too, or narrow this one", str(c))
        if not h.public_keys:
            issue(hp + ("public_keys",), f"warning: tunnel host {h.name!r} has no key yet, so the proxies refuse its "
                  "tunnels; install its package (onprem build-deb --tunnel-host " + h.name + "), then add the key "
                  "it prints here and deploy again")
    keyed = [(("onprem", "tunnel_public_keys", j), DEFAULT_TUNNEL_HOST, key) for j, key in enumerate(op.tunnel_public_keys)]
    keyed += [(("onprem", "tunnel_hosts", k, "public_keys", j), h.name, key)
              for k, h in enumerate(op.tunnel_hosts) for j, key in enumerate(h.public_keys)]
    for path, owner, key in keyed:
        blob = " ".join(key.split()[:2])
        if blob in key_owner:
            first_path, first_owner = key_owner[blob]
            where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in first_path).lstrip(".")
            if first_owner == owner:
                issue(path, f"this key is already listed at {where}; remove the duplicate", key.split()[-1])
            else:
                issue(path, f"this key is already tunnel host {first_owner!r}'s ({where}): each host needs its own "
                      "key, so one host can be revoked without cutting the others; use the key that host's "
                      "package printed", key.split()[-1])
        key_owner.setdefault(blob, (path, owner))
    if not op.tunnel_hosts and not op.tunnel_public_keys:
        issue(("onprem", "tunnel_public_keys"), "warning: no tunnel keys yet, so proxies will refuse every tunnel; "
              "install the on-prem package, then add the key it prints here and deploy again")
    issues_port_plan = _check_port_plan(hub)
    for path, message, value in issues_port_plan:
        issue(path, message, value)

    # databricks
    db = hub.databricks
    if db is not None:
        dp = ("databricks",)
        suffix = WORKSPACE_HOST_SUFFIX[hub.cloud]
        if not db.workspace_host.endswith(suffix):
            other = "aws" if hub.cloud == "azure" else "azure"
            if db.workspace_host.endswith(WORKSPACE_HOST_SUFFIX[other]):
                issue(dp + ("workspace_host",), f"this is an {other} workspace URL but the hub is on {hub.cloud}; "
                      f"the NCC and private endpoint must be in the hub's cloud (host ending in {suffix})",
                      db.workspace_host)
        if not 0 <= db.approval_wait_s <= MAX_APPROVAL_WAIT_S:
            issue(dp + ("approval_wait_s",), f"must be 0-{MAX_APPROVAL_WAIT_S} seconds (default "
                  f"{DEFAULT_APPROVAL_WAIT_S}: a first deploy waits this long for Databricks to create the endpoint "
                  "before approving it)", db.approval_wait_s)
        if db.classic is not None:
            cl = db.classic
            if hub.cloud == "azure":
                workspace = parse_azure_network_id(cl.network_id)
                if workspace is None or workspace.subnet_name is not None:
                    issue(dp + ("classic", "network_id"), "Azure: must be the workspace VNet's resource id, ending in "
                          ".../Microsoft.Network/virtualNetworks/<vnet>", cl.network_id)
                else:
                    own = hub.azure.subscription_id if hub.azure is not None else None
                    if cl.remote_peering_enabled and own is not None and own != workspace.subscription_id:
                        issue(dp + ("classic", "remote_peering_enabled"), f"the workspace VNet is in subscription "
                              f"{workspace.subscription_id} but the hub deploys to {own}; the stack cannot create the "
                              "workspace-side peering there: set remote_peering_enabled: false and create that half "
                              "with rights in the workspace's subscription", True)
                if cl.aws_account_id or cl.aws_route_table_ids:
                    issue(dp + ("classic",), "aws_account_id / aws_route_table_ids apply to AWS hubs only")
            else:
                if not re.match(r"^vpc-[0-9a-f]{8,17}$", cl.network_id):
                    issue(dp + ("classic", "network_id"), "AWS: must be the workspace VPC id, like vpc-0123456789abcdef0",
                          cl.network_id)
                for k, rt in enumerate(cl.aws_route_table_ids):
                    if not re.match(r"^rtb-[0-9a-f]{8,17}$", rt):
                        issue(dp + ("classic", "aws_route_table_ids", k), "must be a route table id like rtb-0123456789abcdef0", rt)
                # The peering is requested from the hub VPC; only the workspace VPC's owner can accept
                # it (auto_accept needs the same account and region) and route to it.
                if cl.remote_peering_enabled and cl.aws_account_id is not None:
                    issue(dp + ("classic", "remote_peering_enabled"), f"the workspace VPC is in account "
                          f"{cl.aws_account_id}, not the hub's: the stack cannot accept the peering or add routes "
                          "there; set remote_peering_enabled: false, then accept the peering (stack output "
                          "classic_peering_id) and add the routes in that account", True)
                elif cl.remote_peering_enabled and not cl.aws_route_table_ids:
                    issue(dp + ("classic", "aws_route_table_ids"), "classic compute needs a route to the hub: list "
                          "the route tables of the workspace VPC's cluster subnets (rtb-...), or set "
                          "remote_peering_enabled: false and add the routes to the hub's NLB subnets yourself")
                elif not cl.remote_peering_enabled and cl.aws_route_table_ids:
                    issue(dp + ("classic", "aws_route_table_ids"), "these routes are the workspace side of the "
                          "peering, which remote_peering_enabled: false leaves to you: remove them, or enable it "
                          "(same account only)")
                if net.existing_vpc is not None and not net.existing_vpc.nlb_route_table_ids:
                    issue(("network", "existing_vpc", "nlb_route_table_ids"), "warning: the stack adds no route "
                          "from the NLB subnets to databricks.classic.cidrs, so classic compute gets no reply until "
                          "you add them (to the peering, stack output classic_peering_id), and no private DNS "
                          "zone: list the NLB subnets' route tables here to have both")
            for k, c in enumerate(cl.cidrs):
                for hc in hub.hub_cidrs():
                    if c.overlaps(hc):
                        issue(dp + ("classic", "cidrs", k), f"overlaps the hub network {hc}; peered networks must not "
                              "overlap", str(c))
            if not cl.remote_peering_enabled or (hub.cloud == "aws" and cl.aws_account_id is not None):
                # (AWS, existing VPC without nlb_route_table_ids: its own warning above.)
                issue(dp + ("classic",), "warning: the route domains get no private DNS zone on the classic "
                      "network (the stack cannot attach one to a network it does not peer from both sides, or to "
                      "another account's VPC): classic compute must use the load balancer address, or you add "
                      "the zones there yourself")
        if db.network_policy is not None:
            policy = db.network_policy.name or f"{hub.name}-egress"
            if not _POLICY_NAME_RE.match(policy):
                issue(dp + ("network_policy", "name"), "Databricks network policy ids are 1-32 letters, digits, "
                      "'_', '.' or '-' (default: <hub>-egress)", policy)
        passwords = {c.password_var for c in db.connections}
        catalogs: dict[str, int] = {}
        conn_names: dict[str, int] = {}
        for k, c in enumerate(db.connections):
            cp = dp + ("connections", k)
            if c.user_var is not None and c.user_var in passwords:
                issue(cp + ("user_var",), "this variable also holds a password (password_var of a connection); give "
                      "the user its own variable or a literal user", c.user_var)
            if c.foreign_catalog is not None:
                fc = c.foreign_catalog
                if fc.name in catalogs:
                    issue(cp + ("foreign_catalog", "name"), f"foreign catalog names must be unique; "
                          f"connections[{catalogs[fc.name]}] already uses it", fc.name)
                catalogs.setdefault(fc.name, k)
                route_type = next((r.type for r in hub.routes if r.name == c.route), None)
                if route_type == "mysql" and fc.database is not None:
                    issue(cp + ("foreign_catalog", "database"), "warning: a MySQL foreign catalog mirrors every "
                          "database as a schema, so database is not used; remove it", fc.database)
                elif route_type in ("postgresql", "sqlserver", "oracle") and fc.database is None:
                    issue(cp + ("foreign_catalog", "database"), f"a {route_type} foreign catalog needs the remote "
                          + ("service name" if route_type == "oracle" else "database") + " to mirror")
        for k, c in enumerate(db.connections):
            cp = dp + ("connections", k)
            try:
                route = hub.route(c.route)
            except KeyError:
                issue(cp + ("route",), "no route with this name in the hub; routes: " + ", ".join(r.name for r in hub.routes),
                      c.route)
                continue
            if route.type is None:
                issue(cp + ("route",), f"route {route.name!r} has no database type; set routes[].type to one of "
                      + ", ".join(DATABASE_TYPES) + " to create a Unity Catalog connection", c.route)
            if (c.user is None) == (c.user_var is None):
                issue(cp, "give exactly one of user (a literal user name) or user_var (a Terraform variable name)")
            name = c.name or route.connection_name
            if name in conn_names:
                issue(cp + ("name",), f"connection names must be unique; connections[{conn_names[name]}] already uses it", name)
            conn_names.setdefault(name, k)
        if db.serverless_enabled:
            suffix = hub.domain_suffix or f"{hub.name}.{DEFAULT_DOMAIN_ROOT}"
            domains = list(dict.fromkeys(_route_domain(r, suffix) for r in hub.routes))
            if len(domains) > MAX_ENDPOINT_RULE_DOMAINS:
                issue(("routes",), f"the hub's routes have {len(domains)} distinct domains, but its Databricks "
                      f"private endpoint rule carries at most {MAX_ENDPOINT_RULE_DOMAINS} domain names (Databricks "
                      "limit per rule): give routes to the same host one shared routes[].domain (routes on "
                      "different ports can share a name), or move routes to another hub",
                      len(domains))
        if db.network_policy is not None and not db.serverless_enabled:
            issue(dp + ("network_policy",), "warning: a network policy restricts serverless egress, but "
                  "serverless_enabled is false, so serverless compute cannot reach this hub")
    return out


def ncc_binding_warnings(hubs: list[Hub]) -> list[str]:
    """One line per hub that binds its NCC to a workspace: the binding replaces whatever NCC the
    workspace has, which cannot be checked offline (``validate`` and ``synth`` print these).

    A workspace has exactly one NCC and ``databricks_mws_ncc_binding`` overwrites it
    (terraform-provider-databricks PR #5401); the other NCC's private endpoints then stop reaching
    that workspace's serverless compute. Kept out of the spec warnings because it holds for every
    serverless hub, whatever the spec says."""
    lines = []
    for hub in hubs:
        db = hub.databricks
        if db is None or not db.serverless_enabled:
            continue
        lines.append(
            f"warning: hub {hub.name!r}: binding NCC {hub.ncc_name!r} to workspace {db.workspace_id} replaces any NCC "
            "the workspace already has (its serverless private endpoints stop working); this cannot be checked "
            f"offline: run `databricks account workspaces get {db.workspace_id}` and check that "
            f"network_connectivity_config_id is empty or already {hub.ncc_name!r} (docs/teardown.md)"
        )
    return lines


def _check_port_plan(hub: Hub) -> list[tuple[tuple, str, Any]]:
    """Every tunnel host's loopback ports and the peer ports of the resolved port plan: each
    valid, and used once on a proxy. The host with port offset 0 holds the routes' own
    ``tunnel_port`` (which the route rules check); every other host's ports are checked here, and
    a collision names a ``port_offset`` that would be free."""
    out: list[tuple[tuple, str, Any]] = []
    try:
        rh = _resolve_hub(hub)
    except Exception:  # noqa: BLE001 - other rules report what makes the hub unresolvable
        return out
    used = {SSH_PORT: "SSH", hub.proxies.health_port: "the health endpoint"}
    used.update({r.port: f"route {r.name}'s frontend" for r in rh.routes})
    hosts = rh.tunnel_hosts
    tunnel = [(k, r) for k, r in enumerate(rh.routes) if r.kind == "tunnel" and r.tunnel_port is not None]
    base = next((h for h in hosts if h.port_offset == 0), None)
    for _k, r in tunnel:
        used.setdefault(r.tunnel_port, f"tunnel host {base.name}'s tunnel for route {r.name}" if base is not None
                        else f"route {r.name}'s tunnel_port")
    claims: list[tuple[tuple, str, int, str]] = []
    offsets = {0} if base is not None else set()
    for j, h in enumerate(hosts):
        if h.port_offset in offsets:
            continue  # the base host, or a duplicate port_offset (reported as such)
        offsets.add(h.port_offset)
        where = ("onprem", "tunnel_hosts", j, "port_offset")
        for k, r in tunnel:
            claims.append((where, f"tunnel host {h.name}'s tunnel for route {r.name}", rh.host_tunnel_port(r, h),
                           f"give tunnel_hosts[{j}] another port_offset{{free}}, or routes[{k}] another tunnel_port"))
    for k, r in tunnel:
        if r.peer_port is not None:
            claims.append((("routes", k, "peer_port"), f"route {r.name}'s peer path", r.peer_port,
                           f"set routes[{k}].peer_port to a free port"))
    fixed = set(used)  # SSH, health, frontends, the base host's ports
    reported: set[tuple] = set()
    for path, what, port, fix in claims:
        problem = None
        if not 1024 < port <= 65535:
            problem = f"gives {what} port {port}, outside 1025-65535"
        elif port in used:
            problem = f"{what} would be port {port}, which {used[port]} already uses on every proxy"
        else:
            used[port] = what
        if problem is None:
            continue
        if path in reported and path[-1] == "port_offset":
            continue  # one message per host: its first colliding port
        reported.add(path)
        free = ""
        if "{free}" in fix:
            others = {c[2] for c in claims if c[0] != path}  # the host's own ports are free once it moves
            offset = _free_offset([r.tunnel_port for _, r in tunnel], fixed | others, offsets)
            free = f" (port_offset: {offset} is free)" if offset is not None else ""
        value = hosts[path[2]].port_offset if path[-1] == "port_offset" else port
        out.append((path, f"{problem}: {fix.replace('{free}', free)}", value))
    return out


def _free_offset(tunnel_ports: list[int], taken: set[int], offsets: set[int]) -> int | None:
    """The smallest multiple of HOST_PORT_STRIDE that no host uses and that puts every route's
    tunnel port on a valid, free port (None when there is none)."""
    for offset in range(HOST_PORT_STRIDE, 65536, HOST_PORT_STRIDE):
        if offset in offsets:
            continue
        ports = [p + offset for p in tunnel_ports]
        if all(1024 < p <= 65535 and p not in taken for p in ports):
            return offset
    return None


# --------------------------------------------------------------------------------------------
# Derived defaults
# --------------------------------------------------------------------------------------------


def _resolve(spec: SpecFile) -> SpecFile:
    return spec.model_copy(update={"hubs": [_resolve_hub(h) for h in spec.hubs]})


def _resolve_hub(hub: Hub) -> Hub:
    suffix = hub.domain_suffix or f"{hub.name}.{DEFAULT_DOMAIN_ROOT}"
    taken = {r.tunnel_port for r in hub.routes if r.tunnel_port is not None}
    taken |= {r.peer_port for r in hub.routes if r.peer_port is not None}
    taken |= {r.port for r in hub.routes} | {SSH_PORT, hub.proxies.health_port}
    routes = []
    for r in hub.routes:
        update: dict[str, Any] = {}
        if r.kind == "tunnel" and r.tunnel_port is None:
            update["tunnel_port"] = _free_port(r.port + TUNNEL_PORT_OFFSET, TUNNEL_PORT_FALLBACK_START, taken)
        routes.append(update)
    offsets = [HOST_PORT_STRIDE * k if h.port_offset is None else h.port_offset
               for k, h in enumerate(hub.onprem.tunnel_hosts)] or [0]
    for r, update in zip(hub.routes, routes):  # the other hosts' ports: no derived peer port takes one
        tunnel_port = update.get("tunnel_port", r.tunnel_port)
        if r.kind == "tunnel" and tunnel_port is not None:
            taken |= {tunnel_port + offset for offset in offsets}
    for r, update in zip(hub.routes, routes):
        if r.kind == "tunnel" and r.peer_port is None:
            update["peer_port"] = _free_port(r.port + PEER_PORT_OFFSET, PEER_PORT_FALLBACK_START, taken)
    resolved = []
    for r, update in zip(hub.routes, routes):
        if r.domain is None:
            update["domain"] = _route_domain(r, suffix)
        resolved.append(r.model_copy(update=update) if update else r)
    return hub.model_copy(update={"routes": resolved, "domain_suffix": suffix})


def _free_port(preferred: int, fallback: int, taken: set[int]) -> int:
    """``preferred`` when valid and free, else the first free port from ``fallback``; marks it taken."""
    port = preferred
    if not (1024 < port <= 65535) or port in taken:
        port = fallback
        while port in taken:
            port += 1
    taken.add(port)
    return port


def _route_domain(route: Route, suffix: str) -> str:
    """The route's domain: its own, else a forward route's target host name, else
    ``<route>.<suffix>``."""
    if route.domain is not None:
        return route.domain
    host = route.target_host
    if route.kind == "forward" and is_valid_domain(host.lower()):
        return host.lower()
    return f"{route.name}.{suffix}"
