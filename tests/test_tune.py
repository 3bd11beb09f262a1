"""``python -m raysr.tune``: space files, ASHA/Pareto/ranking logic, and real searches on the local Ray.

The searches run real raysr trainings (a tiny SRResNet on shards cut from synthetic
photos): one, with ASHA, finishes and writes its table and best_config.yaml; one is
interrupted with Ctrl-C and resumed on the session's ``ray_local``. Every number the tests
expect is computed here by hand or from the files the runs wrote.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from conftest import synthetic_image
from raysr.config import ConfigError, load_config
from raysr.tune.cli import main
from raysr.tune.report import TrialRow, pareto_front, rank_trials, write_report
from raysr.tune.space import parse_space, trial_config
from raysr.tune.trial import asha_schedule, trial_resources

REPO = Path(__file__).resolve().parents[1]
SPACE = "optim.g.lr: {loguniform: [1.0e-4, 1.0e-3]}\nmodel.generator.num_block: {choice: [1, 2]}\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """Training shards (48 px sub-images of four synthetic photos) and two validation photos."""
    from raysr.data.make_shards import make_shards

    root = tmp_path_factory.mktemp("tune_data")
    (root / "photos").mkdir()
    (root / "val").mkdir()
    for i in range(4):
        Image.fromarray(synthetic_image(96, 96, i)).save(root / "photos" / f"{i}.png")
    for i in range(2):
        Image.fromarray(synthetic_image(64, 64, 10 + i)).save(root / "val" / f"{i}.png")
    make_shards([str(root / "photos")], str(root / "shards"), crop_size=48, step=48, min_size=16, workers=1,
                progress=False)
    space = root / "space.yaml"
    space.write_text(SPACE)
    return SimpleNamespace(train=str(root / "shards"), val=str(root / "val"), space=str(space))


def tiny_args(data: SimpleNamespace, storage: Path, *, total_steps: int, val_every: int) -> list[str]:
    """Arguments that make each trial a seconds-long quickstart training on one CPU worker."""
    sets = ["model.generator.num_feat=8", "model.generator.num_block=1", f"train.total_steps={total_steps}",
            f"run.val_every={val_every}", f"run.checkpoint_every={val_every}", f"run.log_every={val_every}",
            "data.batch_size=2", "data.gt_size=32", "data.num_workers=0", f"data.train={data.train}",
            f"data.val={data.val}", f"run.storage={storage}"]
    return ["--space", data.space, "--preset", "quickstart", *(f"--set={s}" for s in sets)]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- space files


def test_space_distributions_sample_what_the_file_says():
    space = parse_space("a.lr: {loguniform: [1e-4, 1.0e-2]}\n"  # YAML reads 1e-4 as a string
                        "a.w: {uniform: [-1, 1]}\n"
                        "a.n: {randint: [1, 3]}\n"
                        "a.layers: {choice: [{conv2_2: 1.0}, {conv5_4: 1.0}]}\n"
                        "a.depth: {grid: [6, 23]}\n", "inline")
    lr, w, n, layers, depth = space.dims
    assert (lr.dist, lr.values) == ("loguniform", (1e-4, 1e-2))
    assert (w.dist, w.values) == ("uniform", (-1.0, 1.0))
    assert (n.dist, n.values) == ("randint", (1, 3))
    tune_space = space.param_space()
    lr_samples = tune_space["a.lr"].sample(size=400)
    assert all(1e-4 <= v <= 1e-2 for v in lr_samples)
    # log-uniform: log10 is uniform on [-4, -2], so its mean is -3 (sd of the mean ~0.03)
    assert abs(sum(math.log10(v) for v in lr_samples) / 400 + 3) < 0.15
    # randint bounds are inclusive in the file; Tune's upper bound is exclusive
    assert set(tune_space["a.n"].sample(size=300)) == {1, 2, 3}
    # non-scalar options travel as text and come back as the mappings the config needs
    texts = tune_space["a.layers"].categories
    assert texts == ["{conv2_2: 1.0}", "{conv5_4: 1.0}"]
    assert [layers.decode(t) for t in texts] == [{"conv2_2": 1.0}, {"conv5_4": 1.0}]
    assert tune_space["a.depth"] == {"grid_search": [6, 23]}
    assert space.decode({"a.lr": 0.5, "a.w": 0.0, "a.n": 2, "a.layers": "{conv5_4: 1.0}", "a.depth": 6}) == \
        {"a.lr": 0.5, "a.w": 0.0, "a.n": 2, "a.layers": {"conv5_4": 1.0}, "a.depth": 6}


def test_space_numbers_read_as_people_type_them():
    # YAML 1.1 reads 1e-1, 5E-5 and 1.0e0 (an exponent without a dot or a sign) as strings; at any depth
    # of a space they are the numbers written
    space = parse_space("loss.perceptual.layers: {choice: [{conv2_2: 1e-1}, {conv5_4: 1.0e0}]}\n"
                        "optim.g.lr: {loguniform: [5E-5, 1.0e-3]}\n", "inline")
    layers, lr = space.dims
    assert layers.values == ({"conv2_2": 0.1}, {"conv5_4": 1.0}) and lr.values == (5e-5, 1e-3)


def test_trial_key_below_a_value_names_the_key():
    base = load_config(preset="quickstart").to_dict()
    with pytest.raises(ConfigError, match=r"^unknown key model\.generator\.num_block\.depth: "
                                          r"model\.generator\.num_block is a value, not a section"):
        trial_config(base, {"model.generator.num_block.depth": 2})


BAD_SPACES = [
    ("model.generator.nm_block: {choice: [1, 2]}", "unknown key model.generator.nm_block"),
    ("model.generator.num_block.depth: {choice: [1, 2]}", "model.generator.num_block is a value, not a section"),
    ("model.generator.num_block: {choice: [0, 2]}", "model.generator.num_block: 0 must be > 0"),
    ("model.generator.num_block: {uniform: [4, 23]}", "is an integer but uniform samples fractions"),
    ("optim.g.lr: {loguniform: [1.0e-2, 1.0e-4]}", "bounds must be increasing"),
    ("optim.g.lr: {loguniform: [0, 1.0e-4]}", "loguniform bounds must be > 0"),
    ("optim.g.lr: {lognormal: [1.0e-4, 1.0e-2]}", "unknown distribution 'lognormal'"),
    ("optim.g.lr: {uniform: [1.0e-4]}", "uniform needs [low, high]"),
    ("optim.g.lr: {choice: [1.0e-4]}", "choice needs a list of at least two values"),
    ("optim.g.lr: 1.0e-4", "expected one distribution"),
    ("run.name: {choice: [a, b]}", "cannot be searched"),
    ("loss.pixel.type: {choice: [l1, l3]}", "'l3' is not allowed"),
    ("[1, 2]", "must map config keys to distributions"),
]


@pytest.mark.parametrize("text,message", BAD_SPACES)
def test_bad_space_file_exits_2_with_the_reason(tmp_path, capsys, text, message):
    space = tmp_path / "bad.yaml"
    space.write_text(text + "\n")
    assert main(["--space", str(space), "--preset", "quickstart", "--set", f"run.storage={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raysr.tune: error: ") and message in err, err
    assert list(tmp_path.iterdir()) == [space]  # refused before anything was written


def test_missing_space_file_exits_2(tmp_path, capsys):
    assert main(["--space", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


SHIPPED = {  # space file -> (preset it is written for, expected distributions from the issue and papers)
    "srgan": ("srgan_x4", {"loss.adversarial.weight": ("loguniform", (1e-4, 1e-2)),
                           "loss.perceptual.layers": ("choice", ({"conv2_2": 1.0}, {"conv5_4": 1.0}))}),
    "esrgan": ("esrgan_x4", {"loss.adversarial.weight": ("loguniform", (1e-3, 5e-2)),
                             "loss.pixel.weight": ("loguniform", (1e-3, 1e-1)),
                             "model.generator.num_block": ("choice", (6, 12, 16, 23))}),
    "depth_psnr": ("esrgan_psnr_x4", {"model.generator.num_block": ("grid", (6, 12, 16, 23))}),
    "lr_psnr": ("srresnet_x4", {"optim.g.lr": ("loguniform", (5e-5, 1e-3)),
                                "model.generator.num_block": ("randint", (4, 23))}),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_spaces_validate_against_their_presets(name):
    from raysr.tune.cli import build_parser, prepare

    preset, expected = SHIPPED[name]
    args = build_parser().parse_args(["--space", str(REPO / "tune_spaces" / f"{name}.yaml"), "--preset", preset,
                                      "--set", "loss.perceptual.allow_random_weights=true"])
    search = prepare(args)
    assert {d.key: (d.dist, d.values) for d in search.space.dims} == expected
    assert search.num_samples == (1 if name == "depth_psnr" else 8)  # a grid runs each value once
    assert search.metric == "psnr" and search.mode == "max"


def test_srgan_paper_weight_inside_its_range():
    _, expected = SHIPPED["srgan"]
    low, high = expected["loss.adversarial.weight"][1]
    assert low < 1e-3 < high  # the paper's 10^-3 is inside the searched range
    low, high = SHIPPED["esrgan"][1]["loss.adversarial.weight"][1]
    assert low < 5e-3 < high  # ESRGAN's lambda
    low, high = SHIPPED["esrgan"][1]["loss.pixel.weight"][1]
    assert low < 1e-2 < high  # ESRGAN's eta


@pytest.mark.parametrize("argv,message", [
    (["--metric", "perceptual"], "only when the perceptual loss is on"),
    (["--metric", "loss_g"], "give --mode min or --mode max"),
    (["--set", "train.total_steps=100", "--set", "run.val_every=100"], "--scheduler asha needs validations"),
    (["--set", "train.init_from={space}"], "changes the generator's shape"),  # an existing file
    (["--num-samples", "0"], "--num-samples 0 must be >= 1"),
])
def test_bad_search_settings_exit_2(tmp_path, capsys, argv, message):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    assert main(["--space", str(space), "--preset", "quickstart", *(a.format(space=space) for a in argv)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("space_text,preset,sets,message", [
    ("loss.adversarial.weight: {loguniform: [1.0e-4, 1.0e-2]}\n", "esrgan_psnr_x4", [],
     "loss.adversarial.weight cannot change these trials: the adversarial loss exists only in the GAN phase"),
    ("model.discriminator.num_feat: {choice: [32, 64]}\n", "quickstart", [],
     "model.discriminator.num_feat cannot change these trials: there is no discriminator"),
    ("loss.perceptual.layers: {choice: [{conv5_4: 1.0}, {conv2_2: 1.0}]}\n", "esrgan_x4",
     ["--set", "loss.perceptual.weight=0"], "the perceptual loss is off in the base config"),
    ("model.generator.num_grow_ch: {choice: [16, 32]}\n", "srresnet_x4", [],
     "only RRDBNet has a growth channel count, and the base config has model.generator.name=srresnet"),
    ("optim.schedule.milestones: {choice: [[100], [200]]}\n", "esrgan_psnr_x4", [],
     "they apply to the multistep schedule only, and the base config has optim.schedule.type=cosine_restart"),
])
def test_a_space_key_the_base_config_never_uses_exits_2(tmp_path, capsys, space_text, preset, sets, message):
    space = tmp_path / "space.yaml"
    space.write_text(space_text)
    argv = ["--space", str(space), "--preset", preset, "--set", "loss.perceptual.allow_random_weights=true", *sets]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_key_whose_governing_key_is_searched_too_is_accepted():
    from raysr.tune.space import unused_reason

    base = load_config(preset="quickstart").to_dict()
    assert unused_reason(base, "loss.adversarial.weight", {"loss.adversarial.weight"}) is not None
    assert unused_reason(base, "loss.adversarial.weight", {"loss.adversarial.weight", "train.phase"}) is None
    assert unused_reason(base, "model.generator.num_block", {"model.generator.num_block"}) is None


def test_perceptual_metric_refused_when_the_space_changes_how_it_is_measured(capsys):
    argv = ["--space", str(REPO / "tune_spaces" / "srgan.yaml"), "--preset", "srgan_x4", "--metric", "perceptual",
            "--set", "loss.perceptual.allow_random_weights=true"]
    assert main(argv) == 2
    assert "not comparable" in capsys.readouterr().err


def test_optuna_missing_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    assert main(["--space", str(space), "--search", "optuna"]) == 2
    assert "pip install optuna" in capsys.readouterr().err


# --------------------------------------------------------------------------- scheduler, resources, ranking


@pytest.mark.parametrize("total,val_every,expected", [
    (400_000, 5000, (25_000, 3)),  # 80 validations: first rung after 80 // 16 = 5 of them; 25k * 9 <= 400k
    (1_000_000, 5000, (60_000, 3)),  # 200 validations -> 12 of them
    (600, 200, (200, 2)),  # 3 validations: the first one; 200 * 9 > 600
    (4, 2, (2, 2)),
])
def test_asha_schedule(total, val_every, expected):
    assert asha_schedule(total, val_every) == expected


def test_asha_needs_an_early_validation():
    with pytest.raises(ConfigError, match="lower run.val_every"):
        asha_schedule(5000, 5000)


def test_trial_resources():
    cfg = load_config(preset="quickstart")  # 1 worker, use_gpu auto, a 1-CPU validation actor
    assert trial_resources(cfg, {"CPU": 2.0})[0] == 1  # 1 + 0.1 + 1 CPU per trial: too much, yet at least 1
    assert trial_resources(cfg, {"CPU": 16.0})[0] == 7  # floor(16 / 2.1)
    inline = load_config(preset="quickstart", overrides=["run.validation=inline"])
    assert trial_resources(inline, {"CPU": 16.0})[0] == 14  # floor(16 / 1.1)
    assert trial_resources(cfg, {"CPU": 64.0, "GPU": 8.0})[0] == 8  # GPU workers take no CPU
    cfg4 = load_config(preset="quickstart", overrides=["run.num_workers=4", "run.use_gpu=true"])
    assert trial_resources(cfg4, {"CPU": 64.0, "GPU": 8.0})[0] == 2
    assert trial_resources(cfg4, {"CPU": 4.0})[0] == 1  # nothing fits yet: an autoscaler adds nodes
    gpu_validator = load_config(preset="quickstart", overrides=["run.num_workers=3", "run.use_gpu=true",
                                                                "run.validation_resources={GPU: 1, CPU: 4}"])
    assert trial_resources(gpu_validator, {"CPU": 64.0, "GPU": 8.0})[0] == 2  # 4 GPUs per trial
    assert trial_resources(gpu_validator, {"CPU": 6.0, "GPU": 8.0})[0] == 1  # 4.1 CPUs per trial


def test_pareto_front():
    # (psnr up, distance down): (30, .2) is beaten by (31, .1); (29, .05) and (31, .1) trade off;
    # (28, .3) is beaten by all; (31, .1) twice: neither beats its twin
    points = [(30, 0.2), (31, 0.1), (29, 0.05), (28, 0.3), (31, 0.1)]
    assert pareto_front(points) == [False, True, True, False, True]


def row(trial_id, status, step, **metrics):
    return TrialRow(trial_id, status, step, {}, metrics)


def test_rank_trials_compares_only_finished_trials():
    rows = [row("a", "complete", 100, psnr=30.0, perceptual=0.2), row("b", "complete", 100, psnr=29.0, perceptual=0.1),
            row("c", "complete", 100, psnr=28.0, perceptual=0.3), row("d", "stopped", 20, psnr=31.0, perceptual=0.05),
            row("e", "error", None)]
    best, distance = rank_trials(rows, "psnr", "max")
    assert best.trial_id == "a" and distance == "perceptual"  # d has more PSNR but was stopped at step 20
    assert [r.pareto for r in rows] == [True, True, False, False, False]
    best, _ = rank_trials(rows, "perceptual", "min")
    assert best.trial_id == "b"
    # varied VGG layers: perceptual values are not comparable, the front is on PSNR alone
    for r in rows:
        r.pareto = r.best = False
    _, distance = rank_trials(rows, "psnr", "max", use_perceptual=False)
    assert distance is None and [r.pareto for r in rows] == [True, False, False, False, False]
    # LPIPS, when any trial has it, is the distance of the front
    rows = [row("a", "complete", 10, psnr=30.0, perceptual=0.1, lpips=0.3),
            row("b", "complete", 10, psnr=29.0, perceptual=0.2, lpips=0.2)]
    _, distance = rank_trials(rows, "psnr", "max")
    assert distance == "lpips" and [r.pareto for r in rows] == [True, True]


def test_rank_trials_of_an_interrupted_search_uses_the_unfinished():
    rows = [row("a", "unfinished", 20, psnr=25.0), row("b", "stopped", 40, psnr=26.0), row("c", "error", None)]
    best, distance = rank_trials(rows, "psnr", "max")
    assert best.trial_id == "b" and distance is None and [r.pareto for r in rows] == [False, True, False]
    assert rank_trials([row("c", "error", None)], "psnr", "max") == (None, None)


def tune_result(folder: Path, trial_id: str, lr: float, results: list[dict]) -> SimpleNamespace:
    """What write_report reads of a Tune ``Result``: the trial's config, its results, its folder."""
    import pandas as pd

    return SimpleNamespace(config={"optim.g.lr": lr}, metrics_dataframe=pd.DataFrame(results),
                           path=str(folder / trial_id), error=None)


def test_a_diverged_trial_is_shown_as_diverged_and_never_ranked(tmp_path, capsys):
    """An interrupted search (no trial complete): the trial that diverged at step 23 had the highest
    PSNR at step 20, yet the best is the stopped trial; the table and trials.csv say it diverged and why."""
    space = parse_space("optim.g.lr: {grid: [1.0e-4, 2.0e-4, 3.0e-4]}\n", "space.yaml")
    base = load_config(preset="quickstart", overrides=["train.total_steps=40"]).to_dict()
    why = "training diverged: 10 steps in a row had a NaN/inf loss or gradient, up to step 23 (hand-made)"
    results = [tune_result(tmp_path, "a", 1e-4, [{"step": 20, "psnr": 24.0}]),
               tune_result(tmp_path, "b", 3e-4, [{"step": 20, "psnr": 30.0},
                                                  {"step": 23, "psnr": math.nan, "diverged": why}]),
               tune_result(tmp_path, "c", 2e-4, [{"step": 20, "psnr": 26.0}])]
    statuses = {"a": "RUNNING", "b": "TERMINATED", "c": "TERMINATED"}
    assert write_report(results, statuses, space=space, base=base, metric="psnr", mode="max",
                        folder=str(tmp_path), name="s") == 0
    out = capsys.readouterr().out
    rows = {r["trial"]: r for r in read_csv(tmp_path / "trials.csv")}
    assert [(t, r["status"], r["step"], r["psnr"], r["pareto"], r["best"], r["message"]) for t, r in rows.items()] == [
        ("c", "stopped", "20", "26.0", "1", "1", ""), ("a", "unfinished", "20", "24.0", "0", "0", ""),
        ("b", "diverged", "23", "30.0", "0", "0", why)]
    assert f"b diverged: {why}" in out and "c (best)" in out
    assert load_config(config_file=str(tmp_path / "best_config.yaml")).optim.g.lr == 2e-4


# --------------------------------------------------------------------------- real searches


def run_cli(argv: list[str], address: str, interrupt_at: str | None = None) -> tuple[int, str]:
    """``python -m raysr.tune argv`` in a subprocess, a driver of the Ray at ``address`` (as a search run
    with ``ray job submit`` is); Ctrl-C once a line contains ``interrupt_at``. Returns (exit status, output).
    """
    env = {**os.environ, "RAY_ADDRESS": address}
    proc = subprocess.Popen([sys.executable, "-m", "raysr.tune", *argv], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if interrupt_at is not None and interrupt_at in line:
                proc.send_signal(signal.SIGINT)
                break
        lines.append(proc.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        lines.append(proc.communicate()[0])
    return proc.returncode, "".join(lines)


def test_interrupted_search_resumes_its_trial_from_the_checkpoint(ray_local, data, tmp_path, capsys):
    total, val_every = 1000, 100
    argv = [*tiny_args(data, tmp_path, total_steps=total, val_every=val_every), "--num-samples", "1",
            "--scheduler", "none", "--name", "cut", "--set", "run.validation=inline"]
    # Ctrl-C once the trial has validated (and checkpointed) at step 100. The search runs on the session's
    # Ray, which the driver it was interrupted in leaves as it was (its trial's actors and reservations go
    # with that driver), and the resume below runs there too. Inline validation: the trial's driver and
    # its worker take both CPUs of that Ray, and a driver that joins a Ray it did not start keeps async
    # validation, whose actor would wait there for a CPU.
    code, log = run_cli(argv, ray_local.get_runtime_context().gcs_address, interrupt_at=f"step {val_every}:")
    assert code == 130, log
    assert "search interrupted with 1 trial(s) unfinished" in log
    (trial,) = read_csv(tmp_path / "cut" / "trials.csv")
    assert trial["status"] == "unfinished" and int(trial["step"]) < total

    assert main([*argv, "--resume"]) == 0
    out = capsys.readouterr().out  # the driver's lines, and its trial worker's (Ray forwards them)
    assert f"resuming cut from {tmp_path / 'cut'}" in out
    (resumed,) = read_csv(tmp_path / "cut" / "trials.csv")
    assert resumed["trial"] == trial["trial"] and resumed["status"] == "complete" and resumed["step"] == str(total)
    # the trial's training went on from its last checkpoint (at or after the step Tune last heard of),
    # not from scratch
    found = re.search(rf"raysr: resumed {trial['trial']} at step (\d+) ", out)
    assert found, out[-3000:]
    resumed_at = int(found.group(1))
    assert int(trial["step"]) <= resumed_at < total and resumed_at % val_every == 0
    # Tune's record of the trial: whatever it wrote of the interrupted run (Ctrl-C may come before or
    # after its row of step 100 is written), then each validation of the resumed run once, to the end
    with open(tmp_path / "cut" / trial["trial"] / "progress.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == sorted(set(steps)) and steps[-1] == total, steps
    assert [s for s in steps if s > resumed_at] == list(range(resumed_at + val_every, total + 1, val_every)), steps
    checkpoints = sorted(p.name for p in (tmp_path / "cut" / "runs" / trial["trial"]).glob("checkpoint_0*"))
    assert checkpoints[-1] == f"checkpoint_{total:08d}"


def test_search_finishes_and_writes_table_and_best_config(ray_local, data, tmp_path, capsys):
    # Last in this file: if ASHA stops the second trial, Ray's cleaner frees its workers'
    # resources a little later, and no search of this file waits on them.
    from raysr.train import main as train_main

    # Two trials, one per gamma: the lr multiplied by 1e30 from the first step (milestone 0) makes
    # every loss from step 2 on inf, and train.max_nonfinite=1 stops that trial's run at step 2.
    space = tmp_path / "diverge.yaml"
    space.write_text(SPACE + "optim.schedule.gamma: {grid: [0.5, 1.0e30]}\n")
    argv = [*tiny_args(data, tmp_path, total_steps=4, val_every=2), "--space", str(space), "--num-samples", "1",
            "--set", "optim.schedule.milestones=[0]", "--set", "train.max_nonfinite=1", "--name", "tiny"]
    assert main(argv) == 0
    log = capsys.readouterr().out
    folder = tmp_path / "tiny"
    best_path = folder / "best_config.yaml"
    assert f"raysr.tune: config {best_path}" in log
    rows = read_csv(folder / "trials.csv")
    assert sorted(float(r["optim.schedule.gamma"]) for r in rows) == [0.5, 1e30]
    for r in rows:
        assert 1e-4 <= float(r["optim.g.lr"]) <= 1e-3 and r["model.generator.num_block"] in ("1", "2")
    (diverged,) = [r for r in rows if float(r["optim.schedule.gamma"]) == 1e30]
    (good,) = [r for r in rows if r is not diverged]
    # the diverged trial: marked, with the message raysr.train prints, never on the front or best;
    # its NaN result leaves ASHA's rung to the other trial, which runs to its last step
    assert (diverged["status"], diverged["step"], diverged["psnr"], diverged["pareto"], diverged["best"]) == \
        ("diverged", "2", "", "0", "0")
    assert diverged["message"].startswith("training diverged: 1 steps in a row had a NaN/inf loss or gradient, "
                                          "up to step 2") and "optim.g.lr" in diverged["message"]
    assert f"raysr.tune: trial {diverged['trial']} stopped: {diverged['message']}" in log
    assert f"{diverged['trial']} diverged: {diverged['message']}" in log
    assert not list((folder / "runs" / diverged["trial"]).glob("checkpoint_0*"))  # nothing finite to keep after step 1
    assert (good["status"], good["step"], good["pareto"], good["best"], good["message"]) == ("complete", "4", "1", "1", "")
    # the PSNR Tune saw is the one the trial's own run wrote into its checkpoint at that step
    checkpoint = folder / "runs" / good["trial"] / "checkpoint_00000004"
    assert (checkpoint / "generator.pth").is_file()
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    assert float(good["psnr"]) == metrics["psnr"] and 15 < metrics["psnr"] < 45
    assert f"bicubic upscaling of the same validation images: psnr {metrics['psnr_bicubic']:.5g}" in log

    cfg = load_config(config_file=str(best_path))
    assert cfg.optim.g.lr == float(good["optim.g.lr"]) and cfg.optim.schedule.gamma == 0.5
    assert cfg.model.generator.num_block == int(good["model.generator.num_block"])
    assert cfg.model.generator.num_feat == 8 and cfg.train.total_steps == 4  # the base config's --set values
    assert cfg.run.name == "tiny_best" and cfg.run.storage == str(tmp_path)
    assert cfg.data.train == [data.train] and cfg.data.val == data.val
    assert train_main(["--config", str(best_path), "--dry-run"]) == 0

    # the same name again: refused without --resume, before anything runs
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--resume", "--set", "run.seed=5"]) == 2
    assert "was started with base.run.seed=0" in capsys.readouterr().err
