"""A minimal Debian 12 root made with debootstrap, cached as a tarball between test runs.

The first run builds it (``debootstrap --variant=minbase`` plus the packages the on-prem package
depends on) and stores ``.cache/chroot/<name>.tar.gz`` with a ``.json`` record of how long the
build took and how big the result is; later runs only extract the tarball. The cache key covers
everything that shapes the root (suite, variant, packages, mirror, this file's format version),
so changing any of them builds a new tarball instead of reusing a stale one.

Commands run inside the root through ``unshare --mount`` + ``chroot``: the bind mounts of /dev
and /proc live in a private mount namespace and vanish with the process, so nothing is left
mounted on the host even if a test is interrupted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = ROOT / ".cache" / "chroot"
SUITE = "bookworm"
VARIANT = "minbase"
MIRROR = os.environ.get("TUNNELHUB_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the on-prem package depends on; everything else comes from the minbase variant.
# iproute2 and python3: the quick-ACK route helper (onprem.tcp_quickack, on by default).
PACKAGES = ("autossh", "openssh-client", "systemd", "iproute2", "python3")
FORMAT_VERSION = 1
BUILD_TIMEOUT_S = 1800  # debootstrap downloads ~120 packages; generous for a slow mirror


@dataclass(frozen=True)
class CachedRoot:
    tarball: Path
    build_seconds: float | None
    """How long the debootstrap build took (None when it was not recorded)."""
    size_bytes: int
    built_now: bool


def cache_name() -> str:
    key = json.dumps([SUITE, VARIANT, sorted(PACKAGES), MIRROR, FORMAT_VERSION]).encode()
    return f"debian-{SUITE}-{VARIANT}-{hashlib.sha256(key).hexdigest()[:12]}"


def ensure_cached_root() -> CachedRoot:
    """Return the cached root tarball, building it first when it is missing."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    name = cache_name()
    tarball = CACHE_DIR / f"{name}.tar.gz"
    record = CACHE_DIR / f"{name}.json"
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second test run waits instead of building twice
        built_now = False
        if not tarball.exists():
            _build(tarball, record)
            built_now = True
    info = json.loads(record.read_text()) if record.exists() else {}
    return CachedRoot(tarball, info.get("build_seconds"), tarball.stat().st_size, built_now)


def _build(tarball: Path, record: Path) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tunnelhub-debootstrap-", dir=CACHE_DIR) as tmp:
        target = Path(tmp) / "root"
        subprocess.run(
            ["debootstrap", f"--variant={VARIANT}", "--include=" + ",".join(PACKAGES), SUITE, str(target), MIRROR],
            check=True, stdout=subprocess.DEVNULL, timeout=BUILD_TIMEOUT_S,
        )
        # Downloaded .debs and package lists are not needed to install a local .deb.
        for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_Packages", "var/log/*.log"):
            for path in target.glob(pattern):
                path.unlink()
        debootstrap_seconds = time.monotonic() - started
        partial = Path(tmp) / "root.tar.gz"
        subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(target), "-czf", str(partial), "."],
            check=True, timeout=BUILD_TIMEOUT_S,
        )
        os.replace(partial, tarball)
    record.write_text(json.dumps({
        "build_seconds": round(time.monotonic() - started, 1),
        "debootstrap_seconds": round(debootstrap_seconds, 1),
        "size_bytes": tarball.stat().st_size,
        "suite": SUITE, "variant": VARIANT, "packages": list(PACKAGES), "mirror": MIRROR,
    }, indent=2) + "\n")


def extract(tarball: Path, dest: Path) -> Path:
    """Unpack a cached root into ``dest`` (owners, modes and device nodes kept)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(dest), "-xzpf", str(tarball)], check=True)
    return dest


class Chroot:
    """Run commands inside an extracted root (optionally inside a network namespace)."""

    _SCRIPT = (
        'set -e; r="$1"; shift; '
        'mount --bind /dev "$r/dev"; mount -t proc proc "$r/proc"; '
        'exec chroot "$r" "$@"'
    )
    _ENV: ClassVar[dict[str, str]] = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}

    def __init__(self, root: Path):
        self.root = root

    def argv(self, argv: tuple[str, ...] | list[str], netns: str | None = None) -> list[str]:
        inner = ["unshare", "--mount", "--propagation", "private", "--fork",
                 "sh", "-c", self._SCRIPT, "sh", str(self.root), *argv]
        return (["ip", "netns", "exec", netns] if netns else []) + inner

    def run(self, *argv: str, check: bool = True, env: dict[str, str] | None = None,
            netns: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run(
            self.argv(argv, netns), check=False, capture_output=True, text=True,
            env={**self._ENV, **(env or {})}, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"in chroot: {' '.join(argv)} exited {result.returncode}\n"
                f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
            )
        return result

    def popen(self, argv: list[str], *, env: dict[str, str] | None = None, netns: str | None = None,
              **kwargs) -> subprocess.Popen:
        """Start a long-running command in its own process group (stop it with ``os.killpg``)."""
        return subprocess.Popen(self.argv(argv, netns), env={**self._ENV, **(env or {})},
                                start_new_session=True, **kwargs)

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def install_file(self, source: Path, inside: str) -> str:
        dest = self.path(inside)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        return inside
