"""Issue 8: the whole tunnel path with real daemons, from the generated artifacts, measured.

One lab for the module (``nslab.hub``): MariaDB in ``db``; the tunnel host in ``onprem`` running
the on-prem package's unit for each slot (ExecStartPre quick-ACK route, autossh ExecStart,
ExecStopPost) under the unit runner's ``Restart=always``/``RestartSec=2``; two proxies running
what their rendered cloud-init installs (sshd + drop-in + the tunnel user's keys, HAProxy, the
health daemon, the sysctl drop-in) at the spec's static addresses behind a gateway; HAProxy in
``lb`` as the cloud load balancer with HTTP checks on ``/routes/labdb`` at the spec defaults
(5 s interval, 2 failures, 2 successes); the client in ``client``. The reference's verbatim
TCP-connect health check also runs on each proxy (port 8080), idle unless probed: it is the
reference probe "under the same conditions" for the negative controls of scenarios 5 and 6.

Scenarios 1 and 4-10 are the issue's list, one test each, run in order (2 and 3 run on booted
machines: ``tests/boot/test_boot.py``, docs/boot.md); ``healthy`` resets the lab
before each (cuts lifted, database up, every proxy and tunnel running, both proxies UP in the
LB). Every wait is bounded. Figures go to the report (``nslab.report``) that ``make lab`` prints.

Bounds (asserted) are the issue's targets plus a stated margin for a loaded 2-core CI machine,
where a check or a poll can start seconds late: ``LOAD_MARGIN_S`` on detection times, more on
the recovery after a silent cut (it adds ssh's and autossh's own timers, each of which can slip).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time

import pytest
from nslab import generated
from nslab.cdc import RowWriter, StreamingReader
from nslab.client import Endpoint, OpenLoopDriver, QueryDriver, query_once, summarize
from nslab.fixtures import module_lab
from nslab.haproxy import LbRoute
from nslab.health import probe
from nslab.hub import (
    HEALTH_PORT,
    ROUTE_NAME,
    ROUTE_PORT,
    GeneratedHub,
    hub_lab,
    start_generated_hub,
)
from nslab.lab import Lab
from nslab.netns import in_netns
from nslab.proc import wait_until
from nslab.reference import REFERENCE_HEALTH_PORT, start_reference_health_check
from nslab.report import record
from nslab.sshd import run_ssh

pytestmark = pytest.mark.e2e

INTERVAL_S = 5.0  # the spec defaults, checked against the hub in the fixture
THRESHOLD = 2
DETECTION_TARGET_S = INTERVAL_S * THRESHOLD + 2  # the issue: interval x threshold + 2 s = 12 s
LOAD_MARGIN_S = 8.0  # a loaded 2-core machine: the LB's and the health daemon's timers slip
DETECTION_BOUND_S = DETECTION_TARGET_S + LOAD_MARGIN_S
CUT_DOWN_TARGET_S = 15.0
CUT_DOWN_BOUND_S = CUT_DOWN_TARGET_S + LOAD_MARGIN_S + 2  # plus one health-check timeout (2 s)
CUT_RESTORE_TARGET_S = 30.0
# After the cut is lifted: ssh's ConnectTimeout (10 s) and autossh's poll (10 s) may each have
# just started, and the LB needs 2 checks 5 s apart: 15 s more than the target on a loaded machine.
CUT_RESTORE_BOUND_S = CUT_RESTORE_TARGET_S + 15
CUT_S = 30.0  # long enough for both ends to give up (proxy ~15 s, tunnel host ~20 s)
RECOVERY_BOUND_S = 30.0  # a restarted tunnel or a replaced proxy: RestartSec/backoff + handshake
REPLACEMENT_GAP_S = 15.0  # how long the replaced proxy is gone (the reference measured sshd down 20 s)
QUERY_RATE_HZ = 5.0
# A query that started just before an event can fail with it (queries take milliseconds here).
IN_FLIGHT_S = 1.0
PROBE_CYCLES = 100
FAST_PROBE_INTERVAL_S = 0.2
PROXY = "proxy1"


# --------------------------------------------------------------------------------------------
# The lab, built once, reset before every scenario
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hublab(request):  # type: ignore[no-untyped-def]
    yield from module_lab(request, hub_lab)


@pytest.fixture(scope="module")
def hub(hublab: Lab) -> GeneratedHub:
    built = start_generated_hub(hublab)
    proxies = built.hub.proxies
    assert (proxies.probe_interval_s, proxies.probe_threshold) == (INTERVAL_S, THRESHOLD), \
        "the lab runs the spec's default probe settings"
    for proxy in hublab.proxy_names:
        start_reference_health_check(hublab, proxy)
    hublab.start_lb([built.route], check="http", interval_s=INTERVAL_S, threshold=THRESHOLD,
                    health_port=HEALTH_PORT)
    for line in built.rewrites:
        hublab.notes.append(f"path rewritten for the lab: {line}")
    return built


@pytest.fixture(autouse=True)
def healthy(hub: GeneratedHub, hublab: Lab) -> None:
    """Reset: cuts lifted, database up, every proxy and tunnel running, both proxies UP."""
    lab = hublab
    for a, b in lab.topology.cuts:
        lab.topology.restore(a, b)
    assert lab.db is not None
    if not lab.db.running():
        lab.db.start()
    for proxy in lab.proxy_names:
        runtime = lab.proxies.get(proxy)
        if runtime is None or not runtime.sshd.daemon.running():
            hub.replace_proxy(proxy)
        if lab.tunnels[proxy].state not in ("active", "activating", "activating (auto-restart)"):
            lab.tunnels[proxy].start()
        lab.lb.command(f"enable server {hub.backend}/{proxy}")
    for proxy in lab.proxy_names:
        lab.wait_tunnel_listener(proxy, timeout_s=RECOVERY_BOUND_S)
    for proxy in lab.proxy_names:
        lab.lb.wait_state(hub.backend, proxy, "UP", timeout_s=4 * INTERVAL_S * THRESHOLD)


def via_proxy(lab: Lab, proxy: str, **overrides: float) -> Endpoint:
    """The route on one proxy's NIC, from the LB's namespace (bypassing the LB)."""
    assert lab.db is not None
    return Endpoint(netns=lab.topology.ns("lb"), host=lab.topology.ip(proxy, "lb"), port=ROUTE_PORT,
                    user=lab.db.app_user, password=lab.db.app_password, database=lab.db.app_database,
                    **overrides)  # type: ignore[arg-type]


def quickack_routes(lab: Lab) -> str:
    return lab.topology.exec("onprem", ["ip", "route", "show", "proto", "84"]).stdout


def health(lab: Lab, proxy: str, port: int = HEALTH_PORT, path: str = f"/routes/{ROUTE_NAME}") -> int:
    return probe(lab.topology.ns("lb"), lab.topology.ip(proxy, "lb"), port, path, timeout_s=3)


def probe_json(lab: Lab, proxy: str) -> dict:
    """The health daemon's summary (``GET /``) of ``proxy``, as JSON."""
    with in_netns(lab.topology.ns("lb")):
        conn = http.client.HTTPConnection(lab.topology.ip(proxy, "lb"), HEALTH_PORT, timeout=3)
        conn.connect()
    try:
        conn.request("GET", "/")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def pct(failed: int, total: int) -> str:
    return f"{failed}/{total} ({failed / total:.0%})" if total else "0/0"


# --------------------------------------------------------------------------------------------
# 1. Baseline
# --------------------------------------------------------------------------------------------


def test_s01_baseline_queries_through_the_lb_all_succeed(hub: GeneratedHub, hublab: Lab) -> None:
    lab = hublab
    before = {p: int(lab.lb.servers()[(hub.backend, p)]["stot"]) for p in lab.proxy_names}

    results = [query_once(lab.endpoint()) for _ in range(20)]

    served = {p: int(lab.lb.servers()[(hub.backend, p)]["stot"]) - before[p] for p in lab.proxy_names}
    latencies = sorted(r.latency_s for r in results)
    record("1 baseline", "queries through the LB (new connection each)", pct(sum(not r.ok for r in results), 20),
           unit="failed", target="all succeed", bound="0 failed")
    record("1 baseline", "query on a new connection, median", latencies[len(latencies) // 2] * 1000, unit="ms")
    assert all(r.ok for r in results), summarize(results)
    assert all(n >= 5 for n in served.values()), f"the LB should use both proxies: {served}"
    # What the generated artifacts set up, seen from outside:
    routes = quickack_routes(lab)
    for proxy in lab.proxy_names:  # the unit's ExecStartPre: a quick-ACK host route per slot
        assert f"{lab.proxy_address(proxy)} via 192.168.10.1 dev {lab.topology.ifname('onprem', 'gw')} " \
               "quickack 1" in routes, routes  # (shown without "proto 84": the filter)
        assert lab.topology.exec(proxy, ["sysctl", "-n", "net.ipv4.tcp_retries2"]).stdout.strip() == "5"
        assert health(lab, proxy) == 200
        summary = probe_json(lab, proxy)
        assert summary["routes"][ROUTE_NAME]["healthy"] and not summary["routes"][ROUTE_NAME].get("warning"), \
            summary  # the check user logs in cleanly (no access-denied fallback)


# --------------------------------------------------------------------------------------------
# 2-3. One tunnel killed; the reference's plain TCP probe: booted for real in tests/boot
# (test_b04, test_b05: systemctl on the booted tunnel host, real proxies; docs/boot.md).
# Issue 15 reruns scenario 2 here, in the fast lab, for the peer backup path.
# --------------------------------------------------------------------------------------------


def test_s02_tunnel_killed_the_peer_backup_path_carries_every_new_connection(hub: GeneratedHub,
                                                                             hublab: Lab) -> None:
    """Issue 15's rerun of scenario 2 (one tunnel host): proxy1's only tunnel stopped, then (after
    it is back) every process of its unit SIGKILLed, with a client opening a new connection through
    the LB ten times a second (open loop). proxy1's HAProxy finds the tunnel's listener gone
    (connection refused), retries and redispatches to its backup server, proxy2's ``labdb-peer``
    listener, which uses proxy2's own tunnel (HAProxy configuration manual: ``retries``, ``option
    redispatch``, ``backup``). proxy1's ``GET /routes/labdb`` answers 503 (only its local tunnels
    count) and the LB takes proxy1 out, as before; the difference is that nothing fails meanwhile.
    Target and bound: 0 failed new connections in both outages."""
    lab = hublab
    runner = lab.tunnels[PROXY]
    driver = OpenLoopDriver(lab.endpoint(connect_timeout_s=3, read_timeout_s=3), rate_hz=2 * QUERY_RATE_HZ).start()
    try:
        time.sleep(2)
        stopped_at = time.monotonic()
        runner.stop()
        lab.wait_tunnel_listener(PROXY, present=False, timeout_s=10)
        down_s = lab.lb.wait_state(hub.backend, PROXY, "DOWN", timeout_s=60, since=stopped_at)
        down_at = time.monotonic()
        time.sleep(2)
        started_at = time.monotonic()
        runner.start()
        lab.wait_tunnel_listener(PROXY, timeout_s=RECOVERY_BOUND_S)
        rejoin_s = lab.lb.wait_state(hub.backend, PROXY, "UP", timeout_s=60, since=started_at)
        time.sleep(1)
        killed_at = time.monotonic()
        runner.kill(signal.SIGKILL)
        lab.wait_tunnel_listener(PROXY, present=False, timeout_s=10)
        lab.wait_tunnel_listener(PROXY, timeout_s=RECOVERY_BOUND_S)
        back_s = time.monotonic() - killed_at
        time.sleep(2)
    finally:
        results = driver.stop()
    stop_window = [r for r in results if stopped_at - IN_FLIGHT_S <= r.started < down_at + 0.5]
    kill_window = [r for r in results if killed_at - IN_FLIGHT_S <= r.started < killed_at + back_s + 0.5]
    failed = [r for r in results if not r.ok]
    record("2 tunnel killed (peer backup)", "unit stopped -> LB takes proxy1 out", down_s,
           bound=f"<= {DETECTION_BOUND_S:.0f} s", reference="booted lab before issue 15: 7.8 s")
    record("2 tunnel killed (peer backup)", "  new connections failed before the LB took it out",
           pct(sum(not r.ok for r in stop_window), len(stop_window)), unit="failed", target="0", bound="0",
           reference="about a third for ~8 s (before issue 15)")
    record("2 tunnel killed (peer backup)", "unit started -> proxy1 back in rotation", rejoin_s)
    record("2 tunnel killed (peer backup)", "every unit process SIGKILLed -> tunnel back", back_s,
           bound=f"<= {RECOVERY_BOUND_S:.0f} s")
    record("2 tunnel killed (peer backup)", "  new connections failed in that outage",
           pct(sum(not r.ok for r in kill_window), len(kill_window)), unit="failed", target="0", bound="0",
           reference="1/3 and 1/10 (before issue 15)")
    record("2 tunnel killed (peer backup)", "new connections failed, whole run", pct(len(failed), len(results)),
           unit="failed", target="0", bound="0")
    assert down_s <= DETECTION_BOUND_S
    assert back_s <= RECOVERY_BOUND_S
    assert stop_window and kill_window
    assert failed == [], summarize(failed)


# --------------------------------------------------------------------------------------------
# 4. Silent network cut between the tunnel host and proxy1
# --------------------------------------------------------------------------------------------


def test_s04_silent_cut_route_down_then_traffic_after_the_cut_is_lifted(hub: GeneratedHub, hublab: Lab) -> None:
    """Packets between the tunnel host and proxy1 dropped (nftables on both ends of proxy1's link,
    nothing killed, no reset) for 30 s, then lifted. Bounds: route down <= 15 s + 10 s (load
    margin and one check timeout); traffic through proxy1 again <= 30 s + 15 s (ssh's 10 s
    ConnectTimeout and autossh's 10 s poll can each have just started); no endless "remote port
    forwarding failed" loop from a stale listener (at most 2 such lines)."""
    lab = hublab
    runner = lab.tunnels[PROXY]
    log_start = runner.log_path.stat().st_size
    ssh_pid = runner.find_process("ssh")
    firsts: dict[str, float] = {}
    driver = QueryDriver(lab.endpoint(), rate_hz=QUERY_RATE_HZ).start()
    try:
        time.sleep(1)
        cut_at = time.monotonic()
        lab.topology.cut("gw", PROXY)
        while time.monotonic() - cut_at < CUT_S:
            now = time.monotonic() - cut_at
            if "503" not in firsts and health(lab, PROXY) == 503:
                firsts["503"] = now
            if "down" not in firsts and lab.lb.server_status(hub.backend, PROXY) == "DOWN":
                firsts["down"] = now
            if "stale gone" not in firsts and not lab.topology.exec(
                    PROXY, ["ss", "-Htln", "sport = :13306"]).stdout.strip():
                firsts["stale gone"] = now
            if "ssh gave up" not in firsts and runner.find_process("ssh") != ssh_pid:
                firsts["ssh gave up"] = now
            time.sleep(0.25)
        restored_at = time.monotonic()
        lab.topology.restore("gw", PROXY)

        def flows() -> bool:
            return query_once(via_proxy(lab, PROXY, connect_timeout_s=2, read_timeout_s=3)).ok
        wait_until(flows, timeout_s=60, interval_s=0.25, what="a query through proxy1 after the cut")
        flows_s = time.monotonic() - restored_at
        rejoin_s = lab.lb.wait_state(hub.backend, PROXY, "UP", timeout_s=60, since=restored_at)
    finally:
        driver.stop()
    log = runner.log_path.read_bytes()[log_start:].decode(errors="replace")
    forward_failures = log.count("remote port forwarding failed")
    down_s = firsts.get("down", float("inf"))
    outside = driver.failures_outside([(cut_at - IN_FLIGHT_S, cut_at + down_s + 0.5)])
    record("4 silent cut", "proxy1 health endpoint answers 503 after", firsts.get("503", float("nan")))
    record("4 silent cut", "cut -> route marked down by the LB", down_s, target=f"<= {CUT_DOWN_TARGET_S:.0f} s",
           bound=f"<= {CUT_DOWN_BOUND_S:.0f} s", reference="never (reference check)")
    record("4 silent cut", "stale session gone on proxy1 (tcp_retries2=5)", firsts.get("stale gone", float("nan")),
           reference="cut + 118.8 s (defaults)")
    record("4 silent cut", "tunnel host's ssh gave up (ServerAlive 5 s x 4)", firsts.get("ssh gave up", float("nan")),
           reference="cut + 118.8 s")
    record("4 silent cut", "cut lifted -> traffic through proxy1", flows_s, target=f"<= {CUT_RESTORE_TARGET_S:.0f} s",
           bound=f"<= {CUT_RESTORE_BOUND_S:.0f} s", reference="restore + 39 s (20-30 s tuned)")
    record("4 silent cut", "cut lifted -> proxy1 back in rotation", rejoin_s)
    record("4 silent cut", "'remote port forwarding failed' after the cut", forward_failures, unit="lines",
           bound="<= 2", reference="9 (stale listener)")
    record("4 silent cut", "queries failed outside the detection window", len(outside), unit="", target="none",
           bound="0")
    assert down_s <= CUT_DOWN_BOUND_S, firsts
    assert flows_s <= CUT_RESTORE_BOUND_S
    assert forward_failures <= 2, log[-3000:]
    assert outside == [], summarize(outside)


# --------------------------------------------------------------------------------------------
# 5. On-prem database down
# --------------------------------------------------------------------------------------------


def test_s05_database_down_takes_the_route_down_everywhere_and_back(hub: GeneratedHub, hublab: Lab) -> None:
    """Bound: every proxy DOWN within the 12 s target + 8 s load margin. The reference's health
    check on the same proxies keeps answering 200 (its blind spot, asserted as the control)."""
    lab = hublab
    assert lab.db is not None
    stopped_at = time.monotonic()
    lab.db.stop()
    down_s = {p: lab.lb.wait_state(hub.backend, p, "DOWN", timeout_s=60, since=stopped_at)
              for p in lab.proxy_names}
    ours = {p: health(lab, p) for p in lab.proxy_names}
    reference = {p: health(lab, p, REFERENCE_HEALTH_PORT, "/") for p in lab.proxy_names}
    started_at = time.monotonic()
    lab.db.start()
    up_s = {p: lab.lb.wait_state(hub.backend, p, "UP", timeout_s=60, since=started_at) for p in lab.proxy_names}
    for proxy in lab.proxy_names:
        record("5 database down", f"database stopped -> {proxy} DOWN", down_s[proxy],
               target=f"<= {DETECTION_TARGET_S:.0f} s", bound=f"<= {DETECTION_BOUND_S:.0f} s",
               reference="never (reference check: 200)")
    record("5 database down", "health answers: ours / the reference's (control)",
           f"{sorted(set(ours.values()))} / {sorted(set(reference.values()))}", unit="",
           target="ours 503, reference 200", reference="200 on both proxies")
    for proxy in lab.proxy_names:
        record("5 database down", f"database started -> {proxy} UP", up_s[proxy])
    assert max(down_s.values()) <= DETECTION_BOUND_S, down_s
    assert set(ours.values()) == {503}
    assert set(reference.values()) == {200}, "the control: the reference check cannot see the database"
    assert query_once(lab.endpoint()).ok


# --------------------------------------------------------------------------------------------
# 6. Probing does not harm the target
# --------------------------------------------------------------------------------------------


def _probe_for_cycles(hub: GeneratedHub, lab: Lab, *, port: int, name: str) -> dict[str, int | float]:
    """A second LB checking ``port`` on both proxies every 200 ms until each proxy saw at least
    100 checks (counted by nftables on the proxies); the database's counters around it."""
    db = lab.db
    assert db is not None
    tunnel_host = lab.tunnel_host_address
    route = LbRoute(ROUTE_NAME, ROUTE_PORT, frontend_port=ROUTE_PORT + (2 if port == HEALTH_PORT else 3))
    counted_from = time.monotonic()
    before = {"aborted": db.aborted_connects(), "warnings": len(db.aborted_connection_warnings()),
              "connections": db.connections_from(tunnel_host), **db.host_cache_row(tunnel_host)}
    for proxy in lab.proxy_names:
        lab.topology.count_connections(proxy, port)
    started = time.monotonic()
    fast = lab.start_lb([route], check="http", interval_s=FAST_PROBE_INTERVAL_S, threshold=THRESHOLD,
                        health_port=port, name=name, default=False, wait_up_s=None)
    try:
        wait_until(lambda: min(lab.topology.connections_counted(p, port) for p in lab.proxy_names) >= PROBE_CYCLES,
                   timeout_s=PROBE_CYCLES * FAST_PROBE_INTERVAL_S * 3, interval_s=0.5,
                   what=f"{PROBE_CYCLES} probe cycles on every proxy")
        states = {p: fast.server_status(hub.backend, p) for p in lab.proxy_names}
    finally:
        fast.stop()
    elapsed = time.monotonic() - started
    probes = {p: lab.topology.connections_counted(p, port, stop=True) for p in lab.proxy_names}
    time.sleep(1.0)  # the server writes its log asynchronously
    after = {"aborted": db.aborted_connects(), "warnings": len(db.aborted_connection_warnings()),
             "connections": db.connections_from(tunnel_host), **db.host_cache_row(tunnel_host)}
    delta = {k: after[k] - before[k] for k in before}
    return {**delta, "probes": min(probes.values()), "probes_total": sum(probes.values()), "seconds": elapsed,
            "counted_s": time.monotonic() - counted_from,
            "blocked_total": after["COUNT_HOST_BLOCKED_ERRORS"],
            "states": "/".join(sorted(set(states.values())))}  # type: ignore[dict-item]


def test_s06_probing_does_not_harm_the_target(hub: GeneratedHub, hublab: Lab) -> None:
    """No client traffic; an LB probing both proxies every 200 ms (our design decouples the LB's
    rate from the target checks, so this reaches 100 cycles in ~20 s). The database must see no
    aborted connection, no warning and no host-cache error from the tunnel host, only the health
    daemons' clean check-user sessions (one per proxy per 2 s check interval, whatever the LB's
    rate: asserted <= counting window / 2 s + 2 per proxy). Then the reference's TCP-connect check on the
    same proxies, same LB rate, as the control: a warning per probe (asserted >= 90 %)."""
    lab = hublab
    assert lab.db is not None
    ours = _probe_for_cycles(hub, lab, port=HEALTH_PORT, name="lb-probe-ours")
    ours_ok = query_once(lab.endpoint()).ok
    reference = _probe_for_cycles(hub, lab, port=REFERENCE_HEALTH_PORT, name="lb-probe-reference")
    reference_ok = query_once(lab.endpoint()).ok
    if reference["blocked_total"]:
        lab.db.flush_hosts()  # leave the lab usable for the next scenarios (reported below)

    for name, m, ok in (("ours", ours, ours_ok), ("reference probe (control)", reference, reference_ok)):
        record("6 probing harm", f"{name}: LB probe cycles per proxy (every 200 ms)", m["probes"], unit="",
               target=f">= {PROBE_CYCLES}")
        record("6 probing harm", f"{name}: logged-in sessions from the tunnel host", m["connections"], unit="",
               target="1 per proxy per 2 s check" if name == "ours" else "")
        record("6 probing harm", f"{name}: 'Aborted connection' warnings / Aborted_connects",
               f"{m['warnings']} / {m['aborted']}", unit="", target="0 (ours)" if name == "ours" else "",
               reference="a warning per probe (300 in 6 s)")
        record("6 probing harm", f"{name}: host cache handshake / connect errors, host blocked",
               f"{m['COUNT_HANDSHAKE_ERRORS']} / {m['SUM_CONNECT_ERRORS']} / {m['blocked_total']}", unit="",
               reference="no block at max_connect_errors=100")
        record("6 probing harm", f"{name}: a query through the LB afterwards", "ok" if ok else "FAILED", unit="")
    checks_bound = (ours["counted_s"] / hub.hub.routes[0].probe.interval_s + 2) * len(lab.proxy_names)
    assert ours["probes"] >= PROBE_CYCLES and reference["probes"] >= PROBE_CYCLES
    harm = (ours["warnings"], ours["aborted"], ours["COUNT_HANDSHAKE_ERRORS"], ours["SUM_CONNECT_ERRORS"])
    assert harm == (0, 0, 0, 0), ours
    assert 0 < ours["connections"] <= checks_bound, (ours, checks_bound)
    assert ours_ok
    assert reference["warnings"] >= 0.9 * reference["probes_total"], reference  # the control really harms
    assert reference["COUNT_HANDSHAKE_ERRORS"] >= 0.9 * reference["probes_total"], reference


# --------------------------------------------------------------------------------------------
# 7. A proxy replaced
# --------------------------------------------------------------------------------------------


def test_s07_replaced_proxy_tunnel_reconnects_without_known_hosts_change(hub: GeneratedHub, hublab: Lab) -> None:
    """proxy1 goes away for 15 s (sshd, HAProxy, health daemon stopped, its files deleted; the
    tunnel host meanwhile fails to connect, quickly and repeatedly, which is what drives autossh's
    backoff) and comes back rendered fresh for the same slot (same address, same hub host key).
    Bound: the tunnel back within 30 s of the new sshd listening (autossh's backoff is capped at
    AUTOSSH_POLL=10 s, and so is its lost-SIGCHLD stall). No failed query outside the window
    between the proxy going away and the LB taking it out of rotation."""
    lab = hublab
    runner = lab.tunnels[PROXY]
    known_before = hub.known_hosts_digest()
    log_start = runner.log_path.stat().st_size
    sshd_log_start = lab.proxies[PROXY].sshd.daemon.log_path.stat().st_size
    driver = QueryDriver(lab.endpoint(), rate_hz=QUERY_RATE_HZ).start()
    try:
        time.sleep(1)
        replaced_at = time.monotonic()
        generated.stop_proxy(lab, PROXY)
        down_s = lab.lb.wait_state(hub.backend, PROXY, "DOWN", timeout_s=60, since=replaced_at)
        down_at = time.monotonic()
        time.sleep(max(0.0, REPLACEMENT_GAP_S - (down_at - replaced_at)))
        hub.start_proxy(PROXY)  # returns once the new sshd listens
        sshd_up_at = time.monotonic()
        back_s = lab.wait_tunnel_listener(PROXY, timeout_s=60)
        ok_via_proxy = query_once(via_proxy(lab, PROXY)).ok
        up_s = lab.lb.wait_state(hub.backend, PROXY, "UP", timeout_s=60, since=sshd_up_at)
        time.sleep(2)
    finally:
        driver.stop()
    log = runner.log_path.read_bytes()[log_start:].decode(errors="replace")
    sshd_log = lab.proxies[PROXY].sshd.daemon.log_path.read_bytes()[sshd_log_start:].decode(errors="replace")
    outside = driver.failures_outside([(replaced_at - IN_FLIGHT_S, down_at + 0.5)])
    attempts = log.count("ssh exited with error status") + log.count("Connection refused")
    record("7 proxy replaced", "proxy gone -> LB takes it out", down_s, target=f"<= {DETECTION_TARGET_S:.0f} s",
           bound=f"<= {DETECTION_BOUND_S:.0f} s")
    record("7 proxy replaced", f"gone {REPLACEMENT_GAP_S:.0f} s, then new sshd listening -> tunnel back", back_s,
           bound=f"<= {RECOVERY_BOUND_S:.0f} s", reference="sshd down 20 s: 4.4 s")
    record("7 proxy replaced", "new sshd listening -> proxy back in rotation", up_s, reference="35 s")
    record("7 proxy replaced", "refused connection attempts logged meanwhile", attempts, unit="")
    record("7 proxy replaced", "tunnel host's known_hosts changed", "no" if hub.known_hosts_digest() == known_before
           else "YES", unit="", target="no change")
    record("7 proxy replaced", "queries failed outside the window before the LB reacted", len(outside), unit="",
           bound="0")
    assert down_s <= DETECTION_BOUND_S
    assert back_s <= RECOVERY_BOUND_S
    assert hub.known_hosts_digest() == known_before, "the tunnel host's known_hosts never changes"
    assert "Accepted publickey for thtunnel" in sshd_log, "the tunnel logged in to the new proxy"
    for warning in ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED", "WARNING"):
        assert warning not in log, log[-2000:]
    assert ok_via_proxy
    marks = {"gone": replaced_at, "lb down": down_at, "sshd up": sshd_up_at, "tunnel back": sshd_up_at + back_s,
             "lb up": sshd_up_at + up_s}
    assert outside == [], (summarize(outside), [round(r.started - replaced_at, 2) for r in outside],
                           {k: round(v - replaced_at, 2) for k, v in marks.items()})


# --------------------------------------------------------------------------------------------
# 8. A long-lived streaming client on the proxy whose tunnel is killed
# --------------------------------------------------------------------------------------------


def test_s08_streaming_reader_resumes_on_the_other_proxy_with_every_row_once(hub: GeneratedHub, hublab: Lab) -> None:
    """A CDC-like reader (unbuffered cursor, resumes from the last id) connected through the LB
    and pinned on proxy1 (proxy2 disabled in the LB just for that connect); an on-prem writer
    inserts 50 rows/s. proxy1's tunnel is stopped: the reader's connection breaks, it reconnects
    through the LB and necessarily rides on proxy2's tunnel (proxy1 has none): either the LB sent
    it to proxy2, or (issue 15) to proxy1, whose HAProxy redispatched it to its backup, proxy2's
    peer port. It ends with every row exactly once (no bound to relax: exact)."""
    lab = hublab
    db = lab.db
    assert db is not None
    baseline = int(db.sql(f"SELECT COALESCE(MAX(id), 0) FROM {db.app_database}.events").stdout.strip())
    sessions: list[dict[str, int]] = []

    def on_connect() -> None:
        servers = lab.lb.servers()
        path = {p: int(servers[(hub.backend, p)]["scur"]) for p in lab.proxy_names}
        # proxy1's backup server for proxy2's peer port (slot 1): the peer path
        peer = lab.proxies[PROXY].services["haproxy"].servers().get((ROUTE_NAME, "peer_1"), {})  # type: ignore[union-attr]
        sessions.append({**path, "proxy1 -> proxy2 peer path": int(peer.get("scur") or 0)})

    writer = RowWriter(lab.endpoint_direct("onprem")).start()
    reader = StreamingReader(lab.endpoint(read_timeout_s=5), on_connect=on_connect)
    reader.last_id = baseline
    lab.lb.command(f"disable server {hub.backend}/proxy2")
    try:
        reader.start()
        assert reader.connected.wait(10), "the reader did not connect through the LB"
        time.sleep(0.5)
        servers = lab.lb.servers()
        pinned = {p: int(servers[(hub.backend, p)]["scur"]) for p in lab.proxy_names}
    finally:
        lab.lb.command(f"enable server {hub.backend}/proxy2")
    try:
        time.sleep(2)
        killed_at = time.monotonic()
        lab.tunnels[PROXY].stop()
        wait_until(lambda: reader.reconnects and reader.reconnects[0].resumed_at, timeout_s=60, interval_s=0.1,
                   what="the reader to reconnect")
        resumed_on = dict(sessions[-1]) if sessions else {}
        tunnel_down_at_resume = lab.tunnels[PROXY].main_pid is None
        time.sleep(2)
    finally:
        written = writer.stop()
    try:
        wait_until(lambda: reader.last_id >= (written[-1] if written else baseline), timeout_s=30, interval_s=0.1,
                   what="the reader to catch up with the writer")
    finally:
        seen = reader.stop()
    first = reader.reconnects[0]
    record("8 streaming reader", "rows written / read / duplicates / missing",
           f"{len(written)} / {len(seen)} / {len(seen) - len(set(seen))} / {len(set(written) - set(seen))}", unit="",
           target="every row exactly once", bound="exact", reference="blog: resumed from the binlog position, no loss")
    record("8 streaming reader", "tunnel stopped -> reader's connection broke", first.broke_at - killed_at)
    via_peer = resumed_on.get("proxy1 -> proxy2 peer path") == 1
    record("8 streaming reader", "broke -> resumed through the LB on proxy2's tunnel", first.resumed_at - first.broke_at,
           bound=f"<= {DETECTION_BOUND_S:.0f} s")
    record("8 streaming reader", "resumed via", "proxy1's peer path to proxy2" if via_peer else "the LB's proxy2",
           unit="")
    record("8 streaming reader", "reconnect attempts", first.attempts, unit="")
    assert not writer.errors and not reader.failure, (writer.errors, reader.failure)
    assert pinned == {"proxy1": 1, "proxy2": 0}, f"the reader should start on proxy1: {pinned}"
    assert (resumed_on.get("proxy2") == 1 or via_peer) and tunnel_down_at_resume, (resumed_on, sessions)
    assert seen == written, "every row exactly once, in order"
    assert first.resumed_at - first.broke_at <= DETECTION_BOUND_S


# --------------------------------------------------------------------------------------------
# 9. The ssh child SIGTERMed: autossh exits 0, the unit's restart policy brings it back
# --------------------------------------------------------------------------------------------


def test_s09_sigterm_to_ssh_autossh_exits_0_and_restart_always_brings_it_back(hub: GeneratedHub,
                                                                               hublab: Lab) -> None:
    """Bound: back within 30 s (RestartSec=2, then the ExecStartPre and a handshake)."""
    lab = hublab
    runner = lab.tunnels[PROXY]
    ssh_pid = runner.find_process("ssh")
    assert ssh_pid is not None, runner.processes()
    events_before = len(runner.events)
    killed_at = time.monotonic()
    os.kill(ssh_pid, signal.SIGTERM)
    lab.wait_tunnel_listener(PROXY, present=False, timeout_s=10)
    lab.wait_tunnel_listener(PROXY, timeout_s=RECOVERY_BOUND_S)
    back_s = time.monotonic() - killed_at
    events = runner.events[events_before:]
    kinds = [e.kind for e in events]
    exit_event = next(e for e in events if e.kind == "exit")
    start_event = next(e for e in events if e.kind == "start")
    record("9 ssh SIGTERMed", "autossh exit status", exit_event.returncode, unit="", target="0 (why Restart=always)",
           reference="0")
    record("9 ssh SIGTERMed", "SIGTERM -> tunnel back (RestartSec=2)", back_s, bound=f"<= {RECOVERY_BOUND_S:.0f} s",
           reference="10.4 s (RestartSec=10)")
    assert exit_event.returncode == 0
    # one event per hook line (the quick-ACK helper and a journal line per route): the order counts
    order = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    assert order[:5] == ["exit", "ExecStopPost", "restart-scheduled", "ExecStartPre", "start"], kinds
    assert start_event.at - exit_event.at >= 2.0, "RestartSec=2"
    assert back_s <= RECOVERY_BOUND_S
    assert lab.proxy_address(PROXY) in quickack_routes(lab)


# --------------------------------------------------------------------------------------------
# 10. What the tunnel key cannot do (real sshd refuses)
# --------------------------------------------------------------------------------------------


def test_s10_tunnel_key_cannot_run_commands_get_a_pty_forward_locally_or_listen_elsewhere(
        hub: GeneratedHub, hublab: Lab) -> None:
    """The tunnel host's own ssh (the package's ssh_config, so the tunnel key) against proxy1's
    sshd with the generated drop-in and keys file: sshd refuses each. The tunnel to proxy1 is
    stopped first, so a refused ``-R 127.0.0.1:13306`` is sshd's policy, not a port in use."""
    lab = hublab
    config = str(hub.ssh_config_path())
    host = lab.proxy_address(PROXY)
    lab.tunnels[PROXY].stop()
    lab.wait_tunnel_listener(PROXY, present=False, timeout_s=10)

    def ssh(*args: str, node: str = "onprem") -> subprocess.CompletedProcess[str]:
        return run_ssh(["ssh", "-F", config, *args], netns=lab.topology.ns(node), timeout_s=30)

    results = {
        "run a command": ssh(host, "id"),
        "get a PTY": ssh("-tt", host, "id"),
        "open a local forward (-W)": ssh("-W", f"{lab.db_host}:3306", host),
        "listen on another port (-R localhost:13307)": ssh("-N", "-R", f"localhost:13307:{lab.db_host}:3306", host),
        "listen on 127.0.0.1:13306 (not localhost:)": ssh("-N", "-R", f"127.0.0.1:13306:{lab.db_host}:3306", host),
        "log in from outside onprem.source_cidrs": ssh(lab.topology.ip(PROXY, "lb"), "true", node="lb"),
    }
    refused = {
        "run a command": lambda r: "uid=" not in r.stdout and r.returncode != 0,
        "get a PTY": lambda r: "uid=" not in r.stdout and "PTY allocation request failed" in r.stderr,
        "open a local forward (-W)": lambda r: r.returncode != 0 and "administratively prohibited" in r.stderr,
        "listen on another port (-R localhost:13307)":
            lambda r: r.returncode != 0 and "remote port forwarding failed" in r.stderr,
        "listen on 127.0.0.1:13306 (not localhost:)":
            lambda r: r.returncode != 0 and "remote port forwarding failed" in r.stderr,
        "log in from outside onprem.source_cidrs": lambda r: r.returncode == 255 and "Permission denied" in r.stderr,
    }
    verdicts = {what: refused[what](result) for what, result in results.items()}
    for what, ok in verdicts.items():
        record("10 tunnel key", what, "refused" if ok else "ALLOWED", unit="", target="refused")
    # the same key and config with the forward the unit uses is accepted (so the refusals are policy)
    lab.tunnels[PROXY].start()
    lab.wait_tunnel_listener(PROXY, timeout_s=RECOVERY_BOUND_S)
    assert all(verdicts.values()), {w: (r.returncode, r.stdout[-200:], r.stderr[-300:])
                                    for w, r in results.items() if not verdicts[w]}
