"""Local fakes of the cloud endpoints the proxy's boot scripts talk to, and checks of the fakes.

:class:`FakeCloud` is one loopback HTTP server playing the AWS instance metadata service (IMDSv2:
token, identity document, instance profile credentials, instance tags, public IPv4, interface
addresses), the Azure instance metadata service (tagsList, the VM's user data, managed identity
tokens) and an Azure
Key Vault (secrets, bearer token checked). State is plain dicts the tests change while a script
runs; every request is recorded. :func:`moto_aws` starts moto's real SSM/S3/IAM/STS server with
signature checking on, for the signed requests.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

AWS_TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
AWS_TOKEN_HEADER = "X-aws-ec2-metadata-token"


class FakeCloud:
    """IMDS (AWS and Azure) and Key Vault on 127.0.0.1; ``url`` is its base URL."""

    def __init__(self) -> None:
        # AWS
        self.region = "us-east-1"
        self.account = "123456789012"
        self.role = "tunnelhub-proxy"
        self.credentials: dict[str, str] = {"AccessKeyId": "AKIAFAKE", "SecretAccessKey": "secret",
                                            "Token": "session-token"}
        self.instance_tags: dict[str, str] = {}
        self.meta: dict[str, str] = {"mac": "0a:00:00:00:00:01"}
        self.local_ipv4s: list[str] = ["10.70.0.10"]
        self.imds_tokens: set[str] = set()
        # Azure
        self.azure_tags: list[dict[str, str]] = []
        self.azure_user_data = ""  # base64 text, as IMDS serves compute/userData
        self.vault_token = "kv-token"
        self.secrets: dict[str, str] = {}
        self.vault_failures = 0  # answer 403 this many times first (RBAC still propagating)
        self.token_resources: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeCloud:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def later(self, seconds: float, change) -> threading.Timer:
        """Run ``change()`` after ``seconds`` (the lifecycle Lambda acting while the instance boots)."""
        timer = threading.Timer(seconds, change)
        timer.daemon = True
        timer.start()
        return timer

    # -- request handling ------------------------------------------------------------------

    def _handler(self):
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: str | bytes = b"", content_type: str = "text/plain") -> None:
                data = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                cloud.requests.append(("PUT", self.path))
                if self.path == "/latest/api/token" and self.headers.get(AWS_TOKEN_TTL_HEADER):
                    token = f"imds-token-{len(cloud.imds_tokens)}"
                    cloud.imds_tokens.add(token)
                    return self._send(200, token)
                return self._send(400, "bad token request")

            def do_GET(self) -> None:
                cloud.requests.append(("GET", self.path))
                path, _, query = self.path.partition("?")
                params = dict(urllib.parse.parse_qsl(query))
                if path.startswith("/latest/"):
                    return self._aws(path)
                if path.startswith("/metadata/"):
                    return self._azure(path, params)
                if path.startswith("/secrets/"):
                    return self._vault(path, params)
                return self._send(404, "not found")

            def _aws(self, path: str) -> None:
                if self.headers.get(AWS_TOKEN_HEADER) not in cloud.imds_tokens:
                    return self._send(401, "")
                with cloud._lock:
                    meta = dict(cloud.meta)
                    tags = dict(cloud.instance_tags)
                mac = meta.get("mac", "")
                values = {
                    "/latest/meta-data/placement/region": cloud.region,
                    "/latest/meta-data/iam/security-credentials/": cloud.role,
                    f"/latest/meta-data/iam/security-credentials/{cloud.role}": json.dumps(
                        {"Code": "Success", "Type": "AWS-HMAC", **cloud.credentials}),
                    "/latest/dynamic/instance-identity/document": json.dumps(
                        {"accountId": cloud.account, "region": cloud.region, "instanceId": "i-0123456789abcdef0"}),
                    f"/latest/meta-data/network/interfaces/macs/{mac}/local-ipv4s": "\n".join(cloud.local_ipv4s),
                    "/latest/meta-data/tags/instance": "\n".join(tags),
                }
                values.update({f"/latest/meta-data/{k}": v for k, v in meta.items()})
                values.update({f"/latest/meta-data/tags/instance/{k}": v for k, v in tags.items()})
                value = values.get(urllib.parse.unquote(path))
                return self._send(200, value) if value is not None else self._send(404, "")

            def _azure(self, path: str, params: dict[str, str]) -> None:
                if self.headers.get("Metadata") != "true" or "api-version" not in params:
                    return self._send(400, json.dumps({"error": "Bad request: Metadata header or api-version"}))
                if path == "/metadata/instance/compute/tagsList":
                    return self._send(200, json.dumps(cloud.azure_tags), "application/json")
                if path == "/metadata/instance/compute/userData" and params.get("format") == "text":
                    return self._send(200, cloud.azure_user_data)
                if path == "/metadata/identity/oauth2/token":
                    cloud.token_resources.append(params.get("resource", ""))
                    if params.get("resource") != "https://vault.azure.net":
                        return self._send(400, json.dumps({"error": "invalid_resource"}))
                    return self._send(200, json.dumps({"access_token": cloud.vault_token, "token_type": "Bearer"}))
                return self._send(404, "")

            def _vault(self, path: str, params: dict[str, str]) -> None:
                if self.headers.get("Authorization") != f"Bearer {cloud.vault_token}":
                    return self._send(401, json.dumps({"error": {"code": "Unauthorized"}}))
                if params.get("api-version") != "7.4":
                    return self._send(400, json.dumps({"error": {"code": "BadParameter"}}))
                with cloud._lock:
                    if cloud.vault_failures > 0:
                        cloud.vault_failures -= 1
                        return self._send(403, json.dumps({"error": {
                            "code": "Forbidden", "message": "Caller is not authorized to perform action"}}))
                name = path.split("/")[2]
                if name not in cloud.secrets:
                    return self._send(404, json.dumps({"error": {"code": "SecretNotFound"}}))
                return self._send(200, json.dumps({"value": cloud.secrets[name], "id": path}), "application/json")

        return Handler


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_aws(monkeypatch):
    """moto's server (SSM, S3, IAM, STS) on loopback; yields (endpoint, boto3 session factory).

    Call ``enforce()`` on the yielded object once set up: from then on moto checks every request's
    SigV4 signature and the caller's IAM policy, as AWS does.
    """
    import boto3
    from moto import settings
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its accounts in process-wide state: start every test from an empty cloud.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).read()

    class Aws:
        url = endpoint

        @staticmethod
        def client(service: str, **creds: str):
            return boto3.client(service, region_name="us-east-1", endpoint_url=endpoint,
                                aws_access_key_id=creds.get("key", "testing"),
                                aws_secret_access_key=creds.get("secret", "testing"),
                                aws_session_token=creds.get("token"))

        @staticmethod
        def enforce() -> None:
            monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)

    try:
        yield Aws
    finally:
        monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
        server.stop()


def instance_role_credentials(aws, policy: dict) -> dict[str, str]:
    """An instance-profile-like role in moto with ``policy``; its temporary credentials (IMDS form)."""
    iam = aws.client("iam")
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                                     "Action": "sts:AssumeRole"}]}
    role = iam.create_role(RoleName="tunnelhub-proxy", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    iam.put_role_policy(RoleName="tunnelhub-proxy", PolicyName="proxy", PolicyDocument=json.dumps(policy))
    creds = aws.client("sts").assume_role(RoleArn=role["Arn"], RoleSessionName="i-0123")["Credentials"]
    return {"AccessKeyId": creds["AccessKeyId"], "SecretAccessKey": creds["SecretAccessKey"],
            "Token": creds["SessionToken"]}


# ---------------------------------------------------------------------------------- the fakes


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_fake_aws_imds_requires_a_token_and_answers_like_imds():
    with FakeCloud() as cloud:
        assert _get(f"{cloud.url}/latest/meta-data/placement/region")[0] == 401
        status, token = _get(f"{cloud.url}/latest/api/token", {AWS_TOKEN_TTL_HEADER: "60"}, "PUT")
        assert status == 200
        auth = {AWS_TOKEN_HEADER: token}
        assert _get(f"{cloud.url}/latest/meta-data/placement/region", auth) == (200, "us-east-1")
        assert _get(f"{cloud.url}/latest/meta-data/tags/instance/tunnelhub:slot", auth)[0] == 404
        cloud.instance_tags["tunnelhub:slot"] = "1"
        assert _get(f"{cloud.url}/latest/meta-data/tags/instance/tunnelhub:slot", auth) == (200, "1")
        doc = json.loads(_get(f"{cloud.url}/latest/dynamic/instance-identity/document", auth)[1])
        assert doc["accountId"] == "123456789012"


def test_fake_azure_imds_and_key_vault():
    with FakeCloud() as cloud:
        cloud.secrets["hostkey"] = "value"
        base = f"{cloud.url}/metadata/identity/oauth2/token?api-version=2018-02-01&resource="
        assert _get(base + "https%3A%2F%2Fvault.azure.net")[0] == 400  # no Metadata header
        status, body = _get(base + "https%3A%2F%2Fvault.azure.net", {"Metadata": "true"})
        token = json.loads(body)["access_token"]
        assert _get(f"{cloud.url}/secrets/hostkey?api-version=7.4")[0] == 401
        assert json.loads(_get(f"{cloud.url}/secrets/hostkey?api-version=7.4",
                               {"Authorization": f"Bearer {token}"})[1])["value"] == "value"
        cloud.vault_failures = 1
        assert _get(f"{cloud.url}/secrets/hostkey?api-version=7.4", {"Authorization": f"Bearer {token}"})[0] == 403
