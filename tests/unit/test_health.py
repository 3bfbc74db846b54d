"""The per-route health endpoint (tunnelhub/userdata/files/tunnelhub_health.py).

Each probe mode runs against loopback fakes that (a) answer correctly, (b) accept then
close (sshd when the target behind the tunnel is down), (c) accept and hang (a half-open
tunnel) and (d) refuse (no tunnel listener). The daemon runs in-process on an ephemeral
port, and once as a real subprocess for signals, logging and exit codes.

Timing bounds here are deliberately generous (stated at each assert) so a loaded CI
machine does not fail them; the measured figures are printed by bench/health_bench.py.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FILES = REPO / "tunnelhub" / "userdata" / "files"
SCRIPT = FILES / "tunnelhub_health.py"
sys.path[:0] = [str(FILES), str(HERE)]

import tunnelhub_health as health  # noqa: E402
from test_health_fakes import FakeServer, free_port, hammer, make_certificate, route, wait_until  # noqa: E402

TIMEOUT_S = 0.5  # check timeout used by the hang tests


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


def config(*routes: dict) -> health.Config:
    parsed = health.parse_config({"listen_address": "127.0.0.1", "port": 8080, "routes": list(routes)})
    return dataclasses.replace(parsed, port=0)  # an ephemeral port for the in-process daemon


def check(mode: str, port: int, **kwargs) -> health.CheckResult:
    return health.run_check(config(route(mode, port, **kwargs)).routes[0])


class Http:
    def __init__(self, port: int):
        self.port = port

    def get(self, path: str, method: str = "GET") -> tuple[int, dict | None, float]:
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        elapsed = time.monotonic() - started
        return response.status, (json.loads(raw) if raw else None), elapsed


@pytest.fixture
def daemon_for(tmp_path):
    started: list[health.HealthDaemon] = []

    def start(*routes: dict, check=health.run_check,
              host_key_status: Path = tmp_path / "no-host-key-status.json") -> tuple[health.HealthDaemon, Http]:
        daemon = health.HealthDaemon(config(*routes), check=check, host_key_status=str(host_key_status))
        daemon.start()
        started.append(daemon)
        return daemon, Http(daemon.port)

    yield start
    for daemon in started:
        daemon.stop()


def first_result(client: Http, name: str = "r1") -> tuple[int, dict]:
    def ready():
        status, body, _ = client.get(f"/routes/{name}")
        return (status, body) if body["checks"] >= 1 else None
    return wait_until(ready, what=f"the first check of {name}")


# --------------------------------------------------------------------------------------
# (a) a target that answers: every mode healthy, and the conversation ends cleanly
# --------------------------------------------------------------------------------------

ANSWER_CASES = {
    "mysql": ("MySQL login OK as tunnelhub_check (server 10.11.99-FakeDB)", ["login:tunnelhub_check:mysql_native_password:0", "quit"]),
    "postgresql": ("PostgreSQL answered SSLRequest, TLS handshake OK (TLSv1.3)", ["tls-handshake-ok", "tls-clean-close"]),
    "sqlserver": ("SQL Server answered PRELOGIN (version 16.0.4135)", ["prelogin", "clean-close"]),
    "oracle": ("Oracle listener answered TNS ping (VSNNUM=318767104)", ["connect:(CONNECT_DATA=(COMMAND=ping))"]),
    "tls": ("TLS handshake OK (TLSv1.3)", ["tls-handshake-ok", "tls-clean-close"]),
    "banner": ("banner received (SSH-2.0-OpenSSH_9.2p1 Debian-2)", []),
    "connect": ("TCP connect OK, still open after the settle window", []),
}


@pytest.mark.parametrize("mode", list(ANSWER_CASES))
def test_a_target_that_answers_is_healthy_and_the_check_says_goodbye(mode, certificate):
    reason, events = ANSWER_CASES[mode]
    with FakeServer(mode, certificate=certificate) as server:
        result = check(mode, server.port, timeout_s=2.0)
        wait_until(lambda: len(server.events) >= len(events), what="the fake to record the goodbye")
    assert result.healthy, result.reason
    assert result.reason == reason
    assert result.warning is None
    assert server.events == events


def test_mysql_check_follows_an_auth_switch_and_caching_sha2_fast_auth():
    with FakeServer("mysql", plugin="caching_sha2_password", switch_to="mysql_native_password",
                    fast_auth=True) as server:
        result = check("mysql", server.port, timeout_s=2.0, check_user="probe_user")
    # the configured check_user is what the server sees, with the server's plugin echoed
    assert server.events == ["login:probe_user:caching_sha2_password:0",
                             "switch-answer:"]  # an empty password answers a switch with nothing
    # the fake only lets tunnelhub_check in: rejected after the fast-auth round, warning
    assert result.healthy and "ERR 1045" in result.warning


def test_mysql_check_logs_in_after_a_switch_to_caching_sha2_with_fast_auth():
    with FakeServer("mysql", switch_to="caching_sha2_password", fast_auth=True) as server:
        result = check("mysql", server.port, timeout_s=2.0)
        wait_until(lambda: "quit" in server.events, what="COM_QUIT")
    assert result.healthy and result.warning is None, result
    assert server.events == ["login:tunnelhub_check:mysql_native_password:0", "switch-answer:", "quit"]


def test_mysql_login_rejected_is_healthy_with_a_warning_naming_the_fix():
    with FakeServer("mysql", user="somebody_else") as server:
        result = check("mysql", server.port, timeout_s=2.0)
    assert result.healthy
    assert result.reason == "MySQL server 10.11.99-FakeDB answered (login rejected)"
    assert "check user 'tunnelhub_check' rejected: ERR 1045 Access denied" in result.warning
    assert "CREATE USER 'tunnelhub_check'@'<tunnel host>'" in result.warning


@pytest.mark.parametrize("code, words", [(1129, "host blocked"), (1040, "too many connections")])
def test_mysql_errors_that_stop_every_client_are_unhealthy(code, words):
    with FakeServer("mysql", greeting_error=(code, "Host '10.0.0.9' is blocked")) as server:
        at_greeting = check("mysql", server.port, timeout_s=2.0)
    with FakeServer("mysql", login="err", login_error=(code, "Too many connections")) as server:
        at_login = check("mysql", server.port, timeout_s=2.0)
    assert not at_greeting.healthy
    assert at_greeting.reason.startswith(f"server refused the connection: ERR {code} ")
    assert not at_login.healthy
    assert at_login.reason.startswith(f"server refused the login: ERR {code} ") and words in at_login.reason


def test_postgresql_without_ssl_answers_n_and_is_closed_before_any_startup_packet():
    with FakeServer("postgresql", ssl=False) as server:
        result = check("postgresql", server.port, timeout_s=2.0)
        wait_until(lambda: server.events, what="the close")
    assert result.healthy and result.reason == "PostgreSQL answered SSLRequest (no TLS)"
    assert server.events == ["no-ssl-close"]


def test_oracle_check_resends_the_connect_when_the_listener_asks():
    with FakeServer("oracle", resend_first=True) as server:
        result = check("oracle", server.port, timeout_s=2.0)
    assert result.healthy, result.reason
    assert server.events == ["connect:(CONNECT_DATA=(COMMAND=ping))"] * 2


def test_oracle_listener_error_is_healthy_with_a_warning():
    text = b"(DESCRIPTION=(TMP=)(VSNNUM=318767104)(ERR=12514)(ERROR_STACK=(ERROR=(CODE=12514))))"
    with FakeServer("oracle", refuse_text=text) as server:
        result = check("oracle", server.port, timeout_s=2.0)
    assert result.healthy and result.warning == "listener answered the ping with ERR=12514"


def test_tls_check_sends_the_configured_server_name(certificate):
    with FakeServer("tls", certificate=certificate) as server:
        named = check("tls", server.port, timeout_s=2.0, kind="forward", server_name="api.example.test")
        default = check("tls", server.port, timeout_s=2.0, kind="forward", host="localhost")
    assert named.healthy and default.healthy
    assert named.reason == "TLS handshake OK (TLSv1.3, SNI api.example.test)"
    assert server.sni == ["api.example.test", "localhost"]


# --------------------------------------------------------------------------------------
# (b) accepted then closed: sshd when the channel open to the target fails
# --------------------------------------------------------------------------------------

CLOSED_REASONS = {
    "mysql": "closed before greeting: target down behind the tunnel?",
    "postgresql": "closed before reply to SSLRequest: target down behind the tunnel?",
    "sqlserver": "closed before PRELOGIN response: target down behind the tunnel?",
    "oracle": "closed before TNS response: target down behind the tunnel?",
    "tls": "closed before the end of the TLS handshake: target down behind the tunnel?",
    "banner": "closed before banner: target down behind the tunnel?",
    "connect": "accepted then closed within 0.5 s: target down behind the tunnel?",
}


@pytest.mark.parametrize("mode", list(CLOSED_REASONS))
def test_accept_then_close_is_unhealthy_with_the_reason(mode):
    with FakeServer(mode, behaviour="close") as server:
        result = check(mode, server.port, timeout_s=2.0, **({"settle_s": 0.5} if mode == "connect" else {}))
    assert not result.healthy
    # a write into a socket the peer already closed may surface as a reset instead
    assert result.reason in (CLOSED_REASONS[mode], CLOSED_REASONS[mode].replace("closed before", "connection reset before", 1))


def test_forward_routes_word_the_reason_for_a_remote_service():
    with FakeServer("mysql", behaviour="close") as server:
        result = check("mysql", server.port, kind="forward", timeout_s=2.0)
    assert result.reason == "closed before greeting: the remote service closed the connection"


# --------------------------------------------------------------------------------------
# (c) accepted then silent: a half-open tunnel
# --------------------------------------------------------------------------------------

HANG_REASONS = {
    "mysql": "no greeting within 0.5 s: tunnel half-open?",
    "postgresql": "no reply to SSLRequest within 0.5 s: tunnel half-open?",
    "sqlserver": "no PRELOGIN response within 0.5 s: tunnel half-open?",
    "oracle": "no TNS response within 0.5 s: tunnel half-open?",
    "tls": "no TLS handshake within 0.5 s: tunnel half-open?",
    "banner": "no banner within 0.5 s: tunnel half-open?",
}


@pytest.mark.parametrize("mode", list(HANG_REASONS))
def test_accept_and_hang_is_unhealthy_within_the_timeout(mode):
    with FakeServer(mode, behaviour="hang") as server:
        result = check(mode, server.port)
    assert not result.healthy
    assert result.reason == HANG_REASONS[mode]
    # bounded by timeout_s (0.5 s); 1.5 s leaves room for a loaded machine
    assert TIMEOUT_S * 0.9 <= result.latency_s < 1.5


def test_connect_mode_cannot_see_a_half_open_tunnel():
    # Documented blind spot: silence after a connect looks like an idle healthy server.
    with FakeServer("connect", behaviour="hang") as server:
        result = check("connect", server.port, settle_s=0.2)
    assert result.healthy and result.reason == "TCP connect OK, still open after the settle window"


# --------------------------------------------------------------------------------------
# (d) refused: no tunnel listener
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", health.PROBE_MODES)
def test_refused_is_unhealthy_with_the_reason(mode):
    port = free_port()
    result = check(mode, port)
    assert not result.healthy
    assert result.reason == (f"connection refused on 127.0.0.1:{port}: no tunnel listener "
                             "(on-prem ssh -R not connected?)")
    assert result.latency_s < 0.5  # refused is immediate; bound generous


def test_forward_route_resolves_its_host_name_at_each_check():
    with FakeServer("banner") as server:
        result = check("banner", server.port, kind="forward", host="localhost")
    assert result.healthy, result.reason


def test_a_dns_server_that_never_answers_costs_one_timeout_and_one_thread(monkeypatch):
    release = threading.Event()
    calls = []

    def slow_getaddrinfo(*args, **kwargs):
        calls.append(args[0])
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    target = config(route("tls", 443, kind="forward", host="remote.example.test", timeout_s=0.3)).routes[0]
    resolver = health.Resolver(target.host, target.port)
    try:
        first = health.run_check(target, resolver)
        second = health.run_check(target, resolver)
    finally:
        release.set()
    assert first.reason == second.reason == "DNS lookup of remote.example.test did not answer within 0.3 s"
    assert first.latency_s < 1.0 and second.latency_s < 1.0  # bounded by timeout_s 0.3
    assert calls == ["remote.example.test"]  # the second check waited on the same lookup


def test_a_failed_dns_lookup_is_unhealthy_with_the_resolver_error(monkeypatch):
    def failing_getaddrinfo(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", failing_getaddrinfo)
    result = check("tls", 443, kind="forward", host="gone.example.test")
    assert result.reason == "DNS lookup of gone.example.test failed: Name or service not known"


# --------------------------------------------------------------------------------------
# HTTP: cached answers, paths, staleness, liveness
# --------------------------------------------------------------------------------------


def test_route_path_answers_200_with_the_json_body(daemon_for):
    with FakeServer("banner") as server:
        _, client = daemon_for(route("banner", server.port, name="orders"))
        status, body = first_result(client, "orders")
    assert status == 200
    assert body["route"] == "orders" and body["healthy"] is True and body["mode"] == "banner"
    assert body["target"] == f"127.0.0.1:{server.port}"
    assert body["reason"].startswith("banner received")
    assert 0 <= body["age_s"] < 2 and body["latency_ms"] >= 0 and body["warning"] is None


def test_since_s_is_the_time_in_the_current_state_and_restarts_at_a_flip():
    """``since_s`` (``GET /`` and ``/routes/<name>``: how long the route has been up, or down;
    ``tunnelhub status`` shows it): from the end of the first check of the current state."""
    checker = health.RouteChecker(config(route("banner", 1, name="orders")).routes[0], threading.Event())
    ok = health.CheckResult(healthy=True, reason="banner received", latency_s=0.001, finished_at=100.0)
    ok_later = health.CheckResult(healthy=True, reason="banner received", latency_s=0.001, finished_at=102.0)
    down = health.CheckResult(healthy=False, reason="connection refused", latency_s=0.001, finished_at=104.0,
                              failure="connect_refused")
    for previous, result in ((None, ok), (ok, ok_later)):
        checker._count(previous, result)
        checker.result = result
    assert checker.status(103.0)["since_s"] == 3.0  # up since the first check at 100
    checker._count(ok_later, down)
    checker.result = down
    assert checker.status(105.0)["since_s"] == 1.0  # down since 104


def test_route_path_answers_503_with_the_reason(daemon_for):
    port = free_port()
    _, client = daemon_for(route("mysql", port))
    status, body = first_result(client)
    assert status == 503 and body["healthy"] is False
    assert body["reason"].startswith("connection refused on 127.0.0.1:")


def test_a_down_tunnel_route_names_the_missing_hub_host_key(daemon_for, tmp_path):
    """Booted for real (tests/boot, test_b07), a proxy whose Key Vault read was refused answered
    only "no tunnel listener": true, but not why. While tunnelhub_fetch_host_key.py records that
    the hub key is not installed, a tunnel route that is down says so (and the error); forward
    routes, which need no tunnel, do not; an installed key or no record at all adds nothing."""
    status_file = tmp_path / "host-key.json"
    error = "GET https://kv.vault.azure.net/secrets/hub-ssh-host-key answered HTTP 403: ForbiddenByRbac"
    status_file.write_text(json.dumps({"state": "retrying", "attempt": 3, "error": error, "source": "azure-keyvault"}))
    tunnel_port, forward_port = free_port(), free_port()
    daemon, client = daemon_for(route("mysql", tunnel_port, name="db"),
                                route("tls", forward_port, kind="forward", name="api"),
                                host_key_status=status_file)
    code, body = first_result(client, "db")
    assert code == 503
    assert body["reason"].startswith("connection refused on 127.0.0.1:")
    assert body["reason"].endswith(f"; the hub SSH host key is not installed yet (retrying) (attempt 3: {error}); "
                                   "the tunnel host refuses this proxy until it presents that key"), body["reason"]
    assert "host key" not in first_result(client, "api")[1]["reason"]
    assert client.get("/")[1]["host_key"]["state"] == "retrying"

    status_file.write_text(json.dumps({"state": "installed", "attempt": 4, "fingerprint": "SHA256:x"}))
    assert wait_until(lambda: "host key" not in client.get("/routes/db")[1]["reason"], what="the note gone")
    status_file.unlink()
    assert client.get("/")[1]["host_key"] is None and "host key" not in client.get("/routes/db")[1]["reason"]


def test_a_route_turns_503_then_200_as_its_target_goes_away_and_back(daemon_for):
    with FakeServer("banner") as server:
        port = server.port
        _, client = daemon_for(route("banner", port, interval_s=0.1))
        assert first_result(client)[0] == 200
    wait_until(lambda: client.get("/routes/r1")[0] == 503, what="503 after the target stopped")
    with socket.socket() as listener:  # the same port answers again
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(8)
        stop = threading.Event()

        def serve():
            listener.settimeout(0.1)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                conn.sendall(b"220 hello\r\n")
                conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            wait_until(lambda: client.get("/routes/r1")[0] == 200, what="200 after the target came back")
        finally:
            stop.set()
            thread.join(2)


def test_http_answers_at_once_while_a_check_hangs(daemon_for):
    with FakeServer("mysql", behaviour="hang") as server:
        _, client = daemon_for(route("mysql", server.port, interval_s=0.2, timeout_s=1.0))
        wait_until(lambda: server.connections >= 1, what="a check to start hanging")
        latencies = [client.get("/routes/r1")[2] for _ in range(30)]
        status = client.get("/routes/r1")[0]
    # every answer comes from the cache while checks hang for 1 s each; 0.25 s is generous
    assert max(latencies) < 0.25, latencies
    assert status == 503


def test_many_probers_do_not_multiply_target_connections(daemon_for):
    interval, window = 0.25, 2.0
    with FakeServer("banner") as server:
        _, client = daemon_for(route("banner", server.port, interval_s=interval))
        first_result(client)
        before = server.connections
        answered = hammer(lambda: client.get("/routes/r1")[0], seconds=window)
        hits = server.connections - before
    expected = window / interval  # 8 checks in 2 s, whatever the probe rate
    assert len(answered) > 10 * expected, "the probers must outnumber the checks for this test to mean anything"
    assert expected - 2 <= hits <= expected + 2, (hits, len(answered))
    assert set(answered) == {200}


def test_a_stuck_checker_turns_200_into_503(daemon_for):
    release = threading.Event()
    calls = []

    def healthy_once_then_stuck(route_, resolver):
        calls.append(1)
        if len(calls) > 1:
            release.wait(30)
        now = time.monotonic()
        return health.CheckResult(healthy=True, reason="fine", latency_s=0.001, finished_at=now)

    try:
        daemon, client = daemon_for(route("connect", 1, interval_s=0.1, timeout_s=0.1),
                                    check=healthy_once_then_stuck)
        assert first_result(client)[0] == 200
        limit = daemon.checkers["r1"].route.probe.stale_after_s  # 0.1 + 0.1 + 1.0 grace
        assert limit == pytest.approx(1.2)

        def stale_answer():
            status, body, _ = client.get("/routes/r1")
            return body if status == 503 else None

        body = wait_until(stale_answer, timeout_s=limit + 2, what="503 for a stale result")
        assert body["reason"].startswith("stale: last check finished ")
        assert body["reason"].endswith("(limit 1.2 s), checker stuck? last result: fine")
        assert client.get("/healthz")[0] == 200  # still within the heartbeat limit (3 x 1.2 s)
        wait_until(lambda: client.get("/healthz")[0] == 503, timeout_s=3 * limit + 2,
                   what="/healthz 503 once the checker stopped looping")
    finally:
        release.set()


def test_healthz_reports_the_daemon_not_the_routes(daemon_for):
    _, client = daemon_for(route("mysql", free_port()))
    first_result(client)
    status, body, _ = client.get("/healthz")
    assert status == 200 and body["alive"] is True  # the route is down, the daemon is fine
    assert body["checkers"]["r1"]["alive"] is True


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_healthz_fails_when_a_checker_thread_died(daemon_for):
    def dies(route_, resolver):
        raise SystemExit  # not an Exception: escapes the checker's guard, ends the thread

    daemon, client = daemon_for(route("connect", 1), check=dies)
    wait_until(lambda: not daemon.checkers["r1"].is_alive(), what="the checker to die")
    status, body, _ = client.get("/healthz")
    assert status == 503 and body["checkers"]["r1"]["alive"] is False
    assert daemon.dead_checkers() == ["r1"]


def test_a_check_that_crashes_is_reported_not_fatal(daemon_for):
    def crashes(route_, resolver):
        raise RuntimeError("boom")

    _, client = daemon_for(route("connect", 1), check=crashes)
    status, body = first_result(client)
    assert status == 503 and body["reason"] == "check crashed: RuntimeError('boom')"
    assert client.get("/healthz")[0] == 200


def test_summary_lists_every_route_and_is_503_when_any_is_down(daemon_for):
    with FakeServer("banner") as server:
        _, client = daemon_for(route("banner", server.port, name="up"), route("banner", free_port(), name="down"))
        first_result(client, "up")
        first_result(client, "down")
        status, body, _ = client.get("/")
    assert status == 503 and body["healthy"] is False
    assert {name: r["healthy"] for name, r in body["routes"].items()} == {"up": True, "down": False}


def test_summary_is_200_when_every_route_is_healthy(daemon_for):
    with FakeServer("banner") as server:
        _, client = daemon_for(route("banner", server.port))
        first_result(client)
        status, body, _ = client.get("/")
    assert status == 200 and body["healthy"] is True


def test_before_the_first_check_a_route_is_503_starting(daemon_for):
    release = threading.Event()

    def slow(route_, resolver):
        release.wait(5)
        return health.CheckResult(healthy=True, reason="fine", finished_at=time.monotonic())

    try:
        _, client = daemon_for(route("connect", 1), check=slow)
        status, body, _ = client.get("/routes/r1")
        assert status == 503 and body["reason"] == "starting: no check has finished yet"
    finally:
        release.set()


@pytest.mark.parametrize("path", ["/nope", "/routes/", "/routes/other", "/routes/r1/extra", "/healthz/x"])
def test_unknown_paths_and_routes_are_404(daemon_for, path):
    _, client = daemon_for(route("connect", free_port()))
    status, body, _ = client.get(path)
    assert status == 404 and "error" in body


def test_head_and_query_strings_are_answered(daemon_for):
    _, client = daemon_for(route("connect", free_port()))
    first_result(client)
    assert client.get("/routes/r1", method="HEAD")[:2] == (503, None)
    assert client.get("/routes/r1?probe=azure")[0] == 503


def test_a_silent_http_client_is_cut_and_does_not_block_others(daemon_for):
    _, client = daemon_for(route("connect", free_port()))
    with socket.create_connection(("127.0.0.1", client.port), timeout=10) as silent:
        assert client.get("/healthz")[0] == 200  # answered while the silent one holds a thread
        started = time.monotonic()
        assert silent.recv(1) == b""  # the server hangs up after its request timeout
        assert time.monotonic() - started < health.HTTP_REQUEST_TIMEOUT_S + 2


# --------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------

GOOD = {"listen_address": "0.0.0.0", "port": 8080, "routes": [
    {"name": "orders-mysql", "kind": "tunnel", "host": "127.0.0.1", "port": 13306,
     "probe": {"mode": "mysql", "interval_s": 2.0, "timeout_s": 2.0, "check_user": "tunnelhub_check"}},
    {"name": "aoai", "kind": "forward", "host": "myaoai.openai.azure.com", "port": 443,
     "probe": {"mode": "tls", "interval_s": 2.0, "timeout_s": 2.0, "server_name": "myaoai.openai.azure.com"}},
]}


def test_the_documented_example_config_loads():
    loaded = health.parse_config(GOOD)
    assert [r.name for r in loaded.routes] == ["orders-mysql", "aoai"]
    assert loaded.routes[0].probe.check_user == "tunnelhub_check"
    assert loaded.routes[1].probe.server_name == "myaoai.openai.azure.com"
    assert loaded.routes[0].probe.stale_after_s == 5.0  # max(2, 2) + 2 + 1


def test_optional_probe_fields_have_their_documented_defaults():
    loaded = health.parse_config({"port": 8080, "routes": [
        {"name": "a", "kind": "tunnel", "host": "127.0.0.1", "port": 1,
         "probe": {"mode": "mysql", "interval_s": 1, "timeout_s": 1}},
        {"name": "b", "kind": "tunnel", "host": "127.0.0.1", "port": 2,
         "probe": {"mode": "connect", "interval_s": 1, "timeout_s": 1}}]})
    assert loaded.listen_address == "0.0.0.0"
    assert loaded.routes[0].probe.check_user == "tunnelhub_check"
    assert loaded.routes[1].probe.settle_s == 0.5


def _with(path: list, value) -> dict:
    data = json.loads(json.dumps(GOOD))
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


BAD_CONFIGS = [
    (_with(["port"], "8080"), "port: got '8080'; fix: give an integer from 1 to 65535"),
    (_with(["port"], True), "port: got True; fix: give an integer from 1 to 65535"),
    (_with(["listen_address"], "any"), "listen_address: got 'any'; fix: give an IP address"),
    (_with(["routes"], []), "routes: got []; fix: give a non-empty list of route objects"),
    (_with(["colour"], "blue"), "colour: unknown field; fix: remove it or correct its spelling"),
    (_with(["routes", 0, "name"], "orders mysql"), "routes[0].name: got 'orders mysql'; fix: use 1-63 letters"),
    (_with(["routes", 1, "name"], "orders-mysql"), "routes[1].name: 'orders-mysql' is used twice; fix: give every route a unique name"),
    (_with(["routes", 0, "kind"], "reverse"), "routes[0].kind: got 'reverse'; fix: use one of: tunnel, forward"),
    (_with(["routes", 0, "host"], ""), "routes[0].host: got ''; fix: give the address to check"),
    (_with(["routes", 0, "port"], 0), "routes[0].port: got 0; fix: give an integer from 1 to 65535"),
    (_with(["routes", 0, "probe"], KeyError), "routes[0].probe: got None; fix: give an object"),
    (_with(["routes", 0, "probe", "mode"], "mysq"), "routes[0].probe.mode: got 'mysq'; fix: use one of: mysql, postgresql"),
    (_with(["routes", 0, "probe", "interval_s"], 0), "routes[0].probe.interval_s: got 0; fix: give a number of seconds from 0.1 to 3600"),
    (_with(["routes", 0, "probe", "timeout_s"], "2s"), "routes[0].probe.timeout_s: got '2s'; fix: give a number of seconds from 0.05 to 60"),
    (_with(["routes", 0, "probe", "check_user"], ""), "routes[0].probe.check_user: got ''; fix: give the MySQL user"),
    (_with(["routes", 0, "probe", "server_name"], "x"), "routes[0].probe.server_name: unknown field; fix: remove it or correct its spelling (allowed: check_user, interval_s, mode, timeout_s)"),
    (_with(["routes", 1, "probe", "server_name"], " a"), "routes[1].probe.server_name: got ' a'; fix: give the TLS server name"),
]


@pytest.mark.parametrize("data, message", BAD_CONFIGS, ids=[m.split(":")[0] for _, m in BAD_CONFIGS])
def test_each_bad_field_is_named_with_its_fix(data, message):
    with pytest.raises(health.ConfigError) as raised:
        health.parse_config(data)
    assert any(problem.startswith(message) for problem in raised.value.problems), raised.value.problems


def test_settle_window_must_fit_in_the_timeout():
    data = {"port": 1, "routes": [route("connect", 1, timeout_s=0.5, settle_s=0.5)]}
    with pytest.raises(health.ConfigError, match=r"routes\[0\]\.probe\.settle_s: 0.5 is not below timeout_s 0.5"):
        health.parse_config(data)


def test_every_problem_is_reported_at_once():
    data = _with(["port"], -1)
    data["routes"][0]["probe"]["mode"] = "nope"
    with pytest.raises(health.ConfigError) as raised:
        health.parse_config(data)
    assert [p.split(":")[0] for p in raised.value.problems] == ["port", "routes[0].probe.mode"]


def test_main_exits_2_with_the_field_and_no_traceback(tmp_path, capsys):
    path = tmp_path / "health.json"
    path.write_text(json.dumps(_with(["routes", 0, "probe", "mode"], "mysq")))
    assert health.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"invalid config {path}:" in err and "routes[0].probe.mode: got 'mysq'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("content, words", [(None, "cannot read"), ("{not json", "is not valid JSON")])
def test_main_exits_2_for_a_missing_or_broken_file(tmp_path, capsys, content, words):
    path = tmp_path / "health.json"
    if content is not None:
        path.write_text(content)
    assert health.main(["--config", str(path)]) == 2
    assert words in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The real process: as systemd runs it
# --------------------------------------------------------------------------------------


def _write_config(tmp_path: Path, *routes: dict, port: int) -> Path:
    path = tmp_path / "health.json"
    path.write_text(json.dumps({"listen_address": "127.0.0.1", "port": port, "routes": list(routes)}))
    return path


def test_the_daemon_process_serves_logs_state_changes_and_stops_on_sigterm(tmp_path):
    with FakeServer("banner") as up:
        down_port = free_port()
        http_port = free_port()
        path = _write_config(tmp_path, route("banner", up.port, name="up", interval_s=0.2),
                             route("mysql", down_port, name="down", interval_s=0.2), port=http_port)
        process = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(path)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            client = Http(http_port)

            def answered():
                try:
                    return client.get("/routes/down")
                except OSError:
                    return None

            wait_until(lambda: (answered() or (0,))[0] == 503, what="the daemon to answer")
            wait_until(lambda: client.get("/routes/up")[0] == 200, what="the healthy route")
            for _ in range(20):
                client.get("/routes/up")
            time.sleep(0.6)  # let the watchdog log the states
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 0
    lines = err.splitlines()
    assert lines[0].startswith(f"tunnelhub-health listening on 127.0.0.1:{http_port} for 2 route(s)")
    assert "route up UP: banner received (SSH-2.0-OpenSSH_9.2p1 Debian-2)" in lines
    assert (f"route down DOWN: connection refused on 127.0.0.1:{down_port}: no tunnel listener "
            "(on-prem ssh -R not connected?)") in lines
    assert lines[-1] == "tunnelhub-health stopped"
    assert len(lines) == 4, lines  # no per-request lines, one line per state change
    assert out == ""


def test_once_mode_prints_every_route_and_exits_1_when_one_is_down(tmp_path):
    with FakeServer("banner") as up:
        path = _write_config(tmp_path, route("banner", up.port, name="up"),
                             route("banner", free_port(), name="down"), port=1)
        done = subprocess.run([sys.executable, str(SCRIPT), "--config", str(path), "--once"],
                              capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    results = json.loads(done.stdout)
    assert results["up"]["healthy"] is True and results["down"]["healthy"] is False


def test_a_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        path = _write_config(tmp_path, route("connect", 1), port=taken.getsockname()[1])
        done = subprocess.run([sys.executable, str(SCRIPT), "--config", str(path)],
                              capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert "cannot listen on 127.0.0.1:" in done.stderr and "Address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_shipped_file_is_stdlib_only():
    source = SCRIPT.read_text()
    imported = {line.split()[1].split(".")[0] for line in source.splitlines()
                if line.startswith(("import ", "from ")) and not line.startswith("from __future__")}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    assert os.access(SCRIPT, os.X_OK)
