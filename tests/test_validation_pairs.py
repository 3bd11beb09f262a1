"""Validation pairs: GT cut to a multiple of the scale, LR by exact 8-bit bicubic."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from raysr.validation.pairs import load_validation, mod_crop
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
