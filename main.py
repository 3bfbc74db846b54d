#!/usr/bin/env python3
"""cdktf entry point: `cdktf synth` / `cdktf deploy` run this (see cdktf.json).

The spec comes from $TUNNELHUB_SPEC, defaulting to the example spec, so `cdktf synth` works out
of the box. `tunnelhub synth` is the faster, atomic alternative for synthesis alone.
"""

import sys

from tunnelhub.cli import default_spec_path
from tunnelhub.spec import SpecError, load_spec


def run() -> int:
    try:
        spec = load_spec(default_spec_path())
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 1
    from tunnelhub.jsii_env import prepare_jsii_environment

    prepare_jsii_environment()
    from tunnelhub.app import build_app

    build_app(spec).synth()
    return 0


if __name__ == "__main__":
    sys.exit(run())
