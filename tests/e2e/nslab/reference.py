"""The reference design, run from its own files (``tests/e2e/reference/``) as negative controls.

Proxy: stock sshd (no drop-in), the tunnel key in ``authorized_keys`` without options (as
``ssh-copy-id`` leaves it), the socat bridge unit and the TCP-connect health check unit, both
verbatim and run by the same unit runner as tunnelhub's units. Tunnel host: the blog's autossh
unit for proxy 1 with its placeholders filled in (``Restart=always``, ``RestartSec=10``).
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from .lab import Lab, ProxyRuntime
from .unit import ServiceRunner, load_unit

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "reference"
HEALTH_SCRIPT_VM_PATH = "/usr/local/bin/tunnel-health-check.py"
REFERENCE_HEALTH_PORT = 8080  # hard-coded in tunnel-health-check.py


def _reference_key(lab: Lab) -> tuple[Path, str]:
    # The blog: ssh-keygen -t rsa -b 4096 -f ~/.ssh/id_rsa_tunnel -N ""
    return lab.key("id_rsa_tunnel", key_type="rsa", bits=4096)


def start_reference_proxy(lab: Lab, proxy: str) -> ProxyRuntime:
    key_path, public_key = _reference_key(lab)
    ref_dir = lab.path(proxy, "reference")
    ref_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(ref_dir, 0o755)
    authorized_keys = ref_dir / "authorized_keys"
    authorized_keys.write_text(public_key + "\n")
    user = pwd.getpwnam(lab.tunnel_user)
    os.chown(authorized_keys, user.pw_uid, user.pw_gid)
    os.chmod(authorized_keys, 0o600)
    sshd = lab.start_sshd(proxy, authorized_keys=authorized_keys)
    runtime = ProxyRuntime(name=proxy, sshd=sshd)
    runtime.services["socat"] = lab.run_service(
        proxy, load_unit(REFERENCE_DIR / "socat-db-proxy.service"), name=f"{proxy}-socat")
    runtime.services["health"] = start_reference_health_check(lab, proxy)
    lab.proxies[proxy] = runtime
    return runtime


def start_reference_health_check(lab: Lab, proxy: str) -> ServiceRunner:
    """The reference's TCP-connect health check (port 8080, a connect to ``127.0.0.1:13306`` per
    request), verbatim, on ``proxy``: beside tunnelhub's own on the lab hub's proxies, whose tunnel
    port is also 13306, it is the reference probe under the same conditions."""
    health_unit = load_unit(
        REFERENCE_DIR / "tunnel-health-check.service",
        path_map={HEALTH_SCRIPT_VM_PATH: str(REFERENCE_DIR / "tunnel-health-check.py")},
    )
    return lab.run_service(proxy, health_unit, name=f"{proxy}-reference-health")


def reference_tunnel_unit(lab: Lab, proxy: str) -> Path:
    """The blog's ``ssh-tunnel-proxy1.service`` with its placeholders filled in for ``proxy``."""
    text = (REFERENCE_DIR / "ssh-tunnel-proxy1.service").read_text()
    text = (text.replace("<user>", lab.tunnel_user)
                .replace("<db-ip>", lab.db_host)
                .replace("<proxy-vm-1-ip>", lab.topology.ip(proxy, "onprem")))
    path = lab.path("onprem", f"ssh-tunnel-{proxy}.service")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def start_reference_tunnel(lab: Lab, proxy: str) -> ServiceRunner:
    key_path, _ = _reference_key(lab)
    unit_path = reference_tunnel_unit(lab, proxy)
    known_hosts = lab.path("onprem", "reference_known_hosts")
    command = load_unit(
        unit_path,
        path_map={f"/home/{lab.tunnel_user}/.ssh/id_rsa_tunnel": str(key_path)},
        insert_args=["-o", f"UserKnownHostsFile={known_hosts}"],
    )
    runner = lab.run_service("onprem", command, name=f"onprem-tunnel-{proxy}")
    lab.tunnels[proxy] = runner
    return runner
