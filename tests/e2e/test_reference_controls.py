"""Negative controls: the reference design in the lab reproduces LAB-FINDINGS.md.

These prove the lab can see the difference a health check makes. They run the reference's own
files (``tests/e2e/reference/``): socat bridge, TCP-connect health check, the blog's autossh
unit, and two LBs (HAProxy) probing at the spec defaults, 5 s interval x 2 failures: one with
the reference's HTTP check, one with a plain TCP connect to the route port. One lab for the
module, reset before each test (tunnels running, database up, both proxies UP).

Bounds are generous for a loaded 2-core CI machine and stated where asserted; the measured
figures go to the lab report.
"""

from __future__ import annotations

import time

import pytest
from nslab.client import QueryDriver, query_once, summarize
from nslab.fixtures import module_lab
from nslab.haproxy import Haproxy, LbRoute
from nslab.health import probe
from nslab.lab import DB_PORT, HEALTH_PORT, Lab
from nslab.reference import start_reference_proxy, start_reference_tunnel
from nslab.report import record

pytestmark = pytest.mark.e2e

INTERVAL_S = 5.0
THRESHOLD = 2
ROUTE = LbRoute("mysql", DB_PORT)
BACKEND = f"be_{ROUTE.name}"
# Detection target from the issue: interval x threshold + 2 s = 12 s. Asserted with 8 s more
# for a loaded 2-core machine (a check can start late; HAProxy spreads checks over the interval).
DETECTION_BOUND_S = INTERVAL_S * THRESHOLD + 2 + 8


TCP_ROUTE = LbRoute("mysql", DB_PORT, frontend_port=DB_PORT + 1)
RESTART_BOUND_S = 60.0  # the reference unit's RestartSec=10, then rise 2 x 5 s, on a loaded machine


@pytest.fixture(scope="module")
def lab(request):  # type: ignore[no-untyped-def]
    yield from module_lab(request, Lab)


@pytest.fixture(scope="module")
def tcp_lb(lab: Lab) -> Haproxy:
    """The reference lab: its proxies and tunnels, the HTTP-checked LB (``lab.lb``) and this one,
    checking the route port with a plain TCP connect."""
    lab.start_db()
    for proxy in lab.proxy_names:
        start_reference_proxy(lab, proxy)
        start_reference_tunnel(lab, proxy)
    for proxy in lab.proxy_names:
        lab.wait_tunnel_listener(proxy, timeout_s=30)
    lab.start_lb([ROUTE], check="http", interval_s=INTERVAL_S, threshold=THRESHOLD)
    return lab.start_lb([TCP_ROUTE], check="tcp", interval_s=INTERVAL_S, threshold=THRESHOLD,
                        name="lb-tcp-check", default=False)


@pytest.fixture(autouse=True)
def reset(lab: Lab, tcp_lb: Haproxy) -> None:
    assert lab.db is not None and lab.lb is not None
    if not lab.db.running():
        lab.db.start()
    for proxy in lab.proxy_names:
        if lab.tunnels[proxy].state == "inactive":
            lab.tunnels[proxy].start()
    for proxy in lab.proxy_names:
        lab.wait_tunnel_listener(proxy, timeout_s=30)
        for lb in (lab.lb, tcp_lb):
            lb.wait_state(BACKEND, proxy, "UP", timeout_s=RESTART_BOUND_S)
    baseline = query_once(lab.endpoint())
    assert baseline.ok, f"baseline query through the LB failed: {baseline.error}"


def test_reference_http_check_takes_killed_tunnel_out_of_rotation(lab: Lab) -> None:
    """LAB-FINDINGS: LB marked the proxy down 5.8-9.7 s after the listener vanished; ~50 %
    of queries failed in that window, 100 % OK after."""
    driver = QueryDriver(lab.endpoint(), rate_hz=5).start()
    try:
        time.sleep(2)
        lab.tunnels["proxy1"].stop()  # the tunnel process is gone (systemctl stop)
        gone_s = lab.wait_tunnel_listener("proxy1", present=False, timeout_s=10)
        gone_at = time.monotonic()
        detect_s = lab.lb.wait_state(BACKEND, "proxy1", "DOWN", timeout_s=60, since=gone_at)
        down_at = time.monotonic()
        time.sleep(5)
    finally:
        driver.stop()
    window = driver.between(gone_at, down_at)
    after = driver.between(down_at + 0.5, time.monotonic())
    print(f"\n[reference/http] listener gone {gone_s:.2f} s after the stop; in the window: "
          f"{summarize(window)}; after: {summarize(after)}")
    record("reference design (control)", "tunnel unit stopped -> LB DOWN (its HTTP check)", detect_s,
           target=f"<= {INTERVAL_S * THRESHOLD + 2:.0f} s", bound=f"<= {DETECTION_BOUND_S:.0f} s",
           reference="5.8-9.7 s (LAB-FINDINGS)")
    record("reference design (control)", "queries failed in that window",
           f"{sum(not r.ok for r in window)}/{len(window)}", unit="failed", reference="~50 %")
    assert detect_s <= DETECTION_BOUND_S
    assert any(not r.ok for r in window), "the lab should see failures before detection"
    assert after and all(r.ok for r in after), summarize(after)

    # The tunnel comes back (the unit started again) and the proxy rejoins.
    back_at = time.monotonic()
    lab.tunnels["proxy1"].start()
    lab.wait_tunnel_listener("proxy1", timeout_s=30)
    rejoin_s = lab.lb.wait_state(BACKEND, "proxy1", "UP", timeout_s=60, since=back_at)
    record("reference design (control)", "tunnel unit started -> proxy1 back UP", rejoin_s)


def test_reference_plain_tcp_check_never_notices_dead_tunnel(lab: Lab, tcp_lb: Haproxy) -> None:
    """LAB-FINDINGS: plain TCP check on the DB port never marked the proxy down; ~50 % of
    queries failed for the whole outage (socat always accepts). Watched for the HTTP check's
    detection bound + 5 s."""
    lab.tunnels["proxy1"].stop()
    lab.wait_tunnel_listener("proxy1", present=False, timeout_s=10)
    gone_at = time.monotonic()
    driver = QueryDriver(lab.endpoint(port=TCP_ROUTE.listen_port), rate_hz=5).start()
    try:
        history = tcp_lb.status_history(BACKEND, "proxy1", duration_s=DETECTION_BOUND_S + 5)
    finally:
        results = driver.stop()
    failed = [r for r in results if not r.ok]
    fraction = len(failed) / len(results)
    record("reference design (control)", f"tunnel stopped, plain TCP check: proxy1 over "
           f"{time.monotonic() - gone_at:.0f} s", "/".join(dict.fromkeys(s for _, s in history)), unit="",
           reference="never marked down")
    record("reference design (control)", "  queries failed through it",
           f"{len(failed)}/{len(results)} ({fraction:.0%})", unit="failed", bound="30-70 %", reference="~50 %")
    assert all(status == "UP" for _, status in history), history
    # Round robin over one live and one dead path: about half fail (stated bound 30-70 %).
    assert 0.3 <= fraction <= 0.7, summarize(results)


def test_reference_health_check_answers_200_with_database_down(lab: Lab) -> None:
    """LAB-FINDINGS: on-prem database stopped -> health check still 200 on both proxies;
    every query fails."""
    lab.db.stop()
    stopped_at = time.monotonic()
    driver = QueryDriver(lab.endpoint(), rate_hz=5).start()
    statuses: dict[str, list[int]] = {p: [] for p in lab.proxy_names}
    lb_states: dict[str, set[str]] = {p: set() for p in lab.proxy_names}
    try:
        # Watch past the HTTP check's detection bound.
        while time.monotonic() - stopped_at < DETECTION_BOUND_S:
            for proxy in lab.proxy_names:
                statuses[proxy].append(probe(lab.topology.ns("lb"),
                                             lab.topology.ip(proxy, "lb"), HEALTH_PORT,
                                             f"/routes/{ROUTE.name}"))
                lb_states[proxy].add(lab.lb.server_status(BACKEND, proxy))
            time.sleep(0.5)
    finally:
        results = driver.stop()
    record("reference design (control)", "database stopped: its health answers / LB states",
           f"{sorted(set().union(*statuses.values()))} / {sorted(set().union(*lb_states.values()))}", unit="",
           reference="200 on both proxies")
    record("reference design (control)", "  queries failed with the database down",
           f"{sum(not r.ok for r in results)}/{len(results)}",
           unit="failed", reference="0/57 OK")
    for proxy in lab.proxy_names:
        assert set(statuses[proxy]) == {200}, (proxy, statuses[proxy])
        assert lb_states[proxy] == {"UP"}, (proxy, lb_states[proxy])
    assert results and not any(r.ok for r in results), summarize(results)
    lab.db.start()
    assert query_once(lab.endpoint()).ok
