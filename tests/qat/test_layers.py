"""The architecture as tests: no import circle in qat/ or kernels/, and the job layer (qat.run)
imported only from the top (qat.cli, train.py, tests).

The import graph is read from the source (every `import`, function-local ones included), so a
circle hidden inside a function counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JOB_LAYER = "qat.run"
# Packages below the job layer: importing any module of theirs must load no qat.run module.
LOWER = ("qat.config", "qat.functional", "qat.ste", "qat.observers", "qat.fake_quant", "qat.modules", "qat.swap",
         "qat.control", "qat.prune", "qat.distill", "qat.ptq", "qat.tasks", "qat.recipe", "qat.data", "qat.models",
         "qat.hf", "qat.export", "qat.eval", "qat.lightning", "qat.monitor", "qat.kernels")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for qat/ and kernels/ (installed as qat.kernels)."""
    found = {}
    for folder, package in ((ROOT / "qat", "qat"), (ROOT / "kernels", "qat.kernels")):
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The qat modules `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {target for target in targets if target in modules and target != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_in_qat_or_kernels():
    modules = module_files()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle_through_a_function_local_import(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert cycles(graph) == [["a", "b"]]


def test_only_the_top_imports_the_job_layer():
    modules = module_files()
    importers = sorted(name for name, path in modules.items() if not name.startswith(JOB_LAYER)
                       and any(target.startswith(JOB_LAYER) for target in imports_of(name, path, modules)))
    assert importers == ["qat.cli"]


def test_importing_every_lower_module_loads_no_job_layer_module():
    """One process imports every module below the job layer (a subprocess per package took minutes); a
    module that pulled qat.run in at import time, directly or through another, shows here."""
    modules = sorted(name for name in module_files() if any(name == p or name.startswith(p + ".") for p in LOWER))
    script = ("import importlib, sys\n"
              f"for name in {modules!r}:\n"
              "    importlib.import_module(name)\n"
              f"print(sorted(m for m in sys.modules if m == {JOB_LAYER!r} or m.startswith({JOB_LAYER + '.'!r})))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
