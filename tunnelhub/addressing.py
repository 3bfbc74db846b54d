"""Address plans: which subnet and which static address each part of a hub gets.

Everything here is plain arithmetic on the spec's CIDRs, so the spec validation, the stacks, the
proxy cloud-init and the on-prem package all compute the same addresses.

Azure (new VNet from ``network.cidr``): the VNet is cut in four equal subnets; the first holds
the proxies and the load balancer frontend, the second is the Private Link Service NAT subnet,
the other two are left free. Azure reserves the first four addresses and the last one of every
subnet, so the frontend takes the fifth address and proxy slot ``i`` the ``6 + i``-th.

AWS (new VPC from ``network.cidr``): the VPC is cut in ``2 × zones`` subnets (rounded up to a
power of two): one public subnet per zone for the proxies, then one private subnet per zone for
the NLB. Slot ``i`` lives in zone ``i % zones``. Its fixed private address (used when the tunnel
host reaches AWS over a private circuit) comes from the second /28 of its zone's public subnet,
a block the stack reserves for explicit assignment so AWS never hands it to another interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

AZURE_RESERVED_HEAD = 4  # network address, gateway, two DNS addresses
AZURE_RESERVED_TAIL = 1  # broadcast
SLOT_BLOCK_PREFIX = 28  # AWS: the reserved block that holds the slots' fixed private addresses
AWS_SLOT_BLOCK_INDEX = 1  # the second /28 of each public subnet


class AddressPlanError(ValueError):
    """The CIDRs given cannot hold what the spec asks for."""


@dataclass(frozen=True)
class AzureAddressPlan:
    """Subnets and static addresses of an Azure hub."""

    proxy_subnet: IPv4Network
    """The subnet holding the proxy NICs and the load balancer frontend."""
    pls_nat_subnet: IPv4Network | None
    """The Private Link Service NAT subnet (None when an existing subnet id is given)."""
    lb_frontend_ip: IPv4Address
    """Static private address of the internal load balancer frontend."""
    proxy_ips: tuple[IPv4Address, ...]
    """Static private address of each proxy NIC, by slot."""


@dataclass(frozen=True)
class AwsAddressPlan:
    """Subnets and per-slot addresses of an AWS hub."""

    public_subnets: tuple[IPv4Network, ...]
    """One public subnet per zone, for the proxies (None-free only for a new VPC)."""
    private_subnets: tuple[IPv4Network, ...]
    """One private subnet per zone, for the NLB (empty for an existing VPC)."""
    slot_zones: tuple[int, ...]
    """Zone index of each slot."""
    slot_private_ips: tuple[IPv4Address, ...]
    """Fixed private address of each slot, in its zone's public subnet."""
    slot_reserved_blocks: tuple[IPv4Network, ...]
    """Per zone, the /28 reserved for the slots' explicit addresses."""


def split(cidr: IPv4Network, parts: int) -> list[IPv4Network]:
    """Cut ``cidr`` into ``parts`` equal subnets (rounded up to a power of two)."""
    extra_bits = max(1, math.ceil(math.log2(parts))) if parts > 1 else 0
    if cidr.prefixlen + extra_bits > 28:
        raise AddressPlanError(
            f"{cidr} is too small to cut into {parts} subnets of at least /28; use a larger CIDR"
        )
    return list(cidr.subnets(prefixlen_diff=extra_bits))


def azure_capacity(subnet: IPv4Network) -> int:
    """How many proxies fit in an Azure proxy subnet beside the load balancer frontend."""
    return subnet.num_addresses - AZURE_RESERVED_HEAD - AZURE_RESERVED_TAIL - 1


def azure_plan(
    *, proxy_count: int, vnet_cidr: IPv4Network | None = None, proxy_subnet: IPv4Network | None = None
) -> AzureAddressPlan:
    """The address plan of an Azure hub, from a new VNet's CIDR or an existing proxy subnet."""
    pls_nat: IPv4Network | None = None
    if vnet_cidr is not None:
        quarters = split(vnet_cidr, 4)
        proxy_subnet, pls_nat = quarters[0], quarters[1]
    if proxy_subnet is None:
        raise AddressPlanError("an Azure hub needs network.cidr or network.existing_vnet.proxy_subnet_cidr")
    room = azure_capacity(proxy_subnet)
    if proxy_count > room:
        raise AddressPlanError(
            f"the proxy subnet {proxy_subnet} has room for {room} proxies beside the load balancer "
            f"frontend, and proxies.count is {proxy_count}: use a larger CIDR or fewer proxies"
        )
    first = proxy_subnet.network_address + AZURE_RESERVED_HEAD
    return AzureAddressPlan(
        proxy_subnet=proxy_subnet,
        pls_nat_subnet=pls_nat,
        lb_frontend_ip=first,
        proxy_ips=tuple(first + 1 + slot for slot in range(proxy_count)),
    )


def aws_plan(
    *,
    proxy_count: int,
    zone_count: int,
    vpc_cidr: IPv4Network | None = None,
    public_subnets: tuple[IPv4Network, ...] | None = None,
) -> AwsAddressPlan:
    """The address plan of an AWS hub, from a new VPC's CIDR or existing public subnets."""
    private: tuple[IPv4Network, ...] = ()
    if vpc_cidr is not None:
        parts = split(vpc_cidr, 2 * zone_count)
        public_subnets = tuple(parts[:zone_count])
        private = tuple(parts[zone_count : 2 * zone_count])
    if not public_subnets:
        raise AddressPlanError("an AWS hub needs network.cidr or network.existing_vpc.proxy_subnets")
    zone_count = len(public_subnets)
    per_zone = math.ceil(proxy_count / zone_count)
    blocks: list[IPv4Network] = []
    for subnet in public_subnets:
        if subnet.prefixlen > 26:
            raise AddressPlanError(
                f"the proxy subnet {subnet} is smaller than /26; each proxy subnet needs a /28 "
                f"reserved for the slots' fixed addresses plus room for instances: use a larger CIDR"
            )
        blocks.append(list(subnet.subnets(new_prefix=SLOT_BLOCK_PREFIX))[AWS_SLOT_BLOCK_INDEX])
    if per_zone > blocks[0].num_addresses:
        raise AddressPlanError(
            f"{proxy_count} slots over {zone_count} zones need {per_zone} fixed addresses per zone; "
            f"the reserved /28 holds {blocks[0].num_addresses}: add zones or use fewer proxies"
        )
    zones = tuple(slot % zone_count for slot in range(proxy_count))
    ips = tuple(blocks[zones[slot]].network_address + slot // zone_count for slot in range(proxy_count))
    return AwsAddressPlan(
        public_subnets=tuple(public_subnets),
        private_subnets=private,
        slot_zones=zones,
        slot_private_ips=ips,
        slot_reserved_blocks=tuple(blocks),
    )
