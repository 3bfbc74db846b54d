"""The mysql and postgresql checks against REAL servers: a healthy target logs nothing.

MariaDB 10.11 (Debian's mariadb-server) and PostgreSQL (Debian's postgresql package) are
started by the tests in temporary directories, as processes stopped by PID. Each test runs
the real check many times and asserts that the server's log and counters did not move,
then runs the naive probe (connect and close) as the negative control and asserts that
it DOES leave traces, so these tests can fail.

MariaDB's host cache ignores loopback clients, and max_connect_errors host blocking is
what the mysql check must not feed. So MariaDB runs in a network namespace of our own
(``hh-mdb<pid>``) on 192.0.2.1 (a documentation address that never leaves the namespace),
with a private /etc/hosts in its own mount namespace so the address resolves and the
host is "validated", and the checks run from inside that namespace. Needs root.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FILES = HERE.parents[1] / "tunnelhub" / "userdata" / "files"
sys.path[:0] = [str(FILES), str(HERE)]

import tunnelhub_health as health  # noqa: E402
from test_health_fakes import free_port, make_certificate  # noqa: E402

CHECKS = 50
MAX_CONNECT_ERRORS = 5

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespace, server users)")


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _wait(predicate, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _route(mode: str, host: str, port: int, **probe) -> dict:
    return {"name": "db", "kind": "tunnel", "host": host, "port": port,
            "probe": {"mode": mode, "interval_s": 1.0, "timeout_s": 2.0, **probe}}


# --------------------------------------------------------------------------------------
# MariaDB
# --------------------------------------------------------------------------------------

MARIADB_TOOLS = ("mariadb-install-db", "mariadbd", "mariadb", "ip", "unshare")


class MariaDB:
    address = "192.0.2.1"
    client_name = "hh-mdb-client"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.netns = f"hh-mdb{os.getpid()}"
        self.port = 33306
        self.socket = workdir / "mariadb.sock"
        self.error_log = workdir / "error.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        data = self.workdir / "data"
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                        "--auth-root-authentication-method=socket", "--skip-test-db"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(["ip", "netns", "add", self.netns], check=True, timeout=10)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True, timeout=10)
        subprocess.run(["ip", "-n", self.netns, "addr", "add", f"{self.address}/32", "dev", "lo"],
                       check=True, timeout=10)
        hosts = self.workdir / "hosts"
        hosts.write_text(f"127.0.0.1 localhost\n{self.address} {self.client_name}\n")
        server = " ".join([
            "exec mariadbd --no-defaults", f"--datadir={data}", "--user=root",
            f"--socket={self.socket}", f"--port={self.port}", f"--bind-address={self.address}",
            f"--log-error={self.error_log}", f"--pid-file={self.workdir / 'mariadb.pid'}",
            "--performance-schema=ON", "--log-warnings=2", "--skip-log-bin",
            "--innodb-buffer-pool-size=32M", f"--max-connect-errors={MAX_CONNECT_ERRORS}",
        ])
        # unshare -m: the bind-mounted /etc/hosts exists only for this server process
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "-m", "sh", "-c",
             f"mount --bind {hosts} /etc/hosts && {server}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: self.sql("SELECT 1", check=False) is not None or self.process.poll() is not None,
              60, "MariaDB to accept connections")
        assert self.process.poll() is None, self.error_log.read_text()
        self.sql(f"CREATE USER 'tunnelhub_check'@'{self.address}'")

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=10, check=False)

    def sql(self, statement: str, check: bool = True) -> list[list[str]] | None:
        done = subprocess.run(["mariadb", "--no-defaults", f"--socket={self.socket}", "-u", "root",
                               "-N", "-B", "-e", statement], capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            if check:
                raise AssertionError(done.stderr)
            return None
        return [line.split("\t") for line in done.stdout.splitlines()]

    def counters(self) -> dict[str, int]:
        rows = self.sql("SELECT COALESCE(SUM(SUM_CONNECT_ERRORS), 0), COALESCE(SUM(COUNT_HANDSHAKE_ERRORS), 0), "
                        "COALESCE(SUM(COUNT_AUTHENTICATION_ERRORS + COUNT_AUTH_PLUGIN_ERRORS), 0) "
                        "FROM performance_schema.host_cache")
        status = dict(self.sql("SHOW GLOBAL STATUS WHERE Variable_name IN ('Aborted_connects', 'Aborted_clients')"))
        return {"host_cache.SUM_CONNECT_ERRORS": int(rows[0][0]),
                "host_cache.COUNT_HANDSHAKE_ERRORS": int(rows[0][1]),
                "host_cache.auth_errors": int(rows[0][2]),  # MariaDB counts access denied in AUTH_PLUGIN
                "Aborted_connects": int(status["Aborted_connects"]),
                "Aborted_clients": int(status["Aborted_clients"])}

    def host_cache_row(self) -> dict[str, str] | None:
        rows = self.sql("SELECT HOST, HOST_VALIDATED FROM performance_schema.host_cache "
                        f"WHERE IP = '{self.address}'")
        return {"HOST": rows[0][0], "HOST_VALIDATED": rows[0][1]} if rows else None

    def in_namespace(self, code: str, timeout_s: float = 120) -> object:
        """Run python code inside the namespace (as the proxy would), return its JSON output."""
        done = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONPATH": str(FILES)}, check=False)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def run_checks(self, count: int, **probe) -> list[dict]:
        route = _route("mysql", self.address, self.port, **probe)
        return self.in_namespace(
            "import json, tunnelhub_health as h\n"
            f"cfg = h.parse_config({{'port': 8080, 'routes': [{route!r}]}})\n"
            f"out = [h.run_check(cfg.routes[0]) for _ in range({count})]\n"
            "print(json.dumps([{'healthy': r.healthy, 'reason': r.reason, 'warning': r.warning,"
            " 'latency_ms': r.latency_s * 1000} for r in out]))\n")

    def connect_and_close(self, count: int) -> None:
        """The reference health check: TCP connect, close, nothing said."""
        self.in_namespace(
            "import socket, time\n"
            f"for _ in range({count}):\n"
            f"    s = socket.create_connection(({self.address!r}, {self.port}), timeout=2)\n"
            "    s.close()\n"
            "    time.sleep(0.05)\n"
            "print('[]')\n")


@pytest.fixture(scope="module")
def mariadb():
    missing = [tool for tool in MARIADB_TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        pytest.skip(f"needs root and {', '.join(missing) or 'MariaDB'} (apt-get install mariadb-server)")
    workdir = Path(tempfile.mkdtemp(prefix="hh-mdb-"))
    server = MariaDB(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _log_size(path: Path) -> int:
    return path.stat().st_size


def _log_since(path: Path, offset: int) -> str:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode("utf-8", "replace")


def test_mysql_check_leaves_no_trace_on_a_real_mariadb(mariadb):
    mariadb.sql("FLUSH HOSTS")
    before, offset = mariadb.counters(), _log_size(mariadb.error_log)

    results = mariadb.run_checks(CHECKS)

    time.sleep(0.5)  # let the server write whatever it would
    assert [r["healthy"] for r in results] == [True] * CHECKS, results[-1]
    assert results[0]["reason"].startswith("MySQL login OK as tunnelhub_check (server 10.11.")
    assert _log_since(mariadb.error_log, offset) == ""  # no "Aborted connection" or anything else
    assert mariadb.counters() == before
    # the host cache did see us, validated: exactly where handshake errors would have counted
    assert mariadb.host_cache_row() == {"HOST": mariadb.client_name, "HOST_VALIDATED": "YES"}
    assert CHECKS > MAX_CONNECT_ERRORS  # without a clean goodbye the host would now be blocked


def test_negative_control_connect_and_close_is_logged_and_blocks_the_host(mariadb):
    mariadb.sql("FLUSH HOSTS")
    before, offset = mariadb.counters(), _log_size(mariadb.error_log)

    mariadb.connect_and_close(MAX_CONNECT_ERRORS)
    time.sleep(0.3)
    log = _log_since(mariadb.error_log, offset)
    after = mariadb.counters()
    blocked = mariadb.run_checks(1)[0]
    mariadb.sql("FLUSH HOSTS")
    assert log.count("Aborted connection") == MAX_CONNECT_ERRORS, log
    assert "This connection closed normally without authentication" in log
    assert after["host_cache.SUM_CONNECT_ERRORS"] - before["host_cache.SUM_CONNECT_ERRORS"] == MAX_CONNECT_ERRORS
    assert after["Aborted_connects"] - before["Aborted_connects"] == MAX_CONNECT_ERRORS
    # and the check reports the block as the reason the route is down
    assert not blocked["healthy"]
    assert blocked["reason"].startswith("server refused the connection: ERR 1129 Host ")
    assert "is blocked because of many connection errors" in blocked["reason"]


def test_mysql_check_with_a_missing_user_is_healthy_with_a_warning_and_no_connect_errors(mariadb):
    mariadb.sql("FLUSH HOSTS")
    before, offset = mariadb.counters(), _log_size(mariadb.error_log)

    result = mariadb.run_checks(1, check_user="hh_missing_user")[0]

    time.sleep(0.3)
    after = mariadb.counters()
    assert result["healthy"] and result["reason"].startswith("MySQL server 10.11.")
    assert result["warning"].startswith("check user 'hh_missing_user' rejected: ERR 1045 Access denied for user "
                                        f"'hh_missing_user'@'{mariadb.client_name}' (using password: NO)")
    # the cost the warning announces: one access-denied line per check, counted as an
    # authentication error, never as a connect error toward max_connect_errors blocking
    assert _log_since(mariadb.error_log, offset).count("Access denied for user 'hh_missing_user'") == 1
    assert after["host_cache.SUM_CONNECT_ERRORS"] == before["host_cache.SUM_CONNECT_ERRORS"]
    assert after["host_cache.auth_errors"] == before["host_cache.auth_errors"] + 1


def test_mysql_check_reports_a_stopped_server(mariadb, tmp_path):
    # Not a tunnel here: the stopped server's port refuses (the tunnel's "closed before
    # greeting" comes from sshd and is covered by the fakes and the lab).
    route = health.parse_config({"port": 8080, "routes": [_route("mysql", "127.0.0.1", free_port())]}).routes[0]
    result = health.run_check(route)
    assert not result.healthy and result.reason.startswith("connection refused on 127.0.0.1:")


# --------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------


def _postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


class PostgreSQL:
    def __init__(self, workdir: Path, bindir: Path):
        self.workdir = workdir
        self.bindir = bindir
        self.port = free_port()
        self.log = workdir / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        cert, key = make_certificate(self.workdir)
        for path in (self.workdir, cert, key):
            shutil.chown(path, "postgres", "postgres")
        self.workdir.chmod(0o700)
        key.chmod(0o600)
        subprocess.run([str(self.bindir / "initdb"), "-D", str(self.workdir / "data"), "-A", "trust",
                        "-U", "postgres", "--no-sync"], check=True, capture_output=True, timeout=120,
                       user="postgres", group="postgres", extra_groups=[])
        with open(self.workdir / "data" / "postgresql.conf", "a") as conf:  # ALTER SYSTEM may override these
            conf.write(f"ssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\n")
        log = open(self.log, "wb")  # noqa: SIM115 - handed to the server process
        self.process = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.workdir / "data"),
             "-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}",
             "-c", f"unix_socket_directories={self.workdir}", "-c", "logging_collector=off",
             "-c", "shared_buffers=16MB"],
            stdout=log, stderr=log, user="postgres", group="postgres", extra_groups=[])
        log.close()
        _wait(lambda: "ready to accept connections" in self.log.read_text() or self.process.poll() is not None,
              60, "PostgreSQL to accept connections")
        assert self.process.poll() is None, self.log.read_text()

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process, signal.SIGINT)  # fast shutdown

    def sql(self, statement: str) -> str:
        done = subprocess.run([str(self.bindir / "psql"), "-h", str(self.workdir), "-p", str(self.port),
                               "-U", "postgres", "-At", "-c", statement],
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def set_ssl(self, enabled: bool) -> None:
        self.sql(f"ALTER SYSTEM SET ssl = {'on' if enabled else 'off'}")
        self.sql("SELECT pg_reload_conf()")
        _wait(lambda: self.sql("SHOW ssl") == ("on" if enabled else "off"), 10, "ssl to change")
        time.sleep(0.3)  # let the reload's own log lines land before a test measures

    def route(self) -> health.Route:
        return health.parse_config({"port": 8080, "routes": [_route("postgresql", "127.0.0.1", self.port)]}).routes[0]


@pytest.fixture(scope="module")
def postgresql():
    bindir = _postgres_bindir()
    if os.geteuid() != 0 or bindir is None or shutil.which("openssl") is None:
        pytest.skip("needs root and PostgreSQL (apt-get install postgresql)")
    workdir = Path(tempfile.mkdtemp(prefix="hh-pg-"))
    server = PostgreSQL(workdir, bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("ssl_enabled, reason", [
    (True, "PostgreSQL answered SSLRequest, TLS handshake OK (TLSv1.3)"),
    (False, "PostgreSQL answered SSLRequest (no TLS)"),
])
def test_postgresql_check_leaves_no_trace_on_a_real_server(postgresql, ssl_enabled, reason):
    postgresql.set_ssl(ssl_enabled)
    offset = _log_size(postgresql.log)

    results = [health.run_check(postgresql.route()) for _ in range(CHECKS)]

    time.sleep(0.5)
    assert all(r.healthy for r in results), results[-1]
    assert {r.reason for r in results} == {reason}
    assert _log_since(postgresql.log, offset) == ""


def _ssl_request(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    sock.sendall(struct.pack("!II", 8, 80877103))
    assert sock.recv(1) == b"S"
    return sock


def _naive_close_after_s(port: int) -> None:
    _ssl_request(port).close()


def _naive_close_after_handshake(port: int) -> None:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.wrap_socket(_ssl_request(port)).close()  # no close_notify


@pytest.mark.parametrize("probe, logged", [
    (_naive_close_after_s, "could not accept SSL connection: EOF detected"),
    (_naive_close_after_handshake, "could not receive data from client: Connection reset by peer"),
])
def test_negative_control_postgresql_logs_a_probe_that_hangs_up_rudely(postgresql, probe, logged):
    postgresql.set_ssl(True)
    offset = _log_size(postgresql.log)

    for _ in range(3):
        probe(postgresql.port)

    _wait(lambda: _log_since(postgresql.log, offset).count(logged) == 3, 5, f"3 x {logged!r}")
