"""Benchmark a generator the way SR papers do: ``python -m raysr.evaluate``.

    python -m raysr.evaluate --hr datasets/Set5/HR --scale 4 --model runs/esrgan/generator.pth --json set5.json
    python -m raysr.evaluate --hr datasets/Set14/HR --lr datasets/Set14/LR_bicubic/X4 --scale 4 --model bicubic

Protocol (as BasicSR / the SRGAN, ESRGAN and VDSR papers):

1. GT is cropped to a multiple of the scale ("GTmod").
2. LR = MATLAB ``imresize(GT, 1/scale, 'bicubic')`` rounded to uint8, unless ``--lr``
   gives the LR files (matched to GT by file stem; ``baby``, ``babyx4``, ``baby_x4``
   and ``baby_LRBI_x4`` all match ``baby``: :func:`raysr.data.pairing.pairing_key`,
   which training's ``data.val_lr`` pairs by too); their size must be GTmod / scale.
3. SR = generator(LR), clamped and rounded to uint8.
4. PSNR and SSIM (:mod:`raysr.metrics`) on the Y channel (BT.601, as MATLAB's
   ``rgb2ycbcr``) and on RGB, ignoring ``scale`` pixels at every edge.
5. LPIPS on the whole RGB image when :func:`raysr.lpips.load_lpips` can run offline.

Every image gets a row, followed by the mean over images, and a bicubic baseline
(``imresize(LR, scale)``) is always scored alongside. ``--json`` writes::

    {"model": "<checkpoint or 'bicubic'>", "arch": "rrdbnet", "scale": 4, "crop_border": 4,
     "hr": "<dir>", "lr": "<dir>" | null, "lr_source": "files" | "bicubic",
     "lpips": "<description>" | null, "lpips_unavailable": "<reason>" | null,
     "images": [{"name": "baby.png", "size": [H, W],
                 "psnr_y": .., "ssim_y": .., "psnr_rgb": .., "ssim_rgb": .., "lpips": .. | null,
                 "bicubic": {same metric keys}}, ...],
     "mean": {"psnr_y": .., "ssim_y": .., "psnr_rgb": .., "ssim_rgb": .., "lpips": .. | null},
     "bicubic": {"mean": {same keys}}}

PSNR in dB, SSIM in [0, 1], LPIPS >= 0 (lower is better); sizes are GTmod sizes.
PSNR of an SR image identical to its GT is infinite: the table prints ``inf``, the
JSON ``null`` (JSON has no infinity), and so does a mean that includes it.

Every GT image must be at least ``2 * scale + 11`` px on each side after GTmod (x4:
19, so GT of 20x20 or more), so that SSIM's 11x11 window fits once ``scale`` px are
ignored at each edge; all images are checked before any work starts.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raysr import storage
from raysr.data.pairing import index_by_key, mod_crop, pair_size_error
from raysr.images import DecodedImage, ImageError, list_images, probe_image, read_image, to_uint8_rgb, write_image
from raysr.lpips import BACKBONE_FILES, LpipsFn, load_lpips
from raysr.metrics import SSIM_WINDOW
from raysr.models import generator_name
from raysr.scoring import bicubic_lr, bicubic_sr, mean_scores, score, super_resolve
from raysr.cli import (DEVICES, InputError, ScaleUnknownError, add_ray_args, check_ray_args, cli, load_model,
                       parse_workers, resolve_device)
from raysr.util import Progress

BICUBIC = "bicubic"


@dataclass
class Sample:
    """One benchmark image: its GT file, its LR file (None = make LR by bicubic), and
    the GTmod size (H, W) read from the headers."""

    name: str
    hr: str
    lr: str | None
    size: tuple[int, int]


def _normalized_index(folder: str, scale: int, option: str) -> dict[str, str]:
    """``{pairing key: file}`` of the images directly in ``folder`` (:func:`raysr.data.pairing.pairing_key`,
    the rule training's ``data.val_lr`` pairs by too)."""
    try:
        return index_by_key(list_images(folder, recursive=False)[0], folder, scale, option)
    except ValueError as err:
        raise InputError(str(err)) from err


def collect_samples(hr_dir: str, lr_dir: str | None, scale: int) -> list[Sample]:
    """Pair GT files with LR files and check every header; InputError on any problem."""
    for option, folder in (("--hr", hr_dir), ("--lr", lr_dir)):
        if folder is not None and not storage.is_s3(folder) and not Path(folder).is_dir():
            raise InputError(f"{option} {folder}: not a directory")
    hr_index = _normalized_index(hr_dir, scale, "--hr")
    if not hr_index:
        raise InputError(f"--hr {hr_dir}: no image files found")
    lr_index = _normalized_index(lr_dir, scale, "--lr") if lr_dir else {}
    missing = [key for key in hr_index if lr_dir and key not in lr_index]
    if missing:
        raise InputError(f"--lr {lr_dir}: no LR image for {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"(matched by stem; expected e.g. {missing[0]}.png or {missing[0]}x{scale}.png)")
    samples, bad = [], []
    for key, hr in hr_index.items():
        lr = lr_index.get(key)
        try:
            info = probe_image(hr)
            size = (info.height - info.height % scale, info.width - info.width % scale)
            if min(size) < min_side(scale):
                smallest = -(-min_side(scale) // scale) * scale  # the first multiple of scale that is enough
                raise ImageError(f"{hr}: {info.height}x{info.width} (GTmod {size[0]}x{size[1]}) is too small: "
                                 f"SSIM needs {SSIM_WINDOW}x{SSIM_WINDOW} px after ignoring {scale} px at each "
                                 f"edge, so x{scale} needs GT of at least {smallest}x{smallest}; remove it from --hr")
            if lr is not None:
                lr_info = probe_image(lr)
                if (error := pair_size_error(lr, (lr_info.height, lr_info.width), hr, size, scale)) is not None:
                    raise ImageError(f"{error}; is --scale right?")
        except (ImageError, storage.StorageError) as err:
            bad.append(str(err))
            continue
        samples.append(Sample(name=Path(hr).name, hr=hr, lr=lr, size=size))
    if bad:
        raise InputError(f"{len(bad)} benchmark image(s) cannot be used, nothing was written:\n  "
                         + "\n  ".join(bad))
    return samples


def min_side(scale: int) -> int:
    """Smallest GTmod side scored at ``scale``: SSIM's window plus ``scale`` ignored px per edge."""
    return SSIM_WINDOW + 2 * scale


def load_pair(hr_uri: str, lr_uri: str | None, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(GTmod, LR) as uint8 (H, W, 3) arrays; LR = bicubic of GTmod when ``lr_uri`` is None."""
    hr = mod_crop(to_uint8_rgb(read_image(hr_uri)), scale)
    if lr_uri is None:
        return hr, bicubic_lr(hr, scale)
    lr = to_uint8_rgb(read_image(lr_uri))
    if (error := pair_size_error(lr_uri, lr.shape[:2], hr_uri, hr.shape[:2], scale)) is not None:
        raise ImageError(f"{error} (after EXIF orientation); is --scale right?")
    return hr, lr


class Scorer:
    """The model (None = bicubic) and LPIPS on one device: ``scorer(hr, lr)`` -> ``(sr, scores)``, the
    uint8 SR image and its metrics with the bicubic baseline's under ``"bicubic"``. Both the
    single-process loop and the Ray actors (``--ray``) score through it."""

    def __init__(self, model: nn.Module | None, scale: int, lpips_fn: LpipsFn | None):
        self.model, self.scale, self.lpips_fn = model, scale, lpips_fn

    def __call__(self, hr: np.ndarray, lr: np.ndarray) -> tuple[np.ndarray, dict]:
        baseline = bicubic_sr(lr, self.scale)
        sr = baseline if self.model is None else super_resolve(self.model, lr)[0]
        scores = score(sr, hr, self.scale, self.lpips_fn)
        bicubic = dict(scores) if self.model is None else score(baseline, hr, self.scale, self.lpips_fn)
        return sr, {**scores, "bicubic": bicubic}


def scorer_on(device: torch.device, source: str, scale: int, lpips_net: str | None,
              lpips_backbone: str | None) -> Scorer:
    """A :class:`Scorer` on ``device`` (a Ray actor's) with the model of ``--model source`` loaded here and
    LPIPS (``lpips_net`` None: none)."""
    model = _model_for(source, scale, quiet=True)
    lpips_fn = load_lpips(lpips_net, lpips_backbone, device)[0] if lpips_net else None
    return Scorer(model.to(device) if model is not None else None, scale, lpips_fn)


def _sr_target(save_sr: str | None, sample: Sample) -> str | None:
    return storage.join(save_sr, Path(sample.name).stem + ".png") if save_sr is not None else None


def evaluate(samples: Sequence[Sample], scale: int, model: nn.Module | None, lpips_fn: LpipsFn | None = None,
             save_sr: str | None = None) -> dict:
    """Score ``model`` (None = bicubic) on ``samples``; returns the report described in the
    module docstring (without the descriptive top-level fields); ``model`` runs on the device
    it is on. ``save_sr``: folder
    for the uint8 SR outputs as ``<stem>.png``."""
    scorer = Scorer(model, scale, lpips_fn)
    rows = []
    created: list[str] = []  # SR files this call added; removed again if it stops part-way
    try:
        with Progress(len(samples), "evaluate", unit="images") as progress:
            for sample in samples:
                try:
                    hr, lr = load_pair(sample.hr, sample.lr, scale)
                except (ImageError, storage.StorageError) as err:
                    raise InputError(f"{err}; stopped after {progress.done} of {len(samples)} images, "
                                     "nothing saved") from err
                sr, scores = scorer(hr, lr)
                target = _sr_target(save_sr, sample)
                if target is not None:
                    is_new = not storage.exists(target)
                    write_image(target, DecodedImage(sr, "PNG"))
                    if is_new:
                        created.append(target)
                rows.append({"name": sample.name, "size": list(hr.shape[:2]), **scores})
                progress.step(sample.name)
    except BaseException:
        for target in created:
            storage.remove(target)
        raise
    return _report_rows(rows)


def _report_rows(rows: list[dict]) -> dict:
    return {"images": rows, "mean": mean_scores(rows),
            "bicubic": {"mean": mean_scores([r["bicubic"] for r in rows])}}


def evaluate_with_ray(args: argparse.Namespace, samples: Sequence[Sample], lpips_on: bool) -> dict:
    """:func:`evaluate` as a Ray Data pipeline (``--ray``): pairs loaded in CPU tasks, scored on the
    actor pool through the same :class:`Scorer`, SR images saved in CPU tasks; the same report."""
    from raysr.batch_inference import evaluate_on_ray

    saves = [_sr_target(args.save_sr, s) for s in samples]
    existed = {t for t in saves if t is not None and storage.exists(t)}
    # each actor loads the checkpoint itself (see raysr.upscale: no models in actor constructor arguments)
    make_scorer = functools.partial(scorer_on, source=args.model, scale=args.scale,
                                    lpips_net=args.lpips_net if lpips_on else None, lpips_backbone=args.lpips_backbone)
    with Progress(len(samples), "evaluate", unit="images", interval=5.0) as progress:
        results = evaluate_on_ray(samples, functools.partial(load_pair, scale=args.scale), make_scorer, saves,
                                  progress, address=args.ray, verbose=args.verbose,
                                  gpus_per_worker=args.gpus_per_worker,
                                  workers=parse_workers(args.workers) if args.workers else None)
    errors = [error for error, _ in results if error]
    if errors:
        for target in saves:
            if target is not None and target not in existed:
                storage.remove(target)
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise InputError(f"{len(errors)} benchmark image(s) could not be scored, nothing saved:\n  "
                         + "\n  ".join(errors[:5]) + more)
    rows = [{"name": s.name, "size": list(s.size), **scores} for s, (_, scores) in zip(samples, results)]
    return _report_rows(rows)


def _cells(scores: dict) -> str:
    lp = f"{scores['lpips']:8.4f}" if scores.get("lpips") is not None else f"{'-':>8}"
    return (f"{scores['psnr_y']:8.2f} {scores['ssim_y']:7.4f} {scores['psnr_rgb']:9.2f} "
            f"{scores['ssim_rgb']:8.4f} {lp}")


def format_table(report: dict) -> str:
    """The report as the fixed-width table printed on stdout."""
    width = max([len(r["name"]) for r in report["images"]] + [16])
    lr = f"LR files from {report['lr']}" if report["lr"] else "LR = MATLAB bicubic of GTmod, uint8"
    lines = [f"model: {report['model']} ({report['arch']}, x{report['scale']})   GT: {report['hr']} "
             f"({len(report['images'])} images)   {lr}",
             f"PSNR (dB) and SSIM of uint8 images with {report['crop_border']} px borders ignored; "
             "Y = BT.601 luma; LPIPS: lower is better",
             f"{'image':<{width}} {'PSNR-Y':>8} {'SSIM-Y':>7} {'PSNR-RGB':>9} {'SSIM-RGB':>8} {'LPIPS':>8}"]
    lines += [f"{r['name']:<{width}} {_cells(r)}" for r in report["images"]]
    lines.append("-" * len(lines[-1]))
    lines.append(f"{'mean':<{width}} {_cells(report['mean'])}")
    lines.append(f"{'mean bicubic':<{width}} {_cells(report['bicubic']['mean'])}")
    if report["lpips_unavailable"]:
        lines.append(f"LPIPS not computed: {report['lpips_unavailable']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raysr.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PSNR / SSIM (Y and RGB) / LPIPS of a generator on a folder of GT images, "
                    "with the bicubic baseline.",
        epilog="Exit code 2 means a bad input or option; the table and --json are only written on success.")
    parser.add_argument("--hr", required=True, help="folder of ground-truth images (Set5/Set14 style)")
    parser.add_argument("--lr", default=None, help="folder of LR images matched by stem (default: bicubic of GT)")
    parser.add_argument("--scale", type=int, required=True, help="upscaling factor; must equal the model's")
    parser.add_argument("--model", required=True, help="generator checkpoint, or 'bicubic'")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the numbers as JSON here")
    parser.add_argument("--save-sr", default=None, metavar="DIR", help="save SR outputs as <stem>.png here")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto = cuda if available (default)")
    parser.add_argument("--lpips-net", choices=sorted(BACKBONE_FILES), default="alex",
                        help="LPIPS backbone (default alex)")
    parser.add_argument("--lpips-backbone", default=None, metavar="FILE",
                        help="torchvision ImageNet weights of the LPIPS backbone (default: torch hub cache)")
    add_ray_args(parser)
    return parser


def _model_for(source: str, scale: int, quiet: bool = False) -> nn.Module | None:
    if source == BICUBIC:
        return None
    try:
        model = load_model(source, scale_option="--scale")
    except ScaleUnknownError:
        model = load_model(source, scale=scale)
        if not quiet:  # the driver says it once; Ray actors load the model again
            print(f"raysr.evaluate: {source} does not record its upscaling factor ({type(model).__name__} "
                  f"weights); taking it from --scale {scale}", file=sys.stderr)
    if model.scale != scale:
        raise InputError(f"--model {source} is a x{model.scale} generator but --scale is {scale}; "
                         f"pass --scale {model.scale} or a x{scale} checkpoint")
    return model


def json_safe(value):
    """``value`` with every non-finite float (PSNR of identical images) replaced by None."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_outputs(args: argparse.Namespace, samples: Sequence[Sample]) -> None:
    if args.save_sr is None:
        return
    for sample in samples:
        target = storage.join(args.save_sr, Path(sample.name).stem + ".png")
        for source in (sample.hr, sample.lr):
            if source is not None and not storage.is_s3(source) and not storage.is_s3(target) and \
                    Path(source).resolve() == Path(target).resolve():
                raise InputError(f"--save-sr {args.save_sr} would overwrite {source}; choose another folder")


def _run(args: argparse.Namespace) -> int:
    if args.scale < 1:
        raise InputError(f"--scale must be an integer >= 1, got {args.scale}")
    check_ray_args(args)
    device = resolve_device(args.device) if args.ray is None else torch.device("cpu")
    samples = collect_samples(args.hr, args.lr, args.scale)
    _check_outputs(args, samples)
    model = _model_for(args.model, args.scale)
    if model is not None:
        model = model.to(device)
    lpips_fn, lpips_note = load_lpips(args.lpips_net, args.lpips_backbone, device)
    arch = BICUBIC if model is None else getattr(model, "arch", None) or generator_name(model)
    report = {"model": args.model, "arch": arch,
              "scale": args.scale, "crop_border": args.scale, "hr": args.hr, "lr": args.lr,
              "lr_source": "files" if args.lr else BICUBIC,
              "lpips": lpips_note if lpips_fn else None, "lpips_unavailable": None if lpips_fn else lpips_note}
    if args.ray is None:
        report.update(evaluate(samples, args.scale, model, lpips_fn, args.save_sr))
    else:
        report.update(evaluate_with_ray(args, samples, lpips_fn is not None))
    print(format_table(report))
    if args.json:
        try:
            storage.write_bytes(args.json, (json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n").encode())
        except OSError as err:
            raise InputError(f"cannot write --json {args.json}: {err}") from err
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
