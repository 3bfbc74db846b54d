#!/usr/bin/env python3
"""The cloud at boot, faked at the network edge: what the booted proxies' scripts talk to.

Run by the boot lab inside the gateway namespace (the proxies' default route), as its own process:

    python3 fakecloud.py --config cloud.json

- **Instance metadata at 169.254.169.254:80**, one instance per source address (the proxies reach
  it through their default route, as in the cloud):
  - Azure IMDS: ``/metadata/instance[/<path>]`` (``Metadata: true`` and ``api-version``
    required, ``format=text`` for leaves; ``compute/tagsList``, ``compute/userData``, the network),
    ``/metadata/identity/oauth2/token`` (the VM's system-assigned identity; a token per audience).
  - AWS IMDSv2: ``PUT /latest/api/token`` (TTL header required; the response leaves with the
    launch template's ``http_put_response_hop_limit`` as its IP TTL), then ``/latest/meta-data/...``
    and ``/latest/dynamic/instance-identity/document`` with the token (401 without, as
    ``http_tokens = "required"`` makes it); instance tags only when the launch template enables
    ``instance_metadata_tags``; the ENI's addresses, Elastic IP associations and public IPv4;
    the instance profile's role credentials (real STS credentials from moto).
- **Azure Key Vault over HTTPS** (``https://<vault>.vault.azure.net``): ``GET /secrets/<name>``
  with ``api-version``, a bearer token from this IMDS for ``https://vault.azure.net``, and the
  caller's role assignments from the stack (Key Vault Secrets User/Officer or Administrator on the
  secret, its vault or above): 401 without a token, 403 ``ForbiddenByRbac`` without a role.
- **AWS SSM, S3 (and IAM/STS/KMS for the setup) over HTTPS**: moto's server (its WSGI app under
  werkzeug, TLS), loaded from the stack (the SSM parameter, the files bucket's objects, the
  instance profile's role with the policy's actions) and then switched to checking every request's
  SigV4 signature and IAM permissions. moto evaluates actions against resource ``*`` only, so the
  role's policy keeps the stack's actions with ``Resource: *`` (a difference from AWS, stated).

The TLS certificates come from the lab's CA; the names resolve to these addresses through each
machine's ``/etc/hosts``. A control server on ``127.0.0.1`` (inside the same namespace) lets the
lab read every request, update what "terraform apply" of a changed stack updates in place (an
Azure VM's ``user_data``: ``POST /userdata``; an object of the hub bucket: ``POST /object``) and
refuse the Key Vault / SSM reads of one instance (``POST /refuse``):
Key Vault then answers 403 as RBAC does, and IMDS hands out credentials of a role without
``ssm:GetParameter``, so moto itself answers ``AccessDeniedException``.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import secrets
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

AZURE_AUDIENCES = ("https://vault.azure.net", "https://management.azure.com/", "https://management.azure.com")
VAULT_READ_ROLES = ("Key Vault Secrets User", "Key Vault Secrets Officer", "Key Vault Administrator")
DENIED_SUFFIX = "-lab-denied"


class Cloud:
    def __init__(self, config: dict):
        self.config = config
        self.instances: dict[str, dict] = {}
        for instance in config["instances"]:
            for address in instance["addresses"]:
                self.instances[address] = instance
        self.requests: list[dict] = []
        self.refused: dict[str, set[str]] = {}
        self.aws_tokens: dict[str, tuple[str, float]] = {}  # token -> (instance id, expires)
        self.azure_tokens: dict[str, str] = {}  # bearer token -> principal id
        self.role_credentials: dict[str, dict] = {}  # role name (or name + DENIED_SUFFIX) -> credentials
        self.lock = threading.Lock()
        self.s3_admin: Any = None  # an S3 client with an IAM user's credentials (writes after auth is on)

    def log(self, **entry: Any) -> None:
        entry["t"] = time.time()
        with self.lock:
            self.requests.append(entry)

    def is_refused(self, instance: dict, what: str) -> bool:
        with self.lock:
            return what in self.refused.get(instance["id"], set())


# ------------------------------------------------------------------------------------------------
# HTTP plumbing
# ------------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    cloud: Cloud
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def send(self, status: int, body: str | bytes | dict | list = b"", content_type: str = "text/plain",
             headers: dict[str, str] | None = None) -> None:
        if isinstance(body, (dict, list)):
            body, content_type = json.dumps(body), "application/json; charset=utf-8"
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
        self.cloud.log(server=self.server_name, src=self.client_address[0], method=self.command,
                       host=self.headers.get("Host", ""), path=self.path.split("?")[0], status=status)

    server_name = "?"


class ImdsHandler(Handler):
    server_name = "imds"

    def instance(self) -> dict | None:
        return self.cloud.instances.get(self.client_address[0])

    def do_PUT(self) -> None:  # noqa: N802
        instance = self.instance()
        if instance is None or instance["cloud"] != "aws":
            return self.send(404, "")
        if self.path != "/latest/api/token":
            return self.send(405, "")
        try:
            ttl = int(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
        except ValueError:
            return self.send(400, "")
        if not 1 <= ttl <= 21600:
            return self.send(400, "")
        if self.headers.get("X-Forwarded-For"):
            return self.send(403, "")  # IMDSv2 refuses proxied token requests
        token = secrets.token_urlsafe(32)
        with self.cloud.lock:
            self.cloud.aws_tokens[token] = (instance["id"], time.monotonic() + ttl)
        hop_limit = int(instance["aws"].get("hop_limit", 1))
        self.connection.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hop_limit)
        self.send(200, token, headers={"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)})
        self.connection.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)

    def do_GET(self) -> None:  # noqa: N802
        instance = self.instance()
        if instance is None:
            return self.send(404, "")
        path, _, query = self.path.partition("?")
        params = dict(urllib.parse.parse_qsl(query))
        if instance["cloud"] == "azure" and path.startswith("/metadata/"):
            return self.azure(instance, path, params)
        if instance["cloud"] == "aws" and path.startswith("/latest/"):
            return self.aws(instance, path)
        return self.send(404, "")

    # -- Azure ------------------------------------------------------------------------------

    def azure(self, instance: dict, path: str, params: dict[str, str]) -> None:
        if self.headers.get("Metadata") != "true":
            return self.send(400, {"error": "Bad request. Required metadata header not specified"})
        if "api-version" not in params:
            return self.send(400, {"error": "Bad request. api-version was not specified in the request"})
        if path == "/metadata/identity/oauth2/token":
            identity = instance["azure"].get("principal_id")
            if not identity:
                return self.send(400, {"error": "invalid_request", "error_description": "Identity not found"})
            resource = params.get("resource", "")
            if resource not in AZURE_AUDIENCES:
                return self.send(400, {"error": "invalid_resource",
                                       "error_description": f"AADSTS500011: resource {resource!r} not found"})
            token = f"lab.{secrets.token_urlsafe(24)}"
            with self.cloud.lock:
                self.cloud.azure_tokens[token] = identity
            now = int(time.time())
            return self.send(200, {"access_token": token, "expires_in": "86399", "expires_on": str(now + 86399),
                                   "not_before": str(now), "resource": resource, "token_type": "Bearer",
                                   "client_id": instance["azure"].get("client_id", identity)})
        if path == "/metadata/instance" or path.startswith("/metadata/instance/"):
            node: Any = {"compute": instance["azure"]["compute"], "network": instance["azure"]["network"]}
            for part in [p for p in path[len("/metadata/instance"):].split("/") if p]:
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    return self.send(404, {"error": "Not found"})
            if params.get("format") == "text":
                if isinstance(node, (dict, list)):
                    return self.send(400, {"error": "Bad request. format=text is for leaf values"})
                return self.send(200, str(node))
            return self.send(200, node)
        return self.send(404, {"error": "Not found"})

    # -- AWS --------------------------------------------------------------------------------

    def aws(self, instance: dict, path: str) -> None:
        token = self.headers.get("X-aws-ec2-metadata-token")
        with self.cloud.lock:
            owner = self.cloud.aws_tokens.get(token or "")
        valid = owner is not None and owner[0] == instance["id"] and owner[1] > time.monotonic()
        if instance["aws"].get("http_tokens", "required") == "required" and not valid:
            return self.send(401, "")
        if token is not None and not valid:
            return self.send(401, "")
        tree = aws_tree(self.cloud, instance)
        node: Any = tree
        for part in [p for p in path[len("/latest/"):].split("/") if p]:
            if not isinstance(node, dict) or part not in node:
                return self.send(404, "")
            node = node[part]
        if isinstance(node, dict):
            listing = "\n".join(f"{k}/" if isinstance(v, dict) else k for k, v in node.items())
            return self.send(200, listing)
        return self.send(200, node if isinstance(node, str) else json.dumps(node))


def aws_tree(cloud: Cloud, instance: dict) -> dict:
    aws = instance["aws"]
    eni = aws["eni"]
    mac = eni["mac"]
    associations = {public: private for public, private in eni.get("associations", {}).items()}
    role = aws["role"]
    credentials_key = role + (DENIED_SUFFIX if cloud.is_refused(instance, "ssm") else "")
    creds = cloud.role_credentials[credentials_key]
    meta: dict[str, Any] = {
        "ami-id": aws.get("ami_id", "ami-0lab"),
        "instance-id": instance["id"],
        "instance-type": aws.get("instance_type", "t3.small"),
        "local-ipv4": eni["primary"],
        "mac": mac,
        "hostname": f"ip-{eni['primary'].replace('.', '-')}.ec2.internal",
        "placement": {"region": aws["region"], "availability-zone": aws.get("zone", aws["region"] + "a")},
        "iam": {
            "info": json.dumps({"Code": "Success", "InstanceProfileArn": aws["instance_profile_arn"],
                                "InstanceProfileId": "AIPALAB"}),
            "security-credentials": {role: json.dumps({
                "Code": "Success", "LastUpdated": _iso(time.time()), "Type": "AWS-HMAC",
                "AccessKeyId": creds["AccessKeyId"], "SecretAccessKey": creds["SecretAccessKey"],
                "Token": creds["SessionToken"], "Expiration": creds["Expiration"]})},
        },
        "network": {"interfaces": {"macs": {mac: {
            "device-number": "0",
            "interface-id": eni.get("id", "eni-0lab"),
            "mac": mac,
            "local-ipv4s": "\n".join([eni["primary"], *eni.get("secondary", [])]),
            "subnet-ipv4-cidr-block": eni.get("subnet_cidr", ""),
            **({"public-ipv4s": "\n".join(associations),
                "ipv4-associations": dict(associations.items())} if associations else {}),
        }}}},
    }
    for public, private in associations.items():
        if private == eni["primary"]:
            meta["public-ipv4"] = public
    if aws.get("instance_metadata_tags") == "enabled":
        meta["tags"] = {"instance": dict(aws.get("tags", {}))}
    identity = {"accountId": aws["account"], "region": aws["region"], "instanceId": instance["id"],
                "instanceType": meta["instance-type"], "imageId": meta["ami-id"],
                "availabilityZone": meta["placement"]["availability-zone"], "privateIp": eni["primary"],
                "architecture": "x86_64", "version": "2017-09-30", "pendingTime": _iso(time.time())}
    return {"meta-data": meta, "dynamic": {"instance-identity": {"document": json.dumps(identity, indent=2)}}}


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class VaultHandler(Handler):
    server_name = "keyvault"

    def do_GET(self) -> None:  # noqa: N802
        host = (self.headers.get("Host") or "").split(":")[0]
        vault = host.split(".", 1)[0]
        path, _, query = self.path.partition("?")
        params = dict(urllib.parse.parse_qsl(query))
        vaults = self.cloud.config["azure"]["vaults"]
        if vault not in vaults or not host.endswith(".vault.azure.net"):
            return self.send(404, {"error": {"code": "VaultNotFound", "message": f"no vault at {host}"}})
        if not params.get("api-version"):
            return self.send(400, {"error": {"code": "BadParameter", "message": "api-version is required"}})
        auth = self.headers.get("Authorization", "")
        principal = self.cloud.azure_tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
        if principal is None:
            return self.send(401, {"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a "
                                             "Bearer or PoP token."}},
                             headers={"WWW-Authenticate": 'Bearer authorization="https://login.microsoftonline.com/'
                                      'lab", resource="https://vault.azure.net"'})
        parts = [p for p in path.split("/") if p]
        if len(parts) not in (2, 3) or parts[0] != "secrets":
            return self.send(404, {"error": {"code": "NotFound"}})
        secret = vaults[vault]["secrets"].get(parts[1])
        instance = next((i for i in self.cloud.instances.values()
                         if i["cloud"] == "azure" and i["azure"].get("principal_id") == principal), None)
        allowed = secret is not None and any(
            a["principal_id"] == principal and a["role"] in VAULT_READ_ROLES
            and (secret["arm_id"] == a["scope"] or secret["arm_id"].startswith(a["scope"].rstrip("/") + "/"))
            for a in self.cloud.config["azure"]["role_assignments"])
        if instance is not None and self.cloud.is_refused(instance, "keyvault"):
            allowed = False
        if not allowed:
            return self.send(403, {"error": {
                "code": "Forbidden",
                "message": f"Caller is not authorized to perform action on resource. Caller: ObjectId={principal}; "
                           "Action: 'Microsoft.KeyVault/vaults/secrets/getSecret/action'",
                "innererror": {"code": "ForbiddenByRbac"}}})
        return self.send(200, {"value": secret["value"], "contentType": secret.get("content_type"),
                               "id": f"https://{host}/secrets/{parts[1]}/{secret['version']}",
                               "attributes": {"enabled": True, "created": int(time.time()),
                                              "recoveryLevel": "Recoverable"}})


class ControlHandler(Handler):
    server_name = "control"

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/requests"):
            with self.cloud.lock:
                return self.send(200, list(self.cloud.requests))
        return self.send(404, "")

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        if self.path == "/refuse":
            with self.cloud.lock:
                wanted = self.cloud.refused.setdefault(body["instance"], set())
                if body.get("on", True):
                    wanted.add(body["what"])
                else:
                    wanted.discard(body["what"])
            return self.send(200, {"refused": {k: sorted(v) for k, v in self.cloud.refused.items()}})
        if self.path == "/userdata":  # Azure: the VM's user_data updated in place (no reboot, IMDS serves it)
            for instance in self.cloud.config["instances"]:
                if instance["id"] == body["instance"] and instance["cloud"] == "azure":
                    instance["azure"]["compute"]["userData"] = body["user_data"]
                    return self.send(200, {"updated": body["instance"]})
            return self.send(404, "")
        if self.path == "/object":  # AWS: an object of the hub bucket rewritten (a new ETag)
            if self.cloud.s3_admin is None:
                return self.send(404, "")
            self.cloud.s3_admin.put_object(Bucket=body["bucket"], Key=body["key"], Body=base64.b64decode(body["content"]))
            return self.send(200, {"updated": f"s3://{body['bucket']}/{body['key']}"})
        if self.path == "/tags":
            for instance in self.cloud.config["instances"]:
                if instance["id"] == body["instance"]:
                    instance["aws"].setdefault("tags", {}).update(body["tags"])
                    return self.send(200, instance["aws"]["tags"])
            return self.send(404, "")
        return self.send(404, "")


def serve(cloud: Cloud, handler: type[Handler], address: tuple[str, int], tls: ssl.SSLContext | None = None
          ) -> ThreadingHTTPServer:
    bound = type(handler.__name__, (handler,), {"cloud": cloud})
    server = ThreadingHTTPServer(address, bound)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name=handler.server_name, daemon=True).start()
    return server


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


# ------------------------------------------------------------------------------------------------
# AWS: moto, loaded from the stack
# ------------------------------------------------------------------------------------------------


def start_moto(cloud: Cloud, aws: dict) -> None:
    import boto3
    from moto import settings
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    public = make_server(aws["api_address"], 443, app, threaded=True,
                         ssl_context=server_tls(aws["cert"], aws["key"]))
    setup = make_server("127.0.0.1", 0, app, threaded=True)
    for server in (public, setup):
        threading.Thread(target=server.serve_forever, name="moto", daemon=True).start()
    endpoint = f"http://127.0.0.1:{setup.server_port}"

    def client(service: str):
        return boto3.client(service, region_name=aws["region"], endpoint_url=endpoint,
                            aws_access_key_id="lab-setup", aws_secret_access_key="lab-setup")

    iam, sts, kms, ssm, s3 = (client(s) for s in ("iam", "sts", "kms", "ssm", "s3"))
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                      "Principal": {"Service": "ec2.amazonaws.com"}}]}
    for role in aws["roles"]:
        for name, actions in ((role["name"], role["actions"]),
                              (role["name"] + DENIED_SUFFIX, [a for a in role["actions"] if a != "ssm:GetParameter"]
                               or ["ssm:DescribeParameters"])):
            arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
            iam.put_role_policy(RoleName=name, PolicyName="boot", PolicyDocument=json.dumps(policy))
            creds = sts.assume_role(RoleArn=arn, RoleSessionName="i-lab", DurationSeconds=43200)["Credentials"]
            cloud.role_credentials[role["name"] if name == role["name"] else name] = {
                "AccessKeyId": creds["AccessKeyId"], "SecretAccessKey": creds["SecretAccessKey"],
                "SessionToken": creds["SessionToken"], "Expiration": _iso(creds["Expiration"].timestamp())}
    key_id = kms.create_key(Description="tunnelhub lab: the host key parameter's key")["KeyMetadata"]["KeyId"]
    for parameter in aws["parameters"]:
        ssm.put_parameter(Name=parameter["name"], Value=parameter["value"], Type=parameter["type"],
                          **({"KeyId": key_id} if parameter["type"] == "SecureString" else {}))
    for bucket, objects in aws["buckets"].items():
        s3.create_bucket(Bucket=bucket)
        for key, content in objects.items():
            s3.put_object(Bucket=bucket, Key=key, Body=base64.b64decode(content))
    # The lab's own writes once signatures are checked ("terraform apply" of a changed object): an
    # IAM user allowed everything, as the deployer is.
    iam.create_user(UserName="lab-deployer")
    iam.put_user_policy(UserName="lab-deployer", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    deployer = iam.create_access_key(UserName="lab-deployer")["AccessKey"]
    cloud.s3_admin = boto3.client("s3", region_name=aws["region"], endpoint_url=endpoint,
                                  aws_access_key_id=deployer["AccessKeyId"],
                                  aws_secret_access_key=deployer["SecretAccessKey"])
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on: SigV4 signatures and IAM policies checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the boot lab's fake cloud")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as fh:
        config = json.load(fh)
    cloud = Cloud(config)
    servers = [serve(cloud, ImdsHandler, (config["imds_address"], 80)),
               serve(cloud, ControlHandler, ("127.0.0.1", config["control_port"]))]
    if config.get("azure"):
        azure = config["azure"]
        servers.append(serve(cloud, VaultHandler, (azure["api_address"], 443), server_tls(azure["cert"], azure["key"])))
    if config.get("aws"):
        start_moto(cloud, config["aws"])
    with open(config["ready_file"] + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()}\n")
    os.replace(config["ready_file"] + ".tmp", config["ready_file"])
    print(f"fake cloud ready: IMDS {config['imds_address']}, {len(cloud.instances)} instance address(es)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
