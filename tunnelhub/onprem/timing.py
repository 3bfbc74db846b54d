"""How fast the tunnel host notices a dead path and comes back: the figures the package sets.

The reference design (``autossh -M 0`` with ``ServerAliveInterval=30``/``ServerAliveCountMax=3``,
no ``ConnectTimeout``, autossh's defaults, ``RestartSec=10``) was measured in the lab
(``LAB-FINDINGS.md``): the ssh client gave up 118.8 s after a silent cut, a reconnect could sit in
SYN backoff for ~127 s, and autossh's backoff after quick failures grew to minutes.

ssh declares the server dead when nothing has come back for ``ServerAliveInterval`` seconds and
then ``ServerAliveCountMax`` probes sent ``ServerAliveInterval`` apart go unanswered: after
``interval × (count_max + 1)`` seconds of silence (the lab's 118.8 s for 30 × 4).

autossh 1.4g backs off after quick failures in ``grace_time()`` (autossh.c, rcsid 1.91,
2019-01-05): a session that lasted less than ``min_time = max(poll_time / 10, 10)`` seconds
(integer division) increments a static ``tries`` counter, any longer session resets it; once
``tries > N_FAST_TRIES`` (5) it sleeps ``(int)(poll_time / 100.0 × t × t / 3)`` seconds with
``t = tries − 5``, capped at ``poll_time`` before starting ssh again. ``poll_time`` is
``AUTOSSH_POLL`` (default 600 s), so by default the sleeps are 2, 8, 18, 32, 50 … 600 s and the
counter carries over from one incident to the next unless a session lasted 60 s.
:func:`autossh_grace_sleep` is that formula, checked against the real binary by the tests.

``poll_time`` also bounds a second stall: ``ssh_watch()`` polls the child with
``waitpid(WNOHANG)`` (line 807) and only then arms its signal handler's jump (``dolongjmp = 1``,
line 830) before ``pause()`` (line 841). An ssh that exits in between (a refused connection, a
forward failure) is reaped only when the poll alarm fires, ``poll_time`` seconds later: 600 s by
default. Measured here: 1 of 6 runs of 8 immediate failures stalled exactly ``AUTOSSH_POLL``.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTOSSH_N_FAST_TRIES = 5  # autossh.c: N_FAST_TRIES
AUTOSSH_DEFAULT_POLL_S = 600  # autossh.c: POLL_TIME


@dataclass(frozen=True, kw_only=True)
class TunnelTiming:
    """The timing options the package's ssh_config and unit set."""

    server_alive_interval_s: int = 5
    """Seconds of silence from the proxy before ssh sends a keep-alive probe."""
    server_alive_count_max: int = 3
    """Unanswered probes after which ssh exits (autossh then reconnects)."""
    connect_timeout_s: int = 10
    """Bound on one connection attempt (TCP connect and SSH banner exchange)."""
    autossh_poll_s: int = 10
    """AUTOSSH_POLL: caps autossh's backoff between quick failures (and sets its 10 s ``min_time``)."""
    restart_sec_s: int = 2
    """systemd RestartSec: how long after autossh exits it is started again."""

    @property
    def dead_path_detection_s(self) -> int:
        """Seconds of silence after which ssh gives up on a proxy (reference: 90 s nominal, 119 s measured)."""
        return self.server_alive_interval_s * (self.server_alive_count_max + 1)

    @property
    def autossh_max_backoff_s(self) -> int:
        return self.autossh_poll_s


DEFAULT_TIMING = TunnelTiming()


def autossh_min_time_s(poll_s: int) -> int:
    """How long an ssh session must last for autossh 1.4g to reset its quick-failure counter."""
    return max(poll_s // 10, 10)


def autossh_grace_sleep(poll_s: int, tries: int) -> int:
    """The sleep autossh 1.4g's ``grace_time()`` takes when its quick-failure counter is ``tries``."""
    if tries <= AUTOSSH_N_FAST_TRIES:
        return 0
    t = float(tries - AUTOSSH_N_FAST_TRIES)
    return min(int((poll_s / 100.0) * (t * (t / 3))), poll_s)


def autossh_grace_sleeps(poll_s: int, quick_failures: int) -> list[int]:
    """The sleeps before the restarts that follow ``quick_failures`` sessions in a row that each
    ended within :func:`autossh_min_time_s` of their start."""
    return [autossh_grace_sleep(poll_s, tries) for tries in range(1, quick_failures + 1)]
