"""Skip the boot scenarios, with the reason, where they cannot run."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRED = ("systemd-nspawn", "nsenter", "debootstrap", "ip", "nft", "ss", "haproxy", "mariadbd",
            "mariadb-install-db", "ssh-keygen", "mount", "umount")


def require_boot() -> None:
    if os.geteuid() != 0:
        pytest.skip("the boot scenarios need root (network namespaces, overlay mounts, systemd-nspawn)")
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin"
    missing = [b for b in REQUIRED if shutil.which(b, path=path) is None]
    if missing:
        pytest.skip(f"the boot scenarios need {', '.join(missing)} (Debian: systemd-container debootstrap "
                    "util-linux haproxy mariadb-server nftables iproute2 openssh-client; make test installs them)")
