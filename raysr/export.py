"""Export a generator to ONNX: ``python -m raysr.export``.

    python -m raysr.export --model runs/esrgan/generator.pth --onnx esrgan_x4.onnx
    python -m raysr.export --model srcnn_x3.pth --model-scale 3 --onnx srcnn.onnx --size 64x64

Every generator raysr reads (:func:`raysr.cli.load_model`) exports with dynamic batch, height
and width (SRCNN and VDSR for one ``--size``: see :mod:`raysr.onnx_file`). Before the file is
written, onnxruntime runs it on random inputs of two sizes and on ``--check-image`` (a real
image) beside PyTorch; the largest difference is printed, and above 1e-4 nothing is written
and the exit code is 1. ``python -m raysr.upscale --model out.onnx`` runs the file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import torch

from raysr import storage
from raysr.cli import InputError, check_model_scale, cli, load_model
from raysr.images import ImageError, read_image, to_float_rgb
from raysr.onnx_file import FP32_TOLERANCE, OPSET, OnnxError, OnnxGenerator, export_onnx, verify_onnx

EXIT_MISMATCH = 1


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"64x48"`` -> (64, 48) (height, width); InputError otherwise."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise InputError(f"--size takes HxW in input pixels, e.g. 64x64; got {text!r}")
    return h, w


def check_inputs(model: torch.nn.Module, size: tuple[int, int] | None, image: str | None) -> list[torch.Tensor]:
    """The verification inputs: random (two sizes, batch 2 and 1, or ``size``) and the image's pixels."""
    multiple = getattr(model, "unshuffle", 1)
    generator = torch.Generator().manual_seed(0)
    shapes = [(1, 3, *size), (2, 3, *size)] if size else [(2, 3, 12 * multiple, 10 * multiple),
                                                           (1, 3, 7 * multiple, 13 * multiple)]
    inputs = [torch.rand(shape, generator=generator) for shape in shapes]
    if image is not None:
        try:
            rgb, _ = to_float_rgb(read_image(image))
        except (ImageError, storage.StorageError) as err:
            raise InputError(f"--check-image: {err}") from err
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
        h, w = size or (x.shape[2] - x.shape[2] % multiple, x.shape[3] - x.shape[3] % multiple)
        if x.shape[2] < h or x.shape[3] < w:
            raise InputError(f"--check-image {image} is {x.shape[2]}x{x.shape[3]}, smaller than --size {h}x{w}")
        inputs.append(x[..., :h, :w].contiguous())
    return inputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raysr.export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a generator checkpoint to ONNX, verified with onnxruntime against PyTorch.",
        epilog=f"Exit codes: 0 written, {EXIT_MISMATCH} ONNX differs from PyTorch by more than {FP32_TOLERANCE:g} "
               "(nothing written), 2 a bad option.")
    parser.add_argument("--model", required=True, help="generator checkpoint (path or s3:// URI)")
    parser.add_argument("--onnx", required=True, metavar="OUT", help="the ONNX file to write (path or s3:// URI)")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    parser.add_argument("--size", default=None, metavar="HxW",
                        help="export for this input size only (required for SRCNN and VDSR); default: any size")
    parser.add_argument("--check-image", default=None, metavar="FILE",
                        help="also verify on this image (its top-left --size crop with --size)")
    parser.add_argument("--model-scale", type=int, default=None, metavar="N",
                        help="scale of checkpoints that do not record it (SRCNN/VDSR in BasicSR format)")
    return parser


def _run(args: argparse.Namespace) -> int:
    check_model_scale(args.model_scale)
    size = parse_size(args.size)
    if not args.onnx.lower().endswith(".onnx"):
        raise InputError(f"--onnx {args.onnx}: name the file *.onnx (raysr.upscale --model picks ONNX by that suffix)")
    model = load_model(args.model, "--model", scale=args.model_scale)
    if isinstance(model, OnnxGenerator):
        raise InputError(f"--model {args.model} is an ONNX file already; pass the PyTorch checkpoint")
    try:
        data = export_onnx(model, size, args.opset)
        worst = verify_onnx(data, model, check_inputs(model, size, args.check_image))
    except OnnxError as err:
        raise InputError(str(err)) from err
    shape = f"{size[0]}x{size[1]} inputs only" if size else "any batch, height and width"
    what = f"{type(model).__name__} x{model.scale}, opset {args.opset}, {shape}"
    if worst > FP32_TOLERANCE:
        print(f"raysr.export: the ONNX graph of {args.model} ({what}) differs from PyTorch by up to {worst:.3g} "
              f"(> {FP32_TOLERANCE:g}); nothing written", file=sys.stderr)
        return EXIT_MISMATCH
    storage.write_bytes(args.onnx, data)
    checked = "random inputs" + (f" and {args.check_image}" if args.check_image else "")
    print(f"raysr.export: wrote {args.onnx} ({what}, {len(data) / 1e6:.1f} MB); max |onnxruntime - PyTorch| = "
          f"{worst:.2g} on {checked}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
