"""The health daemon with several tunnel hosts per route (issue 15), in-process against fake servers.

A tunnel route with ``hosts`` gets one checker per host (the route's check at that host's port, once
per interval each: the only load on the database); the route answers the load balancer 200 while ANY
host is up, and ``GET /routes/<route>`` reports every host under ``hosts``. HAProxy's agent asks
``GET /agent/<route>/<host>`` (a tunnel host's own server) and ``GET /agent/<route>`` (a peer's backup
entry) and reads one raw line (HAProxy 2.6 configuration.txt 5.2 ``agent-check``: ``up``, or ``down``
followed by a description after a ``#`` that starts a word: src/tcpcheck.c
``tcpcheck_agent_expect_reply`` treats ``down#x`` as one unknown word). The real HAProxy reading it:
test_proxy_dataplane.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FILES = HERE.parents[1] / "tunnelhub" / "userdata" / "files"
sys.path[:0] = [str(FILES), str(HERE)]

import tunnelhub_health as health  # noqa: E402
from test_health_fakes import FakeServer, free_port, wait_until  # noqa: E402

from tests.helpers import SECOND_TUNNEL_KEY, TUNNEL_KEY, azure_hub, load_hubs  # noqa: E402
from tunnelhub.userdata import document as D  # noqa: E402

INTERVAL_S = 0.2


def route(ports: dict[str, int], *, name: str = "db", mode: str = "banner", interval_s: float = INTERVAL_S) -> dict:
    first = next(iter(ports.values()))
    return {"name": name, "kind": "tunnel", "host": "127.0.0.1", "port": first,
            "probe": {"mode": mode, "interval_s": interval_s, "timeout_s": 0.5},
            "hosts": [{"name": h, "port": p} for h, p in ports.items()]}


def config(*routes: dict, version: str = "v1") -> health.Config:
    data = {"listen_address": "127.0.0.1", "port": 8080, "routes": list(routes), "config_version": version}
    return dataclasses.replace(health.parse_config(data), port=0)


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def raw(port: int, request: bytes) -> bytes:
    """What HAProxy's agent reads: everything the daemon sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while data := sock.recv(4096):
            chunks.append(data)
    return b"".join(chunks)


@pytest.fixture
def daemon():
    started = []

    def start(*routes: dict) -> health.HealthDaemon:
        d = health.HealthDaemon(config(*routes), host_key_status="/nonexistent", haproxy_metrics=None)
        d.start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def test_the_document_gives_each_tunnel_route_its_hosts_and_keeps_the_route_keys():
    """health.json shape: a tunnel route keeps host/port (the first host's) and lists every tunnel host
    with its own loopback port; a forward route has no hosts. The daemon's parser takes it."""
    hub = load_hubs(azure_hub(onprem={"source_cidrs": ["192.168.10.0/24"], "tunnel_hosts": [
        {"name": "host-a", "public_keys": [TUNNEL_KEY]}, {"name": "host-b", "public_keys": [SECOND_TUNNEL_KEY]}]})).hubs[0]
    cfg = D.health_config(hub)
    first = cfg["routes"][0]
    assert {k: first[k] for k in ("name", "kind", "host", "port", "hosts")} == {
        "name": "orders-mysql", "kind": "tunnel", "host": "127.0.0.1", "port": 13306,
        "hosts": [{"name": "host-a", "port": 13306}, {"name": "host-b", "port": 14306}]}
    parsed = health.parse_config(cfg)
    assert [h.port for h in parsed.routes[1].hosts] == [15432, 16432]
    single = D.health_config(load_hubs(azure_hub()).hubs[0])["routes"][0]
    assert single["hosts"] == [{"name": "tunnel-host", "port": single["port"]}]


@pytest.mark.parametrize(("hosts", "kind", "expected"), [
    ([], "tunnel", "routes[0].hosts: got []; fix: give a non-empty list"),
    ([{"name": "a-host", "port": 1}, {"name": "a-host", "port": 2}], "tunnel", "routes[0].hosts[1].name: 'a-host' is used twice"),
    ([{"name": "a-host", "port": 1}, {"name": "b-host", "port": 1}], "tunnel", "routes[0].hosts[1].port: 1 is used twice"),
    ([{"name": "Bad Name", "port": 1}], "tunnel", "routes[0].hosts[0].name: got 'Bad Name'"),
    ([{"name": "a-host", "port": 0}], "tunnel", "routes[0].hosts[0].port: got 0"),
    ([{"name": "a-host", "port": 1, "weight": 2}], "tunnel", "routes[0].hosts[0].weight: unknown field"),
    ([{"name": "a-host", "port": 1}], "forward", "routes[0].hosts: only a tunnel route has tunnel hosts"),
])
def test_bad_hosts_are_refused_naming_the_field(hosts, kind, expected):
    data = {"port": 8080, "routes": [{"name": "db", "kind": kind, "host": "127.0.0.1", "port": 1,
                                      "probe": {"mode": "connect", "interval_s": 1, "timeout_s": 1}, "hosts": hosts}]}
    with pytest.raises(health.ConfigError) as err:
        health.parse_config(data)
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def test_the_route_is_up_while_any_host_is_and_reports_each(daemon):
    with FakeServer("banner") as a, FakeServer("banner") as b:
        d = daemon(route({"host-a": a.port, "host-b": b.port}))
        wait_until(lambda: get(d.port, "/routes/db")[1].get("hosts_up") == 2, what="both hosts up")
        code, body = get(d.port, "/routes/db")
        assert code == 200 and body["healthy"] and body["hosts_total"] == 2
        assert set(body["hosts"]["host-a"]) >= {"healthy", "since_s", "reason", "warning", "target", "age_s",
                                                 "latency_ms", "checks"}
        assert body["hosts"]["host-b"]["target"] == f"127.0.0.1:{b.port}"
        assert body["reason"].startswith("2 of 2 tunnel hosts up (host-a, host-b); host-a: banner received")
        a.stop()  # host A's listener gone (a check under way when it stops may see "closed" first)
        wait_until(lambda: get(d.port, "/routes/db")[1]["hosts"]["host-a"]["reason"].startswith("connection refused"),
                   what="host-a down")
        code, body = get(d.port, "/routes/db")
        assert code == 200 and body["hosts_up"] == 1
        assert body["hosts"]["host-a"]["reason"].startswith("connection refused on 127.0.0.1:")
        b.stop()
        wait_until(lambda: get(d.port, "/routes/db")[0] == 503, what="the route down with both hosts")
        code, body = get(d.port, "/routes/db")
        assert body["reason"].startswith("no tunnel host up: host-a: connection refused")
        assert "; host-b: " in body["reason"]  # refused, or closed while the fake stopped


def test_each_host_is_checked_once_per_interval(daemon):
    """The target sees one check per interval per host, however often the LB and the agents ask."""
    with FakeServer("banner") as a, FakeServer("banner") as b:
        d = daemon(route({"host-a": a.port, "host-b": b.port}))
        wait_until(lambda: a.connections and b.connections, what="first checks")
        start_a, start_b, t0 = a.connections, b.connections, time.monotonic()
        for _ in range(200):
            raw(d.port, b"GET /agent/db/host-a HTTP/1.0\r\n\r\n")
            get(d.port, "/routes/db")
        elapsed = time.monotonic() - t0
        expected = elapsed / INTERVAL_S
        for server, start in ((a, start_a), (b, start_b)):
            assert expected - 2 <= server.connections - start <= expected + 2, (server.connections - start, expected)


def test_the_agent_answers_a_raw_line_per_host_and_per_route(daemon):
    with FakeServer("banner") as a, FakeServer("banner", behaviour="hang") as b:
        d = daemon(route({"host-a": a.port, "host-b": b.port}))
        wait_until(lambda: get(d.port, "/routes/db")[1]["hosts"]["host-b"]["reason"].startswith("no banner"),
                   what="host-b's check timed out")
        assert raw(d.port, b"GET /agent/db/host-a HTTP/1.0\r\n\r\n") == b"up\n"
        line = raw(d.port, b"GET /agent/db/host-b HTTP/1.0\r\n\r\n")
        assert line.startswith(b"down #no banner within 0.5 s") and line.endswith(b"\n") and line.count(b"\n") == 1
        assert raw(d.port, b"GET /agent/db HTTP/1.0\r\n\r\n") == b"up\n"  # any host up
        assert raw(d.port, b"GET /agent/db/host-c HTTP/1.0\r\n\r\n").startswith(b"down #route 'db' has no tunnel host")
        assert raw(d.port, b"GET /agent/nope HTTP/1.0\r\n\r\n").startswith(b"down #no route 'nope'")
        a.stop()
        wait_until(lambda: raw(d.port, b"GET /agent/db HTTP/1.0\r\n\r\n").startswith(b"down #no tunnel host up"),
                   what="the route's agent down")


def test_a_reason_cannot_break_the_agent_line():
    line = health._agent_line(False, "a\r\nb#c\x00" + "x" * 500)
    assert line == "down #" + ("a  b#c " + "x" * 500)[:health.AGENT_REASON_MAX] + "\n"
    assert len(health._agent_line(False, "y" * 500)) == len("down #") + health.AGENT_REASON_MAX + 1


def test_the_self_test_is_only_for_a_non_loopback_address_asking_itself():
    """``down #self`` answers a connection whose source is its destination on a non-loopback address
    (this proxy's own ``peer_<slot>`` entry, test_proxy_dataplane.py); a loopback connection (the local
    servers' agents, the status command through the tunnel) is never "self"."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()) as client:
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockname()[0] == conn.getpeername()[0] == "127.0.0.1"
                assert not health._is_self(conn)
    assert not health._is_self(None)


def test_a_reload_keeps_the_unchanged_hosts_checkers_and_starts_a_new_host(daemon):
    with FakeServer("banner") as a, FakeServer("banner") as b:
        d = daemon(route({"host-a": a.port}))
        wait_until(lambda: d.checkers["db"].hosts["host-a"].rounds >= 2, what="host-a checked")
        kept = d.checkers["db"].hosts["host-a"]
        result = d.reload(config(route({"host-a": a.port, "host-b": b.port}), version="v2"))
        assert result.started == ("db",)
        assert d.checkers["db"].hosts["host-a"] is kept and kept.is_alive()  # its cached state lives on
        wait_until(lambda: get(d.port, "/routes/db")[1].get("hosts_up") == 2, what="host-b up after the reload")
        d.reload(config(route({"host-b": b.port}), version="v3"))
        wait_until(lambda: not kept.is_alive(), what="the removed host's checker stopped")
        assert list(d.checkers["db"].hosts) == ["host-b"]


def test_metrics_have_one_bounded_series_per_host_and_the_route_series_unchanged(daemon):
    from prometheus_client.parser import text_string_to_metric_families

    with FakeServer("banner") as a:
        d = daemon(route({"host-a": a.port, "host-b": free_port()}))
        wait_until(lambda: get(d.port, "/routes/db")[1]["hosts"]["host-b"]["checks"] >= 1, what="first checks")
        families = {f.name: f for f in text_string_to_metric_families(health.render_metrics(d, time.monotonic()))}
        hosts = {s.labels["host"]: s.value for s in families["tunnelhub_tunnel_host_up"].samples}
        assert hosts == {"host-a": 1.0, "host-b": 0.0}
        assert all(set(s.labels) == {"route", "host"} for s in families["tunnelhub_tunnel_host_up"].samples)
        assert [s.value for s in families["tunnelhub_route_up"].samples] == [1.0]
        assert [s.labels for s in families["tunnelhub_route_up"].samples] == [{"route": "db"}]
        checks = families["tunnelhub_route_checks"].samples[0].value  # both hosts' checks
        assert 2 <= checks <= d.checkers["db"].rounds


def test_each_host_change_is_logged_once(daemon, caplog):
    caplog.set_level(logging.INFO, logger="tunnelhub-health")
    with FakeServer("banner") as a, FakeServer("banner") as b:
        d = daemon(route({"host-a": a.port, "host-b": b.port}))
        wait_until(lambda: get(d.port, "/routes/db")[1].get("hosts_up") == 2, what="both hosts up")
        for _ in range(3):
            d.log_changes(time.monotonic())
        a.stop()
        wait_until(lambda: get(d.port, "/routes/db")[1]["hosts"]["host-a"]["reason"].startswith("connection refused"),
                   what="host-a down")
        for _ in range(3):
            d.log_changes(time.monotonic())
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("route db UP: 2 of 2 tunnel hosts up (host-a, host-b)") == 1
    assert lines.count("route db UP: 1 of 2 tunnel hosts up (host-b)") == 1
    assert sum(ln.startswith("route db tunnel host host-a DOWN: connection refused") for ln in lines) == 1
    assert lines.count("route db DOWN: no tunnel host up") == 0
    assert sum(ln.startswith("route db tunnel host host-b UP: banner received") for ln in lines) == 1


def test_tunnelhub_status_carries_each_host_from_the_daemons_answer(daemon):
    """``tunnelhub status`` (tunnelhub/status.py) reads the daemon's ``GET /`` and keeps each tunnel
    host's state in its per-proxy cell (JSON ``hosts``); the reason names the host that is down."""
    from tunnelhub import status as T

    with FakeServer("banner") as b:
        d = daemon(route({"host-a": free_port(), "host-b": b.port}))
        wait_until(lambda: get(d.port, "/routes/db")[1].get("hosts_up") == 1
                   and get(d.port, "/routes/db")[1]["hosts"]["host-a"]["checks"] >= 1, what="first checks")
        answer = T.ask(0, "127.0.0.1", d.port, 2.0)
        cell = T.route_rows(["db"], [answer])[0]["per_proxy"][0]
        assert cell["state"] == "up"
        assert cell["hosts"]["host-a"]["state"] == "down" and cell["hosts"]["host-b"]["state"] == "up"
        assert cell["hosts"]["host-a"]["reason"].startswith("connection refused on 127.0.0.1:")
        assert cell["reason"].startswith("1 of 2 tunnel hosts up (host-b); down: host-a: connection refused")
