"""A CDC-like pair for the long-lived-connection scenario: an on-prem writer and a streaming reader.

:class:`RowWriter` inserts rows into ``events`` from the tunnel host's side (the on-prem
application writing its own database), one at a time with autocommit, so ids become visible in
increasing order. :class:`StreamingReader` is the Databricks side of a CDC pipeline: on one
long-lived connection through the load balancer it reads ``id > last`` in id order with an
unbuffered (server-side streaming) cursor, records every row as it arrives and the last id it saw;
when the connection breaks it reconnects through the load balancer (bounded backoff) and resumes
from that last id. Every row must then be seen exactly once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pymysql
import pymysql.cursors

from .client import Endpoint


@dataclass
class RowWriter:
    endpoint: Endpoint
    period_s: float = 0.02
    ids: list[int] = field(default_factory=list, init=False)
    errors: list[str] = field(default_factory=list, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def start(self) -> RowWriter:
        self._thread = threading.Thread(target=self._run, name="cdc-writer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        conn = self.endpoint.connect()
        try:
            with conn.cursor() as cur:
                while not self._stop.is_set():
                    try:
                        cur.execute("INSERT INTO events (payload) VALUES (%s)", (f"row at {time.time():.3f}",))
                        self.ids.append(int(cur.lastrowid))
                    except pymysql.MySQLError as exc:  # the writer is on-prem: it should never fail
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                        return
                    self._stop.wait(self.period_s)
        finally:
            conn.close()

    def stop(self) -> list[int]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        return list(self.ids)


@dataclass
class Reconnect:
    broke_at: float
    error: str
    resumed_at: float | None = None
    attempts: int = 0
    last_id: int = 0


@dataclass
class StreamingReader:
    """Reads ``events`` through ``endpoint`` forever (until stopped), resuming after breaks."""

    endpoint: Endpoint
    poll_s: float = 0.05
    retry_s: float = 0.5
    give_up_s: float = 90.0
    on_connect: Callable[[], None] | None = None
    """Called after each successful reconnect, in the reader's thread (the test uses it to
    learn which proxy carries the session)."""
    seen: list[int] = field(default_factory=list, init=False)
    last_id: int = field(default=0, init=False)
    reconnects: list[Reconnect] = field(default_factory=list, init=False)
    connected: threading.Event = field(default_factory=threading.Event, init=False)
    failure: str = field(default="", init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def start(self) -> StreamingReader:
        self._thread = threading.Thread(target=self._run, name="cdc-reader", daemon=True)
        self._thread.start()
        return self

    def _connect(self) -> pymysql.connections.Connection:
        conn = self.endpoint.connect()
        conn.cursorclass = pymysql.cursors.SSCursor  # unbuffered: rows stream as they are read
        return conn

    def _run(self) -> None:
        conn: pymysql.connections.Connection | None = None
        try:
            conn = self._connect()
            self.connected.set()
            while not self._stop.is_set():
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT id FROM events WHERE id > %s ORDER BY id", (self.last_id,))
                        for (row_id,) in cur:  # one row at a time off the socket
                            self.seen.append(int(row_id))
                            self.last_id = int(row_id)
                    self._stop.wait(self.poll_s)
                except (pymysql.MySQLError, OSError) as exc:
                    conn = self._reconnect(conn, exc)
                    if conn is None:
                        return
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass

    def _reconnect(self, broken: pymysql.connections.Connection,
                   exc: BaseException) -> pymysql.connections.Connection | None:
        event = Reconnect(time.monotonic(), f"{type(exc).__name__}: {exc}", last_id=self.last_id)
        self.reconnects.append(event)
        try:
            broken.close()
        except Exception:  # noqa: BLE001 - it is broken
            pass
        deadline = event.broke_at + self.give_up_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            event.attempts += 1
            try:
                conn = self._connect()
            except (pymysql.MySQLError, OSError):
                self._stop.wait(self.retry_s)
                continue
            resumed_at = time.monotonic()
            if self.on_connect is not None:
                self.on_connect()
            # Published only after on_connect has run: a test that waits for resumed_at then
            # reads what on_connect recorded (CI once saw the wait win that race).
            event.resumed_at = resumed_at
            return conn
        self.failure = f"no reconnect within {self.give_up_s} s after: {event.error}"
        return None

    def stop(self) -> list[int]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.endpoint.read_timeout_s + 15)
        return list(self.seen)
