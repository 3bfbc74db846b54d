"""The hub configuration document: everything about a hub that changes while its proxies run.

``render_document(hub)`` renders, from the resolved spec, the one JSON document every proxy of
the hub applies live (docs/live-config.md): HAProxy's routes file, the health daemon's routes,
the tunnel user's ``authorized_keys``, the tunnel user's forwarding rules for sshd, the route
and key summaries the reconciler diffs, the port plan, and the **peers** (slot -> private
address) the rollout gate asks. The bootstrap cloud-init (:mod:`tunnelhub.userdata.render`)
holds none of it, so a routine change (a route, a key, a probe setting) changes this document
only: Azure VM ``user_data`` (updated in place) and an object in the AWS hub's files bucket.

Shape (``schema`` 1)::

    {"schema": 1, "hub": "<name>", "version": "<12 hex>", "checksum": "sha256:<64 hex>",
     "payload": {...}}

``checksum`` is the SHA-256 of the payload's canonical JSON (sorted keys, no whitespace, UTF-8),
``version`` its first 12 hex digits: the same content gives the same version, on every machine
and every synth. The reconciler (``files/tunnelhub_reconcile.py``) recomputes both and refuses a
document whose checksum, schema, hub or content does not verify.

The document is readable by anything on the proxy (Azure documents user data as unencrypted and
readable by every process on the VM) and by whoever reads the Terraform plan, so it must never
hold a secret: routes, ports, addresses and **public** keys only (``test_document_holds_no_secret``
keeps it that way).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tunnelhub.spec import Hub, Route, TunnelHost
from tunnelhub.userdata import layout as L
from tunnelhub.userdata.render import (
    DNS_HOLD_VALID_S,
    GLOBAL_MAXCONN_CAP,
    UserDataError,
    environment,
    haproxy_address,
    is_name,
)

SCHEMA = 1
VERSION_LENGTH = 12
AZURE_USER_DATA_LIMIT_BYTES = 65536
"""Azure: the VM's user data, base64-encoded as the API takes it, may not exceed 64 KB (Azure
docs, "User Data for Azure Virtual Machine"; the limit is read conservatively: on the encoded
text)."""
DOCUMENT_MAX_BYTES = 1024 * 1024
"""The reconciler refuses a larger document (the S3 object has no limit of its own)."""
AWS_DOCUMENT_KEY = L.AWS_DOCUMENT_KEY
AZURE_CONFIG_VERSION_TAG = "tunnelhub-config-version"
"""Azure: VM tag holding the document version, so the plan shows the change in clear."""
PAYLOAD_KEYS = ("authorized_keys", "haproxy_routes", "health", "health_port", "peers", "port_plan", "routes",
                "sshd_tunnel_forwarding", "tunnel_keys", "tunnel_user")


@dataclass(frozen=True)
class HubDocument:
    """The rendered document of one hub."""

    hub: str
    payload: dict[str, Any]
    version: str
    checksum: str
    text: str
    """The document as JSON (sorted keys, 2-space indent): the S3 object's content, and what the
    Azure user data decodes to (gzip-compressed only when it would not fit)."""

    @property
    def data(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "hub": self.hub, "version": self.version, "checksum": self.checksum,
                "payload": self.payload}

    def azure_user_data(self) -> str:
        """The base64 text for ``azurerm_linux_virtual_machine.user_data`` (gzip when needed)."""
        raw = self.text.encode("utf-8")
        encoded = base64.b64encode(raw).decode("ascii")
        if len(encoded) <= AZURE_USER_DATA_LIMIT_BYTES:
            return encoded
        packed = base64.b64encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode("ascii")
        if len(packed) > AZURE_USER_DATA_LIMIT_BYTES:
            raise UserDataError(
                f"hub {self.hub}: the hub configuration document is {len(raw)} bytes ({len(packed)} base64 "
                f"even gzip-compressed), over Azure's {AZURE_USER_DATA_LIMIT_BYTES}-byte user data limit; "
                "fewer routes or tunnel keys would make it fit")
        return packed


def canonical(value: Any) -> bytes:
    """The bytes the checksum covers (the reconciler computes the same)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def render_document(hub: Hub) -> HubDocument:
    """The hub configuration document of ``hub`` (the same for every proxy of the hub)."""
    payload = {
        "tunnel_user": hub.onprem.tunnel_user,
        "health_port": hub.proxies.health_port,
        "haproxy_routes": haproxy_routes_config(hub),
        "health": health_config(hub),
        "authorized_keys": tunnel_authorized_keys(hub),
        "sshd_tunnel_forwarding": sshd_tunnel_forwarding(hub),
        "routes": [{"name": r.name, **route_summary(hub, r)} for r in hub.routes],
        "tunnel_keys": [key_summary(k, host) for host, k in hub.all_tunnel_keys()],
        "peers": [{"slot": slot, "address": address} for slot, address in enumerate(peer_addresses(hub))],
        "port_plan": [{k: v for k, v in row.items() if v is not None} for row in hub.port_plan()],
    }
    assert tuple(sorted(payload)) == PAYLOAD_KEYS
    digest = hashlib.sha256(canonical(payload)).hexdigest()
    document = {"schema": SCHEMA, "hub": hub.name, "version": digest[:VERSION_LENGTH],
                "checksum": f"sha256:{digest}", "payload": payload}
    text = json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    if len(text.encode("utf-8")) > DOCUMENT_MAX_BYTES:
        raise UserDataError(f"hub {hub.name}: the hub configuration document is over {DOCUMENT_MAX_BYTES} bytes")
    return HubDocument(hub=hub.name, payload=payload, version=digest[:VERSION_LENGTH],
                       checksum=f"sha256:{digest}", text=text)


# ---------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------


def peer_addresses(hub: Hub) -> list[str]:
    """Every slot's private address, by slot: where the health endpoints of the peers answer."""
    if hub.cloud == "azure":
        return [str(ip) for ip in hub.azure_addresses().proxy_ips]
    return [str(ip) for ip in hub.aws_addresses().slot_private_ips]


def host_permit_listen(hub: Hub, host: TunnelHost) -> list[str]:
    """``localhost:<port>`` per tunnel route for one tunnel host: the listen addresses its ``-R``
    use (``Hub.host_tunnel_port``), and the only ones its keys may listen on (``permitlisten``)."""
    return [f"localhost:{hub.host_tunnel_port(r, host)}" for r in hub.tunnel_routes]


def permit_listen(hub: Hub) -> list[str]:
    """sshd's ``PermitListen`` for the tunnel user: every tunnel host's listen addresses, host by
    host in spec order (one host: ``localhost:<tunnel_port>`` per tunnel route). Each key's
    ``permitlisten=`` narrows it to its own host's (sshd applies both: sshd_config(5)
    ``PermitListen``, sshd(8) AUTHORIZED_KEYS FILE FORMAT ``permitlisten``)."""
    return [p for h in hub.tunnel_hosts for p in host_permit_listen(hub, h)]


def permit_open(hub: Hub) -> str:
    """The one ``-L`` destination the tunnel hosts may open: the proxy's health endpoint on its
    loopback (``127.0.0.1:<health_port>``), read by ``tunnelhub-<hub>-status`` through the tunnel.
    sshd matches it literally, without name lookup (sshd(8), AUTHORIZED_KEYS FILE FORMAT,
    ``permitopen``; sshd_config(5), ``PermitOpen``): ``-L ...:localhost:<health_port>`` is refused."""
    return f"127.0.0.1:{hub.proxies.health_port}"


def sshd_tunnel_forwarding(hub: Hub) -> str:
    return environment().get_template("sshd-tunnel-forwarding.conf.j2").render(
        permit_listen=permit_listen(hub), permit_open=permit_open(hub))


def authorized_keys_options(hub: Hub, host: TunnelHost | None = None) -> str:
    """The options in front of every key of tunnel host ``host`` (default: the hub's first host):
    ``-R`` to that host's own ports only, ``-L`` to the health endpoint only, no command, and only
    from that host's ``source_cidrs``. One host cannot listen on another's ports."""
    h = host if host is not None else hub.tunnel_hosts[0]
    options = ["restrict"]
    listen = host_permit_listen(hub, h)
    if listen:
        options.append("port-forwarding")
        options += [f'permitlisten="{p}"' for p in listen]
        options.append(f'permitopen="{permit_open(hub)}"')
    options.append(f'command="{L.NOLOGIN}"')
    options.append('from="' + ",".join(str(c) for c in h.source_cidrs) + '"')
    return ",".join(options)


def tunnel_authorized_keys(hub: Hub) -> str:
    """The tunnel user's ``authorized_keys``: every host's keys, each under its host's options. A
    hub written in the single-host form (``onprem.tunnel_public_keys``) renders as it did before
    several hosts were possible (no host comment lines)."""
    hosts = [{"name": h.name, "index": k, "options": authorized_keys_options(hub, h), "public_keys": list(h.public_keys)}
             for k, h in enumerate(hub.tunnel_hosts)]
    return environment().get_template("authorized_keys.j2").render(
        tunnel_user=hub.onprem.tunnel_user, multi_host=hub.multi_host, hosts=hosts,
    )


def key_fingerprint(public_key: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line (``ssh-keygen -l``, what sshd logs)."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def key_summary(public_key: str, host: str | None = None) -> dict[str, str]:
    """A tunnel key as the reconciler and the synth report see it: type, fingerprint, comment,
    and the tunnel host it belongs to."""
    parts = public_key.split(None, 2)
    summary = {"type": parts[0], "fingerprint": key_fingerprint(public_key)}
    if len(parts) > 2:
        summary["comment"] = parts[2]
    if host is not None:
        summary["host"] = host
    return summary


def route_summary(hub: Hub, route: Route) -> dict[str, Any]:
    """Everything about one route that its listener or its check depends on: two documents'
    summaries differ exactly when the route changed (the rollout gate compares these). A tunnel
    route lists every tunnel host's loopback port (``tunnel_hosts``) and its ``peer_port``, so a
    host added, removed or moved to other ports changes the route."""
    summary: dict[str, Any] = {
        "kind": route.kind, "port": route.port, "target": route.target,
        "max_connections": route.max_connections, "idle_timeout_min": route.idle_timeout_min,
        "probe": _probe(route),
    }
    if route.tunnel_port is not None:
        summary["tunnel_port"] = route.tunnel_port
        summary["tunnel_hosts"] = [{"host": h.name, "tunnel_port": hub.host_tunnel_port(route, h)}
                                   for h in hub.tunnel_hosts]
    if route.peer_port is not None:
        summary["peer_port"] = route.peer_port
    return summary


PEER_LISTEN_SUFFIX = "_peer"
"""``listen <route>_peer``: the route's peer path (``_`` never occurs in a route name, so it cannot
collide with another route's ``listen``)."""
PEER_SERVER_PREFIX = "peer_"
"""``server peer_<slot>``: a peer proxy's backup path (``_`` never occurs in a tunnel host name)."""
CHECK_RISE = 3
CHECK_FALL = 3
LOCAL_AGENT_INTER_MAX_S = 1.0
TUNNEL_CONNECT_TIMEOUT_S = 1
TUNNEL_RETRIES = 3


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def agent_path(route: str, host: str | None = None) -> str:
    """The health daemon's agent path: one tunnel host's check, or the route (any host up)."""
    return f"/agent/{route}" + (f"/{host}" if host is not None else "")


def _agent_send(path: str) -> str:
    # HAProxy config quoting (configuration.txt 2.2): \r and \n are interpreted in double quotes.
    return '"GET ' + path + ' HTTP/1.0\\r\\n\\r\\n"'


def peer_sources(hub: Hub) -> list[str]:
    """The source addresses a peer proxy's connection to a peer port comes from. Azure: the
    proxies' NIC addresses (static, the peers). AWS: the proxy subnets, because a proxy's
    connections leave from its primary (DHCP) address; the slot's fixed address is a secondary
    ``/32`` that adds no route, so it is never the source (docs/proxy-runtime.md)."""
    if hub.cloud == "azure":
        return peer_addresses(hub)
    return [str(net) for net in hub.aws_addresses().public_subnets]


def server_defaults(hub: Hub, route: Route) -> str:
    """The ``default-server`` line of a tunnel route's listeners: every server (tunnel host or peer)
    has the plain check on the health port (``port``: never on the server's own port), the agent on
    the same port (``agent-addr`` left out: the server's address, 127.0.0.1 or the peer's), every
    ``interval`` (a tunnel host's own server overrides ``agent-inter``), and marks itself DOWN at
    its first failed connect."""
    probe = route.probe
    return (f"default-server check port {hub.proxies.health_port} inter {_ms(probe.interval_s)} "
            f"rise {CHECK_RISE} fall {CHECK_FALL} agent-check agent-port {hub.proxies.health_port} "
            f"agent-inter {_ms(probe.interval_s)} observe layer4 error-limit 1 on-error mark-down")


def tunnel_servers(hub: Hub, route: Route) -> list[str]:
    """One HAProxy server per tunnel host of a tunnel route: its loopback port on this proxy, its
    agent the health daemon's cached check of that host (``GET /agent/<route>/<host>``)."""
    agent_inter = min(route.probe.interval_s, LOCAL_AGENT_INTER_MAX_S)
    return [f"server {h.name} 127.0.0.1:{hub.host_tunnel_port(route, h)} agent-inter {_ms(agent_inter)} "
            f"agent-send {_agent_send(agent_path(route.name, h.name))}" for h in hub.tunnel_hosts]


def peer_servers(hub: Hub, route: Route) -> list[str]:
    """One backup server per proxy slot at its peer port, its agent that peer's route state
    (``GET /agent/<route>``: up while any of its own tunnel hosts is). Every slot, self included: the
    document is the same on every proxy, and the daemon answers its own entry ``down #self``."""
    return [f"server {PEER_SERVER_PREFIX}{slot} {address}:{route.peer_port} backup "
            f"agent-send {_agent_send(agent_path(route.name))}"
            for slot, address in enumerate(peer_addresses(hub))]


def haproxy_routes_config(hub: Hub) -> str:
    """HAProxy's routes file: ``global maxconn`` (the routes' sum + 100, peer listeners included),
    the resolvers when a forward route names a host, one ``listen`` per route (a tunnel route: one
    server per tunnel host and every proxy's peer path as backups), one ``listen <route>_peer``
    per tunnel route (the peer path: this proxy's own tunnels only, from the peers only), and the
    exporter frontend the health daemon's ``GET /metrics`` reads (a Unix socket)."""
    listeners = []
    for r in hub.routes:
        listener: dict[str, Any] = {
            "name": r.name, "kind": r.kind, "port": r.port, "maxconn": r.max_connections,
            "idle_timeout_min": r.idle_timeout_min,
        }
        if r.kind == "tunnel":
            hosts = tunnel_servers(hub, r)
            listener.update(
                description=", ".join(f"{h.name} 127.0.0.1:{hub.host_tunnel_port(r, h)}" for h in hub.tunnel_hosts)
                + f" (ssh -R to {r.target})",
                defaults=server_defaults(hub, r), servers=hosts, backups=peer_servers(hub, r),
                peer_name=f"{r.name}{PEER_LISTEN_SUFFIX}", peer_port=r.peer_port,
                check_timeout=_ms(r.probe.timeout_s),
            )
        else:
            server = haproxy_address(r.target_host, r.target_port)
            if is_name(r.target_host):
                server += " resolvers dns resolve-prefer ipv4 init-addr none"
            listener.update(description=r.target, defaults=None, servers=[f"server remote {server}"], backups=[])
        listeners.append(listener)
    total = sum(r.max_connections for r in hub.routes) + sum(r.max_connections for r in hub.tunnel_routes)
    return environment().get_template("haproxy-routes.cfg.j2").render(
        hub_name=hub.name,
        global_maxconn=min(GLOBAL_MAXCONN_CAP, total + 100),
        resolvers=any(r.kind == "forward" and is_name(r.target_host) for r in hub.routes),
        dns_hold_valid_s=DNS_HOLD_VALID_S,
        listeners=listeners,
        peer_sources=peer_sources(hub),
        health_port=hub.proxies.health_port,
        rise=CHECK_RISE, fall=CHECK_FALL, retries=TUNNEL_RETRIES, connect_timeout_s=TUNNEL_CONNECT_TIMEOUT_S,
        local_agent_inter_max_s=LOCAL_AGENT_INTER_MAX_S,
        metrics_socket=L.HAPROXY_METRICS_SOCKET,
    )


def _probe(route: Route) -> dict:
    mode = route.probe_mode
    probe: dict = {"mode": mode, "interval_s": route.probe.interval_s, "timeout_s": route.probe.timeout_s}
    if mode == "mysql":
        probe["check_user"] = route.probe.check_user
    if mode == "tls":
        if route.probe.server_name is not None:
            probe["server_name"] = route.probe.server_name
        elif route.kind == "tunnel" and is_name(route.target_host):
            probe["server_name"] = route.target_host  # the check dials 127.0.0.1: send the real name
    return probe


def health_config(hub: Hub) -> dict:
    """The health daemon's routes (``/etc/tunnelhub/health.json`` without ``config_version``,
    which the reconciler adds when it writes the file). A tunnel route lists its tunnel hosts
    (``hosts``: name and loopback port): the daemon checks each, the route is up while any is."""
    routes = []
    for r in hub.routes:
        host, port = ("127.0.0.1", r.tunnel_port) if r.kind == "tunnel" else (r.target_host, r.target_port)
        route = {"name": r.name, "kind": r.kind, "host": host, "port": port, "probe": _probe(r)}
        if r.kind == "tunnel":
            # One check per tunnel host (its loopback port); host and port stay the first host's, so a
            # daemon that predates hosts refuses this file by its unknown field instead of misreading it.
            route["hosts"] = [{"name": h.name, "port": hub.host_tunnel_port(r, h)} for h in hub.tunnel_hosts]
        routes.append(route)
    return {"listen_address": "0.0.0.0", "port": hub.proxies.health_port, "routes": routes}
