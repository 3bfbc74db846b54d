"""The lab's extractors and unit runner on the real generated artifacts (no root, no namespaces).

The lab hub's rendered cloud-init (``render_cloud_init``, the gzip payload that ships) and its
on-prem package (``build_deb``; needs ``dpkg-deb``) go through the same functions the e2e
scenarios use.
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
from nslab.cloudinit import (
    extract_cloud_init,
    load_cloud_config,
    match_user,
    rewrite_paths,
)
from nslab.generated import document_paths, tunnel_keys_path
from nslab.hub import HUB_NAME, TUNNEL_USER, hub_spec_data
from nslab.proc import LabError
from nslab.unit import (
    ServiceRunner,
    expand_env_word,
    load_unit,
    parse_env_file,
    parse_timespan,
    split_command_line,
)

from tunnelhub.onprem import build_deb, deb_file, parse_outputs
from tunnelhub.spec import validate_text
from tunnelhub.userdata import render_cloud_init

REPO = Path(__file__).resolve().parents[2]
REFERENCE_DIR = Path(__file__).parent / "reference"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ3b6Y1lV2fQ9m6Xb9y0aZk0K8yYb5j3v5m9v2Yk0xQf lab"
ADMIN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP+AblpMjOtzFvfeyo3AcFmgH6jHTRl1IJn/pxPRZBhL admin"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOaN3cWyvjBGr4otYDaxEsCyHJdGDD93vvrXcCU/lvrx"


@pytest.fixture(scope="module")
def hub():
    data = hub_spec_data(tunnel_public_key=KEY, admin_public_key=ADMIN_KEY, db_address="192.168.20.15")
    return validate_text(json.dumps({"version": 1, "hubs": [data]}), "lab-hub.yaml").spec.hub(HUB_NAME)


@pytest.fixture(scope="module")
def user_data(hub) -> bytes:
    return render_cloud_init(hub, 0).payload


# -- cloud-init ------------------------------------------------------------------------------


def test_rendered_cloud_init_extracts_every_file_with_mode_and_content(tmp_path, user_data):
    vm = extract_cloud_init(user_data, tmp_path / "root")  # gzip, as it ships
    assert sorted(vm.files) == [
        "/etc/haproxy/haproxy.cfg",
        "/etc/ssh/sshd_config.d/10-tunnelhub.conf",
        "/etc/sysctl.d/60-tunnelhub.conf",
        "/etc/systemd/system/haproxy.service.d/10-tunnelhub.conf",
        "/etc/systemd/system/tunnelhub-health.service",
        "/etc/systemd/system/tunnelhub-reconcile.service",
        "/etc/tunnelhub/boot.json",
        "/etc/tunnelhub/reconcile.json",
        "/home/tunnelhub/.ssh/authorized_keys",  # the admin's (cloud-init users[])
        "/usr/local/lib/tunnelhub/tunnelhub_boot.py",
        "/usr/local/lib/tunnelhub/tunnelhub_fetch_host_key.py",
        "/usr/local/lib/tunnelhub/tunnelhub_health.py",
        "/usr/local/lib/tunnelhub/tunnelhub_reconcile.py",
    ]
    # The routes, the health routes and the tunnel keys are the document's (the reconciler writes them).
    assert document_paths(vm) == {p: str(tmp_path / "root" / p.lstrip("/"))
                                  for p in ("/etc/haproxy/tunnelhub-routes.cfg", "/etc/tunnelhub/health.json",
                                            "/etc/ssh/authorized_keys.d/thtunnel",
                                            "/etc/ssh/tunnelhub/tunnel-forwarding.conf",
                                            "/var/lib/tunnelhub/applied-config.json", "/run/tunnelhub/reconcile.json")}
    assert "net.ipv4.tcp_retries2 = 5" in vm.file("/etc/sysctl.d/60-tunnelhub.conf").text
    assert vm.file("/usr/local/lib/tunnelhub/tunnelhub_health.py").host_path.stat().st_mode \
        & 0o777 == 0o755
    assert match_user(vm.file("/etc/ssh/sshd_config.d/10-tunnelhub.conf").text) == TUNNEL_USER


def test_the_tunnel_keys_file_is_the_one_the_match_block_names_not_the_admins(tmp_path, user_data):
    vm = extract_cloud_init(user_data, tmp_path / "root")
    with pytest.raises(LabError, match="was not written"):  # the reconciler writes it, from the document
        tunnel_keys_path(vm)
    written = tmp_path / "root/etc/ssh/authorized_keys.d/thtunnel"
    written.parent.mkdir(parents=True)
    written.write_text(KEY + "\n")
    (tmp_path / "root/etc/ssh/tunnelhub").mkdir()
    assert tunnel_keys_path(vm) == written
    assert vm.matching(r"authorized_keys") and all("thtunnel" not in f.vm_path for f in vm.matching("authorized_keys"))


def test_rendered_cloud_init_embeds_the_health_daemon_unchanged(user_data):
    doc = load_cloud_config(user_data)
    (entry,) = [w for w in doc["write_files"] if w["path"].endswith("tunnelhub_health.py")]
    assert entry["content"] == (REPO / "tunnelhub/userdata/files/tunnelhub_health.py").read_text()


def test_extra_files_are_added_after_the_cloud_init(tmp_path, user_data):
    vm = extract_cloud_init(user_data, tmp_path / "r",
                            extra_files={"/etc/ssh/ssh_host_ed25519_key": b"KEY"})
    written = vm.file("/etc/ssh/ssh_host_ed25519_key")
    assert written.host_path.read_bytes() == b"KEY"
    assert written.host_path.stat().st_mode & 0o777 == 0o600


def test_gzipped_and_mime_user_data_are_read(tmp_path, user_data):
    text = gzip.decompress(user_data).decode()
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


def test_rewrite_paths_touches_whole_paths_and_runtime_dirs_only(tmp_path, user_data):
    vm = extract_cloud_init(user_data, tmp_path / "root")
    cfg = vm.rewrite_paths(vm.file("/etc/haproxy/haproxy.cfg").text)
    assert f"stats socket {tmp_path}/root/run/haproxy/admin.sock" in cfg
    assert "chroot /var/lib/haproxy" in cfg  # not a runtime path, not an extracted file
    dropin = vm.rewrite_paths(vm.file("/etc/ssh/sshd_config.d/10-tunnelhub.conf").text,
                              extra=document_paths(vm))
    assert f"AuthorizedKeysFile {tmp_path}/root/etc/ssh/authorized_keys.d/thtunnel" in dropin
    assert f"Include {tmp_path}/root/etc/ssh/tunnelhub/tunnel-forwarding.conf" in dropin
    assert "ForceCommand /usr/sbin/nologin" in dropin
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


def test_the_packages_template_unit_expands_for_a_slot(tmp_path, hub):
    outputs = parse_outputs({"tunnel_endpoints": {"value": ["10.60.0.5", "10.60.0.6"], "type": "list"},
                             "host_public_key": {"value": HOST_KEY, "type": "string"}}, hub.stack_name, "o.json")
    deb = build_deb(hub, outputs, tmp_path / "dist", source_date_epoch=1_747_700_000)
    unit = tmp_path / "tunnelhub-nslab@.service"
    unit.write_bytes(deb_file(deb.path, "/lib/systemd/system/tunnelhub-nslab@.service"))
    env = tmp_path / "slot-1.env"
    env.write_bytes(deb_file(deb.path, "/etc/tunnelhub/nslab/slot-1.env"))
    command = load_unit(unit, instance="1", path_map={
        "/etc/tunnelhub/nslab/slot-1.env": str(env),
        "/etc/tunnelhub/nslab/": "/lab/etc/",
        "/usr/libexec/tunnelhub-nslab/quickack-route": "/lab/quickack-route",
        "/run/": "/lab/run/",
    })
    assert command.unit_name == "tunnelhub-nslab@1.service"
    # the health forward's socket is in the slot's RuntimeDirectory, $RUNTIME_DIRECTORY mapped like /run
    assert command.argv == ["/usr/bin/autossh", "-M", "0", "-N", "-F", "/lab/etc/ssh_config",
                            "-R", "localhost:13306:192.168.20.15:3306",
                            "-L", "/lab/run/tunnelhub-nslab/slot-1/health.sock:127.0.0.1:8081", "10.60.0.6"]
    assert command.runtime_directories == (Path("/lab/run/tunnelhub-nslab/slot-1"),)
    assert command.runtime_directory_mode == 0o750
    hooks = [(line.prefixes, line.argv) for line in command.start_pre + command.stop_post]
    assert hooks[0] == ("-+", ["/lab/quickack-route", "add", "/lab/run/tunnelhub-nslab/quickack-1.json",
                               "10.60.0.6"])
    assert ("-+", ["/lab/quickack-route", "remove", "/lab/run/tunnelhub-nslab/quickack-1.json",
                   "10.60.0.6"]) in hooks
    journal = [argv for prefixes, argv in hooks if argv[0] == "/bin/echo"]  # one line per route, start and stop
    assert [a[1].split(" event=")[0] for a in journal] == ["tunnelhub-nslab slot=1 route=labdb"] * 2
    assert (command.env["AUTOSSH_GATETIME"], command.env["AUTOSSH_POLL"]) == ("0", "10")
    assert command.env["PATH"].startswith("/usr/local/sbin")
    assert (command.restart, command.restart_s, command.start_limit_interval_s) == ("always", 2.0, 0.0)
    assert command.user == "tunnelhub-nslab"


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


def test_exec_start_pre_and_stop_post_run_around_every_start(tmp_path):
    log = tmp_path / "hooks"
    runner = _runner(tmp_path, f"ExecStartPre=/bin/sh -c 'echo pre >> {log}'\n"
                               f"ExecStopPost=/bin/sh -c 'echo post >> {log}'\n"
                               "ExecStart=/bin/sleep 0.3\nRestart=always\nRestartSec=200ms")
    try:
        runner.start()
        assert _wait(lambda: len(runner.starts()) >= 2)
    finally:
        runner.stop()
    kinds = [e.kind for e in runner.events]
    assert kinds[:6] == ["ExecStartPre", "start", "exit", "ExecStopPost", "restart-scheduled", "ExecStartPre"]
    assert log.read_text().split()[:3] == ["pre", "post", "pre"]
    assert log.read_text().split()[-1] == "post", "stop() runs ExecStopPost too"


def test_a_failing_exec_start_pre_fails_the_start_unless_prefixed_with_dash(tmp_path):
    failing = _runner(tmp_path, "ExecStartPre=/bin/false\nExecStart=/bin/sleep 30\nRestart=no")
    try:
        failing.start()
        assert _wait(lambda: failing.state == "failed")
    finally:
        failing.stop()
    assert failing.starts() == [] and failing.exits()[0].returncode == 1
    tolerated = _runner(tmp_path, "ExecStartPre=-/bin/false\nExecStart=/bin/sleep 30\nRestart=no")
    try:
        tolerated.start()
        assert _wait(lambda: tolerated.main_pid is not None)
    finally:
        tolerated.stop()
    assert len(tolerated.starts()) == 1
