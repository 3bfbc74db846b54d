"""The on-prem side: a generated .deb of autossh units for the tunnel host (``tunnelhub onprem``)."""

from tunnelhub.onprem.outputs import OnpremError, StackOutputs, parse_outputs, read_outputs
from tunnelhub.onprem.package import (
    DebBuild,
    PackagePlan,
    build_deb,
    check_version,
    deb_file,
    default_version,
    host_version,
    inputs_epoch,
    pick_tunnel_host,
    plan_package,
    render_package,
)
from tunnelhub.onprem.timing import DEFAULT_TIMING, TunnelTiming

__all__ = [
    "DEFAULT_TIMING",
    "DebBuild",
    "OnpremError",
    "PackagePlan",
    "StackOutputs",
    "TunnelTiming",
    "build_deb",
    "check_version",
    "deb_file",
    "default_version",
    "host_version",
    "inputs_epoch",
    "parse_outputs",
    "pick_tunnel_host",
    "plan_package",
    "read_outputs",
    "render_package",
]
