"""The lab's own parts, for real: link cuts, database counters, the generated-artifact path.

The generated-artifact test runs the SAMPLE artifacts (``tests/e2e/samples/``) through the same
functions the real rendered cloud-init and on-prem unit will go through, so the plumbing is
proven before they exist. Bounds are generous for a loaded 2-core machine and stated.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pymysql
import pytest

from nslab import generated
from nslab.client import query_once
from nslab.haproxy import LbRoute
from nslab.health import probe
from nslab.lab import DB_PORT, HEALTH_PORT, Lab
from nslab.samples import SAMPLE_KEY_VM_PATH, SAMPLE_UNIT_VM_PATH, sample_onprem_files, \
    sample_proxy_user_data
from nslab.sshd import run_ssh, ssh_argv

pytestmark = pytest.mark.e2e

INTERVAL_S = 5.0
THRESHOLD = 2
# interval x threshold + 2 s (the target), plus 8 s for a loaded 2-core machine.
DETECTION_BOUND_S = INTERVAL_S * THRESHOLD + 2 + 8


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
    with topo.in_ns("onprem"):
        conn = pymysql.connect(host=lab.db_host, port=DB_PORT, user=db.check_user,
                               password=db.check_password, connect_timeout=3)
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


def _sample_lab(lab: Lab) -> None:
    lab.start_db()
    _, tunnel_pub = lab.key("tunnel_ed25519")
    for proxy in lab.proxy_names:
        vm = lab.extract_proxy(proxy, sample_proxy_user_data(tunnel_pub))
        generated.start_proxy(lab, proxy, vm)
    onprem = lab.install_onprem(sample_onprem_files(lab), modes={SAMPLE_KEY_VM_PATH: 0o600})
    for slot, proxy in enumerate(lab.proxy_names, 1):
        generated.start_tunnel(lab, proxy, onprem, unit_vm_path=SAMPLE_UNIT_VM_PATH,
                               slot=str(slot))
    for proxy in lab.proxy_names:
        lab.wait_tunnel_listener(proxy, timeout_s=30)


def test_sample_artifacts_run_end_to_end_through_the_lb(lab: Lab) -> None:
    """Extracted cloud-init + unit/env file -> sshd, HAProxy, health, autossh -> queries."""
    _sample_lab(lab)
    route = LbRoute("mysql", DB_PORT)
    lb = lab.start_lb([route], check="http", interval_s=INTERVAL_S, threshold=THRESHOLD)
    results = [query_once(lab.endpoint()) for _ in range(10)]
    assert all(r.ok for r in results), [r.error for r in results]
    # The sysctl drop-in applies inside the proxy namespaces only.
    assert lab.topology.exec("proxy1", ["sysctl", "-n", "net.ipv4.tcp_retries2"]
                             ).stdout.strip() == "5"
    # Database down: the sample health check (greeting) fails on every proxy.
    lab.db.stop()
    stopped = time.monotonic()
    down_s = [lb.wait_state("be_mysql", p, "DOWN", timeout_s=60, since=stopped)
              for p in lab.proxy_names]
    statuses = [probe(lab.topology.ns("lb"), lab.topology.ip(p, "lb"), HEALTH_PORT,
                      "/routes/mysql") for p in lab.proxy_names]
    lab.db.start()
    started = time.monotonic()
    up_s = [lb.wait_state("be_mysql", p, "UP", timeout_s=60, since=started)
            for p in lab.proxy_names]
    print(f"\n[samples] db down -> DOWN after {[f'{s:.1f}' for s in down_s]} s; "
          f"health {statuses}; db back -> UP after {[f'{s:.1f}' for s in up_s]} s")
    assert statuses == [503, 503]
    assert max(down_s) <= DETECTION_BOUND_S
    assert query_once(lab.endpoint()).ok


def test_sample_tunnel_key_cannot_run_commands_or_forward_elsewhere(lab: Lab) -> None:
    """Real sshd with the sample drop-in + authorized_keys refuses what the key must not do."""
    _sample_lab(lab)
    key, _ = lab.key("tunnel_ed25519")
    known_hosts = lab.path("onprem", "root", "etc", "tunnelhub", "lab", "known_hosts")
    host = lab.topology.ip("proxy1", "onprem")

    def ssh(*options: str, args: tuple[str, ...] = ()):  # noqa: ANN202
        return run_ssh(ssh_argv(key=key, known_hosts=known_hosts, user="tunnelhub", host=host,
                                options=options, args=args), netns=lab.topology.ns("onprem"))

    command = ssh(args=("id",))
    assert "uid=" not in command.stdout and command.returncode != 0, command
    pty = ssh("-tt", args=("id",))
    assert "uid=" not in pty.stdout, pty
    local = ssh("-W", f"{lab.db_host}:{DB_PORT}")
    assert local.returncode != 0 and "prohibited" in local.stderr, local
    other = ssh("-N", "-o", "ExitOnForwardFailure=yes", "-R", f"localhost:13307:{lab.db_host}:"
                f"{DB_PORT}")
    assert other.returncode != 0 and "forwarding failed" in other.stderr, other


def test_sample_unit_restart_policy_brings_back_a_sigtermed_ssh_child(lab: Lab) -> None:
    """autossh exits 0 when its ssh child gets SIGTERM; only Restart=always (RestartSec=2 in
    the sample unit) brings the tunnel back -- the runner must mimic that."""
    _sample_lab(lab)
    runner = lab.tunnels["proxy1"]
    ssh_pid = runner.find_process("ssh")
    assert ssh_pid is not None, runner.processes()
    starts_before = len(runner.starts())
    killed_at = time.monotonic()
    os.kill(ssh_pid, signal.SIGTERM)
    lab.wait_tunnel_listener("proxy1", present=False, timeout_s=10)
    back_s = lab.wait_tunnel_listener("proxy1", timeout_s=30)
    exit_event = runner.exits()[-1]
    print(f"\n[samples] ssh child SIGTERMed: autossh exited {exit_event.returncode} after "
          f"{exit_event.at - killed_at:.2f} s; tunnel listener back "
          f"{time.monotonic() - killed_at:.2f} s after the kill ({back_s:.2f} s after it went)")
    assert exit_event.returncode == 0
    assert len(runner.starts()) == starts_before + 1
    assert runner.starts()[-1].at - exit_event.at >= 2.0  # RestartSec=2
