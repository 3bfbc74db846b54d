"""The blind spots of the reference check, reproduced with a real sshd and ssh -R on loopback.

A throwaway sshd (own port, host key, authorized_keys; started by path, stopped by PID)
and an ``ssh -N -R`` client hold a loopback tunnel port in front of a fake MySQL server,
exactly the proxy-side shape: the health check talks to sshd's listener, not to the DB.

* target down behind the tunnel: sshd still accepts, then closes when the channel open
  fails. The reference check (TCP connect) says OK; the mysql check says 503 and why.
* a tunnel that stops answering (the ssh client frozen with SIGSTOP: its TCP session stays
  up, nothing comes back, like a half-open session): the reference check still connects;
  the mysql check reports it within its timeout.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FILES = HERE.parents[1] / "tunnelhub" / "userdata" / "files"
sys.path[:0] = [str(FILES), str(HERE)]

import tunnelhub_health as health  # noqa: E402
from test_health_fakes import FakeServer, free_port, wait_until  # noqa: E402

SSHD = "/usr/sbin/sshd"


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _reference_check(port: int) -> bool:
    """The reference design's health check: a TCP connect to the tunnel port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.fixture
def tunnel():
    if os.geteuid() != 0 or not os.path.exists(SSHD) or shutil.which("ssh") is None:
        pytest.skip("needs root, openssh-server and openssh-client")
    workdir = Path(tempfile.mkdtemp(prefix="hh-sshd-"))
    processes: list[subprocess.Popen] = []
    try:
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / name)],
                           check=True, timeout=30)
        (workdir / "authorized_keys").write_text((workdir / "client_key.pub").read_text())
        (workdir / "authorized_keys").chmod(0o600)
        ssh_port, tunnel_port = free_port(), free_port()
        config = workdir / "sshd_config"
        config.write_text("\n".join([
            f"Port {ssh_port}", "ListenAddress 127.0.0.1", f"HostKey {workdir / 'host_key'}",
            f"PidFile {workdir / 'sshd.pid'}", f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "AllowTcpForwarding remote", "GatewayPorts no",
            f"PermitListen 127.0.0.1:{tunnel_port}", "LogLevel ERROR", "",
        ]))
        sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        processes.append(sshd)
        wait_until(lambda: _reference_check(ssh_port) or sshd.poll() is not None, 15, "sshd to listen")
        assert sshd.poll() is None, sshd.stderr.read().decode()

        def open_tunnel(target_port: int) -> subprocess.Popen:
            client = subprocess.Popen(
                ["ssh", "-N", "-i", str(workdir / "client_key"), "-p", str(ssh_port),
                 "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                 "-R", f"127.0.0.1:{tunnel_port}:127.0.0.1:{target_port}", "root@127.0.0.1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            processes.append(client)
            wait_until(lambda: _reference_check(tunnel_port) or client.poll() is not None, 15, "the ssh -R listener")
            assert client.poll() is None, "ssh -R exited"
            return client

        yield tunnel_port, open_tunnel
    finally:
        for process in reversed(processes):
            _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


def _mysql_route(port: int) -> health.Route:
    raw = {"name": "orders", "kind": "tunnel", "host": "127.0.0.1", "port": port,
           "probe": {"mode": "mysql", "interval_s": 1.0, "timeout_s": 1.0}}
    return health.parse_config({"port": 8080, "routes": [raw]}).routes[0]


def test_through_a_real_tunnel_the_check_sees_what_the_reference_check_misses(tunnel):
    tunnel_port, open_tunnel = tunnel
    route = _mysql_route(tunnel_port)
    with FakeServer("mysql") as database:
        client = open_tunnel(database.port)

        # GIVEN a working tunnel to a working database
        healthy = health.run_check(route)
        wait_until(lambda: "quit" in database.events, 5, "COM_QUIT through the tunnel")
        assert healthy.healthy and healthy.reason.startswith("MySQL login OK"), healthy.reason

        # WHEN the database behind the tunnel stops
        database.stop()
        target_down = health.run_check(route)
        # THEN sshd still accepts (the reference check passes) but the check says why not
        assert _reference_check(tunnel_port) is True
        assert not target_down.healthy
        assert target_down.reason == "closed before greeting: target down behind the tunnel?"

    with FakeServer("mysql") as database:
        client.send_signal(signal.SIGCONT)
        _stop(client)
        client = open_tunnel(database.port)
        assert health.run_check(route).healthy

        # WHEN the tunnel stops answering (client frozen, TCP session still up)
        client.send_signal(signal.SIGSTOP)
        try:
            silent = health.run_check(route)
            reference = _reference_check(tunnel_port)
        finally:
            client.send_signal(signal.SIGCONT)
    # THEN the reference check still connects, the check fails within its 1 s timeout
    assert reference is True
    assert not silent.healthy and silent.reason == "no greeting within 1.0 s: tunnel half-open?"
    assert silent.latency_s < 2.0  # timeout_s 1.0 plus generous slack
