"""``python -m raysr.bench data``: both figures and the JSON summary."""

from __future__ import annotations

import argparse
import json

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
    assert any(line.startswith("BasicSR-style baseline") for line in lines)
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
    assert "dataset: 2 shards, size unknown (no manifest)" in lines


def test_bench_errors_go_to_stderr_and_exit_2(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    cases = [
        (["--shards", str(tmp_path / "none-*.tar")], "no shards found"),
        (["--shards", str(tmp_path), "--batches", "0"], "--batches must be >= 1, got 0"),
        (["--shards", str(tmp_path), "--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    ]
    for argv, message in cases:
        assert bench.run(parser.parse_args(argv + ["--json"])) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # with --json, stdout holds the result line or nothing
        assert captured.err.startswith("raysr.bench data: error: ") and message in captured.err
