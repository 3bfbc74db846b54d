"""One address model on both sides of an AWS slot (issue 13, defect 1): the slot Lambda's
AssociateAddress and the proxy's own routing must agree on which private address egresses and
which one the slot's Elastic IP maps to.

The contract, as AWS documents it:
- an internet gateway "performs network address translation (NAT) for instances that have been
  assigned public IPv4 addresses": it translates a packet only when its source private address
  has a public IP, so a proxy egressing from an address without one has no internet at all
  (VPC User Guide, "Enable internet access using an internet gateway"); the launch template sets
  ``associate_public_ip_address = false``, so the slot EIP is the only public IP there is;
- IMDS ``meta-data/public-ipv4`` is the public address of the primary private address ("If an
  Elastic IP address is associated with the instance, the value returned is the Elastic IP
  address", EC2 User Guide, "Instance metadata categories"); the proxy waits for it
  (``tunnelhub_aws_slot.py --require-public-ipv4``) before installing anything.

What is real here: the Lambda runs against moto (which ignores ``PrivateIpAddress`` and always
shows the primary: so the test asserts on the request the Lambda sent, the field EC2 honours);
the proxy's ``configure_address`` runs unchanged in a network namespace with a real kernel, and
the kernel's own source-address choice (``ip route get``) is read back. What is not: a real
internet gateway (its rule is encoded from the documentation above) and systemd-networkd's DHCP
route (both forms it can take are tested: with and without ``src``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_slot_lambda import Lab, lab, launch_event, private_plan  # noqa: F401  (lab: fixture)
from tests.unit.test_userdata_fakes import FakeCloud
from tests.unit.test_userdata_slot import box, run_slot  # noqa: F401  (box: fixture)

FILES = Path(__file__).resolve().parents[2] / "tunnelhub" / "userdata" / "files"
INTERNET = "203.0.113.10"  # TEST-NET-3: only asked of the routing table, never sent to


def lambda_claims_a_slot(lab: Lab) -> dict:
    """A proxy launching in subnet a, the Lambda's claim, and what it asked EC2 for."""
    lab.allocate_pool(2)
    plan = private_plan(lab)
    instance_id, token = lab.launch(lab.subnet_a)
    record = lab.assigner(private_ips=plan).handle(launch_event(instance_id, token))
    assert record["decision"] == "assigned"
    (associate,) = lab.spy.named("associate_address")
    return {
        "primary": lab.primary_of(lab.eni(instance_id)),
        "secondary": plan[record["slot"]].ip,
        "eip": record["public_ip"],
        "eip_on": associate.kwargs.get("PrivateIpAddress") or lab.primary_of(lab.eni(instance_id)),
        "record": record,
    }


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture
def proxy_netns():
    if os.geteuid() != 0:
        pytest.skip("needs root for ip netns")
    name = f"thaddr{os.getpid()}"
    ip("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


@pytest.mark.parametrize("dhcp_src", [True, False], ids=["dhcp-route-with-src", "dhcp-route-without-src"])
def test_the_elastic_ip_is_on_the_address_the_proxy_egresses_from(lab, proxy_netns, tmp_path, dhcp_src):
    claim = lambda_claims_a_slot(lab)
    # The proxy as EC2 boots it: the primary address by DHCP on its interface (moto's subnet is a
    # /24, gateway .1), and a default route as systemd-networkd writes it.
    ns = proxy_netns
    ip("-n", ns, "link", "add", "ens5", "type", "veth", "peer", "name", "vpc0")  # no dummy module here
    for link in ("ens5", "vpc0"):
        ip("-n", ns, "link", "set", link, "up")
    ip("-n", ns, "addr", "add", f"{claim['primary']}/24", "dev", "ens5")
    gateway = claim["primary"].rsplit(".", 1)[0] + ".1"
    ip("-n", ns, "route", "add", "default", "via", gateway, "dev", "ens5",
       *(("src", claim["primary"]) if dhcp_src else ()))
    # The product's code adds the slot's secondary address (netplan is absent here: now only).
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); import tunnelhub_aws_slot as s; "
         "s.configure_address(sys.argv[2], 'ens5', sys.argv[3])",
         str(FILES), claim["secondary"], str(tmp_path / "no-netplan" / "60-tunnelhub-slot.yaml")],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"inet {claim['secondary']}/32" in ip("-n", ns, "-o", "-4", "addr", "show", "dev", "ens5")
    # The kernel's choice of source for internet traffic ...
    route = ip("-n", ns, "-o", "route", "get", INTERNET).split()
    egress_source = route[route.index("src") + 1]
    # ... is the primary address, and that is where the Lambda put the slot's EIP: the internet
    # gateway translates it. (Before the fix the EIP went on the secondary address: no egress.)
    assert egress_source == claim["primary"]
    assert claim["eip_on"] == egress_source != claim["secondary"]
    assert claim["record"]["eip_private_ip"] == egress_source
    assert claim["record"]["private_ip"] == claim["secondary"]  # the NLB's target, logged


def test_the_public_ipv4_the_proxy_waits_for_appears_where_the_lambda_put_the_eip(lab, box):
    """IMDS shows ``public-ipv4`` only for an EIP on the primary address (documented contract,
    modelled here from the Lambda's real request); the proxy's real slot script must then get
    past its wait. With the EIP on the secondary address this wait timed out on every boot."""
    claim = lambda_claims_a_slot(lab)
    slot = claim["record"]["slot"]
    private_ips = ["", ""]
    private_ips[slot] = claim["secondary"]
    private_ips[1 - slot] = "10.0.2.10"
    with FakeCloud() as cloud:
        cloud.local_ipv4s[:] = [claim["primary"], claim["secondary"]]
        cloud.instance_tags["tunnelhub:slot"] = str(slot)
        if claim["eip_on"] == claim["primary"]:
            cloud.meta["public-ipv4"] = claim["eip"]
        done, _ = run_slot(box, cloud, "--count", "2", "--require-public-ipv4", "--timeout-s", "5",
                           "--private-ips", ",".join(private_ips))
    assert done.returncode == 0, done.stdout
    assert f"public IPv4 (the slot's Elastic IP): {claim['eip']}" in done.stdout
