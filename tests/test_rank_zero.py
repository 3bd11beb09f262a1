"""Rank 0's duties (raysr.rank_zero) and the validation queue in its inline mode, without Ray
running: what the worker loop hands them, what comes back into the report, what lands on disk.
The Ray side of both (the async actor, a killed validator) is in tests/test_validation.py."""

from __future__ import annotations

import json
import os

import torch

from raysr import run_checkpoint
from raysr.config import load_config
from raysr.engine import build_state
from raysr.rank_zero import OtherRank, RankZero
from raysr.scoring import score_generator, validation_images
from raysr.validation.pairs import load_validation
from raysr.validation.queue import ValidationQueue

# what Meter.summary() puts in every report
INTERVAL = {"loss_g": 0.5, "lr": 1e-4, "crops_per_s": 10.0, "data_wait_frac": 0.1, "step_time_s": 0.2}
TINY = ["model.generator.num_feat=8", "model.generator.num_block=1", "run.validation=inline", "train.ema_decay=0.5"]


def tiny_state(demo_data):
    cfg = load_config(overrides=TINY + [f"data.val={demo_data.val}", f"data.train={demo_data.train}"])
    torch.manual_seed(0)
    return cfg, build_state(cfg, torch.device("cpu"))


def test_inline_queue_scores_at_submit_and_hands_each_result_over_once(demo_data):
    cfg, state = tiny_state(demo_data)
    queue = ValidationQueue(cfg, torch.device("cpu"))
    queue.submit(3, state.g_eval)
    (metrics, png), = queue.collect()
    expected, expected_png = score_generator(state.g_eval, validation_images(load_validation(demo_data.val, 4)), 4)
    assert {k: metrics[k] for k in expected} == expected and png == expected_png
    assert metrics["val_step"] == 3 and queue.done == 1 and queue.skipped == 0
    assert queue.collect(wait=True) == [] and queue.done == 1  # handed over once
    queue.close()


def test_rank_zero_adds_the_validation_to_the_report_and_writes_the_checkpoint(demo_data, tmp_path, capsys):
    cfg, state = tiny_state(demo_data)
    run = str(tmp_path / "run")
    lead = RankZero(cfg, run, torch.device("cpu"))
    metrics = {"step": 2, **INTERVAL}
    lead.validate_and_log(2, state.g_eval, metrics, wait=False)
    assert metrics["val_step"] == 2 and metrics["val_done"] == 1 and metrics["val_skipped"] == 0
    assert metrics["val_block_s"] >= metrics["val_time_s"] > 0  # inline: the ranks waited for all of it
    assert "step 2/" in capsys.readouterr().out
    no_val = {"step": 3, **INTERVAL}
    lead.validate_and_log(3, None, no_val, wait=False)  # a log-only interval: no scores in its report
    assert "psnr" not in no_val and no_val["val_done"] == 1

    checkpoint = lead.checkpoint(state, no_val)
    files = set(os.listdir(checkpoint.path))
    assert files == {"state.pt", "generator.pth", "metrics.json", "comparison.png"}
    saved = json.loads(open(os.path.join(checkpoint.path, "metrics.json")).read())
    assert saved["step"] == 3 and saved["val_step"] == 2 and saved["psnr"] == metrics["psnr"]  # the newest validation
    assert run_checkpoint.read_state(checkpoint.path, "cpu")["step"] == state.step

    lead.diverged({"step": 4, **INTERVAL, "diverged_at": 4})
    assert run_checkpoint.pop_divergence(run) == {"step": 4, **INTERVAL, "diverged_at": 4}
    lead.close()


def test_other_ranks_do_none_of_it(demo_data, tmp_path, capsys):
    _, state = tiny_state(demo_data)
    other = OtherRank()
    metrics = {"step": 2}
    other.say("raysr: resumed")
    other.validate_and_log(2, state.g_eval, metrics, wait=True)
    assert other.checkpoint(state, metrics) is None  # the report of a rank that uploads no files
    other.diverged(metrics)
    other.close()
    assert metrics == {"step": 2} and capsys.readouterr().out == "" and list(tmp_path.iterdir()) == []


def test_a_failing_inline_validation_is_counted_and_said_once(demo_data, tmp_path, capsys):
    """A validation folder whose only photo is 8x8: at scale 4 nothing is left to score, so the
    Validator raises; each validation is skipped and counted, the checkpoint has no comparison."""
    from PIL import Image

    from conftest import synthetic_image

    val = tmp_path / "tiny_val"
    val.mkdir()
    Image.fromarray(synthetic_image(8, 8)).save(val / "tiny.png")
    cfg = load_config(overrides=TINY + [f"data.val={val}", f"data.train={demo_data.train}"])
    state = build_state(cfg, torch.device("cpu"))
    lead = RankZero(cfg, str(tmp_path / "run"), torch.device("cpu"))
    for step in (2, 4):
        metrics = {"step": step, **INTERVAL}
        lead.validate_and_log(step, state.g_eval, metrics, wait=step == 4)
        assert metrics["val_failed"] == step // 2 and metrics["val_done"] == 0 and "psnr" not in metrics
    out = capsys.readouterr().out
    assert out.count("validation of step 2 failed: ValueError: crop_border=4 leaves less than 1x1 pixels") == 1
    assert "validation of step 4 failed" not in out  # said once
    checkpoint = lead.checkpoint(state, metrics)
    assert set(os.listdir(checkpoint.path)) == {"state.pt", "generator.pth", "metrics.json"}
    lead.close()
