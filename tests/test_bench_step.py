"""``python -m raysr.bench step / overhead / train`` on tiny networks on the CPU: every JSON key, the
figures agreeing with each other, and the FLOP count against one written out here by hand."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from raysr.bench.__main__ import main
from raysr.bench.step import PEAK_TFLOPS, peak_for_name

TINY = ["--device", "cpu", "--batch-size", "2", "--gt-size", "32", "--steps", "4", "--warmup", "1",
        "--interval", "2", "--set", "model.generator.num_feat=8", "--set", "model.generator.num_block=2"]
STEP_KEYS = {"model", "phase", "batch_size", "gt_size", "compile", "precision", "device", "torch", "commit", "command",
             "crops_per_s", "step_ms", "peak_mem_gb", "flops_per_crop", "tflops", "peak_tflops", "mfu",
             "first_step_s"}
BASELINE_KEYS = {"baseline_crops_per_s", "baseline_step_ms", "baseline_peak_mem_gb", "baseline_lr_ms_per_crop",
                 "speedup_vs_baseline"}


def bench_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def head_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


def test_step_bench_reports_every_key_and_figures_that_agree(capsys):
    argv = ["step", "--model", "msrresnet", "--phase", "psnr", "--baseline", "--json", *TINY]
    r = bench_json(capsys, argv)
    assert STEP_KEYS | BASELINE_KEYS <= set(r)
    assert (r["model"], r["phase"], r["batch_size"], r["gt_size"], r["precision"]) == ("msrresnet", "psnr", 2, 32, "fp32")
    assert r["command"] == "python -m raysr.bench " + " ".join(argv)
    assert r["commit"].split("+")[0] == head_commit()
    assert r["crops_per_s"] == pytest.approx(1e3 * 2 / r["step_ms"])
    assert r["tflops"] == pytest.approx(r["flops_per_crop"] * r["crops_per_s"] / 1e12)
    assert r["peak_tflops"] is None and r["mfu"] is None  # no peak is known for a CPU
    assert r["speedup_vs_baseline"] == pytest.approx(r["baseline_step_ms"] / r["step_ms"])
    assert r["baseline_crops_per_s"] == pytest.approx(1e3 * 2 / r["baseline_step_ms"])
    assert r["peak_mem_gb"] > 0 and r["baseline_lr_ms_per_crop"] > 0


def test_gan_step_bench_counts_g_d_and_vgg_and_takes_a_peak_for_mfu(capsys):
    psnr = bench_json(capsys, ["step", "--model", "rrdbnet", "--phase", "psnr", "--json", *TINY,
                               "--set", "model.generator.num_grow_ch=4", "--gt-size", "64",
                               "--set", "data.degradation=realesrgan", "--set", "degradation.crop_pad_size=96"])
    gan = bench_json(capsys, ["step", "--model", "rrdbnet", "--phase", "gan", "--json", "--peak-tflops", "2", *TINY,
                              "--set", "model.generator.num_grow_ch=4", "--set", "model.discriminator.num_feat=8",
                              "--gt-size", "64"])
    assert "baseline_crops_per_s" not in gan  # only with --baseline
    # data.degradation=realesrgan times the degradations of a batch beside the step (which they do not change)
    assert "degradation_ms" not in gan and psnr["degradation_ms"] > 0
    assert psnr["degradation_share"] == pytest.approx(psnr["degradation_ms"] / (psnr["degradation_ms"] + psnr["step_ms"]))
    # The GAN step runs G's forward and backward as the PSNR step does, plus D (three passes) and
    # the VGG (both images): strictly more FLOPs, and nothing of G's counted twice.
    assert gan["flops_per_crop"] > psnr["flops_per_crop"] * 1.5
    assert gan["mfu"] == pytest.approx(gan["tflops"] / 2.0)


def conv_flops(c_in: int, c_out: int, k: int, pixels: int) -> int:
    return 2 * c_in * c_out * k * k * pixels  # a multiply and an add per weight per output pixel


def test_flops_per_crop_of_an_msrresnet_step_is_its_hand_counted_convolutions(capsys):
    feat, blocks, gt = 8, 2, 32
    lr_px = (gt // 4) ** 2
    r = bench_json(capsys, ["step", "--model", "msrresnet", "--phase", "psnr", "--json", *TINY])
    # MSRResNet x4 (BasicSR): conv_first 3->f, 2 convs per residual block, two upconvs f->4f each
    # followed by a x2 pixel shuffle, conv_hr and conv_last at HR.
    first = conv_flops(3, feat, 3, lr_px)
    forward = (first + 2 * blocks * conv_flops(feat, feat, 3, lr_px) + conv_flops(feat, 4 * feat, 3, lr_px)
               + conv_flops(feat, 4 * feat, 3, 4 * lr_px) + conv_flops(feat, feat, 3, gt * gt)
               + conv_flops(feat, 3, 3, gt * gt))
    # Backward: each conv's weight gradient costs its forward again, its input gradient too,
    # except the first conv's (the LR image needs no gradient).
    assert r["flops_per_crop"] == pytest.approx(3 * forward - first, rel=0.02)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10G", 125.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", None),
    ("Tesla T4", None)])
def test_peak_table_matches_gpu_names(name, peak):
    assert peak_for_name(name) == peak
    assert all(p > 0 for _, p in PEAK_TFLOPS)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--device", "cuda"], "torch sees no CUDA GPU"),
    (["--peak-tflops", "-1"], "--peak-tflops must be > 0"),
    (["--set", "model.generator.num_block=x"], "model.generator.num_block"),
])
def test_step_bench_errors_exit_2_naming_the_argument(capsys, argv, message):
    assert main(["step", "--model", "srcnn", *argv]) == 2
    assert message in capsys.readouterr().err


def test_ddp_scaling_reports_the_efficiency_against_one_worker(ray_local, capsys):
    r = bench_json(capsys, ["step", "--model", "srcnn", "--phase", "psnr", "--workers", "2", "--json", *TINY[:-4]])
    assert r["workers"] == 2 and r["crops_per_s_1"] > 0
    assert r["crops_per_s"] == pytest.approx(1e3 * 2 * 2 / r["step_ms"])  # two workers, batch 2 each
    assert r["scaling_efficiency"] == pytest.approx(r["crops_per_s"] / (2 * r["crops_per_s_1"]))


def test_ddp_scaling_refuses_more_workers_than_the_cluster_has(ray_local, capsys):
    assert main(["step", "--model", "srcnn", "--phase", "psnr", "--workers", "64", *TINY[:-4]]) == 2
    assert "--workers 64 needs 64 CPUs" in capsys.readouterr().err


def test_overhead_bench_compares_a_plain_loop_with_ray_train(ray_local, capsys):
    r = bench_json(capsys, ["overhead", "--steps", "6", "--warmup", "1", "--log-every", "3", "--batch-size", "2",
                            "--gt-size", "32", "--json"])
    assert r["plain_step_ms"] == pytest.approx((r["plain_step_ms_before"] + r["plain_step_ms_after"]) / 2)
    assert r["overhead_frac"] == pytest.approx(r["ray_step_ms"] / r["plain_step_ms"] - 1)
    assert r["ray_step_ms"] > 0 and r["ray_startup_s"] > 0
    assert r["commit"].split("+")[0] == head_commit()


def test_train_bench_reads_a_real_runs_last_interval(ray_local, demo_data, tmp_path, capsys):
    r = bench_json(capsys, [
        "train", "--storage", str(tmp_path), "--json", "--", "--set", f"data.train={demo_data.train}",
        "--set", f"data.val={demo_data.val}", "--set", "train.total_steps=6", "--set", "run.log_every=3",
        "--set", "run.val_every=6", "--set", "run.checkpoint_every=6", "--set", "data.num_workers=0",
        "--set", "model.generator.num_feat=8", "--set", "model.generator.num_block=1"])
    assert r["step"] == r["total_steps"] == 6
    runs = list(tmp_path.glob("bench_train_*/checkpoint_00000006/metrics.json"))
    assert len(runs) == 1  # a fresh run name under --storage, never an earlier run resumed
    m = json.loads(runs[0].read_text())
    assert (r["crops_per_s"], r["data_wait_frac"]) == (m["crops_per_s"], m["data_wait_frac"])
    assert 0 <= r["data_wait_frac"] <= 1


def test_validation_bench_compares_inline_with_async_on_the_same_run(ray_local, demo_data, tmp_path, capsys):
    total, every = 12, 4
    r = bench_json(capsys, [
        "validation", "--storage", str(tmp_path), "--json", "--", "--set", f"data.train={demo_data.train}",
        "--set", f"data.val={demo_data.val}", "--set", f"train.total_steps={total}", "--set", "run.log_every=2",
        "--set", f"run.val_every={every}", "--set", f"run.checkpoint_every={total}", "--set", "data.num_workers=0",
        "--set", "model.generator.num_feat=8", "--set", "model.generator.num_block=1"])
    inline, async_ = r["inline"], r["async"]
    for run in (inline, async_):
        assert run["steps"] == run["final_step"] == total
        assert run["validations"] + run["skipped"] == total // every
    assert inline["skipped"] == 0
    # inline, the ranks wait for each whole validation (a validation's time is inside its val_block_s)
    assert inline["blocked_s"] >= inline["validations"] * inline["val_time_s"]
    # the same seed and data: both runs end with the same weights, and both score them the same
    assert async_["final_psnr"] == inline["final_psnr"]
    assert r["blocked_ratio"] == pytest.approx(async_["blocked_s"] / inline["blocked_s"])
    assert len(list(tmp_path.glob("bench_validation_*/checkpoint_00000012/metrics.json"))) == 2
