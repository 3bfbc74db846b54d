"""``tunnelhub status``: ask every proxy's health daemon, from this machine, how each route is.

Each proxy's health daemon (tunnelhub/userdata/files/tunnelhub_health.py) answers ``GET /`` with
its cached per-route checks, never running a check for the request, so asking costs the targets
nothing. This module asks all proxies of a hub concurrently with a short timeout and folds the
answers into one view: per route and proxy, up or down with the proxy's reason; per route, up
(every proxy serves it), degraded (some do) or down (none does).

The health port is not open to the world: the stacks admit it only from the load balancer and the
hub's own proxies (Azure NSG ``allow-health-probe`` from ``AzureLoadBalancer`` and
``allow-health-from-proxies`` from the proxy subnet, then ``deny-all-inbound``; AWS proxy security
group ingress from the NLB's group and from the proxy group itself). A proxy that cannot be asked is
therefore most often a question of where this command runs, and the message says so.

JSON (``--json``, ``SCHEMA`` 1; keys are only ever added)::

    {"schema": 1, "hub": "weu", "cloud": "azure", "health_port": 8080,
     "expected_config_version": "<12 hex>" | null,   # what the spec renders now
     "exit_code": 0 | 1 | 3, "summary": "<one line>",
     "proxies": [{"slot": 0, "address": "10.60.0.5", "reachable": true,
                  "error": null | "timeout" | "refused" | "unreachable" | "bad-answer",
                  "detail": null | "<text>", "http_status": 200 | 503 | null,
                  "config_version": "<version>" | null, "uptime_s": 12.5 | null,
                  "reconciler": null | {"state": "applied" | "waiting" | "refused" | "failed" | ...,
                                        "detail": "<why>" | null}}],
     "routes": [{"route": "orders-mysql", "in_spec": true,
                 "state": "up" | "degraded" | "down" | "unknown",
                 "serving": 2, "asked": 2, "proxies": 2,
                 "per_proxy": [{"slot": 0, "address": "10.60.0.5",
                                "state": "up" | "down" | "missing" | "unreachable",
                                "reason": "<text>" | null, "warning": "<text>" | null,
                                "since_s": 30.0 | null, "age_s": 0.4 | null,
                                "config_version": "<version>" | null,
                                "hosts": {"<tunnel host>": {"state": "up" | "down", "reason": "<text>" | null,
                                                            "since_s": 30.0 | null}}}]}]}

``state`` ``missing``: the proxy answered but does not run that route (an older or newer
configuration: compare ``config_version``). ``since_s`` is the proxy's time in the current state
when its daemon reports it, else null; ``age_s`` is how old the proxy's last check result is.
``hosts`` (only when the proxy's daemon reports tunnel hosts for the route): each tunnel host's own
check on that proxy; the route is up on a proxy while any of its hosts is.
"""

from __future__ import annotations

import http.client
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

SCHEMA = 1
EXIT_OK = 0
EXIT_NOT_ALL_UP = 1
EXIT_USAGE = 2
EXIT_NONE_REACHABLE = 3
MAX_ANSWER_BYTES = 1 << 20  # a summary of 64 routes is ~30 KB; anything much larger is not the daemon


@dataclass
class ProxyAnswer:
    """What one proxy's ``GET /`` gave (or why it gave nothing)."""

    slot: int
    address: str
    error: str | None = None
    detail: str | None = None
    http_status: int | None = None
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def reachable(self) -> bool:
        return self.error is None

    @property
    def routes(self) -> dict[str, dict[str, Any]]:
        routes = self.body.get("routes")
        return routes if isinstance(routes, dict) else {}

    @property
    def config_version(self) -> str | None:
        version = self.body.get("config_version")
        return version if isinstance(version, str) else None

    @property
    def reconciler(self) -> dict[str, Any] | None:
        """The reconciler's state as the proxy reports it (docs/live-config.md): ``state`` applied /
        waiting / refused / failed, and why (``detail``, or the pending document's ``reason``)."""
        raw = self.body.get("reconciler")
        if not isinstance(raw, dict):
            return None
        pending = raw.get("pending") if isinstance(raw.get("pending"), dict) else {}
        why = pending.get("reason") or raw.get("detail")
        return {"state": raw.get("state") if isinstance(raw.get("state"), str) else None,
                "detail": why if isinstance(why, str) and why else None}

    def as_dict(self) -> dict[str, Any]:
        uptime = self.body.get("uptime_s")
        return {"slot": self.slot, "address": self.address, "reachable": self.reachable, "error": self.error,
                "detail": self.detail, "http_status": self.http_status, "config_version": self.config_version,
                "uptime_s": uptime if isinstance(uptime, (int, float)) else None, "reconciler": self.reconciler}


def ask(slot: int, address: str, port: int, timeout_s: float) -> ProxyAnswer:
    """``GET http://address:port/`` once; a 503 is an answer (some route is down), not an error."""
    answer = ProxyAnswer(slot, address)
    conn = http.client.HTTPConnection(address, port, timeout=timeout_s)
    try:
        conn.request("GET", "/", headers={"Accept": "application/json"})
        response = conn.getresponse()
        raw = response.read(MAX_ANSWER_BYTES + 1)
        answer.http_status = response.status
    except (TimeoutError, socket.timeout):
        answer.error, answer.detail = "timeout", f"no answer within {timeout_s:g} s"
        return answer
    except ConnectionRefusedError:
        answer.error, answer.detail = "refused", "connection refused (nothing listens on the health port)"
        return answer
    except (http.client.HTTPException, ConnectionError) as exc:
        answer.error, answer.detail = "bad-answer", f"not an HTTP answer ({type(exc).__name__}: {exc})"
        return answer
    except OSError as exc:  # no route to host, network unreachable, name resolution
        answer.error, answer.detail = "unreachable", exc.strerror or str(exc)
        return answer
    finally:
        conn.close()
    try:
        body = json.loads(raw) if len(raw) <= MAX_ANSWER_BYTES else None
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("routes"), dict):
        answer.error = "bad-answer"
        answer.detail = (f"HTTP {response.status}, but not the tunnelhub health daemon's summary "
                         "(no JSON object with 'routes'): is something else listening on the health port?")
        return answer
    answer.body = body
    return answer


def ask_all(addresses: list[str], port: int, timeout_s: float) -> list[ProxyAnswer]:
    """Ask every proxy at once: the whole command takes about one timeout, whatever the count."""
    if not addresses:
        return []
    with ThreadPoolExecutor(max_workers=len(addresses), thread_name_prefix="status") as pool:
        futures = [pool.submit(ask, slot, address, port, timeout_s) for slot, address in enumerate(addresses)]
        return [f.result() for f in futures]


def _cell(answer: ProxyAnswer, route: str) -> dict[str, Any]:
    cell: dict[str, Any] = {"slot": answer.slot, "address": answer.address, "state": "unreachable",
                            "reason": None, "warning": None, "since_s": None, "age_s": None,
                            "config_version": answer.config_version}
    if not answer.reachable:
        cell["reason"] = f"{answer.error}: {answer.detail}"
        return cell
    status = answer.routes.get(route)
    if not isinstance(status, dict):
        cell["state"] = "missing"
        cell["reason"] = (f"this proxy does not run route {route!r} "
                          f"(its configuration: {answer.config_version or 'unversioned'})")
        return cell
    cell["state"] = "up" if status.get("healthy") is True else "down"
    for key in ("reason", "warning"):
        value = status.get(key)
        cell[key] = value if isinstance(value, str) and value else None
    for key in ("since_s", "age_s"):
        value = status.get(key)
        cell[key] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    hosts = status.get("hosts")
    if isinstance(hosts, dict):  # a route carried by tunnel hosts: each host's own check on this proxy
        cell["hosts"] = {
            str(name): {"state": "up" if h.get("healthy") is True else "down",
                        "reason": h.get("reason") if isinstance(h.get("reason"), str) else None,
                        "since_s": h.get("since_s") if isinstance(h.get("since_s"), (int, float))
                        and not isinstance(h.get("since_s"), bool) else None}
            for name, h in hosts.items() if isinstance(h, dict)}
    return cell



def route_rows(spec_routes: list[str], answers: list[ProxyAnswer]) -> list[dict[str, Any]]:
    """Per route (the spec's, then any a proxy runs that the spec does not): the per-proxy cells
    and the route's state: up when every proxy serves it, degraded when some do, down when none
    that answered does, unknown when no proxy answered."""
    extra = sorted({name for a in answers for name in a.routes} - set(spec_routes))
    rows = []
    for name in [*spec_routes, *extra]:
        cells = [_cell(a, name) for a in answers]
        serving = sum(c["state"] == "up" for c in cells)
        asked = sum(c["state"] != "unreachable" for c in cells)
        if asked == 0:
            state = "unknown"
        elif serving == len(cells):
            state = "up"
        elif serving:
            state = "degraded"
        else:
            state = "down"
        rows.append({"route": name, "in_spec": name in spec_routes, "state": state, "serving": serving,
                     "asked": asked, "proxies": len(cells), "per_proxy": cells})
    return rows


def exit_code(answers: list[ProxyAnswer], rows: list[dict[str, Any]]) -> int:
    if answers and not any(a.reachable for a in answers):
        return EXIT_NONE_REACHABLE
    return EXIT_OK if all(r["state"] == "up" for r in rows) else EXIT_NOT_ALL_UP


def summary_line(answers: list[ProxyAnswer], rows: list[dict[str, Any]]) -> str:
    reached = sum(a.reachable for a in answers)
    if answers and not reached:
        return f"no proxy answered (0 of {len(answers)}): route health unknown"
    counts = {s: sum(r["state"] == s for r in rows) for s in ("up", "degraded", "down")}
    text = (f"{counts['up']} of {len(rows)} route(s) up on every proxy, {counts['degraded']} degraded, "
            f"{counts['down']} down; {reached} of {len(answers)} proxies answered")
    return text


def access_hint(hub: Any, port: int) -> str:
    """Who may reach the health port, as the stack's NSG / security groups really say."""
    scrape = [str(c) for c in getattr(getattr(hub, "monitoring", None), "scrape_cidrs", None) or []]
    extra = f", and monitoring.scrape_cidrs ({', '.join(scrape)})" if scrape else ""
    if hub.cloud == "azure":
        subnet = hub.azure_addresses().proxy_subnet
        return (f"the proxies' NSG admits the health port {port} only from the load balancer (AzureLoadBalancer) "
                f"and the proxy subnet {subnet}{extra}, then denies the rest of the VNet and peerings: run this "
                f"from a machine in {subnet}{' or in monitoring.scrape_cidrs' if scrape else ''} (e.g. a proxy)")
    return (f"the proxy security group tunnelhub-{hub.name}-proxies admits the health port {port} only from the "
            f"NLB's security group and from itself{extra}: run this from an instance in tunnelhub-{hub.name}-proxies"
            f"{' or in monitoring.scrape_cidrs' if scrape else ''} (e.g. a proxy)")


def unreachable_advice(answer: ProxyAnswer, hub: Any, port: int) -> str:
    """One line per unreachable proxy: what happened and what to do, worded by the failure."""
    where = f"slot {answer.slot} ({answer.address}:{port})"
    if answer.error == "refused":
        return (f"{where}: connection refused: the machine answered but nothing listens on port {port}; the "
                "health daemon is not running there (booting, or check `systemctl status tunnelhub-health`)")
    if answer.error == "bad-answer":
        return f"{where}: {answer.detail}"
    return (f"{where}: unreachable from this machine ({answer.error}: {answer.detail}); either this machine is "
            f"outside what the health port admits ({access_hint(hub, port)}), or the proxy is down")


def report(hub: Any, addresses: list[str], answers: list[ProxyAnswer], expected_version: str | None) -> dict[str, Any]:
    rows = route_rows([r.name for r in hub.routes], answers)
    return {"schema": SCHEMA, "hub": hub.name, "cloud": hub.cloud, "health_port": hub.proxies.health_port,
            "expected_config_version": expected_version, "exit_code": exit_code(answers, rows),
            "summary": summary_line(answers, rows),
            "proxies": [a.as_dict() for a in answers], "routes": rows}
