"""AWS: the files kept in the hub's S3 bucket (files/tunnelhub_fetch_files.py), fetched from moto's
S3 with signature and permission checks on, with the user data's rendered boot.json."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_userdata_fakes import FakeCloud, instance_role_credentials, moto_aws
from tunnelhub.spec import load_spec
from tunnelhub.userdata import extract_files, files_bucket_name, render_cloud_init

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tunnelhub" / "userdata" / "files" / "tunnelhub_fetch_files.py"
S3_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]}


@pytest.fixture
def rendered(tmp_path):
    """The example AWS hub's user data, its boot.json pointed at a temporary root, with its first
    bucket file only (the health daemon; the reconciler is fetched the same way)."""
    user_data = render_cloud_init(load_spec(ROOT / "examples" / "hubs.yaml").hub("use"), None)
    obj = user_data.s3_objects[0]
    assert obj.path.endswith("/tunnelhub_health.py")
    boot = json.loads(next(f.content for f in extract_files(user_data.cloud_config)
                            if f.path == "/etc/tunnelhub/boot.json"))
    target = tmp_path / "root" / obj.path.lstrip("/")
    boot["remote_files"] = boot["remote_files"][:1]
    boot["remote_files"][0]["path"] = str(target)
    config = tmp_path / "boot.json"
    config.write_text(json.dumps(boot))
    return obj, config, target


def run_fetch(config: Path, cloud, aws, timeout_s: str = "60") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(config), "--imds-url", cloud.url,
                           "--s3-endpoint", aws.url, "--timeout-s", timeout_s],
                          capture_output=True, text=True, timeout=120)


def upload(aws, obj, content: bytes | None = None) -> str:
    bucket = files_bucket_name("use", "123456789012", "us-east-1")
    s3 = aws.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=obj.key, Body=obj.content if content is None else content)
    return bucket


def test_fetches_the_pinned_file_once(rendered, monkeypatch):
    obj, config, target = rendered
    with moto_aws(monkeypatch) as aws, FakeCloud() as cloud:
        bucket = upload(aws, obj)
        cloud.credentials = instance_role_credentials(aws, S3_POLICY)
        aws.enforce()
        done = run_fetch(config, cloud, aws)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"from s3://{bucket}/{obj.key}" in done.stdout
        assert target.read_bytes() == obj.content
        assert stat.S_IMODE(target.stat().st_mode) == 0o755
        again = run_fetch(config, cloud, aws)
    assert again.returncode == 0 and "0 file(s) fetched, 1 already in place" in again.stdout


def test_a_different_object_is_refused_at_once(rendered, monkeypatch):
    obj, config, target = rendered
    with moto_aws(monkeypatch) as aws, FakeCloud() as cloud:
        upload(aws, obj, b"print('something else')\n")
        cloud.credentials = instance_role_credentials(aws, S3_POLICY)
        aws.enforce()
        done = run_fetch(config, cloud, aws)
    assert done.returncode == 2
    assert f"this user data pins {obj.sha256}" in done.stdout and "deploy the hub stack again" in done.stdout
    assert not target.exists()


@pytest.mark.parametrize("problem", ["missing-object", "wrong-secret", "no-permission"])
def test_failures_are_retried_then_reported(rendered, monkeypatch, problem):
    obj, config, target = rendered
    with moto_aws(monkeypatch) as aws, FakeCloud() as cloud:
        if problem != "missing-object":
            upload(aws, obj)
        else:
            aws.client("s3").create_bucket(Bucket=files_bucket_name("use", "123456789012", "us-east-1"))
        policy = S3_POLICY if problem != "no-permission" else {
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:PutObject", "Resource": "*"}]}
        cloud.credentials = instance_role_credentials(aws, policy)
        if problem == "wrong-secret":
            secret = cloud.credentials["SecretAccessKey"]
            cloud.credentials["SecretAccessKey"] = ("y" if secret[0] == "x" else "x") + secret[1:]  # always another secret
        aws.enforce()
        done = run_fetch(config, cloud, aws, timeout_s="3")
    assert done.returncode == 1
    assert "attempt 1 failed, retrying in 2 s" in done.stdout and "FAILED after" in done.stdout
    expected = {"missing-object": "NoSuchKey", "wrong-secret": "SignatureDoesNotMatch",
                "no-permission": "AccessDenied"}[problem]
    assert expected in done.stdout
    assert not target.exists()
