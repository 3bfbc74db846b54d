"""The AWS hub network: a new VPC cut by the hub's address plan, or the spec's existing VPC.

New VPC (``network.cidr``), one zone per entry of the plan:

- **proxy subnets** (the plan's ``public_subnets``): the proxies, and in each the /28 that holds
  the slots' fixed private addresses, reserved for explicit assignment so AWS never hands those
  addresses to another interface;
- **NLB subnets** (the plan's ``private_subnets``): the internal NLB.

Egress decides the routing:

- ``slot_eip`` (default): the proxy subnets route ``0.0.0.0/0`` to an internet gateway; a proxy
  reaches the internet from its slot's Elastic IP (its cloud-init waits for it). The NLB subnets
  have a route table without a default route.
- ``nat_gateway``: one NAT gateway per zone, in the NLB subnets, which route to the internet
  gateway; each proxy subnet routes ``0.0.0.0/0`` to its zone's NAT gateway. The proxies then
  have no inbound path from the internet, so the tunnel host must dial their private addresses
  (``onprem.private_circuit: true``). The NLB stays internal (an internal NLB has private
  addresses only, whatever its subnet's routes).

Existing VPC (``network.existing_vpc``): the stack creates no VPC, subnet, gateway or route
table; it only reserves the slot /28 in each proxy subnet. The subnets must already route as
``egress`` says (proxy subnets to an internet gateway for ``slot_eip``, to a NAT for
``nat_gateway``).

Databricks classic (``databricks.classic``): a VPC peering connection from the hub VPC to the
workspace VPC (``peer_owner_id`` = ``aws_account_id`` when that is set). Only the NLB talks to
classic clients (the proxies see the NLB's addresses: client IP preservation is off), so:

- hub side, always: each route table of the NLB subnets routes every classic CIDR to the peering
  (inline in the tables this stack creates, since a table's inline routes and ``aws_route``
  resources must not be mixed; ``aws_route`` in an existing VPC's ``nlb_route_table_ids``). A
  route to a peering still pending acceptance is a blackhole until it is accepted (AWS VPC
  Peering Guide, "Update your route tables"): nothing fails, traffic starts at acceptance;
- workspace side, with ``remote_peering_enabled`` (same account only, the spec enforces it):
  ``auto_accept`` and, in each ``aws_route_table_ids``, a route per NLB subnet to the peering.
  Without it the peering waits in ``pending-acceptance`` (output ``classic_peering_id``) for the
  workspace VPC's owner, who also adds those routes.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdktf import Fn, ITerraformDependable
from cdktf_cdktf_provider_aws.data_aws_availability_zones import (
    DataAwsAvailabilityZones,
    DataAwsAvailabilityZonesFilter,
)
from cdktf_cdktf_provider_aws.default_security_group import DefaultSecurityGroup
from cdktf_cdktf_provider_aws.ec2_subnet_cidr_reservation import Ec2SubnetCidrReservation
from cdktf_cdktf_provider_aws.eip import Eip
from cdktf_cdktf_provider_aws.internet_gateway import InternetGateway
from cdktf_cdktf_provider_aws.nat_gateway import NatGateway
from cdktf_cdktf_provider_aws.route import Route
from cdktf_cdktf_provider_aws.route_table import RouteTable, RouteTableRoute
from cdktf_cdktf_provider_aws.route_table_association import RouteTableAssociation
from cdktf_cdktf_provider_aws.subnet import Subnet
from cdktf_cdktf_provider_aws.vpc import Vpc
from cdktf_cdktf_provider_aws.vpc_peering_connection import VpcPeeringConnection
from constructs import Construct

from tunnelhub import spec as S


@dataclass(frozen=True, kw_only=True)
class AwsNetworkProps:
    """What :class:`AwsNetwork` builds from."""

    hub: S.Hub
    """The resolved hub spec (an AWS hub)."""


class AwsNetwork(Construct):
    """The hub's VPC, subnets, gateways and routes, or the existing VPC's ids.

    Read-only attributes:

    - ``vpc_id``, ``vpc_cidr``: the hub VPC and its CIDR (text).
    - ``proxy_subnet_ids``: one per zone, in plan order (slot ``i`` lives in zone ``i % zones``).
    - ``nlb_subnet_ids``: one per zone, for the internal NLB.
    - ``nlb_route_table_ids``: the route tables of the NLB subnets (the peering to Databricks
      classic adds its routes there); for an existing VPC, ``existing_vpc.nlb_route_table_ids``.
    - ``classic_peering_id``: the VPC peering connection to the Databricks classic VPC, or None.
    - ``nat_public_ips``: the NAT gateways' Elastic IPs (egress ``nat_gateway`` in a new VPC;
      else empty).
    - ``slot_reservations``: the /28 reservations, one per proxy subnet.
    - ``ready``: what must exist before a proxy boots (routes, gateways, reservations), for
      ``depends_on``.
    """

    def __init__(self, scope: Construct, id: str, props: AwsNetworkProps):
        super().__init__(scope, id)
        hub = props.hub
        plan = hub.aws_addresses()
        self.nat_public_ips: list[str] = []
        self.nlb_route_table_ids: list[str] = []
        self.ready: list[ITerraformDependable] = []
        self.classic_peering_id: str | None = None
        self._classic = hub.databricks.classic if hub.databricks is not None else None
        existing = hub.network.existing_vpc
        if existing is not None:
            self.vpc_id: str = existing.vpc_id
            self.vpc_cidr: str = str(existing.vpc_cidr)
            self.proxy_subnet_ids: list[str] = [s.id for s in existing.proxy_subnets]
            self.nlb_subnet_ids: list[str] = [s.id for s in existing.nlb_subnets]
            self.nlb_route_table_ids = list(existing.nlb_route_table_ids)
            self._peer(hub, [s.cidr for s in existing.nlb_subnets])
            routes = Construct(self, "classic-routes")
            for t, table in enumerate(self.nlb_route_table_ids):
                for k, cidr in enumerate(self._classic.cidrs if self._classic is not None else []):
                    Route(routes, f"nlb-table{t}-classic{k}", route_table_id=table,
                          destination_cidr_block=str(cidr), vpc_peering_connection_id=self.classic_peering_id)
        else:
            self._build_vpc(hub, plan)
        reservations = Construct(self, "slot-reservations")
        self.slot_reservations = [
            Ec2SubnetCidrReservation(
                reservations,
                f"zone{zone}",
                subnet_id=self.proxy_subnet_ids[zone],
                cidr_block=str(block),
                reservation_type="explicit",
                description=f"tunnelhub {hub.name}: fixed private addresses of the proxy slots",
            )
            for zone, block in enumerate(plan.slot_reserved_blocks)
        ]
        self.ready.extend(self.slot_reservations)

    def _build_vpc(self, hub: S.Hub, plan) -> None:
        name = f"tunnelhub-{hub.name}"
        zones = self._zone_names(hub, len(plan.public_subnets))
        vpc = Vpc(
            self,
            "vpc",
            cidr_block=str(hub.network.cidr),
            enable_dns_support=True,
            enable_dns_hostnames=True,
            tags={"Name": name},
        )
        self.vpc_id = vpc.id
        self.vpc_cidr = str(hub.network.cidr)
        self._peer(hub, list(plan.private_subnets))
        to_classic = [
            RouteTableRoute(cidr_block=str(cidr), vpc_peering_connection_id=self.classic_peering_id)
            for cidr in (self._classic.cidrs if self._classic is not None else [])
        ]
        # Nothing may use the default security group: it allows all traffic between its members.
        DefaultSecurityGroup(self, "default-sg", vpc_id=vpc.id, tags={"Name": f"{name}-default-unused"})
        igw = InternetGateway(self, "igw", vpc_id=vpc.id, tags={"Name": name})

        proxies = Construct(self, "proxy-subnets")
        proxy_subnets = [
            Subnet(
                proxies,
                f"zone{z}",
                vpc_id=vpc.id,
                cidr_block=str(cidr),
                availability_zone=zones[z],
                map_public_ip_on_launch=False,  # the slot Lambda gives each proxy its Elastic IP
                tags={"Name": f"{name}-proxies-{z}"},
            )
            for z, cidr in enumerate(plan.public_subnets)
        ]
        nlbs = Construct(self, "nlb-subnets")
        nlb_subnets = [
            Subnet(
                nlbs,
                f"zone{z}",
                vpc_id=vpc.id,
                cidr_block=str(cidr),
                availability_zone=zones[z],
                map_public_ip_on_launch=False,
                tags={"Name": f"{name}-nlb-{z}"},
            )
            for z, cidr in enumerate(plan.private_subnets)
        ]
        self.proxy_subnet_ids = [s.id for s in proxy_subnets]
        self.nlb_subnet_ids = [s.id for s in nlb_subnets]

        # With nat_gateway the NLB subnets use this table: it then carries the routes to classic.
        internet = RouteTable(
            self,
            "internet-routes",
            vpc_id=vpc.id,
            route=[
                RouteTableRoute(cidr_block="0.0.0.0/0", gateway_id=igw.id),
                *(to_classic if hub.egress == "nat_gateway" else []),
            ],
            tags={"Name": f"{name}-internet"},
        )
        self.ready.append(igw)
        if hub.egress == "nat_gateway":
            # NAT gateways live in the NLB subnets, which route to the internet gateway; each
            # proxy subnet routes to its own zone's NAT gateway.
            nat_ns = Construct(self, "nat")
            for z, subnet in enumerate(nlb_subnets):
                RouteTableAssociation(nat_ns, f"nlb-zone{z}", subnet_id=subnet.id, route_table_id=internet.id)
                eip = Eip(nat_ns, f"eip{z}", domain="vpc", tags={"Name": f"{name}-nat-{z}"}, depends_on=[igw])
                nat = NatGateway(
                    nat_ns,
                    f"gateway{z}",
                    allocation_id=eip.allocation_id,
                    subnet_id=subnet.id,
                    tags={"Name": f"{name}-nat-{z}"},
                    depends_on=[igw],
                )
                table = RouteTable(
                    nat_ns,
                    f"proxy-routes{z}",
                    vpc_id=vpc.id,
                    route=[RouteTableRoute(cidr_block="0.0.0.0/0", nat_gateway_id=nat.id)],
                    tags={"Name": f"{name}-proxies-{z}"},
                )
                assoc = RouteTableAssociation(
                    nat_ns, f"proxy-zone{z}", subnet_id=proxy_subnets[z].id, route_table_id=table.id
                )
                self.nat_public_ips.append(eip.public_ip)
                self.ready.extend([nat, assoc])
            self.nlb_route_table_ids = [internet.id]
        else:
            assoc_ns = Construct(self, "routes")
            for z, subnet in enumerate(proxy_subnets):
                self.ready.append(
                    RouteTableAssociation(assoc_ns, f"proxy-zone{z}", subnet_id=subnet.id, route_table_id=internet.id)
                )
            # route: a list even when empty: the provider reads an omitted `route` as "ignore the
            # table's routes" and only [] as "manage none" (aws 6.25.0 docs, r/route_table), so
            # removing databricks.classic later must not leave a route to the deleted peering.
            local_only = RouteTable(
                self, "nlb-routes", vpc_id=vpc.id, route=to_classic, tags={"Name": f"{name}-nlb"}
            )
            for z, subnet in enumerate(nlb_subnets):
                RouteTableAssociation(assoc_ns, f"nlb-zone{z}", subnet_id=subnet.id, route_table_id=local_only.id)
            self.nlb_route_table_ids = [local_only.id]

    def _peer(self, hub: S.Hub, nlb_cidrs: list) -> None:
        """The peering to the Databricks classic VPC and, when the spec lets the stack manage the
        workspace side, its acceptance and the workspace VPC's routes to the NLB subnets."""
        classic = self._classic
        if classic is None:
            return
        ns = Construct(self, "classic-peering")
        # auto_accept works only within one account and region (provider docs, aws_vpc_peering_connection);
        # the workspace VPC is in the hub's region (the NCC and the workspace share it), and the spec
        # refuses remote_peering_enabled with another account.
        accept = classic.remote_peering_enabled and classic.aws_account_id is None
        peering = VpcPeeringConnection(
            ns,
            "peering",
            vpc_id=self.vpc_id,
            peer_vpc_id=classic.network_id,
            peer_owner_id=classic.aws_account_id,
            auto_accept=True if accept else None,
            tags={"Name": f"tunnelhub-{hub.name}-databricks-classic"},
        )
        self.classic_peering_id = peering.id
        if not accept:
            return
        for t, table in enumerate(classic.aws_route_table_ids):
            for k, cidr in enumerate(nlb_cidrs):
                Route(ns, f"classic-table{t}-nlb{k}", route_table_id=table, destination_cidr_block=str(cidr),
                      vpc_peering_connection_id=peering.id)

    def _zone_names(self, hub: S.Hub, count: int) -> list[str]:
        """The spec's zone names, else the first ``count`` zones the region offers by default."""
        if hub.zones is not None:
            return list(hub.zones)
        available = DataAwsAvailabilityZones(
            self,
            "zones",
            state="available",
            filter=[DataAwsAvailabilityZonesFilter(name="opt-in-status", values=["opt-in-not-required"])],
        )
        return [Fn.element(available.names, z) for z in range(count)]
