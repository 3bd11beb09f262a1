"""Benchmarks: ``python -m raysr.bench <name> …``.

Each benchmark is a module here exposing ``add_arguments(parser)`` and
``run(args) -> int``. Speeds are printed beside a baseline measured in the same
run (``step``: BasicSR's fp32 eager step; ``data``: its per-crop pipeline;
``overhead``: a plain PyTorch loop; ``step --workers``: one worker), so results
read as ratios on whatever machine runs them. ``train`` times a real
``raysr.train`` run by its own metrics (crops/s, ``data_wait_frac``).
"""

BENCHMARKS = {
    "imresize": "raysr.bench.imresize",
    "data": "raysr.bench.data",
    "step": "raysr.bench.step",
    "overhead": "raysr.bench.overhead",
    "train": "raysr.bench.train_run",
}
