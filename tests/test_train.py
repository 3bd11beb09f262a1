"""``python -m raysr.train`` on Ray: GAN phase on two CPU workers with checkpoints in S3, resume, config
errors, and ``ray job submit`` to a ``ray start --head`` cluster.

Real components throughout: a local Ray on 127.0.0.1 (the session's ``ray_local``), the
moto S3 server, demo shards cut from scikit-image's sample photos. The networks are tiny
(RRDBNet with 8 features and 1 block) so a TorchTrainer fit costs about half a minute.
Every check compares what the run wrote against something computed here: the EMA
recursion from consecutive checkpoints, a float64 PSNR, the HR pixels of the validation
photo, the sums of squared weights of both DDP replicas.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from raysr import storage
from raysr.generator_file import load_generator
from raysr.config import load_config
from raysr.data import make_lr
from raysr.ops import imresize
from raysr.train import fit, main

CHECKPOINT_FILES = {"state.pt", "generator.pth", "metrics.json", "comparison.png"}
EMA_DECAY = 0.5  # large steps, so that the EMA recursion is far above float32 noise
SCALE = 4


def tiny_gan_overrides(data: SimpleNamespace, storage: str, name: str) -> list[str]:
    """``--set`` values that turn the ESRGAN preset into a seconds-long GAN run on 2 CPU workers."""
    return ["model.generator.num_feat=8", "model.generator.num_block=1", "model.generator.num_grow_ch=4",
            "model.discriminator.num_feat=8", "data.gt_size=96",
            "data.batch_size=2", "data.num_workers=0", "loss.perceptual.allow_random_weights=true",
            "loss.perceptual.layers={conv2_2: 1.0}", f"train.ema_decay={EMA_DECAY}",
            f"data.train={data.train}", f"data.val={data.val}", "run.num_workers=2",
            f"run.storage={storage}", f"run.name={name}", "run.checkpoint_every=1", "run.val_every=1"]


def report_recorder(path: Path):
    """A Ray Train callback appending every report (all ranks' metrics, the checkpoint path) to ``path``.

    Ray runs a copy of it inside its controller actor, so it hands results back through a file.
    """
    import ray.train

    class RecordReports(ray.train.UserCallback):  # local class: pickled by value for the controller
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps({"metrics": metrics, "checkpoint": checkpoint.path if checkpoint else None}) + "\n")

    return RecordReports()


def read_reports(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_gan(overrides: list[str], record: Path):
    """fit() the esrgan_x4 preset with ``overrides``; returns Ray's Result and the recorded reports."""
    result = fit(load_config(preset="esrgan_x4", overrides=overrides), callbacks=[report_recorder(record)])
    assert result is not None, "training failed; its error is printed above"
    return result, read_reports(record)


def checkpoint_keys(bucket: str, run: str) -> dict[int, set[str]]:
    """{step: file names} of every ``checkpoint_%08d`` directory of the run in the bucket."""
    found: dict[int, set[str]] = {}
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"runs/{run}/")
    for page in pages:
        for obj in page.get("Contents", []):
            parts = obj["Key"].split("/")
            if len(parts) == 4 and parts[2].startswith("checkpoint_") and parts[3]:
                found.setdefault(int(parts[2][len("checkpoint_"):]), set()).add(parts[3])
    return found


def download_checkpoint(bucket: str, run: str, step: int) -> dict:
    """The four files of one checkpoint, read back from S3 and decoded."""
    base = f"s3://{bucket}/runs/{run}/checkpoint_{step:08d}"

    def load(name):
        return torch.load(io.BytesIO(storage.read_bytes(f"{base}/{name}")), map_location="cpu", weights_only=True)

    return {"state": load("state.pt"), "generator": load("generator.pth"),
            "metrics": json.loads(storage.read_bytes(f"{base}/metrics.json")),
            "comparison": np.asarray(Image.open(io.BytesIO(storage.read_bytes(f"{base}/comparison.png"))))}


@pytest.fixture(scope="module")
def gan_run(ray_local, s3_endpoint, demo_data, tmp_path_factory) -> SimpleNamespace:
    """A 4-step GAN run on 2 workers, checkpointing every step to S3, read back right after it ends
    (the resume test later adds to the same run)."""
    bucket = "raysr-train-gan"
    storage.s3_client().create_bucket(Bucket=bucket)
    overrides = tiny_gan_overrides(demo_data, f"s3://{bucket}/runs", "gan2w")
    record = tmp_path_factory.mktemp("gan_reports") / "reports.jsonl"
    result, reports = run_gan(overrides + ["train.total_steps=4", "run.log_every=2"], record)
    files = checkpoint_keys(bucket, "gan2w")
    return SimpleNamespace(bucket=bucket, name="gan2w", overrides=overrides, result=result, reports=reports,
                           files=files, ckpt={step: download_checkpoint(bucket, "gan2w", step) for step in files})


def assert_weights_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def assert_ema_recursion(ema_prev: dict, g_now: dict, ema_now: dict, what: str) -> None:
    """ema_k = d * ema_(k-1) + (1 - d) * g_k, checked in float64."""
    for key in ema_now:
        expected = EMA_DECAY * ema_prev[key].double() + (1 - EMA_DECAY) * g_now[key].double()
        torch.testing.assert_close(ema_now[key].double(), expected, rtol=0, atol=1e-6, msg=f"{what}: {key}")


def sum_of_squares(state_dict: dict) -> float:
    return float(sum(v.double().pow(2).sum() for v in state_dict.values()))


def adam_steps(optimizer_state: dict) -> set[int]:
    return {int(s["step"]) for s in optimizer_state["state"].values()}


# --------------------------------------------------------------------------- two workers, GAN phase, S3


def test_every_checkpoint_lands_in_s3_with_all_four_files(gan_run):
    assert sorted(gan_run.files) == [1, 2, 3, 4]
    for step, names in gan_run.files.items():
        assert names == CHECKPOINT_FILES, f"checkpoint_{step:08d}"
    assert gan_run.result.metrics["step"] == 4
    assert gan_run.result.checkpoint.path.rstrip("/").endswith(f"{gan_run.bucket}/runs/gan2w/checkpoint_00000004")


def test_metrics_json_has_the_step_and_finite_losses(gan_run):
    rank0 = {r["metrics"][0]["step"]: r["metrics"][0] for r in gan_run.reports}
    for step, ckpt in gan_run.ckpt.items():
        m = ckpt["metrics"]
        assert m["step"] == step
        for key in ("loss_g", "loss_pix", "loss_percep", "loss_adv", "loss_d", "d_real", "d_fake", "lr",
                    "psnr", "ssim", "psnr_bicubic", "ssim_bicubic", "crops_per_s", "data_wait_frac"):
            assert math.isfinite(m[key]), f"step {step}: {key} = {m[key]}"
        assert m["loss_g"] > 0 and m["loss_d"] > 0
        assert 0 < m["ssim"] <= 1 and 0 < m["ssim_bicubic"] <= 1
        assert 0 <= m["data_wait_frac"] <= 1 and m["skipped"] == 0
        assert m["checkpoint_block_s"] >= 0 and (step == 1 or m["checkpoint_block_s"] > 0)  # the previous one's wait
        assert m["lr"] == pytest.approx(1e-4)  # esrgan_x4: Adam 1e-4, first halving at 50k
        assert m == rank0[step], "metrics.json must hold what rank 0 reported for that step"


def test_validation_psnr_is_the_y_channel_psnr_of_the_ema_generator(gan_run, demo_data):
    """metrics.json's psnr, recomputed here in float64: SR of G_ema (generator.pth's params_ema) on the
    held-out photos (GTmod, LR = 8-bit MATLAB bicubic), uint8-quantised, Y = 16 + 65.481 R + 128.553 G
    + 24.966 B, scale pixels cropped; the bicubic baseline likewise."""
    ckpt = gan_run.ckpt[4]
    g = load_generator(f"s3://{gan_run.bucket}/runs/gan2w/checkpoint_00000004/generator.pth")
    psnrs, bicubic_psnrs = [], []
    for path in sorted(Path(demo_data.val).iterdir()):
        hr_u8 = gt_mod(path)
        hr = torch.from_numpy(hr_u8.transpose(2, 0, 1).copy()).float() / 255
        lr = make_lr(hr, SCALE)
        with torch.no_grad():
            sr = g(lr[None])[0]
        psnrs.append(psnr_y_reference(sr, hr_u8))
        bicubic_psnrs.append(psnr_y_reference(imresize(lr, SCALE), hr_u8))
    assert ckpt["metrics"]["psnr"] == pytest.approx(np.mean(psnrs), abs=0.01)
    assert ckpt["metrics"]["psnr_bicubic"] == pytest.approx(np.mean(bicubic_psnrs), abs=0.01)


def test_validation_psnr_equals_raysr_evaluate_on_the_same_folder(gan_run, demo_data, tmp_path):
    """What a run reports is what ``raysr.evaluate`` says of its generator.pth on the validation folder."""
    from raysr.evaluate import main as evaluate_main

    model = f"s3://{gan_run.bucket}/runs/gan2w/checkpoint_00000004/generator.pth"
    assert evaluate_main(["--hr", demo_data.val, "--scale", str(SCALE), "--model", model,
                          "--json", str(tmp_path / "e.json"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    metrics = gan_run.ckpt[4]["metrics"]
    assert metrics["psnr"] == report["mean"]["psnr_y"] and metrics["ssim"] == report["mean"]["ssim_y"]
    assert metrics["psnr_bicubic"] == report["bicubic"]["mean"]["psnr_y"]


def gt_mod(path: Path) -> np.ndarray:
    """The (H,W,3) uint8 photo at ``path``, its bottom/right cut to multiples of SCALE (benchmarks' GTmod)."""
    hr = np.asarray(Image.open(path).convert("RGB"))
    return hr[:hr.shape[0] // SCALE * SCALE, :hr.shape[1] // SCALE * SCALE]


def psnr_y_reference(sr: torch.Tensor, hr_u8: np.ndarray) -> float:
    """PSNR (dB) on Y of (3,H,W) float ``sr`` vs (H,W,3) uint8 ``hr_u8``, crop SCALE, in float64."""
    levels = np.round(np.clip(sr.double().numpy().transpose(1, 2, 0), 0, 1) * 255)

    def y(rgb255):
        rgb = rgb255.astype(np.float64) / 255
        return (16 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2])[SCALE:-SCALE, SCALE:-SCALE]

    mse = np.mean((y(levels) - y(hr_u8)) ** 2)
    return 10 * math.log10(255 ** 2 / mse)


def test_comparison_png_is_bicubic_sr_hr_of_the_first_validation_photo(gan_run, demo_data):
    """The centre of the photo, at most 256 px a side: this photo is wider than that and less tall,
    so its full height and the middle 256 columns."""
    hr = gt_mod(sorted(Path(demo_data.val).iterdir())[0])
    assert hr.shape[0] < 256 < hr.shape[1]
    h, w = hr.shape[0], 256
    left = (hr.shape[1] - w) // 2
    png = gan_run.ckpt[4]["comparison"]
    assert png.shape == (h, 3 * w, 3)
    np.testing.assert_array_equal(png[:, 2 * w:], hr[:, left:left + w])
    assert not np.array_equal(png[:, :w], png[:, w:2 * w]), "bicubic and SR tiles are identical"


def test_state_pt_holds_the_whole_training_state(gan_run):
    state = gan_run.ckpt[4]["state"]
    assert state["step"] == 4
    assert {"g", "g_ema", "d", "opt_g", "opt_d", "sched_g", "sched_d", "ranks", "config"} <= state.keys()
    assert state["config"]["train"]["total_steps"] == 4
    assert adam_steps(state["opt_g"]) == {4} and adam_steps(state["opt_d"]) == {4}
    assert any(not torch.equal(state["g"][k], state["g_ema"][k]) for k in state["g"]), "EMA == G"
    for step in (2, 3, 4):  # G_ema follows the EMA recursion over the checkpointed G of every step
        assert_ema_recursion(gan_run.ckpt[step - 1]["state"]["g_ema"], gan_run.ckpt[step]["state"]["g"],
                             gan_run.ckpt[step]["state"]["g_ema"], f"step {step}")


def test_generator_pth_has_basicsr_params_and_params_ema(gan_run):
    ckpt = gan_run.ckpt[4]
    # BasicSR / Real-ESRGAN read "params" / "params_ema"; raysr adds the architecture beside them.
    assert {"params", "params_ema"} <= set(ckpt["generator"])
    assert ckpt["generator"]["arch"] == "rrdbnet"
    assert {k: ckpt["generator"]["kwargs"][k] for k in ("num_feat", "num_block", "num_grow_ch", "scale")} == \
        {"num_feat": 8, "num_block": 1, "num_grow_ch": 4, "scale": 4}
    assert_weights_equal(ckpt["generator"]["params"], ckpt["state"]["g"], "params vs state.pt g")
    assert_weights_equal(ckpt["generator"]["params_ema"], ckpt["state"]["g_ema"], "params_ema vs state.pt g_ema")
    g = load_generator(f"s3://{gan_run.bucket}/runs/gan2w/checkpoint_00000004/generator.pth")
    assert_weights_equal(g.state_dict(), ckpt["state"]["g_ema"], "load_generator (prefers params_ema)")
    assert g(torch.rand(1, 3, 10, 12)).shape == (1, 3, 40, 48)


def test_ddp_replicas_hold_identical_generator_weights(gan_run):
    steps = [r["metrics"][0]["step"] for r in gan_run.reports]
    assert steps == [1, 2, 3, 4]
    assert [r["checkpoint"].rstrip("/").rsplit("/", 1)[-1] for r in gan_run.reports] == \
        [f"checkpoint_{step:08d}" for step in steps]
    for report in gan_run.reports:
        rank0, rank1 = report["metrics"]
        step = rank0["step"]
        assert rank1["step"] == step
        # The ranks trained on different crops (their losses differ), yet hold the same G: DDP synced it.
        assert rank0["loss_g"] != rank1["loss_g"], f"step {step}: both ranks saw the same batch"
        assert rank0["g_fingerprint"] == rank1["g_fingerprint"], f"step {step}: replicas diverged"
        assert rank0["g_fingerprint"] == pytest.approx(sum_of_squares(gan_run.ckpt[step]["state"]["g"]), rel=1e-12)
    fingerprints = [r["metrics"][0]["g_fingerprint"] for r in gan_run.reports]
    assert len(set(fingerprints)) == 4, "G did not change between steps"


def test_rerun_with_the_same_name_resumes_and_keeps_the_last_checkpoints(gan_run, tmp_path):
    first = gan_run.ckpt
    record = tmp_path / "reports.jsonl"
    result, reports = run_gan(gan_run.overrides + ["train.total_steps=6", "run.log_every=1", "run.keep_checkpoints=3"],
                              record)
    # Steps 1-4 are not redone: the second run's first report is step 5.
    assert [[m["step"] for m in r["metrics"]] for r in reports] == [[5, 5], [6, 6]]
    assert result.metrics["step"] == 6
    for report in reports:
        assert report["metrics"][0]["g_fingerprint"] == report["metrics"][1]["g_fingerprint"]
    # keep_checkpoints counts the first run's checkpoints too
    files = checkpoint_keys(gan_run.bucket, gan_run.name)
    assert sorted(files) == [4, 5, 6] and all(names == CHECKPOINT_FILES for names in files.values())
    fifth, last = (download_checkpoint(gan_run.bucket, gan_run.name, s)["state"] for s in (5, 6))
    assert last["step"] == 6
    # Optimizers, schedules and the EMA continue from step 4 (fresh ones would count 2 steps, start EMA at G_4).
    assert adam_steps(last["opt_g"]) == {6} and adam_steps(last["opt_d"]) == {6}
    assert last["sched_g"]["last_epoch"] == 6 and last["sched_d"]["last_epoch"] == 6
    assert_ema_recursion(first[4]["state"]["g_ema"], fifth["g"], fifth["g_ema"], "step 5 after resume")
    # The checkpoint the run resumed from is still the one the first run wrote.
    assert_weights_equal(download_checkpoint(gan_run.bucket, gan_run.name, 4)["state"]["g"], first[4]["state"]["g"],
                         "checkpoint 4 after resume")


def test_the_stop_flag_outlives_a_fit_disarmed_so_a_later_tune_trial_never_listens(gan_run):
    """fit() keeps this process's StopFlag actor for its next fit (no actor start before every run) and
    disarms it when the run ends: rank 0 of a run that fit() did not start (a Tune trial of this
    process) finds the actor and does not listen to it."""
    import ray

    from raysr.stop_request import FLAG_ACTOR, StopCheck, stop_flag

    flag = ray.get_actor(FLAG_ACTOR)
    assert flag._actor_id == stop_flag()._actor_id
    assert ray.get(flag.armed.remote()) is False
    assert StopCheck(rank=0, world=1).pending is None


def test_a_run_starts_ray_trains_actors_but_no_ray_data_dataset_actor(gan_run, ray_default_callbacks, monkeypatch):
    """raysr hands Ray Train no Ray Data datasets (it streams its own shards), so no worker-group start
    runs Ray Train's DatasetManager actor (raysr.ray_setup.trainer_without_ray_data); the actors of its
    other set-up callbacks still run: of Ray's own default callbacks, raysr's trainer leaves out the
    DatasetsCallback alone. (The tests' runs also leave out Ray's placement-group cleaner: conftest.py.)"""
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    from ray.util.state import list_actors

    from raysr.ray_setup import trainer_without_ray_data

    # this process's Ray by its address: another test process may run a Ray of its own beside it
    started = {a.class_name for a in list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000,
                                                 raise_on_missing_output=False)}
    assert {"TrainController", "RayTrainWorker", "SynchronizationActor"} <= started, started
    assert "DatasetManager" not in started and "PlacementGroupCleaner" not in started, started

    monkeypatch.setattr(DataParallelTrainer, "_create_default_callbacks", ray_default_callbacks)  # Ray's own
    names = {}
    for trainer_cls in (TorchTrainer, trainer_without_ray_data(TorchTrainer)):
        trainer = trainer_cls(train_loop_per_worker=lambda: None, scaling_config=ScalingConfig(num_workers=1))
        names[trainer_cls] = [type(c).__name__ for c in trainer._create_default_callbacks()]
    ray_own, raysr_own = names.values()
    assert {"DatasetsCallback", "PlacementGroupCleanerCallback"} <= set(ray_own), ray_own
    assert raysr_own == [name for name in ray_own if name != "DatasetsCallback"]


def test_an_x2_rrdbnet_run_on_paired_data_validates_odd_sized_images(ray_local, tmp_path, capsys):
    """RRDBNet x2 pixel-unshuffles its input, so an odd LR side needs padding: validation pads as
    raysr.upscale does, and the run reports the PSNR raysr.evaluate gives its generator on the same
    real pairs (data.val_lr, evaluate --lr). It trains on LR/HR pair shards (data.degradation=paired,
    make_shards --lr-input): the pre-Ray check and the worker's loader read the pairs."""
    from conftest import synthetic_image

    from raysr.data.make_shards import make_shards
    from raysr.evaluate import main as evaluate_main

    folders = {name: tmp_path / name for name in ("val", "val_lr", "train", "train_lr")}
    for folder in folders.values():
        folder.mkdir()
    sizes = {"val": [(70, 58), (66, 90)], "train": [(96, 96), (64, 96)]}  # val LR 35x29 and 33x45: odd sides
    for kind, shapes in sizes.items():
        for i, (h, w) in enumerate(shapes):
            hr = synthetic_image(h, w, seed=i + 10 * (kind == "train"))
            Image.fromarray(hr).save(folders[kind] / f"odd{i}.png")
            Image.fromarray(hr).resize((w // 2, h // 2), Image.BICUBIC).save(folders[f"{kind}_lr"] / f"odd{i}x2.png")
    make_shards([str(folders["train"])], str(tmp_path / "shards"), crop_size=64, step=32, min_size=32, workers=1,
                progress=False, lr_input=str(folders["train_lr"]), scale=2)
    argv = []
    for value in ["model.generator.name=rrdbnet", "model.generator.scale=2", "model.generator.num_feat=8",
                  "model.generator.num_block=1", "model.generator.num_grow_ch=4", "data.gt_size=32",
                  "data.batch_size=2", "data.num_workers=0", "data.degradation=paired", f"data.train={tmp_path / 'shards'}",
                  f"data.val={folders['val']}", f"data.val_lr={folders['val_lr']}",
                  "train.total_steps=2", "run.val_every=2", "run.checkpoint_every=2", f"run.storage={tmp_path}",
                  "run.name=x2odd"]:
        argv += ["--set", value]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "x2odd" / "checkpoint_00000002" / "metrics.json").read_text())
    assert math.isfinite(metrics["psnr"]) and metrics["step"] == 2
    assert evaluate_main(["--hr", str(folders["val"]), "--lr", str(folders["val_lr"]), "--scale", "2", "--json",
                          str(tmp_path / "e.json"), "--device", "cpu",
                          "--model", str(tmp_path / "x2odd" / "checkpoint_00000002" / "generator.pth")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["mean"]["psnr_y"] == metrics["psnr"]


def test_a_realesrgan_gan_run_trains_on_degraded_pairs(ray_local, demo_data, tmp_path):
    """The realesrgan_x4plus GAN phase, tiny: regions and kernels from the loader, the chain, the pool and
    USM targets on the worker, the U-Net discriminator and the multi-layer perceptual loss."""
    argv = ["--preset", "realesrgan_x4plus"]
    for value in ["model.generator.num_feat=8", "model.generator.num_block=1", "model.generator.num_grow_ch=4",
                  "model.discriminator.num_feat=8", "data.gt_size=32", "data.batch_size=3", "data.num_workers=0",
                  "degradation.crop_pad_size=64", "degradation.resize_range=[0.2, 1.5]", "degradation.pool_size=4",
                  "loss.perceptual.allow_random_weights=true", f"data.train={demo_data.train}",
                  f"data.val={demo_data.val}", "train.total_steps=3", "run.val_every=3", "run.checkpoint_every=3",
                  "run.validation=inline", f"run.storage={tmp_path}", "run.name=realesrgan"]:
        argv += ["--set", value]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "realesrgan" / "checkpoint_00000003" / "metrics.json").read_text())
    assert metrics["step"] == 3 and math.isfinite(metrics["psnr"])
    for key in ("loss_pix", "loss_percep", "loss_adv", "loss_d"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, key


def test_a_diverging_run_stops_with_exit_1_and_only_finite_checkpoints(ray_local, demo_data, tmp_path, capfd):
    """optim.g.lr=1e30: the first Adam steps throw the weights to ~1e30, every later loss is inf/NaN.
    Those steps update nothing, train.max_nonfinite of them in a row stop the run (exit 1, one
    message naming the step), and no checkpoint holds a non-finite tensor."""
    argv = []
    for value in ["optim.g.lr=1e30", "model.generator.num_feat=8", "model.generator.num_block=1",
                  "data.batch_size=2", "data.num_workers=0", f"data.train={demo_data.train}",
                  f"data.val={demo_data.val}", "train.total_steps=60", "train.max_nonfinite=5", "run.log_every=5",
                  "run.checkpoint_every=5", "run.val_every=100", f"run.storage={tmp_path}", "run.name=nan"]:
        argv += ["--set", value]
    assert main(argv) == 1
    err = capfd.readouterr().err
    assert err.count("training diverged") == 1 and "5 steps in a row had a NaN/inf loss" in err
    assert "optim.g.lr" in err
    stop = int(err.split("up to step ")[1].split(" ")[0])
    checkpoints = sorted((tmp_path / "nan").glob("checkpoint_0*"))
    assert checkpoints, "the run wrote no checkpoint before diverging"
    assert int(checkpoints[-1].name.split("_")[1]) < stop  # nothing written once the run was diverging
    for ckpt in checkpoints:
        state = torch.load(ckpt / "state.pt", weights_only=True)
        tensors = {**state["g"], **state.get("g_ema", {}),
                   **{f"opt_g.{i}.{k}": t for i, slot in state["opt_g"]["state"].items() for k, t in slot.items()}}
        assert all(torch.isfinite(t).all() for t in tensors.values()), ckpt.name
        nonfinite = json.loads((ckpt / "metrics.json").read_text()).get("nonfinite_steps", 0)
        assert nonfinite < 5


# --------------------------------------------------------------------------- one command for both phases


def test_one_command_runs_the_psnr_phase_then_the_gan_from_its_ema_generator(ray_local, demo_data, tmp_path, capfd):
    """``--preset esrgan_x4 --set train.init_from=psnr``: the PSNR phase (esrgan_psnr_x4 settings) runs
    as <name>_psnr, then the GAN phase starts from its EMA generator. With D warm-up over the whole
    GAN phase G never steps, so the GAN's G (and its EMA) must equal the PSNR run's EMA exactly.
    Run again, the command finds both phases finished and trains nothing."""
    storage = tmp_path / "runs"
    argv = ["--preset", "esrgan_x4"]
    for value in tiny_gan_overrides(demo_data, str(storage), "both") + [
            "train.init_from=psnr", "train.total_steps=2", "train.d_init_steps=2",
            "psnr.train.total_steps=3", "psnr.train.ema_decay=0.5"]:
        argv += ["--set", value]
    assert main(argv) == 0
    printed = capfd.readouterr()
    output = printed.out + printed.err
    psnr_gen = torch.load(storage / "both_psnr" / "checkpoint_00000003" / "generator.pth", weights_only=True)
    psnr_state = torch.load(storage / "both_psnr" / "checkpoint_00000003" / "state.pt", weights_only=True)
    assert psnr_state["config"]["train"]["phase"] == "psnr" and psnr_state["step"] == 3
    assert psnr_state["config"]["optim"]["schedule"]["type"] == "cosine_restart"  # esrgan_psnr_x4's schedule
    gan_dir = storage / "both" / "checkpoint_00000002"
    gan_gen = torch.load(gan_dir / "generator.pth", weights_only=True)
    gan_state = torch.load(gan_dir / "state.pt", weights_only=True)
    assert gan_state["config"]["train"]["phase"] == "gan" and gan_state["step"] == 2 and "d" in gan_state
    assert gan_state["config"]["train"]["init_from"].endswith("both_psnr/checkpoint_00000003/generator.pth")
    assert any(not torch.equal(psnr_gen["params"][k], v) for k, v in psnr_gen["params_ema"].items())
    assert_weights_equal(gan_gen["params"], psnr_gen["params_ema"], "GAN G vs PSNR EMA")
    assert_weights_equal(gan_gen["params_ema"], psnr_gen["params_ema"], "GAN EMA vs PSNR EMA")
    # two workers, yet each warning once; torch's DDP deprecation and boto's credential notice not at all
    assert output.count("VGG19 ImageNet weights not found") == 1, output
    assert "broadcast_buffers" not in output and "Found credentials" not in output
    assert "Token authentication is enabled" not in output  # Ray processes' noise lines: tests/test_ray_setup.py
    assert "phase 1 of 2: PSNR phase both_psnr" in output and "phase 2 of 2: GAN phase both" in output

    assert main(argv) == 0
    again = capfd.readouterr().out
    assert "PSNR phase both_psnr is finished" in again and "phase 1 of 2" not in again
    # the GAN phase reached its last step too: no worker group starts, its last checkpoint answers
    assert "raysr: run both reached its last step before: nothing to train" in again
    assert "finished both at step 2/2" in again and f"{gan_dir / 'generator.pth'}" in again
    assert "raysr: run both ->" not in again  # the line fit() prints once it starts Ray Train


# --------------------------------------------------------------------------- config errors: exit 2 before Ray


@pytest.fixture
def no_cached_vgg(tmp_path, monkeypatch):
    """An empty torch hub cache: no VGG19 weights can be found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["--set", "model.generator.num_fet=8"], "unknown key model.generator.num_fet"),
    (["--set", "data.batch_size=many"], "data.batch_size: expected an integer, got 'many'"),
    (["--set", "train.phase=adversarial"], "train.phase: 'adversarial' is not allowed; choose one of ['psnr', 'gan']"),
    (["--set", "data.gt_size=66"], "data.gt_size: 66 is not divisible by model.generator.scale 4"),
    (["--preset", "esrgan_x4", "--set", "data.gt_size=100", "--set", "loss.perceptual.allow_random_weights=true"],
     "data.gt_size: the VGG discriminator (model.discriminator.name=vgg) is built for the crop size and takes "
     "64, 96, 128, 192, 256 px, not 100"),
    (["--preset", "esrgan_x4"], "loss.perceptual.weights_path: VGG19 ImageNet weights not found: "
                                "vgg19-dcbb9e9d.pth (VGG19 ImageNet weights) is not in the torch hub cache"),
    (["--set", "data.train=/nonexistent/raysr/shards"], "data.train: "),
    (["--set", "data.val=/nonexistent/raysr/val"], "data.val: /nonexistent/raysr/val does not exist"),
    (["--preset", "no_such_preset"], "unknown preset 'no_such_preset'"),
])
def test_config_errors_exit_2_with_one_message(capsys, no_cached_vgg, argv, message):
    code, out, err = run_main(capsys, argv)
    assert code == 2
    assert out == ""
    assert err.startswith("raysr.train: error: ") and message in err and "Traceback" not in err


def test_paired_training_on_hr_only_shards_exits_2_before_ray(capsys, tmp_path):
    """data.degradation=paired on shards without LR members: the pre-Ray check names the shard, the sample's
    problem and how to make pair shards."""
    from conftest import synthetic_image

    from raysr.data.make_shards import make_shards

    (tmp_path / "hr").mkdir()
    Image.fromarray(synthetic_image(64, 64)).save(tmp_path / "hr" / "a.png")
    make_shards([str(tmp_path / "hr")], str(tmp_path / "shards"), crop_size=64, min_size=32, workers=1, progress=False)
    code, out, err = run_main(capsys, ["--dry-run", "--set", "data.degradation=paired", "--set", "data.gt_size=32",
                                       "--set", f"data.train={tmp_path / 'shards'}"])
    assert code == 2 and out == ""
    assert err.startswith(f"raysr.train: error: data.train: shard {tmp_path / 'shards' / 'train-000000.tar'} holds "
                          "no LR/HR pair raysr can train on: 1 samples with 1 x .json, 1 x .png")
    assert "a_s001: no LR member (KEY.lr.* or KEY.lq.*)" in err and "--lr-input LR_DIR --scale S" in err


def test_missing_s3_data_exits_2_naming_the_path(capsys, s3_bucket):
    for url in (f"s3://{s3_bucket}/no/such/shards", "s3://raysr-no-such-bucket-4f1a/shards"):
        code, out, err = run_main(capsys, ["--set", f"data.train={url}"])
        assert code == 2 and out == ""
        assert err.startswith("raysr.train: error: data.train: ") and url.rsplit("/", 1)[0] in err, err


def test_config_file_errors_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  generator: {name: rrdbnet, scale: 5}\n")
    code, _, err = run_main(capsys, ["--config", str(bad)])
    assert code == 2 and "model.generator.scale: 5 is not supported by rrdbnet" in err
    code, _, err = run_main(capsys, ["--config", str(tmp_path / "missing.yaml")])
    assert code == 2 and "no such file" in err


# The documented contract: every key the issue names must appear in the resolved config.
DOCUMENTED_KEYS = {
    "model.generator": "name num_feat num_block num_grow_ch scale variant",
    "model.discriminator": "name num_feat dense_feat variant",
    "data": "train val gt_size batch_size num_workers crops_per_image",
    "train": "phase total_steps init_from ema_decay grad_clip d_init_steps",
    "loss.pixel": "type weight",
    "loss.perceptual": "layers before_relu criterion weight weights_path allow_random_weights",
    "loss.adversarial": "type weight",
    "optim.g": "lr betas weight_decay",
    "optim.d": "lr betas weight_decay",
    "optim.schedule": "type milestones gamma periods",
    "run": "name storage num_workers use_gpu checkpoint_every val_every keep_checkpoints max_failures seed precision",
}
PRESETS = ["quickstart", "srcnn_x4", "vdsr_x4", "srresnet_x4", "srgan_x4", "esrgan_psnr_x4", "esrgan_x4",
           "realesrnet_x4plus", "realesrgan_x4plus", "realesr_compact_x4"]


def leaves(tree: dict, prefix: str = "") -> dict:
    """{"a.b.c": value} for every non-mapping value in a nested mapping."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def preset_file(name: str) -> dict:
    import raysr
    return yaml.safe_load((Path(raysr.__file__).parent / "presets" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_dry_runs_to_its_own_values(capsys, no_cached_vgg, name):
    code, out, err = run_main(capsys, ["--preset", name, "--set", "loss.perceptual.allow_random_weights=true",
                                       "--dry-run"])
    assert code == 0, err
    resolved = leaves(yaml.safe_load(out))
    for key, value in leaves(preset_file(name)).items():
        assert resolved[key] == value, f"{name}: {key}"
    for section, keys in DOCUMENTED_KEYS.items():
        for key in keys.split():
            assert f"{section}.{key}" in resolved or any(k.startswith(f"{section}.{key}.") for k in resolved), \
                f"{section}.{key} missing from the resolved config"


def test_dry_run_applies_overrides_and_defaults_to_quickstart(capsys):
    code, out, _ = run_main(capsys, ["--set", "loss.adversarial.weight=1e-3", "--set", "optim.g.betas=[0.5, 0.9]",
                                     "--set", "run.name=mine", "--dry-run"])
    assert code == 0
    resolved = leaves(yaml.safe_load(out))
    assert resolved["loss.adversarial.weight"] == 1e-3
    assert resolved["optim.g.betas"] == [0.5, 0.9]
    assert resolved["run.name"] == "mine"
    assert resolved["model.generator.name"] == preset_file("quickstart")["model"]["generator"]["name"]
    assert resolved["train.total_steps"] == preset_file("quickstart")["train"]["total_steps"]


# --------------------------------------------------------------------------- the way users launch it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exit_status_names_the_step_and_a_resume_command_the_shell_reads_back(capsys):
    from raysr.stop_request import STOPPED_KEY, exit_status

    argv = ["--preset", "quickstart", "--set", "run.storage=/tmp/my runs", "--set", "run.name=a'b"]
    stopped = SimpleNamespace(metrics={"step": 7, STOPPED_KEY: 1}, checkpoint=SimpleNamespace(path="/r/ck_7"))
    assert exit_status(stopped, argv) == 130
    line = capsys.readouterr().out.strip()
    assert line.startswith("raysr: stopped at step 7 (Ctrl-C), checkpoint /r/ck_7; resume with: python -m raysr.train ")
    assert shlex.split(line.split("resume with: ")[1]) == ["python", "-m", "raysr.train", *argv]
    assert exit_status(SimpleNamespace(metrics={"step": 9}, checkpoint=None), argv) == 0
    assert exit_status(None, argv) == 1 and capsys.readouterr().out == ""


@pytest.mark.slow  # a Ray head of its own and a job
@pytest.mark.own_ray
def test_ray_job_submit_to_a_ray_start_head_succeeds(demo_data, tmp_path):
    """`ray start --head` on 127.0.0.1, then `ray job submit -- python -m raysr.train --preset quickstart …`.

    Ray enables token authentication for clusters it starts (2.5x+); the CLI then needs
    RAY_AUTH_MODE=token and the token, as users set them. Every port is chosen here, so the
    session's own Ray and other clusters on the machine are never touched (no `ray stop`).
    """
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # nothing to drain once the job is over
    dashboard = free_port()
    address = f"http://127.0.0.1:{dashboard}"
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--metrics-export-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--ray-client-server-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    # A private temp dir: `ray start` records its address in <temp-dir>/ray_current_cluster and leaves
    # it behind; in the shared /tmp/ray a later plain ray.init() would try to join the dead cluster.
    # (Short path: Ray's unix sockets live under it.)
    ray_temp = tempfile.mkdtemp(prefix="raysr_", dir="/tmp")
    head_log = tmp_path / "ray_start.log"
    with open(head_log, "w") as log:
        head = subprocess.Popen(
            ray_cli + ["start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                       "--num-cpus=2", "--disable-usage-stats", "--object-store-memory=200000000",
                       f"--temp-dir={ray_temp}"] + [f"{flag}={port}" for flag, port in ports.items()],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # ready once the job server lists jobs for the token (asked over HTTP: each `ray job list`
        # would start a Python process that imports Ray, seconds of CPU a poll)
        def job_server(path: str) -> urllib.request.Request:
            return urllib.request.Request(f"{address}/api/jobs/{path}",
                                          headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})

        deadline = time.monotonic() + 120
        last = None
        while True:
            assert head.poll() is None, f"ray start exited early:\n{head_log.read_text()}"
            try:
                with urllib.request.urlopen(job_server(""), timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError as err:  # refused while it starts; URLError and HTTPError are OSErrors
                last = err
            assert time.monotonic() < deadline, f"the job server never answered: {last}\n{head_log.read_text()}"
            time.sleep(0.2)

        storage = tmp_path / "runs"
        sets = ["train.total_steps=4", "run.checkpoint_every=2", "run.val_every=2", "run.log_every=2",
                "model.generator.num_feat=8", "model.generator.num_block=1", "data.gt_size=32", "data.batch_size=2",
                "data.num_workers=0", f"data.train={demo_data.train}", f"data.val={demo_data.val}",
                f"run.storage={storage}", "run.name=jobrun"]
        entrypoint = [sys.executable, "-m", "raysr.train", "--preset", "quickstart"]
        for item in sets:
            entrypoint += ["--set", item]
        # Without --no-wait, submit streams the job's output and exits 0 only if the job SUCCEEDED.
        submitted = subprocess.run(ray_cli + ["job", "submit", "--address", address, "--submission-id", "raysr-job",
                                              "--"] + entrypoint, env=env, capture_output=True, text=True, timeout=420)
        output = submitted.stdout + submitted.stderr
        assert submitted.returncode == 0, output[-4000:]
        # the job server's record of the job (`ray job status` asks the same; over HTTP, no Python process
        # importing Ray)
        with urllib.request.urlopen(job_server("raysr-job"), timeout=30) as reply:
            job = json.loads(reply.read())
        assert job["status"] == "SUCCEEDED", job
    finally:
        head.send_signal(signal.SIGTERM)  # --block: ray start stops every process it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # its own session (start_new_session): only what it started
            head.wait()
        shutil.rmtree(ray_temp, ignore_errors=True)

    # The driver's console lines reach the user through `ray job submit`.
    final = storage / "jobrun" / "checkpoint_00000004"
    assert "raysr: finished jobrun at step 4/4" in output
    assert f"raysr: generator  {final / 'generator.pth'}" in output
    assert {p.name for p in final.iterdir()} == CHECKPOINT_FILES
    assert json.loads((final / "metrics.json").read_text())["step"] == 4
    g = load_generator(str(final / "generator.pth"))
    assert type(g).__name__ == "SRResNet"
    assert {k: g.config[k] for k in ("num_feat", "num_block", "scale", "variant")} == \
        {"num_feat": 8, "num_block": 1, "scale": 4, "variant": "msrresnet"}
    assert g(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)


def test_ctrl_c_checkpoints_the_next_step_and_the_same_command_resumes_there(ray_local, demo_data, tmp_path):
    """SIGINT to the driver (Ctrl-C; ``ray job stop`` sends SIGTERM) once step 3 is logged: both workers
    stop at the same step boundary (else their reports would hang), rank 0 writes the checkpoint, the
    driver names that step and the command that resumes and exits 130; that command resumes at exactly
    that step and ends at step 40. Both drivers join the session's Ray (as ``ray job submit`` drivers
    join a cluster). A report every step paces the run (Ray Train's controller takes one per health
    check, 0.1 s in the tests)."""
    total = 40
    argv = ["--preset", "quickstart"]
    for value in ["model.generator.num_feat=8", "model.generator.num_block=1", "data.gt_size=32",
                  "data.batch_size=2", "data.num_workers=0", f"data.train={demo_data.train}", f"data.val={demo_data.val}",
                  f"train.total_steps={total}", "run.log_every=1", "run.checkpoint_every=1000", "run.val_every=1000",
                  "run.validation=inline", "run.num_workers=2",
                  f"run.storage={tmp_path}", "run.name=ctrlc"]:
        argv += ["--set", value]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}

    def run(interrupt_at: str | None) -> tuple[int, str]:
        proc = subprocess.Popen([sys.executable, "-m", "raysr.train", *argv], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if interrupt_at is not None and interrupt_at in line:  # a worker's line, maybe prefixed by Ray
                    proc.send_signal(signal.SIGINT)  # the driver only, as `ray job stop` signals it
                    interrupt_at = None
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return proc.returncode, "".join(lines)

    code, log = run(interrupt_at=f"raysr: step 3/{total} ")
    assert code == 130, log[-4000:]
    stop = int(log.split("raysr: stopped at step ")[1].split(" ")[0])
    assert 3 < stop < total, log[-4000:]
    checkpoint = tmp_path / "ctrlc" / f"checkpoint_{stop:08d}"
    command = "python -m raysr.train " + " ".join(argv)  # no value here needs shell quoting
    assert f"raysr: stopped at step {stop} (Ctrl-C), checkpoint {checkpoint}; resume with: {command}" in log
    assert sorted(p.name for p in (tmp_path / "ctrlc").glob("checkpoint_0*")) == [checkpoint.name]
    assert json.loads((checkpoint / "metrics.json").read_text())["step"] == stop
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert state["step"] == stop and state["opt_g"]["state"][0]["step"].item() == stop
    assert f"raysr: step {stop + 1}/" not in log  # nothing trained past the checkpoint

    code, log = run(interrupt_at=None)
    assert code == 0, log[-4000:]
    assert f"raysr: resumed ctrlc at step {stop} on 2 worker(s)" in log
    logged = [int(step) for step in re.findall(r"raysr: step (\d+)/", log)]
    assert logged == list(range(stop + 1, total + 1))
    assert f"raysr: finished ctrlc at step {total}/{total}" in log
    state = torch.load(tmp_path / "ctrlc" / f"checkpoint_{total:08d}" / "state.pt", weights_only=True)
    assert state["step"] == total and state["opt_g"]["state"][0]["step"].item() == total


def test_local_ray_listens_on_loopback_only(ray_local):
    assert ray_local.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert ray_local.util.get_node_ip_address() == "127.0.0.1"


def test_a_killed_worker_is_replaced_and_training_resumes_from_the_last_checkpoint(
        ray_local, gan_run, tmp_path):
    """Node loss, as Ray sees it: one training worker process dies (SIGKILL) right after checkpoint 2.
    FailureConfig restarts the worker group from that checkpoint and the run still ends at step 4, with
    the weights of the same run uninterrupted (``gan_run``: the same config, seed and data, saved to S3
    instead of a local folder), bit for bit (GAN phase, 2 workers: each rank's RNGs and data position
    come back with the checkpoint)."""
    import ray.train

    record, killed = tmp_path / "reports.jsonl", tmp_path / "killed_pid"
    gcs_address = ray_local.get_runtime_context().gcs_address  # this session's cluster, not any other

    class KillOneWorkerOnce(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(record, "a") as f:
                f.write(json.dumps({"metrics": metrics, "checkpoint": checkpoint.path if checkpoint else None}) + "\n")
            if checkpoint is not None and metrics[0]["step"] == 2 and not killed.exists():
                from ray.util.state import list_actors
                workers = list_actors(address=gcs_address,
                                      filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                killed.write_text(str(workers[-1].pid))
                os.kill(workers[-1].pid, signal.SIGKILL)

    overrides = [o for o in gan_run.overrides if not o.startswith(("run.storage=", "run.name="))] + [
        f"run.storage={tmp_path / 'runs'}", "run.name=killed", "train.total_steps=4", "run.max_failures=2"]
    result = fit(load_config(preset="esrgan_x4", overrides=overrides), callbacks=[KillOneWorkerOnce()])

    assert killed.exists(), "the callback never killed a worker"
    assert result is not None and result.error is None
    assert result.metrics["step"] == 4
    steps = [r["metrics"][0]["step"] for r in read_reports(record)]
    # 1, 2, then the kill; whatever step 3 the dying group reached is redone from checkpoint 2
    assert steps[:2] == [1, 2] and steps[-2:] == [3, 4]
    state = torch.load(tmp_path / "runs" / "killed" / "checkpoint_00000004" / "state.pt", weights_only=True)
    assert state["step"] == 4
    assert state["opt_g"]["state"][0]["step"].item() == 4  # Adam saw 4 steps: none lost, none doubled
    assert [r["data"]["consumed"] for r in state["ranks"]] == [4, 4]

    reference = gan_run.ckpt[4]["state"]
    assert reference["step"] == 4
    for part in ("g", "g_ema", "d"):
        assert all(torch.equal(state[part][k], v) for k, v in reference[part].items()), part
