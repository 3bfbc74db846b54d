"""The hub stack outputs the on-prem package is built from.

Each hub stack has two top-level Terraform outputs for the tunnel host:

- ``tunnel_endpoints``: the addresses the tunnel host dials, one per slot in slot order
  (authoritative when present: AWS Elastic IPs are only known after deploy);
- ``host_public_key``: the OpenSSH public key line of the hub host key every proxy presents.

and one for ``tunnelhub status`` (the proxies' health endpoints, by slot): ``proxy_private_ips``
(Azure) or ``slot_private_ips`` (AWS).

Two file formats are read:

- ``cdktf output --outputs-file F`` / ``cdktf deploy --outputs-file F``:
  ``{"<stack>": {"<name>": value, ...}, ...}``;
- ``terraform output -json``: ``{"<name>": {"value": ..., "type": ..., "sensitive": ...}, ...}``
  (one stack, so it is taken to be the hub's).

A top-level ``"//"`` key is a comment and ignored in both.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from tunnelhub.spec import is_valid_domain

COMMENT_KEY = "//"
ENDPOINTS_OUTPUT = "tunnel_endpoints"
HOST_KEY_OUTPUT = "host_public_key"
HOST_KEY_TYPE = "ssh-ed25519"
PRIVATE_IPS_OUTPUTS = {"azure": "proxy_private_ips", "aws": "slot_private_ips"}


class OnpremError(ValueError):
    """The on-prem package cannot be built from what was given; the message says what to pass."""


@dataclass(frozen=True, kw_only=True)
class StackOutputs:
    """The outputs of one hub stack that the on-prem package uses."""

    source: str
    """Where they were read from (a file name, for messages)."""
    tunnel_endpoints: tuple[str, ...] | None = None
    """The addresses the tunnel host dials, by slot (None: the stack has no such output)."""
    host_public_key: str | None = None
    """``ssh-ed25519 <base64>`` of the hub host key, comment dropped (None: no such output)."""
    private_ips: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """By output name (``proxy_private_ips`` / ``slot_private_ips``): the proxies' private
    addresses, by slot; only the outputs the stack has."""


@dataclass(frozen=True)
class HostKey:
    """A parsed OpenSSH public key line."""

    key_type: str
    blob_b64: str

    @property
    def line(self) -> str:
        return f"{self.key_type} {self.blob_b64}"

    @property
    def fingerprint(self) -> str:
        """The ``SHA256:…`` fingerprint ``ssh-keygen -l`` prints."""
        digest = hashlib.sha256(base64.b64decode(self.blob_b64)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def read_outputs(path: str | Path, stack: str) -> StackOutputs:
    """Read the outputs of ``stack`` from a cdktf outputs file or ``terraform output -json``."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OnpremError(f"outputs file {source} does not exist: write it with "
                          f"`cdktf output {stack} --outputs-file {source}` after deploying the hub") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OnpremError(f"cannot read outputs file {source}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OnpremError(f"outputs file {source} is not valid JSON (line {exc.lineno}: {exc.msg}); "
                          "pass the file `cdktf output --outputs-file` or `terraform output -json` writes") from None
    return parse_outputs(data, stack, source)


def parse_outputs(data: Any, stack: str, source: str) -> StackOutputs:
    """The outputs of ``stack`` in parsed outputs-file JSON (either format)."""
    if not isinstance(data, dict):
        raise OnpremError(f"outputs file {source}: expected a JSON object of outputs, got {type(data).__name__}")
    entries = {k: v for k, v in data.items() if k != COMMENT_KEY}
    if not entries:
        raise OnpremError(f"outputs file {source} holds no outputs: deploy the hub, then write it with "
                          f"`cdktf output {stack} --outputs-file {source}`")
    if all(isinstance(v, dict) and "value" in v and "type" in v for v in entries.values()):
        # terraform output -json
        values = {name: entry["value"] for name, entry in entries.items()}
        where = source
    else:
        if stack not in entries:
            raise OnpremError(f"outputs file {source} has no stack {stack!r} (it has: {', '.join(sorted(entries))}); "
                              f"write it with `cdktf output {stack} --outputs-file {source}`")
        values = entries[stack]
        if not isinstance(values, dict):
            raise OnpremError(f"outputs file {source}: stack {stack!r} should map output names to values, "
                              f"got {type(values).__name__}")
        where = f"{source} (stack {stack})"
    return StackOutputs(
        source=where,
        tunnel_endpoints=_endpoints(values.get(ENDPOINTS_OUTPUT), where),
        host_public_key=_host_key(values.get(HOST_KEY_OUTPUT), where),
        private_ips={name: _private_ips(values[name], name, where)
                     for name in PRIVATE_IPS_OUTPUTS.values() if values.get(name) is not None},
    )


def _private_ips(value: Any, name: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OnpremError(f"{where}: {name} must be a list of IP addresses (strings), got {_short(value)}")
    for v in value:
        try:
            ip_address(v)
        except ValueError:
            raise OnpremError(f"{where}: {name}: {v!r} is not an IP address") from None
    return tuple(value)


def _endpoints(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OnpremError(f"{where}: {ENDPOINTS_OUTPUT} must be a list of addresses (strings), got {_short(value)}")
    for v in value:
        check_endpoint(v, f"{where}: {ENDPOINTS_OUTPUT}")
    return tuple(value)


def check_endpoint(value: str, where: str) -> str:
    """An address the tunnel host may dial: an IP address or a host name, nothing else."""
    try:
        ip_address(value)
        return value
    except ValueError:
        pass
    if not is_valid_domain(value.lower()):
        raise OnpremError(f"{where}: {value!r} is neither an IP address nor a host name")
    return value


def _host_key(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise OnpremError(f"{where}: {HOST_KEY_OUTPUT} must be an OpenSSH public key line, got {_short(value)}")
    return parse_host_key(value, f"{where}: {HOST_KEY_OUTPUT}").line


def parse_host_key(value: str, where: str) -> HostKey:
    """Parse an ``ssh-ed25519 <base64> [comment]`` line (the hub host key is always ed25519)."""
    parts = value.split()
    if len(parts) < 2:
        raise OnpremError(f"{where}: not an OpenSSH public key line ('ssh-ed25519 AAAA... [comment]'): {_short(value)}")
    key_type, blob_b64 = parts[0], parts[1]
    if key_type != HOST_KEY_TYPE:
        raise OnpremError(f"{where}: the hub host key must be {HOST_KEY_TYPE}, got {key_type!r}")
    try:
        blob = base64.b64decode(blob_b64, validate=True)
        (name_len,) = struct.unpack(">I", blob[:4])
        inner = blob[4 : 4 + name_len].decode()
        (key_len,) = struct.unpack(">I", blob[4 + name_len : 8 + name_len])
    except (binascii.Error, struct.error, UnicodeDecodeError):
        raise OnpremError(f"{where}: the key's base64 body is damaged") from None
    if inner != key_type or key_len != 32 or len(blob) != 8 + name_len + 32:
        raise OnpremError(f"{where}: the key's body is not a {HOST_KEY_TYPE} public key")
    return HostKey(key_type, blob_b64)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
