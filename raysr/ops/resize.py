"""MATLAB-exact bicubic ``imresize`` for torch tensors: batched, any device, differentiable.

SR benchmarks (Set5, DIV2K, ...) define the LR image as MATLAB's
``imresize(HR, 1/scale, 'bicubic')``; PIL's and torch's bicubic differ from it
(different kernel or no antialiasing), and the difference costs tenths of a dB.
MATLAB resizes one dimension at a time: each output pixel is a weighted sum of
``P`` input pixels along that dimension, with

* the Keys cubic kernel, a = -0.5 (support [-2, 2]);
* when downscaling with antialiasing, the kernel stretched by ``1/scale`` and
  scaled by ``scale`` (a low-pass filter matched to the new sampling rate);
* input coordinate ``u = x/scale + 0.5*(1 - 1/scale)`` for 1-based output ``x``;
* taps ``left .. left+P-1`` with ``left = floor(u - width/2)``,
  ``P = ceil(width) + 2``; taps outside the image mirrored (symmetric padding);
* weights normalised to sum 1 per output pixel; no rounding.

Each 1-D pass is linear, so it is a dense ``(out, in)`` matrix with the mirrored
taps accumulated into it; the 2-D resize is ``Wh @ x @ Ww^T``. Matrices depend
only on (length, scale, antialias): they are built in float64 and cached per
device and dtype.
"""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np
import torch

# Keys' cubic has support [-2, 2]; MATLAB's 'bicubic' kernel width is 4.
CUBIC_WIDTH = 4.0
# Refuse weight tables beyond this many taps (out_length x P): a scale so small
# that every output pixel averages millions of inputs is a caller's mistake.
MAX_TAPS = 1 << 26


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``).

    ``x``: distances in pixels (any shape, float64). Returns weights of the same
    shape; 1 at 0, 0 at every other integer and for ``|x| >= 2``.
    """
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def output_length(in_length: int, scale: float) -> int:
    """MATLAB's output size for one dimension: ``ceil(in_length * scale)``."""
    return int(math.ceil(in_length * scale))


def contributions(in_length: int, out_length: int, scale: float, antialias: bool = True
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-pixel taps of MATLAB's bicubic resize along one dimension.

    Returns ``(weights, first)``: float64 ``(out_length, P)`` weights that sum to
    1 per row, and int64 ``(out_length,)`` 0-based positions of each row's first
    tap; row ``i`` reads positions ``first[i] .. first[i] + P - 1``, which may
    lie outside ``[0, in_length)`` (see :func:`mirror`). Tap columns whose weight
    is 0 in every row are dropped, as MATLAB does.
    """
    if scale < 1 and antialias:
        width = CUBIC_WIDTH / scale
        kernel = lambda d: scale * cubic(scale * d)  # noqa: E731  stretched low-pass
    else:
        width = CUBIC_WIDTH
        kernel = cubic
    taps = int(math.ceil(width)) + 2
    if out_length * taps > MAX_TAPS:
        raise ValueError(f"scale={scale} on a length-{in_length} dimension needs {out_length} x {taps} "
                         f"filter taps (limit {MAX_TAPS}); downscale in several smaller steps")
    x = np.arange(1, out_length + 1, dtype=np.float64)  # MATLAB's 1-based output coordinates
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    weights = kernel(u[:, None] - (left[:, None] + np.arange(taps, dtype=np.float64)))
    weights /= weights.sum(axis=1, keepdims=True)
    keep = np.flatnonzero(np.any(weights != 0, axis=0))
    first = left.astype(np.int64) - 1 + keep[0]  # 1-based MATLAB index -> 0-based
    return weights[:, keep[0]:keep[-1] + 1], first


def mirror(positions: np.ndarray, in_length: int) -> np.ndarray:
    """Map 0-based positions outside ``[0, in_length)`` back inside by symmetric padding.

    MATLAB indexes ``aux = [1:in, in:-1:1]`` periodically, which stays correct
    even when the kernel is wider than the image.
    """
    period = 2 * in_length
    wrapped = np.mod(positions, period)
    return np.where(wrapped < in_length, wrapped, period - 1 - wrapped)


def weight_matrix(in_length: int, out_length: int, scale: float, antialias: bool = True) -> np.ndarray:
    """Dense ``(out_length, in_length)`` float64 matrix of one 1-D resize pass.

    Row ``i`` holds output pixel ``i``'s weights; mirrored taps that land on the
    same input pixel are summed, so ``matrix @ signal`` equals MATLAB's pass.
    """
    weights, first = contributions(in_length, out_length, scale, antialias)
    indices = mirror(first[:, None] + np.arange(weights.shape[1]), in_length)
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_length)[:, None], indices.shape)
    np.add.at(matrix, (rows, indices), weights)
    return matrix


# A training run needs one or two entries (fixed gt_size); evaluation over
# datasets of mixed image sizes cycles through more, and large images make
# multi-MB matrices, so the cache stays small.
@functools.lru_cache(maxsize=32)
def _device_matrices(in_length: int, out_length: int, scale: float, antialias: bool,
                     device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device so a training loop does not re-upload the matrix every
    # step; the transpose is kept contiguous because BLAS runs x @ M^T about
    # twice as fast with a contiguous right operand.
    matrix = torch.from_numpy(weight_matrix(in_length, out_length, scale, antialias)).to(device, dtype)
    return matrix, matrix.T.contiguous()


def _check(x, scale) -> float:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"imresize expects a torch.Tensor, got {type(x).__name__}; "
                        "convert with torch.from_numpy(img).permute(2, 0, 1).float() / 255")
    if x.ndim not in (3, 4):
        raise ValueError(f"imresize expects (C,H,W) or (N,C,H,W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"imresize expects a floating-point tensor, got {x.dtype}; "
                         "convert with x.float() (and / 255 for uint8 images)")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"scale must be a positive number (e.g. 0.25 or 4), got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0 (e.g. 0.25 to downscale x4), got {scale}")
    height, width = x.shape[-2:]
    if height == 0 or width == 0:
        raise ValueError(f"imresize got an empty image of shape {tuple(x.shape)}; "
                         "there is nothing to resize")
    return scale


def imresize(x: torch.Tensor, scale: float, antialias: bool = True) -> torch.Tensor:
    """Resize like MATLAB's ``imresize(x, scale, 'bicubic')``.

    x: ``(C,H,W)`` or ``(N,C,H,W)`` floating-point tensor on any device, usually
    in [0,1]; values are not clamped (bicubic overshoots slightly at edges, as
    in MATLAB's float output). scale: factor > 0, e.g. ``1/4`` to downscale x4 or
    ``4`` to upscale. antialias: low-pass the kernel when downscaling (MATLAB's
    default). Returns the same layout, dtype and device with spatial size
    ``ceil(H*scale) x ceil(W*scale)``. float16/bfloat16 inputs are computed in
    float32. Differentiable with respect to ``x``.
    """
    scale = _check(x, scale)
    height, width = x.shape[-2:]
    out_height, out_width = output_length(height, scale), output_length(width, scale)
    compute_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    w_h, _ = _device_matrices(height, out_height, scale, antialias, x.device, compute_dtype)
    _, w_w_t = _device_matrices(width, out_width, scale, antialias, x.device, compute_dtype)
    y = x.to(compute_dtype)
    # MATLAB resizes H then W; the passes are linear, so either order gives its
    # result up to float rounding, and the cheaper one is taken.
    if out_height * width * (height + out_width) < out_width * height * (width + out_height):
        y = torch.matmul(torch.matmul(w_h, y), w_w_t)
    else:
        y = torch.matmul(w_h, torch.matmul(y, w_w_t))
    return y.to(x.dtype)
