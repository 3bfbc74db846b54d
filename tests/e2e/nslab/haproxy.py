"""HAProxy (Debian 12's 2.6) in the lab: the load balancer, and a proxy data plane.

The load balancer stands in for the cloud LB: one TCP frontend per route, a backend with every
proxy, and either the design's HTTP check (``GET /routes/<name>`` on the health port, the
spec's interval and threshold) or the reference's plain TCP check on the route port (the
negative control). A stats socket lets tests read each server's state; :meth:`Haproxy.wait_state`
polls it (every 50 ms, bounded) and returns when the state was first seen.
"""

from __future__ import annotations

import csv
import io
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .proc import Daemon, LabError, run, wait_until

HAPROXY = "/usr/sbin/haproxy"


@dataclass(frozen=True)
class LbRoute:
    name: str
    port: int  # the proxies' NIC port (and the LB frontend port unless frontend_port is set)
    frontend_port: int | None = None

    @property
    def listen_port(self) -> int:
        return self.port if self.frontend_port is None else self.frontend_port


@dataclass(frozen=True)
class LbBackendServer:
    name: str  # "proxy1"
    address: str  # the proxy's address on its link to the LB


def lb_config(
    *,
    routes: Sequence[LbRoute],
    servers: Sequence[LbBackendServer],
    bind_address: str,
    stats_socket: Path,
    check: str = "http",
    health_port: int = 8080,
    interval_s: float = 5.0,
    threshold: int = 2,
    rise: int | None = None,
    check_timeout_s: float | None = None,
) -> str:
    """The LB's haproxy.cfg.

    ``check="http"``: ``option httpchk GET /routes/<name>``, 200 expected, on ``health_port``.
    ``check="tcp"``: a plain TCP connect to the route port (the reference's plain probe).
    ``check="none"``: no checks (benchmarks).
    ``check_timeout_s`` defaults to HAProxy's own default (the check interval).
    """
    if check not in ("http", "tcp", "none"):
        raise LabError(f"check={check!r}: use 'http' (per-route health path), 'tcp' or 'none'")
    rise = threshold if rise is None else rise
    inter_ms = int(interval_s * 1000)
    lines = [
        "global",
        f"    stats socket {stats_socket} mode 600 level admin",
        "    log stderr format raw local0 info",
        "    maxconn 4000",
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        "    timeout connect 5s",
        "    timeout client 1h",
        "    timeout server 1h",
    ]
    if check_timeout_s is not None:
        lines.append(f"    timeout check {int(check_timeout_s * 1000)}ms")
    for route in routes:
        lines += [
            "",
            f"frontend fe_{route.name}",
            f"    bind {bind_address}:{route.listen_port}",
            f"    default_backend be_{route.name}",
            "",
            f"backend be_{route.name}",
            "    balance roundrobin",
        ]
        if check == "http":
            lines += [
                f"    option httpchk GET /routes/{route.name}",
                "    http-check expect status 200",
            ]
        for server in servers:
            check_args = f"check inter {inter_ms} fall {threshold} rise {rise}"
            if check == "none":
                check_args = ""
            elif check == "http":
                check_args += f" port {health_port}"
            lines.append(f"    server {server.name} {server.address}:{route.port} {check_args}"
                         .rstrip())
    return "\n".join(lines) + "\n"


def data_plane_config(
    *,
    routes: Sequence[tuple[int, str, int]],
    stats_socket: Path | None = None,
    tcp_smart: bool = False,
    splice: bool = False,
    maxconn: int = 4000,
) -> str:
    """A proxy data plane: ``routes`` is ``(listen_port, target_host, target_port)``.

    Used by the benchmark to compare HAProxy in TCP mode with the reference's socat.
    """
    lines = ["global", f"    maxconn {maxconn}", "    log stderr format raw local0 notice"]
    if stats_socket is not None:
        lines.append(f"    stats socket {stats_socket} mode 600 level admin")
    lines += ["", "defaults", "    mode tcp", "    log global", "    timeout connect 5s",
              "    timeout client 1h", "    timeout server 1h"]
    if tcp_smart:
        lines += ["    option tcp-smart-accept", "    option tcp-smart-connect"]
    if splice:
        lines.append("    option splice-auto")
    for listen_port, host, port in routes:
        lines += ["", f"listen route_{listen_port}", f"    bind 0.0.0.0:{listen_port}",
                  f"    server tunnel {host}:{port}"]
    return "\n".join(lines) + "\n"


def check_config(path: Path) -> None:
    proc = run([HAPROXY, "-c", "-q", "-f", str(path)], check=False)
    if proc.returncode != 0:
        raise LabError(f"haproxy -c rejected {path}:\n{proc.stdout}{proc.stderr}\n"
                       f"--- config:\n{path.read_text()}")


class Haproxy:
    """HAProxy in a namespace (``haproxy -db -f cfg``), config checked before it starts.

    ``argv`` runs a given command line instead (a proxy's data plane: the ``ExecStart`` of its
    unit drop-in, master-worker mode, its config files already in place); ``check_argv`` is then
    the check run before it starts.
    """

    def __init__(self, *, config_text: str = "", workdir: Path, netns: str, log_dir: Path, name: str,
                 stats_socket: Path | None = None, argv: list[str] | None = None,
                 check_argv: list[str] | None = None) -> None:
        self.workdir = workdir
        self.netns = netns
        self.name = name
        self.stats_socket = stats_socket
        self.config_path = workdir / f"{name}.cfg"
        self.config_text = config_text
        self.check_argv = check_argv
        self.daemon = Daemon(name=name, argv=argv or [HAPROXY, "-db", "-f", str(self.config_path)],
                             log_path=log_dir / f"{name}.log", netns=netns)
        self._own_config = argv is None

    def start(self, *, timeout_s: float = 15.0) -> Haproxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._own_config:
            self.config_path.write_text(self.config_text)
            check_config(self.config_path)
        elif self.check_argv:
            proc = run(self.check_argv, check=False)
            if proc.returncode != 0:
                raise LabError(f"{' '.join(self.check_argv)} rejected the configuration:\n"
                               f"{proc.stdout}{proc.stderr}")
        self.daemon.start()
        if self.stats_socket is not None:
            wait_until(lambda: self._stats_ready(), timeout_s=timeout_s,
                       what=f"{self.name} stats socket {self.stats_socket}")
        else:
            self.daemon.expect_running(settle_s=0.3)
        return self

    def _stats_ready(self) -> bool:
        self.daemon.expect_running()
        return bool(self.command("show info"))

    def stop(self) -> None:
        self.daemon.stop()

    # -- stats socket --------------------------------------------------------------------------

    def command(self, text: str, *, timeout_s: float = 5.0) -> str:
        if self.stats_socket is None:
            raise LabError(f"{self.name} has no stats socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(self.stats_socket))
            sock.sendall(text.encode() + b"\n")
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def servers(self) -> dict[tuple[str, str], dict[str, str]]:
        """``show stat`` rows of servers, keyed by ``(backend, server)``."""
        text = self.command("show stat")
        if text.startswith("# "):
            text = text[2:]
        rows = csv.DictReader(io.StringIO(text))
        return {
            (row["pxname"], row["svname"]): row
            for row in rows
            if row.get("svname") not in ("FRONTEND", "BACKEND", None)
        }

    def server_status(self, backend: str, server: str) -> str:
        try:
            return self.servers()[(backend, server)]["status"]
        except KeyError:
            raise LabError(f"{self.name} has no server {backend}/{server}") from None

    def wait_state(self, backend: str, server: str, state: str, *, timeout_s: float,
                   since: float | None = None) -> float:
        """Wait until ``backend/server`` is exactly ``state`` (UP or DOWN); return the seconds
        from ``since`` (a ``time.monotonic()`` value, default: now) to when it was first seen.
        """
        start = time.monotonic() if since is None else since
        wait_until(lambda: self.server_status(backend, server) == state,
                   timeout_s=timeout_s, interval_s=0.05,
                   what=f"{backend}/{server} to be {state} (last: "
                        f"{self._safe_status(backend, server)})")
        return time.monotonic() - start

    def _safe_status(self, backend: str, server: str) -> str:
        try:
            return self.server_status(backend, server)
        except Exception as exc:  # noqa: BLE001 - diagnostic only
            return repr(exc)

    def status_history(self, backend: str, server: str, duration_s: float,
                       interval_s: float = 0.1) -> list[tuple[float, str]]:
        """Sample a server's status for ``duration_s``; returns ``(t, status)`` changes."""
        changes: list[tuple[float, str]] = []
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            status = self.server_status(backend, server)
            if not changes or changes[-1][1] != status:
                changes.append((time.monotonic(), status))
            time.sleep(interval_s)
        return changes
