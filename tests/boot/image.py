"""The bootable Debian 12 image the boot scenarios run: proxies and the tunnel host.

Built from Debian's archive with debootstrap (``--variant=minbase``) the first time the boot
tests run on a machine, then cached like the on-prem chroot (``tests/chroot/debian_root.py``):
``.cache/boot/<name>.tar.gz``, its build record ``<name>.json`` (build seconds, size, packages)
and, for the containers' read-only overlay lower layer, the unpacked ``<name>.root/``.

Debian 12, because its systemd 252 boots on this machine's cgroup v1 hierarchy (systemd 256 and
later refuse v1). It holds what a cloud image would, plus everything the lab's namespaces cannot
download (they have no archive access, so the boot driver must find its packages installed and
move on, as on a cloud image that already has them):

- systemd, dbus, cloud-init, openssh-server, python3: what the proxies' cloud-init drives;
- every package the rendered cloud-init installs (:data:`tunnelhub.userdata.render.PACKAGES`,
  the boot driver's list: HAProxy) — :func:`missing_packages` checks a user data against it;
- what the on-prem package depends on (autossh, openssh-client, passwd, iproute2, python3), so
  the tunnel host's ``dpkg -i`` needs nothing from the archive;
- sudo and ca-certificates (a cloud image has both: cloud-init's ``sudo:`` rule and HTTPS).

The customization (:func:`customize`), each step a difference from a cloud image that the
``docs/boot.md`` table names:

- ``en_US.UTF-8`` generated: cloud-init's ``locale`` module sets it (the distribution default)
  and fails when the locale does not exist; Debian's and Ubuntu's cloud images have it.
- ``/etc/cloud/cloud.cfg.d/90-tunnelhub-lab.cfg``: the NoCloud datasource only (the seed is a
  directory in the container), and cloud-init's network configuration off (the lab configures
  the namespace's addresses, as the cloud's DHCP would).
- no SSH host keys and an empty ``/etc/machine-id``: made at first boot, per instance, as on a
  cloud image.
- ``apt-daily.timer`` and ``apt-daily-upgrade.timer`` masked: without an archive they would
  fail and leave the system "degraded" for a reason that is the lab's, not the product's.
- ``/etc/resolv.conf`` without a server: the lab has no DNS; the fake cloud's names are in each
  container's ``/etc/hosts``.
"""

from __future__ import annotations

import base64
import email
import gzip
import json
import os
from pathlib import Path

import yaml

from tests.chroot.debian_root import ROOT, CachedRoot, Chroot, Recipe, ensure_cached_root, ensure_extracted
from tunnelhub.userdata.render import PACKAGES as BOOT_PACKAGES

CACHE_DIR = ROOT / ".cache" / "boot"
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "cloud-init", "openssh-server", "openssh-client", "python3",
    # debootstrap does not resolve virtual packages: python3-cryptography (cloud-init's) needs
    # python3-cffi-backend-api-*, which only python3-cffi-backend provides.
    "python3-cffi-backend",
    "sudo", "ca-certificates", "locales", "iproute2", "procps", "netbase", "passwd",
    # the on-prem package's dependencies (the tunnel host runs the same image)
    "autossh",
)
PACKAGES = tuple(dict.fromkeys(BASE_PACKAGES + tuple(BOOT_PACKAGES)))
LOCALE = "en_US.UTF-8"
LAB_CLOUD_CFG = """\
# tunnelhub boot lab: the seed is a NoCloud directory; the lab configures the network namespace
# (as the cloud's DHCP would), so cloud-init writes no network configuration.
datasource_list: [NoCloud, None]
network: {config: disabled}
"""
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer")


def customize(target: Path) -> None:
    """Turn the debootstrapped root into the test image (see the module docstring)."""
    root = Chroot(target)
    (target / "etc/locale.gen").write_text(f"{LOCALE} UTF-8\n")
    root.run("locale-gen")
    (target / "etc/cloud/cloud.cfg.d/90-tunnelhub-lab.cfg").write_text(LAB_CLOUD_CFG)
    for key in (target / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (target / "etc/machine-id").write_text("")
    dbus_id = target / "var/lib/dbus/machine-id"
    if dbus_id.is_symlink() or dbus_id.exists():
        dbus_id.unlink()
    for unit in MASKED_UNITS:
        link = target / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        os.symlink("/dev/null", link)
    resolv = target / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text("# tunnelhub boot lab: no DNS server; the fake cloud's names are in /etc/hosts\n")


RECIPE = Recipe(name="boot-image", packages=PACKAGES, version=1, customize=customize, cache_dir=CACHE_DIR)


def ensure_image() -> tuple[CachedRoot, Path]:
    """The cached image (built now when missing) and its unpacked root (the overlay lower)."""
    cached = ensure_cached_root(RECIPE)
    return cached, ensure_extracted(cached)


def installed_packages(root: Path) -> set[str]:
    """Package names dpkg lists as installed in ``root`` (read from its status file)."""
    names, name = set(), None
    for line in (root / "var/lib/dpkg/status").read_text().splitlines():
        if line.startswith("Package: "):
            name = line.split(": ", 1)[1]
        elif line.startswith("Status: ") and line.endswith(" installed") and name:
            names.add(name)
    return names


def user_data_packages(user_data: bytes) -> list[str]:
    """Every package a proxy's user data installs: cloud-init's ``packages`` and the boot
    driver's ``packages`` (``/etc/tunnelhub/boot.json``), from the bytes the cloud delivers."""
    doc = cloud_config(user_data)
    wanted = [p if isinstance(p, str) else p[0] for p in doc.get("packages") or []]
    for entry in doc.get("write_files") or []:
        if entry.get("path") == "/etc/tunnelhub/boot.json":
            wanted += json.loads(entry["content"]).get("packages", [])
    return list(dict.fromkeys(wanted))


def missing_packages(root: Path, user_data: bytes) -> list[str]:
    have = installed_packages(root)
    return [p for p in user_data_packages(user_data) if p not in have]


def cloud_config(user_data: bytes) -> dict:
    """The cloud-config in user data as cloud-init reads it: gzip, MIME, ``#cloud-config``."""
    raw = gzip.decompress(user_data) if user_data[:2] == b"\x1f\x8b" else user_data
    if raw.lstrip().startswith((b"Content-Type:", b"MIME-Version:")):
        parts = [p.get_payload(decode=True) for p in email.message_from_bytes(raw).walk()
                 if p.get_content_type() in ("text/cloud-config", "text/x-cloud-config")]
        if len(parts) != 1:
            raise ValueError(f"expected one text/cloud-config MIME part, found {len(parts)}")
        return cloud_config(parts[0])
    if not raw.startswith(b"#cloud-config"):
        raise ValueError("user data is not #cloud-config (nor gzip or MIME)")
    return yaml.safe_load(raw)


def decode_custom_data(value: str) -> bytes:
    """What the VM receives for a base64 ``custom_data``/``user_data`` value (the cloud decodes
    base64; cloud-init itself handles gzip and MIME)."""
    return base64.b64decode(value, validate=True)
