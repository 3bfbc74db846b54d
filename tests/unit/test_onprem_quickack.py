"""onprem.tcp_quickack: the quick-ACK host route helper and how the package wires it in.

GIVEN the helper the package installs as /usr/libexec/tunnelhub-<hub>/quickack-route
WHEN the unit runs it before the tunnel starts (add) and after it stops (remove)
THEN it copies the current route to the proxy into a host route with quickack 1 (tagged proto 84),
skips what it must not touch (policy routing, multipath, someone else's host route, local routes),
never fails the unit, and removes exactly what it added. The decision logic is tested against a
fake ``ip``; the real kernel behaviour in a network namespace (root only).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import azure_hub, load_hubs
from tunnelhub.onprem import build_deb, deb_file, plan_package
from tunnelhub.onprem.outputs import StackOutputs
from tunnelhub.onprem.unitfile import exec_commands, expand, expand_instance, read_env_file, unit_environment

HELPER = Path(__file__).resolve().parents[2] / "tunnelhub" / "onprem" / "files" / "tunnelhub_quickack.py"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOaN3cWyvjBGr4otYDaxEsCyHJdGDD93vvrXcCU/lvrx"
EPOCH = 1_747_700_000


def load_helper():
    spec = importlib.util.spec_from_file_location("tunnelhub_quickack", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


qa = load_helper()


class FakeIp:
    """Stands in for ``run_ip``: answers ``route get fibmatch`` from ``routes`` and records changes."""

    def __init__(self, routes: dict[str, dict], *, add_error: str = ""):
        self.routes = routes
        self.calls: list[list[str]] = []
        self.add_error = add_error
        self.revealed: dict[str, dict] = {}  # the route that matches once ours is deleted

    def __call__(self, args: list[str]) -> subprocess.CompletedProcess:
        self.calls.append(args)
        if args[:5] == ["-j", "-d", "route", "get", "fibmatch"]:
            route = self.routes.get(args[5])
            if route is None:
                return subprocess.CompletedProcess(args, 2, "", "RTNETLINK answers: Network is unreachable")
            return subprocess.CompletedProcess(args, 0, json.dumps([route]), "")
        if args[:2] == ["route", "add"]:
            return subprocess.CompletedProcess(args, 2 if self.add_error else 0, "", self.add_error)
        if args[:2] == ["route", "del"]:
            address = args[2].split("/")[0]
            ours = self.routes.get(address, {}).get("protocol") == "84" and "/" in args[2]
            if ours:
                self.routes.pop(address)
                if address in self.revealed:
                    self.routes[address] = self.revealed.pop(address)
            return subprocess.CompletedProcess(args, 0 if ours else 2, "", "" if ours else "No such process")
        raise AssertionError(f"unexpected ip call {args}")

    def changes(self) -> list[list[str]]:
        return [c for c in self.calls if c[:2] in (["route", "add"], ["route", "del"])]


@pytest.fixture
def fake_ip(monkeypatch):
    def install(routes: dict[str, dict], **kwargs) -> FakeIp:
        fake = FakeIp(routes, **kwargs)
        monkeypatch.setattr(qa, "run_ip", fake)
        return fake
    return install


GATEWAY_ROUTE = {"type": "unicast", "dst": "default", "gateway": "192.168.10.1", "dev": "eth0", "table": "main",
                 "protocol": "dhcp", "scope": "global", "prefsrc": "192.168.10.5", "flags": []}


# --------------------------------------------------------------------------------------------
# The route it builds
# --------------------------------------------------------------------------------------------


def test_a_gateway_route_is_copied_with_quickack_and_our_tag():
    assert qa.route_args("10.60.0.5", GATEWAY_ROUTE) == [
        "route", "add", "10.60.0.5/32", "via", "192.168.10.1", "dev", "eth0", "src", "192.168.10.5",
        "proto", "84", "table", "main", "quickack", "1"]


def test_a_connected_route_keeps_its_link_scope_flags_and_metrics():
    route = {"type": "unicast", "dst": "10.60.0.0/26", "dev": "eth1", "table": "main", "protocol": "kernel",
             "scope": "link", "prefsrc": "10.60.0.9", "flags": ["onlink"], "metrics": [{"mtu": 1400, "quickack": 0}]}
    assert qa.route_args("10.60.0.5", route) == [
        "route", "add", "10.60.0.5/32", "dev", "eth1", "onlink", "scope", "link", "src", "10.60.0.9",
        "mtu", "1400", "proto", "84", "table", "main", "quickack", "1"]


def test_nexthop_objects_and_ipv6_and_ipv4_over_ipv6_nexthops():
    assert qa.route_args("10.60.0.5", {"dst": "default", "nhid": 7, "dev": "eth0"})[:5] == [
        "route", "add", "10.60.0.5/32", "nhid", "7"]
    assert qa.route_args("fd00:60::5", {"dst": "default", "gateway": "fd00::1", "dev": "eth0"})[:7] == [
        "route", "add", "fd00:60::5/128", "via", "fd00::1", "dev", "eth0"]
    assert qa.route_args("10.60.0.5", {"dst": "default", "via": {"family": "inet6", "host": "fe80::1"},
                                       "dev": "eth0"})[:8] == [
        "route", "add", "10.60.0.5/32", "via", "inet6", "fe80::1", "dev", "eth0"]


# --------------------------------------------------------------------------------------------
# What it adds, skips and removes (fake ip)
# --------------------------------------------------------------------------------------------


def test_add_records_the_route_and_remove_deletes_exactly_it(fake_ip, tmp_path, capsys):
    fake = fake_ip({"10.60.0.5": dict(GATEWAY_ROUTE)})
    state = tmp_path / "run" / "quickack-0.json"

    assert qa.main(["add", str(state), "10.60.0.5"]) == 0
    assert fake.changes()[-1][:3] == ["route", "add", "10.60.0.5/32"]
    assert json.loads(state.read_text()) == {"endpoint": "10.60.0.5", "routes": ["10.60.0.5/32"]}
    logged = capsys.readouterr().out
    assert "added 10.60.0.5/32 with quickack 1, copied from default via 192.168.10.1 dev eth0" in logged

    fake.routes["10.60.0.5"] = {**GATEWAY_ROUTE, "dst": "10.60.0.5", "protocol": "84"}
    assert qa.main(["remove", str(state), "10.60.0.5"]) == 0
    assert fake.changes()[-1] == ["route", "del", "10.60.0.5/32", "proto", "84", "table", "main"]
    assert not state.exists()


@pytest.mark.parametrize("route, why", [
    ({**GATEWAY_ROUTE, "table": "100"}, "is in table 100 (policy routing"),
    ({**GATEWAY_ROUTE, "nexthops": [{"gateway": "192.168.10.1"}, {"gateway": "192.168.10.2"}]}, "is multipath"),
    ({**GATEWAY_ROUTE, "dst": "10.60.0.5", "protocol": "static"}, "a host route to 10.60.0.5 already exists"),
    ({**GATEWAY_ROUTE, "type": "local"}, "is of type local"),
    ({**GATEWAY_ROUTE, "type": "blackhole"}, "is of type blackhole"),
])
def test_it_adds_nothing_where_a_host_route_could_change_forwarding(fake_ip, tmp_path, capsys, route, why):
    fake = fake_ip({"10.60.0.5": route})
    state = tmp_path / "quickack-0.json"

    assert qa.main(["add", str(state), "10.60.0.5"]) == 0

    assert [c for c in fake.changes() if c[1] == "add"] == []
    assert why in capsys.readouterr().out
    assert not state.exists()


def test_no_route_no_ip_command_or_a_refused_add_is_logged_and_exits_0(fake_ip, tmp_path, capsys, monkeypatch):
    fake_ip({})
    assert qa.main(["add", str(tmp_path / "s.json"), "10.60.0.5"]) == 0
    assert "no quick-ACK route to 10.60.0.5" in capsys.readouterr().out

    fake_ip({"10.60.0.5": dict(GATEWAY_ROUTE)}, add_error="RTNETLINK answers: Operation not permitted")
    assert qa.main(["add", str(tmp_path / "s.json"), "10.60.0.5"]) == 0
    assert "Operation not permitted" in capsys.readouterr().out

    monkeypatch.undo()  # the real run_ip, but no ip binary anywhere
    monkeypatch.setattr(qa, "IP_CANDIDATES", ())
    monkeypatch.setenv("PATH", str(tmp_path))
    assert qa.main(["add", str(tmp_path / "s.json"), "10.60.0.5"]) == 0
    assert "iproute2's ip command is not installed" in capsys.readouterr().out


def test_our_leftover_host_route_is_replaced_by_a_fresh_copy(fake_ip, tmp_path):
    # a route of ours from a run that did not clean up (no state file), via an old gateway
    fake = fake_ip({"10.60.0.5": {**GATEWAY_ROUTE, "dst": "10.60.0.5", "protocol": "84", "gateway": "192.168.10.99"}})
    fake.revealed["10.60.0.5"] = dict(GATEWAY_ROUTE)  # what matches once it is gone

    assert qa.main(["add", str(tmp_path / "s.json"), "10.60.0.5"]) == 0

    assert [c[:3] for c in fake.changes()] == [["route", "del", "10.60.0.5/32"], ["route", "add", "10.60.0.5/32"]]
    assert fake.changes()[1][3:5] == ["via", "192.168.10.1"], "copied from today's route, not the stale one"


def test_a_host_name_gets_a_route_per_address_and_remove_uses_the_record(fake_ip, tmp_path, monkeypatch):
    fake = fake_ip({"10.60.0.5": dict(GATEWAY_ROUTE), "10.60.0.6": dict(GATEWAY_ROUTE)})
    infos = [(2, 1, 6, "", ("10.60.0.5", 22)), (2, 1, 6, "", ("10.60.0.6", 22)), (2, 1, 6, "", ("10.60.0.5", 22))]
    monkeypatch.setattr(qa.socket, "getaddrinfo", lambda *a, **k: infos)
    state = tmp_path / "s.json"

    qa.main(["add", str(state), "proxy.hub.example"])

    assert json.loads(state.read_text())["routes"] == ["10.60.0.5/32", "10.60.0.6/32"]
    monkeypatch.setattr(qa.socket, "getaddrinfo", lambda *a, **k: [])  # resolves to nothing now
    for address in ("10.60.0.5", "10.60.0.6"):
        fake.routes[address] = {**GATEWAY_ROUTE, "dst": address, "protocol": "84"}
    qa.main(["remove", str(state), "proxy.hub.example"])
    assert [c[2] for c in fake.changes() if c[1] == "del"][-2:] == ["10.60.0.5/32", "10.60.0.6/32"]


def test_an_empty_endpoint_does_nothing(fake_ip, tmp_path, capsys):
    fake = fake_ip({})
    assert qa.main(["add", str(tmp_path / "s.json"), ""]) == 0
    assert fake.calls == [] and "nothing to do" in capsys.readouterr().out


def test_the_helper_is_stdlib_python_3_8_and_lint_clean():
    subprocess.run([sys.executable, "-m", "py_compile", str(HELPER)], check=True)
    imports = [line.split()[1] for line in HELPER.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert set(imports) <= {"__future__", "argparse", "ipaddress", "json", "os", "shutil", "socket", "subprocess",
                            "sys", "tempfile"}
    assert HELPER.read_text().startswith("#!/usr/bin/python3\n")
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if Path(ruff).exists():
        result = subprocess.run([ruff, "check", "--isolated", "--target-version", "py38", "--select", "E,F,W,UP,B",
                                 "--ignore", "UP006,UP007,UP035", "--line-length", "120", str(HELPER)],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout


# --------------------------------------------------------------------------------------------
# The real kernel (root): a namespace with a gateway, a connected subnet and policy routing
# --------------------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 (network namespaces)")


@pytest.fixture
def netns():
    name = f"l2-qa-{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        def ip(*args: str, check: bool = True) -> str:
            return subprocess.run(["ip", "-n", name, *args], check=check, capture_output=True, text=True).stdout
        ip("link", "set", "lo", "up")
        ip("link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
        ip("addr", "add", "192.168.10.5/24", "dev", "lan0")
        ip("addr", "add", "10.60.0.9/26", "dev", "lan1")
        ip("link", "set", "lan0", "up")
        ip("link", "set", "lan1", "up")
        ip("route", "add", "default", "via", "192.168.10.1")
        yield name, ip
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def run_helper(netns: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, str(HELPER), *args],
                          capture_output=True, text=True, check=False, timeout=30)


@needs_root
def test_real_routes_are_added_copied_and_removed(netns, tmp_path):
    name, ip = netns
    state = tmp_path / "run" / "quickack-0.json"
    before = ip("route", "show")

    added = run_helper(name, "add", str(state), "10.60.1.5")  # behind the default gateway
    connected = run_helper(name, "add", str(tmp_path / "q1.json"), "10.60.0.5")  # on a connected subnet

    assert added.returncode == 0 and connected.returncode == 0, added.stdout + connected.stdout
    assert ip("route", "show", "10.60.1.5/32").strip() == \
        "10.60.1.5 via 192.168.10.1 dev lan0 proto 84 quickack 1"
    assert ip("route", "show", "10.60.0.5/32").strip() == \
        "10.60.0.5 dev lan1 proto 84 scope link src 10.60.0.9 quickack 1"
    assert "quickack 1" in ip("route", "get", "10.60.1.5")  # what a socket to the proxy gets
    assert json.loads(state.read_text())["routes"] == ["10.60.1.5/32"]

    again = run_helper(name, "add", str(state), "10.60.1.5")  # a restart of the unit
    assert again.returncode == 0 and ip("route", "show", "10.60.1.5/32").count("quickack") == 1

    for file, endpoint in ((state, "10.60.1.5"), (tmp_path / "q1.json", "10.60.0.5")):
        assert run_helper(name, "remove", str(file), endpoint).returncode == 0
    assert ip("route", "show") == before


@needs_root
def test_real_policy_routing_and_foreign_host_routes_are_left_alone(netns, tmp_path):
    name, ip = netns
    ip("rule", "add", "to", "10.60.2.0/24", "table", "100", "pref", "100")
    ip("route", "add", "10.60.2.0/24", "via", "192.168.10.1", "table", "100")
    ip("route", "add", "10.60.3.7/32", "via", "192.168.10.1")  # an operator's own host route
    before = ip("route", "show", "table", "all")

    policy = run_helper(name, "add", str(tmp_path / "a.json"), "10.60.2.5")
    foreign = run_helper(name, "add", str(tmp_path / "b.json"), "10.60.3.7")
    removed = run_helper(name, "remove", str(tmp_path / "b.json"), "10.60.3.7")

    assert "is in table 100 (policy routing" in policy.stdout
    assert "a host route to 10.60.3.7 already exists" in foreign.stdout
    assert (policy.returncode, foreign.returncode, removed.returncode) == (0, 0, 0)
    assert ip("route", "show", "table", "all") == before, "nothing added, nothing of someone else's removed"


# --------------------------------------------------------------------------------------------
# The package: the switch, the unit lines, the dependencies
# --------------------------------------------------------------------------------------------


def built(tmp_path, **onprem) -> object:
    data = azure_hub()
    data["onprem"] = {**data["onprem"], **onprem}
    hub = load_hubs(data).hubs[0]
    outputs = StackOutputs(source="out.json", tunnel_endpoints=None, host_public_key=HOST_KEY)
    return build_deb(hub, outputs, tmp_path, source_date_epoch=EPOCH)


def test_the_spec_switch_defaults_on_and_off_leaves_no_trace(tmp_path):
    on = built(tmp_path / "on")
    off = built(tmp_path / "off", tcp_quickack=False)
    assert on.plan.tcp_quickack and not off.plan.tcp_quickack
    assert plan_package(load_hubs(azure_hub()).hubs[0], StackOutputs(source="o", host_public_key=HOST_KEY)).tcp_quickack

    helper = "/usr/libexec/tunnelhub-weu/quickack-route"
    assert deb_file(on.path, helper) == HELPER.read_bytes()
    assert next(f for f in on.files if f.path == helper).mode == 0o755
    assert helper not in [f.path for f in off.files]
    depends = {d: subprocess.run(["dpkg-deb", "-f", str(d.path), "Depends"], capture_output=True, text=True,
                                 check=True).stdout.strip() for d in (on, off)}
    # python3 stays for the status command (tunnelhub-<hub>-status)
    assert depends[on].endswith("python3, systemd, iproute2") and depends[off].endswith("python3, systemd")
    unit_off = deb_file(off.path, "/lib/systemd/system/tunnelhub-weu@.service").decode()
    assert "quickack" not in unit_off
    assert all(p == "-" and words[0] == "/bin/echo"  # only the journal lines (slot=, route=) remain
               for key in ("ExecStartPre", "ExecStopPost") for p, words in exec_commands(unit_off, key))


def test_the_unit_adds_the_route_before_the_tunnel_as_root_and_removes_it_after(tmp_path):
    deb = built(tmp_path)
    unit = deb_file(deb.path, "/lib/systemd/system/tunnelhub-weu@.service").decode()
    env = {**unit_environment(unit), **read_env_file(deb_file(deb.path, "/etc/tunnelhub/weu/slot-1.env").decode())}

    # the quick-ACK lines; the others (prefix "-", /bin/echo) are the journal's slot/route lines
    pre = [c for c in exec_commands(unit, "ExecStartPre") if c[0] == "-+"]
    post = [c for c in exec_commands(unit, "ExecStopPost") if c[0] == "-+"]
    assert exec_commands(unit, "ExecStartPre")[0] == pre[0], "the route is added first"

    assert [p for p, _ in pre + post] == ["-+", "-+"], "as root, never failing the unit"
    assert expand(expand_instance(pre[0][1], "1"), env) == [
        "/usr/libexec/tunnelhub-weu/quickack-route", "add", "/run/tunnelhub-weu/quickack-1.json", "10.60.0.6"]
    assert expand(expand_instance(post[0][1], "1"), env) == [
        "/usr/libexec/tunnelhub-weu/quickack-route", "remove", "/run/tunnelhub-weu/quickack-1.json", "10.60.0.6"]
    assert unit.index("ExecStartPre=") < unit.index("ExecStart=")
    assert "ip route show proto 84" in deb_file(deb.path, "/usr/share/doc/tunnelhub-weu/README").decode()
