"""Upscale images with a trained generator: ``python -m raysr.upscale``.

    python -m raysr.upscale --model runs/esrgan/generator.pth --input photos/ --output photos_x4/
    python -m raysr.upscale --model psnr.pth --model-b gan.pth --alpha 0 0.5 1 --input a.png --output sweep/

Reads any checkpoint :func:`raysr.generator_file.load_generator` reads (raysr, BasicSR /
Real-ESRGAN, both ESRGAN-repo layouts, a training run's ``generator.pth``), local or
``s3://``. Large images go through the network in overlapping tiles whose padded
margins are cropped away; with the default --tile-pad the result matches whole-image
inference to well under one 8-bit level (see :func:`upscale_tensor`). Grayscale
inputs come out grayscale, alpha channels are upscaled separately with MATLAB
bicubic, 16-bit PNGs stay 16-bit, and each output keeps its input's format and name.

Options and checkpoints are checked before the first write (a bad one: exit code 2, nothing
written). Then every input goes read -> upscale -> write, in this process or, with ``--ray``,
as a Ray Data pipeline (:mod:`raysr.batch_inference`) that runs the same three stages. Each
output is written atomically; a rerun skips inputs whose outputs are all there; an input that
fails is listed in ``<output>/_failed.jsonl`` and the job goes on (exit code 3 at the end).
``--model g.onnx`` runs a file from ``python -m raysr.export`` through onnxruntime. ``--batch-tiles N``
sends the tiles of equal shape of several inputs through the network N at a time (:meth:`Upscaler.groups`).
WebDataset shards in (``--input``, what ``raysr.train`` takes) and out (``--output-shards``) go through the
same stages, one output shard per input shard with the same keys (:mod:`raysr.data.image_shards`); a rerun
skips the output shards already there.

:func:`upscale_tensor` (whole or tiled inference, padded to what the network takes) is
also what ``raysr.evaluate`` and training's validation run the generator through.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from raysr import storage
from raysr.images import (DecodedImage, from_float_rgb, is_under, list_images, read_image,
                           relative_path, to_float_rgb, write_image)
from raysr.inference import DEFAULT_TILE_PAD, PRECISIONS, count_tiles, upscale_tensors
from raysr.onnx_file import OnnxGenerator
from raysr.ops.resize import imresize, weight_matrix
from raysr.data.sources import resolve_shards
from raysr.data.image_shards import (NOT_WRITTEN, OutputShard, damage_reason, existing_files, is_shard_source,
                                     log_folder, member_names, output_shard_urls, read_images)
from raysr.data.samples import DamagedTar
from raysr.cli import (DEVICES, InputError, add_ray_args, check_model_scale, check_ray_args, cli, failure_reason,
                       load_model, mix_generators, parse_workers, resolve_device)
from raysr.util import Progress

Item = TypeVar("Item")  # what a caller tracks an input by (a Job, a shard sample)
Outcome = list[DecodedImage] | BaseException  # an input's output images, or why it failed


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 needs a CUDA device (CPU autocast has no fp16); "
                         "use --precision bf16 or fp32 on CPU")


def resize_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """MATLAB ``imresize(x, [height width], 'bicubic')`` of (..., H, W) float: per-axis
    scale out/in, antialiased when shrinking."""
    in_h, in_w = x.shape[-2:]
    w_h = torch.from_numpy(weight_matrix(in_h, height, height / in_h, True).copy()).to(x)
    w_w = torch.from_numpy(weight_matrix(in_w, width, width / in_w, True).copy()).to(x)
    return w_h @ x @ w_w.T


def output_size(height: int, width: int, scale_out: float) -> tuple[int, int]:
    """``ceil(H*S) x ceil(W*S)`` as MATLAB's imresize, tolerant of float error in H*S."""
    return tuple(max(1, math.ceil(n * scale_out - 1e-6)) for n in (height, width))


def upscale_image(models: Sequence[nn.Module], image: DecodedImage, scale_out: float | None = None,
                  tile: int = 0, tile_pad: int = DEFAULT_TILE_PAD, precision: str = "fp32") -> list[DecodedImage]:
    """Upscale one image with each model (same scale), keeping its layout and bit depth.

    Colour goes through the network (gray repeated to RGB, and back via BT.601 luma);
    alpha is upscaled with MATLAB bicubic in float32. scale_out: final size relative to the input
    (default: the model's scale); the SR image is then resized with bicubic.
    """
    return upscale_images(models, [image], scale_out, tile, tile_pad, precision)[0]


def upscale_images(models: Sequence[nn.Module], images: Sequence[DecodedImage], scale_out: float | None = None,
                   tile: int = 0, tile_pad: int = DEFAULT_TILE_PAD, precision: str = "fp32",
                   batch_tiles: int = 1) -> list[list[DecodedImage]]:
    """:func:`upscale_image` of each of ``images``, their tiles of equal shape (whole images with
    ``tile=0``) going through each model up to ``batch_tiles`` at a time (see
    :func:`raysr.inference.upscale_tensors`; 1 = each tile alone, byte for byte as one image at a time)."""
    scale = models[0].scale
    lrs, targets, alphas = [], [], []
    for image in images:
        rgb, alpha = to_float_rgb(image)
        lrs.append(torch.from_numpy(rgb).permute(2, 0, 1)[None])
        height, width = image.size
        targets.append(output_size(height, width, scale_out) if scale_out else (height * scale, width * scale))
        if alpha is not None:
            # float32 (to_float_rgb's dtype) is exact enough for 16-bit alpha and keeps resize buffers small
            alpha = _to_size(imresize(torch.from_numpy(alpha)[None], scale), targets[-1])[0].clamp(0, 1).numpy()
        alphas.append(alpha)
    outputs: list[list[DecodedImage]] = [[] for _ in images]
    for model in models:
        srs = upscale_tensors(model, lrs, tile, tile_pad, precision, batch_tiles)
        for out, sr, target, alpha, image in zip(outputs, srs, targets, alphas, images):
            out.append(from_float_rgb(_to_size(sr[0], target).clamp(0, 1).permute(1, 2, 0).numpy(), alpha, image))
    return outputs


def _to_size(x: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(target) else resize_to(x, *target)


def side_by_side(images: Sequence[DecodedImage]) -> DecodedImage:
    """The images (equal height, one layout) joined left to right into one image."""
    pixels = np.concatenate([im.pixels for im in images], axis=1)
    return DecodedImage(pixels=pixels, format=images[0].format, icc_profile=images[0].icc_profile)


# --------------------------------------------------------------------------- the work list


@dataclass
class Job:
    """One input image and the output files it makes (one, or one per --alpha)."""

    uri: str
    outs: list[str]


def _alpha_tag(alpha: float) -> str:
    return f"{alpha:g}"


def _output_names(rel: str, alphas: Sequence[float] | None, joined: bool) -> list[str]:
    """Output paths relative to --output: the input's own name, or with an alpha suffix."""
    stem, ext = os.path.splitext(rel)
    if not alphas:
        return [rel]
    if joined:
        return [f"{stem}_alpha{'-'.join(_alpha_tag(a) for a in alphas)}{ext}"]
    return [f"{stem}_alpha{_alpha_tag(a)}{ext}" for a in alphas]


def _collect_inputs(source: str, output: str) -> list[tuple[str, str]]:
    """``(uri, path relative to the input root)`` of every input image."""
    if storage.is_s3(source):
        is_file = storage.exists(source)
    else:
        if not Path(source).exists():
            raise InputError(f"--input {source}: no such file or directory")
        is_file = Path(source).is_file()
    if is_file:
        return [(source, os.path.basename(source.rstrip("/")))]
    # earlier outputs inside the input folder are not inputs; an --output that contains the
    # input folder excludes nothing (the overwrite check refuses it if names collide)
    images, skipped = list_images(source, recursive=True, exclude=None if is_under(source, output) else output)
    if skipped:
        print(f"raysr.upscale: skipping {len(skipped)} non-image file(s) in {source}, e.g. {skipped[0]}",
              file=sys.stderr)
    if not images:
        raise InputError(f"--input {source}: no image files (extensions png, jpg, webp, bmp, tif, ...) found")
    return [(uri, relative_path(uri, source)) for uri in images]


def _existing_outputs(output: str) -> set[str]:
    """Paths relative to ``output`` of the files already there (one listing, not one request per file).
    Outputs are written atomically, so a file under its final name is complete; the temporary files of
    writes that a killed run cut short are removed here (S3 uploads leave none)."""
    if not storage.is_s3(output) and not Path(output).is_dir():
        return set()
    found = set()
    for uri in storage.list_files(output):
        if not storage.is_s3(uri) and storage.temporary_for(uri) is not None:
            Path(uri).unlink(missing_ok=True)
            print(f"raysr.upscale: removed {uri}, a write an earlier run did not finish", file=sys.stderr)
        else:
            found.add(relative_path(uri, output))
    return found


def _same_file(a: str, b: str) -> bool:
    if storage.is_s3(a) or storage.is_s3(b):
        return a == b
    return Path(a).resolve() == Path(b).resolve()


def plan_jobs(args: argparse.Namespace) -> tuple[list[Job], int]:
    """``(jobs, skipped)``: the inputs still to upscale, and how many are skipped because every
    output they make is already in --output (an earlier run of the same command wrote them)."""
    inputs = _collect_inputs(args.input, args.output)
    existing = _existing_outputs(args.output)
    jobs, skipped = [], 0
    for uri, rel in inputs:
        names = _output_names(rel, args.alpha, args.side_by_side)
        outs = [storage.join(args.output, name) for name in names]
        clash = next((o for o in outs if _same_file(o, uri)), None)
        if clash:
            raise InputError(f"output {clash} would overwrite its input; choose another --output folder")
        if all(name in existing for name in names):
            skipped += 1
        else:
            jobs.append(Job(uri, outs))
    return jobs, skipped


# --------------------------------------------------------------------------- WebDataset shards


@dataclass
class ShardJob:
    """One input shard, the output shard it makes, and its sample count where a manifest gives it."""

    url: str
    out: str
    samples: int | None


def plan_shard_jobs(args: argparse.Namespace) -> tuple[list[ShardJob], int, str]:
    """``(jobs, skipped, log folder)``: the input shards whose output shard is not there yet, how many
    are (an earlier run wrote them: a shard under its final name is complete), and the folder of the
    output shards, where ``_failed.jsonl`` goes."""
    try:
        shards = resolve_shards(args.input)
        found = existing_files(shards.urls)
        missing = [url for url in shards.urls if url not in found]
        outs = output_shard_urls(shards.urls, args.output_shards)
    except (ValueError, storage.StorageError) as err:
        raise InputError(str(err)) from err
    if missing:
        raise InputError(f"--input {args.input}: {len(missing)} of its {len(shards.urls)} shards do not exist, "
                         f"e.g. {missing[0]}")
    existing = existing_files(outs)
    jobs = [ShardJob(url, out, count) for url, out, count in zip(shards.urls, outs, shards.samples)
            if out not in existing]
    return jobs, len(outs) - len(jobs), log_folder(outs)


# --------------------------------------------------------------------------- the three stages
# read -> upscale -> write: the single-process loop runs them one after the other per group of inputs
# (one input, or --batch-tiles tiles' worth), the Ray Data pipeline (raysr.batch_inference) runs read and
# write as CPU tasks and upscale on an actor pool.


@dataclass
class UpscaleOptions:
    """What every upscale of a run shares (from the command line)."""

    scale_out: float | None = None
    tile: int = 0
    tile_pad: int = DEFAULT_TILE_PAD
    precision: str = "fp32"
    side_by_side: bool = False
    batch_tiles: int = 1


class Upscaler:
    """The models of a run on one device: ``upscaler(image)`` -> the output images of one input;
    :meth:`groups` upscales a stream of inputs several at a time (``--batch-tiles``)."""

    def __init__(self, models: Sequence[nn.Module], options: UpscaleOptions, device: torch.device):
        self.models = [m.to(device) for m in models]
        self.options = options

    def __call__(self, image: DecodedImage) -> list[DecodedImage]:
        return self.upscale([image])[0]

    def upscale(self, images: Sequence[DecodedImage]) -> list[list[DecodedImage]]:
        """The output images of each input, upscaled together (tiles batched by ``batch_tiles``)."""
        o = self.options
        results = upscale_images(self.models, images, o.scale_out, o.tile, o.tile_pad, o.precision, o.batch_tiles)
        return [[side_by_side(r)] for r in results] if o.side_by_side else results

    def groups(self, inputs: Iterable[tuple[Item, DecodedImage]]) -> Iterator[list[tuple[Item, DecodedImage, Outcome]]]:
        """``(item, image)`` pairs upscaled in groups: a group closes once its images hold
        ``batch_tiles`` tiles (so with the default 1, every image is a group of its own). Per group,
        each item and image with its output images, or the exception that stopped them."""
        group, tiles = [], 0
        for item, image in inputs:
            group.append((item, image))
            tiles += count_tiles(self.models[0], *image.size, self.options.tile, self.options.tile_pad)
            if tiles >= self.options.batch_tiles:
                yield self._upscale_group(group)
                group, tiles = [], 0
        if group:
            yield self._upscale_group(group)

    def _upscale_group(self, group: list[tuple[Item, DecodedImage]]) -> list[tuple[Item, DecodedImage, Outcome]]:
        try:
            results = self.upscale([image for _, image in group])
        except Exception as err:  # any input may be bad in its own way; the caller lists it, the job goes on
            if isinstance(err, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            if len(group) == 1:
                return [(*group[0], err)]
            # a batch does not say which image broke it (or it did not fit at once): each image alone
            return [entry for one in group for entry in self._upscale_group([one])]
        return [(item, image, result) for (item, image), result in zip(group, results)]


def megapixels(image: DecodedImage) -> float:
    return image.size[0] * image.size[1] / 1e6


# --------------------------------------------------------------------------- bookkeeping

FAILED_LOG = "_failed.jsonl"
EXIT_SOME_FAILED = 3


class JobLog:
    """Counts a dataset job's inputs as they finish, draws the progress line every few seconds and
    ends with one summary line; ``<output>/_failed.jsonl`` lists the inputs that failed, one JSON
    object per line: ``{"input": uri, "stage": "read" | "upscale" | "write", "error": reason}``, with
    ``"key"`` for a sample of an input shard. ``skipped`` counts what the summary calls ``skipped``
    (inputs, or output shards already there)."""

    def __init__(self, tool: str, total: int, skipped: int, output: str, interval: float = 5.0,
                 skipped_text: str = "skipped (output already there)"):
        self.tool, self.skipped, self.output, self.skipped_text = tool, skipped, output, skipped_text
        self.failures: list[dict] = []
        self.megapixels = 0.0
        self.progress = Progress(total, tool, unit="images", interval=interval)

    def start(self) -> None:
        """Count rates from now (after Ray has started)."""
        self.progress.start = time.monotonic()

    def done(self, uri: str, megapixels: float) -> None:
        self.megapixels += megapixels
        self._step(uri)

    def failed(self, uri: str, stage: str, reason: str, key: str | None = None) -> None:
        self.failures.append({"input": uri, **({"key": key} if key is not None else {}), "stage": stage,
                              "error": reason})
        self._step(uri)

    def expect(self, count: int) -> None:
        """``count`` more inputs than the total said (an input shard that no manifest counted)."""
        self.progress.total += count

    def _step(self, uri: str) -> None:
        elapsed = time.monotonic() - self.progress.start
        self.progress.info = f"{self.megapixels / elapsed if elapsed > 0 else 0.0:.3g} MP/s" + \
            (f" | {len(self.failures)} failed" if self.failures else "")
        self.progress.step(os.path.basename(uri))

    def finish(self) -> int:
        """Write (or clear) ``_failed.jsonl``, print the summary line; the exit code: 0, or 3 if any input failed."""
        self.progress.finish()
        log = storage.join(self.output, FAILED_LOG)
        if self.failures:
            storage.write_bytes(log, "".join(json.dumps(f) + "\n" for f in self.failures).encode())
        elif storage.exists(log):
            storage.remove(log)  # an earlier run's failures are done or skipped now
        elapsed = max(time.monotonic() - self.progress.start, 1e-9)
        done = self.progress.done - len(self.failures)
        line = (f"{self.tool}: {done} done, {self.skipped} {self.skipped_text}, {len(self.failures)} failed "
                f"in {elapsed:.1f}s: {done / elapsed:.3g} images/s, "
                f"{self.megapixels / elapsed:.3g} MP/s (input pixels)")
        if self.failures:
            line += f"; the failed inputs and why: {log}"
        print(line, file=sys.stderr)
        return EXIT_SOME_FAILED if self.failures else 0


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raysr.upscale", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Upscale an image or a folder of images with a trained SR generator.",
        epilog="Outputs keep each input's name, relative folder and format; with --alpha they get an "
               "_alpha<A> suffix (in shards: <key>.alpha<A>.png). A rerun skips inputs whose outputs exist. An "
               f"input that cannot be read or upscaled is listed in <output>/{FAILED_LOG} (beside the output "
               "shards) and the others go on. Exit codes: 0 all done, "
               f"{EXIT_SOME_FAILED} some inputs failed, 2 a bad option (nothing written).")
    parser.add_argument("--model", required=True, help="generator checkpoint (path or s3:// URI)")
    parser.add_argument("--input", required=True,
                        help="image file or folder (searched recursively), or WebDataset shards as raysr.train's "
                             "data.train takes them: a .tar, a brace pattern such as in/train-{000000..000099}.tar, "
                             "a manifest.parquet, or a folder / s3:// prefix of shards")
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument("--output", help="output folder for image files (created if missing)")
    output.add_argument("--output-shards", metavar="PATTERN",
                        help="write shards, one per input shard with the same keys (<key>.png): a brace pattern "
                             "with one name per input shard (out/sr-{000000..000099}.tar) or a folder (each output "
                             "shard takes its input shard's name); a rerun skips output shards already there")
    parser.add_argument("--scale-out", type=float, default=None, metavar="S",
                        help="final size = S x the input (bicubic resize of the SR output); default: model scale")
    parser.add_argument("--tile", type=int, default=0,
                        help="tile side in input pixels to bound memory; 0 = whole image (default)")
    parser.add_argument("--tile-pad", type=int, default=DEFAULT_TILE_PAD,
                        help="context pixels around each tile, cropped from its output (default "
                             f"{DEFAULT_TILE_PAD}; raise it if seams show)")
    parser.add_argument("--batch-tiles", type=int, default=1, metavar="N",
                        help="tiles of equal shape (whole images of equal size with --tile 0) from several images "
                             "go through the network N at a time, so small images keep the GPU busy; outputs "
                             "may differ from one at a time by one 8-bit level (default 1: one at a time)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="autocast precision (fp16 needs CUDA; default fp32)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto = cuda if available (default)")
    parser.add_argument("--model-b", default=None, metavar="CKPT2",
                        help="second checkpoint (GAN) for network interpolation with --model (PSNR)")
    parser.add_argument("--alpha", type=float, nargs="+", default=None, metavar="A",
                        help="interpolation weight(s) in [0,1] of --model-b; several = a sweep")
    parser.add_argument("--side-by-side", action="store_true",
                        help="with several --alpha values, write one image with the results left to right")
    parser.add_argument("--model-scale", type=int, default=None, metavar="N",
                        help="scale of checkpoints that do not record it (SRCNN/VDSR in BasicSR format)")
    add_ray_args(parser)
    return parser


def _check_options(args: argparse.Namespace) -> None:
    if args.scale_out is not None and not (math.isfinite(args.scale_out) and args.scale_out > 0):
        raise InputError(f"--scale-out must be a number > 0, got {args.scale_out}")
    if args.tile < 0 or args.tile_pad < 0:
        raise InputError(f"--tile and --tile-pad must be >= 0, got {args.tile} and {args.tile_pad}")
    if args.batch_tiles < 1:
        raise InputError(f"--batch-tiles must be an integer >= 1 (the most tiles per forward pass; 1, the default, "
                         f"upscales one tile at a time), got {args.batch_tiles}")
    check_model_scale(args.model_scale)
    if (args.alpha is None) != (args.model_b is None):
        raise InputError("--alpha and --model-b go together: --model is the PSNR network, --model-b the GAN one, "
                         "--alpha A mixes (1-A)*model + A*model_b")
    for alpha in args.alpha or ():
        if not 0.0 <= alpha <= 1.0:
            raise InputError(f"--alpha values must be in [0, 1] (0 = --model, 1 = --model-b), got {alpha}")
    if args.side_by_side and not args.alpha:
        raise InputError("--side-by-side joins the outputs of several --alpha values; pass --alpha A1 A2 ...")
    check_ray_args(args)


def load_models(args: argparse.Namespace) -> list[nn.Module]:
    """The model per output (--model, or one mix per --alpha), on the CPU."""
    model = load_model(args.model, "--model", scale=args.model_scale)
    if isinstance(model, OnnxGenerator):
        if args.model_b is not None:
            raise InputError("--model-b mixes the weights of two PyTorch checkpoints; an ONNX --model has none "
                             "to mix: pass the .pth files, or export the mix (python -m raysr.interpolate) to ONNX")
        if args.precision != "fp32":
            raise InputError(f"--precision {args.precision} is PyTorch autocast; an ONNX --model runs in the "
                             "precision it was exported in, so leave --precision out")
    if args.model_b is None:
        return [model]
    model_b = load_model(args.model_b, "--model-b", scale=args.model_scale)
    return [mix_generators(model, model_b, alpha) for alpha in args.alpha]


# the options load_models reads
MODEL_ARGS = ("model", "model_b", "alpha", "model_scale", "precision")


def upscaler_on(device: torch.device, model_args: argparse.Namespace, options: UpscaleOptions) -> Upscaler:
    """The :class:`Upscaler` of a run on ``device``, its checkpoints loaded here (in a Ray actor)."""
    return Upscaler(load_models(model_args), options, device)


def _run(args: argparse.Namespace) -> int:
    _check_options(args)
    options = UpscaleOptions(args.scale_out, args.tile, args.tile_pad, args.precision, args.side_by_side,
                             args.batch_tiles)
    if args.ray is None:
        device = resolve_device(args.device)
        check_precision(args.precision, device)
    shards = _check_shard_options(args)
    if shards:
        jobs, skipped, log_folder = plan_shard_jobs(args)
        total = sum(job.samples or 0 for job in jobs)  # shards without a manifest add theirs as they are read
        log = JobLog("raysr.upscale", total, skipped, log_folder,
                     skipped_text="shards skipped (output shard already there)")
        if skipped:
            print(f"raysr.upscale: skipping {skipped} input shard(s) whose output shard is already there",
                  file=sys.stderr)
    else:
        jobs, skipped = plan_jobs(args)
        log = JobLog("raysr.upscale", len(jobs), skipped, args.output)
        if skipped:
            print(f"raysr.upscale: skipping {skipped} input(s) whose output is already in {args.output}",
                  file=sys.stderr)
    models = load_models(args)
    try:
        tags = [f"alpha{_alpha_tag(a)}" for a in args.alpha] if args.alpha and not args.side_by_side else [""]
        if args.ray is not None:
            from raysr.batch_inference import upscale_on_ray, upscale_shards_on_ray
            # each actor loads the checkpoints itself: models in the actors' constructor arguments would
            # travel through the object store, from where an actor restarted on another node cannot rely on them
            model_args = argparse.Namespace(**{k: getattr(args, k) for k in MODEL_ARGS})
            ray_args = dict(address=args.ray, workers=parse_workers(args.workers) if args.workers else None,
                            gpus_per_worker=args.gpus_per_worker, precision=args.precision,
                            batch_tiles=args.batch_tiles, verbose=args.verbose)
            make_upscaler = functools.partial(upscaler_on, model_args=model_args, options=options)
            if shards:
                upscale_shards_on_ray(jobs, make_upscaler, log, member_names(tags), **ray_args)
            else:
                upscale_on_ray(jobs, make_upscaler, log, **ray_args)
        elif shards:
            _upscale_shards(Upscaler(models, options, device), jobs, log, member_names(tags))
        else:
            upscale_files(Upscaler(models, options, device), jobs, log)
    finally:
        code = log.finish()
    return code


def _check_shard_options(args: argparse.Namespace) -> bool:
    """Whether the job runs on shards (``--input`` names shards); InputError for files in and shards out,
    or shards in and files out."""
    try:
        shards = is_shard_source(args.input)
    except storage.StorageError as err:
        raise InputError(f"--input {args.input}: {err}") from err
    if shards and args.output is not None:
        raise InputError(f"--input {args.input} names WebDataset shards: write the results as shards with "
                         "--output-shards PATTERN (image files per sample are not written from shards)")
    if args.output_shards is not None and not shards:
        raise InputError(f"--output-shards writes shards keyed like the input shards, but --input {args.input} "
                         "is no shards: give a .tar, a brace pattern such as in/train-{000000..000009}.tar, a "
                         "manifest.parquet or a folder of shards, or write image files with --output DIR")
    return shards


def _read_inputs(jobs: Iterable[Job], log: JobLog) -> Iterator[tuple[Job, DecodedImage]]:
    for job in jobs:
        try:
            image = read_image(job.uri)
        except Exception as err:  # any input may be bad in its own way; it is listed, and the job goes on
            log.failed(job.uri, "read", failure_reason(err))
            continue
        yield job, image


def upscale_files(upscaler: Upscaler, jobs: Sequence[Job], log: JobLog) -> None:
    """read -> upscale -> write every job in this process, ``--batch-tiles`` images at a time."""
    for group in upscaler.groups(_read_inputs(jobs, log)):
        for job, image, results in group:
            if isinstance(results, BaseException):
                log.failed(job.uri, "upscale", failure_reason(results))
                continue
            try:
                for out, result in zip(job.outs, results):
                    write_image(out, result)
            except Exception as err:  # a full disk, a denied bucket, a format that cannot hold the pixels
                log.failed(job.uri, "write", failure_reason(err))
                continue
            log.done(job.uri, megapixels(image))


def _shard_inputs(job: ShardJob, log: JobLog, unreadable: list[str]) -> Iterator[tuple[str, DecodedImage]]:
    """``(key, image)`` of the usable samples of ``job``'s shard; the others are listed in ``log``. A shard
    that cannot be read to its end for a reason other than damage (missing, denied, the store gone) ends
    the iteration with the reason appended to ``unreadable``: its output shard must not be written."""
    count = 0
    try:
        for key, image in read_images(job.url):
            if job.samples is None:  # no manifest counted them: the progress total grows as they come
                log.expect(1)
            if isinstance(image, DamagedTar):  # a rerun cannot mend it: the samples before the break go on
                log.failed(job.url, "read", damage_reason(image, count))
                break
            count += 1
            if isinstance(image, BaseException):
                log.failed(job.url, "read", failure_reason(image), key)
                continue
            yield key, image
    except storage.StorageError as err:
        unreadable.append(failure_reason(err))
        if job.samples is None:
            log.expect(1)


def _upscale_shards(upscaler: Upscaler, jobs: Sequence[ShardJob], log: JobLog, members: Sequence[str]) -> None:
    """Each input shard -> its output shard, in this process: samples read in tar order, upscaled
    ``--batch-tiles`` at a time, added as ``<key>.<member>``; the output shard is written whole
    after its last sample, and its samples count as done then."""
    for job in jobs:
        shard, done, unreadable = OutputShard(job.out, members), [], []
        for group in upscaler.groups(_shard_inputs(job, log, unreadable)):
            for key, image, results in group:
                if isinstance(results, BaseException):
                    log.failed(job.url, "upscale", failure_reason(results), key)
                    continue
                try:
                    shard.add(key, results)
                except Exception as err:  # the pixels do not encode (e.g. too large for one tar member)
                    log.failed(job.url, "write", failure_reason(err), key)
                    continue
                done.append((key, megapixels(image)))
        if unreadable:
            log.failed(job.url, "read", f"{unreadable[0]}; {NOT_WRITTEN}")
            continue
        try:
            shard.write()
        except Exception as err:  # a full disk, a denied bucket: a rerun tries this shard again
            log.failed(job.url, "write", f"{job.out}: {failure_reason(err)}")
            continue
        for key, mp in done:
            log.done(f"{job.url}#{key}", mp)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
