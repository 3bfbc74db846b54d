"""Environment for the jsii runtime (the Node process behind every cdktf call).

Must run before the first ``import cdktf``: jsii reads these variables when it starts Node.
"""

from __future__ import annotations

import os
import shutil


def prepare_jsii_environment() -> None:
    """Set jsii's environment for a quiet, fast synthesis (existing values are kept)."""
    node = shutil.which("node")
    if node is not None:
        # jsii prints a multi-line banner on stderr for every process when the machine's Node
        # is past its support date; tunnelhub synthesizes correctly on it, and the README says
        # which Node to install. Silence it only for that one major version.
        major = _node_major(node)
        if major is not None:
            os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", str(major))
            os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")


def _node_major(node: str) -> int | None:
    import subprocess

    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        return int(out.strip().lstrip("v").split(".")[0])
    except ValueError:
        return None
