"""Training-step throughput (crops/s, MFU) beside a BasicSR-style fp32 eager baseline measured in the same run.

    python -m raysr.bench step --model rrdbnet --phase gan --batch-size 16 --gt-size 128 --baseline --json
    python -m raysr.bench step --model msrresnet --phase psnr --compile default
    python -m raysr.bench step --model rrdbnet --phase gan --workers 8        # DDP scaling on one node

Ours: the real :func:`raysr.engine.train_step` with the config's fast path (on CUDA: bf16
autocast, channels_last, TF32, cudnn.benchmark, fused Adam; ``--compile``), on HR batches
resident on the device with LR made there every step (``data.lr_on: device``), losses read
once per interval as :class:`raysr.runlog.Meter` does in ``raysr.train``.

Baseline (``--baseline``), the same networks and losses the way BasicSR runs them: fp32
(no TF32), NCHW, eager, torch's default (foreach) Adam, every loss read on the host after each
step (BasicSR's ``reduce_loss_dict``), and LR made per crop on the CPU with a NumPy port of
MATLAB's ``imresize`` (:func:`raysr.bench.imresize.numpy_imresize`). That LR is made before the
clock starts, as if loader processes had made it for free; its per-crop cost is reported
apart (``baseline_lr_ms_per_crop``), so ``speedup_vs_baseline`` is a step-for-step ratio
that never counts BasicSR's data path against it.

Steady state: ``--warmup`` steps first (compilation, cudnn autotuning, allocator growth),
then ``--steps`` timed in intervals of ``--interval`` steps (each ending with one device sync);
``step_ms`` is the median interval's time per step, so a stray stall on a shared machine does
not move it. ``flops_per_crop`` is torch's FlopCounterMode over one real eager step (forward and
backward of G, D and VGG as the step runs them), per HR crop; ``mfu`` = achieved FLOP/s over
the device's dense bf16 peak (:data:`PEAK_TFLOPS`, ``--peak-tflops`` overrides; none on CPU).

With ``--set data.degradation=realesrgan`` it also times Real-ESRGAN's degradations of one batch
(:func:`measure_degradation`) and reports their share of a step that includes them.

``--workers N`` runs the same step N-way data-parallel through Ray Train (DDP, one device per
worker, each worker its own ``--batch-size``) and beside it on one worker, and reports the
scaling efficiency: N-worker crops/s over N x one-worker crops/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from raysr.bench import below_one, error
from raysr.bench.imresize import numpy_imresize
from raysr.config import ConfigError, config_from_dict, load_config, parse_override, set_key

# --model: (PSNR-phase preset, GAN-phase preset, generator section). The GAN phase takes its losses
# and D from the GAN preset and the generator from the PSNR one (MSRResNet-16 is BasicSR's
# train_MSRResNet_x4 network, trained with the ESRGAN PSNR settings).
MODELS = {
    "rrdbnet": ("esrgan_psnr_x4", "esrgan_x4", None),
    "msrresnet": ("esrgan_psnr_x4", "esrgan_x4",
                  {"name": "srresnet", "variant": "msrresnet", "num_feat": 64, "num_block": 16, "scale": 4}),
    "srresnet": ("srresnet_x4", "srgan_x4", None),
    "vdsr": ("vdsr_x4", "esrgan_x4", None),
    "srcnn": ("srcnn_x4", "esrgan_x4", None),
}

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity), matched in
# this order against torch.cuda.get_device_name().
PEAK_TFLOPS = (
    (r"H100.*PCIe", 756.0), (r"H100.*NVL", 835.0), (r"H100|H200|H800|GH200", 989.0),
    (r"A100|A800", 312.0), (r"A10G", 125.0), (r"\bL4\b", 121.0),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=tuple(MODELS), default="rrdbnet", help="generator (default rrdbnet)")
    parser.add_argument("--phase", choices=("psnr", "gan"), default="gan", help="PSNR phase (G alone) or GAN (G+D+VGG)")
    parser.add_argument("--batch-size", type=int, default=16, help="HR crops per step (per worker)")
    parser.add_argument("--gt-size", type=int, default=128, help="HR crop side in px")
    parser.add_argument("--compile", choices=("off", "default", "max-autotune-no-cudagraphs"), default="off",
                        help="run.compile for ours")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="run.precision for ours (auto: bf16 + channels_last on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before (compilation, autotuning)")
    parser.add_argument("--interval", type=int, default=10, help="steps per timed interval (one sync each)")
    parser.add_argument("--baseline", action="store_true", help="also measure the BasicSR-style fp32 eager step")
    parser.add_argument("--workers", type=int, default=1, help="N > 1: N-way DDP through Ray Train vs one worker")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for mfu (default: table)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override on top of the model's preset, e.g. model.generator.num_block=2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


# --------------------------------------------------------------------------- configs


def bench_config(args: argparse.Namespace):
    """The training config the bench runs: the model's preset for the phase, the command's sizes and switches."""
    psnr_preset, gan_preset, generator = MODELS[args.model]
    data = load_config(preset=gan_preset if args.phase == "gan" else psnr_preset).to_dict()
    data["model"]["generator"] = generator or load_config(preset=psnr_preset).to_dict()["model"]["generator"]
    data["data"].update(batch_size=args.batch_size, gt_size=args.gt_size, train=["unused"], val="unused")
    data["train"].update(phase=args.phase, init_from=None, psnr_preset=None, d_init_steps=0)
    data["run"].update(precision=args.precision, compile=args.compile)
    # The VGG's weights do not change its speed: ImageNet's when cached, else random, never a download.
    data["loss"]["perceptual"]["allow_random_weights"] = True
    for text in args.set:
        set_key(data, *parse_override(text))
    return config_from_dict(data)


def baseline_config(cfg):
    """``cfg`` the way BasicSR runs it: fp32 without TF32, NCHW, eager, torch's default Adam."""
    data = cfg.to_dict()
    data["run"].update(precision="fp32", compile="off", tf32=False, cudnn_benchmark=True)  # BasicSR sets benchmark
    data["optim"]["fused"] = False
    return config_from_dict(data)


# --------------------------------------------------------------------------- measuring


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} but torch sees no CUDA GPU; use --device cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: the step bench runs on cpu or cuda")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hr_batches(cfg, device: torch.device, count: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """``count`` distinct (N,3,gt,gt) HR batches in [0,1] on ``device``: smooth random images
    (upsampled noise; content does not change a step's cost)."""
    g = torch.Generator().manual_seed(seed)
    n, size = cfg.data.batch_size, cfg.data.gt_size
    out = []
    for _ in range(count):
        low = torch.rand(n, 3, max(1, size // 8), max(1, size // 8), generator=g)
        hr = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
        out.append(hr.clamp(0, 1).to(device))
    return out


def lr_made_on_device(cfg, device: torch.device, seed: int):
    """``next_batch(i) -> (lr, hr)`` as ours runs: HR batches resident on ``device`` (:func:`hr_batches`),
    LR made there from them at every step (``data.lr_on: device``)."""
    from raysr.data.stream import make_lr

    batches = hr_batches(cfg, device, seed=seed)

    def next_batch(i):
        hr = batches[i % len(batches)]
        return make_lr(hr, cfg.scale), hr

    return next_batch


@contextmanager
def _quiet_random_vgg():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*randomly initialised VGG19 weights.*")
        yield


def build(cfg, device: torch.device, wrap=None):
    from raysr.engine import build_state
    with _quiet_random_vgg():
        return build_state(cfg, device) if wrap is None else build_state(cfg, device, wrap)


def timed_steps(state, next_batch, steps: int, warmup: int, interval: int, host_reads: bool = False,
                report=None) -> dict:
    """Run ``warmup`` then ``steps`` training steps; time them in intervals of ``interval`` steps.

    ``next_batch(i) -> (lr, hr)`` on the step's device. Each interval ends as one of
    ``raysr.train``'s log intervals does: the :class:`raysr.runlog.Meter` summary (one host read
    of the interval's losses, which waits for the device) and ``report(metrics)`` when given.
    ``host_reads``: read every scalar after every step instead (BasicSR's logging).
    Returns ``first_step_s`` (compilation included), ``step_ms`` (median interval, per step),
    ``mean_step_ms`` and the step's last interval metrics.
    """
    from raysr.engine import train_step
    from raysr.runlog import Meter

    device = next(state.g_module.parameters()).device
    meter = Meter()
    t0 = time.perf_counter()
    for i in range(max(warmup, 1)):
        scalars = train_step(state, *next_batch(i))
        if i == 0:
            meter.add(scalars, 0, 0.0, 0.0)
            meter.summary()  # waits for the first step: compilation and autotuning end here
            first_step_s = time.perf_counter() - t0
    meter.reset_interval()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, metrics = [], {}
    start = time.perf_counter()
    for i in range(steps):
        t = time.perf_counter()
        lr, hr = next_batch(warmup + i)
        scalars = train_step(state, lr, hr)
        if host_reads:
            scalars = {k: float(v) for k, v in scalars.items()}
        meter.add(scalars, lr.shape[0], 0.0, time.perf_counter() - t)
        if (i + 1) % interval == 0 or i + 1 == steps:
            metrics = meter.summary()
            if report is not None:
                report(metrics)
            now = time.perf_counter()
            times.append((now - start) / meter.n)
            start = now
            meter.reset_interval()
    return {"first_step_s": first_step_s, "step_ms": 1e3 * statistics.median(times),
            "mean_step_ms": 1e3 * statistics.fmean(times), "intervals": len(times), "metrics": metrics}


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of the last measurement: CUDA's max allocated, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def flops_per_crop(cfg, device: torch.device, batch: torch.Tensor) -> float:
    """FLOPs of one real eager step per HR crop (torch's FlopCounterMode: forward and backward of
    every matmul/convolution the step runs; elementwise ops and the optimizer are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from raysr.data.stream import make_lr
    from raysr.engine import train_step

    data = cfg.to_dict()
    data["run"]["compile"] = "off"  # same arithmetic, and FlopCounterMode sees every op
    state = build(config_from_dict(data), device)
    lr = make_lr(batch, cfg.scale)
    with FlopCounterMode(display=False) as counter:
        train_step(state, lr, batch)
    del state
    return counter.get_total_flops() / batch.shape[0]


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The device's dense bf16 peak: ``override``, else :data:`PEAK_TFLOPS` for a known GPU, else None."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    return next((peak for pattern, peak in PEAK_TFLOPS if re.search(pattern, name)), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def measure_ours(cfg, device: torch.device, args) -> dict:
    torch.manual_seed(args.seed)
    next_batch = lr_made_on_device(cfg, device, seed=args.seed)
    state = build(cfg, device)
    timing = timed_steps(state, next_batch, args.steps, args.warmup, args.interval)
    timing["peak_mem_gb"] = peak_memory_gb(device)
    del state
    return timing


def measure_degradation(cfg, device: torch.device, args) -> float:
    """Median ms of one batch through :class:`raysr.degradation.TrainingPairs` (``data.degradation:
    realesrgan``): ``batch_size`` regions of ``degradation.crop_pad_size`` px from the CPU, as the loader
    ships them, with kernels drawn as it draws them → the chain, the pool, the USM target. ``--warmup``
    batches first, then ``--steps`` timed one by one (a device sync before and after each)."""
    import numpy as np

    from raysr.degradation import TrainingPairs
    from raysr.degradation.kernels import draw_kernels

    opts, n, size = cfg.realesrgan, cfg.data.batch_size, cfg.realesrgan.crop_pad_size
    rng = np.random.default_rng(args.seed)
    kernels = torch.from_numpy(np.stack([draw_kernels(rng, opts)[0] for _ in range(n)]))
    low = torch.rand(n, 3, size // 8, size // 8, generator=torch.Generator().manual_seed(args.seed))
    regions = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic").clamp(0, 1)
    pairs = TrainingPairs(opts, cfg.scale, cfg.data.gt_size, device, seed=args.seed)
    times = []
    for i in range(args.warmup + args.steps):
        synchronize(device)
        start = time.perf_counter()
        pairs(kernels, regions)
        synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure_baseline(cfg, device: torch.device, args) -> dict:
    """The BasicSR-style step (see the module docstring); LR per crop by numpy imresize, on the CPU."""
    torch.manual_seed(args.seed)
    batches = [hr.cpu() for hr in hr_batches(cfg, device, seed=args.seed)]
    t = time.perf_counter()
    lrs = [torch.from_numpy(np.stack([numpy_imresize(crop.double().numpy(), 1.0 / cfg.scale) for crop in hr]))
           .float() for hr in batches]
    lr_ms_per_crop = 1e3 * (time.perf_counter() - t) / sum(hr.shape[0] for hr in batches)
    state = build(baseline_config(cfg), device)

    def next_batch(i):  # BasicSR's feed_data: the loader's CPU tensors copied to the device each step
        return lrs[i % len(lrs)].to(device), batches[i % len(batches)].to(device)

    timing = timed_steps(state, next_batch, args.steps, args.warmup, args.interval, host_reads=True)
    timing["peak_mem_gb"] = peak_memory_gb(device)
    timing["lr_ms_per_crop"] = lr_ms_per_crop
    del state
    return timing


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- N-way DDP through Ray Train


def ddp_worker(config: dict) -> None:
    """A Ray Train worker of ``--workers``: the timed steps under DDP, reported once at the end."""
    import ray.train
    import ray.train.torch

    from raysr.engine import ddp
    from raysr.ray_setup import quiet_output

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    quiet_output(False, rank)
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"])
    state = build(cfg, device, lambda module, has_bn: ddp(module, has_bn, world, device))
    next_batch = lr_made_on_device(cfg, device, seed=config["seed"] + rank)
    timing = timed_steps(state, next_batch, config["steps"], config["warmup"], config["interval"])
    timing.pop("metrics")
    report_final({**timing, "world_size": world, "peak_mem_gb": peak_memory_gb(device)})


def report_final(metrics: dict) -> None:
    """A bench worker's last ``ray.train.report``, with a checkpoint (rank 0's): Ray Train's
    ``Result.metrics`` holds the metrics of the latest checkpoint, not of the latest report."""
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory(prefix="raysr_bench_") as local:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            Path(local, "metrics.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(local)
        ray.train.report(metrics, checkpoint=checkpoint)


def measure_ddp(cfg, args, workers: int, use_gpu: bool) -> dict:
    """``ddp_worker`` on ``workers`` Ray Train workers; rank 0's timing (DDP steps in lockstep)."""
    import tempfile

    import ray.train

    from raysr.ray_setup import torch_trainer

    with tempfile.TemporaryDirectory(prefix="raysr_bench_") as storage:
        trainer = torch_trainer(
            ddp_worker,
            train_loop_config={"cfg": cfg.to_dict(), "steps": args.steps, "warmup": args.warmup,
                               "interval": args.interval, "seed": args.seed},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            run_config=ray.train.RunConfig(name=f"bench_step_{workers}w", storage_path=storage,
                                           logging_config=ray.train.LoggingConfig(log_level="WARNING")))
        result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"the {workers}-worker run failed: {result.error}")
    m = result.metrics
    m["crops_per_s"] = 1e3 * workers * cfg.data.batch_size / m["step_ms"]
    return m


# --------------------------------------------------------------------------- command


def _check_args(args: argparse.Namespace) -> str:
    """What is wrong with the command line, or ""."""
    problem = below_one(args, ("batch_size", "gt_size", "steps", "interval", "workers"))
    if problem:
        return problem
    if args.warmup < 0:
        return f"--warmup must be >= 0, got {args.warmup}"
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        return f"--peak-tflops must be > 0, got {args.peak_tflops}"
    return ""


def run(args: argparse.Namespace) -> int:
    from raysr.engine import uses_bf16

    problem = _check_args(args)
    if problem:
        return error("step", problem)
    os.environ.setdefault("RAYSR_OFFLINE", "1")  # a benchmark never downloads: cached VGG or random
    try:
        device = resolve_device(args.device)
        cfg = bench_config(args)
    except (ValueError, ConfigError) as err:
        return error("step", str(err))
    if args.workers > 1:
        return run_scaling(args, cfg, device)

    ours = measure_ours(cfg, device, args)
    _release(device)
    degradation_ms = measure_degradation(cfg, device, args) if cfg.realesrgan is not None else None
    flops = flops_per_crop(cfg, device, hr_batches(cfg, device, count=1, seed=args.seed)[0])
    _release(device)
    baseline = measure_baseline(cfg, device, args) if args.baseline else None
    _release(device)

    crops_per_s = 1e3 * cfg.data.batch_size / ours["step_ms"]
    tflops = flops * crops_per_s / 1e12
    peak = peak_tflops(device, args.peak_tflops)
    result = {
        "bench": "step", "model": args.model, "phase": args.phase, "generator": cfg.model.generator.name,
        "num_block": cfg.model.generator.num_block, "batch_size": cfg.data.batch_size, "gt_size": cfg.data.gt_size,
        "scale": cfg.scale, "compile": cfg.run.compile,
        "precision": "bf16" if uses_bf16(device, cfg.run.precision) else "fp32",
        "device": device_name(device), "torch": torch.__version__, "commit": commit(),
        "command": command_line(args),
        "steps": args.steps, "warmup": args.warmup,
        "crops_per_s": crops_per_s, "step_ms": ours["step_ms"], "mean_step_ms": ours["mean_step_ms"],
        "first_step_s": ours["first_step_s"], "peak_mem_gb": ours["peak_mem_gb"],
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        "flops_per_crop": flops, "tflops": tflops, "peak_tflops": peak, "mfu": tflops / peak if peak else None,
    }
    if degradation_ms is not None:  # data.degradation=realesrgan: the chain's share of a step with it
        result.update(degradation_ms=degradation_ms,
                      degradation_share=degradation_ms / (degradation_ms + ours["step_ms"]))
    if baseline is not None:
        result.update(baseline_crops_per_s=1e3 * cfg.data.batch_size / baseline["step_ms"],
                      baseline_step_ms=baseline["step_ms"], baseline_peak_mem_gb=baseline["peak_mem_gb"],
                      baseline_lr_ms_per_crop=baseline["lr_ms_per_crop"],
                      speedup_vs_baseline=baseline["step_ms"] / ours["step_ms"])
    print_step(result)
    if args.json:
        print(json.dumps(result))
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (``python -m raysr.bench`` sets ``args.argv``), for the results file."""
    import shlex
    return "python -m raysr.bench " + shlex.join(getattr(args, "argv", None) or ["step"])


def print_step(r: dict) -> None:
    gen = f"{r['generator']}-{r['num_block']}" if r["generator"] in ("rrdbnet", "srresnet", "vdsr") else r["generator"]
    print(f"device: {r['device']}, torch {r['torch']}, commit {r['commit']}")
    print(f"{gen} {r['phase']} step, batch {r['batch_size']} x {r['gt_size']}^2 (x{r['scale']}), "
          f"{r['precision']}, compile {r['compile']}: {r['crops_per_s']:.1f} crops/s, {r['step_ms']:.1f} ms/step "
          f"(first step {r['first_step_s']:.1f} s), peak memory {r['peak_mem_gb']:.2f} GB")
    mfu = f", MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f}" if r["mfu"] is not None else " (no peak for MFU)"
    print(f"{r['flops_per_crop'] / 1e9:.1f} GFLOP per crop -> {r['tflops']:.2f} TFLOP/s{mfu}")
    if "degradation_ms" in r:
        print(f"Real-ESRGAN degradations (data.degradation=realesrgan, not in the step above): "
              f"{r['degradation_ms']:.1f} ms/batch, {100 * r['degradation_share']:.1f}% of step + degradations")
    if "speedup_vs_baseline" in r:
        print(f"BasicSR-style baseline (fp32 NCHW eager, host reads, numpy LR {r['baseline_lr_ms_per_crop']:.1f} "
              f"ms/crop not timed): {r['baseline_crops_per_s']:.1f} crops/s, {r['baseline_step_ms']:.1f} ms/step")
        print(f"speed-up vs baseline: {r['speedup_vs_baseline']:.2f}x")


def start_ray() -> None:
    """Ray as ``raysr.train`` starts it (RAY_ADDRESS, else local on 127.0.0.1), with its noise silenced."""
    from raysr.ray_setup import NOISE_RAY_LINES, drop_ray_log_lines, init_ray, quiet_output

    quiet_output(False)
    init_ray()
    drop_ray_log_lines(NOISE_RAY_LINES)


def run_scaling(args: argparse.Namespace, cfg, device: torch.device) -> int:
    use_gpu = device.type == "cuda"
    start_ray()
    import ray
    have = ray.cluster_resources().get("GPU" if use_gpu else "CPU", 0)
    if have < args.workers:
        return error("step", f"--workers {args.workers} needs {args.workers} {'GPUs' if use_gpu else 'CPUs'}; "
                      f"the Ray cluster has {have:g}")
    try:
        one = measure_ddp(cfg, args, 1, use_gpu)
        many = measure_ddp(cfg, args, args.workers, use_gpu)
    except RuntimeError as err:
        return error("step", str(err))
    efficiency = many["crops_per_s"] / (args.workers * one["crops_per_s"])
    result = {"bench": "step", "model": args.model, "phase": args.phase, "workers": args.workers,
              "command": command_line(args),
              "batch_size": cfg.data.batch_size, "gt_size": cfg.data.gt_size, "compile": cfg.run.compile,
              "device": device_name(device) if use_gpu else "cpu", "torch": torch.__version__, "commit": commit(),
              "crops_per_s_1": one["crops_per_s"], "step_ms_1": one["step_ms"],
              "crops_per_s": many["crops_per_s"], "step_ms": many["step_ms"], "peak_mem_gb": many["peak_mem_gb"],
              "scaling_efficiency": efficiency}
    print(f"{args.model} {args.phase} step, batch {cfg.data.batch_size} per worker: 1 worker {one['crops_per_s']:.1f} "
          f"crops/s; {args.workers} workers (DDP) {many['crops_per_s']:.1f} crops/s; scaling efficiency "
          f"{100 * efficiency:.0f}%")
    if args.json:
        print(json.dumps(result))
    return 0
