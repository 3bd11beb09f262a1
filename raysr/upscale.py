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

Everything that can be checked before the first write is checked first (options,
every input's header, the checkpoints), each output is written atomically, and a
bad input stops the run with exit code 2 and a message naming it.

:func:`upscale_tensor` (whole or tiled inference, padded to what the network takes) is
also what ``raysr.evaluate`` and training's validation run the generator through.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raysr import storage
from raysr.images import (DecodedImage, ImageError, from_float_rgb, is_under, list_images, probe_image,
                           read_image, relative_path, to_float_rgb, write_image)
from raysr.inference import DEFAULT_TILE_PAD, PRECISIONS, upscale_tensor
from raysr.ops.resize import imresize, weight_matrix
from raysr.cli import DEVICES, InputError, check_model_scale, cli, load_model, mix_generators, resolve_device
from raysr.util import Progress



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
    rgb, alpha = to_float_rgb(image)
    lr = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    scale = models[0].scale
    height, width = image.size
    target = output_size(height, width, scale_out) if scale_out else (height * scale, width * scale)
    alpha_up = None
    if alpha is not None:
        # float32 (to_float_rgb's dtype) is exact enough for 16-bit alpha and keeps resize buffers small
        alpha_up = imresize(torch.from_numpy(alpha)[None], scale)
        alpha_up = _to_size(alpha_up, target)[0].clamp(0, 1).numpy()
    outputs = []
    for model in models:
        sr = _to_size(upscale_tensor(model, lr, tile, tile_pad, precision)[0], target).clamp(0, 1)
        outputs.append(from_float_rgb(sr.permute(1, 2, 0).numpy(), alpha_up, image))
    return outputs


def _to_size(x: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(target) else resize_to(x, *target)


def side_by_side(images: Sequence[DecodedImage]) -> DecodedImage:
    """The images (equal height, one layout) joined left to right into one image."""
    pixels = np.concatenate([im.pixels for im in images], axis=1)
    return DecodedImage(pixels=pixels, format=images[0].format, icc_profile=images[0].icc_profile)


# --------------------------------------------------------------------------- CLI


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


def _probe_all(inputs: Sequence[tuple[str, str]]) -> None:
    bad = []
    for uri, _ in inputs:
        try:
            probe_image(uri)
        except (ImageError, storage.StorageError) as err:
            bad.append(str(err))
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise InputError(f"{len(bad)} input(s) cannot be processed, nothing was written:\n  "
                         + "\n  ".join(bad[:5]) + more)


def _same_file(a: str, b: str) -> bool:
    if storage.is_s3(a) or storage.is_s3(b):
        return a == b
    return Path(a).resolve() == Path(b).resolve()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raysr.upscale", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Upscale an image or a folder of images with a trained SR generator.",
        epilog="Outputs keep each input's name, relative folder and format; with --alpha they get an "
               "_alpha<A> suffix. Exit code 2 means a bad input or option; nothing partial is written.")
    parser.add_argument("--model", required=True, help="generator checkpoint (path or s3:// URI)")
    parser.add_argument("--input", required=True, help="image file or folder (searched recursively)")
    parser.add_argument("--output", required=True, help="output folder (created if missing)")
    parser.add_argument("--scale-out", type=float, default=None, metavar="S",
                        help="final size = S x the input (bicubic resize of the SR output); default: model scale")
    parser.add_argument("--tile", type=int, default=0,
                        help="tile side in input pixels to bound memory; 0 = whole image (default)")
    parser.add_argument("--tile-pad", type=int, default=DEFAULT_TILE_PAD,
                        help="context pixels around each tile, cropped from its output (default "
                             f"{DEFAULT_TILE_PAD}; raise it if seams show)")
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
    return parser


def _check_options(args: argparse.Namespace) -> None:
    if args.scale_out is not None and not (math.isfinite(args.scale_out) and args.scale_out > 0):
        raise InputError(f"--scale-out must be a number > 0, got {args.scale_out}")
    if args.tile < 0 or args.tile_pad < 0:
        raise InputError(f"--tile and --tile-pad must be >= 0, got {args.tile} and {args.tile_pad}")
    check_model_scale(args.model_scale)
    if (args.alpha is None) != (args.model_b is None):
        raise InputError("--alpha and --model-b go together: --model is the PSNR network, --model-b the GAN one, "
                         "--alpha A mixes (1-A)*model + A*model_b")
    for alpha in args.alpha or ():
        if not 0.0 <= alpha <= 1.0:
            raise InputError(f"--alpha values must be in [0, 1] (0 = --model, 1 = --model-b), got {alpha}")
    if args.side_by_side and not args.alpha:
        raise InputError("--side-by-side joins the outputs of several --alpha values; pass --alpha A1 A2 ...")


def _run(args: argparse.Namespace) -> int:
    _check_options(args)
    device = resolve_device(args.device)
    check_precision(args.precision, device)
    inputs = _collect_inputs(args.input, args.output)
    _probe_all(inputs)
    jobs = []  # (input uri, [output uris])
    for uri, rel in inputs:
        outs = [storage.join(args.output, name) for name in _output_names(rel, args.alpha, args.side_by_side)]
        clash = next((o for o in outs if _same_file(o, uri)), None)
        if clash:
            raise InputError(f"output {clash} would overwrite its input; choose another --output folder")
        jobs.append((uri, outs))

    model = load_model(args.model, "--model", scale=args.model_scale)
    if args.model_b is None:
        models = [model]
    else:
        model_b = load_model(args.model_b, "--model-b", scale=args.model_scale)
        models = [mix_generators(model, model_b, alpha) for alpha in args.alpha]
    models = [m.to(device) for m in models]

    with Progress(len(jobs), "upscale", unit="files") as progress:
        for uri, outs in jobs:
            _upscale_job(args, models, uri, outs, progress)
    print(f"wrote {sum(len(o) for _, o in jobs)} image(s) to {args.output}", file=sys.stderr)
    return 0


def _upscale_job(args: argparse.Namespace, models: Sequence[nn.Module], uri: str, outs: Sequence[str],
                 progress: Progress) -> None:
    stopped = f"stopped after {progress.done} of {progress.total} inputs"
    try:
        results = upscale_image(models, read_image(uri), args.scale_out, args.tile, args.tile_pad, args.precision)
    except (ImageError, storage.StorageError) as err:
        raise InputError(f"{err}; {stopped} (their outputs are complete, nothing partial was written)") from err
    except torch.cuda.OutOfMemoryError as err:
        raise InputError(f"{uri} does not fit in GPU memory at once; pass --tile 512 (or smaller) "
                         f"to run it in tiles; {stopped}") from err
    if args.side_by_side:
        results = [side_by_side(results)]
    for out, result in zip(outs, results):
        try:
            write_image(out, result)
        except (ImageError, OSError) as err:
            raise InputError(f"cannot write {out}: {err}; {stopped}") from err
    progress.step(os.path.basename(uri))


def main(argv: Sequence[str] | None = None) -> int:
    return cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
