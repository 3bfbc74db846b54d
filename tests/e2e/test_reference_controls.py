"""Negative controls: the reference design in the lab reproduces LAB-FINDINGS.md.

These prove the lab can see the difference a health check makes. They run the reference's own
files (``tests/e2e/reference/``): socat bridge, TCP-connect health check, the blog's autossh
unit, and the LB (HAProxy) probing at the spec defaults, 5 s interval x 2 failures.

Bounds are generous for a loaded 2-core CI machine and stated where asserted; the measured
figures are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import time

import pytest

from nslab.client import QueryDriver, query_once, summarize
from nslab.haproxy import LbRoute
from nslab.health import probe
from nslab.lab import DB_PORT, HEALTH_PORT, Lab
from nslab.reference import start_reference_proxy, start_reference_tunnel

pytestmark = pytest.mark.e2e

INTERVAL_S = 5.0
THRESHOLD = 2
ROUTE = LbRoute("mysql", DB_PORT)
BACKEND = f"be_{ROUTE.name}"
# Detection target from the issue: interval x threshold + 2 s = 12 s. Asserted with 8 s more
# for a loaded 2-core machine (a check can start late; HAProxy spreads checks over the interval).
DETECTION_BOUND_S = INTERVAL_S * THRESHOLD + 2 + 8


def build_reference(lab: Lab, *, check: str) -> None:
    lab.start_db()
    for proxy in lab.proxy_names:
        start_reference_proxy(lab, proxy)
        start_reference_tunnel(lab, proxy)
    for proxy in lab.proxy_names:
        lab.wait_tunnel_listener(proxy, timeout_s=30)
    lab.start_lb([ROUTE], check=check, interval_s=INTERVAL_S, threshold=THRESHOLD)
    baseline = query_once(lab.endpoint())
    assert baseline.ok, f"baseline query through the LB failed: {baseline.error}"


def test_reference_http_check_takes_killed_tunnel_out_of_rotation(lab: Lab) -> None:
    """LAB-FINDINGS: LB marked the proxy down 5.8-9.7 s after the listener vanished; ~50 %
    of queries failed in that window, 100 % OK after."""
    build_reference(lab, check="http")
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
    print(f"\n[reference/http] listener gone {gone_s:.2f} s after the stop; LB marked proxy1 "
          f"DOWN {detect_s:.2f} s after that; in the window: {summarize(window)}; "
          f"after: {summarize(after)}")
    assert detect_s <= DETECTION_BOUND_S
    assert any(not r.ok for r in window), "the lab should see failures before detection"
    assert after and all(r.ok for r in after), summarize(after)

    # The tunnel comes back (the unit started again) and the proxy rejoins.
    back_at = time.monotonic()
    lab.tunnels["proxy1"].start()
    lab.wait_tunnel_listener("proxy1", timeout_s=30)
    rejoin_s = lab.lb.wait_state(BACKEND, "proxy1", "UP", timeout_s=60, since=back_at)
    print(f"[reference/http] proxy1 back UP {rejoin_s:.2f} s after the tunnel unit restarted")


def test_reference_plain_tcp_check_never_notices_dead_tunnel(lab: Lab) -> None:
    """LAB-FINDINGS: plain TCP check on the DB port never marked the proxy down; ~50 % of
    queries failed for the whole outage (socat always accepts)."""
    build_reference(lab, check="tcp")
    lab.tunnels["proxy1"].stop()
    lab.wait_tunnel_listener("proxy1", present=False, timeout_s=10)
    gone_at = time.monotonic()
    driver = QueryDriver(lab.endpoint(), rate_hz=5).start()
    try:
        # Watch twice as long as the HTTP check's detection bound.
        history = lab.lb.status_history(BACKEND, "proxy1", duration_s=2 * DETECTION_BOUND_S)
    finally:
        results = driver.stop()
    failed = [r for r in results if not r.ok]
    fraction = len(failed) / len(results)
    print(f"\n[reference/tcp] proxy1 states over {time.monotonic() - gone_at:.0f} s: "
          f"{[s for _, s in history]}; {summarize(results)} ({fraction:.0%} failed)")
    assert all(status == "UP" for _, status in history), history
    # Round robin over one live and one dead path: about half fail (stated bound 30-70 %).
    assert 0.3 <= fraction <= 0.7, summarize(results)


def test_reference_health_check_answers_200_with_database_down(lab: Lab) -> None:
    """LAB-FINDINGS: on-prem database stopped -> health check still 200 on both proxies;
    every query fails."""
    build_reference(lab, check="http")
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
    print(f"\n[reference/db-down] health answers: "
          f"{ {p: sorted(set(s)) for p, s in statuses.items()} }; LB states: {lb_states}; "
          f"{summarize(results)}")
    for proxy in lab.proxy_names:
        assert set(statuses[proxy]) == {200}, (proxy, statuses[proxy])
        assert lb_states[proxy] == {"UP"}, (proxy, lb_states[proxy])
    assert results and not any(r.ok for r in results), summarize(results)
    lab.db.start()
    assert query_once(lab.endpoint()).ok
