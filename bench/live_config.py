#!/usr/bin/env python3
"""Live-configuration benchmark: from a new hub configuration document in the channel to the
change working on every proxy (issue 14).

Runs in the e2e lab's namespaces laid out as a hub (``nslab.hub``, needs root): two proxies from
their rendered bootstrap cloud-init, each with its reconciler reading the document from a fake
Azure IMDS (``nslab.imds``: the channel update is the instant the fake serves the new user data,
what ``terraform apply`` of a new ``user_data`` amounts to once Azure has stored it), the on-prem
package's tunnels, MariaDB also reachable as a "remote service" for forward routes. The
reconcilers run with the shipped settings (a fetch every 5 s, the canary gate on). Every
channel update comes after a random pause of up to one interval (seeded: ``--seed``), so the
updates do not stay in step with the reconcilers' polls: the figures spread over the interval as
real ``terraform apply`` runs would.

Each run measures, per proxy and for the slower proxy ("all proxies"):

- **add a route** (a forward route to the remote service): channel update -> the proxy reports the
  new version (``GET /``), -> a query through the proxy's NIC on the new port succeeds (the route
  serves), -> ``GET /routes/<name>`` answers 200 (the load balancer may use it: it then needs its
  own probe window, interval x threshold, on top);
- **change a healthy route** (route A's max_connections): channel update -> every proxy runs it
  (slot 1 waits for its canary, slot 0, to run it with the route healthy);
- **remove the route**: channel update -> every proxy runs it and the port refuses.

    python3 bench/live_config.py            # 5 runs (~2 minutes)
    python3 bench/live_config.py --runs 9 --json out.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "e2e")]

from nslab.client import Endpoint, query_once  # noqa: E402
from nslab.hub import HEALTH_PORT, hub_lab, start_generated_hub  # noqa: E402
from nslab.netns import HubAddressing, in_netns  # noqa: E402
from nslab.proc import interrupt_on_sigterm, wait_until  # noqa: E402

from tunnelhub.userdata.render import RECONCILE_INTERVAL_S  # noqa: E402

ROUTE = "bench-remote"
PORT = 3308
TIMEOUT_S = 60.0


def summary(lab, proxy: str) -> dict:
    with in_netns(lab.topology.ns("lb")):
        conn = http.client.HTTPConnection(lab.topology.ip(proxy, "lb"), HEALTH_PORT, timeout=2)
        conn.connect()
    try:
        conn.request("GET", "/")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def refused(lab, proxy: str, port: int) -> bool:
    with in_netns(lab.topology.ns("lb")):
        sock = socket.socket()
    sock.settimeout(1)
    try:
        return sock.connect_ex((lab.topology.ip(proxy, "lb"), port)) != 0
    finally:
        sock.close()


def measure(lab, since: float, checks: dict[str, callable]) -> dict[str, dict[str, float]]:
    """Seconds from ``since`` until each check first passed, per check and proxy (polled every 50 ms)."""
    found: dict[str, dict[str, float]] = {name: {} for name in checks}

    def done() -> bool:
        for name, check in checks.items():
            for proxy in lab.proxy_names:
                if proxy not in found[name]:
                    try:
                        ok = check(proxy)
                    except (OSError, ValueError):
                        ok = False
                    if ok:
                        found[name][proxy] = time.monotonic() - since
        return all(len(v) == len(lab.proxy_names) for v in found.values())

    wait_until(done, timeout_s=TIMEOUT_S, interval_s=0.05, what=f"{', '.join(checks)} on every proxy")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write every measurement as JSON here")
    parser.add_argument("--seed", type=int, default=14, help="seed of the pauses between changes")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/live_config.py needs root (network namespaces)", file=sys.stderr)
        return 2
    interrupt_on_sigterm()
    lab = hub_lab(remote_service=True)
    failed = True
    runs: list[dict] = []
    try:
        lab.open()
        db = lab.start_db(bind_all=True)
        db.sql(f"CREATE USER '{db.check_user}'@'10.60.0.%';")
        hub = start_generated_hub(lab)
        remote = HubAddressing().remote.split("/")[0]

        def endpoint(proxy: str) -> Endpoint:
            return Endpoint(netns=lab.topology.ns("lb"), host=lab.topology.ip(proxy, "lb"), port=PORT,
                            user=db.app_user, password=db.app_password, database=db.app_database,
                            connect_timeout_s=1, read_timeout_s=2)

        rng = random.Random(args.seed)

        def pause() -> None:
            time.sleep(rng.uniform(0, RECONCILE_INTERVAL_S))

        started = time.monotonic()
        for n in range(args.runs):
            def add(data: dict) -> None:
                data["routes"].append({"name": ROUTE, "kind": "forward", "port": PORT, "target": f"{remote}:3306",
                                       "type": "mysql"})
            pause()
            document, at = hub.publish(add)
            added = measure(lab, at, {
                "version": lambda p, v=document.version: summary(lab, p)["config_version"] == v,
                "serving": lambda p: query_once(endpoint(p)).ok,
                "healthy": lambda p: summary(lab, p)["routes"].get(ROUTE, {}).get("healthy", False),
            })

            def limit(data: dict, m=n) -> None:
                data["routes"][0]["max_connections"] = 900 - m
            pause()
            document, at = hub.publish(limit)
            changed = measure(lab, at, {"version": lambda p, v=document.version: summary(lab, p)["config_version"] == v})

            def remove(data: dict) -> None:
                data["routes"] = [r for r in data["routes"] if r["name"] != ROUTE]
            pause()
            document, at = hub.publish(remove)
            removed = measure(lab, at, {
                "version": lambda p, v=document.version: summary(lab, p)["config_version"] == v,
                "refused": lambda p: refused(lab, p, PORT),
            })
            run = {"add": added, "change": changed, "remove": removed}
            runs.append(run)
            print(f"run {n + 1}: add route -> serving on all proxies {max(added['serving'].values()):.2f} s "
                  f"(healthy {max(added['healthy'].values()):.2f} s); change route A -> all proxies "
                  f"{max(changed['version'].values()):.2f} s; remove route -> refused on all "
                  f"{max(removed['refused'].values()):.2f} s", flush=True)

        def median(step: str, check: str, proxy: str | None = None) -> float:
            values = [max(r[step][check].values()) if proxy is None else r[step][check][proxy] for r in runs]
            return statistics.median(values)

        print(f"\nLive configuration, {args.runs} runs, reconcile interval {RECONCILE_INTERVAL_S:g} s "
              "(medians, seconds from the channel update):")
        print("| change | measure | proxy1 (slot 0) | proxy2 (slot 1) | all proxies |")
        print("|---|---|---|---|---|")
        for step, check, what in (("add", "version", "runs the new version"), ("add", "serving", "route serves"),
                                  ("add", "healthy", "route healthy (GET /routes/<name>: 200)"),
                                  ("change", "version", "runs the new version (slot 1 gated on slot 0)"),
                                  ("remove", "version", "runs the new version"), ("remove", "refused", "port refuses")):
            print(f"| {step} a route | {what} | {median(step, check, 'proxy1'):.2f} | {median(step, check, 'proxy2'):.2f} "
                  f"| {median(step, check):.2f} |".replace("change a route", "change route A"))
        worst = max(max(r["add"]["serving"].values()) for r in runs)
        print(f"\nworst add-to-serving on all proxies: {worst:.2f} s (bound by design: one interval, "
              f"{RECONCILE_INTERVAL_S:g} s, + the apply)")
        load = os.getloadavg()
        print(f"(measured in {time.monotonic() - started:.0f} s; load average at the end "
              f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs)")
        if args.json:
            args.json.write_text(json.dumps(runs, indent=2))
        failed = False
    finally:
        if failed:
            print(lab.logs_report(), file=sys.stderr)
        for error in lab.close(failed=failed):
            print(error, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
