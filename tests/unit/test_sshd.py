"""The generated sshd drop-in and tunnel keys, with real OpenSSH.

``sshd -t`` / ``sshd -T`` on Debian's own sshd_config with the drop-in in its include directory
(the proxy's layout: the drop-in is read first and its values win; its ``Match`` block includes
the tunnel user's forwarding rules from the hub configuration document), then a throwaway sshd on a
loopback port with a real tunnel user (``udtunnel``, created and removed here) and real ``ssh``
clients: the allowed ``-R localhost:P:...`` carries traffic, and so does ``-L`` to the proxy's health
endpoint, ``127.0.0.1:<health_port>`` exactly (the on-prem status command reads route health
through its tunnel); another port, ``-R 127.0.0.1:P``, a command, a PTY, any other ``-L`` (another
port, ``localhost:<health_port>``, another address) and a connection from outside
``onprem.source_cidrs`` are refused. With two tunnel hosts, each host's key ``-R``s its own ports and
is refused the other's (while the other holds them), and logs in only from its own source range.

The rules, from OpenSSH's manuals (9.2, Debian 12): sshd(8), AUTHORIZED_KEYS FILE FORMAT:
``permitopen="host:port"`` "Limit local port forwarding with ssh(1) -L such that it may only
connect to the specified host and port. ... No pattern matching or name lookup is performed on
the specified hostnames, they must be literal host names and/or addresses"; ``restrict`` "Enable
all restrictions", ``port-forwarding`` "Enable port forwarding previously disabled by the
restrict option". sshd_config(5): ``AllowTcpForwarding`` yes/all, local, remote, no; ``PermitOpen``
"Specifies the destinations to which TCP port forwarding is permitted ... no pattern matching or
address lookups are performed on supplied names". Both lists must permit a destination.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import aws_hub, load_hubs
from tunnelhub.userdata import document as D
from tunnelhub.userdata import layout as L
from tunnelhub.userdata import render as R

SSHD = "/usr/sbin/sshd"
DEBIAN_SSHD_CONFIG = Path("/etc/ssh/sshd_config")
TUNNEL_USER = "udtunnel"

pytestmark = pytest.mark.skipif(not (os.path.exists(SSHD) and shutil.which("ssh") and os.geteuid() == 0),
                                reason="needs root, OpenSSH server and client")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def render_hub(tunnel_ports: list[int], client_key: str, source_cidrs: list[str], health_port: int):
    routes = [{"name": f"db{i}", "kind": "tunnel", "port": 3306 + i, "target": f"db{i}.corp.example:3306",
               "tunnel_port": port, "type": "mysql"} for i, port in enumerate(tunnel_ports)]
    return load_hubs(aws_hub(routes=routes, proxies={"health_port": health_port},
                             onprem={"source_cidrs": source_cidrs, "tunnel_user": TUNNEL_USER,
                                     "tunnel_public_keys": [client_key]})).hubs[0]


@dataclass
class SshdSetup:
    workdir: Path
    config: Path
    dropin: Path
    authorized_keys: Path
    forwarding: Path
    client_key: Path
    client_public: str
    tunnel_ports: list[int]
    health_port: int

    def write_keys(self, source_cidrs: list[str]) -> None:
        hub = render_hub(self.tunnel_ports, self.client_public, source_cidrs, self.health_port)
        self.authorized_keys.write_text(D.tunnel_authorized_keys(hub))


@pytest.fixture
def tunnel_user():
    """A real system account like the one cloud-init creates (system, nologin, no home)."""
    created = False
    try:
        pwd.getpwnam(TUNNEL_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--shell", "/usr/sbin/nologin", "--no-create-home",
                        "--home-dir", "/nonexistent", TUNNEL_USER], check=True, timeout=30)
        created = True
    try:
        yield TUNNEL_USER
    finally:
        if created:
            subprocess.run(["userdel", TUNNEL_USER], check=False, timeout=30)


@pytest.fixture
def setup(tunnel_user):
    # Not under /tmp: sshd's StrictModes refuses key files below a world-writable directory.
    workdir = Path(tempfile.mkdtemp(prefix="udsshd-", dir="/run"))
    workdir.chmod(0o755)  # sshd reads the key file as the tunnel user
    try:
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / name)], check=True)
        client_public = (workdir / "client_key.pub").read_text().strip()
        tunnel_ports = [free_port(), free_port()]
        health_port = free_port()
        hub = render_hub(tunnel_ports, client_public, ["127.0.0.0/8"], health_port)
        (workdir / "sshd_config.d").mkdir()
        authorized_keys = workdir / "authorized_keys"
        forwarding = workdir / "tunnel-forwarding.conf"  # outside sshd_config.d, as on the proxy
        dropin = workdir / "sshd_config.d" / "10-tunnelhub.conf"
        dropin.write_text(R.sshd_dropin(hub).replace(R.tunnel_authorized_keys_path(hub), str(authorized_keys))
                          .replace(L.SSHD_TUNNEL_FORWARDING_PATH, str(forwarding)))
        authorized_keys.write_text(D.tunnel_authorized_keys(hub))
        authorized_keys.chmod(0o644)
        forwarding.write_text(D.sshd_tunnel_forwarding(hub))
        # Debian's own sshd_config, its include pointed at our directory (as on the proxy).
        main = DEBIAN_SSHD_CONFIG.read_text() if DEBIAN_SSHD_CONFIG.exists() else (
            "Include /etc/ssh/sshd_config.d/*.conf\nUsePAM yes\nX11Forwarding yes\n")
        assert "Include /etc/ssh/sshd_config.d/*.conf" in main
        main = main.replace("Include /etc/ssh/sshd_config.d/*.conf", f"Include {workdir}/sshd_config.d/*.conf")
        config = workdir / "sshd_config"
        config.write_text(main + f"\nHostKey {workdir / 'host_key'}\nPidFile {workdir / 'sshd.pid'}\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
        yield SshdSetup(workdir, config, dropin, authorized_keys, forwarding, workdir / "client_key",
                        client_public, tunnel_ports, health_port)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def effective(config: Path, user: str) -> dict[str, str]:
    done = subprocess.run([SSHD, "-T", "-f", str(config), "-C", f"user={user},host=onprem,addr=127.0.0.1"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    values: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        values[key] = f"{values[key]} {value}" if key in values else value
    return values


# ---------------------------------------------------------------------------------- sshd -t / -T


def test_sshd_accepts_the_dropin_in_debians_config(setup):
    done = subprocess.run([SSHD, "-t", "-f", str(setup.config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_sshd_check_can_fail(setup):
    """Negative control: the same check rejects the key option the reference got wrong."""
    setup.dropin.write_text(setup.dropin.read_text() + "    PermitOpen bogus:port:x\n")
    assert subprocess.run([SSHD, "-t", "-f", str(setup.config)], capture_output=True, timeout=30).returncode != 0


def test_effective_settings_for_the_tunnel_user(setup):
    got = effective(setup.config, TUNNEL_USER)
    assert got["allowtcpforwarding"] == "yes"
    assert got["permitlisten"] == " ".join(f"localhost:{p}" for p in setup.tunnel_ports)
    assert got["permitopen"] == f"127.0.0.1:{setup.health_port}"
    assert got["permittty"] == "no"
    assert got["forcecommand"] == "/usr/sbin/nologin"
    assert got["gatewayports"] == "no"
    assert got["authorizedkeysfile"] == str(setup.authorized_keys)
    for key in ("x11forwarding", "allowagentforwarding", "permittunnel", "permituserrc", "passwordauthentication"):
        assert got[key] == "no", key
    assert got["allowstreamlocalforwarding"] == "no"
    assert (got["clientaliveinterval"], got["clientalivecountmax"]) == ("10", "3")


def test_the_included_forwarding_rules_win_inside_the_match_block(setup):
    """The live part (the document's forwarding rules) is included at the top of the Match block,
    so its values win over the block's own fallbacks; rewriting it changes what the tunnel user
    may listen on (sshd reads it again on reload)."""
    assert "    Include " + str(setup.forwarding) in setup.dropin.read_text()
    assert "    AllowTcpForwarding no\n    PermitListen none\n" in setup.dropin.read_text()  # the fallbacks
    setup.forwarding.write_text("AllowTcpForwarding remote\nPermitListen localhost:40001\n")
    got = effective(setup.config, TUNNEL_USER)
    assert (got["allowtcpforwarding"], got["permitlisten"]) == ("remote", "localhost:40001")


def test_without_the_forwarding_rules_the_tunnel_user_forwards_nothing(setup):
    """Fail closed: before the reconciler's first apply the included file does not exist, and sshd
    starts with the block's fallbacks (no forwarding at all), not with sshd's defaults."""
    setup.forwarding.unlink()
    done = subprocess.run([SSHD, "-t", "-f", str(setup.config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    got = effective(setup.config, TUNNEL_USER)
    assert (got["allowtcpforwarding"], got["permitlisten"], got["permitopen"]) == ("no", "none", "none")


def test_effective_settings_for_the_admin_win_over_debians_defaults(setup):
    got = effective(setup.config, "tunnelhub")
    assert "X11Forwarding yes" in setup.config.read_text()  # Debian's default, after the include
    assert got["x11forwarding"] == "no"  # the drop-in is read first and the first value wins
    assert got["permitrootlogin"] == "no"
    assert got["passwordauthentication"] == "no" and got["kbdinteractiveauthentication"] == "no"
    assert got["authenticationmethods"] == "publickey"
    assert got["allowtcpforwarding"] == "no" and got["permitlisten"] == "any"
    assert got["permittty"] == "yes" and got["forcecommand"] == "none"
    assert got["allowusers"].split() == ["tunnelhub", TUNNEL_USER]


# ---------------------------------------------------------------------------------- a real sshd


class Banner:
    """A loopback server that writes a line to every connection (the 'database' behind the tunnel,
    or, on the health port, the proxy's health endpoint)."""

    def __init__(self, port: int = 0, line: bytes = b"hello from the database\n") -> None:
        self.line = line
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(self.line)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def read_line(port: int, timeout_s: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
        return conn.recv(100)


def wait_listening(port: int, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture
def running(setup):
    port = free_port()
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(setup.config), "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    banner = Banner()
    try:
        assert wait_listening(port, 10), "sshd did not start"
        yield setup, port, banner, sshd
    finally:
        banner.close()
        stop(sshd)


def ssh(setup: SshdSetup, port: int, *options: str, command: tuple[str, ...] = ()) -> list[str]:
    return ["ssh", "-i", str(setup.client_key), "-p", str(port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ExitOnForwardFailure=yes", "-o", "ConnectTimeout=5", *options, f"{TUNNEL_USER}@127.0.0.1",
            *command]


def run_ssh(setup, port, *options, command: tuple[str, ...] = (), timeout_s: float = 20.0):
    return subprocess.run(ssh(setup, port, *options, command=command), capture_output=True, text=True,
                          timeout=timeout_s)


def refused_local_forward(host: str, port: str, log: str) -> bool:
    """sshd's log line for a ``-L`` its permitopen / PermitOpen lists refuse (OpenSSH channels.c,
    ``channel_connect_to_port``: "Received request from ... to connect to host H port P, but the
    request was denied."); with ``AllowTcpForwarding remote`` it was serverloop.c's "refused local
    port forward"."""
    return bool(re.search(rf"(to connect to host {re.escape(host)} port {port}, but the request was denied"
                          rf"|refused local port forward: .* target {re.escape(host)} port {port})", log))


def test_the_allowed_forwards_carry_traffic(running):
    setup, port, banner, _ = running
    for listen in (f"localhost:{setup.tunnel_ports[0]}", str(setup.tunnel_ports[1])):  # -R localhost:P and -R P
        target = int(listen.rsplit(":", 1)[-1])
        client = subprocess.Popen(ssh(setup, port, "-N", "-R", f"{listen}:127.0.0.1:{banner.port}"),
                                  stderr=subprocess.PIPE, text=True)
        try:
            assert wait_listening(target, 15), f"-R {listen} did not come up"
            assert read_line(target) == b"hello from the database\n"
        finally:
            stop(client)


@pytest.mark.parametrize("listen", ["other-port", "127.0.0.1"])
def test_other_remote_forwards_are_refused(running, listen):
    setup, port, banner, _ = running
    spec = f"localhost:{free_port()}" if listen == "other-port" else f"127.0.0.1:{setup.tunnel_ports[0]}"
    done = run_ssh(setup, port, "-N", "-R", f"{spec}:127.0.0.1:{banner.port}")
    assert done.returncode != 0
    assert "remote port forwarding failed" in done.stderr


def test_a_command_is_refused(running):
    setup, port, _, _ = running
    done = run_ssh(setup, port, command=("id",))
    assert "uid=" not in done.stdout
    assert done.returncode != 0
    assert "This account is currently not available" in done.stdout + done.stderr


def test_a_pty_is_refused(running):
    setup, port, _, _ = running
    done = run_ssh(setup, port, "-tt", command=("true",))
    assert "PTY allocation request failed" in done.stderr


def test_local_forwarding_is_refused(running):
    setup, port, banner, sshd = running
    local = free_port()
    client = subprocess.Popen(ssh(setup, port, "-N", "-L", f"{local}:127.0.0.1:{banner.port}"),
                              stderr=subprocess.PIPE, text=True)
    try:
        assert wait_listening(local, 15)
        assert read_line(local) == b""  # sshd refuses the channel: the connection closes with nothing
    finally:
        stop(client)
    stop(sshd)
    assert refused_local_forward("127.0.0.1", str(banner.port), sshd.stderr.read())


def test_a_key_used_from_outside_the_source_cidrs_is_refused(running):
    setup, port, banner, _ = running
    setup.write_keys(["198.51.100.0/24"])  # sshd reads the file on every login
    done = run_ssh(setup, port, "-N", "-R", f"localhost:{setup.tunnel_ports[0]}:127.0.0.1:{banner.port}")
    assert done.returncode != 0 and "Permission denied" in done.stderr


# ---------------------------------------------------------------------------------- -L to the health endpoint


@pytest.fixture
def health(running):
    """The proxy's health endpoint stand-in on 127.0.0.1:<health_port> (the port in the spec)."""
    setup, port, banner, sshd = running
    endpoint = Banner(setup.health_port, b"HTTP/1.0 200 OK\r\n\r\n{\"healthy\": true}\n")
    try:
        yield setup, port, banner, sshd, endpoint
    finally:
        endpoint.close()


def read_unix(path: Path, timeout_s: float = 5.0) -> bytes:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(timeout_s)
        conn.connect(str(path))
        return conn.recv(100)


def wait_path(path: Path, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and not path.exists():
        time.sleep(0.05)
    return path.exists()


def test_a_local_forward_to_the_health_endpoint_is_allowed_alongside_the_tunnels(health):
    """The on-prem units' session: every ``-R`` plus ``-L <unix socket>:127.0.0.1:<health_port>``
    (a unix socket on the tunnel host, a TCP destination on the proxy: a ``direct-tcpip`` channel,
    governed by ``permitopen`` and ``PermitOpen``, not by ``AllowStreamLocalForwarding``)."""
    setup, port, banner, _, endpoint = health
    sock = setup.workdir / "health.sock"
    client = subprocess.Popen(ssh(setup, port, "-N", "-o", "StreamLocalBindUnlink=yes",
                                  "-R", f"localhost:{setup.tunnel_ports[0]}:127.0.0.1:{banner.port}",
                                  "-L", f"{sock}:127.0.0.1:{setup.health_port}"),
                              stderr=subprocess.PIPE, text=True)
    try:
        assert wait_listening(setup.tunnel_ports[0], 15)
        assert wait_path(sock, 15)
        assert read_unix(sock).startswith(b"HTTP/1.0 200 OK")
        assert read_line(setup.tunnel_ports[0]) == b"hello from the database\n"
    finally:
        stop(client)


@pytest.mark.parametrize("destination", ["localhost:{health}", "127.0.0.1:{other}", "127.0.0.2:{health}",
                                         "169.254.169.254:80"])
def test_every_other_local_forward_is_refused_and_the_session_survives_it(health, destination):
    """Only the literal ``127.0.0.1:<health_port>`` opens: ``localhost`` (no name lookup), another
    port on the loopback (the banner: a route's backend), another loopback address and the cloud
    metadata endpoint are refused by sshd, and the refusal closes that one connection only: the
    session (and its ``-R``) keeps running, ``ExitOnForwardFailure`` notwithstanding (it covers
    the local bind, not a channel the server refuses later)."""
    setup, port, banner, sshd, _ = health
    target = destination.format(health=setup.health_port, other=banner.port)
    local = free_port()
    client = subprocess.Popen(ssh(setup, port, "-N", "-R", f"localhost:{setup.tunnel_ports[0]}:127.0.0.1:{banner.port}",
                                  "-L", f"{local}:{target}"), stderr=subprocess.PIPE, text=True)
    try:
        assert wait_listening(local, 15)
        assert read_line(local) == b""  # sshd refuses the channel: the connection closes with nothing
        time.sleep(0.5)
        assert client.poll() is None, "a refused -L ended the session"
        assert wait_listening(setup.tunnel_ports[0], 15)
        assert read_line(setup.tunnel_ports[0]) == b"hello from the database\n"
    finally:
        stop(client)
    stop(sshd)
    assert refused_local_forward(*target.rsplit(":", 1), sshd.stderr.read())


# ---------------------------------------------------------------------------------- two tunnel hosts


def free_ports_with_offset(count: int) -> tuple[list[int], int]:
    """``count`` free loopback ports and an offset that puts ``count`` more free ports beside
    them (host B's: each of host A's ports plus the offset), as a 2-host hub's plan needs."""
    for _ in range(50):
        base = [free_port() for _ in range(count)]
        for offset in range(1000, 20000, 1000):
            moved = [p + offset for p in base]
            if max(moved) > 65535:
                break
            try:
                for p in moved:
                    with socket.socket() as sock:
                        sock.bind(("127.0.0.1", p))
            except OSError:
                continue
            return base, offset
    raise AssertionError("no free ports for two tunnel hosts")


@dataclass
class TwoHosts:
    config: Path
    authorized_keys: Path
    hosts: dict[str, SshdSetup]
    """Per tunnel host, an :class:`SshdSetup` whose client key is that host's key."""
    ports: dict[str, list[int]]
    """Per tunnel host, its loopback port of each route (the hub's port plan)."""
    source: dict[str, str]
    """Per tunnel host, the loopback address its connections come from (its ``source_cidrs``)."""


@pytest.fixture
def two_hosts(tunnel_user):
    """A 2-host hub (A from 127.0.0.1, B from 127.0.0.2; routes db0, db1), its rendered drop-in,
    forwarding rules and authorized_keys, on Debian's sshd_config."""
    workdir = Path(tempfile.mkdtemp(prefix="udsshd2-", dir="/run"))
    workdir.chmod(0o755)
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "host_key")], check=True)
        keys = {}
        for name in ("a", "b"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"tunnel@host-{name}",
                            "-f", str(workdir / f"key_{name}")], check=True)
            keys[name] = (workdir / f"key_{name}.pub").read_text().strip()
        tunnel_ports, offset = free_ports_with_offset(2)
        health_port = free_port()
        routes = [{"name": f"db{i}", "kind": "tunnel", "port": 3306 + i, "target": f"db{i}.corp.example:3306",
                   "tunnel_port": port, "type": "mysql"} for i, port in enumerate(tunnel_ports)]
        hub = load_hubs(aws_hub(routes=routes, proxies={"health_port": health_port}, onprem={
            "source_cidrs": ["127.0.0.0/8"], "tunnel_user": TUNNEL_USER, "tunnel_hosts": [
                {"name": "host-a", "public_keys": [keys["a"]], "source_cidrs": ["127.0.0.1/32"]},
                {"name": "host-b", "public_keys": [keys["b"]], "source_cidrs": ["127.0.0.2/32"], "port_offset": offset},
            ]})).hubs[0]
        ports = {h.name: [hub.host_tunnel_port(r, h) for r in hub.tunnel_routes] for h in hub.tunnel_hosts}
        assert ports == {"host-a": tunnel_ports, "host-b": [p + offset for p in tunnel_ports]}
        (workdir / "sshd_config.d").mkdir()
        authorized_keys = workdir / "authorized_keys"
        forwarding = workdir / "tunnel-forwarding.conf"
        dropin = workdir / "sshd_config.d" / "10-tunnelhub.conf"
        dropin.write_text(R.sshd_dropin(hub).replace(R.tunnel_authorized_keys_path(hub), str(authorized_keys))
                          .replace(L.SSHD_TUNNEL_FORWARDING_PATH, str(forwarding)))
        authorized_keys.write_text(D.tunnel_authorized_keys(hub))
        authorized_keys.chmod(0o644)
        forwarding.write_text(D.sshd_tunnel_forwarding(hub))
        main = DEBIAN_SSHD_CONFIG.read_text() if DEBIAN_SSHD_CONFIG.exists() else (
            "Include /etc/ssh/sshd_config.d/*.conf\nUsePAM yes\nX11Forwarding yes\n")
        main = main.replace("Include /etc/ssh/sshd_config.d/*.conf", f"Include {workdir}/sshd_config.d/*.conf")
        config = workdir / "sshd_config"
        config.write_text(main + f"\nHostKey {workdir / 'host_key'}\nPidFile {workdir / 'sshd.pid'}\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        hosts = {name: SshdSetup(workdir, config, dropin, authorized_keys, forwarding, workdir / f"key_{name[-1]}",
                                 keys[name[-1]], ports[name], health_port) for name in ("host-a", "host-b")}
        yield TwoHosts(config, authorized_keys, hosts, ports, {"host-a": "127.0.0.1", "host-b": "127.0.0.2"})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def two_running(two_hosts):
    port = free_port()
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(two_hosts.config), "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    banners = {name: Banner(line=f"hello from the database, via {name}\n".encode()) for name in two_hosts.hosts}
    try:
        assert wait_listening(port, 10), "sshd did not start"
        yield two_hosts, port, banners, sshd
    finally:
        for banner in banners.values():
            banner.close()
        stop(sshd)


def host_ssh(two: TwoHosts, host: str, port: int, *options: str, source: str | None = None) -> list[str]:
    """``ssh`` as tunnel host ``host`` (its key), from its own address unless ``source`` says otherwise."""
    return ssh(two.hosts[host], port, "-b", source or two.source[host], *options)


def test_two_hosts_sshd_permits_every_hosts_ports_and_each_key_its_own(two_hosts):
    """The Match block's PermitListen is the union; each key line lists its own host's ports."""
    got = effective(two_hosts.config, TUNNEL_USER)
    union = two_hosts.ports["host-a"] + two_hosts.ports["host-b"]
    assert got["permitlisten"] == " ".join(f"localhost:{p}" for p in union)
    lines = [ln for ln in two_hosts.authorized_keys.read_text().splitlines() if ln and not ln.startswith("#")]
    for line, host in zip(lines, ("host-a", "host-b"), strict=True):
        assert re.findall(r'permitlisten="localhost:(\d+)"', line) == [str(p) for p in two_hosts.ports[host]]
        assert f'from="{two_hosts.source[host]}/32"' in line and line.endswith(two_hosts.hosts[host].client_public)


def test_each_host_forwards_its_own_ports_and_is_refused_the_others(two_running):
    """Host A's key ``-R``s its own ports and is refused host B's, while B holds them, and the
    other way round; sshd logs the refusal with the port. One tunnel host cannot take over (or
    block) another's listener.

    OpenSSH 9.2: sshd(8), AUTHORIZED_KEYS FILE FORMAT, ``permitlisten="[host:]port"``: "Limit
    remote port forwarding with the ssh(1) -R option such that it may only listen on the
    specified host (optional) and port"; sshd_config(5) ``PermitListen``: "Specifies the addresses/
    ports on which a remote TCP port forwarding may listen" (both must permit a listen: the key's
    list narrows the Match block's union of every host's ports). The refusal is channels.c
    ``channel_setup_remote_fwd_listener`` -> ``check_rfwd_permission``: "Received request from
    <addr> port <p> to remote forward to host localhost port <P>, but the request was denied."
    """
    two, port, banners, sshd = two_running
    sessions = {}
    try:
        for host in ("host-a", "host-b"):
            forwards = [x for p in two.ports[host] for x in ("-R", f"localhost:{p}:127.0.0.1:{banners[host].port}")]
            sessions[host] = subprocess.Popen(host_ssh(two, host, port, "-N", *forwards), stderr=subprocess.PIPE,
                                              text=True)
        for host in ("host-a", "host-b"):
            for p in two.ports[host]:
                assert wait_listening(p, 15), f"{host} did not get its port {p}"
                assert read_line(p) == f"hello from the database, via {host}\n".encode()
        for host, other in (("host-a", "host-b"), ("host-b", "host-a")):
            theirs = two.ports[other][0]
            done = subprocess.run(host_ssh(two, host, port, "-N", "-R", f"localhost:{theirs}:127.0.0.1:1"),
                                  capture_output=True, text=True, timeout=20)
            assert done.returncode != 0
            assert f"remote port forwarding failed for listen port {theirs}" in done.stderr
            assert read_line(theirs) == f"hello from the database, via {other}\n".encode(), "the owner still serves it"
            assert sessions[other].poll() is None
    finally:
        for session in sessions.values():
            stop(session)
    stop(sshd)
    log = sshd.stderr.read()
    for host, other in (("host-a", "host-b"), ("host-b", "host-a")):
        assert re.search(rf"Received request from {re.escape(two.source[host])} port \d+ to remote forward to host "
                         rf"localhost port {two.ports[other][0]}, but the request was denied", log), log


def test_a_hosts_key_is_refused_from_another_hosts_address(two_running):
    """``from=`` is the key's own host's source_cidrs: host A's key from host B's address (and the
    other way round) does not log in at all. sshd(8), AUTHORIZED_KEYS FILE FORMAT,
    ``from="pattern-list"``; the refusal is auth2-pubkeyfile.c's "Authentication tried for <user>
    with correct key but not from a permitted host (host=..., ip=..., required=...)"."""
    two, port, banners, sshd = two_running
    for host, other in (("host-a", "host-b"), ("host-b", "host-a")):
        done = subprocess.run(host_ssh(two, host, port, "-N", "-R", f"localhost:{two.ports[host][0]}:127.0.0.1:1",
                                       source=two.source[other]), capture_output=True, text=True, timeout=20)
        assert done.returncode != 0 and "Permission denied" in done.stderr, done.stderr
    stop(sshd)
    log = sshd.stderr.read()
    for host, other in (("host-a", "host-b"), ("host-b", "host-a")):
        assert (f"with correct key but not from a permitted host (host={two.source[other]}, ip={two.source[other]}, "
                f"required={two.source[host]}/32)") in log, log
