"""``python -m raysr.tune`` — search loss weights and generator depth with Ray Tune, one real training per trial.

    python -m raysr.tune --space tune_spaces/esrgan.yaml --preset esrgan_x4 \\
        --set data.train=s3://bucket/shards --set run.storage=s3://bucket/runs --num-samples 16
    python -m raysr.tune --space tune_spaces/depth_psnr.yaml --preset esrgan_psnr_x4 --scheduler none

Order of events: resolve the base config (as ``raysr.train`` does) and the
search space, check every space value against the config (exit 2 on any
error, before Ray starts) -> connect to Ray -> a Tuner runs :func:`run_trial`
per trial: it builds the trial's config (base + sampled values) and fits a
TorchTrainer with its own workers, whose validation results reach Tune through
:class:`ValidationReport`; ASHA stops weak trials at validation steps -> a table
of trials with the PSNR / perceptual-distance Pareto front, ``trials.csv`` and
``best_config.yaml`` in ``<run.storage>/<search name>``.

Each trial is a complete raysr run under ``<search>/runs/<trial id>`` (checkpoints,
TensorBoard, comparison images); ``--resume`` continues an interrupted search,
and every unfinished trial resumes its training from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from raysr.config import Config, ConfigError, config_from_dict
from raysr.io import StorageError, is_s3, join, read_bytes, write_bytes
from raysr.train import init_ray, make_trainer, prepare_demo_data, resolve, storage_args

SPACE_FILE = "search.yaml"  # the base config, space and settings a search was started with
TRIALS_FILE = "trials.csv"
BEST_CONFIG_FILE = "best_config.yaml"
RUNS_DIR = "runs"  # each trial's training run: <search>/runs/<trial id>

# The trial function itself only waits on its TorchTrainer; a whole CPU per trial
# would starve the training workers (and deadlocks a 2-core machine).
TRIAL_DRIVER_CPUS = 0.1
DEFAULT_NUM_SAMPLES = 8

# Metrics every validation reports (psnr, ssim) or may report (perceptual: the
# configured VGG loss in the GAN phase; lpips: when its weights are available offline).
METRIC_MODES = {"psnr": "max", "ssim": "max", "perceptual": "min", "lpips": "min"}
# Tune sees only validation results: this key is in every one of them.
VALIDATION_KEY = "psnr"

# Set by the search for every trial; a space may not vary them.
MANAGED_KEYS = {"run.name": "each trial's run is named after its trial id",
                "run.storage": "trials run under <run.storage>/<search name>/runs",
                "run.num_workers": "every trial gets the same workers; set it with --set",
                "run.use_gpu": "every trial runs on the same devices; set it with --set"}
# Keys that change the generator's shape: train.init_from weights cannot fit all of their values.
SHAPE_KEYS = {f"model.generator.{k}" for k in ("name", "num_feat", "num_block", "num_grow_ch", "scale", "variant")}


# --------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``dist`` in loguniform | uniform | randint | choice | grid.

    ``values`` is ``(low, high)`` for the ranges (randint: both inclusive) and the
    options for choice/grid. Options that are not scalars (e.g. a VGG layer map
    ``{conv2_2: 1.0}``) travel through Tune as their YAML flow text, which
    Optuna and the result tables can handle; :meth:`decode` turns them back.
    """

    key: str
    dist: str
    values: tuple

    def sampler(self):
        """The Tune search-space object for this key."""
        if self.dist == "loguniform":
            return tune.loguniform(*self.values)
        if self.dist == "uniform":
            return tune.uniform(*self.values)
        if self.dist == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper bound is exclusive
        options = [self.encode(v) for v in self.values]
        return tune.choice(options) if self.dist == "choice" else tune.grid_search(options)

    def check_values(self) -> list:
        """Values that exercise every type the sampler can produce: bounds, an interior point, every option."""
        if self.dist == "loguniform":
            return [self.values[0], math.sqrt(self.values[0] * self.values[1]), self.values[1]]
        if self.dist == "uniform":
            return [self.values[0], (self.values[0] + self.values[1]) / 2, self.values[1]]
        return list(self.values)

    @staticmethod
    def encode(value):
        return label(value) if isinstance(value, (dict, list)) else value

    def decode(self, value):
        if self.dist in ("choice", "grid"):
            for option in self.values:
                if self.encode(option) == value:
                    return option
        return value

    def describe(self) -> str:
        return f"{self.key} ~ {self.dist} {label(list(self.values))}"


@dataclass(frozen=True)
class SearchSpace:
    dims: tuple[Dimension, ...]
    source: str  # where it was read from, for error messages
    raw: dict = field(compare=False)  # the mapping as written, saved with the search

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dims]

    @property
    def has_grid(self) -> bool:
        return any(d.dist == "grid" for d in self.dims)

    def param_space(self) -> dict:
        """Tune's ``param_space``: dotted config key -> sampler."""
        return {d.key: d.sampler() for d in self.dims}

    def decode(self, config: dict) -> dict:
        """A trial's Tune config -> {dotted key: config value}."""
        return {d.key: d.decode(config[d.key]) for d in self.dims}


def label(value) -> str:
    """Compact one-line YAML for a value: ``{conv2_2: 1.0}``, ``[6, 12]``, ``0.001``."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
SPACE_EXAMPLE = ("loss.adversarial.weight: {loguniform: [1.0e-4, 1.0e-2]}\n"
                 "model.generator.num_block: {choice: [6, 12, 16, 23]}")


def parse_space(text: str, source: str) -> SearchSpace:
    """A search space from YAML text mapping dotted config keys to one distribution each.

    Checks the structure (distribution names, bound order and types); whether
    the keys and values fit the config is :func:`check_space`'s job.
    Raises ConfigError naming ``source``, the key and the fix.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from err
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source} must map config keys to distributions, e.g.\n{SPACE_EXAMPLE}")
    dims = []
    for key, spec in raw.items():
        where = f"{source}: {key}"
        if not isinstance(key, str) or not all(part.isidentifier() for part in key.split(".")):
            raise ConfigError(f"{where}: not a dotted config key like loss.adversarial.weight")
        if key in MANAGED_KEYS:
            raise ConfigError(f"{where}: cannot be searched ({MANAGED_KEYS[key]})")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: expected one distribution like {{loguniform: [1.0e-4, 1.0e-2]}}, "
                              f"got {spec!r}; distributions: {', '.join(DISTRIBUTIONS)}")
        (dist, args), = spec.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: unknown distribution {dist!r}; use one of {', '.join(DISTRIBUTIONS)}")
        dims.append(Dimension(key, dist, _parse_args(where, dist, args)))
    return SearchSpace(tuple(dims), source, raw)


def _parse_args(where: str, dist: str, args) -> tuple:
    if dist in ("choice", "grid"):
        if not isinstance(args, list) or len(args) < 2:
            raise ConfigError(f"{where}: {dist} needs a list of at least two values, got {args!r} "
                              "(a single value is a --set, not a search)")
        options = [_number_or_value(v) for v in args]
        texts = [yaml.safe_dump(v) for v in options]
        if len(set(texts)) != len(texts):
            raise ConfigError(f"{where}: {dist} lists a value twice: {args!r}")
        return tuple(options)
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: {dist} needs [low, high], got {args!r}")
    low, high = (_number_or_value(v) for v in args)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise ConfigError(f"{where}: {dist} bounds must be numbers, got {args!r}")
    if dist == "randint" and not all(float(v).is_integer() for v in (low, high)):
        raise ConfigError(f"{where}: randint bounds must be integers, got {args!r}")
    if not low < high:
        raise ConfigError(f"{where}: {dist} bounds must be increasing (low < high), got {args!r}")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform bounds must be > 0, got {args!r}; use uniform for ranges "
                          "that include 0")
    return (int(low), int(high)) if dist == "randint" else (float(low), float(high))


def _number_or_value(value):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; take the number people meant."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value.strip()):
        return float(value)
    return value


def load_space(path: str) -> SearchSpace:
    """Read and parse a space file (local path or s3:// URI). Raises ConfigError."""
    try:
        text = read_bytes(path if is_s3(path) else os.path.expanduser(path)).decode()
    except StorageError as err:
        shipped = sorted(p.name for p in Path("tune_spaces").glob("*.yaml"))
        hint = f"; spaces here: {', '.join('tune_spaces/' + n for n in shipped)}" if shipped else ""
        raise ConfigError(f"--space {path}: {err}{hint}") from err
    return parse_space(text, path)


def check_space(space: SearchSpace, base: dict) -> None:
    """Apply each dimension's bounds / interior point / options to the base config and validate.

    Catches unknown keys, values of the wrong type (a float range on an integer
    key) and values the config rejects (num_block 0). Raises ConfigError.
    """
    if base["train"].get("init_from"):
        shaped = [k for k in space.keys if k in SHAPE_KEYS]
        if shaped:
            raise ConfigError(
                f"{space.source}: {shaped[0]} changes the generator's shape, but train.init_from="
                f"{base['train']['init_from']} holds weights of one shape; unset it (--set train.init_from=null: "
                f"trials start from random weights) or remove {shaped[0]} from the space")
    for dim in space.dims:
        if dim.dist in ("uniform", "loguniform") and _field_type(dim.key) is int:
            raise ConfigError(f"{space.source}: {dim.key} is an integer but {dim.dist} samples fractions; "
                              "use randint or choice")
        for value in dim.check_values():
            try:
                trial_config(base, {dim.key: value})
            except ConfigError as err:
                raise ConfigError(f"{space.source}: {dim.key}={label(value)} (from {dim.dist} "
                                  f"{label(list(dim.values))}) is not a valid config: {err}") from err


def _field_type(key: str):
    """The annotation of a dotted config key (``int`` for model.generator.num_block), None if unknown."""
    tp = Config
    for part in key.split("."):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def trial_config(base: dict, params: dict, **run) -> Config:
    """The validated config of one trial: ``base`` (a ``Config.to_dict()``) with ``params``
    ({dotted key: value}) and ``run`` (fields of the run section) set."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        *sections, leaf = key.split(".")
        node = data
        for i, name in enumerate(sections):
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"unknown key {key}: {'.'.join(sections[:i + 1])} is a value, not a section")
        node[leaf] = value
    data["run"].update(run)
    return config_from_dict(data)


# --------------------------------------------------------------------------- objective, scheduler, resources


def metric_mode(metric: str, mode: str | None) -> str:
    """``mode`` if given, else the natural direction of a known metric. Raises ConfigError."""
    if mode is not None:
        return mode
    if metric not in METRIC_MODES:
        raise ConfigError(f"--metric {metric}: give --mode min or --mode max (known metrics: "
                          + ", ".join(f"{m} ({d})" for m, d in METRIC_MODES.items()) + ")")
    return METRIC_MODES[metric]


def perceptual_comparable(space: SearchSpace) -> bool:
    """Whether every trial measures ``perceptual`` the same way: not if the space varies the VGG
    layers, activation, criterion or feature scale (the loss weight does not enter the metric)."""
    return not any(k.startswith("loss.perceptual.") and k != "loss.perceptual.weight" for k in space.keys)


def check_metric(metric: str, cfg: Config, space: SearchSpace) -> None:
    """Fail early when the chosen metric will never be reported, or cannot rank these trials. Raises ConfigError."""
    if metric == "perceptual" and not perceptual_comparable(space):
        raise ConfigError(f"--metric perceptual: {space.source} varies how the perceptual distance is measured "
                          "(loss.perceptual.*), so trials' values are not comparable; use --metric lpips "
                          "(LPIPS weights needed) or psnr")
    if metric == "perceptual" and not (cfg.train.phase == "gan" and cfg.loss.perceptual.weight > 0):
        raise ConfigError("--metric perceptual: validation reports the VGG perceptual distance only when the "
                          "perceptual loss is on (train.phase=gan, loss.perceptual.weight > 0); use --metric psnr")
    if metric == "lpips":
        from raysr.lpips import load_lpips
        fn, reason = load_lpips()
        if fn is None:
            raise ConfigError(f"--metric lpips: LPIPS cannot run here: {reason}; or use --metric perceptual")


def asha_schedule(total_steps: int, val_every: int) -> tuple[int, int]:
    """ASHA's ``(grace_period, reduction_factor)`` in steps, for validations every ``val_every`` steps.

    The first rung comes after about 1/16 of the training (rounded to a
    validation step, at least the first one) so that a trial is judged on a
    metric that has started to move; the reduction factor is 3 when the run is
    long enough for two rungs (grace·9 <= total), else 2. Rungs grace·rfᵏ then
    fall on validation steps. Raises ConfigError when no validation comes before the end.
    """
    validations = math.ceil(total_steps / val_every)
    if validations < 2:
        raise ConfigError(f"--scheduler asha needs validations before the last step, but run.val_every "
                          f"({val_every}) >= train.total_steps ({total_steps}); lower run.val_every "
                          "or use --scheduler none")
    grace = val_every * max(1, validations // 16)
    return grace, 3 if grace * 9 <= total_steps else 2


def trial_resources(cfg: Config, cluster: dict) -> tuple[int, str]:
    """How many trials fit the cluster at once, and one line saying why.

    Each trial runs ``run.num_workers`` workers (1 GPU each on GPUs, which
    request no CPU; else 1 CPU each) plus a driver of ``TRIAL_DRIVER_CPUS``.
    ``cluster``: ``ray.cluster_resources()``. At least 1 (an autoscaler adds nodes).
    """
    n = cfg.run.num_workers
    use_gpu = cluster.get("GPU", 0) > 0 if cfg.run.use_gpu == "auto" else cfg.run.use_gpu
    if use_gpu:
        fits = int(cluster.get("GPU", 0) // n)
        why = f"{n} GPU worker(s) per trial, {cluster.get('GPU', 0):g} GPUs"
    else:
        fits = int(cluster.get("CPU", 0) // (n + TRIAL_DRIVER_CPUS))
        why = f"{n} CPU worker(s) + {TRIAL_DRIVER_CPUS} CPU driver per trial, {cluster.get('CPU', 0):g} CPUs"
    return max(1, fits), why


# --------------------------------------------------------------------------- inside a trial

class ValidationReport(TuneReportCallback):
    """Forward the Train run's validation results (rank 0's) to Tune, not every log line.

    Schedulers and searchers then always see the validation metrics they key on
    (Tune's strict metric check and Optuna's intermediate values need them in
    every result); the per-step losses stay in the run's TensorBoard.
    """

    def after_report(self, run_context, metrics, checkpoint):
        if VALIDATION_KEY in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def run_trial(params: dict, base: dict, space: SearchSpace, runs_dir: str) -> None:
    """The body of one Tune trial: a complete raysr training of ``base`` + ``params``.

    Runs as ``<runs_dir>/<trial id>``; a restarted trial (``--resume``) refits the
    same run name, so its TorchTrainer resumes from the latest checkpoint.
    """
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, space.decode(params), name=trial_id, storage=runs_dir)
    make_trainer(cfg, callbacks=[ValidationReport()]).fit()


def trial_dirname(trial) -> str:
    """Trial folders (and names) are the trial id, the same as the trial's run under ``runs/``."""
    return trial.trial_id


class TrialProgress(tune.Callback):
    """One console line per trial start, validation and end, instead of Tune's status tables."""

    def __init__(self, keys: list[str], metric: str):
        self.keys, self.metric = keys, metric

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={label(trial.config[k])}" for k in self.keys)
        say(f"trial {trial.trial_id} started: {params}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        shown = [self.metric] + [m for m in METRIC_MODES if m != self.metric]
        values = " ".join(f"{m} {result[m]:.4g}" for m in shown if m in result)
        say(f"trial {trial.trial_id} step {result.get('step', '?')}: {values}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        say(f"trial {trial.trial_id} ended at step {trial.last_result.get('step', '?')}")

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"trial {trial.trial_id} failed; its traceback: {trial.path}/error.txt")


def say(line: str) -> None:
    print(f"raysr.tune: {line}", flush=True)


# --------------------------------------------------------------------------- results


@dataclass
class TrialRow:
    """One trial's outcome: its params and its last reported validation metrics."""

    trial_id: str
    status: str  # complete | stopped (early, by the scheduler) | unfinished (interrupted search) | error
    step: int | None
    params: dict
    metrics: dict[str, float]
    pareto: bool = False
    best: bool = False


def trial_row(result, saved_status: str | None, space: SearchSpace, base: dict, metric: str) -> TrialRow:
    """A :class:`TrialRow` from a Tune ``Result`` and the trial's status in the saved experiment state."""
    params = space.decode(result.config)
    df = result.metrics_dataframe
    step, metrics = None, {}
    if df is not None and len(df) and "step" in df:
        step = int(df["step"].max())
        for name in dict.fromkeys([*METRIC_MODES, "psnr_bicubic", metric]):
            if name in df and df[name].notna().any():
                metrics[name] = float(df[name].dropna().iloc[-1])
    total = trial_config(base, params).train.total_steps
    if result.error is not None or saved_status == "ERROR":
        status = "error"
    elif saved_status != "TERMINATED":
        status = "unfinished"
    else:
        status = "complete" if step is not None and step >= total else "stopped"
    return TrialRow(Path(result.path).name, status, step, params, metrics)


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (psnr, distance) points, where higher psnr and lower distance are better:
    True for each point that no other point matches or beats on both and beats on one."""
    return [not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points) for p in points]


def rank_trials(rows: list[TrialRow], metric: str, mode: str,
                use_perceptual: bool = True) -> tuple[TrialRow | None, str | None]:
    """Mark the Pareto front and the best trial; return ``(best, distance metric of the front)``.

    Only trials that ran to their last step are compared (a trial stopped early
    was judged on less training); if none did (an interrupted search), all that
    did not fail are. The front is over PSNR and LPIPS when any compared trial
    has LPIPS, else the VGG perceptual distance (unless ``use_perceptual`` is
    False: trials measured it with different VGG layers); with neither (a
    PSNR-phase search) it is the trials with the highest PSNR. ``best`` is None
    when no compared trial reported ``metric``.
    """
    pool = [r for r in rows if r.status == "complete"] or [r for r in rows if r.status != "error"]
    distances = ("lpips", "perceptual") if use_perceptual else ("lpips",)
    distance = next((m for m in distances if any(m in r.metrics for r in pool)), None)
    scored = [r for r in pool if "psnr" in r.metrics and (distance is None or distance in r.metrics)]
    points = [(r.metrics["psnr"], r.metrics[distance] if distance else 0.0) for r in scored]
    for row, on_front in zip(scored, pareto_front(points)):
        row.pareto = on_front
    candidates = [r for r in pool if metric in r.metrics]
    if not candidates:
        return None, distance
    sign = 1 if mode == "max" else -1
    best = max(candidates, key=lambda r: sign * r.metrics[metric])
    best.best = True
    return best, distance


def table_columns(rows: list[TrialRow], space: SearchSpace, metric: str) -> list[str]:
    shown = [m for m in dict.fromkeys(["psnr", "perceptual", "lpips", metric]) if any(m in r.metrics for r in rows)]
    return ["trial", "status", "step", *space.keys, *shown, "pareto"]


def row_values(row: TrialRow, columns: list[str], exact: bool = False) -> list[str]:
    """The cells of ``row`` under ``columns``: rounded for reading, or ``exact`` (full precision) for the CSV."""
    number = repr if exact else (lambda v: f"{v:.5g}")
    cells = {"trial": row.trial_id, "status": row.status, "step": "" if row.step is None else str(row.step),
             "pareto": "*" if row.pareto else "",
             **{k: label(v) if not exact or isinstance(v, (dict, list)) else str(v) for k, v in row.params.items()},
             **{k: number(v) for k, v in row.metrics.items()}}
    return [cells.get(c, "") for c in columns]


def format_table(rows: list[TrialRow], columns: list[str]) -> str:
    """A plain-text table of ``rows`` in their order; the best trial is marked ``(best)``."""
    lines = [columns]
    for r in rows:
        cells = [c or ("" if name == "pareto" else "-") for name, c in zip(columns, row_values(r, columns))]
        cells[0] += " (best)" if r.best else ""
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def trials_csv(rows: list[TrialRow], columns: list[str]) -> str:
    """The table as CSV with full-precision values and 0/1 ``pareto`` and ``best`` columns."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*columns, "best"])
    for r in rows:
        writer.writerow([*row_values(r, columns, exact=True)[:-1], int(r.pareto), int(r.best)])
    return out.getvalue()


def best_config_yaml(base: dict, best: TrialRow, search: str, metric: str) -> str:
    """The best trial's full config, runnable as ``python -m raysr.train --config best_config.yaml``."""
    cfg = trial_config(base, best.params, name=f"{search}_best")
    params = ", ".join(f"{k}={label(v)}" for k, v in best.params.items())
    return (f"# best trial {best.trial_id} of search {search} by {metric} ({best.metrics[metric]:.5g} at step "
            f"{best.step}): {params}\n# train it: python -m raysr.train --config best_config.yaml\n" + cfg.to_yaml())


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raysr.tune", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="space files map config keys to distributions, e.g.\n" + SPACE_EXAMPLE +
               "\n(loguniform/uniform: [low, high]; randint: [low, high] inclusive; choice/grid: [values])")
    parser.add_argument("--space", required=True, help="search space YAML, e.g. tune_spaces/esrgan.yaml")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help="base config (default: quickstart)")
    source.add_argument("--config", help="base config YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one base config key for every trial (repeatable)")
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
    now, then = _flatten(search.spec()), _flatten(yaml.safe_load(saved_text))
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
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=search.base, space=search.space, runs_dir=join(search.folder, RUNS_DIR)),
        {"CPU": TRIAL_DRIVER_CPUS})
    if resume:
        path, filesystem = experiment_location(search)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=filesystem)
    cfg = config_from_dict(search.base)
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
        say(f"ASHA on {search.metric} ({search.mode}): first rung at step {grace}, 1/{factor} of the trials "
            "go on at each rung")
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch(seed=cfg.run.seed)
    say(f"{search.num_samples} sample(s) over {len(search.space.dims)} key(s), up to {concurrent} trial(s) "
        f"at a time ({why})")
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


def report(search: Search, results, statuses: dict[str, str]) -> int:
    """Print the table, write trials.csv and best_config.yaml; 0 when a best trial exists, else 1."""
    rows = [trial_row(r, statuses.get(Path(r.path).name), search.space, search.base, search.metric)
            for r in results]
    best, distance = rank_trials(rows, search.metric, search.mode, perceptual_comparable(search.space))
    sign = 1 if search.mode == "max" else -1

    def order(r: TrialRow):  # complete trials first, then best by the metric
        value = r.metrics.get(search.metric)
        return r.status != "complete", value is None, 0.0 if value is None else -sign * value

    rows.sort(key=order)
    columns = table_columns(rows, search.space, search.metric)
    print(format_table(rows, columns), flush=True)
    bicubic = next((r.metrics["psnr_bicubic"] for r in rows if "psnr_bicubic" in r.metrics), None)
    if bicubic is not None:  # the same validation set for every trial: one reference line
        print(f"bicubic upscaling of the same validation images: psnr {bicubic:.5g}", flush=True)
    if distance:
        print(f"pareto *: no other compared trial has both a higher psnr and a lower {distance}", flush=True)
    write_bytes(join(search.folder, TRIALS_FILE), trials_csv(rows, columns).encode())
    say(f"table  {join(search.folder, TRIALS_FILE)}")
    if best is None:
        say(f"no trial reported {search.metric}; see the trials' errors under {search.folder}")
        return 1
    path = join(search.folder, BEST_CONFIG_FILE)
    write_bytes(path, best_config_yaml(search.base, best, search.name, search.metric).encode())
    say(f"best   {best.trial_id}: {search.metric} {best.metrics[search.metric]:.5g}; its run: "
        f"{join(search.folder, RUNS_DIR, best.trial_id)}")
    say(f"config {path}")
    fetch = f"aws s3 cp {path} . && " if is_s3(path) else ""
    say(f"train it with: {fetch}python -m raysr.train --config {BEST_CONFIG_FILE if fetch else path}")
    return 0


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
        return 2
    init_ray()
    if exists:
        say(f"resuming {search.name} from {search.folder}")
    else:
        if args.resume:
            say(f"no search {search.name} in {search.folder} yet; starting it")
        write_bytes(spec_uri, yaml.safe_dump(search.spec(), sort_keys=False).encode())
        say(f"search {search.name} -> {search.folder}")
    for dim in search.space.dims:
        say(f"  {dim.describe()}")
    results = make_tuner(search, resume=exists).fit()
    statuses = saved_statuses(search)
    code = report(search, results, statuses)
    unfinished = search.expected_trials - sum(s in ("TERMINATED", "ERROR") for s in statuses.values())
    if unfinished > 0:  # Ctrl-C: Tune saved the experiment state and returned early
        say(f"search interrupted with {unfinished} trial(s) unfinished; the table above is partial. "
            "Continue it with the same command plus --resume")
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
