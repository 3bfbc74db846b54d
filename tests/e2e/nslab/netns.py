"""Network namespaces for the lab, joined by point-to-point veth links.

By default every link is its own /24 (``10.199.<link>.0/24``, first node ``.1``, second ``.2``)
and nodes talk only to their direct neighbours, so no forwarding or routes are needed::

    db --- onprem --- proxy1 --- lb --- client
              \\------ proxy2 ---/

A link may instead carry explicit addresses (``LinkSpec``), and a topology may add routes and
IPv4 forwarding on router nodes: :func:`hub_links` builds the lab's realistic layout, where the
tunnel host reaches the proxies' hub-subnet addresses through a gateway (see its docstring).
Addresses never leave the namespaces.

Interface names are ``<prefix>-<node>-<peer>`` with two-letter node codes (``tl-op-p1``), at
most 15 characters: the prefix is at most 8 characters. The veths are created directly inside
their namespaces, so the root namespace never sees them.

A *cut* drops every IPv4/IPv6 packet arriving on both ends of a link (nftables, input hook,
inside each namespace). Senders see nothing: no reset, no ICMP, no local error; ARP still
works, as it does on a WAN whose far side goes silent.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .proc import LabError, run

PREFIX_ENV = "TUNNELHUB_LAB_PREFIX"
DEFAULT_PREFIX = "th"
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def lab_prefix() -> str:
    """The namespace/interface prefix: ``$TUNNELHUB_LAB_PREFIX`` (default ``th``)."""
    prefix = os.environ.get(PREFIX_ENV, DEFAULT_PREFIX)
    if not _PREFIX_RE.match(prefix):
        raise LabError(
            f"{PREFIX_ENV}={prefix!r} is not allowed: use 1-8 lowercase letters/digits starting "
            "with a letter (interface names '<prefix>-xx-yy' must fit in 15 characters)"
        )
    return prefix


def node_code(node: str) -> str:
    """Two-letter code of a node, used in interface names."""
    codes = {"db": "db", "onprem": "op", "lb": "lb", "client": "cl", "gw": "gw"}
    if node in codes:
        return codes[node]
    match = re.fullmatch(r"proxy([1-9])", node)
    if match:
        return f"p{match.group(1)}"
    match = re.fullmatch(r"onprem([2-9])", node)  # a second (third...) tunnel host
    if match:
        return f"o{match.group(1)}"
    raise LabError(f"unknown lab node {node!r}: use db, onprem, onprem2..onprem9, gw, proxy1..proxy9, lb or client")


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, os.CLONE_NEWNET)
        return
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with the *calling thread* inside network namespace ``name``.

    Sockets created in the block belong to that namespace and keep working after it ends.
    Only this thread moves (network namespaces are per thread), so other threads are unaffected.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    except FileNotFoundError as exc:
        os.close(own)
        raise LabError(f"network namespace {name!r} does not exist") from exc
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


@dataclass(frozen=True)
class LinkSpec:
    """A link with explicit addresses (``"192.168.10.5/24"``; a ``/32`` adds no subnet route)."""

    a: str
    b: str
    cidr_a: str
    cidr_b: str


@dataclass(frozen=True)
class RouteSpec:
    """A route in ``node``'s namespace: to ``dst`` via ``via`` (an address) or out of the link
    to ``dev_peer`` (a directly attached host, for ``/32`` point-to-point addressing)."""

    node: str
    dst: str
    via: str | None = None
    dev_peer: str | None = None


@dataclass(frozen=True)
class Link:
    a: str
    b: str
    index: int
    cidrs: tuple[str, str] | None = None

    def ifname(self, prefix: str, node: str) -> str:
        peer = self.b if node == self.a else self.a
        return f"{prefix}-{node_code(node)}-{node_code(peer)}"

    def cidr(self, node: str) -> str:
        if self.cidrs is not None:
            return self.cidrs[0] if node == self.a else self.cidrs[1]
        return f"10.199.{self.index}.{1 if node == self.a else 2}/24"

    def address(self, node: str) -> str:
        return self.cidr(node).split("/")[0]


def default_links(proxies: int = 2, *, client_to_db: bool = False) -> list[tuple[str, str]]:
    links = [("onprem", "db")]
    links += [("onprem", f"proxy{i}") for i in range(1, proxies + 1)]
    links += [("lb", f"proxy{i}") for i in range(1, proxies + 1)]
    links.append(("client", "lb"))
    if client_to_db:
        links.append(("client", "db"))  # benchmarks only: the "direct" path
    return links


@dataclass(frozen=True)
class HubAddressing:
    """Where things are in :func:`hub_links` (defaults: the example hub ``weu``'s plan)."""

    onprem_lan: str = "192.168.10.5/24"  # the tunnel host, in onprem.source_cidrs
    onprem_lan_more: tuple[str, ...] = ("192.168.10.6", "192.168.10.7", "192.168.10.8")
    """With ``tunnel_hosts`` > 1: the second, third... tunnel host on the same on-prem LAN."""
    db_lan_more: tuple[str, ...] = ("192.168.20.6", "192.168.20.7", "192.168.20.8")
    """... and on the database LAN (the address the database sees its sessions from)."""
    onprem_gateway: str = "192.168.10.1/24"
    db_lan_onprem: str = "192.168.20.5/24"  # the tunnel host on the database LAN
    db: str = "192.168.20.15/24"
    hub_gateway: str = "10.60.0.1"  # Azure's subnet gateway is the subnet's first address
    hub_prefix_len: int = 26  # the proxy subnet, 10.60.0.0/26
    remote_gateway: str = "100.64.0.1/24"
    remote: str = "100.64.0.15/24"
    """With ``remote_service``: the database's second address, standing in for a remote service a
    forward route reaches from the proxies through their egress. 100.64.0.0/10 is shared address
    space, not private in Python's ``ipaddress`` (so the spec takes it as a forward target), and
    it never leaves the lab's namespaces."""
    hub_cidr: str = "10.60.0.0/24"


def tunnel_host_nodes(count: int) -> list[str]:
    """The lab nodes of ``count`` tunnel hosts: ``onprem``, ``onprem2``, ..."""
    return ["onprem", *(f"onprem{k}" for k in range(2, count + 1))]


def hub_links(proxy_ips: list[str], *, client_to_db: bool = False, remote_service: bool = False,
              tunnel_hosts: int = 1, addressing: HubAddressing = HubAddressing()
              ) -> tuple[list, list[RouteSpec]]:
    """The lab laid out like a hub: the tunnel host reaches the proxies' hub addresses through
    a gateway, as over ExpressRoute or a VPN::

        db (192.168.20.15) --- onprem (192.168.20.5 | 192.168.10.5, default via .1)
                                  |
                                  gw (192.168.10.1 | 10.60.0.1 on each proxy link)
                                 /  \\
        proxy1 (10.60.0.5/26, default via 10.60.0.1)   proxy2 (10.60.0.6/26) ...
                                 \\  /
                                  lb --- client           (10.199.x links, as by default)

    Each proxy has its own link to the gateway (point to point: the gateway's ``10.60.0.1/32``
    on every one, a ``/32`` route per proxy), so a cut of one proxy's link leaves the others.
    ``remote_service`` also links the gateway to ``db`` at ``100.64.0.15`` (a forward route's
    "remote service", see :class:`HubAddressing`).

    ``tunnel_hosts`` > 1 adds ``onprem2``... (tunnel host B: ``192.168.10.6`` on the on-prem LAN,
    ``192.168.20.6`` on the database LAN). Each extra host has its own link to the gateway and to
    the database, addressed as if on the same two LANs (point to point like the proxies: the
    gateway's ``192.168.10.1`` and the database's ``192.168.20.15`` as ``/32`` on those links, a
    ``/32`` route back to the host), so a cut of host A's gateway link leaves host B's.
    """
    a = addressing
    links: list = [LinkSpec("onprem", "db", a.db_lan_onprem, a.db),
                   LinkSpec("onprem", "gw", a.onprem_lan, a.onprem_gateway)]
    routes = [RouteSpec("onprem", "default", via=a.onprem_gateway.split("/")[0])]
    gateway, db_address = a.onprem_gateway.split("/")[0], a.db.split("/")[0]
    lan_len, db_len = a.onprem_lan.split("/")[1], a.db.split("/")[1]
    for k, node in enumerate(tunnel_host_nodes(tunnel_hosts)[1:]):
        lan, db_lan = a.onprem_lan_more[k], a.db_lan_more[k]
        links.append(LinkSpec(node, "db", f"{db_lan}/{db_len}", f"{db_address}/32"))
        links.append(LinkSpec(node, "gw", f"{lan}/{lan_len}", f"{gateway}/32"))
        routes += [RouteSpec("db", f"{db_lan}/32", dev_peer=node), RouteSpec("gw", f"{lan}/32", dev_peer=node),
                   RouteSpec(node, "default", via=gateway)]
    for i, ip in enumerate(proxy_ips, 1):
        proxy = f"proxy{i}"
        links.append(LinkSpec("gw", proxy, f"{a.hub_gateway}/32", f"{ip}/{a.hub_prefix_len}"))
        routes.append(RouteSpec("gw", f"{ip}/32", dev_peer=proxy))
        routes.append(RouteSpec(proxy, "default", via=a.hub_gateway))
    links += [("lb", f"proxy{i}") for i in range(1, len(proxy_ips) + 1)]
    links.append(("client", "lb"))
    if client_to_db:
        links.append(("client", "db"))  # benchmarks only: the "direct" path
    if remote_service:  # the proxies reach the database as a remote service, through the gateway
        links.append(LinkSpec("gw", "db", a.remote_gateway, a.remote))
        routes.append(RouteSpec("db", a.hub_cidr, via=a.remote_gateway.split("/")[0]))
    return links, routes


@dataclass
class Topology:
    """The lab's namespaces and links; ``create()`` builds them, ``destroy()`` removes them.

    ``ns(node)`` is a node's namespace name; ``ip(node, peer)`` is ``node``'s address on its
    link to ``peer`` (what ``peer`` connects to).
    """

    prefix: str
    link_pairs: Sequence[tuple[str, str] | LinkSpec] = field(default_factory=default_links)
    routes: Sequence[RouteSpec] = ()
    links: list[Link] = field(init=False)
    _cuts: set[tuple[str, str]] = field(default_factory=set, init=False)
    _created: list[str] = field(default_factory=list, init=False)
    _lock_fd: int | None = field(default=None, init=False)
    _lock = threading.Lock()

    def __post_init__(self) -> None:
        self.links = []
        for i, pair in enumerate(self.link_pairs):
            if isinstance(pair, LinkSpec):
                self.links.append(Link(pair.a, pair.b, i + 1, (pair.cidr_a, pair.cidr_b)))
            else:
                self.links.append(Link(pair[0], pair[1], i + 1))

    @property
    def routers(self) -> list[str]:
        """Nodes that forward: those other nodes route through (a ``via`` of someone else's route)."""
        found = []
        for route in self.routes:
            if route.via is None:
                continue
            for link in self.links:
                for node in (link.a, link.b):
                    if link.address(node) == route.via and node != route.node and node not in found:
                        found.append(node)
        return found

    @property
    def nodes(self) -> list[str]:
        seen: list[str] = []
        for link in self.links:
            for node in (link.a, link.b):
                if node not in seen:
                    seen.append(node)
        return seen

    def ns(self, node: str) -> str:
        node_code(node)  # validates the name
        return f"{self.prefix}-{node}"

    def link(self, a: str, b: str) -> Link:
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        raise LabError(f"no link between {a} and {b} in this topology")

    def ip(self, node: str, peer: str) -> str:
        return self.link(node, peer).address(node)

    def ifname(self, node: str, peer: str) -> str:
        return self.link(node, peer).ifname(self.prefix, node)

    # -- lifecycle ---------------------------------------------------------------------------

    def _acquire_prefix_lock(self) -> None:
        """Hold ``/run/tunnelhub-lab-<prefix>.lock`` for the lab's lifetime.

        When the lock is free, namespaces with our prefix are leftovers of a run that died, and
        are removed; when it is held, another run uses this prefix and we stop with advice.
        """
        fd = os.open(f"/run/tunnelhub-lab-{self.prefix}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise LabError(
                f"another lab run holds prefix {self.prefix!r}: set {PREFIX_ENV} to a different "
                "1-8 character prefix for parallel runs"
            ) from exc
        self._lock_fd = fd

    def create(self) -> Topology:
        self._acquire_prefix_lock()
        try:
            for node in self.nodes:
                name = self.ns(node)
                if Path(f"/run/netns/{name}").exists():
                    self._remove_stale(name)
                run(["ip", "netns", "add", name])
                self._created.append(name)
                run(["ip", "-n", name, "link", "set", "lo", "up"])
            for link in self.links:
                na, nb = self.ns(link.a), self.ns(link.b)
                ia, ib = link.ifname(self.prefix, link.a), link.ifname(self.prefix, link.b)
                run(["ip", "link", "add", "name", ia, "netns", na,
                     "type", "veth", "peer", "name", ib, "netns", nb])
                for ns, ifname, node in ((na, ia, link.a), (nb, ib, link.b)):
                    run(["ip", "-n", ns, "addr", "add", link.cidr(node), "dev", ifname])
                    run(["ip", "-n", ns, "link", "set", ifname, "up"])
            for node in self.routers:
                self.sysctl(node, "net.ipv4.ip_forward", 1)
            for route in self.routes:
                argv = ["ip", "-n", self.ns(route.node), "route", "add", route.dst]
                if route.via is not None:
                    argv += ["via", route.via]
                if route.dev_peer is not None:
                    argv += ["dev", self.ifname(route.node, route.dev_peer)]
                run(argv)
        except BaseException:
            self.destroy()
            raise
        return self

    @staticmethod
    def _remove_stale(name: str) -> None:
        """A namespace of our prefix left by a run that died (we hold the prefix lock): stop
        the processes still inside it, by PID, then delete it."""
        pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        run(["ip", "netns", "delete", name])

    def destroy(self) -> None:
        errors = []
        for name in reversed(self._created):
            proc = run(["ip", "netns", "delete", name], check=False)
            if proc.returncode != 0:
                errors.append(f"{name}: {proc.stderr.strip()}")
        self._created.clear()
        self._cuts.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if errors:
            raise LabError("could not delete namespaces: " + "; ".join(errors))

    # -- running things ------------------------------------------------------------------------

    def exec(self, node: str, argv: Sequence[str], **kwargs):  # type: ignore[no-untyped-def]
        return run(argv, netns=self.ns(node), **kwargs)

    def sysctl(self, node: str, key: str, value: str | int) -> None:
        self.exec(node, ["sysctl", "-q", "-w", f"{key}={value}"])

    def in_ns(self, node: str):  # type: ignore[no-untyped-def]
        return in_netns(self.ns(node))

    # -- silent link cuts ----------------------------------------------------------------------

    def _cut_table(self, peer: str) -> str:
        return f"{self.prefix}_cut_{node_code(peer)}"

    def cut(self, a: str, b: str) -> None:
        """Drop every packet arriving on both ends of the a-b link, silently."""
        with self._lock:
            for node, peer in ((a, b), (b, a)):
                table = self._cut_table(peer)
                ifname = self.ifname(node, peer)
                rules = (
                    f"table inet {table} {{\n"
                    f"  chain input {{ type filter hook input priority -400; policy accept;\n"
                    f'    iifname "{ifname}" meta nfproto {{ ipv4, ipv6 }} counter drop\n'
                    "  }\n}\n"
                )
                self.exec(node, ["nft", "-f", "-"], input_text=rules)
            self._cuts.add(tuple(sorted((a, b))))  # type: ignore[arg-type]

    def restore(self, a: str, b: str) -> None:
        """Undo ``cut(a, b)``."""
        with self._lock:
            for node, peer in ((a, b), (b, a)):
                self.exec(node, ["nft", "delete", "table", "inet", self._cut_table(peer)],
                          check=False)
            self._cuts.discard(tuple(sorted((a, b))))  # type: ignore[arg-type]

    def dropped_packets(self, node: str, peer: str) -> int:
        """Packets the cut on ``node``'s side of the link to ``peer`` has dropped so far."""
        proc = self.exec(node, ["nft", "list", "table", "inet", self._cut_table(peer)],
                         check=False)
        match = re.search(r"counter packets (\d+)", proc.stdout)
        return int(match.group(1)) if match else 0

    @property
    def cuts(self) -> set[tuple[str, str]]:
        return set(self._cuts)

    # -- counting connections ------------------------------------------------------------------

    def _count_table(self, port: int) -> str:
        return f"{self.prefix}_count_{port}"

    def count_connections(self, node: str, port: int) -> None:
        """Start counting new TCP connections (SYNs) arriving at ``node``'s ``port``."""
        table = self._count_table(port)
        self.exec(node, ["nft", "delete", "table", "inet", table], check=False)
        rules = (f"table inet {table} {{\n"
                 "  chain input { type filter hook input priority -300; policy accept;\n"
                 f"    tcp dport {port} tcp flags & (syn | ack) == syn counter\n"
                 "  }\n}\n")
        self.exec(node, ["nft", "-f", "-"], input_text=rules)

    def connections_counted(self, node: str, port: int, *, stop: bool = False) -> int:
        """New connections to ``node``'s ``port`` since :meth:`count_connections` (``stop``:
        remove the counter)."""
        table = self._count_table(port)
        proc = self.exec(node, ["nft", "list", "table", "inet", table], check=False)
        match = re.search(r"counter packets (\d+)", proc.stdout)
        if stop:
            self.exec(node, ["nft", "delete", "table", "inet", table], check=False)
        return int(match.group(1)) if match else 0
