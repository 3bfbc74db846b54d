"""The document's HAProxy routes file for tunnel hosts and peers (issue 15), rendered and checked by the
real HAProxy (``haproxy -c``). What the lines do at run time: test_proxy_dataplane.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import SECOND_TUNNEL_KEY, TUNNEL_KEY, aws_hub, azure_hub, load_hubs
from tunnelhub.userdata import document as D
from tunnelhub.userdata import render as R

HOSTS = [{"name": "host-a", "public_keys": [TUNNEL_KEY]}, {"name": "host-b", "public_keys": [SECOND_TUNNEL_KEY]}]


def two_hosts(**overrides):
    return load_hubs(azure_hub(onprem={"source_cidrs": ["192.168.10.0/24"], "tunnel_hosts": HOSTS}, **overrides)).hubs[0]


def blocks(cfg: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = None
    for line in cfg.splitlines():
        if line.startswith("listen "):
            current = out.setdefault(line.split()[1], [])
        elif current is not None and line.startswith("    "):
            current.append(line.strip())
        else:
            current = None
    return out


def test_the_exact_lines_of_a_two_host_two_proxy_route():
    hub = two_hosts()
    listen = blocks(D.haproxy_routes_config(hub))
    send = 'HTTP/1.0\\r\\n\\r\\n"'
    assert listen["orders-mysql"] == [
        "bind 0.0.0.0:3306", "maxconn 1000", "timeout client 30m", "timeout server 30m",
        "timeout connect 1s", "timeout check 2000ms", "balance leastconn", "option allbackups", "retries 3",
        "option redispatch 1",
        "default-server check port 8080 inter 2000ms rise 3 fall 3 agent-check agent-port 8080 agent-inter 2000ms "
        "observe layer4 error-limit 1 on-error mark-down",
        f'server host-a 127.0.0.1:13306 agent-inter 1000ms agent-send "GET /agent/orders-mysql/host-a {send}',
        f'server host-b 127.0.0.1:14306 agent-inter 1000ms agent-send "GET /agent/orders-mysql/host-b {send}',
        f'server peer_0 10.60.0.5:23306 backup agent-send "GET /agent/orders-mysql {send}',
        f'server peer_1 10.60.0.6:23306 backup agent-send "GET /agent/orders-mysql {send}',
    ]
    peer = listen["orders-mysql_peer"]
    assert peer[:7] == ["bind 0.0.0.0:23306", "maxconn 1000", "timeout client 30m", "timeout server 30m",
                        "timeout connect 1s", "timeout check 2000ms",
                        "tcp-request connection reject unless { src 10.60.0.5 10.60.0.6 }"]
    assert peer[-2:] == listen["orders-mysql"][11:13]  # the same tunnel-host servers, no backups
    assert not [ln for ln in peer if "backup" in ln]


def test_the_timing_follows_the_route_probe():
    hub = two_hosts(routes=[{"name": "db", "kind": "tunnel", "port": 3306, "target": "db.corp.example:3306",
                             "probe": {"interval_s": 5, "timeout_s": 3}}])
    db = blocks(D.haproxy_routes_config(hub))["db"]
    assert "timeout check 3000ms" in db
    assert any(ln.startswith("default-server check port 8080 inter 5000ms rise 3 fall 3 ") and "agent-inter 5000ms" in ln
               for ln in db)
    assert all("agent-inter 1000ms" in ln for ln in db if ln.startswith("server host-"))  # min(I, 1 s)
    fast = two_hosts(routes=[{"name": "db", "kind": "tunnel", "port": 3306, "target": "db.corp.example:3306",
                              "probe": {"interval_s": 0.5, "timeout_s": 0.5}}])
    assert all("agent-inter 500ms" in ln for ln in blocks(D.haproxy_routes_config(fast))["db"] if ln.startswith("server host-"))


def test_aws_admits_the_proxy_subnets_on_the_peer_port():
    """On AWS a proxy's connection leaves from its primary (DHCP) address, not the slot's secondary /32:
    the peer listener admits the proxy subnets; the backups still dial the slots' fixed addresses."""
    hub = load_hubs(aws_hub()).hubs[0]
    plan = hub.aws_addresses()
    peer = blocks(D.haproxy_routes_config(hub))["inventory-mysql_peer"]
    assert f"tcp-request connection reject unless {{ src {' '.join(map(str, plan.public_subnets))} }}" in peer
    main = blocks(D.haproxy_routes_config(hub))["inventory-mysql"]
    assert [ln.split()[2] for ln in main if ln.startswith("server peer_")] == [
        f"{ip}:23306" for ip in plan.slot_private_ips]


def test_a_route_named_like_a_peer_listener_cannot_collide():
    """``_`` is in no route or tunnel host name, so ``<route>_peer`` and ``peer_<slot>`` are never taken."""
    hub = two_hosts(routes=[
        {"name": "db", "kind": "tunnel", "port": 3306, "target": "db.corp.example:3306"},
        {"name": "db-peer", "kind": "tunnel", "port": 3307, "target": "db2.corp.example:3306"}])
    assert list(blocks(D.haproxy_routes_config(hub))) == ["db", "db_peer", "db-peer", "db-peer_peer"]


def test_the_global_maxconn_counts_the_peer_listeners():
    hub = two_hosts()
    assert "\nglobal\n    maxconn 4100\n" in D.haproxy_routes_config(hub)  # 2 routes x (1000 + 1000 peer) + 100


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy")
def test_haproxy_accepts_a_large_hub(tmp_path: Path):
    """8 tunnel hosts, 16 proxies, 3 tunnel routes and a forward route: ``haproxy -c`` of both files."""
    keys = []
    for i in range(8):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / f"k{i}")], check=True)
        keys.append((tmp_path / f"k{i}.pub").read_text().strip())
    hub = load_hubs(azure_hub(
        network={"cidr": "10.60.0.0/22", "onprem_path": azure_hub()["network"]["onprem_path"]},
        proxies={"count": 16},
        routes=[*({"name": f"db{i}", "kind": "tunnel", "port": 3306 + i, "target": "db.corp.example:3306",
                   "type": "mysql"} for i in range(3)),
                {"name": "api", "kind": "forward", "port": 8443, "target": "api.example.com:443"}],
        onprem={"source_cidrs": ["192.168.10.0/24"],
                "tunnel_hosts": [{"name": f"host-{i}", "public_keys": [keys[i]]} for i in range(8)]},
    )).hubs[0]
    base, routes = tmp_path / "haproxy.cfg", tmp_path / "routes.cfg"
    base.write_text(R.haproxy_base_config(hub))
    routes.write_text(D.haproxy_routes_config(hub))
    done = subprocess.run(["haproxy", "-c", "-f", str(base), "-f", str(routes)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    listen = blocks(routes.read_text())
    assert sum(ln.startswith("server ") for ln in listen["db0"]) == 8 + 16
    document = D.render_document(hub)
    print(f"large hub (8 hosts, 16 proxies, 3 tunnel routes): routes file {len(routes.read_text())} bytes, "
          f"document {len(document.text)} bytes, {len(document.azure_user_data())} as Azure user data")
    assert len(document.azure_user_data()) <= D.AZURE_USER_DATA_LIMIT_BYTES
