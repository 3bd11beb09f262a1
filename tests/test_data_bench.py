"""``python -m raysr.bench data``: both figures and the JSON summary."""

from __future__ import annotations

import argparse
import json

import pytest

from raysr.bench import data as bench
from raysr.data.make_shards import make_shards
from conftest import synthetic_image
from test_data_common import write_images


def jpeg_bytes(image) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_bench_prints_both_figures_and_a_json_line(tmp_path, capsys):
    write_images(tmp_path / "in", [(96, 96), (64, 96)], seed=40)
    report = make_shards([str(tmp_path / "in")], str(tmp_path / "shards"), crop_size=64, step=32, min_size=16,
                         workers=1, progress=False)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shards", str(tmp_path / "shards"), "--gt-size", "32", "--batch-size", "4",
                              "--batches", "3", "--baseline-crops", "3", "--shuffle-buffer", "4", "--json"])
    assert bench.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["workers"] == 0 and result["skipped"] == 0 and result["samples"] >= 3
    assert result["crops_per_s"] > 0 and result["baseline_crops_per_s"] > 0
    assert result["speedup_per_core"] == result["crops_per_s_per_core"] / result["baseline_crops_per_s"]
    assert any(line.startswith("BasicSR-style baseline") for line in lines) and result["format"] == "png"
    assert result["dataset_samples"] == report.samples and result["shards"] == len(report.entries)


def test_bench_runs_on_shards_without_a_manifest(tmp_path, capsys):
    import webdataset as wds

    with wds.ShardWriter(str(tmp_path / "part-%06d.tar"), maxcount=2, verbose=0) as writer:
        for i in range(3):
            writer.write({"__key__": f"photo{i}.crop", "jpg": jpeg_bytes(synthetic_image(64, 64, i))})
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shards", str(tmp_path), "--gt-size", "32", "--batch-size", "2", "--batches", "3",
                              "--baseline-crops", "3", "--shuffle-buffer", "2", "--json"])
    assert bench.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["dataset_samples"] is None and result["shards"] == 2
    assert result["samples"] >= 3 and result["skipped"] == 0 and result["crops_per_s"] > 0
    assert "dataset: 2 shards, size unknown (no manifest), format not recorded" in lines


def test_bench_errors_go_to_stderr_and_exit_2(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    cases = [
        (["--shards", str(tmp_path / "none-*.tar")], "no shards found"),
        (["--shards", str(tmp_path), "--batches", "0"], "--batches must be >= 1, got 0"),
        (["--shards", str(tmp_path), "--device", "nonsense"], "--device 'nonsense' is not a torch device"),
        (["--shards", str(tmp_path), "--formats", "npy"], "use one or the other"),
        (["--preset", "no_such_preset"], "no_such_preset"),
    ]
    for argv, message in cases:
        assert bench.run(parser.parse_args(argv + ["--json"])) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # with --json, stdout holds the result line or nothing
        assert captured.err.startswith("raysr.bench data: error: ") and message in captured.err


@pytest.mark.slow  # ~10 s: shards in three formats, two rounds, a FLOP count
def test_bench_compares_formats_on_the_same_photos_and_sizes_a_preset(tmp_path, capsys):
    write_images(tmp_path / "photos", [(96, 96), (80, 112)], seed=41)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--photos", str(tmp_path / "photos"), "--formats", "png", "npy", "npy.lz4",
                              "--crop-size", "64", "--step", "32", "--gt-size", "32", "--batch-size", "4",
                              "--batches", "3", "--crops-per-image", "2", "--shuffle-buffer", "4", "--rounds", "2",
                              "--preset", "srcnn_x4", "--json"])
    assert bench.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    formats = result["formats"]
    assert list(formats) == ["png", "npy", "npy.lz4"]
    # 96x96 gives 2x2 sub-images of 64, 80x112 gives 2x3
    assert all(r["samples"] == 10 and r["skipped"] == 0 and len(r["per_core_rounds"]) == 2 for r in formats.values())
    # shard bytes per sample: the member (64x64x3 pixels and a header for npy), its json, tar headers and padding
    assert formats["npy"]["bytes_per_sample"] > 64 * 64 * 3
    assert formats["png"]["speed_vs_png"] == 1.0
    assert formats["npy"]["speed_vs_png"] == formats["npy"]["crops_per_s_per_core"] / formats["png"]["crops_per_s_per_core"]
    assert result["preset"] == "srcnn_x4" and result["preset_phase"] == "psnr" and result["preset_gt_size"] == 64
    assert result["gpu_crops_per_s"] == 0.4 * 989e12 / result["flops_per_crop"]
    for fmt, n in result["loader_processes"].items():
        assert n == max(1, -(-result["gpu_crops_per_s"] // formats[fmt]["crops_per_s_per_core"]))
    assert any(line.startswith("preset srcnn_x4: srcnn psnr phase") for line in lines)
    assert any(line.startswith("npy.lz4 ") for line in lines)


def test_bench_gives_the_kernel_draws_beside_the_decode_per_crop(tmp_path, capsys):
    write_images(tmp_path / "in", [(96, 96)], seed=41)
    make_shards([str(tmp_path / "in")], str(tmp_path / "shards"), crop_size=64, step=32, min_size=16, workers=1,
                progress=False)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shards", str(tmp_path / "shards"), "--gt-size", "32", "--batch-size", "2",
                              "--batches", "2", "--baseline-crops", "2", "--shuffle-buffer", "2", "--crops-per-image",
                              "2", "--degradation", "realesrgan", "--kernel-draws", "20", "--json"])
    assert bench.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["degradation"] == "realesrgan" and result["kernels_ms_per_crop"] > 0
    assert result["decode_ms_per_crop"] > 0
    line = next(line for line in lines if line.startswith("data.degradation=realesrgan"))
    assert f"blur kernels {result['kernels_ms_per_crop']:.2f} ms (20 draws)" in line
    assert f"decode {result['decode_ms_per_crop']:.2f} ms (png)" in line
