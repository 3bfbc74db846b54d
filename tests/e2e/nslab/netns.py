"""Network namespaces for the lab, joined by point-to-point veth links.

Every link is its own /24 (``10.199.<link>.0/24``, first node ``.1``, second ``.2``). Nodes talk
only to their direct neighbours, so no forwarding or routes are needed, and addresses never
leave the namespaces. The default topology::

    db --- onprem --- proxy1 --- lb --- client
              \\------ proxy2 ---/

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
    codes = {"db": "db", "onprem": "op", "lb": "lb", "client": "cl"}
    if node in codes:
        return codes[node]
    match = re.fullmatch(r"proxy([1-9])", node)
    if match:
        return f"p{match.group(1)}"
    raise LabError(f"unknown lab node {node!r}: use db, onprem, proxy1..proxy9, lb or client")


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
class Link:
    a: str
    b: str
    index: int

    def ifname(self, prefix: str, node: str) -> str:
        peer = self.b if node == self.a else self.a
        return f"{prefix}-{node_code(node)}-{node_code(peer)}"

    def address(self, node: str) -> str:
        return f"10.199.{self.index}.{1 if node == self.a else 2}"


def default_links(proxies: int = 2, *, client_to_db: bool = False) -> list[tuple[str, str]]:
    links = [("onprem", "db")]
    links += [("onprem", f"proxy{i}") for i in range(1, proxies + 1)]
    links += [("lb", f"proxy{i}") for i in range(1, proxies + 1)]
    links.append(("client", "lb"))
    if client_to_db:
        links.append(("client", "db"))  # benchmarks only: the "direct" path
    return links


@dataclass
class Topology:
    """The lab's namespaces and links; ``create()`` builds them, ``destroy()`` removes them.

    ``ns(node)`` is a node's namespace name; ``ip(node, peer)`` is ``node``'s address on its
    link to ``peer`` (what ``peer`` connects to).
    """

    prefix: str
    link_pairs: Sequence[tuple[str, str]] = field(default_factory=default_links)
    links: list[Link] = field(init=False)
    _cuts: set[tuple[str, str]] = field(default_factory=set, init=False)
    _created: list[str] = field(default_factory=list, init=False)
    _lock_fd: int | None = field(default=None, init=False)
    _lock = threading.Lock()

    def __post_init__(self) -> None:
        self.links = [Link(a, b, i + 1) for i, (a, b) in enumerate(self.link_pairs)]

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
                    run(["ip", "-n", ns, "addr", "add", f"{link.address(node)}/24", "dev", ifname])
                    run(["ip", "-n", ns, "link", "set", ifname, "up"])
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
