"""The lab's hubs booted for real: proxies and the tunnel host as systemd machines.

Two hubs, one tunnel host, the way a user deploys them (``docs/boot.md``):

1. The spec (``boot-hub.yaml``): the Azure hub ``nslab`` (two proxies, static 10.60.0.5/.6) and
   the AWS hub ``nslabaws`` (one Auto Scaling slot, on a private circuit: the tunnel host dials the
   slot's fixed private address 10.70.0.16), each with one MySQL tunnel route to the ``db``
   namespace's MariaDB, no tunnel keys yet. Synthesized with :func:`tunnelhub.synth.synthesize`
   and "applied" by :mod:`nslab.stack`; the stacks' outputs (``tunnel_endpoints``,
   ``host_public_key``) build each hub's on-prem package with :func:`tunnelhub.onprem.build_deb`.
2. The tunnel host boots (``onprem`` namespace) and installs both packages with ``dpkg -i`` under
   its running systemd: postinst makes the service users and the tunnel keys and starts the
   tunnels (which cannot connect yet). ``tunnelhub-<hub>-pubkey`` prints each key.
3. The keys go into the spec (``onprem.tunnel_public_keys``), which is synthesized and applied
   again ("deploy the hub again"); the fake cloud (:mod:`nslab.fakecloud`, in the ``gw``
   namespace at 169.254.169.254 and behind the Key Vault / SSM / S3 names) is loaded from it.
4. Each proxy boots in its namespace with the user data of its VM (Azure ``custom_data``) or of
   the launch template (AWS ``user_data``), base64-decoded as the cloud delivers it, as its NoCloud
   seed; cloud-init does the rest (gzip, the cloud-config, its modules, ``runcmd``).

The namespaces (:func:`boot_links`)::

    db 192.168.20.15 --- onprem (the tunnel host) --- gw (169.254.169.254, 198.18.0.10, 198.18.0.20)
                                                     /   |   \\
              proxy1 10.60.0.5   proxy2 10.60.0.6   proxy3 10.70.0.40 (+ the slot's 10.70.0.16)
                         \\              |              /
                          lb (two HAProxy LBs: nslab :3306, nslabaws :3307) --- client

Nothing of the product is rewritten: every file is where the user data and the package put it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunnelhub.onprem import DebBuild, build_deb, read_outputs
from tunnelhub.spec import Hub, load_spec

from .haproxy import Haproxy, LbRoute
from .health import probe
from .hub import HEALTH_PORT, HUB_CIDR, HUB_VNET_ID, ROUTE_PORT, SOURCE_CIDR, SOURCE_DATE_EPOCH, TUNNEL_USER, proxy_ips
from .lab import Lab
from .machine import Machine, overlay_mounts_under
from .netns import LinkSpec, RouteSpec, hub_links, in_netns
from .proc import LabError, tail, wait_until
from .stack import AppliedStack, ApplyInputs
from .tls import LabCA

AZURE_HUB = "nslab"
AWS_HUB = "nslabaws"
AZURE_ROUTE = "labdb"
AWS_ROUTE = "awsdb"
AWS_CIDR = "10.70.0.0/24"
AWS_PRIMARY_IP = "10.70.0.40"  # what the VPC's DHCP gives the AWS proxy's interface (outside the slot range)
AWS_PREFIX_LEN = 26
AWS_GATEWAY = "10.70.0.1"  # the VPC router: the subnet's first address
AWS_LB_PORT = ROUTE_PORT + 1  # the lab's second LB frontend (both hubs' routes are on 3306)
IMDS_ADDRESS = "169.254.169.254"
AZURE_API_ADDRESS = "198.18.0.10"  # *.vault.azure.net
AWS_API_ADDRESS = "198.18.0.20"  # ssm.<region>.amazonaws.com, <bucket>.s3.<region>.amazonaws.com
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
SEED_DIR = "/var/lib/cloud/seed/nocloud"
AZURE_PROXIES = ("proxy1", "proxy2")
AWS_PROXY = "proxy3"


def boot_links() -> tuple[list, list[RouteSpec]]:
    """:func:`nslab.netns.hub_links` for the Azure proxies, plus the AWS proxy behind the same
    gateway (its primary address, and a /32 route for the slot's secondary address, which the VPC
    routes to the interface it is assigned to)."""
    links, routes = hub_links(proxy_ips(len(AZURE_PROXIES)))
    links.insert(2 + len(AZURE_PROXIES), LinkSpec("gw", AWS_PROXY, f"{AWS_GATEWAY}/32",
                                                  f"{AWS_PRIMARY_IP}/{AWS_PREFIX_LEN}"))
    routes += [RouteSpec("gw", f"{AWS_PRIMARY_IP}/32", dev_peer=AWS_PROXY),
               RouteSpec(AWS_PROXY, "default", via=AWS_GATEWAY)]
    links.append(("lb", AWS_PROXY))
    return links, routes


def boot_lab() -> Lab:
    links, routes = boot_links()
    return Lab(proxies=3, tunnel_user=TUNNEL_USER, links=links, routes=routes)


def boot_spec(*, admin_key: str, db_address: str, tunnel_keys: dict[str, list[str]],
              route_extra: dict[str, Any] | None = None) -> dict:
    """The two hubs (spec defaults for probes and the LB: checks every 2 s, LB 5 s x 2);
    ``route_extra``: more settings of both hubs' route (a routine change)."""
    def hub(name: str, cloud: str, region: str, cidr: str, count: int, route: str, **extra: Any) -> dict:
        return {
            "name": name, "cloud": cloud, "region": region, "network": {"cidr": cidr,
                                                                    **({"onprem_path": {"hub_vnet_id": HUB_VNET_ID}}
                                                                       if cloud == "azure" else {})},
            "proxies": {"count": count, "health_port": HEALTH_PORT, "admin_ssh_public_keys": [admin_key]},
            "routes": [{"name": route, "kind": "tunnel", "port": ROUTE_PORT, "target": f"{db_address}:3306",
                        "type": "mysql", **(route_extra or {})}],
            "onprem": {"source_cidrs": [SOURCE_CIDR], "tunnel_public_keys": tunnel_keys.get(name, []),
                       "tunnel_user": TUNNEL_USER, **extra.pop("onprem", {})},
            **extra,
        }
    return {"version": 1, "hubs": [
        hub(AZURE_HUB, "azure", "westeurope", HUB_CIDR, len(AZURE_PROXIES), AZURE_ROUTE),
        # One slot is enough to boot the AWS path (the spec warns that one slot over two zones
        # leaves a zone without a proxy).
        hub(AWS_HUB, "aws", "us-east-1", AWS_CIDR, 1, AWS_ROUTE, onprem={"private_circuit": True}),
    ]}


@dataclass
class Deployment:
    """One ``synth`` + "apply" of the spec."""

    spec_path: Path
    hubs: dict[str, Hub]
    stacks: dict[str, AppliedStack]
    seconds: float


@dataclass
class ProxyBoot:
    """What one proxy's boot measured (monotonic seconds since its nspawn started)."""

    proxy: str
    started_at: float
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, what: str) -> float:
        if what not in self.marks:
            self.marks[what] = time.monotonic() - self.started_at
        return self.marks[what]


class BootHub:
    """The booted lab (see the module docstring); :meth:`deploy` runs steps 1-4."""

    def __init__(self, lab: Lab, image: Path):
        self.lab = lab
        self.image = image
        self.machines: dict[str, Machine] = {}
        self.debs: dict[str, DebBuild] = {}
        self.deployments: list[Deployment] = []
        self.tunnel_keys: dict[str, list[str]] = {}
        self.boots: dict[str, ProxyBoot] = {}
        self.lbs: dict[str, Haproxy] = {}
        self.instances: dict[str, dict] = {}  # proxy -> the fake cloud's instance record
        self.cloud_process: subprocess.Popen | None = None
        self.ca: LabCA | None = None
        self.control_port = 18000 + (os.getpid() % 1000)
        self._tls_keys: dict[str, tuple[str, str]] = {}

    # -- set-up ----------------------------------------------------------------------------------

    def deploy(self) -> None:
        lab = self.lab
        self._sweep_stale_mounts()
        for address in (IMDS_ADDRESS, AZURE_API_ADDRESS, AWS_API_ADDRESS):
            lab.topology.exec("gw", ["ip", "addr", "add", f"{address}/32", "dev", "lo"])
        # The Azure proxies share a /26 but sit on separate links here: a proxy ARPs for its peer
        # on-link, and Azure's network answers every ARP in a subnet itself. The gateway answers
        # for the peers (proxy ARP) and routes between them, so each proxy reaches its peer's
        # health and peer ports (the route's backup path, issue 15) as in the VNet (nslab.hub does
        # the same).
        for proxy in AZURE_PROXIES:
            lab.topology.sysctl("gw", f"net.ipv4.conf.{lab.topology.ifname('gw', proxy)}.proxy_arp", 1)
        if lab.db is None:
            lab.start_db()
        first = self.synth_and_apply()
        self._build_debs(first)
        self.start_tunnel_host()
        self.tunnel_keys = {hub: [self.pubkey(hub)] for hub in (AZURE_HUB, AWS_HUB)}
        deployed = self.synth_and_apply()
        self.start_cloud(deployed)
        for proxy in (*AZURE_PROXIES, AWS_PROXY):
            self.prepare_proxy(proxy)
        for proxy in (*AZURE_PROXIES, AWS_PROXY):
            self.boot_proxy(proxy)

    def _sweep_stale_mounts(self) -> None:
        """Overlays of a run of this prefix that died (we hold the prefix lock now)."""
        base = self.lab.workdir.parent
        for mount in overlay_mounts_under(base):
            if mount.startswith(f"{base}/{self.lab.prefix}-") and not mount.startswith(str(self.lab.workdir)):
                subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)
                self.lab.notes.append(f"unmounted a stale machine disk of an earlier run: {mount}")

    def tls_key(self, resource: str) -> tuple[str, str]:
        """The lab's key for a ``tls_private_key`` resource (the hub host keys)."""
        if resource not in self._tls_keys:
            path, public = self.lab.key(f"tls_{resource}")
            self._tls_keys[resource] = (path.read_text(), public)
        return self._tls_keys[resource]

    def synth_and_apply(self, *, route_extra: dict[str, Any] | None = None) -> Deployment:
        from tunnelhub.synth import synthesize

        lab = self.lab
        _, admin_pub = lab.key("admin_ed25519")
        n = len(self.deployments)
        spec_path = lab.path(f"boot-hub-{n}.yaml")
        spec_path.write_text(json.dumps(boot_spec(admin_key=admin_pub, db_address=lab.db_host,
                                                  tunnel_keys=self.tunnel_keys, route_extra=route_extra), indent=2))
        spec = load_spec(spec_path)
        out = lab.path(f"cdktf.out.{n}")
        started = time.monotonic()
        synthesize(spec, out, jobs=1)
        seconds = time.monotonic() - started
        manifest = json.loads((out / "manifest.json").read_text())
        inputs = ApplyInputs(tls_key=self.tls_key)
        hubs = {h.name: h for h in spec.hubs}
        stacks = {}
        for hub in spec.hubs:
            entry = manifest["stacks"][hub.stack_name]
            stacks[hub.name] = AppliedStack(json.loads((out / entry["synthesizedStackPath"]).read_text()), inputs)
        deployment = Deployment(spec_path, hubs, stacks, seconds)
        self.deployments.append(deployment)
        return deployment

    @property
    def deployed(self) -> Deployment:
        return self.deployments[-1]

    def _build_debs(self, deployment: Deployment) -> None:
        lab = self.lab
        outputs = {deployment.hubs[h].stack_name: deployment.stacks[h].outputs("tunnel_endpoints", "host_public_key")
                   for h in deployment.hubs}
        path = lab.path("outputs.json")
        path.write_text(json.dumps(outputs, indent=2))  # `cdktf output --outputs-file` form
        for name, hub in deployment.hubs.items():
            deb = build_deb(hub, read_outputs(path, hub.stack_name), lab.path("dist"),
                            source_date_epoch=SOURCE_DATE_EPOCH)
            if deb.plan.warnings:
                raise LabError(f"building {name}'s package warned: {deb.plan.warnings}")
            self.debs[name] = deb

    def machine(self, node: str) -> Machine:
        if node not in self.machines:
            machine = Machine(name=node, netns=self.lab.topology.ns(node), image=self.image,
                              workdir=self.lab.path("machines", node), machine_name=f"{self.lab.prefix}-{node}",
                              log_dir=self.lab.log_dir)
            self.machines[node] = machine
            self.lab.on_close(f"machine {node}", machine.destroy)
        return self.machines[node]

    # -- the tunnel host -------------------------------------------------------------------------

    def start_tunnel_host(self) -> Machine:
        host = self.machine("onprem")
        host.write("/etc/hostname", "tunnel-host\n")
        host.chroot("ssh-keygen", "-A")  # no cloud-init here: the image has no host keys of its own
        for name, deb in self.debs.items():
            host.write(f"/root/{deb.path.name}", deb.path.read_bytes())
        host.start()
        state = host.wait_system(timeout_s=60)
        if state != "running":
            raise LabError(f"the tunnel host booted {state}: failed units {host.failed_units()}")
        done = host.run(["dpkg", "-i", *(f"/root/{deb.path.name}" for deb in self.debs.values())], timeout=180)
        self.lab.notes.append("tunnel host: dpkg -i " + " ".join(d.path.name for d in self.debs.values()))
        self.dpkg_output = done.stdout + done.stderr
        return host

    def pubkey(self, hub: str) -> str:
        plan = self.debs[hub].plan
        line = self.machine("onprem").run([f"/usr/bin/{plan.pubkey_command}"]).stdout.strip()
        if not line.startswith("ssh-ed25519 "):
            raise LabError(f"{plan.pubkey_command} printed {line!r}, not an ed25519 key")
        return line

    def tunnel_units(self, hub: str) -> list[str]:
        plan = self.debs[hub].plan
        return [f"{plan.package}@{slot}.service" for slot in range(len(plan.endpoints))]

    # -- the fake cloud --------------------------------------------------------------------------

    def start_cloud(self, deployment: Deployment) -> None:
        lab = self.lab
        self.ca = LabCA(lab.path("ca"))
        azure = deployment.stacks[AZURE_HUB]
        aws = deployment.stacks[AWS_HUB]
        vaults: dict[str, dict] = {}
        for name, body in azure.of_type("azurerm_key_vault_secret").items():
            url = azure.attribute("azurerm_key_vault_secret", name, ["versionless_id"])
            vault = url.split("//", 1)[1].split(".", 1)[0]
            vaults.setdefault(vault, {"secrets": {}})["secrets"][azure.resolve(body["name"])] = {
                "value": azure.resolve(body["value"]), "content_type": body.get("content_type"),
                "arm_id": azure.attribute("azurerm_key_vault_secret", name, ["resource_versionless_id"]),
                "version": azure.attribute("azurerm_key_vault_secret", name, ["version"]),
            }
        assignments = [azure.resolve({"scope": a["scope"], "role": a["role_definition_name"],
                                      "principal_id": a["principal_id"]})
                       for a in azure.of_type("azurerm_role_assignment").values()]
        vault_names = [f"{v}.vault.azure.net" for v in vaults]
        azure_cert = self.ca.issue("keyvault", vault_names)

        region = aws.provider("aws").get("region", "us-east-1")
        bucket_objects = self.bucket_objects(aws)
        aws_names = [f"ssm.{region}.amazonaws.com", f"s3.{region}.amazonaws.com", f"sts.{region}.amazonaws.com",
                     *(f"{b}.s3.{region}.amazonaws.com" for b in bucket_objects)]
        aws_cert = self.ca.issue("aws", aws_names)
        self.hosts = {AZURE_API_ADDRESS: vault_names, AWS_API_ADDRESS: aws_names}
        profile_name, profile = aws.one("aws_iam_instance_profile")
        role = aws.resolve(profile["role"])
        actions: list[str] = []
        for policy in aws.of_type("aws_iam_role_policy").values():
            if aws.resolve(policy["role"]) == role:
                for statement in json.loads(aws.resolve(policy["policy"]))["Statement"]:
                    acts = statement["Action"]
                    actions += [acts] if isinstance(acts, str) else acts
        instances = [self._azure_instance(azure, proxy) for proxy in AZURE_PROXIES]
        instances.append(self._aws_instance(aws, AWS_PROXY, role=role, region=region,
                                            profile_arn=aws.attribute("aws_iam_instance_profile", profile_name, ["arn"])))
        config = {
            "imds_address": IMDS_ADDRESS, "control_port": self.control_port,
            "ready_file": str(lab.path("fakecloud.ready")), "instances": instances,
            "azure": {"api_address": AZURE_API_ADDRESS, "cert": str(azure_cert.cert_path),
                      "key": str(azure_cert.key_path), "vaults": vaults, "role_assignments": assignments},
            "aws": {"api_address": AWS_API_ADDRESS, "cert": str(aws_cert.cert_path), "key": str(aws_cert.key_path),
                    "region": region, "account": aws.inputs.aws_account_id,
                    "roles": [{"name": role, "actions": sorted(set(actions))}],
                    "parameters": [aws.resolve({k: p[k] for k in ("name", "type", "value")})
                                   for p in aws.of_type("aws_ssm_parameter").values()],
                    "buckets": bucket_objects},
        }
        config_path = lab.path("fakecloud.json")
        config_path.write_text(json.dumps(config, indent=2))
        config_path.chmod(0o600)
        log = open(lab.log_dir / "fakecloud.log", "ab", buffering=0)
        script = Path(__file__).with_name("fakecloud.py")
        self.cloud_process = subprocess.Popen(
            ["ip", "netns", "exec", lab.topology.ns("gw"), sys.executable, str(script), "--config", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        lab.on_close("fake cloud", self._stop_cloud)
        ready = lab.path("fakecloud.ready")

        def started() -> bool:
            if self.cloud_process.poll() is not None:
                raise LabError(f"the fake cloud exited {self.cloud_process.returncode}: "
                               f"{tail(lab.log_dir / 'fakecloud.log', 30)}")
            return ready.exists()

        deadline = time.monotonic() + 60
        while not started():
            if time.monotonic() > deadline:
                raise LabError(f"the fake cloud did not start in 60 s: {tail(lab.log_dir / 'fakecloud.log', 30)}")
            time.sleep(0.1)

    @staticmethod
    def bucket_objects(aws: AppliedStack) -> dict[str, dict[str, str]]:
        """``{bucket: {key: base64 content}}`` of the stack's ``aws_s3_object`` resources."""
        objects: dict[str, dict[str, str]] = {}
        for name, body in aws.of_type("aws_s3_object").items():
            if "source" in body:
                raise LabError(f"aws_s3_object.{name} uploads a file (source=): the lab loads content/content_base64 only")
            content = body.get("content_base64") or base64.b64encode(str(aws.resolve(body.get("content", ""))).encode()).decode()
            objects.setdefault(aws.resolve(body["bucket"]), {})[aws.resolve(body["key"])] = content
        return objects

    def apply_in_place(self, before: Deployment, after: Deployment) -> list[str]:
        """What ``terraform apply`` updates in place in the fake cloud: each Azure VM's ``user_data``
        (IMDS serves the new value; the VM keeps running) and the changed objects of the AWS hub
        bucket. Returns what was updated."""
        updated = []
        azure = after.stacks[AZURE_HUB]
        for proxy in AZURE_PROXIES:
            _, vm = self._vm(azure, AZURE_PROXIES.index(proxy))
            user_data = azure.resolve(vm.get("user_data", ""))
            if user_data != self.instances[proxy]["azure"]["compute"]["userData"]:
                self.control("/userdata", {"instance": self.instances[proxy]["id"], "user_data": user_data})
                self.instances[proxy]["azure"]["compute"]["userData"] = user_data
                updated.append(f"{proxy}: user_data")
        old_objects = self.bucket_objects(before.stacks[AWS_HUB])
        for bucket, objects in self.bucket_objects(after.stacks[AWS_HUB]).items():
            for key, content in objects.items():
                if old_objects.get(bucket, {}).get(key) != content:
                    self.control("/object", {"bucket": bucket, "key": key, "content": content})
                    updated.append(f"s3://{bucket}/{key}")
        return updated

    def _stop_cloud(self) -> None:
        process = self.cloud_process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    def _azure_instance(self, stack: AppliedStack, proxy: str) -> dict:
        slot = AZURE_PROXIES.index(proxy)
        name, vm = self._vm(stack, slot)
        nic_ref = vm["network_interface_ids"][0]
        nic_type, nic_name = nic_ref.removeprefix("${").split(".")[:2]
        nic = stack.body(nic_type, nic_name)
        address = stack.resolve(nic["ip_configuration"][0]["private_ip_address"])
        if address != self.lab.proxy_address(proxy):
            raise LabError(f"{proxy}: the stack puts slot {slot} at {address}, the lab at {self.lab.proxy_address(proxy)}")
        tags = stack.resolve(vm.get("tags", {}))
        vm_id = stack.attribute("azurerm_linux_virtual_machine", name, ["virtual_machine_id"])
        mac = self._mac(proxy)
        record = {
            "id": vm_id, "cloud": "azure", "addresses": [address],
            "user_data": vm["custom_data"],
            "hostname": stack.resolve(vm.get("computer_name", vm["name"])),
            "azure": {
                "principal_id": stack.attribute("azurerm_linux_virtual_machine", name, ["identity", 0, "principal_id"])
                if vm.get("identity", {}).get("type", "").startswith("SystemAssigned") else None,
                "compute": {
                    "name": stack.resolve(vm["name"]), "computerName": stack.resolve(vm.get("computer_name", "")),
                    "location": stack.resolve(vm["location"]), "resourceGroupName": stack.resolve(vm["resource_group_name"]),
                    "subscriptionId": stack.inputs.azure_subscription_id, "vmId": vm_id,
                    "vmSize": stack.resolve(vm["size"]), "zone": str(stack.resolve(vm.get("zone") or "")),
                    "osType": "Linux", "provider": "Microsoft.Compute",
                    "tags": ";".join(f"{k}:{v}" for k, v in tags.items()),
                    "tagsList": [{"name": k, "value": v} for k, v in tags.items()],
                    "userData": stack.resolve(vm.get("user_data", "")),
                    "osProfile": {"adminUsername": stack.resolve(vm["admin_username"]),
                                  "computerName": stack.resolve(vm.get("computer_name", "")),
                                  "disablePasswordAuthentication": str(vm.get("disable_password_authentication",
                                                                              True)).lower()},
                },
                "network": {"interface": [{
                    "ipv4": {"ipAddress": [{"privateIpAddress": address, "publicIpAddress": ""}],
                             "subnet": [{"address": HUB_CIDR.split("/")[0], "prefix": "26"}]},
                    "ipv6": {"ipAddress": []}, "macAddress": mac.replace(":", "").upper()}]},
            },
        }
        self.instances[proxy] = record
        return record

    @staticmethod
    def _vm(stack: AppliedStack, slot: int) -> tuple[str, dict]:
        for name, vm in stack.of_type("azurerm_linux_virtual_machine").items():
            if stack.resolve(vm["name"]).endswith(f"-{slot}"):
                return name, vm
        raise LabError(f"the Azure stack has no VM for slot {slot}")

    def _mac(self, proxy: str) -> str:
        ifname = self.lab.topology.ifname(proxy, "gw")
        shown = self.lab.topology.exec(proxy, ["cat", f"/sys/class/net/{ifname}/address"]).stdout.strip()
        return shown

    def _aws_instance(self, stack: AppliedStack, proxy: str, *, role: str, region: str, profile_arn: str) -> dict:
        _, template = stack.one("aws_launch_template")
        metadata = template.get("metadata_options", {})
        tags: dict[str, str] = {}
        for spec in template.get("tag_specifications", []):
            if spec.get("resource_type") == "instance":
                tags.update(stack.resolve(spec.get("tags", {})))
        _, group = stack.one("aws_autoscaling_group")
        for tag in group.get("tag", []):
            if tag.get("propagate_at_launch"):
                tags[stack.resolve(tag["key"])] = str(stack.resolve(tag["value"]))
        slot = 0
        hub = self.deployed.hubs[AWS_HUB]
        slot_ip = str(hub.aws_addresses().slot_private_ips[slot])
        from tunnelhub.userdata.render import AWS_SLOT_TAG

        eips = [stack.attribute("aws_eip", n, ["public_ip"]) for n, e in stack.of_type("aws_eip").items()
                if stack.resolve(e.get("tags", {})).get(AWS_SLOT_TAG) == str(slot)]
        if len(eips) != 1:
            raise LabError(f"expected one aws_eip tagged {AWS_SLOT_TAG}={slot}, found {eips}")
        eip = eips[0]
        # What the slot Lambda does while the instance is in Pending:Wait (docs/aws-slots.md): the
        # slot tag, the slot's fixed secondary address on the interface, the Elastic IP on the
        # primary address.
        tags[AWS_SLOT_TAG] = str(slot)
        self.lab.topology.exec("gw", ["ip", "route", "add", f"{slot_ip}/32", "dev",
                                      self.lab.topology.ifname("gw", proxy)])
        record = {
            "id": "i-0" + hashlib.sha256(f"{self.lab.prefix}/{proxy}".encode()).hexdigest()[:16], "cloud": "aws",
            "addresses": [AWS_PRIMARY_IP, slot_ip], "user_data": template["user_data"],
            "hostname": f"ip-{AWS_PRIMARY_IP.replace('.', '-')}",
            "aws": {
                "region": region, "account": stack.inputs.aws_account_id, "role": role,
                "instance_profile_arn": profile_arn, "instance_type": stack.resolve(template.get("instance_type", "")),
                "http_tokens": metadata.get("http_tokens", "optional"),
                "hop_limit": metadata.get("http_put_response_hop_limit", 1),
                "instance_metadata_tags": metadata.get("instance_metadata_tags", "disabled"),
                "tags": tags,
                "eni": {"mac": self._mac(proxy), "primary": AWS_PRIMARY_IP, "secondary": [slot_ip],
                        "associations": {eip: AWS_PRIMARY_IP},
                        "subnet_cidr": f"{AWS_CIDR.split('/')[0]}/{AWS_PREFIX_LEN}"},
            },
        }
        self.instances[proxy] = record
        return record

    def control(self, path: str, body: dict | None = None) -> Any:
        """The fake cloud's control API (GET without a body, POST with one)."""
        with in_netns(self.lab.topology.ns("gw")):
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.control_port}{path}", method="POST" if body is not None else "GET",
                data=json.dumps(body).encode() if body is not None else None,
                headers={"Content-Type": "application/json"})
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(request, timeout=10) as response:
                return json.loads(response.read())

    def cloud_requests(self, proxy: str) -> list[dict]:
        addresses = set(self.instances[proxy]["addresses"])
        return [r for r in self.control("/requests") if r["src"] in addresses]

    # -- proxies -----------------------------------------------------------------------------------

    def user_data(self, proxy: str) -> bytes:
        """What the cloud delivers to this proxy: its base64 user data from the stack, decoded."""
        return base64.b64decode(self.instances[proxy]["user_data"], validate=True)

    def prepare_proxy(self, proxy: str, *, fresh: bool = False) -> Machine:
        """A new VM's disk: the image, the NoCloud seed, the fake cloud's names and CA."""
        if fresh and proxy in self.machines:
            self.machines.pop(proxy).destroy()
        machine = self.machine(proxy)
        record = self.instances[proxy]
        machine.write(f"{SEED_DIR}/user-data", self.user_data(proxy), 0o600)
        machine.write(f"{SEED_DIR}/meta-data",
                      f"instance-id: {record['id']}\nlocal-hostname: {record['hostname']}\n", 0o600)
        hosts = machine.read("/etc/hosts").decode()
        hosts += "# tunnelhub boot lab: the fake cloud's endpoints\n" + "".join(
            f"{address} {' '.join(names)}\n" for address, names in self.hosts.items())
        machine.write("/etc/hosts", hosts)
        assert self.ca is not None
        machine.write(CA_BUNDLE, machine.read(CA_BUNDLE) + self.ca.pem)
        return machine

    def boot_proxy(self, proxy: str) -> ProxyBoot:
        machine = self.machine(proxy)
        boot = machine.start()
        self.boots[proxy] = ProxyBoot(proxy, boot.started_at)
        return self.boots[proxy]

    def cloud_init_status(self, proxy: str) -> dict:
        """``cloud-init status --long`` as fields (status, detail, errors...)."""
        out = self.machine(proxy).run(["cloud-init", "status", "--long"], check=False).stdout
        fields: dict[str, str] = {}
        key = None
        for line in out.splitlines():
            if ":" in line and not line.startswith(" "):
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
            elif key:
                fields[key] = (fields[key] + "\n" + line).strip()
        return fields

    def wait_cloud_init(self, proxy: str, *, timeout_s: float = 180) -> dict:
        def finished() -> dict | None:
            fields = self.cloud_init_status(proxy)
            return fields if fields.get("status") in ("done", "error", "disabled") else None

        fields = wait_until(finished, timeout_s=timeout_s, interval_s=0.5, what=f"cloud-init on {proxy} to finish")
        self.boots[proxy].mark("cloud-init finished")
        return fields

    def health(self, proxy: str, path: str) -> int:
        return probe(self.lab.topology.ns("lb"), self.lab.topology.ip(proxy, "lb"), HEALTH_PORT, path, timeout_s=3)

    def health_json(self, proxy: str, path: str) -> tuple[int, dict]:
        """Status and JSON body of the proxy's health endpoint (asked from the LB's namespace)."""
        import http.client

        with in_netns(self.lab.topology.ns("lb")):
            conn = http.client.HTTPConnection(self.lab.topology.ip(proxy, "lb"), HEALTH_PORT, timeout=3)
            conn.connect()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def metrics(self, proxy: str) -> str:
        """The proxy's ``GET /metrics`` (Prometheus text format), asked from the LB's namespace."""
        import http.client

        with in_netns(self.lab.topology.ns("lb")):
            conn = http.client.HTTPConnection(self.lab.topology.ip(proxy, "lb"), HEALTH_PORT, timeout=3)
            conn.connect()
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read().decode()
            if response.status != 200:
                raise AssertionError(f"{proxy}: GET /metrics answered {response.status}: {body[:200]}")
            return body
        finally:
            conn.close()

    def route_of(self, proxy: str) -> str:
        return AWS_ROUTE if proxy == AWS_PROXY else AZURE_ROUTE

    def lb_for(self, proxy: str) -> Haproxy:
        return self.lbs[AWS_HUB if proxy == AWS_PROXY else AZURE_HUB]

    def start_lbs(self, *, interval_s: float, threshold: int) -> None:
        """The two load balancers: nslab's on :3306 (proxy1, proxy2), nslabaws's on :3307 (proxy3)."""
        lab = self.lab
        self.lbs[AZURE_HUB] = lab.start_lb([LbRoute(AZURE_ROUTE, ROUTE_PORT)], check="http", interval_s=interval_s,
                                           threshold=threshold, health_port=HEALTH_PORT, wait_up_s=None,
                                           servers=list(AZURE_PROXIES), name="lb-nslab")
        self.lbs[AWS_HUB] = lab.start_lb([LbRoute(AWS_ROUTE, ROUTE_PORT, frontend_port=AWS_LB_PORT)], check="http",
                                         interval_s=interval_s, threshold=threshold, health_port=HEALTH_PORT,
                                         wait_up_s=None, servers=[AWS_PROXY], name="lb-nslabaws", default=False)
