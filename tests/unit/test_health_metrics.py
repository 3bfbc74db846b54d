"""``GET /metrics`` of the health daemon (tunnelhub/userdata/files/tunnelhub_health.py).

Every exposition is parsed back with the Prometheus project's own text-format parser
(``prometheus_client.parser.text_string_to_metric_families``, prometheus_client 0.26.0), never
matched as strings: a line the parser rejects, a wrong type or a stray label fails here. The
format is https://prometheus.io/docs/instrumenting/exposition_formats/ (text 0.0.4).

The HAProxy part is faked by a Unix-socket HTTP server that answers what HAProxy 2.6's exporter
answers (family names, ``proxy`` label, HELP/TYPE lines as in addons/promex/service-prometheus.c
and as read from Debian 12's haproxy 2.6.12 here); tests/unit/test_userdata_haproxy.py reads the
real one.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
FILES = HERE.parents[1] / "tunnelhub" / "userdata" / "files"
sys.path[:0] = [str(FILES), str(HERE)]

import tunnelhub_health as health  # noqa: E402
from test_health_fakes import FakeServer, free_port, hammer, route, wait_until  # noqa: E402

from tunnelhub.userdata import layout as L  # noqa: E402

ROUTE_FAMILIES = {
    "tunnelhub_route_info": "gauge",
    "tunnelhub_route_up": "gauge",
    "tunnelhub_route_check_latency_seconds": "gauge",
    "tunnelhub_route_last_check_age_seconds": "gauge",
    "tunnelhub_route_consecutive_failures": "gauge",
    "tunnelhub_route_state_changes": "counter",  # the parser drops _total from a counter's family name
    "tunnelhub_route_checks": "counter",
    "tunnelhub_route_last_failure_reason": "gauge",
    "tunnelhub_config_info": "gauge",
}

# What HAProxy 2.6's exporter answers for ``/metrics?scope=frontend&scope=backend`` (abridged: a
# few of its ~60 families per proxy), for two routes and the exporter's own frontend.
PROMEX_ANSWER = """\
# HELP haproxy_frontend_current_sessions Number of current sessions on the frontend, backend or server
# TYPE haproxy_frontend_current_sessions gauge
haproxy_frontend_current_sessions{proxy="r1"} 3
haproxy_frontend_current_sessions{proxy="r2"} 0
haproxy_frontend_current_sessions{proxy="tunnelhub_metrics"} 1
# HELP haproxy_frontend_limit_sessions Total number of sessions since process started
# TYPE haproxy_frontend_limit_sessions gauge
haproxy_frontend_limit_sessions{proxy="r1"} 100
haproxy_frontend_limit_sessions{proxy="r2"} 50
haproxy_frontend_limit_sessions{proxy="tunnelhub_metrics"} 10
# HELP haproxy_frontend_sessions_total Total number of sessions since process started
# TYPE haproxy_frontend_sessions_total counter
haproxy_frontend_sessions_total{proxy="r1"} 41
haproxy_frontend_sessions_total{proxy="r2"} 7
haproxy_frontend_sessions_total{proxy="tunnelhub_metrics"} 12
# HELP haproxy_frontend_bytes_in_total Total number of request bytes since process started
# TYPE haproxy_frontend_bytes_in_total counter
haproxy_frontend_bytes_in_total{proxy="r1"} 123456
# HELP haproxy_frontend_status Current status of the service, per state label value.
# TYPE haproxy_frontend_status gauge
haproxy_frontend_status{proxy="r1",state="DOWN"} 0
haproxy_frontend_status{proxy="r1",state="UP"} 1
# HELP haproxy_backend_current_queue Number of current queued connections
# TYPE haproxy_backend_current_queue gauge
haproxy_backend_current_queue{proxy="r1"} 2
haproxy_backend_current_queue{proxy="r2"} 0
# HELP haproxy_backend_current_sessions Number of current sessions on the frontend, backend or server
# TYPE haproxy_backend_current_sessions gauge
haproxy_backend_current_sessions{proxy="r1"} 1
haproxy_backend_current_sessions{proxy="r2"} 0
# HELP haproxy_backend_sessions_total Total number of sessions since process started
# TYPE haproxy_backend_sessions_total counter
haproxy_backend_sessions_total{proxy="r1"} 40
haproxy_backend_sessions_total{proxy="r2"} 7
# HELP haproxy_backend_connection_errors_total Total number of failed connections to server since the worker process started
# TYPE haproxy_backend_connection_errors_total counter
haproxy_backend_connection_errors_total{proxy="r1"} 0
haproxy_backend_connection_errors_total{proxy="r2"} 5
# HELP haproxy_backend_connect_time_average_seconds Avg. connect time for last 1024 successful connections.
# TYPE haproxy_backend_connect_time_average_seconds gauge
haproxy_backend_connect_time_average_seconds{proxy="r1"} 0.001000
haproxy_backend_connect_time_average_seconds{proxy="r2"} 0.000000
# HELP haproxy_backend_agg_check_status Backend's aggregated gauge of servers' state check status
# TYPE haproxy_backend_agg_check_status gauge
haproxy_backend_agg_check_status{proxy="r1",state="L4OK"} 0
"""


def config(*routes: dict, version: str = "v7") -> health.Config:
    parsed = health.parse_config({"listen_address": "127.0.0.1", "port": 8080, "routes": list(routes),
                                  "config_version": version})
    return dataclasses.replace(parsed, port=0)


def get(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()
    finally:
        conn.close()


def scrape(port: int) -> dict:
    """GET /metrics parsed: {family name: Metric}; the parser raises on any malformed line."""
    status, content_type, text = get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4"), (status, content_type)
    families = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"family {family.name} twice"
        families[family.name] = family
    return families


def values(families: dict, name: str) -> dict[tuple, float]:
    """{sorted label items: value} for one family (counters: the ``_total`` sample)."""
    return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples
            if not s.name.endswith("_created")}


def by_route(families: dict, name: str) -> dict[str, float]:
    out = {}
    for labels, value in values(families, name).items():
        assert dict(labels).keys() == {"route"}, (name, labels)
        out[dict(labels)["route"]] = value
    return out


def reasons(families: dict, route_name: str) -> dict[str, float]:
    return {dict(labels)["reason"]: value for labels, value in values(families, "tunnelhub_route_last_failure_reason").items()
            if dict(labels)["route"] == route_name}


class FakeExporter:
    """A Unix-socket HTTP server answering like HAProxy's exporter; counts requests.
    ``hang=True`` accepts and never answers (a wedged HAProxy)."""

    def __init__(self, path: Path, body: str = PROMEX_ANSWER, hang: bool = False):
        self.path, self.body, self.hang = str(path), body.encode(), hang
        self.requests: list[str] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(64)
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                conn.close()
                return
            request += chunk
        self.requests.append(request.split(b"\r\n", 1)[0].decode())
        if self.hang:
            self._held.append(conn)
            return
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(self.body[i:i + 4000]), self.body[i:i + 4000])
                          for i in range(0, len(self.body), 4000))
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n"
                     b"transfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
        conn.close()

    def close(self) -> None:
        self._listener.close()
        for conn in self._held:
            conn.close()


@pytest.fixture
def start(tmp_path):
    started: list[health.HealthDaemon] = []

    def run(*routes: dict, check=health.run_check, haproxy: str | None = None) -> tuple[health.HealthDaemon, int]:
        daemon = health.HealthDaemon(config(*routes), check=check,
                                     host_key_status=str(tmp_path / "no-host-key.json"), haproxy_metrics=haproxy)
        daemon.start()
        started.append(daemon)
        return daemon, daemon.port

    yield run
    for daemon in started:
        daemon.stop()


def test_the_exposition_parses_with_its_types_labels_and_the_route_state(start):
    with FakeServer("banner") as server:
        daemon, port = start(route("banner", server.port, name="up-route"),
                             route("connect", free_port(), name="down-route"))
        wait_until(lambda: all(c.rounds >= 2 for c in daemon.checkers.values()), what="two checks of each route")
        families = scrape(port)
    for name, kind in ROUTE_FAMILIES.items():
        assert families[name].type == kind, name
    assert "tunnelhub_haproxy_up" not in families  # no HAProxy socket configured: that part is left out
    assert by_route(families, "tunnelhub_route_up") == {"up-route": 1.0, "down-route": 0.0}
    failures = by_route(families, "tunnelhub_route_consecutive_failures")
    assert failures["up-route"] == 0 and failures["down-route"] >= 2
    assert by_route(families, "tunnelhub_route_state_changes") == {"up-route": 0.0, "down-route": 0.0}
    assert all(v >= 2 for v in by_route(families, "tunnelhub_route_checks").values())
    latency = by_route(families, "tunnelhub_route_check_latency_seconds")
    assert 0 < latency["up-route"] < 0.5 and 0 < latency["down-route"] < 0.5
    assert all(0 <= v < 1 for v in by_route(families, "tunnelhub_route_last_check_age_seconds").values())
    info = {dict(k)["route"]: dict(k) for k in values(families, "tunnelhub_route_info")}
    assert info["up-route"] == {"route": "up-route", "kind": "tunnel", "mode": "banner"}
    assert values(families, "tunnelhub_config_info") == {(("config_version", "v7"),): 1.0}
    # the reason is a state set over the fixed enum: every class present, exactly one set
    for name, expected in (("up-route", "none"), ("down-route", "no_tunnel")):
        got = reasons(families, name)
        assert list(got) == list(health.FAILURE_REASONS), got
        assert [k for k, v in got.items() if v == 1.0] == [expected], got


def test_a_route_going_down_flips_up_and_counts_a_state_change(start):
    with FakeServer("banner") as server:
        target = server.port
        daemon, port = start(route("banner", target, interval_s=0.1))
        wait_until(lambda: by_route(scrape(port), "tunnelhub_route_up") == {"r1": 1.0}, what="up")
    # two failures: a check caught in the listener's backlog when it closed fails "closed" (reset) first
    families = wait_until(lambda: (f := scrape(port)) and by_route(f, "tunnelhub_route_up")["r1"] == 0.0
                          and by_route(f, "tunnelhub_route_consecutive_failures")["r1"] >= 2 and f,
                          what="up 0 and two failed checks after the target stopped")
    assert by_route(families, "tunnelhub_route_state_changes") == {"r1": 1.0}
    assert [k for k, v in reasons(families, "r1").items() if v == 1.0] == ["no_tunnel"]
    with FakeServer("banner", port=target):  # back: up again, a second change, the last failure kept
        families = wait_until(lambda: (f := scrape(port)) and by_route(f, "tunnelhub_route_up")["r1"] == 1.0 and f,
                              what="up 1 after the target came back")
    assert by_route(families, "tunnelhub_route_state_changes") == {"r1": 2.0}
    assert by_route(families, "tunnelhub_route_consecutive_failures") == {"r1": 0.0}
    assert [k for k, v in reasons(families, "r1").items() if v == 1.0] == ["no_tunnel"]


@pytest.mark.parametrize("case, expected", [
    ("tunnel-refused", "no_tunnel"), ("forward-refused", "connect_refused"), ("close", "closed"),
    ("hang", "timeout"), ("wrong-protocol", "protocol"), ("dns", "dns"),
])
def test_every_failure_maps_to_one_class_of_the_fixed_set(case, expected, monkeypatch):
    def result(mode, port, **kw):
        return health.run_check(config(route(mode, port, **kw)).routes[0])

    if case == "tunnel-refused":
        got = result("connect", free_port())
    elif case == "forward-refused":
        got = result("connect", free_port(), kind="forward")
    elif case == "dns":
        def fail(*_a, **_k):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        monkeypatch.setattr(health.socket, "getaddrinfo", fail)
        got = result("connect", 5432, kind="forward", host="db.invalid")
    else:
        behaviour = {"close": "close", "hang": "hang", "wrong-protocol": "answer"}[case]
        with FakeServer("banner", behaviour=behaviour) as server:
            got = result("sqlserver" if case == "wrong-protocol" else "banner", server.port)  # SSH banner: no TDS
    assert not got.healthy and got.failure == expected, got
    assert expected in health.FAILURE_REASONS


def test_a_crashed_check_is_other_and_a_stuck_checker_is_stale(start):
    release = threading.Event()
    calls = {"stuck": 0}

    def check(r, _resolver):
        if r.name == "crash":
            raise RuntimeError("bug")
        calls["stuck"] += 1
        if calls["stuck"] > 1:
            release.wait(10)  # the second check never ends: the first result goes stale
        return health.CheckResult(healthy=True, reason="fine", latency_s=0.001, finished_at=time.monotonic())

    try:
        _, port = start(route("connect", 1, name="crash"),
                        route("connect", 1, name="stuck", interval_s=0.1, timeout_s=0.1), check=check)
        families = wait_until(lambda: (f := scrape(port)) and by_route(f, "tunnelhub_route_up")["stuck"] == 0.0 and f,
                              what="the stuck route to go stale", timeout_s=5)
        assert [k for k, v in reasons(families, "crash").items() if v == 1.0] == ["other"]
        assert [k for k, v in reasons(families, "stuck").items() if v == 1.0] == ["stale"]
    finally:
        release.set()


def test_ten_concurrent_scrapers_add_no_check_to_the_target(start, tmp_path):
    """The checks a target sees are one per interval whatever the scrape rate, and the scrapers
    share HAProxy reads (at most one per HAPROXY_SCRAPE_MIN_AGE_S)."""
    interval, window = 0.25, 3.0
    exporter = FakeExporter(tmp_path / "promex.sock")
    try:
        with FakeServer("banner") as server:
            daemon, port = start(route("banner", server.port, interval_s=interval), haproxy=exporter.path)
            wait_until(lambda: daemon.checkers["r1"].rounds >= 1, what="the first check")
            before, reads_before = server.connections, len(exporter.requests)
            scrapes = hammer(lambda: by_route(scrape(port), "tunnelhub_route_up")["r1"], seconds=window)
            hits = server.connections - before
            reads = len(exporter.requests) - reads_before
    finally:
        exporter.close()
    expected = window / interval  # 12 checks in 3 s, whatever the scrape rate
    assert len(scrapes) > 5 * expected, "the scrapes must outnumber the checks for this test to mean anything"
    assert expected - 2 <= hits <= expected + 2, (hits, len(scrapes))
    assert set(scrapes) == {1.0}
    assert reads <= window / health.HAPROXY_SCRAPE_MIN_AGE_S + 2, reads
    print(f"{len(scrapes)} scrapes by 10 threads in {window} s: {hits} checks at the target, {reads} HAProxy reads")


def test_haproxy_figures_are_reserved_per_route_and_filtered(start, tmp_path):
    exporter = FakeExporter(tmp_path / "promex.sock")
    try:
        daemon, port = start(route("connect", free_port(), name="r1"), route("connect", free_port(), name="r2"),
                             haproxy=exporter.path)
        families = scrape(port)
    finally:
        exporter.close()
    assert exporter.requests == ["GET /metrics?scope=frontend&scope=backend HTTP/1.1"]
    assert values(families, "tunnelhub_haproxy_up") == {(): 1.0}
    assert families["tunnelhub_haproxy_scrape_duration_seconds"].type == "gauge"
    haproxy = {name: f for name, f in families.items() if name.startswith("haproxy_")}
    expected = {n.removesuffix("_total"): t for n, t in health.HAPROXY_FAMILIES.items()}
    assert {n: f.type for n, f in haproxy.items()} == expected
    assert by_route(families, "haproxy_frontend_current_sessions") == {"r1": 3.0, "r2": 0.0}  # not the exporter's own
    assert by_route(families, "haproxy_frontend_sessions") == {"r1": 41.0, "r2": 7.0}
    assert by_route(families, "haproxy_backend_connection_errors") == {"r1": 0.0, "r2": 5.0}
    assert by_route(families, "haproxy_backend_current_queue") == {"r1": 2.0, "r2": 0.0}
    assert by_route(families, "haproxy_backend_connect_time_average_seconds") == {"r1": 0.001, "r2": 0.0}
    assert families["haproxy_backend_current_queue"].documentation == "Number of current queued connections"


@pytest.mark.parametrize("trouble", ["no-socket", "hangs"])
def test_a_haproxy_that_does_not_answer_leaves_the_route_metrics_and_the_probes_alone(start, tmp_path, trouble):
    path = tmp_path / "promex.sock"
    exporter = FakeExporter(path, hang=True) if trouble == "hangs" else None
    try:
        daemon, port = start(route("connect", free_port()), haproxy=str(path))
        wait_until(lambda: daemon.checkers["r1"].rounds >= 1, what="the first check")
        answers = []

        def probe_meanwhile():
            for _ in range(10):
                began = time.monotonic()
                answers.append((get(port, "/routes/r1")[0], time.monotonic() - began))

        prober = threading.Thread(target=probe_meanwhile)
        began = time.monotonic()
        prober.start()
        families = scrape(port)
        took = time.monotonic() - began
        prober.join(10)
    finally:
        if exporter:
            exporter.close()
    assert values(families, "tunnelhub_haproxy_up") == {(): 0.0}
    assert by_route(families, "tunnelhub_route_up") == {"r1": 0.0}
    assert not [n for n in families if n.startswith("haproxy_")]
    assert took < health.HAPROXY_SCRAPE_TIMEOUT_S + 1.0, took  # bounded by the read timeout
    assert len(answers) == 10 and all(code == 503 and t < 0.5 for code, t in answers), answers


def test_the_daemon_reads_the_socket_the_routes_file_binds():
    assert health.DEFAULT_HAPROXY_METRICS == L.HAPROXY_METRICS_SOCKET
    assert os.path.dirname(L.HAPROXY_METRICS_SOCKET) == "/run/haproxy"  # Debian's haproxy runtime directory
