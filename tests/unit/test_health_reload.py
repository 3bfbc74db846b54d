"""The health daemon's live reload and its config version (docs/live-config.md).

In-process: ``HealthDaemon.reload`` keeps the checker object (and its cached result) of every
route whose check did not change, starts checkers for new and changed routes, stops removed ones,
refuses a new port; every answer carries the loaded ``config_version`` (header and ``GET /``), and
``GET /`` shows the reconciler's status file. As a real process: SIGHUP reloads the file, a bad
file is refused with one log line and the routes stay.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FILES = HERE.parents[1] / "tunnelhub" / "userdata" / "files"
SCRIPT = FILES / "tunnelhub_health.py"
sys.path[:0] = [str(FILES), str(HERE)]

import tunnelhub_health as health  # noqa: E402
from test_health_fakes import FakeServer, free_port  # noqa: E402


def route(name: str, port: int, *, interval_s: float = 0.2, mode: str = "connect") -> dict:
    return {"name": name, "kind": "tunnel", "host": "127.0.0.1", "port": port,
            "probe": {"mode": mode, "interval_s": interval_s, "timeout_s": 0.5}}


def config(*routes: dict, version: str | None = "v1", port: int = 0) -> health.Config:
    data = {"listen_address": "127.0.0.1", "port": 8080, "routes": list(routes)}
    if version is not None:
        data["config_version"] = version
    return dataclasses.replace(health.parse_config(data), port=port)


def get(port: int, path: str) -> tuple[int, dict, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def running():
    daemons = []

    def start(cfg: health.Config, **kwargs) -> health.HealthDaemon:
        daemon = health.HealthDaemon(cfg, **kwargs)
        daemon.start()
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


def test_unchanged_routes_keep_their_checker_and_state_new_ones_start_removed_ones_stop(running):
    with FakeServer("connect") as a, FakeServer("connect") as b, FakeServer("connect") as c:
        daemon = running(config(route("a", a.port), route("b", b.port)))
        wait_until(lambda: all(ch.result and ch.result.healthy for ch in daemon.checkers.values()), what="first checks")
        checker_a, checker_b = daemon.checkers["a"], daemon.checkers["b"]
        rounds_a = checker_a.rounds

        result = daemon.reload(config(route("a", a.port), route("c", c.port), version="v2"))

        assert (result.kept, result.started, result.stopped) == (("a",), ("c",), ("b",))
        assert daemon.checkers["a"] is checker_a and checker_a.rounds >= rounds_a  # same thread, same cache
        assert daemon.checkers["a"].status(time.monotonic())["healthy"]  # no "starting" blip for a kept route
        wait_until(lambda: not checker_b.is_alive(), what="the removed route's checker to stop")
        wait_until(lambda: daemon.checkers["c"].result is not None, what="the new route's first check")
        status, headers, body = get(daemon.port, "/")
        assert headers["X-Tunnelhub-Config-Version"] == "v2" and body["config_version"] == "v2"
        assert set(body["routes"]) == {"a", "c"}
        assert get(daemon.port, "/routes/b")[0] == 404


def test_a_changed_check_gets_a_new_checker(running):
    with FakeServer("connect") as a:
        daemon = running(config(route("a", a.port)))
        old = daemon.checkers["a"]
        result = daemon.reload(config(route("a", a.port, interval_s=0.3), version="v2"))
        assert result.started == ("a",) and result.kept == ()
        assert daemon.checkers["a"] is not old and daemon.checkers["a"].route.probe.interval_s == 0.3
        wait_until(lambda: not old.is_alive(), what="the old checker to stop")


def test_a_new_port_is_refused_and_nothing_changes(running):
    with FakeServer("connect") as a:
        daemon = running(config(route("a", a.port)))
        before = dict(daemon.checkers)
        with pytest.raises(health.ConfigError, match="restart the daemon to move it"):
            daemon.reload(config(route("a", a.port), route("b", a.port), version="v2", port=daemon.port + 1))
        assert daemon.checkers == before and daemon.config.config_version == "v1"


def test_every_answer_carries_the_version_and_root_shows_the_reconciler(running, tmp_path):
    status_file = tmp_path / "reconcile.json"
    with FakeServer("connect") as a:
        daemon = running(config(route("a", a.port), version=None), status_file=str(status_file))
        for path in ("/", "/healthz", "/routes/a", "/nowhere"):
            assert get(daemon.port, path)[1]["X-Tunnelhub-Config-Version"] == "none"
        assert get(daemon.port, "/")[2]["reconciler"]["state"] == "unknown"
        status_file.write_text(json.dumps({"state": "waiting", "detail": "waiting for canary slot 0"}))
        assert get(daemon.port, "/")[2]["reconciler"] == {"state": "waiting", "detail": "waiting for canary slot 0"}
        status_file.write_text("{not json")
        assert "not JSON" in get(daemon.port, "/")[2]["reconciler"]["detail"]
    assert "reconciler" not in health.HealthDaemon(config(route("a", 1))).summary(time.monotonic())


@pytest.mark.parametrize("version", ["", "has space", "x" * 65, 12])
def test_a_bad_config_version_is_a_config_error(version):
    with pytest.raises(health.ConfigError, match="config_version"):
        config(route("a", 1), version=version)


def test_sighup_reloads_the_file_and_a_bad_file_is_refused(tmp_path):
    port = free_port()
    path = tmp_path / "health.json"

    def write(version: str, *routes: dict) -> None:
        path.write_text(json.dumps({"listen_address": "127.0.0.1", "port": port, "config_version": version,
                                    "routes": list(routes)}))

    with FakeServer("connect") as a, FakeServer("connect") as b:
        write("v1", route("a", a.port))
        process = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(path)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            def version() -> str | None:
                try:
                    return get(port, "/")[2]["config_version"]
                except OSError:
                    return None

            wait_until(lambda: version() == "v1", what="the daemon to answer")
            write("v2", route("a", a.port), route("b", b.port))
            process.send_signal(signal.SIGHUP)
            wait_until(lambda: version() == "v2", what="the reload")
            assert set(get(port, "/")[2]["routes"]) == {"a", "b"}
            path.write_text("{truncated")
            process.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            assert version() == "v2" and set(get(port, "/")[2]["routes"]) == {"a", "b"}
        finally:
            process.terminate()
            output = process.communicate(timeout=10)[0]
    assert "reloaded config v1 -> v2: kept a; started b; stopped none" in output
    assert output.count("reload REFUSED, keeping config v2") == 1
