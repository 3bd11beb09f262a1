"""Upscale images with a trained generator: ``python -m raysr.upscale``.

    python -m raysr.upscale --model runs/esrgan/generator.pth --input photos/ --output photos_x4/
    python -m raysr.upscale --model psnr.pth --model-b gan.pth --alpha 0 0.5 1 --input a.png --output sweep/

Reads any checkpoint :func:`raysr.checkpoint.load_generator` reads (raysr, BasicSR /
Real-ESRGAN, both ESRGAN-repo layouts, a training run's ``generator.pth``), local or
``s3://``. Large images go through the network in overlapping tiles whose padded
margins are cropped away, so the result matches whole-image inference. Grayscale
inputs come out grayscale, alpha channels are upscaled separately with MATLAB
bicubic, 16-bit PNGs stay 16-bit, and each output keeps its input's format and name.

Everything that can be checked before the first write is checked first (options,
every input's header, the checkpoints), each output is written atomically, and a
bad input stops the run with exit code 2 and a message naming it.

This module also holds the pieces ``raysr.evaluate`` and ``raysr.interpolate`` share:
:class:`InputError`, :func:`cli`, :func:`resolve_device`, :func:`load_model`,
:func:`upscale_tensor` and :class:`Progress`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raysr import io as rio
from raysr.checkpoint import interpolate, load_generator
from raysr.imageio import (DecodedImage, ImageError, from_float_rgb, is_under, list_images, probe_image,
                           read_image, relative_path, to_float_rgb, write_image)
from raysr.ops.resize import imresize, weight_matrix

EXIT_BAD_INPUT = 2
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


class InputError(Exception):
    """A problem with what the user passed (file, checkpoint, option); ``cli`` prints it
    and exits with code 2."""


def cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
        argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the CLI body; an :class:`InputError` becomes
    ``<prog>: error: ...`` on stderr and exit code 2, like argparse's own errors."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except InputError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


class Progress:
    """Progress over files on stderr: one updating line on a terminal, a line per file otherwise."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, name: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        width = 24
        filled = width * self.done // max(self.total, 1)
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{elapsed:.1f}s elapsed, ~{eta:.1f}s left  {name}")
        end = "\n" if not self.tty or self.done == self.total else ""
        print(("\r\033[K" if self.tty else "") + line, end=end, file=self.stream, flush=True)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an InputError."""
    if name not in DEVICES:
        raise InputError(f"--device must be one of {list(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but torch sees no CUDA GPU; use --device cpu (or auto)")
    return torch.device(name)


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 needs a CUDA device (CPU autocast has no fp16); "
                         "use --precision bf16 or fp32 on CPU")


def load_model(source: str, option: str = "--model", rgb_only: bool = True, **overrides) -> nn.Module:
    """The generator in checkpoint ``source`` (eval mode, CPU); InputError naming ``option``
    and the reason if it is missing, corrupt, of an unknown layout, or (``rgb_only``) not
    RGB -> RGB. ``overrides`` go to :func:`raysr.checkpoint.load_generator`."""
    if not rio.is_s3(source) and not Path(source).is_file():
        raise InputError(f"{option} {source}: no such checkpoint file")
    try:
        model = load_generator(source, **overrides)
    except Exception as err:  # torch.load and the layout checks raise many classes; all mean "bad checkpoint"
        raise InputError(f"{option} {source}: cannot load a generator ({type(err).__name__}: {err})") from err
    config = getattr(model, "config", {})
    channels = (config.get("num_in_ch", 3), config.get("num_out_ch", 3))
    if rgb_only and channels != (3, 3):
        raise InputError(f"{option} {source}: the generator maps {channels[0]} to {channels[1]} channels; "
                         "raysr.upscale and raysr.evaluate run RGB -> RGB generators")
    return model


def _forward(model: nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    dtype = PRECISIONS[precision]
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        out = model(x)
    expected = (x.shape[0], 3, x.shape[2] * model.scale, x.shape[3] * model.scale)
    if tuple(out.shape) != expected:
        raise ValueError(f"{type(model).__name__} (scale {model.scale}) turned input {tuple(x.shape)} into "
                         f"{tuple(out.shape)}, expected {expected}; is the checkpoint's scale right?")
    return out.float()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def upscale_tensor(model: nn.Module, lr: torch.Tensor, tile: int = 0, tile_pad: int = 16,
                   precision: str = "fp32") -> torch.Tensor:
    """Run ``model`` on ``lr``, whole or in overlapping tiles.

    lr: (N, 3, h, w) float in [0, 1], any device (tiles move to the model's device).
    tile: tile side in LR pixels, 0 = whole image. tile_pad: LR pixels of context
    added on each side of a tile (clamped at the image border) and cropped from its
    output; when it covers the network's receptive field, tiled equals untiled up to
    float rounding. precision: ``fp32`` | ``bf16`` | ``fp16`` (autocast).
    Returns (N, 3, h*scale, w*scale) float32 in [0, 1] on ``lr``'s device.
    """
    if tile < 0 or tile_pad < 0:
        raise ValueError(f"tile and tile_pad must be >= 0, got tile={tile}, tile_pad={tile_pad}")
    scale = model.scale
    device = next(model.parameters()).device
    height, width = lr.shape[-2:]
    # RRDBNet x2 / x1 pixel-unshuffle their input, so every piece must divide by that factor
    multiple = getattr(model, "unshuffle", 1)
    x = lr
    if height % multiple or width % multiple:
        pad = (0, _round_up(width, multiple) - width, 0, _round_up(height, multiple) - height)
        x = torch.nn.functional.pad(lr, pad, mode="replicate")
    padded_h, padded_w = x.shape[-2:]
    if tile == 0 or (tile >= padded_h and tile >= padded_w):
        out = _forward(model, x.to(device), precision).to(lr.device)
    else:
        tile, tile_pad = _round_up(tile, multiple), _round_up(tile_pad, multiple)
        out = torch.empty((x.shape[0], 3, padded_h * scale, padded_w * scale), dtype=torch.float32,
                          device=lr.device)
        for y0 in range(0, padded_h, tile):
            for x0 in range(0, padded_w, tile):
                y1, x1 = min(y0 + tile, padded_h), min(x0 + tile, padded_w)
                py0, px0 = max(y0 - tile_pad, 0), max(x0 - tile_pad, 0)
                py1, px1 = min(y1 + tile_pad, padded_h), min(x1 + tile_pad, padded_w)
                piece = _forward(model, x[..., py0:py1, px0:px1].to(device), precision)
                oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
                out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                    piece[..., oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale].to(lr.device)
    return out[..., :height * scale, :width * scale].clamp(0.0, 1.0)


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
                  tile: int = 0, tile_pad: int = 16, precision: str = "fp32") -> list[DecodedImage]:
    """Upscale one image with each model (same scale), keeping its layout and bit depth.

    Colour goes through the network (gray repeated to RGB, and back via BT.601 luma);
    alpha is upscaled with MATLAB bicubic. scale_out: final size relative to the input
    (default: the model's scale); the SR image is then resized with bicubic.
    """
    rgb, alpha = to_float_rgb(image)
    lr = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    scale = models[0].scale
    height, width = image.size
    target = output_size(height, width, scale_out) if scale_out else (height * scale, width * scale)
    alpha_up = None
    if alpha is not None:
        alpha_up = imresize(torch.from_numpy(alpha)[None].double(), scale)
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
    if rio.is_s3(source):
        is_file = rio.exists(source)
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
        except (ImageError, rio.StorageError) as err:
            bad.append(str(err))
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise InputError(f"{len(bad)} input(s) cannot be processed, nothing was written:\n  "
                         + "\n  ".join(bad[:5]) + more)


def _same_file(a: str, b: str) -> bool:
    if rio.is_s3(a) or rio.is_s3(b):
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
    parser.add_argument("--tile-pad", type=int, default=16,
                        help="context pixels around each tile, cropped from its output (default 16)")
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
        outs = [rio.join(args.output, name) for name in _output_names(rel, args.alpha, args.side_by_side)]
        clash = next((o for o in outs if _same_file(o, uri)), None)
        if clash:
            raise InputError(f"output {clash} would overwrite its input; choose another --output folder")
        jobs.append((uri, outs))

    overrides = {"scale": args.model_scale} if args.model_scale else {}
    model = load_model(args.model, "--model", **overrides)
    if args.model_b is None:
        models = [model]
    else:
        model_b = load_model(args.model_b, "--model-b", **overrides)
        try:
            models = [interpolate(model, model_b, alpha) for alpha in args.alpha]
        except ValueError as err:
            raise InputError(f"--model and --model-b cannot be interpolated: {err}") from err
    models = [m.to(device) for m in models]

    progress = Progress(len(jobs), "upscale")
    for uri, outs in jobs:
        try:
            results = upscale_image(models, read_image(uri), args.scale_out, args.tile, args.tile_pad,
                                    args.precision)
        except (ImageError, rio.StorageError) as err:
            raise InputError(f"{err}; stopped after {progress.done} of {len(jobs)} inputs "
                             "(their outputs are complete, nothing partial was written)") from err
        except torch.cuda.OutOfMemoryError as err:
            raise InputError(f"{uri} does not fit in GPU memory at once; pass --tile 512 (or smaller) "
                             f"to run it in tiles; stopped after {progress.done} of {len(jobs)} inputs") from err
        if args.side_by_side:
            results = [side_by_side(results)]
        for out, result in zip(outs, results):
            try:
                write_image(out, result)
            except (ImageError, OSError) as err:
                raise InputError(f"cannot write {out}: {err}") from err
        progress.step(os.path.basename(uri))
    print(f"wrote {sum(len(o) for _, o in jobs)} image(s) to {args.output}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
