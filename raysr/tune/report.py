"""How a search's trials are judged and reported: the validation metrics and their directions,
each trial's outcome, the PSNR / perceptual-distance Pareto front, the best trial, and what
the search folder gets at the end (``trials.csv``, ``best_config.yaml``). Plain Python, no Ray.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from raysr.config import Config, ConfigError
from raysr.storage import is_s3, join, write_bytes
from raysr.tune.space import SearchSpace, label, trial_config
from raysr.util import say

TRIALS_FILE = "trials.csv"
BEST_CONFIG_FILE = "best_config.yaml"
RUNS_DIR = "runs"  # each trial's training run: <search>/runs/<trial id>
# In the last result of a trial whose training diverged: the message raysr.train prints.
DIVERGED_KEY = "diverged"

# Metrics every validation reports (psnr, ssim) or may report (perceptual: the
# configured VGG loss in the GAN phase; lpips: when its weights are available offline).
METRIC_MODES = {"psnr": "max", "ssim": "max", "perceptual": "min", "lpips": "min"}


# --------------------------------------------------------------------------- the metric that ranks trials


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


# --------------------------------------------------------------------------- trials, front, best


@dataclass
class TrialRow:
    """One trial's outcome: its params and its last reported validation metrics."""

    trial_id: str
    # complete | stopped (early, by the scheduler) | unfinished (interrupted search) | error
    # | diverged (train.max_nonfinite NaN/inf steps in a row; ``message`` says so as raysr.train does)
    status: str
    step: int | None
    params: dict
    metrics: dict[str, float]
    pareto: bool = False
    best: bool = False
    message: str = ""


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
    message = ""
    if df is not None and DIVERGED_KEY in df and df[DIVERGED_KEY].notna().any():
        status, message = "diverged", str(df[DIVERGED_KEY].dropna().iloc[-1])
    elif result.error is not None or saved_status == "ERROR":
        status = "error"
    elif saved_status != "TERMINATED":
        status = "unfinished"
    else:
        status = "complete" if step is not None and step >= total else "stopped"
    return TrialRow(Path(result.path).name, status, step, params, metrics, message=message)


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (psnr, distance) points, where higher psnr and lower distance are better:
    True for each point that no other point matches or beats on both and beats on one."""
    return [not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points) for p in points]


def rank_trials(rows: list[TrialRow], metric: str, mode: str,
                use_perceptual: bool = True) -> tuple[TrialRow | None, str | None]:
    """Mark the Pareto front and the best trial; return ``(best, distance metric of the front)``.

    Only trials that ran to their last step are compared (a trial stopped early
    was judged on less training); if none did (an interrupted search), all that
    neither failed nor diverged are. The front is over PSNR and LPIPS when any compared trial
    has LPIPS, else the VGG perceptual distance (unless ``use_perceptual`` is
    False: trials measured it with different VGG layers); with neither (a
    PSNR-phase search) it is the trials with the highest PSNR. ``best`` is None
    when no compared trial reported ``metric``.
    """
    pool = [r for r in rows if r.status == "complete"] or [r for r in rows if r.status not in ("error", "diverged")]
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


# --------------------------------------------------------------------------- the table and the files


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
    """The table as CSV with full-precision values, 0/1 ``pareto`` and ``best`` columns, and
    ``message``: why a trial ended as it did (a diverged trial's, as raysr.train says it), else empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*columns, "best", "message"])
    for r in rows:
        writer.writerow([*row_values(r, columns, exact=True)[:-1], int(r.pareto), int(r.best), r.message])
    return out.getvalue()


def best_config_yaml(base: dict, best: TrialRow, search: str, metric: str) -> str:
    """The best trial's full config, runnable as ``python -m raysr.train --config best_config.yaml``."""
    cfg = trial_config(base, best.params, name=f"{search}_best")
    params = ", ".join(f"{k}={label(v)}" for k, v in best.params.items())
    return (f"# best trial {best.trial_id} of search {search} by {metric} ({best.metrics[metric]:.5g} at step "
            f"{best.step}): {params}\n# train it: python -m raysr.train --config best_config.yaml\n" + cfg.to_yaml())


def write_report(results, statuses: dict[str, str], *, space: SearchSpace, base: dict, metric: str, mode: str,
                 folder: str, name: str) -> int:
    """Print the table, write trials.csv and best_config.yaml into ``folder``; 0 when a best trial exists, else 1.

    results: Tune's ``Result`` of every trial; statuses: {trial id: status in the saved experiment state};
    base: the search's base config (``Config.to_dict()``); name: the search's name.
    """
    rows = [trial_row(r, statuses.get(Path(r.path).name), space, base, metric) for r in results]
    best, distance = rank_trials(rows, metric, mode, perceptual_comparable(space))
    sign = 1 if mode == "max" else -1

    def order(r: TrialRow):  # complete trials first, diverged and failed ones last, then best by the metric
        value = r.metrics.get(metric)
        return (r.status != "complete", r.status in ("diverged", "error"), value is None,
                0.0 if value is None else -sign * value)

    rows.sort(key=order)
    columns = table_columns(rows, space, metric)
    say(format_table(rows, columns))
    bicubic = next((r.metrics["psnr_bicubic"] for r in rows if "psnr_bicubic" in r.metrics), None)
    if bicubic is not None:  # the same validation set for every trial: one reference line
        say(f"bicubic upscaling of the same validation images: psnr {bicubic:.5g}")
    if distance:
        say(f"pareto *: no other compared trial has both a higher psnr and a lower {distance}")
    for r in rows:
        if r.status == "diverged":  # never compared: its last metrics were measured before the weights blew up
            say(f"{r.trial_id} diverged: {r.message}")
    write_bytes(join(folder, TRIALS_FILE), trials_csv(rows, columns).encode())
    say(f"raysr.tune: table  {join(folder, TRIALS_FILE)}")
    if best is None:
        say(f"raysr.tune: no trial reported {metric}; see the trials' errors under {folder}")
        return 1
    path = join(folder, BEST_CONFIG_FILE)
    write_bytes(path, best_config_yaml(base, best, name, metric).encode())
    say(f"raysr.tune: best   {best.trial_id}: {metric} {best.metrics[metric]:.5g}; its run: "
        f"{join(folder, RUNS_DIR, best.trial_id)}")
    say(f"raysr.tune: config {path}")
    fetch = f"aws s3 cp {path} . && " if is_s3(path) else ""
    say(f"raysr.tune: train it with: {fetch}python -m raysr.train --config {BEST_CONFIG_FILE if fetch else path}")
    return 0
