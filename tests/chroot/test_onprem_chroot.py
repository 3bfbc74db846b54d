"""The on-prem package installed for real: a Debian 12 debootstrap root, dpkg, its maintainer scripts.

GIVEN the example hub weu's package (v1) and a newer one with an extra tunnel route (v2)
WHEN they are installed, upgraded, removed and purged in a clean Debian 12 root
THEN files, modes, owners, the service user, the tunnel key and the unit enablement are right at
every step; with a recording systemctl standing in for systemd, they start, restart and stop the
tunnels as debhelper's conventions say. Another root runs the installed unit's ExecStart against a real sshd in a network
namespace: the tunnel comes up with the key postinst generated and the pinned host key, every
system call and socket family it uses is one the unit's seccomp and address-family filters allow
(traced with strace, since no systemd runs here to enforce them), and a proxy presenting another
host key is refused. And the installed ExecStartPre/ExecStopPost (onprem.tcp_quickack), run with
the root's own python3 and ip in a namespace with a default gateway, add the quick-ACK host route
to the slot's proxy and remove it again.

The root is built once by debootstrap and cached under .cache/chroot (see debian_root.py); no
systemd runs in it, so the maintainer scripts take their no-systemd paths (enable by symlink, no
start), exactly as in a container or an image build.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.chroot.debian_root import Chroot, ensure_cached_root, extract
from tests.conftest import EXAMPLE_SPEC
from tests.helpers import aws_hub, load_hubs
from tunnelhub.onprem import build_deb, parse_outputs, read_outputs
from tunnelhub.onprem.unitfile import (
    exec_commands,
    exec_start_words,
    expand,
    expand_instance,
    read_env_file,
    unit_environment,
)
from tunnelhub.spec import load_spec

pytestmark = [
    pytest.mark.chroot,
    pytest.mark.skipif(os.geteuid() != 0, reason="installs packages in a chroot: needs root"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="needs debootstrap (make test installs it)"),
]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_OUTPUTS = ROOT / "examples" / "outputs.json"
PKG = "tunnelhub-weu"
HOST = "ams-tunnel-01"
"""The example hub weu has two tunnel hosts; these tests install the first one's package."""
STATE = f"/var/lib/{PKG}"
ETC = "/etc/tunnelhub/weu"
WANTS_LINK = f"/etc/systemd/system/multi-user.target.wants/{PKG}.target"
V1_EPOCH = 1_747_700_000
V2_EPOCH = V1_EPOCH + 3600


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached_root():
    cached = ensure_cached_root()
    print(f"\ncached Debian 12 root: {cached.tarball.name}, {cached.size_bytes / 2**20:.1f} MiB, "
          f"built in {cached.build_seconds} s{' (just now)' if cached.built_now else ''}")
    return cached


@pytest.fixture(scope="module")
def chroot(cached_root):
    with extracted_root(cached_root) as root:
        yield root


@contextlib.contextmanager
def extracted_root(cached_root):
    """A fresh root from the cached tarball, deleted afterwards (it is ~200 MB unpacked)."""
    path = Path(tempfile.mkdtemp(prefix="op-root-"))
    try:
        yield Chroot(extract(cached_root.tarball, path))
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> dict[str, object]:
    """v1: the example hub weu's first tunnel host. v2: the same an hour later with a third tunnel route."""
    out = tmp_path_factory.mktemp("debs")
    spec = load_spec(EXAMPLE_SPEC)
    weu = spec.hub("weu")
    outputs = read_outputs(EXAMPLE_OUTPUTS, weu.stack_name)
    v1 = build_deb(weu, outputs, out / "v1", tunnel_host=HOST, source_date_epoch=V1_EPOCH)
    data = json.loads(json.dumps(_spec_dict(weu)))
    data["routes"].append({"name": "audit-pg", "kind": "tunnel", "port": 5433, "target": "audit-db.corp.example:5432"})
    weu2 = load_hubs(data).hubs[0]
    v2 = build_deb(weu2, outputs, out / "v2", tunnel_host=HOST, source_date_epoch=V2_EPOCH)
    tofu = build_deb(weu, None, out / "tofu", tunnel_host=HOST, trust_on_first_use=True, source_date_epoch=V1_EPOCH)
    return {"v1": v1, "v2": v2, "tofu": tofu}


def _spec_dict(hub) -> dict:
    """A hub as spec YAML data (the resolved defaults dropped, so the spec derives them again)."""
    data = hub.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    for route in data["routes"]:
        route.pop("tunnel_port", None)
        route.pop("domain", None)
    data.pop("domain_suffix", None)
    return copy.deepcopy(data)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def dpkg(chroot: Chroot, *args: str) -> subprocess.CompletedProcess:
    return chroot.run("dpkg", "--force-confdef", "--force-confold", *args)


def status(chroot: Chroot) -> str:
    r = chroot.run("dpkg-query", "-W", "-f", "${Status} ${Version}", PKG, check=False)
    return r.stdout.strip() if r.returncode == 0 else "not-installed"


def passwd_entry(chroot: Chroot, user: str) -> list[str] | None:
    r = chroot.run("getent", "passwd", user, check=False)
    return r.stdout.strip().split(":") if r.returncode == 0 else None


def mode_owner(chroot: Chroot, inside: str) -> tuple[int, int, int]:
    st = os.lstat(chroot.path(inside))
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def install(chroot: Chroot, deb) -> subprocess.CompletedProcess:
    inside = chroot.install_file(deb.path, f"/tmp/{deb.path.name}")
    return dpkg(chroot, "-i", inside)


def assert_package_files(chroot: Chroot, deb) -> None:
    """Every file of the .deb is installed, root-owned, with its mode and content."""
    for f in deb.files:
        assert mode_owner(chroot, f.path) == (f.mode, 0, 0), f.path
        assert chroot.path(f.path).read_bytes() == f.data, f.path


def assert_key(chroot: Chroot, uid: int, gid: int) -> bytes:
    """The tunnel key: private 0600 and public 0644, both owned by the service user; returns it."""
    assert mode_owner(chroot, STATE) == (0o755, uid, gid)
    assert mode_owner(chroot, f"{STATE}/id_ed25519") == (0o600, uid, gid)
    assert mode_owner(chroot, f"{STATE}/id_ed25519.pub") == (0o644, uid, gid)
    listing = chroot.run("ssh-keygen", "-l", "-f", f"{STATE}/id_ed25519").stdout
    assert listing.startswith("256 SHA256:") and listing.rstrip().endswith("(ED25519)")
    return chroot.path(f"{STATE}/id_ed25519").read_bytes()


def service_user(chroot: Chroot) -> tuple[int, int]:
    entry = passwd_entry(chroot, PKG)
    assert entry is not None, "the service user is missing"
    _name, _, uid, gid, _, home, shell = entry
    assert (home, shell) == (STATE, "/usr/sbin/nologin")
    assert 0 < int(uid) < 1000, "a system user"
    assert chroot.run("getent", "group", PKG).stdout.split(":")[2] == gid
    return int(uid), int(gid)


# --------------------------------------------------------------------------------------------
# Install, upgrade, remove, purge (in order, on one root)
# --------------------------------------------------------------------------------------------


def test_install(chroot, debs):
    v1 = debs["v1"]
    assert passwd_entry(chroot, PKG) is None

    result = install(chroot, v1)

    assert status(chroot) == f"install ok installed {v1.version}"
    uid, gid = service_user(chroot)
    assert_package_files(chroot, v1)
    assert_key(chroot, uid, gid)
    pub = chroot.path(f"{STATE}/id_ed25519.pub").read_text().strip()
    assert pub in result.stdout and "onprem.tunnel_hosts[0].public_keys (the host named ams-tunnel-01)" in result.stdout, \
        "postinst prints the key and its field"
    # Enabled the way deb-systemd-helper does it without systemd running.
    link = chroot.path(WANTS_LINK)
    assert link.is_symlink() and os.readlink(link) == f"/lib/systemd/system/{PKG}.target"
    # The pubkey command prints the key again, to any user.
    r = chroot.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", f"{PKG}-pubkey")
    assert r.stdout.strip() == pub and "onprem.tunnel_hosts[0].public_keys (tunnel host ams-tunnel-01)" in r.stderr
    # systemd accepts the installed units (and their documentation resolves) in this root.
    verify = subprocess.run(
        ["systemd-analyze", "verify", f"--root={chroot.root}", f"{PKG}.target", f"{PKG}@0.service", f"{PKG}@1.service"],
        check=False, capture_output=True, text=True, env={**os.environ, "MANPATH": str(chroot.path("/usr/share/man"))},
    )
    assert verify.returncode == 0 and PKG not in verify.stderr, verify.stderr
    # ssh in the root reads the shipped options file.
    g = chroot.run("ssh", "-G", "-F", f"{ETC}/ssh_config", "10.60.0.5").stdout
    assert "user tunnel" in g and "hostkeyalias tunnelhub-weu" in g and "stricthostkeychecking true" in g


def test_upgrade_keeps_the_key_and_adds_the_route(chroot, debs):
    v1, v2 = debs["v1"], debs["v2"]
    assert chroot.run("dpkg", "--compare-versions", v2.version, "gt", v1.version, check=False).returncode == 0
    uid, gid = service_user(chroot)
    key_before = assert_key(chroot, uid, gid)
    ssh_config = chroot.path(f"{ETC}/ssh_config")
    ssh_config.write_text(ssh_config.read_text() + "    # a local change\n")

    install(chroot, v2)

    assert status(chroot) == f"install ok installed {v2.version}"
    assert service_user(chroot) == (uid, gid)
    assert assert_key(chroot, uid, gid) == key_before, "the tunnel key survives the upgrade"
    unit = chroot.path(f"/lib/systemd/system/{PKG}@.service").read_text()
    assert "-R localhost:15433:audit-db.corp.example:5432" in unit
    assert "-R localhost:13306:orders-db.corp.example:3306" in unit
    assert ssh_config.read_text().endswith("    # a local change\n"), "a locally changed conffile is kept"
    assert chroot.path(WANTS_LINK).is_symlink()
    for f in v2.files:
        if f.path != f"{ETC}/ssh_config":
            assert chroot.path(f.path).read_bytes() == f.data, f.path


def test_remove_keeps_configuration_and_key(chroot, debs):
    v2 = debs["v2"]
    uid, gid = service_user(chroot)
    key = chroot.path(f"{STATE}/id_ed25519").read_bytes()

    dpkg(chroot, "--remove", PKG)

    assert status(chroot) == f"deinstall ok config-files {v2.version}"
    for f in v2.files:
        assert chroot.path(f.path).exists() == f.conffile, f.path
    assert sorted(p.name for p in chroot.path(ETC).iterdir()) == ["known_hosts", "slot-0.env", "slot-1.env", "ssh_config"]
    assert chroot.path(f"{STATE}/id_ed25519").read_bytes() == key and assert_key(chroot, uid, gid) == key
    assert service_user(chroot) == (uid, gid)
    # deb-systemd-helper masks the unit on removal and keeps the enablement for a reinstall.
    assert os.readlink(chroot.path(f"/etc/systemd/system/{PKG}.target")) == "/dev/null"


def test_purge_removes_everything(chroot, debs):
    dpkg(chroot, "--purge", PKG)

    assert status(chroot) == "not-installed"
    for gone in (ETC, STATE, WANTS_LINK, f"/etc/systemd/system/{PKG}.target", f"/usr/bin/{PKG}-pubkey"):
        assert not os.path.lexists(chroot.path(gone)), gone
    assert not chroot.path("/etc/tunnelhub").exists()
    assert passwd_entry(chroot, PKG) is None
    assert chroot.run("getent", "group", PKG, check=False).returncode != 0
    leftovers = chroot.run("find", "/", "-xdev", "-name", f"*{PKG}*", "-not", "-path", "/tmp/*").stdout.split()
    assert leftovers == [], leftovers


def test_trust_on_first_use_package(chroot, debs):
    tofu = debs["tofu"]

    result = install(chroot, tofu)

    assert "WARNING: tunnelhub-weu was built with --trust-on-first-use" in result.stdout
    assert not chroot.path(f"{ETC}/known_hosts").exists()
    config = chroot.path(f"{ETC}/ssh_config").read_text()
    assert "StrictHostKeyChecking accept-new" in config and f"UserKnownHostsFile {STATE}/known_hosts" in config
    assert f"ReadWritePaths={STATE}" in chroot.path(f"/lib/systemd/system/{PKG}@.service").read_text()
    dpkg(chroot, "--purge", PKG)
    assert not chroot.path(STATE).exists() and passwd_entry(chroot, PKG) is None


# --------------------------------------------------------------------------------------------
# The systemd calls of the maintainer scripts (a recording systemctl stands in for systemd)
# --------------------------------------------------------------------------------------------

FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> /var/log/systemctl.calls
case "$*" in
    *is-enabled*) echo enabled ;;
esac
exit 0
"""


def test_maintainer_scripts_start_restart_and_stop_through_systemd(cached_root, debs):
    # GIVEN a root where systemd looks like it runs (/run/systemd/system) and systemctl records calls
    with extracted_root(cached_root) as root:
        root.path("/run/systemd/system").mkdir(parents=True)
        fake = root.path("/usr/sbin/systemctl")  # before /usr/bin in PATH
        fake.write_text(FAKE_SYSTEMCTL)
        fake.chmod(0o755)
        log = root.path("/var/log/systemctl.calls")

        def calls_during(action) -> list[str]:
            log.write_text("")
            action()
            return [c for c in log.read_text().splitlines() if not c.startswith(("--system is-enabled", "--quiet is-active", "--root=",
                                                                                  "--system --quiet is-active"))]

        # WHEN installed, THEN the target is started
        assert calls_during(lambda: install(root, debs["v1"])) == [
            "--system daemon-reload", f"--quiet --system start {PKG}.target"]
        # WHEN upgraded, THEN slots it no longer has are stopped and the target is restarted
        upgrade = calls_during(lambda: install(root, debs["v2"]))
        assert upgrade == ["--system daemon-reload",
                           "stop " + " ".join(f"{PKG}@{n}.service" for n in range(2, 16)),
                           f"--quiet --system restart {PKG}.target"]
        # WHEN removed, THEN the target (and every tunnel, PartOf=) is stopped, then systemd reloads
        # (postrm, and deb-systemd-helper after masking the unit)
        assert calls_during(lambda: dpkg(root, "--remove", PKG)) == [
            f"stop {PKG}.target", "--system daemon-reload", "daemon-reload"]
        # WHEN a policy-rc.d forbids starting services, THEN the install does not start anything
        dpkg(root, "--purge", PKG)
        policy = root.path("/usr/sbin/policy-rc.d")
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        assert calls_during(lambda: install(root, debs["v1"])) == ["--system daemon-reload"]


# --------------------------------------------------------------------------------------------
# The quick-ACK route (onprem.tcp_quickack): the installed ExecStartPre / ExecStopPost
# --------------------------------------------------------------------------------------------


@pytest.fixture
def lan_netns():
    """A namespace like a tunnel host's: one LAN interface and a default gateway."""
    name = f"op-qa-{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for args in (["link", "set", "lo", "up"], ["link", "add", "lan0", "type", "veth", "peer", "name", "lan1"],
                     ["addr", "add", "192.168.10.5/24", "dev", "lan0"], ["link", "set", "lan0", "up"],
                     ["link", "set", "lan1", "up"], ["route", "add", "default", "via", "192.168.10.1"]):
            subprocess.run(["ip", "-n", name, *args], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_installed_unit_adds_and_removes_the_quickack_route(cached_root, debs, lan_netns):
    # GIVEN the example package installed in a fresh Debian 12 root, on a host with a default gateway
    with extracted_root(cached_root) as root:
        install(root, debs["v1"])
        unit = root.path(f"/lib/systemd/system/{PKG}@.service").read_text()
        env = {**unit_environment(unit), **read_env_file(root.path(f"{ETC}/slot-0.env").read_text())}
        # the quick-ACK helper's lines (the others echo the journal's slot=/route= lines)
        (pre_prefix, pre), = [c for c in exec_commands(unit, "ExecStartPre") if c[1][0] != "/bin/echo"]
        (post_prefix, post), = [c for c in exec_commands(unit, "ExecStopPost") if c[1][0] != "/bin/echo"]
        assert pre_prefix == post_prefix == "-+", "as root, never failing the unit"

        def routes() -> str:
            return subprocess.run(["ip", "-n", lan_netns, "route", "show"], check=True, capture_output=True,
                                  text=True).stdout

        before = routes()
        # WHEN systemd would start slot 0 (ExecStartPre, as root, inside the root's own python3 and ip)
        started = root.run(*expand(expand_instance(pre, "0"), env), netns=lan_netns)
        # THEN the proxy's address has a quick-ACK host route copied from the default route
        assert "10.60.0.5 via 192.168.10.1 dev lan0 proto 84 quickack 1" in routes(), started.stdout
        assert "added 10.60.0.5/32 with quickack 1" in started.stdout
        assert root.path(f"/run/{PKG}/quickack-0.json").exists()
        # WHEN it stops (ExecStopPost), THEN the route and the record are gone and nothing else changed
        stopped = root.run(*expand(expand_instance(post, "0"), env), netns=lan_netns)
        assert routes() == before, stopped.stdout
        assert not root.path(f"/run/{PKG}/quickack-0.json").exists()


# --------------------------------------------------------------------------------------------
# The installed ExecStart against a real sshd
# --------------------------------------------------------------------------------------------

TUNNEL_USER = "proxy"  # an account every Debian host has, so the host's sshd can log it in
TARGET_PORT = 19306
TUNNEL_PORT = 13306
READY_TIMEOUT_S = 30  # generous: autossh starts ssh at once; the handshake takes well under 1 s
KEEPALIVE_WAIT_S = 6  # > ServerAliveInterval (5 s)


@pytest.fixture
def netns():
    name = f"op-tun-{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix="op-sshd-"))
    path.chmod(0o755)  # sshd reads authorized_keys as the tunnel user
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start(argv: list[str], procs: list[subprocess.Popen], **kwargs) -> subprocess.Popen:
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, **kwargs)
    procs.append(proc)
    return proc


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _in_netns(netns: str, code: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, "python3", "-c", code],
                          check=False, capture_output=True, text=True, timeout=timeout)


ECHO_SERVER = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {TARGET_PORT})); s.listen(8)
while True:
    c, _ = s.accept()
    with c:
        c.sendall(b"target:" + c.recv(64))
"""

HEALTH_PORT = 8080  # proxies.health_port's default
HEALTH_SERVER = f"""
import json
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/routes/echo"
        body = json.dumps({{"route": "echo", "healthy": ok, "reason": "tcp connect ok" if ok else "no route"}}).encode()
        self.send_response(200 if ok else 404); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", {HEALTH_PORT}), H).serve_forever()
"""
# systemd does not run in the root: the status command's systemctl and journalctl stand-ins.
STATUS_SYSTEMCTL = "#!/bin/sh\nprintf 'ActiveState=active\\nSubState=running\\nActiveEnterTimestamp=@1700000000\\n'\n"
STATUS_JOURNALCTL = "#!/bin/sh\nexit 0\n"

PROBE = f"""
import socket, sys
try:
    with socket.create_connection(("127.0.0.1", {TUNNEL_PORT}), timeout=2) as c:
        c.sendall(b"ping"); print(c.recv(64).decode())
except OSError as e:
    print("error", e); sys.exit(1)
"""


def _sshd(netns: str, workdir: Path, host_key: Path, procs: list) -> subprocess.Popen:
    config = workdir / "sshd_config"
    config.write_text(
        f"Port 22\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile none\nUsePAM no\nStrictModes no\n"
        f"AuthorizedKeysFile {workdir}/authorized_keys\nAllowUsers {TUNNEL_USER}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nAllowTcpForwarding yes\nGatewayPorts no\nPermitTTY no\n"
        f"PermitOpen 127.0.0.1:{HEALTH_PORT}\n"  # as the hub document's forwarding rules
        "X11Forwarding no\nLogLevel VERBOSE\n"
    )
    # sshd refuses to start without its privilege separation directory, which only its service
    # start creates: on a fresh machine make test installs openssh-server with starts held back.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    proc = _start(["ip", "netns", "exec", netns, "/usr/sbin/sshd", "-D", "-e", "-f", str(config)], procs)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = "import socket; socket.create_connection(('127.0.0.1', 22), timeout=1).close()"
        if _in_netns(netns, probe).returncode == 0:
            return proc
        assert proc.poll() is None, f"sshd exited: {proc.stderr.read()}"
        time.sleep(0.1)
    raise AssertionError("sshd did not start listening within 10 s")


def _traced(trace_dir: Path) -> tuple[set[str], set[str]]:
    """System calls and socket families of autossh, its wrapper and ssh (from their execve on)."""
    syscalls: set[str] = set()
    families: set[str] = set()
    for path in trace_dir.glob("trace.*"):
        lines = path.read_text().splitlines()
        start = next((i for i, line in enumerate(lines)
                      if re.match(r'execve\("/usr/(bin/autossh|lib/autossh/autossh|bin/ssh)"', line)), None)
        if start is None:
            continue  # the test's wrappers: ip netns exec, unshare, chroot, setpriv
        for line in lines[start + 1:]:
            m = re.match(r"([a-z0-9_]+)\((AF_[A-Z0-9]+)?", line)
            if m:
                syscalls.add(m[1])
                if m[1] == "socket" and m[2]:
                    families.add(m[2])
    return syscalls, families


def _directive(unit: str, key: str) -> str:
    return " ".join(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith(key + "="))


def _syscall_filter(unit: str) -> set[str]:
    """The system calls a unit's SystemCallFilter= lines allow (sets resolved by systemd-analyze)."""
    allowed: set[str] = set()
    for line in unit.splitlines():
        if not line.startswith("SystemCallFilter="):
            continue
        value = line.split("=", 1)[1]
        deny = value.startswith("~")
        names = set().union(*(_syscall_set(item) for item in value.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


def _syscall_set(name: str, seen: set[str] | None = None) -> set[str]:
    if not name.startswith("@"):
        return {name}
    seen = seen if seen is not None else set()
    seen.add(name)
    listing = subprocess.run(["systemd-analyze", "syscall-filter", name], check=True,
                             capture_output=True, text=True).stdout.splitlines()[1:]
    out: set[str] = set()
    for item in (line.strip() for line in listing):
        if item.startswith("@") and item not in seen:
            out |= _syscall_set(item, seen)
        elif item and not item.startswith(("#", "@")):
            out.add(item)
    return out


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test hub host key", "-f", str(path)],
                   check=True)
    return path.with_suffix(".pub").read_text().strip()


@pytest.mark.skipif(not Path("/usr/sbin/sshd").exists() or shutil.which("strace") is None,
                    reason="needs openssh-server and strace (make test installs them)")
def test_installed_exec_start_brings_the_tunnel_up(cached_root, tmp_path, netns, workdir):
    with contextlib.ExitStack() as stack:
        _exec_start_brings_the_tunnel_up(stack, cached_root, tmp_path, netns, workdir)


def _exec_start_brings_the_tunnel_up(stack, cached_root, tmp_path, netns, workdir):
    # GIVEN a hub with one slot at 127.0.0.1 and a tunnel to a local echo server, its package
    # installed in a fresh root, and an sshd holding the hub host key
    hub = load_hubs(aws_hub(
        name="optest", proxies={"count": 1},
        routes=[{"name": "echo", "kind": "tunnel", "port": 3306, "target": f"127.0.0.1:{TARGET_PORT}"}],
        onprem={"source_cidrs": ["203.0.113.0/28"], "tunnel_user": TUNNEL_USER},
    )).hubs[0]
    host_pub = _keygen(workdir / "hub_host_key")
    outputs = parse_outputs({  # terraform output -json format
        "tunnel_endpoints": {"value": ["127.0.0.1"], "type": ["list", "string"], "sensitive": False},
        "host_public_key": {"value": host_pub, "type": "string", "sensitive": False},
    }, hub.stack_name, "test-outputs.json")
    deb = build_deb(hub, outputs, tmp_path / "dist", source_date_epoch=V1_EPOCH)
    root = stack.enter_context(extracted_root(cached_root))
    install(root, deb)
    client_pub = root.path("/var/lib/tunnelhub-optest/id_ed25519.pub").read_text().strip()
    (workdir / "authorized_keys").write_text(f'restrict,port-forwarding,permitlisten="localhost:{TUNNEL_PORT}",'
                                             f'permitopen="127.0.0.1:{HEALTH_PORT}" {client_pub}\n')
    (workdir / "authorized_keys").chmod(0o644)
    unit = root.path("/lib/systemd/system/tunnelhub-optest@.service").read_text()
    # systemd would create the unit's RuntimeDirectory= for the service user and set $RUNTIME_DIRECTORY
    runtime = "/run/tunnelhub-optest/slot-0"
    assert "RuntimeDirectory=tunnelhub-optest/slot-%i" in unit
    root.run("install", "-d", "-m", "0750", "-o", "tunnelhub-optest", "-g", "tunnelhub-optest", runtime)
    env = {**unit_environment(unit), **read_env_file(root.path("/etc/tunnelhub/optest/slot-0.env").read_text()),
           "RUNTIME_DIRECTORY": runtime}
    argv = expand(exec_start_words(unit), env)
    assert f"{runtime}/health.sock:127.0.0.1:{HEALTH_PORT}" in argv
    assert argv[-1] == "127.0.0.1" and f"localhost:{TUNNEL_PORT}:127.0.0.1:{TARGET_PORT}" in argv
    as_service_user = ["setpriv", "--reuid=tunnelhub-optest", "--regid=tunnelhub-optest", "--init-groups", "--"]

    procs: list[subprocess.Popen] = []
    try:
        _start(["ip", "netns", "exec", netns, "python3", "-c", ECHO_SERVER], procs)
        _sshd(netns, workdir, workdir / "hub_host_key", procs)  # procs[1], replaced below
        _start(["ip", "netns", "exec", netns, "python3", "-c", HEALTH_SERVER], procs)

        # WHEN the unit's ExecStart runs, as the service user, with the unit's environment
        trace = tmp_path / "trace"
        client = _start(["strace", "-f", "-ff", "-qq", "-o", str(trace), *root.argv(as_service_user + argv, netns)],
                        procs, env={**Chroot._ENV, **env})

        # THEN the proxy's loopback tunnel port reaches the target on the tunnel host's side
        deadline, answer = time.monotonic() + READY_TIMEOUT_S, ""
        while time.monotonic() < deadline:
            answer = _in_netns(netns, PROBE).stdout.strip()
            if answer == "target:ping":
                break
            assert client.poll() is None, f"autossh exited: {client.stderr.read()}"
            time.sleep(0.2)
        assert answer == "target:ping", f"no tunnel within {READY_TIMEOUT_S} s (last answer {answer!r})"
        time.sleep(KEEPALIVE_WAIT_S)  # an idle tunnel: ssh sends its keep-alive probes
        assert _in_netns(netns, PROBE).stdout.strip() == "target:ping"

        # AND the installed status command reads the route health through the session's -L socket
        # (mode 0660, the service group), with the root's own python3
        sock = root.path(f"{runtime}/health.sock")
        assert stat.S_ISSOCK(os.stat(sock).st_mode) and stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        for name, text in (("systemctl", STATUS_SYSTEMCTL), ("journalctl", STATUS_JOURNALCTL)):
            root.path(f"/usr/local/bin/{name}").write_text(text)
            root.path(f"/usr/local/bin/{name}").chmod(0o755)
        shown = root.run("/usr/bin/tunnelhub-optest-status", "--json", check=False,
                         env={"PATH": "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})  # chroot is in /usr/sbin
        assert shown.returncode == 0, shown.stdout + shown.stderr
        status = json.loads(shown.stdout)
        assert status["slots"][0]["tunnel"] == "up"
        assert status["slots"][0]["routes"][0] == {
            "route": "echo", "tunnel_port": TUNNEL_PORT, "state": "up", "healthy": True, "reason": "tcp connect ok",
            "http_status": 200, "checked_age_s": None}
        _stop([client])

        # AND everything autossh and ssh did is allowed by the unit's sandbox
        syscalls, families = _traced(tmp_path)
        allowed = _syscall_filter(unit)
        assert syscalls and syscalls <= allowed, f"denied by SystemCallFilter: {sorted(syscalls - allowed)}"
        assert families and families <= set(_directive(unit, "RestrictAddressFamilies").split()), families

        # AND a proxy presenting another host key is refused (the hub key is pinned)
        _stop(procs[1:2])  # the sshd
        _keygen(workdir / "other_key")
        _sshd(netns, workdir, workdir / "other_key", procs)
        ssh_once = ["/usr/bin/ssh", *argv[argv.index("-N"):]]
        refused = root.run(*as_service_user, *ssh_once, check=False, netns=netns, timeout=30)
        assert refused.returncode == 255
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in refused.stderr or "Host key verification failed" in refused.stderr
    finally:
        _stop(procs)
