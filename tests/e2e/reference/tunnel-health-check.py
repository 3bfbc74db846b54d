# /usr/local/bin/tunnel-health-check.py
#!/usr/bin/env python3
import socket
import http.server

TUNNEL_PORT = 13306

class HealthHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            s = socket.create_connection(("127.0.0.1", TUNNEL_PORT), timeout=3)
            s.close()
            self.send_response(200)
        except Exception:
            self.send_response(503)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("0.0.0.0", 8080), HealthHandler).serve_forever()
