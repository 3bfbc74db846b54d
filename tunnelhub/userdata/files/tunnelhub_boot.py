#!/usr/bin/env python3
"""First boot of a tunnelhub proxy, run once by cloud-init (runcmd) after it wrote the files.

    tunnelhub_boot.py --config /etc/tunnelhub/boot.json

Steps (each logged with its elapsed time; output lands in /var/log/cloud-init-output.log):
  1. apply the sysctl drop-in (tcp_retries2: a half-open tunnel session dies fast);
  2. AWS: wait for the slot (tunnelhub_aws_slot.py, given the slot count and the slots' private
     addresses from the instance tags the Auto Scaling group propagates); without a slot there is
     no egress or address, so a failure here ends the run; then fetch the files kept in the hub's
     S3 bucket when the user data could not hold them (tunnelhub_fetch_files.py);
  3. install the hub SSH host key (tunnelhub_fetch_host_key.py), in the background: it may wait
     minutes for permissions to propagate and the data plane does not need it;
  4. install the packages, retried with backoff until a deadline (the egress may come up late),
     with service starts held back (policy-rc.d) so nothing runs before its config is checked;
  5. the first apply of the hub configuration document (``tunnelhub_reconcile.py --boot``: the
     routes, the health routes, the tunnel keys; files only, nothing runs yet), then check the
     HAProxy config;
  6. enable and start HAProxy, the health endpoint and the reconciler with ``systemctl enable
     --now --no-block`` (waiting for a start job from inside cloud-init's own boot job can
     deadlock the boot); restart an HAProxy the image already ran (its master was started without
     the routes file) and reload sshd (it only reads the tunnel user's files when it (re)starts). Without a document, only the reconciler starts: it starts the others
     (``reload-or-restart``) once it has applied one.
Exit 0 when every step worked, 1 otherwise (``cloud-init status`` then reports the failure).
Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

POLICY_RC_D = "/usr/sbin/policy-rc.d"
APT_OPTIONS = ["-o", "DPkg::Lock::Timeout=300", "-o", "Acquire::Retries=3", "-o", "Acquire::http::Timeout=30",
               "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"tunnelhub-boot: [{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def run(command: list[str], *, timeout_s: float = 300.0, env: dict[str, str] | None = None) -> bool:
    log("$ " + " ".join(command))
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=max(1.0, timeout_s), env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"  failed: {exc}")
        return False
    tail = done.stdout.strip().splitlines()[-15:]
    for line in tail if done.returncode != 0 else []:
        log(f"  | {line}")
    if done.returncode != 0:
        log(f"  exit status {done.returncode}")
    return done.returncode == 0


def installed(package: str) -> bool:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip() == "install ok installed"


def install_packages(packages: list[str], timeout_s: float, policy_rc_d: str = POLICY_RC_D,
                     first_delay_s: float = 5.0) -> bool:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", NEEDRESTART_MODE="a", NEEDRESTART_SUSPEND="1")
    deadline = time.monotonic() + timeout_s
    delay, attempt = first_delay_s, 0
    made_policy = False
    if not os.path.exists(policy_rc_d):  # hold back service starts by maintainer scripts
        with open(policy_rc_d, "w", encoding="ascii") as fh:
            fh.write("#!/bin/sh\n# tunnelhub boot: installing packages, services start later\nexit 101\n")
        os.chmod(policy_rc_d, 0o755)
        made_policy = True
    try:
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            if (run(["apt-get", *APT_OPTIONS, "update"], timeout_s=left, env=env)
                    and run(["apt-get", *APT_OPTIONS, "install", "-y", "--no-install-recommends", *packages],
                            timeout_s=deadline - time.monotonic(), env=env)):
                log(f"installed {' '.join(packages)} (attempt {attempt})")
                return True
            left = deadline - time.monotonic()
            if left <= delay:
                log(f"FAILED to install {' '.join(packages)} after {attempt} attempt(s) in {timeout_s:g} s: "
                    "no working egress to the package archive? (NAT gateway, Elastic IP, firewall, DNS)")
                return False
            log(f"install attempt {attempt} failed; retrying in {delay:g} s ({left:.0f} s left)")
            time.sleep(delay)
            delay = min(delay * 2, 60.0)
    finally:
        if made_policy:
            os.unlink(policy_rc_d)


def slot_plan(wait: dict, imds_url: str) -> tuple[int, list[str]]:
    """AWS: the slot count and the slots' private addresses, from this instance's tags (the Auto
    Scaling group propagates them at launch; the launch template does not carry them, so a new
    proxy count does not change its user data). Waits up to a minute for instance metadata."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tunnelhub_aws_slot import Imds

    imds = Imds(imds_url)
    deadline = time.monotonic() + 60
    while True:
        try:
            count = imds.get(f"tags/instance/{wait['count_tag']}")
            addresses = imds.get(f"tags/instance/{wait['private_ips_tag']}")
        except OSError as exc:
            count = addresses = None
            error = f" ({exc})"
        else:
            error = ""
        if count is not None and addresses is not None:
            break
        if time.monotonic() >= deadline:
            raise ValueError(f"no instance tags {wait['count_tag']} and {wait['private_ips_tag']} in instance "
                             f"metadata{error}: the Auto Scaling group propagates them (instance metadata tags "
                             "must be enabled in the launch template)")
        time.sleep(2)
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"instance tag {wait['count_tag']}={count!r} is not a slot count")
    private_ips = [a for a in addresses.split(",") if a]
    if len(private_ips) != int(count):
        raise ValueError(f"instance tag {wait['private_ips_tag']} lists {len(private_ips)} addresses for {count} slots")
    log(f"{count} slot(s), private addresses {', '.join(private_ips)} (instance tags)")
    return int(count), private_ips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunnelhub_boot.py", description="first boot of a tunnelhub proxy")
    parser.add_argument("--config", default="/etc/tunnelhub/boot.json")
    parser.add_argument("--lib-dir", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--policy-rc-d", default=POLICY_RC_D, help=argparse.SUPPRESS)
    parser.add_argument("--first-retry-s", type=float, default=5.0, help=argparse.SUPPRESS)
    parser.add_argument("--imds-url", default="http://169.254.169.254", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as fh:
        cfg = json.load(fh)
    where = f"slot {cfg['slot']}" if cfg["slot"] is not None else "slot assigned at boot"
    log(f"hub {cfg['hub']} ({cfg['cloud']}, {where})")
    failed: list[str] = []

    def script(name: str) -> list[str]:
        return [sys.executable, os.path.join(args.lib_dir, name)]

    if not run(["sysctl", "-p", cfg["sysctl_file"]]):
        failed.append("sysctl")

    wait = cfg.get("slot_wait")
    if wait:
        try:
            count, private_ips = slot_plan(wait, args.imds_url)
        except (OSError, ValueError) as exc:
            log(f"FAILED: {exc}; stopping here (the lifecycle hook will abandon this instance)")
            return 1
        command = script("tunnelhub_aws_slot.py") + ["--count", str(count), "--tag", wait["tag"],
                                                      "--timeout-s", str(wait["timeout_s"])]
        if wait["require_public_ipv4"]:
            command.append("--require-public-ipv4")
        if private_ips:
            command += ["--private-ips", ",".join(private_ips)]
        if not run(command, timeout_s=wait["timeout_s"] + 60):
            log("FAILED: this instance has no slot; stopping here (the lifecycle hook will abandon it)")
            return 1

    if cfg.get("remote_files"):  # AWS: files that did not fit in the user data, from the hub bucket
        if not run(script("tunnelhub_fetch_files.py") + ["--config", args.config], timeout_s=660):
            log("FAILED: the proxy files are missing; stopping here")
            return 1

    key = cfg["host_key"]
    command = script("tunnelhub_fetch_host_key.py") + ["--source", key["source"], "--timeout-s", str(key["timeout_s"])]
    if key.get("parameter"):
        command += ["--parameter", key["parameter"]]
    log("$ " + " ".join(command) + "  (in the background)")
    fetch = subprocess.Popen(command)

    preinstalled = all(installed(p) for p in cfg["packages"])
    if preinstalled:
        log(f"{' '.join(cfg['packages'])} already installed")
    elif not install_packages(cfg["packages"], cfg["install_timeout_s"], args.policy_rc_d,
                                args.first_retry_s):
        failed.append("packages")

    if "packages" not in failed:
        reconciler = cfg["reconciler"]
        configured = run([sys.executable, reconciler["script"], "--config", reconciler["config"], "--boot"],
                         timeout_s=reconciler["timeout_s"] + 60)
        if not configured:
            failed.append("hub configuration")
            log("no hub configuration document applied: starting the reconciler only; it starts HAProxy "
                "and the health endpoint once it has one")
        elif not run(cfg["haproxy_check"]):
            failed.append("haproxy config")
        run(["systemctl", "daemon-reload"])
        units = cfg["units"] if configured and "haproxy config" not in failed else []
        if not run(["systemctl", "enable", "--now", "--no-block", *units, cfg["reconcile_unit"]]):
            failed.append("start services")
        if not units and not run(["systemctl", "enable", *cfg["units"]]):
            failed.append("enable services")
        # A preinstalled HAProxy runs without the routes file: a reload keeps its argv (test_userdata_boot).
        if units and preinstalled and not run(["systemctl", "restart", "--no-block", "haproxy.service"]):
            failed.append("restart haproxy")
        # sshd reads the tunnel user's files only when it (re)starts (test_userdata_boot).
        if configured and not run(["systemctl", "try-reload-or-restart", "--no-block", "ssh.service"]):
            failed.append("reload sshd")

    try:
        code = fetch.wait(timeout=key["timeout_s"] + 120)
    except subprocess.TimeoutExpired:
        fetch.kill()
        code = -1
    if code != 0:
        failed.append("host key")

    if failed:
        log(f"FAILED steps: {', '.join(failed)}")
        return 1
    log("done: hub configuration applied, data plane, health endpoint and reconciler started, "
        "hub host key installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
