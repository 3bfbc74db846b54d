"""A minimal Debian 12 root made with debootstrap, cached as a tarball between test runs.

The first run builds it (``debootstrap --variant=minbase`` plus the packages the on-prem package
depends on) and stores ``.cache/chroot/<name>.tar.gz`` with a ``.json`` record of how long the
build took and how big the result is; later runs only extract the tarball. The cache key covers
everything that shapes the root (suite, variant, packages, mirror, this file's format version,
and a recipe's own version), so changing any of them builds a new tarball instead of reusing a
stale one.

:class:`Recipe` names another root built the same way: the bootable image of ``tests/boot``
(``tests/boot/image.py``) is one, with more packages and a customization step run in the root
before it is packed.

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
from collections.abc import Callable
from dataclasses import dataclass, field
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
class Recipe:
    """What a cached root holds: debootstrap's ``--include`` list and a step run on the result.

    ``customize(target)`` runs after debootstrap (with :class:`Chroot` available for commands in
    the root); bump ``version`` whenever it changes, as it is part of the cache key.
    """

    name: str
    packages: tuple[str, ...]
    version: int = 1
    customize: Callable[[Path], None] | None = None
    cache_dir: Path = CACHE_DIR

    def key(self) -> str:
        key = json.dumps([SUITE, VARIANT, sorted(self.packages), MIRROR, FORMAT_VERSION, self.name,
                          self.version]).encode()
        return f"{self.name}-{SUITE}-{VARIANT}-{hashlib.sha256(key).hexdigest()[:12]}"


@dataclass(frozen=True)
class CachedRoot:
    tarball: Path
    build_seconds: float | None
    """How long the debootstrap build took (None when it was not recorded)."""
    size_bytes: int
    built_now: bool
    name: str = ""
    record: dict = field(default_factory=dict)
    """The build record: build and debootstrap seconds, size, suite, packages, mirror."""


def cache_name() -> str:
    """The on-prem root's cache name (its key predates :class:`Recipe`, kept so the cache stays)."""
    key = json.dumps([SUITE, VARIANT, sorted(PACKAGES), MIRROR, FORMAT_VERSION]).encode()
    return f"debian-{SUITE}-{VARIANT}-{hashlib.sha256(key).hexdigest()[:12]}"


def ensure_cached_root(recipe: Recipe | None = None) -> CachedRoot:
    """Return the cached root tarball (the on-prem root, or ``recipe``'s), building it first
    when it is missing."""
    cache_dir = CACHE_DIR if recipe is None else recipe.cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = cache_name() if recipe is None else recipe.key()
    packages = PACKAGES if recipe is None else recipe.packages
    tarball = cache_dir / f"{name}.tar.gz"
    record = cache_dir / f"{name}.json"
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second test run waits instead of building twice
        built_now = False
        if not tarball.exists():
            _build(tarball, record, packages, None if recipe is None else recipe.customize)
            built_now = True
    info = json.loads(record.read_text()) if record.exists() else {}
    return CachedRoot(tarball, info.get("build_seconds"), tarball.stat().st_size, built_now, name, info)


def _build(tarball: Path, record: Path, packages: tuple[str, ...] = PACKAGES,
           customize: Callable[[Path], None] | None = None) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tunnelhub-debootstrap-", dir=tarball.parent) as tmp:
        target = Path(tmp) / "root"
        subprocess.run(
            ["debootstrap", f"--variant={VARIANT}", "--include=" + ",".join(packages), SUITE, str(target), MIRROR],
            check=True, stdout=subprocess.DEVNULL, timeout=BUILD_TIMEOUT_S,
        )
        debootstrap_seconds = time.monotonic() - started
        if customize is not None:
            customize(target)
        # Downloaded .debs and package lists are not needed to install a local .deb.
        for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_Packages", "var/log/*.log"):
            for path in target.glob(pattern):
                path.unlink()
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
        "suite": SUITE, "variant": VARIANT, "packages": list(packages), "mirror": MIRROR,
    }, indent=2) + "\n")


def ensure_extracted(cached: CachedRoot) -> Path:
    """The cached root unpacked beside its tarball, once (``<name>.root/``), for read-only use
    as an overlay's lower layer: later runs skip the extraction. Rebuilt when the tarball is
    newer than the unpacked copy."""
    dest = cached.tarball.with_name(cached.tarball.name.removesuffix(".tar.gz") + ".root")
    marker = dest.with_name(dest.name + ".complete")
    with open(cached.tarball.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.stat().st_mtime >= cached.tarball.stat().st_mtime:
            return dest
        partial = dest.with_name(dest.name + ".partial")
        for stale in (partial, dest):
            if stale.exists():
                shutil.rmtree(stale)
        marker.unlink(missing_ok=True)
        extract(cached.tarball, partial)
        os.replace(partial, dest)
        marker.write_text(cached.tarball.name + "\n")
    return dest


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
