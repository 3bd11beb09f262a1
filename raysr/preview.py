"""``python -m raysr.preview`` — the first (LR, HR) training pairs of a config, written as images. No Ray.

    python -m raysr.preview --preset realesrnet_x4plus --output preview/ --count 16 --seed 0
    python -m raysr.preview --preset realesrnet_x4plus --set degradation.noise_range=[1,10] --output quiet/

Reads the training data of the config (``--preset``/``--config``/``--set`` as ``raysr.train``; no
``data.train``: the demo shards, built where ``raysr.train`` builds them) and writes what the training
step of rank 0 would receive first — with ``data.num_workers: 0``, one worker and ``run.seed`` = ``--seed`` —
after every degradation, the pair pool included: ``lr_0000.png``, ``hr_0000.png``, … (8-bit PNG; hr is the
plain GT crop), ``pairs.json`` (each pair's drawn parameters: kernels, resizes, noise, JPEG qualities,
order, crop) and ``contact_sheet.png`` (each LR enlarged by nearest neighbour beside its HR). The same
seed gives the same files on the same device; CPU and GPU draw different noise. This is the way to check
``degradation.*`` settings before renting GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

from raysr.cli import InputError, add_config_args, cli, resolve_device
from raysr.config import Config, ConfigError, load_config
from raysr.data.stream import DEFAULT_SHUFFLE_BUFFER, iter_batches
from raysr.ops.convert import to_uint8
from raysr.storage import StorageError, is_s3, join
from raysr.util import say


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m raysr.preview", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--output", required=True, help="folder for lr_NNNN.png, hr_NNNN.png, pairs.json, "
                                                        "contact_sheet.png")
    parser.add_argument("--count", type=int, default=16, help="pairs to write (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="run.seed of the previewed training (default 0)")
    parser.add_argument("--device", default="cpu", help="auto, cpu (default) or cuda: where the degradations run")
    return parser


def training_data(cfg: Config) -> str | list[str]:
    """``data.train``, or the demo shards ``raysr.train`` uses when it is empty (built once, in
    ``<run.storage>/<run.name>/demo_data``)."""
    if cfg.data.train:
        return cfg.data.train
    from raysr.demo import build_demo_data
    storage = cfg.run.storage if is_s3(cfg.run.storage) else os.path.expanduser(cfg.run.storage)
    return build_demo_data(join(join(storage, cfg.run.name), "demo_data"))[0]


def preview_pairs(cfg: Config, count: int, device: torch.device):
    """The first ``count`` ``(lr, hr, params)`` of rank 0's training stream (one loader process,
    seed ``run.seed``), as :func:`raysr.train.train_loop_per_worker` makes them at step 0."""
    shards, batch_size = training_data(cfg), cfg.data.batch_size
    stream_args = dict(crops_per_image=cfg.data.crops_per_image, shuffle_buffer=DEFAULT_SHUFFLE_BUFFER,
                       resampled=True, rank=0, world_size=1)
    done = 0
    if cfg.realesrgan is None:
        for batch in iter_batches(shards, cfg.data.gt_size, cfg.scale, batch_size, cfg.run.seed, paired=cfg.paired,
                                  **stream_args):
            lr, hr = batch.lr, batch.hr  # finished in the loader (lr_here): what lr_on=device makes too
            for i in range(batch_size):
                yield lr[i], hr[i], {"degradation": cfg.data.degradation}
                done += 1
                if done == count:
                    return
    from raysr.degradation import training_pairs
    from raysr.degradation.regions import iter_region_batches
    pairs = training_pairs(cfg, device, rank=0, step=0)
    drawn: dict[int, dict] = {}
    for batch, (kernels, regions, params) in enumerate(
            iter_region_batches(shards, batch_size, cfg.realesrgan, cfg.run.seed, **stream_args)):
        ids = torch.arange(batch * batch_size, (batch + 1) * batch_size)
        for sample, p in zip(ids.tolist(), params):
            drawn[sample] = {"sample": sample, "batch": batch, **p}
        lr, hr, _, out_ids = pairs(kernels, regions, ids, params=[drawn[i] for i in ids.tolist()])
        for i, sample in enumerate(out_ids.tolist()):
            yield lr[i], hr[i], {"degradation": "realesrgan", "step": batch, **drawn[sample]}
            done += 1
            if done == count:
                return


def contact_sheet(pairs: list[tuple[np.ndarray, np.ndarray]], per_row: int = 4, gap: int = 4) -> np.ndarray:
    """``(H, W, 3)`` uint8: per pair, the LR enlarged (nearest neighbour) to the HR's size beside the HR."""
    size = pairs[0][1].shape[0]
    rows = -(-len(pairs) // per_row)
    cols = min(per_row, len(pairs))
    sheet = np.full((rows * (size + gap) + gap, cols * (2 * size + 2 * gap) + gap, 3), 255, np.uint8)
    for k, (lr, hr) in enumerate(pairs):
        factor = size // lr.shape[0]
        big = lr.repeat(factor, axis=0).repeat(factor, axis=1)
        top, left = gap + (k // per_row) * (size + gap), gap + (k % per_row) * (2 * size + 2 * gap)
        sheet[top:top + size, left:left + size] = big
        sheet[top:top + size, left + size + gap:left + 2 * size + gap] = hr
    return sheet


def write_preview(cfg: Config, output: str, count: int, device: torch.device) -> list[dict]:
    """Write the preview files of ``cfg`` into ``output``; returns the pairs' records (pairs.json)."""
    os.makedirs(output, exist_ok=True)
    records, images = [], []
    for index, (lr, hr, params) in enumerate(preview_pairs(cfg, count, device)):
        lr8, hr8 = to_uint8(lr), to_uint8(hr)
        names = {"lr": f"lr_{index:04d}.png", "hr": f"hr_{index:04d}.png"}
        Image.fromarray(lr8).save(os.path.join(output, names["lr"]))
        Image.fromarray(hr8).save(os.path.join(output, names["hr"]))
        records.append({"index": index, **names, **params})
        images.append((lr8, hr8))
    Image.fromarray(contact_sheet(images)).save(os.path.join(output, "contact_sheet.png"))
    summary = {"scale": cfg.scale, "gt_size": cfg.data.gt_size, "seed": cfg.run.seed, "device": str(device),
               "degradation": cfg.data.degradation, "pairs": records}
    with open(os.path.join(output, "pairs.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return records


def run(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise InputError(f"--count must be >= 1, got {args.count}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    try:
        cfg = load_config(args.preset, args.config, [*args.set, f"run.seed={args.seed}"])
        device = resolve_device(args.device)
        write_preview(cfg, args.output, args.count, device)
    except (ConfigError, StorageError, ValueError) as err:
        raise InputError(str(err)) from err
    say(f"raysr.preview: {args.count} {cfg.data.degradation} pairs (gt {cfg.data.gt_size}, x{cfg.scale}) in "
        f"{args.output}: lr_/hr_NNNN.png, pairs.json, contact_sheet.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
