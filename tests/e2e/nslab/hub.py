"""The lab as a tunnelhub hub: a real hub spec, its rendered cloud-init, its built on-prem .deb.

:func:`hub_lab` lays the namespaces out like a hub reached over a private circuit
(:func:`nslab.netns.hub_links`): the tunnel host ``192.168.10.5`` dials the proxies' static
addresses ``10.60.0.5``/``10.60.0.6`` through a gateway, the database ``192.168.20.15`` sits on
the tunnel host's LAN. :class:`GeneratedHub` then

- writes a hub spec (``lab-hub.yaml``: an Azure hub, so every proxy file is embedded in the user
  data; ``network.cidr`` 10.60.0.0/24 and ``onprem.source_cidrs`` 192.168.10.0/24 as laid out;
  the tunnel key the lab generated in ``onprem.tunnel_public_keys``; one MySQL tunnel route to
  the ``db`` namespace's MariaDB; probe and load-balancer settings at the spec defaults) and
  loads it with :func:`tunnelhub.spec.load_spec`;
- renders each proxy's bootstrap cloud-init with :func:`tunnelhub.userdata.render_cloud_init` and
  extracts the payload that ships (gzip and all) into the proxy's root: sshd drop-in, HAProxy's
  static config and unit drop-in, the health daemon and the reconciler with their units and
  configs, sysctl drop-in (see ``generated.py``);
- renders the hub configuration document with :func:`tunnelhub.userdata.render_document` and
  serves it, as the Azure VM's ``user_data``, from a fake IMDS in each proxy's namespace
  (``nslab.imds``): the reconciler fetches it from there and writes the routes, the health
  routes, the tunnel user's keys and forwarding rules. :meth:`GeneratedHub.publish` is ``terraform
  apply`` of a spec change: it checks that the bootstrap of every slot is byte-identical (a routine
  change replaces no VM) and updates the channel;
- writes an outputs file in ``cdktf output --outputs-file`` form holding the lab's proxy
  addresses (``tunnel_endpoints``) and the lab's hub host key (``host_public_key``), builds the
  on-prem package with :func:`tunnelhub.onprem.build_deb`, and takes the unit, ``ssh_config``,
  ``known_hosts``, ``slot-N.env`` and the quick-ACK helper out of the .deb with
  :func:`tunnelhub.onprem.deb_file`;
- runs the unit's real ``ExecStartPre``/``ExecStart``/``ExecStopPost`` for each slot in the
  ``onprem`` namespace under the unit runner (``Restart=always``, ``RestartSec=2`` as written).

Paths are rewritten into the lab's directory only where unavoidable, and :attr:`rewrites` lists
each one: in the unit, ``EnvironmentFile=``, ``-F <ssh_config>``, the quick-ACK helper and its
``/run`` state file; in ``ssh_config``, ``IdentityFile`` and ``UserKnownHostsFile``. The tunnel
key (postinst makes it on a real host) is the lab's, placed at the package's key path.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

from tunnelhub.addressing import azure_plan
from tunnelhub.onprem import DebBuild, build_deb, deb_file, read_outputs
from tunnelhub.onprem.unitfile import (
    exec_commands,
    exec_start_words,
    expand,
    expand_instance,
    read_env_file,
    unit_environment,
)
from tunnelhub.spec import Hub, load_spec
from tunnelhub.userdata import HubDocument, extract_files, render_cloud_init, render_document

from . import generated
from .cloudinit import VmRoot, rewrite_paths
from .haproxy import LbRoute
from .imds import FakeImds
from .lab import Lab
from .netns import hub_links, tunnel_host_nodes
from .proc import LabError
from .unit import ServiceRunner, UnitCommand, load_unit

HUB_NAME = "nslab"  # package tunnelhub-nslab (not "lab": /var/lib/tunnelhub-lab is the lab's own base)
HUB_CIDR = "10.60.0.0/24"
HUB_VNET_ID = ("/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/connectivity-rg/providers/"
               "Microsoft.Network/virtualNetworks/hub-vnet")  # network.onprem_path: the lab peers with it (on paper)
SOURCE_CIDR = "192.168.10.0/24"
TUNNEL_USER = "thtunnel"  # the spec's onprem.tunnel_user, created on this machine while the lab runs
ROUTE_NAME = "labdb"
ROUTE_PORT = 3306
HEALTH_PORT = 8081  # not the default 8080: the reference's verbatim health check binds 8080
SOURCE_DATE_EPOCH = 1_747_700_000


def proxy_ips(count: int) -> list[str]:
    """The proxies' static addresses as the spec's Azure address plan gives them."""
    plan = azure_plan(proxy_count=count, vnet_cidr=IPv4Network(HUB_CIDR), proxy_subnet=None)
    return [str(ip) for ip in plan.proxy_ips]


def hub_lab(*, proxies: int = 2, client_to_db: bool = False, remote_service: bool = False,
            tunnel_hosts: int = 1) -> Lab:
    """A :class:`Lab` laid out as the lab hub expects (not opened yet); ``tunnel_hosts`` > 1 adds
    the namespaces ``onprem2``... (:func:`nslab.netns.hub_links`)."""
    links, routes = hub_links(proxy_ips(proxies), client_to_db=client_to_db, remote_service=remote_service,
                              tunnel_hosts=tunnel_hosts)
    return Lab(proxies=proxies, tunnel_user=TUNNEL_USER, links=links, routes=routes)


def hub_spec_data(*, tunnel_public_key: str, admin_public_key: str, db_address: str,
                  proxies: int = 2, tcp_quickack: bool = True,
                  tunnel_hosts: Sequence[TunnelHostSpec] = ()) -> dict:
    """The lab hub, as spec YAML data (defaults left to the spec: 5 s x 2 LB probes, 2 s checks).

    ``tunnel_hosts`` empty: the single-host form (``onprem.tunnel_public_keys``, one host named
    ``tunnel-host``); else ``onprem.tunnel_hosts``, each host with its own key and its own address
    as ``source_cidrs`` (so each key's ``from=`` admits only its own host)."""
    onprem: dict = {"source_cidrs": [SOURCE_CIDR], "tunnel_user": TUNNEL_USER, "tcp_quickack": tcp_quickack}
    if tunnel_hosts:
        onprem["tunnel_hosts"] = [{"name": h.name, "public_keys": [h.public_key],
                                   "source_cidrs": [f"{h.address}/32"]} for h in tunnel_hosts]
    else:
        onprem["tunnel_public_keys"] = [tunnel_public_key]
    return {
        "name": HUB_NAME,
        "cloud": "azure",
        "region": "westeurope",
        "network": {"cidr": HUB_CIDR, "onprem_path": {"hub_vnet_id": HUB_VNET_ID}},
        "proxies": {"count": proxies, "health_port": HEALTH_PORT,
                    "admin_ssh_public_keys": [admin_public_key]},
        "routes": [{"name": ROUTE_NAME, "kind": "tunnel", "port": ROUTE_PORT,
                    "target": f"{db_address}:3306", "type": "mysql"}],
        "onprem": onprem,
    }


@dataclass(frozen=True)
class TunnelHostSpec:
    """One tunnel host of a multi-host lab hub, as the spec names it."""

    name: str  # the spec's tunnel_hosts[].name ("th-a")
    public_key: str
    address: str  # its on-prem LAN address (its source_cidrs: this /32)


@dataclass
class OnPremHost:
    """One tunnel host of the lab hub: its namespace, its key, its own package and installed files."""

    name: str
    """The spec's name (``th-a``; the single-host form's one host is ``tunnel-host``)."""
    node: str
    """The lab namespace it runs in (``onprem``, ``onprem2``)."""
    key_name: str
    """The lab key (``Lab.key``) that is this host's tunnel key."""
    deb: DebBuild = field(init=False)
    vm: VmRoot = field(init=False)
    unit_vm_path: str = field(init=False)
    rewrites: list[str] = field(default_factory=list, init=False)


@dataclass
class GeneratedHub:
    """The lab hub's generated artifacts, and the proxies and tunnels running them."""

    lab: Lab
    tcp_quickack: bool = True
    tunnel_host_names: Sequence[str] = ()
    """Empty: the single-host form (one host, ``onprem``). Else one spec tunnel host per name, the
    first in ``onprem``, the next in ``onprem2``... (the lab needs ``hub_lab(tunnel_hosts=N)``)."""
    hub: Hub = field(init=False)
    spec_data: dict = field(init=False)
    document: HubDocument = field(init=False)
    imds: dict[str, FakeImds] = field(default_factory=dict, init=False)
    hosts: list[OnPremHost] = field(default_factory=list, init=False)
    tunnels: dict[tuple[str, str], ServiceRunner] = field(default_factory=dict, init=False)
    """``(tunnel host name, proxy)`` -> the unit instance running that host's slot for the proxy."""
    _bootstraps: dict[int, bytes] = field(default_factory=dict, init=False)
    _spec_count: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        lab = self.lab
        if lab.proxy_names and any(lab.proxy_address(p) != ip
                                   for p, ip in zip(lab.proxy_names, proxy_ips(len(lab.proxy_names)),
                                                    strict=True)):
            raise LabError("the lab's proxies are not at the spec's addresses: build it with hub_lab()")
        _, tunnel_pub = lab.key("tunnel_ed25519")
        _, admin_pub = lab.key("admin_ed25519")
        nodes = tunnel_host_nodes(max(1, len(self.tunnel_host_names)))
        missing = [n for n in nodes if n not in lab.topology.nodes]
        if missing:
            raise LabError(f"the lab has no namespace {missing} for the tunnel hosts: "
                           f"build it with hub_lab(tunnel_hosts={len(nodes)})")
        specs: list[TunnelHostSpec] = []
        if self.tunnel_host_names:
            for k, (name, node) in enumerate(zip(self.tunnel_host_names, nodes, strict=True)):
                key_name = "tunnel_ed25519" if k == 0 else f"tunnel_{node}_ed25519"
                specs.append(TunnelHostSpec(name, lab.key(key_name)[1], lab.topology.ip(node, "gw")))
                self.hosts.append(OnPremHost(name, node, key_name))
        self.spec_data = hub_spec_data(tunnel_public_key=tunnel_pub, admin_public_key=admin_pub,
                                       db_address=lab.db_host, proxies=len(lab.proxy_names),
                                       tcp_quickack=self.tcp_quickack, tunnel_hosts=specs)
        self.hub = self._load(self.spec_data)
        if not self.hosts:
            self.hosts.append(OnPremHost(self.hub.tunnel_hosts[0].name, "onprem", "tunnel_ed25519"))
        self.document = render_document(self.hub)
        self._bootstraps = {slot: render_cloud_init(self.hub, slot).payload for slot in range(len(lab.proxy_names))}
        for host in self.hosts:
            host.deb = self._build_deb(host)
            host.vm = self._install_onprem(host)
        # The proxies are in one /26 but each on its own link to the gateway: a proxy ARPs for a
        # peer on-link. Azure's network answers every ARP in a subnet itself (its virtual gateway
        # MAC), so the lab's gateway answers for the peers (proxy ARP) and routes between them:
        # the rollout gate's proxy-to-proxy health queries travel as in the VNet.
        for proxy in lab.proxy_names:
            lab.topology.sysctl("gw", f"net.ipv4.conf.{lab.topology.ifname('gw', proxy)}.proxy_arp", 1)

    # -- the first tunnel host (the single-host form's only one), as before -------------------------

    @property
    def deb(self) -> DebBuild:
        return self.hosts[0].deb

    @property
    def onprem(self) -> VmRoot:
        return self.hosts[0].vm

    @property
    def unit_vm_path(self) -> str:
        return self.hosts[0].unit_vm_path

    def host(self, name: str | None = None) -> OnPremHost:
        """A tunnel host by its spec name (default: the first)."""
        if name is None:
            return self.hosts[0]
        for host in self.hosts:
            if host.name == name:
                return host
        raise LabError(f"no tunnel host {name!r} in the lab hub: {[h.name for h in self.hosts]}")

    def tunnel_port(self, host: str | None = None) -> int:
        """The loopback port ``host``'s tunnel for the route holds on every proxy (the port plan)."""
        return self.hub.host_tunnel_port(self.hub.routes[0], self.host(host).name)

    def _load(self, data: dict) -> Hub:
        name = f"lab-hub{'' if self.tcp_quickack else '-noquickack'}"
        spec_path = self.lab.path(f"{name}.yaml" if not self._spec_count else f"{name}.{self._spec_count}.yaml")
        self._spec_count += 1
        spec_path.write_text(json.dumps({"version": 1, "hubs": [data]}, indent=2))  # JSON is YAML
        return load_spec(spec_path).hub(HUB_NAME)

    # -- the live configuration ---------------------------------------------------------------------

    def publish(self, change: Callable[[dict], None] | None = None, *, proxies: Sequence[str] | None = None,
                user_data: str | None = None) -> tuple[HubDocument, float]:
        """``terraform apply`` of a spec change: ``change`` edits a copy of the spec data; the
        bootstrap of every slot must come out byte-identical (no VM replaced) and the new
        document goes to the channel of ``proxies`` (default: all). ``user_data`` puts that exact
        text in the channel instead (a corrupted document). Returns (document, when the channel
        changed: ``time.monotonic()``)."""
        if user_data is None:
            data = copy.deepcopy(self.spec_data)
            if change is not None:
                change(data)
            hub = self._load(data)
            for slot, payload in self._bootstraps.items():
                if render_cloud_init(hub, slot).payload != payload:
                    raise LabError(f"the spec change alters slot {slot}'s bootstrap user data: it would replace the VM")
            self.spec_data, self.hub, self.document = data, hub, render_document(hub)
            user_data = self.document.azure_user_data()
        at = 0.0
        for proxy in proxies if proxies is not None else self.lab.proxy_names:
            at = self.imds[proxy].set_user_data(user_data)
        return self.document, at

    # -- proxies ------------------------------------------------------------------------------------

    @property
    def route(self) -> LbRoute:
        return LbRoute(ROUTE_NAME, ROUTE_PORT)

    @property
    def backend(self) -> str:
        return f"be_{ROUTE_NAME}"

    def slot(self, proxy: str) -> int:
        return self.lab.proxy_names.index(proxy)

    def extract_proxy(self, proxy: str) -> VmRoot:
        """Render the proxy's cloud-init and extract what ships (the gzip payload)."""
        user_data = render_cloud_init(self.hub, self.slot(proxy))
        if user_data.payload != self._bootstraps[self.slot(proxy)]:
            raise LabError(f"{proxy}: the bootstrap changed since the lab started (a new machine)")
        root = self.lab.path(proxy, "root")
        if root.exists():
            shutil.rmtree(root)
        vm = self.lab.extract_proxy(proxy, user_data.payload)
        expected = {f.path for f in extract_files(user_data.cloud_config)}
        extracted = set(vm.files) - {"/etc/ssh/ssh_host_ed25519_key"}
        extracted -= {p for p in extracted if p.endswith("/.ssh/authorized_keys")}  # users[] keys
        if extracted != expected:
            raise LabError(f"{proxy}: the lab extracted {sorted(extracted)} but the renderer wrote "
                           f"{sorted(expected)}")
        return vm

    def start_imds(self, proxy: str) -> FakeImds:
        if proxy not in self.imds:
            imds = FakeImds(self.lab.topology.ns(proxy), self.document.azure_user_data()).start()
            self.lab.on_close(f"{proxy} imds", imds.stop)
            self.imds[proxy] = imds
        return self.imds[proxy]

    def start_proxy(self, proxy: str) -> None:
        self.start_imds(proxy)
        generated.start_proxy(self.lab, proxy, self.extract_proxy(proxy))

    def replace_proxy(self, proxy: str) -> None:
        """A proxy VM replaced: every process stopped, its files gone, rendered and started fresh
        (same slot, so the same address and the same hub host key)."""
        generated.stop_proxy(self.lab, proxy)
        self.start_proxy(proxy)

    # -- the on-prem package ------------------------------------------------------------------------

    def _build_deb(self, host: OnPremHost) -> DebBuild:
        lab = self.lab
        outputs_path = lab.path("outputs.json")
        outputs_path.write_text(json.dumps({
            "//": "the lab's stack outputs, as cdktf output --outputs-file writes them",
            self.hub.stack_name: {
                "tunnel_endpoints": [lab.proxy_address(p) for p in lab.proxy_names],
                "host_public_key": lab.hub_host_key[1],
            },
        }, indent=2))
        outputs = read_outputs(outputs_path, self.hub.stack_name)
        if self.hub.multi_host:  # one package per tunnel host (its own ports, its own name)
            deb = build_deb(self.hub, outputs, lab.path("dist", host.name), source_date_epoch=SOURCE_DATE_EPOCH,
                            tunnel_host=host.name)
        else:
            deb = build_deb(self.hub, outputs, lab.path("dist"), source_date_epoch=SOURCE_DATE_EPOCH)
        if deb.plan.warnings:
            raise LabError(f"building the lab's package warned: {deb.plan.warnings}")
        return deb

    def _install_onprem(self, host: OnPremHost) -> VmRoot:
        plan = host.deb.plan
        host.unit_vm_path = f"/lib/systemd/system/{plan.package}@.service"
        wanted = [host.unit_vm_path, plan.ssh_config, plan.known_hosts,
                  *(f"{plan.etc_dir}/slot-{slot}.env" for slot in range(len(plan.endpoints)))]
        if plan.tcp_quickack:
            wanted.append(plan.quickack_helper)
        files: dict[str, bytes] = {path: deb_file(host.deb.path, path) for path in wanted}
        key_path, _ = self.lab.key(host.key_name)
        files[plan.key_path] = key_path.read_bytes()
        modes = {plan.key_path: 0o600, plan.quickack_helper: 0o755}
        root = self.lab.path(host.node, "root")
        if root.exists():
            shutil.rmtree(root)
        vm = self.lab.install_onprem(files, modes=modes, node=host.node)
        # ssh reads its key and known_hosts from the paths ssh_config names: point them at the
        # lab's copies (the only two lines of ssh_config the lab changes, checked here).
        config = vm.file(plan.ssh_config)
        mapping = {plan.key_path: str(vm.file(plan.key_path).host_path),
                   plan.known_hosts: str(vm.file(plan.known_hosts).host_path)}
        text = rewrite_paths(config.text, mapping)
        changed = [(a.strip(), b.strip()) for a, b in zip(config.text.splitlines(), text.splitlines(),
                                                          strict=True) if a != b]
        if [a.split()[0] for a, _ in changed] != ["IdentityFile", "UserKnownHostsFile"]:
            raise LabError(f"rewriting ssh_config changed more than its two paths: {changed}")
        config.host_path.write_text(text)
        host.rewrites = [f"ssh_config: {a} -> {b}" for a, b in changed]
        return vm

    @property
    def rewrites(self) -> list[str]:
        """Every path the lab rewrote, on every tunnel host (named by its host with two or more)."""
        if len(self.hosts) == 1:
            return self.hosts[0].rewrites
        return [f"{h.name}: {line}" for h in self.hosts for line in h.rewrites]

    def unit_path_map(self, host: str | None = None) -> dict[str, str]:
        vm = self.host(host).vm
        mapping = {path: str(f.host_path) for path, f in vm.files.items()}
        mapping["/run/"] = str(vm.root / "run") + "/"
        return mapping

    def tunnel_command(self, proxy: str, host: str | None = None) -> UnitCommand:
        """The unit instance for ``proxy``'s slot (of tunnel host ``host``'s package, default the
        first) as the runner runs it, checked against the unit's own words: only the paths named
        in :attr:`rewrites` may differ."""
        slot = str(self.slot(proxy))
        onprem = self.host(host)
        plan = onprem.deb.plan
        unit = onprem.vm.file(onprem.unit_vm_path)
        command = load_unit(unit.host_path, instance=slot, path_map=self.unit_path_map(host))
        runtime_vm = "/run/" + plan.slot_runtime_directory.replace("%i", slot)
        env = {**unit_environment(unit.text), "RUNTIME_DIRECTORY": runtime_vm,
               **read_env_file(onprem.vm.file(f"{plan.etc_dir}/slot-{slot}.env").text)}
        pairs = [(expand(exec_start_words(unit.text), env), command.argv)]
        for key, lines in (("ExecStartPre", command.start_pre), ("ExecStopPost", command.stop_post)):
            written = [expand(expand_instance(words, slot), env) for _, words in exec_commands(unit.text, key)]
            if len(written) != len(lines):
                raise LabError(f"{key}: the unit has {len(written)} lines, the runner {len(lines)}")
            pairs += list(zip(written, [line.argv for line in lines], strict=True))
        allowed = {plan.ssh_config, plan.quickack_helper, f"{plan.runtime_dir}/quickack-{slot}.json"}
        for words, argv in pairs:
            changed = [(a, b) for a, b in zip(words, argv, strict=True) if a != b]
            # the health forward's socket lives in the slot's RuntimeDirectory (/run/... mapped)
            if len(words) != len(argv) or any(a not in allowed and not a.startswith(runtime_vm + "/")
                                              for a, _ in changed):
                raise LabError(f"the lab's command differs from the unit beyond its paths: {words} vs {argv}")
            onprem.rewrites += [f"unit: {a} -> {b}" for a, b in changed
                                if f"unit: {a} -> {b}" not in onprem.rewrites]
        env_file = f"unit: EnvironmentFile={plan.etc_dir}/slot-%i.env -> lab copy"
        if env_file not in onprem.rewrites:
            onprem.rewrites.append(env_file)
        return command

    def start_tunnel(self, proxy: str, host: str | None = None) -> ServiceRunner:
        """Run the unit instance for ``proxy``'s slot of tunnel host ``host`` (default: the first)
        in that host's namespace. The first host's runners are also ``lab.tunnels[proxy]``."""
        onprem = self.host(host)
        runner = self.lab.run_service(onprem.node, self.tunnel_command(proxy, onprem.name),
                                      name=f"{onprem.node}-{onprem.deb.plan.package}@{self.slot(proxy)}")
        self.tunnels[(onprem.name, proxy)] = runner
        if onprem is self.hosts[0]:
            self.lab.tunnels[proxy] = runner
        return runner

    def host_tunnels(self, host: str | None = None) -> dict[str, ServiceRunner]:
        """proxy -> the unit instance of ``host`` (default: the first) dialing it."""
        name = self.host(host).name
        return {p: r for (h, p), r in self.tunnels.items() if h == name}

    def known_hosts_digest(self, host: str | None = None) -> tuple[str, float]:
        """sha256 and mtime of the tunnel host's known_hosts (it must never change)."""
        onprem = self.host(host)
        path = onprem.vm.file(onprem.deb.plan.known_hosts).host_path
        return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime

    def ssh_config_path(self, host: str | None = None) -> Path:
        onprem = self.host(host)
        return onprem.vm.file(onprem.deb.plan.ssh_config).host_path


def start_generated_hub(lab: Lab, *, tcp_quickack: bool = True, wait_s: float = 45.0,
                        tunnel_hosts: Sequence[str] = ()) -> GeneratedHub:
    """Database, every proxy and every tunnel (each tunnel host's, with ``tunnel_hosts``) from the
    generated artifacts (LB not included)."""
    if lab.db is None:
        lab.start_db()
    hub = GeneratedHub(lab, tcp_quickack=tcp_quickack, tunnel_host_names=tunnel_hosts)
    for proxy in lab.proxy_names:
        hub.start_proxy(proxy)
    for host in hub.hosts:
        for proxy in lab.proxy_names:
            hub.start_tunnel(proxy, host.name)
    for host in hub.hosts:
        for proxy in lab.proxy_names:
            lab.wait_tunnel_listener(proxy, hub.tunnel_port(host.name), timeout_s=wait_s)
    return hub
