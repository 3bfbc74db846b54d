"""Figures for the per-route health endpoint (tunnelhub/userdata/files/tunnelhub_health.py).

    python bench/health_bench.py           # loopback fakes only (about 15 s)
    python bench/health_bench.py --real    # also real MariaDB and PostgreSQL (root, ~20 s more)

Prints, for the record (no pass/fail):
1. check latency per probe mode against the loopback fakes (and real servers with --real);
2. HTTP answer latency while the route's check hangs on a silent target;
3. checks per second reaching the target while 10 HTTP probers hammer the endpoint,
   against the configured 1/interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tunnelhub" / "userdata" / "files"), str(REPO / "tests" / "unit")]

import tunnelhub_health as health  # noqa: E402
from test_health_fakes import FakeServer, make_certificate  # noqa: E402


def _route(mode: str, port: int, interval_s: float = 1.0, timeout_s: float = 2.0, **probe) -> health.Route:
    raw = {"name": "bench", "kind": "tunnel", "host": "127.0.0.1", "port": port,
           "probe": {"mode": mode, "interval_s": interval_s, "timeout_s": timeout_s, **probe}}
    return health.parse_config({"port": 8080, "routes": [raw]}).routes[0]


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
    return f"median {statistics.median(values) * 1000:7.2f} ms  p95 {p95 * 1000:7.2f} ms  max {values[-1] * 1000:7.2f} ms"


def check_latency(certificate, rounds: int) -> None:
    print(f"1. check latency against loopback fakes ({rounds} checks per mode)")
    for mode in health.PROBE_MODES:
        extra = {"settle_s": 0.05} if mode == "connect" else {}
        with FakeServer(mode, certificate=certificate) as server:
            route = _route(mode, server.port, **extra)
            results = [health.run_check(route) for _ in range(rounds)]
        assert all(r.healthy for r in results), results[-1]
        note = " (includes the 0.05 s settle window)" if mode == "connect" else ""
        print(f"   {mode:<11} {_ms([r.latency_s for r in results])}{note}")


def real_latency(rounds: int) -> None:
    import test_health_real as real

    print(f"   real servers ({rounds} checks each):")
    bindir = real._postgres_bindir()
    if bindir is not None:
        workdir = Path(tempfile.mkdtemp(prefix="hh-pg-"))
        server = real.PostgreSQL(workdir, bindir)
        try:
            server.start()
            for ssl_on in (True, False):
                server.set_ssl(ssl_on)
                results = [health.run_check(server.route()) for _ in range(rounds)]
                assert all(r.healthy for r in results), results[-1]
                label = "postgresql TLS" if ssl_on else "postgresql 'N'"
                print(f"   {label:<15} {_ms([r.latency_s for r in results])}  (PostgreSQL forks a backend per connection)")
        finally:
            server.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    workdir = Path(tempfile.mkdtemp(prefix="hh-mdb-"))
    server = real.MariaDB(workdir)
    try:
        server.start()
        results = server.run_checks(rounds)
        assert all(r["healthy"] for r in results), results[-1]
        print(f"   {'mysql MariaDB':<15} {_ms([r['latency_ms'] / 1000 for r in results])}")
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _get(port: int, path: str) -> tuple[int, float]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    return response.status, time.perf_counter() - started


def _daemon(route: health.Route) -> health.HealthDaemon:
    config = health.Config(listen_address="127.0.0.1", port=0, routes=(route,))
    daemon = health.HealthDaemon(dataclasses.replace(config))
    daemon.start()
    return daemon


def http_under_hanging_check(requests: int) -> None:
    print(f"2. HTTP answer latency while every check hangs 2.0 s on a silent target ({requests} requests)")
    with FakeServer("mysql", behaviour="hang") as server:
        daemon = _daemon(_route("mysql", server.port, interval_s=0.5, timeout_s=2.0))
        try:
            while server.connections == 0:
                time.sleep(0.01)
            answers = [_get(daemon.port, "/routes/bench") for _ in range(requests)]
        finally:
            daemon.stop()
    codes = sorted({code for code, _ in answers})
    print(f"   status {codes}  {_ms([elapsed for _, elapsed in answers])}")


def probe_fan_in(probers: int, interval_s: float, window_s: float) -> None:
    print(f"3. target load with {probers} concurrent HTTP probers, interval_s {interval_s}, {window_s:g} s window")
    with FakeServer("banner") as server:
        daemon = _daemon(_route("banner", server.port, interval_s=interval_s))
        try:
            while server.connections == 0:
                time.sleep(0.01)
            stop = threading.Event()
            answered: list[float] = []

            def prober() -> None:
                while not stop.is_set():
                    answered.append(_get(daemon.port, "/routes/bench")[1])

            threads = [threading.Thread(target=prober) for _ in range(probers)]
            before = server.connections
            started = time.monotonic()
            for thread in threads:
                thread.start()
            time.sleep(window_s)
            stop.set()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
            hits = server.connections - before
        finally:
            daemon.stop()
    print(f"   HTTP probes answered: {len(answered) / elapsed:8.1f} /s  ({_ms(answered)})")
    print(f"   checks reaching the target: {hits / elapsed:5.2f} /s  (1/interval = {1 / interval_s:.2f} /s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real", action="store_true", help="also time checks against real MariaDB/PostgreSQL (root)")
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hh-bench-") as tmp:
        certificate = make_certificate(Path(tmp))
        check_latency(certificate, args.rounds)
    if args.real:
        real_latency(args.rounds)
    http_under_hanging_check(500)
    probe_fan_in(probers=10, interval_s=0.5, window_s=5.0)


if __name__ == "__main__":
    main()
