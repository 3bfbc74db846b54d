"""Lab fixtures shared by the e2e modules: skip when the lab cannot run, one lab per module."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator

import pytest

from .lab import Lab

REQUIRED_BINARIES = ("ip", "nft", "ss", "sshd", "ssh", "ssh-keygen", "autossh", "socat",
                     "haproxy", "mariadbd", "mariadb-install-db", "mariadb", "useradd")


def _missing_binaries() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in REQUIRED_BINARIES if shutil.which(b, path=path) is None]


def require_lab() -> None:
    """Skip (with the reason) unless the lab can run here."""
    if os.geteuid() != 0:
        pytest.skip("the e2e lab needs root (network namespaces, useradd, nftables)")
    missing = _missing_binaries()
    if missing:
        pytest.skip(f"the e2e lab needs these programs: {', '.join(missing)} "
                    "(Debian: openssh-server autossh socat haproxy mariadb-server nftables "
                    "iproute2)")


def module_lab(request: pytest.FixtureRequest, make: Callable[[], Lab]) -> Iterator[Lab]:
    """A lab shared by a module's tests (a module-scoped fixture yields from this): logs
    printed and the directory kept when any of the module's tests failed."""
    require_lab()
    instance = make()
    failed_before = request.session.testsfailed
    instance.open()
    try:
        yield instance
    finally:
        close_lab(instance, failed=request.session.testsfailed > failed_before)


def close_lab(instance: Lab, *, failed: bool) -> None:
    """Tear a lab down: every daemon's log tail and the kept directory printed when it failed,
    the lab's notes printed, a teardown error failing the test."""
    if failed:
        sys.stdout.write("\n" + instance.logs_report() + "\n")
        sys.stdout.write(f"(lab work directory kept: {instance.workdir})\n")
    errors = instance.close(failed=failed)
    for line in instance.notes:
        sys.stdout.write(f"[lab] {line}\n")
    if errors:
        pytest.fail("lab teardown: " + "; ".join(errors))


