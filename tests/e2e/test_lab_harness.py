"""The lab's own parts, for real: link cuts, the hub layout's routing, database counters.

(The generated artifacts end to end are the scenarios of ``test_tunnel_path.py``.)
"""

from __future__ import annotations

import socket
import time

import pymysql
import pytest
from nslab.client import query_once
from nslab.fixtures import require_lab
from nslab.hub import hub_lab
from nslab.lab import DB_PORT, Lab

pytestmark = pytest.mark.e2e


def test_silent_cut_drops_both_ways_without_any_error_and_restores(lab: Lab) -> None:
    topo = lab.topology
    with topo.in_ns("proxy1"):
        server = socket.create_server((topo.ip("proxy1", "onprem"), 5000))
    with topo.in_ns("onprem"):
        client = socket.create_connection((topo.ip("proxy1", "onprem"), 5000), timeout=3)
    peer, _ = server.accept()
    try:
        client.sendall(b"before")
        assert peer.recv(16) == b"before"
        topo.cut("onprem", "proxy1")
        client.sendall(b"during")  # no error: the segment leaves and is dropped on arrival
        peer.settimeout(1.5)
        with pytest.raises(TimeoutError):
            peer.recv(16)
        peer.sendall(b"reverse")
        client.settimeout(1.5)
        with pytest.raises(TimeoutError):
            client.recv(16)
        with topo.in_ns("onprem"), pytest.raises(TimeoutError):
            socket.create_connection((topo.ip("proxy1", "onprem"), 5000), timeout=1.5)
        assert topo.dropped_packets("proxy1", "onprem") > 0
        assert topo.dropped_packets("onprem", "proxy1") > 0
        # The other links are untouched.
        with topo.in_ns("proxy2"):
            other = socket.create_server((topo.ip("proxy2", "onprem"), 5000))
        with topo.in_ns("onprem"):
            socket.create_connection((topo.ip("proxy2", "onprem"), 5000), timeout=3).close()
        other.close()
        topo.restore("onprem", "proxy1")
        # TCP retransmits what was dropped: both directions arrive after the restore.
        peer.settimeout(10)
        client.settimeout(10)
        assert peer.recv(16) == b"during"
        assert client.recv(16) == b"reverse"
    finally:
        for sock in (client, peer, server):
            sock.close()


def test_database_counters_see_probes_but_not_clean_logins(lab: Lab) -> None:
    db = lab.start_db()
    topo = lab.topology
    before_aborted = db.aborted_connects()
    before_warnings = len(db.aborted_connection_warnings())
    probes = 5
    with topo.in_ns("onprem"):
        for _ in range(probes):  # the reference probe: connect, close without a word
            with socket.create_connection((lab.db_host, DB_PORT), timeout=3) as sock:
                sock.recv(1)
    with topo.in_ns("onprem"):  # the check user: password-less, from the tunnel host only
        conn = pymysql.connect(host=lab.db_host, port=DB_PORT, user=db.check_user, password="",
                               connect_timeout=3, ssl_disabled=True)
    conn.close()  # COM_QUIT: a clean session end
    time.sleep(0.5)  # the server logs asynchronously
    cache = {row["IP"]: row for row in db.host_cache()}
    onprem_ip = topo.ip("onprem", "db")
    print(f"\n[db counters] Aborted_connects +{db.aborted_connects() - before_aborted}, "
          f"warnings +{len(db.aborted_connection_warnings()) - before_warnings}, "
          f"host_cache[{onprem_ip}]={cache.get(onprem_ip)}")
    assert db.aborted_connects() - before_aborted == probes
    assert len(db.aborted_connection_warnings()) - before_warnings == probes
    assert int(cache[onprem_ip]["COUNT_HANDSHAKE_ERRORS"]) == probes
    db.stop()
    db.start()
    assert query_once(lab.endpoint_direct("onprem")).ok


def test_hub_layout_routes_through_the_gateway_and_a_cut_is_per_proxy() -> None:
    require_lab()
    with hub_lab() as lab:
        topo = lab.topology
        assert [lab.proxy_address(p) for p in lab.proxy_names] == ["10.60.0.5", "10.60.0.6"]
        route = topo.exec("onprem", ["ip", "route", "get", "10.60.0.5"]).stdout
        assert "via 192.168.10.1" in route and "src 192.168.10.5" in route
        with topo.in_ns("proxy1"):
            server = socket.create_server(("10.60.0.5", 5000))
        with topo.in_ns("proxy2"):
            other = socket.create_server(("10.60.0.6", 5000))
        try:
            with topo.in_ns("onprem"):
                socket.create_connection(("10.60.0.5", 5000), timeout=3).close()
            peer, address = server.accept()
            peer.close()
            assert address[0] == "192.168.10.5", "the proxy sees the tunnel host's own address"
            topo.cut("gw", "proxy1")
            with topo.in_ns("onprem"), pytest.raises(TimeoutError):
                socket.create_connection(("10.60.0.5", 5000), timeout=1.5)
            with topo.in_ns("onprem"):
                socket.create_connection(("10.60.0.6", 5000), timeout=3).close()
            topo.restore("gw", "proxy1")
            with topo.in_ns("onprem"):
                socket.create_connection(("10.60.0.5", 5000), timeout=3).close()
        finally:
            server.close()
            other.close()


def test_hub_layout_with_two_tunnel_hosts_each_on_both_lans_and_a_cut_is_per_host() -> None:
    """``hub_lab(tunnel_hosts=2)``: host B (``onprem2``) reaches the proxies through the gateway
    from ``192.168.10.6`` and the database from ``192.168.20.6``; cutting host A's gateway link
    leaves B's path (and A's database link) up."""
    require_lab()
    with hub_lab(tunnel_hosts=2) as lab:
        topo = lab.topology
        assert lab.tunnel_host_nodes == ["onprem", "onprem2"]
        assert lab.tunnel_host_addresses == ["192.168.20.5", "192.168.20.6"]
        route = topo.exec("onprem2", ["ip", "route", "get", "10.60.0.6"]).stdout
        assert "via 192.168.10.1" in route and "src 192.168.10.6" in route, route
        with topo.in_ns("proxy2"):
            server = socket.create_server(("10.60.0.6", 5000))
        with topo.in_ns("db"):
            db_server = socket.create_server(("192.168.20.15", 5001))
        try:
            topo.cut("onprem", "gw")
            with topo.in_ns("onprem"), pytest.raises(TimeoutError):
                socket.create_connection(("10.60.0.6", 5000), timeout=1.5)
            with topo.in_ns("onprem2"):
                socket.create_connection(("10.60.0.6", 5000), timeout=3).close()
            peer, address = server.accept()
            peer.close()
            assert address[0] == "192.168.10.6", "the proxy sees host B's own address"
            for node, source in (("onprem", "192.168.20.5"), ("onprem2", "192.168.20.6")):
                with topo.in_ns(node):
                    socket.create_connection(("192.168.20.15", 5001), timeout=3).close()
                peer, address = db_server.accept()
                peer.close()
                assert address[0] == source, (node, address)
            topo.restore("onprem", "gw")
            with topo.in_ns("onprem"):
                socket.create_connection(("10.60.0.6", 5000), timeout=3).close()
        finally:
            server.close()
            db_server.close()
