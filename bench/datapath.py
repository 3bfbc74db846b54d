#!/usr/bin/env python3
"""Data-path benchmark: direct to MariaDB vs through LB -> proxy -> reverse SSH tunnel.

Runs in the e2e lab's namespaces (needs root): one proxy, the LB (HAProxy, TCP mode, no
checks), the client, MariaDB in ``db``, and a direct client-db link for the baseline. Measures,
in one run, for each path:

- small-query round trip: median and p99 of ``--queries`` ``SELECT 1`` over one connection;
- new-connection setup: time from ``connect()`` to the server's first byte (the MySQL
  greeting) on a fresh connection, ``--connections`` times (median, p95, p99);
- bulk transfer: a ``--bulk-mib`` MiB result (``SELECT REPEAT('x', 1 MiB) FROM seq_1_to_N``).

The proxy data plane is pluggable (the reference's socat, socat with ``nodelay``, HAProxy in
TCP mode) and so is the tunnel (ssh options: cipher, compression, and TCP quick-ACK on the
tunnel's routes to test the Nagle/delayed-ACK interplay). Segments are measured separately
(tunnel alone from inside the proxy, bridge + tunnel from the LB, the full path from the
client) to show where the time goes.

    python3 bench/datapath.py                # everything (a few minutes)
    python3 bench/datapath.py --quick        # fewer samples
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from nslab.client import Endpoint  # noqa: E402
from nslab.haproxy import Haproxy, LbRoute, data_plane_config  # noqa: E402
from nslab.lab import DB_PORT, TUNNEL_PORT, Lab  # noqa: E402
from nslab.netns import in_netns  # noqa: E402
from nslab.proc import LabError, interrupt_on_sigterm  # noqa: E402
from nslab.unit import ServiceRunner, UnitCommand  # noqa: E402

PROXY = "proxy1"
NIC_PORT = 3306


@dataclass
class Measure:
    path: str
    rtt_median_ms: float = 0.0
    rtt_p99_ms: float = 0.0
    connect_median_ms: float = 0.0
    connect_p95_ms: float = 0.0
    connect_p99_ms: float = 0.0
    connect_spaced_median_ms: float = 0.0
    bulk_mib_s: float = 0.0
    bulk_direct_mib_s: float = 0.0  # direct, measured right before and after (load drifts)
    notes: dict = field(default_factory=dict)


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
        self.tunnel: ServiceRunner | None = None
        self.bridge: ServiceRunner | Haproxy | None = None

    # -- building blocks ---------------------------------------------------------------------------

    def endpoint(self, node: str, host: str, port: int) -> Endpoint:
        db = self.lab.db
        assert db is not None
        return Endpoint(netns=self.lab.topology.ns(node), host=host, port=port,
                        user=db.app_user, password=db.app_password, database=db.app_database,
                        read_timeout_s=60)

    def measure(self, label: str, node: str, host: str, port: int, **notes: str) -> Measure:
        a = self.args
        rtt_med, rtt_p99 = measure_rtt(self.endpoint(node, host, port), a.queries)
        c_med, c_p95, c_p99 = measure_connect(self.lab.topology.ns(node), host, port,
                                              a.connections)
        spaced, _, _ = measure_connect(self.lab.topology.ns(node), host, port,
                                       max(10, a.connections // 6), gap_s=0.1)
        direct = self.endpoint("client", self.lab.topology.ip("db", "client"), DB_PORT)
        before = measure_bulk(direct, a.bulk_mib)
        bulk = measure_bulk(self.endpoint(node, host, port), a.bulk_mib)
        after = measure_bulk(direct, a.bulk_mib)
        result = Measure(label, rtt_med, rtt_p99, c_med, c_p95, c_p99, spaced, bulk,
                         (before + after) / 2, dict(notes))
        self.results.append(result)
        print(f"  {label:<48} rtt {rtt_med:6.3f} ms (p99 {rtt_p99:6.3f})  "
              f"connect {c_med:6.2f} ms (p95 {c_p95:6.2f}, p99 {c_p99:6.2f}, "
              f"spaced {spaced:6.2f})  "
              f"bulk {bulk:7.1f} MiB/s (direct {result.bulk_direct_mib_s:.1f})", flush=True)
        return result

    def start_tunnel(self, name: str, ssh_options: list[str], *, quickack: str = "none") -> None:
        self.stop_tunnel()
        lab = self.lab
        key, _ = lab.key("bench_ed25519")
        known_hosts = lab.path("onprem", "bench_known_hosts")
        known_hosts.parent.mkdir(parents=True, exist_ok=True)
        known_hosts.write_text(lab.known_hosts())
        self.set_quickack(quickack)
        argv = ["/usr/bin/ssh", "-F", "none", "-N", "-i", str(key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "ExitOnForwardFailure=yes",
                *ssh_options, "-R", f"localhost:{TUNNEL_PORT}:{lab.db_host}:{DB_PORT}",
                f"{lab.tunnel_user}@{lab.topology.ip(PROXY, 'onprem')}"]
        command = UnitCommand(unit_name=f"bench-tunnel-{name}", argv=argv,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, restart="no")
        self.tunnel = ServiceRunner(command, netns=lab.topology.ns("onprem"),
                                    log_path=lab.log_dir / "bench-tunnel.log").start()
        lab.wait_tunnel_listener(PROXY, timeout_s=30)

    def stop_tunnel(self) -> None:
        if self.tunnel is not None:
            self.tunnel.stop()
            self.tunnel = None
            self.lab.wait_tunnel_listener(PROXY, present=False, timeout_s=30)

    def set_quickack(self, where: str) -> None:
        """TCP quick-ACK (no delayed ACKs) on the tunnel's routes: none, proxy, onprem, both."""
        topo = self.lab.topology
        for node, peer in (("onprem", PROXY), (PROXY, "onprem")):
            link = topo.link(node, peer)
            subnet = f"10.199.{link.index}.0/24"
            argv = ["ip", "route", "replace", subnet, "dev", topo.ifname(node, peer),
                    "proto", "kernel", "scope", "link", "src", topo.ip(node, peer)]
            if where in ("both", "proxy" if node == PROXY else "onprem"):
                argv += ["quickack", "1"]
            topo.exec(node, argv)

    def start_bridge(self, kind: str) -> None:
        self.stop_bridge()
        lab = self.lab
        ns = lab.topology.ns(PROXY)
        if kind in ("socat", "socat-nodelay"):
            opts = ",nodelay" if kind == "socat-nodelay" else ""
            argv = ["/usr/bin/socat", f"TCP-LISTEN:{NIC_PORT},bind=0.0.0.0,fork,reuseaddr{opts}",
                    f"TCP:localhost:{TUNNEL_PORT}{opts}"]
            command = UnitCommand(unit_name=f"bench-{kind}", argv=argv,
                                  env={"PATH": "/usr/bin:/bin"}, restart="no")
            self.bridge = ServiceRunner(command, netns=ns,
                                        log_path=lab.log_dir / "bench-bridge.log").start()
        elif kind == "haproxy":
            cfg = data_plane_config(routes=[(NIC_PORT, "127.0.0.1", TUNNEL_PORT)])
            self.bridge = Haproxy(config_text=cfg, workdir=lab.path(PROXY, "bench"), netns=ns,
                                  log_dir=lab.log_dir, name="bench-bridge-haproxy").start()
        else:
            raise LabError(f"unknown data plane {kind!r}: socat, socat-nodelay or haproxy")

        def listening() -> bool:
            out = lab.topology.exec(PROXY, ["ss", "-Htln", f"sport = :{NIC_PORT}"]).stdout
            return bool(out.strip())

        from nslab.proc import wait_until
        wait_until(listening, timeout_s=15, what=f"{kind} listening on :{NIC_PORT}")

    def stop_bridge(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> None:
        lab = self.lab
        topo = lab.topology
        proxy_ip_lb = topo.ip(PROXY, "lb")
        lb_ip = topo.ip("lb", "client")
        print("direct", flush=True)
        self.measure("direct: client -> MariaDB", "client", topo.ip("db", "client"), DB_PORT)

        tunnels: list[tuple[str, list[str], str]] = [
            ("ssh defaults", [], "none"),
            ("ssh -c aes128-gcm", ["-c", "aes128-gcm@openssh.com"], "none"),
            ("ssh Compression=yes", ["-o", "Compression=yes"], "none"),
            ("ssh IPQoS=lowdelay", ["-o", "IPQoS=lowdelay"], "none"),
            ("ssh defaults + quickack on onprem", [], "onprem"),
            ("ssh defaults + quickack on proxy", [], "proxy"),
            ("ssh defaults + quickack both", [], "both"),
        ]
        if self.args.quick:
            tunnels = [tunnels[0], tunnels[4]]
        print("tunnel only (from inside the proxy to the ssh -R listener)", flush=True)
        for name, options, quickack in tunnels:
            self.start_tunnel(name, options, quickack=quickack)
            self.measure(f"tunnel: {name}", PROXY, "127.0.0.1", TUNNEL_PORT)

        print("bridge + tunnel (from the LB namespace to the proxy NIC)", flush=True)
        combos: list[tuple[str, str, int]] = [("socat", "ssh defaults", 0),
                                              ("socat-nodelay", "ssh defaults", 0),
                                              ("haproxy", "ssh defaults", 0),
                                              ("socat", "ssh defaults + quickack on onprem", 0),
                                              ("haproxy", "ssh defaults + quickack on onprem", 0)]
        by_name = {t[0]: t for t in tunnels}
        for bridge, tunnel_name, _ in combos:
            if tunnel_name not in by_name:
                continue
            name, options, quickack = by_name[tunnel_name]
            self.start_tunnel(name, options, quickack=quickack)
            self.start_bridge(bridge)
            self.measure(f"bridge: {bridge} + {name}", "lb", proxy_ip_lb, NIC_PORT)
            self.measure(f"full: LB -> {bridge} + {name}", "client", lb_ip, NIC_PORT)
        self.stop_bridge()
        self.stop_tunnel()

    def report(self) -> str:
        direct = self.results[0]
        lines = ["", "| path | SELECT 1 median (p99) ms | added median µs | connect median "
                 "(p95) ms | added connect ms | connect 100 ms apart, median ms | bulk MiB/s "
                 "| bulk vs direct measured beside it |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.results:
            lines.append(
                f"| {r.path} | {r.rtt_median_ms:.3f} ({r.rtt_p99_ms:.3f}) | "
                f"{(r.rtt_median_ms - direct.rtt_median_ms) * 1000:+.0f} | "
                f"{r.connect_median_ms:.2f} ({r.connect_p95_ms:.2f}) | "
                f"{r.connect_median_ms - direct.connect_median_ms:+.2f} | "
                f"{r.connect_spaced_median_ms:.2f} | {r.bulk_mib_s:.0f} | "
                f"{r.bulk_mib_s / r.bulk_direct_mib_s:.2f}x |")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--bulk-mib", type=int, default=64)
    parser.add_argument("--quick", action="store_true",
                        help="fewer variants and samples (300 queries, 60 connections, 50 MiB)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.connections, args.bulk_mib = 300, 60, 50
    if os.geteuid() != 0:
        print("bench/datapath.py needs root (network namespaces)", file=sys.stderr)
        return 2
    interrupt_on_sigterm()
    lab = Lab(proxies=1, client_to_db=True)
    failed = True
    try:
        lab.open()
        lab.start_db(bind_all=True, max_connect_errors=1_000_000)
        _, pub = lab.key("bench_ed25519")
        keys = lab.path(PROXY, "bench_authorized_keys")
        keys.parent.mkdir(parents=True, exist_ok=True)
        keys.write_text(pub + "\n")
        import pwd
        user = pwd.getpwnam(lab.tunnel_user)
        os.chown(keys, user.pw_uid, user.pw_gid)
        os.chmod(keys, 0o600)
        lab.start_sshd(PROXY, authorized_keys=keys)
        lab.start_lb([LbRoute("mysql", NIC_PORT)], check="none", wait_up_s=None)
        bench = Bench(lab, args)
        bench.run()
        print(bench.report())
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
