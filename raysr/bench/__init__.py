"""Benchmarks: ``python -m raysr.bench <name> …``.

Each benchmark is a module here exposing ``add_arguments(parser)`` and
``run(args) -> int``. Every figure is printed beside a baseline measured in the
same run, so results read as ratios on whatever machine runs them.
"""

BENCHMARKS = {
    "imresize": "raysr.bench.imresize",
    "data": "raysr.bench.data",
}
