"""A stand-in for Azure's instance metadata service inside a proxy's namespace: the channel of the
hub configuration document, faked at the edge so the reconciler runs its real fetch path.

:class:`FakeImds` puts ``169.254.169.254/32`` on the namespace's loopback and answers, on port 80,
what the reconciler's shipped configuration asks for: ``GET
/metadata/instance/compute/userData?api-version=...&format=text`` with the ``Metadata: true``
header, answered with the VM's user data (the base64 text ``azurerm_linux_virtual_machine.user_data``
holds). Like the real service it refuses a request without that header (HTTP 400) and answers an
unknown path with 404. What it does not mimic (stated): the other endpoints, rate limiting, and
the delay between an ARM update of the user data and the new value appearing in IMDS (Azure
documents none; the lab's "channel update" is the instant :meth:`set_user_data` returns).

The server's socket is created inside the namespace (only the calling thread enters it), and
served from a thread of the test process; :meth:`stop` closes it.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from .netns import in_netns
from .proc import run

IMDS_ADDRESS = "169.254.169.254"
USER_DATA_PATH = "/metadata/instance/compute/userData"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        imds = self.server.imds
        imds.requests.append((time.monotonic(), self.path))
        if self.headers.get("Metadata", "").lower() != "true":
            self._send(400, b'{"error": "Bad request. Required metadata header not specified"}')
        elif parts.path != USER_DATA_PATH or "api-version" not in query:
            self._send(404, b'{"error": "Not found"}')
        else:
            self._send(200, imds.user_data.encode("ascii"), content_type="text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    imds: FakeImds


class FakeImds:
    """Azure IMDS's user data endpoint in namespace ``netns``; ``user_data`` is the base64 text."""

    def __init__(self, netns: str, user_data: str = "") -> None:
        self.netns = netns
        self.user_data = user_data
        self.requests: list[tuple[float, str]] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeImds:
        shown = run(["ip", "-o", "addr", "show", "dev", "lo"], netns=self.netns).stdout
        if f" {IMDS_ADDRESS}/" not in shown:
            run(["ip", "addr", "add", f"{IMDS_ADDRESS}/32", "dev", "lo"], netns=self.netns)
        with in_netns(self.netns):
            self._server = _Server((IMDS_ADDRESS, 80), _Handler)
        self._server.imds = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"imds-{self.netns}", daemon=True)
        self._thread.start()
        return self

    def set_user_data(self, user_data: str) -> float:
        """Update the channel (what ``terraform apply`` of a new user_data does); the time it did."""
        self.user_data = user_data
        return time.monotonic()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
