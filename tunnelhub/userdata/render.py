"""The proxy VMs' bootstrap cloud-init, rendered from a resolved hub.

``render_cloud_init(hub, slot)`` returns the :class:`UserData` the hub stacks embed: Azure gives
every proxy its own (``slot`` = the proxy index), AWS one for the launch template (``slot`` None:
the instance learns its slot at boot from the tag the lifecycle Lambda sets).

The bootstrap is **static per machine shape**: it holds what a proxy is (users, packages, the
sshd hardening, the sysctl drop-in, HAProxy's static part, the units, the scripts, where the host
key and the live configuration come from), never a route, a tunnel key or a probe setting. Those
are the hub configuration document (:mod:`tunnelhub.userdata.document`), which the reconciler
(``files/tunnelhub_reconcile.py``) fetches and applies at boot and whenever it changes, so a
routine change never touches the user data and never replaces a proxy (docs/live-config.md).

What a proxy runs (see docs/proxy-runtime.md): HAProxy in TCP mode with one listener per route;
the per-route health endpoint (``files/tunnelhub_health.py``); sshd hardened by a drop-in, with the
tunnel user limited to remote forwards on its routes' loopback ports; the hub SSH host key fetched
at boot from Key Vault / SSM (``files/tunnelhub_fetch_host_key.py``); on AWS the wait for the slot
(``files/tunnelhub_aws_slot.py``); the reconciler; all driven once by ``files/tunnelhub_boot.py``.

Templates hold the text (``templates/``), this module the decisions. The scripts are real files,
embedded verbatim, or (when even gzip does not fit AWS's 16 KB) with comments and docstrings
blanked out by :func:`tunnelhub.userdata.compact.compact_python`, which keeps every line number.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from ipaddress import ip_address

import jinja2
import yaml

from tunnelhub.spec import Hub
from tunnelhub.userdata import layout as L
from tunnelhub.userdata.compact import compact_python

# ---------------------------------------------------------------------------------------------
# The contract with the hub stacks, the on-prem package and the lab
# ---------------------------------------------------------------------------------------------

USER_DATA_LIMIT_BYTES = {"aws": 16384, "azure": 65535}
"""AWS: 16 KB of user data before base64. Azure: custom data decodes to at most 65535 bytes."""
AWS_SLOT_TAG = "tunnelhub:slot"
"""Instance tag the AWS lifecycle Lambda sets to the slot number (read from instance metadata)."""
AWS_SLOT_COUNT_TAG = "tunnelhub:slot-count"
AWS_SLOT_ADDRESSES_TAG = "tunnelhub:slot-private-ips"
"""AWS: tags the Auto Scaling group propagates to every instance it launches (proxies.count and
the slots' fixed private addresses): the slot wait reads them from instance metadata, so a new
proxy count changes the group's tags, never the launch template's user data."""
AZURE_HOST_KEY_TAG = "tunnelhub-host-key-secret"
"""Azure VM tag holding the Key Vault secret URL of the hub host key."""
SLOT_WAIT_TIMEOUT_S = 600
HOST_KEY_TIMEOUT_S = 900
INSTALL_TIMEOUT_S = 900
RECONCILE_INTERVAL_S = 5.0
"""How often the reconciler fetches the document (Azure IMDS: local; AWS: one conditional S3 GET)."""
RECONCILE_GATE_POLL_S = 1.0
RECONCILE_BOOT_TIMEOUT_S = 600
PACKAGES = ("haproxy",)

LIB_DIR = L.LIB_DIR
CONF_DIR = L.CONF_DIR
HEALTH_DAEMON_PATH = L.HEALTH_DAEMON_PATH
HEALTH_CONFIG_PATH = L.HEALTH_CONFIG_PATH
BOOT_SCRIPT_PATH = L.BOOT_SCRIPT_PATH
BOOT_CONFIG_PATH = L.BOOT_CONFIG_PATH
RECONCILER_PATH = L.RECONCILER_PATH
RECONCILE_CONFIG_PATH = L.RECONCILE_CONFIG_PATH
HAPROXY_CONFIG_PATH = L.HAPROXY_CONFIG_PATH
SSHD_DROPIN_PATH = L.SSHD_DROPIN_PATH
TUNNEL_AUTHORIZED_KEYS_DIR = L.TUNNEL_AUTHORIZED_KEYS_DIR
SYSCTL_DROPIN_PATH = L.SYSCTL_DROPIN_PATH
HEALTH_UNIT_PATH = L.HEALTH_UNIT_PATH
HAPROXY_UNIT_DROPIN_PATH = L.HAPROXY_UNIT_DROPIN_PATH
HOST_KEY_PATH = L.HOST_KEY_PATH
NOLOGIN = L.NOLOGIN
UNITS = (L.HAPROXY_UNIT, L.HEALTH_UNIT)
"""Started by the boot driver once the first document is applied (the reconciler's own unit too)."""
REMOTE_SCRIPTS = ("tunnelhub_health.py", "tunnelhub_reconcile.py")
"""AWS: the scripts moved to the hub's bucket when the user data does not fit (the largest)."""

# Data plane and half-open bounds (docs/proxy-runtime.md explains the numbers).
CONNECT_TIMEOUT_S = 5
RETRIES = 2
DNS_HOLD_VALID_S = 10
GLOBAL_MAXCONN_CAP = 262144  # HAProxy asks for ~2 fds per connection; stay under nr_open (1048576)
OLD_WORKER_BOUND = "7d"
"""hard-stop-after: how long an old HAProxy worker may keep its connections after a reload."""
MAX_RELOADS = 50
"""mworker-max-reloads: an old worker that outlived this many reloads is stopped."""
TCP_RETRIES2 = 5
TCP_RTO_MIN_S = 0.2
CLIENT_ALIVE_INTERVAL_S = 10
CLIENT_ALIVE_COUNT_MAX = 3

_FILES = resources.files("tunnelhub.userdata") / "files"
_TEMPLATES = resources.files("tunnelhub.userdata") / "templates"


class UserDataError(ValueError):
    """The user data cannot be rendered as asked (a bad slot, or it does not fit the cloud's limit)."""


@dataclass(frozen=True)
class S3Object:
    """A file kept in the hub's S3 bucket instead of the user data (AWS, when it does not fit)."""

    key: str
    """Object key, content-addressed: ``proxy/<sha256>/<name>``."""
    content: bytes
    sha256: str
    path: str
    """Where the proxy writes it."""
    permissions: str


@dataclass(frozen=True)
class UserData:
    """Rendered cloud-init user data for one proxy (Azure) or one launch template (AWS)."""

    cloud_config: str
    """The cloud-config YAML, starting ``#cloud-config``."""
    payload: bytes
    """What goes to the cloud: the YAML, gzip-compressed when it would not fit otherwise."""
    gzipped: bool
    size_bytes: int
    """``len(payload)``, the figure the cloud's limit applies to."""
    base64: str
    """``payload`` base64-encoded: azurerm ``custom_data`` / aws_launch_template ``user_data``."""
    limit_bytes: int
    """The cloud's limit on ``size_bytes``."""
    scripts_compacted: bool
    """True when the Python scripts are embedded without comments and docstrings (to fit)."""
    s3_objects: tuple[S3Object, ...] = ()
    """AWS: objects the hub stack must upload to its files bucket (:func:`files_bucket_name`); the
    proxy fetches them at boot and checks their sha256. Empty when everything is embedded."""


@dataclass(frozen=True)
class VmFile:
    """One file cloud-init writes (``write_files``)."""

    path: str
    content: str
    permissions: str
    owner: str = "root:root"


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def render_cloud_init(hub: Hub, slot: int | None) -> UserData:
    """The cloud-init user data of ``hub``'s proxies; ``slot``: the Azure proxy index, None on AWS.

    The first of these that fits the cloud's limit wins: everything embedded as is (plain, then
    gzip); on AWS, the health daemon and the reconciler moved to the hub's S3 bucket
    (``s3_objects``, fetched and checksum-verified at boot); finally the embedded scripts
    compacted. Raises
    :class:`UserDataError` for a slot that does not fit the cloud, or when nothing fits.
    """
    _check_slot(hub, slot)
    limit = USER_DATA_LIMIT_BYTES[hub.cloud]
    attempts = [(False, False), (True, False), (True, True)] if hub.cloud == "aws" else [(False, False), (False, True)]
    size = 0
    for remote, compacted in attempts:
        plan = _plan(hub, slot, compacted=compacted, remote=remote)
        text = _render(hub, slot, plan)
        raw = text.encode("utf-8")
        for payload, gzipped in ((raw, False), (gzip.compress(raw, compresslevel=9, mtime=0), True)):
            size = len(payload)
            if size <= limit:
                return UserData(
                    cloud_config=text, payload=payload, gzipped=gzipped, size_bytes=size,
                    base64=base64.b64encode(payload).decode("ascii"), limit_bytes=limit,
                    scripts_compacted=compacted, s3_objects=tuple(plan.s3_objects),
                )
    raise UserDataError(
        f"hub {hub.name}: the proxy user data is {size} bytes even gzip-compressed with compacted "
        f"scripts, over the {hub.cloud} limit of {limit} bytes; fewer routes or keys would make it fit"
    )


def _check_slot(hub: Hub, slot: int | None) -> None:
    if hub.cloud == "aws":
        if slot is not None:
            raise UserDataError(
                f"hub {hub.name} is an aws hub: its proxies share one launch template and learn their slot "
                f"at boot (tag {AWS_SLOT_TAG}); render it without a slot"
            )
        return
    count = hub.proxies.count
    if slot is None or isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < count:
        raise UserDataError(
            f"hub {hub.name} is an azure hub: give the proxy's slot, 0 to {count - 1} "
            f"(proxies.count is {count}); got {slot!r}"
        )


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The templates' jinja2 environment (strict: a missing variable is an error)."""
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: (_TEMPLATES / name).read_text(encoding="utf-8")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["literal_block"] = literal_block
    return env


@dataclass(frozen=True)
class _Plan:
    files: list[VmFile]
    s3_objects: list[S3Object]


def _plan(hub: Hub, slot: int | None, *, compacted: bool, remote: bool) -> _Plan:
    files = vm_files(hub, slot, compacted=compacted)
    objects: list[S3Object] = []
    if remote:
        for name in REMOTE_SCRIPTS:
            script = next(f for f in files if f.path == f"{LIB_DIR}/{name}")
            content = (_FILES / name).read_bytes()
            digest = hashlib.sha256(content).hexdigest()
            objects.append(S3Object(key=f"proxy/{digest}/{name}", content=content, sha256=digest,
                                    path=script.path, permissions=script.permissions))
        moved = {o.path for o in objects}
        files = [f for f in files if f.path not in moved]
        config = json.loads(next(f for f in files if f.path == BOOT_CONFIG_PATH).content)
        config["remote_files"] = [{"path": o.path, "key": o.key, "sha256": o.sha256, "permissions": o.permissions}
                                  for o in objects]
        files = [VmFile(f.path, json.dumps(config, indent=2) + "\n", f.permissions, f.owner)
                 if f.path == BOOT_CONFIG_PATH else f for f in files]
    return _Plan(files, objects)


def _render(hub: Hub, slot: int | None, plan: _Plan) -> str:
    text = environment().get_template("cloud-config.yaml.j2").render(
        hub_name=hub.name,
        cloud=hub.cloud,
        slot_text=f"slot {slot}" if slot is not None else "slot assigned at boot",
        host_key_store="Azure Key Vault" if hub.cloud == "azure" else "SSM Parameter Store",
        admin={"name": hub.proxies.admin_username, "ssh_keys": list(hub.proxies.admin_ssh_public_keys)},
        tunnel_user=hub.onprem.tunnel_user,
        nologin=NOLOGIN,
        files=plan.files,
        boot_script=BOOT_SCRIPT_PATH,
        boot_config=BOOT_CONFIG_PATH,
    )
    _check_round_trip(text, plan.files)
    return text


def vm_files(hub: Hub, slot: int | None, *, compacted: bool = False) -> list[VmFile]:
    """Every file the cloud-init writes, in write order (the lab extracts these)."""
    env = environment()

    def template(name: str, **values) -> str:
        return env.get_template(name).render(**values)

    def script(name: str) -> str:
        source = (_FILES / name).read_text(encoding="utf-8")
        return compact_python(source, name) if compacted else source

    reconcile = reconcile_config(hub, slot)
    files = [
        VmFile(SYSCTL_DROPIN_PATH, sysctl_conf(), "0644"),
        VmFile(SSHD_DROPIN_PATH, sshd_dropin(hub), "0644"),
        VmFile(HAPROXY_CONFIG_PATH, haproxy_base_config(hub), "0644"),
        VmFile(BOOT_CONFIG_PATH, json.dumps(boot_config(hub, slot), indent=2) + "\n", "0644"),
        VmFile(RECONCILE_CONFIG_PATH, json.dumps(reconcile, indent=2) + "\n", "0644"),
        VmFile(HEALTH_UNIT_PATH, template(
            "tunnelhub-health.service.j2", health_port=hub.proxies.health_port,
            privileged_port=hub.proxies.health_port < 1024, daemon_path=HEALTH_DAEMON_PATH,
            config_path=HEALTH_CONFIG_PATH, status_path=L.RECONCILE_STATUS_PATH), "0644"),
        VmFile(L.RECONCILE_UNIT_PATH, template(
            "tunnelhub-reconcile.service.j2", script=RECONCILER_PATH, config=RECONCILE_CONFIG_PATH,
            interval_s=f"{RECONCILE_INTERVAL_S:g}",
            source="the VM's user data (Azure IMDS)" if hub.cloud == "azure" else "the hub's S3 bucket"), "0644"),
        VmFile(HAPROXY_UNIT_DROPIN_PATH, template(
            "haproxy-tunnelhub.conf.j2", haproxy=L.HAPROXY, base=HAPROXY_CONFIG_PATH, routes=L.HAPROXY_ROUTES_PATH,
            pid_file=L.HAPROXY_PID_FILE, master_socket=L.HAPROXY_MASTER_SOCKET), "0644"),
        VmFile(HEALTH_DAEMON_PATH, script("tunnelhub_health.py"), "0755"),
        VmFile(RECONCILER_PATH, script("tunnelhub_reconcile.py"), "0755"),
        VmFile(BOOT_SCRIPT_PATH, script("tunnelhub_boot.py"), "0755"),
        VmFile(f"{LIB_DIR}/tunnelhub_fetch_host_key.py", script("tunnelhub_fetch_host_key.py"), "0755"),
    ]
    if hub.cloud == "aws":
        files.append(VmFile(f"{LIB_DIR}/tunnelhub_aws_slot.py", script("tunnelhub_aws_slot.py"), "0755"))
        files.append(VmFile(f"{LIB_DIR}/tunnelhub_fetch_files.py", script("tunnelhub_fetch_files.py"), "0755"))
    return files


# ---------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------


def files_bucket_name(hub_name: str, account_id: str, region: str) -> str:
    """AWS: the hub's files bucket; the proxy derives the same name from its identity document."""
    return f"tunnelhub-{hub_name}-{account_id}-{region}"


def host_key_parameter_name(hub: Hub) -> str:
    """AWS: the SSM SecureString parameter holding the hub's SSH host private key."""
    return f"/tunnelhub/{hub.name}/ssh-host-ed25519-key"


def tunnel_authorized_keys_path(hub: Hub) -> str:
    return f"{TUNNEL_AUTHORIZED_KEYS_DIR}/{hub.onprem.tunnel_user}"


def allowed_users(hub: Hub) -> list[str]:
    users = [hub.proxies.admin_username, hub.onprem.tunnel_user]
    if hub.cloud == "aws" and hub.aws is not None and hub.aws.key_pair_name:
        users.append("ubuntu")  # the EC2 key pair is installed for the image's default user
    return users


def sshd_dropin(hub: Hub) -> str:
    """The static sshd drop-in: hardening, and the tunnel user's ``Match`` block, which includes
    the live forwarding rules (:data:`tunnelhub.userdata.layout.SSHD_TUNNEL_FORWARDING_PATH`)."""
    return environment().get_template("sshd_tunnelhub.conf.j2").render(
        allow_users=allowed_users(hub),
        client_alive_interval_s=CLIENT_ALIVE_INTERVAL_S,
        client_alive_count_max=CLIENT_ALIVE_COUNT_MAX,
        tunnel_user=hub.onprem.tunnel_user,
        authorized_keys_path=tunnel_authorized_keys_path(hub),
        forwarding_path=L.SSHD_TUNNEL_FORWARDING_PATH,
        nologin=NOLOGIN,
    )


def sysctl_conf() -> str:
    return environment().get_template("sysctl.conf.j2").render(
        tcp_retries2=TCP_RETRIES2, tcp_give_up_s=f"{tcp_give_up_s():.1f}")


def tcp_give_up_s(retries2: int = TCP_RETRIES2) -> float:
    """How long Linux retransmits before it drops a connection (RTO from its 200 ms floor)."""
    return TCP_RTO_MIN_S * (2 ** (retries2 + 1) - 1)


def haproxy_address(host: str, port: int) -> str:
    try:
        if ip_address(host).version == 6:
            return f"ipv6@{host}:{port}"
        return f"{host}:{port}"
    except ValueError:
        return f"{host}:{port}"


def is_name(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return True
    return False


def haproxy_base_config(hub: Hub) -> str:
    """HAProxy's static part (global settings and defaults); the routes file follows it."""
    return environment().get_template("haproxy.cfg.j2").render(
        hub_name=hub.name,
        routes_path=L.HAPROXY_ROUTES_PATH,
        retries=RETRIES,
        connect_timeout_s=CONNECT_TIMEOUT_S,
        old_worker_bound=OLD_WORKER_BOUND,
        max_reloads=MAX_RELOADS,
    )


def haproxy_check_command(routes_path: str = L.HAPROXY_ROUTES_PATH) -> list[str]:
    """``haproxy -c`` of both files, as the unit's ExecReload runs it."""
    return [L.HAPROXY, "-c", "-q", "-f", HAPROXY_CONFIG_PATH, "-f", routes_path]


def boot_config(hub: Hub, slot: int | None) -> dict:
    """``/etc/tunnelhub/boot.json`` for ``files/tunnelhub_boot.py``."""
    host_key: dict = {"source": "azure-keyvault", "timeout_s": HOST_KEY_TIMEOUT_S}
    slot_wait = None
    if hub.cloud == "aws":
        host_key = {"source": "aws-ssm", "parameter": host_key_parameter_name(hub), "timeout_s": HOST_KEY_TIMEOUT_S}
        slot_wait = {
            # proxies.count and the slots' fixed private addresses come from the instance's tags (the
            # Auto Scaling group propagates them), not from here: a new count must not change the
            # launch template. Every AWS slot has a fixed private address (the NLB's targets).
            "count_tag": AWS_SLOT_COUNT_TAG,
            "private_ips_tag": AWS_SLOT_ADDRESSES_TAG,
            "tag": AWS_SLOT_TAG,
            "timeout_s": SLOT_WAIT_TIMEOUT_S,
            "require_public_ipv4": hub.egress == "slot_eip",
        }
    return {
        "hub": hub.name,
        "cloud": hub.cloud,
        "slot": slot,
        "sysctl_file": SYSCTL_DROPIN_PATH,
        "haproxy_check": haproxy_check_command(),
        "packages": list(PACKAGES),
        "install_timeout_s": INSTALL_TIMEOUT_S,
        "reconciler": {"script": RECONCILER_PATH, "config": RECONCILE_CONFIG_PATH,
                       "timeout_s": RECONCILE_BOOT_TIMEOUT_S},
        "units": list(UNITS),
        "reconcile_unit": L.RECONCILE_UNIT,
        "host_key": host_key,
        "slot_wait": slot_wait,
    }


def reconcile_config(hub: Hub, slot: int | None) -> dict:
    """``/etc/tunnelhub/reconcile.json`` for ``files/tunnelhub_reconcile.py`` (every option is
    documented in the reconciler's docstring and docs/live-config.md)."""
    if hub.cloud == "azure":
        source: dict = {"type": "azure-imds", "url": L.AZURE_USER_DATA_URL}
    else:
        source = {"type": "aws-s3", "key": L.AWS_DOCUMENT_KEY, "imds_url": L.AWS_IMDS_URL}
    return {
        "hub": hub.name,
        "slot": slot,
        "slot_file": L.SLOT_FILE if hub.cloud == "aws" else None,
        "tunnel_user": hub.onprem.tunnel_user,
        "health_port": hub.proxies.health_port,
        "interval_s": RECONCILE_INTERVAL_S,
        "gate_poll_s": RECONCILE_GATE_POLL_S,
        "boot_timeout_s": RECONCILE_BOOT_TIMEOUT_S,
        "source": source,
        "files": {
            "haproxy_routes": L.HAPROXY_ROUTES_PATH,
            "health": HEALTH_CONFIG_PATH,
            "authorized_keys": tunnel_authorized_keys_path(hub),
            "sshd_tunnel_forwarding": L.SSHD_TUNNEL_FORWARDING_PATH,
        },
        "state_file": L.APPLIED_DOCUMENT_PATH,
        "status_file": L.RECONCILE_STATUS_PATH,
        "commands": {
            "haproxy_check": haproxy_check_command("{candidate}"),
            "haproxy_reload": ["systemctl", "reload-or-restart", L.HAPROXY_UNIT],
            "health_reload": ["systemctl", "reload-or-restart", L.HEALTH_UNIT],
            "sshd_check": ["/usr/sbin/sshd", "-t"],
            "sshd_reload": ["systemctl", "try-reload-or-restart", L.SSH_UNIT],
            "sessions": ["ss", "-Htnp", "state", "established", "( sport = :22 )"],
            "session_log": ["journalctl", "-b", "-q", "-o", "cat", "--no-pager", "-t", "sshd", "-t", "sshd-session"],
        },
        "session_log_file": None,
    }


# ---------------------------------------------------------------------------------------------
# YAML embedding
# ---------------------------------------------------------------------------------------------

_UNSAFE_CHARS = re.compile(r"[^\t\n\x20-\x7e\u00a0-\ud7ff\ue000-\ufffd]")


def literal_block(text: str, indent: int) -> str:
    """``text`` as a YAML literal block scalar indented by ``indent`` (exact round trip)."""
    if _UNSAFE_CHARS.search(text) or "\r" in text:
        raise UserDataError("a file holds characters a YAML literal block cannot carry")
    if text[:1] in (" ", "\n"):
        raise UserDataError("a file starting with a space or an empty line cannot be a YAML literal block")
    stripped = text.rstrip("\n")
    trailing = len(text) - len(stripped)
    chomp = "-" if trailing == 0 else ("" if trailing == 1 else "+")
    pad = " " * indent
    body = "\n".join(pad + line if line else "" for line in text[: len(stripped) + max(0, trailing - 1)].split("\n"))
    return f"|{chomp}\n{body}"


def _check_round_trip(text: str, files: list[VmFile]) -> None:
    """The YAML must give back every file byte for byte (the renderer's own guarantee)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserDataError(f"the rendered cloud-config is not valid YAML: {exc}") from None
    written = {f["path"]: f["content"] for f in data.get("write_files", [])}
    for f in files:
        if written.get(f.path) != f.content:
            raise UserDataError(f"{f.path} does not survive the YAML round trip")


def extract_files(cloud_config: str) -> list[VmFile]:
    """The files a cloud-config writes (for the lab: write them under a root directory)."""
    data = yaml.safe_load(cloud_config)
    return [VmFile(f["path"], f["content"], f["permissions"], f.get("owner", "root:root"))
            for f in data.get("write_files", [])]
