"""Export a generator to ONNX: ``python -m raysr.export``.

    python -m raysr.export --model runs/esrgan/generator.pth --onnx esrgan_x4.onnx
    python -m raysr.export --model srcnn_x3.pth --model-scale 3 --onnx srcnn.onnx --size 64x64
    python -m raysr.export --model runs/esrgan/generator.pth --onnx esrgan_x4_fp16.onnx --fp16

Every generator raysr reads (:func:`raysr.cli.load_model`) exports with dynamic batch, height
and width (SRCNN and VDSR for one ``--size``: see :mod:`raysr.onnx_file`). Before the file is
written, onnxruntime runs it on random inputs of two sizes and on ``--check-image`` (a real
image) beside PyTorch's float32 output; the largest difference is printed, and above 1e-4 (1e-2
with ``--fp16``) nothing is written and the exit code is 1. ``--fp16`` writes a float16 graph
(float16 input and output too) and is refused, exit code 1, when some layer's output on those inputs
exceeds float16's range. ``python -m raysr.upscale --model out.onnx`` runs the file.
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
from raysr.onnx_file import (FP16_MAX, OPSET, TOLERANCES, OnnxError, OnnxGenerator, Verification, export_onnx,
                             verify_onnx)

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
        epilog=f"Exit codes: 0 written, {EXIT_MISMATCH} ONNX differs from PyTorch by more than "
               f"{TOLERANCES['fp32']:g} ({TOLERANCES['fp16']:g} with --fp16), or --fp16 would overflow "
               "(nothing written), 2 a bad option.")
    parser.add_argument("--model", required=True, help="generator checkpoint (path or s3:// URI)")
    parser.add_argument("--onnx", required=True, metavar="OUT", help="the ONNX file to write (path or s3:// URI)")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    parser.add_argument("--fp16", action="store_true",
                        help="float16 weights and arithmetic, float16 input and output (half the file size)")
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
    precision = "fp16" if args.fp16 else "fp32"
    try:
        data = export_onnx(model, size, args.opset, fp16=args.fp16)
        check = verify_onnx(data, model, check_inputs(model, size, args.check_image))
    except OnnxError as err:
        raise InputError(str(err)) from err
    shape = f"{size[0]}x{size[1]} inputs only" if size else "any batch, height and width"
    what = f"{type(model).__name__} x{model.scale}, {precision}, opset {args.opset}, {shape}"
    problem = _problem(check, args.fp16)
    if problem:
        print(f"raysr.export: {args.model} ({what}): {problem}; nothing written", file=sys.stderr)
        return EXIT_MISMATCH
    storage.write_bytes(args.onnx, data)
    checked = "random inputs" + (f" and {args.check_image}" if args.check_image else "")
    print(f"raysr.export: wrote {args.onnx} ({what}, {len(data) / 1e6:.1f} MB); max |onnxruntime - PyTorch fp32| = "
          f"{check.max_diff:.2g} on {checked} ({check.provider}){_fp16_note(check) if args.fp16 else ''}",
          file=sys.stderr)
    return 0


def _problem(check: Verification, fp16: bool) -> str:
    """Why the graph must not be written, or ""."""
    name, peak = check.peak
    if fp16 and peak > FP16_MAX:
        return (f"--fp16 refused: {name} reaches {peak:.3g} in PyTorch's float32 forward on the check inputs, beyond "
                f"float16's largest value {FP16_MAX:g}, so the float16 graph would give inf or NaN; export it without "
                "--fp16 (float32), or run the checkpoint itself with raysr.upscale --precision bf16")
    if not check.finite:
        return f"onnxruntime's output has inf or NaN ({check.provider}){'; export it without --fp16' if fp16 else ''}"
    tolerance = TOLERANCES["fp16" if fp16 else "fp32"]
    if check.max_diff > tolerance:
        return f"the ONNX graph differs from PyTorch by up to {check.max_diff:.3g} (> {tolerance:g}, {check.provider})"
    return ""


def _fp16_note(check: Verification) -> str:
    """What the float16 check covered: float16 arithmetic, or (where onnxruntime ran the graph's ops in
    float32) the graph, its float16 weights, input and output."""
    name, peak = check.peak
    headroom = f"PyTorch's largest float32 activation is {peak:.3g} ({name}), within float16's {FP16_MAX:g}"
    if check.casts_added:
        return (f"; this provider has no float16 kernel for some of the graph's ops and ran them in float32 "
                f"({check.casts_added} Casts added), so float16 arithmetic itself was not run here (where "
                f"onnxruntime-gpu sees a GPU the export runs the graph there); {headroom}")
    return f"; float16 arithmetic; {headroom}"


def main(argv: Sequence[str] | None = None) -> int:
    return cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
