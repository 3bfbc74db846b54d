#!/usr/bin/python3
"""tunnelhub on-prem: a TCP quick-ACK host route to one proxy slot (onprem.tcp_quickack).

    quickack-route add    STATE_FILE ENDPOINT    # ExecStartPre=-+ of tunnelhub-<hub>@N.service
    quickack-route remove STATE_FILE ENDPOINT    # ExecStopPost=-+

Why: the proxy's sshd leaves Nagle's algorithm on for a session without a terminal (``ssh -N``),
so when tunneled connections follow each other its small CHANNEL_OPEN waits for this host's
delayed ACK of the previous small segment: ~40 ms per new connection. A route with
``quickack 1`` makes this host acknowledge at once (measured in the lab: 43 ms -> under 1 ms).

``add`` copies the route this host uses to reach the proxy today into a host route (/32 or /128)
with ``quickack 1`` added, so forwarding does not change: same gateway (or nexthop object), device,
preferred source, scope and metrics. It is tagged ``proto 84``, and ``remove`` deletes only routes
with that tag, so a route someone else made is never touched. It adds nothing (and says why)
when the route is not an ordinary unicast route of the main table: policy routing (another
table), a legacy multipath route (pinning one path would change forwarding), a local or blackhole
route, an existing host route that is not ours, or no route at all. A host name endpoint gets a
route per address it resolves to; STATE_FILE records what was added, so ``remove`` deletes
exactly that even if the name resolves differently by then.

Caveat (documented in the package README): the copy is taken when the unit starts. If this
host's route to the proxy changes while the tunnel runs (a new gateway), restart the units.

Never blocks the tunnel: every expected situation exits 0 with one log line (journald); the unit
also prefixes the command with ``-``. Stdlib only, Python 3.8+ (Debian 11+, Ubuntu 20.04+).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

ROUTE_PROTOCOL = "84"
"""The ``proto`` tag of our routes (any value above RTPROT_STATIC is passed through by the kernel;
84 is not used by the kernel, iproute2, systemd-networkd, NetworkManager, BIRD or FRR)."""
COPIED_METRICS = ("mtu", "advmss", "window", "rtt", "rttvar", "ssthresh", "cwnd", "initcwnd",
                  "initrwnd", "features", "reordering", "hoplimit", "fastopen_no_cookie",
                  "congctl", "rto_min")
IP_CANDIDATES = ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip")
COMMAND_TIMEOUT_S = 10


class Skip(Exception):
    """This address gets no quick-ACK route; the message says why (one log line)."""


def log(message: str) -> None:
    print(f"tunnelhub quick-ACK: {message}", flush=True)


def ip_binary() -> str:
    found = shutil.which("ip")
    if found:
        return found
    for candidate in IP_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    raise Skip("iproute2's ip command is not installed")


def run_ip(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([ip_binary(), *args], capture_output=True, text=True, check=False,
                          timeout=COMMAND_TIMEOUT_S)


def ip_json(args: list[str]) -> list[dict]:
    result = run_ip(["-j", *args])
    if result.returncode != 0:
        raise Skip(f"ip {' '.join(args)}: {result.stderr.strip() or 'failed'}")
    try:
        data = json.loads(result.stdout or "[]")
    except ValueError:
        raise Skip(f"ip {' '.join(args)} printed no JSON (iproute2 too old for -j?)") from None
    return data if isinstance(data, list) else []


def host_prefix(address: str) -> str:
    return f"{address}/{32 if ipaddress.ip_address(address).version == 4 else 128}"


def is_host_route(route: dict, address: str) -> bool:
    dst = str(route.get("dst", ""))
    return dst in (address, host_prefix(address))


def matched_route(address: str) -> dict:
    """The route the kernel picks for ``address`` (``ip route get fibmatch``), with its table."""
    routes = ip_json(["-d", "route", "get", "fibmatch", address])
    if not routes:
        raise Skip(f"no route to {address}")
    return routes[0]


def route_args(address: str, route: dict) -> list[str]:
    """``ip route add`` arguments: ``route``'s forwarding copied for ``address`` alone, quick-ACK on."""
    args = ["route", "add", host_prefix(address)]
    if "nhid" in route:
        args += ["nhid", str(route["nhid"])]
    else:
        via = route.get("via")
        if isinstance(via, dict) and via.get("host"):  # an IPv4 route over an IPv6 nexthop
            args += ["via", str(via.get("family", "inet6")), str(via["host"])]
        elif route.get("gateway"):
            args += ["via", str(route["gateway"])]
        if not route.get("dev"):
            raise Skip(f"the route to {address} names no device")
        args += ["dev", str(route["dev"])]
        if "onlink" in route.get("flags", []):
            args.append("onlink")
        if route.get("scope") not in (None, "global", "universe", "0"):
            args += ["scope", str(route["scope"])]
    if route.get("prefsrc"):
        args += ["src", str(route["prefsrc"])]
    for metrics in route.get("metrics", []) or []:
        for name, value in (metrics.items() if isinstance(metrics, dict) else []):
            if name in COPIED_METRICS:
                args += [name, str(value)]
    return args + ["proto", ROUTE_PROTOCOL, "table", "main", "quickack", "1"]


def describe(route: dict) -> str:
    parts = [str(route.get("dst", "?"))]
    for key, word in (("gateway", "via"), ("nhid", "nhid"), ("dev", "dev"), ("table", "table")):
        if route.get(key) is not None:
            parts += [word, str(route[key])]
    return " ".join(parts)


def add_route(address: str) -> str:
    """Add the quick-ACK host route to ``address``; return its prefix or raise :class:`Skip`."""
    route = matched_route(address)
    if is_host_route(route, address) and str(route.get("protocol")) == ROUTE_PROTOCOL:
        delete_route(host_prefix(address))  # ours, left by a run that did not clean up: redo it
        route = matched_route(address)
    if str(route.get("type", "unicast")) not in ("unicast", "1"):
        raise Skip(f"the route to {address} is of type {route.get('type')} ({describe(route)})")
    if str(route.get("table", "main")) not in ("main", "254"):
        raise Skip(f"the route to {address} is in table {route.get('table')} (policy routing: "
                   f"{describe(route)}); a host route in the main table could change forwarding")
    if route.get("nexthops"):
        raise Skip(f"the route to {address} is multipath ({describe(route)}); pinning one path "
                   "would change forwarding")
    if is_host_route(route, address):
        raise Skip(f"a host route to {address} already exists ({describe(route)}); left alone")
    args = route_args(address, route)
    result = run_ip(args)
    if result.returncode != 0:
        raise Skip(f"ip {' '.join(args)}: {result.stderr.strip()}")
    log(f"added {host_prefix(address)} with quickack 1, copied from {describe(route)}")
    return host_prefix(address)


def delete_route(prefix: str) -> bool:
    """Delete our route ``prefix`` (only ``proto 84``: never someone else's); True if it was there."""
    result = run_ip(["route", "del", prefix, "proto", ROUTE_PROTOCOL, "table", "main"])
    return result.returncode == 0


def addresses_of(endpoint: str) -> list[str]:
    try:
        return [str(ipaddress.ip_address(endpoint))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(endpoint, 22, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Skip(f"cannot resolve {endpoint}: {exc}") from None
    seen: list[str] = []
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]
        if address not in seen:
            seen.append(address)
    return seen


def read_state(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return []
    return [str(p) for p in data.get("routes", [])] if isinstance(data, dict) else []


def write_state(path: str, endpoint: str, prefixes: list[str]) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".quickack-", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"endpoint": endpoint, "routes": prefixes}, handle)
        handle.write("\n")
    os.chmod(partial, 0o644)
    os.replace(partial, path)


def remove(state: str, endpoint: str) -> int:
    prefixes = read_state(state)
    if not prefixes:
        try:
            prefixes = [host_prefix(str(ipaddress.ip_address(endpoint)))]
        except ValueError:
            prefixes = []
    for prefix in prefixes:
        if delete_route(prefix):
            log(f"removed {prefix}")
    try:
        os.unlink(state)
    except FileNotFoundError:
        pass
    return 0


def add(state: str, endpoint: str) -> int:
    remove(state, endpoint)
    added: list[str] = []
    try:
        addresses = addresses_of(endpoint)
    except Skip as why:
        log(f"{why}: no quick-ACK route (the tunnel works, new connections may wait ~40 ms)")
        return 0
    for address in addresses:
        try:
            added.append(add_route(address))
        except Skip as why:
            log(f"{why}: no quick-ACK route to {address} (the tunnel works, new connections "
                "may wait ~40 ms)")
    if added:
        write_state(state, endpoint, added)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="quickack-route",
        description="Add or remove tunnelhub's TCP quick-ACK host route to one proxy slot.")
    parser.add_argument("action", choices=("add", "remove"))
    parser.add_argument("state_file", help="where the added routes are recorded (under /run)")
    parser.add_argument("endpoint", help="the proxy slot's address or host name")
    args = parser.parse_args(argv)
    if not args.endpoint:
        log("no endpoint given (TUNNELHUB_ENDPOINT is empty): nothing to do")
        return 0
    try:
        return add(args.state_file, args.endpoint) if args.action == "add" \
            else remove(args.state_file, args.endpoint)
    except Skip as why:
        log(f"{why}: no quick-ACK route change (the tunnel works, new connections may wait ~40 ms)")
        return 0
    except (OSError, subprocess.SubprocessError) as exc:
        log(f"{args.action} failed: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
