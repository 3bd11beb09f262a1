"""Validation pairs: GT cut to a multiple of the scale, LR by exact 8-bit bicubic or from a paired
LR folder (data.val_lr), matched by name and checked against GTmod / scale."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from raysr.config import ConfigError, load_config
from raysr.evaluate import main as evaluate_main
from raysr.generator_file import save_generator
from raysr.models import build_generator
from raysr.ops.resize import imresize
from raysr.scoring import bicubic_baseline, score_generator, validation_images, validation_lr_images
from raysr.data.pairing import mod_crop
from raysr.validation.pairs import load_validation
from raysr.validation.validator import Validator
from raysr.data.make_shards import make_shards
from test_data_common import assert_lr_matches, to_uint8, write_images


def test_mod_crop_keeps_the_top_left():
    image = np.arange(7 * 10 * 1).reshape(7, 10, 1)
    assert mod_crop(image, 3).shape == (6, 9, 1)
    np.testing.assert_array_equal(mod_crop(image, 3), image[:6, :9])
    assert mod_crop(image, 1).shape == image.shape


def test_folder_images_become_gtmod_and_exact_lr(tmp_path, caplog):
    images = write_images(tmp_path / "Set3", [(37, 50), (64, 48), (30, 41)])
    (tmp_path / "Set3" / "notes.txt").write_text("not an image")
    (tmp_path / "Set3" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with caplog.at_level(logging.WARNING, logger="raysr.validation.pairs"):
        val = load_validation(str(tmp_path / "Set3"), 4)
    assert val.names == ["img00", "img01", "img02"] and len(val) == 3
    assert val.skipped == ["zz_broken"] and "zz_broken.png" in caplog.text
    name, lr, hr = val[0]
    assert name == "img00" and hr.shape == (3, 36, 48) and lr.shape == (3, 9, 12)
    np.testing.assert_array_equal(to_uint8(hr), images["img00"][:36, :48])
    for i in range(3):
        _, lr, hr = val[i]
        assert_lr_matches(lr, hr, 4)
    _, lr_again, _ = val[0]
    assert (lr_again == val[0][1]).all()  # cached LR comes back unchanged
    raw = load_validation(str(tmp_path / "Set3"), 4, quantize=False)[2][1]
    assert (raw * 255 - (raw * 255).round()).abs().max() > 1e-3  # not on 8-bit levels


def test_shards_as_validation_source(tmp_path):
    images = write_images(tmp_path / "in", [(40, 44), (52, 36)])
    make_shards([str(tmp_path / "in")], str(tmp_path / "val"), crop_size=100, step=100, min_size=8, workers=1,
                progress=False)
    val = load_validation(str(tmp_path / "val"), 3)
    assert val.names == ["img00_s001", "img01_s001"]
    np.testing.assert_array_equal(to_uint8(val[1][2]), images["img01"][:51, :36])
    assert_lr_matches(val[1][1], val[1][2], 3)


def test_empty_or_missing_sources_are_explained(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_validation(str(tmp_path / "empty"), 4)
    write_images(tmp_path / "tiny", [(3, 3)])
    with pytest.raises(ValueError, match="no usable validation image"):
        load_validation(str(tmp_path / "tiny"), 4)


# --------------------------------------------------------------------------- paired LR folders (data.val_lr)


def y_psnr_by_hand(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """PSNR on BT.601 Y of two uint8 (H, W, 3) images, ``border`` px ignored at each edge."""
    def y(x):
        x = x.astype(np.float64)
        return 16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255
    a, b = y(sr)[border:-border, border:-border], y(hr)[border:-border, border:-border]
    return 10 * np.log10(255 ** 2 / np.mean((a - b) ** 2))


@pytest.fixture
def real_pairs(tmp_path):
    """HR photos (not multiples of 4) and, in another folder, "camera" LR images that are not their
    bicubic: independent random pixels of GTmod / 4, named in the benchmark styles, one in a subfolder."""
    hr = write_images(tmp_path / "HR", [(37, 50), (64, 48)])
    (tmp_path / "HR" / "sub").mkdir()
    hr["sub/img02"] = write_images(tmp_path / "HR" / "sub", [(40, 44)], seed=5)["img00"]
    (tmp_path / "HR" / "sub" / "img00.png").rename(tmp_path / "HR" / "sub" / "img02.png")
    rng = np.random.default_rng(1)
    lr = {name: rng.integers(0, 256, ((im.shape[0] // 4), (im.shape[1] // 4), 3), dtype=np.uint8)
          for name, im in hr.items()}
    files = {"img00": "img00x4.png", "img01": "img01_LRBI_x4.png", "sub/img02": "sub/img02.png"}
    for name, file in files.items():
        (tmp_path / "LR" / file).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lr[name]).save(tmp_path / "LR" / file)
    return tmp_path / "HR", tmp_path / "LR", hr, lr


def test_a_paired_lr_folder_gives_its_own_lr_images(real_pairs):
    hr_dir, lr_dir, hr, lr = real_pairs
    val = load_validation(str(hr_dir), 4, lr_source=str(lr_dir))
    assert val.paired and val.names == ["img00", "img01", "sub/img02"]
    for i, name in enumerate(val.names):
        _, lr_t, hr_t = val[i]
        np.testing.assert_array_equal(to_uint8(lr_t), lr[name])  # the file, not a bicubic
        np.testing.assert_array_equal(to_uint8(hr_t), mod_crop(hr[name], 4))
    assert validation_lr_images(val)[2].tolist() == lr["sub/img02"].tolist()
    assert validation_lr_images(load_validation(str(hr_dir), 4)) is None


def test_paired_scores_use_the_given_lr(real_pairs, tmp_path):
    """All-zero Compact weights make SR the nearest-upsampled LR exactly, so its PSNR is known by hand."""
    hr_dir, lr_dir, hr, lr = real_pairs
    val = load_validation(str(hr_dir), 4, lr_source=str(lr_dir))
    images, lr_images = validation_images(val), validation_lr_images(val)
    g = build_generator("compact", num_feat=4, num_conv=1, scale=4)
    with torch.no_grad():
        for p in g.parameters():
            p.zero_()
    metrics, _ = score_generator(g, images, 4, lr_images=lr_images)
    nearest = [np.repeat(np.repeat(lr[n], 4, axis=0), 4, axis=1) for n in val.names]
    expected = np.mean([y_psnr_by_hand(sr, mod_crop(hr[n], 4), 4) for sr, n in zip(nearest, val.names)])
    assert metrics["psnr"] == pytest.approx(expected, abs=1e-9)
    # raysr.evaluate --lr pairs by the same rule and scores the same (it lists the top folder only)
    save_generator(g, tmp_path / "zero.pth")
    assert evaluate_main(["--hr", str(hr_dir), "--lr", str(lr_dir), "--scale", "4", "--model", str(tmp_path / "zero.pth"),
                          "--json", str(tmp_path / "e.json"), "--device", "cpu"]) == 0
    rows = {r["name"]: r["psnr_y"] for r in json.loads((tmp_path / "e.json").read_text())["images"]}
    assert rows == pytest.approx({f"{n}.png": y_psnr_by_hand(sr, mod_crop(hr[n], 4), 4)
                                  for sr, n in zip(nearest, val.names) if "/" not in n}, abs=1e-9)
    unpaired, _ = score_generator(g, images, 4)
    assert abs(unpaired["psnr"] - metrics["psnr"]) > 1  # random LR is far from the bicubic one
    bicubic = [to_uint8(imresize(torch.from_numpy(lr[n]).permute(2, 0, 1)[None].double() / 255, 4)[0].clamp(0, 1))
               for n in val.names]
    baseline = bicubic_baseline(images, 4, lr_images)
    assert baseline["psnr_bicubic"] == pytest.approx(
        np.mean([y_psnr_by_hand(b, mod_crop(hr[n], 4), 4) for b, n in zip(bicubic, val.names)]), abs=1e-6)


def test_paired_folder_errors_name_the_file(real_pairs, tmp_path, caplog):
    hr_dir, lr_dir, hr, lr = real_pairs
    Image.fromarray(lr["img01"][:-1]).save(lr_dir / "img01_LRBI_x4.png")  # one row short
    with pytest.raises(ValueError, match=r"img01_LRBI_x4.png: LR is 15x12 but GT img01 cropped to a multiple of 4 "
                                         r"is 64x48, so LR should be 16x12; is model.generator.scale right"):
        load_validation(str(hr_dir), 4, lr_source=str(lr_dir))
    (lr_dir / "img01_LRBI_x4.png").unlink()
    with pytest.raises(ValueError, match=r"no LR image for \['img01'\] .*expected e.g. img01.png or img01x4.png"):
        load_validation(str(hr_dir), 4, lr_source=str(lr_dir))
    Image.fromarray(lr["img01"]).save(lr_dir / "img01.png")
    Image.fromarray(lr["img01"]).save(lr_dir / "img01_x4.png")
    with pytest.raises(ValueError, match=r"img01.png and .*img01_x4.png both match image 'img01'; keep one"):
        load_validation(str(hr_dir), 4, lr_source=str(lr_dir))
    (lr_dir / "img01_x4.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (lr_dir / "img01.png").unlink()
    with caplog.at_level(logging.WARNING, logger="raysr.validation.pairs"):
        val = load_validation(str(hr_dir), 4, lr_source=str(lr_dir))
    assert val.names == ["img00", "sub/img02"] and val.skipped == ["img01"] and "img01_x4.png" in caplog.text
    (tmp_path / "noLR").mkdir()
    with pytest.raises(ValueError, match=r"data.val_lr .*noLR holds no images"):
        load_validation(str(hr_dir), 4, lr_source=str(tmp_path / "noLR"))


def test_val_lr_config_and_the_validator(real_pairs, tmp_path):
    hr_dir, lr_dir, hr, lr = real_pairs
    with pytest.raises(ConfigError, match=r"data.val_lr: .* holds the LR images of data.val, which is not set"):
        load_config(overrides=[f"data.val_lr={lr_dir}"])
    with pytest.raises(ConfigError, match=r"data.val_lr: .*nowhere does not exist"):
        load_config(overrides=[f"data.val={hr_dir}", f"data.val_lr={tmp_path / 'nowhere'}"])
    cfg = load_config(overrides=[f"data.val={hr_dir}", f"data.val_lr={lr_dir}"])
    validator = Validator(cfg, torch.device("cpu"), threads=1)
    val = load_validation(str(hr_dir), 4, lr_source=str(lr_dir))
    assert validator.ready() == bicubic_baseline(validation_images(val), 4, validation_lr_images(val))
    assert validator.ready() != bicubic_baseline(validation_images(val), 4)
