"""Lower layers never import higher ones: the module graph of raysr has no cycle, and the
inference tools load neither the training stack (engine, losses) nor Ray."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import raysr

ROOT = Path(raysr.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """raysr modules that ``path`` imports anywhere in its body (function-level imports too)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_the_import_graph_has_no_cycle():
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {m: imports_of(p, set(files)) - {m} for m, p in files.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m, path):
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # a sanity check that the graph is real: the driver imports the engine lazily, tune the driver
    assert "raysr.engine" in graph["raysr.train"] and "raysr.generator_file" in graph["raysr.engine"]


@pytest.mark.parametrize("module", ["raysr.models", "raysr.generator_file", "raysr.upscale", "raysr.evaluate",
                                    "raysr.interpolate", "raysr.scoring", "raysr.run_checkpoint"])
def test_inference_side_loads_no_training_stack_and_no_ray(module):
    code = (f"import sys, {module}; "
            "bad = sorted(m for m in sys.modules if m in ('raysr.engine', 'raysr.losses', 'ray') "
            "or m.startswith('ray.')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import {module} loads {out.strip()}"
