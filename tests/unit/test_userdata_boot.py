"""The first-boot driver (files/tunnelhub_boot.py) with the rendered boot.json, recording fakes of
the system commands on PATH (sysctl, dpkg-query, apt-get, haproxy, systemctl), stub helper
scripts (the reconciler among them) and, on AWS, a fake instance metadata service for the slot
tags: the order of the steps, the non-blocking enable, the bounded install retries, and what each
failure stops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import aws_hub, load_hubs
from tests.unit.test_userdata_fakes import FakeCloud
from tunnelhub.spec import load_spec
from tunnelhub.userdata import render as R

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tunnelhub" / "userdata" / "files" / "tunnelhub_boot.py"

FAKE_COMMAND = """#!/bin/sh
name=$(basename "$0")
echo "$name $*" >> "$FAKE_LOG"
case "$name" in
  apt-get)
    [ -e "$POLICY_RC_D" ] && echo "policy-rc.d present: $(tail -n 1 "$POLICY_RC_D")" >> "$FAKE_LOG"
    count=$(cat "$FAKE_DIR/apt-count" 2>/dev/null || echo 0); count=$((count + 1)); echo $count > "$FAKE_DIR/apt-count"
    fails=$(cat "$FAKE_DIR/apt-fails" 2>/dev/null || echo 0)
    if [ "${fails}" -ge "$count" ]; then echo "E: Could not connect to archive.ubuntu.com" ; exit 100; fi ;;
  dpkg-query) if [ -e "$FAKE_DIR/installed" ]; then printf 'install ok installed'; else exit 1; fi ;;
  haproxy) exit "$(cat "$FAKE_DIR/haproxy-rc" 2>/dev/null || echo 0)" ;;
esac
exit 0
"""
STUB_SCRIPT = """import os, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["FAKE_LOG"], "a") as fh:
    fh.write(name + " " + " ".join(sys.argv[1:]) + "\\n")
code = os.path.join(os.environ["FAKE_DIR"], name + ".rc")
sys.exit(int(open(code).read()) if os.path.exists(code) else 0)
"""


class Box:
    def __init__(self, tmp_path: Path, boot: dict):
        self.dir = tmp_path
        self.bin = tmp_path / "bin"
        self.lib = tmp_path / "lib"
        self.bin.mkdir()
        self.lib.mkdir()
        for name in ("sysctl", "dpkg-query", "apt-get", "haproxy", "systemctl"):
            (self.bin / name).write_text(FAKE_COMMAND)
            (self.bin / name).chmod(0o755)
        for name in ("tunnelhub_aws_slot.py", "tunnelhub_fetch_files.py", "tunnelhub_fetch_host_key.py",
                     "tunnelhub_reconcile.py"):
            (self.lib / name).write_text(STUB_SCRIPT)
        self.log = tmp_path / "log"
        self.policy = tmp_path / "policy-rc.d"
        self.config = tmp_path / "boot.json"
        # The rendered absolute paths, pointed at the fakes (the only change to boot.json).
        boot["reconciler"] = dict(boot["reconciler"], script=str(self.lib / "tunnelhub_reconcile.py"))
        boot["haproxy_check"] = ["haproxy", *boot["haproxy_check"][1:]]
        self.config.write_text(json.dumps(boot))

    def set(self, name: str, value: str) -> None:
        (self.dir / name).write_text(value)

    def run(self, *extra: str, cloud: FakeCloud | None = None) -> tuple[subprocess.CompletedProcess, float]:
        if cloud is not None:
            extra = ("--imds-url", cloud.url, *extra)
        env = dict(os.environ, PATH=f"{self.bin}:/usr/bin:/bin", FAKE_LOG=str(self.log), FAKE_DIR=str(self.dir),
                   POLICY_RC_D=str(self.policy))
        started = time.monotonic()
        done = subprocess.run([sys.executable, str(SCRIPT), "--config", str(self.config), "--lib-dir", str(self.lib),
                               "--policy-rc-d", str(self.policy), "--first-retry-s", "0.5", *extra],
                              capture_output=True, text=True, timeout=120, env=env)
        return done, time.monotonic() - started

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def foreground(self) -> list[str]:
        """The calls without the host key fetch, which runs in the background (any order)."""
        return [c for c in self.calls() if not c.startswith("tunnelhub_fetch_host_key.py")]


def boot_json(hub_name: str, slot: int | None, **changes) -> dict:
    """The boot.json of an example hub, as rendered into its user data."""
    user_data = R.render_cloud_init(load_spec(ROOT / "examples" / "hubs.yaml").hub(hub_name), slot)
    boot = json.loads(next(f.content for f in R.extract_files(user_data.cloud_config) if f.path == R.BOOT_CONFIG_PATH))
    boot.update(changes)
    return boot


APT_OPTIONS = ("-o DPkg::Lock::Timeout=300 -o Acquire::Retries=3 -o Acquire::http::Timeout=30 "
               "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold")


ENABLE_ALL = ("systemctl enable --now --no-block haproxy.service tunnelhub-health.service "
              "tunnelhub-reconcile.service")
RECONCILE_BOOT = "tunnelhub_reconcile.py --config /etc/tunnelhub/reconcile.json --boot"
HAPROXY_CHECK = "haproxy -c -q -f /etc/haproxy/haproxy.cfg -f /etc/haproxy/tunnelhub-routes.cfg"
RELOAD_SSHD = "systemctl try-reload-or-restart --no-block ssh.service"


def slot_tags(cloud: FakeCloud, count: int = 2, addresses: str = "10.70.0.16,10.70.0.80") -> FakeCloud:
    """The tags the Auto Scaling group propagates (aws_hub.py)."""
    cloud.instance_tags.update({"tunnelhub:slot-count": str(count), "tunnelhub:slot-private-ips": addresses})
    return cloud


def test_azure_first_boot(tmp_path):
    box = Box(tmp_path, boot_json("weu", 0))
    done, _ = box.run()
    assert done.returncode == 0, done.stdout + done.stderr
    calls = box.calls()
    assert calls[0] == "sysctl -p /etc/sysctl.d/60-tunnelhub.conf"
    assert "tunnelhub_fetch_host_key.py --source azure-keyvault --timeout-s 900" in calls
    ordered = [c for c in calls if not c.startswith(("tunnelhub_fetch", "sysctl", "policy-rc.d"))]
    assert ordered == [
        "dpkg-query -W -f=${Status} haproxy",
        f"apt-get {APT_OPTIONS} update",
        f"apt-get {APT_OPTIONS} install -y --no-install-recommends haproxy",
        RECONCILE_BOOT,  # the first apply of the document, once HAProxy is there to check it
        HAPROXY_CHECK,
        "systemctl daemon-reload",
        ENABLE_ALL,
        RELOAD_SSHD,  # sshd picks up the tunnel keys and PermitListen file only when it reloads
    ]
    # maintainer scripts could not start services while the package went in; the policy is gone after
    assert calls.count("policy-rc.d present: exit 101") == 2
    assert not box.policy.exists()
    assert "done: hub configuration applied, data plane, health endpoint and reconciler started" in done.stdout


def test_without_a_document_only_the_reconciler_starts(tmp_path):
    """No document at boot: HAProxy and the health endpoint are enabled, not started (HAProxy has no
    routes file); the reconciler starts them once it has applied one (reload-or-restart)."""
    box = Box(tmp_path, boot_json("weu", 0))
    box.set("tunnelhub_reconcile.py.rc", "1")
    done, _ = box.run()
    assert done.returncode == 1 and "FAILED steps: hub configuration" in done.stdout
    calls = box.foreground()
    assert HAPROXY_CHECK not in calls
    assert calls[-2:] == ["systemctl enable --now --no-block tunnelhub-reconcile.service",
                          "systemctl enable haproxy.service tunnelhub-health.service"]


def test_aws_first_boot_waits_for_the_slot_and_fetches_the_bucket_files(tmp_path):
    box = Box(tmp_path, boot_json("use", None))
    with slot_tags(FakeCloud()) as cloud:
        done, _ = box.run(cloud=cloud)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = box.calls()
    assert "2 slot(s), private addresses 10.70.0.16, 10.70.0.80 (instance tags)" in done.stdout
    slot = calls.index("tunnelhub_aws_slot.py --count 2 --tag tunnelhub:slot --timeout-s 600 --require-public-ipv4 "
                       "--private-ips 10.70.0.16,10.70.0.80")
    files = calls.index(f"tunnelhub_fetch_files.py --config {box.config}")
    key = calls.index("tunnelhub_fetch_host_key.py --source aws-ssm --timeout-s 900 "
                      "--parameter /tunnelhub/use/ssh-host-ed25519-key")
    apt = calls.index(f"apt-get {APT_OPTIONS} update")
    reconcile = calls.index(RECONCILE_BOOT)
    assert slot < files < apt < reconcile and slot < key  # no egress before the Elastic IP
    assert box.foreground()[-2:] == [ENABLE_ALL, RELOAD_SSHD]


def test_aws_slot_count_and_addresses_come_from_the_instance_tags(tmp_path):
    """A new proxy count changes the group's tags, not the user data: the boot reads them."""
    hub = load_hubs(aws_hub(onprem={"source_cidrs": ["192.168.10.0/24"], "private_circuit": True},
                            network={"cidr": "10.70.0.0/24", "egress": "nat_gateway"})).hubs[0]
    box = Box(tmp_path, R.boot_config(hub, None))
    with slot_tags(FakeCloud(), 4, "10.70.0.16,10.70.0.80,10.70.0.17,10.70.0.81") as cloud:
        done, _ = box.run(cloud=cloud)
    assert done.returncode == 0, done.stdout
    assert ("tunnelhub_aws_slot.py --count 4 --tag tunnelhub:slot --timeout-s 600 "
            "--private-ips 10.70.0.16,10.70.0.80,10.70.0.17,10.70.0.81") in box.calls()


@pytest.mark.parametrize(("tags", "message"), [
    ({}, "no instance tags tunnelhub:slot-count and tunnelhub:slot-private-ips in instance metadata"),
    ({"tunnelhub:slot-count": "two", "tunnelhub:slot-private-ips": "10.70.0.16"}, "is not a slot count"),
    ({"tunnelhub:slot-count": "2", "tunnelhub:slot-private-ips": "10.70.0.16"}, "lists 1 addresses for 2 slots"),
])
def test_missing_or_bad_slot_tags_stop_the_boot(tmp_path, tags, message):
    box = Box(tmp_path, boot_json("use", None))
    with FakeCloud() as cloud:
        cloud.instance_tags.update(tags)
        # tags that never come: the minute's wait, on a clock running 30 times faster
        done, _ = box.run(cloud=cloud) if tags else _run_with_short_tag_wait(box, cloud)
    assert done.returncode == 1, done.stdout
    assert message in done.stdout
    assert [c.split()[0] for c in box.calls()] == ["sysctl"]  # nothing else ran


def _run_with_short_tag_wait(box: Box, cloud: FakeCloud):
    """The tag wait is bounded by a minute; patch it down for the test (same code path)."""
    wrapper = box.dir / "boot_short.py"
    wrapper.write_text(f"import runpy, sys, time\n"
                       f"real = time.monotonic\nstart = real()\n"
                       f"time.monotonic = lambda: start + (real() - start) * 30\n"
                       f"sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]\n"
                       f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    env = dict(os.environ, PATH=f"{box.bin}:/usr/bin:/bin", FAKE_LOG=str(box.log), FAKE_DIR=str(box.dir),
               POLICY_RC_D=str(box.policy))
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(wrapper), "--config", str(box.config), "--lib-dir", str(box.lib),
                           "--policy-rc-d", str(box.policy), "--first-retry-s", "0.5", "--imds-url", cloud.url],
                          capture_output=True, text=True, timeout=120, env=env)
    return done, time.monotonic() - started


def test_no_slot_stops_the_boot(tmp_path):
    box = Box(tmp_path, boot_json("use", None))
    box.set("tunnelhub_aws_slot.py.rc", "1")
    with slot_tags(FakeCloud()) as cloud:
        done, _ = box.run(cloud=cloud)
    assert done.returncode == 1
    assert "this instance has no slot; stopping here" in done.stdout
    assert [c.split()[0] for c in box.calls()] == ["sysctl", "tunnelhub_aws_slot.py"]  # not even the host key


def test_missing_bucket_files_stop_the_boot(tmp_path):
    box = Box(tmp_path, boot_json("use", None))
    box.set("tunnelhub_fetch_files.py.rc", "1")
    with slot_tags(FakeCloud()) as cloud:
        done, _ = box.run(cloud=cloud)
    assert done.returncode == 1 and "the proxy files are missing" in done.stdout
    assert not any(c.startswith(("apt-get", "systemctl", "tunnelhub_reconcile")) for c in box.calls())


def test_package_install_is_retried_until_egress_comes_up(tmp_path):
    box = Box(tmp_path, boot_json("weu", 0))
    box.set("apt-fails", "2")  # the first two updates fail: egress comes up late
    done, elapsed = box.run()
    assert done.returncode == 0, done.stdout
    assert "install attempt 1 failed; retrying in 0.5 s" in done.stdout
    assert "install attempt 2 failed; retrying in 1 s" in done.stdout
    assert "installed haproxy (attempt 3)" in done.stdout
    assert "E: Could not connect to archive.ubuntu.com" in done.stdout  # apt's own words are logged
    assert elapsed >= 1.5
    assert box.foreground()[-2:] == [ENABLE_ALL, RELOAD_SSHD]


def test_package_install_gives_up_at_its_deadline(tmp_path):
    box = Box(tmp_path, boot_json("weu", 0, install_timeout_s=3))
    box.set("apt-fails", "1000")
    done, elapsed = box.run()
    assert done.returncode == 1
    assert "FAILED to install haproxy after" in done.stdout and "no working egress" in done.stdout
    assert elapsed < 20
    assert not any(c.startswith(("haproxy", "systemctl", "tunnelhub_reconcile")) for c in box.calls())
    assert not box.policy.exists()
    assert "FAILED steps: packages" in done.stdout


def test_a_preinstalled_haproxy_is_restarted_with_the_routes_file(tmp_path):
    """An HAProxy the image already ran is restarted, not reloaded: HAProxy's master-worker reload
    re-executes the master with its original arguments (HAProxy 2.6 management guide, "master-worker
    mode": the master "re-executes itself" on SIGUSR2), which lack the routes file the drop-in adds
    to ExecStart. Seen under real systemd (tests/boot): after a reload the worker ran
    ``haproxy -sf 121 -x sockpair@3 -Ws -f /etc/haproxy/haproxy.cfg ...`` and no route listened."""
    box = Box(tmp_path, boot_json("weu", 0))
    box.set("installed", "")
    done, _ = box.run()
    assert done.returncode == 0
    calls = box.foreground()
    assert not any(c.startswith("apt-get") for c in calls)
    assert calls[-3:] == [ENABLE_ALL, "systemctl restart --no-block haproxy.service", RELOAD_SSHD]


def test_sshd_reloads_after_the_tunnel_keys_are_written(tmp_path):
    """sshd's per-connection child gets the listener's configuration (OpenSSH sshd.c:
    send_rexec_state/recv_rexec_state), so the tunnel user's authorized keys and PermitListen file
    that the first apply writes count only after a reload. Seen under real systemd (tests/boot): the
    host key step restarted sshd 0.2 s before the reconciler wrote the file, and every ``ssh -R``
    failed with "remote port forwarding failed" until sshd was reloaded."""
    box = Box(tmp_path, boot_json("weu", 0))
    done, _ = box.run()
    assert done.returncode == 0
    calls = box.foreground()
    assert calls.index(RECONCILE_BOOT) < calls.index(RELOAD_SSHD)
    (tmp_path / "b").mkdir()
    box2 = Box(tmp_path / "b", boot_json("weu", 0))
    box2.set("tunnelhub_reconcile.py.rc", "1")
    box2.run()
    assert RELOAD_SSHD not in box2.calls()  # nothing written: nothing to reload


def test_a_bad_haproxy_config_starts_only_the_reconciler(tmp_path):
    box = Box(tmp_path, boot_json("weu", 0))
    box.set("haproxy-rc", "1")
    done, _ = box.run()
    assert done.returncode == 1 and "FAILED steps: haproxy config" in done.stdout
    starts = [c for c in box.calls() if c.startswith("systemctl enable")]
    assert starts == ["systemctl enable --now --no-block tunnelhub-reconcile.service",
                      "systemctl enable haproxy.service tunnelhub-health.service"]


def test_a_host_key_failure_leaves_the_data_plane_running_and_is_reported(tmp_path):
    box = Box(tmp_path, boot_json("weu", 0))
    box.set("tunnelhub_fetch_host_key.py.rc", "1")
    done, _ = box.run()
    assert done.returncode == 1 and "FAILED steps: host key" in done.stdout
    assert ENABLE_ALL in box.calls()


@pytest.mark.parametrize("hub_name", ["weu", "use"])
def test_the_boot_script_never_blocks_on_a_unit(hub_name):
    """Every systemctl start/enable in the boot script is --no-block (a blocking start from
    cloud-init's own boot job can deadlock the boot)."""
    source = SCRIPT.read_text()
    for match in [line for line in source.splitlines() if '"systemctl"' in line]:
        if '"--now"' in match or '"start"' in match or "restart" in match:
            assert '"--no-block"' in match, match
