"""data.degradation: paired — LR/HR pair shards from make_shards --lr-input, and the loader's aligned crops.

The reference LR is the block mean (each LR pixel the rounded mean of its scale × scale HR block): an
exact operation that commutes with every flip and rot90 of a block-aligned crop, so an LR crop cut
and flipped with its HR crop must equal the block mean of the flipped HR crop, pixel for pixel.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from raysr.config import ConfigError, load_config
from raysr.data import DataStats, check_train_shards, iter_pairs, make_train_loader
from raysr.data.make_shards import main as make_shards_main
from raysr.data.make_shards import make_shards
from raysr.data.npy import encode_npy
from test_data_common import png_bytes, read_tar, to_uint8, write_tar
from conftest import synthetic_image

SCALE = 4


def block_mean(image: np.ndarray, scale: int) -> np.ndarray:
    """(H/scale, W/scale, C) uint8: the rounded mean of each scale × scale block of ``image`` (H, W, C)."""
    height, width, channels = image.shape
    blocks = image.reshape(height // scale, scale, width // scale, scale, channels).astype(np.float64)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def symmetries_of(crop: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of a square (S, S, C) crop, written from their definition (not raysr's)."""
    rotations = [np.rot90(crop, k) for k in range(4)]
    return rotations + [r[:, ::-1] for r in rotations]


def write_pairs(hr_dir, lr_dir, specs) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each ``(hr name, lr name, (height, width))`` of ``specs``: an HR PNG ``hr_dir/HR_NAME`` and its
    block-mean LR ``lr_dir/LR_NAME`` (made from the HR cut to a multiple of SCALE); returns HR name without
    extension -> (lr, hr as written)."""
    pairs = {}
    for i, (hr_name, lr_name, (height, width)) in enumerate(specs):
        hr = synthetic_image(height, width, seed=40 + i)
        lr = block_mean(hr[:height - height % SCALE, :width - width % SCALE], SCALE)
        for path, image in ((hr_dir / hr_name, hr), (lr_dir / lr_name, lr)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png_bytes(image))
        pairs[hr_name.rsplit(".", 1)[0]] = (lr, hr)
    return pairs


@pytest.fixture(scope="module")
def paired_shards(tmp_path_factory):
    """Pair shards of three images (one 101 px high: not a multiple of the scale) cut into 32-px sub-images."""
    root = tmp_path_factory.mktemp("paired")
    pairs = write_pairs(root / "hr", root / "lr", [("a.png", "a.png", (64, 96)), ("b.png", "bx4.png", (101, 64)),
                                                  ("sub/c.png", "sub/c_x4.png", (64, 64))])
    report = make_shards([str(root / "hr")], str(root / "shards"), crop_size=32, step=16, min_size=16, workers=1,
                         progress=False, lr_input=str(root / "lr"), scale=SCALE)
    return root, pairs, report


def test_make_shards_lr_input_round_trip(paired_shards):
    root, pairs, report = paired_shards
    sources = {"a": "a", "b": "b", "sub_c": "sub/c"}
    members = dict(kv for tar in sorted((root / "shards").glob("*.tar")) for kv in read_tar(tar))
    keys = sorted({name.split(".")[0] for name in members})
    # 32-px boxes every 16 px plus one flush with the far edge: 5x3 in 96x64, 3x6 in 64x100 (y 0..64, 68), 3x3
    assert report.samples == len(keys) == 15 + 18 + 9
    assert {name.split(".", 1)[1] for name in members} == {"hr.png", "lr.png", "json"}
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        lr, hr = pairs[meta["source"].rsplit(".", 1)[0]]
        assert sources[key.rsplit("_s", 1)[0]] + ".png" == meta["source"] and meta["scale"] == SCALE
        left, top, right, bottom = meta["box"]
        assert (right - left, bottom - top) == (32, 32) and left % SCALE == top % SCALE == 0
        decoded_hr = np.asarray(Image.open(io.BytesIO(members[f"{key}.hr.png"])))
        decoded_lr = np.asarray(Image.open(io.BytesIO(members[f"{key}.lr.png"])))
        np.testing.assert_array_equal(decoded_hr, hr[top:bottom, left:right])
        np.testing.assert_array_equal(decoded_lr, lr[top // SCALE:bottom // SCALE, left // SCALE:right // SCALE])
    b_boxes = [json.loads(members[f"{k}.json"])["box"] for k in keys if k.startswith("b_")]
    assert max(box[3] for box in b_boxes) == 100  # the 101-px HR is cut to 100 = 25 LR px x 4


def test_make_shards_lr_input_in_npy_keeps_the_pixels(tmp_path):
    pairs = write_pairs(tmp_path / "hr", tmp_path / "lr", [("a.png", "a_LRBI_x4.png", (64, 48))])
    make_shards([str(tmp_path / "hr")], str(tmp_path / "out"), crop_size=64, step=64, min_size=16, fmt="npy",
                workers=1, progress=False, lr_input=str(tmp_path / "lr"), scale=SCALE)
    members = dict(read_tar(next((tmp_path / "out").glob("*.tar"))))
    assert sorted(members) == ["a_s001.hr.npy", "a_s001.json", "a_s001.lr.npy"]
    lr, hr = pairs["a"]
    np.testing.assert_array_equal(np.load(io.BytesIO(members["a_s001.hr.npy"])), hr)
    np.testing.assert_array_equal(np.load(io.BytesIO(members["a_s001.lr.npy"])), lr)


@pytest.mark.parametrize("lr_on", ["loader", "device"])
def test_every_lr_crop_is_its_hr_crop_reduced_under_the_same_flip(paired_shards, lr_on):
    root, pairs, _ = paired_shards
    loader = make_train_loader(str(root / "shards"), 16, SCALE, 8, num_workers=0, seed=5, crops_per_image=2,
                               batches_per_epoch=6, lr_on=lr_on, shuffle_buffer=16, paired=True)
    # every 16-px window of the sources (any position), to find where each HR crop came from
    windows: dict[bytes, list[tuple[int, int]]] = {}
    for _, source in pairs.values():
        view = sliding_window_view(source, (16, 16), axis=(0, 1)).transpose(0, 1, 3, 4, 2)
        for top in range(view.shape[0]):
            for left in range(view.shape[1]):
                windows.setdefault(np.ascontiguousarray(view[top, left]).tobytes(), []).append((top, left))
    found = set()
    for batch in loader.host_batches():
        lr, hr = batch.finish("cpu", SCALE)
        assert lr.shape == (8, 3, 4, 4) and hr.shape == (8, 3, 16, 16)
        for lr_i, hr_i in zip(lr, hr):
            lr8, hr8 = to_uint8(lr_i), to_uint8(hr_i)
            np.testing.assert_array_equal(lr8, block_mean(hr8, SCALE))
            # where the HR crop is in a source image, and under which flip/rotation
            places = [(k, place) for k, version in enumerate(symmetries_of(hr8))
                      for place in windows.get(np.ascontiguousarray(version).tobytes(), [])]
            assert places and all(top % SCALE == left % SCALE == 0 for _, (top, left) in places), \
                "every crop starts on the LR grid"
            found.update(k for k, _ in places)
    assert len(found) >= 4  # the symmetries are drawn, not always the identity
    assert loader.stats()["skipped"] == 0


def test_lq_gt_names_and_npy_members(tmp_path):
    hr = synthetic_image(32, 48, seed=7)
    lr = block_mean(hr, SCALE)
    write_tar(tmp_path / "basicsr.tar", [("k1.gt.png", png_bytes(hr)), ("k1.lq.png", png_bytes(lr)),
                                         ("k2.lr.npy", encode_npy(lr)), ("k2.hr.npy", encode_npy(hr))])
    got = list(iter_pairs(str(tmp_path / "basicsr.tar"), 32, SCALE, augment=False, shuffle_buffer=0, paired=True))
    assert len(got) == 2
    for lr_t, hr_t in got:
        hr8 = to_uint8(hr_t)
        left = next(x for x in range(0, 17, SCALE) if np.array_equal(hr8, hr[:, x:x + 32]))
        np.testing.assert_array_equal(to_uint8(lr_t), lr[:, left // SCALE:left // SCALE + 8])
    # bicubic training on the same shards takes each sample's HR member
    hr_only = [to_uint8(h) for _, h in iter_pairs(str(tmp_path / "basicsr.tar"), 32, SCALE, augment=False,
                                                   shuffle_buffer=0)]
    assert all(any(np.array_equal(h, hr[:, x:x + 32]) for x in range(17)) for h in hr_only)


def test_bad_pairs_are_skipped_counted_and_named(tmp_path, caplog):
    hr = synthetic_image(32, 32, seed=8)
    good = [("good.hr.png", png_bytes(hr)), ("good.lr.png", png_bytes(block_mean(hr, SCALE)))]
    bad = [("nolr.hr.png", png_bytes(hr)), ("nolr.json", b"{}"),
           ("wrong.hr.png", png_bytes(hr)), ("wrong.lr.png", png_bytes(block_mean(hr, 2)))]
    write_tar(tmp_path / "mixed.tar", bad + good)
    stats = DataStats()
    with caplog.at_level(logging.WARNING, logger="raysr.data.stream"):
        got = list(iter_pairs(str(tmp_path / "mixed.tar"), 16, SCALE, shuffle_buffer=0, stats=stats, paired=True))
    assert len(got) == 1 and stats.skipped == 2 and stats.samples == 1
    warning = caplog.text
    assert "mixed.tar" in warning and "skipped 2" in warning and "nolr: no LR member" in warning
    check_train_shards(str(tmp_path / "mixed.tar"), 16, paired_scale=SCALE)  # one good sample is enough

    write_tar(tmp_path / "wrong.tar", bad[2:])
    with pytest.raises(ValueError) as err:
        check_train_shards(str(tmp_path / "wrong.tar"), 16, paired_scale=SCALE)
    message = str(err.value)
    assert "wrong.tar" in message and "wrong: member lr.png: LR is 16x16" in message
    assert "so LR should be 8x8" in message and "--lr-input" in message


def test_make_shards_refuses_a_missing_or_mis_sized_lr_naming_the_file(tmp_path, capsys):
    write_pairs(tmp_path / "hr", tmp_path / "lr", [("a.png", "a.png", (64, 64)), ("b.png", "b.png", (64, 64))])
    (tmp_path / "lr" / "b.png").write_bytes(png_bytes(synthetic_image(20, 16)))
    args = ["--input", str(tmp_path / "hr"), "--output", str(tmp_path / "out"), "--lr-input", str(tmp_path / "lr"),
            "--scale", str(SCALE), "--crop-size", "32", "--step", "32", "--min-size", "16", "--workers", "1"]
    assert make_shards_main(args) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'lr' / 'b.png'}: LR is 20x16" in err and "so LR should be 16x16" in err
    assert "--scale right" in err and not list((tmp_path / "out").glob("*.tar"))

    (tmp_path / "lr" / "b.png").unlink()
    assert make_shards_main(args) == 2
    err = capsys.readouterr().err
    assert "no LR image for 1 HR image(s)" in err and str(tmp_path / "hr" / "b.png") in err


@pytest.mark.parametrize("kwargs,message", [
    (dict(scale=4), "--lr-input DIR (the LR images of --input) and --scale S"),
    (dict(lr_input="LR"), "give --scale too"),
    (dict(lr_input="LR", scale=3, crop_size=32, step=15), "--crop-size 32 is not a multiple of --scale 3"),
    (dict(lr_input="LR", scale=4, crop_size=32, step=18), "--step 18 is not a multiple of --scale 4"),
])
def test_make_shards_pair_settings_are_explained(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_shards([str(tmp_path)], str(tmp_path / "out"), **kwargs)


def test_paired_config_needs_training_shards():
    with pytest.raises(ConfigError, match="data.degradation: paired trains on shards of LR/HR pairs and data.train "
                                          "is not set"):
        load_config(overrides=["data.degradation=paired"])
    assert load_config(overrides=["data.degradation=paired", "data.train=x.tar"]).paired


def test_preview_shows_the_paired_crops(paired_shards, tmp_path):
    """One in-process run of raysr.preview: the path raysr.train's loader takes, through the config."""
    from raysr.preview import main as preview_main
    root, _, _ = paired_shards
    assert preview_main(["--output", str(tmp_path), "--count", "3", "--set", "data.degradation=paired",
                         "--set", f"data.train={root / 'shards'}", "--set", "data.gt_size=16",
                         "--set", "data.batch_size=4"]) == 0
    for i in range(3):
        hr = np.asarray(Image.open(tmp_path / f"hr_{i:04d}.png"))
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"lr_{i:04d}.png")), block_mean(hr, SCALE))
    assert json.loads((tmp_path / "pairs.json").read_text())["degradation"] == "paired"
