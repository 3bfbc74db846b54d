"""A real sshd per proxy namespace, configured like a stock Ubuntu/Debian sshd plus drop-ins.

The lab writes its own main config per proxy. It mirrors the distribution's: the drop-in
directory is included *first* (so, as on the VM, the first value obtained wins), then Debian's
stock settings. Only what two sshds on one filesystem cannot share is the lab's: host key
paths, pid file, listen address and the authorized_keys path (set globally before the Include,
so a drop-in's own ``AuthorizedKeysFile`` still overrides it inside its ``Match`` block).

The tunnel user exists once on this machine (all namespaces share ``/etc/passwd``):
:func:`ensure_user` creates it idempotently and says whether it did, so the lab removes it
only when it created it.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .proc import Daemon, LabError, run, wait_until

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")

# Debian 12 / Ubuntu 24.04 stock /etc/ssh/sshd_config, after its Include line.
STOCK_SETTINGS = """\
KbdInteractiveAuthentication no
UsePAM yes
X11Forwarding yes
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def ensure_user(name: str, *, shell: str = "/usr/sbin/nologin") -> bool:
    """Create system user ``name`` unless it exists; True when this call created it."""
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        pass
    run(["useradd", "--system", "--user-group", "--no-create-home",
         "--home-dir", "/nonexistent", "--shell", shell, name])
    return True


def remove_user(name: str) -> None:
    run(["userdel", name], check=False)


_USERS_STATE = Path("/run/tunnelhub-lab-users.json")
_USERS_LOCK = Path("/run/tunnelhub-lab-users.lock")


def _with_users_state(update):  # type: ignore[no-untyped-def]
    """Run ``update(state)`` under an exclusive lock; ``state`` is saved after it."""
    with open(_USERS_LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = json.loads(_USERS_STATE.read_text()) if _USERS_STATE.exists() else {}
        except json.JSONDecodeError:
            state = {}
        result = update(state)
        _USERS_STATE.write_text(json.dumps(state))
        return result


def acquire_user(name: str, holder: str) -> None:
    """Make sure user ``name`` exists while lab ``holder`` (its prefix) runs.

    Parallel lab runs share ``/etc/passwd``: the user is created by the first run that needs
    it and removed by the last one to release it, and only if a lab created it.
    """

    def update(state: dict) -> None:
        entry = state.setdefault(name, {"created": False, "holders": []})
        if ensure_user(name):
            entry["created"] = True
        if holder not in entry["holders"]:
            entry["holders"].append(holder)

    _with_users_state(update)


def release_user(name: str, holder: str) -> None:
    def update(state: dict) -> None:
        entry = state.get(name)
        if entry is None:
            return
        entry["holders"] = [h for h in entry["holders"] if h != holder]
        if not entry["holders"]:
            if entry["created"]:
                remove_user(name)
            del state[name]

    _with_users_state(update)


def generate_key(path: Path, *, key_type: str = "ed25519", bits: int | None = None,
                 comment: str = "tunnelhub-lab") -> str:
    """Create an SSH key pair at ``path`` (+ ``.pub``); returns the public key line."""
    if path.exists():
        path.unlink()
    pub = Path(str(path) + ".pub")
    if pub.exists():
        pub.unlink()
    argv = ["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", comment, "-f", str(path)]
    if bits:
        argv[4:4] = ["-b", str(bits)]
    run(argv, timeout_s=60)
    return pub.read_text().strip()


@dataclass
class SshdConfig:
    """What the lab's main config for one proxy's sshd needs."""

    workdir: Path
    host_keys: Sequence[Path]
    authorized_keys: Path
    dropins: Sequence[Path] = ()
    listen: str = "0.0.0.0"
    port: int = 22
    log_level: str = "VERBOSE"

    @property
    def config_path(self) -> Path:
        return self.workdir / "sshd_config"

    @property
    def pid_path(self) -> Path:
        return self.workdir / "sshd.pid"

    def render(self) -> str:
        lines = [
            "# tunnelhub lab: per-proxy main sshd config (paths only; the rest is stock)",
            f"Port {self.port}",
            f"ListenAddress {self.listen}",
            *(f"HostKey {key}" for key in self.host_keys),
            f"PidFile {self.pid_path}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            f"LogLevel {self.log_level}",
        ]
        if self.dropins:
            dropin_dir = self.workdir / "sshd_config.d"
            dropin_dir.mkdir(parents=True, exist_ok=True)
            for old in dropin_dir.iterdir():
                old.unlink()
            for dropin in self.dropins:
                (dropin_dir / dropin.name).symlink_to(dropin)
            lines.append(f"Include {dropin_dir}/*.conf")
        return "\n".join(lines) + "\n" + STOCK_SETTINGS

    def write(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render())
        return self.config_path


def check_config(config: Path, *, netns: str | None = None) -> None:
    """``sshd -t -f``: raise with sshd's message when the configuration is invalid."""
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    proc = run([SSHD, "-t", "-f", str(config)], netns=netns, check=False)
    if proc.returncode != 0:
        raise LabError(f"sshd -t -f {config} rejected the configuration:\n"
                       f"{proc.stderr.strip()}\n--- config:\n{config.read_text()}")


def effective_config(config: Path, *, user: str, addr: str = "10.0.0.1",
                     netns: str | None = None) -> dict[str, list[str]]:
    """``sshd -T -C user=..`` as ``{keyword: [values]}``: what applies to ``user``."""
    proc = run([SSHD, "-T", "-f", str(config), "-C", f"user={user},host=lab,addr={addr}"],
               netns=netns)
    result: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        result.setdefault(key.lower(), []).append(value)
    return result


class Sshd:
    """sshd in a namespace: ``sshd -D -e -f <config>``, checked with ``-t`` before it starts."""

    def __init__(self, config: SshdConfig, *, netns: str, log_dir: Path, name: str,
                 address: str) -> None:
        self.config = config
        self.netns = netns
        self.address = address
        self.name = name
        self.daemon = Daemon(name=name, argv=[], log_path=log_dir / f"{name}.log", netns=netns)

    def start(self, *, timeout_s: float = 20.0) -> Sshd:
        path = self.config.write()
        check_config(path, netns=self.netns)
        self.daemon.argv = [SSHD, "-D", "-e", "-f", str(path)]
        self.daemon.start()
        wait_until(lambda: self._listening(), timeout_s=timeout_s,
                   what=f"{self.name} listening on {self.address}:{self.config.port}")
        self.daemon.expect_running()
        return self

    def _listening(self) -> bool:
        self.daemon.expect_running()
        proc = run(["ss", "-Htln", f"sport = :{self.config.port}"], netns=self.netns)
        return bool(proc.stdout.strip())

    def stop(self) -> None:
        self.daemon.stop()

    def log(self) -> str:
        return self.daemon.log_path.read_text(errors="replace")


def ssh_argv(*, key: Path, known_hosts: Path, user: str, host: str,
             options: Sequence[str] = (), args: Sequence[str] = ()) -> list[str]:
    """An ssh client command pinned to ``known_hosts``, batch mode, no user config."""
    return [
        "ssh", "-F", "none", "-i", str(key), "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5",
        *options, f"{user}@{host}", *args,
    ]


def known_hosts_line(hosts: Sequence[str], public_key_line: str) -> str:
    key_type, key_b64 = public_key_line.split()[:2]
    return f"{','.join(hosts)} {key_type} {key_b64}\n"


def run_ssh(argv: Sequence[str], *, netns: str, timeout_s: float = 20.0
            ) -> subprocess.CompletedProcess[str]:
    return run(argv, netns=netns, timeout_s=timeout_s, check=False,
               env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
