"""Environment for the jsii runtime (the Node.js process behind every cdktf call).

:func:`prepare_jsii_environment` must run before the first ``import cdktf``: jsii reads these
variables when it starts Node.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess


def node_binary() -> str | None:
    """The Node.js binary jsii will start (``$JSII_NODE``, else ``node`` on PATH)."""
    return os.environ.get("JSII_NODE") or shutil.which("node")


def prepare_jsii_environment() -> None:
    """Set jsii's environment for a quiet synthesis (values already set are kept)."""
    major = _node_major(node_binary())
    if major is not None:
        # jsii prints a multi-line banner on stderr for every process when the machine's Node is
        # past jsii's support date; synthesis is correct on it (the tests prove the output), and
        # the README says which Node to install. Silence it for that one major version only.
        os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", str(major))
        os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")


@functools.lru_cache(maxsize=None)
def _node_major(node: str | None) -> int | None:
    if node is None:
        return None
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
        return int(out.strip().lstrip("v").split(".")[0])
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
