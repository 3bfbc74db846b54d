"""The reconciler (tunnelhub/userdata/files/tunnelhub_reconcile.py) with fakes around it.

Each test gets a proxy root in a temporary directory, the example hub's rendered reconcile.json
pointed into it, the document fed through the ``file`` source (and, for the channels, through a
fake Azure IMDS and moto's S3 with signature checks on), HAProxy's real ``haproxy -c`` as the
content check, and recording stand-ins for the reload commands. Checked: what a first apply
writes; every kind of bad document refused with the running files untouched and one REFUSED
line; only the parts that differ are rewritten and only their services reloaded; a failed
``sshd -t`` or reload rolls the files back; drift is repaired; the rollout gate against fake
peer health endpoints; the session bookkeeping that closes a revoked key's sessions; the config
errors. Real daemons are in test_reconcile_real.py.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import SECOND_TUNNEL_KEY, first_host_keys, spec_text
from tunnelhub.spec import load_spec, validate_text
from tunnelhub.userdata import document as D
from tunnelhub.userdata import render_document
from tunnelhub.userdata.render import haproxy_base_config, reconcile_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hubs.yaml"
FILES = ROOT / "tunnelhub" / "userdata" / "files"
SCRIPT = FILES / "tunnelhub_reconcile.py"
sys.path.insert(0, str(FILES))

import tunnelhub_reconcile as R  # noqa: E402

RECORDER = """#!/bin/sh
echo "$(basename "$0")${*:+ $*}" >> "$(dirname "$0")/calls"
exit "$(cat "$(dirname "$0")/$(basename "$0").rc" 2>/dev/null || echo 0)"
"""
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
pytestmark = pytest.mark.skipif(not Path(HAPROXY).exists(), reason="haproxy -c checks the routes file")


def hub_data() -> dict:
    import yaml
    return copy.deepcopy(yaml.safe_load(EXAMPLE.read_text())["hubs"][0])


def hub_of(data: dict):
    return validate_text(spec_text(data), "test.yaml").spec.hubs[0]


def resign(document: dict) -> str:
    """A document with its checksum and version recomputed (what a renderer would produce)."""
    digest = hashlib.sha256(D.canonical(document["payload"])).hexdigest()
    document = dict(document, checksum=f"sha256:{digest}", version=digest[:12])
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


class Proxy:
    """A proxy root, its reconcile.json, the document channel (a file) and recording commands."""

    def __init__(self, tmp: Path, slot: int = 0):
        self.tmp = tmp
        self.root = tmp / "root"
        self.bin = tmp / "bin"
        self.bin.mkdir(parents=True)
        hub = load_spec(EXAMPLE).hub("weu")
        base = tmp / "haproxy.cfg"
        base.write_text(haproxy_base_config(hub).replace("/run/haproxy/admin.sock", str(tmp / "admin.sock")))
        for name in ("haproxy-reload", "health-reload", "sshd-check", "sshd-reload", "sessions", "session-log"):
            (self.bin / name).write_text(RECORDER)
            (self.bin / name).chmod(0o755)
        config = reconcile_config(hub, slot)
        config["files"] = {k: str(self.root) + v for k, v in config["files"].items()}
        config["state_file"] = str(self.root) + config["state_file"]
        config["status_file"] = str(self.root) + config["status_file"]
        self.channel = tmp / "channel.json"
        config["source"] = {"type": "file", "path": str(self.channel)}
        config["commands"] = {
            "haproxy_check": [HAPROXY, "-c", "-q", "-f", str(base), "-f", "{candidate}"],
            "haproxy_reload": [str(self.bin / "haproxy-reload")],
            "health_reload": [str(self.bin / "health-reload")],
            "sshd_check": [str(self.bin / "sshd-check")],
            "sshd_reload": [str(self.bin / "sshd-reload")],
            "sessions": [str(self.bin / "sessions")],
            "session_log": [str(self.bin / "session-log")],
        }
        self.config_data = config
        self.config = tmp / "reconcile.json"
        self.config.write_text(json.dumps(config))
        self.settings = R.load_settings(str(self.config))

    def publish(self, data: dict | None = None, *, text: str | bytes | None = None) -> D.HubDocument | None:
        if text is not None:
            self.channel.write_bytes(text if isinstance(text, bytes) else text.encode())
            return None
        document = render_document(hub_of(data if data is not None else hub_data()))
        self.channel.write_text(document.text)
        return document

    def reconciler(self) -> R.Reconciler:
        return R.Reconciler(self.settings)

    def file(self, part: str) -> Path:
        return Path(self.settings.files[part])

    def snapshot(self) -> dict[str, str]:
        return {p: self.file(p).read_text() for p in R.FILE_PARTS}

    def calls(self) -> list[str]:
        path = self.bin / "calls"
        calls = path.read_text().splitlines() if path.exists() else []
        if path.exists():
            path.unlink()
        return calls

    def fail(self, command: str, code: int = 1) -> None:
        (self.bin / f"{command}.rc").write_text(str(code))

    def status(self) -> dict:
        return json.loads(Path(self.settings.status_file).read_text())

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=60)


@pytest.fixture
def proxy(tmp_path) -> Proxy:
    return Proxy(tmp_path)


@pytest.fixture
def applied(proxy) -> tuple[Proxy, R.Reconciler, D.HubDocument]:
    """A proxy that booted with the example document."""
    document = proxy.publish()
    done = proxy.run("--boot")
    assert done.returncode == 0, done.stderr
    proxy.calls()
    return proxy, proxy.reconciler(), document


# ---------------------------------------------------------------------------------- first apply


def test_boot_writes_every_part_and_runs_nothing(proxy):
    document = proxy.publish()
    done = proxy.run("--boot")
    assert done.returncode == 0, done.stderr
    assert proxy.calls() == []  # nothing runs yet at boot: no reload, no session listing
    payload = document.payload
    assert proxy.file("haproxy_routes").read_text() == payload["haproxy_routes"]
    assert proxy.file("authorized_keys").read_text() == payload["authorized_keys"]
    assert proxy.file("sshd_tunnel_forwarding").read_text() == payload["sshd_tunnel_forwarding"]
    health = json.loads(proxy.file("health").read_text())
    assert health == dict(payload["health"], config_version=document.version)
    state = Path(proxy.settings.state_file)
    assert json.loads(state.read_text())["version"] == document.version and state.stat().st_mode & 0o777 == 0o600
    assert oct(proxy.file("authorized_keys").stat().st_mode & 0o777) == "0o644"
    status = proxy.status()
    assert (status["state"], status["applied"]["version"], status["slot"]) == ("applied", document.version, 0)
    assert f"APPLIED config none -> {document.version}: routes orders-mysql, billing-pg; 2 tunnel key(s)" in done.stderr


def test_boot_gives_up_at_its_deadline_and_says_why(proxy):
    proxy.config_data["boot_timeout_s"] = 1
    proxy.config.write_text(json.dumps(proxy.config_data))
    started = time.monotonic()
    done = proxy.run("--boot")
    assert done.returncode == 1 and time.monotonic() - started < 20
    assert "no hub configuration document after 1 s: cannot read" in done.stderr
    assert proxy.status()["state"] == "failed"


# ---------------------------------------------------------------------------------- refusals


def _edit(change):
    def corrupt(document: D.HubDocument) -> bytes:
        data = json.loads(document.text)
        change(data)
        return json.dumps(data).encode()
    return corrupt


def _edit_signed(change):
    def corrupt(document: D.HubDocument) -> bytes:
        data = json.loads(document.text)
        change(data["payload"])
        return resign(data).encode()
    return corrupt


BAD_DOCUMENTS = {
    "truncated": (lambda d: d.text.encode()[: len(d.text) // 2], "not valid JSON"),
    "empty": (lambda d: b"", "not valid JSON"),
    "binary garbage": (lambda d: b"\x00\xff" * 50, "not UTF-8"),
    "truncated gzip": (lambda d: gzip.compress(d.text.encode())[:200], "does not decompress"),
    "a flipped byte in the payload": (lambda d: d.text.replace("maxconn 1000", "maxconn 9000", 1).encode(),
                                      "checksum mismatch"),
    "a wrong version": (_edit(lambda x: x.update(version="000000000000")), "is not the payload's"),
    "an unknown schema": (_edit(lambda x: x.update(schema=2)), "schema 2 is not one this reconciler knows"),
    "another hub": (_edit(lambda x: x.update(hub="use")), "the document is for hub 'use'"),
    "no checksum": (_edit(lambda x: x.pop("checksum")), "has no 'checksum' field"),
    "another tunnel user": (_edit_signed(lambda p: p.update(tunnel_user="root")), "a new tunnel user is a machine change"),
    "another health port": (_edit_signed(lambda p: p.update(health_port=9999)), "a new health port is a machine change"),
    "an invalid health route": (_edit_signed(lambda p: p["health"]["routes"][0]["probe"].update(mode="telepathy")),
                                "payload.health: routes[0].probe.mode: got 'telepathy'"),
    "a health route checking a tunnel host the port plan does not name": (
        _edit_signed(lambda p: p["health"]["routes"][0]["hosts"][0].update(name="intruder")), "the port plan gives"),
    "a health route checking a port the plan does not give": (
        _edit_signed(lambda p: p["health"]["routes"][0]["hosts"][0].update(port=40001)), "the port plan gives"),
    "a forward route with tunnel hosts": (
        _edit_signed(lambda p: p["health"]["routes"][1].update(kind="forward")), "only a tunnel route has tunnel hosts"),
    "a key the summary does not list": (
        _edit_signed(lambda p: p.update(authorized_keys=p["authorized_keys"] + 'restrict,command="/usr/sbin/nologin" '
                                        + SECOND_TUNNEL_KEY + "\n")), "the key summary lists"),
    "a key without restrict": (_edit_signed(lambda p: p.update(authorized_keys=p["authorized_keys"].replace(
        "restrict,", ""))), "must start with restrict"),
    "a key whose data is not its type": (_edit_signed(lambda p: p.update(authorized_keys=p["authorized_keys"].replace(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", "ssh-rsa AAAAC3NzaC1lZDI1NTE5"))), "is not a ssh-rsa key"),
    "a key that may open more than the health endpoint": (
        _edit_signed(lambda p: p.update(authorized_keys=p["authorized_keys"].replace(
            'permitopen="127.0.0.1:', 'permitopen="169.254.169.254:80",permitopen="127.0.0.1:'))),
        "may open only 127.0.0.1:"),
    "forwarding rules that open more than the health endpoint": (
        _edit_signed(lambda p: p.update(sshd_tunnel_forwarding=p["sshd_tunnel_forwarding"].replace(
            "PermitOpen 127.0.0.1:", "PermitOpen 169.254.169.254:80 127.0.0.1:"))),
        "the tunnel routes need"),
    "forwarding rules that open more ports": (
        _edit_signed(lambda p: p.update(sshd_tunnel_forwarding="AllowTcpForwarding all\nPermitListen any\n")),
        "the tunnel routes need"),
    "a routes file HAProxy rejects": (_edit_signed(lambda p: p.update(
        haproxy_routes=p["haproxy_routes"].replace("bind 0.0.0.0:3306", "bind 0.0.0.0:x"))), "HAProxy rejects the routes"),
    "peers without addresses": (_edit_signed(lambda p: p.update(peers=[{"slot": 0, "address": "proxy-0"}])),
                                "is not an IP address"),
    "an unknown payload field": (_edit_signed(lambda p: p.update(shell="rm -rf /")), "unknown ['shell']"),
}


@pytest.mark.parametrize("name", list(BAD_DOCUMENTS))
def test_a_bad_document_is_refused_and_nothing_changes(applied, name, capsys):
    proxy, reconciler, good = applied
    corrupt, reason = BAD_DOCUMENTS[name]
    before = proxy.snapshot()
    proxy.publish(text=corrupt(good))
    reconciler.poll()
    reconciler.step()
    reconciler.write_status()
    assert proxy.snapshot() == before and proxy.calls() == []
    status = proxy.status()
    assert status["state"] == "refused" and reason in status["refused"]["reason"], status
    assert status["applied"]["version"] == good.version
    # the same bytes again: no second log line, still refused
    reconciler.poll()
    reconciler.step()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "REFUSED" in ln]
    assert len(lines) == 1 and lines[0].startswith("tunnelhub-reconcile: REFUSED document version=")
    assert f"keeping config {good.version}" in lines[0]


def test_check_and_once_exit_codes(applied):
    proxy, _, good = applied
    bad = proxy.tmp / "bad.json"
    bad.write_text(good.text[:100])
    assert proxy.run("--check", str(bad)).returncode == 1
    new = render_document(hub_of(_with_second_key(hub_data())))
    candidate = proxy.tmp / "new.json"
    candidate.write_text(new.text)
    done = proxy.run("--check", str(candidate))
    assert done.returncode == 0 and f"valid: config {new.version} (running {good.version})" in done.stdout
    assert "key added: " + D.key_fingerprint(SECOND_TUNNEL_KEY) in done.stdout
    proxy.publish(text=good.text[:100])
    assert proxy.run("--once").returncode == 1


def _with_second_key(data: dict) -> dict:
    first_host_keys(data).append(SECOND_TUNNEL_KEY)
    return data


# ---------------------------------------------------------------------------------- what changes


def test_only_what_differs_is_rewritten_and_only_its_service_reloaded(applied):
    proxy, reconciler, good = applied
    data = hub_data()
    data["routes"][0]["max_connections"] = 250
    new = proxy.publish(data)
    before = proxy.snapshot()
    reconciler.poll()
    reconciler.step()
    after = proxy.snapshot()
    assert [p for p in R.FILE_PARTS if before[p] != after[p]] == ["haproxy_routes", "health"]
    assert "maxconn 250" in after["haproxy_routes"]
    assert proxy.calls() == ["haproxy-reload", "health-reload"]
    assert reconciler.applied.version == new.version != good.version

    first_host_keys(data).append(SECOND_TUNNEL_KEY)  # a new key: sshd reads keys at login
    proxy.publish(data)
    reconciler.poll()
    reconciler.step()
    assert proxy.calls() == ["health-reload"]  # the version moved; no reload of sshd or HAProxy
    assert SECOND_TUNNEL_KEY in proxy.file("authorized_keys").read_text()

    data["routes"].append({"name": "erp-mssql", "kind": "tunnel", "port": 1433, "target": "erp.corp.example:1433"})
    proxy.publish(data)
    reconciler.poll()
    reconciler.step()
    assert proxy.calls() == ["sshd-check", "sshd-reload", "haproxy-reload", "health-reload"]
    assert "localhost:11433" in proxy.file("sshd_tunnel_forwarding").read_text()


def test_a_revoked_key_lists_the_sessions_to_close(applied):
    proxy, reconciler, _ = applied
    data = _with_second_key(hub_data())
    proxy.publish(data)
    reconciler.poll()
    reconciler.step()
    proxy.calls()
    del first_host_keys(data)[1:]
    proxy.publish(data)
    reconciler.poll()
    reconciler.step()
    assert proxy.calls() == ["sessions", "session-log", "health-reload"]  # listed: nothing established here


def test_sshd_rejecting_the_rules_rolls_back_and_refuses(applied):
    proxy, reconciler, good = applied
    before = proxy.snapshot()
    data = _with_second_key(hub_data())
    data["routes"].append({"name": "erp-mssql", "kind": "tunnel", "port": 1433, "target": "erp.corp.example:1433"})
    proxy.publish(data)
    proxy.fail("sshd-check")
    reconciler.poll()
    reconciler.step()
    assert proxy.snapshot() == before  # the new key and rules were written, then restored
    assert proxy.calls() == ["sshd-check"]
    assert reconciler.status.state == "refused" and "sshd rejects" in reconciler.status.detail
    assert reconciler.applied.version == good.version


def test_a_failed_reload_rolls_back_and_is_retried(applied):
    proxy, reconciler, good = applied
    before = proxy.snapshot()
    data = hub_data()
    data["routes"][0]["max_connections"] = 250
    new = proxy.publish(data)
    proxy.fail("haproxy-reload")
    reconciler.poll()
    reconciler.step()
    assert proxy.snapshot() == before and reconciler.status.state == "failed"
    assert reconciler.applied.version == good.version and reconciler.pending.version == new.version
    (proxy.bin / "haproxy-reload.rc").unlink()
    reconciler.poll()
    reconciler.step()
    assert reconciler.applied.version == new.version and "maxconn 250" in proxy.file("haproxy_routes").read_text()


def test_a_hand_edited_file_is_rewritten(applied, capsys):
    proxy, reconciler, good = applied
    path = proxy.file("haproxy_routes")
    path.write_text(path.read_text() + "listen backdoor\n    bind 0.0.0.0:2222\n")
    reconciler.poll()
    assert path.read_text() == good.payload["haproxy_routes"]
    assert proxy.calls() == ["haproxy-reload"]
    assert "DRIFT" in capsys.readouterr().err


def test_a_restarted_reconciler_takes_over_from_its_saved_state(applied):
    proxy, _, good = applied
    again = proxy.reconciler()
    assert again.applied.version == good.version
    again.poll()
    again.step()
    assert again.pending is None and proxy.calls() == []  # the same document: nothing to do


# ---------------------------------------------------------------------------------- channels


def test_azure_imds_source_reads_the_vm_user_data(tmp_path):
    from tests.unit.test_userdata_fakes import FakeCloud

    proxy = Proxy(tmp_path)
    document = render_document(load_spec(EXAMPLE).hub("weu"))
    with FakeCloud() as cloud:
        cloud.azure_user_data = document.azure_user_data()
        proxy.settings = R.parse_settings(dict(proxy.config_data, source={
            "type": "azure-imds",
            "url": f"{cloud.url}/metadata/instance/compute/userData?api-version=2021-01-01&format=text"}))
        reconciler = proxy.reconciler()
        reconciler.poll()
        assert reconciler.pending.version == document.version
        cloud.azure_user_data = ""
        with pytest.raises(R.FetchFailed, match="the VM has no user data"):
            reconciler.source.fetch()
    assert any(path.startswith("/metadata/instance/compute/userData") for _, path in cloud.requests)


def test_aws_s3_source_reads_the_object_with_the_instance_role_and_asks_conditionally(tmp_path, monkeypatch):
    """moto with signature and IAM checks on (the role may read that one object); the second fetch
    sends If-None-Match and gets 304; a new document is fetched whole.
    (moto honours If-None-Match on GetObject like S3 does; checked here by the status code.)"""
    from tests.unit.test_userdata_fakes import FakeCloud, instance_role_credentials, moto_aws
    from tunnelhub.userdata import AWS_DOCUMENT_KEY, files_bucket_name

    hub = load_spec(EXAMPLE).hub("use")
    document = render_document(hub)
    seen: list[int] = []
    real = R.http_get

    def recording(url, headers, timeout_s=R.HTTP_TIMEOUT_S):
        answer = real(url, headers, timeout_s)
        if "/config/" in url:
            seen.append(answer[0])
        return answer

    monkeypatch.setattr(R, "http_get", recording)
    with moto_aws(monkeypatch) as aws, FakeCloud() as cloud:
        bucket = files_bucket_name("use", "123456789012", "us-east-1")
        s3 = aws.client("s3")
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key=AWS_DOCUMENT_KEY, Body=document.text.encode())
        cloud.credentials = instance_role_credentials(aws, {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/{AWS_DOCUMENT_KEY}"}]})
        aws.enforce()
        config = reconcile_config(hub, None)
        config["source"] = dict(config["source"], imds_url=cloud.url, endpoint=aws.url)
        source = R.AwsS3Source(R.parse_settings(config))
        assert source.fetch() == document.text.encode()
        assert source.fetch() == document.text.encode()
        assert seen == [200, 304]
        import yaml
        s3_changed = render_document(hub_of(_with_second_key(yaml.safe_load(EXAMPLE.read_text())["hubs"][1])))
        from moto import settings as moto_settings

        monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))  # terraform apply
        s3.put_object(Bucket=bucket, Key=AWS_DOCUMENT_KEY, Body=s3_changed.text.encode())
        aws.enforce()
        assert source.fetch() == s3_changed.text.encode() and seen[-1] == 200


# ---------------------------------------------------------------------------------- the gate


class FakeHealth:
    """A peer's health endpoint (``GET /``): the version it runs and its routes' health."""

    def __init__(self, address: str, port: int, version: str, healthy: dict[str, bool]):
        self.version, self.healthy = version, healthy
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = json.dumps({"config_version": fake.version,
                                   "routes": {n: {"healthy": h} for n, h in fake.healthy.items()}}).encode()
                self.send_response(200 if all(fake.healthy.values()) else 503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((address, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gated(tmp_path):
    """Slot 1 of a hub whose peers are 127.0.0.2 (slot 0, the canary) and 127.0.0.3 (slot 1)."""
    from tests.unit.test_userdata_fakes import free_port

    port = free_port()
    proxy = Proxy(tmp_path, slot=1)
    proxy.settings = R.parse_settings(dict(proxy.config_data, health_port=port))

    def document(data: dict) -> str:
        rendered = json.loads(render_document(hub_of(data)).text)
        rendered["payload"]["peers"] = [{"slot": 0, "address": "127.0.0.2"}, {"slot": 1, "address": "127.0.0.3"}]
        rendered["payload"]["health_port"] = port
        rendered["payload"]["health"]["port"] = port
        for part in ("authorized_keys", "sshd_tunnel_forwarding"):  # the -L the tunnel hosts may open
            rendered["payload"][part] = rendered["payload"][part].replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        return resign(rendered)

    first = document(hub_data())
    proxy.publish(text=first)
    reconciler = proxy.reconciler()
    reconciler.poll()
    reconciler.step()
    proxy.calls()
    servers: list[FakeHealth] = []

    def serve(address: str, version: str, **healthy: bool) -> FakeHealth:
        servers.append(FakeHealth(address, port, version, {k.replace("_", "-"): v for k, v in healthy.items()}))
        return servers[-1]

    yield proxy, reconciler, document, serve
    for server in servers:
        server.close()


def _changed_route(data: dict) -> dict:
    data["routes"][0]["max_connections"] = 250
    return data


def test_a_change_to_a_healthy_route_waits_for_the_canary(gated):
    proxy, reconciler, document, serve = gated
    old = reconciler.applied.version
    serve("127.0.0.1", old, orders_mysql=True, billing_pg=True)  # this proxy: the route is healthy here
    canary = serve("127.0.0.2", old, orders_mysql=True, billing_pg=True)
    text = document(_changed_route(hub_data()))
    new = json.loads(text)["version"]
    proxy.publish(text=text)
    reconciler.poll()
    reconciler.step()
    assert reconciler.status.state == "waiting" and reconciler.applied.version == old
    assert f"waiting for canary slot 0 (127.0.0.2) to apply {new} (it runs {old})" in reconciler.status.detail
    canary.version, canary.healthy["orders-mysql"] = new, False  # applied, but the route is sick there
    reconciler.step()
    assert "waiting for route(s) orders-mysql to be healthy on canary slot 0" in reconciler.status.detail
    canary.healthy["orders-mysql"] = True
    reconciler.step()
    assert reconciler.applied.version == new and reconciler.status.state == "applied"


def test_new_routes_keys_and_sick_routes_do_not_wait(gated):
    proxy, reconciler, document, serve = gated
    old = reconciler.applied.version
    serve("127.0.0.2", old, orders_mysql=True, billing_pg=True)  # the canary still runs the old one
    local = serve("127.0.0.1", old, orders_mysql=False, billing_pg=True)
    data = _with_second_key(hub_data())
    data["routes"].append({"name": "erp-mssql", "kind": "tunnel", "port": 1433, "target": "erp.corp.example:1433"})
    proxy.publish(text=document(data))
    reconciler.poll()
    reconciler.step()
    assert reconciler.applied.version != old  # a new route and a new key: at once
    local.version = reconciler.applied.version
    proxy.publish(text=document(_changed_route(data)))
    reconciler.poll()
    reconciler.step()
    assert reconciler.status.state == "applied"  # orders-mysql is down here: nothing to protect


def test_without_an_answering_lower_slot_the_proxy_is_its_own_canary(gated):
    proxy, reconciler, document, serve = gated
    serve("127.0.0.1", reconciler.applied.version, orders_mysql=True, billing_pg=True)
    proxy.publish(text=document(_changed_route(hub_data())))  # nothing answers at 127.0.0.2
    reconciler.poll()
    reconciler.step()
    assert reconciler.status.state == "applied"


# ---------------------------------------------------------------------------------- sessions


SS = """0      0      10.60.0.5:22     192.168.10.5:40001 users:(("sshd",pid={a},fd=4),("sshd",pid={a2},fd=4))
0      0      10.60.0.5:22     192.168.10.5:40002 users:(("sshd",pid={b},fd=4))
0      0      [::ffff:10.60.0.5]:22 [::ffff:192.168.10.9]:40003 users:(("sshd",pid={c},fd=4))
0      0      10.60.0.5:22     192.168.10.5:40004 users:(("sshd",pid={d},fd=4))
"""
LOG = """Accepted publickey for tunnel from 192.168.10.5 port 40001 ssh2: ED25519 SHA256:keep
Accepted publickey for tunnel from 192.168.10.5 port 40002 ssh2: ED25519 SHA256:gone
Accepted publickey for tunnelhub from 192.168.10.9 port 40003 ssh2: ED25519 SHA256:gone
"""


def test_parsers_of_ss_and_sshds_log():
    sessions = R.parse_ss(SS.format(a=1, a2=2, b=3, c=4, d=5))
    assert [(s.peer, s.port, s.pids) for s in sessions] == [
        ("192.168.10.5", 40001, [1, 2]), ("192.168.10.5", 40002, [3]), ("192.168.10.9", 40003, [4]),
        ("192.168.10.5", 40004, [5])]
    assert R.parse_accepted(LOG) == {("192.168.10.5", 40001): ("tunnel", "SHA256:keep"),
                                     ("192.168.10.5", 40002): ("tunnel", "SHA256:gone"),
                                     ("192.168.10.9", 40003): ("tunnelhub", "SHA256:gone")}


def test_only_the_revoked_keys_sessions_of_the_tunnel_user_are_closed(tmp_path):
    """Processes stand in for sshd's session processes (their titles as sshd sets them): the
    revoked key's session and the tunnel-user session whose key is unknown are SIGTERMed; the
    kept key's session and the admin's session (same revoked key, another user) live on."""
    def title(name: str) -> subprocess.Popen:
        return subprocess.Popen(["bash", "-c", f'exec -a "{name}" sleep 60'])

    keep, keep_child = title("sshd: tunnel [priv]"), title("sshd: tunnel")
    gone, admin, unknown = title("sshd: tunnel [priv]"), title("sshd: tunnelhub [priv]"), title("sshd: tunnel [priv]")
    procs = [keep, keep_child, gone, admin, unknown]
    try:
        time.sleep(0.2)
        ss = tmp_path / "ss"
        ss.write_text("#!/bin/sh\ncat <<'EOF'\n" + SS.format(a=keep.pid, a2=keep_child.pid, b=gone.pid, c=admin.pid,
                                                         d=unknown.pid) + "EOF\n")
        ss.chmod(0o755)
        log = tmp_path / "sshd.log"
        log.write_text(LOG)
        proxy = Proxy(tmp_path / "p")
        settings = R.parse_settings(dict(proxy.config_data, session_log_file=str(log),
                                         commands=dict(proxy.config_data["commands"], sessions=[str(ss)])))
        closed = R.close_revoked_sessions(settings, revoked={"SHA256:gone"}, allowed={"SHA256:keep"})
        assert sorted(s.port for s in closed) == [40002, 40004]
        for proc in (gone, unknown):
            assert proc.wait(5) == -signal.SIGTERM
        assert all(p.poll() is None for p in (keep, keep_child, admin))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.pop("hub"), "hub: got None; fix: give a non-empty string"),
    (lambda c: c.update(interval_s=0), "interval_s: got 0; fix: give a number of seconds from 0.2 to 3600"),
    (lambda c: c.update(source={"type": "ftp"}), "source: got {'type': 'ftp'}"),
    (lambda c: c["commands"].update(haproxy_check=["haproxy", "-c"]), "include the word {candidate}"),
    (lambda c: c["files"].pop("health"), "files: got"),
    (lambda c: c.update(colour="blue"), "colour: got 'blue'; fix: remove it"),
])
def test_a_bad_config_names_the_field_and_exits_2(proxy, change, message):
    change(proxy.config_data)
    proxy.config.write_text(json.dumps(proxy.config_data))
    done = proxy.run("--once")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr


def test_the_rendered_configs_are_valid():
    for hub in load_spec(EXAMPLE).hubs:
        settings = R.parse_settings(reconcile_config(hub, 0 if hub.cloud == "azure" else None))
        assert settings.source["type"] == ("azure-imds" if hub.cloud == "azure" else "aws-s3")
        assert os.path.isabs(settings.state_file)
