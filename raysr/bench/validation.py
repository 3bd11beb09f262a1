"""What validation costs the training ranks: one ``raysr.train`` run validating inline, one async.

The baseline is ``run.validation=inline`` (BasicSR's way: rank 0 validates, every rank waits).

    python -m raysr.bench validation --json -- --set train.total_steps=120 --set run.val_every=40

Everything after ``--`` is a ``python -m raysr.train`` command line. Each run goes to ``--storage``
under a fresh name (nothing earlier is resumed or touched) and records every report. The figures:
``blocked_s``, the sum over reports of ``val_block_s`` (seconds the ranks waited for validation:
the whole validation inline, a weight copy async, plus the last step's wait for the validations
still running); ``validations`` done and ``skipped``; ``val_time_s``, the mean time of those the
reports carry; ``wall_s`` of each run; the PSNR of the final weights in each (the same when
training is deterministic: the same weights scored on the same images).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from raysr.bench import error
from raysr.bench.step import commit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", default=None, help="run.storage for the runs (default: a new temporary folder)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the raysr.train arguments")


def recorder(path: str):
    """A Ray Train callback appending rank 0's metrics of every report to ``path`` (it runs in
    Ray's controller actor, so results come back through a file)."""
    import ray.train

    class RecordReports(ray.train.UserCallback):  # local class: pickled by value for the controller
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps(metrics[0]) + "\n")

    return RecordReports()


def one_run(train_args: list[str], mode: str, storage: str) -> dict:
    """Train with ``run.validation=mode``; its figures, or raises ValueError with the reason."""
    from raysr import ray_setup, train

    name = f"bench_validation_{mode}_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}"
    argv = [*train_args, "--set", f"run.validation={mode}", "--set", f"run.storage={storage}",
            "--set", f"run.name={name}"]
    cfg = train.resolve(train.build_parser().parse_args(argv))
    ray_setup.init_ray()
    if mode == "async" and ray_setup.validation_for_local_ray(cfg).run.validation != "async":
        raise ValueError("the validation actor does not fit beside the workers on this machine: "
                         "lower run.validation_resources or run.num_workers")
    reports = os.path.join(storage, name + ".jsonl")
    start = time.perf_counter()
    result = train.fit(cfg, callbacks=[recorder(reports)])
    wall_s = time.perf_counter() - start
    if result is None or result.checkpoint is None:
        raise ValueError(f"the {mode} run failed (its error is printed above)")
    with open(reports) as f:
        metrics = [json.loads(line) for line in f]
    validations = [m for m in metrics if "val_step" in m]
    if not validations:
        raise ValueError("the run validated nowhere: set run.val_every below train.total_steps")
    final = max(validations, key=lambda m: m["val_step"])
    return {"mode": mode, "blocked_s": sum(m["val_block_s"] for m in metrics), "wall_s": wall_s,
            "validations": metrics[-1]["val_done"], "skipped": metrics[-1]["val_skipped"],
            "val_time_s": sum(m["val_time_s"] for m in validations) / len(validations),
            "final_step": final["val_step"], "final_psnr": final["psnr"], "steps": metrics[-1]["step"]}


def run(args: argparse.Namespace) -> int:
    from raysr.config import ConfigError
    from raysr.storage import StorageError

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    storage = args.storage or tempfile.mkdtemp(prefix="raysr_bench_validation_")
    runs = {}
    try:
        for mode in ("inline", "async"):
            runs[mode] = one_run(train_args, mode, storage)
    except (ConfigError, StorageError, ValueError) as err:
        return error("validation", str(err))
    inline, async_ = runs["inline"], runs["async"]
    for r in (inline, async_):
        print(f"{r['mode']:>6}: ranks blocked {r['blocked_s']:.2f} s by {r['validations']} validation(s) of "
              f"{r['val_time_s']:.2f} s each ({r['skipped']} skipped); {r['steps']} steps in {r['wall_s']:.1f} s; "
              f"final psnr {r['final_psnr']:.4f} at step {r['final_step']}")
    ratio = async_["blocked_s"] / inline["blocked_s"] if inline["blocked_s"] > 0 else float("nan")
    print(f"async blocks the ranks {ratio:.3f}x as long as inline; wall {async_['wall_s'] / inline['wall_s']:.3f}x")
    if args.json:
        import torch

        from raysr.bench.step import device_name
        device = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        print(json.dumps({"bench": "validation", "command": "python -m raysr.train " + " ".join(train_args),
                          "device": device, "commit": commit(), "inline": inline, "async": async_, "blocked_ratio": ratio,
                          "wall_ratio": async_["wall_s"] / inline["wall_s"]}))
    return 0
