"""Issue 14: a running hub changed without downtime, in the lab, from the generated artifacts.

One lab for the module: the lab hub of ``nslab.hub`` (two proxies from their rendered bootstrap
cloud-init, the on-prem package's tunnels, MariaDB, HAProxy as the load balancer on route A), plus
the database reachable from the proxies as a "remote service" at 100.64.0.15 (a forward route's
target). Each proxy's reconciler runs its real fetch path against a fake Azure IMDS in the
proxy's namespace (``nslab.imds``); :meth:`GeneratedHub.publish` is ``terraform apply`` of a spec
change: it renders the new document, checks that no slot's bootstrap changed (no VM replaced),
and updates the channel.

Scenario 1 (the issue's list), with an on-prem writer adding 50 rows/s, a streaming reader on a
long-lived connection through route A on **each** proxy, and a client opening a new connection
through the load balancer on route A five times a second:

1. add route B (a forward route): healthy on both proxies and serving through each proxy's NIC
   within one reconcile interval + one load-balancer probe window (bound: + the load margin);
2. add a second tunnel key, and hold a session with it on each proxy;
3. change route A's max_connections: the canary (slot 0) applies first, slot 1 after it;
4. revoke the second key: its sessions are closed, a reconnect with it is refused, the tunnels
   of the first key (which carry route A) are untouched.

Asserted throughout: 0 failed connections on route A, the readers never reconnected and saw every
row exactly once, both proxies converge to the same config version at each step, and HAProxy
really reloaded (steps 1 and 3). Scenario 2: a truncated and a corrupted document change nothing
and are reported (the health endpoint's ``GET /`` on both proxies says REFUSED and why).
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time

import pytest
from nslab.cdc import RowWriter, StreamingReader
from nslab.client import Endpoint, QueryDriver, query_once, summarize
from nslab.fixtures import module_lab
from nslab.hub import HEALTH_PORT, ROUTE_NAME, ROUTE_PORT, GeneratedHub, hub_lab, start_generated_hub
from nslab.lab import Lab
from nslab.netns import HubAddressing, in_netns
from nslab.proc import Daemon, wait_until
from nslab.report import record
from nslab.sshd import known_hosts_line, ssh_argv

from tunnelhub.userdata.document import key_fingerprint
from tunnelhub.userdata.render import RECONCILE_INTERVAL_S

pytestmark = pytest.mark.e2e

INTERVAL_S = 5.0  # the load balancer's probes (the spec defaults)
THRESHOLD = 2
LOAD_MARGIN_S = 8.0  # a loaded 2-core machine: timers slip (the same margin as test_tunnel_path.py)
B_TARGET_S = RECONCILE_INTERVAL_S + INTERVAL_S * THRESHOLD  # one reconcile interval + one probe window
B_BOUND_S = B_TARGET_S + LOAD_MARGIN_S
CONVERGE_BOUND_S = 2 * RECONCILE_INTERVAL_S + LOAD_MARGIN_S  # canary, then the follower
ROUTE_B = "remote-db"
ROUTE_B_PORT = 3307
REMOTE = HubAddressing().remote.split("/")[0]


@pytest.fixture(scope="module")
def lab(request):  # type: ignore[no-untyped-def]
    yield from module_lab(request, lambda: hub_lab(remote_service=True))


@pytest.fixture(scope="module")
def hub(lab: Lab) -> GeneratedHub:
    db = lab.start_db(bind_all=True)  # also at 100.64.0.15: the forward route's remote service
    db.sql(f"CREATE USER '{db.check_user}'@'10.60.0.%';")  # route B's check logs in from the proxies
    built = start_generated_hub(lab)
    lab.start_lb([built.route], check="http", interval_s=INTERVAL_S, threshold=THRESHOLD, health_port=HEALTH_PORT)
    return built


def summary(lab: Lab, proxy: str) -> dict:
    with in_netns(lab.topology.ns("lb")):
        conn = http.client.HTTPConnection(lab.topology.ip(proxy, "lb"), HEALTH_PORT, timeout=3)
        conn.connect()
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = json.loads(response.read())
        body["header"] = response.getheader("X-Tunnelhub-Config-Version")
        return body
    finally:
        conn.close()


def via_proxy(lab: Lab, proxy: str, port: int = ROUTE_PORT, **overrides: float) -> Endpoint:
    assert lab.db is not None
    return Endpoint(netns=lab.topology.ns("lb"), host=lab.topology.ip(proxy, "lb"), port=port, user=lab.db.app_user,
                    password=lab.db.app_password, database=lab.db.app_database, **overrides)  # type: ignore[arg-type]


class Watcher:
    """Polls every proxy's ``GET /`` every 100 ms; records when each first ran each version and
    the reconciler states it showed."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.first_seen: dict[tuple[str, str], float] = {}
        self.states: dict[str, set[str]] = {p: set() for p in lab.proxy_names}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for proxy in self.lab.proxy_names:
                try:
                    body = summary(self.lab, proxy)
                except (OSError, ValueError):
                    continue
                now = time.monotonic()
                self.first_seen.setdefault((proxy, body["config_version"]), now)
                self.states[proxy].add((body.get("reconciler") or {}).get("state", "?"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def converge(lab: Lab, version: str, since: float, what: str) -> dict[str, float]:
    """Wait until every proxy runs ``version`` (header and body agree); seconds from ``since`` each."""
    seen: dict[str, float] = {}

    def done() -> bool:
        for proxy in lab.proxy_names:
            if proxy not in seen:
                body = summary(lab, proxy)
                if body["config_version"] == version == body["header"]:
                    seen[proxy] = time.monotonic() - since
        return len(seen) == len(lab.proxy_names)

    wait_until(done, timeout_s=60, interval_s=0.1, what=f"every proxy to run config {version} ({what})")
    return seen


def haproxy_reloads(lab: Lab) -> dict[str, int]:
    return {p: (lab.log_dir / f"{p}-haproxy.log").read_text().count("Reloading HAProxy") for p in lab.proxy_names}


def test_l01_routes_keys_and_limits_change_live_with_streaming_clients_on_both_proxies(hub: GeneratedHub,
                                                                                       lab: Lab) -> None:
    assert lab.db is not None
    first_key = key_fingerprint(lab.key("tunnel_ed25519")[1])
    key_path, second_public = lab.key("tunnel2_ed25519")
    second_key = key_fingerprint(second_public)
    known_hosts = lab.path("tunnel2-known_hosts")
    known_hosts.write_text(known_hosts_line([lab.proxy_address(p) for p in lab.proxy_names], lab.hub_host_key[1]))
    tunnel_starts = {p: len(lab.tunnels[p].starts()) for p in lab.proxy_names}
    reloads_before = haproxy_reloads(lab)
    v0 = hub.document.version
    converge(lab, v0, time.monotonic(), "the start")

    baseline = int(lab.db.sql(f"SELECT COALESCE(MAX(id), 0) FROM {lab.db.app_database}.events").stdout.strip())
    writer = RowWriter(lab.endpoint_direct("onprem")).start()
    readers = {p: StreamingReader(via_proxy(lab, p, read_timeout_s=10)) for p in lab.proxy_names}
    for reader in readers.values():
        reader.last_id = baseline
        reader.start()
    driver = QueryDriver(lab.endpoint(), rate_hz=5.0).start()
    watcher = Watcher(lab).start()
    second_sessions: dict[str, Daemon] = {}
    figures: dict[str, object] = {}
    try:
        assert all(r.connected.wait(10) for r in readers.values()), "the readers did not connect"

        # 1. add route B (forward, to the remote service)
        def add_b(data: dict) -> None:
            data["routes"].append({"name": ROUTE_B, "kind": "forward", "port": ROUTE_B_PORT,
                                   "target": f"{REMOTE}:3306", "type": "mysql"})
        v1, at = hub.publish(add_b)
        v1 = v1.version
        ready: dict[str, float] = {}

        def b_serves() -> bool:
            for proxy in lab.proxy_names:
                if proxy in ready:
                    continue
                body = summary(lab, proxy)
                route = body["routes"].get(ROUTE_B, {})
                if route.get("healthy") and query_once(via_proxy(lab, proxy, ROUTE_B_PORT, connect_timeout_s=2)).ok:
                    ready[proxy] = time.monotonic() - at
            return len(ready) == len(lab.proxy_names)

        wait_until(b_serves, timeout_s=60, interval_s=0.1, what="route B healthy and serving on every proxy")
        figures["b"] = dict(ready)
        figures["v1"] = converge(lab, v1, at, "route B added")

        # 2. a second tunnel key, and a session with it on each proxy
        v2, at = hub.publish(lambda d: d["onprem"]["tunnel_public_keys"].append(second_public))
        v2 = v2.version
        figures["v2"] = converge(lab, v2, at, "second key added")
        for proxy in lab.proxy_names:
            daemon = Daemon(name=f"{proxy}-second-key-session", log_path=lab.log_dir / f"{proxy}-second-key.log",
                            netns=lab.topology.ns("onprem"),
                            argv=ssh_argv(key=key_path, known_hosts=known_hosts, user=lab.tunnel_user,
                                          host=lab.proxy_address(proxy), options=["-N", "-v"]))
            lab.on_close(daemon.name, daemon.stop)
            second_sessions[proxy] = daemon.start()
        for proxy in lab.proxy_names:
            log = lab.proxies[proxy].sshd.daemon.log_path
            wait_until(lambda log=log: f"ssh2: ED25519 {second_key}" in log.read_text(), timeout_s=30,
                       what=f"the second key's session on {proxy}")

        # 3. route A's max_connections: a change to a healthy route, gated on the canary. The
        # follower's VM gets the new user data first (Terraform updates the VMs in any order): it
        # must wait, visibly, until slot 0 runs the change with route A healthy.
        def limit_a(data: dict) -> None:
            data["routes"][0]["max_connections"] = 500
        v3, first_at = hub.publish(limit_a, proxies=["proxy2"])
        v3 = v3.version

        def follower_waits() -> bool:
            reconciler = summary(lab, "proxy2").get("reconciler") or {}
            return reconciler.get("state") == "waiting" and v3 in (reconciler.get("detail") or "")

        wait_until(follower_waits, timeout_s=RECONCILE_INTERVAL_S + LOAD_MARGIN_S, interval_s=0.1,
                   what="slot 1 to wait for its canary")
        figures["stall"] = summary(lab, "proxy2")["reconciler"]["detail"]
        time.sleep(RECONCILE_INTERVAL_S)
        held = summary(lab, "proxy2")["config_version"]  # still the old one, a whole interval later
        _, at = hub.publish(proxies=["proxy1"])
        figures["v3"] = converge(lab, v3, at, "route A's max_connections changed")
        canary_at, follower_at = figures["v3"]["proxy1"], figures["v3"]["proxy2"]
        figures["held"] = at - first_at
        for proxy in lab.proxy_names:  # the routes file of each proxy holds the new limit
            routes = (lab.path(proxy, "root") / "etc/haproxy/tunnelhub-routes.cfg").read_text()
            assert "    maxconn 500\n" in routes

        # 4. revoke the second key
        v4, at = hub.publish(lambda d: d["onprem"]["tunnel_public_keys"].remove(second_public))
        v4 = v4.version
        figures["v4"] = converge(lab, v4, at, "second key revoked")
        gone = {}
        for proxy, daemon in second_sessions.items():
            wait_until(lambda d=daemon: not d.running(), timeout_s=20, what=f"the revoked key's session on {proxy}")
            gone[proxy] = time.monotonic() - at
        refused = {}
        for proxy in lab.proxy_names:
            again = lab.topology.exec("onprem", ssh_argv(key=key_path, known_hosts=known_hosts, user=lab.tunnel_user,
                                                         host=lab.proxy_address(proxy), options=["-N"]),
                                      check=False, timeout_s=30)
            refused[proxy] = again.returncode == 255 and "Permission denied" in again.stderr
        time.sleep(2)
    except BaseException:
        for reader in readers.values():
            reader.stop()
        raise
    finally:
        watcher.stop()
        results = driver.stop()
        written = writer.stop()
    try:
        for reader in readers.values():
            wait_until(lambda r=reader: r.last_id >= (written[-1] if written else baseline), timeout_s=30,
                       interval_s=0.1, what="the readers to catch up")
    finally:
        seen = {p: r.stop() for p, r in readers.items()}

    reloads = {p: n - reloads_before[p] for p, n in haproxy_reloads(lab).items()}
    failed = [r for r in results if not r.ok]
    reconciler_logs = {p: (lab.log_dir / f"{p}-tunnelhub-reconcile.log").read_text() for p in lab.proxy_names}
    waited = "WAITING config " + v3 in reconciler_logs["proxy2"]
    b = figures["b"]
    record("L1 live changes", "add route B -> healthy and serving on proxy1 / proxy2",
           f"{b['proxy1']:.1f} / {b['proxy2']:.1f}", unit="s", target=f"<= {B_TARGET_S:.0f} s",
           bound=f"<= {B_BOUND_S:.0f} s", reference="replace every VM (custom_data)")
    for step, what in (("v1", "route B added"), ("v2", "second key added"), ("v3", "route A max_connections"),
                       ("v4", "second key revoked")):
        times = figures[step]
        record("L1 live changes", f"{what}: both proxies on the new version after",
               " / ".join(f"{times[p]:.1f}" for p in lab.proxy_names), unit="s", bound=f"<= {CONVERGE_BOUND_S:.0f} s")
    record("L1 live changes", "route A change reaching slot 1 first: slot 1 held it back (s), then applied it "
           "after the canary by", f"{figures['held']:.1f} / {follower_at - canary_at:+.1f}", unit="s",
           target="waits for slot 0")
    record("L1 live changes", "  slot 1's GET / meanwhile", str(figures["stall"])[:90], unit="")
    record("L1 live changes", "revoked key: its sessions closed after (proxy1 / proxy2)",
           " / ".join(f"{gone[p]:.1f}" for p in lab.proxy_names), unit="s", target="closed, refused on reconnect")
    record("L1 live changes", "HAProxy reloads (proxy1 / proxy2)", f"{reloads['proxy1']} / {reloads['proxy2']}",
           unit="", target="2 each (steps 1 and 3)")
    record("L1 live changes", "new connections on route A through the LB, failed", f"{len(failed)}/{len(results)}",
           unit="", target="0 failed", bound="0")
    record("L1 live changes", "streaming readers (one per proxy): reconnects / rows missing or twice",
           " ; ".join(f"{len(readers[p].reconnects)} / {len(set(written) - set(seen[p]))} / "
                      f"{len(seen[p]) - len(set(seen[p]))}" for p in lab.proxy_names), unit="", bound="0 / 0 / 0")
    record("L1 live changes", "tunnel restarts of the first key during all of it",
           sum(len(lab.tunnels[p].starts()) - tunnel_starts[p] for p in lab.proxy_names), unit="", bound="0")

    assert max(b.values()) <= B_BOUND_S, b
    for step in ("v1", "v2", "v3", "v4"):
        assert max(figures[step].values()) <= CONVERGE_BOUND_S + (B_BOUND_S if step == "v1" else 0), (step, figures)
    # the canary applies the route change first (converge() polls both every 0.1 s)
    assert canary_at <= follower_at + 0.15, (canary_at, follower_at)
    assert held == v2 and waited and "waiting" in watcher.states["proxy2"]
    assert all(refused.values()), refused
    assert reloads == {"proxy1": 2, "proxy2": 2}, reloads  # the key changes reload no HAProxy
    assert failed == [], summarize(failed)
    assert len(results) >= 50
    assert all(not readers[p].reconnects and not readers[p].failure for p in lab.proxy_names), \
        {p: readers[p].reconnects for p in lab.proxy_names}
    assert all(seen[p] == written for p in lab.proxy_names), "every row exactly once, in order, on both readers"
    assert {p: len(lab.tunnels[p].starts()) for p in lab.proxy_names} == tunnel_starts
    for proxy in lab.proxy_names:
        sshd_log = lab.proxies[proxy].sshd.daemon.log_path.read_text()
        assert sshd_log.count(f"ssh2: ED25519 {first_key}") == 1, "the first key's tunnel never reconnected"
        assert f"CLOSED session of {lab.tunnel_user}" in reconciler_logs[proxy] and second_key[:20] in reconciler_logs[proxy]


def test_l02_a_corrupted_or_truncated_document_changes_nothing_and_is_reported(hub: GeneratedHub, lab: Lab) -> None:
    running = hub.document
    converge(lab, running.version, time.monotonic(), "the start")

    def live_files(proxy: str) -> dict[str, bytes]:
        root = lab.path(proxy, "root")
        return {p: (root / p).read_bytes() for p in ("etc/haproxy/tunnelhub-routes.cfg", "etc/tunnelhub/health.json",
                                                    f"etc/ssh/authorized_keys.d/{lab.tunnel_user}",
                                                    "etc/ssh/tunnelhub/tunnel-forwarding.conf")}

    before = {p: live_files(p) for p in lab.proxy_names}
    reloads = haproxy_reloads(lab)
    text = running.text
    bad_documents = {
        "truncated": text[: len(text) // 2],
        "corrupted": text.replace('"maxconn ', '"maxconn 9', 1).replace("maxconn 1000", "maxconn 9000", 1),
    }
    reported: dict[str, float] = {}
    for name, bad in bad_documents.items():
        assert bad != text
        _, at = hub.publish(user_data=base64.b64encode(bad.encode()).decode())

        expected = "not valid JSON" if name == "truncated" else "checksum mismatch"

        def refused() -> bool:
            states = [summary(lab, p).get("reconciler") or {} for p in lab.proxy_names]
            return all(s.get("state") == "refused" and expected in (s.get("refused") or {}).get("reason", "")
                       for s in states)

        wait_until(refused, timeout_s=2 * RECONCILE_INTERVAL_S + LOAD_MARGIN_S, interval_s=0.1,
                   what=f"both proxies to refuse the {name} document")
        reported[name] = time.monotonic() - at
        for proxy in lab.proxy_names:
            body = summary(lab, proxy)
            assert body["config_version"] == running.version == body["header"]
            assert body["routes"][ROUTE_NAME]["healthy"]
        assert query_once(lab.endpoint()).ok
        hub.publish(user_data=running.azure_user_data())  # the good one back: nothing to apply
        wait_until(lambda: all((summary(lab, p).get("reconciler") or {}).get("state") == "applied"
                               for p in lab.proxy_names), timeout_s=2 * RECONCILE_INTERVAL_S + LOAD_MARGIN_S,
                   interval_s=0.1, what="both proxies back to 'applied'")
    time.sleep(RECONCILE_INTERVAL_S + 1)
    assert {p: live_files(p) for p in lab.proxy_names} == before, "a refused document changed a file"
    assert haproxy_reloads(lab) == reloads
    logs = {p: (lab.log_dir / f"{p}-tunnelhub-reconcile.log").read_text() for p in lab.proxy_names}
    for proxy, log in logs.items():
        lines = [ln for ln in log.splitlines() if "REFUSED" in ln]
        assert len(lines) >= 2 and all(f"keeping config {running.version}" in ln for ln in lines[-2:]), lines
    record("L2 bad document", "truncated / corrupted: refused and shown on both proxies after",
           f"{reported['truncated']:.1f} / {reported['corrupted']:.1f}", unit="s", target="nothing changes",
           bound=f"<= {2 * RECONCILE_INTERVAL_S + LOAD_MARGIN_S:.0f} s")
    record("L2 bad document", "files rewritten / HAProxy reloads / version change", "0 / 0 / none", unit="",
           bound="0 / 0 / none")
