"""Fake servers on 127.0.0.1 for the health endpoint tests and bench/health_bench.py.

Each fake speaks just enough of its protocol to answer a correct client, and records what
the client did (a COM_QUIT, a TLS close_notify, an abrupt close) so tests can assert that
a check ends its conversation cleanly. The tests in this file check the fakes themselves
against hand-written clients, so a fake that drifts from the protocol is caught here.
"""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Self

BEHAVIOURS = ("answer", "close", "hang")


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for the TLS-speaking fakes."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


def route(mode: str, port: int, *, kind: str = "tunnel", host: str = "127.0.0.1", name: str = "r1",
          interval_s: float = 0.2, timeout_s: float = 0.5, **probe) -> dict:
    """One route of a health daemon configuration, as the tests write it."""
    return {"name": name, "kind": kind, "host": host, "port": port,
            "probe": {"mode": mode, "interval_s": interval_s, "timeout_s": timeout_s, **probe}}


def wait_until(predicate, timeout_s: float = 5.0, what: str = "condition"):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def hammer(call, *, seconds: float, threads: int = 10) -> list:
    """Call ``call()`` in a loop from ``threads`` threads for ``seconds``; its results, in order
    of completion (the load balancer's probers, or Prometheus scrapers, at full rate)."""
    stop = threading.Event()
    results: list = []

    def loop() -> None:
        while not stop.is_set():
            results.append(call())

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join(5)
    return results


def free_port() -> int:
    """A loopback port with nothing listening on it (connects are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeServer:
    """Threaded loopback server; ``handler(conn, server)`` serves one connection.

    behaviour "close" accepts and closes at once (sshd when the channel open fails),
    "hang" accepts and never answers (a half-open tunnel), "answer" runs the protocol.
    """

    def __init__(self, protocol: str = "answer", behaviour: str = "answer", *,
                 certificate: tuple[Path, Path] | None = None, port: int = 0, **options):
        assert behaviour in BEHAVIOURS
        self.protocol = protocol
        self.behaviour = behaviour
        self.options = options
        self.certificate = certificate
        self.events: list[str] = []
        self.connections = 0
        self.sni: list[str | None] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))  # port: a target coming back where it was
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            for conn in self._held:
                try:
                    conn.close()
                except OSError:
                    pass

    def record(self, event: str) -> None:
        with self._lock:
            self.events.append(event)

    def count(self, event: str) -> int:
        with self._lock:
            return self.events.count(event)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            if self.behaviour == "close":
                conn.close()
                continue
            with self._lock:
                self._held.append(conn)
            if self.behaviour == "hang":
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            HANDLERS[self.protocol](self, conn)
        except (OSError, AssertionError, struct.error) as exc:
            self.record(f"error: {exc!r}")
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def server_tls_context(self) -> ssl.SSLContext:
        assert self.certificate is not None, "a TLS fake needs certificate=make_certificate(...)"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*map(str, self.certificate))

        def remember_sni(_sock, name, _context):
            self.sni.append(name)

        context.sni_callback = remember_sni
        return context


def recv_exact(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise ConnectionResetError("client closed")
        data += chunk
    return data


def wait_for_clean_tls_close(server: FakeServer, tls: ssl.SSLSocket) -> None:
    """Records tls-clean-close if the client sent close_notify, tls-abrupt-close if not."""
    try:
        data = tls.recv(1024)
    except (ssl.SSLEOFError, ConnectionResetError):
        server.record("tls-abrupt-close")
        return
    if data:
        server.record("tls-unexpected-data")
        return
    server.record("tls-clean-close")
    try:
        tls.unwrap()  # answer with our close_notify, as PostgreSQL's secure_close() does
    except OSError:
        pass


# --- mysql -----------------------------------------------------------------------------

MYSQL_CAPS = 0x0001 | 0x0004 | 0x0200 | 0x2000 | 0x8000 | 0x80000 | 0x100000


def _mysql_packet(seq: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


def _mysql_read(conn: socket.socket) -> tuple[int, bytes]:
    header = recv_exact(conn, 4)
    return header[3], recv_exact(conn, int.from_bytes(header[:3], "little"))


def mysql_greeting(plugin: str = "mysql_native_password", version: str = "5.5.5-10.11.99-FakeDB") -> bytes:
    scramble = b"abcdefghijklmnopqrst"
    return (b"\x0a" + version.encode() + b"\x00" + struct.pack("<I", 7) + scramble[:8] + b"\x00"
            + struct.pack("<H", MYSQL_CAPS & 0xFFFF) + bytes([33]) + struct.pack("<H", 2)
            + struct.pack("<H", MYSQL_CAPS >> 16) + bytes([21]) + b"\x00" * 10
            + scramble[8:] + b"\x00" + plugin.encode() + b"\x00")


def mysql_err(code: int, message: str, sqlstate: bytes | None = b"28000") -> bytes:
    state = b"#" + sqlstate if sqlstate else b""
    return b"\xff" + struct.pack("<H", code) + state + message.encode()


def _parse_handshake_response(payload: bytes) -> dict:
    flags, _max_packet, _charset = struct.unpack("<IIB", payload[:9])
    assert payload[9:32] == b"\x00" * 23, "filler must be 23 zero bytes"
    user, _, rest = payload[32:].partition(b"\x00")
    auth_len = rest[0]
    auth, rest = rest[1:1 + auth_len], rest[1 + auth_len:]
    plugin = rest.split(b"\x00", 1)[0].decode() if flags & 0x80000 else ""
    return {"flags": flags, "user": user.decode(), "auth": auth, "plugin": plugin}


def serve_mysql(server: FakeServer, conn: socket.socket) -> None:
    """options: greeting_error=(code, msg), plugin, switch_to, fast_auth, login ("ok"/"err"),
    login_error=(code, msg), user (the only user that may log in)."""
    opts = server.options
    if "greeting_error" in opts:
        code, message = opts["greeting_error"]
        conn.sendall(_mysql_packet(0, mysql_err(code, message, sqlstate=None)))
        return
    conn.sendall(_mysql_packet(0, mysql_greeting(opts.get("plugin", "mysql_native_password"))))
    try:
        seq, payload = _mysql_read(conn)
    except ConnectionResetError:
        server.record("aborted-before-login")  # what MariaDB logs as "Aborted connection"
        return
    response = _parse_handshake_response(payload)
    server.record(f"login:{response['user']}:{response['plugin']}:{len(response['auth'])}")
    assert seq == 1
    if opts.get("switch_to"):
        conn.sendall(_mysql_packet(seq + 1, b"\xfe" + opts["switch_to"].encode() + b"\x00" + b"x" * 20 + b"\x00"))
        seq, answer = _mysql_read(conn)
        server.record(f"switch-answer:{answer.hex()}")
    if opts.get("fast_auth"):
        conn.sendall(_mysql_packet(seq + 1, b"\x01\x03"))
        seq += 1
    allowed = opts.get("user", "tunnelhub_check")
    if opts.get("login", "ok") == "ok" and response["user"] == allowed:
        conn.sendall(_mysql_packet(seq + 1, b"\x00\x00\x00\x02\x00\x00\x00"))
    else:
        code, message = opts.get("login_error", (1045, f"Access denied for user '{response['user']}'"))
        conn.sendall(_mysql_packet(seq + 1, mysql_err(code, message)))
        return
    try:
        seq, command = _mysql_read(conn)
    except ConnectionResetError:
        server.record("aborted-after-login")
        return
    server.record("quit" if (seq, command) == (0, b"\x01") else f"command:{command.hex()}")


# --- postgresql ------------------------------------------------------------------------


def serve_postgresql(server: FakeServer, conn: socket.socket) -> None:
    """options: ssl (bool, default True)."""
    request = recv_exact(conn, 8)
    assert request == struct.pack("!II", 8, 80877103), f"not an SSLRequest: {request!r}"
    if not server.options.get("ssl", True):
        conn.sendall(b"N")
        server.record("no-ssl-close" if conn.recv(1) == b"" else "startup-after-N")
        return
    conn.sendall(b"S")
    try:
        tls = server.server_tls_context().wrap_socket(conn, server_side=True)
    except (ssl.SSLError, ConnectionResetError) as exc:
        server.record(f"tls-handshake-failed:{exc}")  # PG: "could not accept SSL connection"
        return
    server.record("tls-handshake-ok")
    wait_for_clean_tls_close(server, tls)


# --- sqlserver, oracle, tls, banner ---------------------------------------------------


def serve_sqlserver(server: FakeServer, conn: socket.socket) -> None:
    header = recv_exact(conn, 8)
    kind, status, length = struct.unpack(">BBH", header[:4])
    assert (kind, status) == (0x12, 0x01), f"not a PRELOGIN: {header!r}"
    recv_exact(conn, length - 8)
    server.record("prelogin")
    payload = (struct.pack(">BHH", 0x00, 11, 6) + struct.pack(">BHH", 0x01, 17, 1) + b"\xff"
               + bytes([16, 0]) + struct.pack(">H", 4135) + b"\x00\x00" + b"\x02")
    conn.sendall(struct.pack(">BBHHBB", 0x04, 0x01, 8 + len(payload), 0, 1, 0) + payload)
    server.record("clean-close" if conn.recv(1) == b"" else "unexpected-data")


def serve_oracle(server: FakeServer, conn: socket.socket) -> None:
    """options: resend_first (bool)."""
    for attempt in range(2):
        header = recv_exact(conn, 8)
        length, kind = struct.unpack(">H", header[:2])[0], header[4]
        body = recv_exact(conn, length - 8)
        assert kind == 1, f"not a TNS CONNECT: {header!r}"
        offset, data_len = struct.unpack(">H", body[18:20])[0], struct.unpack(">H", body[16:18])[0]
        data = (header + body)[offset:offset + data_len]
        server.record(f"connect:{data.decode()}")
        if server.options.get("resend_first") and attempt == 0:
            conn.sendall(struct.pack(">HHBBH", 8, 0, 11, 0, 0))
            continue
        text = b"(DESCRIPTION=(TMP=)(VSNNUM=318767104)(ERR=0)(ALIAS=LISTENER))"
        text = server.options.get("refuse_text", text)
        body = struct.pack(">BBH", 0x22, 0x00, len(text)) + text
        conn.sendall(struct.pack(">HHBBH", 8 + len(body), 0, 4, 0, 0) + body)
        return


def serve_tls(server: FakeServer, conn: socket.socket) -> None:
    tls = server.server_tls_context().wrap_socket(conn, server_side=True)
    server.record("tls-handshake-ok")
    wait_for_clean_tls_close(server, tls)


def serve_banner(server: FakeServer, conn: socket.socket) -> None:
    conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
    conn.recv(1)


def serve_idle(server: FakeServer, conn: socket.socket) -> None:
    """Accepts and stays open until the client leaves (a server that waits for the client)."""
    conn.settimeout(10)
    conn.recv(1)


HANDLERS = {
    "mysql": serve_mysql,
    "postgresql": serve_postgresql,
    "sqlserver": serve_sqlserver,
    "oracle": serve_oracle,
    "tls": serve_tls,
    "banner": serve_banner,
    "connect": serve_idle,
    "answer": serve_idle,
}


# --- the fakes checked with independent hand-written clients ---------------------------


def test_fake_mysql_records_an_abort_when_the_client_leaves_before_login():
    with FakeServer("mysql") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
            assert sock.recv(5)[4] == 0x0A  # protocol 10 greeting
        for _ in range(50):
            if server.events:
                break
            threading.Event().wait(0.02)
    assert server.events == ["aborted-before-login"]


def test_fake_oracle_answers_a_tnsping_packet_captured_from_a_python_tnsping():
    # The CONNECT packet of ismvru/tnsping-py (a tnsping reimplementation), byte for byte.
    packet = (b"\x00W\x00\x00\x01\x00\x00\x00\x018\x01,\x00\x00\x08\x00\x7f\xff"
              b"\x7f\x08\x00\x00\x01\x00\x00\x1d\x00:\x00\x00\x00\x00\x00\x00"
              b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x190\x00\x00\x00\x8d"
              b"\x00\x00\x00\x00\x00\x00\x00\x00(CONNECT_DATA=(COMMAND=ping))")
    with FakeServer("oracle") as server, socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        sock.sendall(packet)
        reply = sock.recv(1024)
    assert reply[4] == 4 and b"(ERR=0)" in reply
    assert server.events == ["connect:(CONNECT_DATA=(COMMAND=ping))"]
