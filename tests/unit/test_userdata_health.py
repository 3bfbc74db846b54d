"""The rendered health.json driving the real health daemon (files/tunnelhub_health.py, started the
way its systemd unit starts it): one path per route, answering 200 for a route whose target
answers and 503 for one that refuses, plus ``/`` and ``/healthz``."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import aws_hub, load_hubs
from tunnelhub.userdata import extract_files, render_cloud_init, render_document

ROOT = Path(__file__).resolve().parents[2]
DAEMON = ROOT / "tunnelhub" / "userdata" / "files" / "tunnelhub_health.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Listener:
    """Accepts and keeps connections open (a target that answers at the TCP level)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for conn in self.held:
            conn.close()
        self.sock.close()


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def daemon(tmp_path):
    up, down, health_port = Listener(), free_port(), free_port()
    hub = load_hubs(aws_hub(
        proxies={"health_port": health_port},
        routes=[
            {"name": "up-db", "kind": "tunnel", "port": 3306, "target": "db1.corp.example:3306",
             "tunnel_port": up.port, "probe": {"mode": "connect", "interval_s": 0.5, "timeout_s": 1}},
            {"name": "down-db", "kind": "tunnel", "port": 3307, "target": "db2.corp.example:3306",
             "tunnel_port": down, "probe": {"mode": "connect", "interval_s": 0.5, "timeout_s": 1}},
        ])).hubs[0]
    files = {f.path: f.content for f in extract_files(render_cloud_init(hub, None).cloud_config)}
    config = tmp_path / "health.json"
    document = render_document(hub)  # health.json as the reconciler writes it from the document
    config.write_text(json.dumps(dict(document.payload["health"], config_version=document.version)))
    unit = files["/etc/systemd/system/tunnelhub-health.service"]
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    args = shlex.split(exec_start.removeprefix("ExecStart="))
    assert args[:2] == ["/usr/bin/python3", "/usr/local/lib/tunnelhub/tunnelhub_health.py"]
    paths = {"/etc/tunnelhub/health.json": str(config), "/run/tunnelhub/reconcile.json": str(tmp_path / "status.json")}
    args = [sys.executable, str(DAEMON)] + [paths.get(a, a) for a in args[2:]]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield hub, health_port, document
    finally:
        process.terminate()
        process.wait(10)
        up.close()


def test_each_route_has_its_health_path(daemon):
    hub, port, document = daemon
    deadline = time.monotonic() + 15
    while True:
        try:
            codes = {r.name: get(port, r.health_path)[0] for r in hub.routes}
        except OSError:
            codes = {}
        if codes == {"up-db": 200, "down-db": 503}:
            break
        assert time.monotonic() < deadline, codes
        time.sleep(0.2)
    status, summary = get(port, "/")
    assert status == 503 and json.dumps(summary).count("down-db") >= 1
    assert summary["config_version"] == document.version
    assert summary["reconciler"]["state"] == "unknown"  # no status file yet: said so, not hidden
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        assert response.headers["X-Tunnelhub-Config-Version"] == document.version
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/routes/no-such-route")[0] == 404
