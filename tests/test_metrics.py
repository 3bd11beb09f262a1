"""raysr.metrics against hand-computed values and an independent float64 (scipy) reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from raysr.metrics import psnr, rgb_to_y, ssim


def reference_y(img: np.ndarray) -> np.ndarray:
    """uint8 (H,W,3) -> float64 (H,W,1) luma on 0..255 (MATLAB rgb2ycbcr on [0,1] data, times 255)."""
    rgb = img.astype(np.float64) / 255.0
    return (16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2])[..., None]


def reference_prepare(img, ref, crop, y_channel):
    a, b = img, ref
    if y_channel:
        a, b = reference_y(a), reference_y(b)
    a, b = a.astype(np.float64), b.astype(np.float64)
    if crop:
        a, b = a[crop:-crop, crop:-crop], b[crop:-crop, crop:-crop]
    return a, b


def reference_psnr(img, ref, crop=0, y_channel=False):
    a, b = reference_prepare(img, ref, crop, y_channel)
    return 10 * math.log10(255.0**2 / np.mean((a - b) ** 2))


def reference_ssim(img, ref, crop=0, y_channel=False):
    a, b = reference_prepare(img, ref, crop, y_channel)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        filt = lambda z: convolve2d(z, window, mode="valid")  # noqa: E731
        mx, my = filt(x), filt(y)
        vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
        smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        scores.append(smap.mean())
    return float(np.mean(scores))


def degraded(img: np.ndarray, seed: int) -> np.ndarray:
    """A plausible SR output: the image plus structured error, still uint8."""
    noise = np.random.default_rng(seed).normal(0, 6, img.shape)
    return np.clip(img.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255.0


def test_psnr_one_level_everywhere_is_48_1308_db():
    ref = np.full((16, 20, 3), 100, np.uint8)
    ref[::2] = 254
    img = ref + 1  # every pixel off by exactly one level: MSE = 1
    expected = 10 * math.log10(255**2)  # 48.1308036...
    assert expected == pytest.approx(48.1308036, abs=1e-7)
    assert psnr(img, ref) == pytest.approx(expected, abs=1e-9)
    assert psnr(ref, img) == pytest.approx(expected, abs=1e-9)


def test_identical_images_give_inf_psnr_and_unit_ssim(make_image):
    img = make_image(32, 40, seed=1)
    assert psnr(img, img.copy()) == math.inf
    assert ssim(img, img.copy()) == pytest.approx(1.0, abs=1e-12)
    assert ssim(img, img.copy(), y_channel=True) == pytest.approx(1.0, abs=1e-12)


def test_rgb_to_y_hand_computed_pixels():
    rgb = torch.tensor([[255.0, 10.0, 0.0, 255.0], [0.0, 20.0, 0.0, 255.0], [0.0, 30.0, 0.0, 255.0]],
                       dtype=torch.float64).view(3, 1, 4)
    y = rgb_to_y(rgb)
    assert y.shape == (1, 1, 4)
    assert y[0, 0, 0].item() == pytest.approx(16 + 65.481, abs=1e-12)  # pure red
    assert y[0, 0, 1].item() == pytest.approx(16 + (654.81 + 2571.06 + 748.98) / 255, abs=1e-12)  # 31.5876...
    assert y[0, 0, 2].item() == pytest.approx(16.0, abs=1e-12)  # black
    assert y[0, 0, 3].item() == pytest.approx(235.0, abs=1e-12)  # white: 16 + 219


def test_psnr_y_channel_hand_computed():
    ref = np.zeros((4, 4, 3), np.uint8)
    ref[...] = (10, 20, 30)
    img = ref.copy()
    img[..., 0] = 12  # R up two levels -> Y up 65.481 * 2 / 255 everywhere
    delta_y = 65.481 * 2 / 255
    assert psnr(img, ref, y_channel=True) == pytest.approx(10 * math.log10(255**2 / delta_y**2), abs=1e-9)
    # RGB: one channel of three off by 2 -> MSE = 4/3
    assert psnr(img, ref) == pytest.approx(10 * math.log10(255**2 / (4 / 3)), abs=1e-9)


def test_crop_border_removes_edge_errors():
    ref = np.full((20, 20, 3), 128, np.uint8)
    img = ref.copy()
    img[:2], img[-2:], img[:, :2], img[:, -2:] = 131, 131, 131, 131  # 2-px frame off by 3
    frame = 20 * 20 - 16 * 16  # 144 pixels
    assert psnr(img, ref) == pytest.approx(10 * math.log10(255**2 / (frame * 9 / 400)), abs=1e-9)
    assert psnr(img, ref, crop_border=2) == math.inf
    assert ssim(img, ref, crop_border=2) == pytest.approx(1.0, abs=1e-12)
    assert ssim(img, ref) < 1.0


@pytest.mark.parametrize("crop", [0, 4])
@pytest.mark.parametrize("y_channel", [False, True])
def test_matches_independent_reference(make_image, crop, y_channel):
    ref = make_image(48, 56, seed=2)
    img = degraded(ref, seed=3)
    assert psnr(img, ref, crop, y_channel) == pytest.approx(reference_psnr(img, ref, crop, y_channel), abs=1e-6)
    assert ssim(img, ref, crop, y_channel) == pytest.approx(reference_ssim(img, ref, crop, y_channel), abs=1e-8)
    assert 0.3 < ssim(img, ref, crop, y_channel) < 0.999  # a real, imperfect match


def test_tensor_and_numpy_inputs_agree(make_image):
    ref = make_image(32, 32, seed=4)
    img = degraded(ref, seed=5)
    expected_psnr = psnr(img, ref, crop_border=3, y_channel=True)
    expected_ssim = ssim(img, ref, crop_border=3, y_channel=True)
    for a, b in ((to_tensor(img), to_tensor(ref)), (to_tensor(img), ref), (img, to_tensor(ref))):
        assert psnr(a, b, crop_border=3, y_channel=True) == expected_psnr
        assert ssim(a, b, crop_border=3, y_channel=True) == pytest.approx(expected_ssim, abs=1e-12)


def test_tensors_are_quantised_like_tensor2img(make_image):
    ref = make_image(24, 24, seed=6)
    # Sub-level offsets round back to the same uint8 levels; out-of-range values clamp.
    near = (torch.from_numpy(ref).permute(2, 0, 1).double() + 0.3) / 255.0
    assert psnr(near, ref) == math.inf
    assert psnr(torch.full((3, 12, 12), 1.7), np.full((12, 12, 3), 255, np.uint8)) == math.inf
    assert psnr(torch.full((3, 12, 12), -0.2), np.zeros((12, 12, 3), np.uint8)) == math.inf


def test_batch_returns_per_image_values(make_image):
    refs = [make_image(28, 30, seed=s) for s in range(3)]
    imgs = [degraded(r, seed=10 + s) for s, r in enumerate(refs)]
    batch_img = torch.stack([to_tensor(i) for i in imgs])
    batch_ref = torch.stack([to_tensor(r) for r in refs])
    for metric in (psnr, ssim):
        values = metric(batch_img, batch_ref, crop_border=2, y_channel=True)
        assert isinstance(values, np.ndarray) and values.dtype == np.float64 and values.shape == (3,)
        singles = [metric(i, r, crop_border=2, y_channel=True) for i, r in zip(imgs, refs)]
        np.testing.assert_allclose(values, singles, rtol=0, atol=1e-12)
        assert len(set(values.round(6))) == 3  # genuinely per image


def test_grayscale_images(make_image):
    ref = make_image(30, 30, seed=7)[..., 1]
    img = degraded(ref, seed=8)
    assert psnr(img, ref) == pytest.approx(reference_psnr(img[..., None], ref[..., None]), abs=1e-6)
    assert ssim(img, ref) == pytest.approx(reference_ssim(img[..., None], ref[..., None]), abs=1e-8)
    # Grayscale is already luma: y_channel changes nothing (BasicSR's behaviour).
    assert psnr(img, ref, y_channel=True) == psnr(img, ref)
    gray_tensor = torch.from_numpy(img).float()[None] / 255.0
    assert psnr(gray_tensor, ref) == psnr(img, ref)


def test_bad_inputs_are_rejected():
    a = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, np.zeros((16, 15, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        psnr(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="float in"):
        ssim(torch.zeros(3, 16, 16, dtype=torch.uint8), a)
    with pytest.raises(ValueError, match=r"\(H,W,3\)"):
        psnr(np.zeros((16, 16, 4), np.uint8), a)
    with pytest.raises(ValueError, match="C = 3 or 1"):
        psnr(torch.zeros(2, 16, 16), a)
    with pytest.raises(ValueError, match="crop_border=8"):
        psnr(a, a, crop_border=8)
    with pytest.raises(ValueError, match="crop_border=3 leaves less than 11x11"):
        ssim(a, a, crop_border=3)
    for crop in (-1, 1.5, True):
        with pytest.raises(ValueError, match="crop_border must be"):
            psnr(a, a, crop_border=crop)
    with pytest.raises(TypeError, match="uint8 numpy array or a float torch tensor"):
        psnr(a.tolist(), a)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        rgb_to_y(torch.zeros(4, 8, 8))
