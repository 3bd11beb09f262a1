"""Real-ESRGAN's blur kernels, drawn per sample in the loader processes (numpy; no torch, no Ray).

Every kernel is a ``(K, K)`` float32 array that sums to 1, ``K = KERNEL_SIZE`` (21): the drawn
kernel, of an odd size from ``kernel_range`` (7–21), zero-padded to 21 so that a batch stacks.
The families (Wang et al., Real-ESRGAN, ICCVW 2021, §3.1; BasicSR's ``degradations.py``):

- Gaussian, isotropic or anisotropic:  exp(−½ xᵀΣ⁻¹x)
- generalized Gaussian:                exp(−½ (xᵀΣ⁻¹x)^β)
- plateau:                             1 / (1 + (xᵀΣ⁻¹x)^β)
- circular low-pass (2-D sinc):        ω_c J₁(ω_c r) / (2π r), ω_c²/(4π) at r = 0

with Σ = R(θ) diag(σx², σy²) R(θ)ᵀ (isotropic: σy = σx, θ = 0), x the offset from the centre
in pixels. :func:`draw_kernels` draws the three kernels of one sample (first blur, second blur,
final sinc) as ``RealESRGANDataset`` does, with the per-sample ``second_blur_prob`` draw added
(the anchors draw it once per batch on the GPU): a sample without a second blur gets the pulse.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

KERNEL_SIZE = 21  # every kernel is zero-padded to this size (Real-ESRGAN's blur_kernel_size)
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


@functools.lru_cache(maxsize=None)
def _offsets(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xx, yy, r)``: ``(size, size)`` float64 pixel offsets from the centre (x along columns) and
    their length, computed once per size (read-only)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be an odd number >= 1, got {size}")
    axis = np.arange(size, dtype=np.float64) - size // 2
    xx, yy = np.meshgrid(axis, axis)
    grids = (xx, yy, np.hypot(xx, yy))
    for grid in grids:
        grid.flags.writeable = False
    return grids


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """xᵀΣ⁻¹x over the kernel grid, Σ = R(θ) diag(σx², σy²) R(θ)ᵀ."""
    if not (sigma_x > 0 and sigma_y > 0):
        raise ValueError(f"kernel sigmas must be > 0, got ({sigma_x}, {sigma_y})")
    xx, yy, _ = _offsets(size)
    cos, sin = math.cos(theta), math.sin(theta)
    u = cos * xx + sin * yy  # the offset in the kernel's own axes: R(θ)ᵀ x
    v = -sin * xx + cos * yy
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def _normalized(kernel: np.ndarray) -> np.ndarray:
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0) -> np.ndarray:
    """Normalised (an)isotropic Gaussian; ``sigma_y`` None: isotropic. theta in radians."""
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    return _normalized(np.exp(-0.5 * q))


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """Normalised generalized Gaussian exp(−½ (xᵀΣ⁻¹x)^β); β = 1 is the Gaussian."""
    return _normalized(np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta) ** beta))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """Normalised plateau-shaped kernel 1 / (1 + (xᵀΣ⁻¹x)^β)."""
    return _normalized(1.0 / (1.0 + _quadratic_form(size, sigma_x, sigma_y, theta) ** beta))


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
    """Normalised circular low-pass kernel with cutoff ``cutoff`` in radians per pixel (π: none)."""
    r = _offsets(size)[2].copy()
    centre = size // 2
    r[centre, centre] = 1.0  # any non-zero radius: the centre is set to its limit below
    kernel = cutoff * torch.special.bessel_j1(torch.from_numpy(cutoff * r)).numpy() / (2 * np.pi * r)
    kernel[centre, centre] = cutoff ** 2 / (4 * np.pi)  # the limit at r = 0
    return _normalized(kernel)


def pulse_kernel(size: int = KERNEL_SIZE) -> np.ndarray:
    """The identity kernel: 1 at the centre."""
    kernel = np.zeros((size, size), np.float32)
    kernel[size // 2, size // 2] = 1.0
    return kernel


def pad_kernel(kernel: np.ndarray, size: int = KERNEL_SIZE) -> np.ndarray:
    """``kernel`` (odd, <= size) centred in a ``(size, size)`` zero array."""
    pad = (size - kernel.shape[0]) // 2
    if pad < 0 or kernel.shape[0] % 2 == 0:
        raise ValueError(f"cannot pad a {kernel.shape[0]}-px kernel to {size} px (odd sizes <= {size} only)")
    out = np.zeros((size, size), kernel.dtype)
    out[pad:size - pad, pad:size - pad] = kernel
    return out


def _odd_size(rng: np.random.Generator, kernel_range) -> int:
    """An odd size drawn uniformly from ``kernel_range`` (both ends odd, included)."""
    return int(kernel_range[0] + 2 * rng.integers((kernel_range[1] - kernel_range[0]) // 2 + 1))


def _pick(rng: np.random.Generator, weights) -> int:
    """An index drawn with probabilities proportional to ``weights``."""
    cumulative = np.cumsum(weights)
    return min(int(np.searchsorted(cumulative, rng.uniform() * cumulative[-1], side="right")), len(weights) - 1)


def _beta(rng: np.random.Generator, beta_range) -> float:
    # BasicSR's draw: half the time below 1 (heavier tails), half above (flatter top)
    low, high = beta_range
    return float(rng.uniform(low, 1.0) if rng.uniform() < 0.5 else rng.uniform(1.0, high))


def random_kernel(rng: np.random.Generator, *, kernel_range, kernel_prob, sinc_prob: float, sigma_range,
                  betag_range, betap_range) -> tuple[np.ndarray, dict]:
    """One blur kernel as ``RealESRGANDataset`` draws it: an odd size from ``kernel_range``; with
    ``sinc_prob`` a sinc with ω_c ~ U[π/3, π] (size < 13) or U[π/5, π]; else a type from
    :data:`KERNEL_TYPES` with ``kernel_prob``, σ ~ U(sigma_range) per axis, θ ~ U[−π, π], β from
    ``betag_range`` (generalized) or ``betap_range`` (plateau). Returns the kernel padded to
    :data:`KERNEL_SIZE` and its parameters (JSON-ready)."""
    size = _odd_size(rng, kernel_range)
    if rng.uniform() < sinc_prob:
        cutoff = float(rng.uniform(np.pi / 3 if size < 13 else np.pi / 5, np.pi))
        return pad_kernel(sinc_kernel(size, cutoff)), {"type": "sinc", "size": size, "cutoff": cutoff}
    kind = KERNEL_TYPES[_pick(rng, kernel_prob)]
    sigma_x = float(rng.uniform(*sigma_range))
    if "aniso" not in kind:
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = float(rng.uniform(*sigma_range)), float(rng.uniform(-np.pi, np.pi))
    params = {"type": kind, "size": size, "sigma_x": sigma_x, "sigma_y": sigma_y, "theta": theta}
    if kind.startswith("generalized"):
        params["beta"] = _beta(rng, betag_range)
        kernel = generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, params["beta"])
    elif kind.startswith("plateau"):
        params["beta"] = _beta(rng, betap_range)
        kernel = plateau_kernel(size, sigma_x, sigma_y, theta, params["beta"])
    else:
        kernel = gaussian_kernel(size, sigma_x, sigma_y, theta)
    return pad_kernel(kernel), params


def draw_kernels(rng: np.random.Generator, opts) -> tuple[np.ndarray, dict]:
    """The three kernels of one sample: ``(3, 21, 21)`` float32 — first blur, second blur (the
    pulse with probability 1 − ``second_blur_prob``), final sinc (with ``final_sinc_prob``, ω_c ~
    U[π/3, π], else the pulse) — and their parameters. ``opts``: a ``raysr.config.DegradationConfig``."""
    k1, p1 = random_kernel(rng, kernel_range=opts.kernel_range, kernel_prob=opts.kernel_prob,
                           sinc_prob=opts.sinc_prob, sigma_range=opts.blur_sigma, betag_range=opts.betag_range,
                           betap_range=opts.betap_range)
    if rng.uniform() < opts.second_blur_prob:
        k2, p2 = random_kernel(rng, kernel_range=opts.kernel_range, kernel_prob=opts.kernel_prob2,
                               sinc_prob=opts.sinc_prob2, sigma_range=opts.blur_sigma2,
                               betag_range=opts.betag_range2, betap_range=opts.betap_range2)
    else:
        k2, p2 = pulse_kernel(), {"type": "pulse"}
    if rng.uniform() < opts.final_sinc_prob:
        size = _odd_size(rng, opts.kernel_range)
        cutoff = float(rng.uniform(np.pi / 3, np.pi))
        k3, p3 = pad_kernel(sinc_kernel(size, cutoff)), {"type": "sinc", "size": size, "cutoff": cutoff}
    else:
        k3, p3 = pulse_kernel(), {"type": "pulse"}
    return np.stack([k1, k2, k3]), {"kernel1": p1, "kernel2": p2, "sinc": p3}
