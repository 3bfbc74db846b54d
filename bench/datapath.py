#!/usr/bin/env python3
"""Data-path benchmark: direct to MariaDB vs through what tunnelhub ships, with and without quick-ACK.

Runs in the e2e lab's namespaces laid out as a hub (``nslab.hub``, needs root): one proxy running
its rendered cloud-init (HAProxy data plane, sshd with the generated drop-in), the on-prem
package's unit (``ssh -R`` under autossh, built by ``build_deb``) on the tunnel host behind a
gateway, MariaDB on the tunnel host's LAN, the LB (HAProxy, TCP mode, no checks) and the client,
plus a client-db link for the direct baseline. Measured, for each path:

- small-query round trip: median and p99 of ``--queries`` ``SELECT 1`` over one connection;
- new-connection setup: time from ``connect()`` to the server's first byte (the MySQL greeting)
  on a fresh connection, ``--connections`` back to back (median, p95, p99), and a sixth as many
  100 ms apart; plus a full login (connect, greeting, authentication) back to back;
- bulk transfer: a ``--bulk-mib`` MiB result read as raw MySQL packets (PyMySQL's row decoding
  would cap it), compared with a direct run measured right before and after (the load drifts).

Paths: direct (client -> MariaDB); tunnel (inside the proxy -> the ``ssh -R`` listener);
proxy NIC (LB namespace -> proxy HAProxy -> tunnel); full (client -> LB -> proxy -> tunnel).
The tunnel paths run twice: the package built with ``onprem.tcp_quickack: true`` (its
ExecStartPre adds the quick-ACK host route) and with ``false``. The ratios are printed against
the issue's targets: bulk >= 0.5x direct, added round trip <= 250 us, added setup <= 5 ms.

    python3 bench/datapath.py                # everything (~3 minutes)
    python3 bench/datapath.py --quick        # fewer samples (the targets' minimums are not met)
    python3 bench/datapath.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass
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
TARGET_BULK_RATIO = 0.5
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
    bulk_mib_s: float = 0.0
    bulk_direct_mib_s: float = 0.0  # direct, measured right before and after (load drifts)


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


def measure_bulk(endpoint: Endpoint, mib: int) -> float:
    """MiB/s of a ``mib`` MiB result, read off the socket without decoding rows.

    PyMySQL logs in; the query is then sent and its result read as raw MySQL packets (headers
    parsed, payloads counted), so the figure is the data path's, not PyMySQL's row decoding
    (which caps near 130 MiB/s on this machine).
    """
    conn = endpoint.connect()
    try:
        raw_query(conn, "SELECT REPEAT('x', 1048576) FROM seq_1_to_2")
        t0 = time.perf_counter()
        received = raw_query(conn, f"SELECT REPEAT('x', 1048576) FROM seq_1_to_{mib}")
        elapsed = time.perf_counter() - t0
    finally:
        conn.close()
    if received < mib * 1048576:
        raise LabError(f"bulk result has {received} bytes, expected at least {mib} MiB")
    return mib / elapsed


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


class Bench:
    def __init__(self, lab: Lab, args: argparse.Namespace) -> None:
        self.lab = lab
        self.args = args
        self.results: list[Measure] = []
        self.hub: GeneratedHub | None = None

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
        direct = self.endpoint("client", self.lab.topology.ip("db", "client"), DB_PORT)
        before = measure_bulk(direct, a.bulk_mib)
        bulk = measure_bulk(self.endpoint(node, host, port), a.bulk_mib)
        after = measure_bulk(direct, a.bulk_mib)
        result = Measure(label, rtt_med, rtt_p99, c_med, c_p95, c_p99, spaced, l_med, l_p95, bulk,
                         (before + after) / 2)
        self.results.append(result)
        print(f"  {label:<40} rtt {rtt_med:6.3f} ms (p99 {rtt_p99:6.3f})  connect {c_med:6.2f} ms "
              f"(p95 {c_p95:6.2f}, p99 {c_p99:6.2f}, spaced {spaced:5.2f})  login {l_med:6.2f} ms "
              f"(p95 {l_p95:6.2f})  bulk {bulk:6.1f} MiB/s (direct {result.bulk_direct_mib_s:.1f})", flush=True)
        return result

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
        hub.start_tunnel(PROXY)
        lab.wait_tunnel_listener(PROXY, timeout_s=30)
        routes = lab.topology.exec("onprem", ["ip", "route", "show", "proto", "84"]).stdout
        if ("quickack 1" in routes) != tcp_quickack:
            raise LabError(f"quick-ACK route {'missing' if tcp_quickack else 'present'}: {routes!r}")
        print(f"tunnel host routes to the proxy (proto 84): {routes.strip() or 'none'}", flush=True)

    def run(self) -> None:
        lab = self.lab
        topo = lab.topology
        print("direct", flush=True)
        self.measure("direct: client -> MariaDB", "client", topo.ip("db", "client"), DB_PORT)
        for quickack in (True, False):
            if self.hub is None or self.hub.tcp_quickack != quickack:
                self.use_package(quickack)
            tag = "quick-ACK" if quickack else "no quick-ACK"
            print(f"package built with onprem.tcp_quickack: {str(quickack).lower()}", flush=True)
            self.measure(f"tunnel ({tag})", PROXY, "127.0.0.1", TUNNEL_PORT)
            self.measure(f"proxy NIC ({tag})", "lb", topo.ip(PROXY, "lb"), ROUTE_PORT)
            self.measure(f"full: LB -> proxy -> tunnel ({tag})", "client", topo.ip("lb", "client"), ROUTE_PORT)

    def report(self) -> str:
        direct = self.results[0]
        lines = ["", "| path | SELECT 1 median (p99) ms | added median µs | first byte, median (p95) ms "
                 "| added ms | 100 ms apart, median ms | login median (p95) ms | bulk MiB/s "
                 "| bulk vs direct beside it |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in self.results:
            lines.append(
                f"| {r.path} | {r.rtt_median_ms:.3f} ({r.rtt_p99_ms:.3f}) | "
                f"{(r.rtt_median_ms - direct.rtt_median_ms) * 1000:+.0f} | "
                f"{r.connect_median_ms:.2f} ({r.connect_p95_ms:.2f}) | "
                f"{r.connect_median_ms - direct.connect_median_ms:+.2f} | "
                f"{r.connect_spaced_median_ms:.2f} | {r.login_median_ms:.2f} ({r.login_p95_ms:.2f}) | "
                f"{r.bulk_mib_s:.0f} | {r.bulk_mib_s / r.bulk_direct_mib_s:.2f}x |")
        lines += ["", "Against the issue's targets (full path vs direct):"]
        for r in self.results:
            if not r.path.startswith("full"):
                continue
            added_rtt_us = (r.rtt_median_ms - direct.rtt_median_ms) * 1000
            added_connect = r.connect_median_ms - direct.connect_median_ms
            ratio = r.bulk_mib_s / r.bulk_direct_mib_s
            lines.append(
                f"- {r.path}: added round trip {added_rtt_us:+.0f} µs (target <= {TARGET_ADDED_RTT_US}: "
                f"{'met' if added_rtt_us <= TARGET_ADDED_RTT_US else 'MISSED'}); added setup "
                f"{added_connect:+.2f} ms (target <= {TARGET_ADDED_CONNECT_MS:.0f}: "
                f"{'met' if added_connect <= TARGET_ADDED_CONNECT_MS else 'MISSED'}); bulk {ratio:.2f}x direct "
                f"(target >= {TARGET_BULK_RATIO}: {'met' if ratio >= TARGET_BULK_RATIO else 'MISSED'})")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--bulk-mib", type=int, default=64)
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples (300 queries, 60 connections, 16 MiB)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.connections, args.bulk_mib = 300, 60, 16
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
        bench.run()
        print(bench.report())
        load = os.getloadavg()
        print(f"\n(measured in {time.monotonic() - started:.0f} s; load average at the end "
              f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs)")
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in bench.results], indent=2))
        failed = False
    finally:
        if failed:
            print(lab.logs_report(), file=sys.stderr)
        for error in lab.close(failed=failed):
            print(error, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
