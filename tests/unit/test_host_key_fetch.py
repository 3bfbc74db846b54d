"""The host key fetch step (files/tunnelhub_fetch_host_key.py) against local fakes of Azure's
instance metadata and Key Vault, and against moto's SSM with signature checking on; its SigV4
signer against botocore's for the same inputs."""

from __future__ import annotations

import datetime
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_userdata_fakes import FakeCloud, instance_role_credentials, moto_aws

FILES = Path(__file__).resolve().parents[2] / "tunnelhub" / "userdata" / "files"
SCRIPT = FILES / "tunnelhub_fetch_host_key.py"
sys.path.insert(0, str(FILES))

import tunnelhub_fetch_host_key as fetch  # noqa: E402

ENV = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin")
SECRET_URL = "https://tunnelhub-weu-kv.vault.azure.net/secrets/ssh-host-ed25519-key"


# ---------------------------------------------------------------------------------- SigV4


@pytest.fixture
def frozen_botocore(monkeypatch):
    import botocore.auth

    now = datetime.datetime(2026, 3, 1, 12, 34, 56)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: now)
    return now.replace(tzinfo=datetime.UTC)


def _botocore_authorization(auth_cls, service: str, url: str, method: str, body: bytes,
                            headers: dict[str, str]) -> dict:
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    auth_cls(Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "session/token+="),
             service, "eu-west-1").add_auth(request)
    return {k.lower(): v for k, v in request.headers.items()}


@pytest.mark.parametrize("case", ["ssm-https", "ssm-local", "s3-http-path-style", "s3-key-with-spaces"])
def test_sigv4_matches_botocore(frozen_botocore, case):
    from botocore.auth import S3SigV4Auth, SigV4Auth

    if case.startswith("ssm"):
        url = "https://ssm.eu-west-1.amazonaws.com/" if case == "ssm-https" else "http://127.0.0.1:5123/"
        body = json.dumps({"Name": "/tunnelhub/weu/k", "WithDecryption": True}).encode()
        method, service, auth_cls = "POST", "ssm", SigV4Auth
        headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "AmazonSSM.GetParameter"}
    else:
        key = "proxy/abc/tunnelhub_health.py" if case == "s3-http-path-style" else "proxy/a b+c/x.py"
        quoted = fetch.urllib.parse.quote(key, safe="/-_.~")
        url = "http://127.0.0.1:5123/tunnelhub-use-123456789012-eu-west-1/" + quoted
        method, body, service, auth_cls = "GET", b"", "s3", S3SigV4Auth
        headers = {"x-amz-content-sha256": fetch.hashlib.sha256(b"").hexdigest()}
    ours = fetch.sigv4_headers(method=method, url=url, region="eu-west-1", service=service, body=body,
                               headers=headers, access_key="AKIDEXAMPLE",
                               secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                               session_token="session/token+=", now=frozen_botocore)
    theirs = _botocore_authorization(auth_cls, service, url, method, body, headers)
    assert ours["authorization"] == theirs["authorization"]
    assert ours["x-amz-date"] == theirs["x-amz-date"] == "20260301T123456Z"


def test_sigv4_comparison_can_fail(frozen_botocore):
    """Negative control: one changed byte of the body gives another signature."""
    from botocore.auth import SigV4Auth

    args = dict(method="POST", url="https://ssm.eu-west-1.amazonaws.com/", region="eu-west-1", service="ssm",
                headers={"X-Amz-Target": "AmazonSSM.GetParameter"}, access_key="AKIDEXAMPLE",
                secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", session_token="session/token+=",
                now=frozen_botocore)
    theirs = _botocore_authorization(SigV4Auth, "ssm", args["url"], "POST", b'{"a": 1}', args["headers"])
    assert fetch.sigv4_headers(body=b'{"a": 2}', **args)["authorization"] != theirs["authorization"]


# ---------------------------------------------------------------------------------- helpers


def host_key(tmp_path: Path, kind: str = "ed25519") -> str:
    path = tmp_path / f"source-{kind}"
    args = ["-t", kind] + (["-b", "3072"] if kind == "rsa" else [])
    subprocess.run(["ssh-keygen", "-q", *args, "-N", "", "-C", "", "-f", str(path)], check=True)
    return path.read_text()


@pytest.fixture
def target(tmp_path):
    """Where the script installs the key, and an sshd config that includes its drop-in."""
    etc = tmp_path / "etc-ssh"
    (etc / "sshd_config.d").mkdir(parents=True)
    config = etc / "sshd_config"
    config.write_text(f"Include {etc}/sshd_config.d/*.conf\nPidFile {tmp_path}/sshd.pid\nUsePAM no\n")
    return {"key": etc / "tunnelhub_host_ed25519_key", "dropin": etc / "sshd_config.d" / "05-tunnelhub-host-key.conf",
            "config": config, "status": tmp_path / "run" / "tunnelhub" / "host-key.json"}


def run_fetch(target, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--key-path", str(target["key"]), "--dropin-path",
         str(target["dropin"]), "--sshd-config", str(target["config"]), "--no-restart",
         "--status-file", str(target["status"])],
        capture_output=True, text=True, timeout=timeout_s, env=ENV)


def assert_installed(target, private_key: str, output: str) -> None:
    key = target["key"]
    assert key.read_text() == private_key
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_uid == 0
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True)
    assert Path(f"{key}.pub").read_text().split()[:2] == derived.stdout.split()[:2]
    assert stat.S_IMODE(Path(f"{key}.pub").stat().st_mode) == 0o644
    assert target["dropin"].read_text().splitlines()[-1] == f"HostKey {key}"
    effective = subprocess.run(["sshd", "-T", "-f", str(target["config"])], capture_output=True, text=True,
                               env=ENV, timeout=30)
    assert [ln for ln in effective.stdout.splitlines() if ln.startswith("hostkey ")] == [f"hostkey {key}"]
    body = "".join(private_key.splitlines()[1:-1])
    assert body[:40] not in output and "PRIVATE KEY" not in output  # never logged
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", f"{key}.pub"], capture_output=True, text=True).stdout
    assert fingerprint.split()[1] in output


# ---------------------------------------------------------------------------------- Azure


def test_azure_keyvault(tmp_path, target):
    private_key = host_key(tmp_path)
    with FakeCloud() as cloud:
        cloud.azure_tags = [{"name": "env", "value": "x"}, {"name": "tunnelhub-host-key-secret", "value": SECRET_URL}]
        cloud.secrets["ssh-host-ed25519-key"] = private_key
        done = run_fetch(target, "--source", "azure-keyvault", "--imds-url", cloud.url, "--vault-url", cloud.url)
        assert done.returncode == 0, done.stdout + done.stderr
        assert cloud.token_resources == ["https://vault.azure.net"]
    assert_installed(target, private_key, done.stdout + done.stderr)
    assert "installed the hub host key SHA256:" in done.stdout


def test_azure_keyvault_retries_while_access_propagates(tmp_path, target):
    private_key = host_key(tmp_path)
    with FakeCloud() as cloud:
        cloud.azure_tags = [{"name": "tunnelhub-host-key-secret", "value": SECRET_URL}]
        cloud.secrets["ssh-host-ed25519-key"] = private_key
        cloud.vault_failures = 1
        started = time.monotonic()
        done = run_fetch(target, "--source", "azure-keyvault", "--imds-url", cloud.url, "--vault-url", cloud.url)
        elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout
    assert "attempt 1 failed, retrying in 2 s" in done.stdout and "HTTP 403" in done.stdout
    assert "Caller is not authorized" in done.stdout
    assert 2 <= elapsed < 20
    assert_installed(target, private_key, done.stdout)
    status = json.loads(target["status"].read_text())
    assert (status["state"], status["attempt"], status["source"]) == ("installed", 2, "azure-keyvault")
    assert stat.S_IMODE(target["status"].stat().st_mode) == 0o644  # the health daemon (DynamicUser) reads it


def test_the_status_file_records_each_failed_attempt_for_the_health_endpoint(target):
    """What the health endpoint quotes while tunnels cannot reach the proxy: the state (fetching,
    retrying, failed), the attempt and the error of the last one; never key material."""
    with FakeCloud() as cloud:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--source", "azure-keyvault", "--imds-url", cloud.url, "--timeout-s", "4",
             "--key-path", str(target["key"]), "--dropin-path", str(target["dropin"]), "--sshd-config",
             str(target["config"]), "--no-restart", "--status-file", str(target["status"])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        deadline = time.monotonic() + 10
        while not (target["status"].exists() and json.loads(target["status"].read_text())["state"] == "retrying"):
            assert time.monotonic() < deadline, "no 'retrying' record"
            time.sleep(0.05)
        retrying = json.loads(target["status"].read_text())
        output, _ = process.communicate(timeout=30)
    assert retrying["attempt"] == 1 and "the VM has no tag tunnelhub-host-key-secret" in retrying["error"]
    assert retrying["retry_in_s"] == 2
    final = json.loads(target["status"].read_text())
    assert process.returncode == 1 and final["state"] == "failed" and final["attempt"] >= 2, output


def test_azure_missing_tag_fails_after_the_deadline(target):
    with FakeCloud() as cloud:
        started = time.monotonic()
        done = run_fetch(target, "--source", "azure-keyvault", "--imds-url", cloud.url, "--timeout-s", "3")
        elapsed = time.monotonic() - started
    assert done.returncode == 1
    assert "FAILED after" in done.stdout and "the VM has no tag tunnelhub-host-key-secret" in done.stdout
    assert elapsed < 15
    assert not target["key"].exists() and not target["dropin"].exists()


@pytest.mark.parametrize(("tag", "secret", "message"), [
    ("https://evil.example.com/secrets/x", "k", "is not a Key Vault secret URL"),
    (SECRET_URL, "not a key", "not an OpenSSH private key"),
    (SECRET_URL, "rsa", "not an unencrypted ed25519 private key"),
])
def test_azure_wrong_content_fails_at_once(tmp_path, target, tag, secret, message):
    with FakeCloud() as cloud:
        cloud.azure_tags = [{"name": "tunnelhub-host-key-secret", "value": tag}]
        cloud.secrets["ssh-host-ed25519-key"] = host_key(tmp_path, "rsa") if secret == "rsa" else secret
        started = time.monotonic()
        done = run_fetch(target, "--source", "azure-keyvault", "--imds-url", cloud.url, "--vault-url", cloud.url)
    assert done.returncode == 2 and message in done.stdout
    assert time.monotonic() - started < 10  # no retries for content that will not change by waiting
    assert not target["key"].exists() and not target["dropin"].exists()


# ---------------------------------------------------------------------------------- AWS SSM (moto)

PARAMETER = "/tunnelhub/use/ssh-host-ed25519-key"
# moto checks actions against resource "*" only, so the policies name actions, not parameters.
SSM_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "ssm:GetParameter",
                                                      "Resource": "*"}]}


@pytest.mark.parametrize("credentials", ["instance-profile", "wrong-secret", "no-permission"])
def test_aws_ssm_with_signature_checks(tmp_path, target, monkeypatch, credentials):
    private_key = host_key(tmp_path)
    with moto_aws(monkeypatch) as aws, FakeCloud() as cloud:
        aws.client("ssm").put_parameter(Name=PARAMETER, Value=private_key, Type="SecureString")
        policy = SSM_POLICY if credentials != "no-permission" else {
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "ssm:PutParameter",
                                                    "Resource": "*"}]}
        cloud.credentials = instance_role_credentials(aws, policy)
        if credentials == "wrong-secret":
            secret = cloud.credentials["SecretAccessKey"]
            cloud.credentials["SecretAccessKey"] = ("y" if secret[0] == "x" else "x") + secret[1:]  # always another secret
        aws.enforce()
        done = run_fetch(target, "--source", "aws-ssm", "--parameter", PARAMETER, "--imds-url", cloud.url,
                         "--ssm-endpoint", aws.url, "--timeout-s", "3" if credentials != "instance-profile" else "60")
    if credentials == "instance-profile":
        assert done.returncode == 0, done.stdout + done.stderr
        assert_installed(target, private_key, done.stdout + done.stderr)
        assert ("PUT", "/latest/api/token") in cloud.requests  # IMDSv2
    else:
        assert done.returncode == 1
        expected = "SignatureDoesNotMatch" if credentials == "wrong-secret" else "AccessDenied"
        assert expected in done.stdout, done.stdout
        assert not target["key"].exists()


def test_aws_needs_the_parameter_name(target):
    done = run_fetch(target, "--source", "aws-ssm")
    assert done.returncode == 2 and "--source aws-ssm needs --parameter" in done.stderr
