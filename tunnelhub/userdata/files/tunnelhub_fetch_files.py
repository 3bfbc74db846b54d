#!/usr/bin/env python3
"""Fetch the proxy files that do not fit in AWS's 16 KB of user data, from the hub's S3 bucket.

    tunnelhub_fetch_files.py --config /etc/tunnelhub/boot.json

boot.json lists them under ``remote_files`` (path, S3 key, sha256, permissions). The bucket is
``tunnelhub-<hub>-<account>-<region>`` (the AWS hub stack creates it and uploads the objects the
renderer gives it); account and region come from the instance identity document, credentials from
the instance profile (IMDSv2), requests are SigV4-signed. Each file must match the sha256 the user
data pins, so the bucket cannot change what runs on the proxy. Retried with backoff until
--timeout-s; a checksum mismatch fails at once. Stdlib only; shares the AWS code of
tunnelhub_fetch_host_key.py (same directory).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tunnelhub_fetch_host_key import IMDS_URL, Fatal, Retry, aws_domain, aws_request, aws_session, write_file  # noqa: E402


def log(message: str) -> None:
    print(f"tunnelhub-files: {message}", flush=True)


def bucket_name(hub: str, account: str, region: str) -> str:
    return f"tunnelhub-{hub}-{account}-{region}"


def object_url(bucket: str, key: str, region: str, endpoint: str | None) -> str:
    quoted = urllib.parse.quote(key, safe="/-_.~")
    if endpoint:  # tests: path-style on a local S3
        return f"{endpoint.rstrip('/')}/{bucket}/{quoted}"
    return f"https://{bucket}.s3.{region}.{aws_domain(region)}/{quoted}"


def sha256_of(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


def fetch_all(cfg: dict, imds: str, endpoint: str | None) -> int:
    wanted = [f for f in cfg["remote_files"] if sha256_of(f["path"]) != f["sha256"]]
    if not wanted:
        return 0
    session = aws_session(imds)
    bucket = bucket_name(cfg["hub"], session["account"], session["region"])
    for f in wanted:
        data = aws_request(session, "s3", "GET", object_url(bucket, f["key"], session["region"], endpoint))
        digest = hashlib.sha256(data).hexdigest()
        if digest != f["sha256"]:
            raise Fatal(f"s3://{bucket}/{f['key']} has sha256 {digest}, this user data pins {f['sha256']}: "
                        "deploy the hub stack again so the bucket and the launch template agree")
        os.makedirs(os.path.dirname(f["path"]), exist_ok=True)
        write_file(f["path"], data, int(f["permissions"], 8))
        log(f"fetched {f['path']} ({len(data)} bytes) from s3://{bucket}/{f['key']}")
    return len(wanted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunnelhub_fetch_files.py",
                                     description="fetch the proxy files kept in the hub's S3 bucket")
    parser.add_argument("--config", default="/etc/tunnelhub/boot.json")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--imds-url", default=IMDS_URL, help=argparse.SUPPRESS)
    parser.add_argument("--s3-endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as fh:
        cfg = json.load(fh)
    deadline = time.monotonic() + args.timeout_s
    delay, attempt = 2.0, 0
    while True:
        attempt += 1
        try:
            count = fetch_all(cfg, args.imds_url.rstrip("/"), args.s3_endpoint)
        except Fatal as exc:
            log(f"FAILED: {exc}")
            return 2
        except (Retry, OSError, ValueError, KeyError) as exc:
            left = deadline - time.monotonic()
            if left <= delay:
                log(f"FAILED after {attempt} attempt(s) in {args.timeout_s:g} s: {exc}")
                return 1
            log(f"attempt {attempt} failed, retrying in {delay:g} s ({left:.0f} s left): {exc}")
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
            continue
        log(f"{count} file(s) fetched, {len(cfg['remote_files']) - count} already in place")
        return 0


if __name__ == "__main__":
    sys.exit(main())
