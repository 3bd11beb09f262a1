"""MATLAB-bicubic downscaling of training crops: raysr.ops.imresize vs a per-crop numpy loop.

The baseline is how BasicSR-style data loaders make LR crops: per crop, compute
the taps of each dimension, then loop over output rows and channels, each a
small dot product. raysr.ops.imresize applies the same definition to a whole
batch, each pass as a dense matrix product or, for integer factors, as a
strided depthwise convolution; the report says which ran. Both run on one CPU
thread (the loader worker's share of a machine) unless ``--device cuda`` moves
raysr's side to the GPU. Times are per crop, the best of ``--repeat`` runs, as
wall-clock and as process CPU time; on a shared, loaded machine only the CPU
times stay comparable from run to run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch

from raysr.ops import imresize
from raysr.ops.resize import contributions, describe, mirror, output_length

# raysr and the float64 baseline must agree to this (max abs, images in [0,1]).
AGREEMENT_TOL = 1e-5


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def _device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (use cpu or cuda)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=_positive(int), default=128, help="HR crop side in pixels (default 128)")
    parser.add_argument("--scale", type=_positive(float), default=4.0,
                        help="downscale factor; LR side = ceil(size / scale) (default 4)")
    parser.add_argument("--batch", type=_positive(int), default=64, help="crops per batched call (default 64)")
    parser.add_argument("--repeat", type=_positive(int), default=5, help="timed runs; the best counts (default 5)")
    parser.add_argument("--device", type=_device, default="cpu",
                        help="device for raysr's side, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with all figures last")


def numpy_imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """The baseline: one ``(C,H,W)`` float64 crop, one output row and channel at a time.

    Per dimension, as BasicSR's ``imresize``: compute the taps, pad the crop
    symmetrically once, then each output row is a dot product of its weights
    with a contiguous window of the padded input.
    """
    out = img
    for axis in (1, 2):
        src = np.moveaxis(out, axis, 1)
        in_length = src.shape[1]
        weights, first = contributions(in_length, output_length(in_length, scale), scale)
        taps = weights.shape[1]
        start = int(first.min())
        padded = src[:, mirror(np.arange(start, int(first.max()) + taps), in_length)]
        res = np.empty((src.shape[0], weights.shape[0], src.shape[2]))
        for i in range(weights.shape[0]):
            lo = first[i] - start
            for c in range(src.shape[0]):
                res[c, i] = weights[i] @ padded[c, lo:lo + taps]
        out = np.moveaxis(res, 1, axis)
    return out


def _best_seconds(fn, repeat: int, sync) -> tuple[float, float]:
    """Best wall-clock and best process-CPU seconds of ``repeat`` runs after a warm-up.

    CPU time leaves out the time a loaded machine keeps the process waiting,
    so it stays comparable across runs on a shared box; wall time is what a
    lone loader worker sees (and the only honest figure with ``--device cuda``).
    """
    fn()  # warm-up: weight caches, allocator, CUDA context
    sync()
    wall = cpu = math.inf
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def run(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU; run without --device", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    factor = 1.0 / args.scale
    crops = np.random.default_rng(0).random((args.batch, 3, args.size, args.size))
    batch = torch.from_numpy(crops).float().to(device)

    timings = {
        "baseline": _best_seconds(lambda: [numpy_imresize(c, factor) for c in crops], args.repeat, sync),
        "batched": _best_seconds(lambda: imresize(batch, factor), args.repeat, sync),
        "single": _best_seconds(lambda: [imresize(c, factor) for c in batch], args.repeat, sync),
    }
    per_crop = {name: (wall / args.batch, cpu / args.batch) for name, (wall, cpu) in timings.items()}

    expected = np.stack([numpy_imresize(c, factor) for c in crops])
    max_diff = float(np.abs(imresize(batch, factor).double().cpu().numpy() - expected).max())
    lr_side = output_length(args.size, factor)
    result = {
        "benchmark": "imresize", "size": args.size, "scale": args.scale, "lr_size": lr_side,
        "batch": args.batch, "repeat": args.repeat, "device": str(device), "threads": torch.get_num_threads(),
        "max_abs_diff": max_diff,
        "path_batched": describe(tuple(batch.shape), factor), "path_single": describe(tuple(batch.shape[1:]), factor),
    }
    for name, (wall, cpu) in per_crop.items():
        result[f"{name}_us_per_crop"] = wall * 1e6
        result[f"{name}_cpu_us_per_crop"] = cpu * 1e6
    for name in ("batched", "single"):
        result[f"speedup_{name}"] = per_crop["baseline"][0] / per_crop[name][0]
        result[f"speedup_{name}_cpu"] = per_crop["baseline"][1] / per_crop[name][1]

    print(f"imresize: {args.size}x{args.size} RGB crops -> {lr_side}x{lr_side} (/{args.scale:g}), "
          f"{torch.get_num_threads()} CPU thread, raysr on {device}, best of {args.repeat}")
    print(f"  {'us per crop':32s} {'wall':>9s} {'speed-up':>9s} {'cpu':>9s} {'speed-up':>9s}")
    labels = {"baseline": "numpy per-crop loop (baseline)", "batched": f"raysr batched ({args.batch} crops)",
              "single": "raysr one crop per call"}
    for name, label in labels.items():
        wall, cpu = per_crop[name]
        ratios = ("", "") if name == "baseline" else (f"{result[f'speedup_{name}']:.1f}x",
                                                      f"{result[f'speedup_{name}_cpu']:.1f}x")
        print(f"  {label:32s} {wall * 1e6:9.1f} {ratios[0]:>9s} {cpu * 1e6:9.1f} {ratios[1]:>9s}")
    print(f"  max |raysr - baseline| = {max_diff:.2e} (tolerance {AGREEMENT_TOL:g})")
    print(f"  path, batched:  {result['path_batched']}")
    print(f"  path, one crop: {result['path_single']}")
    if args.json:
        print(json.dumps(result))
    if max_diff > AGREEMENT_TOL:
        print(f"error: raysr.ops.imresize disagrees with the baseline by {max_diff:.2e}", file=sys.stderr)
        return 1
    return 0
