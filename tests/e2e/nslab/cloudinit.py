"""Extract a rendered cloud-init's files into a per-proxy root directory.

All namespaces share one filesystem, so each proxy's files live under its own root
(``<root>/etc/ssh/sshd_config.d/...``). The lab rewrites nothing in them except paths it must:
:func:`rewrite_paths` maps paths that name extracted files, and runtime paths (``/run``,
``/var/run``) that two proxies would otherwise share, into the proxy's root. Files are
written byte-exact with the owner and permissions the cloud-init asks for (an owner that does
not exist on this machine is recorded in ``VmRoot.unowned`` and left as root).
"""

from __future__ import annotations

import base64
import email
import grp
import gzip
import os
import pwd
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from .proc import LabError

RUNTIME_DIRS = ("/run", "/var/run")
_ENCODINGS = {
    "b64": ("b64",), "base64": ("b64",),
    "gz": ("gz",), "gzip": ("gz",),
    "gz+b64": ("b64", "gz"), "gz+base64": ("b64", "gz"),
    "gzip+b64": ("b64", "gz"), "gzip+base64": ("b64", "gz"),
    "text/plain": (),
}


@dataclass(frozen=True)
class WrittenFile:
    vm_path: str
    host_path: Path
    owner: str
    mode: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode()


@dataclass
class VmRoot:
    """A machine's files (a proxy's or the tunnel host's) under ``root``, keyed by VM path."""

    root: Path
    files: dict[str, WrittenFile] = field(default_factory=dict)
    users: list[dict] = field(default_factory=list)
    cloud_config: dict = field(default_factory=dict)
    unowned: list[str] = field(default_factory=list)

    def path(self, vm_path: str) -> Path:
        """Where ``vm_path`` lives for this proxy (whether or not a file was written there)."""
        pure = PurePosixPath(vm_path)
        if not pure.is_absolute():
            raise LabError(f"write_files path must be absolute, got {vm_path!r}")
        for runtime in RUNTIME_DIRS:
            if vm_path == runtime or vm_path.startswith(runtime + "/"):
                return self.root / "run" / vm_path[len(runtime) + 1:]
        return self.root / str(pure)[1:]

    def rechown(self) -> list[str]:
        """Retry the owners that did not exist at extraction (a user created since)."""
        still = []
        for entry in self.unowned:
            vm_path = entry.split(" (", 1)[0]
            written = self.files[vm_path]
            if not _chown(written.host_path, written.owner):
                still.append(entry)
        self.unowned = still
        return still

    def file(self, vm_path: str) -> WrittenFile:
        try:
            return self.files[vm_path]
        except KeyError:
            raise LabError(
                f"the cloud-init has no write_files entry for {vm_path}; it has: "
                + ", ".join(sorted(self.files))
            ) from None

    def matching(self, pattern: str) -> list[WrittenFile]:
        """Files whose VM path matches the regular expression ``pattern`` (sorted by path)."""
        rx = re.compile(pattern)
        return [self.files[p] for p in sorted(self.files) if rx.search(p)]

    def rewrite_paths(self, text: str, *, extra: Mapping[str, str] | None = None) -> str:
        """``text`` with extracted files' paths and runtime paths pointing into the root.

        A path is replaced only as a whole token (not inside a longer path). ``extra`` maps
        further VM paths (files or directories) to host paths.
        """
        mapping: dict[str, str] = {p: str(f.host_path) for p, f in self.files.items()}
        for runtime in RUNTIME_DIRS:
            mapping[runtime + "/"] = str(self.root / "run") + "/"
        if extra:
            mapping.update(extra)
        return rewrite_paths(text, mapping)


def rewrite_paths(text: str, mapping: Mapping[str, str]) -> str:
    """Replace each whole-token occurrence of a key of ``mapping`` by its value.

    A key ending in ``/`` is a directory prefix (``/run/`` maps ``/run/x.pid``); any other key
    is a whole path and is left alone inside a longer path (``/etc/a`` does not touch
    ``/etc/ab``). A token starts after anything but a path character, so ``-i/path``,
    ``Key=/path`` and ``"/path"`` are all found.
    """
    if not mapping:
        return text
    keys = sorted(mapping, key=len, reverse=True)
    start = r"(?:(?<![\w./-])|(?<=\s-[A-Za-z])|(?<=^-[A-Za-z]))"  # also "-i/path"
    pattern = re.compile(start + "(" + "|".join(re.escape(k) for k in keys) + r")")

    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        following = text[match.end():match.end() + 1]
        if not key.endswith("/") and following and re.match(r"[\w./-]", following):
            return key  # part of a longer path: leave it
        return mapping[key]

    return pattern.sub(replace, text)


def load_cloud_config(data: bytes | str) -> dict:
    """Parse user data: ``#cloud-config`` YAML, gzip-compressed or not, or MIME multipart."""
    raw = data.encode() if isinstance(data, str) else data
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw.lstrip().startswith(b"Content-Type:") or raw.lstrip().startswith(b"MIME-Version:"):
        message = email.message_from_bytes(raw)
        parts = [
            part.get_payload(decode=True)
            for part in message.walk()
            if part.get_content_type() in ("text/cloud-config", "text/x-cloud-config")
        ]
        if len(parts) != 1:
            raise LabError(f"expected one text/cloud-config MIME part, found {len(parts)}")
        return load_cloud_config(parts[0])
    text = raw.decode()
    if not text.startswith("#cloud-config"):
        raise LabError("user data does not start with '#cloud-config' (nor gzip or MIME)")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LabError(f"cloud-config is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise LabError("cloud-config must be a YAML mapping")
    return doc


def decode_content(entry: dict, index: int) -> bytes:
    content = entry.get("content", "")
    if "source" in entry:
        raise LabError(f"write_files[{index}] ({entry.get('path')}): 'source' is not supported "
                       "by the lab; embed the content")
    encoding = str(entry.get("encoding", "text/plain")).lower()
    if encoding not in _ENCODINGS:
        raise LabError(f"write_files[{index}] ({entry.get('path')}): unknown encoding "
                       f"{encoding!r}; cloud-init accepts {', '.join(sorted(_ENCODINGS))}")
    data: bytes = content.encode() if isinstance(content, str) else bytes(content)
    for step in _ENCODINGS[encoding]:
        if step == "b64":
            data = base64.b64decode(data)
        elif step == "gz":
            data = gzip.decompress(data)
    return data


def parse_mode(value: object, index: int, path: str) -> int:
    if value is None:
        return 0o644
    if isinstance(value, int):
        # YAML 1.1 reads an unquoted 0644 as octal already; cloud-init does the same.
        return value
    text = str(value).strip()
    try:
        return int(text, 8)
    except ValueError:
        raise LabError(f"write_files[{index}] ({path}): permissions {value!r} is not an octal "
                       "string such as '0644'") from None


def _chown(path: Path, owner: str) -> bool:
    user, _, group = owner.partition(":")
    try:
        uid = pwd.getpwnam(user).pw_uid
        gid = grp.getgrnam(group).gr_gid if group else pwd.getpwnam(user).pw_gid
    except KeyError:
        return False
    os.chown(path, uid, gid)
    return True


def extract_cloud_init(
    user_data: bytes | str,
    root: Path,
    *,
    extra_files: Mapping[str, bytes | str] | None = None,
    extra_owner: str = "root:root",
    extra_mode: int = 0o600,
) -> VmRoot:
    """Write the cloud-init's ``write_files`` (and ``users[].ssh_authorized_keys``) under ``root``.

    ``extra_files`` supplies files the VM gets at boot from elsewhere (the hub host key fetched
    from the cloud secret store); they are written after the cloud-init's own files.
    """
    doc = load_cloud_config(user_data)
    proxy = VmRoot(root=root, cloud_config=doc)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    entries = doc.get("write_files") or []
    if not isinstance(entries, list):
        raise LabError("write_files must be a list")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "path" not in entry:
            raise LabError(f"write_files[{index}] needs a 'path'")
        vm_path = str(entry["path"])
        data = decode_content(entry, index)
        mode = parse_mode(entry.get("permissions"), index, vm_path)
        owner = str(entry.get("owner", "root:root"))
        append = bool(entry.get("append", False))
        if append and vm_path in proxy.files:
            data = proxy.files[vm_path].content + data
        _write(proxy, vm_path, data, owner, mode)

    users = doc.get("users") or []
    for user in users if isinstance(users, list) else []:
        if not isinstance(user, dict):
            continue  # "default" and other strings
        proxy.users.append(user)
        keys = user.get("ssh_authorized_keys") or []
        if keys:
            home = user.get("homedir", f"/home/{user['name']}")
            content = "".join(f"{k}\n" for k in keys).encode()
            _write(proxy, f"{home}/.ssh/authorized_keys", content,
                   f"{user['name']}:{user.get('primary_group', user['name'])}", 0o600)

    for vm_path, content in (extra_files or {}).items():
        data = content.encode() if isinstance(content, str) else content
        _write(proxy, vm_path, data, extra_owner, extra_mode)
    return proxy


def _write(proxy: VmRoot, vm_path: str, data: bytes, owner: str, mode: int) -> None:
    host_path = proxy.path(vm_path)
    for parent in reversed(host_path.relative_to(proxy.root).parents):
        directory = proxy.root / parent
        if not directory.exists():
            directory.mkdir()
            os.chmod(directory, 0o755)
    host_path.write_bytes(data)
    os.chmod(host_path, mode)
    if not _chown(host_path, owner):
        proxy.unowned.append(f"{vm_path} ({owner})")
    proxy.files[vm_path] = WrittenFile(vm_path, host_path, owner, mode, data)


def match_user(sshd_dropin: str) -> str:
    """The user named by the drop-in's ``Match User`` line (exactly one is expected)."""
    users = re.findall(r"^\s*Match\s+User\s+(\S+)", sshd_dropin, re.MULTILINE | re.IGNORECASE)
    if len(users) != 1:
        raise LabError(f"expected one 'Match User <name>' in the sshd drop-in, found {users}")
    if "," in users[0] or "*" in users[0]:
        raise LabError(f"'Match User {users[0]}': the lab needs one literal user name")
    return users[0]


def match_block_setting(sshd_dropin: str, keyword: str) -> str | None:
    """The value of ``keyword`` inside the drop-in's ``Match User`` block (first one wins, as in
    sshd), or None when the block does not set it."""
    in_block = False
    for line in sshd_dropin.splitlines():
        words = line.split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        if words[0].lower() == "match":
            in_block = len(words) > 1 and words[1].split()[0].lower() == "user"
            continue
        if in_block and words[0].lower() == keyword.lower() and len(words) > 1:
            return words[1].strip()
    return None


def authorized_key_lines(text: str) -> Iterable[str]:
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            yield line


def install_files(
    root: Path,
    files: Mapping[str, bytes | str],
    *,
    owner: str = "root:root",
    mode: int = 0o644,
    modes: Mapping[str, int] | None = None,
) -> VmRoot:
    """Place files (the tunnel host's unit, env and key files) under ``root`` by VM path."""
    vm = VmRoot(root=root)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    for vm_path, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        _write(vm, vm_path, data, owner, (modes or {}).get(vm_path, mode))
    return vm
