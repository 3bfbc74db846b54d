"""The per-host data plane for real: two proxies, two tunnel hosts, real HAProxy 2.6, real health daemons.

Two network namespaces play two proxies of one Azure hub (their NIC addresses are the hub's proxy
addresses, ``peer_addresses(hub)``, on a veth pair). Each runs the rendered HAProxy configuration
unchanged (the static part and the document's routes file, as the unit drop-in runs them; a third
``-f`` adds only a stats socket for the test to read the server states) and the real health daemon
with the document's ``health.json``. Stand-in tunnel listeners (one per tunnel host, on the host's
loopback port, as sshd's ``-R`` listeners are) answer every connection with a banner naming the proxy
and the host, and count their accepts; they can be stopped (the ``-R`` listener gone), made silent (a
half-open session: accepted, nothing comes back) and started again. A client inside proxy 0 opens new
connections through ``listen db`` continuously and records, per connection, who answered.

What HAProxy does here is its documented behaviour (HAProxy 2.6 configuration.txt):

* 5.2 ``agent-check``: the agent's reply is one line of words; ``down`` (with ``#<description>``) marks
  the server DOWN, ``up`` brings it back "if health checks also report that the service is
  accessible"; "failure to connect to the agent is not considered an error" (src/check.c
  ``check_notify_failure``: only an L7STS status from the agent marks a server down; agent rise and
  fall are 1: ``DEF_AGENT_RISETIME``/``DEF_AGENT_FALLTIME``).
* 5.2 ``observe layer4`` + ``error-limit 1`` + ``on-error mark-down``: "mark the server immediately
  down" at its first failed connect; it comes back only when the check (``rise``) and the agent agree
  (``check_notify_success``).
* 4.2 ``retries`` + ``option redispatch 1``: a refused connect is retried, on another server at every
  retry ("a turn-around timer of min("timeout connect", one second) is applied before a retry";
  src/backend.c ``back_handle_st_cer`` skips it only for a redispatch under a round-robin algorithm
  with more than one active server, so under leastconn a retried connection takes up to 1 s longer,
  measured below).
* 5.2 ``backup`` + 4.2 ``option allbackups``: the peers' peer ports carry the route only when no tunnel
  host is up on this proxy, spread over every live peer.

Measured and printed: failed connections, the connect latency of the retried ones, the time to DOWN
and back UP; and that no check ever reaches a tunnel listener (every accept on a stand-in is either a
client connection or one of the health daemon's own checks, one per interval per host).
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import SECOND_TUNNEL_KEY, TUNNEL_KEY, azure_hub, load_hubs
from tunnelhub.userdata import document as D
from tunnelhub.userdata import render as R

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("haproxy") is None or shutil.which("ip") is None
    or shutil.which("unshare") is None or not Path("/var/lib/haproxy").is_dir(),
    reason="needs root, haproxy (Debian package), iproute2 and unshare",
)

FILES = Path(R.__file__).resolve().parent / "files"
DB_PORT, TUNNEL_PORT, PEER_PORT, HEALTH_PORT = 3306, 13306, 23306, 8080
INTERVAL_S = TIMEOUT_S = 1.0
HOSTS = ("host-a", "host-b")
OUTSIDER = "10.60.0.50"  # in the hub's subnet, not a proxy: the peer port must refuse it
SLACK_S = 1.5

STANDIN = r'''
import json, socket, sys, threading
proxy, ports = sys.argv[1], json.loads(sys.argv[2])
state = {h: {"listener": None, "silent": False, "accepts": 0, "held": []} for h in ports}
lock = threading.Lock()

def serve(host, sock):
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with lock:
            st = state[host]
            st["accepts"] += 1
            if st["silent"]:
                st["held"].append(conn)  # accepted, nothing comes back: a half-open tunnel
                continue
        try:
            conn.sendall(f"{proxy} {host}\n".encode())
        except OSError:
            pass
        threading.Thread(target=drain, args=(conn,), daemon=True).start()

def drain(conn):
    try:
        while conn.recv(100):
            pass
    except OSError:
        pass
    conn.close()

def start(host):
    if state[host]["listener"] is not None:
        return
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", ports[host]))
    sock.listen(128)
    state[host]["listener"] = sock
    threading.Thread(target=serve, args=(host, sock), daemon=True).start()

def stop(host):
    sock = state[host]["listener"]
    state[host]["listener"] = None
    if sock is not None:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

for h in ports:
    start(h)
print("ready", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    with lock:
        if cmd == "stop":
            stop(args[0])
        elif cmd == "start":
            start(args[0])
        elif cmd == "silent":
            state[args[0]]["silent"] = True
        elif cmd == "answer":
            state[args[0]]["silent"] = False
            for conn in state[args[0]]["held"]:
                conn.close()
            state[args[0]]["held"] = []
        print(json.dumps({h: st["accepts"] for h, st in state.items()}), flush=True)
'''

CLIENT = r'''
import json, socket, sys, threading, time
port, pause, source = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
address = sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1"
out = threading.Lock()

def one():
    start = time.monotonic()
    answer, connected = None, None
    try:
        sock = socket.socket()
        sock.settimeout(3)
        if source != "-":
            sock.bind((source, 0))
        sock.connect((address, port))
        connected = time.monotonic() - start
        data = sock.recv(100).decode().strip()
        answer = data or "FAIL closed"
        sock.close()
    except OSError as exc:
        answer = f"FAIL {type(exc).__name__}"
    with out:
        print(json.dumps({"t": start, "answer": answer, "connect_s": connected, "s": time.monotonic() - start}),
              flush=True)

if pause < 0:
    one()
    sys.exit(0)
while True:  # a new connection every pause s, each in its own thread: a hung one holds back no other
    threading.Thread(target=one, daemon=True).start()
    time.sleep(pause)
'''


def hub():
    return load_hubs(azure_hub(
        routes=[{"name": "db", "kind": "tunnel", "port": DB_PORT, "target": "db.corp.example:5000",
                 "tunnel_port": TUNNEL_PORT, "peer_port": PEER_PORT,
                 "probe": {"mode": "banner", "interval_s": INTERVAL_S, "timeout_s": TIMEOUT_S}}],
        onprem={"source_cidrs": ["192.168.10.0/24"],
                "tunnel_hosts": [{"name": "host-a", "public_keys": [TUNNEL_KEY]},
                                 {"name": "host-b", "public_keys": [SECOND_TUNNEL_KEY]}]},
    )).hubs[0]


class Proxy:
    """One proxy namespace: the rendered HAProxy, the real health daemon, the stand-in listeners."""

    def __init__(self, lab: Lab, slot: int, address: str):
        self.lab, self.slot, self.address = lab, slot, address
        self.ns = f"h2dp{slot}-{lab.tag}"
        self.dir = lab.tmp / f"p{slot}"
        self.dir.mkdir()
        self.stats = self.dir / "stats.sock"
        subprocess.run(["ip", "netns", "add", self.ns], check=True, timeout=30)
        subprocess.run(["ip", "-n", self.ns, "link", "set", "lo", "up"], check=True, timeout=30)

    def run(self, args: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(["ip", "netns", "exec", self.ns, *args], **kwargs)
        self.lab.processes.append(process)
        return process

    def start(self, hub) -> None:
        ports = {h.name: hub.host_tunnel_port(hub.route("db"), h) for h in hub.tunnel_hosts}
        self.standin = self.run([sys.executable, "-u", "-c", STANDIN, f"p{self.slot}", json.dumps(ports)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.standin.stdout.readline().strip() == "ready"
        (self.dir / "health.json").write_text(json.dumps(D.health_config(hub)))
        self.health_log = open(self.dir / "health.log", "w")  # noqa: SIM115 - closed by the lab
        self.run(["/usr/bin/python3", str(FILES / "tunnelhub_health.py"), "--config", str(self.dir / "health.json"),
                  "--haproxy-metrics", "none", "--host-key-status", "/nonexistent"],
                 stdout=self.health_log, stderr=subprocess.STDOUT)
        base, routes, extra = self.dir / "haproxy.cfg", self.dir / "routes.cfg", self.dir / "stats.cfg"
        base.write_text(R.haproxy_base_config(hub))
        routes.write_text(D.haproxy_routes_config(hub))
        extra.write_text(f"global\n    stats socket {self.stats} mode 600 level admin\n")
        Path("/run/haproxy").mkdir(exist_ok=True)
        self.haproxy_log = open(self.dir / "haproxy.log", "w")  # noqa: SIM115 - closed by the lab
        self.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /run/haproxy && exec haproxy -db "
                  f"-f {base} -f {routes} -f {extra}"], stdout=self.haproxy_log, stderr=subprocess.STDOUT)

    def standin_command(self, command: str) -> dict[str, int]:
        self.standin.stdin.write(command + "\n")
        self.standin.stdin.flush()
        return json.loads(self.standin.stdout.readline())

    def accepts(self) -> dict[str, int]:
        return self.standin_command("count")

    def haproxy(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
        return b"".join(chunks).decode()

    def servers(self, proxy: str = "db") -> dict[str, dict[str, str]]:
        """``show stat`` rows of one listen section, by server: status, check and agent descriptions."""
        try:
            text = self.haproxy("show stat").lstrip("# ")
        except OSError:
            return {}
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == proxy and row["svname"] not in ("FRONTEND", "BACKEND")}

    def state(self, server: str, proxy: str = "db") -> str:
        return self.servers(proxy).get(server, {}).get("status", "?")

    def health(self, path: str) -> tuple[int, str]:
        out = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c",
                              "import sys, urllib.request, urllib.error\n"
                              "try:\n"
                              f"    r = urllib.request.urlopen('http://127.0.0.1:{HEALTH_PORT}{path}', timeout=3)\n"
                              "    print(r.status); print(r.read().decode())\n"
                              "except urllib.error.HTTPError as e:\n"
                              "    print(e.code); print(e.read().decode())\n"],
                             capture_output=True, text=True, timeout=30, check=True)
        code, _, body = out.stdout.partition("\n")
        return int(code), body

    def raw(self, data: bytes, address: str = "127.0.0.1", port: int = HEALTH_PORT) -> bytes:
        """What a raw TCP client (HAProxy's agent) reads after sending ``data``."""
        out = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c",
                              "import socket, sys\n"
                              f"s = socket.create_connection(({address!r}, {port}), timeout=3)\n"
                              f"s.sendall({data!r})\n"
                              "chunks = []\n"
                              "while (d := s.recv(4096)):\n"
                              "    chunks.append(d)\n"
                              "sys.stdout.write(repr(b''.join(chunks)))\n"],
                             capture_output=True, text=True, timeout=30, check=True)
        return eval(out.stdout)  # noqa: S307 - our own repr of bytes


class Client:
    """New connections through a port in a namespace, one every ``pause`` s, recorded per connection."""

    def __init__(self, proxy: Proxy, port: int = DB_PORT, pause: float = 0.05, source: str = "-",
                 address: str = "127.0.0.1"):
        self.process = proxy.run([sys.executable, "-u", "-c", CLIENT, str(port), str(pause), source, address],
                                 stdout=subprocess.PIPE, text=True)
        self.results: list[dict] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.results.append(json.loads(line))

    def since(self, t: float) -> list[dict]:
        return [r for r in self.results if r["t"] >= t]

    def stop(self) -> list[dict]:
        time.sleep(3.2)  # the last connections finish (3 s read timeout)
        self.process.terminate()
        self.process.wait(10)
        self._thread.join(5)
        return self.results


class Lab:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.tag = secrets.token_hex(2)
        self.processes: list[subprocess.Popen] = []
        self.hub = hub()
        addresses = D.peer_addresses(self.hub)
        self.proxies = [Proxy(self, slot, address) for slot, address in enumerate(addresses)]
        p0, p1 = self.proxies
        subprocess.run(["ip", "-n", p0.ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                        "netns", p1.ns], check=True, timeout=30)
        for p in self.proxies:
            subprocess.run(["ip", "-n", p.ns, "addr", "add", f"{p.address}/24", "dev", "eth0"], check=True, timeout=30)
            subprocess.run(["ip", "-n", p.ns, "link", "set", "eth0", "up"], check=True, timeout=30)
        subprocess.run(["ip", "-n", p0.ns, "addr", "add", f"{OUTSIDER}/24", "dev", "eth0"], check=True, timeout=30)

    def start(self) -> None:
        for p in self.proxies:
            p.start(self.hub)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
        for p in self.proxies:
            for log in ("health_log", "haproxy_log"):
                if hasattr(p, log):
                    getattr(p, log).close()
            subprocess.run(["ip", "netns", "del", p.ns], check=False, timeout=30)

    def logs(self) -> str:
        return "\n".join(f"--- p{p.slot} {name}\n" + (p.dir / name).read_text()[-3000:]
                         for p in self.proxies for name in ("haproxy.log", "health.log"))

    def restore(self) -> None:
        """Every stand-in listening and answering; every tunnel-host server UP everywhere."""
        for p in self.proxies:
            for h in HOSTS:
                p.standin_command(f"answer {h}")
        for p in self.proxies:
            for h in HOSTS:
                p.standin_command(f"start {h}")
        self.wait(lambda: all(p.state(h, px).startswith("UP") for p in self.proxies for h in HOSTS
                              for px in ("db", "db_peer")), 20, "every tunnel-host server UP")

    def wait(self, predicate, timeout_s: float, what: str) -> float:
        """Seconds until ``predicate()`` holds (polled every 50 ms)."""
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout_s:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{self.logs()}")
            time.sleep(0.05)
        return time.monotonic() - start


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("dataplane"))
    try:
        lab.start()
        lab.wait(lambda: all(p.state("peer_1" if p.slot == 0 else "peer_0").startswith("UP") for p in lab.proxies)
                 and all(p.state(h).startswith("UP") for p in lab.proxies for h in HOSTS), 30, "the lab up")
        yield lab
    finally:
        lab.close()


@pytest.fixture
def fresh(lab):
    lab.restore()
    yield lab
    lab.restore()


def failures(results: list[dict]) -> list[dict]:
    return [r for r in results if r["answer"].startswith("FAIL")]


def test_the_rendered_servers_and_the_self_entry(fresh):
    """The rendered ``listen db`` has one server per tunnel host and every slot as a backup; on its own
    proxy the self entry is DOWN by its agent (``down #self``), the peer's UP (both agents parsed by the
    real HAProxy: configuration.txt 5.2 ``agent-check``)."""
    lab = fresh
    p0, p1 = lab.proxies
    assert set(p0.servers()) == {"host-a", "host-b", "peer_0", "peer_1"}
    assert set(p0.servers("db_peer")) == {"host-a", "host-b"}  # the peer path: no backups, no loop
    lab.wait(lambda: p0.state("peer_0").startswith("DOWN") and p1.state("peer_1").startswith("DOWN"), 10,
             "each proxy's own backup entry DOWN")
    row = p0.servers()["peer_0"]
    assert "self" in row.get("last_agt", "") + row.get("agent_desc", ""), row
    assert p0.state("peer_1").startswith("UP") and p1.state("peer_0").startswith("UP")


def test_the_agent_reply_is_a_raw_line_haproxy_parses(fresh):
    """``GET /agent/<route>/<host>`` and ``GET /agent/<route>`` answer one agent line and close: no
    HTTP status line (HAProxy reads the first line as the agent's words, src/tcpcheck.c
    ``tcpcheck_agent_expect_reply``)."""
    p0, _ = fresh.proxies
    assert p0.raw(b"GET /agent/db/host-a HTTP/1.0\r\n\r\n") == b"up\n"
    assert p0.raw(b"GET /agent/db HTTP/1.0\r\n\r\n") == b"up\n"
    # the same route asked by this proxy from its own address: its peer_0 entry
    assert p0.raw(b"GET /agent/db HTTP/1.0\r\n\r\n", address=p0.address).startswith(b"down #self")
    assert p0.raw(b"GET /agent/db/nobody HTTP/1.0\r\n\r\n").startswith(b"down #route 'db' has no tunnel host")
    code, body = p0.health("/routes/db")
    status = json.loads(body)
    assert code == 200 and set(status["hosts"]) == set(HOSTS) and status["hosts_up"] == 2
    assert all(h["healthy"] and h["reason"].startswith("banner received") for h in status["hosts"].values())


def test_a_dead_listener_fails_no_new_connection_and_its_server_goes_down(fresh):
    """(a) host A's listener on proxy 0 is gone (its ssh -R dropped): the first connection sent to it
    is refused, HAProxy marks A DOWN at once (``observe layer4 error-limit 1 on-error mark-down``) and
    retries it on B (``retries`` + ``option redispatch 1``); then the agent (``down #connection
    refused``) keeps it DOWN. No new connection fails. Then (d): A's listener comes back and A is UP
    again after the daemon's next check and the next agent poll (agent-inter min(I, 1 s))."""
    lab = fresh
    p0, _ = lab.proxies
    client = Client(p0)
    time.sleep(2)
    stopped = time.monotonic()
    p0.standin_command("stop host-a")
    down = lab.wait(lambda: p0.state("host-a").startswith("DOWN"), 10, "host-a DOWN")
    time.sleep(4)  # past the daemon's check and the agent poll: A stays DOWN on the agent's word
    assert p0.state("host-a").startswith("DOWN")
    row = p0.servers()["host-a"]
    restarted = time.monotonic()
    p0.standin_command("start host-a")
    up = lab.wait(lambda: p0.state("host-a").startswith("UP"), 15, "host-a UP again")
    time.sleep(1)
    results = client.stop()
    during = [r for r in results if r["t"] >= stopped]
    failed = failures(during)
    after = [r for r in results if stopped + down + 0.5 <= r["t"] < restarted]
    slow = max(r["s"] for r in during)
    retried = [r for r in during if r["s"] > 0.5]
    print(f"(a) listener killed: {len(during)} new connections, {len(failed)} failed; host-a DOWN after "
          f"{down:.2f} s; {len(retried)} retried (slowest {slow:.2f} s: the retry turn-around); agent: "
          f"{row.get('last_agt')!r}")
    print(f"(d) listener back: host-a UP after {up:.2f} s")
    assert not failed, failed
    assert after and all(r["answer"] == "p0 host-b" for r in after), after[:5]
    assert "connection refused" in row.get("last_agt", ""), row
    assert up <= INTERVAL_S + min(INTERVAL_S, 1.0) + SLACK_S
    assert slow <= 1.0 + SLACK_S  # the retry turn-around: min(timeout connect, 1 s)


def test_both_local_listeners_dead_the_peer_carries_the_route(fresh):
    """(b) both tunnel hosts' listeners on proxy 0 are gone (lab scenario 2 on a one-host hub): the
    connections go to proxy 1's peer port (``backup`` + ``option allbackups``), which reaches proxy 1's
    own tunnels. No new connection fails; the route stays up on proxy 1 (and proxy 0's LB probe
    answers 503 once its own checks fail: the LB moves off it, but no connection waits for that)."""
    lab = fresh
    p0, p1 = lab.proxies
    client = Client(p0)
    time.sleep(2)
    stopped = time.monotonic()
    p0.standin_command("stop host-a")
    p0.standin_command("stop host-b")
    lab.wait(lambda: p0.state("host-a").startswith("DOWN") and p0.state("host-b").startswith("DOWN"), 10,
             "both local servers DOWN")
    lab.wait(lambda: p0.health("/routes/db")[0] == 503, 10, "proxy 0's route down in its health endpoint")
    time.sleep(3)
    peer_accepts = p1.servers("db_peer")
    results = client.stop()
    during = [r for r in results if r["t"] >= stopped]
    failed = failures(during)
    by_peer = [r for r in during if r["answer"].startswith("p1 ")]
    retried = [r for r in during if r["s"] > 0.5]
    print(f"(b) both local listeners dead: {len(during)} new connections, {len(failed)} failed, "
          f"{len(by_peer)} carried by proxy 1's peer path, {len(retried)} retried (slowest "
          f"{max(r['s'] for r in during):.2f} s); "
          f"db_peer sessions on proxy 1: {sum(int(r['stot'] or 0) for r in peer_accepts.values())}")
    assert not failed, failed
    assert len(by_peer) >= len(during) - 3 and by_peer
    assert p1.health("/routes/db")[0] == 200


def test_a_half_open_host_gets_no_new_connection_once_its_agent_says_down(fresh):
    """(c) host A's tunnel is half-open on proxy 0 (its listener accepts, nothing comes back): nothing
    at connect time shows it, so connections sent to A in the detection window hang; the daemon's
    banner check times out (probe timeout), its agent answers ``down #...`` and HAProxy marks A DOWN
    (agent fall 1). Bound: interval + timeout + agent-inter (+ slack); after that A gets no new
    connection. The connections that failed in the window are counted."""
    lab = fresh
    p0, _ = lab.proxies
    client = Client(p0)
    time.sleep(2)
    silent = time.monotonic()
    p0.standin_command("silent host-a")
    down = lab.wait(lambda: p0.state("host-a").startswith("DOWN"), 15, "host-a DOWN by its agent")
    before = p0.accepts()["host-a"]
    time.sleep(4)
    landed = p0.accepts()["host-a"] - before  # the daemon's own checks only (one per interval)
    results = client.stop()
    window = [r for r in results if silent <= r["t"] < silent + down]
    failed = failures(window)
    after = [r for r in results if r["t"] >= silent + down + 0.2]
    row = p0.servers()["host-a"]
    print(f"(c) half-open host-a: DOWN after {down:.2f} s (bound {INTERVAL_S + TIMEOUT_S + min(INTERVAL_S, 1):.1f} s + "
          f"slack); {len(failed)} of {len(window)} new connections in that window failed; after: "
          f"{len(failures(after))} of {len(after)} failed; accepts on host-a in 4 s after DOWN: {landed} "
          f"(the daemon's checks); agent: {row.get('last_agt')!r}")
    assert down <= INTERVAL_S + TIMEOUT_S + min(INTERVAL_S, 1.0) + SLACK_S
    assert not failures(after)
    assert landed <= 4 / INTERVAL_S + 1  # no client connection, only the daemon's checks
    assert "no banner" in row.get("last_agt", ""), row


def test_the_peer_port_refuses_a_source_that_is_not_a_peer(fresh):
    """(e) proxy 1's peer port answers proxy 0's address and refuses anything else
    (``tcp-request connection reject unless { src <peers> }``, configuration.txt 4.2): a machine in
    the subnet that is not a proxy, and proxy 1 itself through its loopback."""
    lab = fresh
    p0, p1 = lab.proxies

    def once(proxy, source, address):
        client = Client(proxy, port=PEER_PORT, pause=-1, source=source, address=address)
        client.process.wait(10)
        client._thread.join(5)
        return client.results[0]["answer"]

    assert once(p0, p0.address, p1.address).startswith("p1 host-")
    assert once(p0, OUTSIDER, p1.address).startswith("FAIL")
    assert once(p1, "-", "127.0.0.1").startswith("FAIL")
    print(f"(e) peer port {PEER_PORT}: from {p0.address} served; from {OUTSIDER} and 127.0.0.1 refused")


def test_no_check_connects_to_a_tunnel_listener(fresh):
    """(f) idle: every accept on a stand-in is one of the health daemon's own checks (one per
    interval per host: its ``checks`` count), none is HAProxy's (its checks and agents go to the
    health port only: ``check port``, ``agent-port``)."""
    lab = fresh
    before = [(p.accepts(), json.loads(p.health("/routes/db")[1])["hosts"]) for p in lab.proxies]
    time.sleep(6)
    for p, (accepts, hosts) in zip(lab.proxies, before):
        now_accepts, now_hosts = p.accepts(), json.loads(p.health("/routes/db")[1])["hosts"]
        for h in HOSTS:
            accepted = now_accepts[h] - accepts[h]
            checked = now_hosts[h]["checks"] - hosts[h]["checks"]
            print(f"(f) p{p.slot} {h}: {accepted} accepts in 6 s idle, {checked} daemon checks")
            assert abs(accepted - checked) <= 1, (accepted, checked)
            assert accepted <= 6 / INTERVAL_S + 1
