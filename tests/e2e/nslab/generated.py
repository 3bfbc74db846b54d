"""Run tunnelhub's generated artifacts in the lab: what ships is what runs.

A proxy is started from its extracted cloud-init (:meth:`Lab.extract_proxy`):

- every ``/etc/sysctl.d/*.conf`` is applied inside the proxy's namespace (``sysctl -p``);
- sshd runs with every ``/etc/ssh/sshd_config.d/*.conf`` drop-in, the ``authorized_keys`` the
  cloud-init writes, and the host key(s) under ``/etc/ssh/ssh_host_*_key``;
- HAProxy runs ``/etc/haproxy/haproxy.cfg`` (``haproxy -db``: foreground);
- every unit under ``/etc/systemd/system/`` that the cloud-init writes runs under the unit
  runner (the health endpoint among them).

Paths are rewritten only where they must be (files the cloud-init wrote, ``/run``), plus one
stated change: HAProxy's ``log /dev/log`` goes to stderr, so its log lands in the lab's logs.
The tunnel host's side (the on-prem package's unit) is run by ``nslab.hub``.
"""

from __future__ import annotations

import re
from pathlib import Path

from .cloudinit import VmRoot, WrittenFile, match_block_setting
from .haproxy import Haproxy
from .lab import Lab, ProxyRuntime
from .proc import LabError
from .unit import load_unit


def _ensure_runtime_dirs(vm: VmRoot, text: str) -> None:
    """Create the parent directories of rewritten runtime paths (``<root>/run/...``)."""
    run_root = str(vm.root / "run")
    for token in re.findall(r"[^\s\"'=]+", text):
        if token.startswith(run_root + "/"):
            Path(token).parent.mkdir(parents=True, exist_ok=True)


def lab_copy(vm: VmRoot, vm_path: str, *, rewrite_log: bool = False) -> Path:
    """A copy of an extracted config with its paths pointed into the proxy's root."""
    text = vm.rewrite_paths(vm.file(vm_path).text)
    if rewrite_log:
        text = re.sub(r"(?m)^(\s*)log\s+/dev/log\b(.*)$", r"\1log stderr format raw\2", text)
    _ensure_runtime_dirs(vm, text)
    target = vm.root.parent / "lab" / vm_path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


def start_proxy(lab: Lab, proxy: str, vm: VmRoot) -> ProxyRuntime:
    for sysctl in vm.matching(r"^/etc/sysctl\.d/.*\.conf$"):
        lab.apply_sysctl_file(proxy, sysctl.host_path)

    dropins = [lab_copy(vm, f.vm_path)
               for f in vm.matching(r"^/etc/ssh/sshd_config\.d/.*\.conf$")]
    keys_file = tunnel_keys_file(vm)
    host_keys = [f.host_path for f in vm.matching(r"^/etc/ssh/ssh_host_[a-z0-9]+_key$")]
    if not host_keys:
        raise LabError("no /etc/ssh/ssh_host_*_key for the proxy: pass the hub host key")
    sshd = lab.start_sshd(proxy, authorized_keys=keys_file.host_path, dropins=dropins,
                          host_keys=host_keys)
    runtime = ProxyRuntime(name=proxy, sshd=sshd, vm=vm)
    lab.proxies[proxy] = runtime

    for cfg in vm.matching(r"^/etc/haproxy/haproxy\.cfg$"):
        path = lab_copy(vm, cfg.vm_path, rewrite_log=True)
        haproxy = Haproxy(config_text=path.read_text(), workdir=path.parent,
                          netns=lab.topology.ns(proxy), log_dir=lab.log_dir,
                          name=f"{proxy}-haproxy")
        lab.on_close(f"{proxy} haproxy", haproxy.stop)
        runtime.services["haproxy"] = haproxy.start()

    mapping = vm_path_map(vm)
    for unit in vm.matching(r"^/etc/systemd/system/[^/]+\.service$"):
        command = load_unit(unit.host_path, path_map=mapping)
        name = unit.vm_path.rsplit("/", 1)[1].removesuffix(".service")
        runtime.services[name] = lab.run_service(proxy, command, name=f"{proxy}-{name}")
    return runtime


def stop_proxy(lab: Lab, proxy: str) -> None:
    """Stop everything ``start_proxy`` started on ``proxy`` (by PID), as a VM going away."""
    runtime = lab.proxies.pop(proxy, None)
    if runtime is None:
        return
    for service in runtime.services.values():
        service.stop()
    runtime.sshd.stop()


def tunnel_keys_file(vm: VmRoot) -> WrittenFile:
    """The tunnel user's keys: the file the drop-in's ``Match User`` block names in
    ``AuthorizedKeysFile`` (other users' ``authorized_keys``, the admin's, are not it)."""
    named = [(d.vm_path, match_block_setting(d.text, "AuthorizedKeysFile"))
             for d in vm.matching(r"^/etc/ssh/sshd_config\.d/.*\.conf$")]
    paths = {value for _, value in named if value}
    if len(paths) != 1:
        raise LabError(f"expected one AuthorizedKeysFile in the drop-ins' Match User blocks, "
                       f"found {named}")
    path = paths.pop()
    if " " in path or "%" in path:
        raise LabError(f"AuthorizedKeysFile {path!r}: the lab needs one literal path")
    return vm.file(path)


def vm_path_map(vm: VmRoot) -> dict[str, str]:
    mapping = {p: str(f.host_path) for p, f in vm.files.items()}
    mapping["/run/"] = str(vm.root / "run") + "/"
    mapping["/var/run/"] = str(vm.root / "run") + "/"
    return mapping
