"""The rendered proxy bootstrap cloud-init and the parts of the hub configuration document: every
example hub, checked part by part and by the real tools (cloud-init's schema, haproxy -c on the
static part plus the routes file), sizes against the clouds' limits, and the renderer's errors."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ADMIN_KEY, SECOND_TUNNEL_KEY, TUNNEL_KEY, aws_hub, azure_hub, load_hubs
from tunnelhub.spec import load_spec
from tunnelhub.userdata import (
    AWS_SLOT_TAG,
    USER_DATA_LIMIT_BYTES,
    UserDataError,
    extract_files,
    files_bucket_name,
    host_key_parameter_name,
    render_cloud_init,
)
from tunnelhub.userdata import document as D
from tunnelhub.userdata import render as R
from tunnelhub.userdata.compact import CompactError, compact_python

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hubs.yaml"
FILES = ROOT / "tunnelhub" / "userdata" / "files"
sys.path.insert(0, str(FILES))

import tunnelhub_health  # noqa: E402  (the daemon's own config parser judges health.json)


def example_renders():
    """(hub, slot, UserData) for every proxy of every example hub."""
    out = []
    for hub in load_spec(EXAMPLE).hubs:
        slots = range(hub.proxies.count) if hub.cloud == "azure" else [None]
        out += [(hub, slot, render_cloud_init(hub, slot)) for slot in slots]
    return out


EXAMPLES = example_renders()
EXAMPLE_IDS = [f"{h.name}-{'aws' if s is None else f'slot{s}'}" for h, s, _ in EXAMPLES]


def files_of(user_data) -> dict[str, R.VmFile]:
    return {f.path: f for f in extract_files(user_data.cloud_config)}


def config_of(user_data) -> dict:
    return yaml.safe_load(user_data.cloud_config)


# ---------------------------------------------------------------------------------- the whole


@pytest.mark.parametrize(("hub", "slot", "ud"), EXAMPLES, ids=EXAMPLE_IDS)
def test_every_example_renders_within_the_cloud_limit(hub, slot, ud):
    assert ud.cloud_config.startswith("#cloud-config\n")
    assert ud.size_bytes == len(ud.payload) <= USER_DATA_LIMIT_BYTES[hub.cloud] == ud.limit_bytes
    assert base64.b64decode(ud.base64) == ud.payload
    plain = ud.cloud_config.encode()
    if ud.gzipped:
        assert gzip.decompress(ud.payload) == plain
        assert len(plain) > ud.limit_bytes  # gzip only when needed
    else:
        assert ud.payload == plain
    print(f"{hub.name} {slot}: {len(plain)} bytes plain, payload {ud.size_bytes} bytes "
          f"({'gzip' if ud.gzipped else 'plain'}), limit {ud.limit_bytes}, s3 objects {len(ud.s3_objects)}")


def test_rendering_is_deterministic():
    """Terraform must not see a diff on every synth: same spec, same bytes (gzip mtime 0)."""
    hub = load_spec(EXAMPLE).hub("use")
    assert render_cloud_init(hub, None).base64 == render_cloud_init(hub, None).base64


@pytest.mark.skipif(shutil.which("cloud-init") is None, reason="Debian's cloud-init package is not installed")
@pytest.mark.parametrize(("hub", "slot", "ud"), EXAMPLES, ids=EXAMPLE_IDS)
def test_cloud_init_schema_accepts_every_example(tmp_path, hub, slot, ud):
    path = tmp_path / "user-data.yaml"
    path.write_text(ud.cloud_config)
    done = subprocess.run(["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Valid cloud-config" in done.stdout
    assert "deprecat" not in (done.stdout + done.stderr).lower().replace("schema deprecations: \n", "")


@pytest.mark.skipif(shutil.which("cloud-init") is None, reason="Debian's cloud-init package is not installed")
def test_cloud_init_schema_check_can_fail(tmp_path):
    """Negative control: the same check rejects a config with a numeric file mode."""
    data = config_of(EXAMPLES[0][2])
    data["write_files"][0]["permissions"] = 420
    path = tmp_path / "bad.yaml"
    path.write_text("#cloud-config\n" + yaml.safe_dump(data))
    done = subprocess.run(["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "permissions" in done.stdout + done.stderr


PRIVATE_KEY_BLOCK = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----\s+[A-Za-z0-9+/=]{20,}")
OPENSSH_KEY_BODY = "b3BlbnNzaC1rZXktdjE"  # base64 of "openssh-key-v1", how every OpenSSH private key starts


def _has_private_key(text: str) -> bool:
    return bool(PRIVATE_KEY_BLOCK.search(text)) or OPENSSH_KEY_BODY in text


@pytest.mark.parametrize(("hub", "slot", "ud"), EXAMPLES, ids=EXAMPLE_IDS)
def test_no_private_key_material_anywhere(hub, slot, ud):
    assert not _has_private_key(ud.cloud_config)
    assert not any(_has_private_key(o.content.decode()) for o in ud.s3_objects)


def test_private_key_detector_can_fail(tmp_path):
    """Negative control: the detector finds a real key, in PEM form and as a bare body."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    pem = (tmp_path / "k").read_text()
    assert _has_private_key(pem) and _has_private_key("".join(pem.splitlines()[1:-1]))


# ---------------------------------------------------------------------------------- files


@pytest.mark.parametrize(("hub", "slot", "ud"), EXAMPLES, ids=EXAMPLE_IDS)
def test_every_file_has_owner_octal_mode_and_stays_out_of_tmp(hub, slot, ud):
    for entry in config_of(ud)["write_files"]:
        assert entry["owner"] == "root:root"
        assert isinstance(entry["permissions"], str) and re.fullmatch(r"0[0-7]{3}", entry["permissions"])
        assert not entry["path"].startswith(("/tmp", "/var/tmp"))
    assert "/tmp" not in ud.cloud_config


def test_the_file_list():
    """The exact files a proxy gets (docs/proxy-runtime.md and the lab rely on this list)."""
    weu = files_of(render_cloud_init(load_spec(EXAMPLE).hub("weu"), 0))
    common = [
        "/etc/sysctl.d/60-tunnelhub.conf",
        "/etc/ssh/sshd_config.d/10-tunnelhub.conf",
        "/etc/haproxy/haproxy.cfg",
        "/etc/tunnelhub/boot.json",
        "/etc/tunnelhub/reconcile.json",
        "/etc/systemd/system/tunnelhub-health.service",
        "/etc/systemd/system/tunnelhub-reconcile.service",
        "/etc/systemd/system/haproxy.service.d/10-tunnelhub.conf",
    ]
    remote = ["/usr/local/lib/tunnelhub/tunnelhub_health.py", "/usr/local/lib/tunnelhub/tunnelhub_reconcile.py"]
    scripts = ["/usr/local/lib/tunnelhub/tunnelhub_boot.py", "/usr/local/lib/tunnelhub/tunnelhub_fetch_host_key.py"]
    assert list(weu) == common + remote + scripts
    use = render_cloud_init(load_spec(EXAMPLE).hub("use"), None)
    assert list(files_of(use)) == common + scripts + [
        "/usr/local/lib/tunnelhub/tunnelhub_aws_slot.py", "/usr/local/lib/tunnelhub/tunnelhub_fetch_files.py"]
    assert [o.path for o in use.s3_objects] == remote
    # Nothing of a route or a tunnel key is in the bootstrap: those are the document's.
    for ud in (render_cloud_init(load_spec(EXAMPLE).hub("weu"), 0), use):
        for path in ("/etc/haproxy/tunnelhub-routes.cfg", "/etc/tunnelhub/health.json",
                     "/etc/ssh/authorized_keys.d/tunnel", "/etc/ssh/tunnelhub/tunnel-forwarding.conf"):
            assert path not in files_of(ud)


@pytest.mark.parametrize(("hub", "slot", "ud"), EXAMPLES, ids=EXAMPLE_IDS)
def test_scripts_are_the_repository_files_executable(hub, slot, ud):
    files = files_of(ud)
    for path, f in files.items():
        if path.endswith(".py"):
            assert f.permissions == "0755"
            source = (FILES / Path(path).name).read_text()
            assert f.content == (compact_python(source) if ud.scripts_compacted else source)
            compile(f.content, path, "exec")


def test_aws_health_daemon_and_reconciler_go_to_the_bucket_pinned_by_sha256():
    """AWS: the two largest scripts do not fit in 16 KB with the rest; the user data pins the S3 copies."""
    ud = render_cloud_init(load_spec(EXAMPLE).hub("use"), None)
    boot = json.loads(files_of(ud)["/etc/tunnelhub/boot.json"].content)
    assert [o.key.rsplit("/", 1)[1] for o in ud.s3_objects] == ["tunnelhub_health.py", "tunnelhub_reconcile.py"]
    for obj in ud.s3_objects:
        script = (FILES / obj.key.rsplit("/", 1)[1]).read_bytes()
        assert obj.content == script and obj.sha256 == hashlib.sha256(script).hexdigest()
        assert obj.key == f"proxy/{obj.sha256}/{obj.key.rsplit('/', 1)[1]}"
        assert len(script) > 16384  # why: neither would fit, even alone
    assert boot["remote_files"] == [{"path": o.path, "key": o.key, "sha256": o.sha256, "permissions": "0755"}
                                    for o in ud.s3_objects]
    assert files_bucket_name("use", "123456789012", "us-east-1") == "tunnelhub-use-123456789012-us-east-1"


def test_azure_embeds_everything():
    ud = render_cloud_init(load_spec(EXAMPLE).hub("weu"), 1)
    assert ud.s3_objects == () and ud.gzipped and not ud.scripts_compacted
    assert "remote_files" not in json.loads(files_of(ud)["/etc/tunnelhub/boot.json"].content)


def test_compacted_scripts_when_even_the_bucket_is_not_enough(monkeypatch):
    """The last rung: scripts without comments/docstrings, same line numbers, same behaviour."""
    hub = load_spec(EXAMPLE).hub("use")
    normal = render_cloud_init(hub, None)
    monkeypatch.setitem(R.USER_DATA_LIMIT_BYTES, "aws", normal.size_bytes - 1)
    small = render_cloud_init(hub, None)
    assert small.scripts_compacted and small.gzipped and small.size_bytes < normal.size_bytes
    for path, f in files_of(small).items():
        if path.endswith(".py"):
            original = (FILES / Path(path).name).read_text()
            assert f.content.count("\n") == original.count("\n") and len(f.content) < len(original)
    monkeypatch.setitem(R.USER_DATA_LIMIT_BYTES, "aws", 4000)
    with pytest.raises(UserDataError, match=r"hub use: the proxy user data is \d+ bytes even gzip-compressed"):
        render_cloud_init(hub, None)


# ---------------------------------------------------------------------------------- users, runcmd


@pytest.mark.parametrize(("hub", "slot", "ud"), EXAMPLES, ids=EXAMPLE_IDS)
def test_users_and_runcmd(hub, slot, ud):
    data = config_of(ud)
    assert data["ssh_pwauth"] is False and data["disable_root"] is True
    default, admin, tunnel = data["users"]
    assert default == "default"
    assert admin["name"] == hub.proxies.admin_username
    assert admin["ssh_authorized_keys"] == list(hub.proxies.admin_ssh_public_keys)
    assert admin["lock_passwd"] is True and "sudo" in admin["groups"]
    assert tunnel == {
        "name": hub.onprem.tunnel_user, "gecos": "tunnelhub reverse tunnels (remote forwards only)",
        "system": True, "shell": "/usr/sbin/nologin", "homedir": "/nonexistent", "no_create_home": True,
        "lock_passwd": True,
    }
    assert data["runcmd"] == [["python3", "/usr/local/lib/tunnelhub/tunnelhub_boot.py", "--config",
                               "/etc/tunnelhub/boot.json"]]
    assert "packages" not in data and "package_update" not in data  # the boot script installs, with retries


@pytest.mark.parametrize(("hub", "slot", "ud"), EXAMPLES, ids=EXAMPLE_IDS)
def test_first_boot_host_keys_never_look_like_a_changed_hub_key(hub, slot, ud):
    """Before the hub host key is fetched, sshd serves keys cloud-init generates. The booted lab
    (tests/boot) showed the tunnel host logging "REMOTE HOST IDENTIFICATION HAS CHANGED" for every
    first boot when one of them was ed25519, the one type the package's ssh_config accepts and
    pins: the instance keys must be of another type (cloud-init cc_ssh ``ssh_genkeytypes``, schema
    enum dsa/ecdsa/ed25519/rsa in 22.4 and 24.x), and keys baked into an image deleted."""
    data = config_of(ud)
    assert data["ssh_genkeytypes"] == ["ecdsa"]
    assert data["ssh_deletekeys"] is True
    template = (ROOT / "tunnelhub" / "onprem" / "templates" / "ssh_config.j2").read_text()
    assert re.search(r"^\s*HostKeyAlgorithms ssh-ed25519$", template, re.M), "the tunnel host accepts ed25519 only"


@pytest.mark.parametrize(("hub", "slot", "ud"), EXAMPLES, ids=EXAMPLE_IDS)
def test_boot_config(hub, slot, ud):
    boot = json.loads(files_of(ud)["/etc/tunnelhub/boot.json"].content)
    assert boot["slot"] == slot and boot["hub"] == hub.name and boot["cloud"] == hub.cloud
    assert boot["units"] == ["haproxy.service", "tunnelhub-health.service"]
    assert boot["reconcile_unit"] == "tunnelhub-reconcile.service"
    assert boot["reconciler"] == {"script": "/usr/local/lib/tunnelhub/tunnelhub_reconcile.py",
                                  "config": "/etc/tunnelhub/reconcile.json", "timeout_s": 600}
    assert boot["haproxy_check"] == ["/usr/sbin/haproxy", "-c", "-q", "-f", "/etc/haproxy/haproxy.cfg",
                                     "-f", "/etc/haproxy/tunnelhub-routes.cfg"]
    assert boot["packages"] == ["haproxy"]
    if hub.cloud == "azure":
        assert boot["host_key"] == {"source": "azure-keyvault", "timeout_s": 900}
        assert boot["slot_wait"] is None
    else:
        assert boot["host_key"] == {"source": "aws-ssm", "parameter": "/tunnelhub/use/ssh-host-ed25519-key",
                                    "timeout_s": 900}
        assert host_key_parameter_name(hub) == "/tunnelhub/use/ssh-host-ed25519-key"
        # The count and the slots' addresses come from the instance's tags: not in the launch template.
        assert boot["slot_wait"] == {"count_tag": "tunnelhub:slot-count", "private_ips_tag": "tunnelhub:slot-private-ips",
                                     "tag": AWS_SLOT_TAG, "timeout_s": 600, "require_public_ipv4": True}


def test_aws_nat_egress_changes_the_slot_wait_and_the_count_does_not():
    base = {"onprem": {"source_cidrs": ["192.168.10.0/24"], "tunnel_public_keys": [TUNNEL_KEY], "private_circuit": True},
            "network": {"cidr": "10.70.0.0/24", "egress": "nat_gateway"}}
    hub = load_hubs(aws_hub(**base)).hubs[0]
    boot = json.loads(files_of(render_cloud_init(hub, None))["/etc/tunnelhub/boot.json"].content)
    assert boot["slot_wait"]["require_public_ipv4"] is False
    more = load_hubs(aws_hub(**base, proxies={"count": 4})).hubs[0]
    assert render_cloud_init(more, None).payload == render_cloud_init(hub, None).payload


# ---------------------------------------------------------------------------------- HAProxy


def _listen_blocks(cfg: str) -> dict[str, list[str]]:
    """``listen`` section name -> its indented lines."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in cfg.splitlines():
        if line.startswith("listen "):
            current = blocks.setdefault(line.split()[1], [])
        elif current is not None and line.startswith("    "):
            current.append(line.strip())
        else:
            current = None
    return blocks


@pytest.mark.parametrize(("hub", "slot", "ud"), EXAMPLES, ids=EXAMPLE_IDS)
def test_one_haproxy_listener_per_route(hub, slot, ud):
    base = files_of(ud)["/etc/haproxy/haproxy.cfg"].content
    assert "listen " not in base and "maxconn" not in base  # the routes file has both
    cfg = base + D.haproxy_routes_config(hub)
    blocks = _listen_blocks(cfg)
    assert list(blocks) == [n for r in hub.routes for n in ([r.name, f"{r.name}_peer"] if r.kind == "tunnel"
                                                            else [r.name])]
    peers = D.peer_addresses(hub)
    for r in hub.routes:
        block = blocks[r.name]
        assert f"bind 0.0.0.0:{r.port}" in block
        assert f"maxconn {r.max_connections}" in block
        assert f"timeout client {r.idle_timeout_min}m" in block and f"timeout server {r.idle_timeout_min}m" in block
        if r.kind == "tunnel":
            # the single-host form: one host named tunnel-host at the route's tunnel port, every slot a backup
            assert [ln.split()[1] for ln in block if ln.startswith("server ")] == [
                "tunnel-host", *(f"peer_{k}" for k in range(len(peers)))]
            assert (f'server tunnel-host 127.0.0.1:{r.tunnel_port} agent-inter 1000ms agent-send '
                    f'"GET /agent/{r.name}/tunnel-host HTTP/1.0\\r\\n\\r\\n"') in block
            for k, address in enumerate(peers):
                assert (f'server peer_{k} {address}:{r.peer_port} backup agent-send '
                        f'"GET /agent/{r.name} HTTP/1.0\\r\\n\\r\\n"') in block
            peer = blocks[f"{r.name}_peer"]
            assert f"bind 0.0.0.0:{r.peer_port}" in peer and "backup" not in " ".join(peer)
            assert [ln.split()[1] for ln in peer if ln.startswith("server ")] == ["tunnel-host"]
        else:
            assert (f"server remote {r.target_host}:{r.target_port} resolvers dns resolve-prefer ipv4 "
                    "init-addr none") in block
    for line in ("mode tcp", "option tcplog", "log stdout format short local0 info", "timeout connect 5s"):
        assert line in cfg
    assert ("resolvers dns" in cfg) == bool(hub.forward_routes)
    if hub.forward_routes:
        assert "parse-resolv-conf" in cfg and "hold valid 10s" in cfg


def test_route_limits_reach_haproxy_and_ip_targets_skip_dns():
    routes = [
        {"name": "pg", "kind": "tunnel", "port": 5432, "target": "pg.corp.example:5432", "type": "postgresql",
         "max_connections": 250, "idle_timeout_min": 7},
        {"name": "api", "kind": "forward", "port": 8443, "target": "52.1.2.3:443"},
        {"name": "v6", "kind": "forward", "port": 9443, "target": "[2606:4700::1111]:443"},
    ]
    hub = load_hubs(aws_hub(routes=routes)).hubs[0]
    cfg = D.haproxy_routes_config(hub)
    blocks = _listen_blocks(cfg)
    assert "maxconn 250" in blocks["pg"] and "timeout client 7m" in blocks["pg"]
    assert "server remote 52.1.2.3:443" in blocks["api"]
    assert "server remote ipv6@2606:4700::1111:443" in blocks["v6"]
    assert "resolvers dns" not in cfg
    assert "\nglobal\n    maxconn 2600\n" in cfg  # the routes' sum, the peer listeners' (pg_peer: 250) + 100


def test_old_workers_keep_their_connections_for_a_stated_bound():
    """A reload (every routine change) must not cut connections after 30 s: the old worker keeps
    them up to 7 days, and at most 50 reloads (docs/live-config.md, "HAProxy reloads")."""
    base = R.haproxy_base_config(load_spec(EXAMPLE).hub("weu"))
    assert "    hard-stop-after 7d\n" in base and "    mworker-max-reloads 50\n" in base
    assert "hard-stop-after 30s" not in base
    assert "stats socket /run/haproxy/admin.sock mode 660 level admin expose-fd listeners" in base


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
@pytest.mark.parametrize("variant", ["examples", "ip-targets", "many-routes"])
def test_haproxy_accepts_the_config(tmp_path, variant):
    if variant == "examples":
        hubs = list(load_spec(EXAMPLE).hubs)
    elif variant == "ip-targets":
        hubs = [load_hubs(aws_hub(routes=[
            {"name": "api", "kind": "forward", "port": 8443, "target": "52.1.2.3:443"},
            {"name": "v6", "kind": "forward", "port": 9443, "target": "[2606:4700::1111]:443"}])).hubs[0]]
    else:
        hubs = [load_hubs(azure_hub(routes=[
            {"name": f"db{i}", "kind": "tunnel", "port": 3000 + i, "target": f"db{i}.corp.example:3306",
             "max_connections": 100000} for i in range(16)])).hubs[0]]
    for hub in hubs:
        base, routes = tmp_path / f"{hub.name}.cfg", tmp_path / f"{hub.name}-routes.cfg"
        base.write_text(R.haproxy_base_config(hub))
        routes.write_text(D.haproxy_routes_config(hub))
        done = subprocess.run(["haproxy", "-c", "-f", str(base), "-f", str(routes)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "[WARNING]" not in done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_check_can_fail(tmp_path):
    """Negative control: haproxy -c rejects a broken listener."""
    hub = load_spec(EXAMPLE).hub("use")
    base, path = tmp_path / "base.cfg", tmp_path / "bad.cfg"
    base.write_text(R.haproxy_base_config(hub))
    path.write_text(D.haproxy_routes_config(hub).replace("bind 0.0.0.0:3306", "bind 0.0.0.0:x"))
    assert subprocess.run(["haproxy", "-c", "-f", str(base), "-f", str(path)], capture_output=True,
                          timeout=60).returncode != 0


# ---------------------------------------------------------------------------------- health


@pytest.mark.parametrize("hub", load_spec(EXAMPLE).hubs, ids=lambda h: h.name)
def test_health_config_is_accepted_by_the_daemon(hub):
    data = D.render_document(hub).payload["health"]
    config = tunnelhub_health.parse_config(data)
    assert (config.listen_address, config.port) == ("0.0.0.0", hub.proxies.health_port)
    assert [r.name for r in config.routes] == [r.name for r in hub.routes]
    for spec_route, route in zip(hub.routes, config.routes, strict=True):
        assert route.kind == spec_route.kind
        assert route.probe.mode == spec_route.probe_mode
        assert (route.probe.interval_s, route.probe.timeout_s) == (spec_route.probe.interval_s,
                                                                   spec_route.probe.timeout_s)
        if spec_route.kind == "tunnel":
            assert (route.host, route.port) == ("127.0.0.1", spec_route.tunnel_port)
        else:
            assert (route.host, route.port) == (spec_route.target_host, spec_route.target_port)
        assert spec_route.health_path == f"/routes/{route.name}"


def test_health_probe_options_follow_the_mode():
    routes = [
        {"name": "my", "kind": "tunnel", "port": 3306, "target": "my.corp.example:3306", "type": "mysql",
         "probe": {"check_user": "hc", "interval_s": 3, "timeout_s": 1.5}},
        {"name": "web", "kind": "tunnel", "port": 8443, "target": "web.corp.example:443"},
        {"name": "sni", "kind": "forward", "port": 443, "target": "api.example.com:443",
         "probe": {"server_name": "front.example.com"}},
        {"name": "raw", "kind": "forward", "port": 9000, "target": "raw.example.com:9000"},
    ]
    data = D.health_config(load_hubs(aws_hub(routes=routes)).hubs[0])
    probes = {r["name"]: r["probe"] for r in data["routes"]}
    assert probes["my"] == {"mode": "mysql", "interval_s": 3.0, "timeout_s": 1.5, "check_user": "hc"}
    assert probes["web"] == {"mode": "tls", "interval_s": 2.0, "timeout_s": 2.0, "server_name": "web.corp.example"}
    assert probes["sni"] == {"mode": "tls", "interval_s": 2.0, "timeout_s": 2.0, "server_name": "front.example.com"}
    assert probes["raw"] == {"mode": "connect", "interval_s": 2.0, "timeout_s": 2.0}
    tunnelhub_health.parse_config(data)


@pytest.mark.parametrize(("hub", "slot", "ud"), EXAMPLES, ids=EXAMPLE_IDS)
def test_health_unit(hub, slot, ud):
    unit = files_of(ud)["/etc/systemd/system/tunnelhub-health.service"].content
    assert ("ExecStart=/usr/bin/python3 /usr/local/lib/tunnelhub/tunnelhub_health.py "
            "--config /etc/tunnelhub/health.json --status-file /run/tunnelhub/reconcile.json") in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit.splitlines()  # the reconciler's reload
    for line in ("Restart=always", "DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "BindsTo=haproxy.service", "After=network-online.target haproxy.service",
                 "StartLimitIntervalSec=0", "CapabilityBoundingSet=", "WantedBy=multi-user.target"):
        assert line in unit.splitlines()
    assert "multi-user.target" not in unit.split("[Install]")[0]  # never ordered after it: no boot deadlock
    dropin = files_of(ud)["/etc/systemd/system/haproxy.service.d/10-tunnelhub.conf"].content
    assert "Wants=tunnelhub-health.service" in dropin.splitlines()


def test_health_unit_may_bind_a_low_port_only_when_asked():
    hub = load_hubs(azure_hub(proxies={"health_port": 81})).hubs[0]
    unit = files_of(render_cloud_init(hub, 0))["/etc/systemd/system/tunnelhub-health.service"].content
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in unit
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in unit


def _systemd_problems(tmp_path: Path, unit_text: str) -> list[str]:
    unit = tmp_path / "tunnelhub-health.service"
    unit.write_text(unit_text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)
    # haproxy.service and the daemon's path do not exist on the test machine; anything else counts.
    return [line for line in (done.stdout + done.stderr).splitlines()
            if "tunnelhub-health.service" in line and "haproxy.service" not in line
            and "tunnelhub_health.py" not in line]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_health_unit_passes_systemd_analyze(tmp_path):
    ud = render_cloud_init(load_spec(EXAMPLE).hub("weu"), 0)
    unit = files_of(ud)["/etc/systemd/system/tunnelhub-health.service"].content
    assert _systemd_problems(tmp_path, unit) == []
    # negative control: a bad value in the same unit is reported
    assert _systemd_problems(tmp_path, unit.replace("ProtectSystem=strict", "ProtectSystem=bogus"))


# ---------------------------------------------------------------------------------- sshd, keys, sysctl


@pytest.mark.parametrize(("hub", "slot", "ud"), EXAMPLES, ids=EXAMPLE_IDS)
def test_sshd_dropin_lines(hub, slot, ud):
    text = files_of(ud)["/etc/ssh/sshd_config.d/10-tunnelhub.conf"].content
    glob, match = text.split(f"Match User {hub.onprem.tunnel_user}\n")
    global_lines = {line for line in glob.splitlines() if line and not line.startswith("#")}
    assert {
        "PermitRootLogin no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "AuthenticationMethods publickey", "PubkeyAuthentication yes", "AllowTcpForwarding no",
        "AllowAgentForwarding no", "AllowStreamLocalForwarding no", "X11Forwarding no", "PermitTunnel no",
        "GatewayPorts no", "ClientAliveInterval 10", "ClientAliveCountMax 3",
        f"AllowUsers {hub.proxies.admin_username} {hub.onprem.tunnel_user}",
    } <= global_lines
    match_lines = [line.strip() for line in match.splitlines() if line.strip()]
    assert match_lines == [
        "Include /etc/ssh/tunnelhub/tunnel-forwarding.conf",  # the document's part: its values come first
        f"AuthorizedKeysFile /etc/ssh/authorized_keys.d/{hub.onprem.tunnel_user}", "AllowTcpForwarding no",
        "PermitListen none", "PermitOpen none", "GatewayPorts no", "PermitTTY no",
        "ForceCommand /usr/sbin/nologin", "AllowAgentForwarding no", "AllowStreamLocalForwarding no",
        "X11Forwarding no", "PermitTunnel no", "PermitUserRC no",
    ]
    ports = " ".join(f"localhost:{hub.host_tunnel_port(r, h)}" for h in hub.tunnel_hosts for r in hub.tunnel_routes)
    assert ports == {"weu": "localhost:13306 localhost:15432 localhost:14306 localhost:16432",
                     "use": "localhost:13306"}[hub.name]  # every tunnel host's ports, host by host
    forwarding = [ln for ln in D.sshd_tunnel_forwarding(hub).splitlines() if not ln.startswith("#")]
    assert forwarding == ["AllowTcpForwarding yes", f"PermitListen {ports}",
                          f"PermitOpen 127.0.0.1:{hub.proxies.health_port}"]


@pytest.mark.parametrize("hub", load_spec(EXAMPLE).hubs, ids=lambda h: h.name)
def test_authorized_keys_options(hub):
    """Each key under its own host's options: -R to that host's ports only, from its source ranges."""
    text = D.render_document(hub).payload["authorized_keys"]
    keys = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(keys) == len(hub.all_tunnel_keys()) == {"weu": 2, "use": 1}[hub.name]
    for line, (host, key) in zip(keys, hub.all_tunnel_keys(), strict=True):
        h = hub.tunnel_host(host)
        listen = ",".join(f'permitlisten="localhost:{hub.host_tunnel_port(r, h)}"' for r in hub.tunnel_routes)
        cidrs = ",".join(str(c) for c in h.source_cidrs)
        opens = f'permitopen="127.0.0.1:{hub.proxies.health_port}"'  # the health endpoint, for the status command
        assert line == f'restrict,port-forwarding,{listen},{opens},command="/usr/sbin/nologin",from="{cidrs}" {key}'
        assert line.count("permitopen") == 1  # permitopen="none" is invalid and voids the key
    if hub.multi_host:  # each host's block is named; the single-host form renders as it always did
        assert [ln for ln in text.splitlines() if ln.startswith("# tunnel host ")] == [
            "# tunnel host ams-tunnel-01 (onprem.tunnel_hosts[0])", "# tunnel host ams-tunnel-02 (onprem.tunnel_hosts[1])"]
    else:
        assert "# tunnel host" not in text and len(text.splitlines()) == 6


def test_authorized_keys_of_two_hosts_with_their_own_ranges_and_one_without_keys():
    hub = load_hubs(azure_hub(onprem={"source_cidrs": ["192.168.10.0/24"], "tunnel_hosts": [
        {"name": "dc1", "public_keys": [TUNNEL_KEY]},
        {"name": "dc2", "public_keys": [SECOND_TUNNEL_KEY], "source_cidrs": ["192.168.10.128/25"]},
        {"name": "dc3"}]})).hubs[0]
    lines = D.tunnel_authorized_keys(hub).splitlines()[7:]
    assert lines == [
        "# tunnel host dc1 (onprem.tunnel_hosts[0])",
        'restrict,port-forwarding,permitlisten="localhost:13306",permitlisten="localhost:15432",'
        f'permitopen="127.0.0.1:8080",command="/usr/sbin/nologin",from="192.168.10.0/24" {TUNNEL_KEY}',
        "# tunnel host dc2 (onprem.tunnel_hosts[1])",
        'restrict,port-forwarding,permitlisten="localhost:14306",permitlisten="localhost:16432",'
        f'permitopen="127.0.0.1:8080",command="/usr/sbin/nologin",from="192.168.10.128/25" {SECOND_TUNNEL_KEY}',
        "# tunnel host dc3 (onprem.tunnel_hosts[2])",
        "# (no keys for tunnel host dc3 yet: add onprem.tunnel_hosts[2].public_keys and deploy again)"]
    assert D.permit_listen(hub) == [f"localhost:{p}" for p in (13306, 15432, 14306, 16432, 15306, 17432)]
    assert D.sshd_tunnel_forwarding(hub).endswith(
        "PermitListen localhost:13306 localhost:15432 localhost:14306 localhost:16432 localhost:15306 localhost:17432\n"
        "PermitOpen 127.0.0.1:8080\n")


def test_authorized_keys_without_tunnel_routes_or_keys():
    hub = load_hubs(aws_hub(
        routes=[{"name": "api", "kind": "forward", "port": 443, "target": "api.example.com:443"}],
        onprem={"source_cidrs": ["203.0.113.0/28", "198.51.100.0/24"], "tunnel_public_keys": [TUNNEL_KEY]},
        proxies={"admin_ssh_public_keys": [ADMIN_KEY]})).hubs[0]
    line = D.tunnel_authorized_keys(hub).splitlines()[-1]
    assert line == f'restrict,command="/usr/sbin/nologin",from="203.0.113.0/28,198.51.100.0/24" {TUNNEL_KEY}'
    assert D.sshd_tunnel_forwarding(hub).endswith("AllowTcpForwarding no\nPermitListen none\nPermitOpen none\n")
    empty = load_hubs(azure_hub(onprem={"source_cidrs": ["192.168.10.0/24"]})).hubs[0]
    assert [ln for ln in D.tunnel_authorized_keys(empty).splitlines() if not ln.startswith("#")] == []


def test_aws_key_pair_user_is_allowed_to_log_in():
    hub = load_hubs(aws_hub(aws={"key_pair_name": "breakglass"})).hubs[0]
    assert "AllowUsers tunnelhub tunnel ubuntu\n" in R.sshd_dropin(hub)


def test_sysctl_dropin():
    text = R.sysctl_conf()
    assert "net.ipv4.tcp_retries2 = 5" in text.splitlines()
    assert R.tcp_give_up_s(5) == pytest.approx(12.6)  # 0.2 s doubling 6 times: 0.2 + 0.4 + ... + 6.4


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("slot", "message"), [
    (None, r"hub weu is an azure hub: give the proxy's slot, 0 to 1 \(proxies.count is 2\); got None"),
    (2, r"give the proxy's slot, 0 to 1 .* got 2"),
    (-1, r"got -1"),
    (True, r"got True"),
])
def test_azure_slot_errors(slot, message):
    with pytest.raises(UserDataError, match=message):
        render_cloud_init(load_spec(EXAMPLE).hub("weu"), slot)


def test_aws_refuses_a_slot():
    with pytest.raises(UserDataError, match="hub use is an aws hub: its proxies share one launch template"):
        render_cloud_init(load_spec(EXAMPLE).hub("use"), 0)


# ---------------------------------------------------------------------------------- YAML embedding


@pytest.mark.parametrize("text", ["a\n", "a", "a\n\n\n", "a\n\n  b\n\tc\n", "# x: y\n- z\n'q'\n", "é ünïcode\n"])
def test_literal_block_round_trips(text):
    doc = "content: " + R.literal_block(text, 2) + "\n"
    assert yaml.safe_load(doc)["content"] == text


@pytest.mark.parametrize("text", [" leading space\n", "\nleading newline\n", "bell\x07\n", "cr\r\n"])
def test_literal_block_refuses_what_it_cannot_carry(text):
    with pytest.raises(UserDataError):
        R.literal_block(text, 2)


# ---------------------------------------------------------------------------------- compaction


@pytest.mark.parametrize("name", sorted(p.name for p in FILES.glob("*.py")))
def test_compaction_keeps_every_vm_script_equivalent(name):
    source = (FILES / name).read_text()
    compacted = compact_python(source, name)  # raises unless the syntax tree and lines are unchanged
    assert compacted.startswith("#!/usr/bin/env python3\n")
    assert '"""' not in compacted and len(compacted) < len(source)


def test_compaction_refuses_a_file_that_reads_its_docstring():
    with pytest.raises(CompactError, match="reads __doc__"):
        compact_python('"""usage"""\nprint(__doc__)\n', "x.py")


def test_compaction_keeps_a_lone_docstring_body_valid():
    out = compact_python('def f():\n    """only a docstring"""\n\n\nclass C:  # c\n    "doc"\n    x = 1  # one\n')
    assert out == "def f():\n    ...\n\n\nclass C:\n\n    x = 1\n"


def test_a_large_aws_hub_still_fits(tmp_path):
    """16 routes, 6 tunnel keys, 3 admin keys, 2 source ranges: still under AWS's 16 KB (the routes
    and tunnel keys are not in it any more: only the admin keys weigh), and the document fits Azure's
    user data too."""
    keys = []
    for i in range(6):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / f"k{i}")], check=True)
        keys.append((tmp_path / f"k{i}.pub").read_text().strip())
    routes = [{"name": f"db{i}", "kind": "tunnel", "port": 3000 + i, "target": f"db{i}.corp.example:3306",
               "type": "mysql"} for i in range(14)]
    routes += [{"name": "aoai", "kind": "forward", "port": 443, "target": "contoso-aoai.openai.azure.com:443"},
               {"name": "api", "kind": "forward", "port": 8443, "target": "api.example.com:443"}]
    hub = load_hubs(aws_hub(routes=routes, proxies={"admin_ssh_public_keys": keys[:3]},
                            onprem={"source_cidrs": ["203.0.113.0/28", "198.51.100.0/24"],
                                    "tunnel_public_keys": keys})).hubs[0]
    ud = render_cloud_init(hub, None)
    print(f"large aws hub: {len(ud.cloud_config.encode())} bytes plain, {ud.size_bytes} gzip, "
          f"compacted={ud.scripts_compacted}")
    assert ud.size_bytes <= 16384 and len(files_of(ud)) == 12 and len(ud.s3_objects) == 2
    document = D.render_document(hub)
    print(f"large aws hub: document {len(document.text)} bytes, {len(document.azure_user_data())} as Azure user data")
    assert len(document.azure_user_data()) <= D.AZURE_USER_DATA_LIMIT_BYTES  # gzip when the plain text does not fit


@pytest.mark.parametrize(("hub", "slot", "ud"), EXAMPLES, ids=EXAMPLE_IDS)
def test_reconciler_unit_and_haproxy_dropin(hub, slot, ud):
    files = files_of(ud)
    unit = files["/etc/systemd/system/tunnelhub-reconcile.service"].content.splitlines()
    assert ("ExecStart=/usr/bin/python3 /usr/local/lib/tunnelhub/tunnelhub_reconcile.py "
            "--config /etc/tunnelhub/reconcile.json") in unit
    for line in ("Restart=always", "StartLimitIntervalSec=0", "NoNewPrivileges=yes", "ProtectHome=yes",
                 "RuntimeDirectory=tunnelhub", "RuntimeDirectoryPreserve=yes", "StateDirectory=tunnelhub",
                 "WantedBy=multi-user.target"):
        assert line in unit, line
    dropin = files["/etc/systemd/system/haproxy.service.d/10-tunnelhub.conf"].content.splitlines()
    both = "-f /etc/haproxy/haproxy.cfg -f /etc/haproxy/tunnelhub-routes.cfg"
    assert dropin[dropin.index("ExecStart=") + 1] == (
        f"ExecStart=/usr/sbin/haproxy -Ws {both} -p /run/haproxy.pid -S /run/haproxy-master.sock")
    assert f"ExecReload=/usr/sbin/haproxy -Ws -c -q {both}" in dropin
    assert "ExecReload=/bin/kill -USR2 $MAINPID" in dropin
    config = json.loads(files["/etc/tunnelhub/reconcile.json"].content)
    assert config["source"]["type"] == ("azure-imds" if hub.cloud == "azure" else "aws-s3")
    assert config["commands"]["haproxy_reload"] == ["systemctl", "reload-or-restart", "haproxy.service"]
    assert (config["slot"], config["slot_file"]) == ((slot, None) if hub.cloud == "azure" else (None, "/etc/tunnelhub/slot"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_reconciler_unit_passes_systemd_analyze(tmp_path):
    ud = render_cloud_init(load_spec(EXAMPLE).hub("weu"), 0)
    text = files_of(ud)["/etc/systemd/system/tunnelhub-reconcile.service"].content
    unit = tmp_path / "tunnelhub-reconcile.service"
    unit.write_text(text)

    def problems(path: Path) -> list[str]:
        done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True,
                              timeout=60)
        return [ln for ln in (done.stdout + done.stderr).splitlines()
                if "tunnelhub-reconcile.service" in ln and "tunnelhub_reconcile.py" not in ln]

    assert problems(unit) == []
    unit.write_text(text.replace("Restart=always", "Restart=sometimes"))  # negative control
    assert problems(unit)
