"""The client side (Databricks' stand-in): queries through the LB, every one recorded.

:class:`QueryDriver` runs queries at a steady rate from a background thread whose sockets are
created inside the client namespace. Each query opens a new connection (as a foreign-catalog
query or a JDBC reconnect would), so the LB routes each one afresh; connect and read timeouts
bound every query. Results carry ``time.monotonic()`` timestamps, so a scenario can ask for
the failures outside its detection window.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pymysql

from .netns import in_netns


@dataclass(frozen=True)
class QueryResult:
    started: float
    ended: float
    ok: bool
    error: str = ""

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


@dataclass(frozen=True)
class Endpoint:
    netns: str
    host: str
    port: int
    user: str
    password: str
    database: str | None = None
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 5.0

    def connect(self) -> pymysql.connections.Connection:
        with in_netns(self.netns):
            return pymysql.connect(
                host=self.host, port=self.port, user=self.user, password=self.password,
                database=self.database, connect_timeout=self.connect_timeout_s,
                read_timeout=self.read_timeout_s, write_timeout=self.read_timeout_s,
                autocommit=True,
                # The lab's MariaDB offers no TLS; without this PyMySQL (>= 1.2, "preferred" TLS)
                # builds a TLS context per connection: ~30 ms of client CPU in every figure.
                ssl_disabled=True,
            )


def query_once(endpoint: Endpoint, sql: str = "SELECT 1") -> QueryResult:
    """One query on a new connection; never raises (the error is in the result)."""
    started = time.monotonic()
    try:
        conn = endpoint.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                cur.fetchall()
        finally:
            conn.close()
    except Exception as exc:  # noqa: BLE001 - recorded, the scenario judges it
        return QueryResult(started, time.monotonic(), False, f"{type(exc).__name__}: {exc}")
    return QueryResult(started, time.monotonic(), True)


@dataclass
class QueryDriver:
    """Run ``sql`` through ``endpoint`` every ``1/rate_hz`` s (one new connection each)."""

    endpoint: Endpoint
    rate_hz: float = 5.0
    sql: str = "SELECT 1"
    max_queries: int = 100_000
    results: list[QueryResult] = field(default_factory=list, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def start(self) -> QueryDriver:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="query-driver", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        next_at = time.monotonic()
        for _ in range(self.max_queries):
            if self._stop.is_set():
                return
            self.results.append(query_once(self.endpoint, self.sql))
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                if self._stop.wait(delay):
                    return
            else:
                next_at = time.monotonic()

    def stop(self) -> list[QueryResult]:
        self._stop.set()
        if self._thread is not None:
            bound = self.endpoint.connect_timeout_s + self.endpoint.read_timeout_s + 5
            self._thread.join(timeout=bound)
        return list(self.results)

    # -- judging ------------------------------------------------------------------------------

    def between(self, start: float, end: float) -> list[QueryResult]:
        return [r for r in self.results if start <= r.started < end]

    def failures(self) -> list[QueryResult]:
        return [r for r in self.results if not r.ok]

    def failures_outside(self, windows: Sequence[tuple[float, float]]) -> list[QueryResult]:
        """Failed queries that started outside every ``(start, end)`` window."""
        return [r for r in self.failures()
                if not any(start <= r.started < end for start, end in windows)]


@dataclass
class OpenLoopDriver(QueryDriver):
    """Like :class:`QueryDriver`, but *open loop*: a new connection every ``1/rate_hz`` s in a
    thread of its own, whether or not the previous ones have finished (at most ``max_in_flight``
    at once). A path that hangs (a half-open tunnel) then costs every query started while it is
    chosen, not one query per timeout: the failure count and window are what clients see."""

    max_in_flight: int = 64
    _workers: list[threading.Thread] = field(default_factory=list, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def _one(self) -> None:
        result = query_once(self.endpoint, self.sql)
        with self._lock:
            self.results.append(result)  # in completion order (list.append is atomic)

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        next_at = time.monotonic()
        for _ in range(self.max_queries):
            if self._stop.is_set():
                return
            self._workers = [w for w in self._workers if w.is_alive()]
            if len(self._workers) < self.max_in_flight:
                worker = threading.Thread(target=self._one, name="query", daemon=True)
                worker.start()
                self._workers.append(worker)
            next_at += period
            if self._stop.wait(max(0.0, next_at - time.monotonic())):
                return

    def stop(self) -> list[QueryResult]:
        super().stop()
        bound = time.monotonic() + self.endpoint.connect_timeout_s + self.endpoint.read_timeout_s + 5
        for worker in list(self._workers):
            worker.join(timeout=max(0.0, bound - time.monotonic()))
        with self._lock:
            return sorted(self.results, key=lambda r: r.started)


def summarize(results: Sequence[QueryResult]) -> str:
    if not results:
        return "0 queries"
    failed = [r for r in results if not r.ok]
    errors: dict[str, int] = {}
    for r in failed:
        key = r.error.split(":")[0] + ":" + r.error.split(":", 1)[-1][:60]
        errors[key] = errors.get(key, 0) + 1
    worst = max(r.latency_s for r in results)
    text = f"{len(results)} queries, {len(failed)} failed, slowest {worst:.2f} s"
    if errors:
        text += "; errors: " + "; ".join(f"{n}x {e}" for e, n in sorted(errors.items()))
    return text
