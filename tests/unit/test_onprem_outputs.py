"""Reading the hub stack outputs: cdktf outputs files and `terraform output -json`, and bad input."""

from __future__ import annotations

import json
import subprocess
from ipaddress import ip_address, ip_network

import pytest

from tests.conftest import EXAMPLE_SPEC
from tunnelhub.onprem import OnpremError, parse_outputs, read_outputs
from tunnelhub.onprem.outputs import parse_host_key
from tunnelhub.spec import load_spec

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOaN3cWyvjBGr4otYDaxEsCyHJdGDD93vvrXcCU/lvrx"
EXAMPLE_OUTPUTS = EXAMPLE_SPEC.parent / "outputs.json"


def write(tmp_path, data) -> str:
    path = tmp_path / "outputs.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_cdktf_format_picks_the_hub_stack_and_ignores_the_comment(tmp_path):
    path = write(tmp_path, {
        "//": "a comment",
        "other-aws": {"tunnel_endpoints": ["198.51.100.99"], "host_public_key": KEY},
        "weu-azure": {"tunnel_endpoints": ["10.60.0.5", "10.60.0.6"], "host_public_key": KEY + " a comment",
                      "lb_frontend_ip": "10.60.0.4"},
    })
    out = read_outputs(path, "weu-azure")
    assert out.tunnel_endpoints == ("10.60.0.5", "10.60.0.6")
    assert out.host_public_key == KEY, "the key's comment is dropped"
    assert out.source == f"{path} (stack weu-azure)"


def test_terraform_output_json_format(tmp_path):
    path = write(tmp_path, {
        "tunnel_endpoints": {"value": ["198.51.100.10", "198.51.100.11"], "type": ["list", "string"], "sensitive": False},
        "host_public_key": {"value": KEY, "type": "string", "sensitive": False},
        "nlb_dns_name": {"value": "x.elb.amazonaws.com", "type": "string", "sensitive": False},
    })
    out = read_outputs(path, "use-aws")
    assert out.tunnel_endpoints == ("198.51.100.10", "198.51.100.11") and out.host_public_key == KEY


def test_missing_outputs_are_none(tmp_path):
    out = read_outputs(write(tmp_path, {"weu-azure": {"lb_frontend_ip": "10.60.0.4"}}), "weu-azure")
    assert out.tunnel_endpoints is None and out.host_public_key is None


@pytest.mark.parametrize("data, fragment", [
    ({"use-aws": {"tunnel_endpoints": []}}, "has no stack 'weu-azure' (it has: use-aws); write it with `cdktf output weu-azure --outputs-file"),
    ({"//": "only a comment"}, "holds no outputs: deploy the hub, then write it with `cdktf output weu-azure"),
    ([1, 2], "expected a JSON object of outputs, got list"),
    ("{not json", "is not valid JSON (line 1"),
    ({"weu-azure": ["x"]}, "stack 'weu-azure' should map output names to values"),
    ({"weu-azure": {"tunnel_endpoints": "10.60.0.5"}}, "tunnel_endpoints must be a list of addresses"),
    ({"weu-azure": {"tunnel_endpoints": ["10.60.0.5", "-oProxyCommand=sh"]}}, "'-oProxyCommand=sh' is neither an IP address nor a host name"),
    ({"weu-azure": {"tunnel_endpoints": ["10.60.0.5\nX=1"]}}, "is neither an IP address nor a host name"),
    ({"weu-azure": {"host_public_key": 42}}, "host_public_key must be an OpenSSH public key line"),
    ({"weu-azure": {"host_public_key": "AAAAC3NzaC1lZDI1NTE5"}}, "not an OpenSSH public key line"),
    ({"weu-azure": {"host_public_key": "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ"}}, "the hub host key must be ssh-ed25519, got 'ssh-rsa'"),
    ({"weu-azure": {"host_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOaN3"}}, "the key's base64 body is damaged"),
    ({"weu-azure": {"host_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAAQ=="}}, "body is not a ssh-ed25519 public key"),
])
def test_bad_outputs_are_one_clear_error(tmp_path, data, fragment):
    with pytest.raises(OnpremError) as exc:
        read_outputs(write(tmp_path, data), "weu-azure")
    assert fragment in str(exc.value)


def test_a_missing_file_names_the_command_that_writes_it(tmp_path):
    with pytest.raises(OnpremError, match=r"does not exist: write it with `cdktf output use-aws --outputs-file"):
        read_outputs(tmp_path / "nope.json", "use-aws")


def test_fingerprint_matches_ssh_keygen(tmp_path):
    (tmp_path / "k.pub").write_text(KEY + "\n")
    listing = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "k.pub")], check=True,
                             capture_output=True, text=True).stdout
    assert listing.split()[1] == parse_host_key(KEY, "test").fingerprint


def test_the_example_outputs_file_is_marked_and_fits_the_example_spec():
    data = json.loads(EXAMPLE_OUTPUTS.read_text())
    assert "EXAMPLE" in data["//"]
    spec = load_spec(EXAMPLE_SPEC)
    weu = read_outputs(EXAMPLE_OUTPUTS, spec.hub("weu").stack_name)
    use = read_outputs(EXAMPLE_OUTPUTS, spec.hub("use").stack_name)
    assert weu.tunnel_endpoints == tuple(str(ip) for ip in spec.hub("weu").azure_addresses().proxy_ips)
    assert len(use.tunnel_endpoints) == spec.hub("use").proxies.count
    assert all(ip_address(ip) in ip_network("198.51.100.0/24") for ip in use.tunnel_endpoints), "documentation range"
    assert weu.host_public_key != use.host_public_key, "each hub has its own host key"
    for key in (weu.host_public_key, use.host_public_key):
        assert parse_host_key(key, "example").key_type == "ssh-ed25519"


def test_parse_outputs_takes_already_parsed_json():
    out = parse_outputs({"tunnel_endpoints": {"value": ["h1.example.net"], "type": "list"}}, "x", "inline")
    assert out.tunnel_endpoints == ("h1.example.net",) and out.source == "inline"
