"""The proxy VMs' cloud-init, rendered from a resolved hub.

``render_cloud_init(hub, slot)`` returns the :class:`UserData` the hub stacks embed: Azure gives
every proxy its own (``slot`` = the proxy index), AWS one for the launch template (``slot`` None:
the instance learns its slot at boot from the tag the lifecycle Lambda sets).

What a proxy runs (see docs/proxy-runtime.md): HAProxy in TCP mode with one listener per route;
the per-route health endpoint (``files/tunnelhub_health.py``); sshd hardened by a drop-in, with the
tunnel user limited to remote forwards on its routes' loopback ports; the hub SSH host key fetched
at boot from Key Vault / SSM (``files/tunnelhub_fetch_host_key.py``); on AWS the wait for the slot
(``files/tunnelhub_aws_slot.py``); all driven once by ``files/tunnelhub_boot.py``.

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

from tunnelhub.spec import Hub, Route
from tunnelhub.userdata.compact import compact_python

# ---------------------------------------------------------------------------------------------
# The contract with the hub stacks, the on-prem package and the lab
# ---------------------------------------------------------------------------------------------

USER_DATA_LIMIT_BYTES = {"aws": 16384, "azure": 65535}
"""AWS: 16 KB of user data before base64. Azure: custom data decodes to at most 65535 bytes."""
AWS_SLOT_TAG = "tunnelhub:slot"
"""Instance tag the AWS lifecycle Lambda sets to the slot number (read from instance metadata)."""
AZURE_HOST_KEY_TAG = "tunnelhub-host-key-secret"
"""Azure VM tag holding the Key Vault secret URL of the hub host key."""
SLOT_WAIT_TIMEOUT_S = 600
HOST_KEY_TIMEOUT_S = 900
INSTALL_TIMEOUT_S = 900
PACKAGES = ("haproxy",)

LIB_DIR = "/usr/local/lib/tunnelhub"
CONF_DIR = "/etc/tunnelhub"
HEALTH_DAEMON_PATH = f"{LIB_DIR}/tunnelhub_health.py"
HEALTH_CONFIG_PATH = f"{CONF_DIR}/health.json"
BOOT_SCRIPT_PATH = f"{LIB_DIR}/tunnelhub_boot.py"
BOOT_CONFIG_PATH = f"{CONF_DIR}/boot.json"
HAPROXY_CONFIG_PATH = "/etc/haproxy/haproxy.cfg"
SSHD_DROPIN_PATH = "/etc/ssh/sshd_config.d/10-tunnelhub.conf"
TUNNEL_AUTHORIZED_KEYS_DIR = "/etc/ssh/authorized_keys.d"
"""The tunnel user's keys: ``<dir>/<tunnel_user>``, root-owned (the user cannot change them)."""
SYSCTL_DROPIN_PATH = "/etc/sysctl.d/60-tunnelhub.conf"
HEALTH_UNIT_PATH = "/etc/systemd/system/tunnelhub-health.service"
HAPROXY_UNIT_DROPIN_PATH = "/etc/systemd/system/haproxy.service.d/10-tunnelhub.conf"
HOST_KEY_PATH = "/etc/ssh/tunnelhub_host_ed25519_key"
NOLOGIN = "/usr/sbin/nologin"
UNITS = ("haproxy.service", "tunnelhub-health.service")

# Data plane and half-open bounds (docs/proxy-runtime.md explains the numbers).
CONNECT_TIMEOUT_S = 5
RETRIES = 2
DNS_HOLD_VALID_S = 10
GLOBAL_MAXCONN_CAP = 262144  # HAProxy asks for ~2 fds per connection; stay under nr_open (1048576)
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
    gzip); on AWS, the health daemon moved to the hub's S3 bucket (``s3_objects``, fetched and
    checksum-verified at boot); finally the embedded scripts compacted. Raises
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
def _environment() -> jinja2.Environment:
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
        daemon = next(f for f in files if f.path == HEALTH_DAEMON_PATH)
        content = (_FILES / "tunnelhub_health.py").read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        objects.append(S3Object(key=f"proxy/{digest}/tunnelhub_health.py", content=content, sha256=digest,
                                path=daemon.path, permissions=daemon.permissions))
        files = [f for f in files if f.path != HEALTH_DAEMON_PATH]
        config = json.loads(next(f for f in files if f.path == BOOT_CONFIG_PATH).content)
        config["remote_files"] = [{"path": o.path, "key": o.key, "sha256": o.sha256, "permissions": o.permissions}
                                  for o in objects]
        files = [VmFile(f.path, json.dumps(config, indent=2) + "\n", f.permissions, f.owner)
                 if f.path == BOOT_CONFIG_PATH else f for f in files]
    return _Plan(files, objects)


def _render(hub: Hub, slot: int | None, plan: _Plan) -> str:
    text = _environment().get_template("cloud-config.yaml.j2").render(
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
    env = _environment()

    def template(name: str, **values) -> str:
        return env.get_template(name).render(**values)

    def script(name: str) -> str:
        source = (_FILES / name).read_text(encoding="utf-8")
        return compact_python(source, name) if compacted else source

    files = [
        VmFile(SYSCTL_DROPIN_PATH, sysctl_conf(), "0644"),
        VmFile(SSHD_DROPIN_PATH, sshd_dropin(hub), "0644"),
        VmFile(tunnel_authorized_keys_path(hub), tunnel_authorized_keys(hub), "0644"),
        VmFile(HAPROXY_CONFIG_PATH, haproxy_config(hub), "0644"),
        VmFile(HEALTH_CONFIG_PATH, json.dumps(health_config(hub), indent=2) + "\n", "0644"),
        VmFile(BOOT_CONFIG_PATH, json.dumps(boot_config(hub, slot), indent=2) + "\n", "0644"),
        VmFile(HEALTH_UNIT_PATH, template(
            "tunnelhub-health.service.j2", health_port=hub.proxies.health_port,
            privileged_port=hub.proxies.health_port < 1024, daemon_path=HEALTH_DAEMON_PATH,
            config_path=HEALTH_CONFIG_PATH), "0644"),
        VmFile(HAPROXY_UNIT_DROPIN_PATH, template("haproxy-tunnelhub.conf.j2"), "0644"),
        VmFile(HEALTH_DAEMON_PATH, script("tunnelhub_health.py"), "0755"),
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


def permit_listen(hub: Hub) -> list[str]:
    """``localhost:<tunnel_port>`` per tunnel route: the listen address the on-prem ``-R`` uses."""
    return [f"localhost:{r.tunnel_port}" for r in hub.tunnel_routes]


def allowed_users(hub: Hub) -> list[str]:
    users = [hub.proxies.admin_username, hub.onprem.tunnel_user]
    if hub.cloud == "aws" and hub.aws is not None and hub.aws.key_pair_name:
        users.append("ubuntu")  # the EC2 key pair is installed for the image's default user
    return users


def sshd_dropin(hub: Hub) -> str:
    return _environment().get_template("sshd_tunnelhub.conf.j2").render(
        allow_users=allowed_users(hub),
        client_alive_interval_s=CLIENT_ALIVE_INTERVAL_S,
        client_alive_count_max=CLIENT_ALIVE_COUNT_MAX,
        tunnel_user=hub.onprem.tunnel_user,
        authorized_keys_path=tunnel_authorized_keys_path(hub),
        permit_listen=permit_listen(hub),
        nologin=NOLOGIN,
    )


def authorized_keys_options(hub: Hub) -> str:
    """The options in front of every tunnel key (the on-prem key may do nothing else)."""
    options = ["restrict"]
    listen = permit_listen(hub)
    if listen:
        options.append("port-forwarding")
        options += [f'permitlisten="{p}"' for p in listen]
    options.append(f'command="{NOLOGIN}"')
    options.append('from="' + ",".join(str(c) for c in hub.onprem.source_cidrs) + '"')
    return ",".join(options)


def tunnel_authorized_keys(hub: Hub) -> str:
    return _environment().get_template("authorized_keys.j2").render(
        tunnel_user=hub.onprem.tunnel_user, options=authorized_keys_options(hub),
        keys=list(hub.onprem.tunnel_public_keys),
    )


def sysctl_conf() -> str:
    return _environment().get_template("sysctl.conf.j2").render(
        tcp_retries2=TCP_RETRIES2, tcp_give_up_s=f"{tcp_give_up_s():.1f}")


def tcp_give_up_s(retries2: int = TCP_RETRIES2) -> float:
    """How long Linux retransmits before it drops a connection (RTO from its 200 ms floor)."""
    return TCP_RTO_MIN_S * (2 ** (retries2 + 1) - 1)


def _haproxy_address(host: str, port: int) -> str:
    try:
        if ip_address(host).version == 6:
            return f"ipv6@{host}:{port}"
        return f"{host}:{port}"
    except ValueError:
        return f"{host}:{port}"


def _is_name(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return True
    return False


def haproxy_config(hub: Hub) -> str:
    listeners = []
    for r in hub.routes:
        if r.kind == "tunnel":
            server, server_name = f"127.0.0.1:{r.tunnel_port}", "tunnel"
            description = f"127.0.0.1:{r.tunnel_port} (ssh -R to {r.target})"
        else:
            server, server_name = _haproxy_address(r.target_host, r.target_port), "remote"
            description = r.target
            if _is_name(r.target_host):
                server += " resolvers dns resolve-prefer ipv4 init-addr none"
        listeners.append({
            "name": r.name, "kind": r.kind, "port": r.port, "maxconn": r.max_connections,
            "idle_timeout_min": r.idle_timeout_min, "server": server, "server_name": server_name,
            "description": description,
        })
    return _environment().get_template("haproxy.cfg.j2").render(
        hub_name=hub.name,
        global_maxconn=min(GLOBAL_MAXCONN_CAP, sum(r.max_connections for r in hub.routes) + 100),
        retries=RETRIES,
        connect_timeout_s=CONNECT_TIMEOUT_S,
        resolvers=any(r.kind == "forward" and _is_name(r.target_host) for r in hub.routes),
        dns_hold_valid_s=DNS_HOLD_VALID_S,
        listeners=listeners,
    )


def _probe(route: Route) -> dict:
    mode = route.probe_mode
    probe: dict = {"mode": mode, "interval_s": route.probe.interval_s, "timeout_s": route.probe.timeout_s}
    if mode == "mysql":
        probe["check_user"] = route.probe.check_user
    if mode == "tls":
        if route.probe.server_name is not None:
            probe["server_name"] = route.probe.server_name
        elif route.kind == "tunnel" and _is_name(route.target_host):
            probe["server_name"] = route.target_host  # the check dials 127.0.0.1: send the real name
    return probe


def health_config(hub: Hub) -> dict:
    """``/etc/tunnelhub/health.json`` for ``files/tunnelhub_health.py``."""
    routes = []
    for r in hub.routes:
        host, port = ("127.0.0.1", r.tunnel_port) if r.kind == "tunnel" else (r.target_host, r.target_port)
        routes.append({"name": r.name, "kind": r.kind, "host": host, "port": port, "probe": _probe(r)})
    return {"listen_address": "0.0.0.0", "port": hub.proxies.health_port, "routes": routes}


def boot_config(hub: Hub, slot: int | None) -> dict:
    """``/etc/tunnelhub/boot.json`` for ``files/tunnelhub_boot.py``."""
    host_key: dict = {"source": "azure-keyvault", "timeout_s": HOST_KEY_TIMEOUT_S}
    slot_wait = None
    if hub.cloud == "aws":
        host_key = {"source": "aws-ssm", "parameter": host_key_parameter_name(hub), "timeout_s": HOST_KEY_TIMEOUT_S}
        slot_wait = {
            "count": hub.proxies.count,
            "tag": AWS_SLOT_TAG,
            "timeout_s": SLOT_WAIT_TIMEOUT_S,
            "require_public_ipv4": hub.egress == "slot_eip",
            # Every AWS slot has a fixed private address: the NLB's route target groups (type ip)
            # register those, so the proxy must configure its slot's address whether or not the
            # tunnel host dials it over a private circuit.
            "private_ips": [str(ip) for ip in hub.aws_addresses().slot_private_ips],
        }
    return {
        "hub": hub.name,
        "cloud": hub.cloud,
        "slot": slot,
        "sysctl_file": SYSCTL_DROPIN_PATH,
        "haproxy_config": HAPROXY_CONFIG_PATH,
        "packages": list(PACKAGES),
        "install_timeout_s": INSTALL_TIMEOUT_S,
        "units": list(UNITS),
        "host_key": host_key,
        "slot_wait": slot_wait,
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
