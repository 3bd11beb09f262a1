"""Validation off the training ranks' critical path (``run.validation=async``): a Ray actor scores
snapshots of the generator while training goes on, survives being killed, and rank 0 takes
over when the actor cannot be placed.

Real components: the session's local Ray on 127.0.0.1, demo shards and photos, the validator
process killed with SIGKILL. Every PSNR a run reports is checked against the generator.pth of
the checkpoint of the step it names, scored here.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from raysr.generator_file import load_generator
from raysr.config import load_config
from raysr.validation.pairs import load_validation
from raysr.models import generator_from_config
from raysr.scoring import bicubic_baseline, score_generator, validation_images
from raysr.validation.validator import Validator
from raysr.weights import cpu_state_dict
from test_train import read_reports, report_recorder

SCALE = 4


def val_images(val: str):
    return validation_images(load_validation(val, SCALE))


# --------------------------------------------------------------------------- without Ray


def test_a_snapshot_scores_as_the_generator_it_was_taken_from_while_that_trains_on(demo_data):
    cfg = load_config(overrides=[f"data.val={demo_data.val}", "model.generator.num_feat=8",
                                 "model.generator.num_block=1"])
    torch.manual_seed(0)
    g = generator_from_config(cfg.model.generator)
    images = val_images(demo_data.val)
    expected, expected_png = score_generator(g, images, SCALE)
    weights = cpu_state_dict(g)
    with torch.no_grad():  # training goes on after the snapshot was taken
        for p in g.parameters():
            p.mul_(0.5)
    validator = Validator(cfg, torch.device("cpu"), threads=1)
    assert validator.ready() == bicubic_baseline(images, SCALE)
    metrics, png = validator.score_weights(7, weights)
    assert {k: metrics[k] for k in expected} == expected and png == expected_png
    assert metrics["val_step"] == 7 and metrics["val_time_s"] > 0
    assert metrics["psnr_bicubic"] == validator.ready()["psnr_bicubic"]
    later, _ = validator.score(8, g)
    assert later["psnr"] != metrics["psnr"], "the halved weights score the same: the snapshot was not a copy"


# --------------------------------------------------------------------------- on Ray


def run_args(demo_data, storage: Path, name: str, *extra: str) -> list[str]:
    return [f"data.train={demo_data.train}", f"data.val={demo_data.val}", "data.num_workers=0",
            f"run.storage={storage}", f"run.name={name}", "train.ema_decay=0.5", *extra]


def fit_recorded(overrides: list[str], record: Path):
    from raysr.train import fit

    result = fit(load_config(overrides=overrides), callbacks=[report_recorder(record)])
    assert result is not None, "training failed; its error is printed above"
    return result, [r["metrics"][0] for r in read_reports(record)]


def assert_each_psnr_is_that_of_its_checkpoint(reports: list[dict], run: Path, val: str) -> list[int]:
    """Every validation reported scored the EMA generator of the step it names (its checkpoint's
    generator.pth, scored here); returns those steps."""
    images = val_images(val)
    steps = []
    for m in reports:
        if "psnr" not in m:
            continue
        g = load_generator(str(run / f"checkpoint_{m['val_step']:08d}" / "generator.pth"))
        expected, _ = score_generator(g, images, SCALE)
        assert m["psnr"] == expected["psnr"] and m["ssim"] == expected["ssim"], f"step {m['val_step']}"
        steps.append(m["val_step"])
    return steps


def kill_validator_during_a_validation(stop: threading.Event, killed: list):
    """SIGKILL the validator's process once it is scoring (Ray's task state says so)."""
    import ray
    from ray.util.state import list_actors, list_tasks

    address = ray.get_runtime_context().gcs_address  # this session's Ray, whatever else runs on the machine
    while not stop.is_set():
        running = list_tasks(address=address, filters=[("name", "=", "Validator.score_weights"),
                                                       ("state", "=", "RUNNING")])
        actors = list_actors(address=address, filters=[("class_name", "=", "Validator"), ("state", "=", "ALIVE")])
        if running and actors:
            os.kill(actors[0].pid, signal.SIGKILL)
            killed.append(actors[0].pid)
            return
        time.sleep(0.2)


def test_training_goes_on_while_a_validator_scores_and_survives_being_killed(ray_local, demo_data, tmp_path):
    """1 worker + a 1-CPU validator: the ranks wait only for the weight copy at validation steps,
    each validation comes back at a later report and scores that step's weights, and a
    validator killed mid-validation is restarted by Ray and its validation redone."""
    total, every = 60, 20
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_validator_during_a_validation, args=(stop, killed), daemon=True)
    killer.start()
    try:
        # the demo's full photos: a validation of the tests' small crops could end between two polls
        result, reports = fit_recorded(run_args(demo_data, tmp_path, "async", f"train.total_steps={total}",
                                                f"run.val_every={every}", f"run.checkpoint_every={every}",
                                                "run.log_every=5", f"data.val={demo_data.photos}"),
                                       tmp_path / "reports.jsonl")
    finally:
        stop.set()
        killer.join()
    assert killed, "the validator was never seen scoring: nothing was killed"
    assert result.metrics["step"] == total and [m["step"] for m in reports] == list(range(5, total + 1, 5))
    validated = assert_each_psnr_is_that_of_its_checkpoint(reports, tmp_path / "async", demo_data.photos)
    # every validation step was scored (the killed one again, by the restarted actor) or replaced
    # by a newer one while the validator was busy, and the last one is always scored
    assert validated == sorted(set(validated)) and validated[-1] == total
    # (two finishing before one report: the report carries the newer, val_done counts both)
    assert reports[-1]["val_done"] + reports[-1]["val_skipped"] == total // every
    assert len(validated) <= reports[-1]["val_done"]
    assert [m["val_done"] for m in reports] == sorted(m["val_done"] for m in reports)
    assert all(m["val_step"] <= m["step"] for m in reports if "psnr" in m)
    scored_in = {m["val_step"]: m["val_time_s"] for m in reports if "psnr" in m}
    for m in reports:  # at a validation step (not the last, which waits for all) the ranks only copy
        # weights and go on: that step's scores can only come back at a later report (inline, or had
        # rank 0 waited for the actor, the report of step S would carry val_step == S), and the
        # ranks were blocked for less than that very validation took the actor
        if m["step"] % every == 0 and m["step"] < total:
            assert m.get("val_step") != m["step"], m
            if m["step"] in scored_in:
                assert m["val_block_s"] < scored_in[m["step"]], m
    final = (tmp_path / "async" / f"checkpoint_{total:08d}")
    assert (final / "comparison.png").is_file()


def test_rank_0_validates_while_the_validator_cannot_be_placed(ray_local, demo_data, tmp_path, capfd, monkeypatch):
    """An actor asking for 64 CPUs is never placed here; past run.validation_wait_s rank 0 scores each due
    validation itself, at its own step. (On raysr's own local Ray this is seen before the start;
    the flag makes the run behave as on a cluster, where an autoscaler might still add the node.)"""
    import raysr.ray_setup

    monkeypatch.setattr(raysr.ray_setup, "STARTED_LOCAL_RAY", False)
    total = 6
    _, reports = fit_recorded(run_args(demo_data, tmp_path, "unplaced", "model.generator.num_feat=8",
                                       "model.generator.num_block=1", "data.batch_size=2", "data.gt_size=32",
                                       f"train.total_steps={total}", "run.val_every=3", "run.checkpoint_every=3",
                                       "run.log_every=3", "run.validation_resources={CPU: 64}",
                                       "run.validation_wait_s=0"), tmp_path / "reports.jsonl")
    assert [(m["step"], m.get("val_step")) for m in reports] == [(3, 3), (6, 6)]
    assert assert_each_psnr_is_that_of_its_checkpoint(reports, tmp_path / "unplaced", demo_data.val) == [3, 6]
    out = capfd.readouterr().out
    assert out.count("the validation actor ({'CPU': 64.0}) has not been placed after run.validation_wait_s=0 s; "
                     "rank 0 validates until it is") == 1


def test_a_validator_that_cannot_be_built_never_stops_training(ray_local, demo_data, tmp_path, capfd):
    """The validation folder holds only an 8x8 photo: the Validator raises in its constructor (scale 4's
    crop_border leaves no pixel), in the actor and again in rank 0. Each validation is skipped and
    counted, the cause is said once, and the run ends at its last step with every checkpoint."""
    from conftest import synthetic_image
    from PIL import Image

    val = tmp_path / "tiny_val"
    val.mkdir()
    Image.fromarray(synthetic_image(8, 8)).save(val / "tiny.png")
    total = 4
    result, reports = fit_recorded(run_args(demo_data, tmp_path, "unbuildable", "model.generator.num_feat=8",
                                            "model.generator.num_block=1", "data.batch_size=2", "data.gt_size=32",
                                            f"data.val={val}", f"train.total_steps={total}", "run.val_every=2",
                                            "run.checkpoint_every=2", "run.log_every=2"), tmp_path / "reports.jsonl")
    assert result.metrics["step"] == total and [m["step"] for m in reports] == [2, 4]
    assert all("psnr" not in m for m in reports) and reports[-1]["val_done"] == 0
    # each of the 2 validations failed, or was replaced by the newer one while the actor was starting
    assert reports[-1]["val_failed"] >= 1 and reports[-1]["val_failed"] + reports[-1]["val_skipped"] == 2
    assert sorted(p.name for p in (tmp_path / "unbuildable").glob("checkpoint_0*")) == \
        ["checkpoint_00000002", "checkpoint_00000004"]
    out = capfd.readouterr().out
    assert out.count("failed: ") == 1 and "crop_border=4 leaves less than 1x1 pixels" in out, out[-3000:]
    assert "the validation actor could not start" in out
    assert "raysr: images" not in out  # no validation finished, so no comparison image to point at


def test_on_its_own_local_ray_a_validator_that_cannot_fit_means_inline(ray_local, capsys, monkeypatch):
    import raysr.ray_setup
    from raysr.ray_setup import validation_for_local_ray

    monkeypatch.setattr(raysr.ray_setup, "STARTED_LOCAL_RAY", True)
    cpus = ray_local.cluster_resources()["CPU"]
    fits = load_config(overrides=["run.num_workers=1", f"run.validation_resources={{CPU: {cpus - 1}}}"])
    assert validation_for_local_ray(fits) is fits
    too_big = load_config(overrides=["run.num_workers=1", f"run.validation_resources={{CPU: {cpus}}}"])
    assert validation_for_local_ray(too_big).run.validation == "inline"
    out = capsys.readouterr().out
    assert "does not fit beside 1 worker(s) on this machine" in out
    assert f"set run.validation_resources={{CPU: {cpus - 1:g}}} (what is left here" in out  # cpus - 1 worker
    gpu = load_config(overrides=["run.validation_resources={GPU: 1}"])
    assert validation_for_local_ray(gpu).run.validation == "inline"  # no GPU here
    with_driver = load_config(overrides=["run.num_workers=1", f"run.validation_resources={{CPU: {cpus - 1}}}"])
    assert validation_for_local_ray(with_driver, other_cpus=0.1).run.validation == "inline"
    assert f"set run.validation_resources={{CPU: {cpus - 1.1:g}}}" in capsys.readouterr().out
    monkeypatch.setattr(raysr.ray_setup, "STARTED_LOCAL_RAY", False)  # a cluster may grow: left to the wait
    assert validation_for_local_ray(too_big) is too_big


@pytest.mark.parametrize("overrides, message", [
    (["run.validation_resources={cpu: 1}"], "Ray names this resource CPU; write {CPU: 1}"),
    (["run.validation_resources={GPU: -1}"], "run.validation_resources.GPU: -1.0 must be >= 0"),
    (["run.validation_resources={}"], "expected a non-empty mapping like {CPU: 1}"),
    (["run.validation_wait_s=-1"], "run.validation_wait_s: -1.0 must be >= 0"),
    (["run.validation=later"], "run.validation: 'later' is not allowed; choose one of ['async', 'inline']"),
])
def test_validation_config_errors(overrides, message):
    from raysr.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=overrides)


def test_progress_and_validation_lines_name_the_step_a_validation_scored():
    from raysr.runlog import progress_line, validation_line

    m = {"step": 60, "step_time_s": 0.5, "loss_pix": 0.0123, "psnr": 27.314, "psnr_bicubic": 26.694,
         "val_step": 50, "lr": 2e-4, "crops_per_s": 12.34, "data_wait_frac": 0.1}
    assert progress_line(100, m) == ("raysr: step 60/100 | loss_pix 0.0123 | psnr 27.31 (bicubic 26.69) at step 50"
                                     " | lr 2.00e-04 | 12.3 crops/s | data 10% | ETA 0m20s")  # 40 steps x 0.5 s
    assert "at step" not in progress_line(100, {**m, "val_step": 60})  # inline: the report's own step
    v = {"psnr": 27.314, "psnr_bicubic": 26.694, "ssim": 0.81234, "lpips": 0.2345, "val_step": 50, "val_time_s": 9.06}
    assert validation_line(v) == ("raysr: validation of step 50: psnr 27.31 (bicubic 26.69) | ssim 0.8123 | "
                                  "lpips 0.2345 | 9.1 s")
