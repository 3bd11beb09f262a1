"""The ``python -m raysr.tune`` command line: resolve and check a search before Ray starts, build
(or restore) the Tuner, run it, report. The order of events is :func:`main`'s."""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml
from ray import tune

import raysr.tune
from raysr.cli import EXIT_BAD_INPUT, add_config_args
from raysr.config import ConfigError, PSNR_PHASE, config_from_dict, load_yaml
from raysr.storage import is_s3, join, read_bytes, storage_args, write_bytes
from raysr.ray_setup import init_ray, validation_for_local_ray
from raysr.train import prepare_demo_data, resolve
from raysr.tune.report import RUNS_DIR, check_metric, metric_mode, write_report
from raysr.tune.space import SPACE_EXAMPLE, SearchSpace, check_space, load_space, trial_config
from raysr.tune.trial import (TRIAL_DRIVER_CPUS, TrialProgress, asha_schedule, run_trial, trial_dirname,
                              trial_resources)
from raysr.util import say

SPACE_FILE = "search.yaml"  # the base config, space and settings a search was started with
DEFAULT_NUM_SAMPLES = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raysr.tune", description=raysr.tune.__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="space files map config keys to distributions, e.g.\n" + SPACE_EXAMPLE +
               "\n(loguniform/uniform: [low, high]; randint: [low, high] inclusive; choice/grid: [values])")
    parser.add_argument("--space", required=True, help="search space YAML, e.g. tune_spaces/esrgan.yaml")
    add_config_args(parser, what="base config")
    parser.add_argument("--num-samples", type=int, metavar="N",
                        help=f"trials to sample (default {DEFAULT_NUM_SAMPLES}; with a grid: passes over the grid, "
                             "default 1)")
    parser.add_argument("--scheduler", choices=("asha", "none"), default="asha",
                        help="asha: stop weak trials early at validation steps (default); none: run all to the end")
    parser.add_argument("--search", choices=("random", "optuna"), default="random",
                        help="random sampling (default) or Optuna's TPE (pip install optuna)")
    parser.add_argument("--metric", default="psnr",
                        help="validation metric that ranks trials: psnr (default), ssim, perceptual, lpips")
    parser.add_argument("--mode", choices=("min", "max"), help="default: max for psnr/ssim, min for perceptual/lpips")
    parser.add_argument("--name", help="search name, a folder under run.storage "
                                       "(default: <run.name>_tune_<space file name>)")
    parser.add_argument("--max-concurrent", type=int, metavar="N",
                        help="trials at once (default: what the cluster's GPUs/CPUs fit now; raise it on an "
                             "autoscaling cluster)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the search of the same name (same command line), or start it")
    return parser


@dataclass
class Search:
    """Everything a search is started with; saved as ``search.yaml`` and checked on --resume."""

    name: str
    base: dict  # the resolved base config, data paths included
    space: SearchSpace
    metric: str
    mode: str
    scheduler: str
    algorithm: str
    num_samples: int
    max_concurrent: int | None

    @property
    def storage(self) -> str:
        storage = self.base["run"]["storage"]
        return storage if is_s3(storage) else os.path.abspath(os.path.expanduser(storage))

    @property
    def folder(self) -> str:
        return join(self.storage, self.name)

    @property
    def expected_trials(self) -> int:
        """Trials the search runs in all: samples, times every combination of the grid keys."""
        return self.num_samples * math.prod(len(d.values) for d in self.space.dims if d.dist == "grid")

    def spec(self) -> dict:
        return {"base": self.base, "space": self.space.raw, "metric": self.metric, "mode": self.mode,
                "scheduler": self.scheduler, "search": self.algorithm, "num_samples": self.num_samples}


def prepare(args: argparse.Namespace) -> Search:
    """Resolve and check everything a search needs, without Ray. Raises ConfigError/StorageError."""
    cfg = resolve(args)
    if cfg.train.init_from == PSNR_PHASE:
        raise ConfigError("train.init_from=psnr: a search does not run the PSNR phase for its trials; train it "
                          "once with python -m raysr.train and give its generator.pth as train.init_from")
    space = load_space(args.space)
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num-samples {args.num_samples} must be >= 1")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {args.max_concurrent} must be >= 1")
    if args.search == "optuna":
        if space.has_grid:
            raise ConfigError(f"{space.source}: grid is not supported by --search optuna; use choice")
        try:
            import optuna  # noqa: F401
        except ImportError as err:
            raise ConfigError("--search optuna needs the optuna package: pip install optuna "
                              "(or use --search random)") from err
    mode = metric_mode(args.metric, args.mode)
    check_metric(args.metric, cfg, space)
    if args.scheduler == "asha":
        asha_schedule(cfg.train.total_steps, cfg.run.val_every)
    base = cfg.to_dict()
    check_space(space, base)
    name = args.name or f"{cfg.run.name}_tune_{Path(space.source).stem}"
    if not name or "/" in name:
        raise ConfigError(f"--name {name!r} must be a non-empty name without '/'")
    num_samples = args.num_samples or (1 if space.has_grid else DEFAULT_NUM_SAMPLES)
    return Search(name, base, space, args.metric, mode, args.scheduler, args.search, num_samples,
                  args.max_concurrent)


def experiment_location(search: Search) -> tuple[str, object]:
    """Tune's experiment path and pyarrow filesystem (None: inferred) for the search's folder."""
    where = storage_args(search.storage)
    return where["storage_path"].rstrip("/") + "/" + search.name, where.get("storage_filesystem")


def check_resume(search: Search, saved_text: str) -> None:
    """A resumed search must be the one that was started: same base config, space, samples,
    scheduler and search algorithm (Tune restores those as saved). ``--metric``/``--mode`` may
    differ: they re-rank the table. Raises ConfigError."""
    # load_yaml, as the space file was read: a space saved as written ('1e-4') compares equal
    now, then = _flatten(search.spec()), _flatten(load_yaml(saved_text))
    for key in sorted(set(now) | set(then)):
        if key not in ("metric", "mode") and now.get(key) != then.get(key):
            raise ConfigError(f"--resume: {search.name} was started with {key}={then.get(key)!r}, this command "
                              f"gives {now.get(key)!r}; rerun the original command with --resume, or start a new "
                              "search with --name")


def _flatten(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        return {k: v for name, value in data.items() for k, v in _flatten(value, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): list(data) if isinstance(data, tuple) else data}


def make_tuner(search: Search, resume: bool) -> tune.Tuner:
    """A new Tuner for ``search``, or the restored one when ``resume`` (Ray already initialised)."""
    # what the trials run with (search.base, as saved and compared on --resume, stays as given)
    cfg = validation_for_local_ray(config_from_dict(search.base), other_cpus=TRIAL_DRIVER_CPUS)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), space=search.space, runs_dir=join(search.folder, RUNS_DIR),
                             metric=search.metric),
        {"CPU": TRIAL_DRIVER_CPUS})
    if resume:
        path, filesystem = experiment_location(search)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=filesystem)
    concurrent, why = trial_resources(cfg, ray.cluster_resources())
    if search.max_concurrent:
        concurrent, why = search.max_concurrent, "--max-concurrent"
    scheduler, search_alg = None, None
    if search.scheduler == "asha":
        grace, factor = asha_schedule(cfg.train.total_steps, cfg.run.val_every)
        # max_t past the last step: ASHA would otherwise stop (kill) every trial at its final
        # result, racing the trial's own clean shutdown of its Train run.
        scheduler = tune.schedulers.ASHAScheduler(time_attr="step", max_t=cfg.train.total_steps + 1,
                                                  grace_period=grace, reduction_factor=factor)
        say(f"raysr.tune: ASHA on {search.metric} ({search.mode}): first rung at step {grace}, 1/{factor} of the "
            "trials go on at each rung")
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch(seed=cfg.run.seed)
    say(f"raysr.tune: {search.num_samples} sample(s) over {len(search.space.dims)} key(s), up to {concurrent} "
        f"trial(s) at a time ({why})")
    return tune.Tuner(
        trainable, param_space=search.space.param_space(),
        tune_config=tune.TuneConfig(metric=search.metric, mode=search.mode, num_samples=search.num_samples,
                                    scheduler=scheduler, search_alg=search_alg, max_concurrent_trials=concurrent,
                                    trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=search.name, verbose=0,
                                  callbacks=[TrialProgress(search.space.keys, search.metric)],
                                  **storage_args(search.storage)))


def saved_statuses(search: Search) -> dict[str, str]:
    """{trial id: TERMINATED | ERROR | RUNNING | PENDING | PAUSED} from the experiment state Tune saved.

    The ResultGrid of an interrupted fit() shows its stopped trials as terminated;
    the saved state keeps them unfinished (which is what ``--resume`` continues).
    """
    path, filesystem = experiment_location(search)
    return {t.trial_id: t.status for t in tune.ExperimentAnalysis(path, storage_filesystem=filesystem).trials}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        search = prepare(args)
        exists = tune.Tuner.can_restore(*experiment_location(search))
        if exists and not args.resume:
            raise ConfigError(f"search {search.name} already exists in {search.folder}; add --resume to "
                              "continue it, or --name NEW to start another")
        # Demo shards (no data.train) are built once, in the search's folder, for all trials.
        search.base = prepare_demo_data(trial_config(search.base, {}, name=search.name)).to_dict()
        spec_uri = join(search.folder, SPACE_FILE)
        if exists:
            check_resume(search, read_bytes(spec_uri).decode())
    except (ConfigError, OSError) as err:  # OSError: StorageError, or pyarrow failing to reach the storage
        print(f"raysr.tune: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    init_ray()
    if exists:
        say(f"raysr.tune: resuming {search.name} from {search.folder}")
    else:
        if args.resume:
            say(f"raysr.tune: no search {search.name} in {search.folder} yet; starting it")
        write_bytes(spec_uri, yaml.safe_dump(search.spec(), sort_keys=False).encode())
        say(f"raysr.tune: search {search.name} -> {search.folder}")
    for dim in search.space.dims:
        say(f"raysr.tune:   {dim.describe()}")
    results = make_tuner(search, resume=exists).fit()
    statuses = saved_statuses(search)
    code = write_report(results, statuses, space=search.space, base=search.base, metric=search.metric,
                        mode=search.mode, folder=search.folder, name=search.name)
    unfinished = search.expected_trials - sum(s in ("TERMINATED", "ERROR") for s in statuses.values())
    if unfinished > 0:  # Ctrl-C: Tune saved the experiment state and returned early
        say(f"raysr.tune: search interrupted with {unfinished} trial(s) unfinished; the table above is partial. "
            "Continue it with the same command plus --resume")
        return 130
    return code
