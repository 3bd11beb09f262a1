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
taps accumulated into it; the 2-D resize is ``Wh @ x @ Ww^T``. Downscaling by an
integer factor ``s`` gives every output pixel the same weights, so a pass is
also a stride-``s`` convolution with one kernel: it runs as a depthwise
convolution (about ``in/P`` times fewer multiply-adds than the dense matrix),
and the few outputs at each border, which read mirrored pixels, are corrected
with small dense blocks. Per pass the cheaper way is chosen by a cost model
(the convolution pays a fixed set-up cost that only batches amortise), along
with the cheaper pass order. Plans depend only on (length, scale, antialias):
they are built in float64 and cached per device and dtype.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# Keys' cubic has support [-2, 2]; MATLAB's 'bicubic' kernel width is 4.
CUBIC_WIDTH = 4.0
# Refuse weight tables beyond this many taps (out_length x P): a scale so small
# that every output pixel averages millions of inputs is a caller's mistake.
MAX_TAPS = 1 << 26
# Rows of an integer downscale's taps differ only by float rounding of u; a
# pass whose rows agree to this runs as one shared kernel (a strided convolution).
SAME_KERNEL_TOL = 1e-12


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


def _accumulate(weights: np.ndarray, first: np.ndarray, in_length: int) -> np.ndarray:
    # Dense (out, in) matrix of per-row taps; mirrored taps landing on the same pixel add up.
    indices = mirror(first[:, None] + np.arange(weights.shape[1]), in_length)
    matrix = np.zeros((weights.shape[0], in_length), dtype=np.float64)
    rows = np.broadcast_to(np.arange(weights.shape[0])[:, None], indices.shape)
    np.add.at(matrix, (rows, indices), weights)
    return matrix


def weight_matrix(in_length: int, out_length: int, scale: float, antialias: bool = True) -> np.ndarray:
    """Dense ``(out_length, in_length)`` float64 matrix of one 1-D resize pass.

    Row ``i`` holds output pixel ``i``'s weights; mirrored taps that land on the
    same input pixel are summed, so ``matrix @ signal`` equals MATLAB's pass.
    """
    weights, first = contributions(in_length, out_length, scale, antialias)
    return _accumulate(weights, first, in_length)


def shared_kernel(in_length: int, out_length: int, scale: float, antialias: bool = True
                  ) -> tuple[np.ndarray, int, int] | None:
    """The single kernel of a pass whose output pixels all use the same weights, else None.

    Downscaling by an integer factor ``s`` (scale ``1/s``) puts every output at
    the same offset from its taps (``u = x*s + 0.5*(1-s)``), so the pass is a
    stride-``s`` convolution of the mirror-padded signal with one kernel. Returns
    ``(kernel, stride, first)``: float64 ``(P,)`` weights summing to 1, the input
    step between consecutive outputs, and the 0-based position of output 0's
    first tap, so that output ``i = sum_p kernel[p] * signal[mirror(first + i*stride + p)]``.
    The check is on the actual taps (rows equal within ``SAME_KERNEL_TOL``, first
    taps evenly spaced), not on the scale, so nothing rests on float ``1/scale``
    being an exact integer.
    """
    weights, first = contributions(in_length, out_length, scale, antialias)
    steps = np.diff(first)
    if (out_length < 2 or steps[0] < 1 or np.any(steps != steps[0])
            or np.abs(weights - weights[0]).max() > SAME_KERNEL_TOL):
        return None
    return weights[0], int(steps[0]), int(first[0])


# Cost model for choosing how to run each pass and in which order, in units
# of one BLAS multiply-add (about 30 G/s on one AVX2 core with torch 2.x);
# measured there. Only speed depends on it: every choice gives the same result.
CONV_COST = 3                # one depthwise-convolution multiply-add
TRANSPOSE_COST = 40          # transposing one float (a strided pass along W)
OP_COST = 100_000            # any small torch call, ~3 us
CONV_CALL_COST = 3_000_000   # oneDNN's per-call convolution set-up, ~100 us: only batches amortise it


class _DensePass(NamedTuple):
    """One pass as a dense matrix product: any scale."""

    matrix: torch.Tensor    # (out, in)
    matrix_t: torch.Tensor  # (in, out), contiguous: BLAS runs x @ M^T about twice as fast with it

    def apply(self, y: torch.Tensor, dim: int) -> torch.Tensor:
        """Resize ``(B, H, W)`` along ``dim`` (1 = H, 2 = W)."""
        return torch.matmul(self.matrix, y) if dim == 1 else torch.matmul(y, self.matrix_t)


class _StridedPass(NamedTuple):
    """One shared-kernel pass: a strided convolution, corrected at the borders.

    The convolution zero-pads the input by ``padding`` on both sides; its output
    ``j + skip`` is output ``j`` wherever all taps fall inside the input. The
    few outputs at each end whose taps leave the input get ``fixes``: MATLAB's
    mirrored taps minus the zero-padded ones, as small dense blocks.
    """

    taps: torch.Tensor  # (P,) the shared kernel
    stride: int
    padding: int
    skip: int
    out_length: int
    fixes: tuple[tuple[int, int, int, int, torch.Tensor], ...]  # (out0, out1, in0, in1, (out1-out0, in1-in0))
    in_length: int

    def apply(self, y: torch.Tensor, dim: int) -> torch.Tensor:
        """Resize ``(B, H, W)`` along ``dim`` (1 = H, 2 = W)."""
        if dim == 2:  # the convolution below runs along H; go there and back
            return self.apply(y.transpose(1, 2), 1).transpose(1, 2).contiguous()
        y = y.contiguous()
        channels = y.shape[2]
        # Every column is a channel filtered with the same kernel: a depthwise
        # convolution. (B, H, W) memory read as (B, W, 1, H) is channels-last as
        # it stands, the layout oneDNN and cuDNN run fastest, and filtering
        # along the last spatial axis beat the first by 1.5x on CPU.
        grid = y.unsqueeze(1).permute(0, 3, 1, 2)
        out = F.conv2d(grid, _depthwise_weight(self.taps, channels), stride=(1, self.stride),
                       padding=(0, self.padding), groups=channels).squeeze(2).transpose(1, 2)
        out = out[:, self.skip:self.skip + self.out_length]
        for out0, out1, in0, in1, block in self.fixes:
            out[:, out0:out1] += torch.matmul(block, y[:, in0:in1])
        return out


@functools.lru_cache(maxsize=64)
def _depthwise_weight(taps: torch.Tensor, channels: int) -> torch.Tensor:
    # Materialised: oneDNN runs about twice as slow with an expanded (stride-0)
    # weight. Keyed on the cached plan's tensor, which the cache keeps alive.
    return taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1).contiguous()


def _strided_plan(in_length: int, out_length: int, scale: float, antialias: bool):
    """float64 pieces of a :class:`_StridedPass`, or None where the pass has no shared kernel."""
    shared = shared_kernel(in_length, out_length, scale, antialias)
    if shared is None:
        return None
    kernel, stride, first = shared
    # Zero-padded by `padding`, convolution output o reads input from
    # o*stride - padding; output j reads from j*stride + first (first > 0 happens
    # without antialiasing at s >= 5). Pad so that o = j + skip lines up and the
    # convolution reaches the last output; each extra skip adds two outputs.
    skip = max(0, -(-first // stride))
    while True:
        padding = skip * stride - first
        if (in_length + 2 * padding - kernel.size) // stride + 1 >= skip + out_length:
            break
        skip += 1
    starts = first + stride * np.arange(out_length)
    # Both sides use the shared kernel, so interior rows cancel exactly and only
    # the border rows remain.
    mirrored = _accumulate(np.broadcast_to(kernel, (out_length, kernel.size)), starts, in_length)
    tap = np.arange(in_length)[None, :] - starts[:, None]
    inside = (tap >= 0) & (tap < kernel.size)
    fix = mirrored - np.where(inside, kernel[np.clip(tap, 0, kernel.size - 1)], 0.0)
    rows = np.flatnonzero(np.any(fix != 0, axis=1))
    fixes = []
    for run in np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1) if rows.size else []:
        cols = np.flatnonzero(np.any(fix[run] != 0, axis=0))
        fixes.append((int(run[0]), int(run[-1]) + 1, int(cols[0]), int(cols[-1]) + 1,
                      fix[run[0]:run[-1] + 1, cols[0]:cols[-1] + 1]))
    return kernel, stride, padding, skip, fixes


# Plans are cached per device and dtype so a training loop does not re-upload
# weights every step. A training run needs one or two entries (fixed gt_size);
# evaluation over images of mixed sizes cycles through more, and large images
# make multi-MB dense matrices, so the caches stay small.
@functools.lru_cache(maxsize=32)
def _strided_pass(in_length: int, out_length: int, scale: float, antialias: bool,
                  device: torch.device, dtype: torch.dtype) -> _StridedPass | None:
    plan = _strided_plan(in_length, out_length, scale, antialias)
    if plan is None:
        return None
    kernel, stride, padding, skip, fixes = plan
    to_device = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device, dtype)  # noqa: E731
    return _StridedPass(to_device(kernel), stride, padding, skip, out_length,
                        tuple((j0, j1, r0, r1, to_device(block)) for j0, j1, r0, r1, block in fixes), in_length)


@functools.lru_cache(maxsize=32)
def _dense_pass(in_length: int, out_length: int, scale: float, antialias: bool,
                device: torch.device, dtype: torch.dtype) -> _DensePass:
    matrix = torch.from_numpy(weight_matrix(in_length, out_length, scale, antialias)).to(device, dtype)
    return _DensePass(matrix, matrix.T.contiguous())


def _dense_cost(batch: int, in_length: int, out_length: int, other: int) -> int:
    return batch * in_length * out_length * other + OP_COST


def _strided_cost(plan: _StridedPass, batch: int, other: int, dim: int) -> int:
    conv_outputs = (plan.in_length + 2 * plan.padding - plan.taps.numel()) // plan.stride + 1
    per_column = CONV_COST * conv_outputs * plan.taps.numel() + sum(block.numel() for *_, block in plan.fixes)
    if dim == 2:  # transposed in and back out
        per_column += TRANSPOSE_COST * (plan.in_length + plan.out_length)
    return batch * per_column * other + CONV_CALL_COST + 2 * OP_COST * len(plan.fixes)


@functools.lru_cache(maxsize=64)
def _passes(batch: int, height: int, width: int, scale: float, antialias: bool, device: torch.device,
            dtype: torch.dtype, strided: bool | None = None) -> tuple[tuple[int, _DensePass | _StridedPass], ...]:
    """The two passes over ``batch`` planes of ``height x width`` as ``(dim, plan)``, cheapest first.

    MATLAB resizes H then W; the passes are linear, so either order and either
    way of running a pass (dense matrix or strided convolution) give its result
    up to float rounding. ``strided``: None chooses by estimated cost; True
    takes the strided convolution wherever a pass has a shared kernel; False
    never does (for tests and comparisons).
    """
    out_height, out_width = output_length(height, scale), output_length(width, scale)
    lengths = {1: (height, out_height), 2: (width, out_width)}
    kernels = {dim: _strided_pass(*lengths[dim], scale, antialias, device, dtype) if strided is not False else None
               for dim in (1, 2)}

    def choose(dim: int, other: int) -> tuple[int, bool]:
        """(cost, whether strided) of resizing `dim` while the other dimension has length `other`."""
        dense = _dense_cost(batch, *lengths[dim], other)
        if kernels[dim] is None:
            return dense, False
        fast = _strided_cost(kernels[dim], batch, other, dim)
        return (fast, True) if strided or fast < dense else (dense, False)

    orders = []
    for first_dim, second_dim in ((1, 2), (2, 1)):
        cost1, fast1 = choose(first_dim, lengths[second_dim][0])
        cost2, fast2 = choose(second_dim, lengths[first_dim][1])
        orders.append((cost1 + cost2, ((first_dim, fast1), (second_dim, fast2))))
    _, best = min(orders, key=lambda order: order[0])  # ties: H first, as MATLAB
    return tuple((dim, kernels[dim] if fast else _dense_pass(*lengths[dim], scale, antialias, device, dtype))
                 for dim, fast in best)


def describe(shape: tuple[int, ...], scale: float, antialias: bool = True) -> str:
    """How :func:`imresize` runs on a float32 CPU tensor of ``shape`` ((C,H,W) or (N,C,H,W)), for logs."""
    *lead, height, width = shape
    steps = []
    for dim, plan in _passes(math.prod(lead), height, width, float(scale), antialias, torch.device("cpu"),
                             torch.float32):
        if isinstance(plan, _DensePass):
            how = f"dense matmul {tuple(plan.matrix.shape)}"
        else:
            fixed = sum(out1 - out0 for out0, out1, *_ in plan.fixes)
            how = f"stride-{plan.stride} depthwise conv, {plan.taps.numel()} taps, {fixed} border outputs fixed"
        steps.append(f"{'H' if dim == 1 else 'W'}: {how}")
    return ", then ".join(steps)


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
    return _resize(x, scale, antialias)


def _resize(x: torch.Tensor, scale: float, antialias: bool, strided: bool | None = None) -> torch.Tensor:
    scale = _check(x, scale)
    # Python ints even while torch.jit.trace/ONNX export hands 0-d tensors as sizes: the weight
    # matrices are NumPy constants of the traced graph either way, and lru_cache keys on them
    height, width = (int(n) for n in x.shape[-2:])
    compute_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    y = x.to(compute_dtype).reshape(-1, height, width)
    for dim, plan in _passes(y.shape[0], height, width, scale, antialias, x.device, compute_dtype, strided):
        y = plan.apply(y, dim)
    return y.reshape(*x.shape[:-2], *y.shape[-2:]).contiguous().to(x.dtype)
