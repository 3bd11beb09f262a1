"""``python -m raysr.train`` — train an SR generator (PSNR phase) or an SRGAN/ESRGAN (GAN phase) on Ray Train.

    python -m raysr.train                                   # local demo: CPU, sample photos, a few minutes
    python -m raysr.train --preset esrgan_x4 --set data.train=s3://bucket/shards --set run.num_workers=8
    ray job submit -- python -m raysr.train --preset esrgan_psnr_x4 --set run.storage=s3://bucket/runs

Order of events: resolve and validate the config (exit 2 on any error, before Ray starts) -> join
Ray (RAY_ADDRESS / ``ray job submit``) or start a local one on 127.0.0.1 -> a TorchTrainer runs
:func:`train_loop_per_worker` on ``run.num_workers`` workers (N, or elastic: [min, max]): each streams
its share of the shards, runs :func:`raysr.engine.train_step` and reports metrics; rank 0 writes
checkpoints to ``<run.storage>/<run.name>`` and hands validations to an actor that scores them while
training goes on. Re-running the same ``run.name`` resumes from its latest checkpoint; Ctrl-C checkpoints
the next step and exits 130 (:mod:`raysr.stop_request`); ``train.init_from=psnr`` runs a PSNR phase first.

Beside it: Ray start-up, the TorchTrainer, checkpoint upload and log filtering in :mod:`raysr.ray_setup`;
the step and DDP in :mod:`raysr.engine`; rank 0's duties in :mod:`raysr.rank_zero` (validations:
:mod:`raysr.validation.queue`); the checkpoint layout in :mod:`raysr.run_checkpoint`; logs in :mod:`raysr.runlog`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

from raysr import run_checkpoint
from raysr.cli import add_config_args
from raysr.config import (PSNR_PHASE, Config, ConfigError, available_presets, config_from_dict, load_config,
                          parse_override, set_key)
from raysr.data import check_train_shards, make_train_loader, resolve_shards
from raysr.models.vgg import resolve_vgg19_source
from raysr.ray_setup import (NOISE_RAY_LINES, describe_workers, drop_ray_log_lines, init_ray, make_trainer,
                             quiet_output, upload_checkpoint)
from raysr.run_checkpoint import COMPARISON_FILE, GENERATOR_FILE, METRICS_FILE
from raysr.stop_request import STOPPED_KEY, StopCheck, exit_status, fit_until_stopped, stopped
from raysr.storage import StorageError, is_s3, join
from raysr.trackers import resolve_settings

PSNR_PREFIX = "psnr."  # --set psnr.KEY=VALUE: a key of the PSNR phase that train.init_from=psnr runs first


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raysr.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: " + ", ".join(available_presets()) + "\n"
               "keys: model.generator.*, model.discriminator.*, data.*, train.*, loss.*, optim.*, run.* "
               "(see docs/configuration.md; --dry-run prints them all)")
    add_config_args(parser)
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config, exit")
    return parser


def resolve(args: argparse.Namespace) -> Config:
    """The config for parsed arguments: validated, data paths checked, trackers resolved. Raises ConfigError/StorageError."""
    cfg = load_config(preset=args.preset, config_file=args.config, overrides=gan_and_psnr_overrides(args.set)[0])
    check_data_paths(cfg)
    check_perceptual_weights(cfg)
    return resolve_settings(cfg)


def check_perceptual_weights(cfg: Config) -> None:
    """Fetch the GAN phase's VGG19 weights before Ray starts (downloaded once into the torch hub cache,
    hash-checked), so an offline machine or a wrong file is one error here, not one per worker."""
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
    if cfg.data.train:
        try:
            urls = resolve_shards(cfg.data.train)
            check_train_shards(urls, cfg.data.gt_size if cfg.realesrgan is None else 1,  # realesrgan pads small ones
                               paired_scale=cfg.scale if cfg.paired else None)
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
        return exit_status(fit_both_phases(psnr_cfg, cfg), argv)
    return exit_status(fit(cfg), argv)  # 130 (with the command that resumes) when Ctrl-C stopped it


# --------------------------------------------------------------------------- two phases in one command


def psnr_phase_config(gan: Config, overrides: list[str] = ()) -> Config:
    """The PSNR phase that ``train.init_from=psnr`` runs before ``gan``: the training, loss and
    optimiser settings of ``train.psnr_preset`` (else ``gan``'s own with ``train.phase=psnr``), with
    ``gan``'s generator, data, degradation and run sections, run name ``<name>_psnr``, then ``overrides``
    (the command's ``--set psnr.KEY=VALUE``). Raises ConfigError naming the key."""
    base = load_config(preset=gan.train.psnr_preset).to_dict() if gan.train.psnr_preset else gan.to_dict()
    ours = gan.to_dict()
    base["model"]["generator"] = ours["model"]["generator"]
    base.update(data=ours["data"], degradation=ours["degradation"], run={**ours["run"], "name": f"{gan.run.name}_psnr"})
    base["train"].update(phase="psnr", init_from=None, psnr_preset=None)
    for text in overrides:
        set_key(base, *parse_override(text))
    try:
        return config_from_dict(base)
    except ConfigError as err:
        raise ConfigError(f"the PSNR phase of train.init_from=psnr: {err} (set its keys with --set psnr.KEY=VALUE)")


def fit_both_phases(psnr_cfg: Config, gan_cfg: Config):
    """Run the PSNR phase (resuming it, or reusing it when it reached its last step), then the GAN phase
    from its EMA generator; returns the last run's Result (PSNR's if Ctrl-C stopped it), None if one failed."""
    gan_cfg = prepare_demo_data(gan_cfg)  # both phases train on the same shards
    psnr_cfg = config_from_dict({**psnr_cfg.to_dict(), "data": gan_cfg.to_dict()["data"]})
    generator = join(run_dir(psnr_cfg), run_checkpoint.folder_name(psnr_cfg.train.total_steps), GENERATOR_FILE)
    if run_checkpoint.finished(run_dir(psnr_cfg), psnr_cfg.train.total_steps) is not None:
        print(f"raysr: PSNR phase {psnr_cfg.run.name} is finished; the GAN phase starts from {generator}", flush=True)
    else:
        print(f"raysr: phase 1 of 2: PSNR phase {psnr_cfg.run.name} ({psnr_cfg.train.total_steps} steps), "
              f"then the GAN phase {gan_cfg.run.name}", flush=True)
        if (psnr := fit(psnr_cfg)) is None or stopped(psnr):  # Ctrl-C: the same command resumes the PSNR phase
            return psnr
        print(f"raysr: phase 2 of 2: GAN phase {gan_cfg.run.name} from {generator}", flush=True)
    data = gan_cfg.to_dict()
    data["train"]["init_from"] = generator
    return fit(config_from_dict(data))


# --------------------------------------------------------------------------- driver


def run_dir(cfg: Config) -> str:
    storage = cfg.run.storage if is_s3(cfg.run.storage) else os.path.expanduser(cfg.run.storage)
    return join(storage, cfg.run.name)


def fit(cfg: Config, callbacks=()):
    """Run (or resume) the training described by ``cfg``; returns Ray's Result, or None on failure. A rerun
    of a run that reached ``train.total_steps`` starts no worker group: its last checkpoint answers."""
    if (done := run_checkpoint.finished(run_dir(cfg), cfg.train.total_steps)) is not None:
        print(f"raysr: run {cfg.run.name} reached its last step before: nothing to train (raise train.total_steps "
              "to train on, or set another run.name for a new run)", flush=True)
        summarize(cfg, done)
        return done
    quiet_output(cfg.run.verbose)
    init_ray()
    if not cfg.run.verbose:
        drop_ray_log_lines(NOISE_RAY_LINES)
    cfg = prepare_demo_data(cfg)
    trainer = make_trainer(cfg, train_loop_per_worker, callbacks)
    device = "GPU" if trainer.scaling_config.use_gpu else "CPU"
    print(f"raysr: run {cfg.run.name} -> {run_dir(cfg)} | {cfg.model.generator.name} x{cfg.scale}, {cfg.train.phase} "
          f"phase, {cfg.train.total_steps} steps, {describe_workers(cfg.run)} on {device}", flush=True)
    run_checkpoint.pop_divergence(run_dir(cfg))  # a rerun (resume) starts without the last one's verdict
    try:
        result = fit_until_stopped(trainer)  # Ctrl-C: the workers checkpoint the next step and stop
    except Exception as err:  # Ray wraps worker errors; show the cause, not Ray's stack
        print(f"raysr: training failed: {err}", file=sys.stderr)
        return None
    if (diverged := run_checkpoint.pop_divergence(run_dir(cfg))) is not None:
        print(f"raysr: error: {run_checkpoint.divergence_message(cfg, diverged, result.checkpoint)}", file=sys.stderr)
        return None
    summarize(cfg, result)
    return result


def summarize(cfg: Config, result) -> None:
    m, ended = result.metrics or {}, "stopped" if stopped(result) else "finished"
    print(f"raysr: {ended} {cfg.run.name} at step {m.get('step', '?')}/{cfg.train.total_steps}")
    if "psnr" in m:
        print(f"raysr: validation PSNR(Y) {m['psnr']:.2f} dB vs bicubic {m['psnr_bicubic']:.2f} dB "
              f"({m['psnr'] - m['psnr_bicubic']:+.2f} dB), SSIM(Y) {m['ssim']:.4f} vs {m['ssim_bicubic']:.4f}")
    if result.checkpoint is not None:
        where = result.checkpoint.path
        where = "s3://" + where if is_s3(cfg.run.storage) and not where.startswith("s3://") else where
        print(f"raysr: generator  {join(where, GENERATOR_FILE)}  (params, params_ema as BasicSR; + architecture)")
        if "val_step" in m:  # a comparison image comes with a finished validation
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
    """The body of every Ray Train worker, in the order of events: build, resume, then step -> report ->
    validate -> checkpoint to the last step. ``lead``: rank 0's duties (:mod:`raysr.rank_zero`)."""
    import ray.train.torch  # and ray.train
    import torch

    from raysr.data import DeviceBatches, resolve_lr_on
    from raysr.degradation import training_pairs
    from raysr.engine import build_state, ddp, train_step, weight_fingerprint
    from raysr.rank_zero import OtherRank, RankZero
    from raysr.runlog import Meter

    cfg = config_from_dict(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    quiet_output(cfg.run.verbose, rank)
    device = ray.train.torch.get_device()
    # Global batch = data.batch_size × max workers at every world size: rank r plays the max workers' ranks
    # r, r + world, ... (micro-batches, gradients accumulated): fewer workers change step time, not the optimisation.
    global_batch = cfg.data.batch_size * cfg.run.max_workers
    micro_batches = len(range(rank, cfg.run.max_workers, world))

    # ---- build: identical initial weights on every rank (DDP also broadcasts them)
    torch.manual_seed(cfg.run.seed)
    state = build_state(cfg, device, lambda module, has_bn: ddp(module, has_bn, world, device,
                                                                static_graph=world == cfg.run.max_workers))

    # ---- resume: from the latest checkpoint Ray registered (a restart, a resize, a rerun of run.name). Same world
    # size: each rank continues exactly (`mine`: its RNGs, data position, degradation state); else reseeded at step.
    checkpoint, mine = ray.train.get_checkpoint(), {}
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            mine = run_checkpoint.restore(state, run_checkpoint.read_state(d, map_location=device), rank, world) or {}
    if not mine:
        torch.manual_seed(cfg.run.seed + 1000 * rank + state.step)
    lr_on = resolve_lr_on(cfg.data.lr_on, device)
    loader = make_train_loader(
        cfg.data.train, gt_size=cfg.data.gt_size, scale=cfg.scale, batch_size=micro_batches * cfg.data.batch_size,
        rank=rank, world_size=world, num_workers=cfg.data.num_workers, crops_per_image=cfg.data.crops_per_image,
        lr_on=lr_on, degradation=cfg.realesrgan, paired=cfg.paired,
        **mine.get("data", {"seed": cfg.run.seed + state.step}))
    batches = DeviceBatches(loader, device, cfg.scale, lr_on,
                            training_pairs(cfg, device, rank, state.step, mine.get("degradation")))
    lead = RankZero(cfg, run_dir(cfg), device, state.perceptual) if rank == 0 else OtherRank()
    if checkpoint is not None:
        lead.say(f"raysr: resumed {cfg.run.name} at step {state.step} on {world} worker(s)"
                 + (f" (global batch {global_batch}: up to {micro_batches} micro-batches of {cfg.data.batch_size} "
                    "per worker)" if cfg.run.elastic else ""))
    meter, checkpoint_block_s, stop, stopping = Meter(), 0.0, StopCheck(rank, world), False
    upload = functools.partial(upload_checkpoint, ctx.get_storage()) if is_s3(cfg.run.storage) else None

    while state.step < cfg.train.total_steps and not stopping:
        # ---- step
        t_wait = time.perf_counter()
        lr, hr, hr_usm = batches.next()
        t_step = time.perf_counter()
        scalars = train_step(state, lr, hr, micro_batches=micro_batches, global_batch=global_batch, hr_usm=hr_usm)
        meter.add(scalars, batch=global_batch, wait=t_step - t_wait, total=time.perf_counter() - t_wait)
        step, last = state.step, state.step >= cfg.train.total_steps
        stopping = stop.requested() and not last  # the driver's Ctrl-C, on every rank alike: checkpoint, end
        do_val = last or step % cfg.run.val_every == 0
        do_ckpt = last or stopping or step % cfg.run.checkpoint_every == 0
        if not (do_val or do_ckpt or step % cfg.run.log_every == 0):
            continue

        # ---- report: every rank calls ray.train.report once per interval (it is a barrier)
        metrics = {"step": step, **meter.summary(), "skipped": batches.skipped(), "samples": batches.samples_seen(),
                   "checkpoint_block_s": checkpoint_block_s,  # the training ranks' wait at the last checkpoint
                   "world_size": world, "global_batch": global_batch}
        diverged_at = int(state.diverged_at)  # the same on every rank: the skip flag is all-reduced
        if diverged_at >= 0:  # stop before any validation or checkpoint of this interval
            metrics["diverged_at"] = diverged_at
            lead.diverged(metrics)
            ray.train.report(metrics)
            break
        if do_ckpt:  # replicas must hold identical weights; a drift here means DDP is broken
            metrics.update(g_fingerprint=weight_fingerprint(state.g_module), **{STOPPED_KEY: 1} if stopping else {})

        # ---- validate (rank 0; the validations finished by now join its metrics), then log the interval
        lead.validate_and_log(step, state.g_eval if do_val else None, metrics, wait=last)

        # ---- checkpoint
        if do_ckpt:
            # Every rank's RNGs and data position gathered, written locally by rank 0 (the ranks wait for that only),
            # uploaded in the background (S3: by raysr, failing loudly), deleted; Ray registers it once uploaded.
            t_ckpt = time.perf_counter()
            state.ranks = run_checkpoint.gather_rank_states(device, loader.position(), batches.degrade)
            ray.train.report(metrics, checkpoint=lead.checkpoint(state, metrics),
                             checkpoint_dir_name=run_checkpoint.folder_name(step),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                             delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=upload)
            checkpoint_block_s = time.perf_counter() - t_ckpt
        else:
            ray.train.report(metrics)
        meter.reset_interval()
    batches.close()
    lead.close()


if __name__ == "__main__":
    sys.exit(main())
