"""PSNR and SSIM computed the way SR papers report them.

Published numbers (SRResNet, ESRGAN, VDSR tables) follow MATLAB / BasicSR
conventions, and each one moves the result by tenths of a dB, so all are fixed here:

* images are quantised to uint8 first (a float SR output is clamped to [0,1],
  scaled by 255 and rounded, as BasicSR's ``tensor2img``);
* ``crop_border`` pixels (usually the scale) are cut from every edge;
* with ``y_channel=True`` the comparison is on the luma of ITU-R BT.601
  (MATLAB ``rgb2ycbcr``): Y = 16 + 65.481 R + 128.553 G + 24.966 B with R,G,B in
  [0,1], giving Y on the 0..255 scale, left unrounded;
* PSNR = 10 log10(255² / MSE) in float64 (inf for identical images);
* SSIM (Wang et al. 2004) with an 11x11 Gaussian window, sigma 1.5, on the
  valid region only, averaged over the map and then over channels.

Inputs are uint8 numpy images ``(H,W,3)`` / ``(H,W)`` or float torch tensors
``(C,H,W)`` / ``(N,C,H,W)`` in [0,1] with C = 3 (RGB) or 1 (grayscale). A single
image gives a python float; a batch gives a float64 numpy array of shape (N,).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F

MAX_VALUE = 255.0
Y_OFFSET = 16.0
Y_WEIGHTS = (65.481, 128.553, 24.966)  # R, G, B on [0,1] -> Y on 0..255
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * MAX_VALUE) ** 2
SSIM_C2 = (0.03 * MAX_VALUE) ** 2


def rgb_to_y(rgb: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of ``(..., 3, H, W)`` float RGB on the 0..255 scale -> ``(..., 1, H, W)`` on 0..255.

    Black maps to 16 and white to 235, as MATLAB's ``rgb2ycbcr``; no rounding.
    """
    if rgb.ndim < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"rgb_to_y expects (..., 3, H, W), got shape {tuple(rgb.shape)}")
    weights = torch.tensor(Y_WEIGHTS, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return Y_OFFSET + (rgb * weights).sum(dim=-3, keepdim=True) / MAX_VALUE


def _quantised_batch(img, name: str) -> tuple[torch.Tensor, bool]:
    """``img`` as float64 ``(N,C,H,W)`` uint8 levels, and whether it was a batch."""
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise ValueError(f"{name}: numpy images must be uint8 (H,W,3) or (H,W), got {img.dtype}; "
                             "quantise with np.clip(img * 255, 0, 255).round().astype(np.uint8) "
                             "or pass a float torch tensor in [0,1]")
        if img.ndim == 2:
            img = img[:, :, None]
        if img.ndim != 3 or img.shape[2] not in (1, 3):
            raise ValueError(f"{name}: numpy images must be (H,W,3) RGB or (H,W) grayscale, "
                             f"got shape {img.shape}")
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).double()[None], False
    if isinstance(img, torch.Tensor):
        if not img.is_floating_point():
            raise ValueError(f"{name}: tensors must be float in [0,1], got {img.dtype}; "
                             "for uint8 tensors use img.float() / 255")
        if img.ndim not in (3, 4) or img.shape[-3] not in (1, 3):
            raise ValueError(f"{name}: tensors must be (C,H,W) or (N,C,H,W) with C = 3 or 1, "
                             f"got shape {tuple(img.shape)}")
        batched = img.ndim == 4
        # BasicSR's tensor2img: clamp, scale and round in float32.
        levels = (img.detach().float().clamp(0, 1) * MAX_VALUE).round().double()
        return (levels if batched else levels[None]), batched
    raise TypeError(f"{name}: expected a uint8 numpy array or a float torch tensor, got {type(img).__name__}")


def _prepare(img, ref, crop_border, y_channel: bool, min_size: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Both images quantised, cropped and (optionally) converted to Y, as float64 (N,C,H,W)."""
    x, x_batched = _quantised_batch(img, "img")
    y, y_batched = _quantised_batch(ref, "ref")
    if x.shape != y.shape:
        raise ValueError(f"img and ref differ in shape: {tuple(x.shape)} vs {tuple(y.shape)} "
                         "(as (N,C,H,W)); crop the ground truth to the SR output's size (GTmod)")
    if isinstance(crop_border, bool) or not isinstance(crop_border, numbers.Integral) or crop_border < 0:
        raise ValueError(f"crop_border must be an integer >= 0 (usually the SR scale), got {crop_border!r}")
    height, width = x.shape[-2:]
    if min(height, width) - 2 * crop_border < min_size:
        raise ValueError(f"crop_border={crop_border} leaves less than {min_size}x{min_size} pixels of a "
                         f"{height}x{width} image; use a smaller crop_border or larger images")
    # float64 on CUDA is fine; other accelerators (MPS) lack it, so they compute on the CPU.
    device = next((t.device for t in (img, ref) if isinstance(t, torch.Tensor) and t.device.type == "cuda"),
                  torch.device("cpu"))
    x, y = x.to(device), y.to(device)
    if crop_border:
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
        y = y[..., crop_border:-crop_border, crop_border:-crop_border]
    # Grayscale images are already luma; like BasicSR, y_channel leaves them as they are.
    if y_channel and x.shape[1] == 3:
        x, y = rgb_to_y(x), rgb_to_y(y)
    return x, y, x_batched or y_batched


def _result(values: torch.Tensor, batched: bool):
    values = values.cpu().numpy()
    return values if batched else float(values[0])


def psnr(img, ref, crop_border: int = 0, y_channel: bool = False):
    """Peak signal-to-noise ratio in dB on uint8-quantised images (peak 255).

    img, ref: uint8 numpy ``(H,W,3)``/``(H,W)``, or float torch ``(C,H,W)``/``(N,C,H,W)``
    in [0,1]. crop_border: pixels cut from every edge. y_channel: compare BT.601 luma.
    Returns a float (``inf`` for identical images), or float64 ``(N,)`` for a batch.
    """
    x, y, batched = _prepare(img, ref, crop_border, y_channel, min_size=1)
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3))
    values = 10.0 * torch.log10(MAX_VALUE**2 / mse)  # mse == 0 -> +inf
    return _result(values, batched)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - SSIM_WINDOW // 2
    g = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g).view(1, 1, SSIM_WINDOW, SSIM_WINDOW)


def ssim(img, ref, crop_border: int = 0, y_channel: bool = False):
    """Structural similarity (Wang et al. 2004) on uint8-quantised images, in [-1, 1].

    Same inputs as :func:`psnr`. Local statistics use an 11x11 Gaussian window
    (sigma 1.5) over the valid region only (no padding), so after cropping each
    side must be at least 11 px. Returns a float (1.0 for identical images), or
    float64 ``(N,)`` for a batch: the mean SSIM map, averaged over channels.
    """
    x, y, batched = _prepare(img, ref, crop_border, y_channel, min_size=SSIM_WINDOW)
    n, c, h, w = x.shape
    # One convolution computes all five local moments of every channel.
    stacked = torch.stack([x, y, x * x, y * y, x * y]).view(5 * n * c, 1, h, w)
    moments = F.conv2d(stacked, _gaussian_window(x.device)).view(5, n, c, h - SSIM_WINDOW + 1, w - SSIM_WINDOW + 1)
    mu_x, mu_y, e_xx, e_yy, e_xy = moments
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (var_x + var_y + SSIM_C2))
    return _result(ssim_map.mean(dim=(2, 3)).mean(dim=1), batched)
