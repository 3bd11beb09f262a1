"""``python -m raysr.train`` — train an SR generator (PSNR phase) or an SRGAN/ESRGAN (GAN phase) on Ray Train.

    python -m raysr.train                                   # local demo: CPU, sample photos, a few minutes
    python -m raysr.train --preset esrgan_x4 --set data.train=s3://bucket/shards --set run.num_workers=8
    ray job submit -- python -m raysr.train --preset esrgan_psnr_x4 --set run.storage=s3://bucket/runs

Order of events: resolve and validate the config (exit 2 on any error, before
Ray starts) -> connect to Ray (RAY_ADDRESS / ``ray job submit``) or start a
local one on 127.0.0.1 -> TorchTrainer runs :func:`train_loop_per_worker` on
``run.num_workers`` workers (N, or elastic: [min, max]) -> each worker streams its
share of the shards, runs :func:`raysr.engine.train_step`, and reports metrics; rank 0 writes
checkpoints to ``<run.storage>/<run.name>`` and hands validations to an actor that scores them
while training goes on (:class:`ValidationQueue`). Re-running with the same
``run.name`` resumes from the latest checkpoint. ``train.init_from=psnr`` puts a
PSNR-phase run (``<run.name>_psnr``) before the GAN phase (:func:`fit_both_phases`).

The pieces the worker loop uses live beside it in their own modules: the step in
:mod:`raysr.engine`, the checkpoint layout in :mod:`raysr.run_checkpoint`, scoring in
:mod:`raysr.scoring` and :mod:`raysr.validation`, the progress line and TensorBoard in :mod:`raysr.runlog`.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time

from raysr import run_checkpoint
from raysr.cli import add_config_args, say
from raysr.config import (PSNR_PHASE, Config, ConfigError, available_presets, config_from_dict, load_config,
                          parse_override, set_key)
from raysr.storage import StorageError, is_s3, join, storage_args
from raysr.run_checkpoint import COMPARISON_FILE, GENERATOR_FILE, METRICS_FILE

PSNR_PREFIX = "psnr."  # --set psnr.KEY=VALUE: a key of the PSNR phase that train.init_from=psnr runs first


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raysr.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: " + ", ".join(available_presets()) + "\n"
               "keys: model.generator.*, model.discriminator.*, data.*, train.*, loss.*, optim.*, run.* "
               "(see README 'Configuration'; --dry-run prints them all)")
    add_config_args(parser)
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config, exit")
    return parser


def resolve(args: argparse.Namespace) -> Config:
    """The validated config for parsed arguments, data paths checked. Raises ConfigError/StorageError."""
    cfg = load_config(preset=args.preset, config_file=args.config, overrides=gan_and_psnr_overrides(args.set)[0])
    check_data_paths(cfg)
    check_perceptual_weights(cfg)
    return cfg


def check_perceptual_weights(cfg: Config) -> None:
    """Fetch the GAN phase's VGG19 weights before Ray starts (downloaded once into the torch hub cache,
    hash-checked), so an offline machine or a wrong file is one error here, not one per worker."""
    from raysr.models.vgg import resolve_vgg19_source

    perc = cfg.loss.perceptual
    if cfg.train.phase != "gan" or perc.weight <= 0:
        return
    try:
        resolve_vgg19_source(perc.weights_path)
    except FileNotFoundError as err:
        if not perc.allow_random_weights:
            raise ConfigError(f"loss.perceptual.weights_path: {err} (a GAN phase with random VGG features is "
                              "meaningless; loss.perceptual.allow_random_weights=true runs one for smoke tests)") from err
    except ValueError as err:
        raise ConfigError(f"loss.perceptual.weights_path: {err}") from err


def gan_and_psnr_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--set`` values split into the run's own and the ``psnr.``-prefixed ones, which apply to the
    PSNR phase of ``train.init_from=psnr`` only (prefix removed)."""
    psnr = [o[len(PSNR_PREFIX):] for o in overrides if o.startswith(PSNR_PREFIX)]
    return [o for o in overrides if not o.startswith(PSNR_PREFIX)], psnr


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
              "SRGAN and ESRGAN start from a PSNR-trained one (set train.init_from=<its generator.pth>, "
              "or train.init_from=psnr to train that first)", file=sys.stderr)
    if cfg.train.init_from == PSNR_PHASE:
        try:
            psnr_cfg = psnr_phase_config(cfg, gan_and_psnr_overrides(args.set)[1])
        except ConfigError as err:
            print(f"raysr.train: error: {err}", file=sys.stderr)
            return 2
        return 0 if fit_both_phases(psnr_cfg, cfg) is not None else 1
    result = fit(cfg)
    return 0 if result is not None else 1


# --------------------------------------------------------------------------- two phases in one command


def psnr_phase_config(gan: Config, overrides: list[str] = ()) -> Config:
    """The PSNR phase that ``train.init_from=psnr`` runs before ``gan``: the training, loss and
    optimiser settings of ``train.psnr_preset`` (else ``gan``'s own with ``train.phase=psnr``), with
    ``gan``'s generator, data and run sections, run name ``<name>_psnr``, then ``overrides``
    (the command's ``--set psnr.KEY=VALUE``). Raises ConfigError naming the key."""
    base = load_config(preset=gan.train.psnr_preset).to_dict() if gan.train.psnr_preset else gan.to_dict()
    ours = gan.to_dict()
    base["model"]["generator"], base["data"] = ours["model"]["generator"], ours["data"]
    base["run"] = {**ours["run"], "name": f"{gan.run.name}_psnr"}
    base["train"].update(phase="psnr", init_from=None, psnr_preset=None)
    for text in overrides:
        set_key(base, *parse_override(text))
    try:
        return config_from_dict(base)
    except ConfigError as err:
        raise ConfigError(f"the PSNR phase of train.init_from=psnr: {err} (set its keys with --set psnr.KEY=VALUE)")


def fit_both_phases(psnr_cfg: Config, gan_cfg: Config):
    """Run the PSNR phase (resuming it, or reusing it when it reached its last step), then the GAN
    phase from its EMA generator; returns the GAN run's Result, or None when a phase failed."""
    gan_cfg = prepare_demo_data(gan_cfg)  # both phases train on the same shards
    psnr_cfg = config_from_dict({**psnr_cfg.to_dict(), "data": gan_cfg.to_dict()["data"]})
    last = join(run_dir(psnr_cfg), f"checkpoint_{psnr_cfg.train.total_steps:08d}")
    generator = join(last, GENERATOR_FILE)
    if run_checkpoint.is_complete(last):  # not a folder an interrupted upload left half-written
        print(f"raysr: PSNR phase {psnr_cfg.run.name} is finished; the GAN phase starts from {generator}", flush=True)
    else:
        print(f"raysr: phase 1 of 2: PSNR phase {psnr_cfg.run.name} ({psnr_cfg.train.total_steps} steps), "
              f"then the GAN phase {gan_cfg.run.name}", flush=True)
        if fit(psnr_cfg) is None:
            return None
        print(f"raysr: phase 2 of 2: GAN phase {gan_cfg.run.name} from {generator}", flush=True)
    data = gan_cfg.to_dict()
    data["train"]["init_from"] = generator
    return fit(config_from_dict(data))


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
    global STARTED_LOCAL_RAY
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING, log_to_driver=True)
        STARTED_LOCAL_RAY = os.environ["RAY_ADDRESS"] == "local"  # a new instance of this process's own
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
    STARTED_LOCAL_RAY = True


# Whether init_ray started a Ray instance of its own (this machine only: its resources never grow).
STARTED_LOCAL_RAY = False


def make_trainer(cfg: Config, callbacks=(), storage: str | None = None, name: str | None = None):
    """The TorchTrainer for ``cfg`` (data already resolved; Ray already initialised).

    ``raysr.tune`` builds one per trial with its own name/storage and Tune's report callback.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = uses_gpu(cfg)
    if cfg.run.use_gpu == "auto" and not use_gpu and os.environ.get("RAY_ADDRESS"):
        print("raysr: warning: run.use_gpu=auto found no GPU in the cluster right now, so training runs on "
              "CPUs; on an autoscaling cluster whose GPU nodes start at zero, set run.use_gpu=true so Ray "
              "asks for GPU nodes", file=sys.stderr)
    cfg = validation_for_local_ray(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict()},
        scaling_config=scaling_config(cfg, use_gpu),
        run_config=ray.train.RunConfig(
            name=name or cfg.run.name,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
            **storage_args(storage or cfg.run.storage)),
    )


def uses_gpu(cfg: Config) -> bool:
    """Whether the run's workers take GPUs: ``run.use_gpu``, or with ``auto`` whether the cluster has
    any right now (Ray already initialised)."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0 if cfg.run.use_gpu == "auto" else cfg.run.use_gpu


def validation_for_local_ray(cfg: Config, other_cpus: float = 0.0) -> Config:
    """``cfg``, or ``cfg`` with ``run.validation=inline`` when this process started its own Ray
    (:func:`init_ray`: one machine, which never grows) and the validation actor cannot fit there
    beside the training workers and ``other_cpus`` (a Tune trial's driver): it would never be placed.
    """
    import ray

    if cfg.run.validation != "async" or not STARTED_LOCAL_RAY:
        return cfg
    have = ray.cluster_resources()
    need = dict(cfg.run.validation_resources)
    kind = "GPU" if uses_gpu(cfg) else "CPU"
    need[kind] = need.get(kind, 0.0) + cfg.run.max_workers
    need["CPU"] = need.get("CPU", 0.0) + other_cpus
    if all(have.get(k, 0.0) >= v for k, v in need.items()):
        return cfg
    spare = max(0.0, have.get("CPU", 0.0) - (need["CPU"] - cfg.run.validation_resources.get("CPU", 0.0)))
    say(f"raysr: the validation actor (run.validation_resources={cfg.run.validation_resources}) does not fit "
        f"beside {cfg.run.max_workers} worker(s) on this machine ({have.get('CPU', 0):g} CPUs, "
        f"{have.get('GPU', 0):g} GPUs), so rank 0 validates (run.validation=inline) and every worker waits for it; "
        f"set run.validation_resources={{CPU: {spare:g}}} (what is left here; 0 shares the workers' cores) "
        "to keep validation off the training path")
    data = cfg.to_dict()
    data["run"]["validation"] = "inline"
    return config_from_dict(data)


def scaling_config(cfg: Config, use_gpu: bool):
    """Ray's ScalingConfig: ``run.num_workers`` N, or elastic between [min, max] workers, Ray looking
    for capacity to grow every ``run.resize_monitor_interval_s``. A resize restarts the worker group
    from the latest checkpoint (losing the steps since); a lost node counts as one of
    ``run.max_failures``, after which the group goes on with the workers that are left."""
    import ray.train

    if not cfg.run.elastic:
        return ray.train.ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=use_gpu)
    return ray.train.ScalingConfig(num_workers=(cfg.run.min_workers, cfg.run.max_workers), use_gpu=use_gpu,
                                   elastic_resize_monitor_interval_s=cfg.run.resize_monitor_interval_s)


def describe_workers(run) -> str:
    """``2 worker(s)``, or ``1-4 workers (elastic)``, for the start line."""
    return f"{run.min_workers}-{run.max_workers} workers (elastic)" if run.elastic else f"{run.num_workers} worker(s)"


def fit(cfg: Config, callbacks=()):
    """Run (or resume) the training described by ``cfg``; returns Ray's Result, or None on failure."""
    quiet_output(cfg.run.verbose)
    init_ray()
    if not cfg.run.verbose:
        drop_ray_log_lines(NOISE_RAY_LINES)
    cfg = prepare_demo_data(cfg)
    trainer = make_trainer(cfg, callbacks)
    device = "GPU" if trainer.scaling_config.use_gpu else "CPU"
    print(f"raysr: run {cfg.run.name} -> {run_dir(cfg)} | {cfg.model.generator.name} x{cfg.scale}, "
          f"{cfg.train.phase} phase, {cfg.train.total_steps} steps, {describe_workers(cfg.run)} on {device}",
          flush=True)
    run_checkpoint.pop_divergence(run_dir(cfg))  # a rerun (resume) starts without the last one's verdict
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors; show the cause, not Ray's stack
        print(f"raysr: training failed: {err}", file=sys.stderr)
        return None
    diverged = run_checkpoint.pop_divergence(run_dir(cfg))
    if diverged is not None:
        print(divergence_message(cfg, diverged, result.checkpoint), file=sys.stderr)
        return None
    summarize(cfg, result)
    return result


def divergence_message(cfg: Config, m: dict, checkpoint) -> str:
    """What to say when train.max_nonfinite steps in a row had a NaN/inf loss or gradient
    (``m``: the metrics of that interval; ``checkpoint``: the run's latest, or None)."""
    losses = ", ".join(f"{k} {m[k]:.4g}" for k in ("loss_g", "loss_pix", "loss_percep", "loss_adv", "loss_d")
                       if k in m)
    last = f"the last checkpoint ({checkpoint.path})" if checkpoint is not None else \
        "no checkpoint was written yet, and"
    return (f"raysr: error: training diverged: {cfg.train.max_nonfinite} steps in a row had a NaN/inf loss or "
            f"gradient, up to step {m['diverged_at']} (interval means: {losses or 'none'}). Those steps updated "
            f"nothing and the run stopped, so {last} holds only finite weights: resume from it, or start a new "
            "run.name from its generator.pth (train.init_from). Try a lower learning rate (optim.g.lr, optim.d.lr), "
            "run.precision=fp32, or train.grad_clip")


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

    from raysr.data import make_train_loader
    from raysr.data.device_batches import DeviceBatches
    from raysr.data.loader import resolve_lr_on
    from raysr.engine import build_state, train_step
    from raysr.runlog import Meter, TensorBoard, progress_line, validation_line

    cfg = config_from_dict(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    quiet_output(cfg.run.verbose, rank)
    device = ray.train.torch.get_device()
    # The global batch is data.batch_size × max workers at every world size: rank r plays the
    # max workers' ranks r, r + world, ... (micro-batches of data.batch_size, gradients
    # accumulated), so fewer workers after a lost node change the step's time, not the optimisation.
    global_batch = cfg.data.batch_size * cfg.run.max_workers
    micro_batches = len(range(rank, cfg.run.max_workers, world))

    # ---- build: identical initial weights on every rank (DDP also broadcasts them)
    torch.manual_seed(cfg.run.seed)
    state = build_state(cfg, device, lambda module, has_bn: ddp(module, has_bn, world, device,
                                                                static_graph=world == cfg.run.max_workers))

    # ---- resume
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            run_checkpoint.restore(state, run_checkpoint.read_state(d, map_location=device))
        if rank == 0:
            say(f"raysr: resumed {cfg.run.name} at step {state.step} on {world} worker(s)"
                + (f" (global batch {global_batch}: up to {micro_batches} micro-batches of {cfg.data.batch_size} "
                   "per worker)" if cfg.run.elastic else ""))
    torch.manual_seed(cfg.run.seed + 1000 * rank + state.step)

    lr_on = resolve_lr_on(cfg.data.lr_on, device)
    loader = make_train_loader(
        cfg.data.train, gt_size=cfg.data.gt_size, scale=cfg.scale, batch_size=micro_batches * cfg.data.batch_size,
        rank=rank, world_size=world, num_workers=cfg.data.num_workers, seed=cfg.run.seed + state.step,
        crops_per_image=cfg.data.crops_per_image, lr_on=lr_on)
    batches = DeviceBatches(loader, device, cfg.scale, lr_on)
    if rank == 0:  # rank 0 has the validations done, logs and writes checkpoints
        validation = ValidationQueue(cfg, device, state.perceptual)
        board = TensorBoard(run_dir(cfg))
        latest_val, latest_comparison = {}, None  # the newest validation that has finished
    meter = Meter()
    checkpoint_block_s = 0.0
    # S3: raysr's upload, which fails loudly; local folders: Ray's own copy
    upload = functools.partial(upload_checkpoint, ctx.get_storage()) if is_s3(cfg.run.storage) else None

    # ---- step, report, checkpoint
    while state.step < cfg.train.total_steps:
        t_wait = time.perf_counter()
        lr, hr = batches.next()
        t_step = time.perf_counter()
        scalars = train_step(state, lr, hr, micro_batches=micro_batches, global_batch=global_batch)
        meter.add(scalars, batch=global_batch, wait=t_step - t_wait, total=time.perf_counter() - t_wait)

        step, last = state.step, state.step >= cfg.train.total_steps
        do_val = last or step % cfg.run.val_every == 0
        do_ckpt = last or step % cfg.run.checkpoint_every == 0
        if not (do_val or do_ckpt or step % cfg.run.log_every == 0):
            continue
        metrics = {"step": step, **meter.summary(), "skipped": batches.skipped(), "samples": batches.samples_seen(),
                   "checkpoint_block_s": checkpoint_block_s,  # the training ranks' wait at the last checkpoint
                   "world_size": world, "global_batch": global_batch}
        diverged_at = int(state.diverged_at)  # the same on every rank: the skip flag is all-reduced
        if diverged_at >= 0:  # stop before any validation or checkpoint of this interval
            metrics["diverged_at"] = diverged_at
            if rank == 0:
                say(progress_line(cfg.train.total_steps, metrics))
                run_checkpoint.write_divergence(run_dir(cfg), metrics)
                validation.close()
            ray.train.report(metrics)
            break
        if do_ckpt:  # replicas must hold identical weights; a drift here means DDP is broken
            metrics["g_fingerprint"] = weight_fingerprint(state.g_module)
        if rank == 0:
            # async: the snapshot is handed over and training goes on; results arrive at a later
            # report (the last one waits for every validation). val_block_s: rank 0's (so every
            # rank's) time in validation at this report.
            t_val = time.perf_counter()
            if do_val:
                validation.submit(step, state.g_eval)
            finished = validation.collect(wait=last)
            metrics.update(val_block_s=time.perf_counter() - t_val, val_skipped=validation.skipped,
                           val_done=validation.done)
            board.log(step, metrics, None)
            for val_metrics, comparison in finished:  # at the step of the weights they scored
                board.log(val_metrics["val_step"], val_metrics, comparison)
            for val_metrics, _ in finished[:-1]:  # the report carries the newest; the others get a line
                say(validation_line(val_metrics))
            if finished:
                latest_val, latest_comparison = finished[-1]
                metrics.update(latest_val)  # reported once: Tune sees each validation once
            say(progress_line(cfg.train.total_steps, metrics))
        if do_ckpt:
            # Written locally, then uploaded in the background (and the local copy deleted): the
            # ranks wait only for the local write. Ray registers a checkpoint once its upload is
            # complete, and a failed upload fails the report, so a resume never picks a half-uploaded one.
            t_ckpt = time.perf_counter()
            checkpoint = None
            if rank == 0:
                local = tempfile.mkdtemp(prefix="raysr_checkpoint_")
                run_checkpoint.write(local, state, {**metrics, **latest_val}, latest_comparison)
                board.flush()
                checkpoint = ray.train.Checkpoint.from_directory(local)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}",
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                             delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=upload)
            checkpoint_block_s = time.perf_counter() - t_ckpt
        else:
            ray.train.report(metrics)
        meter.reset_interval()
    batches.close()
    if rank == 0:
        validation.close()
        board.close()


class ValidationQueue:
    """Rank 0's validations: handed to a :class:`raysr.validation.Validator` in a Ray actor of
    their own (``run.validation=async``) or done in place (``inline``); their results come back
    through :meth:`collect`.

    async: :meth:`submit` copies the generator's weights to host memory and returns; the actor
    (``run.validation_resources``) scores one snapshot at a time while training goes on. A
    snapshot due while the actor is still busy waits; a newer one replaces it (counted in
    ``skipped``: the actor is slower than ``run.val_every`` steps of training). While the actor
    cannot be placed (no free resources yet), a due snapshot waits up to
    ``run.validation_wait_s``, then rank 0 scores it itself. Ray restarts an actor that dies (its
    node lost, its process killed) and retries its validation, ``VALIDATOR_RESTARTS`` times; after
    that rank 0 validates for the rest of the run. The actor is owned by rank 0's process, so it
    ends with it.
    """

    def __init__(self, cfg: Config, device, perceptual=None):
        self.cfg, self.device, self.perceptual = cfg, device, perceptual
        self.inline = cfg.run.validation == "inline"
        self.local = None  # the in-process Validator (inline, or while the actor is not there)
        self.actor = self.ready = None
        self.running = None  # (step, host weights, ObjectRef of the actor's (metrics, comparison))
        self.queued = None  # (step, host weights)
        self.finished: list[tuple[dict, bytes | None]] = []
        self.skipped = 0
        self.done = 0  # validations finished (each reaches TensorBoard; the newest at a report, the report too)
        self.warned: set[str] = set()
        if self.inline:
            self._in_process()
        else:
            self.actor, self.ready = self._start_actor()
        self.since = time.monotonic()

    def _start_actor(self):
        import ray

        from raysr.validation.validator import Validator

        resources = self.cfg.run.validation_resources
        options = {"num_cpus": resources.get("CPU", 0.0), "num_gpus": resources.get("GPU", 0.0),
                   "max_restarts": VALIDATOR_RESTARTS, "max_task_retries": VALIDATOR_RESTARTS}
        if "memory" in resources:
            options["memory"] = resources["memory"]
        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
        if custom:
            options["resources"] = custom
        actor = ray.remote(Validator).options(**options).remote(
            self.cfg, None, None, max(1, int(resources.get("CPU", 1))))
        return actor, actor.ready.remote()

    def submit(self, step: int, g) -> None:
        """Validate ``g`` (the generator as of training step ``step``): now when inline, else a
        host copy of its weights goes to the actor."""
        if self.inline:
            self.finished.append(self.local.score(step, g))
            return
        from raysr.weights import cpu_state_dict

        if self.queued is not None:
            self.skipped += 1
            busy = (f"still scoring step {self.running[0]}" if self.running else
                    "still starting (placed, then loading the validation images)")
            self._warn("busy", f"raysr: validation of step {self.queued[0]} skipped, step {step} is due and the "
                       f"validator is {busy}. If this goes on, validation takes longer than run.val_every="
                       f"{self.cfg.run.val_every} steps of training: give it more resources "
                       "(run.validation_resources, e.g. {GPU: 1}) or raise run.val_every (said once)")
        self.queued = (step, cpu_state_dict(g))
        self._advance(wait=False)

    def collect(self, wait: bool = False) -> list[tuple[dict, bytes | None]]:
        """The ``(metrics, comparison PNG)`` of validations finished since the last call, oldest
        first; ``wait``: of every one submitted (the end of a run)."""
        self._advance(wait)
        while wait and (self.running or self.queued):
            self._advance(wait)
        out, self.finished = self.finished, []
        self.done += len(out)
        return out

    def _advance(self, wait: bool) -> None:
        """Take the actor's result if it is done, then start (or, past the wait, score in place) the queued one."""
        import ray

        if self.running is not None:
            step, weights, ref = self.running
            if not ray.wait([ref], timeout=None if wait else 0)[0]:
                return
            self.running = None
            try:
                self.finished.append(ray.get(ref))
            except ray.exceptions.RayActorError as err:
                say(f"raysr: the validation actor died ({type(err).__name__}) after {VALIDATOR_RESTARTS} "
                    "restart(s); rank 0 validates for the rest of the run")
                self.inline = True
                self.finished.append(self._in_process().score_weights(step, weights))
        if self.queued is None:
            return
        step, weights = self.queued
        if not self.inline:
            remaining = self.cfg.run.validation_wait_s - (time.monotonic() - self.since)
            if ray.wait([self.ready], timeout=max(0.0, remaining) if wait else 0)[0]:
                ray.get(self.ready)  # raises the actor's own error if it could not be built
                self.running, self.queued = (step, weights, self.actor.score_weights.remote(step, weights)), None
                return
            if remaining > 0:
                return
            self._warn("placed", f"raysr: the validation actor ({self.cfg.run.validation_resources}) has not been "
                       f"placed after run.validation_wait_s={self.cfg.run.validation_wait_s:g} s; rank 0 validates "
                       "until it is. Free those resources, lower run.validation_resources, or set "
                       "run.validation=inline (said once)")
        self.queued = None
        self.finished.append(self._in_process().score_weights(step, weights))

    def _in_process(self):
        from raysr.validation.validator import Validator

        if self.local is None:
            self.local = Validator(self.cfg, self.device, self.perceptual)
        return self.local

    def _warn(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            say(message)

    def close(self) -> None:
        import ray

        if self.actor is not None:
            ray.kill(self.actor)
            self.actor = None


VALIDATOR_RESTARTS = 3  # Ray restarts of a validation actor that died (and retries of its validation)

UPLOAD_CHUNK_BYTES = 8 << 20


def upload_checkpoint(storage, checkpoint, dir_name: str):
    """Ray's ``checkpoint_upload_fn``: copy the local checkpoint folder into the run's storage
    (``storage``: Ray's StorageContext), one file at a time; return it as a ray.train.Checkpoint.

    Ray's default upload, ``pyarrow.fs.copy_files``, only logs an S3 part upload that failed
    (after its retries; "Error ignored when destroying file") and returns as if all went well, so
    Ray would register a checkpoint without that file. pyarrow's output stream raises the error
    on close instead: the report fails, and Ray restarts the workers from the last checkpoint it
    registered (run.max_failures), each of which therefore has all its files.
    """
    import ray.train

    fs, dest = storage.storage_filesystem, f"{storage.experiment_fs_path}/{dir_name}"
    fs.create_dir(dest)
    for name in sorted(os.listdir(checkpoint.path)):
        with open(os.path.join(checkpoint.path, name), "rb") as src, fs.open_output_stream(f"{dest}/{name}") as out:
            shutil.copyfileobj(src, out, UPLOAD_CHUNK_BYTES)
    return ray.train.Checkpoint(dest, filesystem=fs)


def ddp(module, has_batchnorm: bool, world: int, device, static_graph: bool = True):
    """``module`` wrapped for data-parallel training (as is on a single worker).

    BatchNorm statistics stay per replica (as BasicSR): syncing buffers every forward would
    also mix the real and fake batches' statistics of D. ``gradient_as_bucket_view``: gradients
    live in the all-reduce buckets (no copy, less memory). ``static_graph``: every parameter of
    the wrapped network gets its gradient in every backward, in the same order. That holds for G
    and D here: G's adversarial term runs D through ``TrainState.d_for_g`` (not this wrapper, D
    frozen), so freezing D never changes D's DDP graph; D runs twice (real, fake) before its one
    backward, which autograd sums into one gradient per parameter; G's forward under no_grad during
    D warm-up (``train.d_init_steps``) is invisible to DDP. A gloo run of both patterns gave
    bit-identical weights with and without it. ``static_graph`` is off where ranks accumulate
    micro-batches (an elastic run below its max workers): DDP's static graph fails on ``no_sync``
    (torch 2.13: "expect_autograd_hooks_ INTERNAL ASSERT FAILED"). Buckets stay at torch's 25 MB
    (first 1 MB): not measured on GPUs yet.
    """
    import torch

    if world == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=not has_batchnorm,
                                                     gradient_as_bucket_view=True, static_graph=static_graph)


def weight_fingerprint(module) -> float:
    """Sum of squared weights in float64: equal on every DDP replica of the same model."""
    import torch
    with torch.no_grad():
        return float(sum(p.double().pow(2).sum() for p in module.parameters()))


# Messages a raysr user cannot act on, silenced unless run.verbose: torch's DDP deprecation note
# (raysr passes the documented switch), the DataLoader's advice to use fewer processes than
# data.num_workers on a small box (which raysr's own data_wait_frac measures better).
NOISE_WARNINGS = (r"`broadcast_buffers` is deprecated", r"This DataLoader will create \d+ worker processes")
# INFO chatter: boto's "Found credentials in environment variables", Ray's token-auth notice.
NOISE_LOGGERS = ("botocore.credentials", "ray._private.authentication.authentication_token_setup")


# Lines Ray's processes log that say nothing to a raysr user: Ray Train's controller warns about
# its own PreemptionWatcher actor at every start.
NOISE_RAY_LINES = ("Actor with class name: 'PreemptionWatcher'",)


def drop_ray_log_lines(fragments: tuple[str, ...]) -> None:
    """Leave out of the driver's console the lines of Ray's processes that contain one of ``fragments``.

    Ray hands every batch of worker log lines to the handlers of one dispatcher; raysr wraps the
    one that prints them. That is Ray's internal API: with another Ray layout nothing is filtered.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        with dispatcher._lock:
            handlers = dispatcher.handlers
    except (ImportError, AttributeError):
        return
    for i, (name, handler) in enumerate(list(handlers)):
        if name != "ray_print_logs" or getattr(handler, "raysr_filtered", False):
            continue

        def filtered(data, print_lines=handler):
            lines = [line for line in data.get("lines", []) if not any(f in line for f in fragments)]
            if lines:
                print_lines({**data, "lines": lines})

        filtered.raysr_filtered = True
        handlers[i] = (name, filtered)


def quiet_output(verbose: bool, rank: int = 0) -> None:
    """Keep the console to what matters: known noise silenced, each Python warning once per run
    (rank 0 shows it; the other ranks would repeat it word for word). ``verbose`` shows everything."""
    import logging
    import warnings

    if verbose:
        return
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if rank > 0:
        warnings.simplefilter("ignore")
    for name in NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray Train logs every ``report`` call at INFO under a logger named after its file, outside
    # ``LoggingConfig``'s reach; one progress line per log interval is all a person needs.
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
