"""Where things live on a proxy: the contract between the bootstrap, the hub configuration
document and the reconciler (docs/proxy-runtime.md lists every path, docs/live-config.md the
live part).

The bootstrap (cloud-init, :mod:`tunnelhub.userdata.render`) writes the machine's static files,
the reconciler's own config and the units; the reconciler (``files/tunnelhub_reconcile.py``)
writes the **document-managed** files below from the hub configuration document
(:mod:`tunnelhub.userdata.document`), at boot and whenever the document changes.
"""

from __future__ import annotations

LIB_DIR = "/usr/local/lib/tunnelhub"
CONF_DIR = "/etc/tunnelhub"
STATE_DIR = "/var/lib/tunnelhub"
RUN_DIR = "/run/tunnelhub"

# -- scripts --------------------------------------------------------------------------------------
HEALTH_DAEMON_PATH = f"{LIB_DIR}/tunnelhub_health.py"
BOOT_SCRIPT_PATH = f"{LIB_DIR}/tunnelhub_boot.py"
RECONCILER_PATH = f"{LIB_DIR}/tunnelhub_reconcile.py"

# -- static files (bootstrap) ---------------------------------------------------------------------
BOOT_CONFIG_PATH = f"{CONF_DIR}/boot.json"
RECONCILE_CONFIG_PATH = f"{CONF_DIR}/reconcile.json"
HAPROXY_CONFIG_PATH = "/etc/haproxy/haproxy.cfg"
"""HAProxy's static part: global settings (no maxconn: the routes file sets it) and defaults."""
SSHD_DROPIN_PATH = "/etc/ssh/sshd_config.d/10-tunnelhub.conf"
SYSCTL_DROPIN_PATH = "/etc/sysctl.d/60-tunnelhub.conf"
HEALTH_UNIT_PATH = "/etc/systemd/system/tunnelhub-health.service"
RECONCILE_UNIT_PATH = "/etc/systemd/system/tunnelhub-reconcile.service"
HAPROXY_UNIT_DROPIN_PATH = "/etc/systemd/system/haproxy.service.d/10-tunnelhub.conf"
HOST_KEY_PATH = "/etc/ssh/tunnelhub_host_ed25519_key"
SLOT_FILE = f"{CONF_DIR}/slot"
"""AWS: the slot number, written by the slot wait at boot."""

# -- document-managed files (the reconciler writes them) ------------------------------------------
HAPROXY_ROUTES_PATH = "/etc/haproxy/tunnelhub-routes.cfg"
"""HAProxy's live part: ``global maxconn``, the resolvers, one ``listen`` per route."""
HEALTH_CONFIG_PATH = f"{CONF_DIR}/health.json"
TUNNEL_AUTHORIZED_KEYS_DIR = "/etc/ssh/authorized_keys.d"
"""The tunnel user's keys: ``<dir>/<tunnel_user>``, root-owned (the user cannot change them)."""
SSHD_TUNNEL_FORWARDING_PATH = "/etc/ssh/tunnelhub/tunnel-forwarding.conf"
"""``AllowTcpForwarding``, ``PermitListen`` and ``PermitOpen`` of the tunnel user, included inside the static
drop-in's ``Match User`` block (so outside ``sshd_config.d``: sshd would read it globally there)."""

# -- reconciler state -------------------------------------------------------------------------------
APPLIED_DOCUMENT_PATH = f"{STATE_DIR}/applied-config.json"
RECONCILE_STATUS_PATH = f"{RUN_DIR}/reconcile.json"

# -- units ------------------------------------------------------------------------------------------
HAPROXY_UNIT = "haproxy.service"
HEALTH_UNIT = "tunnelhub-health.service"
RECONCILE_UNIT = "tunnelhub-reconcile.service"
SSH_UNIT = "ssh.service"

NOLOGIN = "/usr/sbin/nologin"
HAPROXY = "/usr/sbin/haproxy"
HAPROXY_PID_FILE = "/run/haproxy.pid"
HAPROXY_MASTER_SOCKET = "/run/haproxy-master.sock"
# HAProxy's Prometheus exporter (the routes file's tunnelhub_metrics frontend), read by the health daemon
HAPROXY_METRICS_SOCKET = "/run/haproxy/tunnelhub-metrics.sock"

AWS_DOCUMENT_KEY = "config/hub-config.json"
"""AWS: the hub configuration document's key in the hub's files bucket (fixed: the proxies poll it)."""
AZURE_USER_DATA_URL = "http://169.254.169.254/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
"""Azure: where a VM reads its user data (the document, base64) from the instance metadata service."""
AWS_IMDS_URL = "http://169.254.169.254"
