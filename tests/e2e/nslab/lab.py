"""One object that builds a scenario's lab and tears all of it down.

A :class:`Lab` owns a work directory (``/var/lib/tunnelhub-lab/<prefix>-XXXX``, mode 0755 so
the tunnel user's sshd can read its authorized_keys there), the topology, the logs (one file per
daemon under ``logs/``) and a stack of cleanups run in reverse order by :meth:`close`, whatever
happened. Everything it starts is registered there the moment it is started.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .client import Endpoint
from .cloudinit import VmRoot, extract_cloud_init, install_files, match_user
from .haproxy import Haproxy, LbBackendServer, LbRoute, lb_config
from .mariadb import MariaDB
from .netns import LinkSpec, RouteSpec, Topology, default_links, lab_prefix
from .proc import LabError, tail, wait_until
from .sshd import (
    Sshd,
    SshdConfig,
    acquire_user,
    generate_key,
    known_hosts_line,
    release_user,
)
from .unit import ServiceRunner, UnitCommand

BASE_DIR_ENV = "TUNNELHUB_LAB_DIR"
KEEP_ENV = "TUNNELHUB_LAB_KEEP"
DEFAULT_BASE_DIR = Path("/var/lib/tunnelhub-lab")
DB_PORT = 3306
TUNNEL_PORT = 13306
HEALTH_PORT = 8080


@dataclass
class ProxyRuntime:
    """What runs on one proxy: its sshd, data plane and health endpoint."""

    name: str
    sshd: Sshd
    services: dict[str, ServiceRunner | Haproxy] = field(default_factory=dict)
    vm: VmRoot | None = None


class Lab:
    def __init__(self, *, proxies: int = 2, client_to_db: bool = False,
                 tunnel_user: str = "tunnelhub",
                 links: Sequence[tuple[str, str] | LinkSpec] | None = None,
                 routes: Sequence[RouteSpec] = ()) -> None:
        self.prefix = lab_prefix()
        base = Path(os.environ.get(BASE_DIR_ENV, DEFAULT_BASE_DIR))
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir=base))
        os.chmod(self.workdir, 0o755)
        self.log_dir = self.workdir / "logs"
        self.log_dir.mkdir()
        if links is None:
            links = default_links(proxies, client_to_db=client_to_db)
        self.topology = Topology(self.prefix, links, routes)
        self.proxy_names = [f"proxy{i}" for i in range(1, proxies + 1)]
        self.tunnel_user = tunnel_user
        self._cleanups: list[tuple[str, Callable[[], None]]] = []
        self.db: MariaDB | None = None
        self.lb: Haproxy | None = None
        self.proxies: dict[str, ProxyRuntime] = {}
        self.tunnels: dict[str, ServiceRunner] = {}
        self.notes: list[str] = []
        self._keys: dict[str, tuple[Path, str]] = {}
        self._users: list[str] = []
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def open(self) -> Lab:
        self.topology.create()
        self.on_close("topology", self.topology.destroy)
        self.use_user(self.tunnel_user)
        return self

    def use_user(self, name: str) -> None:
        """The tunnel user exists while this lab runs (shared safely with parallel labs)."""
        if name in self._users:
            return
        acquire_user(name, self.prefix)
        self._users.append(name)
        self.on_close(f"user {name}", lambda: release_user(name, self.prefix))

    def on_close(self, what: str, fn: Callable[[], None]) -> None:
        self._cleanups.append((what, fn))

    def close(self, *, failed: bool = False) -> list[str]:
        """Run every cleanup (reverse order); returns the errors instead of raising midway."""
        errors = []
        while self._cleanups:
            what, fn = self._cleanups.pop()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - every cleanup must get its turn
                errors.append(f"cleanup of {what} failed: {exc!r}")
        self.closed = True
        if not failed and not os.environ.get(KEEP_ENV):
            shutil.rmtree(self.workdir, ignore_errors=True)
        return errors

    def __enter__(self) -> Lab:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        errors = self.close(failed=exc_type is not None)
        if exc_type is not None:
            print(self.logs_report())
        if errors and exc_type is None:
            raise LabError("; ".join(errors))

    def logs_report(self, lines: int = 40) -> str:
        parts = [f"=== lab logs in {self.log_dir} (last {lines} lines each)"]
        for path in sorted(self.log_dir.glob("*.log")):
            parts.append(f"--- {path.name}\n{tail(path, lines)}")
        return "\n".join(parts)

    def path(self, *parts: str) -> Path:
        return self.workdir.joinpath(*parts)

    # -- keys -------------------------------------------------------------------------------------

    def key(self, name: str, *, key_type: str = "ed25519", bits: int | None = None
            ) -> tuple[Path, str]:
        """A key pair made once per lab: ``(private key path, public key line)``."""
        if name not in self._keys:
            keydir = self.path("keys")
            keydir.mkdir(exist_ok=True, mode=0o700)
            path = keydir / name
            self._keys[name] = (path, generate_key(path, key_type=key_type, bits=bits,
                                                   comment=f"tunnelhub-lab-{name}"))
        return self._keys[name]

    @property
    def hub_host_key(self) -> tuple[Path, str]:
        """The hub's SSH host key (every proxy slot presents it)."""
        return self.key("hub_host_ed25519_key")

    def known_hosts(self) -> str:
        """known_hosts pinning the hub host key for every proxy address."""
        hosts = [self.proxy_address(p) for p in self.proxy_names]
        return known_hosts_line(hosts, self.hub_host_key[1])

    def proxy_address(self, proxy: str) -> str:
        """The address the tunnel host dials for ``proxy`` (its neighbour, or behind ``gw``)."""
        peer = "onprem" if any({link.a, link.b} == {proxy, "onprem"}
                               for link in self.topology.links) else "gw"
        return self.topology.ip(proxy, peer)

    @property
    def tunnel_host_address(self) -> str:
        """The tunnel host's address as the database sees it (the check user's host part)."""
        return self.topology.ip("onprem", "db")

    @property
    def tunnel_host_nodes(self) -> list[str]:
        """The tunnel-host namespaces of this lab (``onprem``, and ``onprem2``... with two or more)."""
        return [n for n in self.topology.nodes if n == "onprem" or re.fullmatch(r"onprem[2-9]", n)]

    @property
    def tunnel_host_addresses(self) -> list[str]:
        """Every tunnel host's address as the database sees it (the check user logs in from each)."""
        return [self.topology.ip(n, "db") for n in self.tunnel_host_nodes
                if any({link.a, link.b} == {n, "db"} for link in self.topology.links)]

    # -- database ---------------------------------------------------------------------------------

    def start_db(self, *, bind_all: bool = False, max_connect_errors: int = 100) -> MariaDB:
        """MariaDB on the db's on-prem address (``bind_all``: every address, for benchmarks)."""
        db = MariaDB(workdir=self.path("db"), netns=self.topology.ns("db"),
                     bind_address="0.0.0.0" if bind_all else self.topology.ip("db", "onprem"),
                     log_dir=self.log_dir, port=DB_PORT, max_connect_errors=max_connect_errors,
                     check_user_host=self.tunnel_host_address,
                     more_check_user_hosts=tuple(a for a in self.tunnel_host_addresses
                                                 if a != self.tunnel_host_address))
        self.db = db
        self.on_close("mariadb", db.stop)
        return db.start()

    @property
    def db_host(self) -> str:
        return self.topology.ip("db", "onprem")

    # -- proxies ----------------------------------------------------------------------------------

    def start_sshd(self, proxy: str, *, authorized_keys: Path, dropins: Sequence[Path] = (),
                   host_keys: Sequence[Path] | None = None) -> Sshd:
        if host_keys is None:
            host_keys = [self.hub_host_key[0]]
        config = SshdConfig(workdir=self.path(proxy, "lab-sshd"), host_keys=host_keys,
                            authorized_keys=authorized_keys, dropins=dropins)
        sshd = Sshd(config, netns=self.topology.ns(proxy), log_dir=self.log_dir,
                    name=f"{proxy}-sshd", address=self.proxy_address(proxy))
        self.on_close(f"{proxy} sshd", sshd.stop)
        return sshd.start()

    def run_service(self, node: str, command: UnitCommand, *, name: str,
                    main_pid_file: Path | None = None) -> ServiceRunner:
        runner = ServiceRunner(command, netns=self.topology.ns(node),
                               log_path=self.log_dir / f"{name}.log", main_pid_file=main_pid_file)
        self.on_close(name, runner.stop)
        return runner.start()

    def apply_sysctl_file(self, node: str, path: Path) -> None:
        """``sysctl -p`` of a drop-in inside the node's namespace (per-namespace keys only)."""
        self.topology.exec(node, ["sysctl", "-q", "-p", str(path)])

    # -- load balancer ----------------------------------------------------------------------------

    def start_lb(self, routes: Sequence[LbRoute], *, check: str = "http",
                 interval_s: float = 5.0, threshold: int = 2,
                 check_timeout_s: float | None = None, health_port: int = HEALTH_PORT,
                 wait_up_s: float | None = 60.0, name: str = "lb-haproxy",
                 default: bool = True, servers: Sequence[str] | None = None) -> Haproxy:
        """HAProxy in the ``lb`` namespace: the load balancer (``default``: ``self.lb``), or
        another one beside it (its own ``name``, frontend ports and stats socket). ``servers``:
        the proxies behind it (default: every proxy)."""
        sock = self.path("lb", f"{name}.sock")
        sock.parent.mkdir(parents=True, exist_ok=True)
        members = list(self.proxy_names if servers is None else servers)
        backend = [LbBackendServer(p, self.topology.ip(p, "lb")) for p in members]
        cfg = lb_config(routes=routes, servers=backend,
                        bind_address=self.topology.ip("lb", "client"), stats_socket=sock,
                        check=check, health_port=health_port, interval_s=interval_s,
                        threshold=threshold, check_timeout_s=check_timeout_s)
        lb = Haproxy(config_text=cfg, workdir=self.path("lb"), netns=self.topology.ns("lb"),
                     log_dir=self.log_dir, name=name, stats_socket=sock)
        if default:
            self.lb = lb
        self.on_close(name, lb.stop)
        lb.start()
        if wait_up_s:
            for route in routes:
                for proxy in members:
                    lb.wait_state(f"be_{route.name}", proxy, "UP", timeout_s=wait_up_s)
        return lb

    def endpoint(self, port: int = DB_PORT, **overrides: float) -> Endpoint:
        assert self.db is not None, "start_db() first"
        return Endpoint(netns=self.topology.ns("client"), host=self.topology.ip("lb", "client"),
                        port=port, user=self.db.app_user, password=self.db.app_password,
                        database=self.db.app_database, **overrides)  # type: ignore[arg-type]

    def endpoint_direct(self, node: str, **overrides: float) -> Endpoint:
        """The database itself, from ``node`` (a neighbour of ``db``)."""
        assert self.db is not None, "start_db() first"
        return Endpoint(netns=self.topology.ns(node), host=self.topology.ip("db", node),
                        port=DB_PORT, user=self.db.app_user, password=self.db.app_password,
                        database=self.db.app_database, **overrides)  # type: ignore[arg-type]

    # -- tunnels ----------------------------------------------------------------------------------

    def wait_tunnel_listener(self, proxy: str, port: int = TUNNEL_PORT, *, present: bool = True,
                             timeout_s: float = 30.0) -> float:
        """Wait until sshd's loopback listener for ``port`` is (or is not) there; seconds."""
        start = time.monotonic()

        def check() -> bool:
            out = self.topology.exec(proxy, ["ss", "-Htln", f"sport = :{port}"]).stdout
            return bool(out.strip()) == present

        wait_until(check, timeout_s=timeout_s, interval_s=0.05,
                   what=f"tunnel listener :{port} on {proxy} to be "
                        f"{'present' if present else 'gone'}")
        return time.monotonic() - start

    # -- generated artifacts ----------------------------------------------------------------------

    def extract_proxy(self, proxy: str, user_data: bytes | str,
                      extra_files: Mapping[str, bytes | str] | None = None) -> VmRoot:
        """Extract a proxy's rendered cloud-init under ``<workdir>/<proxy>/root``.

        ``extra_files`` adds what the VM fetches at boot (the lab always adds the hub host key
        at ``/etc/ssh/ssh_host_ed25519_key`` unless given).
        """
        files = dict(extra_files or {})
        files.setdefault("/etc/ssh/ssh_host_ed25519_key", self.hub_host_key[0].read_bytes())
        vm = extract_cloud_init(user_data, self.path(proxy, "root"), extra_files=files)
        self.use_user(self.tunnel_user_of(vm))
        vm.rechown()
        return vm

    def install_onprem(self, files: Mapping[str, bytes | str],
                       modes: Mapping[str, int] | None = None, *, node: str = "onprem") -> VmRoot:
        """Install a tunnel host's files under ``<workdir>/<node>/root``."""
        return install_files(self.path(node, "root"), files, modes=modes)

    def tunnel_user_of(self, vm: VmRoot) -> str:
        dropins = vm.matching(r"^/etc/ssh/sshd_config\.d/.*\.conf$")
        users = {match_user(d.text) for d in dropins if "Match" in d.text}
        if len(users) != 1:
            raise LabError(f"expected one tunnel user across the sshd drop-ins, found {users}")
        return users.pop()
