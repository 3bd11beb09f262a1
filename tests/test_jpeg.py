"""raysr.ops.jpeg against Pillow's JPEG encoder and decoder (libjpeg-turbo), the independent reference.

Measured on 2026-12-06 with Pillow 13.0.0 (libjpeg-turbo, ISLOW DCT, 4:2:0, fancy upsampling):
the mean absolute difference between ``jpeg(x, q)`` and Pillow's ``save(format="JPEG", quality=q)``
+ decode is **0.000 8-bit levels (max 0)** at every quality tried — 1, 10, 30, 50, 75, 90, 95, 100 —
on skimage's astronaut (512x512), chelsea (300x451) and coffee (400x600) photos and on uniform
noise, and for every size from 1x1 to 34x34 at random qualities: the op runs libjpeg's integer
pipeline step by step, so it is bit-exact and the tests assert equality, not a tolerance.
For scale, the distortion the codec itself adds to those photos, mean absolute difference from
the input: 4.5–5.9 levels at q 30, 3.6–5.0 at q 50, 2.8–4.0 at q 75, 1.5–2.3 at q 95 and 0.7–1.6 at
q 100 (all quantisation steps 1; what is left is 4:2:0 chroma subsampling and 8-bit rounding).

Cost: about 9 ms per 12x3x64x64 batch on one CPU thread; the command is in docs/performance.md.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data as skimage_data
import torch
from PIL import Image, features

from raysr.ops.jpeg import jpeg, quantization_tables

# the pixel-exact reference is libjpeg-turbo's decoder (Pillow's wheels ship it); IJG libjpeg 9
# upsamples chroma differently
needs_turbo = pytest.mark.skipif(not features.check_feature("libjpeg_turbo"),
                                 reason="the bit-exact reference is Pillow built with libjpeg-turbo")

# ITU-T T.81 Annex K, tables K.1 and K.2 (natural order), typed from the standard: libjpeg's quality 50
ANNEX_K_LUMINANCE = [
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]]
ANNEX_K_CHROMINANCE = [
    [17, 18, 24, 47, 99, 99, 99, 99], [18, 21, 26, 66, 99, 99, 99, 99],
    [24, 26, 56, 99, 99, 99, 99, 99], [47, 66, 99, 99, 99, 99, 99, 99]] + [[99] * 8] * 4


def pillow_jpeg(image: np.ndarray, quality: int) -> tuple[np.ndarray, dict]:
    """(H,W,3) uint8 -> Pillow's decoded JPEG at ``quality`` (its defaults: 4:2:0) and its tables."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB")), decoded.quantization


def to_float(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def to_levels(x: torch.Tensor) -> np.ndarray:
    """(N,3,H,W) float k/255 -> (N,H,W,3) int levels."""
    return (x.float() * 255).round().to(torch.int32).permute(0, 2, 3, 1).numpy()


def assert_same(ours: np.ndarray, reference: np.ndarray, what: str):
    difference = np.abs(ours.astype(np.int64) - reference.astype(np.int64))
    assert difference.max() == 0, (f"{what}: mean |difference| {difference.mean():.4f} levels, max "
                                   f"{difference.max()}, {np.mean(difference > 0):.2%} of values differ")


PHOTOS = {  # crops keep the test fast; each has a side that is not a multiple of 16
    "astronaut": lambda: skimage_data.astronaut()[100:357, 150:350],  # 257x200: odd height
    "chelsea": lambda: skimage_data.chelsea(),                          # 300x451: even, odd
    "coffee": lambda: skimage_data.coffee()[:250, :333],                # 250x333
}


@needs_turbo
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_photos_equal_pillow_at_each_quality(name):
    """One batch per photo, four qualities (one per sample): each image equals Pillow's."""
    photo = PHOTOS[name]()
    qualities = [30, 50, 75, 95]
    out = to_levels(jpeg(to_float([photo] * len(qualities)), torch.tensor(qualities)))
    for image, quality in zip(out, qualities):
        assert_same(image, pillow_jpeg(photo, quality)[0], f"{name} at quality {quality}")


@needs_turbo
def test_noise_equals_pillow_at_every_size_and_quality():
    """Random content at sizes from 1x1 to 17x18 and three larger odd sizes, random qualities 1..100
    (sizes below 5 wide take libjpeg's plain pixel replication instead of fancy upsampling)."""
    rng = np.random.default_rng(20)
    sizes = [(h, w) for h in (1, 2, 7, 9, 16, 17) for w in (1, 2, 3, 4, 5, 13, 18)]
    sizes += [(33, 47), (64, 40), (71, 95)]
    for h, w in sizes:
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2)]
        qualities = rng.integers(1, 101, size=2)
        out = to_levels(jpeg(to_float(images), torch.from_numpy(qualities)))
        for image, reference, quality in zip(out, images, qualities):
            assert_same(image, pillow_jpeg(reference, int(quality))[0], f"noise {h}x{w} at quality {quality}")


@needs_turbo
def test_extreme_qualities_and_contrast_equal_pillow():
    """Quality 1 (every table entry 255) and 100 (every entry 1) on a smooth gradient with noise,
    and 0/255 checkerboards and stripes (the largest DCT coefficients there are) at 1, 50, 100."""
    rng = np.random.default_rng(1)
    ramp = np.linspace(0, 255, 48)[None, :, None] * np.ones((40, 1, 3))
    image = np.clip(ramp + rng.normal(0, 20, ramp.shape), 0, 255).astype(np.uint8)
    out = to_levels(jpeg(to_float([image, image]), torch.tensor([1, 100])))
    assert_same(out[0], pillow_jpeg(image, 1)[0], "quality 1")
    assert_same(out[1], pillow_jpeg(image, 100)[0], "quality 100")
    rows, cols = np.indices((24, 40))
    checkerboard = ((rows + cols) % 2 * 255).astype(np.uint8)
    colours = np.stack([checkerboard, 255 - checkerboard, (cols % 2 * 255).astype(np.uint8)], axis=-1)
    stripes = np.repeat((rows % 2 * 255).astype(np.uint8)[..., None], 3, axis=-1)
    for pattern, name in [(colours, "checkerboard"), (stripes, "stripes")]:
        out = to_levels(jpeg(to_float([pattern] * 3), torch.tensor([1, 50, 100])))
        for image, quality in zip(out, [1, 50, 100]):
            assert_same(image, pillow_jpeg(pattern, quality)[0], f"{name} at quality {quality}")


def test_quality_100_is_nearly_identity():
    """At quality 100 every quantisation step is 1: only 4:2:0 chroma subsampling and rounding remain.
    Measured mean |difference| from the input on the three photos: 0.70 (chelsea) to 1.58 (coffee)
    levels; a gray image (no chroma) comes back within a level of itself."""
    for name, photo in PHOTOS.items():
        x = to_float([photo()])
        assert (jpeg(x, 100) - x).abs().mean().item() * 255 < 2.0, name
    gray = np.repeat(skimage_data.camera()[:64, :96, None], 3, axis=2)
    x = to_float([gray])
    assert (jpeg(x, 100) - x).abs().max().item() * 255 <= 1.0 + 1e-4


def test_quality_applies_per_sample():
    """A batch of two images at two qualities equals each image run alone at its own quality."""
    rng = np.random.default_rng(2)
    a, b = (rng.integers(0, 256, (24, 40, 3), dtype=np.uint8) for _ in range(2))
    both = jpeg(to_float([a, b]), torch.tensor([20, 90]))
    assert torch.equal(both[0:1], jpeg(to_float([a]), 20))
    assert torch.equal(both[1:2], jpeg(to_float([b]), 90))
    assert not torch.equal(both[0:1], jpeg(to_float([a]), 90))


def test_tables_are_annex_k_at_50_and_equal_pillow_at_every_quality():
    """Quality 50 gives the Annex K tables as printed in the standard; at every quality 1..100 the
    tables equal the ones Pillow writes into a file (``im.quantization``, natural order)."""
    tables = quantization_tables(torch.arange(1, 101))
    assert tables.shape == (100, 2, 8, 8) and tables.dtype == torch.int32
    assert tables[49, 0].tolist() == ANNEX_K_LUMINANCE
    assert tables[49, 1].tolist() == ANNEX_K_CHROMINANCE
    block = np.zeros((8, 8, 3), np.uint8)
    for quality in range(1, 101):
        pillow = pillow_jpeg(block, quality)[1]
        assert tables[quality - 1, 0].flatten().tolist() == list(pillow[0]), quality
        assert tables[quality - 1, 1].flatten().tolist() == list(pillow[1]), quality
    assert tables[74, 0, 0].tolist() == [8, 6, 5, 8, 12, 20, 26, 31]  # quality 75: (16*50+50)//100 = 8, ...
    assert (tables[99] == 1).all() and (tables[0] == 255).all()


def test_float_quality_rounds_to_the_nearest_integer():
    x = to_float([np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)] * 3)
    out = jpeg(x, torch.tensor([74.6, 74.5, 74.4]))
    assert torch.equal(out[0], jpeg(x[:1], 75)[0])
    assert torch.equal(out[1], jpeg(x[:1], 75)[0])  # halves up
    assert torch.equal(out[2], jpeg(x[:1], 74)[0])
    assert torch.equal(jpeg(x, 60), jpeg(x, torch.tensor(60)))  # one number for the whole batch


def test_dtypes_and_out_of_range_input():
    """float64 and bf16 inputs give that dtype back: the same 8-bit result, k/255 rounded once to
    the dtype (bf16 reads 8-bit values back exactly: round(bf16(k/255) * 255) == k). Inputs outside
    [0,1] are clamped, as converting to 8 bit does."""
    image = np.random.default_rng(4).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    x = to_float([image])
    reference = jpeg(x, 50)
    assert reference.dtype == torch.float32
    levels = torch.from_numpy(to_levels(reference)).permute(0, 3, 1, 2)
    assert torch.equal(reference, levels.float() / 255)
    out64 = jpeg(x.double(), 50)
    assert out64.dtype == torch.float64 and torch.equal(out64, levels.double() / 255)
    out16 = jpeg(x.bfloat16(), 50)
    assert out16.dtype == torch.bfloat16 and torch.equal(out16, (levels.double() / 255).bfloat16())
    assert torch.equal(jpeg(x * 1.5 - 0.25, 50), jpeg((x * 1.5 - 0.25).clamp(0, 1), 50))


def test_no_gradient_and_autocast():
    x = to_float([np.random.default_rng(5).integers(0, 256, (16, 24, 3), dtype=np.uint8)]).requires_grad_()
    out = jpeg(x, 40)
    assert not out.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = jpeg(x, 40)
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    rng = np.random.default_rng(6)
    x = to_float([rng.integers(0, 256, (45, 70, 3), dtype=np.uint8) for _ in range(3)])
    quality = torch.tensor([10.0, 55.0, 97.0])
    out = jpeg(x.cuda(), quality.cuda())
    assert out.is_cuda and torch.equal(out.cpu(), jpeg(x, quality))


@pytest.mark.parametrize("images, quality, error, match", [
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 50, TypeError, "float in"),
    (torch.zeros(2, 1, 8, 8), 50, ValueError, r"\(N,3,H,W\)"),
    (torch.zeros(3, 8, 8), 50, ValueError, r"\(N,3,H,W\)"),
    (torch.zeros(2, 3, 0, 8), 50, ValueError, "non-empty"),
    (torch.zeros(2, 3, 8, 8), torch.tensor([50]), ValueError, r"shape \(2,\)"),
    (torch.zeros(2, 3, 8, 8), torch.tensor([50, 101]), ValueError, r"\[1, 100\]"),
    (torch.zeros(2, 3, 8, 8), torch.tensor([0.4, 50]), ValueError, r"\[1, 100\]"),
    (torch.zeros(2, 3, 8, 8), float("nan"), ValueError, r"\[1, 100\]"),
    (torch.zeros(2, 3, 8, 8), "75", TypeError, "quality must be"),
    (torch.zeros(2, 3, 8, 8), torch.tensor([True, False]), TypeError, "integers or floats"),
])
def test_bad_input_is_refused_with_the_reason(images, quality, error, match):
    with pytest.raises(error, match=match):
        jpeg(images, quality)

