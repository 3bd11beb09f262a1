"""raysr.upscale on WebDataset shards: --input SHARDS --output-shards PATTERN (raysr.data.image_shards).

Input shards are written here with tarfile from image files kept beside them; the references are
raysr.upscale's own per-image run on those files, and the output tars are read back with tarfile.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from raysr.generator_file import save_generator
from raysr.images import decode_image
from raysr.data.npy import encode_npy
from test_upscale import png16, run, tiny_generator


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png_bytes(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **kw)
    return buf.getvalue()


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture
def shards(tmp_path, make_image):
    """Three input shards and, in ``files/``, the same images as files (the reference run's input).

    in-000000: a (RGB + ICC, with a json member), b (RGBA), c (16-bit RGB); in-000001: d (a JPEG),
    bad (not an image), e (a .npy array); in-000002: f, then the tar is cut inside g."""
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    images = {"a.png": png_bytes(make_image(12, 10, seed=1), icc_profile=srgb),
              "b.png": png_bytes(np.dstack([make_image(9, 11, seed=2), make_image(9, 11, seed=3)[..., :1]])),
              "c.png": png16(make_image(8, 7, seed=4).astype(np.uint16) * 257 + 3),
              "f.png": png_bytes(make_image(10, 10, seed=7))}
    jpeg = io.BytesIO()
    Image.fromarray(make_image(10, 9, seed=5)).save(jpeg, format="JPEG", quality=90)
    images["d.jpg"] = jpeg.getvalue()
    npy = make_image(11, 8, seed=6)
    images["e.png"] = png_bytes(npy)  # the reference for the array sample: the same pixels as a PNG file
    for name, data in images.items():
        (tmp_path / "files").mkdir(exist_ok=True)
        (tmp_path / "files" / name).write_bytes(data)
    src = tmp_path / "src"
    write_tar(src / "in-000000.tar", [("a.png", images["a.png"]), ("a.json", b'{"label": 1}'),
                                      ("b.png", images["b.png"]), ("c.png", images["c.png"])])
    write_tar(src / "in-000001.tar", [("d.jpg", images["d.jpg"]), ("bad.png", b"not an image"),
                                      ("e.npy", encode_npy(npy))])
    write_tar(src / "whole.tar", [("f.png", images["f.png"]), ("g.png", png_bytes(make_image(40, 40, seed=8)))])
    (src / "in-000002.tar").write_bytes((src / "whole.tar").read_bytes()[:2048])  # cut inside g.png
    (src / "whole.tar").unlink()
    model = tiny_generator("srresnet", 2)
    save_generator(model, tmp_path / "g.pth", fmt="raysr")
    return tmp_path


def test_shards_in_shards_out_keyed_like_the_input(shards, capsys):
    ckpt = shards / "g.pth"
    assert run(["--model", ckpt, "--input", shards / "files", "--output", shards / "ref"]) == 0
    capsys.readouterr()
    argv = ["--model", ckpt, "--input", shards / "src" / "in-{000000..000002}.tar",
            "--output-shards", shards / "out" / "sr-{000000..000002}.tar"]
    assert run(argv) == 3
    err = capsys.readouterr().err
    assert "6 done, 0 shards skipped (output shard already there), 2 failed" in err
    out = shards / "out"
    assert sorted(p.name for p in out.iterdir()) == ["_failed.jsonl", "sr-000000.tar", "sr-000001.tar",
                                                    "sr-000002.tar"]  # no temporary file left
    got = {}
    for i, keys in enumerate([["a", "b", "c"], ["d", "e"], ["f"]]):
        members = tar_members(out / f"sr-{i:06d}.tar")
        assert list(members) == [f"{k}.png" for k in keys]  # tar order, one PNG per sample, no json
        got.update(members)
    # PNG inputs: the very bytes the per-image run writes (ICC profile, alpha and 16 bits kept)
    for key in ("a", "b", "c", "f", "e"):
        assert got[f"{key}.png"] == (shards / "ref" / f"{key}.png").read_bytes(), key
    assert decode_image(got["c.png"]).bit_depth == 16 and decode_image(got["b.png"]).has_alpha
    # the JPEG sample comes out as PNG, with the pixels the per-image run gives before JPEG encoding
    from raysr.images import read_image
    from raysr.upscale import upscale_image
    want = upscale_image([tiny_generator("srresnet", 2)], read_image(str(shards / "files" / "d.jpg")))[0]
    assert (decode_image(got["d.png"]).pixels == want.pixels).all()
    failed = [json.loads(line) for line in (out / "_failed.jsonl").read_text().splitlines()]
    assert [(Path(f["input"]).name, f.get("key"), f["stage"]) for f in failed] == \
        [("in-000001.tar", "bad", "read"), ("in-000002.tar", None, "read")]
    assert "not an image" in failed[0]["error"] and "the tar breaks" in failed[1]["error"]


def test_a_rerun_skips_output_shards_already_there(shards, capsys):
    argv = ["--model", shards / "g.pth", "--input", shards / "src", "--output-shards", shards / "out"]
    assert run(argv) == 3  # a folder of shards in, a folder out: the outputs take the inputs' names
    out = shards / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == ["in-000000.tar", "in-000001.tar", "in-000002.tar"]
    first = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    mtime = (out / "in-000000.tar").stat().st_mtime_ns
    (out / "in-000001.tar").unlink()
    capsys.readouterr()
    assert run(argv) == 3  # the bad sample of in-000001 fails again
    err = capsys.readouterr().err
    assert "skipping 2 input shard(s) whose output shard is already there" in err
    assert "2 done, 2 shards skipped (output shard already there), 1 failed" in err
    assert (out / "in-000000.tar").stat().st_mtime_ns == mtime
    assert (out / "in-000001.tar").read_bytes() == first["in-000001.tar"]  # tar headers are fixed: same bytes


def test_batch_tiles_on_shards_stays_within_one_level(shards):
    base = ["--model", shards / "g.pth", "--input", shards / "src" / "in-000000.tar"]
    assert run(base + ["--output-shards", shards / "one.tar"]) == 0
    assert run(base + ["--output-shards", shards / "batched.tar", "--tile", 4, "--batch-tiles", 8]) == 0
    one, batched = tar_members(shards / "one.tar"), tar_members(shards / "batched.tar")
    assert list(one) == list(batched) == ["a.png", "b.png", "c.png"]
    for name in one:
        a, b = decode_image(one[name]), decode_image(batched[name])
        assert a.pixels.shape == b.pixels.shape and a.icc_profile == b.icc_profile
        assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= 1, name


def test_alpha_sweep_in_shards_is_one_member_per_alpha(shards):
    psnr, gan = tiny_generator("srresnet", 2, seed=1), tiny_generator("srresnet", 2, seed=2)
    save_generator(psnr, shards / "psnr.pth", fmt="raysr")
    save_generator(gan, shards / "gan.pth", fmt="raysr")
    assert run(["--model", shards / "psnr.pth", "--model-b", shards / "gan.pth", "--alpha", 0, 0.5,
                "--input", shards / "src" / "in-000000.tar", "--output-shards", shards / "sweep.tar"]) == 0
    names = list(tar_members(shards / "sweep.tar"))
    assert names == [f"{k}.alpha{a}.png" for k in "abc" for a in ("0", "0.5")]


def test_shard_options_that_cannot_run_are_refused(shards, capsys):
    ckpt, src = shards / "g.pth", shards / "src"
    cases = [
        (["--input", src, "--output", shards / "o"], "--output-shards PATTERN"),
        (["--input", shards / "files", "--output-shards", shards / "o"], "is no shards"),
        (["--input", src / "in-{000000..000002}.tar", "--output-shards", shards / "o" / "sr-{0..1}.tar"],
         "names 2 shard(s), the input has 3"),
        (["--input", src, "--output-shards", shards / "o" / "one.tar"], "names one shard, the input has 3"),
        (["--input", src / "in-000000.tar", "--output-shards", src / "in-000000.tar"], "would overwrite its input"),
        (["--input", src / "none-{0..3}.tar", "--output-shards", shards / "o"], "4 of its 4 shards do not exist"),
    ]
    for argv, needle in cases:
        assert run(["--model", ckpt] + argv) == 2, argv
        assert needle in capsys.readouterr().err, argv
        assert not (shards / "o").exists()
    assert run(["--model", ckpt, "--input", src, "--output", shards / "o", "--output-shards", shards / "o"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_shards_on_s3(s3_bucket, shards):
    from raysr import storage

    for p in sorted((shards / "src").glob("in-00000[01].tar")):
        storage.write_bytes(f"s3://{s3_bucket}/in/{p.name}", p.read_bytes())
    assert run(["--model", shards / "g.pth", "--input", f"s3://{s3_bucket}/in/in-{{000000..000001}}.tar",
                "--output-shards", f"s3://{s3_bucket}/out/"]) == 3
    assert storage.list_files(f"s3://{s3_bucket}/out") == [
        f"s3://{s3_bucket}/out/{name}" for name in ("_failed.jsonl", "in-000000.tar", "in-000001.tar")]
    assert run(["--model", shards / "g.pth", "--input", shards / "src" / "in-000000.tar",
                "--output-shards", shards / "local.tar"]) == 0
    assert storage.read_bytes(f"s3://{s3_bucket}/out/in-000000.tar") == (shards / "local.tar").read_bytes()


def test_a_glob_of_shards_is_shards(shards):
    assert run(["--model", shards / "g.pth", "--input", shards / "src" / "in-00000[01].tar",
                "--output-shards", shards / "out"]) == 3  # in-000001 holds the bad sample
    assert sorted(p.name for p in (shards / "out").glob("*.tar")) == ["in-000000.tar", "in-000001.tar"]
