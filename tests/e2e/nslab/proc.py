"""Processes the lab starts: by path, in a namespace, logged to a file, stopped by PID.

Nothing here looks processes up by name: every process is stopped through the PID
the lab got when it started it (or the process group it was started in).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class LabError(RuntimeError):
    """A lab step failed; the message says which step and what was seen."""


class WaitTimeout(LabError):
    """A bounded wait ran out."""


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout_s: float,
    interval_s: float = 0.05,
    what: str,
) -> T:
    """Poll ``predicate`` until it returns a truthy value; raise after ``timeout_s``.

    Returns the truthy value. Exceptions raised by the predicate count as "not yet"
    (the last one is named in the timeout message).
    """
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported in the timeout message
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise WaitTimeout(f"timed out after {timeout_s:.1f} s waiting for {what}{detail}")
        time.sleep(interval_s)


def netns_argv(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``netns`` (``ip netns exec`` execs it: the PID is the command's)."""
    if netns is None:
        return list(argv)
    return ["ip", "netns", "exec", netns, *argv]


def run(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    timeout_s: float = 30.0,
    check: bool = True,
    input_text: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion (bounded), capturing its output."""
    full = netns_argv(netns, argv)
    try:
        proc = subprocess.run(
            full,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            input=input_text,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"command timed out after {timeout_s} s: {' '.join(full)}") from exc
    if check and proc.returncode != 0:
        raise LabError(
            f"command failed (exit {proc.returncode}): {' '.join(full)}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from ``/proc/<pid>/task/*/children``)."""
    children: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except FileNotFoundError:
        return []
    for task in tasks:
        try:
            text = (task / "children").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.extend(int(tok) for tok in text.split())
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first."""
    seen = [pid]
    index = 0
    while index < len(seen) and len(seen) < 10_000:
        seen.extend(child for child in child_pids(seen[index]) if child not in seen)
        index += 1
    return seen


def stop_pid(
    pid: int,
    *,
    popen: subprocess.Popen[bytes] | None = None,
    sig: int = signal.SIGTERM,
    grace_s: float = 10.0,
    group: bool = False,
) -> None:
    """Send ``sig`` to ``pid`` (or its process group), SIGKILL after ``grace_s``, reap it."""

    def send(signum: int) -> None:
        try:
            if group:
                os.killpg(pid, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def gone() -> bool:
        if popen is not None:
            return popen.poll() is not None
        return not pid_alive(pid)

    if gone():
        return
    send(sig)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if gone():
            return
        time.sleep(0.02)
    send(signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and not gone():
        time.sleep(0.02)


@dataclass
class Daemon:
    """One long-running process the lab started, with its log file.

    ``start()`` runs ``argv`` (inside ``netns`` when given) in a new process group, stdout and
    stderr appended to ``log_path``. ``stop()`` stops it by PID (the whole group when
    ``kill_group``), SIGKILL after ``grace_s``. Safe to call ``stop()`` more than once.
    """

    name: str
    argv: Sequence[str]
    log_path: Path
    netns: str | None = None
    env: dict[str, str] | None = None
    cwd: Path | None = None
    stop_signal: int = signal.SIGTERM
    grace_s: float = 10.0
    kill_group: bool = True
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    started_at: float | None = field(default=None, init=False)

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise LabError(f"{self.name} was never started")
        return self.popen.pid

    def start(self) -> Daemon:
        if self.popen is not None and self.popen.poll() is None:
            raise LabError(f"{self.name} is already running (pid {self.popen.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - handed to the child
        try:
            log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            self.popen = subprocess.Popen(
                netns_argv(self.netns, self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            log.close()
        self.started_at = time.monotonic()
        return self

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def signal(self, signum: int) -> None:
        if self.running():
            os.kill(self.pid, signum)

    def stop(self) -> None:
        if self.popen is None:
            return
        # Descendants that left the process group (sshd's per-connection children call
        # setsid) are collected by PID before the parent goes, and stopped after it.
        descendants = process_tree(self.popen.pid)[1:] if self.running() else []
        stop_pid(
            self.popen.pid,
            popen=self.popen,
            sig=self.stop_signal,
            grace_s=self.grace_s,
            group=False,
        )
        for pid in descendants:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.kill_group:
            # Children the daemon left behind (socat's forks, sshd's sessions) share its group.
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def expect_running(self, *, settle_s: float = 0.0) -> None:
        """Raise with the daemon's log when it has exited (optionally after ``settle_s``)."""
        if settle_s:
            time.sleep(settle_s)
        if not self.running():
            raise LabError(
                f"{self.name} exited with code {self.exit_code()}; log:\n{self.log_tail()}"
            )


def interrupt_on_sigterm() -> None:
    """Turn SIGTERM (a CI or ``timeout`` stopping the run) into KeyboardInterrupt, so the
    lab's ``finally`` blocks still stop every process it started."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
