#!/usr/bin/env python3
"""SAMPLE health endpoint for the lab's sample cloud-init -- NOT tunnelhub's health daemon.

It only stands in for the generated ``tunnelhub_health.py`` so the lab's plumbing can be run
end to end before the real one exists: ``GET /routes/<name>`` answers 200 when a connection to
the route's loopback tunnel port gets the server's first byte (the MySQL greeting) within
``timeout_s``, else 503; ``GET /`` answers a JSON summary.
"""

import argparse
import http.server
import json
import socket


def route_ok(port, timeout_s):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            return len(sock.recv(1)) == 1
    except OSError:
        return False


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    with open(parser.parse_args().config, encoding="utf-8") as handle:
        config = json.load(handle)
    routes = config["routes"]
    timeout_s = config.get("timeout_s", 2.0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/":
                body = json.dumps({name: route_ok(r["tunnel_port"], timeout_s)
                                   for name, r in routes.items()}).encode()
                status = 200
            elif self.path.startswith("/routes/") and self.path[8:] in routes:
                status = 200 if route_ok(routes[self.path[8:]]["tunnel_port"], timeout_s) else 503
                body = b""
            else:
                status, body = 404, b""
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((config.get("listen", "0.0.0.0"), config["port"]),
                                             Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
