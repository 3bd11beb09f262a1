"""Benchmarks: ``python -m raysr.bench <name> …``.

Each benchmark is a module here exposing ``add_arguments(parser)`` and
``run(args) -> int``. Speeds are printed beside a baseline measured in the same
run (``step``: BasicSR's fp32 eager step; ``data``: its per-crop pipeline;
``overhead``: a plain PyTorch loop; ``step --workers``: one worker), so results
read as ratios on whatever machine runs them. ``train`` times a real
``raysr.train`` run by its own metrics (crops/s, ``data_wait_frac``); ``validation``: the
ranks' time blocked by validation, async beside inline. ``upscale``: ``raysr.upscale`` on Ray Data
at 1 and N actors beside the single-process path.
"""

BENCHMARKS = {
    "imresize": "raysr.bench.imresize",
    "data": "raysr.bench.data",
    "step": "raysr.bench.step",
    "overhead": "raysr.bench.overhead",
    "train": "raysr.bench.train_run",
    "validation": "raysr.bench.validation",
    "upscale": "raysr.bench.upscale",
}


def error(bench: str, message: str) -> int:
    """Print a bench's command-line error and return its exit code, 2. On stderr: with ``--json``,
    stdout's last line must stay the JSON result (or nothing)."""
    import sys
    print(f"raysr.bench {bench}: error: {message}", file=sys.stderr)
    return 2


def below_one(args, names) -> str:
    """The error for the first of ``args``' integer options ``names`` below 1, or ""."""
    for name in names:
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    return ""
