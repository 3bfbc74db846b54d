"""The AWS slot wait (files/tunnelhub_aws_slot.py) against a fake instance metadata service that
changes while the script waits, the way the lifecycle Lambda acts on a booting instance; the
interface commands (ip, netplan) are recording fakes on PATH."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_userdata_fakes import FakeCloud

SCRIPT = Path(__file__).resolve().parents[2] / "tunnelhub" / "userdata" / "files" / "tunnelhub_aws_slot.py"
MAC = "0a:00:00:00:00:01"

FAKE_IP = """#!/bin/sh
echo "ip $*" >> "$FAKE_LOG"
if [ "$1" = "-o" ]; then cat "$FAKE_ADDRS"; fi
"""
FAKE_NETPLAN = """#!/bin/sh
echo "netplan $*" >> "$FAKE_LOG"
exit "${FAKE_NETPLAN_RC:-0}"
"""


@pytest.fixture
def box(tmp_path):
    """A fake host: bin/ (ip, netplan), sysfs with one interface, a netplan dir, a log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("ip", FAKE_IP), ("netplan", FAKE_NETPLAN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    sysfs = tmp_path / "sys-class-net"
    for name, mac in (("lo", "00:00:00:00:00:00"), ("ens5", MAC)):
        (sysfs / name).mkdir(parents=True)
        (sysfs / name / "address").write_text(mac + "\n")
    (tmp_path / "netplan").mkdir()
    addrs = tmp_path / "addrs"
    addrs.write_text("2: ens5    inet 10.70.0.10/26 metric 100 brd 10.70.0.63 scope global dynamic ens5\n")
    return {"dir": tmp_path, "bin": bin_dir, "sysfs": sysfs, "log": tmp_path / "log", "addrs": addrs,
            "netplan": tmp_path / "netplan" / "60-tunnelhub-slot.yaml", "state": tmp_path / "etc" / "slot"}


def run_slot(box, cloud, *args: str, env: dict[str, str] | None = None, timeout_s: float = 60):
    environment = dict(os.environ, PATH=f"{box['bin']}:/usr/bin:/bin", FAKE_LOG=str(box["log"]),
                       FAKE_ADDRS=str(box["addrs"]), **(env or {}))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--imds-url", cloud.url, "--sysfs", str(box["sysfs"]),
         "--netplan-file", str(box["netplan"]), "--state-file", str(box["state"]), *args],
        capture_output=True, text=True, timeout=timeout_s, env=environment)
    return done, time.monotonic() - started


def log_of(box) -> list[str]:
    return box["log"].read_text().splitlines() if box["log"].exists() else []


def test_waits_for_the_tag_then_the_elastic_ip(box):
    with FakeCloud() as cloud:
        cloud.later(1.0, lambda: cloud.instance_tags.update({"tunnelhub:slot": "1"}))
        cloud.later(2.0, lambda: cloud.meta.update({"public-ipv4": "54.1.2.3"}))
        done, elapsed = run_slot(box, cloud, "--count", "2", "--require-public-ipv4")
    assert done.returncode == 0, done.stdout
    assert 2.0 <= elapsed < 15
    assert "waiting for the slot tag tunnelhub:slot" in done.stdout
    assert "slot tag tunnelhub:slot: 1 after" in done.stdout
    assert "public IPv4 (the slot's Elastic IP): 54.1.2.3 after" in done.stdout
    assert box["state"].read_text() == "1\n"
    assert log_of(box) == []  # no private circuit: the interface is left alone


def test_without_slot_eip_egress_it_does_not_wait_for_a_public_ip(box):
    with FakeCloud() as cloud:
        cloud.instance_tags["tunnelhub:slot"] = "0"
        done, elapsed = run_slot(box, cloud, "--count", "2")
    assert done.returncode == 0 and box["state"].read_text() == "0\n" and elapsed < 10


def test_gives_up_after_the_deadline_with_progress_and_a_hint(box):
    with FakeCloud() as cloud:
        done, elapsed = run_slot(box, cloud, "--count", "2", "--timeout-s", "3", "--progress-every-s", "1")
    assert done.returncode == 1
    assert 3 <= elapsed < 15
    assert "still waiting for slot tag tunnelhub:slot" in done.stdout
    assert "FAILED: no slot tag tunnelhub:slot after 3 s" in done.stdout
    assert "instance_metadata_tags = enabled" in done.stdout
    assert not box["state"].exists()


def test_a_slot_number_out_of_range_is_not_accepted(box):
    with FakeCloud() as cloud:
        cloud.instance_tags["tunnelhub:slot"] = "7"
        done, _ = run_slot(box, cloud, "--count", "2", "--timeout-s", "2")
    assert done.returncode == 1
    assert "tag tunnelhub:slot='7' is not a slot number from 0 to 1" in done.stdout


def test_an_expired_imds_token_is_renewed(box):
    with FakeCloud() as cloud:
        cloud.later(0.7, cloud.imds_tokens.clear)
        cloud.later(1.5, lambda: cloud.instance_tags.update({"tunnelhub:slot": "0"}))
        done, _ = run_slot(box, cloud, "--count", "2")
        puts = [r for r in cloud.requests if r[0] == "PUT"]
    assert done.returncode == 0, done.stdout
    assert len(puts) >= 2


def test_private_circuit_address_is_configured_now_and_for_every_boot(box):
    with FakeCloud() as cloud:
        cloud.instance_tags["tunnelhub:slot"] = "1"
        cloud.later(1.0, lambda: cloud.local_ipv4s.append("10.70.0.80"))
        done, elapsed = run_slot(box, cloud, "--count", "2", "--private-ips", "10.70.0.16,10.70.0.80")
    assert done.returncode == 0, done.stdout
    assert elapsed >= 1.0
    assert "secondary private IP 10.70.0.80 on the primary interface: 10.70.0.80" in done.stdout
    assert log_of(box) == ["ip -o -4 addr show dev ens5", "ip addr add 10.70.0.80/32 dev ens5", "netplan generate"]
    text = box["netplan"].read_text()
    assert "  ethernets:\n    ens5:\n      addresses: [10.70.0.80/32]\n" in text
    assert stat.S_IMODE(box["netplan"].stat().st_mode) == 0o600


def test_an_address_the_os_already_has_is_not_added_again(box):
    box["addrs"].write_text(box["addrs"].read_text() + "2: ens5    inet 10.70.0.16/26 scope global ens5\n")
    with FakeCloud() as cloud:
        cloud.instance_tags["tunnelhub:slot"] = "0"
        cloud.local_ipv4s.append("10.70.0.16")
        done, _ = run_slot(box, cloud, "--count", "2", "--private-ips", "10.70.0.16,10.70.0.80")
    assert done.returncode == 0
    assert "10.70.0.16 is already configured on ens5" in done.stdout
    assert "ip addr add" not in " ".join(log_of(box))


def test_a_rejected_netplan_file_is_removed_and_fails(box):
    with FakeCloud() as cloud:
        cloud.instance_tags["tunnelhub:slot"] = "0"
        cloud.local_ipv4s.append("10.70.0.16")
        done, _ = run_slot(box, cloud, "--count", "2", "--private-ips", "10.70.0.16,10.70.0.80",
                           env={"FAKE_NETPLAN_RC": "1"})
    assert done.returncode == 1 and "netplan rejected" in done.stdout
    assert not box["netplan"].exists() and not box["state"].exists()


def test_private_ips_must_cover_every_slot(box):
    with FakeCloud() as cloud:
        done, _ = run_slot(box, cloud, "--count", "3", "--private-ips", "10.70.0.16,10.70.0.80")
    assert done.returncode == 2 and "--private-ips lists 2 addresses for 3 slots" in done.stderr
