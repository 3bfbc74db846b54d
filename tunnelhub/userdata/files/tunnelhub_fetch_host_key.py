#!/usr/bin/env python3
"""Install the hub's SSH host key from the cloud secret store, so every proxy of the hub (and
every replacement) shows the tunnel host the identity it pins in known_hosts.

    tunnelhub_fetch_host_key.py --source azure-keyvault
    tunnelhub_fetch_host_key.py --source aws-ssm --parameter /tunnelhub/<hub>/ssh-host-ed25519-key

azure-keyvault: the secret URL is the VM's own tag ``tunnelhub-host-key-secret`` (read from the
instance metadata service), the token comes from the VM's managed identity, the secret holds
the OpenSSH private key. aws-ssm: IMDSv2 gives the region and the instance profile's
credentials; a SigV4-signed SSM GetParameter (WithDecryption) returns the key.

The key is written 0600 root, its .pub derived with ssh-keygen, a drop-in points sshd's HostKey
at it only (the generated default keys are no longer offered), ``sshd -t`` checks the result and
sshd is restarted. Failures are retried with backoff until --timeout-s (managed identity role
assignments can take minutes to propagate); each attempt logs why it failed. The key never
appears in a log line. Stdlib only (Python 3.11+).
Progress goes to --status-file, which the health endpoint quotes for a tunnel route that is down.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

IMDS_URL = "http://169.254.169.254"
KEY_PATH = "/etc/ssh/tunnelhub_host_ed25519_key"
DROPIN_PATH = "/etc/ssh/sshd_config.d/05-tunnelhub-host-key.conf"
STATUS_PATH = "/run/tunnelhub/host-key.json"
SSHD_CONFIG = "/etc/ssh/sshd_config"
AZURE_TAG = "tunnelhub-host-key-secret"
KEYVAULT_API_VERSION = "7.4"
SECRET_URL_RE = re.compile(
    r"^https://[A-Za-z0-9-]{3,24}\.(vault\.azure\.net|vault\.azure\.cn|vault\.usgovcloudapi\.net)"
    r"/secrets/[A-Za-z0-9-]{1,127}(/[0-9a-fA-F]{32})?/?$"
)
HTTP_TIMEOUT_S = 10.0
# IMDS must never go through a proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(message: str) -> None:
    print(f"tunnelhub-host-key: {message}", flush=True)


class Retry(Exception):
    """A failure that may pass (network, permissions still propagating, secret not yet set)."""


class Fatal(Exception):
    """A failure that retrying cannot fix (the stored value is not an ed25519 private key)."""


def http(method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None,
         *, direct: bool = False) -> bytes:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    where = f"{method} {url.split('?')[0]}"
    try:
        opener = _DIRECT if direct else urllib.request.build_opener()
        with opener.open(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        detail = " ".join(exc.read(400).decode("utf-8", "replace").split())
        raise Retry(f"{where} answered HTTP {exc.code}: {detail or exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise Retry(f"{where} failed: {getattr(exc, 'reason', exc)}") from None


def json_field(raw: bytes, *path: str) -> str:
    try:
        value = json.loads(raw)
        for key in path:
            value = value[key]
    except (ValueError, KeyError, TypeError):
        raise Retry(f"unexpected answer (no {'.'.join(path)} field)") from None
    if not isinstance(value, str):
        raise Retry(f"unexpected answer ({'.'.join(path)} is not a string)")
    return value


# ---------------------------------------------------------------------------------------------
# Azure Key Vault
# ---------------------------------------------------------------------------------------------


def azure_secret_url(imds: str) -> str:
    raw = http("GET", f"{imds}/metadata/instance/compute/tagsList?api-version=2021-02-01",
               {"Metadata": "true"}, direct=True)
    try:
        tags = {t["name"]: t["value"] for t in json.loads(raw)}
    except (ValueError, KeyError, TypeError):
        raise Retry("the instance metadata tagsList answer is not a list of {name, value}") from None
    url = tags.get(AZURE_TAG)
    if not url:
        raise Retry(f"the VM has no tag {AZURE_TAG} (the hub stack sets it to the Key Vault secret URL)")
    if not SECRET_URL_RE.match(url):
        raise Fatal(f"tag {AZURE_TAG} = {url!r} is not a Key Vault secret URL "
                    "(https://<vault>.vault.azure.net/secrets/<name>)")
    return url.rstrip("/")


def fetch_azure(imds: str, vault_override: str | None) -> str:
    url = azure_secret_url(imds)
    parts = urllib.parse.urlsplit(url)
    resource = "https://" + parts.hostname.split(".", 1)[1]  # https://vault.azure.net
    token = json_field(http(
        "GET", f"{imds}/metadata/identity/oauth2/token?api-version=2018-02-01&resource="
        + urllib.parse.quote(resource, safe=""), {"Metadata": "true"}, direct=True), "access_token")
    if vault_override:  # tests: a local fake Key Vault
        url = vault_override.rstrip("/") + parts.path
    raw = http("GET", f"{url}?api-version={KEYVAULT_API_VERSION}", {"Authorization": f"Bearer {token}"})
    return json_field(raw, "value")


# ---------------------------------------------------------------------------------------------
# AWS SSM Parameter Store
# ---------------------------------------------------------------------------------------------


def sigv4_headers(*, method: str, url: str, region: str, service: str, body: bytes, headers: dict[str, str],
                  access_key: str, secret_key: str, session_token: str | None,
                  now: datetime.datetime) -> dict[str, str]:
    """Headers for an AWS Signature Version 4 request (``Authorization`` included)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port and parts.port != {"http": 80, "https": 443}.get(parts.scheme):
        host += f":{parts.port}"
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    out = {k.lower(): " ".join(v.split()) for k, v in headers.items()}
    out.update({"host": host, "x-amz-date": amz_date})
    if session_token:
        out["x-amz-security-token"] = session_token
    signed = ";".join(sorted(out))
    query = "&".join(sorted(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)))
    path = parts.path or "/"  # already URI-encoded once; S3 signs it as is, other services encode it again
    canonical = "\n".join([method, path if service == "s3" else urllib.parse.quote(path, safe="/~"), query,
                           "".join(f"{k}:{out[k]}\n" for k in sorted(out)), signed,
                           hashlib.sha256(body).hexdigest()])
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (amz_date[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                            f"SignedHeaders={signed}, Signature={signature}")
    return out


def aws_session(imds: str) -> dict[str, str]:
    """Region, account and the instance profile's temporary credentials, from IMDSv2."""
    token = http("PUT", f"{imds}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"},
                 direct=True).decode()
    meta = {"X-aws-ec2-metadata-token": token}
    identity = json.loads(http("GET", f"{imds}/latest/dynamic/instance-identity/document", meta, direct=True))
    roles = http("GET", f"{imds}/latest/meta-data/iam/security-credentials/", meta, direct=True).decode().split()
    if not roles:
        raise Retry("the instance has no instance profile role (the hub stack attaches one)")
    creds = json.loads(http("GET", f"{imds}/latest/meta-data/iam/security-credentials/{roles[0]}", meta,
                            direct=True))
    return {"region": identity["region"], "account": identity["accountId"], "access_key": creds["AccessKeyId"],
            "secret_key": creds["SecretAccessKey"], "token": creds.get("Token", "")}


def aws_request(session: dict[str, str], service: str, method: str, url: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> bytes:
    headers = dict(headers or {})
    if service == "s3":  # S3 wants the payload hash as a header (and signed)
        headers["x-amz-content-sha256"] = hashlib.sha256(body).hexdigest()
    signed = sigv4_headers(method=method, url=url, region=session["region"], service=service, body=body,
                           headers=headers, access_key=session["access_key"],
                           secret_key=session["secret_key"], session_token=session["token"] or None,
                           now=datetime.datetime.now(datetime.UTC))
    return http(method, url, signed, body if method != "GET" else None)


def aws_domain(region: str) -> str:
    return "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"


def fetch_aws(imds: str, parameter: str, ssm_endpoint: str | None) -> str:
    session = aws_session(imds)
    url = ssm_endpoint or f"https://ssm.{session['region']}.{aws_domain(session['region'])}/"
    body = json.dumps({"Name": parameter, "WithDecryption": True}).encode()
    raw = aws_request(session, "ssm", "POST", url, body, {"Content-Type": "application/x-amz-json-1.1",
                                                          "X-Amz-Target": "AmazonSSM.GetParameter"})
    return json_field(raw, "Parameter", "Value")


# ---------------------------------------------------------------------------------------------
# Installing the key
# ---------------------------------------------------------------------------------------------


def write_file(path: str, data: bytes, mode: int) -> None:
    """Write atomically with ``mode`` from the start (the private key is never readable by others)."""
    tmp = f"{path}.tunnelhub-new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_status(path: str, state: str, **fields: object) -> None:
    """Best effort: a status that cannot be written must not stop the key from being installed."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        body = {"state": state, "updated_at": round(time.time(), 1), **fields}
        write_file(path, (json.dumps(body) + "\n").encode(), 0o644)
    except OSError as exc:
        log(f"cannot write the status file {path}: {exc}")


def install_key(private_key: str, *, key_path: str, dropin_path: str, sshd_config: str, restart: bool) -> str:
    text = private_key.strip().replace("\r\n", "\n") + "\n"
    if "-----BEGIN OPENSSH PRIVATE KEY-----" not in text:
        raise Fatal("the stored value is not an OpenSSH private key (expected -----BEGIN OPENSSH PRIVATE KEY-----)")
    write_file(key_path, text.encode(), 0o600)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", key_path], capture_output=True, text=True, timeout=30)
    if derived.returncode != 0 or not derived.stdout.startswith("ssh-ed25519 "):
        os.unlink(key_path)
        raise Fatal("the stored value is not an unencrypted ed25519 private key: "
                    + (derived.stderr.strip() or derived.stdout.split(" ")[0]))
    public = derived.stdout.split()[:2]
    write_file(key_path + ".pub", (" ".join(public) + " tunnelhub-hub-host-key\n").encode(), 0o644)
    write_file(dropin_path, f"# tunnelhub: the hub host key only (written at boot)\nHostKey {key_path}\n".encode(),
               0o644)
    check = subprocess.run(["sshd", "-t", "-f", sshd_config], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        os.unlink(dropin_path)
        raise Fatal(f"sshd -t rejected the host key drop-in: {check.stderr.strip()}")
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", key_path + ".pub"], capture_output=True, text=True,
                                 timeout=30).stdout.split()
    if restart:
        subprocess.run(["systemctl", "restart", "ssh.service"], check=True, timeout=120)
    return fingerprint[1] if len(fingerprint) > 1 else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunnelhub_fetch_host_key.py",
                                     description="install the hub SSH host key from the cloud secret store")
    parser.add_argument("--source", required=True, choices=("azure-keyvault", "aws-ssm"))
    parser.add_argument("--parameter", help="aws-ssm: the SSM parameter name (/tunnelhub/<hub>/ssh-host-ed25519-key)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="give up after this long (default 900)")
    parser.add_argument("--key-path", default=KEY_PATH)
    parser.add_argument("--dropin-path", default=DROPIN_PATH)
    parser.add_argument("--sshd-config", default=SSHD_CONFIG, help="the config sshd -t checks")
    parser.add_argument("--no-restart", action="store_true", help="do not restart sshd (tests)")
    parser.add_argument("--status-file", default=STATUS_PATH,
                        help=f"progress for the health endpoint (default {STATUS_PATH})")
    parser.add_argument("--imds-url", default=IMDS_URL, help=argparse.SUPPRESS)
    parser.add_argument("--vault-url", help=argparse.SUPPRESS)
    parser.add_argument("--ssm-endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.source == "aws-ssm" and not args.parameter:
        parser.error("--source aws-ssm needs --parameter /tunnelhub/<hub>/ssh-host-ed25519-key")

    deadline = time.monotonic() + args.timeout_s
    delay, attempt = 2.0, 0
    write_status(args.status_file, "fetching", source=args.source, attempt=1)
    while True:
        attempt += 1
        try:
            if args.source == "azure-keyvault":
                key = fetch_azure(args.imds_url.rstrip("/"), args.vault_url)
            else:
                key = fetch_aws(args.imds_url.rstrip("/"), args.parameter, args.ssm_endpoint)
            fingerprint = install_key(key, key_path=args.key_path, dropin_path=args.dropin_path,
                                      sshd_config=args.sshd_config, restart=not args.no_restart)
        except Fatal as exc:
            log(f"FAILED: {exc}")
            write_status(args.status_file, "failed", source=args.source, attempt=attempt, error=str(exc))
            return 2
        except (Retry, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            left = deadline - time.monotonic()
            if left <= delay:
                log(f"FAILED after {attempt} attempt(s) in {args.timeout_s:g} s: {exc}")
                write_status(args.status_file, "failed", source=args.source, attempt=attempt, error=str(exc))
                return 1
            log(f"attempt {attempt} failed, retrying in {delay:g} s ({left:.0f} s left): {exc}")
            write_status(args.status_file, "retrying", source=args.source, attempt=attempt, error=str(exc),
                         retry_in_s=delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
            continue
        log(f"installed the hub host key {fingerprint} at {args.key_path} ({args.source}, attempt {attempt})")
        write_status(args.status_file, "installed", source=args.source, attempt=attempt, fingerprint=fingerprint)
        return 0


if __name__ == "__main__":
    sys.exit(main())
