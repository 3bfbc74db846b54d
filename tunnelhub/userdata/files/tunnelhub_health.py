#!/usr/bin/env python3
"""tunnelhub per-route health endpoint, run on every proxy VM.

    python3 /usr/local/lib/tunnelhub/tunnelhub_health.py --config /etc/tunnelhub/health.json

The cloud load balancer probes ``GET /routes/<name>`` on every proxy and takes the proxy out
of that route's rotation on 503. Stdlib only (Python 3.11+): it must run on a stock Ubuntu
24.04 or Debian 12 with no pip install.

Design (why it is not "connect on every request" like the reference check):

* One background checker thread per route runs the route's probe at a fixed rate
  (``probe.interval_s``) and caches the result. HTTP handlers only read that cache, so an
  answer takes well under a millisecond whatever the number of LB probers (Azure probes from
  several sources, an NLB from every zone) and never waits on a check: the target sees
  exactly one check per interval per proxy.
* A route is healthy only if its last check succeeded AND that result is fresh. Every check
  is bounded by ``probe.timeout_s`` (DNS, connect and protocol included), so results arrive
  at most ``max(interval, timeout) + timeout`` apart; a result older than that plus a grace
  second means the checker is stuck, and the route answers 503 rather than a stale 200.
* Checks speak the target's protocol far enough to prove the target itself answered, not
  just sshd's loopback listener (which accepts even when the database behind the tunnel is
  down, and stays bound on a half-open session), and end the conversation the way a real
  client does, so a healthy target logs nothing bad:
    mysql       greeting, log in as a check user with an empty password, OK, COM_QUIT
                (HAProxy's ``option mysql-check user X post-41``)
    postgresql  SSLRequest; on 'S' a full TLS handshake closed with close_notify, on 'N'
                a plain close: PostgreSQL logs nothing for either
    sqlserver   TDS PRELOGIN, expect a PRELOGIN response
    oracle      TNS CONNECT (CONNECT_DATA=(COMMAND=ping)), what tnsping sends
    tls         TCP connect + TLS handshake with SNI (forward routes)
    banner      server-speaks-first protocols: at least one byte
    connect     TCP connect + a short settle window for an immediate close; see
                ``check_connect`` for what it cannot see
* A tunnel route that is down while the hub SSH host key is not installed says so: the host
  key fetch records its progress in ``/run/tunnelhub/host-key.json`` and, until it reads
  ``installed``, the reason ends with the fetch's last error, because the tunnel host refuses
  a proxy that does not present the hub key (``GET /`` shows the record under ``host_key``).
* A tunnel route carried by several on-prem tunnel hosts (``hosts`` in its config: each host's
  own loopback port) has one checker per host (HostsChecker): one check per interval per host,
  the route healthy while ANY host is, every host's state in ``GET /routes/<name>`` (``hosts``).
  HAProxy follows the same cached checks through its agent (``agent-check``): ``GET
  /agent/<route>/<host>`` (that host's server) and ``GET /agent/<route>`` (a peer's backup entry:
  any host up; ``down #self`` when the proxy asks itself) answer one raw line, ``up`` or
  ``down #<reason>``, without an HTTP status line. HAProxy never checks a tunnel port itself.
* ``GET /healthz`` reports the daemon itself (checker threads alive and looping), never
  route health, so an instance-health check (AWS ASG target group) does not replace every
  proxy during a database outage.

HTTP: ``GET /routes/<name>`` 200/503 + JSON; ``GET /agent/<route>[/<host>]`` an agent line; ``GET /`` JSON summary of every route, 200
when every route is healthy else 503 (for operators and monitoring; never point a load
balancer at it); ``GET /healthz`` 200/503; ``GET /metrics`` Prometheus text format: the
route state from the same cache (a scrape never runs a check; failure reasons as the fixed
FAILURE_REASONS set) plus a few HAProxy figures per route, read from HAProxy's own exporter
on a Unix socket (HaproxyMetrics: bounded, shared by concurrent scrapers, left out with
``tunnelhub_haproxy_up 0`` when HAProxy does not answer); anything else 404. Route state changes are logged
to stderr (journald); requests are not.

Live configuration (docs/live-config.md): the reconciler rewrites health.json and sends
SIGHUP (``systemctl reload``). The daemon then loads the new file and keeps the checker, and
so the cached state, of every route whose check did not change; it starts checkers for new
or changed routes and stops those of removed routes. A file that does not validate is
refused (logged) and the running routes stay. The ``config_version`` of the loaded file is
on every answer (header ``X-Tunnelhub-Config-Version``) and in ``GET /``, which also carries
the reconciler's status file (``--status-file``: what it applied, what it waits for, what it
refused), so an operator sees from any proxy whether the hub converged.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import http.client
import logging
import os
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOG = logging.getLogger("tunnelhub-health")

DEFAULT_CONFIG_PATH = "/etc/tunnelhub/health.json"
DEFAULT_HOST_KEY_STATUS = "/run/tunnelhub/host-key.json"  # written by tunnelhub_fetch_host_key.py
PROBE_MODES = ("mysql", "postgresql", "sqlserver", "oracle", "tls", "banner", "connect")
ROUTE_KINDS = ("tunnel", "forward")
DEFAULT_CHECK_USER = "tunnelhub_check"
DEFAULT_SETTLE_S = 0.5
# Seconds added to the longest possible gap between two results before a result is stale.
STALE_GRACE_S = 1.0
# /healthz fails when a checker has not started a new round for this many stale periods.
HEARTBEAT_STALE_FACTOR = 3.0
HTTP_REQUEST_TIMEOUT_S = 5.0
HTTP_MAX_CONCURRENT = 64
ROUTE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
HOST_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")  # a tunnel host (spec: lowercase, digits, '-')
CONFIG_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VERSION_HEADER = "X-Tunnelhub-Config-Version"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUS_FILE_MAX_BYTES = 65536
# Why a check failed, as a small fixed set: the ``reason`` label of tunnelhub_route_last_failure_reason
# (the free-text reason stays in the JSON answers and the journal). docs/proxy-runtime.md "Metrics".
FAILURE_REASONS = (
    "none",             # no failed check since the checker started
    "no_tunnel",        # tunnel route: connection refused on the loopback port (ssh -R not connected)
    "connect_refused",  # forward route: the remote refused the TCP connection
    "unreachable",      # TCP connect failed otherwise (no route to host, network unreachable)
    "timeout",          # no connection or no answer within probe.timeout_s
    "dns",              # forward route: the name did not resolve, or not in time
    "closed",           # the target (or sshd, when the on-prem target refused) closed or reset
    "tls",              # the TLS handshake failed
    "protocol",         # the target answered, but not as its protocol should (wrong service?)
    "server_refused",   # the database refused every client now (MySQL ERR 1040, 1129, ...)
    "stale",            # the last result is too old: the checker is stuck
    "other",            # the check itself crashed (a bug): see the journal
)


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


class ConfigError(Exception):
    """The config file is unusable; ``problems`` lists every "field: problem; fix" line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, kw_only=True)
class Probe:
    mode: str
    interval_s: float
    timeout_s: float
    check_user: str = DEFAULT_CHECK_USER  # mysql: a passwordless user allowed from the tunnel host
    server_name: str = ""  # tls: SNI name; empty = the route's host
    settle_s: float = DEFAULT_SETTLE_S  # connect: how long to watch for an immediate close

    @property
    def stale_after_s(self) -> float:
        """Age beyond which the last result no longer says anything about the route."""
        return max(self.interval_s, self.timeout_s) + self.timeout_s + STALE_GRACE_S


@dataclass(frozen=True, kw_only=True)
class TunnelHost:
    """One on-prem tunnel host of a tunnel route: its own loopback port on this proxy."""

    name: str
    port: int


@dataclass(frozen=True, kw_only=True)
class Route:
    name: str
    kind: str
    host: str
    port: int
    probe: Probe
    hosts: tuple[TunnelHost, ...] = ()  # tunnel routes: one check per host; empty: host:port alone

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def for_host(self, host: TunnelHost) -> Route:
        """The route as one tunnel host carries it: the route's check, at that host's port."""
        return Route(name=self.name, kind=self.kind, host=self.host, port=host.port, probe=self.probe)


@dataclass(frozen=True, kw_only=True)
class Config:
    listen_address: str
    port: int
    routes: tuple[Route, ...]
    config_version: str | None = None  # the hub configuration document this file came from


_PROBE_KEYS_BY_MODE = {
    "mysql": {"check_user"},
    "tls": {"server_name"},
    "connect": {"settle_s"},
}
_PROBE_COMMON_KEYS = {"mode", "interval_s", "timeout_s"}


class _Fields:
    """Collects every problem in one pass so the operator fixes the file once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def bad(self, field: str, problem: str, fix: str) -> None:
        self.problems.append(f"{field}: {problem}; fix: {fix}")

    def unknown_keys(self, field: str, obj: dict, allowed: set[str]) -> None:
        for key in sorted(set(obj) - allowed):
            self.bad(f"{field}.{key}" if field else key, "unknown field",
                     f"remove it or correct its spelling (allowed: {', '.join(sorted(allowed))})")

    def integer(self, field: str, value: Any, low: int, high: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.bad(field, f"got {value!r}", f"give an integer from {low} to {high}")
            return None
        return value

    def number(self, field: str, value: Any, low: float, high: float) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            self.bad(field, f"got {value!r}", f"give a number of seconds from {low:g} to {high:g}")
            return None
        return float(value)

    def text(self, field: str, value: Any, fix: str) -> str | None:
        if not isinstance(value, str) or not value.strip() or "\x00" in value or value != value.strip():
            self.bad(field, f"got {value!r}", fix)
            return None
        return value


def parse_config(data: Any) -> Config:
    """Validate a decoded config document; raises ConfigError naming each bad field."""
    f = _Fields()
    if not isinstance(data, dict):
        raise ConfigError([('(top level): not a JSON object; fix: write '
                            '{"listen_address": ..., "port": ..., "routes": [...]}')])
    f.unknown_keys("", data, {"listen_address", "port", "routes", "config_version"})
    listen = data.get("listen_address", "0.0.0.0")
    try:
        ipaddress.ip_address(listen)
    except (ValueError, TypeError):
        f.bad("listen_address", f"got {listen!r}",
              "give an IP address such as 0.0.0.0 (all IPv4 addresses) or ::")
    port = f.integer("port", data.get("port"), 1, 65535)
    raw_routes = data.get("routes")
    routes: list[Route] = []
    if not isinstance(raw_routes, list) or not raw_routes:
        f.bad("routes", f"got {raw_routes!r}", "give a non-empty list of route objects")
        raw_routes = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_routes):
        route = _parse_route(f, f"routes[{i}]", raw)
        if route is None:
            continue
        if route.name in seen:
            f.bad(f"routes[{i}].name", f"{route.name!r} is used twice", "give every route a unique name")
            continue
        seen.add(route.name)
        routes.append(route)
    version = data.get("config_version")
    if version is not None and (not isinstance(version, str) or not CONFIG_VERSION_RE.match(version)):
        f.bad("config_version", f"got {version!r}",
              "give the document version (1-64 letters, digits, '.', '_' or '-'), or leave the field out")
    if f.problems:
        raise ConfigError(f.problems)
    assert port is not None
    return Config(listen_address=listen, port=port, routes=tuple(routes), config_version=version)


def _parse_route(f: _Fields, where: str, raw: Any) -> Route | None:
    if not isinstance(raw, dict):
        f.bad(where, f"got {raw!r}", "give an object with name, kind, host, port and probe")
        return None
    before = len(f.problems)
    f.unknown_keys(where, raw, {"name", "kind", "host", "port", "probe", "hosts"})
    name = raw.get("name")
    if not isinstance(name, str) or not ROUTE_NAME_RE.match(name):
        f.bad(f"{where}.name", f"got {name!r}",
              "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    kind = raw.get("kind")
    if kind not in ROUTE_KINDS:
        f.bad(f"{where}.kind", f"got {kind!r}", f"use one of: {', '.join(ROUTE_KINDS)}")
    host = raw.get("host")
    if not isinstance(host, str) or not host or len(host) > 253 or any(c.isspace() for c in host):
        f.bad(f"{where}.host", f"got {host!r}",
              "give the address to check: 127.0.0.1 for a tunnel route, the remote DNS name for a forward route")
    port = f.integer(f"{where}.port", raw.get("port"), 1, 65535)
    probe = _parse_probe(f, f"{where}.probe", raw.get("probe"))
    hosts = _parse_hosts(f, f"{where}.hosts", raw["hosts"], kind) if "hosts" in raw else ()
    if len(f.problems) > before or probe is None or port is None:
        return None
    return Route(name=name, kind=kind, host=host, port=port, probe=probe, hosts=hosts)


def _parse_hosts(f: _Fields, where: str, raw: Any, kind: Any) -> tuple[TunnelHost, ...]:
    """A tunnel route's tunnel hosts: ``[{"name": ..., "port": ...}]``, names and ports unique."""
    if kind != "tunnel":
        f.bad(where, "only a tunnel route has tunnel hosts", "remove hosts from the forward route")
        return ()
    if not isinstance(raw, list) or not raw:
        f.bad(where, f"got {raw!r}", 'give a non-empty list such as [{"name": "host-a", "port": 13306}]')
        return ()
    hosts: list[TunnelHost] = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            f.bad(at, f"got {item!r}", 'give an object {"name": <tunnel host>, "port": <its loopback port>}')
            continue
        f.unknown_keys(at, item, {"name", "port"})
        name = item.get("name")
        if not isinstance(name, str) or not HOST_NAME_RE.match(name):
            f.bad(f"{at}.name", f"got {name!r}", "use 1-63 lowercase letters, digits and '-', starting with a letter")
            continue
        port = f.integer(f"{at}.port", item.get("port"), 1, 65535)
        if port is None:
            continue
        if any(h.name == name for h in hosts):
            f.bad(f"{at}.name", f"{name!r} is used twice", "give every tunnel host of the route a unique name")
        elif any(h.port == port for h in hosts):
            f.bad(f"{at}.port", f"{port} is used twice", "give every tunnel host of the route its own port")
        else:
            hosts.append(TunnelHost(name=name, port=port))
    return tuple(hosts)


def _parse_probe(f: _Fields, where: str, raw: Any) -> Probe | None:
    if not isinstance(raw, dict):
        f.bad(where, f"got {raw!r}", 'give an object such as {"mode": "connect", "interval_s": 2.0, "timeout_s": 2.0}')
        return None
    before = len(f.problems)
    mode = raw.get("mode")
    if mode not in PROBE_MODES:
        f.bad(f"{where}.mode", f"got {mode!r}", f"use one of: {', '.join(PROBE_MODES)}")
        return None
    f.unknown_keys(where, raw, _PROBE_COMMON_KEYS | _PROBE_KEYS_BY_MODE.get(mode, set()))
    interval = f.number(f"{where}.interval_s", raw.get("interval_s"), 0.1, 3600)
    timeout = f.number(f"{where}.timeout_s", raw.get("timeout_s"), 0.05, 60)
    options: dict[str, Any] = {}
    if "check_user" in raw:
        options["check_user"] = f.text(f"{where}.check_user", raw["check_user"],
                                       "give the MySQL user the check logs in as (empty password), "
                                       f"for example {DEFAULT_CHECK_USER!r}")
    if "server_name" in raw:
        options["server_name"] = f.text(f"{where}.server_name", raw["server_name"],
                                        "give the TLS server name (SNI) to send, or leave the field out to use host")
    if "settle_s" in raw:
        settle = f.number(f"{where}.settle_s", raw["settle_s"], 0, 60)
        if settle is not None and timeout is not None and settle >= timeout:
            f.bad(f"{where}.settle_s", f"{settle:g} is not below timeout_s {timeout:g}",
                  "make settle_s smaller than timeout_s (the settle window is part of the timeout)")
        options["settle_s"] = settle
    if len(f.problems) > before:
        return None
    return Probe(mode=mode, interval_s=interval, timeout_s=timeout, **options)


def load_config(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ConfigError([(f"(file): cannot read {path}: {exc.strerror}; fix: pass the path "
                            "of the health config with --config")]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([(f"(file): {path} is not valid JSON ({exc}); fix: regenerate it "
                            "with tunnelhub render-userdata")]) from None
    return parse_config(data)


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CheckResult:
    healthy: bool
    reason: str  # stable text (no timings) so that state-change logging stays meaningful
    warning: str | None = None  # healthy but something needs an operator (e.g. check user)
    latency_s: float = 0.0
    finished_at: float = 0.0  # time.monotonic()
    failure: str | None = None  # a failed check's class (FAILURE_REASONS); None when healthy


class CheckFailed(Exception):
    """The route cannot carry traffic; the message is the reason shown to operators, ``kind``
    its class from FAILURE_REASONS (the metrics' bounded ``reason`` label)."""

    def __init__(self, message: str, kind: str = "protocol"):
        assert kind in FAILURE_REASONS, kind
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Passed:
    reason: str
    warning: str | None = None


class Deadline:
    def __init__(self, seconds: float):
        self.total = seconds
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return self._end - time.monotonic()


class _Conversation:
    """A socket plus the route's deadline, with failure texts that say what was missing."""

    def __init__(self, route: Route, sock: socket.socket, deadline: Deadline):
        self.route = route
        self.sock = sock
        self.deadline = deadline

    def _hint_closed(self) -> str:
        if self.route.kind == "tunnel":
            return ": target down behind the tunnel?"
        return ": the remote service closed the connection"

    def _hint_silent(self) -> str:
        if self.route.kind == "tunnel":
            return ": tunnel half-open?"
        return ": remote not answering?"

    def _arm(self, what: str) -> None:
        left = self.deadline.left()
        if left <= 0:
            raise CheckFailed(self.timeout_text(what), "timeout")
        self.sock.settimeout(left)

    def timeout_text(self, what: str) -> str:
        return f"no {what} within {self.deadline.total:.1f} s{self._hint_silent()}"

    def closed_text(self, what: str, how: str = "closed") -> str:
        return f"{how} before {what}{self._hint_closed()}"

    def send(self, data: bytes, what: str) -> None:
        self._arm(what)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise CheckFailed(self.timeout_text(what), "timeout") from None
        except (BrokenPipeError, ConnectionResetError):
            raise CheckFailed(self.closed_text(what, "connection reset"), "closed") from None

    def recv_some(self, limit: int, what: str) -> bytes:
        self._arm(what)
        try:
            data = self.sock.recv(limit)
        except TimeoutError:
            raise CheckFailed(self.timeout_text(what), "timeout") from None
        except ConnectionResetError:
            raise CheckFailed(self.closed_text(what, "connection reset"), "closed") from None
        if not data:
            raise CheckFailed(self.closed_text(what), "closed")
        return data

    def recv_exact(self, count: int, what: str) -> bytes:
        chunks = bytearray()
        while len(chunks) < count:
            chunks += self.recv_some(count - len(chunks), what)
        return bytes(chunks)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Resolver:
    """Resolves one route's host at every check without ever blocking its checker.

    getaddrinfo() ignores socket timeouts (a dead DNS server costs the resolver's own
    timeout × attempts), so the lookup runs in a daemon thread and the check waits only
    for what is left of its deadline. At most one lookup per route is in flight: a check
    that finds the previous lookup still running waits on that one instead of starting
    another, so a dead DNS server cannot pile up threads.
    """

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self._numeric = _is_ip_literal(host)
        self._inflight: _Lookup | None = None

    def resolve(self, deadline: Deadline) -> list[tuple]:
        if self._numeric:
            return socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                      flags=socket.AI_NUMERICHOST)
        if self._inflight is None or self._inflight.done.is_set():
            self._inflight = _Lookup(self.host, self.port)
        lookup = self._inflight
        if not lookup.done.wait(max(deadline.left(), 0)):
            raise CheckFailed(f"DNS lookup of {self.host} did not answer within {deadline.total:.1f} s", "dns")
        if lookup.error is not None:
            raise CheckFailed(f"DNS lookup of {self.host} failed: {lookup.error}", "dns")
        return lookup.addresses


class _Lookup:
    def __init__(self, host: str, port: int):
        self.done = threading.Event()
        self.addresses: list[tuple] = []
        self.error: str | None = None
        threading.Thread(target=self._run, args=(host, port), daemon=True,
                         name=f"dns-{host}").start()

    def _run(self, host: str, port: int) -> None:
        try:
            self.addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self.error = exc.strerror or str(exc)
        finally:
            self.done.set()


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def open_conversation(route: Route, deadline: Deadline, resolver: Resolver) -> _Conversation:
    """TCP-connect to the route's target, trying each resolved address within the deadline."""
    errors: list[str] = []
    kinds: list[str] = []
    for family, kind, proto, _, address in resolver.resolve(deadline):
        left = deadline.left()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        sock.settimeout(left)
        try:
            sock.connect(address)
        except TimeoutError:
            sock.close()
            errors.append(f"TCP connect to {route.target} timed out after {deadline.total:.1f} s")
            kinds.append("timeout")
        except ConnectionRefusedError:
            sock.close()
            if route.kind == "tunnel":
                errors.append(f"connection refused on {route.target}: no tunnel listener "
                              "(on-prem ssh -R not connected?)")
                kinds.append("no_tunnel")
            else:
                errors.append(f"connection refused by {route.target}")
                kinds.append("connect_refused")
        except OSError as exc:
            sock.close()
            errors.append(f"TCP connect to {route.target} failed: {exc.strerror or exc}")
            kinds.append("unreachable")
        else:
            return _Conversation(route, sock, deadline)
    if not errors:
        errors.append(f"TCP connect to {route.target} timed out after {deadline.total:.1f} s")
        kinds.append("timeout")
    raise CheckFailed(errors[-1] if len(set(errors)) == 1 else "; ".join(dict.fromkeys(errors)), kinds[-1])


# --- mysql ----------------------------------------------------------------------------

CLIENT_LONG_PASSWORD = 0x1
CLIENT_LONG_FLAG = 0x4
CLIENT_PROTOCOL_41 = 0x200
CLIENT_TRANSACTIONS = 0x2000
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_PLUGIN_AUTH = 0x80000
CLIENT_CONNECT_ATTRS = 0x100000
MYSQL_CHARSET_UTF8 = 33  # utf8_general_ci: known to every server since 4.1
# ERR codes that mean nobody can open a connection now, whoever logs in: the route is down.
MYSQL_FATAL_ERRORS = {
    1040: "too many connections",
    1053: "server shutting down",
    1129: "host blocked (max_connect_errors)",
    1130: "host not allowed to connect",
}


def _mysql_packet(seq: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq & 0xFF]) + payload


def _mysql_read(conv: _Conversation, what: str) -> tuple[int, bytes]:
    header = conv.recv_exact(4, what)
    length = int.from_bytes(header[:3], "little")
    return header[3], conv.recv_exact(length, what)


def _mysql_err(payload: bytes) -> tuple[int, str]:
    code = int.from_bytes(payload[1:3], "little")
    message = payload[3:]
    if message[:1] == b"#":  # protocol 4.1: '#' + 5-byte SQLSTATE
        message = message[6:]
    return code, message.decode("utf-8", "replace")


def _lenenc_str(value: bytes) -> bytes:
    assert len(value) < 251
    return bytes([len(value)]) + value


def check_mysql(route: Route, conv: _Conversation) -> Passed:
    """Greeting, login as the check user with an empty password, OK, COM_QUIT.

    A login that ends in ERR (check user missing, wrong host part, has a password) still
    proves that the server itself answered a full protocol round trip through the tunnel,
    so the route is reported healthy WITH a warning: marking it down would take the route
    out of every proxy at once (they all share the database) for a monitoring mistake,
    turning a working database into an outage. The warning is surfaced in the JSON and
    logged, because each such check costs an "Access denied" line in the server log (an
    authentication error: measured on MariaDB 10.11, it does not count toward
    max_connect_errors host blocking, unlike a connect-and-close). ERR codes that mean no client can connect now (MYSQL_FATAL_ERRORS) are failures.
    """
    seq, greeting = _mysql_read(conv, "greeting")
    if greeting[:1] == b"\xff":
        code, message = _mysql_err(greeting)
        raise CheckFailed(f"server refused the connection: ERR {code} {message}", "server_refused")
    if greeting[:1] != b"\x0a":
        raise CheckFailed(f"unexpected greeting (protocol {greeting[:1].hex()}): not a MySQL server?")
    version, _, rest = greeting[1:].partition(b"\x00")
    server = version.decode("ascii", "replace").removeprefix("5.5.5-")  # MariaDB's prefix
    # rest: thread id(4) scramble-1(8) filler(1) caps-low(2) [charset(1) status(2) caps-high(2) ...]
    caps = int.from_bytes(rest[13:15], "little")
    if len(rest) >= 20:
        caps |= int.from_bytes(rest[18:20], "little") << 16
    plugin = "mysql_native_password"
    if caps & CLIENT_PLUGIN_AUTH and len(rest) > 31:
        scramble_len = max(13, rest[20] - 8)
        tail = rest[31 + scramble_len:]
        plugin = tail.split(b"\x00", 1)[0].decode("ascii", "replace") or plugin
    needed = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION
    if caps & needed != needed:
        raise CheckFailed(f"server {server} does not speak protocol 4.1: too old for the mysql check")

    flags = (CLIENT_LONG_PASSWORD | CLIENT_LONG_FLAG | CLIENT_PROTOCOL_41 | CLIENT_TRANSACTIONS
             | CLIENT_SECURE_CONNECTION) | (caps & (CLIENT_PLUGIN_AUTH | CLIENT_CONNECT_ATTRS))
    user = route.probe.check_user.encode("utf-8")
    response = struct.pack("<IIB23x", flags, 1 << 24, MYSQL_CHARSET_UTF8) + user + b"\x00"
    response += b"\x00"  # auth-response length: empty password
    if flags & CLIENT_PLUGIN_AUTH:
        response += plugin.encode("ascii") + b"\x00"
    if flags & CLIENT_CONNECT_ATTRS:
        attrs = _lenenc_str(b"_client_name") + _lenenc_str(b"tunnelhub_health")
        response += _lenenc_str(attrs)
    conv.send(_mysql_packet(seq + 1, response), "login")

    for _ in range(6):  # OK/ERR, or at most a few auth-switch / more-data rounds first
        seq, reply = _mysql_read(conv, "reply to login")
        first = reply[:1]
        if first == b"\x00":
            conv.send(_mysql_packet(0, b"\x01"), "COM_QUIT")  # a clean goodbye: nothing logged
            _drain_until_close(conv)
            return Passed(f"MySQL login OK as {route.probe.check_user} (server {server})")
        if first == b"\xff":
            code, message = _mysql_err(reply)
            if code in MYSQL_FATAL_ERRORS:
                raise CheckFailed(f"server refused the login: ERR {code} {message} "
                                  f"({MYSQL_FATAL_ERRORS[code]})", "server_refused")
            return Passed(
                f"MySQL server {server} answered (login rejected)",
                warning=(f"check user {route.probe.check_user!r} rejected: ERR {code} {message}; "
                         f"fix: CREATE USER '{route.probe.check_user}'@'<tunnel host>' (no password, "
                         "no grants); until then each check logs an access-denied warning on the server"),
            )
        if first == b"\xfe":
            if len(reply) == 1:
                raise CheckFailed("server asked for pre-4.1 password auth (old_passwords): not supported")
            switched = reply[1:].split(b"\x00", 1)[0].decode("ascii", "replace")
            answer = b"\x00" if switched == "mysql_clear_password" else b""
            conv.send(_mysql_packet(seq + 1, answer), "auth switch reply")
            continue
        if first == b"\x01":  # AuthMoreData
            if reply[1:2] == b"\x03":  # caching_sha2 fast-auth success; the OK follows
                continue
            # full authentication requested (or a public key sent): an empty password
            # cannot complete it, answer "no password" and let the server send ERR
            conv.send(_mysql_packet(seq + 1, b"\x00"), "auth data reply")
            continue
        raise CheckFailed(f"unexpected reply to login (0x{reply[:1].hex()}): not a MySQL server?")
    raise CheckFailed("login did not finish after several authentication rounds")


def _drain_until_close(conv: _Conversation) -> None:
    """After a goodbye, wait (within the deadline) for the server to close first."""
    try:
        conv.sock.settimeout(max(min(conv.deadline.left(), 1.0), 0.01))
        while conv.sock.recv(4096):
            pass
    except OSError:
        pass


# --- postgresql -----------------------------------------------------------------------

PG_SSL_REQUEST = struct.pack("!II", 8, 80877103)


def _client_tls_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # liveness, not identity: clients verify end to end
    return context


def _tls_handshake(conv: _Conversation, server_name: str | None, what: str) -> ssl.SSLSocket:
    conv._arm(what)
    try:
        tls = _client_tls_context().wrap_socket(conv.sock, server_hostname=server_name,
                                                do_handshake_on_connect=False)
    except OSError as exc:
        raise CheckFailed(f"{what} failed: {exc}", "tls") from None
    conv.sock = tls
    try:
        tls.do_handshake()
    except TimeoutError:
        raise CheckFailed(conv.timeout_text(what), "timeout") from None
    except ssl.SSLEOFError:
        raise CheckFailed(conv.closed_text(f"the end of the {what}"), "closed") from None
    except ConnectionResetError:
        raise CheckFailed(conv.closed_text(f"the end of the {what}", "connection reset"), "closed") from None
    except ssl.SSLError as exc:
        raise CheckFailed(f"{what} failed: {exc.reason or exc}", "tls") from None
    return tls


def _tls_goodbye(conv: _Conversation) -> None:
    """Send close_notify and wait for the peer's: a server then sees a clean end of stream.

    Closing without it is what makes PostgreSQL log "SSL error: unexpected eof while
    reading" (or "could not receive data from client") for every check.
    """
    tls = conv.sock
    assert isinstance(tls, ssl.SSLSocket)
    try:
        tls.settimeout(max(min(conv.deadline.left(), 1.0), 0.01))
        conv.sock = tls.unwrap()
    except (OSError, ValueError):
        pass


def check_postgresql(route: Route, conv: _Conversation) -> Passed:
    """SSLRequest; 'S' -> TLS handshake then close_notify; 'N' -> close. Logs nothing.

    PostgreSQL (ProcessStartupPacket) stays silent when the connection ends before the
    first byte of a startup packet, including right after its SSL answer; what it does
    log is a handshake cut short ("could not accept SSL connection: EOF detected") and a
    TLS stream ended without close_notify. Both are avoided here.
    """
    conv.send(PG_SSL_REQUEST, "SSLRequest")
    answer = conv.recv_some(1, "reply to SSLRequest")
    if answer == b"N":
        return Passed("PostgreSQL answered SSLRequest (no TLS)")
    if answer != b"S":
        raise CheckFailed(f"unexpected reply to SSLRequest ({answer!r}): not a PostgreSQL server?")
    tls = _tls_handshake(conv, None, "TLS handshake")
    version = tls.version()
    _tls_goodbye(conv)
    return Passed(f"PostgreSQL answered SSLRequest, TLS handshake OK ({version})")


# --- sqlserver ------------------------------------------------------------------------

TDS_PRELOGIN = 0x12
TDS_RESPONSE = 0x04


def _tds_prelogin() -> bytes:
    options = [
        (0x00, bytes([11, 0, 0, 0, 0, 0])),  # VERSION (client): 11.0.0.0, sub-build 0
        (0x01, b"\x02"),                     # ENCRYPTION: ENCRYPT_NOT_SUP
        (0x02, b"\x00"),                     # INSTOPT: default instance
        (0x03, b"\x00\x00\x00\x00"),         # THREADID
        (0x04, b"\x00"),                     # MARS: off
    ]
    offset = len(options) * 5 + 1
    table, data = b"", b""
    for token, value in options:
        table += struct.pack(">BHH", token, offset + len(data), len(value))
        data += value
    payload = table + b"\xff" + data
    return struct.pack(">BBHHBB", TDS_PRELOGIN, 0x01, 8 + len(payload), 0, 1, 0) + payload


def check_sqlserver(route: Route, conv: _Conversation) -> Passed:
    """TDS PRELOGIN -> a PRELOGIN response (packet type 0x04) from the server."""
    conv.send(_tds_prelogin(), "PRELOGIN")
    header = conv.recv_exact(8, "PRELOGIN response")
    kind, _status, length = struct.unpack(">BBH", header[:4])
    if kind != TDS_RESPONSE or not 8 < length <= 4096:
        raise CheckFailed(f"unexpected reply to PRELOGIN (type 0x{kind:02x}): not a SQL Server?")
    payload = conv.recv_exact(length - 8, "PRELOGIN response")
    return Passed(f"SQL Server answered PRELOGIN{_tds_version(payload)}")


def _tds_version(payload: bytes) -> str:
    position = 0
    while position + 5 <= len(payload) and payload[position] != 0xFF:
        token, offset, size = struct.unpack(">BHH", payload[position:position + 5])
        if token == 0x00 and size >= 4 and offset + 4 <= len(payload):
            major, minor, build = payload[offset], payload[offset + 1], int.from_bytes(payload[offset + 2:offset + 4], "big")
            return f" (version {major}.{minor}.{build})"
        position += 5
    return ""


# --- oracle ---------------------------------------------------------------------------

TNS_CONNECT, TNS_ACCEPT, TNS_REFUSE, TNS_REDIRECT, TNS_RESEND = 1, 2, 4, 5, 11
TNS_PING_DATA = b"(CONNECT_DATA=(COMMAND=ping))"


def _tns_connect_ping() -> bytes:
    header_and_fields = 58  # connect data starts right after the fixed CONNECT fields
    body = struct.pack(
        ">HHHHHHHHHHI",
        0x0138,                 # version 312
        0x012C,                 # lowest compatible version 300
        0x0000,                 # service options
        0x0800,                 # session data unit
        0x7FFF,                 # transport data unit
        0x7F08,                 # protocol characteristics
        0x0000,                 # line turnaround
        0x0100,                 # value of 1 in hardware byte order
        len(TNS_PING_DATA),     # connect data length
        header_and_fields,      # connect data offset
        0,                      # max receivable connect data
    )
    body = body.ljust(header_and_fields - 8, b"\x00")  # flags and trace fields: zero
    total = header_and_fields + len(TNS_PING_DATA)
    return struct.pack(">HHBBH", total, 0, TNS_CONNECT, 0, 0) + body + TNS_PING_DATA


def check_oracle(route: Route, conv: _Conversation) -> Passed:
    """TNS CONNECT (COMMAND=ping), what tnsping sends: the listener answers, no session.

    It proves the listener answers through the tunnel, not that a database instance is
    open (the listener replies for itself). The listener logs one ordinary "ping" line.
    """
    packet = _tns_connect_ping()
    for _ in range(2):  # a RESEND asks for the CONNECT once more
        conv.send(packet, "TNS CONNECT")
        header = conv.recv_exact(8, "TNS response")
        length, kind = struct.unpack(">H", header[:2])[0], header[4]
        if kind not in (TNS_ACCEPT, TNS_REFUSE, TNS_REDIRECT, TNS_RESEND) or length < 8:
            raise CheckFailed(f"unexpected reply to TNS CONNECT (type {kind}): not an Oracle listener?")
        body = conv.recv_exact(min(length - 8, 8192), "TNS response") if length > 8 else b""
        if kind == TNS_RESEND:
            continue
        text = body.decode("ascii", "replace")
        error = re.search(r"\(ERR=(\d+)\)", text)
        if error and error.group(1) != "0":
            return Passed("Oracle listener answered TNS ping",
                          warning=f"listener answered the ping with ERR={error.group(1)}")
        version = re.search(r"\(VSNNUM=(\d+)\)", text)
        return Passed("Oracle listener answered TNS ping"
                      + (f" (VSNNUM={version.group(1)})" if version else ""))
    raise CheckFailed("Oracle listener kept asking to resend the TNS CONNECT")


# --- tls, banner, connect -------------------------------------------------------------


def check_tls(route: Route, conv: _Conversation) -> Passed:
    """TCP connect + TLS handshake with SNI (forward routes). The certificate is not
    verified: this is a liveness check; the clients verify the remote end to end."""
    server_name = route.probe.server_name or (None if _is_ip_literal(route.host) else route.host)
    tls = _tls_handshake(conv, server_name, "TLS handshake")
    version = tls.version()
    _tls_goodbye(conv)
    return Passed(f"TLS handshake OK ({version}{', SNI ' + server_name if server_name else ''})")


def check_banner(route: Route, conv: _Conversation) -> Passed:
    """Server-speaks-first protocols (SSH, SMTP, FTP, MySQL without login): one byte."""
    data = conv.recv_some(256, "banner")
    line = data.split(b"\n", 1)[0].strip().decode("ascii", "replace")
    printable = "".join(c for c in line if c.isprintable())[:60]
    return Passed(f"banner received ({printable})" if printable else "banner received")


def check_connect(route: Route, conv: _Conversation) -> Passed:
    """TCP connect, then watch ``settle_s`` for an immediate EOF/RST.

    sshd accepts on the tunnel's loopback port whatever happens behind it; when the
    on-prem target refuses, the channel open fails and sshd closes the socket right
    away, which this mode sees. It CANNOT see a half-open SSH session (nothing comes back,
    which looks like a healthy idle server); the proxy's lowered net.ipv4.tcp_retries2
    kills such a session about 13 s later, which removes the listener, and the next check
    then fails with "connection refused". Every check also costs the target one
    unauthenticated connection per interval (a warning in its log): prefer a protocol mode.
    """
    settle = min(route.probe.settle_s, max(conv.deadline.left(), 0))
    conv.sock.settimeout(max(settle, 0.001))
    try:
        data = conv.sock.recv(1)
    except TimeoutError:
        return Passed("TCP connect OK, still open after the settle window")
    except ConnectionResetError:
        raise CheckFailed(f"accepted then reset within {settle:.1f} s{conv._hint_closed()}", "closed") from None
    if not data:
        raise CheckFailed(f"accepted then closed within {settle:.1f} s{conv._hint_closed()}", "closed")
    return Passed("TCP connect OK, server spoke first")


CHECKS: dict[str, Callable[[Route, _Conversation], Passed]] = {
    "mysql": check_mysql,
    "postgresql": check_postgresql,
    "sqlserver": check_sqlserver,
    "oracle": check_oracle,
    "tls": check_tls,
    "banner": check_banner,
    "connect": check_connect,
}


def run_check(route: Route, resolver: Resolver | None = None) -> CheckResult:
    """One bounded check of one route. Never raises for a target problem."""
    started = time.monotonic()
    deadline = Deadline(route.probe.timeout_s)
    conv = None
    try:
        conv = open_conversation(route, deadline, resolver or Resolver(route.host, route.port))
        passed = CHECKS[route.probe.mode](route, conv)
        healthy, reason, warning, failure = True, passed.reason, passed.warning, None
    except CheckFailed as exc:
        healthy, reason, warning, failure = False, str(exc), None, exc.kind
    finally:
        if conv is not None:
            conv.close()
    finished = time.monotonic()
    return CheckResult(healthy=healthy, reason=reason, warning=warning,
                       latency_s=finished - started, finished_at=finished, failure=failure)


# --------------------------------------------------------------------------------------
# Checker threads and the cached state
# --------------------------------------------------------------------------------------


class HostKeyStatus:
    """The host key fetch's progress file, re-read only when it changes. No file: nothing to say
    (a second boot, where the key is already in place, or a proxy booted another way)."""

    def __init__(self, path: str):
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._record: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def record(self) -> dict[str, Any] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        with self._lock:
            if self._seen != (st.st_mtime_ns, st.st_size):
                try:
                    with open(self.path, encoding="utf-8") as fh:
                        record = json.load(fh)
                    self._record = record if isinstance(record, dict) else None
                except (OSError, ValueError):
                    self._record = None
                self._seen = (st.st_mtime_ns, st.st_size)
            return self._record

    def problem(self) -> str | None:
        """Why tunnels cannot reach this proxy yet, or None once the key is installed."""
        record = self.record()
        if record is None or record.get("state") == "installed":
            return None
        state = record.get("state", "?")
        what = {"fetching": "being fetched", "retrying": "not installed yet (retrying)",
                "failed": "not installed: the fetch gave up"}.get(state, f"in state {state!r}")
        error = record.get("error")
        detail = f" (attempt {record.get('attempt', '?')}: {error})" if error else ""
        return (f"the hub SSH host key is {what}{detail}; the tunnel host refuses this proxy until it "
                "presents that key")


class RouteChecker(threading.Thread):
    """Runs one route's check at a fixed rate and keeps the last result."""

    def __init__(self, route: Route, stop: threading.Event,
                 check: Callable[[Route, Resolver], CheckResult] = run_check,
                 host_key: HostKeyStatus | None = None, tunnel_host: str | None = None,
                 on_result: Callable[[], None] | None = None):
        super().__init__(name=f"check-{route.name}" + (f"-{tunnel_host}" if tunnel_host else ""), daemon=True)
        self.route = route
        self.tunnel_host = tunnel_host  # one tunnel host's checker (of a HostsChecker), else None
        self._on_result = on_result
        self.host_key = host_key
        self.result: CheckResult | None = None  # replaced whole: readers need no lock
        self.rounds = 0
        # For GET /metrics, updated by this thread only, after each result.
        self.consecutive_failures = 0
        self.state_changes = 0  # up<->down flips between two consecutive check results
        self.last_failure = "none"  # FAILURE_REASONS of the latest failed check
        self.state_since: float | None = None  # monotonic end of the first check of the current state
        self.heartbeat = time.monotonic()  # start of the current round
        self._stop_event = stop
        self._check = check
        self._resolver = Resolver(route.host, route.port)

    def run(self) -> None:
        interval = self.route.probe.interval_s
        next_start = time.monotonic()
        while not self._stop_event.is_set():
            self.heartbeat = time.monotonic()
            try:
                result = self._check(self.route, self._resolver)
            except Exception as exc:  # noqa: BLE001 - a bug in a check must not kill the checker
                now = time.monotonic()
                result = CheckResult(healthy=False, reason=f"check crashed: {exc!r}",
                                     latency_s=now - self.heartbeat, finished_at=now, failure="other")
            self._count(self.result, result)
            self.result = result
            self.rounds += 1
            if self._on_result is not None:
                self._on_result()
            # Fixed rate; a round that overran starts the next at once, never a catch-up burst.
            next_start = max(next_start + interval, time.monotonic())
            self._stop_event.wait(next_start - time.monotonic())

    def _count(self, previous: CheckResult | None, result: CheckResult) -> None:
        if result.healthy:
            self.consecutive_failures = 0
        else:
            self.consecutive_failures += 1
            self.last_failure = result.failure if result.failure in FAILURE_REASONS else "other"
        if previous is not None and previous.healthy != result.healthy:
            self.state_changes += 1
        if previous is None or previous.healthy != result.healthy:
            self.state_since = result.finished_at

    def status(self, now: float) -> dict[str, Any]:
        """What the load balancer gets for this route, computed from the cache only."""
        probe = self.route.probe
        result = self.result
        body: dict[str, Any] = {"route": self.route.name, "healthy": False, "reason": "",
                                "warning": None, "mode": probe.mode, "target": self.route.target,
                                "age_s": None, "latency_ms": None, "checks": self.rounds}
        if result is None:
            body["reason"] = "starting: no check has finished yet"
            return body
        age = now - result.finished_at
        since = self.state_since
        body.update(age_s=round(age, 3), latency_ms=round(result.latency_s * 1000, 2),
                    warning=result.warning, since_s=None if since is None else round(now - since, 1))
        if age > probe.stale_after_s:
            body["reason"] = (f"stale: last check finished {age:.1f} s ago (limit "
                              f"{probe.stale_after_s:.1f} s), checker stuck? last result: {result.reason}")
        else:
            body["healthy"], body["reason"] = result.healthy, result.reason
        if not body["healthy"] and self.route.kind == "tunnel" and self.host_key is not None:
            problem = self.host_key.problem()
            if problem:
                body["reason"] += f"; {problem}"
        return body

    def alive(self, now: float) -> bool:
        limit = HEARTBEAT_STALE_FACTOR * self.route.probe.stale_after_s
        return self.is_alive() and now - self.heartbeat <= limit

    def retire(self) -> None:
        """Stop after the current round (a reload removed or changed this route)."""
        self._stop_event.set()


class HostsChecker:
    """A tunnel route carried by several tunnel hosts: one RouteChecker per host (each runs the
    route's check at its host's port, once per interval), and the route's state from theirs.

    The route is healthy while ANY host's last check passed and is fresh (what ``GET /routes/R``
    answers the load balancer); ``status()`` adds every host's state under ``hosts``. It stands in
    for a RouteChecker wherever the daemon keeps one per route (HTTP, metrics, reload, liveness):
    ``result`` is the latest host result, ``rounds`` the checks of all hosts, and the route-level
    counters follow the route's own up/down state (updated after each host's check).
    """

    def __init__(self, route: Route, hosts: dict[str, RouteChecker] | None = None,
                 make: Callable[[Route, str, Callable[[], None]], RouteChecker] | None = None,
                 host_key: HostKeyStatus | None = None):
        assert route.hosts
        self.route = route
        self.host_key = host_key
        self._lock = threading.Lock()
        self.consecutive_failures = 0  # host checks in a row that ended with no host up
        self.state_changes = 0
        self.last_failure = "none"
        self.state_since: float | None = None
        self._healthy: bool | None = None
        reuse = hosts or {}
        self.hosts: dict[str, RouteChecker] = {}
        for h in route.hosts:
            checker = reuse.get(h.name)
            if checker is None or checker.route != route.for_host(h) or (checker.ident is not None
                                                                         and not checker.is_alive()):
                assert make is not None
                checker = make(route.for_host(h), h.name, self._host_done)
            else:
                checker._on_result = self._host_done
            self.hosts[h.name] = checker

    # -- the RouteChecker interface -------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.route.name

    @property
    def result(self) -> CheckResult | None:
        results = [c.result for c in self.hosts.values() if c.result is not None]
        return max(results, key=lambda r: r.finished_at) if results else None

    @property
    def rounds(self) -> int:
        return sum(c.rounds for c in self.hosts.values())

    @property
    def heartbeat(self) -> float:
        return min(c.heartbeat for c in self.hosts.values())

    def start(self) -> None:
        for checker in self.hosts.values():
            if checker.ident is None:
                checker.start()

    def is_alive(self) -> bool:
        return all(c.is_alive() for c in self.hosts.values())

    def join(self, timeout: float | None = None) -> None:
        for checker in self.hosts.values():
            if checker.ident is not None:
                checker.join(timeout)

    def alive(self, now: float) -> bool:
        return all(c.alive(now) for c in self.hosts.values())

    def retire(self, keep: tuple[RouteChecker, ...] = ()) -> None:
        for checker in self.hosts.values():
            if checker not in keep:
                checker.retire()

    def _host_done(self) -> None:
        """After any host's check: the route's own up/down state and counters."""
        with self._lock:
            latest = self.result
            healthy = any(c.result is not None and c.result.healthy for c in self.hosts.values())
            if healthy:
                self.consecutive_failures = 0
            else:
                self.consecutive_failures += 1
                if latest is not None and not latest.healthy:
                    self.last_failure = latest.failure if latest.failure in FAILURE_REASONS else "other"
            if self._healthy is not None and self._healthy != healthy:
                self.state_changes += 1
            if self._healthy != healthy:
                self.state_since = latest.finished_at if latest is not None else time.monotonic()
            self._healthy = healthy

    def host_status(self, name: str, now: float) -> dict[str, Any] | None:
        checker = self.hosts.get(name)
        return None if checker is None else checker.status(now)

    def status(self, now: float) -> dict[str, Any]:
        probe = self.route.probe
        hosts = {name: c.status(now) for name, c in self.hosts.items()}
        up = [name for name, st in hosts.items() if st["healthy"]]
        result = self.result
        body: dict[str, Any] = {
            "route": self.route.name, "healthy": bool(up), "reason": "", "warning": None, "mode": probe.mode,
            "target": ", ".join(st["target"] for st in hosts.values()), "age_s": None, "latency_ms": None,
            "checks": self.rounds, "hosts_up": len(up), "hosts_total": len(hosts),
        }
        for st in hosts.values():
            del st["route"], st["mode"]
        body["hosts"] = hosts
        if all(st["reason"].startswith("starting:") for st in hosts.values()):
            body["reason"] = "starting: no check has finished yet"
            return body
        if result is not None:
            since = self.state_since
            body.update(age_s=round(now - result.finished_at, 3), latency_ms=round(result.latency_s * 1000, 2),
                        since_s=None if since is None else round(now - since, 1))
        if up:
            down = [f"{name}: {st['reason']}" for name, st in hosts.items() if not st["healthy"]]
            body["reason"] = (f"{len(up)} of {len(hosts)} tunnel hosts up ({', '.join(up)}); "
                              + (f"down: {'; '.join(down)}" if down else f"{up[0]}: {hosts[up[0]]['reason']}"))
            warnings = [f"{name}: {st['warning']}" for name, st in hosts.items() if st["warning"]]
            body["warning"] = "; ".join(warnings) or None
        else:
            body["reason"] = "no tunnel host up: " + "; ".join(f"{name}: {st['reason']}" for name, st in hosts.items())
            if self.host_key is not None and (problem := self.host_key.problem()):
                body["reason"] += f"; {problem}"
        return body


# --------------------------------------------------------------------------------------
# Metrics (GET /metrics, Prometheus text format 0.0.4)
# --------------------------------------------------------------------------------------

# HAProxy's own Prometheus exporter, served by the routes file's ``tunnelhub_metrics`` frontend on
# a Unix socket only (no TCP port to collide with a route or be reached from outside).
DEFAULT_HAPROXY_METRICS = "/run/haproxy/tunnelhub-metrics.sock"
HAPROXY_METRICS_REQUEST = "/metrics?scope=frontend&scope=backend"  # no server/global sections
HAPROXY_SCRAPE_TIMEOUT_S = 1.0  # the whole read; past it the HAProxy part is left out (haproxy_up 0)
HAPROXY_SCRAPE_MIN_AGE_S = 1.0  # scrapes within this share one read: N scrapers cost HAProxy one
HAPROXY_SCRAPE_MAX_BYTES = 4 << 20
# The HAProxy figures re-served, per route (its listen section is named after it): name -> type.
# Everything else HAProxy exports (about 60 families per proxy) is dropped to bound the output.
HAPROXY_FAMILIES = {
    "haproxy_frontend_current_sessions": "gauge",
    "haproxy_frontend_limit_sessions": "gauge",
    "haproxy_frontend_sessions_total": "counter",
    "haproxy_backend_current_sessions": "gauge",
    "haproxy_backend_sessions_total": "counter",
    "haproxy_backend_connection_errors_total": "counter",
    "haproxy_backend_current_queue": "gauge",
    "haproxy_backend_connect_time_average_seconds": "gauge",
}
_HAPROXY_SAMPLE_RE = re.compile(r'^(haproxy_[a-z_]+)\{proxy="([^"\\]*)"\} (\S+)$')
_HAPROXY_HELP_RE = re.compile(r"^# HELP (haproxy_[a-z_]+) (.*)$")


@dataclass(frozen=True)
class HaproxySample:
    ok: bool
    duration_s: float
    at: float  # time.monotonic() when the read ended
    values: dict[tuple[str, str], str]  # (family, proxy) -> the value as HAProxy wrote it
    help: dict[str, str]
    error: str | None = None


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class HaproxyMetrics:
    """Reads HAProxy's exporter for ``GET /metrics``, at most once per HAPROXY_SCRAPE_MIN_AGE_S.

    Only a metrics scrape reads it (never a route check, never an LB probe: ``/routes/`` and
    ``/healthz`` do not come here), one read at a time, bounded by HAPROXY_SCRAPE_TIMEOUT_S. A
    scraper that finds a read under way does not wait: it gets the previous read (or "up 0"), so
    however many scrapers ask, at most one HTTP handler thread waits on HAProxy and a wedged
    HAProxy cannot use up the handler slots (HTTP_MAX_CONCURRENT) the LB probes need.
    """

    def __init__(self, path: str | None):
        self.path = path
        self.reads = 0
        self._lock = threading.Lock()
        self._last: HaproxySample | None = None

    def sample(self) -> HaproxySample | None:
        if self.path is None:
            return None
        if not self._lock.acquire(blocking=False):
            last = self._last
            return last or HaproxySample(False, 0.0, time.monotonic(), {}, {}, "the first read is under way")
        try:
            last = self._last
            if last is not None and time.monotonic() - last.at < HAPROXY_SCRAPE_MIN_AGE_S:
                return last
            self._last = self._read()
            return self._last
        finally:
            self._lock.release()

    def _read(self) -> HaproxySample:
        assert self.path is not None
        self.reads += 1
        started = time.monotonic()
        deadline = Deadline(HAPROXY_SCRAPE_TIMEOUT_S)
        connection = _UnixHTTPConnection(self.path, HAPROXY_SCRAPE_TIMEOUT_S)
        try:
            connection.request("GET", HAPROXY_METRICS_REQUEST)
            response = connection.getresponse()
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
            body = bytearray()
            while chunk := response.read(65536):
                body += chunk
                if len(body) > HAPROXY_SCRAPE_MAX_BYTES:
                    raise OSError(f"answer larger than {HAPROXY_SCRAPE_MAX_BYTES} bytes")
                if deadline.left() <= 0:
                    raise TimeoutError("timed out")
        except (OSError, http.client.HTTPException) as exc:
            now = time.monotonic()
            return HaproxySample(False, now - started, now, {}, {},
                                 f"{self.path}: {getattr(exc, 'strerror', None) or exc or type(exc).__name__}")
        finally:
            connection.close()
        values: dict[tuple[str, str], str] = {}
        helps: dict[str, str] = {}
        for line in body.decode("utf-8", "replace").splitlines():
            match = _HAPROXY_SAMPLE_RE.match(line)
            if match and match.group(1) in HAPROXY_FAMILIES:
                values[(match.group(1), match.group(2))] = match.group(3)
                continue
            match = _HAPROXY_HELP_RE.match(line)
            if match and match.group(1) in HAPROXY_FAMILIES:
                helps[match.group(1)] = match.group(2)
        now = time.monotonic()
        return HaproxySample(True, now - started, now, values, helps)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float | None) -> str:
    return "NaN" if value is None else repr(float(value))


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: list[tuple[dict[str, str], str]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _route(name: str) -> dict[str, str]:
    return {"route": name}


def render_metrics(daemon: HealthDaemon, now: float) -> str:
    """The exposition, from the checkers' cached state only: scraping never runs a check."""
    out = _Exposition()
    checkers = dict(daemon.checkers)  # the set a reload may swap while we read
    rows = []
    for name, checker in checkers.items():
        status = checker.status(now)
        result = checker.result
        reason = checker.last_failure
        if not status["healthy"] and result is not None:
            reason = "stale" if status["reason"].startswith("stale:") else (result.failure or "other")
        rows.append((name, checker, status, result, reason))
    out.family("tunnelhub_route_info", "gauge", "The route's kind and probe mode (value always 1)",
               [({"route": n, "kind": c.route.kind, "mode": c.route.probe.mode}, "1") for n, c, *_ in rows])
    out.family("tunnelhub_route_up", "gauge",
               "1 when the route can carry traffic from this proxy (GET /routes/<name> answers 200), else 0",
               [(_route(n), "1" if st["healthy"] else "0") for n, _, st, _, _ in rows])
    out.family("tunnelhub_route_check_latency_seconds", "gauge", "Duration of the route's last finished check",
               [(_route(n), _number(r.latency_s if r else None)) for n, _, _, r, _ in rows])
    out.family("tunnelhub_route_last_check_age_seconds", "gauge", "Seconds since the route's last check finished",
               [(_route(n), _number(now - r.finished_at if r else None)) for n, _, _, r, _ in rows])
    out.family("tunnelhub_route_consecutive_failures", "gauge", "Failed checks in a row (0 after a passed check)",
               [(_route(n), str(c.consecutive_failures)) for n, c, *_ in rows])
    out.family("tunnelhub_route_state_changes_total", "counter",
               "Flips between up and down of the route's check result since its checker started",
               [(_route(n), str(c.state_changes)) for n, c, *_ in rows])
    out.family("tunnelhub_route_checks_total", "counter", "Checks the route's checker ran (one per probe interval)",
               [(_route(n), str(c.rounds)) for n, c, *_ in rows])
    out.family("tunnelhub_route_last_failure_reason", "gauge",
               "1 for the class of the route's current failure when down, else of its latest failed check "
               "(none: no failure since the checker started); 0 for the other classes",
               [({"route": n, "reason": k}, "1" if k == reason else "0")
                for n, _, _, _, reason in rows for k in FAILURE_REASONS])
    hosts = [({"route": n, "host": h}, "1" if hs["healthy"] else "0")
             for n, _, st, _, _ in rows for h, hs in st.get("hosts", {}).items()]
    if hosts:  # routes carried by tunnel hosts (at most 8 per route: spec MAX_TUNNEL_HOSTS)
        out.family("tunnelhub_tunnel_host_up", "gauge", "1 when the tunnel host's last check of the route passed "
                   "and is fresh (HAProxy's agent for that host reads up), else 0", hosts)
    out.family("tunnelhub_config_info", "gauge", "The hub configuration document version loaded (value always 1)",
               [({"config_version": daemon.config.config_version or "none"}, "1")])
    sample = daemon.haproxy.sample()
    if sample is not None:
        out.family("tunnelhub_haproxy_up", "gauge",
                   "1 when HAProxy's exporter answered this scrape's read (its figures follow), else 0",
                   [({}, "1" if sample.ok else "0")])
        out.family("tunnelhub_haproxy_scrape_duration_seconds", "gauge", "Duration of the last read of HAProxy's exporter",
                   [({}, _number(sample.duration_s))])
        if sample.ok:
            for family, kind in HAPROXY_FAMILIES.items():
                values = [(_route(n), sample.values[(family, n)]) for n, *_ in rows if (family, n) in sample.values]
                if values:
                    out.family(family, kind, sample.help.get(family, family), values)
    return out.text()


# --------------------------------------------------------------------------------------
# HAProxy agent (GET /agent/<route>[/<tunnel host>])
# --------------------------------------------------------------------------------------

AGENT_REASON_MAX = 120  # HAProxy keeps a check description of up to 127 bytes (HCHK_DESC_LEN)


def _agent_line(healthy: bool, reason: str) -> str:
    if healthy:
        return "up\n"
    text = "".join(c if " " <= c <= "~" else " " for c in reason)[:AGENT_REASON_MAX]
    return f"down #{text}\n"  # '#' must start a word: "down#x" is one unknown word to HAProxy


def _is_self(sock: socket.socket | None) -> bool:
    """A connection from this machine to one of its own non-loopback addresses (source = the
    destination): the peer path's agent asked by this proxy's own ``peer_<slot>`` entry."""
    if sock is None:
        return False
    try:
        local, peer = sock.getsockname()[0], sock.getpeername()[0]
    except (OSError, IndexError):
        return False
    try:
        address = ipaddress.ip_address(local.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return local == peer and not (mapped or address).is_loopback


def agent_reply(daemon: HealthDaemon, rest: str, now: float, sock: socket.socket | None = None) -> str:
    """The agent line for ``<route>/<tunnel host>`` (that host's cached check, the local servers of
    ``listen <route>`` and ``<route>_peer``) or ``<route>`` (any host up: a peer's backup entry,
    so ``down #self`` when this proxy asks itself: its own peer path only reaches tunnels it already
    has). Never runs a check; an unknown route or host is ``down`` with the reason."""
    route, _, host = rest.partition("/")
    checker = daemon.checkers.get(route)
    if checker is None:
        return _agent_line(False, f"no route {route!r} in the health daemon's config (reload pending?)")
    if not host:
        if _is_self(sock):
            return _agent_line(False, "self: this proxy's own peer path is never a backup of itself")
        status = checker.status(now)
        return _agent_line(status["healthy"], status["reason"])
    if not isinstance(checker, HostsChecker) or host not in checker.hosts:
        return _agent_line(False, f"route {route!r} has no tunnel host {host!r} in the health daemon's config")
    status = checker.hosts[host].status(now)
    return _agent_line(status["healthy"], status["reason"])


# --------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------


class HealthHandler(BaseHTTPRequestHandler):
    server_version = "tunnelhub-health"
    sys_version = ""
    timeout = HTTP_REQUEST_TIMEOUT_S  # bounds a slow or silent client
    server: HealthHTTPServer

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        daemon = self.server.health
        path = self.path.split("?", 1)[0]
        now = time.monotonic()
        if path == "/metrics":
            self._send(200, render_metrics(daemon, now).encode("utf-8"), METRICS_CONTENT_TYPE, send_body)
            return
        if path.startswith("/agent/"):
            self._agent(daemon, path[len("/agent/"):], now)
            return
        if path.startswith("/routes/"):
            checker = daemon.checkers.get(path[len("/routes/"):])
            if checker is None:
                code, body = 404, {"error": f"no route named {path[len('/routes/'):]!r}",
                                   "routes": list(daemon.checkers)}
            else:
                body = checker.status(now)
                code = 200 if body["healthy"] else 503
        elif path == "/":
            body = daemon.summary(now)
            code = 200 if body["healthy"] else 503
        elif path == "/healthz":
            body = daemon.liveness(now)
            code = 200 if body["alive"] else 503
        else:
            code, body = 404, {"error": "unknown path", "paths": ["/", "/healthz", "/metrics", "/routes/<name>",
                                                                 "/agent/<route>", "/agent/<route>/<tunnel host>"]}
        payload = (json.dumps(body, separators=(",", ":")) + "\n").encode("utf-8")
        self._send(code, payload, "application/json", send_body)

    def _agent(self, daemon: HealthDaemon, rest: str, now: float) -> None:
        """HAProxy's agent check (configuration.txt 5.2, "agent-check"): one raw line, no HTTP
        status line or headers (HAProxy parses the first line of the answer as agent words:
        ``up``, or ``down #<description>``), then close."""
        self.close_connection = True
        self.wfile.write(agent_reply(daemon, rest, now, self.connection).encode("ascii"))

    def _send(self, code: int, payload: bytes, content_type: str, send_body: bool) -> None:
        daemon = self.server.health
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.send_header(VERSION_HEADER, daemon.config.config_version or "none")
        self.end_headers()
        if send_body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no per-request noise in journald: the LB probes several times a second


class HealthHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # socketserver's 5 drops SYNs under a burst of probers (1 s retry)

    def __init__(self, address: tuple[str, int], daemon: HealthDaemon):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.health = daemon
        self._slots = threading.BoundedSemaphore(HTTP_MAX_CONCURRENT)
        super().__init__(address, HealthHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # flood: drop, never queue threads
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up mid-answer is not worth a traceback


# --------------------------------------------------------------------------------------
# Daemon
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did, by route name."""

    version: str | None
    kept: tuple[str, ...]
    started: tuple[str, ...]
    stopped: tuple[str, ...]


class HealthDaemon:
    """Checker threads + HTTP server; ``start()`` then ``stop()``, or ``main()``.

    ``reload(config)`` swaps in a new route set while running (see the module docstring);
    ``status_file``, when given, is the reconciler's status JSON, included in ``GET /``.
    """

    def __init__(self, config: Config,
                 check: Callable[[Route, Resolver], CheckResult] = run_check,
                 status_file: str | None = None,
                 host_key_status: str = DEFAULT_HOST_KEY_STATUS,
                 haproxy_metrics: str | None = DEFAULT_HAPROXY_METRICS):
        self.config = config
        self.haproxy = HaproxyMetrics(haproxy_metrics)
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        self._check = check
        self.host_key = HostKeyStatus(host_key_status)
        self.checkers = {route.name: self._new_checker(route) for route in config.routes}
        self.started_at = time.monotonic()
        self.status_file = status_file
        self.reloads = 0
        self.server: HealthHTTPServer | None = None
        self._server_thread: threading.Thread | None = None
        self._started = False
        self._logged: dict[str, tuple[bool, str, str | None]] = {}

    def _new_checker(self, route: Route, previous: Any = None) -> RouteChecker | HostsChecker:
        """A route's checker: a RouteChecker, or a HostsChecker (one RouteChecker per tunnel
        host) for a route with ``hosts``, reusing ``previous``'s unchanged host checkers."""
        if not route.hosts:
            return RouteChecker(route, threading.Event(), self._check, self.host_key)

        def make(host_route: Route, host: str, on_result: Callable[[], None]) -> RouteChecker:
            return RouteChecker(host_route, threading.Event(), self._check, None, host, on_result)

        reuse = previous.hosts if isinstance(previous, HostsChecker) else None
        return HostsChecker(route, reuse, make, self.host_key)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    def start(self) -> None:
        self.server = HealthHTTPServer((self.config.listen_address, self.config.port), self)
        for checker in self.checkers.values():
            checker.start()
        self._started = True
        self._server_thread = threading.Thread(target=self.server.serve_forever,
                                               kwargs={"poll_interval": 0.2},
                                               name="http", daemon=True)
        self._server_thread.start()

    def stop(self, join_timeout_s: float = 5.0) -> None:
        self.stop_event.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        checkers = list(self.checkers.values())
        for checker in checkers:
            checker.retire()
        for checker in checkers:
            if isinstance(checker, HostsChecker) or checker.is_alive():
                checker.join(join_timeout_s)

    # -- live reload ------------------------------------------------------------------------

    def reload(self, config: Config) -> ReloadResult:
        """Apply ``config`` while running: unchanged routes keep their checker (and its last
        result), new or changed routes get a new checker, removed routes' checkers stop.

        The listen address and port are bound once: a change raises ConfigError (restart the
        daemon to move it) and nothing changes.
        """
        if (config.listen_address, config.port) != (self.config.listen_address, self.config.port):
            raise ConfigError([
                f"port: the daemon listens on {self.config.listen_address}:{self.config.port}, the new "
                f"config asks for {config.listen_address}:{config.port}; fix: restart the daemon to move "
                "it (on a proxy the health port is part of the machine: it changes with a new proxy)"])
        old = self.checkers
        new: dict[str, RouteChecker] = {}
        kept: list[str] = []
        started: list[str] = []
        for route in config.routes:
            checker = old.get(route.name)
            if checker is not None and checker.route == route and (checker.is_alive() or not self._started):
                new[route.name] = checker
                kept.append(route.name)
                continue
            checker = self._new_checker(route, checker)
            if self._started:
                checker.start()
            new[route.name] = checker
            started.append(route.name)
        retired = [(name, c) for name, c in old.items() if new.get(name) is not c]
        self.checkers = new  # one reference swap: handlers see the old set or the new one
        self.config = config
        self.reloads += 1
        for name, checker in retired:
            if isinstance(checker, HostsChecker):
                successor = new.get(name)  # its unchanged hosts' checkers live on in the new route
                checker.retire(tuple(successor.hosts.values()) if isinstance(successor, HostsChecker) else ())
            else:
                checker.retire()
        stopped = [name for name in old if name not in new]
        for key in [k for k in self._logged if k.split("/", 1)[0] not in new or k.split("/", 1)[0] in started]:
            del self._logged[key]
        return ReloadResult(version=config.config_version, kept=tuple(kept), started=tuple(started),
                            stopped=tuple(stopped))

    def reconciler_status(self) -> dict[str, Any] | None:
        """The reconciler's status file (small JSON), or why it cannot be read."""
        if self.status_file is None:
            return None
        try:
            with open(self.status_file, "rb") as fh:
                raw = fh.read(STATUS_FILE_MAX_BYTES + 1)
        except FileNotFoundError:
            return {"state": "unknown", "detail": f"no status file {self.status_file} (reconciler not started?)"}
        except OSError as exc:
            return {"state": "unknown", "detail": f"cannot read {self.status_file}: {exc.strerror}"}
        if len(raw) > STATUS_FILE_MAX_BYTES:
            return {"state": "unknown", "detail": f"{self.status_file} is larger than {STATUS_FILE_MAX_BYTES} bytes"}
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return {"state": "unknown", "detail": f"{self.status_file} is not JSON (being rewritten?)"}
        return data if isinstance(data, dict) else {"state": "unknown", "detail": "status is not an object"}

    def summary(self, now: float) -> dict[str, Any]:
        routes = {name: checker.status(now) for name, checker in self.checkers.items()}
        body: dict[str, Any] = {"healthy": all(r["healthy"] for r in routes.values()),
                                "uptime_s": round(now - self.started_at, 1),
                                "config_version": self.config.config_version, "routes": routes,
                                "host_key": self.host_key.record()}
        if self.status_file is not None:
            body["reconciler"] = self.reconciler_status()
        return body

    def liveness(self, now: float) -> dict[str, Any]:
        checkers = {name: {"alive": checker.alive(now),
                           "round_age_s": round(now - checker.heartbeat, 3)}
                    for name, checker in self.checkers.items()}
        return {"alive": all(c["alive"] for c in checkers.values()), "checkers": checkers}

    def log_changes(self, now: float) -> None:
        """Log each route's effective state (what the LB sees) when it changes, and each tunnel
        host's state (what HAProxy's agent for that host reads) when it changes."""
        for name, checker in self.checkers.items():
            status = checker.status(now)
            if status["reason"].startswith("starting:"):
                continue
            if isinstance(checker, HostsChecker):
                up = tuple(h for h, st in status["hosts"].items() if st["healthy"])
                summary = (f"{len(up)} of {status['hosts_total']} tunnel hosts up ({', '.join(up)})" if up
                           else "no tunnel host up")
                self._log_state(name, f"route {name}", (bool(up), summary, None))
                for host, st in status["hosts"].items():
                    if not st["reason"].startswith("starting:"):
                        self._log_state(f"{name}/{host}", f"route {name} tunnel host {host}",
                                        (st["healthy"], _stable_reason(st["reason"]), st["warning"]))
                continue
            self._log_state(name, f"route {name}", (status["healthy"], _stable_reason(status["reason"]),
                                                    status["warning"]))

    def _log_state(self, key: str, what: str, state: tuple[bool, str, str | None]) -> None:
        if self._logged.get(key) == state:
            return
        self._logged[key] = state
        if state[0]:
            LOG.info("%s UP: %s", what, state[1])
        else:
            LOG.warning("%s DOWN: %s", what, state[1])
        if state[2]:
            LOG.warning("%s WARNING: %s", what, state[2])

    def dead_checkers(self) -> list[str]:
        return [name for name, checker in self.checkers.items() if not checker.is_alive()]


def _stable_reason(reason: str) -> str:
    """A reason without the ages a stale result's text carries (so a log line per change only)."""
    if reason.startswith("stale:"):
        reason = reason.split(", last result:", 1)[0]
        reason = re.sub(r"finished [0-9.]+ s ago", "finished too long ago", reason)
    return reason


def reload_from_file(daemon: HealthDaemon, path: str) -> ReloadResult | None:
    """SIGHUP: load ``path`` and reload; a bad file is refused (one log line) and nothing changes."""
    running = daemon.config.config_version or "unversioned"
    try:
        result = daemon.reload(load_config(path))
    except ConfigError as exc:
        LOG.error("tunnelhub-health: reload REFUSED, keeping config %s: %s", running, "; ".join(exc.problems))
        return None
    LOG.info("tunnelhub-health: reloaded config %s -> %s: kept %s; started %s; stopped %s", running,
             result.version or "unversioned", ", ".join(result.kept) or "none",
             ", ".join(result.started) or "none", ", ".join(result.stopped) or "none")
    return result


def _run_once(config: Config) -> int:
    results = {}
    for route in config.routes:
        checks = {h.name: run_check(route.for_host(h)) for h in route.hosts} or {"": run_check(route)}
        entry = {name: {"healthy": result.healthy, "reason": result.reason, "warning": result.warning,
                        "latency_ms": round(result.latency_s * 1000, 2)} for name, result in checks.items()}
        if route.hosts:
            results[route.name] = {"healthy": any(e["healthy"] for e in entry.values()), "hosts": entry}
        else:
            results[route.name] = entry[""]
    print(json.dumps(results, indent=2))
    return 0 if all(r["healthy"] for r in results.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunnelhub_health.py",
                                     description="tunnelhub per-route health endpoint")
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH,
                        help=f"health config JSON (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--host-key-status", default=DEFAULT_HOST_KEY_STATUS,
                        help=f"the host key fetch's progress file (default {DEFAULT_HOST_KEY_STATUS})")
    parser.add_argument("--once", action="store_true",
                        help="check every route once, print JSON, exit 0 if all are healthy else 1")
    parser.add_argument("--status-file", default=None,
                        help="the reconciler's status JSON, shown in GET / (default: none)")
    parser.add_argument("--haproxy-metrics", default=DEFAULT_HAPROXY_METRICS,
                        help="Unix socket of HAProxy's Prometheus exporter, re-served filtered in GET /metrics "
                             f"('none': leave HAProxy out; default {DEFAULT_HAPROXY_METRICS})")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"tunnelhub-health: invalid config {args.config}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    if args.once:
        return _run_once(config)

    daemon = HealthDaemon(config, status_file=args.status_file, host_key_status=args.host_key_status,
                          haproxy_metrics=None if args.haproxy_metrics == "none" else args.haproxy_metrics)
    try:
        daemon.start()
    except OSError as exc:
        print(f"tunnelhub-health: cannot listen on {config.listen_address}:{config.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop_event.set())
    signal.signal(signal.SIGHUP, lambda *_: daemon.reload_requested.set())
    LOG.info("tunnelhub-health listening on %s:%d for %d route(s), config %s: %s", config.listen_address,
             daemon.port, len(config.routes), config.config_version or "unversioned",
             ", ".join(f"{r.name} ({r.probe.mode} {r.target} every {r.probe.interval_s:g} s)"
                       for r in config.routes))
    exit_code = 0
    while not daemon.stop_event.wait(0.2):
        if daemon.reload_requested.is_set():
            daemon.reload_requested.clear()
            reload_from_file(daemon, args.config)
        daemon.log_changes(time.monotonic())
        dead = daemon.dead_checkers()
        if dead:  # let the service manager restart us rather than serve half a daemon
            LOG.error("checker thread(s) died: %s; exiting", ", ".join(dead))
            exit_code = 1
            break
    daemon.stop()
    LOG.info("tunnelhub-health stopped")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
