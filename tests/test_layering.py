"""Lower layers never import higher ones: every raysr module sits in a layer of :data:`LAYERS` and
imports nothing from a layer above its own; only the Ray layers import ray; the module graph has
no cycle; and the inference tools load neither the training stack (engine, losses) nor Ray."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import raysr

ROOT = Path(raysr.__file__).parent

# raysr's layers, lowest first: a module may import modules of its own layer and of the layers
# before it, never of a layer after it (function-level imports count). A new module goes into the
# lowest layer that holds everything it imports.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base: plain Python, local/S3 storage, image codecs, tensor ops and metrics", (
        "raysr", "raysr.util", "raysr.storage", "raysr.hub", "raysr.images", "raysr.ops", "raysr.ops.convert",
        "raysr.ops.resize", "raysr.ops.jpeg", "raysr.metrics", "raysr.inference", "raysr.runlog")),
    ("data: shards, the training stream, validation pairs", (
        "raysr.data", "raysr.data.augment", "raysr.data.decode", "raysr.data.device_batches", "raysr.data.image_shards",
        "raysr.data.loader", "raysr.data.make_shards", "raysr.data.manifest", "raysr.data.npy", "raysr.data.pairing",
        "raysr.data.samples", "raysr.data.sources", "raysr.data.stream",
        "raysr.degradation", "raysr.degradation.kernels", "raysr.degradation.pipeline", "raysr.degradation.pool",
        "raysr.degradation.regions", "raysr.validation", "raysr.validation.pairs")),
    ("networks and their weights", (
        "raysr.models", "raysr.models.common", "raysr.models.compact", "raysr.models.discriminators", "raysr.models.rrdbnet",
        "raysr.models.srcnn", "raysr.models.srresnet", "raysr.models.vdsr", "raysr.models.vgg", "raysr.weights")),
    ("config", ("raysr.config",)),
    ("scoring: the SR metrics protocol, LPIPS", ("raysr.scoring", "raysr.lpips")),
    ("losses", ("raysr.losses",)),
    ("files: the run checkpoint, generator files, shared command-line helpers", (
        "raysr.run_checkpoint", "raysr.generator_file", "raysr.onnx_file", "raysr.cli", "raysr.trackers")),
    ("engine: the training step", ("raysr.engine",)),
    ("validator", ("raysr.validation.validator",)),
    ("tools without Ray: inference, evaluation, interpolation, demo data", (
        "raysr.interpolate", "raysr.export", "raysr.demo", "raysr.preview")),
    ("ray: start-up, the TorchTrainer, rank 0's duties and validations, Ctrl-C, Ray Data batch inference", (
        "raysr.ray_setup", "raysr.validation.queue", "raysr.rank_zero", "raysr.stop_request", "raysr.batch_inference")),
    ("tools that run on Ray Data with --ray (Ray is imported only then)", ("raysr.upscale", "raysr.evaluate")),
    ("driver", ("raysr.train",)),
    ("on the driver: tuning and benchmarks", (
        "raysr.tune", "raysr.tune.__main__", "raysr.tune.cli", "raysr.tune.report", "raysr.tune.space",
        "raysr.tune.trial", "raysr.bench", "raysr.bench.__main__", "raysr.bench.data", "raysr.bench.imresize",
        "raysr.bench.overhead", "raysr.bench.step", "raysr.bench.train_run", "raysr.bench.upscale",
        "raysr.bench.validation")),
]
RAY_LAYERS = {"ray", "driver", "on the driver"}  # the layers (names up to the colon) allowed to import ray


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


def imports_ray(path: Path) -> bool:
    """Whether ``path`` imports ray anywhere in its body (function-level imports too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        if any(name == "ray" or name.startswith("ray.") for name in names):
            return True
    return False


def layer_of() -> dict[str, tuple[int, str]]:
    """Each listed module's (layer index, short layer name), checking that none is listed twice."""
    found: dict[str, tuple[int, str]] = {}
    for i, (layer, modules) in enumerate(LAYERS):
        for m in modules:
            assert m not in found, f"{m} is listed in two layers: {found[m][1]!r} and {layer!r}"
            found[m] = (i, layer.split(":")[0])
    return found


def raysr_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def test_every_module_has_a_layer():
    layers, files = layer_of(), raysr_modules()
    unlisted = sorted(set(files) - set(layers))
    assert not unlisted, (f"{', '.join(unlisted)} in no layer: add each to LAYERS in tests/test_layering.py, "
                          "in the lowest layer that holds everything it imports")
    gone = sorted(set(layers) - set(files))
    assert not gone, f"LAYERS in tests/test_layering.py lists modules that do not exist: {', '.join(gone)}"


def test_no_module_imports_from_a_higher_layer():
    layers, files = layer_of(), raysr_modules()
    upward = []
    for m, path in sorted(files.items()):
        if m not in layers:  # test_every_module_has_a_layer says where to add it
            continue
        for dep in sorted(imports_of(path, set(files)) - {m}):
            if dep in layers and layers[dep][0] > layers[m][0]:
                upward.append(f"{m} ({layers[m][1]}) imports {dep} ({layers[dep][1]})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_only_the_ray_layers_import_ray():
    layers, files = layer_of(), raysr_modules()
    assert RAY_LAYERS <= {name for _, name in layers.values()}
    below = sorted(m for m, path in files.items() if m in layers and layers[m][1] not in RAY_LAYERS
                   and imports_ray(path))
    assert not below, f"below the Ray layers {sorted(RAY_LAYERS)}, these import ray: {', '.join(below)}"
    # a sanity check that the detection is real
    assert imports_ray(files["raysr.ray_setup"]) and imports_ray(files["raysr.validation.queue"])


def test_the_import_graph_has_no_cycle():
    files = raysr_modules()
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


INFERENCE_SIDE = ["raysr.models", "raysr.generator_file", "raysr.upscale", "raysr.evaluate", "raysr.interpolate",
                  "raysr.scoring", "raysr.run_checkpoint"]


# One fresh interpreter imports torch (which every inference module loads, and which loads neither the
# training stack nor Ray), then forks a child per module: each child imports its module into that clean
# state and prints which training-stack or Ray modules are loaded. A fresh interpreter per module took
# about 2 CPU-s each, torch's import, all but the first of them for nothing.
PROBE = """
import json, os, sys, traceback
import torch
for module in sys.argv[1:]:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            __import__(module)
            bad = sorted(m for m in sys.modules if m in ('raysr.engine', 'raysr.losses', 'ray') or m.startswith('ray.'))
            print(json.dumps([module, str(bad), "", 0]))
        except BaseException:
            print(json.dumps([module, "", traceback.format_exc(), 1]))
        sys.stdout.flush()
        os._exit(0)
    os.waitpid(pid, 0)
"""


@pytest.fixture(scope="module")
def inference_side_imports() -> dict[str, tuple[str, str, int]]:
    """{module: (the loaded training-stack or Ray modules, as printed, the import's traceback, 1 if it failed)}."""
    # raysr.engine last, a control: the probe sees what a module loads (the engine is training stack)
    probe = subprocess.run([sys.executable, "-c", PROBE, *INFERENCE_SIDE, "raysr.engine"], capture_output=True,
                           text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    found = {module: tuple(rest) for module, *rest in map(json.loads, probe.stdout.splitlines())}
    assert list(found) == [*INFERENCE_SIDE, "raysr.engine"], probe.stdout + probe.stderr
    assert found.pop("raysr.engine") == ("['raysr.engine', 'raysr.losses']", "", 0)
    return found


@pytest.mark.parametrize("module", INFERENCE_SIDE)
def test_inference_side_loads_no_training_stack_and_no_ray(inference_side_imports, module):
    out, err, status = inference_side_imports[module]
    assert status == 0, err
    assert out.strip() == "[]", f"import {module} loads {out.strip()}"
