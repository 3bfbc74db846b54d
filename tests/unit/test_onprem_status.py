"""``tunnelhub-<hub>-status`` (``tunnelhub/onprem/files/tunnelhub_status.py``), run as a program
against a fake ``systemctl`` and ``journalctl`` on PATH (recording shell scripts answering from
files, like the fakes of ``test_userdata_slot.py``) and fake proxy health endpoints served on the
per-slot unix sockets that the units' ``ssh -L`` would bind.

What the fakes stand for, from the real tools: ``systemctl show --timestamp=unix -p A,B unit``
prints ``A=value`` lines and ``@<seconds>`` timestamps (systemctl(1), ``--timestamp=``, systemd
248+; Debian 12 has 252); ``journalctl -o json`` prints one JSON object per line with
``MESSAGE``, ``PRIORITY`` and ``__REALTIME_TIMESTAMP`` in microseconds (systemd.journal-fields(7));
the health endpoint answers ``GET /routes/<name>`` 200/503 with the daemon's JSON
(``tunnelhub/userdata/files/tunnelhub_health.py``, ``RouteChecker.status``). ssh accepts a
connection on its ``-L`` socket before the proxy side opens; a channel the proxy refuses closes
the connection with nothing (``tests/unit/test_sshd.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from socketserver import ThreadingMixIn, UnixStreamServer

import pytest

from tests.helpers import azure_hub, load_hubs
from tunnelhub.onprem import build_deb, deb_file
from tunnelhub.onprem.outputs import StackOutputs
from tunnelhub.onprem.unitfile import exec_commands, expand, expand_instance, read_env_file, unit_environment

SCRIPT = Path(__file__).resolve().parents[2] / "tunnelhub" / "onprem" / "files" / "tunnelhub_status.py"
EPOCH = 1_747_700_000
NOW = int(time.time())
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOaN3cWyvjBGr4otYDaxEsCyHJdGDD93vvrXcCU/lvrx"  # an example hub key

FAKE_SYSTEMCTL = """#!/bin/sh
# systemctl show --timestamp=unix -p PROPS -- UNIT
echo "systemctl $*" >> "$FAKE_DIR/calls"
for last; do :; done
[ -f "$FAKE_DIR/$last.show" ] || { echo "Unit $last could not be found." >&2; exit 1; }
cat "$FAKE_DIR/$last.show"
"""
FAKE_JOURNALCTL = """#!/bin/sh
# journalctl -u UNIT -n N -o json --no-pager -q
echo "journalctl $*" >> "$FAKE_DIR/calls"
[ -f "$FAKE_DIR/$2.journal" ] && cat "$FAKE_DIR/$2.journal"
exit 0
"""


class _Server(ThreadingMixIn, UnixStreamServer):
    daemon_threads = True


class FakeHealth:
    """A proxy's health endpoint as seen through a slot's ``-L`` socket.

    ``routes``: name -> healthy (True / False); ``mode``: "answer" (HTTP), "refuse" (accept and
    close: the proxy refused the channel or the session is gone), "hang" (accept, never answer:
    a dead path)."""

    def __init__(self, path: Path, routes: dict[str, bool], mode: str = "answer") -> None:
        self.path, self.routes, self.mode, self.requests = path, routes, mode, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def handle(self) -> None:
                if fake.mode == "refuse":
                    return
                if fake.mode == "hang":
                    time.sleep(5)
                    return
                super().handle()

            def do_GET(self) -> None:  # noqa: N802
                fake.requests.append(self.path)
                name = self.path.removeprefix("/routes/")
                if name not in fake.routes:
                    code, body = 404, {"error": f"no route named {name!r}"}
                else:
                    healthy = fake.routes[name]
                    code = 200 if healthy else 503
                    body = {"route": name, "healthy": healthy, "age_s": 1.2, "latency_ms": 3.4, "mode": "mysql",
                            "reason": "mysql handshake from 8.0.36" if healthy
                            else "connect to 127.0.0.1:13306 failed: Connection refused"}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

            def address_string(self) -> str:
                return "unix"

        path.parent.mkdir(parents=True, exist_ok=True)
        self.server = _Server(str(path), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Host:
    """A fake tunnel host: bin/ with systemctl and journalctl, an /etc dir, sockets, a config."""

    def __init__(self, tmp: Path, slots: int = 2, routes: tuple[str, ...] = ("orders-mysql", "billing-pg")) -> None:
        self.dir = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir(parents=True)
        for name, text in (("systemctl", FAKE_SYSTEMCTL), ("journalctl", FAKE_JOURNALCTL)):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        self.etc = tmp / "etc"
        self.etc.mkdir()
        self.config = {
            "hub": "weu", "package": "tunnelhub-weu", "etc_dir": str(self.etc), "health_port": 8080,
            "slots": [{"slot": n, "endpoint": f"10.60.0.{5 + n}", "unit": f"tunnelhub-weu@{n}.service",
                       "socket": str(tmp / "run" / f"slot-{n}" / "health.sock")} for n in range(slots)],
            "routes": [{"route": r, "tunnel_port": 13306 + i, "target": f"{r}.corp.example:3306"}
                       for i, r in enumerate(routes)],
        }
        (tmp / "config.json").write_text(json.dumps(self.config))
        self.servers: list[FakeHealth] = []

    def unit(self, slot: int, state: str = "active", sub: str = "running", active_since: int | None = NOW - 600,
             inactive_since: int | None = NOW - 3600) -> None:
        stamp = lambda t: f"@{t}" if t else ""  # noqa: E731
        (self.dir / f"tunnelhub-weu@{slot}.service.show").write_text(
            f"ActiveState={state}\nSubState={sub}\nResult={'success' if state != 'failed' else 'exit-code'}\n"
            f"NRestarts=3\nActiveEnterTimestamp={stamp(active_since)}\nInactiveEnterTimestamp={stamp(inactive_since)}\n")

    def journal(self, slot: int, *entries: tuple[int, int, str]) -> None:
        """(seconds, priority, message) entries, oldest first."""
        (self.dir / f"tunnelhub-weu@{slot}.service.journal").write_text("".join(
            json.dumps({"__REALTIME_TIMESTAMP": str(t * 1_000_000), "PRIORITY": str(p), "MESSAGE": m,
                        "SYSLOG_IDENTIFIER": f"tunnelhub-weu-slot{slot}"}) + "\n" for t, p, m in entries))

    def health(self, slot: int, mode: str = "answer", **routes: bool) -> FakeHealth:
        server = FakeHealth(Path(self.config["slots"][slot]["socket"]),
                            {k.replace("_", "-"): v for k, v in routes.items()}, mode)
        self.servers.append(server)
        return server

    def run(self, *args: str, config: bool = True, script: Path = SCRIPT, timeout_s: float = 30):
        env = dict(os.environ, PATH=f"{self.bin}:/usr/bin:/bin", FAKE_DIR=str(self.dir))
        argv = [sys.executable, str(script), *(["--config", str(self.dir / "config.json")] if config else []), *args]
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s)
        done.elapsed = time.monotonic() - started  # type: ignore[attr-defined]
        return done

    def status(self, *args: str) -> tuple[int, dict]:
        done = self.run("--json", *args)
        assert done.stderr == "", done.stderr
        return done.returncode, json.loads(done.stdout)

    def close(self) -> None:
        for server in self.servers:
            server.close()


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path)
    yield h
    h.close()


def all_up(host: Host) -> None:
    for slot in (0, 1):
        host.unit(slot)
        host.health(slot, orders_mysql=True, billing_pg=True)


SLOT_KEYS = {"slot", "endpoint", "unit", "active_state", "sub_state", "result", "restarts", "tunnel", "since",
             "last_error", "journal_problem", "health_problem", "routes"}
SLOT_ROUTE_KEYS = {"route", "tunnel_port", "state", "healthy", "reason", "http_status", "checked_age_s"}
ROUTE_KEYS = {"route", "tunnel_port", "target", "up_slots", "down_slots", "state"}


def check_schema(data: dict) -> None:
    """The --json document: what scripts may rely on (documented in the man page)."""
    assert set(data) == {"hub", "package", "checked_at", "state", "exit_code", "routes", "slots"}
    assert data["state"] in ("ok", "degraded", "down") and data["exit_code"] in (0, 1, 2)
    assert data["checked_at"].endswith("Z")
    for route in data["routes"]:
        assert set(route) == ROUTE_KEYS and route["state"] in ("up", "degraded", "down")
        assert sorted(route["up_slots"] + route["down_slots"]) == [s["slot"] for s in data["slots"]]
    for slot in data["slots"]:
        assert set(slot) == SLOT_KEYS
        assert slot["since"] is None or slot["since"].endswith("Z")
        assert slot["last_error"] is None or set(slot["last_error"]) == {"time", "message"}
        for route in slot["routes"]:
            assert set(route) == SLOT_ROUTE_KEYS and route["state"] in ("up", "down", "unreachable")


# ---------------------------------------------------------------------------------------------


def test_every_route_up_through_every_slot_exits_0(host):
    all_up(host)
    code, data = host.status()
    check_schema(data)
    assert (code, data["state"]) == (0, "ok")
    assert [s["tunnel"] for s in data["slots"]] == ["up", "up"]
    assert all(r["state"] == "up" and r["http_status"] == 200 and r["reason"] == "mysql handshake from 8.0.36"
               for s in data["slots"] for r in s["routes"])
    assert sorted(host.servers[0].requests) == ["/routes/billing-pg", "/routes/orders-mysql"]
    # since: when ssh bound the health socket, i.e. when this session authenticated
    since = os.stat(host.config["slots"][0]["socket"]).st_mtime
    assert data["slots"][0]["since"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
    table = host.run()
    assert table.returncode == 0
    assert "hub weu: OK: orders-mysql up, billing-pg up" in table.stdout
    assert table.stdout.splitlines()[0].split() == ["SLOT", "PROXY", "TUNNEL", "SINCE", "ROUTE", "HEALTH", "REASON"]


def test_a_failed_slot_is_degraded_exit_1_with_its_last_error_and_since(host):
    host.unit(0)
    host.health(0, orders_mysql=True, billing_pg=True)
    host.unit(1, state="failed", sub="failed", active_since=NOW - 900, inactive_since=NOW - 120)
    host.journal(1, (NOW - 200, 6, "tunnelhub-weu slot=1 route=orders-mysql event=start forward=x proxy=10.60.0.6"),
                 (NOW - 130, 6, "ssh: connect to host 10.60.0.6 port 22: Connection timed out"),
                 (NOW - 125, 3, "ssh exited with error status 255; restarting ssh"),
                 (NOW - 120, 6, "tunnelhub-weu slot=1 route=orders-mysql event=stop result=exit-code code=exited"))
    code, data = host.status()
    check_schema(data)
    assert (code, data["state"]) == (1, "degraded")
    slot = data["slots"][1]
    assert (slot["tunnel"], slot["active_state"]) == ("failed", "failed")
    assert slot["since"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 120))  # InactiveEnterTimestamp
    assert slot["last_error"]["message"] == "ssh exited with error status 255; restarting ssh"  # not the event line
    assert all(r["state"] == "unreachable" and r["reason"] == "unreachable: the unit is failed" for r in slot["routes"])
    assert [(r["route"], r["up_slots"], r["down_slots"]) for r in data["routes"]] == [
        ("orders-mysql", [0], [1]), ("billing-pg", [0], [1])]
    table = host.run().stdout
    assert "slot 1 (tunnelhub-weu@1.service) last error" in table and "restarting ssh" in table
    assert "DEGRADED: orders-mysql degraded (down on slot 1)" in table


def test_a_route_healthy_through_no_slot_is_down_exit_2_with_the_proxys_reason(host):
    for slot in (0, 1):
        host.unit(slot)
        host.health(slot, orders_mysql=True, billing_pg=False)
    code, data = host.status()
    check_schema(data)
    assert (code, data["state"]) == (2, "down")
    assert [r["state"] for r in data["routes"]] == ["up", "down"]
    pg = data["slots"][0]["routes"][1]
    assert (pg["state"], pg["http_status"], pg["healthy"]) == ("down", 503, False)
    assert pg["reason"] == "connect to 127.0.0.1:13306 failed: Connection refused"
    assert data["slots"][0]["tunnel"] == "up"  # the tunnel is up; the route behind it is not


def test_an_active_unit_without_a_session_is_connecting_since_its_last_error(host):
    """autossh keeps the unit active while ssh fails to connect: no socket, the routes unreachable,
    and the last error is ssh's own stderr line (journal priority info), not an event line."""
    host.unit(0)
    host.health(0, orders_mysql=True, billing_pg=True)
    host.unit(1, active_since=NOW - 600)
    host.journal(1, (NOW - 40, 6, "ssh: connect to host 10.60.0.6 port 22: Connection refused"),
                 (NOW - 30, 6, "tunnelhub-weu slot=1 route=billing-pg event=start forward=x proxy=10.60.0.6"))
    code, data = host.status()
    slot = data["slots"][1]
    assert code == 1
    assert slot["tunnel"] == "connecting" and "No such file" in slot["health_problem"]
    assert slot["last_error"]["message"] == "ssh: connect to host 10.60.0.6 port 22: Connection refused"
    assert slot["since"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 40))


def test_a_refused_channel_is_connecting_and_a_silent_proxy_is_stalled_within_the_timeout(host):
    host.unit(0)
    host.health(0, mode="refuse")
    host.unit(1)
    host.health(1, mode="hang")
    started = time.monotonic()
    code, data = host.status("--timeout", "0.5")
    elapsed = time.monotonic() - started
    assert code == 2  # no route healthy anywhere
    assert data["slots"][0]["tunnel"] == "connecting"
    assert "the tunnel closed the request" in data["slots"][0]["health_problem"]
    assert data["slots"][1]["tunnel"] == "stalled"
    assert data["slots"][1]["health_problem"] == "no answer from the proxy within 0.5 s"
    assert all(r["state"] == "unreachable" for s in data["slots"] for r in s["routes"])
    assert elapsed < 4, f"one timeout per slot, slots in parallel: took {elapsed:.1f} s"


def test_usage_errors_and_a_missing_systemctl_exit_3_and_help_documents_the_exit_codes(host):
    all_up(host)
    bad = host.run("--bogus")
    assert bad.returncode == 3 and "unrecognized arguments: --bogus" in bad.stderr
    assert host.run("--timeout", "0").returncode == 3
    (host.bin / "systemctl").unlink()
    env_path = f"{host.bin}"  # no /usr/bin: no systemctl anywhere
    done = subprocess.run([sys.executable, str(SCRIPT), "--config", str(host.dir / "config.json")],
                          capture_output=True, text=True, env={"PATH": env_path, "FAKE_DIR": str(host.dir)}, timeout=30)
    assert done.returncode == 3 and "cannot run systemctl" in done.stderr
    helped = host.run("--help")
    assert helped.returncode == 0
    for line in ("0  every route is healthy through every slot", "1  degraded", "2  down", "3  unknown"):
        assert line in helped.stdout


def test_the_endpoint_comes_from_the_slot_file_when_edited_here(host):
    all_up(host)
    (host.etc / "slot-1.env").write_text("# edited\nTUNNELHUB_ENDPOINT=192.0.2.9\n")
    _, data = host.status()
    assert [s["endpoint"] for s in data["slots"]] == ["10.60.0.5", "192.0.2.9"]


# --------------------------------------------------------------------------------------------- the package


def built(tmp_path):
    hub = load_hubs(azure_hub()).hubs[0]
    return build_deb(hub, StackOutputs(source="out.json", tunnel_endpoints=None, host_public_key=HOST_KEY), tmp_path,
                     source_date_epoch=EPOCH)


def test_the_installed_command_carries_the_hubs_settings(tmp_path):
    deb = built(tmp_path / "dist")
    installed = tmp_path / "tunnelhub-weu-status"
    installed.write_bytes(deb_file(deb.path, "/usr/bin/tunnelhub-weu-status"))
    assert installed.read_text().startswith("#!/usr/bin/python3\n")
    namespace: dict = {}
    exec(compile(installed.read_text(), str(installed), "exec"), namespace)  # noqa: S102
    assert namespace["CONFIG"] == deb.plan.status_config()
    assert [s["socket"] for s in namespace["CONFIG"]["slots"]] == [
        "/run/tunnelhub-weu/slot-0/health.sock", "/run/tunnelhub-weu/slot-1/health.sock"]
    host = Host(tmp_path / "host")
    for slot in (0, 1):
        host.unit(slot, state="inactive", sub="dead")
    done = host.run("--json", config=False, script=installed)
    data = json.loads(done.stdout)
    assert done.returncode == 2 and data["hub"] == "weu"
    assert [r["route"] for r in data["routes"]] == [f.route for f in deb.plan.forwards]
    assert "systemctl show --timestamp=unix" in (host.dir / "calls").read_text()
    man = deb_file(deb.path, "/usr/share/man/man1/tunnelhub-weu-status.1.gz")
    assert man[:2] == b"\x1f\x8b"


def test_the_units_journal_lines_are_one_line_per_route_with_slot_and_route(tmp_path):
    """ExecStartPre / ExecStopPost echo one line per route; systemd expands ``%i`` and the
    ``${...}`` variables (``$SERVICE_RESULT``, ``$EXIT_CODE``, ``$EXIT_STATUS`` are set for
    ExecStopPost: systemd.exec(5), "Environment Variables Set or Propagated by the Service
    Manager"). Run here as systemd would run them, after the same expansion."""
    deb = built(tmp_path)
    unit = deb_file(deb.path, "/lib/systemd/system/tunnelhub-weu@.service").decode()
    assert "SyslogIdentifier=tunnelhub-weu-slot%i\n" in unit
    env = {**unit_environment(unit), **read_env_file(deb_file(deb.path, "/etc/tunnelhub/weu/slot-1.env").decode()),
           "SERVICE_RESULT": "exit-code", "EXIT_CODE": "exited", "EXIT_STATUS": "255"}
    lines = {}
    for key in ("ExecStartPre", "ExecStopPost"):
        out = []
        for prefix, words in exec_commands(unit, key):
            if words[0] != "/bin/echo":
                continue  # the quick-ACK helper
            assert prefix == "-"
            out += subprocess.run(expand(expand_instance(words, "1"), env), capture_output=True, text=True,
                                  check=True).stdout.splitlines()
        lines[key] = out
    routes = [f.route for f in deb.plan.forwards]
    assert len(routes) >= 2
    assert lines["ExecStartPre"] == [
        f"tunnelhub-weu slot=1 route={f.route} event=start forward={f.remote_forward} proxy=10.60.0.6"
        for f in deb.plan.forwards]
    assert lines["ExecStopPost"] == [
        f"tunnelhub-weu slot=1 route={r} event=stop result=exit-code code=exited status=255 proxy=10.60.0.6"
        for r in routes]
    grep = [line for line in lines["ExecStartPre"] + lines["ExecStopPost"] if f"slot=1 route={routes[0]} " in line]
    assert [line.split(" event=")[1].split()[0] for line in grep] == ["start", "stop"]


def test_the_unit_forwards_its_runtime_socket_to_the_proxy_health_port_only(tmp_path):
    deb = built(tmp_path)
    unit = deb_file(deb.path, "/lib/systemd/system/tunnelhub-weu@.service").decode()
    assert "RuntimeDirectory=tunnelhub-weu/slot-%i\n" in unit and "RuntimeDirectoryMode=0750\n" in unit
    assert "-L ${RUNTIME_DIRECTORY}/health.sock:127.0.0.1:8080" in unit
    ssh_config = deb_file(deb.path, "/etc/tunnelhub/weu/ssh_config").decode()
    assert "StreamLocalBindUnlink yes" in ssh_config and "StreamLocalBindMask 0117" in ssh_config
    other = load_hubs(azure_hub(proxies={"health_port": 9443})).hubs[0]
    deb2 = build_deb(other, StackOutputs(source="o", tunnel_endpoints=None, host_public_key=HOST_KEY),
                     tmp_path / "other", source_date_epoch=EPOCH)
    assert "health.sock:127.0.0.1:9443" in deb_file(deb2.path, "/lib/systemd/system/tunnelhub-weu@.service").decode()
