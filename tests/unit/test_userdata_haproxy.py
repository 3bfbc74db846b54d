"""The rendered HAProxy config (the static part and the document's routes file, two ``-f`` as the
unit drop-in runs them) running for real (Debian's HAProxy 2.6) in a network namespace.

The namespace (``udhap-*``) has its own loopback and, through ``/etc/netns/<ns>/resolv.conf``, its
own resolver: a fake DNS server inside it answers the forward route's name, so the config's
``parse-resolv-conf`` is exercised unchanged. A helper process inside the namespace plays the
tunnel listener, two remote addresses and the client. Checked: the tunnel route reaches the
loopback tunnel port, the forward route follows a changed DNS answer (the time is printed), a
route's maxconn holds extra connections back, tcplog lines reach HAProxy's stdout (journald
on the proxy), and HAProxy's own Prometheus exporter (the routes file's ``tunnelhub_metrics``
frontend, Debian's haproxy is built with it: ``haproxy -vv`` lists ``prometheus-exporter``) answers
the health daemon with the route figures ``GET /metrics`` re-serves.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import aws_hub, load_hubs
from tunnelhub.userdata import document as D
from tunnelhub.userdata import render as R

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("haproxy") is None or shutil.which("ip") is None
    or shutil.which("unshare") is None or not Path("/var/lib/haproxy").is_dir(),
    reason="needs root, haproxy (Debian package), iproute2 and unshare",
)

TUNNEL_PORT, DB_PORT, SVC_PORT, REMOTE_PORT, HEALTH_PORT = 13306, 3306, 8443, 9443, 8080
FOLLOW_BOUND_S = 25.0  # generous loop bound; the design: ~1 s after the resolver returns the new address

HELPER = r'''
import socket, struct, sys, threading, time
state = {"ip": "127.0.0.2"}

def dns():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))
    while True:
        query, peer = sock.recvfrom(4096)
        i = 12
        while query[i]:
            i += query[i] + 1
        qtype = struct.unpack(">H", query[i + 1:i + 3])[0]
        question = query[12:i + 5]
        answer = b""
        if qtype == 1:
            answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 1, 4) + socket.inet_aton(state["ip"])
        header = query[:2] + struct.pack(">HHHHH", 0x8180, 1, 1 if answer else 0, 0, 0)
        sock.sendto(header + question + answer, peer)

def banner(address, port, text):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(64)
    def serve(conn):
        with conn:
            conn.sendall(text.encode() + b"\n")
            while conn.recv(100):
                pass
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

def read(conn, timeout):
    conn.settimeout(timeout)
    try:
        return conn.recv(100).decode().strip() or "CLOSED"
    except socket.timeout:
        return "TIMEOUT"

def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=3)

def agent():
    """The health daemon's place on the health port: the plain check connects, the agent reads "up"
    (the real daemon answers it from its checks: test_proxy_dataplane.py)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", HEALTH_PORT))
    sock.listen(64)
    while True:
        conn, _ = sock.accept()
        with conn:
            try:
                conn.settimeout(1)
                conn.recv(200)
                conn.sendall(b"up\n")
            except OSError:
                pass

threading.Thread(target=dns, daemon=True).start()
threading.Thread(target=agent, daemon=True).start()
for address, port, text in [("127.0.0.1", TUNNEL_PORT, "tunnel"), ("127.0.0.2", REMOTE_PORT, "remote-A"),
                            ("127.0.0.3", REMOTE_PORT, "remote-B")]:
    threading.Thread(target=banner, args=(address, port, text), daemon=True).start()
time.sleep(0.3)
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    try:
        if cmd[0] == "dns":
            state["ip"] = cmd[1]
            print("ok", flush=True)
        elif cmd[0] == "get":
            with connect(int(cmd[1])) as conn:
                print(read(conn, 3), flush=True)
        elif cmd[0] == "maxconn":
            conns = [connect(int(cmd[1])) for _ in range(3)]
            first = [read(c, 1.5) for c in conns]
            conns[0].close()
            later = read(conns[2], 3)
            print(",".join(first) + " then " + later, flush=True)
            for c in conns[1:]:
                c.close()
    except OSError as exc:
        print(f"ERROR {exc}", flush=True)
'''.replace("TUNNEL_PORT", str(TUNNEL_PORT)).replace("REMOTE_PORT", str(REMOTE_PORT)).replace(
    "HEALTH_PORT", str(HEALTH_PORT))


def hub():
    return load_hubs(aws_hub(routes=[
        {"name": "db", "kind": "tunnel", "port": DB_PORT, "target": "db.corp.example:3306", "tunnel_port": TUNNEL_PORT,
         "max_connections": 2},
        {"name": "svc", "kind": "forward", "port": SVC_PORT, "target": f"svc.example.test:{REMOTE_PORT}"},
    ])).hubs[0]


class Namespace:
    def __init__(self, tmp_path: Path):
        self.name = f"udhap-{secrets.token_hex(3)}"
        self.etc = Path("/etc/netns") / self.name
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=30)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, timeout=30)
        self.etc.mkdir(parents=True)
        (self.etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        self.processes: list[subprocess.Popen] = []
        self.tmp = tmp_path

    def start(self, args: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(["ip", "netns", "exec", self.name, *args], **kwargs)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
        subprocess.run(["ip", "netns", "del", self.name], check=False, timeout=30)
        shutil.rmtree(self.etc, ignore_errors=True)


@pytest.fixture
def lab(tmp_path):
    ns = Namespace(tmp_path)
    try:
        helper = ns.start([sys.executable, "-u", "-c", HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True)
        assert helper.stdout.readline().strip() == "ready"
        config, routes = tmp_path / "haproxy.cfg", tmp_path / "tunnelhub-routes.cfg"
        config.write_text(R.haproxy_base_config(hub()))
        routes.write_text(D.haproxy_routes_config(hub()))
        Path("/run/haproxy").mkdir(exist_ok=True)
        log = open(tmp_path / "haproxy.log", "w")  # noqa: SIM115 - closed below
        # A private /run/haproxy (the stats socket) so nothing on the host is touched.
        haproxy = ns.start(["unshare", "--mount", "sh", "-c",
                            f"mount -t tmpfs tmpfs /run/haproxy && exec haproxy -db -f {config} -f {routes}"],
                           stdout=log, stderr=subprocess.STDOUT)

        def ask(command: str) -> str:
            helper.stdin.write(command + "\n")
            helper.stdin.flush()
            return helper.stdout.readline().strip()

        deadline = time.monotonic() + 15
        while ask(f"get {DB_PORT}") != "tunnel":
            assert time.monotonic() < deadline, (tmp_path / "haproxy.log").read_text()
            time.sleep(0.2)
        yield ask, tmp_path / "haproxy.log", haproxy.pid  # ip netns exec and unshare exec: HAProxy's pid
        log.close()
    finally:
        ns.close()


def test_tunnel_route_reaches_the_loopback_tunnel_port(lab):
    ask, *_ = lab
    assert ask(f"get {DB_PORT}") == "tunnel"


def test_forward_route_follows_a_changed_dns_answer(lab):
    ask, log, _ = lab
    deadline = time.monotonic() + 15
    while (answer := ask(f"get {SVC_PORT}")) != "remote-A":  # init-addr none: up once resolved
        assert time.monotonic() < deadline, answer + log.read_text()
        time.sleep(0.2)
    assert ask("dns 127.0.0.3") == "ok"
    changed = time.monotonic()
    while (answer := ask(f"get {SVC_PORT}")) != "remote-B":
        assert answer == "remote-A", answer
        assert time.monotonic() - changed < FOLLOW_BOUND_S, "HAProxy did not follow the new address"
        time.sleep(0.25)
    followed = time.monotonic() - changed
    print(f"forward route followed the new DNS answer after {followed:.1f} s")
    assert followed <= 5  # timeout resolve 1 s, hold obsolete 0 s (with 30 s it took 30 s)


def test_route_maxconn_holds_extra_connections_back(lab):
    ask, *_ = lab
    # max_connections 2: the third connection waits until one of the first two closes
    assert ask(f"maxconn {DB_PORT}") == "tunnel,tunnel,TIMEOUT then tunnel"


def test_connections_are_logged_in_tcplog_format(lab):
    ask, log, _ = lab
    assert ask(f"get {DB_PORT}") == "tunnel"
    deadline = time.monotonic() + 10
    while " db db/tunnel-host " not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    line = next(ln for ln in log.read_text().splitlines() if " db db/tunnel-host " in ln)
    assert line.startswith("<6>")  # "format short": the severity (info) prefix journald reads as the priority


METRICS_SCRIPT = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
import tunnelhub_health as health
config = health.parse_config(json.loads(sys.argv[2]))
daemon = health.HealthDaemon(config, check=lambda *a: None, host_key_status="/nonexistent")
print(health.render_metrics(daemon, time.monotonic()), end="")
'''


def test_haproxy_exporter_figures_reach_the_health_metrics(lab, tmp_path):
    """The health daemon's HAProxy part (HaproxyMetrics + render_metrics, in HAProxy's mount and
    network namespaces: the socket is in the lab's private /run/haproxy) reads the real exporter
    through the rendered routes file; parsed back with prometheus_client's text-format parser. The
    family names and the ``proxy`` label are HAProxy 2.6's (addons/promex/service-prometheus.c).
    It runs as an unprivileged uid outside the haproxy group with the system python3 (stdlib only),
    as the DynamicUser health unit does: the socket's ``mode 666`` must let it in."""
    from prometheus_client.parser import text_string_to_metric_families

    ask, _, pid = lab
    for _ in range(3):
        assert ask(f"get {DB_PORT}") == "tunnel"
    files = Path(R.__file__).resolve().parent / "files"
    out = subprocess.run(["nsenter", "-t", str(pid), "-m", "-n", "setpriv", "--reuid=65534", "--regid=65534",
                          "--clear-groups", "/usr/bin/python3", "-c", METRICS_SCRIPT, str(files),
                          json.dumps(D.health_config(hub()))], capture_output=True, text=True, timeout=30, check=True)
    families = {f.name: f for f in text_string_to_metric_families(out.stdout)}
    up = [s.value for s in families["tunnelhub_haproxy_up"].samples]
    assert up == [1.0], out.stdout

    def per_route(name):
        return {s.labels["route"]: s.value for s in families[name].samples if s.name.endswith(("_total", name))}

    assert per_route("haproxy_frontend_sessions")["db"] >= 3  # the three connections above
    assert per_route("haproxy_backend_sessions")["db"] >= 3
    assert per_route("haproxy_frontend_limit_sessions") == {"db": 2.0, "svc": 1000.0}  # max_connections
    assert set(per_route("haproxy_backend_current_queue")) == {"db", "svc"}  # not tunnelhub_metrics
    assert families["haproxy_backend_connection_errors"].type == "counter"
    print(f"HAProxy figures for db: {per_route('haproxy_frontend_sessions')['db']:g} sessions,"
          f" exposition {len(out.stdout)} bytes")
