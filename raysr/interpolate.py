"""ESRGAN network interpolation: ``python -m raysr.interpolate``.

    python -m raysr.interpolate --psnr psnr.pth --gan esrgan.pth --alpha 0.8 --output interp_08.pth

Writes θ = (1 − α)·θ_PSNR + α·θ_GAN (ESRGAN, sec. 3.4): α = 0 is the PSNR-oriented
network (smooth), α = 1 the GAN one (sharp, with artefacts); values between trade
one for the other without retraining. Both checkpoints must hold the same
architecture, in any layout :func:`raysr.generator_file.load_generator` reads. To
compare several α on images without saving checkpoints, use
``python -m raysr.upscale --model PSNR --model-b GAN --alpha 0 0.4 0.8 1``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from raysr import storage
from raysr.generator_file import SAVE_FORMATS, save_generator
from raysr.cli import InputError, check_model_scale, cli, load_model, mix_generators


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raysr.interpolate",
        description="ESRGAN network interpolation: theta = (1 - alpha) * theta_PSNR + alpha * theta_GAN.")
    parser.add_argument("--psnr", required=True, help="PSNR-oriented generator checkpoint (alpha = 0)")
    parser.add_argument("--gan", required=True, help="GAN-trained generator checkpoint (alpha = 1)")
    parser.add_argument("--alpha", type=float, required=True, help="weight of --gan, in [0, 1]")
    parser.add_argument("--output", required=True, help="checkpoint to write (path or s3:// URI)")
    parser.add_argument("--format", choices=SAVE_FORMATS, default="raysr",
                        help="raysr (records the architecture; default) or basicsr ({'params': ...})")
    parser.add_argument("--model-scale", type=int, default=None, metavar="N",
                        help="scale of checkpoints that do not record it (SRCNN/VDSR in BasicSR format)")
    return parser


def _run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.alpha <= 1.0:
        raise InputError(f"--alpha must be in [0, 1] (0 = --psnr, 1 = --gan), got {args.alpha}")
    check_model_scale(args.model_scale)
    psnr_net = load_model(args.psnr, "--psnr", rgb_only=False, scale=args.model_scale)
    gan_net = load_model(args.gan, "--gan", rgb_only=False, scale=args.model_scale)
    # replacing an input would lose the original weights; that is almost always a typo
    for option, source in (("--psnr", args.psnr), ("--gan", args.gan)):
        if source == args.output or (not storage.is_s3(source) and not storage.is_s3(args.output)
                                     and os.path.exists(args.output) and os.path.samefile(source, args.output)):
            raise InputError(f"--output {args.output} is the {option} checkpoint; write to a new file")
    mixed = mix_generators(psnr_net, gan_net, args.alpha, names=("--psnr", "--gan"))
    try:
        save_generator(mixed, args.output, fmt=args.format)
    except OSError as err:
        raise InputError(f"cannot write --output {args.output}: {err}") from err
    print(f"wrote {args.output}: (1 - {args.alpha:g}) * {args.psnr} + {args.alpha:g} * {args.gan}",
          file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
