"""``python -m raysr.train`` — train an SR generator (PSNR phase) or an SRGAN/ESRGAN (GAN phase) on Ray Train.

    python -m raysr.train                                   # local demo: CPU, sample photos, a few minutes
    python -m raysr.train --preset esrgan_x4 --set data.train=s3://bucket/shards --set run.num_workers=8
    ray job submit -- python -m raysr.train --preset esrgan_psnr_x4 --set run.storage=s3://bucket/runs

Order of events: resolve and validate the config (exit 2 on any error, before
Ray starts) -> connect to Ray (RAY_ADDRESS / ``ray job submit``) or start a
local one on 127.0.0.1 -> TorchTrainer runs :func:`train_loop_per_worker` on
``run.num_workers`` workers -> each worker streams its share of the shards, runs
:func:`raysr.engine.train_step`, and reports metrics; rank 0 validates and
writes checkpoints to ``<run.storage>/<run.name>``. Re-running with the same
``run.name`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from raysr.config import Config, ConfigError, available_presets, config_from_dict, load_config
from raysr.data.validation import load_validation
from raysr.lpips import load_lpips
from raysr.io import StorageError, is_s3, join

STATE_FILE = "state.pt"
GENERATOR_FILE = "generator.pth"
METRICS_FILE = "metrics.json"
COMPARISON_FILE = "comparison.png"


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raysr.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: " + ", ".join(available_presets()) + "\n"
               "keys: model.generator.*, model.discriminator.*, data.*, train.*, loss.*, optim.*, run.* "
               "(see README 'Configuration'; --dry-run prints them all)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help="built-in config (default: quickstart)")
    source.add_argument("--config", help="YAML config file (e.g. best_config.yaml from raysr.tune)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set loss.adversarial.weight=1e-3 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config, exit")
    return parser


def resolve(args: argparse.Namespace) -> Config:
    """The validated config for parsed arguments, data paths checked. Raises ConfigError/StorageError."""
    cfg = load_config(preset=args.preset, config_file=args.config, overrides=args.set)
    check_data_paths(cfg)
    return cfg


def check_data_paths(cfg: Config) -> None:
    """Fail before Ray starts when the training or validation data cannot be found."""
    from raysr.data import check_train_shards, resolve_shards

    if cfg.data.train:
        try:
            urls = resolve_shards(cfg.data.train)
            check_train_shards(urls, cfg.data.gt_size)
        except (StorageError, ValueError, OSError) as err:
            raise ConfigError(f"data.train: {err}") from err
        if not urls:
            raise ConfigError(f"data.train: no .tar shards found in {cfg.data.train}; "
                              "make them with python -m raysr.data.make_shards")
    if cfg.data.val and not is_s3(cfg.data.val) and not os.path.exists(os.path.expanduser(cfg.data.val)):
        raise ConfigError(f"data.val: {cfg.data.val} does not exist")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve(args)
    except (ConfigError, StorageError) as err:
        print(f"raysr.train: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        return 0
    if cfg.train.phase == "gan" and not cfg.train.init_from:
        print("raysr: warning: train.init_from is not set, so the GAN starts from a random generator; "
              "SRGAN and ESRGAN start from a PSNR-trained one (set train.init_from=<its generator.pth>)",
              file=sys.stderr)
    result = fit(cfg)
    return 0 if result is not None else 1


# --------------------------------------------------------------------------- driver


def run_dir(cfg: Config) -> str:
    storage = cfg.run.storage if is_s3(cfg.run.storage) else os.path.expanduser(cfg.run.storage)
    return join(storage, cfg.run.name)


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (set by ``ray job submit``), else start a local Ray on loopback."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import logging

    import ray
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING, log_to_driver=True)
        return
    # A local instance binds to 127.0.0.1 only when Ray believes it is a single-machine install;
    # on Linux it otherwise listens on every interface. Ray reads this once, when first imported,
    # so set the variable (inherited by Ray's processes) and the already-read constant.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False
    # address="local": always a new instance, never one a stale /tmp/ray/ray_current_cluster names.
    # The dashboard (127.0.0.1:8265) also serves the state API that Ray Train's controller polls.
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=True)


def storage_args(storage: str) -> dict:
    """``RunConfig`` storage arguments for a local directory or s3://bucket/prefix.

    With AWS_ENDPOINT_URL (MinIO, Ceph, moto) Ray needs a pyarrow S3FileSystem
    and a ``bucket/prefix`` path; on AWS proper the s3:// URI works as is.
    """
    if not is_s3(storage):
        return {"storage_path": os.path.abspath(os.path.expanduser(storage))}
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {"storage_path": storage}
    import pyarrow.fs
    scheme, _, host = endpoint.partition("://")
    fs = pyarrow.fs.S3FileSystem(endpoint_override=host or scheme, scheme=scheme if host else "https",
                                 region=os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1")))
    return {"storage_path": storage[len("s3://"):].rstrip("/"), "storage_filesystem": fs}


def make_trainer(cfg: Config, callbacks=(), storage: str | None = None, name: str | None = None):
    """The TorchTrainer for ``cfg`` (data already resolved; Ray already initialised).

    ``raysr.tune`` builds one per trial with its own name/storage and Tune's report callback.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = cfg.run.use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        if not use_gpu and os.environ.get("RAY_ADDRESS"):
            print("raysr: warning: run.use_gpu=auto found no GPU in the cluster right now, so training runs on "
                  "CPUs; on an autoscaling cluster whose GPU nodes start at zero, set run.use_gpu=true so Ray "
                  "asks for GPU nodes", file=sys.stderr)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict()},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=bool(use_gpu)),
        run_config=ray.train.RunConfig(
            name=name or cfg.run.name,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
            **storage_args(storage or cfg.run.storage)),
    )


def fit(cfg: Config, callbacks=()):
    """Run (or resume) the training described by ``cfg``; returns Ray's Result, or None on failure."""
    init_ray()
    cfg = prepare_demo_data(cfg)
    trainer = make_trainer(cfg, callbacks)
    device = "GPU" if trainer.scaling_config.use_gpu else "CPU"
    print(f"raysr: run {cfg.run.name} -> {run_dir(cfg)} | {cfg.model.generator.name} x{cfg.scale}, "
          f"{cfg.train.phase} phase, {cfg.train.total_steps} steps, {cfg.run.num_workers} worker(s) on {device}",
          flush=True)
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors; show the cause, not Ray's stack
        print(f"raysr: training failed: {err}", file=sys.stderr)
        return None
    summarize(cfg, result)
    return result


def summarize(cfg: Config, result) -> None:
    m = result.metrics or {}
    print(f"raysr: finished {cfg.run.name} at step {m.get('step', '?')}/{cfg.train.total_steps}")
    if "psnr" in m:
        print(f"raysr: validation PSNR(Y) {m['psnr']:.2f} dB vs bicubic {m['psnr_bicubic']:.2f} dB "
              f"({m['psnr'] - m['psnr_bicubic']:+.2f} dB), SSIM(Y) {m['ssim']:.4f} vs {m['ssim_bicubic']:.4f}")
    if result.checkpoint is not None:
        where = result.checkpoint.path
        if is_s3(cfg.run.storage) and not where.startswith("s3://"):
            where = "s3://" + where
        print(f"raysr: generator  {join(where, GENERATOR_FILE)}  (params, params_ema as BasicSR; + architecture)")
        print(f"raysr: images     {join(where, COMPARISON_FILE)}  (bicubic | SR | HR)")
        print(f"raysr: metrics    {join(where, METRICS_FILE)}")
        print(f"raysr: upscale with  python -m raysr.upscale --model {join(where, GENERATOR_FILE)} "
              "--input IMAGES --output OUT")


def prepare_demo_data(cfg: Config) -> Config:
    """With no data.train, build demo shards from sample photographs into the run folder (once)."""
    if cfg.data.train and cfg.data.val:
        return cfg
    from raysr.demo import build_demo_data

    train_dir, val_dir = build_demo_data(join(run_dir(cfg), "demo_data"))
    data = cfg.to_dict()
    if not cfg.data.train:
        data["data"]["train"] = [train_dir]
    if not cfg.data.val:
        data["data"]["val"] = val_dir
    return config_from_dict(data)


# --------------------------------------------------------------------------- per worker


def train_loop_per_worker(loop_config: dict) -> None:
    """The body of every Ray Train worker: build, maybe resume, then step/report/checkpoint to the end."""
    import ray.train
    import ray.train.torch
    import torch

    from raysr.engine import build_state, train_step

    cfg = config_from_dict(loop_config["cfg"])
    quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (DDP also broadcasts them)

    def wrap(module, has_batchnorm):
        if world == 1:
            return module
        ids = [device.index] if device.type == "cuda" else None
        # BatchNorm statistics stay per replica (as BasicSR): syncing buffers every forward would
        # also mix the real and fake batches' statistics of D.
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                                         broadcast_buffers=not has_batchnorm)

    state = build_state(cfg, device, wrap)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state.load_state_dict(torch.load(Path(d, STATE_FILE), map_location=device, weights_only=True))
        if rank == 0:
            say(f"raysr: resumed {cfg.run.name} at step {state.step}")
    torch.manual_seed(cfg.run.seed + 1000 * rank + state.step)

    loader = TrainBatches(cfg, rank, world, seed=cfg.run.seed + state.step, device=device)
    val_set = load_validation(cfg.data.val, cfg.scale) if rank == 0 else None
    baseline = bicubic_baseline(val_set, cfg.scale) if rank == 0 else None
    lpips_fn = load_lpips(device=device)[0] if rank == 0 else None
    board = TensorBoard(run_dir(cfg)) if rank == 0 else None
    meter = Meter()
    while state.step < cfg.train.total_steps:
        t_wait = time.perf_counter()
        lr, hr = loader.next()
        t_step = time.perf_counter()
        scalars = train_step(state, lr, hr)
        meter.add(scalars, batch=lr.shape[0] * world, wait=t_step - t_wait, total=time.perf_counter() - t_wait)

        step, last = state.step, state.step >= cfg.train.total_steps
        do_val = last or step % cfg.run.val_every == 0
        do_ckpt = last or step % cfg.run.checkpoint_every == 0
        if not (do_val or do_ckpt or step % cfg.run.log_every == 0):
            continue
        metrics = {"step": step, **meter.summary(), "skipped": loader.skipped(),
                   "samples": loader.samples_seen()}
        if do_ckpt:  # replicas must hold identical weights; a drift here means DDP is broken
            metrics["g_fingerprint"] = weight_fingerprint(state.g_module)
        comparison = None
        if do_val and rank == 0:
            val_metrics, comparison = validate(state.g_eval, val_set, cfg.scale, device, state.perceptual, lpips_fn)
            metrics.update(val_metrics, **baseline)
        if rank == 0:
            say(progress_line(cfg, metrics))
            board.log(step, metrics, comparison)
        if do_ckpt:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    write_checkpoint(tmp, state, metrics, comparison)
                    board.flush()
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
                                 checkpoint_dir_name=f"checkpoint_{step:08d}")
        else:
            ray.train.report(metrics)
        meter.reset_interval()
    loader.close()
    if board is not None:
        board.close()


def weight_fingerprint(module) -> float:
    """Sum of squared weights in float64: equal on every DDP replica of the same model."""
    import torch
    with torch.no_grad():
        return float(sum(p.double().pow(2).sum() for p in module.parameters()))


def quiet_report_log() -> None:
    """Ray Train logs every ``report`` call at INFO under a logger named after its file,
    outside ``LoggingConfig``'s reach; one line per log interval is all a person needs."""
    import logging
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def say(line: str) -> None:
    """One line to the driver's console. Ray Train patches ``print`` on workers into its
    logger (which would print it twice); writing to stdout goes straight to the driver."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Meter:
    """Running means of step scalars over the current log interval, plus throughput."""

    def __init__(self):
        self.reset_interval()

    def reset_interval(self):
        self.sums: dict[str, float] = {}
        self.n = 0
        self.crops = 0
        self.wait = 0.0
        self.busy = 0.0

    def add(self, scalars: dict, batch: int, wait: float, total: float):
        for k, v in scalars.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        self.crops += batch
        self.wait += wait
        self.busy += total

    def summary(self) -> dict:
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}  # losses, D outputs, lr
        out["crops_per_s"] = self.crops / self.busy if self.busy else 0.0
        out["data_wait_frac"] = self.wait / self.busy if self.busy else 0.0
        out["step_time_s"] = self.busy / max(self.n, 1)
        return out


def progress_line(cfg: Config, m: dict) -> str:
    step, total = m["step"], cfg.train.total_steps
    remaining = (total - step) * m.get("step_time_s", 0.0)
    parts = [f"step {step}/{total}"]
    for key in ("loss_g", "loss_pix", "loss_percep", "loss_adv", "loss_d"):
        if key in m:
            parts.append(f"{key} {m[key]:.4g}")
    if "psnr" in m:
        parts.append(f"psnr {m['psnr']:.2f} (bicubic {m['psnr_bicubic']:.2f})")
    parts += [f"lr {m['lr']:.2e}", f"{m['crops_per_s']:.1f} crops/s", f"data {100 * m['data_wait_frac']:.0f}%",
              f"ETA {_duration(remaining)}"]
    if m.get("skipped"):
        parts.append(f"skipped {m['skipped']}")
    return "raysr: " + " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


# --------------------------------------------------------------------------- data, validation, checkpoints


class TrainBatches:
    """This rank's endless stream of (LR, HR) batches on ``device``, same count per rank per epoch."""

    def __init__(self, cfg: Config, rank: int, world: int, seed: int, device):
        from raysr.data import make_lr, make_train_loader

        self.cfg, self.device = cfg, device
        self._make_lr = make_lr
        self.loader = make_train_loader(
            cfg.data.train, gt_size=cfg.data.gt_size, scale=cfg.scale, batch_size=cfg.data.batch_size,
            rank=rank, world_size=world, num_workers=cfg.data.num_workers, seed=seed,
            crops_per_image=cfg.data.crops_per_image, lr_on=cfg.data.lr_on)
        self._it = iter(self.loader)

    def next(self):
        try:
            batch = next(self._it)
        except StopIteration:  # end of an epoch: the stream is resampled, start the next one
            self._it = iter(self.loader)
            batch = next(self._it)
        hr = batch[1].to(self.device, non_blocking=True)
        if self.cfg.data.lr_on == "device":
            return self._make_lr(hr, self.cfg.scale), hr
        return batch[0].to(self.device, non_blocking=True), hr

    def skipped(self) -> int:
        return int(self.loader.stats().get("skipped", 0))

    def samples_seen(self) -> int:
        return int(self.loader.stats().get("samples", 0))

    def close(self) -> None:
        """Stop the DataLoader worker processes."""
        self._it = None
        self.loader.close()


def bicubic_baseline(val_set, scale: int) -> dict:
    """psnr_bicubic/ssim_bicubic (Y, crop = scale) over ``val_set``: fixed for a run, so computed once."""
    from raysr.metrics import psnr, ssim
    from raysr.ops import imresize

    sums = {"psnr_bicubic": 0.0, "ssim_bicubic": 0.0}
    for i in range(len(val_set)):
        _, lr, hr = val_set[i]
        bicubic = imresize(lr, scale).clamp(0, 1)
        sums["psnr_bicubic"] += psnr(bicubic, hr, crop_border=scale, y_channel=True)
        sums["ssim_bicubic"] += ssim(bicubic, hr, crop_border=scale, y_channel=True)
    return {k: v / len(val_set) for k, v in sums.items()}


def validate(g, val_set, scale: int, device, perceptual=None, lpips_fn=None) -> tuple[dict, bytes | None]:
    """Validation metrics of ``g`` over ``val_set`` (full images, one at a time), plus a comparison PNG.

    psnr/ssim (Y, crop = scale) of SR; ``perceptual``: the configured VGG perceptual
    loss between SR and HR, when one is configured; ``lpips`` when LPIPS runs offline.
    The PNG shows the first image's centre (at most 256 px of HR) as bicubic | SR | HR.
    """
    import torch

    from raysr.metrics import psnr, ssim
    from raysr.ops import imresize

    was_training = g.training
    g.eval()
    sums: dict[str, float] = {}

    def add(key, value):
        sums[key] = sums.get(key, 0.0) + float(value)

    comparison = None
    with torch.no_grad():
        for i in range(len(val_set)):
            _, lr, hr = val_set[i]
            sr = g(lr[None].to(device)).float().clamp(0, 1)
            add("psnr", psnr(sr[0].cpu(), hr, crop_border=scale, y_channel=True))
            add("ssim", ssim(sr[0].cpu(), hr, crop_border=scale, y_channel=True))
            hr_dev = hr[None].to(device)
            if perceptual is not None:
                add("perceptual", perceptual(sr, hr_dev).item())
            if lpips_fn is not None:
                add("lpips", lpips_fn(sr, hr_dev)[0])
            if i == 0:
                comparison = comparison_png(imresize(lr, scale).clamp(0, 1), sr[0].cpu(), hr)
    g.train(was_training)
    return {k: v / len(val_set) for k, v in sums.items()}, comparison


def comparison_png(bicubic, sr, hr, size: int = 256) -> bytes:
    """PNG bytes of the centre ``size``² of three (3,H,W) [0,1] tensors side by side."""
    import io

    import torch
    from PIL import Image

    _, height, width = hr.shape
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    tiles = [t[:, top:top + size, left:left + size] for t in (bicubic, sr, hr)]
    row = torch.cat(tiles, dim=2).mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(row).save(buf, format="PNG")
    return buf.getvalue()


def write_checkpoint(directory: str, state, metrics: dict, comparison: bytes | None) -> None:
    """The four files of a checkpoint: full state, BasicSR-layout generator, metrics, comparison image."""
    import torch

    from raysr.checkpoint import save_generator

    torch.save(state.state_dict(), os.path.join(directory, STATE_FILE))
    # raysr's format is BasicSR's ("params", "params_ema") plus the architecture and its arguments,
    # so BasicSR reads it and raysr.upscale needs no --model-scale for SRCNN/VDSR.
    save_generator(state.g_module, os.path.join(directory, GENERATOR_FILE), fmt="raysr",
                   ema=state.ema.module if state.ema is not None else None)
    with open(os.path.join(directory, METRICS_FILE), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    if comparison is not None:
        with open(os.path.join(directory, COMPARISON_FILE), "wb") as f:
            f.write(comparison)


class TensorBoard:
    """Scalars and comparison images as TensorBoard events under ``<run>/tensorboard``.

    Uses tensorboardX (installed with ray) or torch's writer when tensorboard
    is installed; does nothing without either. For s3:// runs the events are
    written locally and uploaded at every checkpoint.
    """

    def __init__(self, run: str):
        self.remote = join(run, "tensorboard") if is_s3(run) else None
        self.local = tempfile.mkdtemp(prefix="raysr_tb_") if self.remote else os.path.join(run, "tensorboard")
        self.writer = None
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
        self.writer = SummaryWriter(self.local)

    def log(self, step: int, metrics: dict, comparison: bytes | None) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(key, value, step)
        if comparison is not None:
            import io

            import numpy as np
            from PIL import Image
            image = np.asarray(Image.open(io.BytesIO(comparison)))
            self.writer.add_image("val/bicubic_sr_hr", image, step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        if self.remote:
            from raysr.io import write_bytes
            for path in Path(self.local).rglob("*"):
                if path.is_file():
                    write_bytes(join(self.remote, str(path.relative_to(self.local))), path.read_bytes())

    def close(self) -> None:
        if self.writer is not None:
            self.flush()
            self.writer.close()
        if self.remote:  # the local copy of an s3:// run's events is uploaded; drop it
            shutil.rmtree(self.local, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
