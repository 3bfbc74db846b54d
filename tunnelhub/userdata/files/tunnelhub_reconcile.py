#!/usr/bin/env python3
"""tunnelhub reconciler: applies the hub configuration document on a running proxy.

    tunnelhub_reconcile.py --config /etc/tunnelhub/reconcile.json            (the service)
    tunnelhub_reconcile.py --config ... --boot      first apply at boot: write the files, no reloads
    tunnelhub_reconcile.py --config ... --once      one fetch and apply (the rollout gate included)
    tunnelhub_reconcile.py --config ... --check FILE   verify a document, print what it would change

The document (docs/live-config.md; rendered by ``tunnelhub.userdata.document``) holds every part
of a proxy's configuration that changes while the hub runs: HAProxy's routes file, the health
daemon's routes, the tunnel user's authorized_keys and its sshd forwarding rules, the route and
key summaries, the peers. Every ``interval_s`` the service fetches it (Azure: the VM's user data
from IMDS; AWS: one conditional GET of the object in the hub's files bucket), verifies it, and
applies what differs from what runs:

1. **Verify** (nothing touched yet): JSON, ``schema`` known, ``hub`` this hub, ``checksum`` the
   SHA-256 of the payload's canonical JSON and ``version`` its first 12 hex digits, every part of
   the payload well-formed (the health routes with the health daemon's own parser, every
   authorized_keys line parsed and opening nothing but 127.0.0.1:<health_port>, the fingerprints
   equal to the key summary, the sshd rules to the tunnel routes and the health port, HAProxy's routes file with ``haproxy -c`` on a candidate copy). A document
   that fails is REFUSED: one log line, the status file says why, the running configuration stays.
2. **Gate** (docs/live-config.md, "Rollout safety"): a document that changes a route which is
   healthy here waits until the canary (the lowest-numbered peer slot whose health endpoint
   answers, below this one) reports the new version applied and that route healthy. New routes,
   removed routes and key changes do not wait; the canary itself never waits.
3. **Apply**, only the parts that differ, each written atomically (temporary file, rename):
   the tunnel user's keys and forwarding rules, ``sshd -t`` (a failure restores the previous
   files and refuses the document), sshd reloaded (sessions keep running); the sessions of keys
   the document revoked closed (see ``close_revoked_sessions``), other sessions untouched;
   HAProxy's routes file and a reload (new workers take the listening sockets over, old workers
   finish their connections); health.json with the new ``config_version`` and a reload (checkers
   of unchanged routes keep their state). Sysctl, users and everything else are not its business.

Options (reconcile.json; written by the bootstrap, every key required unless marked):
  hub, tunnel_user, health_port   what the document must match (a change of any is a new machine)
  slot / slot_file                this proxy's slot (Azure: in the file; AWS: written by the slot wait)
  interval_s, gate_poll_s         fetch interval; how often a waiting document asks the canary
  boot_timeout_s                  how long ``--boot`` keeps trying to fetch
  source                          {"type": "azure-imds", "url": ...} | {"type": "aws-s3", "key": ...,
                                  "imds_url": ..., "endpoint": optional path-style S3 URL} |
                                  {"type": "file", "path": ...}
  files                           where each document part goes (haproxy_routes, health,
                                  authorized_keys, sshd_tunnel_forwarding)
  state_file, status_file         the last applied document; the status the health endpoint shows
  commands                        argv lists: haproxy_check ("{candidate}" is replaced by the
                                  candidate routes file), haproxy_reload, health_reload, sshd_check,
                                  sshd_reload, sessions (``ss`` of established :22 connections),
                                  session_log (sshd's log, for "Accepted publickey" lines)
  session_log_file                optional: read sshd's log from this file instead of session_log

Exit status: the service runs until SIGTERM (0); ``--boot`` and ``--once`` exit 0 when the
document is applied (or already was), 1 when it was refused or failed, ``--once`` 3 when it waits
for the canary; ``--check`` 0 for a valid document, 1 refused; 2 for a bad reconcile.json.

Log lines (stderr, journald) start with ``tunnelhub-reconcile:`` and one of APPLIED, REFUSED,
WAITING, FAILED, CLOSED, DRIFT. Stdlib only (Python 3.11+); shares the AWS request code of
tunnelhub_fetch_host_key.py and the health daemon's config parser (same directory).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import datetime
import fcntl
import gzip
import hashlib
import http.client
import io
import ipaddress
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SCHEMAS = (1,)
VERSION_LENGTH = 12
DOCUMENT_MAX_BYTES = 1024 * 1024
PAYLOAD_KEYS = {"authorized_keys", "haproxy_routes", "health", "health_port", "peers", "port_plan", "routes",
                "sshd_tunnel_forwarding", "tunnel_keys", "tunnel_user"}
FILE_PARTS = ("authorized_keys", "sshd_tunnel_forwarding", "haproxy_routes", "health")
COMMANDS = ("haproxy_check", "haproxy_reload", "health_reload", "sshd_check", "sshd_reload", "sessions",
            "session_log")
COMMAND_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 5.0
PEER_TIMEOUT_S = 1.5
SESSION_CLOSE_WAIT_S = 5.0
AWS_SESSION_TTL_S = 600.0
KEY_TYPES = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|"
                       r"sk-ecdsa-sha2-nistp256@openssh\.com)$")
ACCEPTED_RE = re.compile(r"Accepted publickey for (?P<user>\S+) from (?P<ip>\S+) port (?P<port>\d+) ssh2: "
                         r"(?P<type>\S+) (?P<fp>SHA256:[A-Za-z0-9+/]+)")
PROCESS_TITLE_RE = re.compile(r"^sshd(?:-session)?: (?P<user>[^\s@\[]+)(?:@\S+)?(?: \[(?P<role>\w+)\])?$")
SS_LINE_RE = re.compile(r"(?P<local>\S+):(?P<lport>\d+)\s+(?P<peer>\S+):(?P<pport>\d+)\s+users:\((?P<users>.*)\)")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
STARTED = time.monotonic()


def log(kind: str, message: str) -> None:
    print(f"tunnelhub-reconcile: {kind} {message}" if kind else f"tunnelhub-reconcile: {message}",
          file=sys.stderr, flush=True)


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ConfigError(Exception):
    """reconcile.json is unusable; ``problems`` lists every "field: problem; fix" line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class Refused(Exception):
    """The document does not verify; the message says what and how to fix it."""


class FetchFailed(Exception):
    """The channel did not answer (network, permissions, not there yet): try again later."""


class ApplyFailed(Exception):
    """A reload or a command failed while applying; what was written is rolled back."""


# ---------------------------------------------------------------------------------------------
# Settings (reconcile.json)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    hub: str
    tunnel_user: str
    health_port: int
    slot: int | None
    slot_file: str | None
    interval_s: float
    gate_poll_s: float
    boot_timeout_s: float
    source: dict[str, Any]
    files: dict[str, str]
    state_file: str
    status_file: str
    commands: dict[str, list[str]]
    session_log_file: str | None = None

    @property
    def work_dir(self) -> str:
        return os.path.dirname(self.state_file)


def parse_settings(data: Any) -> Settings:
    problems: list[str] = []

    def bad(field_name: str, got: Any, fix: str) -> None:
        problems.append(f"{field_name}: got {got!r}; fix: {fix}")

    if not isinstance(data, dict):
        raise ConfigError(["(top level): not a JSON object; fix: regenerate reconcile.json with tunnelhub"])
    known = {"hub", "tunnel_user", "health_port", "slot", "slot_file", "interval_s", "gate_poll_s", "boot_timeout_s",
             "source", "files", "state_file", "status_file", "commands", "session_log_file"}
    for key in sorted(set(data) - known):
        bad(key, data[key], f"remove it (allowed: {', '.join(sorted(known))})")
    for key in ("hub", "tunnel_user", "state_file", "status_file"):
        if not isinstance(data.get(key), str) or not data.get(key):
            bad(key, data.get(key), "give a non-empty string")
    port = data.get("health_port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        bad("health_port", port, "give the proxies' health port, 1-65535")
    slot = data.get("slot")
    if slot is not None and (isinstance(slot, bool) or not isinstance(slot, int) or slot < 0):
        bad("slot", slot, "give this proxy's slot (0, 1, ...) or null with slot_file")
    slot_file = data.get("slot_file")
    if slot_file is not None and (not isinstance(slot_file, str) or not slot_file):
        bad("slot_file", slot_file, "give the path of the file holding the slot number, or null")
    for key, low, high in (("interval_s", 0.2, 3600), ("gate_poll_s", 0.1, 600), ("boot_timeout_s", 0, 86400)):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            bad(key, value, f"give a number of seconds from {low:g} to {high:g}")
    source = data.get("source")
    kinds = {"azure-imds": {"url"}, "aws-s3": {"key", "imds_url"}, "file": {"path"}}
    if not isinstance(source, dict) or source.get("type") not in kinds:
        bad("source", source, "give {\"type\": \"azure-imds\" | \"aws-s3\" | \"file\", ...}")
    else:
        for key in sorted(kinds[source["type"]]):
            if not isinstance(source.get(key), str) or not source.get(key):
                bad(f"source.{key}", source.get(key), f"a {source['type']} source needs {key}")
        for key in sorted(set(source) - kinds[source["type"]] - {"type", "endpoint"}):
            bad(f"source.{key}", source[key], "remove it")
    files = data.get("files")
    if not isinstance(files, dict) or set(files) != set(FILE_PARTS) or not all(
            isinstance(v, str) and v.startswith("/") for v in files.values()):
        bad("files", files, f"give an absolute path for each of {', '.join(FILE_PARTS)}")
    commands = data.get("commands")
    if not isinstance(commands, dict) or set(commands) != set(COMMANDS) or not all(
            isinstance(v, list) and v and all(isinstance(w, str) for w in v) for v in commands.values()):
        bad("commands", commands, f"give an argv list for each of {', '.join(COMMANDS)}")
    elif "{candidate}" not in commands["haproxy_check"]:
        bad("commands.haproxy_check", commands["haproxy_check"],
            "include the word {candidate} where the candidate routes file goes")
    log_file = data.get("session_log_file")
    if log_file is not None and (not isinstance(log_file, str) or not log_file.startswith("/")):
        bad("session_log_file", log_file, "give an absolute path, or null to run commands.session_log")
    if problems:
        raise ConfigError(problems)
    return Settings(hub=data["hub"], tunnel_user=data["tunnel_user"], health_port=port, slot=slot,
                    slot_file=slot_file, interval_s=float(data["interval_s"]),
                    gate_poll_s=float(data["gate_poll_s"]), boot_timeout_s=float(data["boot_timeout_s"]),
                    source=dict(source), files=dict(files), state_file=data["state_file"],
                    status_file=data["status_file"], commands={k: list(v) for k, v in commands.items()},
                    session_log_file=log_file)


def load_settings(path: str) -> Settings:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ConfigError([f"(file): cannot read {path}: {exc.strerror}; fix: pass --config"]) from None
    except ValueError as exc:
        raise ConfigError([f"(file): {path} is not JSON ({exc}); fix: regenerate it with tunnelhub"]) from None
    return parse_settings(data)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def http_get(url: str, headers: dict[str, str], timeout_s: float = HTTP_TIMEOUT_S
             ) -> tuple[int, dict[str, str], bytes]:
    """GET without proxies; (status, headers, body) for any HTTP answer, FetchFailed otherwise."""
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with _DIRECT.open(request, timeout=timeout_s) as response:
            return response.status, dict(response.headers.items()), response.read(DOCUMENT_MAX_BYTES * 2 + 1)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()) if exc.headers else {}, exc.read(2000)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # HTTPException: not HTTP at all
        raise FetchFailed(f"GET {url.split('?')[0]} failed: {getattr(exc, 'reason', exc)}") from None


class AzureImdsSource:
    """The VM's user data from Azure IMDS (base64 text; the document, maybe gzip-compressed)."""

    def __init__(self, settings: Settings):
        self.url = settings.source["url"]
        self.label = "Azure IMDS user data"

    def fetch(self) -> bytes:
        status, _, body = http_get(self.url, {"Metadata": "true"})
        if status != 200:
            raise FetchFailed(f"IMDS answered HTTP {status}: {body[:200].decode('utf-8', 'replace')}")
        text = body.strip()
        if not text:
            raise FetchFailed("the VM has no user data (the hub stack sets it to the hub configuration document)")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return text  # not base64: verification reports what it is


class FileSource:
    """A local file (operators and tests: --check, or a hand-fed document)."""

    def __init__(self, settings: Settings):
        self.path = settings.source["path"]
        self.label = f"file {self.path}"

    def fetch(self) -> bytes:
        try:
            with open(self.path, "rb") as fh:
                return fh.read(DOCUMENT_MAX_BYTES * 2 + 1)
        except OSError as exc:
            raise FetchFailed(f"cannot read {self.path}: {exc.strerror}") from None


class AwsS3Source:
    """The document object in the hub's files bucket, read with the instance profile (SigV4,
    the code of tunnelhub_fetch_host_key.py); conditional on the last ETag, so an unchanged
    document costs one request answered 304."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.key = settings.source["key"]
        self.imds = settings.source["imds_url"].rstrip("/")
        self.endpoint = settings.source.get("endpoint")
        self.label = f"s3 object {self.key}"
        self.etag: str | None = None
        self.body: bytes | None = None
        self._session: dict[str, str] | None = None
        self._session_at = 0.0

    def _aws_session(self) -> dict[str, str]:
        from tunnelhub_fetch_host_key import Retry, aws_session
        if self._session is None or time.monotonic() - self._session_at > AWS_SESSION_TTL_S:
            try:
                self._session = aws_session(self.imds)
            except (Retry, ValueError, KeyError) as exc:
                raise FetchFailed(f"instance credentials: {exc}") from None
            self._session_at = time.monotonic()
        return self._session

    def fetch(self) -> bytes:
        from tunnelhub_fetch_files import bucket_name, object_url
        from tunnelhub_fetch_host_key import sigv4_headers
        session = self._aws_session()
        bucket = bucket_name(self.settings.hub, session["account"], session["region"])
        url = object_url(bucket, self.key, session["region"], self.endpoint)
        headers = {"x-amz-content-sha256": hashlib.sha256(b"").hexdigest()}
        if self.etag is not None and self.body is not None:
            headers["If-None-Match"] = self.etag
        signed = sigv4_headers(method="GET", url=url, region=session["region"], service="s3", body=b"",
                               headers=headers, access_key=session["access_key"],
                               secret_key=session["secret_key"], session_token=session["token"] or None,
                               now=datetime.datetime.now(datetime.UTC))
        status, answer, body = http_get(url, signed)
        if status == 304 and self.body is not None:
            return self.body
        if status in (400, 401, 403):
            self._session = None  # expired credentials: ask IMDS again next time
        if status != 200:
            raise FetchFailed(f"s3://{bucket}/{self.key} answered HTTP {status}: "
                              f"{' '.join(body[:300].decode('utf-8', 'replace').split())}")
        self.etag = {k.lower(): v for k, v in answer.items()}.get("etag")
        self.body = body
        return body


def make_source(settings: Settings):
    return {"azure-imds": AzureImdsSource, "aws-s3": AwsS3Source, "file": FileSource}[settings.source["type"]](settings)


# ---------------------------------------------------------------------------------------------
# The document: decode and verify
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    version: str
    checksum: str
    payload: dict[str, Any]
    raw_sha256: str

    @property
    def fingerprints(self) -> list[str]:
        return [k["fingerprint"] for k in self.payload["tunnel_keys"]]

    @property
    def routes(self) -> dict[str, dict]:
        """Route summaries by name, in the spec's order."""
        return {r["name"]: r for r in self.payload["routes"]}

    def file_contents(self) -> dict[str, str]:
        """What each document-managed file must hold."""
        health = dict(self.payload["health"], config_version=self.version)
        return {"authorized_keys": self.payload["authorized_keys"],
                "sshd_tunnel_forwarding": self.payload["sshd_tunnel_forwarding"],
                "haproxy_routes": self.payload["haproxy_routes"],
                "health": json.dumps(health, indent=2, sort_keys=True) + "\n"}


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode(raw: bytes) -> Any:
    """The document's JSON from the channel's bytes (gzip-compressed or not)."""
    if len(raw) > DOCUMENT_MAX_BYTES:
        raise Refused(f"the document is {len(raw)} bytes, over the {DOCUMENT_MAX_BYTES}-byte bound")
    if raw[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as fh:
                raw = fh.read(DOCUMENT_MAX_BYTES + 1)
        except (OSError, EOFError) as exc:
            raise Refused(f"the document is gzip data that does not decompress ({exc}): truncated?") from None
        if len(raw) > DOCUMENT_MAX_BYTES:
            raise Refused(f"the document decompresses to over {DOCUMENT_MAX_BYTES} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise Refused("the document is not UTF-8 text") from None
    except ValueError as exc:
        raise Refused(f"the document is not valid JSON ({exc}): truncated or corrupted?") from None


def verify(raw: bytes, settings: Settings) -> Document:
    """The document in ``raw``, verified (every check but the ones that run a command)."""
    data = decode(raw)
    if not isinstance(data, dict):
        raise Refused("the document is not a JSON object")
    for key in ("schema", "hub", "version", "checksum", "payload"):
        if key not in data:
            raise Refused(f"the document has no {key!r} field")
    if data["schema"] not in SCHEMAS:
        raise Refused(f"schema {data['schema']!r} is not one this reconciler knows ({', '.join(map(str, SCHEMAS))}): "
                      "a newer tunnelhub rendered it; replace the proxies to upgrade them")
    if data["hub"] != settings.hub:
        raise Refused(f"the document is for hub {data['hub']!r}, this proxy belongs to {settings.hub!r}")
    payload = data["payload"]
    if not isinstance(payload, dict):
        raise Refused("payload is not an object")
    digest = hashlib.sha256(canonical(payload)).hexdigest()
    if data["checksum"] != f"sha256:{digest}":
        raise Refused(f"checksum mismatch: the document says {str(data['checksum'])[:80]!r}, its payload hashes to "
                      f"sha256:{digest}: corrupted in transit or edited by hand")
    if data["version"] != digest[:VERSION_LENGTH]:
        raise Refused(f"version {str(data['version'])[:40]!r} is not the payload's ({digest[:VERSION_LENGTH]})")
    check_payload(payload, settings)
    return Document(version=data["version"], checksum=data["checksum"], payload=payload,
                    raw_sha256=hashlib.sha256(raw).hexdigest())


def check_payload(payload: dict[str, Any], settings: Settings) -> None:
    missing = sorted(PAYLOAD_KEYS - set(payload))
    extra = sorted(set(payload) - PAYLOAD_KEYS)
    if missing or extra:
        raise Refused(f"payload fields: missing {missing or 'none'}, unknown {extra or 'none'}")
    if payload["tunnel_user"] != settings.tunnel_user:
        raise Refused(f"tunnel user {payload['tunnel_user']!r} is not this proxy's ({settings.tunnel_user!r}): "
                      "a new tunnel user is a machine change (new proxies)")
    if payload["health_port"] != settings.health_port:
        raise Refused(f"health port {payload['health_port']!r} is not this proxy's ({settings.health_port}): "
                      "a new health port is a machine change (new proxies)")
    for key in ("haproxy_routes", "authorized_keys", "sshd_tunnel_forwarding"):
        if not isinstance(payload[key], str) or "\x00" in payload[key]:
            raise Refused(f"payload.{key} is not text")
    listed = payload["routes"]
    if not isinstance(listed, list) or not listed or not all(
            isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("port"), int)
            and v.get("kind") in ("tunnel", "forward") for v in listed):
        raise Refused("payload.routes is not a non-empty list of route summaries")
    routes = {r["name"]: r for r in listed}
    if len(routes) != len(listed):
        raise Refused("payload.routes names a route twice")
    try:
        import tunnelhub_health
    except ImportError:
        raise Refused("cannot check the health routes: tunnelhub_health.py is not beside the reconciler") from None
    try:
        health = tunnelhub_health.parse_config(payload["health"])
    except tunnelhub_health.ConfigError as exc:
        raise Refused("payload.health: " + "; ".join(exc.problems)) from None
    if health.port != settings.health_port:
        raise Refused(f"payload.health.port {health.port} is not the health port {settings.health_port}")
    if [r.name for r in health.routes] != list(routes):
        raise Refused(f"the health routes {[r.name for r in health.routes]} are not the routes {list(routes)}")
    check_tunnel_keys(payload, settings.health_port)
    check_forwarding(payload["sshd_tunnel_forwarding"], routes, settings.health_port)
    check_peers(payload["peers"])
    if not isinstance(payload["port_plan"], list):
        raise Refused("payload.port_plan is not a list")
    check_health_hosts(health, payload["port_plan"])


def check_health_hosts(health: Any, plan: list[Any]) -> None:
    """A tunnel route's checks are its tunnel hosts' ports in the port plan, no more, no less (the
    servers of HAProxy's ``listen <route>`` are; a host whose port the daemon does not check would
    never get an agent ``up``). Routes without ``hosts`` (a document before tunnel hosts) pass."""
    for route in health.routes:
        if not route.hosts:
            continue
        rows = sorted((r.get("tunnel_host"), r.get("tunnel_port")) for r in plan
                      if isinstance(r, dict) and r.get("route") == route.name and r.get("tunnel_host") is not None)
        checked = sorted((h.name, h.port) for h in route.hosts)
        if rows != checked:
            raise Refused(f"payload.health: route {route.name} checks the tunnel hosts {checked}, the port plan "
                          f"gives {rows}")


def fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def parse_key_line(line: str) -> tuple[str, str, bytes]:
    """(options, key type, key blob) of one authorized_keys line; Refused when malformed."""
    tokens = line.split()
    for i in range(len(tokens) - 1):
        if KEY_TYPES.match(tokens[i]):
            try:
                blob = base64.b64decode(tokens[i + 1], validate=True)
            except (binascii.Error, ValueError):
                continue
            if len(blob) < 4 or blob[4:4 + struct.unpack(">I", blob[:4])[0]] != tokens[i].encode():
                raise Refused(f"authorized_keys: the {tokens[i]} key's data is not a {tokens[i]} key")
            if i > 1:
                raise Refused("authorized_keys: options must be one word before the key type")
            return (tokens[0] if i == 1 else ""), tokens[i], blob
    raise Refused(f"authorized_keys: no key in line {line[:60]!r}...")


def check_tunnel_keys(payload: dict[str, Any], health_port: int) -> None:
    keys = payload["tunnel_keys"]
    if not isinstance(keys, list) or not all(isinstance(k, dict) and isinstance(k.get("fingerprint"), str)
                                             for k in keys):
        raise Refused("payload.tunnel_keys is not a list of {fingerprint, type}")
    found = []
    for line in payload["authorized_keys"].splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        options, _, blob = parse_key_line(line)
        if not options.startswith("restrict,") or 'command="/usr/sbin/nologin"' not in options:
            raise Refused("authorized_keys: every tunnel key must start with restrict and force /usr/sbin/nologin")
        opens = re.findall(r'permitopen="([^"]*)"', options)
        if opens not in ([], [f"127.0.0.1:{health_port}"]):
            raise Refused(f"authorized_keys: a tunnel key may open only 127.0.0.1:{health_port} (the health "
                          f"endpoint), not {opens}")
        found.append(fingerprint(blob))
    listed = [k["fingerprint"] for k in keys]
    if found != listed:
        raise Refused(f"authorized_keys holds keys {found}, the key summary lists {listed}")


def tunnel_listen_ports(routes: dict[str, dict]) -> list[int]:
    """Every tunnel host's loopback port of every tunnel route (``tunnel_hosts`` of the route
    summaries), host by host in the order the hosts are listed: what sshd's ``PermitListen``
    must name. A summary without ``tunnel_hosts`` (one host) holds its ``tunnel_port``."""
    by_host: dict[str, list[int]] = {}
    for name, r in routes.items():
        if r["kind"] != "tunnel":
            continue
        hosts = r.get("tunnel_hosts")
        if hosts is None:
            hosts = [{"host": "", "tunnel_port": r.get("tunnel_port")}]
        if not isinstance(hosts, list) or not hosts or not all(
                isinstance(h, dict) and isinstance(h.get("host"), str) and isinstance(h.get("tunnel_port"), int)
                and not isinstance(h.get("tunnel_port"), bool) for h in hosts):
            raise Refused(f"payload.routes: route {name!r} has no valid tunnel_hosts [{{host, tunnel_port}}]")
        for h in hosts:
            by_host.setdefault(h["host"], []).append(h["tunnel_port"])
    return [port for ports in by_host.values() for port in ports]


def check_forwarding(text: str, routes: dict[str, dict], health_port: int) -> None:
    """-R to the tunnel hosts' ports of the tunnel routes only; -L (with tunnel routes) to this
    proxy's health endpoint on 127.0.0.1 only, which the tunnel hosts' status command reads
    through the tunnel."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    ports = tunnel_listen_ports(routes)
    want_listen = " ".join(f"localhost:{p}" for p in ports) if ports else "none"
    want = [f"AllowTcpForwarding {'yes' if ports else 'no'}", f"PermitListen {want_listen}",
            f"PermitOpen {f'127.0.0.1:{health_port}' if ports else 'none'}"]
    if lines != want:
        raise Refused(f"sshd_tunnel_forwarding is {lines}, the tunnel routes need {want}")


def check_peers(peers: Any) -> None:
    if not isinstance(peers, list) or not peers:
        raise Refused("payload.peers is not a non-empty list")
    slots = []
    for peer in peers:
        if not isinstance(peer, dict) or isinstance(peer.get("slot"), bool) or not isinstance(peer.get("slot"), int):
            raise Refused(f"payload.peers: {peer!r} is not {{slot, address}}")
        try:
            ipaddress.ip_address(peer.get("address"))
        except ValueError:
            raise Refused(f"payload.peers: {peer.get('address')!r} is not an IP address") from None
        slots.append(peer["slot"])
    if sorted(slots) != list(range(len(slots))):
        raise Refused(f"payload.peers: slots {slots} are not 0 to {len(slots) - 1}")


# ---------------------------------------------------------------------------------------------
# Files and commands
# ---------------------------------------------------------------------------------------------


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError):
        return None


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    """Write ``text`` beside ``path`` and rename it over: readers see the old or the new file."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def run(argv: list[str], what: str) -> tuple[bool, str]:
    """Run a command (bounded); (ok, its last output lines as one line, for the log)."""
    ok, output = capture(argv, what)
    return ok, output if not ok else " | ".join(output.strip().splitlines()[-8:])


def capture(argv: list[str], what: str) -> tuple[bool, str]:
    """Run a command (bounded); (ok, its whole output), or (False, why) when it failed."""
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{what} ({' '.join(argv)}) failed: {exc}"
    if done.returncode != 0:
        tail = " | ".join(done.stdout.strip().splitlines()[-8:])
        return False, f"{what} ({' '.join(argv)}) exited {done.returncode}: {tail}"
    return True, done.stdout


# ---------------------------------------------------------------------------------------------
# Sessions of revoked keys
# ---------------------------------------------------------------------------------------------


@dataclass
class Session:
    peer: str
    port: int
    pids: list[int]
    user: str | None = None
    fingerprint: str | None = None


def _plain_ip(text: str) -> str:
    text = text.strip("[]")
    if text.startswith("::ffff:") and "." in text:
        text = text[len("::ffff:"):]
    return text


def parse_ss(output: str) -> list[Session]:
    """Established connections from ``ss -Htnp``: peer address, port and the processes holding them."""
    sessions = []
    for line in output.splitlines():
        match = SS_LINE_RE.search(line)
        if match:
            pids = sorted({int(p) for p in re.findall(r"pid=(\d+)", match["users"])})
            sessions.append(Session(_plain_ip(match["peer"]), int(match["pport"]), pids))
    return sessions


def parse_accepted(log_text: str) -> dict[tuple[str, int], tuple[str, str]]:
    """(peer address, port) -> (user, key fingerprint) from sshd's "Accepted publickey" lines."""
    found: dict[tuple[str, int], tuple[str, str]] = {}
    for match in ACCEPTED_RE.finditer(log_text):
        found[(_plain_ip(match["ip"]), int(match["port"]))] = (match["user"], match["fp"])
    return found


def process_user(pid: int) -> str | None:
    """The user an sshd session process serves, from its title ("sshd: tunnel [priv]")."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            title = fh.read().split(b"\x00", 1)[0].decode("utf-8", "replace").strip()
    except OSError:
        return None
    match = PROCESS_TITLE_RE.match(title)
    if match is None or match["user"] in ("unknown",) or match["role"] in ("net", "preauth", "listener"):
        return None
    return match["user"]


def session_log(settings: Settings) -> str:
    if settings.session_log_file:
        return read_text(settings.session_log_file) or ""
    try:
        done = subprocess.run(settings.commands["session_log"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log("FAILED", f"reading sshd's log ({' '.join(settings.commands['session_log'])}): {exc}")
        return ""
    return done.stdout.decode("utf-8", "replace")


def close_revoked_sessions(settings: Settings, revoked: set[str], allowed: set[str]) -> list[Session]:
    """End the tunnel user's sessions whose key the document revoked; leave every other session.

    Which key a session used comes from sshd's own "Accepted publickey for <user> from <ip> port
    <port> ssh2: <type> SHA256:<fp>" line, matched to the established :22 connection with that
    peer (``ss -Htnp``); the user also from the session processes' titles. A tunnel-user session
    whose login line is missing (a vacuumed journal) cannot be cleared, so it is closed too (it
    reconnects within seconds if its key is still authorized): fail closed. SIGTERM to every
    process holding the connection, SIGKILL if it is still there after 5 s.
    """
    ok, output = capture(settings.commands["sessions"], "listing the SSH sessions")
    if not ok:
        log("FAILED", output)
        return []
    logins = parse_accepted(session_log(settings))
    closing = []
    for session in parse_ss(output):
        user, fp = logins.get((session.peer, session.port), (None, None))
        titled = {process_user(pid) for pid in session.pids} - {None}
        session.user = user or (titled.pop() if len(titled) == 1 else None)
        session.fingerprint = fp
        if session.user != settings.tunnel_user or not session.pids:
            continue
        if fp is not None and fp in allowed and fp not in revoked:
            continue
        closing.append(session)
    for session in closing:
        why = (f"key {session.fingerprint} was revoked" if session.fingerprint
               else "its key is unknown (no login line) and a key was revoked")
        for pid in session.pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        log("CLOSED", f"session of {session.user} from {session.peer}:{session.port} (pids "
            f"{', '.join(map(str, session.pids))}): {why}")
    deadline = time.monotonic() + SESSION_CLOSE_WAIT_S
    while closing and time.monotonic() < deadline:
        alive = [pid for s in closing for pid in s.pids if os.path.exists(f"/proc/{pid}")]
        if not alive:
            break
        time.sleep(0.1)
    else:
        for session in closing:
            for pid in session.pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
    return closing


# ---------------------------------------------------------------------------------------------
# The reconciler
# ---------------------------------------------------------------------------------------------


@dataclass
class Status:
    state: str = "starting"
    detail: str = ""
    applied: dict[str, Any] | None = None
    pending: dict[str, Any] | None = None
    refused: dict[str, Any] | None = None
    last_fetch: dict[str, Any] | None = None
    slot: int | None = None


@dataclass
class Reconciler:
    settings: Settings
    source: Any = None
    applied: Document | None = None
    pending: Document | None = None
    status: Status = field(default_factory=Status)
    _refused_raw: str | None = None
    _waiting_logged: tuple[str, str] | None = None
    _failed_logged: str | None = None

    def __post_init__(self) -> None:
        if self.source is None:
            self.source = make_source(self.settings)
        self.applied = self._load_applied()
        if self.applied is not None:
            self.status.applied = {"version": self.applied.version, "at": None}

    # -- state ------------------------------------------------------------------------------

    def _load_applied(self) -> Document | None:
        text = read_text(self.settings.state_file)
        if text is None:
            return None
        try:
            return verify(text.encode("utf-8"), self.settings)
        except Refused as exc:
            log("", f"ignoring the saved state {self.settings.state_file}: {exc}")
            return None

    def slot(self) -> int | None:
        if self.settings.slot is not None:
            return self.settings.slot
        text = read_text(self.settings.slot_file) if self.settings.slot_file else None
        return int(text.strip()) if text and text.strip().isdigit() else None

    def write_status(self) -> None:
        self.status.slot = self.slot()
        body = {"state": self.status.state, "detail": self.status.detail, "slot": self.status.slot,
                "applied": self.status.applied, "pending": self.status.pending, "refused": self.status.refused,
                "last_fetch": self.status.last_fetch, "source": self.source.label, "updated_at": utc_now()}
        try:
            write_atomic(self.settings.status_file, json.dumps(body, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            log("FAILED", f"writing the status file {self.settings.status_file}: {exc.strerror}")

    # -- one fetch --------------------------------------------------------------------------

    def fetch(self, *, content_checks: bool = True) -> Document | None:
        """Fetch and verify; the new document (or None: unchanged, refused, or not fetched)."""
        try:
            raw = self.source.fetch()
        except FetchFailed as exc:
            self.status.last_fetch = {"at": utc_now(), "ok": False, "error": str(exc)}
            return None
        self.status.last_fetch = {"at": utc_now(), "ok": True, "error": None}
        raw_sha = hashlib.sha256(raw).hexdigest()
        if self.applied is not None and raw_sha == self.applied.raw_sha256:
            if self.status.state == "refused":  # the channel is back to what runs: the refusal is over
                self.status.state, self.status.detail = "applied", ""
            self._refused_raw = None
            self.pending = None
            self.status.pending = None
            return None
        if self.pending is not None and raw_sha == self.pending.raw_sha256:
            return self.pending
        if raw_sha == self._refused_raw:
            return None
        try:
            document = verify(raw, self.settings)
            if self.applied is not None and document.version == self.applied.version:
                self.applied = document  # same content, new bytes (whitespace): nothing to do
                return None
            if content_checks:
                self.check_haproxy(document)
        except Refused as exc:
            self.refuse(raw, raw_sha, str(exc))
            return None
        return document

    def refuse(self, raw: bytes, raw_sha: str, reason: str) -> None:
        version = "?"
        with contextlib.suppress(Refused, AttributeError):
            version = str(decode(raw).get("version", "?"))[:40]
        self.record_refusal(version, raw_sha, reason)

    def record_refusal(self, version: str, raw_sha: str, reason: str) -> None:
        """One REFUSED line per document; the status says why; the running config stays."""
        self._refused_raw = raw_sha
        running = self.applied.version if self.applied else "none"
        log("REFUSED", f"document version={version} sha256={raw_sha[:12]} from {self.source.label}: {reason}; "
            f"keeping config {running}")
        self.status.refused = {"version": version, "sha256": raw_sha[:12], "reason": reason, "at": utc_now()}
        self.status.state, self.status.detail = "refused", reason
        if self.pending is not None:
            self.pending = None  # the channel now holds the refused one
            self.status.pending = None

    def check_haproxy(self, document: Document) -> None:
        candidate_dir = os.path.join(self.settings.work_dir, "candidate")
        candidate = os.path.join(candidate_dir, os.path.basename(self.settings.files["haproxy_routes"]))
        write_atomic(candidate, document.payload["haproxy_routes"])
        argv = [candidate if w == "{candidate}" else w for w in self.settings.commands["haproxy_check"]]
        ok, output = run(argv, "haproxy -c")
        if not ok:
            raise Refused(f"HAProxy rejects the routes: {output}")

    # -- gate -------------------------------------------------------------------------------

    def gate(self, document: Document) -> str | None:
        """Why ``document`` must wait (None: apply now). See the module docstring, step 2."""
        if self.applied is None:
            return None
        old = self.applied.routes
        changed = [name for name, summary in document.routes.items() if name in old and old[name] != summary]
        if not changed:
            return None
        slot = self.slot()
        if slot is None:
            return None
        local = peer_summary("127.0.0.1", self.settings.health_port) or {}
        healthy = [name for name in changed if local.get("routes", {}).get(name, {}).get("healthy")]
        if not healthy:
            return None
        silent = []
        for peer in sorted(document.payload["peers"], key=lambda p: p["slot"]):
            if peer["slot"] >= slot:
                if silent:  # no lower slot answers: this proxy is the canary (said once per document)
                    key = (document.version, "canary")
                    if self._waiting_logged != key:
                        log("", f"config {document.version}: no lower slot's health endpoint answers "
                            f"({', '.join(silent)}): slot {slot} applies it as the canary")
                        self._waiting_logged = key
                return None
            answer = peer_summary(peer["address"], document.payload["health_port"])
            if answer is None:
                silent.append(f"slot {peer['slot']} at {peer['address']}")
                continue
            where = f"canary slot {peer['slot']} ({peer['address']})"
            if answer.get("config_version") != document.version:
                return (f"route(s) {', '.join(healthy)} change and are healthy here: waiting for {where} to apply "
                        f"{document.version} (it runs {answer.get('config_version')})")
            sick = [n for n in healthy if not answer.get("routes", {}).get(n, {}).get("healthy")]
            if sick:
                return f"waiting for route(s) {', '.join(sick)} to be healthy on {where}, which runs {document.version}"
            return None
        return None

    # -- apply ------------------------------------------------------------------------------

    def apply(self, document: Document, *, live: bool = True) -> list[str]:
        """Write what differs and reload what needs it (``live``: services run). Returns the parts
        changed; raises Refused (sshd -t) or ApplyFailed (a reload), with the files rolled back."""
        files = self.settings.files
        wanted = document.file_contents()
        current = {part: read_text(files[part]) for part in FILE_PARTS}
        changed = [part for part in FILE_PARTS if current[part] != wanted[part]]
        old_fps = set(self.applied.fingerprints) if self.applied else set(keys_in(current["authorized_keys"] or ""))
        written: list[str] = []

        def rollback() -> None:
            for part in reversed(written):
                if current[part] is None:
                    with contextlib.suppress(OSError):
                        os.unlink(files[part])
                else:
                    write_atomic(files[part], current[part])

        try:
            for part in ("authorized_keys", "sshd_tunnel_forwarding"):
                if part in changed:
                    write_atomic(files[part], wanted[part])
                    written.append(part)
            if live and "sshd_tunnel_forwarding" in changed:
                ok, output = run(self.settings.commands["sshd_check"], "sshd -t")
                if not ok:
                    raise Refused(f"sshd rejects the tunnel user's forwarding rules: {output}")
                ok, output = run(self.settings.commands["sshd_reload"], "reloading sshd")
                if not ok:
                    log("FAILED", f"{output} (the new rules apply when sshd starts again)")
            if "haproxy_routes" in changed:
                write_atomic(files["haproxy_routes"], wanted["haproxy_routes"])
                written.append("haproxy_routes")
                if live:
                    ok, output = run(self.settings.commands["haproxy_reload"], "reloading HAProxy")
                    if not ok:
                        raise ApplyFailed(output)
        except (Refused, ApplyFailed):
            rollback()
            raise
        revoked = old_fps - set(document.fingerprints)
        if live and revoked:
            close_revoked_sessions(self.settings, revoked, set(document.fingerprints))
        if "health" in changed:
            write_atomic(files["health"], wanted["health"])
            if live:
                ok, output = run(self.settings.commands["health_reload"], "reloading the health endpoint")
                if not ok:
                    log("FAILED", f"{output} (it loads the new routes when it starts again)")
        write_atomic(self.settings.state_file, json.dumps(
            {"schema": SCHEMAS[-1], "hub": self.settings.hub, "version": document.version,
             "checksum": document.checksum, "payload": document.payload}, indent=2, sort_keys=True) + "\n", 0o600)
        previous = self.applied
        self.applied = document
        self.pending = None
        self.status.pending = None
        self.status.applied = {"version": document.version, "at": utc_now()}
        self.status.state, self.status.detail = "applied", ""
        self.status.refused = None
        self._waiting_logged = None
        log("APPLIED", f"config {previous.version if previous else 'none'} -> {document.version}: "
            f"{describe(previous, document) or 'no route or key change'}; rewrote "
            f"{', '.join(changed) or 'nothing'}{'' if live else ' (boot: no reloads)'}")
        return changed

    def repair_drift(self) -> None:
        """The applied document is the truth: a document-managed file changed by hand is rewritten
        (and its service reloaded)."""
        if self.applied is None:
            return
        wanted = self.applied.file_contents()
        drifted = [p for p in FILE_PARTS if read_text(self.settings.files[p]) != wanted[p]]
        if not drifted:
            return
        log("DRIFT", f"{', '.join(self.settings.files[p] for p in drifted)} differ from config "
            f"{self.applied.version}: rewriting")
        reloads = {"sshd_tunnel_forwarding": "sshd_reload", "haproxy_routes": "haproxy_reload",
                   "health": "health_reload"}
        for part in drifted:
            write_atomic(self.settings.files[part], wanted[part])
        for part in drifted:
            if part in reloads:
                ok, output = run(self.settings.commands[reloads[part]], f"reloading after {part}")
                if not ok:
                    log("FAILED", f"repairing drift: {output}")

    # -- the cycle --------------------------------------------------------------------------

    def poll(self) -> None:
        document = self.fetch()
        if document is not None and document is not self.pending:
            self.pending = document
            self.status.pending = {"version": document.version, "since": utc_now(), "reason": None}
            self._failed_logged = None
        elif document is None and self.pending is None:
            self.repair_drift()

    def step(self) -> None:
        """Apply the pending document if the gate lets it through."""
        document = self.pending
        if document is None:
            if self.status.state not in ("refused",):
                self.status.state = "applied" if self.applied else "starting"
            return
        reason = self.gate(document)
        if reason is not None:
            self.status.state, self.status.detail = "waiting", reason
            self.status.pending = {"version": document.version, "since": (self.status.pending or {}).get("since"),
                                   "reason": reason}
            key = (document.version, reason.split(":")[0])
            if self._waiting_logged != key:
                log("WAITING", f"config {document.version}: {reason}")
                self._waiting_logged = key
            return
        try:
            self.apply(document)
        except Refused as exc:
            self.record_refusal(document.version, document.raw_sha256, str(exc))
        except ApplyFailed as exc:
            self.status.state, self.status.detail = "failed", str(exc)
            if self._failed_logged != document.version:
                log("FAILED", f"applying config {document.version}: {exc}; files rolled back, retrying")
                self._failed_logged = document.version

    def run_forever(self, stop: list[bool]) -> None:
        next_fetch = 0.0
        while not stop[0]:
            now = time.monotonic()
            if now >= next_fetch:
                with self.lock():
                    self.poll()
                next_fetch = now + self.settings.interval_s
            with self.lock():
                self.step()
            self.write_status()
            wait = self.settings.gate_poll_s if self.pending is not None else next_fetch - time.monotonic()
            end = time.monotonic() + max(0.05, min(wait, next_fetch - time.monotonic()))
            while not stop[0] and time.monotonic() < end:
                time.sleep(min(0.1, max(0.0, end - time.monotonic())))

    @contextlib.contextmanager
    def lock(self):
        os.makedirs(self.settings.work_dir, mode=0o755, exist_ok=True)
        with open(os.path.join(self.settings.work_dir, "reconcile.lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield


def keys_in(authorized_keys: str) -> list[str]:
    found = []
    for line in authorized_keys.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            with contextlib.suppress(Refused):
                found.append(fingerprint(parse_key_line(line)[2]))
    return found


def describe(old: Document | None, new: Document) -> str:
    """Routes added/removed/changed, keys added/removed (a log line and ``--check``)."""
    if old is None:
        return f"routes {', '.join(new.routes)}; {len(new.fingerprints)} tunnel key(s)"
    parts = []
    added = [r for r in new.routes if r not in old.routes]
    removed = [r for r in old.routes if r not in new.routes]
    changed = [r for r in new.routes if r in old.routes and old.routes[r] != new.routes[r]]
    for what, names in (("route added", added), ("route removed", removed), ("route changed", changed)):
        if names:
            parts.append(f"{what}: {', '.join(names)}")
    for what, fps in (("key added", [f for f in new.fingerprints if f not in old.fingerprints]),
                      ("key removed", [f for f in old.fingerprints if f not in new.fingerprints])):
        if fps:
            parts.append(f"{what}: {', '.join(fps)}")
    if old.payload["peers"] != new.payload["peers"]:
        parts.append(f"peers: {len(old.payload['peers'])} -> {len(new.payload['peers'])} slot(s)")
    return "; ".join(parts)


def peer_summary(address: str, port: int) -> dict[str, Any] | None:
    """A health endpoint's ``GET /`` (200 or 503 both answer), or None when it does not answer."""
    host = f"[{address}]" if ":" in address else address
    try:
        status, _, body = http_get(f"http://{host}:{port}/", {}, timeout_s=PEER_TIMEOUT_S)
    except FetchFailed:
        return None
    if status not in (200, 503):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def boot(reconciler: Reconciler) -> int:
    """First apply at boot: fetch (retrying until boot_timeout_s), verify, write; no reloads."""
    settings = reconciler.settings
    deadline = time.monotonic() + settings.boot_timeout_s
    delay = 1.0
    while True:
        document = reconciler.fetch()
        if document is None and reconciler.applied is not None:
            document = reconciler.applied  # the saved state matches the channel: make sure files do
        if document is not None:
            try:
                reconciler.apply(document, live=False)
            except (Refused, ApplyFailed) as exc:
                log("FAILED", f"boot apply of {document.version}: {exc}")
                reconciler.write_status()
                return 1
            reconciler.write_status()
            return 0
        if reconciler.status.refused is not None:
            reconciler.write_status()
            return 1
        left = deadline - time.monotonic()
        error = (reconciler.status.last_fetch or {}).get("error")
        if left <= 0:
            log("FAILED", f"no hub configuration document after {settings.boot_timeout_s:g} s: {error}")
            reconciler.status.state, reconciler.status.detail = "failed", f"no document at boot: {error}"
            reconciler.write_status()
            return 1
        log("", f"waiting for the hub configuration document ({left:.0f} s left): {error}")
        time.sleep(min(delay, max(0.0, left)))
        delay = min(delay * 2, 15.0)


def check(reconciler: Reconciler, path: str) -> int:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(DOCUMENT_MAX_BYTES * 2 + 1)
        document = verify(raw, reconciler.settings)
        reconciler.check_haproxy(document)
    except OSError as exc:
        print(f"cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    except Refused as exc:
        print(f"REFUSED: {exc}")
        return 1
    running = reconciler.applied.version if reconciler.applied else "none"
    print(f"valid: config {document.version} (running {running})")
    print(f"changes: {describe(reconciler.applied, document) or 'no route or key change'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunnelhub_reconcile.py",
                                     description="apply the hub configuration document on this proxy")
    parser.add_argument("--config", default="/etc/tunnelhub/reconcile.json")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--boot", action="store_true", help="first apply at boot: write the files, no reloads")
    mode.add_argument("--once", action="store_true", help="one fetch and apply (gate included), then exit")
    mode.add_argument("--check", metavar="FILE", help="verify a document file and print what it would change")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"tunnelhub-reconcile: invalid config {args.config}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    reconciler = Reconciler(settings)
    if args.check:
        return check(reconciler, args.check)
    if args.boot:
        with reconciler.lock():
            return boot(reconciler)
    if args.once:
        with reconciler.lock():
            reconciler.poll()
            reconciler.step()
        reconciler.write_status()
        return {"applied": 0, "starting": 0, "waiting": 3}.get(reconciler.status.state, 1)
    stop = [False]

    def stop_now(*_: Any) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, stop_now)
    signal.signal(signal.SIGINT, stop_now)
    log("", f"hub {settings.hub}, slot {reconciler.slot()}, config "
        f"{reconciler.applied.version if reconciler.applied else 'none'}; fetching {reconciler.source.label} "
        f"every {settings.interval_s:g} s")
    reconciler.run_forever(stop)
    log("", "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
