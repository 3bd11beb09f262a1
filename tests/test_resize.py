"""raysr.ops.imresize against an independent float64 transcription of MATLAB's imresize."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raysr.ops import imresize
from raysr.ops.resize import _passes, _resize, _StridedPass, describe, shared_kernel

SIZES = [(7, 9), (16, 16), (33, 17), (45, 23), (129, 67)]
SCALES = [1 / 2, 1 / 3, 1 / 4, 2, 3, 4, 0.7]
INTEGER_DOWNSCALES = {1 / 2, 1 / 3, 1 / 4}


def matlab_cubic(t: float) -> float:
    a = abs(t)
    if a <= 1:
        return 1.5 * a**3 - 2.5 * a**2 + 1
    if a <= 2:
        return -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2
    return 0.0


def matlab_resize_dim(img: np.ndarray, axis: int, scale: float, antialias: bool) -> np.ndarray:
    """MATLAB's imresize.m ``contributions`` + ``resizeAlongDim``, one output pixel at a time."""
    img = np.moveaxis(img, axis, 0)
    in_len = img.shape[0]
    out_len = math.ceil(in_len * scale)
    if scale < 1 and antialias:
        width = 4 / scale
        kernel = lambda d: scale * matlab_cubic(scale * d)  # noqa: E731
    else:
        width = 4
        kernel = matlab_cubic
    aux = list(range(1, in_len + 1)) + list(range(in_len, 0, -1))  # MATLAB: [1:in, in:-1:1]
    out = np.zeros((out_len,) + img.shape[1:])
    for x in range(1, out_len + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        taps = [left + p for p in range(math.ceil(width) + 2)]
        weights = [kernel(u - j) for j in taps]
        total = sum(weights)
        for j, w in zip(taps, weights):
            out[x - 1] += (w / total) * img[aux[(j - 1) % len(aux)] - 1]
    return np.moveaxis(out, 0, axis)


def matlab_imresize(img: np.ndarray, scale: float, antialias: bool = True) -> np.ndarray:
    """(..., H, W) float64; MATLAB resizes H first when both scales are equal."""
    return matlab_resize_dim(matlab_resize_dim(img, -2, scale, antialias), -1, scale, antialias)


def strided_dims(x: torch.Tensor, scale: float, strided: bool | None, antialias: bool = True) -> set[int]:
    """Dimensions (1 = H, 2 = W) that run as strided convolutions for this input."""
    plans = _passes(math.prod(x.shape[:-2]), *x.shape[-2:], scale, antialias, x.device, x.dtype, strided)
    return {dim for dim, plan in plans if isinstance(plan, _StridedPass)}


@pytest.mark.parametrize("path", ["imresize", "strided"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"s{s:.3g}")
def test_matches_matlab_reference(size, scale, path):
    # "strided" forces the strided convolution wherever a pass has a shared
    # kernel (integer downscales) and must fall back to dense matrices elsewhere;
    # "imresize" lets the cost model choose.
    resize = imresize if path == "imresize" else lambda t, s: _resize(t, s, True, strided=True)
    rng = np.random.default_rng(hash((size, scale)) % 2**32)
    batch = rng.random((2, 3) + size)
    expected = matlab_imresize(batch, scale)
    assert expected.shape[-2:] == (math.ceil(size[0] * scale), math.ceil(size[1] * scale))
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        x = torch.from_numpy(batch).to(dtype)
        if path == "strided":
            assert strided_dims(x, scale, True) == ({1, 2} if scale in INTEGER_DOWNSCALES else set())
        batched = resize(x, scale)
        assert batched.dtype == dtype and batched.shape == expected.shape
        assert np.abs(batched.double().numpy() - expected).max() <= tol
        single = resize(x[1], scale)
        assert single.shape == expected.shape[1:]
        assert np.abs(single.double().numpy() - expected[1]).max() <= tol


@pytest.mark.parametrize("factor", [2, 3, 5, 6])
def test_strided_path_without_antialiasing(factor):
    # Without antialiasing the kernel is 4 px wide, so at factor >= 5 output 0's
    # first tap lies right of pixel 0: the convolution must skip ahead.
    img = torch.from_numpy(np.random.default_rng(factor).random((2, 37, 31)))
    assert strided_dims(img, 1 / factor, True, antialias=False) == {1, 2}
    out = _resize(img, 1 / factor, False, strided=True).numpy()
    np.testing.assert_allclose(out, matlab_imresize(img.numpy(), 1 / factor, antialias=False), rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(128, 128), (129, 67), (41, 200), (24, 25)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("factor", [2, 3, 4, 5, 8])
def test_strided_path_equals_dense_path(size, factor):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(factor))
    assert strided_dims(x, 1 / factor, True) == {1, 2} and strided_dims(x, 1 / factor, False) == set()
    fast, dense = _resize(x, 1 / factor, True, strided=True), _resize(x, 1 / factor, True, strided=False)
    assert fast.shape == dense.shape == (2, 3, math.ceil(size[0] / factor), math.ceil(size[1] / factor))
    assert (fast - dense).abs().max() <= 1e-6
    fast64, dense64 = (_resize(x.double(), 1 / factor, True, strided=flag) for flag in (True, False))
    assert (fast64 - dense64).abs().max() <= 1e-12


def test_training_batch_takes_the_strided_path():
    # A loader-sized batch of 128 px crops at x4: the cost model must pick the
    # convolution for the full-resolution pass, and the result stay exact.
    batch = np.random.default_rng(5).random((8, 3, 128, 128))
    x = torch.from_numpy(batch).float()
    assert strided_dims(x, 1 / 4, None) == {1}
    assert describe(tuple(x.shape), 1 / 4).startswith("H: stride-4 depthwise conv")
    assert np.abs(imresize(x, 1 / 4).double().numpy() - matlab_imresize(batch, 1 / 4)).max() <= 1e-5


@pytest.mark.parametrize("factor", [2, 3, 4, 7])
def test_integer_downscale_has_one_shared_kernel(factor):
    # MATLAB's u = x*s + 0.5*(1-s) sits at the same offset from its taps for
    # every output x, so each output's weights (computed here from the
    # definition, one output at a time) are the same kernel.
    n = 50
    width = 4 * factor
    rows = []
    for x in range(1, math.ceil(n / factor) + 1):
        u = x * factor + 0.5 * (1 - factor)
        left = math.floor(u - width / 2)
        weights = np.array([matlab_cubic((u - j) / factor) / factor for j in range(left, left + width + 2)])
        rows.append(weights / weights.sum())
    rows = np.array(rows)
    np.testing.assert_allclose(rows, np.broadcast_to(rows[0], rows.shape), rtol=0, atol=1e-15)
    kernel, stride, first = shared_kernel(n, math.ceil(n / factor), 1 / factor)
    assert stride == factor
    np.testing.assert_allclose(kernel, np.trim_zeros(rows[0]), rtol=0, atol=1e-15)  # MATLAB trims zero end taps


def test_shared_kernel_of_x2_downscale_by_hand():
    # /2 with antialiasing: weights 0.5*cubic(d/2) at d = 3.5, 2.5, ..., -3.5 (see
    # test_downscale_x2_antialias_hand_computed_weights); output 0 (u = 1.5) reads
    # 1-based pixels -2..5, i.e. 0-based first tap -3.
    kernel, stride, first = shared_kernel(12, 6, 0.5)
    expected = 0.5 * np.array([-0.0234375, -0.0703125, 0.2265625, 0.8671875,
                               0.8671875, 0.2265625, -0.0703125, -0.0234375])
    np.testing.assert_allclose(kernel, expected, rtol=0, atol=1e-15)
    assert (stride, first) == (2, -3)


@pytest.mark.parametrize("length,scale", [(40, 0.7), (40, 0.4), (40, 2 / 3), (40, 2), (40, 3),
                                          (6, 0.45), (5, 0.4), (3, 2 / 3)])
def test_other_scales_fall_back_to_dense(length, scale):
    # The short cases have evenly spaced first taps (out_length 2 or 3) but
    # different weights per output: only the weight comparison rejects them.
    assert shared_kernel(length, math.ceil(length * scale), scale) is None
    img = np.random.default_rng(length).random((2, length, length))
    x = torch.from_numpy(img)
    assert strided_dims(x, scale, True) == set()
    np.testing.assert_allclose(_resize(x, scale, True, strided=True).numpy(), matlab_imresize(img, scale),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 0.7])
def test_matches_matlab_without_antialiasing(scale):
    img = np.random.default_rng(3).random((1, 12, 10))
    out = imresize(torch.from_numpy(img), scale, antialias=False).numpy()
    np.testing.assert_allclose(out, matlab_imresize(img, scale, antialias=False), rtol=0, atol=1e-12)


def test_upscale_x2_hand_computed_weights():
    # x2: u = x/2 + 0.25, width 4. Keys weights at distances 1.75, 0.75, 0.25, 1.25:
    #   -0.5*1.75^3 + 2.5*1.75^2 - 4*1.75 + 2 = -0.0234375
    #    1.5*0.75^3 - 2.5*0.75^2 + 1         =  0.2265625
    #    1.5*0.25^3 - 2.5*0.25^2 + 1         =  0.8671875
    #   -0.5*1.25^3 + 2.5*1.25^2 - 4*1.25 + 2 = -0.0703125
    a, b, c, d = 0.1, 0.5, 0.2, 0.9
    row = torch.tensor([[[a, b, c, d]]], dtype=torch.float64)  # (C=1, H=1, W=4); H=1 is a copy
    out = imresize(row, 2)[0, 0].numpy()
    assert out.shape == (8,)
    # x=1: u=0.75, taps -1,0,1,2 mirror to 2,1,1,2
    assert out[0] == pytest.approx((0.2265625 + 0.8671875) * a + (-0.0234375 - 0.0703125) * b, abs=1e-15)
    # x=3: u=1.75, taps 0,1,2,3 mirror to 1,1,2,3
    assert out[2] == pytest.approx((-0.0234375 + 0.2265625) * a + 0.8671875 * b - 0.0703125 * c, abs=1e-15)
    # x=4: u=2.25, taps 1..4, all inside
    assert out[3] == pytest.approx(-0.0703125 * a + 0.8671875 * b + 0.2265625 * c - 0.0234375 * d, abs=1e-15)


def test_downscale_x2_antialias_hand_computed_weights():
    # /2 with antialiasing: kernel 0.5*cubic(0.5*d), width 8; output x=3 has u=5.5,
    # taps 2..9 (1-based) at distances 3.5 .. -3.5, so weights 0.5*cubic(1.75, 1.25, 0.75, 0.25, ...).
    weights = 0.5 * np.array([-0.0234375, -0.0703125, 0.2265625, 0.8671875,
                              0.8671875, 0.2265625, -0.0703125, -0.0234375])
    assert weights.sum() == 1.0  # already normalised
    signal = np.random.default_rng(0).random(12)
    out = imresize(torch.from_numpy(signal).view(1, 1, 12), 0.5)[0, 0].numpy()
    assert out.shape == (6,)
    assert out[2] == pytest.approx(float(weights @ signal[1:9]), abs=1e-15)


@pytest.mark.parametrize("scale", [1 / 4, 0.7, 3])
def test_constant_image_stays_constant(scale):
    x = torch.full((2, 3, 13, 10), 0.37, dtype=torch.float64)
    out = imresize(x, scale)
    assert torch.allclose(out, torch.full_like(out, 0.37), rtol=0, atol=1e-14)


def test_scale_one_is_identity():
    x = torch.rand(2, 3, 11, 8, dtype=torch.float64)
    assert torch.allclose(imresize(x, 1), x, rtol=0, atol=1e-15)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_downscale_reproduces_linear_ramp_interior(factor):
    # A symmetric kernel centred on u reproduces linear functions; away from the
    # mirrored borders the output is the ramp sampled at u (1-based) exactly.
    n = 48
    ramp = 0.1 + 0.015 * np.arange(n)  # value at 1-based position j is 0.1 + 0.015*(j-1)
    out = imresize(torch.from_numpy(np.tile(ramp, (1, 2, 1))), 1 / factor)[0, 0].numpy()
    x = np.arange(1, n // factor + 1)
    u = x * factor + 0.5 * (1 - factor)
    interior = (u - 2 * factor >= 1) & (u + 2 * factor <= n)
    assert interior.sum() >= 4
    np.testing.assert_allclose(out[interior], 0.1 + 0.015 * (u[interior] - 1), rtol=0, atol=1e-12)


def test_low_precision_dtypes_round_trip_through_float32():
    x = torch.rand(2, 3, 16, 16)
    ref = imresize(x, 1 / 4)
    for dtype in (torch.bfloat16, torch.float16):
        out = imresize(x.to(dtype), 1 / 4)
        assert out.dtype == dtype and out.shape == ref.shape
        # The input rounding dominates: bf16 keeps 8 mantissa bits.
        assert (out.float() - ref).abs().max() < 2e-2


def test_gradient_matches_finite_differences():
    x = torch.rand(1, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: imresize(t, 0.7), (x,))
    assert torch.autograd.gradcheck(lambda t: imresize(t, 2), (x,))


@pytest.mark.parametrize("factor", [2, 3])
def test_strided_path_gradient_matches_finite_differences(factor):
    x = torch.rand(1, 2, 13, 11, dtype=torch.float64, requires_grad=True)
    assert strided_dims(x, 1 / factor, True) == {1, 2}
    assert torch.autograd.gradcheck(lambda t: _resize(t, 1 / factor, True, strided=True), (x,))


def test_output_is_contiguous_and_on_input_device():
    out = imresize(torch.rand(3, 20, 20), 1 / 4)
    assert out.device.type == "cpu" and out.shape == (3, 5, 5) and out.is_contiguous()


@pytest.mark.parametrize("scale", [0, -0.5, float("nan"), float("inf"), "4", True, None])
def test_bad_scale_is_rejected(scale):
    with pytest.raises(ValueError, match="scale"):
        imresize(torch.rand(3, 8, 8), scale)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match=r"\(C,H,W\) or \(N,C,H,W\)"):
        imresize(torch.rand(8, 8), 0.5)
    with pytest.raises(ValueError, match=r"\(C,H,W\) or \(N,C,H,W\)"):
        imresize(torch.rand(1, 1, 3, 8, 8), 0.5)
    with pytest.raises(ValueError, match="floating-point"):
        imresize(torch.zeros(3, 8, 8, dtype=torch.uint8), 0.5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        imresize(np.zeros((3, 8, 8)), 0.5)
    with pytest.raises(ValueError, match="empty"):
        imresize(torch.rand(3, 0, 8), 0.5)
    with pytest.raises(ValueError, match="filter taps"):
        imresize(torch.rand(1, 100, 100), 1e-8)


@pytest.mark.parametrize("scale", [1 / 4, 1 / 3])
def test_benchmark_baseline_matches_matlab_reference(scale):
    from raysr.bench.imresize import numpy_imresize

    img = np.random.default_rng(4).random((3, 20, 13))
    np.testing.assert_allclose(numpy_imresize(img, scale), matlab_imresize(img, scale), rtol=0, atol=1e-12)


def test_benchmark_reports_json(capsys):
    import json

    from raysr.bench.__main__ import main

    assert main(["imresize", "--size", "24", "--batch", "2", "--repeat", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["lr_size"] == 6 and result["batch"] == 2
    assert result["max_abs_diff"] <= 1e-5
    assert result["path_single"] == "H: dense matmul (6, 24), then W: dense matmul (6, 24)"
    assert result["speedup_batched"] == pytest.approx(
        result["baseline_us_per_crop"] / result["batched_us_per_crop"])
    assert result["speedup_single_cpu"] == pytest.approx(
        result["baseline_cpu_us_per_crop"] / result["single_cpu_us_per_crop"])
