"""One scoring protocol: training's validation and raysr.evaluate give the same numbers for
every generator at every scale it supports, on odd-sized images (which RRDBNet x2/x1 cannot
take without padding)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raysr.generator_file import load_generator, save_generator
from raysr.validation.pairs import load_validation
from raysr.evaluate import main as evaluate_main
from raysr.ops.resize import imresize
from raysr.scoring import bicubic_baseline, score_generator, validation_images

sys.path.insert(0, str(Path(__file__).parent))
from test_upscale import tiny_generator  # noqa: E402

SCALES = {"rrdbnet": (1, 2, 4), "srresnet": (2, 3, 4), "srcnn": (2, 3, 4), "vdsr": (2, 3, 4), "compact": (1, 3)}
CASES = [(name, scale) for name, scales in SCALES.items() for scale in scales]
SIZES = ((45, 38), (37, 51))  # odd: GTmod / scale is odd for every scale here


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory):
    from conftest import synthetic_image

    folder = tmp_path_factory.mktemp("val")
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(synthetic_image(h, w, seed=i)).save(folder / f"img{i}.png")
    return folder


@pytest.mark.parametrize("name,scale", CASES, ids=[f"{n}-x{s}" for n, s in CASES])
def test_validation_psnr_equals_evaluate_psnr(name, scale, val_folder, tmp_path):
    g = tiny_generator(name, scale, seed=3)
    save_generator(g, tmp_path / "g.pth", fmt="raysr")
    images = validation_images(load_validation(str(val_folder), scale))
    assert [im.shape[:2] for im in images] == [(h - h % scale, w - w % scale) for h, w in SIZES]
    metrics, comparison = score_generator(load_generator(tmp_path / "g.pth"), images, scale)
    baseline = bicubic_baseline(images, scale)

    assert evaluate_main(["--hr", str(val_folder), "--scale", str(scale), "--model", str(tmp_path / "g.pth"),
                          "--json", str(tmp_path / "e.json"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert metrics["psnr"] == report["mean"]["psnr_y"]
    assert metrics["ssim"] == report["mean"]["ssim_y"]
    # x1 bicubic is the identity: infinite PSNR, which the JSON writes as null
    assert report["bicubic"]["mean"]["psnr_y"] == (baseline["psnr_bicubic"] if scale > 1 else None)
    assert comparison[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_psnr_is_the_literature_protocol_by_hand(val_folder):
    """An independent check of what both report: bicubic baseline at x3 computed here step by step."""
    scale = 3
    images = validation_images(load_validation(str(val_folder), scale))
    values = []
    for hr in images:
        hr_t = torch.from_numpy(hr).permute(2, 0, 1)[None].double() / 255
        lr = (imresize(hr_t, 1 / scale).clamp(0, 1) * 255).round() / 255
        sr = (imresize(lr, scale).clamp(0, 1) * 255).round()
        y = lambda x: 16 + (65.481 * x[:, 0] + 128.553 * x[:, 1] + 24.966 * x[:, 2]) / 255  # noqa: E731
        a, b = y(sr)[..., scale:-scale, scale:-scale], y(hr_t * 255)[..., scale:-scale, scale:-scale]
        values.append(10 * np.log10(255 ** 2 / ((a - b) ** 2).mean().item()))
    assert bicubic_baseline(images, scale)["psnr_bicubic"] == pytest.approx(np.mean(values), abs=1e-9)
