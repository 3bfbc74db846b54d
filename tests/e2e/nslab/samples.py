"""Load the SAMPLE artifacts in ``tests/e2e/samples/`` (stand-ins for the generated ones)."""

from __future__ import annotations

from pathlib import Path

from .lab import Lab

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"
SAMPLE_UNIT_VM_PATH = "/lib/systemd/system/tunnelhub-lab@.service"
SAMPLE_KEY_VM_PATH = "/var/lib/tunnelhub/lab/id_ed25519"


def sample_proxy_user_data(tunnel_public_key: str) -> str:
    text = (SAMPLES_DIR / "proxy.cloud-init.yaml").read_text()
    return text.replace("@TUNNEL_PUBLIC_KEY@", tunnel_public_key)


def sample_onprem_files(lab: Lab) -> dict[str, bytes | str]:
    """The tunnel host's files: unit, one env file per slot, known_hosts, client key."""
    key_path, _ = lab.key("tunnel_ed25519")
    env_template = (SAMPLES_DIR / "onprem" / "slot.env.in").read_text()
    files: dict[str, bytes | str] = {
        SAMPLE_UNIT_VM_PATH: (SAMPLES_DIR / "onprem" / "tunnelhub-lab@.service").read_text(),
        "/etc/tunnelhub/lab/known_hosts": lab.known_hosts(),
        SAMPLE_KEY_VM_PATH: key_path.read_bytes(),
    }
    for slot, proxy in enumerate(lab.proxy_names, 1):
        files[f"/etc/tunnelhub/lab/slot-{slot}.env"] = (
            env_template.replace("@PROXY_HOST@", lab.topology.ip(proxy, "onprem"))
                        .replace("@DB_HOST@", lab.db_host)
        )
    return files
