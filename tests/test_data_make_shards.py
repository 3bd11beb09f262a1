"""make_shards: BasicSR sub-image positions, pixel-exact crops, image modes, manifest, re-runs."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import struct
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysr.data.make_shards import MIB, crop_boxes, crop_positions, make_shards
from test_data_common import png_bytes, read_tar, shard_samples, write_images
from conftest import synthetic_image


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_crop_positions_follow_extract_subimages():
    # 1680 = 1200 + 480 exactly: no extra crop; 1050: 0, 240, 480 leave 90 px -> one crop at 570
    assert crop_positions(1680, 480, 240) == [0, 240, 480, 720, 960, 1200]
    assert crop_positions(1050, 480, 240) == [0, 240, 480, 570]
    assert len(crop_boxes(1680, 1050, 480, 240)) == 24
    assert crop_positions(480, 480, 240) == [0]
    assert crop_positions(300, 480, 240) == [0]  # shorter than the crop: whole
    assert crop_positions(500, 480, 240) == [0, 20]
    # a side shorter than the crop is taken whole, the other one is still cut
    assert crop_boxes(700, 300, 480, 240) == [(0, 0, 480, 300), (220, 0, 700, 300)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Five images (one kept whole, one too small) cut at 64/48 into 0.1 MiB shards."""
    root = tmp_path_factory.mktemp("make_shards")
    sizes = [(130, 150), (64, 64), (100, 200), (50, 90), (20, 40)]
    images = write_images(root / "in", sizes)
    report = make_shards([str(root / "in")], str(root / "out"), crop_size=64, step=48, min_size=40,
                         shard_size_mb=0.1, workers=1, progress=False)
    return root, images, report


def test_every_crop_is_stored_exactly_with_its_metadata(built):
    root, images, report = built
    shards = sorted((root / "out").glob("train-*.tar"))
    samples = shard_samples(shards)
    # 130x150 at 64/48: rows 0,48,66 x cols 0,48,86 = 9; 64x64: 1; 100x200: 2 rows x 4 cols = 8;
    # 50x90 (shorter than 64, >= min 40): rows [0] (whole 50) x cols 0,26 = 2; 20x40 skipped
    assert len(samples) == 9 + 1 + 8 + 2 == report.samples
    metas = {name[:-5]: json.loads(data) for s in shards for name, data in read_tar(s) if name.endswith(".json")}
    assert set(metas) == set(samples)
    for key, pixels in samples.items():
        assert "." not in key and key.startswith("img0") and "_s" in key
        meta = metas[key]
        left, top, right, bottom = meta["box"]
        source = images[meta["source"][:-4]]
        assert meta["source_size"] == [source.shape[1], source.shape[0]]
        np.testing.assert_array_equal(pixels, source[top:bottom, left:right])
    assert {m["source"] for m in metas.values()} == {"img00.png", "img01.png", "img02.png", "img03.png"}
    assert metas["img03_s002"]["box"] == [26, 0, 90, 50]
    assert [name for name, _ in read_tar(shards[0])][:2] == ["img00_s001.png", "img00_s001.json"]
    assert any("img04" in path and "smaller than --min-size" in why for path, why in report.skipped)


def test_manifest_describes_every_shard(built):
    root, _, report = built
    table = pq.read_table(root / "out" / "manifest.parquet").to_pylist()
    shards = sorted((root / "out").glob("train-*.tar"))
    assert [row["name"] for row in table] == [p.name for p in shards] == [f"train-{i:06d}.tar" for i in
                                                                           range(len(shards))]
    assert len(shards) > 1
    for row, path in zip(table, shards):
        assert row["bytes"] == path.stat().st_size <= 0.1 * MIB
        assert row["sha256"] == _sha256(path)
        assert row["samples"] == len(read_tar(path)) // 2
    assert sum(row["samples"] for row in table) == report.samples


def _gray16_png(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("I;16", (values.shape[1], values.shape[0]), values.astype("<u2").tobytes()).save(buf, "PNG")
    return buf.getvalue()


def _rgb16_png(rgb: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_image_modes_become_upright_rgb(tmp_path):
    base = synthetic_image(48, 64, 7)
    gray = base[..., 0]
    rng = np.random.default_rng(1)
    gray16 = rng.integers(0, 65536, (48, 64))
    rgb16 = rng.integers(0, 65536, (48, 64, 3))
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(gray).save(src / "gray.png")
    pal = Image.fromarray(indices, mode="P")
    pal.putpalette(palette.tobytes())
    pal.save(src / "palette.png")
    rgba = np.dstack([base, rng.integers(0, 256, (48, 64), dtype=np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(src / "rgba.png")
    (src / "gray16.png").write_bytes(_gray16_png(gray16))
    (src / "rgb16.png").write_bytes(_rgb16_png(rgb16))
    # stored rotated 90 degrees counter-clockwise; orientation 6 says "rotate 90 clockwise to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(base, 1))).save(src / "exif.jpg", quality=98, subsampling=0,
                                                                   exif=exif.tobytes())
    make_shards([str(src)], str(tmp_path / "out"), crop_size=128, step=128, min_size=8, workers=1, progress=False)
    got = shard_samples(sorted((tmp_path / "out").glob("*.tar")))
    assert set(got) == {f"{n}_s001" for n in ("gray", "palette", "rgba", "gray16", "rgb16", "exif")}
    np.testing.assert_array_equal(got["gray_s001"], np.dstack([gray] * 3))
    np.testing.assert_array_equal(got["palette_s001"], palette[indices])
    np.testing.assert_array_equal(got["rgba_s001"], base)  # alpha dropped, colour kept (as OpenCV reads it)
    np.testing.assert_array_equal(got["gray16_s001"], np.dstack([np.round(gray16 / 257).astype(np.uint8)] * 3))
    np.testing.assert_array_equal(got["rgb16_s001"], np.round(rgb16 / 257).astype(np.uint8))
    assert got["exif_s001"].shape == base.shape  # upright: 48 x 64, not 64 x 48
    assert np.abs(got["exif_s001"].astype(int) - base).mean() < 3  # JPEG-lossy, but the right way up


def test_rerun_reuses_intact_shards_and_rebuilds_identical_ones(tmp_path):
    write_images(tmp_path / "in", [(96, 96)] * 4 + [(96, 160)])
    out = tmp_path / "out"
    args = dict(crop_size=48, step=48, min_size=16, shard_size_mb=0.05, progress=False)
    first = make_shards([str(tmp_path / "in")], str(out), workers=1, **args)
    shards = sorted(out.glob("train-*.tar"))
    assert first.written == len(shards) >= 3 and first.reused == 0  # shards[1] is deleted and [2] damaged below
    digests = {p.name: _sha256(p) for p in shards}
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}

    second = make_shards([str(tmp_path / "in")], str(out), workers=1, **args)
    assert (second.written, second.reused) == (0, len(shards))
    assert {p.name: p.stat().st_mtime_ns for p in shards} == mtimes

    shards[1].unlink()
    damaged = bytearray(shards[2].read_bytes())
    damaged[700] ^= 0xFF  # same size, different checksum
    shards[2].write_bytes(bytes(damaged))
    third = make_shards([str(tmp_path / "in")], str(out), workers=2, **args)
    assert (third.written, third.reused) == (2, len(shards) - 2)
    assert {p.name: _sha256(p) for p in sorted(out.glob("train-*.tar"))} == digests
    assert [e.sha256 for e in third.entries] == [e.sha256 for e in first.entries]

    # a changed source image invalidates exactly the shards holding its crops
    changed = tmp_path / "in" / "img04.png"
    changed.write_bytes(png_bytes(synthetic_image(96, 160, 99)))
    fourth = make_shards([str(tmp_path / "in")], str(out), workers=1, **args)
    holding = {e.shard for e in first.entries if e.plan_start + e.plan_count > 4 * 4}
    assert 0 < len(holding) < len(shards)
    assert fourth.written == len(holding) and fourth.reused == len(shards) - len(holding)


def test_shards_do_not_depend_on_the_number_of_workers(tmp_path):
    write_images(tmp_path / "in", [(80, 120), (120, 80), (64, 64)], seed=5)
    args = dict(crop_size=40, step=30, min_size=16, shard_size_mb=0.03, progress=False)
    make_shards([str(tmp_path / "in")], str(tmp_path / "one"), workers=1, **args)
    make_shards([str(tmp_path / "in" / "*.png")], str(tmp_path / "two"), workers=2, **args)
    one, two = sorted((tmp_path / "one").glob("*.tar")), sorted((tmp_path / "two").glob("*.tar"))
    assert len(one) > 1 and [p.name for p in one] == [p.name for p in two]
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]


def test_undecodable_input_is_skipped_with_a_warning(tmp_path, caplog):
    write_images(tmp_path / "in", [(64, 64)])
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with caplog.at_level(logging.WARNING, logger="raysr.data.make_shards"):
        report = make_shards([str(tmp_path / "in")], str(tmp_path / "out"), crop_size=64, step=64, min_size=8,
                             workers=1, progress=False)
    assert report.samples == 1
    assert [path for path, _ in report.skipped] == [str(tmp_path / "in" / "broken.png")]
    assert "broken.png" in caplog.text


@pytest.mark.parametrize("kwargs, message", [
    (dict(fmt="png", quality=90), "jpeg and webp only"),
    (dict(fmt="gif"), "format must be one of"),
    (dict(step=0), "step must be a positive integer"),
    (dict(shard_size_mb=0), "shard_size_mb must be > 0"),
    (dict(min_size=10_000), "no usable images"),
])
def test_bad_settings_are_explained(tmp_path, kwargs, message):
    write_images(tmp_path / "in", [(32, 32)])
    with pytest.raises(ValueError, match=message):
        make_shards([str(tmp_path / "in")], str(tmp_path / "out"), workers=1, progress=False, **kwargs)


def test_inputs_must_exist_and_be_local(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        make_shards([str(tmp_path / "nope")], str(tmp_path / "out"), workers=1)
    with pytest.raises(ValueError, match="must be local"):
        make_shards(["s3://bucket/photos"], str(tmp_path / "out"), workers=1)


def _single_member(folder):
    members = read_tar(next(folder.glob("*.tar")))
    return members[0][0], np.asarray(Image.open(io.BytesIO(members[0][1])).convert("RGB")).astype(int)


def test_jpeg_and_webp_formats(tmp_path):
    images = write_images(tmp_path / "in", [(64, 64), (64, 64)])
    common = dict(crop_size=64, step=64, min_size=8, workers=1, progress=False)
    make_shards([str(tmp_path / "in")], str(tmp_path / "jpeg"), fmt="jpeg", quality=97, **common)
    name, pixels = _single_member(tmp_path / "jpeg")
    assert name == "img00_s001.jpg" and np.abs(pixels - images["img00"]).mean() < 4  # 4:4:4, q97
    make_shards([str(tmp_path / "in")], str(tmp_path / "webp"), fmt="webp", **common)
    name, pixels = _single_member(tmp_path / "webp")
    assert name == "img00_s001.webp"
    np.testing.assert_array_equal(pixels, images["img00"])  # lossless by default
    make_shards([str(tmp_path / "in")], str(tmp_path / "lossy"), fmt="webp", quality=80, **common)
    _, pixels = _single_member(tmp_path / "lossy")
    assert np.abs(pixels - images["img00"]).mean() < np.abs(pixels - images["img01"]).mean() / 3


def test_an_interrupted_run_resumes_from_its_manifest(tmp_path, monkeypatch):
    import raysr.storage

    write_images(tmp_path / "in", [(96, 96)] * 5)
    args = dict(crop_size=48, step=48, min_size=16, shard_size_mb=0.05, workers=1, progress=False)
    clean = make_shards([str(tmp_path / "in")], str(tmp_path / "clean"), **args)
    real_write, uploads = raysr.storage.write_stream, []

    def dies_on_third_shard(uri, fileobj, metadata=None):
        if uri.endswith(".tar"):
            uploads.append(uri)
            if len(uploads) == 3:
                raise raysr.storage.StorageError(f"simulated crash writing {uri}")
        real_write(uri, fileobj, metadata)

    monkeypatch.setattr(raysr.storage, "write_stream", dies_on_third_shard)
    with pytest.raises(raysr.storage.StorageError, match="simulated crash"):
        make_shards([str(tmp_path / "in")], str(tmp_path / "out"), **args)
    listed = pq.read_table(tmp_path / "out" / "manifest.parquet").num_rows
    assert 1 <= listed < len(clean.entries)
    monkeypatch.setattr(raysr.storage, "write_stream", real_write)
    resumed = make_shards([str(tmp_path / "in")], str(tmp_path / "out"), **args)
    assert resumed.reused == listed and resumed.written == len(clean.entries) - listed
    assert [e.sha256 for e in resumed.entries] == [e.sha256 for e in clean.entries]


def _no_encoding(monkeypatch):
    import raysr.data.make_shards as ms

    def encode_not_allowed(*args):
        raise AssertionError("encoding started before the output was checked")

    monkeypatch.setattr(ms, "_encode_job", encode_not_allowed)


@pytest.mark.parametrize("output, message", [
    ("a-file", r"output .*a-file is an existing file, not a directory"),
    ("a-file/shards", r"cannot write shards to output .*a-file/shards: Not a directory"),
])
def test_unwritable_output_exits_2_before_encoding(tmp_path, monkeypatch, capsys, output, message):
    from raysr.data.make_shards import main

    write_images(tmp_path / "in", [(64, 64)])
    (tmp_path / "a-file").write_text("not a directory")
    _no_encoding(monkeypatch)
    code = main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / output), "--crop-size", "32",
                 "--step", "32", "--min-size", "8", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("make_shards: error: ") and "Traceback" not in err
    assert re.search(message, err)


def test_a_write_error_midway_exits_2_naming_the_file(tmp_path, monkeypatch, capsys):
    import errno

    import raysr.storage
    from raysr.data.make_shards import main

    write_images(tmp_path / "in", [(96, 96)] * 3)
    real_write, tars = raysr.storage.write_stream, []

    def disk_fills_on_second_shard(uri, fileobj, metadata=None):
        if uri.endswith(".tar"):
            tars.append(uri)
            if len(tars) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), uri)
        real_write(uri, fileobj, metadata)

    monkeypatch.setattr(raysr.storage, "write_stream", disk_fills_on_second_shard)
    code = main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--crop-size", "48",
                 "--step", "48", "--min-size", "16", "--shard-size-mb", "0.05", "--workers", "1"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""  # no success summary
    last = captured.err.strip().splitlines()[-1]
    assert last == (f"make_shards: error: No space left on device: {tars[1]}; the shards listed in the manifest "
                    "are complete: fix the problem and re-run the same command to resume from them")
    assert "Traceback" not in captured.err
    assert pq.read_table(tmp_path / "out" / "manifest.parquet").column("name").to_pylist() == ["train-000000.tar"]


def test_the_encoding_pool_forks_only_a_process_with_one_thread():
    """A child forked beside running threads can inherit a lock one of them holds and hang past the
    pool's terminate() (seen once in the suite: the test process runs Ray's and the S3 proxy's threads)."""
    import subprocess
    import sys
    import threading

    from raysr.data.make_shards import _start_method

    helper = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
    helper.start()
    assert _start_method() == "forkserver"
    alone = subprocess.run([sys.executable, "-c", "from raysr.data.make_shards import _start_method as s; print(s())"],
                           capture_output=True, text=True, check=True)
    assert alone.stdout.strip() == "fork"
