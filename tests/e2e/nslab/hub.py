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
from .netns import hub_links
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


def hub_lab(*, proxies: int = 2, client_to_db: bool = False, remote_service: bool = False) -> Lab:
    """A :class:`Lab` laid out as the lab hub expects (not opened yet)."""
    links, routes = hub_links(proxy_ips(proxies), client_to_db=client_to_db, remote_service=remote_service)
    return Lab(proxies=proxies, tunnel_user=TUNNEL_USER, links=links, routes=routes)


def hub_spec_data(*, tunnel_public_key: str, admin_public_key: str, db_address: str,
                  proxies: int = 2, tcp_quickack: bool = True) -> dict:
    """The lab hub, as spec YAML data (defaults left to the spec: 5 s x 2 LB probes, 2 s checks)."""
    return {
        "name": HUB_NAME,
        "cloud": "azure",
        "region": "westeurope",
        "network": {"cidr": HUB_CIDR, "onprem_path": {"hub_vnet_id": HUB_VNET_ID}},
        "proxies": {"count": proxies, "health_port": HEALTH_PORT,
                    "admin_ssh_public_keys": [admin_public_key]},
        "routes": [{"name": ROUTE_NAME, "kind": "tunnel", "port": ROUTE_PORT,
                    "target": f"{db_address}:3306", "type": "mysql"}],
        "onprem": {"source_cidrs": [SOURCE_CIDR], "tunnel_public_keys": [tunnel_public_key],
                   "tunnel_user": TUNNEL_USER, "tcp_quickack": tcp_quickack},
    }


@dataclass
class GeneratedHub:
    """The lab hub's generated artifacts, and the proxies and tunnels running them."""

    lab: Lab
    tcp_quickack: bool = True
    hub: Hub = field(init=False)
    spec_data: dict = field(init=False)
    document: HubDocument = field(init=False)
    deb: DebBuild = field(init=False)
    onprem: VmRoot = field(init=False)
    unit_vm_path: str = field(init=False)
    rewrites: list[str] = field(default_factory=list, init=False)
    imds: dict[str, FakeImds] = field(default_factory=dict, init=False)
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
        self.spec_data = hub_spec_data(tunnel_public_key=tunnel_pub, admin_public_key=admin_pub,
                                       db_address=lab.db_host, proxies=len(lab.proxy_names),
                                       tcp_quickack=self.tcp_quickack)
        self.hub = self._load(self.spec_data)
        self.document = render_document(self.hub)
        self._bootstraps = {slot: render_cloud_init(self.hub, slot).payload for slot in range(len(lab.proxy_names))}
        self.deb = self._build_deb()
        self.onprem = self._install_onprem()
        # The proxies are in one /26 but each on its own link to the gateway: a proxy ARPs for a
        # peer on-link. Azure's network answers every ARP in a subnet itself (its virtual gateway
        # MAC), so the lab's gateway answers for the peers (proxy ARP) and routes between them:
        # the rollout gate's proxy-to-proxy health queries travel as in the VNet.
        for proxy in lab.proxy_names:
            lab.topology.sysctl("gw", f"net.ipv4.conf.{lab.topology.ifname('gw', proxy)}.proxy_arp", 1)

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

    def _build_deb(self) -> DebBuild:
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
        deb = build_deb(self.hub, outputs, lab.path("dist"), source_date_epoch=SOURCE_DATE_EPOCH)
        if deb.plan.warnings:
            raise LabError(f"building the lab's package warned: {deb.plan.warnings}")
        return deb

    def _install_onprem(self) -> VmRoot:
        plan = self.deb.plan
        self.unit_vm_path = f"/lib/systemd/system/{plan.package}@.service"
        wanted = [self.unit_vm_path, plan.ssh_config, plan.known_hosts,
                  *(f"{plan.etc_dir}/slot-{slot}.env" for slot in range(len(plan.endpoints)))]
        if plan.tcp_quickack:
            wanted.append(plan.quickack_helper)
        files: dict[str, bytes] = {path: deb_file(self.deb.path, path) for path in wanted}
        key_path, _ = self.lab.key("tunnel_ed25519")
        files[plan.key_path] = key_path.read_bytes()
        modes = {plan.key_path: 0o600, plan.quickack_helper: 0o755}
        root = self.lab.path("onprem", "root")
        if root.exists():
            shutil.rmtree(root)
        vm = self.lab.install_onprem(files, modes=modes)
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
        self.rewrites = [f"ssh_config: {a} -> {b}" for a, b in changed]
        return vm

    def unit_path_map(self) -> dict[str, str]:
        mapping = {path: str(f.host_path) for path, f in self.onprem.files.items()}
        mapping["/run/"] = str(self.onprem.root / "run") + "/"
        return mapping

    def tunnel_command(self, proxy: str) -> UnitCommand:
        """The unit instance for ``proxy``'s slot as the runner runs it, checked against the
        unit's own words: only the paths named in :attr:`rewrites` may differ."""
        slot = str(self.slot(proxy))
        plan = self.deb.plan
        unit = self.onprem.file(self.unit_vm_path)
        command = load_unit(unit.host_path, instance=slot, path_map=self.unit_path_map())
        runtime_vm = "/run/" + plan.slot_runtime_directory.replace("%i", slot)
        env = {**unit_environment(unit.text), "RUNTIME_DIRECTORY": runtime_vm,
               **read_env_file(self.onprem.file(f"{plan.etc_dir}/slot-{slot}.env").text)}
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
            self.rewrites += [f"unit: {a} -> {b}" for a, b in changed
                              if f"unit: {a} -> {b}" not in self.rewrites]
        env_file = f"unit: EnvironmentFile={plan.etc_dir}/slot-%i.env -> lab copy"
        if env_file not in self.rewrites:
            self.rewrites.append(env_file)
        return command

    def start_tunnel(self, proxy: str) -> ServiceRunner:
        """Run the unit instance for ``proxy``'s slot in the ``onprem`` namespace."""
        runner = self.lab.run_service("onprem", self.tunnel_command(proxy),
                                      name=f"onprem-{self.deb.plan.package}@{self.slot(proxy)}")
        self.lab.tunnels[proxy] = runner
        return runner

    def known_hosts_digest(self) -> tuple[str, float]:
        """sha256 and mtime of the tunnel host's known_hosts (it must never change)."""
        path = self.onprem.file(self.deb.plan.known_hosts).host_path
        return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime

    def ssh_config_path(self) -> Path:
        return self.onprem.file(self.deb.plan.ssh_config).host_path


def start_generated_hub(lab: Lab, *, tcp_quickack: bool = True, wait_s: float = 45.0
                        ) -> GeneratedHub:
    """Database, both proxies and both tunnels from the generated artifacts (LB not included)."""
    if lab.db is None:
        lab.start_db()
    hub = GeneratedHub(lab, tcp_quickack=tcp_quickack)
    for proxy in lab.proxy_names:
        hub.start_proxy(proxy)
    for proxy in lab.proxy_names:
        hub.start_tunnel(proxy)
    for proxy in lab.proxy_names:
        lab.wait_tunnel_listener(proxy, timeout_s=wait_s)
    return hub
