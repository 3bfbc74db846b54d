#!/usr/bin/env python3
"""Data-path benchmark: direct to MariaDB vs through what tunnelhub ships, with and without quick-ACK.

Runs in the e2e lab's namespaces laid out as a hub (``nslab.hub``, needs root): one proxy running
its rendered cloud-init (HAProxy data plane, sshd with the generated drop-in), the on-prem
package's unit (``ssh -R`` under autossh, built by ``build_deb``) on the tunnel host behind a
gateway, MariaDB on the tunnel host's LAN, the LB (HAProxy, TCP mode, no checks) and the client,
plus a client-db link for the direct baseline.

Paths: direct (client -> MariaDB); tunnel (inside the proxy -> the ``ssh -R`` listener);
proxy NIC (LB namespace -> proxy HAProxy -> tunnel: the product's share, no LB); full (client ->
LB -> proxy -> tunnel; the lab's LB is an HAProxy standing in for the cloud's). Measured:

- small-query round trip: median and p99 of ``--queries`` ``SELECT 1`` over one connection;
- new-connection setup: time from ``connect()`` to the server's first byte (the MySQL greeting)
  on a fresh connection, ``--connections`` back to back (median, p95, p99), and a sixth as many
  100 ms apart; plus a full login (connect, greeting, authentication) back to back. These run
  for the package built with ``onprem.tcp_quickack: true`` (its ExecStartPre adds the quick-ACK
  host route) and with ``false``;
- bulk transfer (quick-ACK package): a ``--bulk-mib`` MiB result per client, read as raw MySQL
  packets (PyMySQL's row decoding would cap it), for 1 client and for 4 concurrent clients (each
  on its own connection, in its own thread; aggregate MiB/s over the wall time), ``--runs``
  runs per path, each right after a direct run (direct, path, direct, path, ...: the load
  drifts); medians and min-max spreads, and the ratio of the medians;
- where the CPU goes: per-process CPU (from /proc, % of one core) during one bulk read of each
  path, for each client count.

The figures are printed against the targets: bulk >= 0.9x direct (issue 18), added round trip
<= 250 us, added setup <= 5 ms (full path).

    python3 bench/datapath.py                # everything (~2.5 minutes; --bulk-only ~1.5)
    python3 bench/datapath.py --quick        # fewer samples (the targets' minimums are not met)
    python3 bench/datapath.py --bulk-only --runs 3 --clients 1
    python3 bench/datapath.py --cipher chacha20-poly1305@openssh.com   # OpenSSH's default cipher
    python3 bench/datapath.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import re
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "e2e")]

from nslab.client import Endpoint  # noqa: E402
from nslab.hub import ROUTE_PORT, GeneratedHub, hub_lab  # noqa: E402
from nslab.lab import DB_PORT, TUNNEL_PORT, Lab  # noqa: E402
from nslab.netns import in_netns  # noqa: E402
from nslab.proc import LabError, interrupt_on_sigterm  # noqa: E402

from tunnelhub.userdata import render_cloud_init  # noqa: E402

PROXY = "proxy1"
TARGET_BULK_RATIO = 0.9
TARGET_ADDED_RTT_US = 250
TARGET_ADDED_CONNECT_MS = 5.0


@dataclass
class Measure:
    path: str
    rtt_median_ms: float = 0.0
    rtt_p99_ms: float = 0.0
    connect_median_ms: float = 0.0
    connect_p95_ms: float = 0.0
    connect_p99_ms: float = 0.0
    connect_spaced_median_ms: float = 0.0
    login_median_ms: float = 0.0
    login_p95_ms: float = 0.0


@dataclass
class BulkResult:
    """``runs`` bulk reads of one path, each right after a direct one (aggregate MiB/s)."""

    path: str
    clients: int
    mib_per_client: int
    path_mib_s: list[float] = field(default_factory=list)
    direct_mib_s: list[float] = field(default_factory=list)  # direct_mib_s[i] ran right before path_mib_s[i]

    @property
    def ratio(self) -> float:
        """Median path / median direct of the same interleaved runs."""
        return statistics.median(self.path_mib_s) / statistics.median(self.direct_mib_s)

    @property
    def pair_ratios(self) -> list[float]:
        return [p / d for p, d in zip(self.path_mib_s, self.direct_mib_s, strict=True)]


@dataclass
class CpuProfile:
    """Per-process CPU during one bulk read: % of one core, by ``comm@namespace``."""

    path: str
    clients: int
    mib_s: float  # aggregate
    machine_busy_pct: float  # of all CPUs
    softirq_pct: float
    processes: dict[str, float] = field(default_factory=dict)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure_rtt(endpoint: Endpoint, n: int) -> tuple[float, float]:
    conn = endpoint.connect()
    try:
        times = []
        with conn.cursor() as cur:
            for _ in range(50):  # warm-up
                cur.execute("SELECT 1")
                cur.fetchall()
            for _ in range(n):
                t0 = time.perf_counter()
                cur.execute("SELECT 1")
                cur.fetchall()
                times.append(time.perf_counter() - t0)
    finally:
        conn.close()
    return statistics.median(times) * 1e3, pct(times, 0.99) * 1e3


def measure_connect(netns: str, host: str, port: int, n: int, *, gap_s: float = 0.0
                    ) -> tuple[float, float, float]:
    """Time to the first byte on ``n`` fresh connections, back to back or ``gap_s`` apart."""
    times = []
    for _ in range(n):
        if gap_s:
            time.sleep(gap_s)
        with in_netns(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            t0 = time.perf_counter()
            sock.connect((host, port))
            if not sock.recv(1):
                raise LabError(f"{host}:{port} closed before sending a greeting")
            times.append(time.perf_counter() - t0)
        finally:
            sock.close()
    return statistics.median(times) * 1e3, pct(times, 0.95) * 1e3, pct(times, 0.99) * 1e3


def measure_login(endpoint: Endpoint, n: int) -> tuple[float, float]:
    """A full login (TCP connect, greeting, authentication, autocommit) ``n`` times back to back."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn = endpoint.connect()
        times.append(time.perf_counter() - t0)
        conn.close()
    return statistics.median(times) * 1e3, pct(times, 0.95) * 1e3


BULK_WARMUP_SQL = "SELECT REPEAT('x', 1048576) FROM seq_1_to_2"


def measure_bulk(endpoint: Endpoint, mib: int, clients: int = 1) -> float:
    """Aggregate MiB/s of ``clients`` connections each reading a ``mib`` MiB result at once.

    PyMySQL logs in (all connections first, each with a small warm-up result); the query is then
    sent and its result read as raw MySQL packets (headers parsed, payloads counted), so the
    figure is the data path's, not PyMySQL's row decoding (which caps near 130 MiB/s on this
    machine). With several clients each reads in its own thread, all released together; the
    figure is all bytes over the time from the first start to the last finish.
    """
    sql = f"SELECT REPEAT('x', 1048576) FROM seq_1_to_{mib}"
    conns = []
    try:
        for _ in range(clients):
            conns.append(endpoint.connect())
            raw_query(conns[-1], BULK_WARMUP_SQL)
        if clients == 1:
            t0 = time.perf_counter()
            received = [raw_query(conns[0], sql)]
            elapsed = time.perf_counter() - t0
        else:
            received, elapsed = _read_concurrently(conns, sql)
    finally:
        for conn in conns:
            conn.close()
    short = [n for n in received if n < mib * 1048576]
    if short:
        raise LabError(f"bulk result has {short[0]} bytes, expected at least {mib} MiB")
    return clients * mib / elapsed


def _read_concurrently(conns: list, sql: str) -> tuple[list[int], float]:
    n = len(conns)
    start = threading.Barrier(n)
    received = [0] * n
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * n
    errors: list[BaseException] = []

    def read(i: int) -> None:
        try:
            start.wait(timeout=30)
            t0 = time.perf_counter()
            received[i] = raw_query(conns[i], sql)
            spans[i] = (t0, time.perf_counter())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=read, args=(i,), name=f"bulk-{i}") for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return received, max(end for _, end in spans) - min(begin for begin, _ in spans)


def raw_query(conn, sql: str) -> int:  # noqa: ANN001 - a pymysql Connection
    """Send COM_QUERY on ``conn``'s socket; read the result set; return payload bytes read."""
    from pymysql.constants import CLIENT

    sock = conn._sock  # noqa: SLF001 - deliberate: bypass row decoding
    body = b"\x03" + sql.encode()
    sock.sendall(len(body).to_bytes(3, "little") + b"\x00" + body)
    deprecate_eof = bool(conn.client_flag & CLIENT.DEPRECATE_EOF)
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    have = 0  # bytes in buf not yet consumed
    total = 0
    eofs_needed = 1 if deprecate_eof else 2
    eofs = 0
    first = True
    while True:
        # Ensure a 4-byte header plus the first payload byte.
        while have < 5:
            n = sock.recv_into(view[have:], len(buf) - have)
            if n == 0:
                raise LabError("connection closed during the result")
            have += n
        length = int.from_bytes(buf[0:3], "little")
        marker = buf[4]
        if first and marker == 0xFF:
            raise LabError(f"query failed: {bytes(buf[7:min(have, 200)])!r}")
        first = False
        is_eof = marker == 0xFE and length < 0xFFFFFF  # a row never starts with 0xFE here
        remaining = 4 + length
        # Consume the packet: what is buffered, then read the rest in place.
        if have >= remaining:
            buf[:have - remaining] = buf[remaining:have]
            have -= remaining
        else:
            remaining -= have
            have = 0
            while remaining:
                n = sock.recv_into(view, min(len(buf), remaining))
                if n == 0:
                    raise LabError("connection closed during the result")
                remaining -= n
        total += length
        if is_eof:
            eofs += 1
            if eofs == eofs_needed:
                return total


_HZ = os.sysconf("SC_CLK_TCK")


_PF_KTHREAD = 0x00200000


def _process_times() -> dict[int, tuple[str, str, int]]:
    """pid -> (comm, network namespace, utime + stime in ticks of all its threads); a kernel
    thread's namespace is ``"kernel"``."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            netns = "kernel" if int(fields[6]) & _PF_KTHREAD else os.readlink(f"/proc/{pid}/ns/net")
        except OSError:  # exited meanwhile
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        out[int(pid)] = (comm, netns, int(fields[11]) + int(fields[12]))
    return out


def _machine_ticks() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def cpu_profile(label: str, clients: int, read, namespaces: dict[str, str]) -> CpuProfile:  # noqa: ANN001 - () -> MiB/s
    """Run ``read`` and attribute the CPU every process used meanwhile: a lab process as
    ``comm@node``, the bench's own process (the clients) as ``bench``, kernel threads by name
    (``ksoftirqd``), anything else summed as ``other`` (not the lab: load on the machine).
    Processes that start and end inside the window are missed (none on the data path: HAProxy,
    ssh and sshd are long-lived)."""
    by_inode = {f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]": node for node, ns in namespaces.items()}
    me = os.getpid()
    before, m0 = _process_times(), _machine_ticks()
    t0 = time.perf_counter()
    mib_s = read()
    elapsed = time.perf_counter() - t0
    after, m1 = _process_times(), _machine_ticks()
    per: dict[str, float] = {}
    for pid, (comm, netns, ticks) in after.items():
        used = ticks - before.get(pid, (comm, netns, 0))[2]
        if used <= 0:
            continue
        if pid == me:
            name = "bench"
        elif netns in by_inode:
            name = f"{comm}@{by_inode[netns]}"
        elif netns == "kernel":
            name = re.sub(r"[/:].*$", "", comm)  # ksoftirqd/1, kworker/u8:6-events -> ksoftirqd, kworker
        else:
            name = "other"
        per[name] = per.get(name, 0.0) + used / _HZ / elapsed * 100
    delta = [b - a for a, b in zip(m0, m1, strict=True)]
    total = sum(delta) or 1
    busy = (1 - (delta[3] + delta[4]) / total) * 100  # idle + iowait
    shown = {k: round(v, 1) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 2}
    return CpuProfile(label, clients, mib_s, busy, delta[6] / total * 100, shown)


class Bench:
    def __init__(self, lab: Lab, args: argparse.Namespace) -> None:
        self.lab = lab
        self.args = args
        self.results: list[Measure] = []
        self.bulk_results: list[BulkResult] = []
        self.profiles: list[CpuProfile] = []
        self.hub: GeneratedHub | None = None
        self.ciphers = ""
        # /proc counts CPU in clock ticks (10 ms): a read shorter than ~0.5 s profiles poorly.
        self.profile_mib = max(args.bulk_mib, 256)

    def endpoint(self, node: str, host: str, port: int) -> Endpoint:
        db = self.lab.db
        assert db is not None
        return Endpoint(netns=self.lab.topology.ns(node), host=host, port=port,
                        user=db.app_user, password=db.app_password, database=db.app_database,
                        read_timeout_s=60)

    def measure(self, label: str, node: str, host: str, port: int) -> Measure:
        a = self.args
        ns = self.lab.topology.ns(node)
        rtt_med, rtt_p99 = measure_rtt(self.endpoint(node, host, port), a.queries)
        c_med, c_p95, c_p99 = measure_connect(ns, host, port, a.connections)
        spaced, _, _ = measure_connect(ns, host, port, max(10, a.connections // 6), gap_s=0.1)
        l_med, l_p95 = measure_login(self.endpoint(node, host, port), a.connections)
        result = Measure(label, rtt_med, rtt_p99, c_med, c_p95, c_p99, spaced, l_med, l_p95)
        self.results.append(result)
        print(f"  {label:<40} rtt {rtt_med:6.3f} ms (p99 {rtt_p99:6.3f})  connect {c_med:6.2f} ms "
              f"(p95 {c_p95:6.2f}, p99 {c_p99:6.2f}, spaced {spaced:5.2f})  login {l_med:6.2f} ms "
              f"(p95 {l_p95:6.2f})", flush=True)
        return result

    def paths(self) -> list[tuple[str, str, str, int]]:
        """(label, node, host, port) of the direct path and the three tunnel paths."""
        topo = self.lab.topology
        return [("direct", "client", topo.ip("db", "client"), DB_PORT),
                ("tunnel", PROXY, "127.0.0.1", TUNNEL_PORT),
                ("proxy NIC", "lb", topo.ip(PROXY, "lb"), ROUTE_PORT),
                ("full", "client", topo.ip("lb", "client"), ROUTE_PORT)]

    def bulk(self) -> None:
        """Each path ``--runs`` times for each ``--clients`` count, every run right after a direct
        one; then one read of every path and client count under the CPU profiler."""
        a = self.args
        (_, *direct_at), *paths = self.paths()
        direct = self.endpoint(*direct_at)
        for clients in a.clients:
            for label, *at in paths:
                result = BulkResult(label, clients, a.bulk_mib)
                endpoint = self.endpoint(*at)
                for _ in range(a.runs):
                    result.direct_mib_s.append(measure_bulk(direct, a.bulk_mib, clients))
                    result.path_mib_s.append(measure_bulk(endpoint, a.bulk_mib, clients))
                self.bulk_results.append(result)
                print(f"  bulk {clients} client{'s' if clients > 1 else ' '} {label:<10} "
                      f"{statistics.median(result.path_mib_s):6.1f} MiB/s ({min(result.path_mib_s):.0f}-"
                      f"{max(result.path_mib_s):.0f}) vs direct {statistics.median(result.direct_mib_s):6.1f} "
                      f"({min(result.direct_mib_s):.0f}-{max(result.direct_mib_s):.0f}): {result.ratio:.2f}x",
                      flush=True)
        namespaces = {node: self.lab.topology.ns(node) for node in self.lab.topology.nodes}
        for clients in a.clients:
            for label, *at in self.paths():
                endpoint = self.endpoint(*at)
                profile = cpu_profile(label, clients,
                                      lambda e=endpoint, n=clients: measure_bulk(e, self.profile_mib, n), namespaces)
                self.profiles.append(profile)
                print(f"  cpu {clients} {label:<10} {profile.mib_s:6.1f} MiB/s, machine "
                      f"{profile.machine_busy_pct:.0f} % busy: "
                      + ", ".join(f"{k} {v:.0f} %" for k, v in profile.processes.items()), flush=True)

    def use_package(self, tcp_quickack: bool) -> None:
        """Run the on-prem package built with ``onprem.tcp_quickack`` set so (the proxy stays)."""
        lab = self.lab
        if self.hub is not None:
            lab.tunnels[PROXY].stop()  # ExecStopPost removes the previous package's route
            lab.wait_tunnel_listener(PROXY, present=False, timeout_s=30)
        hub = GeneratedHub(lab, tcp_quickack=tcp_quickack)
        if self.hub is None:
            hub.start_proxy(PROXY)
        elif render_cloud_init(hub.hub, 0).payload != render_cloud_init(self.hub.hub, 0).payload:
            raise LabError("onprem.tcp_quickack changed the proxy's user data")
        self.hub = hub
        config = hub.ssh_config_path()
        if self.args.cipher:
            text, count = re.subn(r"^(\s*)Ciphers .*$", rf"\1Ciphers {self.args.cipher}", config.read_text(),
                                  flags=re.M)
            if count != 1:
                raise LabError(f"the package's ssh_config has {count} Ciphers lines, expected 1")
            config.write_text(text)
        effective = lab.topology.exec("onprem", ["ssh", "-G", "-F", str(config), lab.proxy_address(PROXY)]).stdout
        self.ciphers = next(line.split(" ", 1)[1] for line in effective.splitlines() if line.startswith("ciphers "))
        print(f"ssh offers the ciphers {self.ciphers}"
              f"{' (--cipher, not the package list)' if self.args.cipher else ' (the package list)'}", flush=True)
        hub.start_tunnel(PROXY)
        lab.wait_tunnel_listener(PROXY, timeout_s=30)
        routes = lab.topology.exec("onprem", ["ip", "route", "show", "proto", "84"]).stdout
        if ("quickack 1" in routes) != tcp_quickack:
            raise LabError(f"quick-ACK route {'missing' if tcp_quickack else 'present'}: {routes!r}")
        print(f"tunnel host routes to the proxy (proto 84): {routes.strip() or 'none'}", flush=True)

    def run(self) -> None:
        """Latency with the quick-ACK package, bulk with it, then latency without quick-ACK."""
        lab = self.lab
        topo = lab.topology
        latency = not self.args.bulk_only
        if latency:
            print("direct", flush=True)
            self.measure("direct: client -> MariaDB", "client", topo.ip("db", "client"), DB_PORT)
        for quickack in (True, False) if latency else (True,):
            if self.hub is None or self.hub.tcp_quickack != quickack:
                self.use_package(quickack)
            tag = "quick-ACK" if quickack else "no quick-ACK"
            print(f"package built with onprem.tcp_quickack: {str(quickack).lower()}", flush=True)
            if latency:
                self.measure(f"tunnel ({tag})", PROXY, "127.0.0.1", TUNNEL_PORT)
                self.measure(f"proxy NIC ({tag})", "lb", topo.ip(PROXY, "lb"), ROUTE_PORT)
                self.measure(f"full: LB -> proxy -> tunnel ({tag})", "client", topo.ip("lb", "client"), ROUTE_PORT)
            if quickack:
                print(f"bulk: {self.args.bulk_mib} MiB per client, {self.args.runs} runs per path, "
                      "each right after a direct run", flush=True)
                self.bulk()

    def report(self) -> str:
        lines = []
        if self.results:
            direct = self.results[0]
            lines += ["", "| path | SELECT 1 median (p99) ms | added median µs | first byte, median (p95) ms "
                      "| added ms | 100 ms apart, median ms | login median (p95) ms |",
                      "|---|---|---|---|---|---|---|"]
            for r in self.results:
                lines.append(
                    f"| {r.path} | {r.rtt_median_ms:.3f} ({r.rtt_p99_ms:.3f}) | "
                    f"{(r.rtt_median_ms - direct.rtt_median_ms) * 1000:+.0f} | "
                    f"{r.connect_median_ms:.2f} ({r.connect_p95_ms:.2f}) | "
                    f"{r.connect_median_ms - direct.connect_median_ms:+.2f} | "
                    f"{r.connect_spaced_median_ms:.2f} | {r.login_median_ms:.2f} ({r.login_p95_ms:.2f}) |")
        if self.bulk_results:
            lines += ["", f"Bulk ({self.args.bulk_mib} MiB per client, {self.args.runs} interleaved runs; "
                      "aggregate MiB/s, median (min-max); ratio = median / median direct, (min-max) of "
                      "each run / the direct run before it):", "",
                      "| clients | path | MiB/s | direct MiB/s | ratio | runs' ratios |", "|---|---|---|---|---|---|"]
            for r in self.bulk_results:
                p, d, q = r.path_mib_s, r.direct_mib_s, r.pair_ratios
                lines.append(f"| {r.clients} | {r.path} | {statistics.median(p):.0f} ({min(p):.0f}-{max(p):.0f}) | "
                             f"{statistics.median(d):.0f} ({min(d):.0f}-{max(d):.0f}) | {r.ratio:.2f}x | "
                             f"{min(q):.2f}-{max(q):.2f} |")
        if self.profiles:
            lines += ["", f"CPU during one bulk read ({self.profile_mib} MiB per client; % of one core, "
                      f"{os.cpu_count()} CPUs; processes >= 2 %; other = not the lab):", "",
                      "| clients | path | MiB/s | machine busy | softirq | processes |", "|---|---|---|---|---|---|"]
            for c in self.profiles:
                lines.append(f"| {c.clients} | {c.path} | {c.mib_s:.0f} | {c.machine_busy_pct:.0f} % | "
                             f"{c.softirq_pct:.0f} % | "
                             + ", ".join(f"{k} {v:.0f} %" for k, v in c.processes.items()) + " |")
        lines += ["", "Against the targets:"]
        for r in self.results:
            if not r.path.startswith("full"):
                continue
            added_rtt_us = (r.rtt_median_ms - direct.rtt_median_ms) * 1000
            added_connect = r.connect_median_ms - direct.connect_median_ms
            lines.append(
                f"- {r.path}: added round trip {added_rtt_us:+.0f} µs (target <= {TARGET_ADDED_RTT_US}: "
                f"{'met' if added_rtt_us <= TARGET_ADDED_RTT_US else 'MISSED'}); added setup "
                f"{added_connect:+.2f} ms (target <= {TARGET_ADDED_CONNECT_MS:.0f}: "
                f"{'met' if added_connect <= TARGET_ADDED_CONNECT_MS else 'MISSED'})")
        for r in self.bulk_results:
            lines.append(f"- bulk, {r.clients} client{'s' if r.clients > 1 else ''}, {r.path}: {r.ratio:.2f}x direct "
                         f"(target >= {TARGET_BULK_RATIO}: {'met' if r.ratio >= TARGET_BULK_RATIO else 'MISSED'})")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--bulk-mib", type=int, default=256, help="MiB each client reads (default 256)")
    parser.add_argument("--runs", type=int, default=5, help="bulk runs per path and client count (default 5)")
    parser.add_argument("--clients", default="1,4", help="concurrent bulk clients, comma-separated (default 1,4)")
    parser.add_argument("--bulk-only", action="store_true", help="skip the round-trip and setup measurements")
    parser.add_argument("--cipher", help="replace the package's Ciphers list with this one (e.g. "
                        "chacha20-poly1305@openssh.com, OpenSSH's default) to compare")
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples (300 queries, 60 connections, 32 MiB, 2 runs)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.connections, args.bulk_mib, args.runs = 300, 60, 32, 2
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.runs < 1 or min(args.clients) < 1 or args.bulk_mib < 1:
        parser.error("--runs, --clients and --bulk-mib must be positive")
    if os.geteuid() != 0:
        print("bench/datapath.py needs root (network namespaces)", file=sys.stderr)
        return 2
    interrupt_on_sigterm()
    lab = hub_lab(proxies=1, client_to_db=True)
    failed = True
    try:
        lab.open()
        lab.start_db(bind_all=True, max_connect_errors=1_000_000)
        bench = Bench(lab, args)
        bench.use_package(True)  # the proxy starts here too
        lab.start_lb([bench.hub.route], check="none", wait_up_s=None)
        started = time.monotonic()
        load_before = os.getloadavg()
        bench.run()
        print(bench.report())
        load = os.getloadavg()
        print(f"\n(measured in {time.monotonic() - started:.0f} s; load average at the start "
              f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, at the end "
              f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs; ciphers offered: "
              f"{bench.ciphers})")
        if args.json:
            args.json.write_text(json.dumps({
                "latency": [asdict(r) for r in bench.results],
                "bulk": [{**asdict(r), "ratio": r.ratio} for r in bench.bulk_results],
                "cpu": [asdict(c) for c in bench.profiles],
                "ciphers": bench.ciphers, "load_start": load_before, "load_end": load,
            }, indent=2))
        failed = False
    finally:
        if failed:
            print(lab.logs_report(), file=sys.stderr)
        for error in lab.close(failed=failed):
            print(error, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
