"""`tunnelhub status`: the real health daemon on loopback, asked the way an operator asks it.

Each "proxy" is the real tunnelhub_health.HealthDaemon (tunnelhub/userdata/files), bound to its own
127.0.0.x address on one shared port (the spec's proxies.health_port, as on a hub where every proxy
listens on the same port), with an injected check function so each route's result is chosen by the
test; what the CLI reads is the daemon's own ``GET /`` (HealthHandler._answer / HealthDaemon.summary).
The outputs file is what `cdktf output --outputs-file` writes (``{"<stack>": {"<output>": value}}``)
or `terraform output -json` (``{"<output>": {"value", "type", "sensitive"}}``), naming
proxy_private_ips (Azure, tunnelhub/constructs/azure_hub.py) / slot_private_ips (AWS,
tunnelhub/constructs/aws_hub.py). Loopback only.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.helpers import aws_hub, azure_hub, spec_text
from tunnelhub import spec as S
from tunnelhub.cli import main
from tunnelhub.userdata import render_document

FILES = Path(__file__).resolve().parents[2] / "tunnelhub" / "userdata" / "files"
sys.path.insert(0, str(FILES))

import tunnelhub_health as health  # noqa: E402

AZURE_ROUTES = ("orders-mysql", "billing-pg")
AWS_ROUTES = ("inventory-mysql", "aoai")


def shared_port(addresses: list[str]) -> int:
    """A port free on every one of ``addresses`` (the hub's one health port)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = probe.getsockname()[1]
        free = True
        for address in addresses[1:]:
            with socket.socket() as other:
                try:
                    other.bind((address, port))
                except OSError:
                    free = False
                    break
        if free:
            return port
    raise AssertionError("no port free on every test address")


class Proxy:
    """One proxy's health daemon with route results set by the test."""

    def __init__(self, address: str, port: int, results: dict[str, tuple[bool, str]], tmp_path: Path,
                 version: str | None = None, reconciler: dict | None = None):
        self.results = results
        status_file = None
        if reconciler is not None:  # what tunnelhub_reconcile.py's write_status() writes
            status_file = tmp_path / f"reconcile-{address}.json"
            status_file.write_text(json.dumps(reconciler))

        def check(route, resolver):
            healthy, reason = self.results[route.name]
            return health.CheckResult(healthy=healthy, reason=reason, latency_s=0.001, finished_at=time.monotonic())

        routes = [{"name": name, "kind": "tunnel", "host": "127.0.0.1", "port": 9,
                   "probe": {"mode": "connect", "interval_s": 0.2, "timeout_s": 0.5}} for name in results]
        config = health.parse_config({"listen_address": address, "port": port, "routes": routes})
        if version is not None:
            config = dataclasses.replace(config, config_version=version)
        self.daemon = health.HealthDaemon(config, check=check, status_file=status_file and str(status_file),
                                          host_key_status=str(tmp_path / f"no-host-key-{address}.json"))
        self.daemon.start()
        end = time.monotonic() + 5
        while not all(c.result is not None for c in self.daemon.checkers.values()):
            assert time.monotonic() < end, "the daemon's first checks did not finish"
            time.sleep(0.02)

    def stop(self) -> None:
        self.daemon.stop()


class Silent:
    """A health port that accepts (the kernel completes the handshake) and never answers."""

    def __init__(self, address: str, port: int):
        self.sock = socket.socket()
        self.sock.bind((address, port))
        self.sock.listen(16)

    def stop(self) -> None:
        self.sock.close()


class Foreign:
    """Something else on the health port: an HTTP server that answers 404 with HTML."""

    def __init__(self, address: str, port: int):
        class NotFound(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_error(404)

            def log_message(self, *args):
                pass

        self.server = HTTPServer((address, port), NotFound)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def lab(tmp_path):
    """Start daemons on 127.0.0.x; write the spec and outputs pointing at them."""
    started: list[Proxy] = []

    def make(hub: dict, proxies: list[dict[str, tuple[bool, str]] | None], *, terraform_format: bool = False,
             versions: list[str | None] | None = None, silent: list[int] = (),
             reconcilers: list[dict | None] | None = None, foreign: list[int] = ()):
        addresses = [f"127.0.0.{10 + n}" for n in range(len(proxies))]
        port = shared_port(addresses)
        hub = {**hub, "proxies": {"count": len(proxies), "health_port": port}}
        spec = tmp_path / "spec.yaml"
        spec.write_text(spec_text(hub))
        loaded = S.load_spec(spec).hubs[0]
        expected = render_document(loaded).version
        for n, (address, results) in enumerate(zip(addresses, proxies)):
            if n in silent:  # accepts (the kernel completes the handshake) and never answers
                started.append(Silent(address, port))
            elif n in foreign:
                started.append(Foreign(address, port))
            elif results is not None:  # None: nothing listens there (connection refused)
                version = expected if versions is None else versions[n]
                started.append(Proxy(address, port, results, tmp_path, version,
                                     None if reconcilers is None else reconcilers[n]))
        name = "proxy_private_ips" if hub["cloud"] == "azure" else "slot_private_ips"
        stack = f"{hub['name']}-{hub['cloud']}"
        data = ({name: {"value": addresses, "type": ["list", "string"], "sensitive": False}} if terraform_format
                else {stack: {name: addresses, "tunnel_endpoints": addresses}})
        outputs = tmp_path / "outputs.json"
        outputs.write_text(json.dumps(data))
        return str(spec), str(outputs), addresses, expected

    yield make
    for proxy in started:
        proxy.stop()


def run(*args: str):
    return CliRunner().invoke(main, ["status", *args])


def all_up(routes=AZURE_ROUTES) -> dict[str, tuple[bool, str]]:
    return {name: (True, "MySQL login OK as tunnelhub_check (server 10.11.6)") for name in routes}


def no_traceback(result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_all_routes_up_on_every_proxy_exits_0(lab):
    spec, outputs, addresses, expected = lab(azure_hub(), [all_up(), all_up()])
    result = run(spec, "--hub", "weu", "--outputs", outputs)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split() == ["ROUTE", "PROXY", "STATE", "SINCE", "CHECKED", "CONFIG", "REASON"]
    for route in AZURE_ROUTES:
        for slot, address in enumerate(addresses):
            row = next(line for line in lines if line.split()[:3] == [route, str(slot), address])
            assert row.split()[3] == "UP" and expected in row and "MySQL login OK" in row
    assert any(line.split()[:3] == ["orders-mysql", "UP", "2"] for line in lines)
    assert "2 of 2 route(s) up on every proxy, 0 degraded, 0 down; 2 of 2 proxies answered" in result.output
    assert "note:" not in result.output and "did not answer" not in result.output


def test_one_route_down_on_one_proxy_is_degraded_with_the_proxys_reason_and_exits_1(lab):
    down = {**all_up(), "billing-pg": (False, "tunnel listener 127.0.0.1:15432 refused the connection")}
    spec, outputs, addresses, _ = lab(azure_hub(), [all_up(), down])
    result = run(spec, "--hub", "weu", "--outputs", outputs)
    assert result.exit_code == 1, result.output
    row = next(line for line in result.output.splitlines() if line.split()[:3] == ["billing-pg", "1", addresses[1]])
    assert row.split()[3] == "DOWN" and "refused the connection" in row
    summary = next(line for line in result.output.splitlines() if line.split()[:2] == ["billing-pg", "DEGRADED"])
    assert "1 of 2 proxies serve it; not on slot 1 (tunnel listener 127.0.0.1:15432 refused" in summary
    assert any(line.split()[:2] == ["orders-mysql", "UP"] for line in result.output.splitlines())

    data = json.loads(run(spec, "--outputs", outputs, "--json").output)
    billing = next(r for r in data["routes"] if r["route"] == "billing-pg")
    assert (billing["state"], billing["serving"], billing["asked"]) == ("degraded", 1, 2)
    assert [c["state"] for c in billing["per_proxy"]] == ["up", "down"]
    assert data["exit_code"] == 1


def test_a_route_down_on_every_proxy_is_down(lab):
    down = {**all_up(), "orders-mysql": (False, "MySQL server refused: Host is blocked")}
    spec, outputs, _, _ = lab(azure_hub(), [down, down])
    data = json.loads(run(spec, "--outputs", outputs, "--json").output)
    assert {r["route"]: r["state"] for r in data["routes"]} == {"orders-mysql": "down", "billing-pg": "up"}


def test_a_proxy_on_another_configuration_is_named_and_its_missing_route_is_not_served(lab):
    spec, outputs, _, expected = lab(azure_hub(), [all_up(), {"orders-mysql": (True, "ok")}],
                                     versions=[None, "0ld0ld0ld0ld"])
    result = run(spec, "--outputs", outputs)
    assert result.exit_code == 1
    assert f"note: slot 1 runs configuration 0ld0ld0ld0ld, the spec renders {expected}" in result.output
    assert "note: slot 0 runs configuration unversioned" in result.output
    data = json.loads(run(spec, "--outputs", outputs, "--json").output)
    billing = next(r for r in data["routes"] if r["route"] == "billing-pg")
    assert billing["per_proxy"][1]["state"] == "missing" and billing["state"] == "degraded"


def test_a_waiting_or_refusing_reconciler_is_named_with_its_reason(lab):
    """The reconciler's status file as GET / carries it (docs/live-config.md "The health endpoint",
    tunnelhub_reconcile.py write_status)."""
    waiting = {"state": "waiting", "detail": "", "pending": {
        "version": "43a6fcb34856", "reason": "route(s) orders-mysql change and are healthy here: waiting for "
                                            "canary slot 0 (10.60.0.5) to apply 43a6fcb34856 (it runs 21604d1162b2)"}}
    spec, outputs, _, _ = lab(azure_hub(), [all_up(), all_up()],
                              reconcilers=[{"state": "applied", "detail": ""}, waiting])
    result = run(spec, "--outputs", outputs)
    assert result.exit_code == 0, result.output
    assert ("note: slot 1 reconciler waiting: route(s) orders-mysql change and are healthy here: waiting for "
            "canary slot 0") in result.output
    assert "slot 0 reconciler" not in result.output
    data = json.loads(run(spec, "--outputs", outputs, "--json").output)
    assert data["proxies"][0]["reconciler"] == {"state": "applied", "detail": None}
    assert data["proxies"][1]["reconciler"]["state"] == "waiting"


def test_something_else_on_the_health_port_is_a_bad_answer(lab):
    spec, outputs, addresses, _ = lab(azure_hub(), [all_up(), all_up()], foreign=[1])
    result = run(spec, "--outputs", outputs)
    assert result.exit_code == 1, result.output
    assert (f"slot 1 ({addresses[1]}:") in result.output
    assert "HTTP 404, but not the tunnelhub health daemon's summary" in result.output


def test_a_closed_health_port_is_refused_and_named_with_the_daemon_to_check(lab):
    spec, outputs, addresses, _ = lab(azure_hub(), [all_up(), None])
    result = run(spec, "--outputs", outputs)
    assert result.exit_code == 1, result.output
    port = json.loads(run(spec, "--outputs", outputs, "--json").output)["health_port"]
    assert (f"slot 1 ({addresses[1]}:{port}): connection refused: the machine answered but nothing listens on "
            f"port {port}") in result.output
    assert "systemctl status tunnelhub-health" in result.output
    row = next(line for line in result.output.splitlines() if line.split()[:2] == ["orders-mysql", "DEGRADED"])
    assert "1 of 2 proxies serve it; unknown on slot 1" in row


def test_a_proxy_that_does_not_answer_in_time_says_where_to_run_from(lab):
    """Azure's NSG (azure_hub.py: allow-health-probe from AzureLoadBalancer, allow-health-from-proxies
    from the proxy subnet, then deny-all-inbound) drops other sources silently: a timeout."""
    spec, outputs, addresses, _ = lab(azure_hub(), [all_up()] * 4, silent=[1, 2, 3])
    started = time.monotonic()
    result = run(spec, "--outputs", outputs, "--timeout-s", "0.5")
    elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert f"slot 1 ({addresses[1]}:" in result.output
    assert "unreachable from this machine (timeout: no answer within 0.5 s)" in result.output
    assert ("admits the health port" in result.output and "only from the load balancer (AzureLoadBalancer) "
            "and the proxy subnet 10.60.0.0/26" in result.output)
    assert "run this from a machine in 10.60.0.0/26" in result.output
    # Asked at once: three silent proxies cost one timeout (0.5 s), not three (1.5 s).
    assert elapsed < 1.2, f"took {elapsed:.2f} s"


def test_no_proxy_reachable_exits_3(lab):
    spec, outputs, _, _ = lab(azure_hub(), [None, None])
    result = run(spec, "--outputs", outputs)
    assert result.exit_code == 3, result.output
    assert "no proxy answered (0 of 2): route health unknown" in result.output
    assert any(line.split()[:2] == ["orders-mysql", "UNKNOWN"] for line in result.output.splitlines())
    data = json.loads(run(spec, "--outputs", outputs, "--json").output)
    assert data["exit_code"] == 3 and {p["error"] for p in data["proxies"]} == {"refused"}


def test_aws_hub_reads_slot_private_ips_from_terraform_output_json(lab):
    """AWS: the proxy security group admits the health port from the NLB group and itself (aws_hub.py
    _proxy_rules: "health", "health-from-peers")."""
    spec, outputs, addresses, _ = lab(aws_hub(), [all_up(AWS_ROUTES), None], terraform_format=True)
    result = run(spec, "--outputs", outputs)
    assert result.exit_code == 1, result.output
    assert any(line.split()[:4] == ["aoai", "0", addresses[0], "UP"] for line in result.output.splitlines())
    refused = run(spec, "--outputs", outputs, "--timeout-s", "0.3")
    assert "connection refused" in refused.output


def test_aws_unreachable_names_the_proxy_security_group(lab):
    spec, outputs, _, _ = lab(aws_hub(), [all_up(AWS_ROUTES)], silent=[0])
    result = run(spec, "--outputs", outputs, "--timeout-s", "0.3")
    assert result.exit_code == 3, result.output
    assert ("the proxy security group tunnelhub-use-proxies admits the health port" in result.output
            and "only from the NLB's security group and from itself" in result.output)


def test_json_schema_is_stable(lab):
    spec, outputs, _, expected = lab(azure_hub(), [all_up(), None])
    result = run(spec, "--outputs", outputs, "--json")
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert set(data) == {"schema", "hub", "cloud", "health_port", "expected_config_version", "exit_code",
                         "summary", "proxies", "routes"}
    assert (data["schema"], data["hub"], data["cloud"], data["expected_config_version"]) == (1, "weu", "azure", expected)
    assert set(data["proxies"][0]) == {"slot", "address", "reachable", "error", "detail", "http_status",
                                       "config_version", "uptime_s", "reconciler"}
    assert data["proxies"][0]["http_status"] == 200 and data["proxies"][1]["error"] == "refused"
    route = data["routes"][0]
    assert set(route) == {"route", "in_spec", "state", "serving", "asked", "proxies", "per_proxy"}
    assert set(route["per_proxy"][0]) == {"slot", "address", "state", "reason", "warning", "since_s", "age_s",
                                          "config_version"}
    assert route["per_proxy"][0]["age_s"] is not None and route["per_proxy"][0]["since_s"] >= 0  # the daemon reports it


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "is not valid JSON (line 1"),
    (json.dumps({"other-azure": {"proxy_private_ips": ["10.0.0.5"]}}), "has no stack 'weu-azure' (it has: other-azure)"),
    (json.dumps({"weu-azure": {"tunnel_endpoints": ["10.0.0.5"]}}), "has no proxy_private_ips output"),
    (json.dumps({"weu-azure": {"proxy_private_ips": ["proxy-0"]}}), "proxy_private_ips: 'proxy-0' is not an IP address"),
    (json.dumps({"weu-azure": {"proxy_private_ips": "10.0.0.5"}}), "proxy_private_ips must be a list of IP addresses"),
])
def test_bad_outputs_file_exits_2_naming_the_problem(tmp_path, content, fragment):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(azure_hub()))
    outputs = tmp_path / "outputs.json"
    outputs.write_text(content)
    result = run(str(spec), "--outputs", str(outputs))
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    no_traceback(result)


def test_missing_outputs_file_and_option(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(azure_hub()))
    result = run(str(spec), "--outputs", str(tmp_path / "nope.json"))
    assert result.exit_code == 2 and "does not exist: write it with `cdktf output weu-azure" in result.output
    result = run(str(spec))
    assert result.exit_code == 2 and "Missing option '--outputs'" in result.output


def test_unknown_hub_and_bad_spec_exit_2(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(azure_hub()))
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"weu-azure": {"proxy_private_ips": ["127.0.0.10"]}}))
    result = run(str(spec), "--hub", "nope", "--outputs", str(outputs))
    assert result.exit_code == 2 and "no hub named 'nope'; hubs in this spec: weu" in result.output
    no_traceback(result)
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec_text({**azure_hub(), "colour": "blue"}))
    result = run(str(bad), "--outputs", str(outputs))
    assert result.exit_code == 2 and "hubs[0].colour: unknown key 'colour'" in result.output
    no_traceback(result)


def test_outputs_that_disagree_with_proxies_count_are_asked_with_a_warning(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text({**azure_hub(), "proxies": {"count": 2, "health_port": shared_port(["127.0.0.10"])}}))
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"weu-azure": {"proxy_private_ips": ["127.0.0.10"]}}))
    result = run(str(spec), "--outputs", str(outputs))
    assert result.exit_code == 3, result.output
    assert "lists 1 proxies, the spec has proxies.count 2: asking the 1 deployed" in result.output


def test_several_hubs_need_hub(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(azure_hub(), aws_hub()))
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"weu-azure": {"proxy_private_ips": ["127.0.0.10"]}}))
    result = run(str(spec), "--outputs", str(outputs))
    assert result.exit_code == 2 and "the spec has several hubs (weu, use): choose one with --hub NAME" in result.output
