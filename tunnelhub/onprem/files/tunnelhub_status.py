#!/usr/bin/python3
"""tunnelhub-<hub>-status: is each proxy slot's tunnel up, since when, its last error, and each
route's health as the proxy itself reports it.

Installed by the on-prem package as ``/usr/bin/tunnelhub-<hub>-status``; the package build puts
this hub's settings into ``CONFIG`` below (``--config FILE`` reads them from a JSON file instead).
Standard library only: it runs on the tunnel host (Debian 12 / Ubuntu, python3).

Per slot, from systemd: the unit's state (``systemctl show``: ActiveState, SubState,
ActiveEnterTimestamp, InactiveEnterTimestamp) and the last error line of its journal
(``journalctl -u <unit> -o json``: the newest entry at priority warning or worse, or an ssh /
autossh failure message). Per slot and route, from the proxy: ``GET /routes/<route>`` of the
proxy's health endpoint, the same answer its load balancer probes, read **through the slot's own
tunnel session**: each unit's ssh also holds ``-L <socket>:127.0.0.1:<health_port>`` (a unix
socket in the unit's runtime directory on this host, the proxy's loopback on the other end; the
proxies' sshd permits exactly that destination), so no new inbound path to the proxies exists.

The tunnel of a slot is ``up`` when its unit is active and the proxy answered through it;
``connecting`` when the unit runs but no session is established (no socket, or nothing answers
on it); ``stalled`` when the session accepted the request but the proxy did not answer within the
timeout; otherwise the unit's state (``inactive``, ``failed``, ``activating``...). ``since`` is
when that state began: for ``up``, when ssh bound the health socket (right after the session
authenticated; the unit's ActiveEnterTimestamp if the socket's time is unknown); for a unit not
active, its InactiveEnterTimestamp; while connecting, the newest error since the unit started.

Exit status, as monitoring plugins count (Nagios / Monitoring Plugins guidelines: 0 OK,
1 WARNING, 2 CRITICAL, 3 UNKNOWN):
  0  every route is healthy through every slot
  1  degraded: every route is healthy through at least one slot, but a tunnel or a route on
     some slot is down
  2  down: at least one route is healthy through no slot
  3  unknown: bad arguments or configuration, or systemctl could not be run
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, Optional

CONFIG: Optional[dict] = None  # tunnelhub onprem: the package build writes this hub's settings here

EXIT_OK, EXIT_DEGRADED, EXIT_DOWN, EXIT_UNKNOWN = 0, 1, 2, 3
JOURNAL_LINES = 300
"""How far back the last error is looked for (a flapping tunnel logs a few lines per attempt)."""
ERROR_RE = re.compile(
    r"error|refused|denied|fail|timed? ?out|unreachable|no route|closed|reset|not available|"
    r"host key|could not|cannot|disconnect|lost|broken pipe|administratively prohibited",
    re.IGNORECASE)
"""ssh writes its failures to stderr, which the journal records at info priority: besides entries
at warning or worse (autossh's syslog), a line with one of these words is an error."""
EVENT_RE = re.compile(r"\bslot=\S+ route=\S+ event=")
"""The units' own start/stop lines (ExecStartPre / ExecStopPost): events, not errors."""


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2, which here means "down"
        self.print_usage(sys.stderr)
        self.exit(EXIT_UNKNOWN, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------------------------- systemd


def run(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, SYSTEMD_PAGER="", SYSTEMD_COLORS="0", LC_ALL="C")
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)


def unit_state(unit: str, timeout_s: float) -> dict[str, Any]:
    """``systemctl show`` of one unit, timestamps as UNIX seconds (``--timestamp=unix``, systemd 248+)."""
    props = ("ActiveState", "SubState", "Result", "NRestarts", "ActiveEnterTimestamp", "InactiveEnterTimestamp")
    try:
        done = run(["systemctl", "show", "--timestamp=unix", "-p", ",".join(props), "--", unit], timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"cannot run systemctl: {exc}") from None
    if done.returncode != 0:
        raise UsageError(f"systemctl show {unit} failed: {done.stderr.strip() or done.returncode}")
    values = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    state: dict[str, Any] = {"active_state": values.get("ActiveState", "unknown"),
                             "sub_state": values.get("SubState", ""), "result": values.get("Result", ""),
                             "restarts": int(values["NRestarts"]) if values.get("NRestarts", "").isdigit() else None}
    for key, prop in (("active_since", "ActiveEnterTimestamp"), ("inactive_since", "InactiveEnterTimestamp")):
        raw = values.get(prop, "").lstrip("@")
        state[key] = int(raw) if raw.isdigit() and raw != "0" else None
    return state


def last_error(unit: str, timeout_s: float) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(the newest error entry of the unit's journal as {time, message}, or why it is unknown)."""
    try:
        done = run(["journalctl", "-u", unit, "-n", str(JOURNAL_LINES), "-o", "json", "--no-pager", "-q"],
                   timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"cannot run journalctl: {exc}"
    entries = []
    for line in done.stdout.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    if done.returncode != 0 and not entries:
        return None, (done.stderr.strip().splitlines() or [f"journalctl exited {done.returncode}"])[-1]
    for entry in reversed(entries):
        message = entry.get("MESSAGE")
        if isinstance(message, list):  # journald gives non-UTF-8 messages as byte arrays
            message = bytes(message).decode("utf-8", "replace")
        if not isinstance(message, str) or EVENT_RE.search(message):
            continue
        priority = int(entry["PRIORITY"]) if str(entry.get("PRIORITY", "")).isdigit() else 6
        if priority <= 4 or ERROR_RE.search(message):
            stamp = str(entry.get("__REALTIME_TIMESTAMP", ""))
            return {"time": int(stamp) / 1e6 if stamp.isdigit() else None,
                    "message": " ".join(message.split())}, None
    return None, None


# ----------------------------------------------------------------------------------- the proxy


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class NotConnected(Exception):
    """No session: the socket is missing or nothing listens on it."""


class NoAnswer(Exception):
    """The session took the request, the proxy did not answer."""


def route_health(path: str, route: str, timeout_s: float) -> dict[str, Any]:
    """The proxy's ``GET /routes/<route>`` answer (200 healthy, 503 not, JSON body)."""
    conn = UnixHTTPConnection(path, timeout_s)
    try:
        try:
            conn.connect()
        except OSError as exc:
            raise NotConnected(f"{path}: {exc.strerror or exc}") from None
        try:
            conn.request("GET", f"/routes/{route}", headers={"Connection": "close"})
            response = conn.getresponse()
            body = response.read(65536)
        except (OSError, http.client.HTTPException) as exc:
            # ssh accepts on the socket before the proxy side opens: a refused or dead channel
            # closes the connection with nothing (RemoteDisconnected), a dead path times out.
            if isinstance(exc, socket.timeout):
                raise NoAnswer(f"no answer from the proxy within {timeout_s:g} s") from None
            raise NotConnected(f"the tunnel closed the request ({exc.__class__.__name__}): the session is "
                               "not up, or the proxy refuses the health forward (its hub configuration "
                               "predates it?)") from None
    finally:
        conn.close()
    try:
        data = json.loads(body.decode("utf-8"))
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    return {"http_status": response.status, "healthy": response.status == 200 and data.get("healthy") is True,
            "reason": data.get("reason") or data.get("error") or f"HTTP {response.status}",
            "checked_age_s": data.get("age_s"), "latency_ms": data.get("latency_ms"), "mode": data.get("mode")}


# ----------------------------------------------------------------------------------- status


def slot_status(config: dict, slot: dict, timeout_s: float) -> dict[str, Any]:
    unit = slot["unit"]
    state = unit_state(unit, timeout_s + 5)
    error, journal_problem = last_error(unit, timeout_s + 5)
    result: dict[str, Any] = {"slot": slot["slot"], "endpoint": slot_endpoint(config, slot), "unit": unit,
                              **{k: state[k] for k in ("active_state", "sub_state", "result", "restarts")},
                              "tunnel": state["active_state"], "since": None, "last_error": error,
                              "journal_problem": journal_problem, "health_problem": None, "routes": []}
    active = state["active_state"] == "active"
    reached = False
    problem: Optional[str] = None if active else f"the unit is {state['active_state']}"
    for route in config["routes"]:
        entry: dict[str, Any] = {"route": route["route"], "tunnel_port": route["tunnel_port"], "state": "unreachable",
                                 "healthy": None, "reason": None, "http_status": None, "checked_age_s": None}
        if problem is None:
            try:
                answer = route_health(slot["socket"], route["route"], timeout_s)
            except NotConnected as exc:
                problem, result["tunnel"] = str(exc), "connecting"
            except NoAnswer as exc:
                problem, result["tunnel"] = str(exc), "stalled"
            else:
                reached = True
                entry.update(answer, state="up" if answer["healthy"] else "down")
                entry.pop("latency_ms", None)
                entry.pop("mode", None)
        if entry["state"] == "unreachable":
            entry["reason"] = f"unreachable: {problem}"
        result["routes"].append(entry)
    result["health_problem"] = problem
    if reached:
        result["tunnel"] = "up"
        try:
            result["since"] = os.stat(slot["socket"]).st_mtime
        except OSError:
            result["since"] = state["active_since"]
    elif active:
        started = state["active_since"]
        result["since"] = error["time"] if error and error["time"] and (started is None or error["time"] >= started) \
            else started
    else:
        result["since"] = state["inactive_since"]
    return result


def slot_endpoint(config: dict, slot: dict) -> str:
    """The slot's address as the unit dials it: its slot-N.env (a conffile, maybe edited here)."""
    try:
        with open(os.path.join(config["etc_dir"], f"slot-{slot['slot']}.env"), encoding="utf-8") as fh:
            for line in fh:
                key, sep, value = line.strip().partition("=")
                if sep and key == "TUNNELHUB_ENDPOINT":
                    return value.strip().strip("'\"")
    except OSError:
        pass
    return slot["endpoint"]


def collect(config: dict, timeout_s: float) -> dict[str, Any]:
    """Every slot, queried in parallel (each bounded by the timeout), and the verdict."""
    slots: list[Optional[dict]] = [None] * len(config["slots"])
    failures: list[str] = []

    def one(i: int, slot: dict) -> None:
        try:
            slots[i] = slot_status(config, slot, timeout_s)
        except UsageError as exc:
            failures.append(str(exc))

    threads = [threading.Thread(target=one, args=(i, s), daemon=True) for i, s in enumerate(config["slots"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise UsageError(failures[0])
    routes = []
    for route in config["routes"]:
        up = [s["slot"] for s in slots if any(r["route"] == route["route"] and r["state"] == "up" for r in s["routes"])]
        down = [s["slot"] for s in slots if s["slot"] not in up]
        routes.append({"route": route["route"], "tunnel_port": route["tunnel_port"], "target": route["target"],
                       "up_slots": up, "down_slots": down,
                       "state": "up" if not down else ("degraded" if up else "down")})
    if any(r["state"] == "down" for r in routes):
        verdict, code = "down", EXIT_DOWN
    elif any(r["state"] == "degraded" for r in routes):
        verdict, code = "degraded", EXIT_DEGRADED
    else:
        verdict, code = "ok", EXIT_OK
    return {"hub": config["hub"], "package": config["package"], "checked_at": time.time(), "state": verdict,
            "exit_code": code, "routes": routes, "slots": slots}


# ----------------------------------------------------------------------------------- output


def iso(stamp: Optional[float]) -> Optional[str]:
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def ago(stamp: Optional[float], now: float) -> str:
    if stamp is None:
        return "-"
    seconds = max(0, int(now - stamp))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{iso(stamp)} ({seconds // size} {unit} ago)"
    return f"{iso(stamp)} ({seconds} s ago)"


def as_json(status: dict[str, Any]) -> dict[str, Any]:
    """Timestamps as ISO 8601 UTC strings."""
    out = dict(status, checked_at=iso(status["checked_at"]), slots=[])
    for slot in status["slots"]:
        slot = dict(slot, since=iso(slot["since"]))
        if slot["last_error"]:
            slot["last_error"] = dict(slot["last_error"], time=iso(slot["last_error"]["time"]))
        out["slots"].append(slot)
    return out


def table(status: dict[str, Any]) -> str:
    now = status["checked_at"]
    rows = [("SLOT", "PROXY", "TUNNEL", "SINCE", "ROUTE", "HEALTH", "REASON")]
    notes: list[str] = []
    for slot in status["slots"]:
        first = True
        for route in slot["routes"]:
            lead = (str(slot["slot"]), slot["endpoint"], slot["tunnel"], ago(slot["since"], now)) if first \
                else ("", "", "", "")
            rows.append((*lead, route["route"], route["state"], route["reason"] or ""))
            first = False
        if slot["last_error"]:
            when = iso(slot["last_error"]["time"]) or "?"
            notes.append(f"slot {slot['slot']} ({slot['unit']}) last error {when}: {slot['last_error']['message']}")
        elif slot["journal_problem"]:
            notes.append(f"slot {slot['slot']}: journal not read ({slot['journal_problem']}): run as root or "
                         "in group adm / systemd-journal")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    summary = ", ".join(f"{r['route']} {r['state']}" + (f" (down on slot {', '.join(map(str, r['down_slots']))})"
                                                        if r["state"] == "degraded" else "")
                        for r in status["routes"])
    lines.append("")
    lines.extend(notes)
    lines.append(f"hub {status['hub']}: {status['state'].upper()}: {summary}")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def load_config(path: Optional[str]) -> dict:
    if path is None:
        if CONFIG is None:
            raise UsageError("no configuration: this copy was not installed by a tunnelhub package; pass --config")
        return CONFIG
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--config {path}: {exc}") from None
    for key in ("hub", "package", "etc_dir", "slots", "routes"):
        if key not in data:
            raise UsageError(f"--config {path}: missing {key!r}")
    return data


def main(argv: Optional[list[str]] = None) -> int:
    name = f"tunnelhub-{CONFIG['hub']}-status" if CONFIG else "tunnelhub-status"
    parser = Parser(
        prog=name, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show, per proxy slot, whether the tunnel is up, since when and its last error, and each "
                    "route's health as the proxy reports it (read through the slot's tunnel).",
        epilog="exit status:\n  0  every route is healthy through every slot\n"
               "  1  degraded: every route is healthy through at least one slot, something is down\n"
               "  2  down: a route is healthy through no slot\n"
               "  3  unknown: bad arguments or configuration, or systemctl could not be run\n\n"
               "Run as root (or in groups adm and the package's group) to read the journal and the "
               "health sockets.")
    parser.add_argument("--json", action="store_true", help="one JSON object on standard output, for scripts")
    parser.add_argument("--timeout", type=float, default=2.0, metavar="S",
                        help="seconds to wait for each proxy's answer (default 2)")
    parser.add_argument("--config", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 < args.timeout <= 60:
        parser.error("--timeout must be more than 0 and at most 60 seconds")
    try:
        status = collect(load_config(args.config), args.timeout)
    except UsageError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    if args.json:
        json.dump(as_json(status), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(table(status))
    return status["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
