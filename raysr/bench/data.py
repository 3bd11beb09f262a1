"""Data pipeline throughput (crops/s) beside a BasicSR-style baseline measured in the same run.

    python -m raysr.bench data --shards s3://bucket/hr --gt-size 128 --scale 4 --batch-size 16 \\
        --batches 100 --workers 0 --json

Ours: :func:`raysr.data.make_train_loader` streaming real batches from the
shards (``--workers 0`` runs everything in this process, on one core).
Baseline, on one core: what BasicSR's paired dataset does per crop — decode
the sub-image with PIL, take a random ``gt_size`` crop, make LR with a numpy
MATLAB ``imresize`` that computes its weights per call and loops over output
rows and channels (:func:`raysr.bench.imresize.numpy_imresize`). The first
batch (worker start, shuffle-buffer fill) is timed separately as ``startup_s``.
Any WebDataset shards work; the dataset size (``dataset_samples``) comes from a
``manifest.parquet`` when there is one, else it is reported as unknown (null).
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
from PIL import Image

from raysr import storage
from raysr.bench import below_one, error
from raysr.bench.imresize import numpy_imresize
from raysr.data import make_lr, make_train_loader, resolve_shards
from raysr.data.samples import image_member, tar_samples
from raysr.data.stream import DEFAULT_SHUFFLE_BUFFER


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", nargs="+", required=True, metavar="URL",
                        help="shard URLs, brace patterns, a directory or a manifest.parquet (local or s3://)")
    parser.add_argument("--gt-size", type=int, default=128, help="HR crop side in px")
    parser.add_argument("--scale", type=int, default=4, help="SR scale (LR = HR / scale)")
    parser.add_argument("--batch-size", type=int, default=16, help="crops per batch")
    parser.add_argument("--batches", type=int, default=50, help="batches to time (after one warm-up batch)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes; 0 = this process only")
    parser.add_argument("--crops-per-image", type=int, default=1, help="random crops per decoded image")
    parser.add_argument("--shuffle-buffer", type=int, default=DEFAULT_SHUFFLE_BUFFER, help="crops in the shuffle buffer")
    parser.add_argument("--lr-on", choices=("loader", "device"), default="loader",
                        help="make LR in the loader, or here on --device (timed as part of the stream)")
    parser.add_argument("--device", default="cpu", help="torch device for --lr-on device")
    parser.add_argument("--baseline-crops", type=int, default=60, help="crops the baseline times")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


def _encoded_images(shard_list, count: int) -> list[bytes]:
    """The encoded image members of the first ``count`` samples of the shards that have one."""
    found = []
    for url in shard_list.urls:
        with storage.open_stream(url) as stream:
            for _, files in tar_samples(stream):
                ext = image_member(files)
                if ext is not None:
                    found.append(files[ext])
                if len(found) >= count:
                    return found
    if not found:
        raise ValueError(f"no image samples in {shard_list.urls[0]} ... ({len(shard_list)} shards)")
    return found


def measure_baseline(encoded: list[bytes], gt_size: int, scale: int, crops: int, seed: int) -> float:
    """Crops/s of decode -> random crop -> numpy imresize, one crop per decode."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for i in range(crops):
        image = np.asarray(Image.open(io.BytesIO(encoded[i % len(encoded)])).convert("RGB"))
        top = rng.integers(image.shape[0] - gt_size + 1)
        left = rng.integers(image.shape[1] - gt_size + 1)
        hr = image[top:top + gt_size, left:left + gt_size].transpose(2, 0, 1).astype(np.float64) / 255.0
        numpy_imresize(hr, 1.0 / scale)
    return crops / (time.perf_counter() - start)


def measure_pipeline(args: argparse.Namespace, shard_list) -> dict:
    """Crops/s of make_train_loader over ``args.batches`` batches after a warm-up batch."""
    loader = make_train_loader(shard_list, args.gt_size, args.scale, args.batch_size, num_workers=args.workers,
                               seed=args.seed, crops_per_image=args.crops_per_image,
                               batches_per_epoch=args.batches + 1, lr_on=args.lr_on,
                               shuffle_buffer=args.shuffle_buffer)
    device = torch.device(args.device)
    start = time.perf_counter()
    first = None
    try:
        for lr, hr in loader:
            if args.lr_on == "device":
                lr = make_lr(hr.to(device, non_blocking=True), args.scale)
            if first is None:
                first = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
        stats = loader.stats()
    finally:
        loader.close()
    crops_per_s = args.batches * args.batch_size / (end - first)
    return {"crops_per_s": crops_per_s, "crops_per_s_per_core": crops_per_s / max(1, args.workers),
            "startup_s": first - start, "samples": stats["samples"], "skipped": stats["skipped"]}


def _check_args(args: argparse.Namespace) -> str:
    """What is wrong with the command line, or ""."""
    problem = below_one(args, ("gt_size", "scale", "batch_size", "batches", "baseline_crops"))
    if problem:
        return problem
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        return f"--device {args.device!r} is not a torch device ({err}); use cpu, cuda or cuda:N"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {args.device} but torch sees no CUDA GPU; use --device cpu"
    return ""


def run(args: argparse.Namespace) -> int:
    problem = _check_args(args)
    if problem:
        return error("data", problem)
    torch.set_num_threads(1)  # per-core figures: this process uses one core, as each loader worker does
    try:
        shard_list = resolve_shards(args.shards)
        baseline = measure_baseline(_encoded_images(shard_list, 8), args.gt_size, args.scale, args.baseline_crops,
                                    args.seed)
        ours = measure_pipeline(args, shard_list)
    except (ValueError, storage.StorageError) as err:
        return error("data", str(err))
    cores = max(1, args.workers)
    speedup = ours["crops_per_s_per_core"] / baseline
    size = f"{shard_list.num_samples} samples" if shard_list.num_samples is not None else "size unknown (no manifest)"
    print(f"dataset: {len(shard_list)} shards, {size}")
    print(f"raysr.data ({args.workers} workers, {args.crops_per_image} crop(s)/image, LR on {args.lr_on}): "
          f"{ours['crops_per_s']:.1f} crops/s = {ours['crops_per_s_per_core']:.1f} per core ({cores} core(s)); "
          f"startup {ours['startup_s']:.1f} s; {ours['samples']} samples, {ours['skipped']} skipped")
    print(f"BasicSR-style baseline (PIL decode, crop, numpy imresize; 1 core): {baseline:.1f} crops/s")
    print(f"speed-up per core: {speedup:.1f}x")
    if args.json:
        print(json.dumps({**ours, "baseline_crops_per_s": baseline, "speedup_per_core": speedup,
                          "workers": args.workers, "batches": args.batches, "batch_size": args.batch_size,
                          "gt_size": args.gt_size, "scale": args.scale, "crops_per_image": args.crops_per_image,
                          "lr_on": args.lr_on, "shards": len(shard_list),
                          "dataset_samples": shard_list.num_samples}))
    return 0
