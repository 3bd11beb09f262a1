"""Data pipeline throughput (crops/s per core): shard formats side by side, beside a BasicSR-style baseline, and the loader processes a preset needs.

    python -m raysr.bench data                                  # png vs npy vs npy.lz4 on the demo photos
    python -m raysr.bench data --preset esrgan_psnr_x4          # ... and that preset's loader processes per GPU
    python -m raysr.bench data --shards s3://bucket/hr --crops-per-image 8 --workers 0 --json
    python -m raysr.bench data --degradation realesrgan --formats png  # ... and the kernel draws per crop

Without ``--shards``: the same photos (``--photos``, default scikit-image's sample photos that
the demo trains on) are cut into 480² sub-images (``--crop-size``/``--step``) once per format of
``--formats`` (png, npy, npy.lz4 by default) and each format's loader is timed in turn, in
``--rounds`` interleaved rounds (the median is reported), all in this process on one core, so the
ratios between formats hold on a machine shared with other work. Pin it to one core for clean
figures: ``taskset -c 0 python -m raysr.bench data``.

With ``--shards``: those shards (any WebDataset tars), plus a baseline measured in the same run:
what BasicSR's paired dataset does per crop — decode the sub-image with PIL, take a random
``gt_size`` crop, make LR with a numpy MATLAB ``imresize`` that computes its weights per call and
loops over output rows and channels (:func:`raysr.bench.imresize.numpy_imresize`).

Ours: :func:`raysr.data.make_train_loader` streaming real batches (``--workers 0`` runs everything
in this process). ``crops_per_s_per_core`` is crops per CPU-second of this process with ``--workers 0``
(what one loader process makes on a core of its own, whatever else shares the machine), else wall
crops/s over the workers; ``crops_per_s`` is wall-clock. With ``--lr-on device`` the loader ships
uint8 crops and their flips, and ``--device cuda`` finishes them there as a training rank does
(flips, float, LR); on ``--device cpu`` that GPU work is left out. The first batch (worker start,
shuffle-buffer fill) is timed separately as ``startup_s``.

Beside the loader's speed it gives what one crop costs it per step, in CPU ms on one core: the
decode of its sub-image (``decode_ms_per_crop``: raysr's decoder over the first shard's images,
divided by the crops per image), and, with ``--degradation realesrgan`` (or a preset with
``data.degradation: realesrgan``), the draw of the sample's three blur kernels the loader makes per
crop (``kernels_ms_per_crop``: :func:`raysr.degradation.kernels.draw_kernels` with the preset's
``degradation`` section, else Real-ESRGAN's defaults).

``--preset NAME`` takes the crop size, batch and crops per image from the preset and adds the
sizing: the FLOPs of one training step per crop of the preset's network and phase (torch's
FlopCounterMode, as ``bench step`` counts them), the crops/s an H100 consumes at 40 % of its
989 dense-bf16 TFLOP/s, and so the loader processes per GPU (``data.num_workers``) each format needs.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from raysr import storage
from raysr.bench import below_one, error
from raysr.bench.imresize import numpy_imresize
from raysr.data import make_train_loader, resolve_shards
from raysr.data.decode import decode_member
from raysr.data.make_shards import FORMATS, make_shards
from raysr.data.npy import npy_kind
from raysr.data.samples import image_member, tar_samples
from raysr.data.stream import DEFAULT_SHUFFLE_BUFFER

DEFAULT_FORMATS = ("png", "npy", "npy.lz4")
# The GPU a preset is sized for: an H100 SXM's dense bf16 peak, at the MFU the step aims for.
H100_TFLOPS, GPU_MFU = 989.0, 0.40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", nargs="+", default=None, metavar="URL",
                        help="shard URLs, brace patterns, a directory or a manifest.parquet (local or s3://); "
                             "default: shards of --photos in each of --formats")
    parser.add_argument("--photos", nargs="+", default=None, metavar="DIR_OR_GLOB",
                        help="photos to cut into shards of each format (default: scikit-image's sample photos)")
    parser.add_argument("--formats", nargs="+", default=None, choices=sorted(FORMATS), metavar="FORMAT",
                        help=f"shard formats to compare without --shards (default: {' '.join(DEFAULT_FORMATS)})")
    parser.add_argument("--crop-size", type=int, default=480, help="sub-image side when cutting --photos")
    parser.add_argument("--step", type=int, default=240, help="sub-image stride when cutting --photos")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the formats (median)")
    parser.add_argument("--preset", default=None, help="size the loader for this preset: its crop size, batch, "
                                                         "crops per image, FLOPs per crop and loader processes per GPU")
    parser.add_argument("--gt-size", type=int, default=None, help="HR crop side in px (default 128 or the preset's)")
    parser.add_argument("--scale", type=int, default=4, help="SR scale (LR = HR / scale)")
    parser.add_argument("--batch-size", type=int, default=None, help="crops per batch (default 16 or the preset's)")
    parser.add_argument("--batches", type=int, default=50, help="batches to time (after one warm-up batch)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes; 0 = this process only")
    parser.add_argument("--crops-per-image", type=int, default=None,
                        help="random crops per decoded image (default 8, 1 with --shards, or the preset's)")
    parser.add_argument("--shuffle-buffer", type=int, default=DEFAULT_SHUFFLE_BUFFER, help="crops in the shuffle buffer")
    parser.add_argument("--lr-on", choices=("loader", "device"), default="device",
                        help="make flips and LR in the loader, or leave them to --device (as GPU training does)")
    parser.add_argument("--device", default="cpu", help="torch device that finishes --lr-on device batches; "
                                                        "cpu: not timed (it is the GPU's work)")
    parser.add_argument("--baseline-crops", type=int, default=60, help="crops the baseline times (--shards)")
    parser.add_argument("--degradation", choices=("bicubic", "realesrgan"), default=None,
                        help="realesrgan: also time the blur kernels the loader draws per crop (default bicubic, "
                             "or the preset's data.degradation)")
    parser.add_argument("--kernel-draws", type=int, default=500, help="kernel draws timed with --degradation realesrgan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


def _encoded_images(shard_list, count: int) -> list[tuple[str, bytes]]:
    """``(extension, bytes)`` of the image members of the first ``count`` samples of the shards that have one."""
    found = []
    for url in shard_list.urls:
        with storage.open_stream(url) as stream:
            for _, files in tar_samples(stream):
                ext = image_member(files)
                if ext is not None:
                    found.append((ext, files[ext]))
                if len(found) >= count:
                    return found
    if not found:
        raise ValueError(f"no image samples in {shard_list.urls[0]} ... ({len(shard_list)} shards)")
    return found


def measure_baseline(encoded: list[tuple[str, bytes]], gt_size: int, scale: int, crops: int, seed: int) -> float:
    """Crops/s of decode (PIL; .npy arrays as raysr reads them) -> random crop -> numpy imresize, one crop per decode."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for i in range(crops):
        ext, data = encoded[i % len(encoded)]
        image = (decode_member(ext, data) if npy_kind(ext) else np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        top = rng.integers(image.shape[0] - gt_size + 1)
        left = rng.integers(image.shape[1] - gt_size + 1)
        hr = image[top:top + gt_size, left:left + gt_size].transpose(2, 0, 1).astype(np.float64) / 255.0
        numpy_imresize(hr, 1.0 / scale)
    return crops / (time.perf_counter() - start)


def cpu_ms_per_call(calls) -> float:
    """CPU ms per call of the zero-argument functions ``calls``, run in turn (this process, one thread)."""
    start = time.process_time()
    for call in calls:
        call()
    return 1e3 * (time.process_time() - start) / len(calls)


def measure_decode(encoded: list[tuple[str, bytes]], rounds: int = 3) -> float:
    """CPU ms to decode one sub-image with raysr's decoder (:func:`raysr.data.decode.decode_member`), the
    mean over ``rounds`` passes over ``encoded``."""
    return cpu_ms_per_call([lambda ext=ext, data=data: decode_member(ext, data) for ext, data in encoded] * rounds)


def measure_kernels(opts, draws: int, seed: int) -> float:
    """CPU ms of one sample's three blur kernels (:func:`raysr.degradation.kernels.draw_kernels` with the
    ``raysr.config.DegradationConfig`` ``opts``), the mean over ``draws`` draws: what the loader adds per
    crop with ``data.degradation: realesrgan``."""
    from raysr.degradation.kernels import draw_kernels

    rng = np.random.default_rng(seed)
    return cpu_ms_per_call([lambda: draw_kernels(rng, opts)] * draws)


def measure_pipeline(args: argparse.Namespace, shard_list) -> dict:
    """Crops/s of make_train_loader over ``args.batches`` batches after a warm-up batch (see the module docstring)."""
    loader = make_train_loader(shard_list, args.gt_size, args.scale, args.batch_size, num_workers=args.workers,
                               seed=args.seed, crops_per_image=args.crops_per_image,
                               batches_per_epoch=args.batches + 1, lr_on=args.lr_on,
                               shuffle_buffer=args.shuffle_buffer)
    device = torch.device(args.device)
    finish = args.lr_on == "device" and device.type != "cpu"
    start = time.perf_counter()
    first = first_cpu = None
    try:
        for batch in loader.host_batches():
            if finish:
                batch.finish(device, args.scale)
            if first is None:
                first, first_cpu = time.perf_counter(), time.process_time()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end, end_cpu = time.perf_counter(), time.process_time()
        stats = loader.stats()
    finally:
        loader.close()
    crops = args.batches * args.batch_size
    crops_per_s = crops / (end - first)
    per_core = crops / max(end_cpu - first_cpu, 1e-9) if args.workers == 0 else crops_per_s / args.workers
    return {"crops_per_s": crops_per_s, "crops_per_s_per_core": per_core, "startup_s": first - start,
            "samples": stats["samples"], "skipped": stats["skipped"]}


# --------------------------------------------------------------------------- formats side by side


def build_format_shards(args: argparse.Namespace, folder: str) -> dict[str, dict]:
    """Shards of ``args.photos`` in each of ``args.formats`` under ``folder``: format -> {shards, bytes, samples}."""
    photos = args.photos
    if photos is None:
        from raysr.demo import TRAIN_PHOTOS, sample_photo_dir
        photos = [str(sample_photo_dir() / name) for name in TRAIN_PHOTOS]
    built = {}
    for fmt in args.formats:
        report = make_shards(photos, os.path.join(folder, fmt), crop_size=args.crop_size, step=args.step,
                             min_size=args.gt_size, fmt=fmt, workers=os.cpu_count() or 1, progress=False)
        member_bytes = report.bytes
        built[fmt] = {"shards": report.manifest, "shard_bytes": member_bytes, "samples": report.samples}
    return built


def measure_formats(args: argparse.Namespace) -> dict[str, dict]:
    """Each format's loader figures, the median of ``args.rounds`` interleaved rounds, and its storage."""
    with tempfile.TemporaryDirectory(prefix="raysr_bench_data_") as folder:
        built = build_format_shards(args, folder)
        rounds: dict[str, list[dict]] = {fmt: [] for fmt in args.formats}
        for _ in range(args.rounds):
            for fmt in args.formats:
                rounds[fmt].append(measure_pipeline(args, resolve_shards(built[fmt]["shards"])))
        decode_ms = {fmt: measure_decode(_encoded_images(resolve_shards(built[fmt]["shards"]), 8))
                     for fmt in args.formats}
    results = {}
    for fmt in args.formats:
        runs = rounds[fmt]
        results[fmt] = {key: statistics.median(r[key] for r in runs)
                        for key in ("crops_per_s", "crops_per_s_per_core", "startup_s")}
        results[fmt].update(per_core_rounds=[r["crops_per_s_per_core"] for r in runs],
                            decode_ms_per_crop=decode_ms[fmt] / args.crops_per_image,
                            bytes_per_sample=built[fmt]["shard_bytes"] / built[fmt]["samples"],
                            samples=built[fmt]["samples"], skipped=sum(r["skipped"] for r in runs))
    reference = results.get("png") or results[args.formats[0]]
    for r in results.values():
        r["speed_vs_png" if "png" in results else "speed_vs_first"] = r["crops_per_s_per_core"] / reference["crops_per_s_per_core"]
        r["bytes_vs_png" if "png" in results else "bytes_vs_first"] = r["bytes_per_sample"] / reference["bytes_per_sample"]
    return results


# --------------------------------------------------------------------------- a preset's loader processes


def preset_flops_per_crop(preset: str) -> tuple[float, dict]:
    """FLOPs of one training step per HR crop of ``preset``'s network and phase (forward and backward
    of G, and of D and the VGG loss network in a GAN phase; counted on the CPU), and what was counted."""
    from raysr.bench.step import flops_per_crop, hr_batches
    from raysr.config import config_from_dict, load_config

    data = load_config(preset=preset).to_dict()
    data["data"].update(batch_size=1, train=["unused"], val="unused")
    data["train"].update(init_from=None, psnr_preset=None, d_init_steps=0)
    data["run"].update(precision="fp32", compile="off")
    if data["loss"].get("perceptual"):
        data["loss"]["perceptual"]["allow_random_weights"] = True  # weights do not change the count
    cfg = config_from_dict(data)
    device = torch.device("cpu")
    flops = flops_per_crop(cfg, device, hr_batches(cfg, device, count=1)[0])
    generator = cfg.model.generator
    return flops, {"generator": generator.name, "num_block": getattr(generator, "num_block", None),
                   "phase": cfg.train.phase, "gt_size": cfg.data.gt_size, "scale": cfg.scale}


def loader_processes(gpu_crops_per_s: float, per_core: float) -> int:
    """Loader processes (one core each) that keep up with ``gpu_crops_per_s``, rounded up."""
    return max(1, math.ceil(gpu_crops_per_s / per_core))


# --------------------------------------------------------------------------- command


def _check_args(args: argparse.Namespace) -> str:
    """What is wrong with the command line, or ""."""
    problem = below_one(args, ("gt_size", "scale", "batch_size", "batches", "baseline_crops", "crops_per_image",
                               "rounds", "crop_size", "step", "kernel_draws"))
    if problem:
        return problem
    if args.workers < 0:
        return f"--workers must be >= 0, got {args.workers}"
    if args.shards is not None and (args.photos is not None or args.formats is not None):
        return "--shards measures the shards given; --photos and --formats build shards to compare: use one or the other"
    if args.crop_size < args.gt_size:
        return f"--crop-size {args.crop_size} is smaller than the crop size {args.gt_size}"
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        return f"--device {args.device!r} is not a torch device ({err}); use cpu, cuda or cuda:N"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {args.device} but torch sees no CUDA GPU; use --device cpu"
    return ""


def _fill_defaults(args: argparse.Namespace) -> None:
    """Sizes from the preset where one is named, else the defaults; formats where none are given."""
    preset, args.degradation_opts = None, None
    if args.preset is not None:
        from raysr.config import load_config
        cfg = load_config(preset=args.preset)
        preset = cfg.data
        args.degradation = args.degradation or cfg.data.degradation
        args.degradation_opts = cfg.degradation
    if args.degradation == "realesrgan" and args.degradation_opts is None:
        from raysr.config import DegradationConfig
        args.degradation_opts = DegradationConfig()
    for name, default, from_preset in (("gt_size", 128, "gt_size"), ("batch_size", 16, "batch_size"),
                                       ("crops_per_image", 1 if args.shards else 8, "crops_per_image")):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, from_preset) if preset is not None else default)
    if args.shards is None and args.formats is None:
        import importlib.util
        args.formats = [f for f in DEFAULT_FORMATS if f != "npy.lz4" or importlib.util.find_spec("lz4")]


def run(args: argparse.Namespace) -> int:
    from raysr.config import ConfigError

    try:
        _fill_defaults(args)
    except (ValueError, ConfigError) as err:
        return error("data", str(err))
    problem = _check_args(args)
    if problem:
        return error("data", problem)
    torch.set_num_threads(1)  # per-core figures: this process uses one core, as each loader worker does
    result = {"bench": "data", "gt_size": args.gt_size, "scale": args.scale, "batch_size": args.batch_size,
              "crops_per_image": args.crops_per_image, "lr_on": args.lr_on, "workers": args.workers,
              "degradation": args.degradation or "bicubic",
              "batches": args.batches, "command": "python -m raysr.bench " + " ".join(getattr(args, "argv", []) or ["data"])}
    try:
        if args.shards is not None:
            result.update(measure_shards(args))
            per_core = {result["format"] or "shards": result["crops_per_s_per_core"]}
        else:
            formats = measure_formats(args)
            print_formats(args, formats)
            result["formats"] = formats
            per_core = {fmt: r["crops_per_s_per_core"] for fmt, r in formats.items()}
    except (ValueError, storage.StorageError) as err:
        return error("data", str(err))
    if args.degradation == "realesrgan":
        result["kernels_ms_per_crop"] = measure_kernels(args.degradation_opts, args.kernel_draws, args.seed)
        decode = ({fmt: r["decode_ms_per_crop"] for fmt, r in result["formats"].items()} if "formats" in result
                  else {result["format"] or "shards": result["decode_ms_per_crop"]})
        print(f"data.degradation=realesrgan, loader side per crop (CPU ms, one core): blur kernels "
              f"{result['kernels_ms_per_crop']:.2f} ms ({args.kernel_draws} draws) beside the decode "
              + ", ".join(f"{ms:.2f} ms ({fmt})" for fmt, ms in decode.items())
              + f" ({args.crops_per_image} crop(s) per sub-image)")
    if args.preset is not None:
        flops, counted = preset_flops_per_crop(args.preset)
        gpu = GPU_MFU * H100_TFLOPS * 1e12 / flops
        processes = {fmt: loader_processes(gpu, value) for fmt, value in per_core.items()}
        result.update(preset=args.preset, flops_per_crop=flops, gpu_crops_per_s=gpu, loader_processes=processes,
                      **{f"preset_{k}": v for k, v in counted.items()})
        print(f"preset {args.preset}: {counted['generator']} {counted['phase']} phase, {flops / 1e9:.1f} GFLOP per "
              f"{counted['gt_size']}² crop -> an H100 at {GPU_MFU:.0%} of {H100_TFLOPS:.0f} TFLOP/s consumes "
              f"{gpu:,.0f} crops/s")
        for fmt, n in processes.items():
            print(f"  {fmt}: {per_core[fmt]:,.0f} crops/s per loader process -> data.num_workers >= {n} per GPU")
    if args.json:
        print(json.dumps(result))
    return 0


def measure_shards(args: argparse.Namespace) -> dict:
    """``--shards``: the pipeline on those shards beside the BasicSR-style baseline."""
    shard_list = resolve_shards(args.shards)
    encoded = _encoded_images(shard_list, 8)
    baseline = measure_baseline(encoded, args.gt_size, args.scale, args.baseline_crops, args.seed)
    decode_ms_per_crop = measure_decode(encoded) / args.crops_per_image
    ours = measure_pipeline(args, shard_list)
    cores = max(1, args.workers)
    speedup = ours["crops_per_s_per_core"] / baseline
    size = f"{shard_list.num_samples} samples" if shard_list.num_samples is not None else "size unknown (no manifest)"
    print(f"dataset: {len(shard_list)} shards, {size}, format {shard_list.format or 'not recorded'}")
    print(f"raysr.data ({args.workers} workers, {args.crops_per_image} crop(s)/image, LR on {args.lr_on}): "
          f"{ours['crops_per_s']:.1f} crops/s = {ours['crops_per_s_per_core']:.1f} per core ({cores} core(s)); "
          f"startup {ours['startup_s']:.1f} s; {ours['samples']} samples, {ours['skipped']} skipped")
    print(f"BasicSR-style baseline (PIL decode, crop, numpy imresize; 1 core): {baseline:.1f} crops/s")
    print(f"speed-up per core: {speedup:.1f}x")
    return {**ours, "decode_ms_per_crop": decode_ms_per_crop, "baseline_crops_per_s": baseline, "speedup_per_core": speedup, "shards": len(shard_list),
            "dataset_samples": shard_list.num_samples, "format": shard_list.format}


def print_formats(args: argparse.Namespace, formats: dict[str, dict]) -> None:
    first = next(iter(formats.values()))
    vs = "png" if "png" in formats else next(iter(formats))
    print(f"{first['samples']} sub-images of {args.crop_size}² (step {args.step}) from "
          f"{'the photos given' if args.photos else 'scikit-image sample photos'}; {args.gt_size}² crops, "
          f"{args.crops_per_image} per image, batch {args.batch_size}, flips and LR on "
          f"{'the loader' if args.lr_on == 'loader' else args.device if args.device != 'cpu' else 'the device (not timed)'}"
          f"; median of {args.rounds} rounds")
    print(f"{'format':<9} {'KB/sub-image':>12} {'bytes vs ' + vs:>13} {'crops/s per core':>17} {'speed vs ' + vs:>13} "
          f"{'wall crops/s':>13} {'decode ms/crop':>15}")
    for fmt, r in formats.items():
        speed = r.get("speed_vs_png", r.get("speed_vs_first"))
        size = r.get("bytes_vs_png", r.get("bytes_vs_first"))
        print(f"{fmt:<9} {r['bytes_per_sample'] / 1e3:>12.0f} {size:>12.2f}x {r['crops_per_s_per_core']:>17,.0f} "
              f"{speed:>12.2f}x {r['crops_per_s']:>13,.0f} {r['decode_ms_per_crop']:>15.3f}")
