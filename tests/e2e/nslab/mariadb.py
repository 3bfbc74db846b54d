"""A real MariaDB 10.11 server in the lab's ``db`` namespace.

``mariadb-install-db`` into a temporary datadir, ``mariadbd`` started by path with its own
socket, port, pid file and error log (``--no-defaults``: nothing from ``/etc/mysql``),
``log_warnings=2`` (so aborted connections are logged) and ``performance_schema`` on (so the
host cache can be read from ``performance_schema.host_cache``). Name resolution stays on, as
on a stock server: the host cache only exists with it (lookups fail fast here: the namespaces
have no route to a name server).
"""

from __future__ import annotations

import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .proc import Daemon, LabError, run, wait_until

MARIADBD = "/usr/sbin/mariadbd"
INSTALL_DB = "/usr/bin/mariadb-install-db"
CLIENT = "/usr/bin/mariadb"


@dataclass
class MariaDB:
    """``start()`` installs (once) and starts; ``stop()``/``start()`` again keep the datadir."""

    workdir: Path
    netns: str
    bind_address: str
    log_dir: Path
    port: int = 3306
    max_connect_errors: int = 100
    app_user: str = "lab"
    app_password: str = "lab-password"
    app_database: str = "labdb"
    check_user: str = "tunnelhub_check"
    check_user_host: str = "%"
    """The check user is password-less and has no grants, as the health daemon's mysql probe
    expects: ``'tunnelhub_check'@'<tunnel host>'``."""
    more_check_user_hosts: tuple[str, ...] = ()
    """The other tunnel hosts' addresses (two or more hosts: each one's checks log in from it)."""
    daemon: Daemon | None = field(default=None, init=False)
    _installed: bool = field(default=False, init=False)

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "mariadb.sock"

    @property
    def error_log(self) -> Path:
        return self.log_dir / "mariadb-error.log"

    def _install(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.datadir.exists():
            shutil.rmtree(self.datadir)
        run([INSTALL_DB, "--no-defaults", "--user=root", f"--datadir={self.datadir}",
             "--auth-root-authentication-method=socket", "--skip-test-db"], timeout_s=180)
        self._installed = True

    def start(self, *, timeout_s: float = 60.0) -> MariaDB:
        first = not self._installed
        if first:
            self._install()
        self.daemon = Daemon(
            name="mariadb",
            argv=[
                MARIADBD, "--no-defaults", "--user=root",
                f"--datadir={self.datadir}",
                f"--socket={self.socket_path}",
                f"--pid-file={self.workdir / 'mariadb.pid'}",
                f"--port={self.port}",
                f"--bind-address={self.bind_address}",
                f"--log-error={self.error_log}",
                "--log-warnings=2",
                "--performance-schema=ON",
                f"--max-connect-errors={self.max_connect_errors}",
                "--innodb-buffer-pool-size=64M",
                "--innodb-log-file-size=16M",
                "--max-allowed-packet=64M",
                "--skip-log-bin",
            ],
            log_path=self.log_dir / "mariadb.out.log",
            netns=self.netns,
            grace_s=30.0,
        ).start()
        wait_until(self._ready, timeout_s=timeout_s, interval_s=0.2,
                   what=f"MariaDB accepting connections on {self.bind_address}:{self.port}")
        if first:
            self._create_schema()
        return self

    def _ready(self) -> bool:
        assert self.daemon is not None
        if not self.daemon.running():
            raise LabError(f"mariadbd exited ({self.daemon.exit_code()}); error log:\n"
                           + _tail(self.error_log))
        proc = self.sql("SELECT 1", check=False)
        return proc.returncode == 0

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()

    def running(self) -> bool:
        return self.daemon is not None and self.daemon.running()

    def sql(self, statement: str, *, check: bool = True, timeout_s: float = 30.0):  # noqa: ANN201
        """Run SQL as root over the unix socket; returns the completed process (tab output)."""
        return run([CLIENT, "--no-defaults", f"--socket={self.socket_path}", "-uroot",
                    "--batch", "--skip-column-names", "-e", statement],
                   check=check, timeout_s=timeout_s)

    def _create_schema(self) -> None:
        self.sql(
            f"CREATE DATABASE {self.app_database};"
            f"CREATE USER '{self.app_user}'@'%' IDENTIFIED BY '{self.app_password}';"
            f"GRANT ALL ON {self.app_database}.* TO '{self.app_user}'@'%';"
            f"CREATE USER '{self.check_user}'@'{self.check_user_host}';"
            + "".join(f"CREATE USER '{self.check_user}'@'{h}';" for h in self.more_check_user_hosts) +
            f"CREATE TABLE {self.app_database}.events "
            "(id INT PRIMARY KEY AUTO_INCREMENT, payload VARCHAR(64) NOT NULL);"
        )

    # -- counters the probing scenarios read ------------------------------------------------------

    def status(self, name: str) -> int:
        out = self.sql(f"SHOW GLOBAL STATUS LIKE '{name}'").stdout.split()
        return int(out[1]) if len(out) == 2 else 0

    def aborted_connects(self) -> int:
        return self.status("Aborted_connects")

    def host_cache(self) -> list[dict[str, str]]:
        """Rows of ``performance_schema.host_cache`` (IP, HOST, the error counters)."""
        cols = ["IP", "HOST", "SUM_CONNECT_ERRORS", "COUNT_HANDSHAKE_ERRORS",
                "COUNT_HOST_BLOCKED_ERRORS", "COUNT_AUTHENTICATION_ERRORS"]
        out = self.sql(f"SELECT {', '.join(cols)} FROM performance_schema.host_cache").stdout
        return [dict(zip(cols, line.split("\t"), strict=True))
                for line in out.splitlines() if line]

    def aborted_connection_warnings(self) -> list[str]:
        """Error-log lines about aborted connections (``log_warnings=2``)."""
        try:
            text = self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines()
                if re.search(r"Aborted connection", line)]

    def connections_from(self, address: str) -> int:
        """Sessions opened so far from ``address`` (``performance_schema.hosts``; the host is the
        address itself here: name lookups fail in the lab). Connections dropped before they
        authenticate are not attributed to a host there: count those with :meth:`aborted_connects`."""
        out = self.sql("SELECT COALESCE(SUM(TOTAL_CONNECTIONS), 0) FROM performance_schema.hosts "
                       f"WHERE HOST = '{address}'").stdout.strip()
        return int(out or 0)

    def host_cache_row(self, address: str) -> dict[str, int]:
        """The host cache's error counters for ``address`` (zeros when it has no row)."""
        for row in self.host_cache():
            if row["IP"] == address:
                return {k: int(v) for k, v in row.items() if k.startswith(("SUM_", "COUNT_"))}
        return {"SUM_CONNECT_ERRORS": 0, "COUNT_HANDSHAKE_ERRORS": 0,
                "COUNT_HOST_BLOCKED_ERRORS": 0, "COUNT_AUTHENTICATION_ERRORS": 0}

    def flush_hosts(self) -> None:
        self.sql("FLUSH HOSTS")


def greeting_from(host: str, port: int, *, timeout_s: float = 2.0) -> bytes:
    """First bytes the server sends on a new connection (the MySQL greeting)."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        return sock.recv(256)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
