"""raysr.degradation: Real-ESRGAN's kernels, chain and pair pool, each against an independent reference
(closed forms, scipy, torch.nn.functional, hand-computed values). Ray-free and fast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage, special

from raysr.config import DegradationConfig
from raysr.degradation import kernels as K
from raysr.degradation.pipeline import (Degrader, TrainingPairs, filter2d, gaussian_noise, paired_crop,
                                        poisson_noise, resize, usm_sharp)
from raysr.degradation.pool import PairPool


def identity_jpeg(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    assert quality.shape == (images.shape[0],) and bool(((quality >= 30) & (quality <= 95)).all())
    return images


# --------------------------------------------------------------------------- kernels


def test_isotropic_gaussian_equals_the_closed_form():
    sigma, size = 1.7, 13
    y, x = np.mgrid[-6:7, -6:7]
    expected = np.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
    expected /= expected.sum()
    np.testing.assert_allclose(K.gaussian_kernel(size, sigma), expected, rtol=1e-6, atol=1e-9)


def test_anisotropic_gaussian_axes_and_rotation():
    y, x = np.mgrid[-5:6, -5:6]
    expected = np.exp(-x ** 2 / (2 * 2.5 ** 2) - y ** 2 / (2 * 0.8 ** 2))
    expected /= expected.sum()
    k0 = K.gaussian_kernel(11, 2.5, 0.8, 0.0)
    np.testing.assert_allclose(k0, expected, rtol=1e-6, atol=1e-9)  # sigma_x along columns
    np.testing.assert_allclose(K.gaussian_kernel(11, 2.5, 0.8, math.pi / 2), k0.T, atol=1e-7)  # 90 degrees
    k = K.gaussian_kernel(11, 2.5, 0.8, 0.6)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-7)  # point-symmetric at any angle
    assert not np.allclose(k, k[:, ::-1], atol=1e-4)  # but a rotated ellipse is not mirror-symmetric


def test_generalized_and_plateau_closed_forms():
    y, x = np.mgrid[-4:5, -4:5]
    q = (x ** 2 + y ** 2) / 1.5 ** 2
    for kernel, expected in ((K.generalized_gaussian_kernel(9, 1.5, 1.5, 0.0, 2.0), np.exp(-0.5 * q ** 2)),
                             (K.plateau_kernel(9, 1.5, 1.5, 0.0, 1.5), 1 / (1 + q ** 1.5))):
        np.testing.assert_allclose(kernel, expected / expected.sum(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(K.generalized_gaussian_kernel(9, 1.5, 1.5, 0.0, 1.0), K.gaussian_kernel(9, 1.5),
                               atol=1e-8)


def test_sinc_kernel_equals_the_bessel_closed_form():
    cutoff, size = 1.3, 11
    y, x = np.mgrid[-5:6, -5:6].astype(np.float64)
    r = np.hypot(x, y)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    expected[5, 5] = cutoff ** 2 / (4 * np.pi)
    expected /= expected.sum()
    kernel = K.sinc_kernel(size, cutoff)
    np.testing.assert_allclose(kernel, expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(kernel, kernel.T, atol=1e-8)
    np.testing.assert_allclose(kernel, kernel[::-1], atol=1e-8)


def test_drawn_kernels_sum_to_one_are_centred_and_padded_to_21():
    opts = DegradationConfig()
    rng = np.random.default_rng(0)
    kinds, sizes = set(), set()
    for _ in range(300):
        kernels, params = K.draw_kernels(rng, opts)
        assert kernels.shape == (3, 21, 21) and kernels.dtype == np.float32
        np.testing.assert_allclose(kernels.sum(axis=(1, 2)), 1.0, atol=1e-5)
        for kernel in kernels:  # every family is point-symmetric about the centre
            np.testing.assert_allclose(kernel, kernel[::-1, ::-1], atol=1e-6)
        p1 = params["kernel1"]
        kinds.add(p1["type"])
        sizes.add(p1["size"])
        outside = (21 - p1["size"]) // 2
        if outside:
            assert not kernels[0, :outside].any() and not kernels[0, :, :outside].any()
        if p1["type"] == "sinc":
            assert (math.pi / 3 if p1["size"] < 13 else math.pi / 5) <= p1["cutoff"] <= math.pi
        elif p1["type"] != "aniso" and "aniso" not in p1["type"]:
            assert p1["sigma_x"] == p1["sigma_y"] and p1["theta"] == 0.0
        assert 0.2 <= p1.get("sigma_x", 1.0) <= 3.0
        if params["sinc"]["type"] == "pulse":
            np.testing.assert_array_equal(kernels[2], K.pulse_kernel())
    assert kinds == set(K.KERNEL_TYPES) | {"sinc"} and sizes == set(range(7, 22, 2))


def test_kernel_draws_are_reproducible():
    opts = DegradationConfig()
    a = [K.draw_kernels(np.random.default_rng(5), opts) for _ in range(2)]
    np.testing.assert_array_equal(a[0][0], a[1][0])
    assert a[0][1] == a[1][1]


# --------------------------------------------------------------------------- the operations


def test_filter2d_is_per_sample_correlation_with_reflect_padding():
    rng = np.random.default_rng(1)
    images = rng.random((3, 3, 17, 19)).astype(np.float32)
    kernels = rng.random((3, 5, 5)).astype(np.float32)
    out = filter2d(torch.from_numpy(images), torch.from_numpy(kernels)).numpy()
    for i in range(3):
        for c in range(3):  # scipy's "mirror" is OpenCV's BORDER_REFLECT_101, torch's "reflect"
            expected = ndimage.correlate(images[i, c].astype(np.float64), kernels[i].astype(np.float64),
                                         mode="mirror")
            np.testing.assert_allclose(out[i, c], expected, atol=1e-5)
    shared = filter2d(torch.from_numpy(images), torch.from_numpy(kernels[0])).numpy()
    np.testing.assert_allclose(shared[2, 1], ndimage.correlate(images[2, 1], kernels[0], mode="mirror"), atol=1e-5)


def test_usm_sharpening_by_hand():
    rng = np.random.default_rng(2)
    image = np.clip(0.5 + 0.2 * rng.standard_normal((1, 3, 30, 32)), 0, 1).astype(np.float64)
    x = np.arange(51) - 25.0
    g = np.exp(-x ** 2 / (2 * 8.0 ** 2))  # OpenCV's sigma for a 51-px kernel: 0.3 * (25 - 1) + 0.8 = 8
    g2 = np.outer(g, g) / g.sum() ** 2
    blur = np.stack([ndimage.correlate(image[0, c], g2, mode="mirror") for c in range(3)])[None]
    residual = image - blur
    mask = (np.abs(residual) * 255 > 10).astype(np.float64)
    soft = np.stack([ndimage.correlate(mask[0, c], g2, mode="mirror") for c in range(3)])[None]
    expected = soft * np.clip(image + 0.5 * residual, 0, 1) + (1 - soft) * image
    out = usm_sharp(torch.from_numpy(image).float()).numpy()
    np.testing.assert_allclose(out, expected, atol=2e-5)
    assert np.abs(out - image).max() > 0.01  # it did sharpen


def test_resize_per_sample_modes_match_interpolate():
    images = torch.rand(4, 3, 20, 20)
    modes = ["bicubic", "area", "bilinear", "bicubic"]
    for kwargs in ({"size": (7, 7)}, {"scale": 0.55}, {"scale": 1.3}):
        out = resize(images, modes, **kwargs)
        for i, mode in enumerate(modes):
            expected = F.interpolate(images[i:i + 1], size=kwargs.get("size"), scale_factor=kwargs.get("scale"),
                                     mode=mode)
            torch.testing.assert_close(out[i:i + 1], expected)


def test_gaussian_noise_statistics():
    flat = torch.full((4, 3, 200, 200), 0.5)
    gen = torch.Generator().manual_seed(0)
    sigma = torch.tensor([2.0, 10.0, 30.0, 10.0]) / 255
    gray = torch.tensor([False, False, False, True])
    noise = gaussian_noise(flat, sigma, gray, gen)
    measured = noise.std(dim=(1, 2, 3))
    torch.testing.assert_close(measured, sigma, rtol=0.02, atol=0)
    assert noise.mean().abs() < 1e-3
    torch.testing.assert_close(noise[3, 0], noise[3, 2])  # gray: one field on all channels
    assert torch.corrcoef(noise[1, :2].reshape(2, -1))[0, 1].abs() < 0.02  # colour: independent channels


def test_poisson_noise_mean_and_variance():
    gen = torch.Generator().manual_seed(1)
    # a flat image has one 8-bit level, so L = 1: Poisson(x)/1 - x, variance x
    x = 100 / 255
    flat = torch.full((1, 3, 300, 300), x)
    noise = poisson_noise(flat, torch.tensor([0.5]), torch.tensor([False]), gen)
    assert abs(noise.mean().item()) < 0.01
    assert noise.var().item() == pytest.approx(0.25 * x, rel=0.03)
    # 256 levels -> L = 256: variance scale^2 * x / 256 at each pixel value x
    ramp = (torch.arange(256.0) / 255).repeat(3, 400, 1).unsqueeze(0)
    noise = poisson_noise(ramp, torch.tensor([2.0]), torch.tensor([False]), gen)
    values = ramp[0, :, :, 1:]
    ratio = (noise[0, :, :, 1:] ** 2).mean() / values.mean()
    assert ratio.item() == pytest.approx(4.0 / 256, rel=0.03)
    assert abs(noise.mean().item()) < 2e-3
    gray = poisson_noise(ramp, torch.tensor([2.0]), torch.tensor([True]), gen)
    torch.testing.assert_close(gray[0, 0], gray[0, 1])


def test_paired_crop_keeps_lr_and_hr_aligned():
    hr = torch.rand(3, 3, 48, 48)
    lr = F.avg_pool2d(hr, 4)  # LR pixel (i, j) covers HR pixels [4i, 4i+4) x [4j, 4j+4)
    lr_c, hr_c = paired_crop(lr, hr, [0, 3, 4], [4, 1, 0], 8, 4)
    assert lr_c.shape == (3, 3, 8, 8) and hr_c.shape == (3, 3, 32, 32)
    torch.testing.assert_close(F.avg_pool2d(hr_c, 4), lr_c)


# --------------------------------------------------------------------------- the chain


def _batch(n=3, size=64, seed=0):
    rng = np.random.default_rng(seed)
    kernels = torch.from_numpy(np.stack([K.draw_kernels(rng, DegradationConfig())[0] for _ in range(n)]))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    hr = torch.stack([torch.stack([xx, yy, (xx * yy) ** 0.5]) * (0.5 + 0.5 * i / n) for i in range(n)])
    return kernels, hr


def test_degrader_shapes_levels_and_determinism():
    opts = DegradationConfig()
    kernels, hr = _batch()
    runs = []
    for _ in range(2):
        params = [{} for _ in range(3)]
        lr, hr_crop = Degrader(opts, 4, 32, "cpu", seed=7, jpeg=identity_jpeg)(kernels, hr, params)
        runs.append((lr, hr_crop, params))
    lr, hr_crop, params = runs[0]
    assert lr.shape == (3, 3, 8, 8) and hr_crop.shape == (3, 3, 32, 32)
    torch.testing.assert_close(lr * 255, (lr * 255).round())  # 8-bit levels
    assert 0 <= lr.min() and lr.max() <= 1
    torch.testing.assert_close(runs[1][0], lr, rtol=0, atol=0)
    assert runs[1][2] == params
    for p, h in zip(params, hr_crop):  # the HR crop is the GT region at the recorded position
        top, left = p["crop"]["top"], p["crop"]["left"]
        i = params.index(p)
        torch.testing.assert_close(h, hr[i, :, top:top + 32, left:left + 32])
        assert {"resize1", "noise1", "jpeg1", "resize2", "noise2", "jpeg2", "final"} <= set(p)
    other = Degrader(opts, 4, 32, "cpu", seed=8, jpeg=identity_jpeg)(kernels, hr)[0]
    assert not torch.equal(other, lr)


def test_degrader_without_randomness_is_usm_then_resize():
    """Pulse kernels, scale 1, no noise and an identity JPEG: LR = 8-bit(resize(usm(GT))) with the drawn mode."""
    opts = DegradationConfig(resize_prob=[0, 0, 1], resize_prob2=[0, 0, 1], noise_range=(0.0, 0.0),
                             noise_range2=(0.0, 0.0), gaussian_noise_prob=1.0, gaussian_noise_prob2=1.0,
                             gray_noise_prob=0.0, gray_noise_prob2=0.0)
    _, hr = _batch(4, 64)
    pulses = torch.from_numpy(np.stack([[K.pulse_kernel()] * 3] * 4))
    params = [{} for _ in range(4)]
    lr, _ = Degrader(opts, 4, 64, "cpu", seed=3, jpeg=identity_jpeg)(pulses, hr, params)
    usm = usm_sharp(hr)
    for i, p in enumerate(params):
        assert p["noise1"]["sigma"] == 0.0 and p["resize1"]["scale"] == 1.0
        mid = F.interpolate(usm[i:i + 1], size=(16, 16), mode=p["resize2"]["mode"])
        expected = F.interpolate(mid, size=(16, 16), mode=p["final"]["mode"])
        torch.testing.assert_close(lr[i:i + 1], (expected.clamp(0, 1) * 255).round() / 255, atol=1 / 255 + 1e-6,
                                   rtol=0)


# --------------------------------------------------------------------------- the pool


def _pairs(start, n):
    ids = torch.arange(start, start + n)
    hr = ids.float().view(n, 1, 1, 1).expand(n, 3, 8, 8).clone()
    return hr[:, :, ::4, ::4] * 2, hr, ids  # lr is a function of hr: a pair that moved as a unit stays consistent


def test_pool_any_batch_size_moves_whole_pairs():
    for batch, size in ((5, 7), (12, 7), (3, 3), (1, 4)):
        pool = PairPool(size, np.random.default_rng(0))
        old_out = 0
        for step in range(12):
            lr, hr, ids = _pairs(step * batch, batch)
            full = pool.filled == size
            before = sorted(pool.slots[2].tolist()) if full else None
            lr2, hr2, ids2 = pool.exchange(lr, hr, ids)
            assert lr2.shape == lr.shape and hr2.shape == hr.shape
            torch.testing.assert_close(hr2[:, 0, 0, 0], ids2.float())  # each pair's LR, HR and id stay together
            torch.testing.assert_close(lr2, hr2[:, :, ::4, ::4] * 2)
            if full:  # an exchange: the pool and the batch together hold the same pairs as before
                assert sorted(pool.slots[2].tolist() + ids2.tolist()) == sorted(before + ids.tolist())
                assert len(set(ids2.tolist())) == batch
                old_out += int((ids2 < step * batch).sum())
        assert pool.filled == size and old_out >= min(batch, size)  # pairs of past batches came back


def test_pool_fills_before_it_exchanges_and_zero_is_off():
    pool = PairPool(7, np.random.default_rng(1))
    first = _pairs(0, 5)
    assert all(torch.equal(a, b) for a, b in zip(pool.exchange(*first), first))
    second = _pairs(5, 5)
    assert all(torch.equal(a, b) for a, b in zip(pool.exchange(*second), second))  # 2 of 5 copied in
    assert pool.filled == 7 and sorted(pool.slots[2].tolist()) == list(range(7))
    third = pool.exchange(*_pairs(10, 5))[2].tolist()
    assert len([i for i in third if i < 7]) == 5  # all 5 positions traded with stored pairs
    off = PairPool(0, np.random.default_rng(0))
    assert off.exchange(*first)[2] is first[2]


def test_training_pairs_give_usm_of_the_pooled_gt():
    opts = DegradationConfig(pool_size=4)
    kernels, hr = _batch(3, 64)
    pairs = TrainingPairs(opts, 4, 32, "cpu", seed=0, jpeg=identity_jpeg)
    for _ in range(3):
        lr, gt, gt_usm = pairs(kernels, hr)
        assert lr.shape == (3, 3, 8, 8) and gt.shape == gt_usm.shape == (3, 3, 32, 32)
        torch.testing.assert_close(gt_usm, usm_sharp(gt))


def test_training_pairs_saved_and_loaded_continue_as_the_uninterrupted_ones():
    """A resumed rank's degradation: the chain's generators and the pool (stored as uint8 levels) from a
    checkpoint, read back with weights_only, give the next pairs of the uninterrupted run bit for bit."""
    import io

    opts = DegradationConfig(pool_size=4)
    batches = [_batch(3, 64, seed=i) for i in range(5)]
    pairs = TrainingPairs(opts, 4, 32, "cpu", seed=0, jpeg=identity_jpeg)
    for kernels, hr in batches[:2]:  # the pool is full (3 + 1 of 4) and has exchanged
        pairs(kernels, hr)
    buffer = io.BytesIO()
    torch.save(pairs.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert saved["pool"]["slots"][0].dtype == torch.uint8
    expected = [pairs(kernels, hr) for kernels, hr in batches[2:]]

    resumed = TrainingPairs(opts, 4, 32, "cpu", seed=99, jpeg=identity_jpeg)
    resumed.load_state_dict(saved)
    for (kernels, hr), want in zip(batches[2:], expected):
        for got, wanted in zip(resumed(kernels, hr), want):
            assert torch.equal(got, wanted)


# --------------------------------------------------------------------------- training and the preview


def test_each_loss_gets_its_target():
    from raysr.config import load_config
    from raysr.engine import build_state, train_step
    from raysr.losses import pixel_loss

    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)
    hr_usm = usm_sharp(hr)
    for target, expected_target in (("usm", hr_usm), ("gt", hr)):
        cfg = load_config(overrides=["data.degradation=realesrgan", "data.gt_size=32", "degradation.crop_pad_size=64",
                                     "degradation.resize_range=[0.2, 1.5]", "model.generator.num_feat=4",
                                     "model.generator.num_block=1", f"degradation.pixel_target={target}"])
        state = build_state(cfg, torch.device("cpu"))
        with torch.no_grad():
            expected = pixel_loss(state.g(lr), expected_target)
        out = train_step(state, lr, hr, hr_usm=hr_usm)
        torch.testing.assert_close(out["loss_pix"], expected)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from raysr.data.make_shards import make_shards
    from test_data_common import write_images

    root = tmp_path_factory.mktemp("degradation")
    write_images(root / "in", [(80, 96), (48, 56), (96, 96)], seed=4)
    make_shards([str(root / "in")], str(root / "shards"), crop_size=48, step=48, min_size=16, workers=1,
                progress=False)
    return str(root / "shards")


SMALL = ["data.degradation=realesrgan", "data.gt_size=32", "data.batch_size=3", "degradation.crop_pad_size=64",
         "degradation.resize_range=[0.2, 1.5]", "degradation.pool_size=4"]


def test_the_loader_ships_regions_and_kernels_and_the_device_makes_pairs(shards):
    from raysr.config import load_config
    from raysr.data import make_train_loader
    from raysr.data.device_batches import DeviceBatches
    from raysr.degradation import training_pairs

    cfg = load_config(overrides=[*SMALL, f"data.train={shards}"])
    loader = make_train_loader(cfg.data.train, gt_size=32, scale=4, batch_size=3, num_workers=0,
                               degradation=cfg.realesrgan)
    kernels, regions = next(iter(loader))
    assert kernels.shape == (3, 3, 21, 21) and regions.shape == (3, 3, 64, 64)  # 48-px samples reflect-padded
    torch.testing.assert_close(kernels.sum((2, 3)), torch.ones(3, 3))
    batches = DeviceBatches(loader, torch.device("cpu"), 4, "loader", training_pairs(cfg, torch.device("cpu"), 0, 0))
    for _ in range(3):
        lr, hr, hr_usm = batches.next()
        assert lr.shape == (3, 3, 8, 8) and hr.shape == hr_usm.shape == (3, 3, 32, 32)
    batches.close()


def test_preview_is_deterministic_for_a_seed(shards, tmp_path):
    import json

    from raysr.preview import main

    sets = [arg for key in [*SMALL, f"data.train={shards}"] for arg in ("--set", key)]
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert main([*sets, "--output", str(tmp_path / name), "--count", "5", "--seed", str(seed)]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["contact_sheet.png", "hr_0000.png", "hr_0001.png", "hr_0002.png", "hr_0003.png", "hr_0004.png",
                     "lr_0000.png", "lr_0001.png", "lr_0002.png", "lr_0003.png", "lr_0004.png", "pairs.json"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "lr_0000.png").read_bytes() != (tmp_path / "c" / "lr_0000.png").read_bytes()
    pairs = json.loads((tmp_path / "a" / "pairs.json").read_text())["pairs"]
    first = pairs[0]
    assert {"kernel1", "kernel2", "sinc", "resize1", "noise1", "jpeg1", "resize2", "noise2", "jpeg2", "final",
            "crop"} <= set(first)
    assert 30 <= first["jpeg1"] <= 95
    from PIL import Image
    assert Image.open(tmp_path / "a" / "lr_0000.png").size == (8, 8)
    assert Image.open(tmp_path / "a" / "hr_0000.png").size == (32, 32)


def test_preview_of_bicubic_pairs_writes_exact_bicubic_lr(shards, tmp_path):
    from PIL import Image

    from raysr.data import make_lr
    from raysr.ops.convert import to_tensor, to_uint8
    from raysr.preview import main

    assert main(["--set", f"data.train={shards}", "--set", "data.gt_size=32", "--output", str(tmp_path),
                 "--count", "2"]) == 0
    for i in range(2):
        hr = np.asarray(Image.open(tmp_path / f"hr_{i:04d}.png"))
        lr = np.asarray(Image.open(tmp_path / f"lr_{i:04d}.png"))
        np.testing.assert_array_equal(lr, to_uint8(make_lr(to_tensor([hr]), 4)))


def test_gt_region_pads_like_opencv_reflect_101_and_flips_left_right_only():
    from raysr.degradation.regions import gt_region

    image = np.arange(5, dtype=np.uint8).reshape(1, 5, 1).repeat(3, axis=0).repeat(3, axis=2) * 10  # rows 0 10 .. 40
    image[1] += 1
    image[2] += 2
    flips = 0
    for seed in range(40):
        region = gt_region(image, 8, np.random.default_rng(seed), hflip=True)
        assert region.shape == (8, 8, 3)
        row = region[0, :, 0].tolist()
        if row[0] == 0:
            assert row == [0, 10, 20, 30, 40, 30, 20, 10]  # BORDER_REFLECT_101 at the right edge
        else:
            assert row == [10, 20, 30, 40, 30, 20, 10, 0]
            flips += 1
        assert region[:, 0, 0].tolist()[:5] == ([0, 1, 2, 1, 0] if row[0] == 0 else [10, 11, 12, 11, 10])
    assert 8 < flips < 32
    big = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    region = gt_region(big, 16, np.random.default_rng(1), hflip=False)
    assert any(np.array_equal(region, big[t:t + 16, l:l + 16]) for t in range(15) for l in range(25))
