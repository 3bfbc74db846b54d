"""The lab's extractors and unit runner on the SAMPLE artifacts (no root, no namespaces).

When the real renderer and package exist, the same functions take their output.
"""

from __future__ import annotations

import base64
import gzip
import json
import signal
import time
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest

from nslab.cloudinit import extract_cloud_init, load_cloud_config, match_user, rewrite_paths
from nslab.proc import LabError
from nslab.samples import SAMPLES_DIR, sample_proxy_user_data
from nslab.unit import (
    ServiceRunner,
    expand_env_word,
    load_unit,
    parse_env_file,
    parse_timespan,
    split_command_line,
)

REFERENCE_DIR = Path(__file__).parent / "reference"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ3b6Y1lV2fQ9m6Xb9y0aZk0K8yYb5j3v5m9v2Yk0xQf lab"


# -- cloud-init ------------------------------------------------------------------------------


def test_sample_cloud_init_extracts_every_file_with_mode_and_decoded_content(tmp_path):
    vm = extract_cloud_init(sample_proxy_user_data(KEY), tmp_path / "root")
    assert sorted(vm.files) == [
        "/etc/haproxy/haproxy.cfg",
        "/etc/ssh/sshd_config.d/10-tunnelhub.conf",
        "/etc/sysctl.d/60-tunnelhub.conf",
        "/etc/systemd/system/tunnelhub-health.service",
        "/etc/tunnelhub/health.json",
        "/home/tunnelhub/.ssh/authorized_keys",
        "/usr/local/lib/tunnelhub/tunnelhub_health.py",
    ]
    keys = vm.file("/home/tunnelhub/.ssh/authorized_keys")
    assert keys.host_path == tmp_path / "root/home/tunnelhub/.ssh/authorized_keys"
    assert keys.host_path.stat().st_mode & 0o777 == 0o600
    assert keys.text.startswith('restrict,port-forwarding,permitlisten="localhost:13306"')
    assert KEY in keys.text
    # gz+b64 and b64 entries are decoded byte-exact.
    health = json.loads(vm.file("/etc/tunnelhub/health.json").text)
    assert health["routes"]["mysql"]["tunnel_port"] == 13306
    assert "net.ipv4.tcp_retries2 = 5" in vm.file("/etc/sysctl.d/60-tunnelhub.conf").text
    assert vm.file("/usr/local/lib/tunnelhub/tunnelhub_health.py").host_path.stat().st_mode \
        & 0o777 == 0o755
    assert match_user(vm.file("/etc/ssh/sshd_config.d/10-tunnelhub.conf").text) == "tunnelhub"


def test_sample_cloud_init_embeds_the_sample_health_script_unchanged():
    doc = load_cloud_config(sample_proxy_user_data(KEY))
    (entry,) = [w for w in doc["write_files"] if w["path"].endswith("tunnelhub_health.py")]
    assert entry["content"] == (SAMPLES_DIR / "tunnelhub_health.py").read_text()


def test_extra_files_are_added_after_the_cloud_init(tmp_path):
    vm = extract_cloud_init(sample_proxy_user_data(KEY), tmp_path / "r",
                            extra_files={"/etc/ssh/ssh_host_ed25519_key": b"KEY"})
    written = vm.file("/etc/ssh/ssh_host_ed25519_key")
    assert written.host_path.read_bytes() == b"KEY"
    assert written.host_path.stat().st_mode & 0o777 == 0o600


def test_gzipped_and_mime_user_data_are_read(tmp_path):
    text = sample_proxy_user_data(KEY)
    assert load_cloud_config(gzip.compress(text.encode())) == load_cloud_config(text)
    message = MIMEMultipart()
    message.attach(MIMEText("#!/bin/sh\necho hi\n", "x-shellscript"))
    message.attach(MIMEText(text, "cloud-config"))
    assert load_cloud_config(message.as_string()) == load_cloud_config(text)


def test_bad_encoding_and_permissions_name_the_entry(tmp_path):
    bad = "#cloud-config\nwrite_files:\n  - path: /etc/x\n    encoding: rot13\n    content: a\n"
    with pytest.raises(LabError, match=r"write_files\[0\] \(/etc/x\): unknown encoding 'rot13'"):
        extract_cloud_init(bad, tmp_path / "a")
    bad = "#cloud-config\nwrite_files:\n  - path: /etc/x\n    permissions: rw\n    content: a\n"
    with pytest.raises(LabError, match=r"permissions 'rw' is not an octal string"):
        extract_cloud_init(bad, tmp_path / "b")
    with pytest.raises(LabError, match="does not start with '#cloud-config'"):
        extract_cloud_init("write_files: []\n", tmp_path / "c")


def test_append_entries_concatenate(tmp_path):
    doc = ("#cloud-config\nwrite_files:\n"
           "  - {path: /etc/a, content: \"one\\n\"}\n"
           f"  - {{path: /etc/a, append: true, encoding: b64, content: "
           f"{base64.b64encode(b'two').decode()}}}\n")
    vm = extract_cloud_init(doc, tmp_path / "r")
    assert vm.file("/etc/a").host_path.read_text() == "one\ntwo"


def test_rewrite_paths_touches_whole_paths_and_runtime_dirs_only(tmp_path):
    vm = extract_cloud_init(sample_proxy_user_data(KEY), tmp_path / "root")
    cfg = vm.rewrite_paths(vm.file("/etc/haproxy/haproxy.cfg").text)
    assert f"stats socket {tmp_path}/root/run/haproxy/admin.sock" in cfg
    assert f"pidfile {tmp_path}/root/run/haproxy.pid" in cfg
    assert "chroot /var/lib/haproxy" in cfg  # not a runtime path, not an extracted file
    mapping = {"/etc/a": "/lab/a", "/run/": "/lab/run/"}
    assert rewrite_paths("-i/etc/a x=/etc/a '/etc/a' /etc/ab /x/etc/a", mapping) == \
        "-i/lab/a x=/lab/a '/lab/a' /etc/ab /x/etc/a"
    assert rewrite_paths("/run/sshd.pid /var/run/x", mapping) == "/lab/run/sshd.pid /var/run/x"


# -- systemd units ---------------------------------------------------------------------------


def test_command_line_split_follows_systemd_quoting():
    assert split_command_line(r'''/bin/x "a b" 'c d' e\ f "g\"h" \x41''') == \
        ["/bin/x", "a b", "c d", "e f", 'g"h', "A"]
    with pytest.raises(LabError, match="unbalanced quote"):
        split_command_line('/bin/x "open')


def test_variable_expansion_follows_systemd_semantics():
    env = {"A": "x  y", "B": "1"}
    assert expand_env_word("$A", env) == ["x", "y"]  # whole word: split at whitespace
    assert expand_env_word("${A}", env) == ["x  y"]  # braces: one word, exact value
    assert expand_env_word("p${B}q${A}", env) == ["p1qx  y"]
    assert expand_env_word("$UNSET", env) == []
    assert expand_env_word("${UNSET}", env) == [""]
    assert expand_env_word("a$B", env) == ["a$B"]  # $VAR inside a word is not expanded
    assert expand_env_word("$$B", env) == ["$B"]


def test_env_file_parsing():
    env = parse_env_file(
        "# comment\n; also\nA=plain value  \nB=\"quoted  \\\"x\\\"\"\nC='single $x'\n"
        "D=one\\\n two\nexport_ok=1\n",
        source="t.env",
    )
    assert env == {"A": "plain value", "B": 'quoted  "x"', "C": "single $x", "D": "one two",
                   "export_ok": "1"}
    with pytest.raises(LabError, match="t.env:1: not a KEY=VALUE"):
        parse_env_file("not an assignment\n", source="t.env")


def test_timespans():
    assert parse_timespan("10", what="RestartSec") == 10
    assert parse_timespan("500ms", what="RestartSec") == 0.5
    assert parse_timespan("1min 30s", what="RestartSec") == 90
    with pytest.raises(LabError, match="RestartSec='soon'"):
        parse_timespan("soon", what="RestartSec")


def test_sample_template_unit_expands_for_a_slot(tmp_path):
    unit = tmp_path / "tunnelhub-lab@.service"
    unit.write_text((SAMPLES_DIR / "onprem" / "tunnelhub-lab@.service").read_text())
    env = tmp_path / "slot-2.env"
    env.write_text((SAMPLES_DIR / "onprem" / "slot.env.in").read_text()
                   .replace("@PROXY_HOST@", "10.0.0.2").replace("@DB_HOST@", "10.0.1.2"))
    command = load_unit(unit, instance="2", path_map={
        "/etc/tunnelhub/lab/slot-2.env": str(env),
        "/etc/tunnelhub/lab/": "/lab/etc/",
        "/var/lib/tunnelhub/lab/id_ed25519": "/lab/key",
    })
    assert command.unit_name == "tunnelhub-lab@2.service"
    assert command.argv == [
        "/usr/bin/autossh", "-M", "0", "-N",
        "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3",
        "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=/lab/etc/known_hosts",
        "-o", "ConnectTimeout=5", "-i", "/lab/key",
        "-R", "localhost:13306:10.0.1.2:3306", "tunnelhub@10.0.0.2",
    ]
    assert command.env["AUTOSSH_GATETIME"] == "0"
    assert command.env["PATH"].startswith("/usr/local/sbin")
    assert (command.restart, command.restart_s, command.start_limit_interval_s) == \
        ("always", 2.0, 0.0)
    assert command.user == "tunnelhub-lab"


def test_template_unit_needs_an_instance_and_env_file(tmp_path):
    unit = tmp_path / "t@.service"
    unit.write_text("[Service]\nEnvironmentFile=/etc/x/%i.env\nExecStart=/bin/true\n")
    with pytest.raises(LabError, match="template unit: pass the instance"):
        load_unit(unit)
    with pytest.raises(LabError, match=r"EnvironmentFile=/etc/x/1.env not found"):
        load_unit(unit, instance="1")


def test_reference_unit_keeps_its_flags_and_gets_only_the_known_hosts_option(tmp_path):
    text = (REFERENCE_DIR / "ssh-tunnel-proxy1.service").read_text()
    unit = tmp_path / "ssh-tunnel-proxy1.service"
    unit.write_text(text.replace("<user>", "u").replace("<db-ip>", "10.0.1.2")
                    .replace("<proxy-vm-1-ip>", "10.0.0.2"))
    command = load_unit(unit, path_map={"/home/u/.ssh/id_rsa_tunnel": "/lab/k"},
                        insert_args=["-o", "UserKnownHostsFile=/lab/kh"])
    assert command.argv == [
        "/usr/bin/autossh", "-o", "UserKnownHostsFile=/lab/kh", "-M", "0", "-N",
        "-R", "13306:10.0.1.2:3306", "-o", "ServerAliveInterval=30",
        "-o", "ServerAliveCountMax=3", "-o", "ExitOnForwardFailure=yes",
        "-o", "StrictHostKeyChecking=accept-new", "-i", "/lab/k", "u@10.0.0.2",
    ]
    assert (command.restart, command.restart_s) == ("always", 10.0)


def _runner(tmp_path, body: str) -> ServiceRunner:
    unit = tmp_path / "x.service"
    unit.write_text(f"[Unit]\nStartLimitIntervalSec=5\nStartLimitBurst=3\n[Service]\n{body}\n")
    return ServiceRunner(load_unit(unit), netns=None, log_path=tmp_path / "x.log")


def _wait(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_restart_always_restarts_a_clean_exit_after_restart_sec(tmp_path):
    runner = _runner(tmp_path, "ExecStart=/bin/sleep 0.2\nRestart=always\nRestartSec=300ms")
    try:
        runner.start()
        assert _wait(lambda: len(runner.starts()) >= 2)
    finally:
        runner.stop()
    first_exit = runner.exits()[0]
    second_start = runner.starts()[1]
    assert first_exit.returncode == 0
    assert second_start.at - first_exit.at >= 0.3


def test_restart_on_failure_ignores_sigterm_and_exit_zero(tmp_path):
    runner = _runner(tmp_path, "ExecStart=/bin/sleep 30\nRestart=on-failure\nRestartSec=100ms")
    try:
        runner.start()
        runner.kill(signal.SIGTERM)  # a clean signal for systemd: no restart
        assert _wait(lambda: runner.state.startswith("inactive"))
        assert len(runner.starts()) == 1
        runner.start()
        runner.kill(signal.SIGKILL)  # unclean: restarted
        assert _wait(lambda: len(runner.starts()) == 3)
    finally:
        runner.stop()


def test_start_limit_stops_a_crash_loop(tmp_path):
    runner = _runner(tmp_path, "ExecStart=/bin/false\nRestart=always\nRestartSec=10ms")
    try:
        runner.start()
        assert _wait(lambda: runner.state == "failed (start-limit-hit)")
    finally:
        runner.stop()
    assert len(runner.starts()) == 3


def test_stop_ends_every_process_of_the_service(tmp_path):
    runner = _runner(tmp_path, "ExecStart=/bin/sh -c 'sleep 60 & sleep 60 & wait'\n"
                               "Restart=always")
    try:
        runner.start()
        assert _wait(lambda: len(runner.processes()) == 3)
        pids = runner.processes()
    finally:
        runner.stop()
    from nslab.proc import pid_alive
    assert not any(pid_alive(p) for p in pids)
    assert len(runner.starts()) == 1
