"""Run tunnelhub's generated artifacts in the lab: what ships is what runs.

A proxy is started from its extracted bootstrap cloud-init (:meth:`Lab.extract_proxy`) and the
hub configuration document its fake IMDS serves (``nslab.imds``), in the boot driver's order:

- every ``/etc/sysctl.d/*.conf`` is applied inside the proxy's namespace (``sysctl -p``);
- the reconciler the cloud-init ships runs once with ``--boot`` (its real fetch path: the
  document from "IMDS", verified, the document-managed files written under the proxy's root);
- sshd runs with every ``/etc/ssh/sshd_config.d/*.conf`` drop-in (whose ``Match`` block includes
  the tunnel user's forwarding rules the reconciler wrote), the tunnel user's ``authorized_keys``
  the reconciler wrote, and the host key(s) under ``/etc/ssh/ssh_host_*_key``;
- HAProxy runs the ``ExecStart`` of the cloud-init's ``haproxy.service`` drop-in (master-worker,
  ``haproxy.cfg`` + the routes file), so a reload is the real one (SIGUSR2 to the master);
- every unit under ``/etc/systemd/system/`` that the cloud-init writes runs under the unit
  runner: the health endpoint and the reconciler service.

The reconciler runs unchanged with a lab copy of its ``reconcile.json`` (:func:`lab_reconcile_config`
lists every option it changes): paths into the proxy's root, and the commands systemd would run
(``systemctl reload``) replaced by what those units' ``ExecReload`` do (a signal to the main PID).

Paths are rewritten only where they must be (files the cloud-init wrote, the files the reconciler
writes, ``/run``), plus one stated change: HAProxy's ``log /dev/log`` goes to stderr, so its log
lands in the lab's logs. The tunnel host's side (the on-prem package's unit) is run by ``nslab.hub``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .cloudinit import VmRoot, match_block_setting
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


def lab_copy(vm: VmRoot, vm_path: str, *, rewrite_log: bool = False, extra: dict[str, str] | None = None) -> Path:
    """A copy of an extracted config with its paths pointed into the proxy's root."""
    text = vm.rewrite_paths(vm.file(vm_path).text, extra=extra)
    if rewrite_log:
        text = re.sub(r"(?m)^(\s*)log\s+/dev/log\b(.*)$", r"\1log stderr format raw\2", text)
    _ensure_runtime_dirs(vm, text)
    target = vm.root.parent / "lab" / vm_path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


RECONCILE_CONFIG = "/etc/tunnelhub/reconcile.json"
HAPROXY_DROPIN = "/etc/systemd/system/haproxy.service.d/10-tunnelhub.conf"


def document_paths(vm: VmRoot) -> dict[str, str]:
    """The files the reconciler writes (and its state), VM path -> host path under the root."""
    config = json.loads(vm.file(RECONCILE_CONFIG).text)
    paths = [*config["files"].values(), config["state_file"], config["status_file"]]
    return {p: str(vm.path(p)) for p in paths}


def lab_reconcile_config(lab: Lab, proxy: str, vm: VmRoot) -> tuple[Path, list[str]]:
    """The proxy's reconcile.json with the lab's paths and commands; (path, what changed).

    Changed, and only this: every path into the proxy's root; ``haproxy_check`` against the lab
    copy of haproxy.cfg; the reloads that systemd would run become what the units' ExecReload do
    (HAProxy: check, then SIGUSR2 to the master; the health endpoint and sshd: SIGHUP to the main
    PID); ``sshd_check`` checks the lab's sshd config; sshd's log is the lab's sshd log file
    (``session_log_file``) instead of the journal. The source (Azure IMDS at 169.254.169.254) is
    unchanged: the lab's fake IMDS answers there.
    """
    original = json.loads(vm.file(RECONCILE_CONFIG).text)
    config = json.loads(json.dumps(original))
    paths = document_paths(vm)
    config["files"] = {k: paths[v] for k, v in original["files"].items()}
    config["state_file"] = paths[original["state_file"]]
    config["status_file"] = paths[original["status_file"]]
    base = lab.path(proxy, "lab", "etc", "haproxy", "haproxy.cfg")
    routes = config["files"]["haproxy_routes"]
    run_dir = vm.root / "run"
    sshd_dir = lab.path(proxy, "lab-sshd")
    check = [w for w in original["commands"]["haproxy_check"]]
    check[check.index("/etc/haproxy/haproxy.cfg")] = str(base)
    config["commands"].update({
        "haproxy_check": check,
        "haproxy_reload": ["/bin/sh", "-c", f'{" ".join(check).replace("{candidate}", routes)} && '
                                            f'kill -USR2 "$(cat {run_dir}/haproxy.pid)"'],
        "health_reload": ["/bin/sh", "-c", f'kill -HUP "$(cat {run_dir}/tunnelhub-health.pid)"'],
        "sshd_check": ["/usr/sbin/sshd", "-t", "-f", str(sshd_dir / "sshd_config")],
        "sshd_reload": ["/bin/sh", "-c", f'kill -HUP "$(cat {sshd_dir / "sshd.pid"})"'],
    })
    config["session_log_file"] = str(lab.log_dir / f"{proxy}-sshd.log")
    changed = [key for key in ("files", "state_file", "status_file", "session_log_file")
               if config[key] != original[key]]
    changed += [f"commands.{k}" for k in config["commands"] if config["commands"][k] != original["commands"][k]]
    path = lab.path(proxy, "lab", "etc", "tunnelhub", "reconcile.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path, changed


def start_proxy(lab: Lab, proxy: str, vm: VmRoot) -> ProxyRuntime:
    for sysctl in vm.matching(r"^/etc/sysctl\.d/.*\.conf$"):
        lab.apply_sysctl_file(proxy, sysctl.host_path)

    documented = document_paths(vm)
    base = lab_copy(vm, "/etc/haproxy/haproxy.cfg", rewrite_log=True, extra=documented)
    reconcile_config, _ = lab_reconcile_config(lab, proxy, vm)
    reconciler = vm.file("/usr/local/lib/tunnelhub/tunnelhub_reconcile.py").host_path
    # The boot driver's step: the first apply of the document (files only, nothing runs yet).
    boot = lab.topology.exec(proxy, [sys.executable, str(reconciler), "--config", str(reconcile_config), "--boot"],
                             timeout_s=120, check=False)
    (lab.log_dir / f"{proxy}-reconcile-boot.log").write_text(boot.stdout + boot.stderr)
    if boot.returncode != 0:
        raise LabError(f"{proxy}: the reconciler's first apply failed:\n{boot.stderr[-3000:]}")

    dropins = [lab_copy(vm, f.vm_path, extra=documented)
               for f in vm.matching(r"^/etc/ssh/sshd_config\.d/.*\.conf$")]
    keys_file = tunnel_keys_path(vm)
    host_keys = [f.host_path for f in vm.matching(r"^/etc/ssh/ssh_host_[a-z0-9]+_key$")]
    if not host_keys:
        raise LabError("no /etc/ssh/ssh_host_*_key for the proxy: pass the hub host key")
    sshd = lab.start_sshd(proxy, authorized_keys=keys_file, dropins=dropins, host_keys=host_keys)
    runtime = ProxyRuntime(name=proxy, sshd=sshd, vm=vm)
    lab.proxies[proxy] = runtime

    mapping = vm_path_map(vm)
    mapping.update(documented)
    mapping["/etc/haproxy/haproxy.cfg"] = str(base)
    mapping[RECONCILE_CONFIG] = str(reconcile_config)
    dropin = vm.file(HAPROXY_DROPIN)
    command = load_unit(dropin.host_path, unit_name="haproxy.service", path_map=mapping)
    _ensure_runtime_dirs(vm, " ".join(command.argv))
    files = [command.argv[i + 1] for i, word in enumerate(command.argv[:-1]) if word == "-f"]
    check = [command.argv[0], "-c", "-q", *(word for f in files for word in ("-f", f))]
    # the generated config's own stats socket (under the proxy's /run): the lab reads each
    # server's state there (the tunnel hosts' and the peers' servers of a route)
    stats = re.search(r"(?m)^\s*stats socket (\S+)", base.read_text())
    haproxy = Haproxy(workdir=base.parent, netns=lab.topology.ns(proxy), log_dir=lab.log_dir,
                      name=f"{proxy}-haproxy", argv=command.argv, check_argv=check,
                      stats_socket=Path(stats.group(1)) if stats else None)
    lab.on_close(f"{proxy} haproxy", haproxy.stop)
    runtime.services["haproxy"] = haproxy.start()

    for unit in vm.matching(r"^/etc/systemd/system/[^/]+\.service$"):
        command = load_unit(unit.host_path, path_map=mapping)
        name = unit.vm_path.rsplit("/", 1)[1].removesuffix(".service")
        pid_file = vm.root / "run" / f"{name}.pid"
        runtime.services[name] = lab.run_service(proxy, command, name=f"{proxy}-{name}", main_pid_file=pid_file)
    return runtime


def stop_proxy(lab: Lab, proxy: str) -> None:
    """Stop everything ``start_proxy`` started on ``proxy`` (by PID), as a VM going away."""
    runtime = lab.proxies.pop(proxy, None)
    if runtime is None:
        return
    for service in runtime.services.values():
        service.stop()
    runtime.sshd.stop()


def tunnel_keys_path(vm: VmRoot) -> Path:
    """The tunnel user's keys: the file the drop-in's ``Match User`` block names in
    ``AuthorizedKeysFile`` (written by the reconciler from the document; other users'
    ``authorized_keys``, the admin's, are not it)."""
    named = [(d.vm_path, match_block_setting(d.text, "AuthorizedKeysFile"))
             for d in vm.matching(r"^/etc/ssh/sshd_config\.d/.*\.conf$")]
    paths = {value for _, value in named if value}
    if len(paths) != 1:
        raise LabError(f"expected one AuthorizedKeysFile in the drop-ins' Match User blocks, "
                       f"found {named}")
    path = paths.pop()
    if " " in path or "%" in path:
        raise LabError(f"AuthorizedKeysFile {path!r}: the lab needs one literal path")
    host = vm.path(path)
    if not host.exists():
        raise LabError(f"{path} was not written (the reconciler writes it from the document)")
    return host


def vm_path_map(vm: VmRoot) -> dict[str, str]:
    mapping = {p: str(f.host_path) for p, f in vm.files.items()}
    mapping["/run/"] = str(vm.root / "run") + "/"
    mapping["/var/run/"] = str(vm.root / "run") + "/"
    return mapping
