"""What every raysr command line shares: error handling and exit codes, console lines,
the config options of train/tune, the device flag and loading a generator named on the command line.

Exit codes: 0 success, 1 the work itself failed, 2 a bad input or option (nothing written).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from raysr import storage
from raysr.generator_file import interpolate, load_generator
from raysr.images import ImageError
from raysr.onnx_file import OnnxError, load_onnx_generator
from raysr.util import say
from raysr.weights import check_compatible

EXIT_BAD_INPUT = 2
DEVICES = ("auto", "cpu", "cuda")
# what a directory listing suggests when --model names a folder (a training run's generator.pth first)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".onnx")


def add_config_args(parser: argparse.ArgumentParser, what: str = "config") -> None:
    """``--preset`` | ``--config`` and repeatable ``--set KEY=VALUE`` (raysr.train, raysr.tune)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help=f"built-in {what} (default: quickstart)")
    source.add_argument("--config", help=f"YAML {what} file (e.g. best_config.yaml from raysr.tune)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set loss.adversarial.weight=1e-3 (repeatable)")


class InputError(Exception):
    """A problem with what the user passed (file, checkpoint, option); ``cli`` prints it
    and exits with code 2."""


class ScaleUnknownError(InputError):
    """The checkpoint does not record its upscaling factor (SRCNN / VDSR weights in
    BasicSR format, or an RRDBNet whose input channels are ambiguous): the user must give it."""


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


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]``, ``--workers``, ``--gpus-per-worker``, ``--verbose`` of the dataset tools (upscale,
    evaluate), which hand their stages to :mod:`raysr.batch_inference` with ``--ray``."""
    group = parser.add_argument_group("on a Ray cluster (Ray Data: CPU read/decode -> model on an actor pool "
                                      "-> CPU encode/write)")
    group.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run on Ray: alone = the cluster in RAY_ADDRESS (ray job submit) or a local Ray on "
                            "127.0.0.1; 'auto' or host:port = that cluster")
    group.add_argument("--workers", default=None, metavar="MIN,MAX",
                       help="model actors, autoscaled between MIN and MAX (default 1,<GPUs / --gpus-per-worker>, "
                            "1,1 without GPUs)")
    group.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                       help="GPUs per model actor, fractions share a GPU (default 1 where the cluster has GPUs, "
                            "else 0: CPU actors)")
    group.add_argument("--verbose", action="store_true", help="show Ray Data's own progress bars and logs")


def check_ray_args(args: argparse.Namespace) -> None:
    """InputError for Ray options without --ray, or malformed ones."""
    if args.ray is None:
        given = [flag for flag, value in (("--workers", args.workers), ("--gpus-per-worker", args.gpus_per_worker))
                 if value is not None]
        if given:
            raise InputError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only with --ray; "
                             "add --ray (local) or --ray auto")
        return
    if args.device != "auto":
        raise InputError("--device picks the single-process device; with --ray each model actor runs on the GPU(s) "
                         "of --gpus-per-worker (0 = CPU), so leave --device out")
    if args.workers is not None:
        parse_workers(args.workers)
    if args.gpus_per_worker is not None and not (math.isfinite(args.gpus_per_worker) and args.gpus_per_worker >= 0):
        raise InputError(f"--gpus-per-worker must be a number >= 0 (0 = CPU actors), got {args.gpus_per_worker}")


def parse_workers(text: str) -> tuple[int, int]:
    """``"2"`` -> (2, 2); ``"1,4"`` -> (1, 4); InputError otherwise."""
    parts = text.split(",")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        low, high = 0, -1
    if not 1 <= low <= high:
        raise InputError(f"--workers takes MIN,MAX (or N) with 1 <= MIN <= MAX, e.g. 1,4; got {text!r}")
    return low, high


def failure_reason(err: BaseException) -> str:
    """Why one input of a dataset job failed, for ``_failed.jsonl``: the message of raysr's own errors
    (which name the file), a hint for a GPU out of memory, else the exception's type and message."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "does not fit in GPU memory at once; pass --tile 512 (or smaller) to run it in tiles"
    if isinstance(err, (ImageError, storage.StorageError)):
        return str(err)
    return f"{type(err).__name__}: {err}"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an InputError."""
    if name not in DEVICES:
        raise InputError(f"--device must be one of {list(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but torch sees no CUDA GPU; use --device cpu (or auto)")
    return torch.device(name)


def check_model_scale(scale: int | None) -> None:
    """InputError unless ``--model-scale`` is absent or an integer >= 1."""
    if scale is not None and scale < 1:
        raise InputError(f"--model-scale must be an integer >= 1 (the checkpoint's upscaling factor), got {scale}")


def load_model(source: str, option: str = "--model", rgb_only: bool = True, scale: int | None = None,
               scale_option: str = "--model-scale") -> nn.Module:
    """The generator in checkpoint ``source`` (eval mode, CPU).

    option: the CLI flag that named ``source``, used in errors. scale: the upscaling
    factor, for checkpoints that do not record it (None: read it from the checkpoint).
    Raises InputError naming ``option`` and the reason if the file is missing, a
    directory, corrupt, of an unknown layout, or (``rgb_only``) not RGB -> RGB;
    :class:`ScaleUnknownError` naming ``scale_option`` if the scale must be given.
    """
    if not storage.is_s3(source):
        path = Path(source)
        if path.is_dir():
            found = sorted(p.name for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
            example = "generator.pth" if "generator.pth" in found or not found else found[0]
            listing = f"it holds {', '.join(found[:4])}{', ...' if len(found) > 4 else ''}" if found else \
                f"it holds no {'/'.join(CHECKPOINT_SUFFIXES)} file"
            raise InputError(f"{option} {source} is a directory; pass the checkpoint file in it, "
                             f"e.g. {path / example} ({listing})")
        if not path.is_file():
            raise InputError(f"{option} {source}: no such checkpoint file")
    if str(source).lower().endswith(".onnx"):
        try:
            return load_onnx_generator(source)
        except (OnnxError, storage.StorageError) as err:
            raise InputError(f"{option} {source}: {err}") from err
        except Exception as err:  # onnx's parser and onnxruntime raise their own classes for a bad file
            raise InputError(f"{option} {source}: not an ONNX file onnxruntime can run "
                             f"({type(err).__name__}: {err})") from err
    overrides = {"scale": scale} if scale is not None else {}
    try:
        model = load_generator(source, **overrides)
    except Exception as err:  # torch.load and the layout checks raise many classes; all mean "bad checkpoint"
        if scale is None and (arch := _arch_given_a_scale(source)):
            raise ScaleUnknownError(
                f"{option} {source}: these {arch} weights do not record the upscaling factor (SRCNN/VDSR "
                f"weights in BasicSR format never do); pass {scale_option} N, the factor the network was "
                "trained for") from err
        raise InputError(f"{option} {source}: cannot load a generator ({type(err).__name__}: {err})") from err
    config = getattr(model, "config", {})
    channels = (config.get("num_in_ch", 3), config.get("num_out_ch", 3))
    if rgb_only and channels != (3, 3):
        raise InputError(f"{option} {source}: the generator maps {channels[0]} to {channels[1]} channels; "
                         "raysr.upscale and raysr.evaluate run RGB -> RGB generators")
    return model


def _arch_given_a_scale(source: str) -> str | None:
    """The architecture name if ``source`` loads once a scale is given, else None."""
    try:
        # any factor the architectures accept: this only asks whether the scale was all that was missing
        return type(load_generator(source, scale=4)).__name__
    except Exception:  # still unreadable: the caller reports the original error
        return None


def mix_generators(model: nn.Module, model_b: nn.Module, alpha: float,
                   names: tuple[str, str] = ("--model", "--model-b")) -> nn.Module:
    """ESRGAN network interpolation (1 - alpha) * model + alpha * model_b
    (:func:`raysr.generator_file.interpolate`), with errors naming the CLI options ``names``."""
    hint = "ESRGAN interpolation mixes two trainings of one architecture, e.g. its PSNR and GAN stages"
    try:
        check_compatible(model.state_dict(), model_b.state_dict(), *names)
    except ValueError as err:
        raise InputError(f"{err}; {hint}") from err
    try:
        return interpolate(model, model_b, alpha)
    except ValueError as err:  # same tensors, different networks (e.g. SRCNN x2 and x4)
        raise InputError(f"{names[0]} and {names[1]}: {err}; {hint}") from err


