"""Session-wide fixtures. Synthesis imports provider packages (tens of seconds), so each spec is
synthesized at most once per test session and the results are shared."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tunnelhub.jsii_env import prepare_jsii_environment

# Before any test module imports cdktf: the jsii kernel reads its environment once, and the
# provider packages must be registered lazily before anything imports them (docs/synth-speed.md).
prepare_jsii_environment()

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SPEC = ROOT / "examples" / "hubs.yaml"


@dataclass
class Synthesized:
    """A synthesized output directory and its parsed stacks."""

    outdir: Path
    manifest: dict
    stacks: dict[str, dict] = field(default_factory=dict)

    def stack(self, name: str) -> dict:
        return self.stacks[name]

    def text(self, name: str) -> str:
        return (self.outdir / "stacks" / name / "cdk.tf.json").read_text()


@pytest.fixture(scope="session")
def synth_spec(tmp_path_factory):
    """Synthesize a spec (a path, or YAML text) once per session and return :class:`Synthesized`."""
    from tunnelhub.spec import load_spec, validate_text
    from tunnelhub.synth import synthesize

    cache: dict[str, Synthesized] = {}

    def run(spec_path: Path = EXAMPLE_SPEC, *, text: str | None = None) -> Synthesized:
        key = text if text is not None else str(spec_path)
        if key not in cache:
            spec = validate_text(text, "test.yaml").spec if text is not None else load_spec(spec_path)
            out = tmp_path_factory.mktemp("synth") / "cdktf.out"
            synthesize(spec, out, jobs=1)  # in-process: provider bindings load once per session
            manifest = json.loads((out / "manifest.json").read_text())
            stacks = {
                name: json.loads((out / entry["synthesizedStackPath"]).read_text())
                for name, entry in manifest["stacks"].items()
            }
            cache[key] = Synthesized(out, manifest, stacks)
        return cache[key]

    return run


@pytest.fixture(scope="session")
def example(synth_spec) -> Synthesized:
    """The example spec, synthesized once."""
    return synth_spec()


@pytest.fixture(scope="session", autouse=True)
def sshd_privilege_separation_dir():
    """The tests start real sshd daemons (and ``sshd -t``), which refuse to run without their
    privilege separation directory. The openssh-server package creates /run/sshd only when its
    service starts, which ``make test`` forbids (policy-rc.d), so a test run that reaches those
    tests before one that happens to create it failed with "Missing privilege separation
    directory: /run/sshd"."""
    import os

    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
