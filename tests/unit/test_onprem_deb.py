"""The built .deb: packaging metadata, lintian, systemd's verdict on the units, reproducibility, CLI.

GIVEN the two example hubs and the example stack outputs (what `make synth` builds)
WHEN their packages are built
THEN they are proper Debian packages (control, conffiles, md5sums, owners, modes), lintian reports
nothing but the one justified override, systemd-analyze accepts every unit, the ssh options parse
with the real ssh, the maintainer scripts pass shellcheck, and a rebuild is byte-identical.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import EXAMPLE_SPEC, ROOT
from tunnelhub import __version__ as TOOL_VERSION
from tunnelhub.cli import main
from tunnelhub.onprem import OnpremError, build_deb, deb_file, read_outputs
from tunnelhub.onprem.unitfile import exec_start_words, expand, read_env_file, unit_environment
from tunnelhub.spec import load_spec

EXAMPLE_OUTPUTS = ROOT / "examples" / "outputs.json"
EPOCH = 1_747_700_000
needs = pytest.mark.skipif


def tool(name: str) -> bool:
    return shutil.which(name) is not None


@pytest.fixture(scope="module")
def spec():
    return load_spec(EXAMPLE_SPEC)


WEU = "weu/ams-tunnel-01"
WEU2 = "weu/ams-tunnel-02"
"""The example hub weu has two tunnel hosts: one package each (use is in the single-host form)."""


def label(hub, host: str | None) -> str:
    return hub.name if not hub.multi_host else f"{hub.name}/{host}"


@pytest.fixture(scope="module")
def built(spec, tmp_path_factory):
    """The three example packages (weu's two tunnel hosts, use's one) in one directory, built as
    `make synth` builds them: {"weu/<host>" or "use": DebBuild}."""
    out = tmp_path_factory.mktemp("dist")
    return {
        label(hub, h.name): build_deb(hub, read_outputs(EXAMPLE_OUTPUTS, hub.stack_name), out,
                                      tunnel_host=h.name, source_date_epoch=EPOCH)
        for hub in spec.hubs for h in hub.tunnel_hosts
    }


@pytest.fixture(scope="module")
def extracted(built, tmp_path_factory):
    """Each package unpacked: {label: (data root, control dir)}."""
    roots = {}
    for key, deb in built.items():
        base = tmp_path_factory.mktemp(f"x-{key.replace('/', '-')}")
        subprocess.run(["dpkg-deb", "-x", str(deb.path), str(base / "root")], check=True)
        subprocess.run(["dpkg-deb", "-e", str(deb.path), str(base / "DEBIAN")], check=True)
        roots[key] = (base / "root", base / "DEBIAN")
    return roots


def members(deb: Path) -> list[tarfile.TarInfo]:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers()


def control_fields(deb: Path) -> dict[str, str]:
    text = subprocess.run(["dpkg-deb", "-f", str(deb)], check=True, capture_output=True, text=True).stdout
    return dict(re.findall(r"^([A-Za-z-]+): (.*)$", text, re.MULTILINE))


# --------------------------------------------------------------------------------------------
# Packaging
# --------------------------------------------------------------------------------------------


def test_file_names_and_control_fields(built):
    for deb in built.values():
        hub = deb.plan.hub
        assert deb.path.name == f"tunnelhub-{hub}_{deb.version}_all.deb"
        fields = control_fields(deb.path)
        assert fields["Package"] == f"tunnelhub-{hub}" and fields["Version"] == deb.version
        assert fields["Architecture"] == "all" and fields["Section"] == "net" and fields["Priority"] == "optional"
        depends = [d.split()[0] for d in fields["Depends"].split(", ")]
        assert {"autossh", "openssh-client", "systemd"} <= set(depends)
        assert int(fields["Installed-Size"]) >= sum(len(f.data) for f in deb.files) // 1024
        assert fields["Description"].startswith(f"reverse SSH tunnels from this host to tunnelhub hub {hub}")


def test_conffiles_are_exactly_the_files_under_etc(built):
    for deb in built.values():
        hub = deb.plan.hub
        conffiles = deb_file(deb.path, "DEBIAN/conffiles").decode().splitlines()
        etc = sorted(m.name.lstrip(".") for m in members(deb.path) if m.isfile() and m.name.startswith("./etc/"))
        assert conffiles == etc
        assert conffiles == [f"/etc/tunnelhub/{hub}/known_hosts", f"/etc/tunnelhub/{hub}/slot-0.env",
                             f"/etc/tunnelhub/{hub}/slot-1.env", f"/etc/tunnelhub/{hub}/ssh_config"]


def test_md5sums_cover_every_file_and_match(built):
    for deb in built.values():
        sums = dict(reversed(line.split("  ", 1)) for line in deb_file(deb.path, "DEBIAN/md5sums").decode().splitlines())
        files = {m.name[2:]: m for m in members(deb.path) if m.isfile()}
        assert sorted(sums) == sorted(files)
        for name in files:
            assert hashlib.md5(deb_file(deb.path, "/" + name)).hexdigest() == sums[name], name


def test_entries_are_root_owned_dated_and_moded(built):
    for deb in built.values():
        hub = deb.plan.hub
        entries = members(deb.path)
        assert [m.name for m in entries] == sorted(m.name for m in entries), "sorted entries"
        for m in entries:
            assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "root", "root"), m.name
            assert m.mtime == EPOCH, m.name
            executables = (f"./usr/bin/tunnelhub-{hub}-pubkey", f"./usr/bin/tunnelhub-{hub}-status",
                           f"./usr/libexec/tunnelhub-{hub}/quickack-route")
            expected = 0o755 if m.isdir() or m.name in executables else 0o644
            assert m.mode == expected, (m.name, oct(m.mode))


def test_no_private_key_is_ever_shipped(built):
    for deb in built.values():
        for m in members(deb.path):
            assert "id_ed25519" not in m.name
            if m.isfile():
                assert b"PRIVATE KEY" not in deb_file(deb.path, m.name[1:]), m.name


def test_rebuilds_are_byte_identical(spec, built, tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "Pacific/Auckland")
    old = os.umask(0o077)
    try:
        for hub in spec.hubs:
            for h in hub.tunnel_hosts:
                again = build_deb(hub, read_outputs(EXAMPLE_OUTPUTS, hub.stack_name), tmp_path, tunnel_host=h.name,
                                  source_date_epoch=EPOCH)
                assert again.path.read_bytes() == built[label(hub, h.name)].path.read_bytes()
    finally:
        os.umask(old)


def test_a_later_build_of_another_spec_is_another_newer_package(spec, built, tmp_path):
    weu = spec.hub("weu")
    routes = [r.model_dump(mode="json", exclude_none=True) for r in weu.routes][:1]
    changed = weu.model_copy(update={"routes": [type(weu.routes[0]).model_validate(r) for r in routes]})
    later = build_deb(changed, read_outputs(EXAMPLE_OUTPUTS, weu.stack_name), tmp_path, tunnel_host="ams-tunnel-01",
                      source_date_epoch=EPOCH + 60)
    assert later.path.read_bytes() != built[WEU].path.read_bytes()
    assert subprocess.run(["dpkg", "--compare-versions", later.version, "gt", built[WEU].version],
                          check=False).returncode == 0


def test_explicit_version_names_the_file(spec, tmp_path):
    use = spec.hub("use")
    deb = build_deb(use, read_outputs(EXAMPLE_OUTPUTS, use.stack_name), tmp_path, version="2:1.4-3",
                    source_date_epoch=EPOCH)
    assert deb.path.name == "tunnelhub-use_1.4-3_all.deb" and control_fields(deb.path)["Version"] == "2:1.4-3"


def test_each_tunnel_host_has_its_own_version_and_file_in_one_directory(spec, built, tmp_path):
    """One package name, tunnelhub-weu, on every tunnel host (the same units, commands and paths),
    so the version carries the host: +<host> ends its upstream part, by default and with
    --version, and both hosts' files sit side by side in one directory."""
    assert built[WEU].path.parent == built[WEU2].path.parent and built[WEU].path != built[WEU2].path
    for key, host in ((WEU, "ams-tunnel-01"), (WEU2, "ams-tunnel-02")):
        assert re.fullmatch(rf"{re.escape(TOOL_VERSION)}\+\d{{8}}\.\d{{6}}\.[0-9a-f]{{8}}\+{host}-1",
                            built[key].version), built[key].version
        assert control_fields(built[key].path)["Package"] == "tunnelhub-weu"
    weu = spec.hub("weu")
    names = set()
    for host in ("ams-tunnel-01", "ams-tunnel-02"):
        deb = build_deb(weu, read_outputs(EXAMPLE_OUTPUTS, weu.stack_name), tmp_path, tunnel_host=host,
                        version="2:1.4-3", source_date_epoch=EPOCH)
        assert control_fields(deb.path)["Version"] == f"2:1.4+{host}-3"
        assert subprocess.run(["dpkg", "--validate-version", deb.version], check=False).returncode == 0
        names.add(deb.path.name)
    assert names == {"tunnelhub-weu_1.4+ams-tunnel-01-3_all.deb", "tunnelhub-weu_1.4+ams-tunnel-02-3_all.deb"}
    with pytest.raises(OnpremError, match=r"--version '1.4' has no revision, so dpkg would read the part after the "
                                          r"hyphen of tunnel host 'ams-tunnel-01' .* for example 1.4-1"):
        build_deb(weu, read_outputs(EXAMPLE_OUTPUTS, weu.stack_name), tmp_path, tunnel_host="ams-tunnel-01",
                  version="1.4", source_date_epoch=EPOCH)


def test_each_tunnel_hosts_package_forwards_its_own_ports_and_names_its_host(built, extracted):
    for key, host, k, ports in ((WEU, "ams-tunnel-01", 0, (13306, 15432)), (WEU2, "ams-tunnel-02", 1, (14306, 16432))):
        root, control = extracted[key]
        words = exec_start_words((root / "lib/systemd/system/tunnelhub-weu@.service").read_text())
        assert [words[i + 1] for i, w in enumerate(words) if w == "-R"] == [
            f"localhost:{ports[0]}:orders-db.corp.example:3306", f"localhost:{ports[1]}:192.168.20.15:5432"]
        postinst = (control / "postinst").read_text()
        assert f"-> onprem.tunnel_hosts[{k}].public_keys (the host named {host})" in postinst
        assert "onprem.tunnel_public_keys" not in postinst
        readme = (root / "usr/share/doc/tunnelhub-weu/README").read_text()
        assert f"Tunnel host: {host} (onprem.tunnel_hosts[{k}] of hub weu)" in readme
        assert f"under onprem.tunnel_hosts[{k}].public_keys (tunnel host {host})" in readme
        description = subprocess.run(["dpkg-deb", "-f", str(built[key].path), "Description"], capture_output=True,
                                     text=True, check=True).stdout.replace("\n ", " ")
        assert f"This is the package of tunnel host {host} (onprem.tunnel_hosts[{k}])" in description
        pubkey = (root / "usr/bin/tunnelhub-weu-pubkey").read_text()
        assert f"onprem.tunnel_hosts[{k}].public_keys (tunnel host {host}), then deploy" in pubkey
        status = (root / "usr/bin/tunnelhub-weu-status").read_text()
        assert f'"tunnel_host": "{host}"' in status and f'"tunnel_port": {ports[0]}' in status
    use_root, use_control = extracted["use"]
    assert "-> onprem.tunnel_public_keys, then deploy" in (use_control / "postinst").read_text()
    assert "Tunnel host" not in (use_root / "usr/share/doc/tunnelhub-use/README").read_text()
    assert "tunnel_host" not in (use_root / "usr/bin/tunnelhub-use-status").read_text()


def test_a_hub_with_several_tunnel_hosts_needs_one_named(spec, tmp_path):
    weu = spec.hub("weu")
    with pytest.raises(OnpremError, match=r"hub 'weu' has 2 tunnel hosts \(ams-tunnel-01, ams-tunnel-02\): each gets "
                                          r"its own package .* choose one with --tunnel-host NAME"):
        build_deb(weu, read_outputs(EXAMPLE_OUTPUTS, weu.stack_name), tmp_path, source_date_epoch=EPOCH)
    with pytest.raises(OnpremError, match=r"hub 'weu' has no tunnel host 'ams-tunnel-03'; its tunnel hosts: "
                                          r"ams-tunnel-01, ams-tunnel-02"):
        build_deb(weu, read_outputs(EXAMPLE_OUTPUTS, weu.stack_name), tmp_path, tunnel_host="ams-tunnel-03",
                  source_date_epoch=EPOCH)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_build_leaves_nothing_behind(spec, built, tmp_path, monkeypatch):
    target = tmp_path / built[WEU].path.name
    target.write_bytes(b"the previous package")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dpkg-deb").write_text('#!/bin/sh\ncase "$1" in --help) exit 0;; esac\necho "disk full" >&2\nexit 2\n')
    (fake / "dpkg-deb").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    weu = spec.hub("weu")
    with pytest.raises(OnpremError, match="dpkg-deb failed to build .*: disk full"):
        build_deb(weu, read_outputs(EXAMPLE_OUTPUTS, weu.stack_name), tmp_path, tunnel_host="ams-tunnel-01",
                  source_date_epoch=EPOCH)
    assert target.read_bytes() == b"the previous package", "the old file is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bin", target.name]), "no partial file"


# --------------------------------------------------------------------------------------------
# Lintian, shellcheck, systemd, ssh
# --------------------------------------------------------------------------------------------


@needs(not tool("lintian"), reason="needs lintian (make test installs it)")
def test_lintian_reports_nothing_but_the_justified_override(built):
    result = subprocess.run(
        ["lintian", "--pedantic", "--display-info", "--display-experimental", "--show-overrides",
         *(str(d.path) for d in built.values())],
        capture_output=True, text=True, check=False,
    )
    tags = [line for line in result.stdout.splitlines() if re.match(r"^[EWIPXO]: ", line)]
    print("\n".join(tags))
    assert [t for t in tags if not t.startswith("O: ")] == [], result.stdout
    assert sorted(t.split()[2] for t in tags) == ["initial-upload-closes-no-bugs"] * 3
    overrides = deb_file(built[WEU].path, "/usr/share/lintian/overrides/tunnelhub-weu").decode()
    for line in overrides.splitlines():
        if line.startswith("tunnelhub-weu:"):
            before = overrides[: overrides.index(line)].rstrip("\n").splitlines()
            assert before and before[-1].startswith("# "), f"override without a reason: {line}"


@needs(not tool("shellcheck"), reason="needs shellcheck (make test installs it)")
def test_shell_scripts_pass_shellcheck(extracted):
    for key, (root, control) in extracted.items():
        hub = key.split("/")[0]
        scripts = [control / "postinst", control / "prerm", control / "postrm", root / f"usr/bin/tunnelhub-{hub}-pubkey"]
        result = subprocess.run(["shellcheck", "--shell=sh", "--severity=style", *map(str, scripts)],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout


def verify_units(root: Path, *units: str, manpath: Path | None = None) -> subprocess.CompletedProcess:
    """systemd-analyze verify without systemd running: the units come from the unpacked package
    (SYSTEMD_UNIT_PATH, the trailing ':' keeps the system's own units) and the documentation they
    name must resolve (MANPATH)."""
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{root}/lib/systemd/system:"}
    env["MANPATH"] = str(manpath if manpath is not None else root / "usr/share/man")
    return subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, env=env, check=False)


@needs(not tool("systemd-analyze"), reason="needs systemd (make test installs it)")
def test_systemd_analyze_verify_accepts_every_unit(extracted):
    for key, (root, _) in extracted.items():
        hub = key.split("/")[0]
        result = verify_units(root, f"tunnelhub-{hub}.target", f"tunnelhub-{hub}@0.service", f"tunnelhub-{hub}@1.service")
        assert result.returncode == 0 and "tunnelhub" not in result.stderr, result.stderr


@needs(not tool("systemd-analyze"), reason="needs systemd (make test installs it)")
@pytest.mark.parametrize("change, complaint", [
    (lambda u: u.replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes"), "Unknown key 'ProtectHomes'"),
    (lambda u: u.replace("RestartSec=2", "RestartSec=soon"), "Failed to parse sec value"),
    (lambda u: u.replace("/usr/bin/autossh", "/usr/bin/autossh-missing"), "is not executable"),
    (lambda u: u.replace("man:tunnelhub-weu-pubkey(1)", "man:tunnelhub-weu-nopage(1)"), "man tunnelhub-weu-nopage(1)"),
    # the quick-ACK helper lines are parsed too (their "-" prefix skips only the existence check)
    (lambda u: u.replace("ExecStartPre=-+/usr/libexec", "ExecStartPre=-+usr/libexec"), "Neither a valid executable"),
])
def test_systemd_analyze_verify_really_checks(extracted, tmp_path, change, complaint):
    root, _ = extracted[WEU]
    broken = tmp_path / "root"
    shutil.copytree(root, broken)
    unit = broken / "lib/systemd/system/tunnelhub-weu@.service"
    unit.write_text(change(unit.read_text()))
    result = verify_units(broken, "tunnelhub-weu@0.service")
    assert complaint in result.stderr, result.stderr


@needs(not tool("systemd-analyze"), reason="needs systemd (make test installs it)")
def test_unit_hardening_exposure(extracted):
    root, _ = extracted[WEU]
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "tunnelhub-weu@0.service"],
                            capture_output=True, text=True, check=False,
                            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{root}/lib/systemd/system:"})
    exposure = float(re.search(r"Overall exposure level for tunnelhub-weu@0.service: ([\d.]+)", result.stdout)[1])
    print(f"systemd-analyze security exposure: {exposure} (0 = fully sandboxed, 10 = unprotected)")
    assert exposure <= 1.5


def test_units_carry_the_restart_and_timing_policy(extracted):
    root, _ = extracted[WEU]
    unit = (root / "lib/systemd/system/tunnelhub-weu@.service").read_text()
    for line in ["Restart=always", "RestartSec=2", "StartLimitIntervalSec=0", "After=network-online.target",
                 "Wants=network-online.target", "User=tunnelhub-weu", "Environment=AUTOSSH_GATETIME=0 AUTOSSH_POLL=10",
                 "EnvironmentFile=/etc/tunnelhub/weu/slot-%i.env", "PartOf=tunnelhub-weu.target",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                 "CapabilityBoundingSet="]:
        assert line in unit.splitlines(), line
    assert "ReadWritePaths" not in unit, "a pinned package writes nothing"
    target = (root / "lib/systemd/system/tunnelhub-weu.target").read_text()
    assert "Wants=tunnelhub-weu@0.service tunnelhub-weu@1.service" in target
    assert "WantedBy=multi-user.target" in target


def test_a_stopped_tunnel_is_inactive_not_failed(extracted):
    """``systemctl stop`` sends autossh SIGTERM, and autossh 1.4g (Debian 12) answers it with exit
    status 1: booted for real (tests/boot, test_b03), every stopped tunnel unit and the target's
    instances ended "failed" and the tunnel host "degraded". Status 1 counts as a clean exit; the
    unit still restarts after any exit (Restart=always), so nothing else changes."""
    root, _ = extracted[WEU]
    unit = (root / "lib/systemd/system/tunnelhub-weu@.service").read_text().splitlines()
    assert "SuccessExitStatus=1" in unit
    assert "Restart=always" in unit


def test_exec_start_is_self_contained(built, extracted):
    root, _ = extracted[WEU]
    unit = (root / "lib/systemd/system/tunnelhub-weu@.service").read_text()
    words = exec_start_words(unit)
    assert words[:6] == ["/usr/bin/autossh", "-M", "0", "-N", "-F", "/etc/tunnelhub/weu/ssh_config"]
    assert [words[i + 1] for i, w in enumerate(words) if w == "-R"] == [
        "localhost:13306:orders-db.corp.example:3306", "localhost:15432:192.168.20.15:5432"]
    for slot, endpoint in enumerate(built[WEU].plan.endpoints):
        env = {**unit_environment(unit), **read_env_file((root / f"etc/tunnelhub/weu/slot-{slot}.env").read_text())}
        assert expand(words, env)[-1] == endpoint
        assert env["AUTOSSH_GATETIME"] == "0" and env["AUTOSSH_POLL"] == "10"


@needs(not tool("ssh"), reason="needs openssh-client")
def test_ssh_reads_the_options_file(extracted):
    root, _ = extracted[WEU]
    config = root / "etc/tunnelhub/weu/ssh_config"
    result = subprocess.run(["ssh", "-G", "-F", str(config), "10.60.0.5"], capture_output=True, text=True, check=True)
    effective = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    expected = {
        "user": "tunnel", "port": "22", "hostkeyalias": "tunnelhub-weu", "stricthostkeychecking": "true",
        "userknownhostsfile": "/etc/tunnelhub/weu/known_hosts", "globalknownhostsfile": "none",
        "checkhostip": "no", "batchmode": "yes", "identitiesonly": "yes", "exitonforwardfailure": "yes",
        "serveraliveinterval": "5", "serveralivecountmax": "3", "connecttimeout": "10",
        "identityfile": "/var/lib/tunnelhub-weu/id_ed25519", "hostkeyalgorithms": "ssh-ed25519",
        "updatehostkeys": "false", "clearallforwardings": "no",
    }
    assert {k: effective.get(k) for k in expected} == expected


@needs(not tool("ssh-keygen"), reason="needs openssh-client")
def test_known_hosts_pins_the_hub_key_under_its_alias(extracted):
    root, _ = extracted[WEU]
    known_hosts = root / "etc/tunnelhub/weu/known_hosts"
    found = subprocess.run(["ssh-keygen", "-F", "tunnelhub-weu", "-f", str(known_hosts)],
                           capture_output=True, text=True, check=False)
    assert found.returncode == 0
    expected = json.loads(EXAMPLE_OUTPUTS.read_text())["weu-azure"]["host_public_key"].split()[:2]
    assert found.stdout.splitlines()[-1].split()[1:] == expected
    assert subprocess.run(["ssh-keygen", "-F", "10.60.0.5", "-f", str(known_hosts)], check=False,
                          capture_output=True).returncode != 0, "looked up by the alias only"


def test_trust_on_first_use_package(spec, tmp_path):
    deb = build_deb(spec.hub("weu"), None, tmp_path, tunnel_host="ams-tunnel-02", trust_on_first_use=True,
                    source_date_epoch=EPOCH)
    names = [m.name for m in members(deb.path)]
    assert "./etc/tunnelhub/weu/known_hosts" not in names
    config = deb_file(deb.path, "/etc/tunnelhub/weu/ssh_config").decode()
    assert "StrictHostKeyChecking accept-new" in config
    assert "UserKnownHostsFile /var/lib/tunnelhub-weu/known_hosts" in config
    unit = deb_file(deb.path, "/lib/systemd/system/tunnelhub-weu@.service").decode()
    assert "ReadWritePaths=/var/lib/tunnelhub-weu" in unit
    assert "WARNING" in deb_file(deb.path, "DEBIAN/postinst").decode()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env={"SOURCE_DATE_EPOCH": str(EPOCH), **(env or {})})


def test_cli_builds_the_example_package(built, tmp_path):
    result = run("onprem", "build-deb", str(EXAMPLE_SPEC), "--hub", "use", "--outputs", str(EXAMPLE_OUTPUTS),
                 "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert f"built {tmp_path / built['use'].path.name}" in result.output
    assert "slot 0: 198.51.100.10" in result.output and "hub host key pinned: SHA256:" in result.output
    assert (tmp_path / built["use"].path.name).read_bytes() == built["use"].path.read_bytes()


def test_cli_builds_one_package_per_tunnel_host(built, tmp_path):
    one = run("onprem", "build-deb", str(EXAMPLE_SPEC), "--hub", "weu", "--tunnel-host", "ams-tunnel-02",
              "--outputs", str(EXAMPLE_OUTPUTS), "--out", str(tmp_path / "one"))
    assert one.exit_code == 0, one.output
    assert "tunnel host ams-tunnel-02: its key goes under onprem.tunnel_hosts[1].public_keys" in one.output
    assert "tunnel orders-mysql: -R localhost:14306:orders-db.corp.example:3306" in one.output
    assert [p.name for p in (tmp_path / "one").iterdir()] == [built[WEU2].path.name]
    every = run("onprem", "build-deb", str(EXAMPLE_SPEC), "--hub", "weu", "--all-tunnel-hosts",
                "--outputs", str(EXAMPLE_OUTPUTS), "--out", str(tmp_path / "all"))
    assert every.exit_code == 0, every.output
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted([built[WEU].path.name, built[WEU2].path.name])
    for key in (WEU, WEU2):
        assert (tmp_path / "all" / built[key].path.name).read_bytes() == built[key].path.read_bytes()
    single = run("onprem", "build-deb", str(EXAMPLE_SPEC), "--hub", "use", "--all-tunnel-hosts",
                 "--outputs", str(EXAMPLE_OUTPUTS), "--out", str(tmp_path / "use"))
    assert single.exit_code == 0 and [p.name for p in (tmp_path / "use").iterdir()] == [built["use"].path.name]


def test_cli_trust_on_first_use_says_so_loudly(tmp_path):
    result = run("onprem", "build-deb", str(EXAMPLE_SPEC), "--hub", "weu", "--tunnel-host", "ams-tunnel-01",
                 "--trust-on-first-use", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "WARNING: --trust-on-first-use: the hub host key is NOT pinned" in result.output
    assert "hub host key NOT pinned" in result.output


@pytest.mark.parametrize("args, code, fragment", [
    (["--hub", "use"], 1, "pass --outputs FILE, written by `cdktf output use-aws --outputs-file FILE`"),
    (["--hub", "weu", "--tunnel-host", "ams-tunnel-01"], 1, "or --trust-on-first-use"),
    (["--hub", "weu", "--all-tunnel-hosts"], 1, "or --trust-on-first-use"),
    (["--hub", "weu", "--tunnel-host", "ams-tunnel-01", "--outputs", "missing.json"], 1,
     "outputs file missing.json does not exist"),
    (["--hub", "nope"], 2, "no hub named 'nope'; hubs in this spec: weu, use"),
    ([], 2, "the spec has several hubs (weu, use): choose one with --hub NAME"),
    (["--hub", "weu", "--tunnel-host", "ams-tunnel-01", "--trust-on-first-use", "--version", "v1"], 1,
     "--version 'v1' is not a Debian version"),
    (["--hub", "weu", "--trust-on-first-use"], 2, "hub weu has 2 tunnel hosts (ams-tunnel-01, ams-tunnel-02), one "
     "package each: choose one with --tunnel-host NAME, or build them all with --all-tunnel-hosts"),
    (["--hub", "weu", "--trust-on-first-use", "--tunnel-host", "dc9"], 2,
     "hub weu has no tunnel host named 'dc9'; its tunnel hosts: ams-tunnel-01, ams-tunnel-02"),
    (["--hub", "use", "--trust-on-first-use", "--tunnel-host", "dc9"], 2,
     "hub use has no tunnel host named 'dc9'; its tunnel hosts: tunnel-host"),
    (["--hub", "weu", "--trust-on-first-use", "--tunnel-host", "ams-tunnel-01", "--all-tunnel-hosts"], 2,
     "give --tunnel-host NAME or --all-tunnel-hosts, not both"),
])
def test_cli_errors_are_one_clear_message(tmp_path, args, code, fragment):
    result = run("onprem", "build-deb", str(EXAMPLE_SPEC), *args, "--out", str(tmp_path))
    assert result.exit_code == code
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*.deb"))


def test_make_synth_builds_every_example_package():
    """One package per tunnel host of each example hub: weu's two, use's one."""
    result = subprocess.run(["make", "-n", "synth", "VENV=.venv"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "for hub in weu use; do" in result.stdout
    assert ("tunnelhub onprem build-deb examples/hubs.yaml --hub $hub --all-tunnel-hosts --outputs examples/outputs.json "
            "--out dist") in result.stdout
