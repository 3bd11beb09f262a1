"""Upscale throughput: ``raysr.upscale`` in one process and on Ray Data (``--ray``) at 1 and N model actors.

    python -m raysr.bench upscale --json
    python -m raysr.bench upscale --images 64 --size 256 --actors 4 --json
    python -m raysr.bench upscale --model runs/esrgan/generator.pth --input photos/ --tile 256 --json

The same images go through every path, in one run: ``--images`` PNG crops of ``--size`` px from the
demo's sample photos, written to a temporary folder (or the images of ``--input``). The model is
``--model``, or the quick start's network (MSRResNet, 32 features, 4 blocks, x4) with random weights.
Each path runs raysr.upscale's own code on the same work list into its own output folder:

- ``single``: the single-process path (read -> upscale -> write, one input after the other) on
  ``--device``, with torch on ``--threads`` threads (default 1: what a CPU model actor runs on);
- ``ray_1``: the Ray Data pipeline (:func:`raysr.batch_inference.upscale_on_ray`) with one model actor;
- ``ray_n``: the same with ``--actors`` N actors (default: one per GPU of the cluster, else one per CPU
  but one). Each model actor holds a CPU, and the read and write tasks need one more: with every CPU
  held by an actor the pipeline waits forever, so N is at most the cluster's CPUs - 1, and on a 2-CPU
  machine ``ray_n`` is skipped (with the reason in its row).

Every path runs once untimed on one image (Ray starts its worker processes and they import torch
then), then on the first half of the images and on all of them (into separate folders), ``--rounds``
times, the paths taking turns within each round, each timed from the call to the last file written
(medians over the rounds); Ray itself is started before any clock runs. A job's
fixed costs (Ray Data's planning, starting the actors and loading the model in each, filling and
draining the pipeline) are the same in both, so the difference is the steady-state rate:
``mp_per_s`` = (input megapixels of all - of half) / (wall time of all - of half), likewise
``images_per_s``; ``fixed_s`` = the part of the full run's wall time not explained by that rate (the
once-per-job cost), ``wall_s`` the full run's time. ``overhead_frac`` = single / ray_1 MP/s - 1
(negative: the pipeline is faster, since it decodes and encodes beside the model); ``scaling`` =
ray_n / ray_1 MP/s; ``mp_per_s_per_gpu`` = ray_n MP/s over the GPUs its actors hold (ray_1's on a
one-GPU cluster; None without GPUs). ``outputs_equal``: every path wrote byte-identical files for all the images;
``max_diff_levels``: the largest difference of any output value from the single-process output's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raysr.bench import below_one, error
from raysr.bench.overhead import NETWORK
from raysr.bench.step import command_line, commit, device_name, start_ray

RUNS = ("single", "ray_1", "ray_n")
RUN_KEYS = ("mp_per_s", "images_per_s", "fixed_s", "wall_s", "half_wall_s", "images")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=16, help="number of test images (default 16)")
    parser.add_argument("--size", type=int, default=128, help="their side in px (input pixels; default 128)")
    parser.add_argument("--input", default=None, metavar="DIR",
                        help="your own images instead (a folder, as raysr.upscale --input takes)")
    parser.add_argument("--model", default=None,
                        help="generator checkpoint (default: the quick start's MSRResNet x4, random weights)")
    parser.add_argument("--tile", type=int, default=0, help="raysr.upscale --tile (default 0: whole images)")
    parser.add_argument("--actors", type=int, default=None,
                        help="N for the ray_n run (default: the cluster's GPUs, else its CPUs - 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="the single-process run's device (auto: cuda when there is one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the single-process run (default 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time each path's half and full run this many times, use the medians (default 1)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


# --------------------------------------------------------------------------- inputs


def write_test_images(folder: Path, count: int, size: int) -> None:
    """``count`` PNGs of ``size``² px cropped from the demo's sample photos (real content: PNG's
    decode and encode cost depends on it), each crop at another place."""
    from PIL import Image

    from raysr.demo import TRAIN_PHOTOS, sample_photo_dir

    folder.mkdir(parents=True)
    photos = [Image.open(sample_photo_dir() / name).convert("RGB") for name in TRAIN_PHOTOS]
    for i in range(count):
        photo = photos[i % len(photos)]
        if min(photo.size) < size:  # a photo smaller than the crop: scaled up to cover it
            factor = size / min(photo.size)
            photo = photo.resize((max(size, round(photo.width * factor)), max(size, round(photo.height * factor))))
        x = (i * 37) % (photo.width - size + 1)
        y = (i * 53) % (photo.height - size + 1)
        photo.crop((x, y, x + size, y + size)).save(folder / f"img{i:05d}.png")


def default_model(path: Path) -> None:
    from raysr.generator_file import save_generator
    from raysr.models import build_generator

    torch.manual_seed(0)
    spec = {k: v for k, v in NETWORK.items() if k != "name"}
    save_generator(build_generator(NETWORK["name"], **spec).eval(), path, fmt="raysr")


# --------------------------------------------------------------------------- timing


def run_single(jobs, make_upscaler, device: torch.device, threads: int, output: str) -> float:
    """Wall seconds of the single-process path over ``jobs``, torch on ``threads`` threads."""
    from raysr.upscale import JobLog, upscale_files

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    log = JobLog("raysr.bench upscale (single process)", len(jobs), 0, output)
    try:
        start = time.monotonic()
        upscaler = make_upscaler(device)
        log.start()
        upscale_files(upscaler, jobs, log)
        wall = time.monotonic() - start
    finally:
        torch.set_num_threads(saved)
    return wall if log.finish() == 0 else _failed(output)


def run_ray(jobs, make_upscaler, actors: int, gpus: float, output: str) -> float:
    """Wall seconds of the Ray Data path over ``jobs`` with ``actors`` model actors."""
    from raysr.batch_inference import upscale_on_ray
    from raysr.upscale import JobLog

    log = JobLog(f"raysr.bench upscale (Ray Data, {actors} actor{'s' * (actors > 1)})", len(jobs), 0, output)
    start = time.monotonic()
    upscale_on_ray(jobs, make_upscaler, log, address="", workers=(actors, actors), gpus_per_worker=gpus,
                   precision="fp32")
    wall = time.monotonic() - start
    return wall if log.finish() == 0 else _failed(output)


def _failed(output: str) -> float:
    raise RuntimeError(f"some inputs failed: see {output}/_failed.jsonl (printed above)")


def steady_rates(runners: dict, plan, megapixels: list[float], root: Path, rounds: int) -> dict:
    """The figures of each path: ``runners[name](jobs, output) -> wall s`` on the first half of the inputs and on
    all, ``rounds`` times, the paths taking turns within each round (so a machine that gets busier or quieter
    meanwhile moves them alike); the medians of the times. ``plan(output)``: the jobs of every input, writing
    into ``output``; ``megapixels``: their sizes. Each path's first full run writes into ``root/<name>``."""
    half = len(megapixels) // 2
    for name, runner in runners.items():  # untimed: Ray's worker processes start and import torch here
        runner(plan(f"{root / name}_warmup")[:1], f"{root / name}_warmup")
    halves: dict[str, list[float]] = {name: [] for name in runners}
    fulls: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(rounds):
        for name, runner in runners.items():
            halves[name].append(runner(plan(f"{root / name}_half{i}")[:half], f"{root / name}_half{i}"))
            out = str(root / name) if i == 0 else f"{root / name}_{i}"
            fulls[name].append(runner(plan(out), out))
    figures = {}
    for name in runners:
        wall_half, wall = statistics.median(halves[name]), statistics.median(fulls[name])
        extra_s, extra_mp = wall - wall_half, sum(megapixels[half:])
        rate = extra_mp / extra_s if extra_s > 0 else None  # None: the machine's noise exceeded the extra work
        figures[name] = {"mp_per_s": rate, "images_per_s": (len(megapixels) - half) / extra_s if rate else None,
                         "fixed_s": wall - sum(megapixels) / rate if rate else None, "wall_s": wall,
                         "half_wall_s": wall_half, "images": len(megapixels)}
    return figures


def compare_outputs(root: Path, runs: list[str], names: list[str]) -> tuple[bool, int]:
    """(every run wrote the same bytes as the first, the largest difference of any output value)."""
    from raysr.images import read_image

    equal, worst = True, 0
    for name in names:
        reference = (root / runs[0] / name).read_bytes()
        pixels = read_image(str(root / runs[0] / name)).pixels.astype(np.int64)
        for run in runs[1:]:
            if (root / run / name).read_bytes() != reference:
                equal = False
                other = read_image(str(root / run / name)).pixels.astype(np.int64)
                worst = max(worst, int(np.abs(other - pixels).max()))
    return equal, worst


# --------------------------------------------------------------------------- the bench


def run(args: argparse.Namespace) -> int:
    from raysr.cli import InputError, resolve_device
    from raysr.upscale import UpscaleOptions, plan_jobs, upscaler_on

    problem = (below_one(args, ("size", "threads", "rounds")) or
               (f"--images must be >= 2 (each path runs half of them, then all), got {args.images}"
                if args.images < 2 else "")) or (
        below_one(args, ("actors",)) if args.actors is not None else "")
    if problem:
        return error("upscale", problem)
    if args.tile < 0:
        return error("upscale", f"--tile must be >= 0, got {args.tile}")
    with tempfile.TemporaryDirectory(prefix="raysr_bench_upscale_") as tmp:
        root = Path(tmp)
        source = args.input or str(root / "in")
        if args.input is None:
            write_test_images(root / "in", args.images, args.size)
        model = args.model or str(root / "g.pth")
        if args.model is None:
            default_model(root / "g.pth")

        def plan(output: str) -> list:
            """Every input's job, writing into ``output``."""
            return plan_jobs(argparse.Namespace(input=source, output=output, alpha=None, side_by_side=False))[0]

        try:
            device = resolve_device(args.device)
            jobs = plan(str(root / "single"))
            model_args = argparse.Namespace(model=model, model_b=None, alpha=None, model_scale=None, precision="fp32")
            make_upscaler = functools.partial(upscaler_on, model_args=model_args,
                                              options=UpscaleOptions(tile=args.tile))
            make_upscaler(torch.device("cpu"))  # a bad --model fails here, before Ray starts
        except InputError as err:
            return error("upscale", str(err))
        if len(jobs) < 2:
            return error("upscale", f"--input {args.input}: {len(jobs)} image(s); the bench needs at least 2")
        megapixels = [_megapixels(job.uri) for job in jobs]
        load_before = os.getloadavg()[0]
        start_ray()
        import ray

        cluster = ray.cluster_resources()
        cluster_gpus = cluster.get("GPU", 0.0)
        gpus = 1.0 if cluster_gpus > 0 else 0.0
        room = int(cluster.get("CPU", 0)) - 1  # each actor holds a CPU; the read and write tasks need one more
        if room < max(1, args.actors or 1):
            return error("upscale", f"--actors {args.actors or 1} needs {max(1, args.actors or 1) + 1} CPUs in the "
                                    f"Ray cluster (one per model actor, one for the read and write tasks); it has "
                                    f"{cluster.get('CPU', 0):g}")
        if gpus and (args.actors or 1) > cluster_gpus:
            return error("upscale", f"--actors {args.actors} needs {args.actors} GPUs (one per actor); "
                                    f"the Ray cluster has {cluster_gpus:g}")
        actors = args.actors or (min(room, int(cluster_gpus)) if gpus else room)
        single_path = functools.partial(run_single, make_upscaler=make_upscaler, device=device, threads=args.threads)
        runners = {"single": lambda j, out: single_path(j, output=out),
                   "ray_1": lambda j, out: run_ray(j, make_upscaler, 1, gpus, out)}
        if actors > 1:
            runners["ray_n"] = lambda j, out: run_ray(j, make_upscaler, actors, gpus, out)
        try:
            results = steady_rates(runners, plan, megapixels, root, args.rounds)
            ran = list(results)
            if actors == 1:
                results["ray_n"] = {"skipped": f"N = {actors}: the cluster has {cluster.get('CPU', 0):g} CPUs and "
                                               f"{cluster_gpus:g} GPUs; N actors need N GPUs, or N + 1 CPUs without "
                                               "GPUs"}
        except RuntimeError as err:
            return error("upscale", str(err))
        names = sorted(p.relative_to(root / "single").as_posix() for p in (root / "single").rglob("*") if p.is_file())
        equal, worst = compare_outputs(root, ran, names)
    single, one, many = (results[r].get("mp_per_s") for r in RUNS)
    result = {"bench": "upscale", "command": command_line(args), "commit": commit(), "torch": torch.__version__,
              "device": device_name(device), "cluster_gpus": cluster_gpus, "model": args.model or "msrresnet-32x4 x4",
              "images": len(jobs), "size": None if args.input else args.size, "input_megapixels": sum(megapixels),
              "tile": args.tile, "threads": args.threads, "actors": actors, "gpus_per_actor": gpus,
              **{r: results[r] for r in RUNS},
              "overhead_frac": single / one - 1 if single and one else None,
              "scaling": many / one if many and one else None,
              # ray_n's rate over its GPUs, or ray_1's on a one-GPU cluster (where ray_n is skipped)
              "mp_per_s_per_gpu": ((many / actors if many else one) / gpus) if gpus and (many or one) else None,
              "outputs_equal": equal, "max_diff_levels": worst,
              # a shared machine's other work moves every figure: the 1-minute load average before and after
              "load_avg": [load_before, os.getloadavg()[0]]}
    print_result(result)
    if args.json:
        print(json.dumps(result))
    return 0


def _megapixels(uri: str) -> float:
    from PIL import Image

    with Image.open(uri) as image:
        return image.width * image.height / 1e6


def print_result(r: dict) -> None:
    print(f"device: {r['device']}, {r['cluster_gpus']:g} GPU(s) in the cluster, torch {r['torch']}, "
          f"commit {r['commit']}")
    print(f"{r['images']} images, {r['input_megapixels']:.3g} MP in, model {r['model']}, tile {r['tile']}; "
          f"load average {r['load_avg'][0]:.1f} before, {r['load_avg'][1]:.1f} after")
    for run in RUNS:
        f = r[run]
        if "skipped" in f:
            print(f"{'Ray Data, N actors':>32}: skipped ({f['skipped']})")
            continue
        label = {"single": f"single process ({r['threads']} thread(s))", "ray_1": "Ray Data, 1 actor",
                 "ray_n": f"Ray Data, {r['actors']} actors"}[run]
        if f["mp_per_s"] is None:
            print(f"{label:>32}: no rate: all {f['images']} images took {f['wall_s']:.1f} s, half of them "
                  f"{f['half_wall_s']:.1f} s (a busy machine; use more --images)")
            continue
        print(f"{label:>32}: {f['mp_per_s']:.3g} MP/s, {f['images_per_s']:.3g} images/s in steady state; "
              f"{f['fixed_s']:.1f} s fixed per job; {f['images']} images in {f['wall_s']:.1f} s")
    ratio = f"{100 * r['overhead_frac']:+.1f}%" if r["overhead_frac"] is not None else "n/a"
    scaling = f"; {r['actors']} actors: {r['scaling']:.2f}x one actor" if r["scaling"] else ""
    per_gpu = f"; {r['mp_per_s_per_gpu']:.3g} MP/s per GPU" if r["mp_per_s_per_gpu"] else ""
    print(f"Ray Data at 1 actor vs one process: overhead {ratio}{scaling}{per_gpu}")
    print("outputs: " + ("byte-identical on every path" if r["outputs_equal"] else
                         f"differ by up to {r['max_diff_levels']} level(s)"))
