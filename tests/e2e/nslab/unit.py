"""Run a systemd service's ``ExecStart`` the way systemd would, without systemd.

:func:`load_unit` parses a unit file (``[Unit]``/``[Service]``, backslash continuations,
comments), expands ``%`` specifiers for a template instance, reads ``Environment=`` and
``EnvironmentFile=`` (the files override ``Environment=``, later files override earlier ones),
splits ``ExecStart=`` with systemd's quoting rules and substitutes variables with systemd's
semantics: ``${VAR}`` anywhere in a word gives exactly one word; ``$VAR`` as a whole word is
split at whitespace into zero or more words; ``$$`` is a literal ``$``; unset variables are
empty. A ``:`` prefix turns substitution off.

:class:`ServiceRunner` runs the command in a namespace under a restart loop that mimics
``Restart=`` (no, always, on-success, on-failure, on-abnormal, on-abort), ``RestartSec=``,
``StartLimitIntervalSec=``/``StartLimitBurst=`` and ``SuccessExitStatus=``, with a clean
environment like systemd's. ``stop()`` is ``systemctl stop`` (every process of the service, by
PID); ``kill()`` is ``systemctl kill`` (the restart policy then applies).

``ExecStartPre=`` commands run before each start (a failing one without ``-`` fails the start,
and the restart policy applies), ``ExecStopPost=`` commands after each exit (before a restart,
and on ``stop()``), as systemd orders them; their output goes to the service's log.

``RuntimeDirectory=`` (with ``RuntimeDirectoryMode=``) is made before each start and removed
after each exit's ``ExecStopPost=`` (systemd's default ``RuntimeDirectoryPreserve=no``), and
``$RUNTIME_DIRECTORY`` names it (its ``/run/`` path mapped like every argument).

``main_pid_file`` (optional) receives the main PID at every start, what systemd keeps as
``$MAINPID``: a lab stand-in for ``ExecReload=/bin/kill -HUP $MAINPID`` signals it.

Not mimicked (stated so a reader knows): ``User=``/``Group=`` (the lab runs every command as
root, so a ``+`` prefix changes nothing), sandboxing directives, ``Type=`` other than
simple/exec, ``ExecStartPost=``/``ExecStop=``/``ExecReload=``, ``${VAR:-default}`` forms
(a clear error if used), and ``$SERVICE_RESULT``/``$EXIT_CODE``/``$EXIT_STATUS`` in
``ExecStopPost=`` (empty here).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .cloudinit import rewrite_paths
from .proc import LabError, netns_argv, pid_alive, process_tree

SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOOK_TIMEOUT_S = 30.0  # an ExecStartPre/ExecStopPost that hangs is killed (systemd: TimeoutStartSec)
_CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}
_RESTART_VALUES = ("no", "always", "on-success", "on-failure", "on-abnormal", "on-abort",
                   "on-watchdog")
_TIME_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
}


# -- parsing -------------------------------------------------------------------------------------


def parse_unit_text(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file: ``{"Service": [("ExecStart", "..."), ...]}`` in file order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: str | None = None
    pending = ""
    for raw in text.splitlines():
        if not pending and raw.lstrip().startswith(("#", ";")):
            continue
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        if current is None or "=" not in line:
            raise LabError(f"unit file line is not 'Key=Value' inside a section: {line!r}")
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def parse_timespan(value: str, *, what: str) -> float:
    """Seconds in a systemd time span (``10``, ``500ms``, ``1min 30s``); ``infinity`` -> inf."""
    text = value.strip()
    if text == "infinity":
        return float("inf")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    total = 0.0
    pos = 0
    for match in re.finditer(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)", text):
        if match.start() != pos or match.group(2) not in _TIME_UNITS:
            raise LabError(f"{what}={value!r} is not a systemd time span (e.g. 10s, 500ms)")
        total += float(match.group(1)) * _TIME_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise LabError(f"{what}={value!r} is not a systemd time span (e.g. 10s, 500ms)")
    return total


_C_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
              "\\": "\\", '"': '"', "'": "'", "s": " "}


def split_command_line(text: str) -> list[str]:
    """Split like systemd's ``extract_first_word(UNQUOTE|CUNESCAPE)``: quotes, C escapes."""
    words: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\n":
            i += 1
        if i >= n:
            break
        word: list[str] = []
        quote: str | None = None
        while i < n:
            ch = text[i]
            if quote is None and ch in " \t\n":
                break
            if ch == "\\" and i + 1 < n:
                nxt = text[i + 1]
                if nxt in _C_ESCAPES:
                    word.append(_C_ESCAPES[nxt])
                    i += 2
                    continue
                if nxt == "x" and i + 3 < n:
                    word.append(chr(int(text[i + 2:i + 4], 16)))
                    i += 4
                    continue
                word.append(nxt)
                i += 2
                continue
            if quote is None and ch in "\"'":
                quote = ch
            elif ch == quote:
                quote = None
            else:
                word.append(ch)
            i += 1
        if quote is not None:
            raise LabError(f"unbalanced quote in command line: {text!r}")
        words.append("".join(word))
    return words


def parse_env_file(text: str, *, source: str) -> dict[str, str]:
    """``KEY=VALUE`` lines as systemd reads an ``EnvironmentFile=``.

    Comments start with ``#`` or ``;``; values may be single-quoted (literal), double-quoted
    (backslash escapes) or bare (backslash escapes, trailing whitespace removed); a backslash at
    the end of a line continues it.
    """
    env: dict[str, str] = {}
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if raw.endswith("\\") and not raw.endswith("\\\\"):
            pending += raw[:-1]
            continue
        logical.append(pending + raw)
        pending = ""
    if pending:
        logical.append(pending)
    for number, line in enumerate(logical, 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        key, sep, rest = stripped.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LabError(f"{source}:{number}: not a KEY=VALUE assignment: {line!r}")
        value: list[str] = []
        i = 0
        rest = rest.lstrip()
        trailing_ws_from: int | None = None
        while i < len(rest):
            ch = rest[i]
            if ch == "'":
                end = rest.find("'", i + 1)
                if end < 0:
                    raise LabError(f"{source}:{number}: unbalanced ' in {line!r}")
                value.append(rest[i + 1:end])
                i = end + 1
                trailing_ws_from = None
                continue
            if ch == '"':
                i += 1
                while i < len(rest) and rest[i] != '"':
                    if rest[i] == "\\" and i + 1 < len(rest):
                        i += 1
                    value.append(rest[i])
                    i += 1
                if i >= len(rest):
                    raise LabError(f'{source}:{number}: unbalanced " in {line!r}')
                i += 1
                trailing_ws_from = None
                continue
            if ch == "\\" and i + 1 < len(rest):
                value.append(rest[i + 1])
                i += 2
                trailing_ws_from = None
                continue
            if ch in " \t":
                if trailing_ws_from is None:
                    trailing_ws_from = len(value)
            else:
                trailing_ws_from = None
            value.append(ch)
            i += 1
        if trailing_ws_from is not None:
            value = value[:trailing_ws_from]
        env[key] = "".join(value)
    return env


def expand_env_word(word: str, env: Mapping[str, str]) -> list[str]:
    """One command-line word after systemd variable substitution (zero or more words)."""
    whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
    if whole:
        return env.get(whole.group(1), "").split()
    out: list[str] = []
    i = 0
    while i < len(word):
        if word.startswith("$$", i):
            out.append("$")
            i += 2
        elif word.startswith("${", i):
            end = word.find("}", i)
            if end < 0:
                out.append(word[i:])
                break
            name = word[i + 2:end]
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise LabError(f"${{{name}}} in ExecStart: the lab supports only ${{NAME}}")
            out.append(env.get(name, ""))
            i = end + 1
        else:
            out.append(word[i])
            i += 1
    return ["".join(out)]


def unescape_instance(instance: str) -> str:
    """``%I``: the instance with systemd's escaping undone (``-`` -> ``/``, ``\\xNN``)."""
    text = instance.replace("-", "/")
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def expand_specifiers(text: str, *, unit_name: str, instance: str | None) -> str:
    stem = unit_name.rsplit(".", 1)[0]
    prefix = stem.split("@", 1)[0]
    values = {
        "%": "%",
        "n": unit_name,
        "N": stem,
        "p": prefix,
        "P": unescape_instance(prefix),
        "i": instance or "",
        "I": unescape_instance(instance or ""),
        "t": "/run",
        "S": "/var/lib",
        "C": "/var/cache",
        "L": "/var/log",
        "E": "/etc",
        "T": "/tmp",
        "V": "/var/tmp",
    }

    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise LabError(f"specifier %{key} in {unit_name} is not supported by the lab")
        return values[key]

    return re.sub(r"%(.)", replace, text)


@dataclass(frozen=True)
class ExecLine:
    """An ``ExecStartPre=``/``ExecStopPost=`` command: its prefixes and expanded argv."""

    prefixes: str
    argv: list[str]

    @property
    def ignore_failure(self) -> bool:
        return "-" in self.prefixes


@dataclass(frozen=True)
class UnitCommand:
    """A service's command line and restart policy, ready to run."""

    unit_name: str
    argv: list[str]
    env: dict[str, str]
    start_pre: tuple[ExecLine, ...] = ()
    stop_post: tuple[ExecLine, ...] = ()
    restart: str = "no"
    restart_s: float = 0.1
    start_limit_interval_s: float = 10.0
    start_limit_burst: int = 5
    success_exit_codes: frozenset[int] = frozenset({0})
    success_signals: frozenset[int] = frozenset()
    ignore_failure: bool = False
    user: str | None = None
    kill_signal: int = signal.SIGTERM
    directives: dict[str, list[str]] = field(default_factory=dict)
    runtime_directories: tuple[Path, ...] = ()
    runtime_directory_mode: int = 0o755


def load_unit(
    unit_path: Path,
    *,
    instance: str | None = None,
    unit_name: str | None = None,
    path_map: Mapping[str, str] | None = None,
    insert_args: Sequence[str] = (),
) -> UnitCommand:
    """Parse ``unit_path`` for ``instance`` and build the command systemd would run.

    ``path_map`` maps VM paths to where the lab put them (whole paths or ``dir/`` prefixes):
    applied to ``EnvironmentFile=`` paths before reading them and to every argument after
    expansion. ``insert_args`` go right after the program (the lab uses it only to keep the
    reference unit's ssh away from root's own ``~/.ssh/known_hosts``). ``unit_name`` defaults
    to the file name with the instance filled in (``tunnelhub-hub@.service`` + ``1`` ->
    ``tunnelhub-hub@1.service``).
    """
    mapping = dict(path_map or {})
    file_name = unit_path.name
    if unit_name is None:
        if "@." in file_name:
            if instance is None:
                raise LabError(f"{file_name} is a template unit: pass the instance (slot)")
            unit_name = file_name.replace("@.", f"@{instance}.")
        else:
            unit_name = file_name
    sections = parse_unit_text(unit_path.read_text())
    service = sections.get("Service")
    if service is None:
        raise LabError(f"{unit_path} has no [Service] section")
    unit_section = sections.get("Unit", [])

    def spec(value: str) -> str:
        return expand_specifiers(value, unit_name=unit_name, instance=instance)

    directives: dict[str, list[str]] = {}
    for key, value in service + unit_section:
        directives.setdefault(key, []).append(value)

    env: dict[str, str] = {}
    for value in directives.get("Environment", []):
        for assignment in split_command_line(spec(value)):
            key, sep, val = assignment.partition("=")
            if not sep:
                raise LabError(f"{unit_name}: Environment= entry {assignment!r} has no '='")
            env[key] = val
    for value in directives.get("EnvironmentFile", []):
        if not value:
            continue
        optional = value.startswith("-")
        vm_path = spec(value[1:] if optional else value)
        host_path = Path(rewrite_paths(vm_path, mapping))
        if not host_path.exists():
            if optional:
                continue
            raise LabError(f"{unit_name}: EnvironmentFile={vm_path} not found (looked at "
                           f"{host_path}); supply it or map its path")
        env.update(parse_env_file(host_path.read_text(), source=vm_path))

    runtime_vm = [f"/run/{name}" for value in directives.get("RuntimeDirectory", []) if value
                  for name in spec(value).split()]
    if runtime_vm:
        env["RUNTIME_DIRECTORY"] = ":".join(runtime_vm)  # systemd: the list, colon-separated

    exec_lines = [v for v in directives.get("ExecStart", [])]
    if "" in exec_lines:
        exec_lines = exec_lines[len(exec_lines) - exec_lines[::-1].index(""):]
    if len(exec_lines) != 1:
        raise LabError(f"{unit_name}: expected one ExecStart= line, found {len(exec_lines)}")
    full_env = {"PATH": SYSTEMD_PATH, **env}

    def command(key: str, value: str) -> ExecLine:
        words = split_command_line(spec(value))
        if not words:
            raise LabError(f"{unit_name}: {key}= is empty")
        first = words[0]
        flags = ""
        while first and first[0] in "@-:+!":
            flags += first[0]
            first = first[1:]
        words[0] = first
        if "@" in flags:
            words = [words[0], *words[2:]]  # the lab does not mimic a different argv[0]
        if not words[0].startswith("/"):
            raise LabError(f"{unit_name}: {key}'s program must be an absolute path: {words[0]!r}")
        argv: list[str] = [words[0]]
        for word in words[1:]:
            argv.extend([word] if ":" in flags else expand_env_word(word, full_env))
        return ExecLine(flags, [rewrite_paths(arg, mapping) for arg in argv])

    main = command("ExecStart", exec_lines[0])
    flags, argv = main.prefixes, main.argv
    argv[1:1] = list(insert_args)
    start_pre = tuple(command("ExecStartPre", v) for v in directives.get("ExecStartPre", []) if v)
    stop_post = tuple(command("ExecStopPost", v) for v in directives.get("ExecStopPost", []) if v)

    def last(key: str, default: str) -> str:
        values = directives.get(key)
        return values[-1] if values else default

    restart = last("Restart", "no")
    if restart not in _RESTART_VALUES:
        raise LabError(f"{unit_name}: Restart={restart!r}; systemd accepts {_RESTART_VALUES}")
    success_codes = {0}
    success_signals: set[int] = set()
    for value in directives.get("SuccessExitStatus", []):
        for token in value.split():
            if token.isdigit():
                success_codes.add(int(token))
            else:
                success_signals.add(int(getattr(signal, token if token.startswith("SIG")
                                                else "SIG" + token)))
    limit_interval = last("StartLimitIntervalSec", last("StartLimitInterval", "10s"))
    kill_signal_name = last("KillSignal", "SIGTERM")
    return UnitCommand(
        unit_name=unit_name,
        argv=argv,
        env=full_env,
        start_pre=start_pre,
        stop_post=stop_post,
        restart=restart,
        restart_s=parse_timespan(last("RestartSec", "100ms"), what="RestartSec"),
        start_limit_interval_s=parse_timespan(limit_interval, what="StartLimitIntervalSec"),
        start_limit_burst=int(last("StartLimitBurst", "5")),
        success_exit_codes=frozenset(success_codes),
        success_signals=frozenset(success_signals),
        ignore_failure="-" in flags,
        user=last("User", "") or None,
        kill_signal=int(getattr(signal, kill_signal_name if kill_signal_name.startswith("SIG")
                                else "SIG" + kill_signal_name)),
        directives=directives,
        runtime_directories=tuple(Path(rewrite_paths(p, mapping)) for p in runtime_vm),
        runtime_directory_mode=int(last("RuntimeDirectoryMode", "0755"), 8),
    )


# -- running ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceEvent:
    at: float  # time.monotonic()
    kind: str  # "start", "exit", "restart-scheduled", "start-limit-hit", "stopped"
    pid: int | None = None
    returncode: int | None = None


class ServiceRunner:
    """Run a :class:`UnitCommand` in a namespace under its restart policy, like systemd does.

    Every start is a new process group; ``stop()`` and ``kill()`` act on the main process and all
    its descendants by PID (systemd's ``KillMode=control-group``).
    """

    def __init__(self, command: UnitCommand, *, netns: str | None, log_path: Path,
                 stop_timeout_s: float = 10.0, main_pid_file: Path | None = None) -> None:
        self.command = command
        self.main_pid_file = main_pid_file  # written at every start: what systemd knows as $MAINPID
        self.netns = netns
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s
        self.events: list[ServiceEvent] = []
        self.state = "inactive"
        self._popen: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- public ------------------------------------------------------------------------------

    @property
    def main_pid(self) -> int | None:
        popen = self._popen
        return popen.pid if popen is not None and popen.poll() is None else None

    def start(self) -> ServiceRunner:
        if self._thread is not None and self._thread.is_alive():
            raise LabError(f"{self.command.unit_name} is already running")
        self._stopping.clear()
        self.state = "activating"
        self._thread = threading.Thread(target=self._loop, name=self.command.unit_name,
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while self.main_pid is None and self.state == "activating":
            if time.monotonic() > deadline:
                raise LabError(f"{self.command.unit_name} did not start within 10 s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """``systemctl stop``: no more restarts; every process of the service stopped by PID."""
        self._stopping.set()
        self._signal_all(self.command.kill_signal)
        if self._thread is not None:
            self._thread.join(timeout=self.stop_timeout_s + 10)
        self._signal_all(signal.SIGKILL)
        self.state = "inactive"

    def kill(self, signum: int = signal.SIGKILL, *, main_only: bool = False) -> list[int]:
        """``systemctl kill``: signal the service's processes; the restart policy applies."""
        return self._signal_all(signum, main_only=main_only)

    def processes(self) -> list[int]:
        pid = self.main_pid
        return process_tree(pid) if pid is not None else []

    def find_process(self, comm: str) -> int | None:
        """PID of the service's first process named ``comm`` (``/proc/<pid>/comm``)."""
        for pid in self.processes():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    return pid
            except (FileNotFoundError, ProcessLookupError):
                continue
        return None

    def starts(self) -> list[ServiceEvent]:
        return [e for e in self.events if e.kind == "start"]

    def exits(self) -> list[ServiceEvent]:
        return [e for e in self.events if e.kind == "exit"]

    # -- internals ---------------------------------------------------------------------------

    def _signal_all(self, signum: int, *, main_only: bool = False) -> list[int]:
        with self._lock:
            pid = self.main_pid
            if pid is None:
                return []
            targets = [pid] if main_only else process_tree(pid)
            for target in targets:
                try:
                    os.kill(target, signum)
                except ProcessLookupError:
                    pass
            if signum == signal.SIGKILL and not main_only:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return targets

    def _clean(self, returncode: int) -> tuple[bool, bool]:
        """``(clean exit, killed by an unclean signal)`` in systemd's terms."""
        cmd = self.command
        if returncode < 0:
            sig = -returncode
            clean = sig in _CLEAN_SIGNALS or sig in cmd.success_signals
            return clean, not clean
        return returncode in cmd.success_exit_codes or cmd.ignore_failure, False

    def _should_restart(self, returncode: int) -> bool:
        clean, abnormal_signal = self._clean(returncode)
        return {
            "no": False,
            "always": True,
            "on-success": clean,
            "on-failure": not clean,
            "on-abnormal": abnormal_signal,
            "on-abort": abnormal_signal,
            "on-watchdog": False,
        }[self.command.restart]

    def _record(self, kind: str, pid: int | None = None, returncode: int | None = None) -> None:
        self.events.append(ServiceEvent(time.monotonic(), kind, pid, returncode))

    def _loop(self) -> None:
        cmd = self.command
        start_times: list[float] = []
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        while not self._stopping.is_set():
            now = time.monotonic()
            if cmd.start_limit_interval_s > 0:
                start_times = [t for t in start_times if now - t < cmd.start_limit_interval_s]
                if len(start_times) >= cmd.start_limit_burst:
                    self._record("start-limit-hit")
                    self.state = "failed (start-limit-hit)"
                    return
            start_times.append(now)
            for directory in cmd.runtime_directories:
                directory.mkdir(parents=True, exist_ok=True)
                directory.chmod(cmd.runtime_directory_mode)
            pre_failed = self._run_hooks("ExecStartPre", cmd.start_pre)
            if pre_failed is not None:
                returncode = pre_failed
                self._record("exit", None, returncode)
            else:
                with open(self.log_path, "ab", buffering=0) as log:
                    log.write(f"--- {time.strftime('%H:%M:%S')} {cmd.unit_name} start: "
                              f"{' '.join(cmd.argv)}\n".encode())
                    with self._lock:
                        if self._stopping.is_set():
                            break
                        self._popen = subprocess.Popen(
                            netns_argv(self.netns, cmd.argv),
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            env=cmd.env, start_new_session=True,
                        )
                popen = self._popen
                if self.main_pid_file is not None:
                    self.main_pid_file.parent.mkdir(parents=True, exist_ok=True)
                    self.main_pid_file.write_text(f"{popen.pid}\n")
                self._record("start", popen.pid)
                self.state = "active"
                returncode = popen.wait()
                self._record("exit", popen.pid, returncode)
                with open(self.log_path, "ab", buffering=0) as log:
                    log.write(f"--- {time.strftime('%H:%M:%S')} {cmd.unit_name} exited: "
                              f"{returncode}\n".encode())
                # KillMode=control-group: leftovers of the main process go with it.
                for leftover in (p for p in _group_members(popen.pid) if pid_alive(p)):
                    try:
                        os.kill(leftover, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self._run_hooks("ExecStopPost", cmd.stop_post)
            for directory in cmd.runtime_directories:
                shutil.rmtree(directory, ignore_errors=True)
            if self._stopping.is_set():
                break
            if not self._should_restart(returncode):
                self.state = "inactive (exited)" if self._clean(returncode)[0] else "failed"
                return
            self._record("restart-scheduled")
            self.state = "activating (auto-restart)"
            if self._stopping.wait(cmd.restart_s):
                break
        self._record("stopped")
        self.state = "inactive"


    def _run_hooks(self, key: str, lines: Sequence[ExecLine]) -> int | None:
        """Run ``ExecStartPre``/``ExecStopPost`` commands in order (each bounded); the exit
        status of the first failing one that is not ``-``-prefixed, else None."""
        for line in lines:
            with open(self.log_path, "ab", buffering=0) as log:
                log.write(f"--- {time.strftime('%H:%M:%S')} {self.command.unit_name} {key}: "
                          f"{' '.join(line.argv)}\n".encode())
                try:
                    result = subprocess.run(netns_argv(self.netns, line.argv), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            env=self.command.env, timeout=HOOK_TIMEOUT_S, check=False)
                    returncode = result.returncode
                except subprocess.TimeoutExpired:
                    returncode = -int(signal.SIGKILL)
                except OSError as exc:
                    log.write(f"--- {key} could not run: {exc}\n".encode())
                    returncode = 203  # systemd's EXIT_EXEC
            self._record(key, None, returncode)
            if returncode != 0 and not line.ignore_failure:
                return returncode
        return None


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members
