"""The on-prem tunnel host package: ``tunnelhub-<hub>_<version>_all.deb``, one per tunnel host.

A hub with several tunnel hosts (``onprem.tunnel_hosts``) gets one package per host
(:func:`plan_package` ``tunnel_host=``): the same package name, units and paths on every host,
each holding its own host's loopback ports on the proxies, its version ending in ``+<host>``.

:func:`plan_package` decides what the package holds from the resolved hub and the stack outputs
(which addresses to dial, which host key to pin); :func:`render_package` turns the plan into file
contents from the templates beside this module; :func:`build_deb` writes the ``.deb`` with
``dpkg-deb --root-owner-group``, reproducibly (same inputs, same bytes) and atomically.

What the package installs (``<hub>`` is the hub name, ``<pkg>`` is ``tunnelhub-<hub>``):

=====================================================  ============================================
``/lib/systemd/system/<pkg>@.service``                 one autossh session per proxy slot (``%i``)
``/lib/systemd/system/<pkg>.target``                   wants one instance per slot; enabled
``/etc/tunnelhub/<hub>/ssh_config``                    every ssh option (``ssh -F``), conffile
``/etc/tunnelhub/<hub>/known_hosts``                   the pinned hub host key, conffile
``/etc/tunnelhub/<hub>/slot-N.env``                    ``TUNNELHUB_ENDPOINT=<address of slot N>``
``/usr/lib/sysusers.d/<pkg>.conf``                     the service user ``<pkg>``
``/usr/bin/<pkg>-pubkey``                              prints the tunnel key
``/usr/bin/<pkg>-status``                              per slot: tunnel up, since, last error, route health
``/usr/libexec/<pkg>/quickack-route``                  the quick-ACK host route (``onprem.tcp_quickack``)
``/var/lib/<pkg>/id_ed25519``                          the tunnel key, made by postinst (not shipped)
=====================================================  ============================================
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import textwrap
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from importlib import resources
from ipaddress import ip_address
from pathlib import Path, PurePosixPath

import jinja2

from tunnelhub import __version__ as TOOL_VERSION
from tunnelhub.onprem.outputs import HostKey, OnpremError, StackOutputs, check_endpoint, parse_host_key
from tunnelhub.onprem.timing import DEFAULT_TIMING, TunnelTiming
from tunnelhub.spec import DEFAULT_HEALTH_PORT, SSH_PORT, Hub, Proxies, TunnelHost

PACKAGE_PREFIX = "tunnelhub-"
MAINTAINER = "tunnelhub <tunnelhub@example.invalid>"
"""Generated per site, so there is no real maintainer address; .invalid (RFC 2606) says so."""
AUTOSSH = "/usr/bin/autossh"
ENDPOINT_VAR = "TUNNELHUB_ENDPOINT"
UNIT_DIR = "/lib/systemd/system"  # Debian 12 (and Ubuntu, where /lib is /usr/lib)
MAX_SLOTS = next(m.le for m in Proxies.model_fields["count"].metadata if hasattr(m, "le"))
QUICKACK_SCRIPT = resources.files("tunnelhub.onprem") / "files" / "tunnelhub_quickack.py"
"""Installed as ``/usr/libexec/<pkg>/quickack-route`` (stdlib Python, run as root by the unit)."""
STATUS_SCRIPT = resources.files("tunnelhub.onprem") / "files" / "tunnelhub_status.py"
"""Installed as ``/usr/bin/<pkg>-status`` with the hub's settings in its ``CONFIG`` line."""
STATUS_CONFIG_LINE = "CONFIG: Optional[dict] = None  # tunnelhub onprem: the package build writes this hub's settings here\n"
HEALTH_SOCKET = "health.sock"
"""In each unit's runtime directory: the local end of ``-L <socket>:127.0.0.1:<health_port>``."""
UNIX_PATH_MAX = 108  # sun_path of struct sockaddr_un on Linux, with its terminating NUL


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("tunnelhub.onprem", "templates"),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,
)
_VERSION_RE = re.compile(
    r"^(?:(?P<epoch>[0-9]+):)?(?P<upstream>[0-9][A-Za-z0-9.+~-]*?)(?:-(?P<revision>[A-Za-z0-9.+~]+))?$"
)


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TunnelForward:
    """One tunnel route as the tunnel host holds it: ``-R localhost:<tunnel_port>:<target>``."""

    route: str
    tunnel_port: int
    target_host: str
    target_port: int

    @property
    def target(self) -> str:
        host = self.target_host
        try:
            if ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass
        return f"{host}:{self.target_port}"

    @property
    def remote_forward(self) -> str:
        """The ``-R`` argument; the proxies' sshd permits exactly ``permitlisten="localhost:<port>"``."""
        return f"localhost:{self.tunnel_port}:{self.target}"


@dataclass(frozen=True, kw_only=True)
class PackagePlan:
    """Everything the package of one hub holds, before it is rendered."""

    hub: str
    cloud: str
    stack: str
    tunnel_user: str
    forwards: tuple[TunnelForward, ...]
    endpoints: tuple[str, ...]
    """The address of each proxy slot, in slot order."""
    endpoints_source: str
    host_key: HostKey | None
    """The pinned hub host key; None with trust on first use."""
    host_key_source: str | None
    timing: TunnelTiming = DEFAULT_TIMING
    tcp_quickack: bool = True
    """Each unit adds a ``quickack 1`` host route to its proxy while it runs (``onprem.tcp_quickack``)."""
    health_port: int = DEFAULT_HEALTH_PORT
    """The proxies' health endpoint (``proxies.health_port``), reached through each slot's session."""
    tunnel_host: str | None = None
    """The tunnel host this package is for, on a hub that names its hosts (``onprem.tunnel_hosts``);
    None on a hub written in the single-host form (``onprem.tunnel_public_keys``)."""
    tunnel_host_index: int = 0
    """Its position in ``onprem.tunnel_hosts``."""
    tunnel_hosts: tuple[str, ...] = ()
    """Every tunnel host of the hub, in spec order (the README names the others)."""
    warnings: tuple[str, ...] = ()

    @property
    def package(self) -> str:
        return PACKAGE_PREFIX + self.hub

    @property
    def key_field(self) -> str:
        """Where this host's key goes in the hub spec."""
        if self.tunnel_host is None:
            return "onprem.tunnel_public_keys"
        return f"onprem.tunnel_hosts[{self.tunnel_host_index}].public_keys"

    @property
    def key_place(self) -> str:
        """``key_field`` with the host's name, as the messages say it."""
        if self.tunnel_host is None:
            return self.key_field
        return f"{self.key_field} (tunnel host {self.tunnel_host})"

    @property
    def quickack_helper(self) -> str:
        return f"/usr/libexec/{self.package}/quickack-route"

    @property
    def runtime_dir(self) -> str:
        """Where the quick-ACK helper records the routes each slot added (root-owned, tmpfs)."""
        return f"/run/{self.package}"

    @property
    def tofu(self) -> bool:
        return self.host_key is None

    @property
    def service_user(self) -> str:
        return self.package

    @property
    def etc_dir(self) -> str:
        return f"/etc/tunnelhub/{self.hub}"

    @property
    def state_dir(self) -> str:
        return f"/var/lib/{self.package}"

    @property
    def key_path(self) -> str:
        return f"{self.state_dir}/id_ed25519"

    @property
    def ssh_config(self) -> str:
        return f"{self.etc_dir}/ssh_config"

    @property
    def known_hosts(self) -> str:
        """Pinned: a read-only conffile. Trust on first use: ssh writes it in the state directory."""
        return f"{self.state_dir}/known_hosts" if self.tofu else f"{self.etc_dir}/known_hosts"

    @property
    def host_key_alias(self) -> str:
        return f"tunnelhub-{self.hub}"

    @property
    def target_unit(self) -> str:
        return f"{self.package}.target"

    @property
    def unit_template_prefix(self) -> str:
        return f"{self.package}@"

    @property
    def instances(self) -> list[str]:
        return [f"{self.unit_template_prefix}{slot}.service" for slot in range(len(self.endpoints))]

    @property
    def stale_instances(self) -> list[str]:
        """Instances a previous version may have run that this one does not (stopped on upgrade)."""
        return [f"{self.unit_template_prefix}{slot}.service" for slot in range(len(self.endpoints), MAX_SLOTS)]

    @property
    def pubkey_command(self) -> str:
        return f"{self.package}-pubkey"

    @property
    def status_command(self) -> str:
        return f"{self.package}-status"

    @property
    def slot_runtime_directory(self) -> str:
        """``RuntimeDirectory=`` of a slot's unit (under /run; ``%i`` is the slot): systemd creates it
        owned by the service user when the unit starts and removes it when it stops."""
        return f"{self.package}/slot-%i"

    def health_socket(self, slot: int) -> str:
        return f"/run/{self.slot_runtime_directory.replace('%i', str(slot))}/{HEALTH_SOCKET}"

    @property
    def health_forward(self) -> str:
        """The ``-L`` argument: this slot's socket to the proxy's health endpoint on its loopback;
        the proxies' sshd permits exactly ``permitopen="127.0.0.1:<health_port>"``."""
        return "${RUNTIME_DIRECTORY}/" + f"{HEALTH_SOCKET}:127.0.0.1:{self.health_port}"

    def status_config(self) -> dict:
        """What the status command knows about this hub (embedded in it at build time)."""
        config = {
            "hub": self.hub, "package": self.package, "etc_dir": self.etc_dir, "health_port": self.health_port,
            "slots": [{"slot": slot, "endpoint": endpoint, "unit": self.instances[slot],
                       "socket": self.health_socket(slot)} for slot, endpoint in enumerate(self.endpoints)],
            "routes": [{"route": f.route, "tunnel_port": f.tunnel_port, "target": f.target} for f in self.forwards],
        }
        if self.tunnel_host is not None:
            config["tunnel_host"] = self.tunnel_host
        return config

    @property
    def doc_dir(self) -> str:
        return f"/usr/share/doc/{self.package}"

    def exec_start_lines(self) -> list[str]:
        """The unit's ExecStart, one line per option group: autossh without its monitor port,
        the ssh options file, every tunnel as ``-R``, the health endpoint as ``-L`` (the status
        command's view of the proxy), then the slot's address. ``${RUNTIME_DIRECTORY}`` is set by
        systemd (``RuntimeDirectory=``) before it expands the command line: systemd
        src/core/execute.c, ``build_environment()`` adds ``RUNTIME_DIRECTORY=<prefix>/<path>``
        (``exec_directory_env_name_to_string``) to the environment that ``exec_child()`` passes
        to ``replace_env_argv(command->argv, accum_env)``; ``$SERVICE_RESULT`` & co. for the
        ExecStopPost lines come in ``params->environment``, merged into the same block."""
        return [
            f"{AUTOSSH} -M 0 -N -F {self.ssh_config}",
            *(f"-R {fwd.remote_forward}" for fwd in self.forwards),
            f"-L {self.health_forward}",
            "${" + ENDPOINT_VAR + "}",
        ]

    def exec_start(self) -> list[str]:
        """The unit's ExecStart words."""
        return " ".join(self.exec_start_lines()).split()


def pick_tunnel_host(hub: Hub, name: str | None) -> TunnelHost:
    """The tunnel host a package is for: ``name``, else the hub's only one; :class:`OnpremError`
    naming the hub's hosts when ``name`` is missing on a hub with several, or unknown."""
    hosts = hub.tunnel_hosts
    names = ", ".join(h.name for h in hosts)
    if name is None:
        if len(hosts) > 1:
            raise OnpremError(f"hub {hub.name!r} has {len(hosts)} tunnel hosts ({names}): each gets its own package "
                              "(its own ports and key); choose one with --tunnel-host NAME, or build them all with "
                              "--all-tunnel-hosts")
        return hosts[0]
    for h in hosts:
        if h.name == name:
            return h
    raise OnpremError(f"hub {hub.name!r} has no tunnel host {name!r}; its tunnel hosts: {names}"
                      + ("" if hub.multi_host else " (the single-host form, onprem.tunnel_public_keys, names its one "
                         "host tunnel-host)"))


def plan_package(
    hub: Hub,
    outputs: StackOutputs | None = None,
    *,
    tunnel_host: str | None = None,
    trust_on_first_use: bool = False,
    timing: TunnelTiming = DEFAULT_TIMING,
) -> PackagePlan:
    """Decide what the package of ``hub`` holds; raise :class:`OnpremError` naming what is missing.

    Tunnel host: ``tunnel_host`` (a name in ``onprem.tunnel_hosts``; required when the hub has
    several), whose loopback ports the forwards use (``Hub.host_tunnel_port``). Addresses:
    ``tunnel_endpoints`` from the outputs when present (authoritative); else the spec's static
    addresses (Azure proxies, AWS slots' fixed private IPs over a private circuit); an AWS hub
    reached over the internet dials Elastic IPs that only the outputs know. Host key:
    ``host_public_key`` from the outputs, pinned; without it only ``trust_on_first_use`` builds.
    """
    host = pick_tunnel_host(hub, tunnel_host)
    forwards = tuple(TunnelForward(r.name, hub.host_tunnel_port(r, host), r.target_host, r.target_port)
                     for r in hub.tunnel_routes)
    if not forwards:
        raise OnpremError(f"hub {hub.name!r} has no tunnel routes (kind: tunnel), so its tunnel host has nothing "
                          "to forward: it needs no on-prem package")
    warnings: list[str] = []
    cdktf_hint = f"`cdktf output {hub.stack_name} --outputs-file FILE` (or `terraform output -json > FILE`)"

    predicted, predicted_source = _spec_endpoints(hub)
    missing: list[str] = []
    endpoints: tuple[str, ...] = ()
    endpoints_source = ""
    if outputs is not None and outputs.tunnel_endpoints is not None:
        endpoints = outputs.tunnel_endpoints
        endpoints_source = f"{outputs.source}: tunnel_endpoints"
        if len(endpoints) != hub.proxies.count:
            raise OnpremError(
                f"{outputs.source}: tunnel_endpoints lists {len(endpoints)} address(es) but hub {hub.name!r} has "
                f"proxies.count {hub.proxies.count}: deploy the current spec, then write the outputs again with "
                f"{cdktf_hint}")
        if len(set(endpoints)) != len(endpoints):
            raise OnpremError(f"{outputs.source}: tunnel_endpoints lists an address twice: {', '.join(endpoints)}")
        if predicted is not None and endpoints != predicted:
            warnings.append(
                f"{outputs.source}: tunnel_endpoints ({', '.join(endpoints)}) differ from the addresses the spec "
                f"gives ({', '.join(predicted)}); using the outputs. Are they from another hub or an older spec?")
    elif predicted is not None:
        endpoints, endpoints_source = predicted, predicted_source
    else:
        missing.append("the slots' Elastic IPs (tunnel_endpoints), known only after deploy: this AWS hub is "
                       "reached over the internet (onprem.private_circuit is false)")

    host_key: HostKey | None = None
    host_key_source: str | None = None
    if outputs is not None and outputs.host_public_key is not None:
        host_key = parse_host_key(outputs.host_public_key, f"{outputs.source}: host_public_key")
        host_key_source = f"{outputs.source}: host_public_key"
        if trust_on_first_use:
            warnings.append(f"--trust-on-first-use ignored: {outputs.source} has host_public_key, which is pinned")
    elif trust_on_first_use:
        warnings.append("WARNING: --trust-on-first-use: the hub host key is NOT pinned; the tunnel host trusts "
                        "the first key a proxy presents (StrictHostKeyChecking accept-new). Rebuild with --outputs "
                        "once the hub is deployed to pin it.")
    else:
        missing.append("the hub host key (host_public_key) to pin")

    if missing:
        where = f" ({outputs.source} lacks it)" if outputs is not None else ""
        fix = f"pass --outputs FILE, written by {cdktf_hint} after deploying the hub"
        if not any("Elastic" in m for m in missing):
            fix += ", or --trust-on-first-use to trust the key the proxies present on first connection (not pinned)"
        raise OnpremError(f"hub {hub.name!r}: the on-prem package needs {' and '.join(missing)}{where}; {fix}")

    for slot, endpoint in enumerate(endpoints):
        check_endpoint(endpoint, f"slot {slot}")
    longest = f"/run/{PACKAGE_PREFIX}{hub.name}/slot-{MAX_SLOTS - 1}/{HEALTH_SOCKET}"
    if len(longest.encode()) >= UNIX_PATH_MAX:  # unreachable with the spec's name limits; a guard
        raise OnpremError(f"hub {hub.name!r}: the health socket path {longest} is too long for a unix socket")
    return PackagePlan(
        hub=hub.name,
        cloud=hub.cloud,
        stack=hub.stack_name,
        tunnel_user=hub.onprem.tunnel_user,
        forwards=forwards,
        endpoints=tuple(endpoints),
        endpoints_source=endpoints_source,
        host_key=host_key,
        host_key_source=host_key_source,
        timing=timing,
        tcp_quickack=hub.onprem.tcp_quickack,
        health_port=hub.proxies.health_port,
        tunnel_host=host.name if hub.multi_host else None,
        tunnel_host_index=[h.name for h in hub.tunnel_hosts].index(host.name),
        tunnel_hosts=tuple(h.name for h in hub.tunnel_hosts) if hub.multi_host else (),
        warnings=tuple(warnings),
    )


def _spec_endpoints(hub: Hub) -> tuple[tuple[str, ...] | None, str]:
    """The slot addresses the spec fixes before deploy, or None when only the outputs know them."""
    if hub.cloud == "azure":
        return tuple(str(ip) for ip in hub.azure_addresses().proxy_ips), "the spec (the proxies' static private IPs)"
    if hub.private_circuit:
        return (tuple(str(ip) for ip in hub.aws_addresses().slot_private_ips),
                "the spec (the slots' fixed private IPs, over the private circuit)")
    return None, ""


# --------------------------------------------------------------------------------------------
# Render
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageFile:
    """One file of the package: where it is installed, its bytes and mode."""

    path: str
    data: bytes
    mode: int = 0o644

    @property
    def conffile(self) -> bool:
        return self.path.startswith("/etc/")


@dataclass(frozen=True)
class RenderedPackage:
    files: tuple[PackageFile, ...]
    """The data files, sorted by path."""
    control: tuple[PackageFile, ...]
    """DEBIAN/ members (control, conffiles, md5sums, maintainer scripts)."""


def render_package(plan: PackagePlan, version: str, source_date_epoch: int) -> RenderedPackage:
    """Every file of the package, ``version`` and the changelog date (``source_date_epoch``) filled in."""
    when = datetime.fromtimestamp(source_date_epoch, tz=UTC)
    ctx = _context(plan, version, when)
    pkg = plan.package
    files = [
        PackageFile(f"{UNIT_DIR}/{pkg}@.service", _render("tunnel.service.j2", ctx)),
        PackageFile(f"{UNIT_DIR}/{pkg}.target", _render("tunnels.target.j2", ctx)),
        PackageFile(plan.ssh_config, _render("ssh_config.j2", ctx)),
        PackageFile(ctx["sysusers_conf"], _render("sysusers.conf.j2", ctx)),
        PackageFile(f"/usr/bin/{plan.pubkey_command}", _render("pubkey.sh.j2", ctx), 0o755),
        PackageFile(f"/usr/share/man/man1/{plan.pubkey_command}.1.gz", _gzip(_render("pubkey.1.j2", ctx))),
        PackageFile(f"/usr/bin/{plan.status_command}", _status_script(plan), 0o755),
        PackageFile(f"/usr/share/man/man1/{plan.status_command}.1.gz", _gzip(_render("status.1.j2", ctx))),
        PackageFile(f"{plan.doc_dir}/README", _render("README.j2", ctx)),
        PackageFile(f"{plan.doc_dir}/copyright", _render("copyright.j2", ctx)),
        PackageFile(f"{plan.doc_dir}/changelog.Debian.gz", _gzip(_render("changelog.j2", ctx))),
        PackageFile(f"/usr/share/lintian/overrides/{pkg}", _render("lintian-overrides.j2", ctx)),
    ]
    if plan.tcp_quickack:
        files.append(PackageFile(plan.quickack_helper, QUICKACK_SCRIPT.read_bytes(), 0o755))
    if not plan.tofu:
        files.append(PackageFile(plan.known_hosts, _render("known_hosts.j2", ctx)))
    for slot, endpoint in enumerate(plan.endpoints):
        files.append(PackageFile(f"{plan.etc_dir}/slot-{slot}.env",
                                 _render("slot.env.j2", {**ctx, "slot": slot, "endpoint": endpoint})))
    files.sort(key=lambda f: f.path)

    conffiles = "".join(f"{f.path}\n" for f in files if f.conffile).encode()
    md5sums = "".join(f"{hashlib.md5(f.data).hexdigest()}  {f.path.lstrip('/')}\n" for f in files).encode()
    control = [
        PackageFile("control", _render("control.j2", {**ctx, "installed_size_kib": _installed_size_kib(files)})),
        PackageFile("conffiles", conffiles),
        PackageFile("md5sums", md5sums),
        PackageFile("postinst", _render("postinst.j2", ctx), 0o755),
        PackageFile("prerm", _render("prerm.j2", ctx), 0o755),
        PackageFile("postrm", _render("postrm.j2", ctx), 0o755),
    ]
    return RenderedPackage(tuple(files), tuple(sorted(control, key=lambda f: f.path)))


def _context(plan: PackagePlan, version: str, when: datetime) -> dict:
    return {
        "tool_version": TOOL_VERSION,
        "package": plan.package,
        "version": version,
        "hub": plan.hub,
        "cloud": plan.cloud,
        "stack": plan.stack,
        "maintainer": MAINTAINER,
        "tunnel_user": plan.tunnel_user,
        "ssh_port": SSH_PORT,
        "service_user": plan.service_user,
        "etc_dir": plan.etc_dir,
        "state_dir": plan.state_dir,
        "key_path": plan.key_path,
        "ssh_config": plan.ssh_config,
        "known_hosts": plan.known_hosts,
        "host_key_alias": plan.host_key_alias,
        "host_key": plan.host_key.line if plan.host_key else None,
        "host_key_fingerprint": plan.host_key.fingerprint if plan.host_key else None,
        "host_key_source": plan.host_key_source,
        "tofu": plan.tofu,
        "timing": plan.timing,
        "tunnels": [
            {"route": f.route, "tunnel_port": f.tunnel_port, "target": f.target, "remote_forward": f.remote_forward}
            for f in plan.forwards
        ],
        "endpoints": plan.endpoints,
        "endpoints_source": plan.endpoints_source,
        "target_unit": plan.target_unit,
        "unit_template_prefix": plan.unit_template_prefix,
        "instances": plan.instances,
        "stale_instances": plan.stale_instances,
        "exec_start": plan.exec_start_lines(),
        "pubkey_command": plan.pubkey_command,
        "tunnel_host": plan.tunnel_host,
        "tunnel_host_index": plan.tunnel_host_index,
        "other_tunnel_hosts": [h for h in plan.tunnel_hosts if h != plan.tunnel_host],
        "key_field": plan.key_field,
        "key_place": plan.key_place,
        "status_command": plan.status_command,
        "health_port": plan.health_port,
        "slot_runtime_directory": plan.slot_runtime_directory,
        "health_socket_pattern": plan.health_socket(0).replace("slot-0", "slot-N"),
        "doc_dir": plan.doc_dir,
        "tcp_quickack": plan.tcp_quickack,
        "quickack_helper": plan.quickack_helper,
        "runtime_dir": plan.runtime_dir,
        "sysusers_name": f"{plan.package}.conf",
        "sysusers_conf": f"/usr/lib/sysusers.d/{plan.package}.conf",
        "description": _description(plan),
        "date_iso": when.strftime("%Y-%m-%d"),
        "year": when.year,
        "changes": _changelog_items(plan),
        "date_rfc2822": format_datetime(when),
    }


def _description(plan: PackagePlan) -> list[str]:
    """The control file's extended description, wrapped to 79 columns."""
    paragraphs = [
        (f"Keeps one autossh session per proxy of the tunnelhub hub {plan.hub} ({plan.cloud}), each "
         f"holding the reverse forwards of the hub's tunnel routes ({', '.join(f.route for f in plan.forwards)}), "
         "so that Databricks reaches on-prem databases through the hub without any inbound firewall opening."),
        (f"Generated by tunnelhub {TOOL_VERSION} from the hub spec. Start, stop and inspect the tunnels with "
         f"systemctl on {plan.target_unit}; {plan.pubkey_command} prints the key this host logs in with."),
    ]
    if plan.tunnel_host is not None:
        paragraphs.insert(1, (
            f"This is the package of tunnel host {plan.tunnel_host} (onprem.tunnel_hosts[{plan.tunnel_host_index}]): "
            f"its tunnels hold that host's own loopback ports on the proxies; every tunnel host of the hub "
            f"({', '.join(plan.tunnel_hosts)}) runs its own package, with its own key."))
    lines: list[str] = []
    for para in paragraphs:
        if lines:
            lines.append(".")
        lines += textwrap.wrap(para, 78, break_on_hyphens=False, break_long_words=False)
    return lines


def _changelog_items(plan: PackagePlan) -> list[list[str]]:
    """The changelog entry's items, each wrapped to 80 columns (``  * `` and 4-space follow-ups)."""
    items = [(f"Generated by tunnelhub {TOOL_VERSION} from the hub spec, hub {plan.hub} ({plan.cloud}, "
              f"stack {plan.stack}).")]
    if plan.tunnel_host is not None:
        items.append(f"Tunnel host {plan.tunnel_host} (onprem.tunnel_hosts[{plan.tunnel_host_index}]), one of "
                     f"{len(plan.tunnel_hosts)}: {', '.join(plan.tunnel_hosts)}.")
    items += [f"Tunnel {f.route}: proxy localhost:{f.tunnel_port} -> {f.target}." for f in plan.forwards]
    items += [f"Proxy slot {slot}: {endpoint}." for slot, endpoint in enumerate(plan.endpoints)]
    items.append(f"Proxy addresses from {plan.endpoints_source}.")
    if plan.host_key is None:
        items.append("Hub host key: not pinned (--trust-on-first-use).")
    else:
        items.append(f"Hub host key: {plan.host_key.fingerprint}, from {plan.host_key_source}.")
    return [textwrap.wrap(item, 76, break_on_hyphens=False, break_long_words=False) for item in items]


def _status_script(plan: PackagePlan) -> bytes:
    """The status command with this hub's settings in place of its ``CONFIG = None`` line."""
    text = STATUS_SCRIPT.read_text(encoding="utf-8")
    if text.count(STATUS_CONFIG_LINE) != 1:
        raise RuntimeError(f"{STATUS_SCRIPT.name}: no single CONFIG line to fill in")
    config = json.dumps(plan.status_config(), indent=4, sort_keys=True, ensure_ascii=True)
    return text.replace(STATUS_CONFIG_LINE, f"CONFIG: Optional[dict] = json.loads(r\"\"\"\n{config}\n\"\"\")  "
                                            "# this hub's settings, written by the package build\n").encode()


def _render(name: str, ctx: dict) -> bytes:
    try:
        return _TEMPLATES.get_template(name).render(ctx).encode()
    except jinja2.UndefinedError as exc:  # a template/plan mismatch: a bug, not a user error
        raise RuntimeError(f"template {name}: {exc.message}") from exc


def _gzip(data: bytes) -> bytes:
    """gzip -9n: no name, no timestamp, so the bytes depend on the content only."""
    return gzip.compress(data, compresslevel=9, mtime=0)


def _installed_size_kib(files: list[PackageFile]) -> int:
    """Like dpkg-gencontrol: each file's size rounded up to KiB, plus 1 KiB per directory."""
    dirs = {str(p) for f in files for p in PurePosixPath(f.path).parents if str(p) != "/"}
    return sum(-(-len(f.data) // 1024) for f in files) + len(dirs)


# --------------------------------------------------------------------------------------------
# Version
# --------------------------------------------------------------------------------------------


def content_digest(plan: PackagePlan) -> str:
    """A digest of everything the package installs and runs, independent of version and date."""
    rendered = render_package(plan, "0", 0)
    h = hashlib.sha256()
    for f in rendered.files + rendered.control:
        if f.path in ("control", f"{plan.doc_dir}/changelog.Debian.gz", f"/usr/share/man/man1/{plan.pubkey_command}.1.gz",
                      f"/usr/share/man/man1/{plan.status_command}.1.gz"):
            continue  # these carry the version or the date
        h.update(f"{f.path}\0{f.mode:o}\0{len(f.data)}\0".encode() + f.data)
    return h.hexdigest()


def default_version(plan: PackagePlan, source_date_epoch: int) -> str:
    """``<tunnelhub version>+<UTC date>.<time>.<content digest>-1``.

    Ordered by the tunnelhub version, then by the inputs' date (``SOURCE_DATE_EPOCH``, else the
    newest of the spec and outputs files), so a package built after the spec or the outputs
    changed sorts newer; the digest makes two different contents never share a version. The same
    inputs give the same version (and the same bytes).
    """
    when = datetime.fromtimestamp(source_date_epoch, tz=UTC)
    return host_version(f"{TOOL_VERSION}+{when:%Y%m%d.%H%M%S}.{content_digest(plan)[:8]}-1", plan)


def host_version(version: str, plan: PackagePlan) -> str:
    """``version`` with ``+<tunnel host>`` at the end of its upstream part, on a hub that names its
    tunnel hosts: every host's package is ``tunnelhub-<hub>`` (the same units, commands and paths
    on each host), so the version tells them apart, in ``dpkg -l`` and in the file name (two hosts'
    packages can be built into one directory). A hub in the single-host form: ``version`` as is."""
    if plan.tunnel_host is None:
        return version
    m = _VERSION_RE.match(version)
    if m is None:  # check_version ran first
        raise OnpremError(f"--version {version!r} is not a Debian version")
    if m["revision"] is None and "-" in plan.tunnel_host:
        raise OnpremError(f"--version {version!r} has no revision, so dpkg would read the part after the hyphen of "
                          f"tunnel host {plan.tunnel_host!r} (appended as +{plan.tunnel_host}) as one: give a "
                          f"revision, for example {version}-1")
    epoch = f"{m['epoch']}:" if m["epoch"] is not None else ""
    revision = f"-{m['revision']}" if m["revision"] is not None else ""
    return f"{epoch}{m['upstream']}+{plan.tunnel_host}{revision}"


def check_version(version: str) -> str:
    """A Debian version (``[epoch:]upstream[-revision]``); raise :class:`OnpremError` otherwise."""
    m = _VERSION_RE.match(version)
    if not m or ("-" in m["upstream"] and m["revision"] is None):
        raise OnpremError(f"--version {version!r} is not a Debian version: write [epoch:]upstream[-revision], the "
                          "upstream part starting with a digit (letters, digits, . + ~ -), for example 1.4-1")
    return version


def inputs_epoch(*inputs: Path | None) -> int:
    """``$SOURCE_DATE_EPOCH`` when set, else the newest modification time of the input files."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env is not None:
        if not env.isdigit():
            raise OnpremError(f"SOURCE_DATE_EPOCH={env!r} is not a number of seconds since 1970")
        return int(env)
    mtimes = [int(p.stat().st_mtime) for p in inputs if p is not None and p.exists()]
    if not mtimes:
        raise OnpremError("no input file to date the package from: set SOURCE_DATE_EPOCH")
    return max(mtimes)


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DebBuild:
    """A built package."""

    path: Path
    package: str
    version: str
    sha256: str
    plan: PackagePlan
    files: tuple[PackageFile, ...] = field(repr=False)


def build_deb(
    hub: Hub,
    outputs: StackOutputs | None,
    out_dir: str | Path,
    *,
    tunnel_host: str | None = None,
    trust_on_first_use: bool = False,
    version: str | None = None,
    source_date_epoch: int | None = None,
    timing: TunnelTiming = DEFAULT_TIMING,
) -> DebBuild:
    """Build ``<out_dir>/tunnelhub-<hub>_<version>_all.deb`` for tunnel host ``tunnel_host``
    (required when the hub has several) and return what was built.

    ``source_date_epoch`` dates the changelog and every file (default: ``$SOURCE_DATE_EPOCH``);
    ``version`` defaults to :func:`default_version`; on a hub that names its tunnel hosts the
    version ends its upstream part with ``+<tunnel host>`` (:func:`host_version`). The file
    appears complete or not at all.
    """
    plan = plan_package(hub, outputs, tunnel_host=tunnel_host, trust_on_first_use=trust_on_first_use, timing=timing)
    if source_date_epoch is None:
        source_date_epoch = inputs_epoch()
    version = (host_version(check_version(version), plan) if version is not None
               else default_version(plan, source_date_epoch))
    rendered = render_package(plan, version, source_date_epoch)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    upstream_and_revision = version.split(":", 1)[-1]
    final = out_dir / f"{plan.package}_{upstream_and_revision}_all.deb"
    _write_deb(rendered, source_date_epoch, final)
    digest = hashlib.sha256(final.read_bytes()).hexdigest()
    return DebBuild(final, plan.package, version, digest, plan, rendered.files)


def _write_deb(rendered: RenderedPackage, epoch: int, final: Path) -> None:
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        raise OnpremError("dpkg-deb is not installed: build the package on Debian or Ubuntu (apt-get install dpkg)")
    with tempfile.TemporaryDirectory(prefix="tunnelhub-deb-") as tmp:
        root = Path(tmp) / "root"
        for f in rendered.files:
            _place(root, f.path, f)
        for f in rendered.control:
            _place(root, f"DEBIAN/{f.path}", f)
        _normalise_tree(root, epoch)
        partial = final.with_name(f".{final.name}.{os.getpid()}.partial")
        args = [dpkg_deb, "--root-owner-group", "-Zxz", "--build", str(root), str(partial)]
        if _dpkg_deb_has_threads_max(dpkg_deb):
            args.insert(2, "--threads-max=1")  # xz output must not depend on the CPU count
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "LC_ALL": "C.UTF-8"}
        try:
            result = subprocess.run(args, check=False, capture_output=True, text=True, env=env)
            if result.returncode != 0:
                raise OnpremError(f"dpkg-deb failed to build {final.name}: {result.stderr.strip()}")
            with open(partial, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)


def _place(root: Path, rel: str, f: PackageFile) -> None:
    dest = root / rel.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(f.data)
    dest.chmod(f.mode)


def _normalise_tree(root: Path, epoch: int) -> None:
    """Directories 0755 and every entry's mtime = ``epoch`` (files are written with their modes)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            os.utime(os.path.join(dirpath, name), (epoch, epoch), follow_symlinks=False)
        os.chmod(dirpath, 0o755)
        os.utime(dirpath, (epoch, epoch))


_THREADS_MAX: dict[str, bool] = {}


def _dpkg_deb_has_threads_max(dpkg_deb: str) -> bool:
    if dpkg_deb not in _THREADS_MAX:
        help_text = subprocess.run([dpkg_deb, "--help"], check=False, capture_output=True, text=True).stdout
        _THREADS_MAX[dpkg_deb] = "--threads-max" in help_text
    return _THREADS_MAX[dpkg_deb]


def deb_file(deb: str | Path, path: str) -> bytes:
    """The bytes of one installed file (``/etc/...``) or control member (``DEBIAN/...``) of a .deb."""
    if path.startswith("DEBIAN/"):
        tar_bytes = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True, check=True).stdout
        member = "./" + path.removeprefix("DEBIAN/")
    else:
        tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
        member = "." + path
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        extracted = tf.extractfile(member)
        if extracted is None:
            raise KeyError(path)
        return extracted.read()
