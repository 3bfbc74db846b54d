"""Read a unit's ``ExecStart=`` (and ``ExecStartPre=``/``ExecStopPost=``) the way systemd does,
to run them outside systemd.

Only what the generated units use is supported: line continuations, double and single quotes,
``${VAR}`` / ``$VAR`` environment expansion, ``%i`` and ``%%``. Any other ``%`` specifier is
refused rather than passed on unexpanded.
"""

from __future__ import annotations

import re
import shlex

from tunnelhub.onprem.outputs import OnpremError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\$")


def _logical_lines(unit_text: str) -> list[str]:
    logical: list[str] = []
    pending = ""
    for raw in unit_text.splitlines():
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        logical.append(line)
    return logical


def exec_commands(unit_text: str, key: str) -> list[tuple[str, list[str]]]:
    """Every ``<key>=`` line (``ExecStartPre``, ``ExecStopPost``) as ``(prefixes, words)``, unexpanded.

    ``prefixes`` are systemd's (``-`` failure ignored, ``+`` full privileges, ...); ``%i`` is left
    for the caller (:func:`expand_instance`)."""
    commands = []
    for line in _logical_lines(unit_text):
        if not line.startswith(key + "="):
            continue
        value = line.split("=", 1)[1].strip()
        prefixes = ""
        while value[:1] in ("@", "-", ":", "+", "!"):
            prefixes += value[0]
            value = value[1:]
        commands.append((prefixes, shlex.split(value, posix=True)))
    return commands


def expand_instance(words: list[str], instance: str) -> list[str]:
    """``%i`` (the template instance) and ``%%`` in unit words; any other specifier is refused."""

    def specifier(match: re.Match[str]) -> str:
        if match[1] not in ("i", "%"):
            raise OnpremError(f"unit uses the systemd specifier %{match[1]}; only %i and %% are supported here")
        return instance if match[1] == "i" else "%"

    return [re.sub(r"%(.)", specifier, word) for word in words]


def exec_start_words(unit_text: str) -> list[str]:
    """The words of the (single) ``ExecStart=`` line of a unit file, unexpanded."""
    logical = _logical_lines(unit_text)
    starts = [line.split("=", 1)[1] for line in logical if line.startswith("ExecStart=")]
    if len(starts) != 1:
        raise OnpremError(f"expected exactly one ExecStart= line in the unit, found {len(starts)}")
    value = starts[0].strip()
    if value[:1] in "@-:+!":
        raise OnpremError(f"ExecStart prefixes are not supported here: {value[:1]!r}")
    if re.search(r"%[^%]", value.replace("%%", "")):
        raise OnpremError("ExecStart uses a systemd % specifier; only ${VAR} expansion is supported here")
    return shlex.split(value.replace("%%", "%"), posix=True)


def expand(words: list[str], env: dict[str, str]) -> list[str]:
    """Expand environment variables in ExecStart words like systemd: ``${VAR}`` inside a word,
    ``$VAR`` alone as a word split on whitespace; an unset variable expands to nothing."""
    out: list[str] = []
    for word in words:
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            out.extend(env.get(whole[1], "").split())
            continue
        out.append(_VAR.sub(lambda m: "$" if m[0] == "$$" else env.get(m[1], ""), word))
    return out


def read_env_file(text: str) -> dict[str, str]:
    """Parse a systemd ``EnvironmentFile=`` (``KEY=VALUE`` lines, ``#`` comments)."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise OnpremError(f"not a KEY=VALUE line in an environment file: {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def unit_environment(unit_text: str) -> dict[str, str]:
    """The variables a unit's ``Environment=`` lines set."""
    env: dict[str, str] = {}
    for line in unit_text.splitlines():
        if line.startswith("Environment="):
            for assignment in shlex.split(line.split("=", 1)[1]):
                key, _, value = assignment.partition("=")
                env[key] = value
    return env
