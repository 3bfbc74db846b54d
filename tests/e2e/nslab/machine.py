"""A booted machine in the lab: ``systemd-nspawn --boot`` of the test image in a lab namespace.

Each :class:`Machine` runs the cached image (``tests/boot/image.py``) through an overlay mount
(the unpacked image read-only below, the machine's own writable layer above, under the lab's work
directory), so machines share nothing and a rebooted machine keeps its disk:

    systemd-nspawn --directory <overlay> --machine <prefix>-<name> --boot --register=no --keep-unit
                   --network-namespace-path=/run/netns/<prefix>-<node> --link-journal=no
                   --resolv-conf=off --timezone=off --console=pipe

``--register=no --keep-unit``: this machine's PID 1 is not systemd, so nspawn must neither ask
machined to register the container nor create a scope unit. ``SYSTEMD_NSPAWN_API_VFS_WRITABLE=
network`` (an nspawn environment variable, docs/ENVIRONMENT.md in systemd) leaves
``/proc/sys/net`` writable, as it is on a VM: the proxies' ``sysctl -p`` sets
``net.ipv4.tcp_retries2`` in their own network namespace (nspawn makes it read-only when the
namespace is not its own); ``--capability=CAP_NET_ADMIN`` lets root configure the interfaces (the
AWS slot's ``ip addr add``), which nspawn otherwise grants only with a namespace of its own. Commands run inside through ``nsenter`` into the container's PID 1
(:meth:`Machine.run`). A reboot is a real one: ``systemctl reboot`` inside, nspawn exits with
status 133 (its "reboot requested" code), and the same root boots again.

Every process is stopped by PID: nspawn gets SIGTERM (the container halts), then SIGKILL for it
and the container's PID 1 if it is still there after the bound; the overlay is unmounted.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .proc import LabError, pid_alive, tail, wait_until

NSPAWN = "systemd-nspawn"
REBOOT_EXIT_STATUS = 133  # systemd-nspawn: the container asked for a reboot
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STOP_TIMEOUT_S = 30.0


def overlay_mounts_under(base: Path) -> list[str]:
    """Overlay mount points below ``base`` (leftovers of a run that died)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "overlay" and fields[1].startswith(str(base) + "/"):
            found.append(fields[1].replace("\\040", " "))
    return found


@dataclass
class Boot:
    """One boot of a machine: when nspawn started, the PID 1 it got, how it ended."""

    started_at: float
    nspawn: subprocess.Popen
    leader: int | None = None
    exit_status: int | None = None


@dataclass
class Machine:
    name: str
    """The lab node it runs in (``proxy1``, ``onprem``)."""
    netns: str
    image: Path
    """The unpacked image: the overlay's read-only lower layer."""
    workdir: Path
    machine_name: str
    log_dir: Path
    boots: list[Boot] = field(default_factory=list)
    _mounted: bool = False

    # -- the disk ----------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-console.log"

    def mount(self) -> Path:
        """Mount the overlay (idempotent): the machine's disk, writable before and after boots."""
        if self._mounted:
            return self.root
        for sub in ("upper", "work", "root"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir / "upper", 0o755)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.image},upperdir={self.workdir / 'upper'},workdir={self.workdir / 'work'}",
                        str(self.root)], check=True, capture_output=True, timeout=30)
        self._mounted = True
        return self.root

    def unmount(self) -> None:
        if not self._mounted:
            return
        done = subprocess.run(["umount", str(self.root)], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:  # still busy (a process that outlived the container): detach
            subprocess.run(["umount", "-l", str(self.root)], capture_output=True, timeout=30)
        self._mounted = False

    def write(self, path: str, content: bytes | str, mode: int = 0o644) -> Path:
        """Write a file onto the machine's disk (before boot: the seed, the package to install)."""
        target = self.mount() / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        os.chmod(target, mode)
        return target

    def read(self, path: str) -> bytes:
        return (self.mount() / path.lstrip("/")).read_bytes()

    def exists(self, path: str) -> bool:
        return (self.mount() / path.lstrip("/")).exists()

    def chroot(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a command on the stopped machine's disk (a private mount namespace: /dev, /proc)."""
        if self.running:
            raise LabError(f"{self.name} is running: use run(), not chroot()")
        from tests.chroot.debian_root import Chroot  # the repo's chroot helper

        return Chroot(self.mount()).run(*argv, timeout=timeout)

    # -- booting -----------------------------------------------------------------------------------

    @property
    def boot(self) -> Boot | None:
        return self.boots[-1] if self.boots else None

    @property
    def running(self) -> bool:
        return self.boot is not None and self.boot.nspawn.poll() is None

    def start(self) -> Boot:
        """Boot the machine (returns once its PID 1 runs; the boot itself goes on)."""
        if self.running:
            raise LabError(f"{self.name} is already running")
        self.mount()
        argv = [NSPAWN, "--quiet", f"--directory={self.root}", f"--machine={self.machine_name}", "--boot",
                "--register=no", "--keep-unit", f"--network-namespace-path=/run/netns/{self.netns}",
                "--link-journal=no", "--resolv-conf=off", "--timezone=off", "--console=pipe",
                # a VM's root may configure its interfaces (the AWS slot's secondary address);
                # nspawn grants CAP_NET_ADMIN only with a network namespace of its own
                "--capability=CAP_NET_ADMIN"]
        log = open(self.log_path, "ab", buffering=0)
        log.write(f"--- {time.strftime('%H:%M:%S')} boot {len(self.boots) + 1}: {' '.join(argv)}\n".encode())
        env = {"PATH": PATH, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network", "LANG": "C.UTF-8"}
        started = time.monotonic()
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True)
        log.close()
        boot = Boot(started_at=started, nspawn=popen)
        self.boots.append(boot)
        deadline = started + 30
        while not self._find_leader(boot):
            if popen.poll() is not None:
                raise LabError(f"systemd-nspawn for {self.name} exited with {popen.returncode}: "
                               f"{tail(self.log_path, 20)}")
            if time.monotonic() > deadline:
                self.stop()
                raise LabError(f"{self.name}: no systemd PID 1 30 s after nspawn started: {tail(self.log_path, 20)}")
            time.sleep(0.05)
        return boot

    def _find_leader(self, boot: Boot) -> bool:
        for child in _children(boot.nspawn.pid):
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    boot.leader = child
                    return True
            except OSError:
                continue
        return False

    @property
    def leader(self) -> int:
        if not self.running or self.boot.leader is None:
            raise LabError(f"{self.name} is not running")
        return self.boot.leader

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
            input_text: str | None = None, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the machine (every namespace of its PID 1: mounts, PIDs, network)."""
        command = ["nsenter", "--target", str(self.leader), "--all", "--",
                   "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "TERM=dumb", "SYSTEMD_PAGER=",
                   *(f"{k}={v}" for k, v in (env or {}).items()), *argv]
        try:
            done = subprocess.run(command, input=input_text, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{self.name}: {' '.join(argv)} took longer than {timeout:g} s") from exc
        if check and done.returncode != 0:
            raise LabError(f"{self.name}: {' '.join(argv)} exited {done.returncode}\n"
                           f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
        return done

    def system_state(self) -> str:
        """``systemctl is-system-running`` (initializing, starting, running, degraded, ...)."""
        return self.run(["systemctl", "is-system-running"], check=False).stdout.strip() or "unknown"

    def wait_system(self, *, timeout_s: float = 120.0) -> str:
        """Wait until the boot is over (no longer initializing or starting); the final state."""
        states: list[str] = []

        def settled() -> bool:
            states.append(self.system_state())
            return states[-1] not in ("initializing", "starting", "unknown", "offline")

        wait_until(settled, timeout_s=timeout_s, interval_s=0.2, what=f"{self.name} to finish booting")
        return states[-1]

    def journal(self, *args: str) -> str:
        return self.run(["journalctl", "--no-pager", "-o", "short-monotonic", *args], check=False,
                        timeout=60).stdout

    def unit_property(self, unit: str, prop: str) -> str:
        return self.run(["systemctl", "show", "-P", prop, unit], check=False).stdout.strip()

    def failed_units(self) -> list[str]:
        out = self.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend"], check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    # -- stopping ----------------------------------------------------------------------------------

    def reboot(self, *, timeout_s: float = 60.0) -> Boot:
        """``systemctl reboot`` inside; nspawn ends with 133; the same disk boots again."""
        boot = self.boot
        if boot is None or not self.running:
            raise LabError(f"{self.name} is not running")
        self.run(["systemctl", "reboot"], check=False, timeout=30)
        try:
            boot.exit_status = boot.nspawn.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise LabError(f"{self.name} did not reboot within {timeout_s:g} s") from None
        if boot.exit_status != REBOOT_EXIT_STATUS:
            raise LabError(f"{self.name}: nspawn exited {boot.exit_status} after `systemctl reboot`, "
                           f"not {REBOOT_EXIT_STATUS}")
        return self.start()

    def stop(self, *, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Halt the machine (SIGTERM to nspawn; SIGKILL by PID after ``timeout_s``)."""
        boot = self.boot
        if boot is not None and boot.nspawn.poll() is None:
            leader = boot.leader
            try:
                os.kill(boot.nspawn.pid, signal.SIGTERM)
                boot.exit_status = boot.nspawn.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                for pid in (boot.nspawn.pid, leader):
                    if pid and pid_alive(pid):
                        os.kill(pid, signal.SIGKILL)
                boot.exit_status = boot.nspawn.wait(timeout=30)
            if leader and pid_alive(leader):
                os.kill(leader, signal.SIGKILL)
                wait_until(lambda: not pid_alive(leader), timeout_s=10, interval_s=0.05,
                           what=f"{self.name}'s PID 1 to exit")

    def destroy(self) -> None:
        """Stop, unmount and delete the machine's disk (a VM deleted)."""
        self.stop()
        self.unmount()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
