"""What runs in and around one Tune trial: the trial body (a complete raysr training), the
validation results it reports to Tune, the console lines per trial, and how many trials
fit the cluster / when ASHA judges them."""

from __future__ import annotations

import math

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from raysr import run_checkpoint
from raysr.config import Config, ConfigError
from raysr.ray_setup import make_trainer
from raysr.train import run_dir, train_loop_per_worker
from raysr.tune.report import DIVERGED_KEY, METRIC_MODES
from raysr.tune.space import SearchSpace, label, trial_config
from raysr.util import say

# The trial function itself only waits on its TorchTrainer; a whole CPU per trial
# would starve the training workers (and deadlocks a 2-core machine).
TRIAL_DRIVER_CPUS = 0.1
# Tune sees only validation results: this key is in every one of them.
VALIDATION_KEY = "psnr"


def run_trial(params: dict, base: dict, space: SearchSpace, runs_dir: str, metric: str) -> None:
    """The body of one Tune trial: a complete raysr training of ``base`` + ``params``.

    Runs as ``<runs_dir>/<trial id>``; a restarted trial (``--resume``) refits the
    same run name, so its TorchTrainer resumes from the latest checkpoint. A run that
    diverged (train.max_nonfinite) ends with one more result: ``diverged`` holds the
    message ``raysr.train`` prints, and the metrics are NaN (``metric``, the search's,
    must be in every result), which no scheduler or searcher counts as a score.
    """
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, space.decode(params), name=trial_id, storage=runs_dir)
    run_checkpoint.pop_divergence(run_dir(cfg))  # a restarted trial starts without the last verdict
    result = make_trainer(cfg, train_loop_per_worker, callbacks=[ValidationReport()]).fit()
    diverged = run_checkpoint.pop_divergence(run_dir(cfg))
    if diverged is not None:
        tune.report({**{m: math.nan for m in (*METRIC_MODES, metric)}, "step": diverged["diverged_at"],
                     DIVERGED_KEY: run_checkpoint.divergence_message(cfg, diverged, result.checkpoint)})


class ValidationReport(TuneReportCallback):
    """Forward the Train run's validation results (rank 0's) to Tune, not every log line.

    Schedulers and searchers then always see the validation metrics they key on
    (Tune's strict metric check and Optuna's intermediate values need them in
    every result); the per-step losses stay in the run's TensorBoard. A validation
    reaches the report after it finishes (run.validation=async), while training went on:
    Tune gets it at the step of the weights it scored (``val_step``; ``train_step`` is the
    step the report was made at), so ASHA's rungs judge each trial at its validation steps.
    """

    def after_report(self, run_context, metrics, checkpoint):
        if VALIDATION_KEY in metrics[0]:
            result = metrics[0]
            result = {**result, "step": result.get("val_step", result["step"]), "train_step": result["step"]}
            super().after_report(run_context, [result, *metrics[1:]], checkpoint)


def trial_dirname(trial) -> str:
    """Trial folders (and names) are the trial id, the same as the trial's run under ``runs/``."""
    return trial.trial_id


class TrialProgress(tune.Callback):
    """One console line per trial start, validation and end, instead of Tune's status tables."""

    def __init__(self, keys: list[str], metric: str):
        self.keys, self.metric = keys, metric

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={label(trial.config[k])}" for k in self.keys)
        say(f"raysr.tune: trial {trial.trial_id} started: {params}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if DIVERGED_KEY in result:
            say(f"raysr.tune: trial {trial.trial_id} stopped: {result[DIVERGED_KEY]}")
            return
        shown = [self.metric] + [m for m in METRIC_MODES if m != self.metric]
        values = " ".join(f"{m} {result[m]:.4g}" for m in shown if m in result)
        say(f"raysr.tune: trial {trial.trial_id} step {result.get('step', '?')}: {values}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        say(f"raysr.tune: trial {trial.trial_id} ended at step {trial.last_result.get('step', '?')}")

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"raysr.tune: trial {trial.trial_id} failed; its traceback: {trial.path}/error.txt")


def trial_resources(cfg: Config, cluster: dict) -> tuple[int, str]:
    """How many trials fit the cluster at once, and one line saying why.

    Each trial runs up to ``run.num_workers`` workers (the max of an elastic [min, max]; 1 GPU
    each on GPUs, which request no CPU; else 1 CPU each), a driver of ``TRIAL_DRIVER_CPUS`` and,
    with ``run.validation=async``, a validation actor of ``run.validation_resources``.
    ``cluster``: ``ray.cluster_resources()``. At least 1 (an autoscaler adds nodes).
    """
    n = cfg.run.max_workers
    use_gpu = cluster.get("GPU", 0) > 0 if cfg.run.use_gpu == "auto" else cfg.run.use_gpu
    validator = cfg.run.validation_resources if cfg.run.validation == "async" else {}
    cpus = TRIAL_DRIVER_CPUS + validator.get("CPU", 0.0) + (0 if use_gpu else n)
    gpus = validator.get("GPU", 0.0) + (n if use_gpu else 0)
    fits = min(int(cluster.get(kind, 0) // need) for kind, need in (("CPU", cpus), ("GPU", gpus)) if need > 0)
    why = (f"{n} {'GPU' if use_gpu else 'CPU'} worker(s), a {TRIAL_DRIVER_CPUS} CPU driver"
           + (f", a validator of {_amounts(validator)}" if validator else "")
           + f" per trial; {_amounts({k: cluster.get(k, 0) for k in ('CPU', 'GPU') if cluster.get(k, 0)})}")
    return max(1, fits), why


def _amounts(resources: dict) -> str:
    """``{CPU: 1.0, GPU: 8.0}`` -> ``1 CPU, 8 GPU``."""
    return ", ".join(f"{v:g} {k}" for k, v in resources.items()) or "nothing"


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
