"""Fixtures for the network-namespace lab (``pytest tests/e2e -m e2e``, as root).

Each e2e test gets a fresh :class:`nslab.lab.Lab`: its namespaces, daemons and temporary files
are removed when the test ends, pass or fail; on failure the tail of every daemon's log is
printed (and the work directory is kept, its path printed).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nslab.lab import Lab  # noqa: E402
from nslab.proc import interrupt_on_sigterm  # noqa: E402

REQUIRED_BINARIES = ("ip", "nft", "ss", "sshd", "ssh", "ssh-keygen", "autossh", "socat",
                     "haproxy", "mariadbd", "mariadb-install-db", "mariadb", "useradd")


def _missing_binaries() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in REQUIRED_BINARIES if shutil.which(b, path=path) is None]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def lab_requirements() -> None:
    if os.geteuid() != 0:
        pytest.skip("the e2e lab needs root (network namespaces, useradd, nftables)")
    missing = _missing_binaries()
    if missing:
        pytest.skip(f"the e2e lab needs these programs: {', '.join(missing)} "
                    "(Debian: openssh-server autossh socat haproxy mariadb-server nftables "
                    "iproute2)")


@pytest.fixture
def lab(request, lab_requirements):  # type: ignore[no-untyped-def]
    """A two-proxy lab; torn down after the test, logs printed when it failed."""
    marker = request.node.get_closest_marker("lab")
    options = dict(marker.kwargs) if marker else {}
    instance = Lab(**options)
    instance.open()
    try:
        yield instance
    finally:
        failed = any(
            getattr(request.node, f"rep_{when}", None) is not None
            and getattr(request.node, f"rep_{when}").failed
            for when in ("setup", "call")
        )
        if failed:
            sys.stdout.write("\n" + instance.logs_report() + "\n")
            sys.stdout.write(f"(lab work directory kept: {instance.workdir})\n")
        errors = instance.close(failed=failed)
        for line in instance.notes:
            sys.stdout.write(f"[lab] {line}\n")
        if errors:
            pytest.fail("lab teardown: " + "; ".join(errors))


def pytest_configure(config):  # type: ignore[no-untyped-def]
    interrupt_on_sigterm()
    config.addinivalue_line("markers", "lab(**options): options for the lab fixture "
                            "(proxies=, client_to_db=, tunnel_user=)")
