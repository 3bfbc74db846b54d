"""What the boot lab cannot boot: the proxies' Ubuntu 24.04 behaviour, read from Ubuntu's sources.

The booted lab (tests/boot, docs/boot.md) runs Debian 12. The clouds run Ubuntu 24.04 ("noble"),
whose OpenSSH is socket-activated and whose network configuration is netplan. These tests hold the
rendered configuration against Ubuntu's behaviour as its packaging and documentation state it:

- OpenSSH 1:9.6p1-3ubuntu13.9 (noble-updates), packaging mirrored at
  github.com/yaobinwen/openssh-ubuntu, directory ``applied-1:9.6p1-3ubuntu13.9/debian``:
  ``systemd/ssh.socket`` (``ListenStream=22``, ``Accept=no``, ``RequiredBy=ssh.service``),
  ``systemd/ssh.service`` (``ExecStart=/usr/sbin/sshd -D``, ``KillMode=process``, ``ExecReload``
  = ``sshd -t`` + SIGHUP), ``rules`` (``dh_installsystemd --no-enable --no-start ssh.service``: the
  socket is what is enabled), ``README.Debian`` ("Socket-based activation with systemd": the
  generator turns non-default ``ListenAddress``/``Port`` into ``ListenStream=`` lines of a
  ``ssh.socket`` drop-in, applied by ``systemctl daemon-reload`` + ``systemctl restart
  ssh.socket``), ``patches/sshd-socket-generator.patch`` (``write_systemd_socket_file``: one
  ``ListenStream=<port>`` per 0.0.0.0/:: address, ``ListenStream=<addr>:<port>`` otherwise, no
  drop-in when the set is exactly ``ListenStream=22``) and ``patches/systemd-socket-activation.patch``
  (sshd takes the listening sockets from ``LISTEN_FDS``; ``sighup_restart`` keeps them:
  ``close_listen_socks(force=0)``).
- netplan-generate(8), "HANDLING MULTIPLE FILES" (netplan.io 0.99 to 1.1, the same text): files
  are read in lexicographical order whatever their directory, later files add to or override
  earlier ones; scalars are overwritten, sequences concatenated (new values appended), mappings
  merged key by key.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.unit.test_userdata import EXAMPLES, EXAMPLE_IDS, files_of

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "tunnelhub" / "userdata" / "files"
sys.path.insert(0, str(FILES))

import tunnelhub_aws_slot as slot  # noqa: E402
import tunnelhub_fetch_host_key as fetch  # noqa: E402

UBUNTU_DEFAULT_SOCKET = {"ListenStream=22"}  # ssh.socket of 1:9.6p1-3ubuntu13.9


def socket_generator_streams(listen_addresses: list[str]) -> set[str]:
    """The ``ListenStream=`` set noble's sshd-socket-generator builds from sshd's listen addresses
    (``write_systemd_socket_file``); it writes a drop-in only when the set is not exactly
    ``{"ListenStream=22"}``."""
    streams = set()
    for entry in listen_addresses:
        address, _, port = entry.rpartition(":")
        address = address.strip("[]")
        streams.add(f"ListenStream={port}" if address in ("0.0.0.0", "::") else f"ListenStream={entry}")
    return streams


def effective_listen_addresses(tmp_path: Path, dropins: dict[str, str]) -> list[str]:
    """``sshd -T``'s listen addresses for Debian's/Ubuntu's layout: ``sshd_config`` including
    ``sshd_config.d/*.conf`` first, then the distribution's defaults (no Port/ListenAddress set)."""
    confd = tmp_path / "sshd_config.d"
    confd.mkdir()
    for name, text in dropins.items():
        (confd / name).write_text(text)
    key = tmp_path / "host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = tmp_path / "sshd_config"
    config.write_text(f"Include {confd}/*.conf\nHostKey {key}\nKbdInteractiveAuthentication no\nUsePAM yes\n"
                      f"PidFile {tmp_path}/sshd.pid\n")
    out = subprocess.run(["/usr/sbin/sshd", "-T", "-f", str(config)], capture_output=True, text=True, check=True).stdout
    return [line.split()[1] for line in out.splitlines() if line.startswith("listenaddress ")]


@pytest.mark.parametrize(("hub", "slot_", "ud"), EXAMPLES, ids=EXAMPLE_IDS)
def test_no_sshd_setting_moves_into_ubuntus_ssh_socket(tmp_path, hub, slot_, ud):
    """On Ubuntu 24.04 port 22 belongs to ssh.socket. Our drop-ins set no Port, ListenAddress or
    AddressFamily, so the generator writes nothing, ssh.socket stays the package's, and restarting
    ssh.service (what the host key fetch does) is all a configuration change needs: no
    ``daemon-reload`` + ``restart ssh.socket``."""
    files = files_of(ud)
    dropins = {Path(p).name: f.content for p, f in files.items() if p.startswith("/etc/ssh/sshd_config.d/")}
    dropins["05-tunnelhub-host-key.conf"] = f"HostKey {tmp_path}/host_ed25519_key\n"  # what the fetch writes
    for name, text in dropins.items():
        assert not re.search(r"^\s*(Port|ListenAddress|AddressFamily)\s", text, re.M | re.I), name
    streams = socket_generator_streams(effective_listen_addresses(tmp_path, dropins))
    assert streams == UBUNTU_DEFAULT_SOCKET, f"Ubuntu would move {streams} into ssh.socket.d/addresses.conf"


def test_the_socket_rule_can_fail(tmp_path):
    """Negative control: a drop-in with another port is one Ubuntu moves into the socket (and a
    restart of ssh.service would then not move the listener)."""
    streams = socket_generator_streams(effective_listen_addresses(tmp_path, {"10-x.conf": "Port 2222\n"}))
    assert streams == {"ListenStream=2222"} != UBUNTU_DEFAULT_SOCKET


def test_the_host_key_is_applied_by_restarting_ssh_service():
    """The fetch restarts ``ssh.service``: the unit both distributions ship (Ubuntu aliases nothing
    to it: ``sshd.service`` is the alias). On Ubuntu 24.04 the socket keeps listening through the
    restart (the service gets the socket from ssh.socket, ``RequiredBy=ssh.service``), the new sshd
    reads the HostKey drop-in, and established tunnel sessions survive (``KillMode=process``): the
    same outcome as on Debian 12, which the booted lab proves. A never-triggered ssh.service (no
    connection yet) is simply started. ``systemctl reload`` would not do: it fails on an inactive
    socket-activated service."""
    tree = ast.parse((FILES / "tunnelhub_fetch_host_key.py").read_text())
    commands = [ast.literal_eval(node.args[0]) for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "run"
                and node.args and isinstance(node.args[0], ast.List)
                and all(isinstance(e, ast.Constant) for e in node.args[0].elts)]
    assert ["systemctl", "restart", "ssh.service"] in commands, commands
    assert not any(c[:2] == ["systemctl", "reload"] for c in commands)
    assert fetch.DROPIN_PATH.startswith("/etc/ssh/sshd_config.d/05-")  # read before our 10- and cloud-init's 50-


def _cloud_init_netplan(ifname: str, mac: str) -> dict:
    """What cloud-init writes on EC2 (``/etc/netplan/50-cloud-init.yaml``): the interface keyed by
    its name, matched by MAC, DHCP."""
    return {"network": {"version": 2, "ethernets": {ifname: {"dhcp4": True, "dhcp6": False,
                                                             "match": {"macaddress": mac}, "set-name": ifname}}}}


def netplan_merge(*documents: dict) -> dict:
    """netplan-generate(8)'s rules for files with the same keys: scalars overwritten, sequences
    concatenated, mappings merged key by key (documents given in lexicographical file order)."""
    def merge(old, new):
        if isinstance(old, dict) and isinstance(new, dict):
            out = dict(old)
            for key, value in new.items():
                out[key] = merge(old[key], value) if key in old else value
            return out
        if isinstance(old, list) and isinstance(new, list):
            return old + new
        return new
    result: dict = {}
    for document in documents:
        result = merge(result, document)
    return result


def test_the_slot_address_merges_into_cloud_inits_netplan_definition(tmp_path, monkeypatch):
    """The AWS slot's fixed address persists through netplan on Ubuntu (the booted Debian image has
    no netplan: there the address lasts until a reboot, docs/boot.md). The drop-in keys the
    interface by the name cloud-init keys it by, sorts after ``50-cloud-init.yaml``, and merged by
    netplan's rules keeps cloud-init's DHCP and adds the slot's /32."""
    netplan_dir = tmp_path / "netplan"
    netplan_dir.mkdir()
    calls: list[list[str]] = []

    def fake_run(argv, **kwargs):  # ip addr show/add, netplan generate
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, stdout="2: ens5    inet 10.70.0.40/26 brd 10.70.0.63\n",
                                           stderr="")

    monkeypatch.setattr(slot.subprocess, "run", fake_run)
    monkeypatch.setattr(slot.shutil, "which", lambda name: f"/usr/sbin/{name}")
    dropin = netplan_dir / Path(slot.NETPLAN_FILE).name
    slot.configure_address("10.70.0.16", "ens5", str(dropin))
    assert ["ip", "addr", "add", "10.70.0.16/32", "dev", "ens5"] in calls and ["netplan", "generate"] in calls
    assert sorted(["50-cloud-init.yaml", dropin.name]) == ["50-cloud-init.yaml", dropin.name]
    merged = netplan_merge(_cloud_init_netplan("ens5", "0a:1b:2c:3d:4e:5f"), yaml.safe_load(dropin.read_text()))
    assert merged["network"]["ethernets"] == {"ens5": {
        "dhcp4": True, "dhcp6": False, "match": {"macaddress": "0a:1b:2c:3d:4e:5f"}, "set-name": "ens5",
        "addresses": ["10.70.0.16/32"]}}
    assert oct(dropin.stat().st_mode & 0o777) == "0o600"  # netplan 1.x refuses world-readable files


def test_the_netplan_merge_can_fail():
    """Negative control: a drop-in keyed by another id defines a second interface instead."""
    merged = netplan_merge(_cloud_init_netplan("ens5", "0a:1b:2c:3d:4e:5f"),
                           {"network": {"version": 2, "ethernets": {"eth0": {"addresses": ["10.70.0.16/32"]}}}})
    assert set(merged["network"]["ethernets"]) == {"ens5", "eth0"}


@pytest.mark.parametrize(("hub", "slot_", "ud"), EXAMPLES, ids=EXAMPLE_IDS)
def test_cloud_config_keys_are_valid_in_both_cloud_init_versions(hub, slot_, ud):
    """Debian 12 has cloud-init 22.4, Ubuntu 24.04 24.1 to 24.4 (SRUs). Every key we render exists,
    undeprecated, in both: 22.4's schema checks it here (``test_cloud_init_schema_accepts_every_example``
    and the booted lab's ``cloud-init schema --system``); in canonical/cloud-init's
    ``cloudinit/config/schemas/schema-cloud-config-v1.json`` at tags 24.1.3 and 24.4.1 the same keys
    (and the user and write_files properties we use) carry no deprecation. The one enum that
    changed: ``ssh_genkeytypes`` is ``dsa|ecdsa|ed25519|rsa`` in 22.4, ``ecdsa|ed25519|rsa`` from
    24.1 (``GENERATE_KEY_NAMES`` in ``cc_ssh.py``): we ask for ECDSA only."""
    data = yaml.safe_load(ud.cloud_config)
    assert set(data) == {"ssh_pwauth", "disable_root", "ssh_deletekeys", "ssh_genkeytypes", "users", "write_files",
                         "runcmd"}
    assert set(data["ssh_genkeytypes"]) <= {"ecdsa", "ed25519", "rsa"}
    user_keys = {k for u in data["users"] if isinstance(u, dict) for k in u}
    assert user_keys <= {"name", "gecos", "groups", "shell", "sudo", "lock_passwd", "ssh_authorized_keys", "system",
                         "homedir", "no_create_home"}
    assert {k for f in data["write_files"] for k in f} <= {"path", "owner", "permissions", "content"}
