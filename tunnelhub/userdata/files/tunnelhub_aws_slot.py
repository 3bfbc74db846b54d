#!/usr/bin/env python3
"""Wait until the Auto Scaling lifecycle Lambda has given this instance its slot (AWS proxies).

    tunnelhub_aws_slot.py --count 2 [--require-public-ipv4] [--private-ips 10.70.0.16,10.70.0.17]

The instance boots while its lifecycle hook holds it in Pending:Wait. The Lambda tags it
``tunnelhub:slot=<n>``, associates the slot's Elastic IP with the primary private address (the
one this proxy egresses from) and assigns the slot's fixed secondary private IP (what the NLB's
route target groups register) to the primary interface. This script waits (bounded, progress
logged) for the tag in the instance metadata (the launch template must enable instance metadata
tags), then for the public IPv4 (IMDS ``public-ipv4``: the primary address's Elastic IP) when the
proxy egresses from it (nothing can be installed before), then for the secondary IP; it
configures that address on the interface when
the OS has not (now with ``ip``, and persistently with a netplan drop-in), and writes the slot
number to --state-file. Exit 0 on success, 1 on timeout or error. Stdlib only.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

IMDS_URL = "http://169.254.169.254"
STATE_FILE = "/etc/tunnelhub/slot"
NETPLAN_FILE = "/etc/netplan/60-tunnelhub-slot.yaml"
POLL_S = 2.0
PROGRESS_EVERY_S = 30.0
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(message: str) -> None:
    print(f"tunnelhub-slot: {message}", flush=True)


class Imds:
    """IMDSv2 with a token refreshed on expiry; ``get`` returns None for 404 (not there yet)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.token: str | None = None

    def _open(self, request: urllib.request.Request) -> bytes:
        with _DIRECT.open(request, timeout=5) as response:
            return response.read()

    def get(self, path: str) -> str | None:
        for _ in range(2):
            if self.token is None:
                self.token = self._open(urllib.request.Request(
                    f"{self.url}/latest/api/token", method="PUT",
                    headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})).decode()
            try:
                return self._open(urllib.request.Request(
                    f"{self.url}/latest/meta-data/{path}",
                    headers={"X-aws-ec2-metadata-token": self.token})).decode().strip()
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                if exc.code != 401:
                    raise
                self.token = None  # expired: get a new one and ask again
        return None


def wait_for(what: str, probe, deadline: float, started: float, hint: str, progress_every_s: float = PROGRESS_EVERY_S):
    """Poll ``probe`` until it returns a value; log progress; raise TimeoutError at ``deadline``."""
    last_progress = time.monotonic()
    last_error = ""
    while True:
        try:
            value = probe()
        except (OSError, ValueError) as exc:  # IMDS hiccup, a bad value: keep trying, say so
            value, last_error = None, f" (last error: {getattr(exc, 'reason', exc)})"
        if value is not None:
            log(f"{what}: {value} after {time.monotonic() - started:.0f} s")
            return value
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(f"no {what} after {now - started:.0f} s{last_error}; {hint}")
        if now - last_progress >= progress_every_s:
            log(f"still waiting for {what} ({now - started:.0f} s of {deadline - started:.0f} s){last_error}")
            last_progress = now
        time.sleep(min(POLL_S, max(0.0, deadline - now)))


def interface_for_mac(mac: str, sysfs: str) -> str:
    for name in sorted(os.listdir(sysfs)):
        try:
            with open(os.path.join(sysfs, name, "address"), encoding="ascii") as fh:
                if fh.read().strip().lower() == mac.lower():
                    return name
        except OSError:
            continue
    raise ValueError(f"no network interface has the MAC address {mac}")


def configure_address(address: str, ifname: str, netplan_file: str) -> None:
    """Put ``address``/32 on ``ifname`` now and on every boot. A /32 adds no subnet route and is
    never chosen as the source of outgoing traffic (DHCP routes carry their own preferred source),
    so egress keeps using the primary address, the one the Elastic IP maps to."""
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", ifname], capture_output=True, text=True,
                           check=True, timeout=30).stdout
    if f" {address}/" in shown:
        log(f"{address} is already configured on {ifname}")
    else:
        subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", ifname], check=True, timeout=30)
        log(f"added {address}/32 to {ifname}")
    if shutil.which("netplan") is None or not os.path.isdir(os.path.dirname(netplan_file)):
        log(f"WARNING: no netplan here; {address} is configured until the next reboot only")
        return
    text = ("# tunnelhub: the slot's fixed private address (written at boot; merges with cloud-init's\n"
            f"# definition of {ifname})\nnetwork:\n  version: 2\n  ethernets:\n    {ifname}:\n"
            f"      addresses: [{address}/32]\n")
    fd = os.open(netplan_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # netplan warns about (and newer versions refuse) readable files
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text)
    generated = subprocess.run(["netplan", "generate"], capture_output=True, text=True, timeout=60)
    if generated.returncode != 0:
        os.unlink(netplan_file)
        raise ValueError(f"netplan rejected {netplan_file}: {generated.stderr.strip()}")
    log(f"wrote {netplan_file} ({address}/32 on {ifname} at every boot)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunnelhub_aws_slot.py", description="wait for this proxy's slot")
    parser.add_argument("--count", type=int, required=True, help="number of slots (proxies.count)")
    parser.add_argument("--tag", default="tunnelhub:slot")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--require-public-ipv4", action="store_true",
                        help="wait for the slot's Elastic IP (the proxy egresses from it)")
    parser.add_argument("--private-ips", default="",
                        help="comma-separated fixed private address of each slot")
    parser.add_argument("--state-file", default=STATE_FILE)
    parser.add_argument("--netplan-file", default=NETPLAN_FILE)
    parser.add_argument("--imds-url", default=IMDS_URL, help=argparse.SUPPRESS)
    parser.add_argument("--sysfs", default="/sys/class/net", help=argparse.SUPPRESS)
    parser.add_argument("--progress-every-s", type=float, default=PROGRESS_EVERY_S, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    private_ips = [str(ipaddress.IPv4Address(a)) for a in args.private_ips.split(",") if a]
    if private_ips and len(private_ips) != args.count:
        parser.error(f"--private-ips lists {len(private_ips)} addresses for {args.count} slots")

    imds = Imds(args.imds_url)
    started = time.monotonic()
    deadline = started + args.timeout_s

    def wait(what: str, probe, hint: str):
        return wait_for(what, probe, deadline, started, hint, args.progress_every_s)

    def slot_tag() -> int | None:
        value = imds.get(f"tags/instance/{args.tag}")
        if value is None:
            return None
        if not value.isdigit() or int(value) >= args.count:
            raise ValueError(f"tag {args.tag}={value!r} is not a slot number from 0 to {args.count - 1}")
        return int(value)

    try:
        log(f"waiting for the slot tag {args.tag} (set by the Auto Scaling lifecycle Lambda)")
        slot = wait(f"slot tag {args.tag}", slot_tag,
                    "check that the launch template enables instance metadata tags "
                    "(metadata_options.instance_metadata_tags = enabled) and the slot Lambda's logs")
        if args.require_public_ipv4:
            wait("public IPv4 (the slot's Elastic IP)", lambda: imds.get("public-ipv4"),
                 "the slot Lambda associates the Elastic IP; without it this proxy has no egress")
        if private_ips:
            address = private_ips[slot]
            mac = wait("primary interface MAC", lambda: imds.get("mac"), "IMDS is unreachable")

            def assigned() -> str | None:
                listed = imds.get(f"network/interfaces/macs/{mac}/local-ipv4s") or ""
                return address if address in listed.split() else None

            wait(f"secondary private IP {address} on the primary interface", assigned,
                 "the slot Lambda assigns it (ec2:AssignPrivateIpAddresses)")
            configure_address(address, interface_for_mac(mac, args.sysfs), args.netplan_file)
    except (TimeoutError, ValueError, OSError, subprocess.SubprocessError) as exc:
        log(f"FAILED: {exc}")
        return 1
    os.makedirs(os.path.dirname(args.state_file), exist_ok=True)
    with open(args.state_file, "w", encoding="ascii") as fh:
        fh.write(f"{slot}\n")
    log(f"this proxy is slot {slot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
