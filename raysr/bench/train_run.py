"""A real ``raysr.train`` run, timed by its own metrics: steady-state crops/s and ``data_wait_frac``.

    python -m raysr.bench train --json -- --preset esrgan_psnr_x4 --set train.total_steps=300 --set run.log_every=50

Everything after ``--`` is a ``python -m raysr.train`` command line (data, loader processes, LR on
the device: all as configured). The figures are those of the run's last log interval, read from
its final checkpoint's ``metrics.json``: by then the loader's start-up, the shuffle buffer's fill
and any compilation are over, and validation is not part of an interval's step time. The run goes
to ``--storage`` under a fresh name, so no earlier run is resumed or touched.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from raysr.bench import error
from raysr.bench.step import commit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", default=None, help="run.storage for the run (default: a new temporary folder)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the raysr.train arguments")


def run(args: argparse.Namespace) -> int:
    import tempfile

    from raysr import train
    from raysr.config import ConfigError
    from raysr.storage import StorageError
    from raysr.run_checkpoint import METRICS_FILE

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    storage = args.storage or tempfile.mkdtemp(prefix="raysr_bench_train_")
    name = f"bench_train_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}"
    argv = [*train_args, "--set", f"run.storage={storage}", "--set", f"run.name={name}"]
    try:
        cfg = train.resolve(train.build_parser().parse_args(argv))
    except (ConfigError, StorageError) as err:
        return error("train", str(err))
    start = time.perf_counter()
    result = train.fit(cfg)
    wall_s = time.perf_counter() - start
    if result is None or result.checkpoint is None:
        return error("train", "the training run failed (its error is printed above)")
    with result.checkpoint.as_directory() as d, open(os.path.join(d, METRICS_FILE)) as f:
        m = json.load(f)
    out = {"bench": "train", "command": "python -m raysr.train " + " ".join(train_args), "commit": commit(),
           "step": m["step"], "total_steps": cfg.train.total_steps, "num_workers": cfg.run.num_workers,
           "batch_size": cfg.data.batch_size, "gt_size": cfg.data.gt_size, "loader_workers": cfg.data.num_workers,
           "crops_per_image": cfg.data.crops_per_image, "lr_on": cfg.data.lr_on,
           "crops_per_s": m["crops_per_s"], "data_wait_frac": m["data_wait_frac"], "step_time_s": m["step_time_s"],
           "wall_s": wall_s}
    print(f"raysr.train, last interval: {out['crops_per_s']:.1f} crops/s, data_wait_frac {out['data_wait_frac']:.3f} "
          f"({cfg.data.num_workers} loader processes, {cfg.data.crops_per_image} crop(s)/image, LR on "
          f"{cfg.data.lr_on}); {wall_s:.0f} s in all")
    if args.json:
        print(json.dumps(out))
    return 0
