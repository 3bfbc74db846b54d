"""The ``tunnelhub`` command: thin click commands over the library functions.

User errors (a bad spec, a missing file) print one clear message and exit 1; bad arguments exit 2;
neither prints a traceback. ``status`` is the exception: its exit code says how the routes are
(0 up, 1 not all up, 3 nobody answered), so its input errors exit 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from tunnelhub import __version__
from tunnelhub import spec as S

EXAMPLE_SPEC = Path(__file__).resolve().parent.parent / "examples" / "hubs.yaml"


def default_spec_path() -> Path:
    """``$TUNNELHUB_SPEC``, else the embedded example spec."""
    env = os.environ.get("TUNNELHUB_SPEC")
    return Path(env) if env else EXAMPLE_SPEC


def load(spec_path: Path | None) -> S.SpecFile:
    """Load a spec for a command; a bad spec becomes one clear message (exit 1)."""
    try:
        return S.load_spec(spec_path if spec_path is not None else default_spec_path())
    except S.SpecError as exc:
        raise click.ClickException(str(exc)) from None


def pick_hub(loaded: S.SpecFile, hub_name: str | None) -> S.Hub:
    """The hub a command works on: the named one, else the spec's only hub."""
    if hub_name is None:
        if len(loaded.hubs) != 1:
            raise click.UsageError("the spec has several hubs (" + ", ".join(h.name for h in loaded.hubs)
                                   + "): choose one with --hub NAME")
        return loaded.hubs[0]
    try:
        return loaded.hub(hub_name)
    except S.SpecError:
        raise click.BadParameter(
            f"no hub named {hub_name!r}; hubs in this spec: {', '.join(h.name for h in loaded.hubs)}",
            param_hint="--hub",
        ) from None


def progress(message: str) -> None:
    click.echo(f"tunnelhub: {message}", err=True)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


spec_argument = click.argument(
    "spec", required=False, type=click.Path(path_type=Path, dir_okay=False), metavar="[SPEC]"
)
required_spec_argument = click.argument("spec", type=click.Path(path_type=Path, dir_okay=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tunnelhub")
def main() -> None:
    """Generate reverse-SSH proxy hubs for Databricks from one hub spec.

    SPEC defaults to $TUNNELHUB_SPEC, else the example spec (examples/hubs.yaml).
    """


@main.command()
@spec_argument
def validate(spec: Path | None) -> None:
    """Check a spec: exit 0 when valid (warnings printed), 1 with every problem otherwise."""
    path = spec if spec is not None else default_spec_path()
    try:
        report = S.validate_spec(path)
    except S.SpecError as exc:
        raise click.ClickException(str(exc)) from None
    for w in report.warnings:
        click.echo(w.render(report.source), err=True)
    for line in S.ncc_binding_warnings(report.spec.hubs):
        click.echo(f"{report.source}: {line}", err=True)
    hubs = report.spec.hubs
    click.echo(f"{path}: valid, {len(hubs)} hub{'s' if len(hubs) != 1 else ''}")
    for h in hubs:
        unit = "slots" if h.cloud == "aws" else "proxies"
        click.echo(
            f"  {h.name}: {h.cloud} {h.region}, {h.proxies.count} {unit}, "
            f"{len(h.routes)} route{'s' if len(h.routes) != 1 else ''} -> stack {h.stack_name}"
        )


@main.command()
@spec_argument
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def ports(spec: Path | None, as_json: bool) -> None:
    """The port plan: per hub, route and tunnel host, the frontend port, that host's tunnel port
    (its loopback port on every proxy), the route's peer port, target, domain, probe.

    A tunnel route has one row per tunnel host (a hub in the single-host form has one host,
    tunnel-host); a forward route has one row. --json prints the rows as a list of objects with
    hub, route, kind, port, tunnel_host, tunnel_port, peer_port, target, domain, type, probe and
    health_path (null where a field does not apply).
    """
    loaded = load(spec)
    rows = [row for hub in loaded.hubs for row in hub.port_plan()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    print_table(rows, ["hub", "route", "kind", "port", "tunnel_host", "tunnel_port", "peer_port", "target", "domain",
                       "probe"])


@main.command()
@spec_argument
@click.option("--hub", "hubs", multiple=True, metavar="NAME", help="Only this hub (repeatable).")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("cdktf.out"),
    show_default=True,
    help="cdktf output directory.",
)
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Worker processes for hubs that need synthesis (default: $TUNNELHUB_SYNTH_JOBS, else the CPU count).")
@click.option("--no-reuse", is_flag=True, help="Synthesize every stack even when its inputs did not change.")
@click.option("--json", "as_json", is_flag=True, help="Print the stacks and their changes as JSON.")
def synth(spec: Path | None, hubs: tuple[str, ...], out: Path, jobs: int | None, no_reuse: bool,
          as_json: bool) -> None:
    """Synthesize the hub stacks (Terraform JSON) into OUT.

    Then, per stack, what changed since the previous output in OUT: the live configuration (the
    document the proxies apply in place: routes and keys added, removed, changed) and whether any
    proxy would be replaced or restarted (and why).
    """
    from tunnelhub.changes import guarded_removals, read_stacks, stack_reports
    from tunnelhub.synth import SynthError, synthesize

    loaded = load(spec)
    try:
        selected = loaded.select(list(hubs) or None)
    except S.SpecError as exc:
        raise click.ClickException(str(exc)) from None
    for line in S.ncc_binding_warnings(selected):
        click.echo(f"tunnelhub: {line}", err=True)
    previous = read_stacks(out)
    protected = {h.stack_name: h.protect for h in loaded.hubs}

    def guard(new_out: Path) -> None:
        removed = guarded_removals(previous, read_stacks(new_out), protected=protected)
        if removed:
            raise SynthError(
                "this synthesis removes resources the protect guard covers, and Terraform's "
                "prevent_destroy does not stop the destroy of a removed block: "
                + "; ".join(removed)
                + ". Nothing was written. If that is intended (docs/teardown.md), set protect: false "
                "on the hub and synthesize again; otherwise restore what removed them (e.g. "
                "databricks.serverless_enabled).")

    try:
        results = synthesize(loaded, out, hubs=list(hubs) or None, progress=progress, jobs=jobs,
                             reuse=not no_reuse, guard=guard)
    except (S.SpecError, SynthError) as exc:
        raise click.ClickException(str(exc)) from None
    reports = stack_reports(previous, read_stacks(out), names=[r.name for r in results])
    if as_json:
        by_name = {r.stack: r.as_dict() for r in reports}
        click.echo(json.dumps({"stacks": [
            {"stack": r.name, "resources": r.resources, "reused": r.reused, "seconds": round(r.seconds, 2),
             "directory": str(r.directory), "changes": by_name.get(r.name)} for r in results],
            "manifest": str(Path(out).resolve() / "manifest.json")}, indent=2))
        return
    print_table(
        [
            {"stack": r.name, "resources": r.resources,
             "seconds": "reused" if r.reused else f"{r.seconds:.1f}", "directory": r.directory}
            for r in results
        ],
        ["stack", "resources", "seconds", "directory"],
    )
    click.echo(f"manifest: {Path(out).resolve() / 'manifest.json'}")
    if reports:
        click.echo(f"changes since the previous output in {out}:")
        for report in reports:
            for line in report.lines():
                click.echo(f"  {line}")


@main.command("render-userdata")
@spec_argument
@click.option("--hub", "hub_name", metavar="NAME", help="The hub whose proxies to render (default: the spec's only hub).")
@click.option("--slot", type=click.IntRange(min=0), metavar="N",
              help="Azure: the proxy index (0 to proxies.count - 1). AWS: not used (slots are assigned at boot).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Write the cloud-config here instead of stdout.")
def render_userdata(spec: Path | None, hub_name: str, slot: int | None, out: Path | None) -> None:
    """Print the cloud-init (cloud-config YAML) of a hub's proxy; size and gzip decision to stderr."""
    from tunnelhub.userdata import UserDataError, render_cloud_init

    hub = pick_hub(load(spec), hub_name)
    if hub.cloud == "azure" and slot is None:
        raise click.UsageError(
            f"hub {hub.name} is an azure hub: give --slot N, the proxy index from 0 to {hub.proxies.count - 1}"
        )
    if hub.cloud == "azure" and slot >= hub.proxies.count:
        raise click.BadParameter(
            f"hub {hub.name} has {hub.proxies.count} proxies: give 0 to {hub.proxies.count - 1}", param_hint="--slot"
        )
    if hub.cloud == "aws" and slot is not None:
        raise click.UsageError(
            f"hub {hub.name} is an aws hub: its proxies share one launch template and learn their slot at boot; "
            "leave out --slot"
        )
    try:
        user_data = render_cloud_init(hub, slot)
    except UserDataError as exc:
        raise click.ClickException(str(exc)) from None
    if out is not None:
        out.write_text(user_data.cloud_config, encoding="utf-8")
    else:
        click.echo(user_data.cloud_config, nl=False)
    plain = len(user_data.cloud_config.encode("utf-8"))
    how = f"gzip-compressed from {plain} bytes" if user_data.gzipped else "not compressed"
    progress(
        f"hub {hub.name}{'' if slot is None else f' slot {slot}'}: user data {user_data.size_bytes} bytes ({how}), "
        f"limit {user_data.limit_bytes} bytes on {hub.cloud}"
        + ("; scripts compacted to fit" if user_data.scripts_compacted else "")
    )
    for obj in user_data.s3_objects:
        progress(f"  {obj.path} does not fit: upload it to the hub files bucket as {obj.key} ({len(obj.content)} bytes)")
    if out is not None:
        progress(f"wrote {out}")


@main.command("render-config")
@spec_argument
@click.option("--hub", "hub_name", metavar="NAME", help="The hub (default: the spec's only hub).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Write the document here instead of stdout.")
def render_config(spec: Path | None, hub_name: str | None, out: Path | None) -> None:
    """Print a hub's configuration document (what the proxies apply live); version and size to stderr.

    On a proxy, `tunnelhub_reconcile.py --check FILE` says whether it would accept it and what it changes.
    """
    from tunnelhub.userdata import UserDataError, render_document

    hub = pick_hub(load(spec), hub_name)
    try:
        document = render_document(hub)
        channel = (f"Azure user_data {len(document.azure_user_data())} bytes base64" if hub.cloud == "azure"
                   else "AWS S3 object config/hub-config.json")
    except UserDataError as exc:
        raise click.ClickException(str(exc)) from None
    if out is not None:
        out.write_text(document.text, encoding="utf-8")
    else:
        click.echo(document.text, nl=False)
    progress(f"hub {hub.name}: configuration document {document.version}, {len(document.text.encode())} bytes "
             f"({channel}); {len(hub.routes)} route(s), {len(hub.all_tunnel_keys())} tunnel key(s) of "
             f"{len(hub.tunnel_hosts)} tunnel host(s)")
    if out is not None:
        progress(f"wrote {out}")


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    s = int(seconds)
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // subsize
            return f"{s // size}{unit}{rest}{sub}" if rest else f"{s // size}{unit}"
    return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"


class StatusInputError(click.ClickException):
    """A spec or outputs problem in `tunnelhub status`: exit 2, because 1 means "a route is not up"."""

    exit_code = 2


@main.command()
@required_spec_argument
@click.option("--hub", "hub_name", metavar="NAME", help="The hub to ask (default: the spec's only hub).")
@click.option("--outputs", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE", required=True,
              help="The hub stack outputs (`cdktf output --outputs-file FILE` or `terraform output -json > FILE`): "
                   "the proxies' addresses come from proxy_private_ips (Azure) / slot_private_ips (AWS).")
@click.option("--json", "as_json", is_flag=True, help="Print the documented JSON (schema 1) instead of tables.")
@click.option("--timeout-s", type=click.FloatRange(min=0.1, max=60), default=2.0, show_default=True,
              help="Per-proxy connect and answer timeout; all proxies are asked at once.")
def status(spec: Path, hub_name: str | None, outputs: Path, as_json: bool, timeout_s: float) -> None:
    """Ask every proxy's health endpoint how each route is: per route and proxy, then per route.

    Run it from a machine that may reach the proxies' health port: the stacks admit it only from the
    load balancer and the hub's proxies (Azure: the proxy subnet; AWS: the proxy security group), plus
    monitoring.scrape_cidrs where the spec has it. A proxy it cannot reach is named, with why.

    \b
    Exit codes:
      0  every route is up on every proxy
      1  some route is degraded or down, or some proxy did not answer
      2  bad arguments, spec or outputs file
      3  no proxy answered at all (route health unknown)

    --json prints {"schema": 1, "hub", "cloud", "health_port", "expected_config_version",
    "exit_code", "summary", "proxies": [{"slot", "address", "reachable", "error", "detail",
    "http_status", "config_version", "uptime_s", "reconciler": {"state", "detail"}}], "routes": [{"route", "in_spec", "state",
    "serving", "asked", "proxies", "per_proxy": [{"slot", "address", "state", "reason", "warning",
    "since_s", "age_s", "config_version"}]}]} (README "Operations").
    """
    from tunnelhub import onprem as O
    from tunnelhub import status as T
    from tunnelhub.onprem.outputs import PRIVATE_IPS_OUTPUTS
    from tunnelhub.userdata import UserDataError, render_document

    try:
        loaded = S.load_spec(spec)
    except S.SpecError as exc:
        raise StatusInputError(str(exc)) from None
    hub = pick_hub(loaded, hub_name)
    output_name = PRIVATE_IPS_OUTPUTS[hub.cloud]
    try:
        stack_outputs = O.read_outputs(outputs, hub.stack_name)
    except O.OnpremError as exc:
        raise StatusInputError(str(exc)) from None
    addresses = list(stack_outputs.private_ips.get(output_name, ()))
    if not addresses:
        raise StatusInputError(
            f"{stack_outputs.source} has no {output_name} output (the proxies' addresses on a {hub.cloud} hub): "
            f"write the file from the deployed stack with `cdktf output {hub.stack_name} --outputs-file {outputs}`")
    if len(addresses) != hub.proxies.count:
        progress(f"warning: {stack_outputs.source} lists {len(addresses)} proxies, the spec has proxies.count "
                 f"{hub.proxies.count}: asking the {len(addresses)} deployed (is the stack up to date?)")
    try:
        expected = render_document(hub).version
    except UserDataError:
        expected = None
    port = hub.proxies.health_port
    answers = T.ask_all(addresses, port, timeout_s)
    result = T.report(hub, addresses, answers, expected)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        sys.exit(result["exit_code"])
    click.echo(f"hub {hub.name} ({hub.cloud}): {len(addresses)} proxies from {stack_outputs.source}, "
               f"health port {port}" + (f"; the spec renders configuration {expected}" if expected else ""))
    table = []
    for row in result["routes"]:
        for cell in row["per_proxy"]:
            reason = cell["reason"] or ""
            if cell["warning"]:
                reason += f" (warning: {cell['warning']})"
            table.append({"route": row["route"] + ("" if row["in_spec"] else " (not in spec)"),
                          "proxy": f"{cell['slot']} {cell['address']}", "state": cell["state"].upper(),
                          "since": _duration(cell["since_s"]),
                          "checked": None if cell["age_s"] is None else f"{_duration(cell['age_s'])} ago",
                          "config": cell["config_version"], "reason": reason or None})
    print_table(table, ["route", "proxy", "state", "since", "checked", "config", "reason"])
    click.echo("")
    click.echo("routes:")
    width = max((len(r["route"]) for r in result["routes"]), default=0)
    for row in result["routes"]:
        if row["state"] == "unknown":
            how = "no proxy answered"
        else:
            how = f"{row['serving']} of {row['proxies']} proxies serve it"
            not_serving = [c for c in row["per_proxy"] if c["state"] in ("down", "missing")]
            if not_serving:
                how += "; not on " + ", ".join(f"slot {c['slot']} ({c['reason']})" for c in not_serving)
            unasked = [c for c in row["per_proxy"] if c["state"] == "unreachable"]
            if unasked:
                how += "; unknown on " + ", ".join(f"slot {c['slot']}" for c in unasked)
        click.echo(f"  {row['route'].ljust(width)}  {row['state'].upper():<8}  {how}")
    stale = [a for a in answers if a.reachable and expected and a.config_version != expected]
    for a in stale:
        click.echo(f"  note: slot {a.slot} runs configuration {a.config_version or 'unversioned'}, the spec renders "
                   f"{expected} (not applied yet, or the spec changed since the deploy)")
    for a in answers:
        rec = a.reconciler
        if rec is not None and rec["state"] not in (None, "applied"):
            click.echo(f"  note: slot {a.slot} reconciler {rec['state']}" + (f": {rec['detail']}" if rec["detail"] else ""))
    unreachable = [a for a in answers if not a.reachable]
    if unreachable:
        click.echo("")
        click.echo("proxies that did not answer:")
        for a in unreachable:
            click.echo(f"  {T.unreachable_advice(a, hub, port)}")
    click.echo("")
    click.echo(result["summary"])
    sys.exit(result["exit_code"])


@main.group()
def onprem() -> None:
    """The on-prem tunnel host: its .deb of autossh units."""


@onprem.command("build-deb")
@spec_argument
@click.option("--hub", "hub_name", metavar="NAME", help="The hub to build for (default: the spec's only hub).")
@click.option(
    "--outputs",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="FILE",
    help="The hub stack outputs: `cdktf output --outputs-file FILE` or `terraform output -json > FILE`.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("dist"),
    show_default=True,
    help="Where to write the .deb.",
)
@click.option(
    "--trust-on-first-use",
    is_flag=True,
    help="Build without the hub host key: trust the key the proxies present on first connection (not pinned).",
)
@click.option(
    "--version",
    "package_version",
    metavar="V",
    help="The package version (default: <tunnelhub version>+<inputs date>.<content digest>-1); on a hub with "
         "onprem.tunnel_hosts, +<tunnel host> ends its upstream part.",
)
@click.option("--tunnel-host", "tunnel_host", metavar="NAME",
              help="The tunnel host to build for (onprem.tunnel_hosts[].name); required when the hub has several.")
@click.option("--all-tunnel-hosts", is_flag=True, help="Build one package per tunnel host of the hub.")
def build_deb(
    spec: Path | None,
    hub_name: str | None,
    outputs: Path | None,
    out: Path,
    trust_on_first_use: bool,
    package_version: str | None,
    tunnel_host: str | None,
    all_tunnel_hosts: bool,
) -> None:
    """Build tunnelhub-<hub>_<version>_all.deb for one on-prem tunnel host of the hub.

    A hub with several tunnel hosts (onprem.tunnel_hosts) gets one package per host: name it with
    --tunnel-host NAME, or build them all with --all-tunnel-hosts. Each package holds that host's
    own ports; its postinst prints the key to add under that host's public_keys.
    """
    from tunnelhub import onprem as O

    spec_path = spec if spec is not None else default_spec_path()
    hub = pick_hub(load(spec_path), hub_name)
    names = [h.name for h in hub.tunnel_hosts]
    if all_tunnel_hosts and tunnel_host is not None:
        raise click.UsageError("give --tunnel-host NAME or --all-tunnel-hosts, not both")
    if tunnel_host is not None and tunnel_host not in names:
        raise click.BadParameter(f"hub {hub.name} has no tunnel host named {tunnel_host!r}; its tunnel hosts: "
                                 + ", ".join(names), param_hint="--tunnel-host")
    if tunnel_host is None and not all_tunnel_hosts and len(names) > 1:
        raise click.UsageError(f"hub {hub.name} has {len(names)} tunnel hosts ({', '.join(names)}), one package "
                               "each: choose one with --tunnel-host NAME, or build them all with --all-tunnel-hosts")
    hosts = names if all_tunnel_hosts else [tunnel_host]
    try:
        stack_outputs = O.read_outputs(outputs, hub.stack_name) if outputs is not None else None
        for host in hosts:  # every plan first: a spec or outputs problem writes nothing
            O.plan_package(hub, stack_outputs, tunnel_host=host, trust_on_first_use=trust_on_first_use)
        epoch = O.inputs_epoch(spec_path, outputs)
        builds = [O.build_deb(hub, stack_outputs, out, tunnel_host=host, trust_on_first_use=trust_on_first_use,
                              version=package_version, source_date_epoch=epoch) for host in hosts]
    except (S.SpecError, O.OnpremError) as exc:
        raise click.ClickException(str(exc)) from None
    for built in builds:
        _report_build(built)


def _report_build(built: Any) -> None:
    plan = built.plan
    for warning in plan.warnings:
        click.echo(f"tunnelhub: {warning}", err=True)
    click.echo(f"built {built.path} ({built.package} {built.version})")
    if plan.tunnel_host is not None:
        click.echo(f"  tunnel host {plan.tunnel_host}: its key goes under {plan.key_field}")
    for slot, endpoint in enumerate(plan.endpoints):
        click.echo(f"  slot {slot}: {endpoint}")
    click.echo(f"  addresses from {plan.endpoints_source}")
    for fwd in plan.forwards:
        click.echo(f"  tunnel {fwd.route}: -R {fwd.remote_forward}")
    if plan.host_key is not None:
        click.echo(f"  hub host key pinned: {plan.host_key.fingerprint}")
    else:
        click.echo("  hub host key NOT pinned: trusted on first use (--trust-on-first-use)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
