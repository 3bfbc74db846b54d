"""Ask a proxy's health endpoint directly (from the LB's namespace), as the LB would."""

from __future__ import annotations

import http.client

from .netns import in_netns


def probe(netns: str, host: str, port: int, path: str, *, timeout_s: float = 5.0) -> int:
    """HTTP status of ``GET path``; 0 when no HTTP answer came (refused, timeout)."""
    try:
        with in_netns(netns):
            conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
            conn.connect()
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return 0
