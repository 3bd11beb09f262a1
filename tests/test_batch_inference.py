"""raysr.upscale --ray and raysr.evaluate --ray (raysr.batch_inference): the Ray Data pipelines
write the single-process path's bytes and scores, list bad inputs, and a rerun skips what is done.

One module fixture on the session's local Ray: an upscale over a folder of good, corrupt, 16-bit
and alpha images, its rerun, the same images in shards, and one evaluate; the tests below assert on
those runs. The stages
themselves are also run without Ray, row by row, which is fast.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageCms

from raysr.batch_inference import (UpscaleStage, image_columns, image_from_columns, read_shard_stage, read_stage,
                                   write_part_stage, write_stage)
from raysr.data.image_shards import assemble_shard
from raysr.cli import InputError, parse_workers
from raysr.evaluate import main as evaluate_main
from raysr.generator_file import save_generator
from raysr.images import DecodedImage
from raysr.upscale import UpscaleOptions, Upscaler, main
from test_upscale import assert_close_uint, expected_sr, png16, tiny_generator
from test_upscale_shards import tar_members, write_tar


def run_captured(argv) -> tuple[int, str]:
    """main(argv) -> (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def make_inputs(root: Path, make_image) -> dict[str, np.ndarray]:
    """A folder of real image files: RGB with an ICC profile, RGBA, 16-bit RGB, JPEG, a corrupt and a
    truncated PNG. Returns the 8-bit RGB pixels of the plain RGB ones, for references."""
    (root / "sub").mkdir(parents=True)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgb = make_image(12, 10, seed=1)
    Image.fromarray(rgb).save(root / "a.png", icc_profile=srgb)
    rgba = np.dstack([make_image(9, 11, seed=2), make_image(9, 11, seed=3)[..., :1]])
    Image.fromarray(rgba).save(root / "sub" / "rgba.png")
    (root / "deep16.png").write_bytes(png16(make_image(8, 7, seed=4).astype(np.uint16) * 257 + 3))
    Image.fromarray(make_image(10, 9, seed=5)).save(root / "sub" / "photo.jpg", quality=90)
    (root / "bad.png").write_text("this is not an image")
    whole = io.BytesIO()
    Image.fromarray(make_image(40, 40, seed=6)).save(whole, format="PNG")
    (root / "sub" / "cut.png").write_bytes(whole.getvalue()[:300])
    return {"a.png": rgb}


GOOD = ["a.png", "deep16.png", "sub/photo.jpg", "sub/rgba.png"]
REDONE = ["a.png", "sub/rgba.png"]
SHARDED = [["a.png", "sub/rgba.png", "bad.png"], ["deep16.png", "sub/photo.jpg", "sub/cut.png"], []]
BAD = ["bad.png", "sub/cut.png"]


def files_under(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """The single-process run, the Ray run and the Ray rerun of one folder."""
    from conftest import synthetic_image

    root = tmp_path_factory.mktemp("upscale_ray")
    model = tiny_generator("srresnet", 2)
    save_generator(model, root / "g.pth", fmt="raysr")
    pixels = make_inputs(root / "in", synthetic_image)
    base = ["--model", root / "g.pth", "--input", root / "in"]
    single = run_captured(base + ["--output", root / "single"])
    first = run_captured(base + ["--output", root / "ray", "--ray", "--workers", "1,1"])
    ray_bytes = {name: (root / "ray" / name).read_bytes() for name in GOOD}
    # the rerun redoes two outputs in batched tiles (each image's 9 tiles read all of it: one forward of 9)
    for name in REDONE:
        (root / "ray" / name).unlink()
    mtimes = {name: (root / "ray" / name).stat().st_mtime_ns for name in GOOD if name not in REDONE}
    again = run_captured(base + ["--output", root / "ray", "--ray", "--tile", 4, "--tile-pad", 8, "--batch-tiles", 16])
    # the same files (the bad ones too) in two input shards, upscaled to shards in this process and on Ray
    for i, names in enumerate(SHARDED):
        write_tar(root / "shards" / f"in-{i:06d}.tar",
                  [(name, (root / "in" / name).read_bytes()) for name in names])
    shards = {mode: run_captured(["--model", root / "g.pth", "--input", root / "shards",
                                  "--output-shards", root / f"shards_{mode}"] + (["--ray"] if mode == "ray" else []))
              for mode in ("single", "ray")}
    (root / "hr").mkdir()
    for i, (h, w) in enumerate([(24, 20), (17, 30)]):  # x2 GTmod 24x20 and 16x30
        Image.fromarray(synthetic_image(h, w, seed=10 + i)).save(root / "hr" / f"im{i}.png")
    scores = {}
    for mode in ("single", "ray"):
        argv = ["--hr", root / "hr", "--scale", 2, "--model", root / "g.pth", "--json", root / f"{mode}.json",
                "--save-sr", root / f"sr_{mode}"] + (["--ray"] if mode == "ray" else [])
        with contextlib.redirect_stdout(io.StringIO()):
            assert evaluate_main([str(a) for a in argv]) == 0
        scores[mode] = json.loads((root / f"{mode}.json").read_text())
    return SimpleNamespace(root=root, model=model, pixels=pixels, single=single, first=first, again=again,
                           ray_bytes=ray_bytes, mtimes=mtimes, scores=scores, shards=shards)


def test_ray_writes_the_single_process_bytes(runs):
    assert runs.single[0] == 3 and runs.first[0] == 3, (runs.single[1], runs.first[1])
    assert files_under(runs.root / "ray") == files_under(runs.root / "single") == sorted(GOOD + ["_failed.jsonl"])
    for name in GOOD:
        assert runs.ray_bytes[name] == (runs.root / "single" / name).read_bytes(), name


def test_ray_keeps_formats_bit_depth_alpha_and_icc(runs):
    out = runs.root / "ray"
    a = Image.open(out / "a.png")
    assert a.info["icc_profile"] == Image.open(runs.root / "in" / "a.png").info["icc_profile"]
    assert_close_uint(np.asarray(a), expected_sr(runs.model, runs.pixels["a.png"]))
    assert Image.open(out / "sub" / "rgba.png").mode == "RGBA"
    assert Image.open(out / "sub" / "photo.jpg").format == "JPEG"
    header = (out / "deep16.png").read_bytes()[:29]
    assert header[24] == 16 and header[25] == 2  # IHDR: 16 bits per sample, RGB
    assert Image.open(out / "deep16.png").size == (14, 16)


def test_ray_lists_bad_inputs_and_says_so(runs):
    code, err = runs.first
    assert "4 done, 0 skipped (output already there), 2 failed" in err and "MP/s" in err
    lines = (runs.root / "ray" / "_failed.jsonl").read_text().splitlines()
    failed = sorted((Path(f["input"]).relative_to(runs.root / "in").as_posix(), f["stage"], f["error"])
                    for f in map(json.loads, lines))
    assert [(name, stage) for name, stage, _ in failed] == [(name, "read") for name in BAD]
    assert "not an image" in failed[0][2] and "truncated" in failed[1][2]


def test_ray_rerun_skips_what_is_done_and_batched_tiles_stay_within_one_level(runs):
    code, err = runs.again
    assert code == 3  # the two bad inputs fail again, and are listed again
    assert "skipping 2 input(s) whose output is already in" in err
    assert "2 done, 2 skipped (output already there), 2 failed" in err
    assert {name: (runs.root / "ray" / name).stat().st_mtime_ns for name in runs.mtimes} == runs.mtimes
    for name in REDONE:  # --tile 4 --tile-pad 8 --batch-tiles 16 against the single-process run, whole images
        redone, single = (Image.open(runs.root / d / name) for d in ("ray", "single"))
        assert redone.mode == single.mode and redone.info.get("icc_profile") == single.info.get("icc_profile")
        diff = np.abs(np.asarray(redone).astype(int) - np.asarray(single).astype(int))
        assert diff.max() <= 1, name


def test_shards_on_ray_are_the_single_process_shards(runs):
    for mode in ("single", "ray"):
        code, err = runs.shards[mode]
        assert code == 3 and "4 done, 0 shards skipped (output shard already there), 2 failed" in err, err
    single, ray = runs.root / "shards_single", runs.root / "shards_ray"
    shards = ["in-000000.tar", "in-000001.tar", "in-000002.tar"]  # the last one empty
    assert files_under(ray) == files_under(single) == ["_failed.jsonl"] + shards  # no .parts left
    for name in shards:
        assert (ray / name).read_bytes() == (single / name).read_bytes(), name
    assert list(tar_members(ray / "in-000000.tar")) == ["a.png", "sub/rgba.png"]
    # the sample's output is the file run's output (a PNG input: the same bytes)
    assert tar_members(ray / "in-000000.tar")["a.png"] == runs.ray_bytes["a.png"]
    failures = [sorted(map(json.dumps, map(json.loads, (d / "_failed.jsonl").read_text().splitlines())))
                for d in (single, ray)]
    assert failures[0] == failures[1] and len(failures[0]) == 2
    assert {json.loads(f)["key"] for f in failures[0]} == {"bad", "sub/cut"}


def test_evaluate_on_ray_scores_as_the_single_process_run(runs):
    single, ray = runs.scores["single"], runs.scores["ray"]
    assert [r["name"] for r in ray["images"]] == ["im0.png", "im1.png"]
    assert ray["images"] == single["images"] and ray["mean"] == single["mean"] and ray["bicubic"] == single["bicubic"]
    assert ray["images"][1]["size"] == [16, 30]
    # an independent check of one number: PSNR-Y of the saved SR against GTmod, by hand (BT.601, border 2)
    sr = np.asarray(Image.open(runs.root / "sr_ray" / "im0.png")).astype(np.float64)
    hr = np.asarray(Image.open(runs.root / "hr" / "im0.png")).astype(np.float64)
    y = [(16 + im @ np.array([65.481, 128.553, 24.966]) / 255)[2:-2, 2:-2] for im in (sr, hr)]
    assert abs(10 * np.log10(255 ** 2 / np.mean((y[0] - y[1]) ** 2)) - ray["images"][0]["psnr_y"]) < 1e-3
    for name in ("im0.png", "im1.png"):
        assert (runs.root / "sr_ray" / name).read_bytes() == (runs.root / "sr_single" / name).read_bytes()


# --------------------------------------------------------------------------- without Ray


def test_the_stages_row_by_row_write_the_single_process_bytes(tmp_path, make_image):
    """read -> upscale -> write on plain dict rows, as Ray Data hands them over, without Ray."""
    model = tiny_generator("srresnet", 2)
    save_generator(model, tmp_path / "g.pth", fmt="raysr")
    make_inputs(tmp_path / "in", make_image)
    assert main([str(a) for a in ["--model", tmp_path / "g.pth", "--input", tmp_path / "in",
                                  "--output", tmp_path / "single"]]) == 3
    stage = UpscaleStage(functools.partial(Upscaler, [model], UpscaleOptions()))
    rows = []
    for name in GOOD + BAD:
        row = read_stage({"uri": str(tmp_path / "in" / name), "outs": [str(tmp_path / "rows" / name)]})
        rows += [write_stage(r) for table in stage(pa.Table.from_pylist([row])) for r in table.to_pylist()]
    assert sorted(Path(r["uri"]).name for r in rows if r["error"]) == ["bad.png", "cut.png"]
    assert all(r["count"] == 1 for r in rows)
    for name in GOOD:
        assert (tmp_path / "rows" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name


def test_the_shard_stages_row_by_row_assemble_the_single_process_shard(tmp_path, make_image):
    """read_shard_stage -> UpscaleStage -> write_part_stage -> assemble_shard on plain rows, without Ray."""
    model = tiny_generator("srresnet", 2)
    save_generator(model, tmp_path / "g.pth", fmt="raysr")
    make_inputs(tmp_path / "in", make_image)
    write_tar(tmp_path / "in.tar", [(name, (tmp_path / "in" / name).read_bytes()) for name in GOOD + BAD])
    assert main([str(a) for a in ["--model", tmp_path / "g.pth", "--input", tmp_path / "in.tar",
                                  "--output-shards", tmp_path / "single.tar"]]) == 3
    stage = UpscaleStage(functools.partial(Upscaler, [model], UpscaleOptions(batch_tiles=1)))
    out = str(tmp_path / "rows.tar")
    read = list(read_shard_stage({"url": str(tmp_path / "in.tar"), "shard_out": out, "outs": ["png"]}))
    assert [r["samples"] for r in read] == [6] * 6 and [r["index"] for r in read] == list(range(6))
    written = [write_part_stage(r) for table in stage(pa.Table.from_pylist(read)) for r in table.to_pylist()]
    parts = {r["index"]: (r["key"], [("png", r["part"])]) for r in written if not r["error"]}
    assert sorted(r["key"] for r in written if r["error"]) == ["bad", "sub/cut"]
    assemble_shard(out, [parts[i] for i in sorted(parts)])
    assert (tmp_path / "rows.tar").read_bytes() == (tmp_path / "single.tar").read_bytes()
    assert not (tmp_path / "rows.tar.parts").exists()  # the staged members are gone
    (missing,) = read_shard_stage({"url": str(tmp_path / "none.tar"), "shard_out": out, "outs": ["png"]})
    assert missing["unreadable"] and "does not exist" in missing["error"] and "a rerun tries it again" in missing["error"]


@pytest.mark.parametrize("dtype,channels,icc", [(np.uint8, 3, None), (np.uint16, 4, b"profile"),
                                                (np.uint8, 1, b"")])
def test_image_columns_round_trip(dtype, channels, icc):
    pixels = (np.arange(5 * 7 * channels) * 997 % np.iinfo(dtype).max).astype(dtype).reshape(5, 7, channels)
    back = image_from_columns(image_columns(DecodedImage(pixels, "PNG", icc)))
    assert back.pixels.dtype == dtype and (back.pixels == pixels).all()
    assert back.format == "PNG" and back.icc_profile == (icc or None)


def test_workers_option():
    assert parse_workers("2") == (2, 2) and parse_workers("1,4") == (1, 4)
    for bad in ("0", "3,1", "a,b", "1,2,3", ""):
        with pytest.raises(InputError, match="--workers takes MIN,MAX"):
            parse_workers(bad)


def test_cpu_actors_that_would_hold_every_cpu_are_refused(ray_local):
    from raysr.batch_inference import actor_resources

    cpus = int(ray_local.cluster_resources()["CPU"])
    assert actor_resources((cpus - 1, cpus), None) == (cpus - 1, cpus, 0.0)
    with pytest.raises(InputError, match=f"--workers {cpus},{cpus}: {cpus} CPU model actors would hold all {cpus} CPUs"):
        actor_resources((cpus, cpus), None)


def test_ray_options_without_ray_are_refused(tmp_path, capsys):
    for argv, needle in ((["--workers", "1,2"], "--workers applies only with --ray"),
                         (["--gpus-per-worker", "1"], "--gpus-per-worker applies only with --ray"),
                         (["--ray", "--device", "cpu"], "leave --device out"),
                         (["--ray", "--workers", "0"], "--workers takes MIN,MAX"),
                         (["--ray", "--gpus-per-worker", "-1"], "--gpus-per-worker must be")):
        assert main(["--model", "m.pth", "--input", str(tmp_path), "--output", str(tmp_path / "o")] + argv) == 2
        assert needle in capsys.readouterr().err, argv
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- a killed driver


def test_a_driver_killed_mid_job_then_the_same_command_finishes_with_a_clean_runs_bytes(ray_local, tmp_path,
                                                                                       monkeypatch):
    """``raysr.upscale --ray`` as a driver of the session's Ray (as ``ray job submit`` runs it), SIGKILLed
    once its first outputs are written: every file under an output name is complete, and the same
    command then upscales only the rest and ends with the bytes of an uninterrupted single-process run;
    no temporary file of either run is left. An input deleted once the job has listed it is listed in
    _failed.jsonl and counted (exit code 3), and the other outputs are all there."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import synthetic_image

    root = tmp_path
    save_generator(tiny_generator("srresnet", 2), root / "g.pth", fmt="raysr")
    (root / "in").mkdir()
    names = [f"im{i:02d}.png" for i in range(40)]
    for i, name in enumerate(names):
        Image.fromarray(synthetic_image(48, 40, seed=i)).save(root / "in" / name)
    assert main([str(a) for a in ["--model", root / "g.pth", "--input", root / "in", "--output", root / "clean"]]) == 0

    argv = ["--model", str(root / "g.pth"), "--input", str(root / "in"), "--output", str(root / "out"), "--ray"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "raysr.upscale", *argv], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list((root / "out").glob("im*.png")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # polling the output folder: the first written file is the event
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        err = proc.communicate()[1]
    written = sorted(p.name for p in (root / "out").glob("im*.png"))
    assert 0 < len(written) < len(names), ("the kill did not land mid-job", written, err[-2000:])
    for name in written:  # written atomically: a file under its final name is the whole file
        assert (root / "out" / name).read_bytes() == (root / "clean" / name).read_bytes(), name

    # the same command again; the last input is deleted once the job has listed it, before it is read
    import raysr.upscale

    skipped = []  # what the second run found written: the killed job's workers may land a file or two
    # after the listing above, until Ray has reaped them

    def plan_then_delete(args):
        planned = plan_jobs(args)
        skipped.append(planned[1])
        (root / "in" / names[-1]).unlink()
        return planned

    plan_jobs = raysr.upscale.plan_jobs
    monkeypatch.setattr(raysr.upscale, "plan_jobs", plan_then_delete)
    code, err = run_captured(argv)
    assert code == 3, err[-3000:]
    assert len(written) <= skipped[0] < len(names)
    left = len(names) - skipped[0] - 1
    assert f"{left} done, {skipped[0]} skipped (output already there), 1 failed" in err, err[-2000:]
    (failed,) = [json.loads(line) for line in (root / "out" / "_failed.jsonl").read_text().splitlines()]
    assert Path(failed["input"]).name == names[-1] and failed["stage"] == "read"
    assert files_under(root / "out") == sorted(names[:-1] + ["_failed.jsonl"])  # no temporary file left
    for name in names[:-1]:
        assert (root / "out" / name).read_bytes() == (root / "clean" / name).read_bytes(), name
