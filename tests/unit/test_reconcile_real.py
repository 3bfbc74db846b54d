"""The reconciler against real daemons on loopback: HAProxy 2.6 in master-worker mode and OpenSSH.

- **HAProxy**: the rendered static config and routes file, run as the unit drop-in runs them
  (``-W``, two ``-f``), reloaded by the reconciler through SIGUSR2 to the master, as the unit's
  ExecReload does (asynchronous: the new worker takes over a moment after the signal). While a client holds one connection open and exchanges data through route A
  and another opens a new connection through route A every 20 ms, the document changes five
  times (a route added, A's max_connections changed, a key added, the route removed, A's idle
  timeout changed): the held connection keeps working through every reload and **no new
  connection fails**; the added route serves once its reload is through (within 10 s).
- **sshd**: the rendered static drop-in (its ``Match`` block includes the document's forwarding
  rules) and the document's keys, one session per key; revoking the second key closes that
  session only (the first key's tunnel keeps carrying data) and the revoked key is refused on
  reconnect; a tunnel route added to the document is a new ``-R`` sshd accepts after the
  reconciler's reload, while the first session stays.

The only changes to the rendered files: listeners bind 127.0.0.1 instead of 0.0.0.0 (loopback
only), runtime paths (stats socket, pid files) and the reconciler's commands point at this test's
daemons (the documented reconcile.json options), sshd listens on a free port.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import HUB_VNET_ID, spec_text
from tunnelhub.spec import validate_text
from tunnelhub.userdata import document as D
from tunnelhub.userdata import layout as L
from tunnelhub.userdata import render as R
from tunnelhub.userdata import render_document

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "tunnelhub" / "userdata" / "files"
RECONCILER = FILES / "tunnelhub_reconcile.py"
HAPROXY = "/usr/sbin/haproxy"
SSHD = "/usr/sbin/sshd"
TUNNEL_USER = "urtunnel"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(HAPROXY).exists() or not Path(SSHD).exists() or shutil.which("ss") is None
    or not Path("/var/lib/haproxy").is_dir(), reason="needs root, HAProxy, OpenSSH server and ss")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Echo:
    """A loopback 'database': echoes every line back, on every connection, until closed."""

    def __init__(self, port: int):
        self.sock = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


class Agent(Echo):
    """The health daemon's place on the health port: HAProxy's plain check connects, its agent reads
    ``up`` (the routes file checks and asks the daemon only; the real daemon: test_proxy_dataplane.py)."""

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2)
            try:
                if conn.recv(200).startswith(b"GET /agent/"):
                    conn.sendall(b"up\n")
            except OSError:
                pass


def hub_data(port_a: int, tunnel_a: int, **onprem) -> dict:
    return {
        "name": "real", "cloud": "azure", "region": "westeurope", "network": {"cidr": "10.60.0.0/24",
                                                                      "onprem_path": {"hub_vnet_id": HUB_VNET_ID}},
        "proxies": {"health_port": free_port()},
        "routes": [{"name": "ra", "kind": "tunnel", "port": port_a, "target": "db.corp.example:3306",
                    "tunnel_port": tunnel_a, "probe": {"mode": "connect"}}],
        "onprem": {"source_cidrs": ["127.0.0.0/8"], "tunnel_user": TUNNEL_USER, **onprem},
    }


def hub_of(data: dict):
    return validate_text(spec_text(data), "test.yaml").spec.hubs[0]


class Proxy:
    """The proxy's root (document-managed files), its reconcile.json, and the document channel."""

    def __init__(self, work: Path, hub, commands: dict[str, list[str]], **extra):
        self.work = work
        self.root = work / "root"
        self.channel = work / "channel.json"
        config = R.reconcile_config(hub, 0)
        config["files"] = {k: str(self.root) + v for k, v in config["files"].items()}
        config["state_file"] = str(self.root) + config["state_file"]
        config["status_file"] = str(self.root) + config["status_file"]
        config["source"] = {"type": "file", "path": str(self.channel)}
        config["commands"].update(commands)
        config.update(extra)
        self.config = work / "reconcile.json"
        self.config.write_text(json.dumps(config))
        self.files = config["files"]

    def publish(self, data: dict, *, loopback: bool = True) -> D.HubDocument:
        document = render_document(hub_of(data))
        text = document.text
        if loopback:  # the only change: listen on loopback
            payload = json.loads(text)["payload"]
            payload["haproxy_routes"] = payload["haproxy_routes"].replace("bind 0.0.0.0:", "bind 127.0.0.1:")
            from tests.unit.test_reconcile import resign
            text = resign(dict(json.loads(text), payload=payload))
        self.channel.write_text(text)
        return document

    def reconcile(self, *mode: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, str(RECONCILER), "--config", str(self.config), *(mode or ("--once",))],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# ---------------------------------------------------------------------------------- HAProxy


def test_haproxy_reloads_keep_established_connections_and_refuse_no_new_one(tmp_path):
    port_a, tunnel_a, port_b, tunnel_b = free_port(), free_port(), free_port(), free_port()
    data = hub_data(port_a, tunnel_a)
    hub = hub_of(data)
    base = tmp_path / "haproxy.cfg"
    base.write_text(R.haproxy_base_config(hub).replace("/run/haproxy/admin.sock", str(tmp_path / "admin.sock")))
    pid = tmp_path / "haproxy.pid"
    routes = str(tmp_path / "root") + L.HAPROXY_ROUTES_PATH
    check = [HAPROXY, "-c", "-q", "-f", str(base), "-f", "{candidate}"]
    reload = ["/bin/sh", "-c", f'{HAPROXY} -c -q -f {base} -f {routes} && kill -USR2 "$(cat {pid})"']
    noop = ["/bin/true"]
    proxy = Proxy(tmp_path, hub, {"haproxy_check": check, "haproxy_reload": reload, "health_reload": noop,
                                  "sshd_check": noop, "sshd_reload": noop, "sessions": noop, "session_log": noop})
    proxy.publish(data)
    proxy.reconcile("--boot")
    echo_a, echo_b = Echo(tunnel_a), Echo(tunnel_b)
    agent = Agent(hub.proxies.health_port)
    log = open(tmp_path / "haproxy.log", "w")  # noqa: SIM115 - closed below
    haproxy = subprocess.Popen([HAPROXY, "-W", "-db", "-f", str(base), "-f", routes, "-p", str(pid)],
                               stdout=log, stderr=subprocess.STDOUT)
    failures: list[str] = []
    opened = [0]
    stop_opening = threading.Event()

    def open_new_connections() -> None:
        while not stop_opening.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port_a), timeout=3) as conn:
                    conn.sendall(b"ping\n")
                    if conn.recv(16) != b"ping\n":
                        failures.append("no echo")
                opened[0] += 1
            except OSError as exc:
                failures.append(repr(exc))
            time.sleep(0.02)

    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                held = socket.create_connection(("127.0.0.1", port_a), timeout=3)
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "haproxy.log").read_text()
                time.sleep(0.1)
        opener = threading.Thread(target=open_new_connections, daemon=True)
        opener.start()
        changes = [
            lambda d: d["routes"].append({"name": "rb", "kind": "tunnel", "port": port_b, "target": "b.corp.example:1",
                                          "tunnel_port": tunnel_b, "probe": {"mode": "connect"}}),
            lambda d: d["routes"][0].update(max_connections=500),
            lambda d: d["onprem"].update(tunnel_public_keys=[
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ3b6Y1lV2fQ9m6Xb9y0aZk0K8yYb5j3v5m9v2Yk0xQf t"]),
            lambda d: d["routes"].pop(),
            lambda d: d["routes"][0].update(idle_timeout_min=45),
        ]
        served_b = False
        for n, change in enumerate(changes):
            change(data)
            proxy.publish(data)
            done = proxy.reconcile()
            assert "APPLIED" in done.stderr
            held.sendall(f"still here {n}\n".encode())
            assert held.recv(64) == f"still here {n}\n".encode(), f"the held connection broke at change {n}"
            if n == 0:  # the reload is asynchronous (SIGUSR2): the new worker listens a moment later
                deadline = time.monotonic() + 10
                while not served_b:
                    try:
                        with socket.create_connection(("127.0.0.1", port_b), timeout=3) as conn:
                            conn.sendall(b"b\n")
                            served_b = conn.recv(8) == b"b\n"
                    except OSError:
                        assert time.monotonic() < deadline, "route b did not serve within 10 s of its reload"
                        time.sleep(0.05)
            time.sleep(0.3)
        stop_opening.set()
        opener.join(10)
        held.close()
    finally:
        stop_opening.set()
        stop(haproxy)
        log.close()
        echo_a.close()
        echo_b.close()
        agent.close()
    reloads = (tmp_path / "haproxy.log").read_text().count("Reloading HAProxy")
    print(f"{opened[0]} new connections through 5 reloads, {len(failures)} failed")
    assert served_b, "route b did not serve after its reload"
    assert reloads == 5 - 1  # the key change touches no HAProxy file: no reload
    assert opened[0] > 50 and failures == []


# ---------------------------------------------------------------------------------- sshd


@pytest.fixture
def tunnel_user():
    created = False
    try:
        pwd.getpwnam(TUNNEL_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--shell", "/usr/sbin/nologin", "--no-create-home",
                        "--home-dir", "/nonexistent", TUNNEL_USER], check=True, timeout=30)
        created = True
    try:
        yield TUNNEL_USER
    finally:
        if created:
            subprocess.run(["userdel", TUNNEL_USER], check=False, timeout=30)


def _keypair(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return (Path(str(path) + ".pub")).read_text().strip()


def test_revoking_a_key_closes_its_session_only_and_a_new_route_is_forwarded_after_reload(tunnel_user):
    # Not under /tmp: sshd's StrictModes refuses key files below a world-writable directory.
    work = Path(tempfile.mkdtemp(prefix="urrec-", dir="/run"))
    work.chmod(0o755)
    processes: list[subprocess.Popen] = []
    try:
        keep_key, gone_key = _keypair(work / "keep"), _keypair(work / "gone")
        _keypair(work / "host")
        port, port_a, tunnel_a, tunnel_b = free_port(), free_port(), free_port(), free_port()
        data = hub_data(port_a, tunnel_a, tunnel_public_keys=[keep_key, gone_key])
        hub = hub_of(data)
        root = work / "root"
        dropin_dir = work / "sshd_config.d"
        dropin_dir.mkdir()
        (dropin_dir / "10-tunnelhub.conf").write_text(
            R.sshd_dropin(hub).replace(L.SSHD_TUNNEL_FORWARDING_PATH, str(root) + L.SSHD_TUNNEL_FORWARDING_PATH)
            .replace(R.tunnel_authorized_keys_path(hub), str(root) + R.tunnel_authorized_keys_path(hub)))
        config = work / "sshd_config"
        config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {work / 'host'}\nPidFile {work / 'sshd.pid'}\n"
                          f"LogLevel VERBOSE\nInclude {dropin_dir}/*.conf\nUsePAM yes\n")
        sshd_log = work / "sshd.log"
        ss = ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"]
        noop = ["/bin/true"]
        proxy = Proxy(work, hub, {
            "haproxy_check": [HAPROXY, "-c", "-q", "-f", "/dev/null", "-f", "{candidate}"],
            "haproxy_reload": noop, "health_reload": noop,
            "sshd_check": [SSHD, "-t", "-f", str(config)],
            "sshd_reload": ["/bin/sh", "-c", f'kill -HUP "$(cat {work / "sshd.pid"})"'],
            "sessions": ss,
        }, session_log_file=str(sshd_log))
        proxy.publish(data, loopback=False)
        proxy.reconcile("--boot")
        Path("/run/sshd").mkdir(exist_ok=True)
        sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=open(sshd_log, "w"),  # noqa: SIM115
                                stderr=subprocess.STDOUT)
        processes.append(sshd)
        echo = Echo(free_port())

        def ssh(key: str, *args: str) -> list[str]:
            return ["ssh", "-F", "none", "-i", str(work / key), "-p", str(port), "-o", "BatchMode=yes",
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "ExitOnForwardFailure=yes", "-o", "ConnectTimeout=5", *args, f"{TUNNEL_USER}@127.0.0.1"]

        def listening(p: int, timeout_s: float = 15) -> bool:
            end = time.monotonic() + timeout_s
            while time.monotonic() < end:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", p)) == 0:
                        return True
                time.sleep(0.05)
            return False

        def through(p: int) -> bytes:
            with socket.create_connection(("127.0.0.1", p), timeout=5) as conn:
                conn.sendall(b"hi\n")
                return conn.recv(8)

        assert listening(port)
        keep = subprocess.Popen(ssh("keep", "-N", "-R", f"localhost:{tunnel_a}:127.0.0.1:{echo.sock.getsockname()[1]}"),
                                stderr=subprocess.PIPE, text=True)
        gone = subprocess.Popen(ssh("gone", "-N"), stderr=subprocess.PIPE, text=True)
        processes += [keep, gone]
        assert listening(tunnel_a) and through(tunnel_a) == b"hi\n"
        deadline = time.monotonic() + 10
        while sshd_log.read_text().count("Accepted publickey for urtunnel") < 2:
            assert time.monotonic() < deadline, sshd_log.read_text()
            time.sleep(0.1)

        data["onprem"]["tunnel_public_keys"] = [keep_key]  # revoke the second key
        proxy.publish(data, loopback=False)
        done = proxy.reconcile()
        assert gone.wait(10) != 0, "the revoked key's session is still open"
        assert "CLOSED session of urtunnel from 127.0.0.1" in done.stderr and "was revoked" in done.stderr
        assert keep.poll() is None and through(tunnel_a) == b"hi\n"  # the other session never noticed
        again = subprocess.run(ssh("gone", "-N"), capture_output=True, text=True, timeout=30)
        assert again.returncode == 255 and "Permission denied" in again.stderr

        data["routes"].append({"name": "rb", "kind": "tunnel", "port": free_port(), "target": "b.corp.example:1",
                               "tunnel_port": tunnel_b, "probe": {"mode": "connect"}})
        refused = subprocess.run(ssh("keep", "-N", "-R", f"localhost:{tunnel_b}:127.0.0.1:1", "-o", "ConnectTimeout=5"),
                                 capture_output=True, text=True, timeout=30)
        assert "remote port forwarding failed" in refused.stderr  # not yet: the document has not arrived
        proxy.publish(data, loopback=False)
        proxy.reconcile()
        second = subprocess.Popen(ssh("keep", "-N", "-R", f"localhost:{tunnel_b}:127.0.0.1:{echo.sock.getsockname()[1]}"),
                                  stderr=subprocess.PIPE, text=True)
        processes.append(second)
        assert listening(tunnel_b) and through(tunnel_b) == b"hi\n"
        assert keep.poll() is None and through(tunnel_a) == b"hi\n"  # sshd's reload left the first session alone
        echo.close()
    finally:
        for process in reversed(processes):
            stop(process)
        shutil.rmtree(work, ignore_errors=True)
