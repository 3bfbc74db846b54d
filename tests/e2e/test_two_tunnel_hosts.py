"""Issue 15: two on-prem tunnel hosts, active/active, in the lab, from the generated artifacts.

One lab for the module (``hub_lab(tunnel_hosts=2)``): tunnel host A (``th-a``) in the ``onprem``
namespace and tunnel host B (``th-b``) in ``onprem2``, both on the on-prem LAN (192.168.10.5 and
.6, each its key's ``source_cidrs``) and on the database LAN (192.168.20.5 and .6). The hub spec
names both in ``onprem.tunnel_hosts``; each host runs **its own package** (``build_deb(...,
tunnel_host=NAME)``: its key, its ports) with one unit instance per proxy slot under the unit
runner. Two proxies run what their rendered cloud-init and the hub document install: per route
one HAProxy server per tunnel host (its loopback port, an agent check answered by the health
daemon from its cached per-host check) and the other proxies as backup paths through their
``<route>-peer`` listener. HAProxy in ``lb`` stands in for the cloud load balancer (HTTP check
``GET /routes/labdb`` on each proxy, the spec defaults 5 s x 2).

A client opens a new connection and runs ``SELECT 1`` ten times a second through the LB, **open
loop** (each query in its own thread, so a path that hangs costs every query sent meanwhile, as
it would cost a pool of clients). A watcher samples, every 250 ms, the LB's state of each proxy
and each proxy's ``GET /routes/labdb``.

Scenarios (each starts from every tunnel of both hosts up and healthy on every proxy):

a. A's units stopped (every slot): 0 failed new connections, the route never down on any proxy
   (``/routes/labdb`` 200 throughout, the LB never marks a proxy DOWN), B carries everything;
   A started again rejoins by itself (healthy on every proxy, new connections reach the
   database from A's address again).
b. A's network cut silently (its gateway link dropped both ways, nothing killed): failures only
   inside the per-tunnel detection window (target <= 2 check intervals + 1 s); cut lifted -> A
   rejoins.
c. A killed entirely (SIGKILL to every process of every A unit, restarts held off 5 s as a
   crashed machine, then started as at boot): 0 failed; A rejoins.
d. A streaming reader (nslab.cdc) whose session rides on A resumes through B with every row
   exactly once after A's units stop.
f. A's key (A's package ssh_config) cannot open B's port on a real proxy sshd: refused, and sshd
   logs the denial.

Scenario e (one tunnel host, one proxy's tunnel killed: issue 8's scenario 2 rerun with the peer
backup path) runs in ``test_tunnel_path.py`` on the single-host hub.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest
from nslab.cdc import RowWriter, StreamingReader
from nslab.client import Endpoint, OpenLoopDriver, QueryResult, summarize
from nslab.fixtures import module_lab
from nslab.hub import HEALTH_PORT, ROUTE_NAME, GeneratedHub, hub_lab, start_generated_hub
from nslab.lab import Lab
from nslab.netns import in_netns
from nslab.proc import wait_until
from nslab.report import record
from nslab.sshd import run_ssh

pytestmark = pytest.mark.e2e

A, B = "th-a", "th-b"
HOSTS = (A, B)
INTERVAL_S = 5.0  # the LB's probes: the spec defaults
THRESHOLD = 2
RATE_HZ = 10.0
IN_FLIGHT_S = 1.0  # a query that started just before an event may meet it
LOAD_MARGIN_S = 3.0  # a loaded 2-core machine: a check or a poll can start late (stated in the bound)
CUT_S = 12.0  # A's network dropped this long (longer than the detection window, shorter than ssh's 20 s)
CRASH_HOLD_S = 5.0  # a crashed A stays down this long before its units start again
REJOIN_BOUND_S = 45.0  # A's tunnels back and healthy on every proxy (a restart: RestartSec + handshake)
WRITER_USER, WRITER_PASSWORD = "labwriter", "writer-password"


# --------------------------------------------------------------------------------------------
# The lab, built once, reset before every scenario
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab2(request):  # type: ignore[no-untyped-def]
    yield from module_lab(request, lambda: hub_lab(tunnel_hosts=2))


@pytest.fixture(scope="module")
def hub2(lab2: Lab) -> GeneratedHub:
    db = lab2.start_db()
    # the on-prem writer of scenario d logs in as its own user, so the reader's sessions (user
    # "lab", from A's or B's address) are the only "lab" sessions the database sees
    db.sql(f"CREATE USER '{WRITER_USER}'@'%' IDENTIFIED BY '{WRITER_PASSWORD}';"
           f"GRANT INSERT, SELECT ON {db.app_database}.* TO '{WRITER_USER}'@'%';")
    built = start_generated_hub(lab2, tunnel_hosts=HOSTS)
    assert built.hub.multi_host and [h.name for h in built.hub.tunnel_hosts] == list(HOSTS)
    assert (built.hub.proxies.probe_interval_s, built.hub.proxies.probe_threshold) == (INTERVAL_S, THRESHOLD)
    assert built.tunnel_port(A) != built.tunnel_port(B)
    lab2.start_lb([built.route], check="http", interval_s=INTERVAL_S, threshold=THRESHOLD, health_port=HEALTH_PORT)
    for line in built.rewrites:
        lab2.notes.append(f"path rewritten for the lab: {line}")
    return built


def check_interval_s(hub: GeneratedHub) -> float:
    return hub.hub.routes[0].probe.interval_s


@pytest.fixture(autouse=True)
def healthy(hub2: GeneratedHub, lab2: Lab) -> None:
    """Reset: cuts lifted, every unit of both hosts running, each host healthy on every proxy,
    both proxies UP in the LB."""
    lab = lab2
    for a, b in lab.topology.cuts:
        lab.topology.restore(a, b)
    for runner in hub2.tunnels.values():
        if runner.state not in ("active", "activating", "activating (auto-restart)"):
            runner.start()
    for host in HOSTS:
        for proxy in lab.proxy_names:
            lab.wait_tunnel_listener(proxy, hub2.tunnel_port(host), timeout_s=REJOIN_BOUND_S)
    wait_until(lambda: all(all(host_states(lab, p).get(h) for h in HOSTS) for p in lab.proxy_names),
               timeout_s=REJOIN_BOUND_S, interval_s=0.2, what="both tunnel hosts healthy on every proxy")
    for proxy in lab.proxy_names:
        lab.lb.wait_state(hub2.backend, proxy, "UP", timeout_s=4 * INTERVAL_S * THRESHOLD)


# --------------------------------------------------------------------------------------------
# What the scenarios read
# --------------------------------------------------------------------------------------------


def route_status(lab: Lab, proxy: str, *, timeout_s: float = 2.0) -> tuple[int, dict]:
    """``GET /routes/labdb`` on ``proxy``'s health port, from the LB's namespace: (status, JSON)."""
    try:
        with in_netns(lab.topology.ns("lb")):
            conn = http.client.HTTPConnection(lab.topology.ip(proxy, "lb"), HEALTH_PORT, timeout=timeout_s)
            conn.connect()
        try:
            conn.request("GET", f"/routes/{ROUTE_NAME}")
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ValueError):
        return 0, {}


def hosts_of(body: dict) -> dict[str, dict]:
    """Each tunnel host's entry of a ``/routes/<name>`` answer, by host name."""
    hosts = body.get("hosts") or {}
    if isinstance(hosts, list):
        return {str(h.get("name") or h.get("host")): h for h in hosts}
    return dict(hosts)


def host_states(lab: Lab, proxy: str) -> dict[str, bool]:
    """host -> healthy, as ``proxy``'s health daemon reports it."""
    _, body = route_status(lab, proxy)
    return {name: bool(entry.get("healthy")) for name, entry in hosts_of(body).items()}


def proxy_server_status(lab: Lab, proxy: str, server: str) -> str:
    """The state of ``server`` in route labdb's listener of ``proxy``'s own HAProxy (its stats socket)."""
    haproxy = lab.proxies[proxy].services["haproxy"]
    return haproxy.servers().get((ROUTE_NAME, server), {}).get("status", "?")  # type: ignore[union-attr]


def lab_sessions_from(lab: Lab, address: str) -> int:
    """Logins of the client's user ("lab") from ``address`` so far (``performance_schema.accounts``:
    the check user's logins from the same host are not counted)."""
    assert lab.db is not None
    out = lab.db.sql("SELECT COALESCE(SUM(TOTAL_CONNECTIONS), 0) FROM performance_schema.accounts "
                     f"WHERE USER = '{lab.db.app_user}' AND HOST = '{address}'").stdout.strip()
    return int(out or 0)


def host_address(lab: Lab, hub: GeneratedHub, host: str) -> str:
    """The address the database sees ``host``'s sessions from."""
    return lab.topology.ip(hub.host(host).node, "db")


def client(lab: Lab) -> Endpoint:
    # bounded so a query on a hanging path fails after 3 s (the greeting never comes)
    return lab.endpoint(connect_timeout_s=3, read_timeout_s=3)


@dataclass
class Watch:
    """Samples, every 250 ms, the LB's state of each proxy and each proxy's ``/routes/labdb`` code."""

    lab: Lab
    backend: str
    samples: list[tuple[float, str, str, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Watch:
        self._thread = threading.Thread(target=self._run, name="route-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            servers = self.lab.lb.servers()
            for proxy in self.lab.proxy_names:
                code, _ = route_status(self.lab, proxy)
                self.samples.append((time.monotonic(), proxy, servers[(self.backend, proxy)]["status"], code))
            self._stop.wait(0.25)

    def stop(self) -> Watch:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return self

    def lb_states(self) -> str:
        return "/".join(dict.fromkeys(s for _, _, s, _ in self.samples))

    def codes(self) -> str:
        return "/".join(str(c) for c in dict.fromkeys(c for _, _, _, c in self.samples))

    def never_down(self) -> bool:
        return bool(self.samples) and all(s == "UP" and c == 200 for _, _, s, c in self.samples)


def wait_host(lab: Lab, host: str, healthy: bool, *, timeout_s: float, since: float) -> float:
    """Seconds from ``since`` until every proxy's health daemon reports ``host`` (un)healthy."""
    wait_until(lambda: all(host_states(lab, p).get(host) is healthy for p in lab.proxy_names),
               timeout_s=timeout_s, interval_s=0.1,
               what=f"{host} {'healthy' if healthy else 'unhealthy'} on every proxy")
    return time.monotonic() - since


def wait_server(lab: Lab, server: str, prefix: str, *, timeout_s: float, since: float) -> float:
    """Seconds from ``since`` until every proxy's HAProxy shows ``server``'s state starting with ``prefix``."""
    wait_until(lambda: all(proxy_server_status(lab, p, server).startswith(prefix) for p in lab.proxy_names),
               timeout_s=timeout_s, interval_s=0.1, what=f"server {server} {prefix} in every proxy's HAProxy")
    return time.monotonic() - since


def failed(results: list[QueryResult]) -> list[QueryResult]:
    return [r for r in results if not r.ok]


def stop_units(runners: list) -> None:  # type: ignore[type-arg]
    """``systemctl stop`` of several units at once (as ``systemctl stop 'unit@*'`` does)."""
    threads = [threading.Thread(target=r.stop) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)


# --------------------------------------------------------------------------------------------
# a. A's units stopped
# --------------------------------------------------------------------------------------------


def test_a_host_stopped_costs_no_connection_and_rejoins_by_itself(hub2: GeneratedHub, lab2: Lab) -> None:
    """Every unit of tunnel host A stopped (``systemctl stop``: ssh exits, sshd on each proxy closes
    A's listeners). A connection that a proxy's HAProxy sends to A's dead listener is refused and
    redispatched to B at once (``retries`` + ``option redispatch``, HAProxy configuration manual
    4.2); the agent check marks A down within a check interval. Target and bound: 0 failed new
    connections; every proxy's ``/routes/labdb`` 200 and the LB's state UP in every sample; then A
    healthy again on every proxy after its units start, and new connections reach the database from
    A's address again."""
    lab, hub = lab2, hub2
    a_address, b_address = host_address(lab, hub, A), host_address(lab, hub, B)
    watch = Watch(lab, hub.backend).start()
    driver = OpenLoopDriver(client(lab), rate_hz=RATE_HZ).start()
    try:
        time.sleep(2)
        stopped_at = time.monotonic()
        stop_units(list(hub.host_tunnels(A).values()))
        for proxy in lab.proxy_names:
            lab.wait_tunnel_listener(proxy, hub.tunnel_port(A), present=False, timeout_s=10)
        detect_s = wait_host(lab, A, False, timeout_s=30, since=stopped_at)
        time.sleep(1)
        a_before, b_before = lab_sessions_from(lab, a_address), lab_sessions_from(lab, b_address)
        time.sleep(4)
        a_while, b_while = lab_sessions_from(lab, a_address) - a_before, lab_sessions_from(lab, b_address) - b_before
        started_at = time.monotonic()
        for runner in hub.host_tunnels(A).values():
            runner.start()
        rejoin_s = wait_host(lab, A, True, timeout_s=REJOIN_BOUND_S, since=started_at)
        a_back = lab_sessions_from(lab, a_address)
        time.sleep(4)
        a_after = lab_sessions_from(lab, a_address) - a_back
    finally:
        results = driver.stop()
        watch.stop()
    fails = failed(results)
    record("15a host A stopped", "new connections failed (A's units stopped, then started)",
           f"{len(fails)}/{len(results)}", unit="", target="0", bound="0")
    record("15a host A stopped", "units stopped -> A unhealthy on every proxy", detect_s)
    record("15a host A stopped", "sessions from A / B while A is down (4 s)", f"{a_while} / {b_while}", unit="",
           target="0 / all")
    record("15a host A stopped", "slowest new connection (a retry waits min(timeout connect, 1 s))",
           max(r.latency_s for r in results), reference="HAProxy's retry turn-around")
    record("15a host A stopped", "LB states / proxies' /routes codes seen", f"{watch.lb_states()} / {watch.codes()}",
           unit="", target="UP / 200 only")
    record("15a host A stopped", "units started -> A healthy on every proxy", rejoin_s,
           bound=f"<= {REJOIN_BOUND_S:.0f} s")
    record("15a host A stopped", "sessions from A in the 4 s after it rejoined", a_after, unit="", target="> 0")
    assert fails == [], summarize(fails)
    assert watch.never_down(), (watch.lb_states(), watch.codes())
    assert a_while == 0 and b_while > 0, (a_while, b_while)
    assert rejoin_s <= REJOIN_BOUND_S
    assert a_after > 0, "new connections use A again"


# --------------------------------------------------------------------------------------------
# b. A's network cut silently
# --------------------------------------------------------------------------------------------


def test_b_host_cut_silently_fails_only_inside_the_detection_window(hub2: GeneratedHub, lab2: Lab) -> None:
    """A's link to the gateway drops every packet both ways for 12 s (nftables, no reset, no ICMP:
    ``Topology.cut``): A's sessions to both proxies go half-open, their listeners stay, so a
    connection sent to A is accepted by sshd and then hangs (no greeting): nothing at connect time
    can tell. Each proxy's health daemon sees A's check time out and the agent check marks A's
    server down; from then on HAProxy sends nothing to A. Target: failures only inside the
    per-tunnel detection window, <= 2 check intervals + 1 s after the cut; asserted: + a load
    margin of 3 s. The route stays up on every proxy (B serves). Cut lifted -> A healthy again."""
    lab, hub = lab2, hub2
    interval = check_interval_s(hub)
    target_s = 2 * interval + 1
    bound_s = target_s + LOAD_MARGIN_S
    watch = Watch(lab, hub.backend).start()
    driver = OpenLoopDriver(client(lab), rate_hz=RATE_HZ).start()
    try:
        time.sleep(2)
        cut_at = time.monotonic()
        lab.topology.cut("onprem", "gw")
        unhealthy_s = wait_host(lab, A, False, timeout_s=30, since=cut_at)
        down_s = wait_server(lab, A, "DOWN", timeout_s=30, since=cut_at)
        time.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))
        restored_at = time.monotonic()
        lab.topology.restore("onprem", "gw")
        rejoin_s = wait_host(lab, A, True, timeout_s=REJOIN_BOUND_S, since=restored_at)
        wait_server(lab, A, "UP", timeout_s=REJOIN_BOUND_S, since=restored_at)
        time.sleep(2)
    finally:
        results = driver.stop()
        watch.stop()
    fails = failed(results)
    in_window = [r for r in results if cut_at - IN_FLIGHT_S <= r.started < cut_at + down_s + 0.5]
    last_fail_s = max((r.started - cut_at for r in fails), default=0.0)
    outside = [r for r in fails if not cut_at - IN_FLIGHT_S <= r.started < cut_at + bound_s]
    record("15b host A cut silently", "new connections failed", f"{len(fails)}/{len(results)}", unit="",
           target="only inside the detection window")
    record("15b host A cut silently", "  of those sent between the cut and A DOWN everywhere",
           f"{len(failed(in_window))}/{len(in_window)}", unit="")
    record("15b host A cut silently", "cut -> last failed connection started", last_fail_s,
           target=f"<= {target_s:.0f} s (2 checks + 1 s)", bound=f"<= {bound_s:.0f} s")
    record("15b host A cut silently", "cut -> A unhealthy on every proxy (health daemon)", unhealthy_s)
    record("15b host A cut silently", "cut -> A's server DOWN in every proxy's HAProxy (agent)", down_s,
           target=f"<= {target_s:.0f} s", bound=f"<= {bound_s:.0f} s")
    record("15b host A cut silently", "LB states / proxies' /routes codes seen", f"{watch.lb_states()} / {watch.codes()}",
           unit="", target="UP / 200 only")
    record("15b host A cut silently", f"cut lifted after {CUT_S:.0f} s -> A healthy on every proxy", rejoin_s,
           bound=f"<= {REJOIN_BOUND_S:.0f} s")
    assert outside == [], (summarize(outside), [round(r.started - cut_at, 2) for r in outside])
    assert down_s <= bound_s
    assert watch.never_down(), (watch.lb_states(), watch.codes())
    assert rejoin_s <= REJOIN_BOUND_S


# --------------------------------------------------------------------------------------------
# c. A killed entirely
# --------------------------------------------------------------------------------------------


def test_c_host_killed_entirely_costs_no_connection_and_comes_back(hub2: GeneratedHub, lab2: Lab) -> None:
    """Every process of every A unit SIGKILLed at once (autossh and ssh, as when the machine
    crashes: the kernel still closes their sockets, so each proxy's sshd drops A's listeners),
    restarts held off for 5 s, then the units started (the machine booted again). Target and
    bound: 0 failed new connections, the route never down; A healthy again on every proxy."""
    lab, hub = lab2, hub2
    runners = list(hub.host_tunnels(A).values())
    watch = Watch(lab, hub.backend).start()
    driver = OpenLoopDriver(client(lab), rate_hz=RATE_HZ).start()
    try:
        time.sleep(2)
        killed_at = time.monotonic()
        killed = [pid for runner in runners for pid in runner.kill(signal.SIGKILL)]
        stop_units(runners)  # no restart: the machine is down
        for proxy in lab.proxy_names:
            lab.wait_tunnel_listener(proxy, hub.tunnel_port(A), present=False, timeout_s=10)
        gone_s = time.monotonic() - killed_at
        time.sleep(max(0.0, CRASH_HOLD_S - (time.monotonic() - killed_at)))
        booted_at = time.monotonic()
        for runner in runners:
            runner.start()
        rejoin_s = wait_host(lab, A, True, timeout_s=REJOIN_BOUND_S, since=booted_at)
        time.sleep(2)
    finally:
        results = driver.stop()
        watch.stop()
    fails = failed(results)
    record("15c host A killed", "processes SIGKILLed (every A unit)", len(killed), unit="")
    record("15c host A killed", "killed -> A's listeners gone on every proxy", gone_s)
    record("15c host A killed", "new connections failed (down 5 s, then started)", f"{len(fails)}/{len(results)}",
           unit="", target="0", bound="0")
    record("15c host A killed", "slowest new connection (a retry waits min(timeout connect, 1 s))",
           max(r.latency_s for r in results), reference="HAProxy's retry turn-around")
    record("15c host A killed", "LB states / proxies' /routes codes seen", f"{watch.lb_states()} / {watch.codes()}",
           unit="", target="UP / 200 only")
    record("15c host A killed", "units started -> A healthy on every proxy", rejoin_s, bound=f"<= {REJOIN_BOUND_S:.0f} s")
    assert len(killed) >= 2 * len(runners), "autossh and ssh of each slot"
    assert fails == [], summarize(fails)
    assert watch.never_down(), (watch.lb_states(), watch.codes())
    assert rejoin_s <= REJOIN_BOUND_S


# --------------------------------------------------------------------------------------------
# d. A streaming reader riding on A
# --------------------------------------------------------------------------------------------


def test_d_streaming_reader_on_host_a_resumes_through_b_with_every_row_once(hub2: GeneratedHub, lab2: Lab) -> None:
    """A CDC-like reader (unbuffered cursor, resumes from the last id: ``nslab.cdc``) connects
    through the LB while B's server is disabled on every proxy's HAProxy (just for that connect),
    so its session rides on A (the database sees it from A's address); an on-prem writer inserts
    50 rows/s. A's units stop: the reader's connection breaks, it reconnects through the LB and
    resumes on B. Exact: every row once, in order; the route never down."""
    lab, hub = lab2, hub2
    db = lab.db
    assert db is not None
    a_address, b_address = host_address(lab, hub, A), host_address(lab, hub, B)
    baseline = int(db.sql(f"SELECT COALESCE(MAX(id), 0) FROM {db.app_database}.events").stdout.strip())
    sessions: list[list[str]] = []

    def reader_sources() -> list[str]:
        out = db.sql("SELECT SUBSTRING_INDEX(HOST, ':', 1) FROM information_schema.PROCESSLIST "
                     f"WHERE USER = '{db.app_user}'").stdout
        return sorted(out.split())

    writer_endpoint = Endpoint(netns=lab.topology.ns("onprem"), host=lab.db_host, port=3306, user=WRITER_USER,
                               password=WRITER_PASSWORD, database=db.app_database)
    writer = RowWriter(writer_endpoint).start()
    reader = StreamingReader(lab.endpoint(read_timeout_s=5), on_connect=lambda: sessions.append(reader_sources()))
    reader.last_id = baseline
    haproxies = [lab.proxies[p].services["haproxy"] for p in lab.proxy_names]
    for haproxy in haproxies:
        haproxy.command(f"disable server {ROUTE_NAME}/{B}")  # type: ignore[union-attr]
    try:
        reader.start()
        assert reader.connected.wait(10), "the reader did not connect through the LB"
        time.sleep(0.5)
        pinned = reader_sources()
    finally:
        for haproxy in haproxies:
            haproxy.command(f"enable server {ROUTE_NAME}/{B}")  # type: ignore[union-attr]
    watch = Watch(lab, hub.backend).start()
    try:
        time.sleep(2)
        stopped_at = time.monotonic()
        stop_units(list(hub.host_tunnels(A).values()))
        wait_until(lambda: reader.reconnects and reader.reconnects[0].resumed_at, timeout_s=30, interval_s=0.1,
                   what="the reader to reconnect")
        resumed_on = sessions[-1] if sessions else []
        time.sleep(2)
    finally:
        written = writer.stop()
        watch.stop()
    try:
        wait_until(lambda: reader.last_id >= (written[-1] if written else baseline), timeout_s=30, interval_s=0.1,
                   what="the reader to catch up with the writer")
    finally:
        seen = reader.stop()
    first = reader.reconnects[0]
    record("15d streaming reader on A", "rows written / read / duplicates / missing",
           f"{len(written)} / {len(seen)} / {len(seen) - len(set(seen))} / {len(set(written) - set(seen))}", unit="",
           target="every row exactly once", bound="exact")
    record("15d streaming reader on A", "session source before / after", f"{pinned} / {resumed_on}", unit="",
           target=f"A ({a_address}) / B ({b_address})")
    record("15d streaming reader on A", "A stopped -> reader's connection broke", first.broke_at - stopped_at)
    record("15d streaming reader on A", "broke -> resumed through B", first.resumed_at - first.broke_at)
    record("15d streaming reader on A", "reconnect attempts", first.attempts, unit="")
    assert not writer.errors and not reader.failure, (writer.errors, reader.failure)
    assert pinned == [a_address], f"the reader's session should ride on A: {pinned}"
    assert resumed_on == [b_address], (resumed_on, sessions)
    assert seen == written, "every row exactly once, in order"
    assert first.attempts == 1, "the first reconnect succeeds (the proxy redispatches to B)"
    assert watch.never_down(), (watch.lb_states(), watch.codes())


# --------------------------------------------------------------------------------------------
# f. A's key cannot take B's port
# --------------------------------------------------------------------------------------------


def test_f_host_a_key_cannot_open_host_b_port(hub2: GeneratedHub, lab2: Lab) -> None:
    """A's own ssh (A's package ssh_config, so A's key) asks proxy1's real sshd for B's listener
    (``-R localhost:<B's port>``) while B's tunnel to proxy1 is stopped (so a refusal is policy,
    not a port in use): sshd refuses (A's key's ``permitlisten=`` names only A's ports,
    sshd(8) AUTHORIZED_KEYS FILE FORMAT) and logs "... remote forward to host localhost port
    <B's port>, but the request was denied" (OpenSSH channels.c). B's key is then accepted for
    the same port (its unit started again): the refusal is A's key's, not the port's."""
    lab, hub = lab2, hub2
    proxy = "proxy1"
    b_runner = hub.tunnels[(B, proxy)]
    b_port, a_port = hub.tunnel_port(B), hub.tunnel_port(A)
    sshd_log = lab.proxies[proxy].sshd.daemon.log_path
    log_start = sshd_log.stat().st_size
    b_runner.stop()
    lab.wait_tunnel_listener(proxy, b_port, present=False, timeout_s=10)
    try:
        result: subprocess.CompletedProcess[str] = run_ssh(
            ["ssh", "-F", str(hub.ssh_config_path(A)), "-N", "-R", f"localhost:{b_port}:{lab.db_host}:3306",
             lab.proxy_address(proxy)], netns=lab.topology.ns("onprem"), timeout_s=30)
        time.sleep(0.5)  # sshd writes its log line asynchronously to our read
        log = sshd_log.read_bytes()[log_start:].decode(errors="replace")
        still_free = not lab.topology.exec(proxy, ["ss", "-Htln", f"sport = :{b_port}"]).stdout.strip()
    finally:
        b_runner.start()
    lab.wait_tunnel_listener(proxy, b_port, timeout_s=REJOIN_BOUND_S)
    denied = [line for line in log.splitlines()
              if f"remote forward to host localhost port {b_port}, but the request was denied" in line]
    refused = result.returncode != 0 and "remote port forwarding failed" in result.stderr
    record("15f host keys", f"A's key: -R localhost:{b_port} (B's port) on {proxy}", "refused" if refused else "ALLOWED",
           unit="", target="refused")
    record("15f host keys", "sshd's log line", denied[0].split("]: ")[-1][-110:] if denied else "(none)", unit="")
    assert refused and still_free, (result.returncode, result.stderr[-500:])
    assert denied, log[-2000:]
    assert a_port != b_port
