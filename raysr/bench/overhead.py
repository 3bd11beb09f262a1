"""What Ray Train adds to a training step: the same step in a plain PyTorch loop and under Ray Train.

    python -m raysr.bench overhead --steps 200 --json

Both sides run :func:`raysr.engine.train_step` on the quick start's network (MSRResNet, 32
features, 4 blocks, x4) for ``--batch-size`` HR crops of ``--gt-size`` px on the CPU with one
torch thread, and close every ``--log-every`` steps with the :class:`raysr.runlog.Meter`
summary; under Ray Train (a TorchTrainer with one worker, as ``raysr.train`` runs) that
interval's metrics also go to ``ray.train.report``, as ``raysr.train`` reports every log
interval. Both are timed in steady state (after ``--warmup`` steps) by the median interval;
the plain loop runs before and after the Ray run and its two figures are averaged, so a
machine that speeds up or slows down meanwhile does not pass for overhead;
``overhead_frac`` = Ray step time / plain step time - 1. Worker start-up is reported apart
(``ray_startup_s``): it is paid once per run (and per restart), not per step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from raysr.bench import below_one, error
from raysr.bench.step import build, command_line, commit, hr_batches, report_final, start_ray, timed_steps
from raysr.config import load_config

# The quick start's generator: what most first runs (and the tests) train.
NETWORK = {"name": "srresnet", "variant": "msrresnet", "num_feat": 32, "num_block": 4, "scale": 4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=200, help="timed steps on each side")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first on each side")
    parser.add_argument("--log-every", type=int, default=20, help="steps per report (raysr.train's run.log_every)")
    parser.add_argument("--batch-size", type=int, default=8, help="HR crops per step")
    parser.add_argument("--gt-size", type=int, default=64, help="HR crop side in px")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


def overhead_config(args) -> dict:
    data = load_config(preset="quickstart").to_dict()
    data["model"]["generator"] = dict(NETWORK)
    data["data"].update(batch_size=args["batch_size"], gt_size=args["gt_size"], train=["unused"], val="unused")
    data["run"]["precision"] = "fp32"
    return data


def plain_loop(args: dict, report=None) -> dict:
    """The timed steps on the CPU with one torch thread; ``report(metrics)`` once per log interval."""
    from raysr.config import config_from_dict
    from raysr.data.stream import make_lr

    torch.set_num_threads(1)
    cfg = config_from_dict(overhead_config(args))
    device = torch.device("cpu")
    torch.manual_seed(0)
    state = build(cfg, device)
    batches = hr_batches(cfg, device)
    lrs = [make_lr(hr, cfg.scale) for hr in batches]  # the loader's work, outside both timings

    def next_batch(i):
        return lrs[i % len(lrs)], batches[i % len(batches)]

    timing = timed_steps(state, next_batch, args["steps"], args["warmup"], args["log_every"], report=report)
    timing.pop("metrics")
    return timing


def ray_worker(args: dict) -> None:
    """The Ray Train worker: the plain loop, reporting each interval's metrics as raysr.train does."""
    import ray.train

    from raysr.ray_setup import quiet_output

    quiet_output(False)
    started = time.time()
    timing = plain_loop(args, report=ray.train.report)
    report_final({**timing, "worker_started_at": started})


def measure_ray(args: dict) -> dict:
    import ray.train

    from raysr.ray_setup import torch_trainer

    start_ray()
    with tempfile.TemporaryDirectory(prefix="raysr_bench_") as storage:
        trainer = torch_trainer(
            ray_worker, train_loop_config=args,
            scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False),
            run_config=ray.train.RunConfig(name="bench_overhead", storage_path=storage,
                                           logging_config=ray.train.LoggingConfig(log_level="WARNING")))
        t = time.time()
        result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"the Ray Train run failed: {result.error}")
    m = dict(result.metrics)
    m["ray_startup_s"] = m["worker_started_at"] - t
    return m


def run(args: argparse.Namespace) -> int:
    problem = below_one(args, ("steps", "log_every", "batch_size", "gt_size"))
    if problem:
        return error("overhead", problem)
    if args.warmup < 0:
        return error("overhead", f"--warmup must be >= 0, got {args.warmup}")
    settings = {k: getattr(args, k) for k in ("steps", "warmup", "log_every", "batch_size", "gt_size")}
    saved = torch.get_num_threads()
    try:
        before = plain_loop(settings)
        try:
            under_ray = measure_ray(settings)
        except RuntimeError as err:
            return error("overhead", str(err))
        after = plain_loop(settings)
    finally:
        torch.set_num_threads(saved)
    plain = {k: (before[k] + after[k]) / 2 for k in ("step_ms", "mean_step_ms")}
    overhead = under_ray["step_ms"] / plain["step_ms"] - 1
    result = {"bench": "overhead", "command": command_line(args), "torch": torch.__version__, "commit": commit(),
              **settings, "plain_step_ms": plain["step_ms"],
              "plain_step_ms_before": before["step_ms"], "plain_step_ms_after": after["step_ms"],
              "ray_step_ms": under_ray["step_ms"],
              "plain_mean_step_ms": plain["mean_step_ms"], "ray_mean_step_ms": under_ray["mean_step_ms"],
              "ray_startup_s": under_ray["ray_startup_s"], "overhead_frac": overhead}
    print(f"MSRResNet-4 step, batch {args.batch_size} x {args.gt_size}^2, CPU, 1 thread, report every "
          f"{args.log_every} steps: plain PyTorch {plain['step_ms']:.2f} ms/step, under Ray Train "
          f"{under_ray['step_ms']:.2f} ms/step")
    print(f"Ray Train overhead: {100 * overhead:+.1f}% per step (worker start-up {under_ray['ray_startup_s']:.1f} s, "
          "once per run)")
    if args.json:
        print(json.dumps(result))
    return 0
