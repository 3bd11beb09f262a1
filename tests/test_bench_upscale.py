"""``python -m raysr.bench upscale`` on the session's local Ray: every documented field of its JSON row, figures
that agree with each other, and the single-process and Ray Data paths writing the same files."""

from __future__ import annotations

import json

import pytest

from raysr.bench.__main__ import main
from raysr.generator_file import save_generator
from test_upscale import tiny_generator

RUN_FIELDS = {"mp_per_s", "images_per_s", "fixed_s", "wall_s", "half_wall_s", "images"}
FIELDS = {"bench", "command", "commit", "torch", "device", "cluster_gpus", "model", "images", "size",
          "input_megapixels", "tile", "threads", "actors", "gpus_per_actor", "single", "ray_1", "ray_n",
          "overhead_frac", "scaling", "mp_per_s_per_gpu", "outputs_equal", "max_diff_levels", "load_avg"}


def test_upscale_bench_rows_and_equal_outputs(ray_local, tmp_path, capsys):
    save_generator(tiny_generator("srresnet", 2), tmp_path / "g.pth", fmt="raysr")
    argv = ["upscale", "--model", str(tmp_path / "g.pth"), "--images", "2", "--size", "16", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(r) == FIELDS
    assert r["command"] == "python -m raysr.bench " + " ".join(argv)
    assert (r["images"], r["size"], r["input_megapixels"]) == (2, 16, pytest.approx(2 * 16 * 16 / 1e6))
    # the same images through one process and through Ray Data: byte-identical files
    assert r["outputs_equal"] is True and r["max_diff_levels"] == 0
    for run in ("single", "ray_1"):
        f = r[run]
        assert set(f) == RUN_FIELDS and f["images"] == 2 and f["wall_s"] > 0 and f["half_wall_s"] > 0
        if f["mp_per_s"] is not None:  # None only where the machine's noise made the full run the shorter
            assert f["mp_per_s"] == pytest.approx(16 * 16 / 1e6 / (f["wall_s"] - f["half_wall_s"]))
            assert f["images_per_s"] == pytest.approx(f["mp_per_s"] / (16 * 16 / 1e6))
    if r["single"]["mp_per_s"] and r["ray_1"]["mp_per_s"]:
        assert r["overhead_frac"] == pytest.approx(r["single"]["mp_per_s"] / r["ray_1"]["mp_per_s"] - 1)
    cpus = ray_local.cluster_resources()["CPU"]
    if cpus < 3:  # N actors need N + 1 CPUs (the read and write tasks): skipped, and it says why
        assert r["actors"] == 1 and "N + 1 CPUs" in r["ray_n"]["skipped"] and r["scaling"] is None
    else:
        assert r["actors"] == cpus - 1 and set(r["ray_n"]) == RUN_FIELDS
    assert r["mp_per_s_per_gpu"] is None and r["gpus_per_actor"] == 0.0  # CPU actors


def test_upscale_bench_refuses_more_actors_than_the_cluster_runs(ray_local, capsys):
    too_many = int(ray_local.cluster_resources()["CPU"])  # every CPU an actor: the read tasks would wait forever
    assert main(["upscale", "--actors", str(too_many), "--images", "2", "--size", "16"]) == 2
    assert "one per model actor, one for the read and write tasks" in capsys.readouterr().err
