"""Batched JPEG compression for torch tensors (encode + decode), per-sample quality, any device.

``jpeg(images, quality)`` returns what saving each image as a baseline JPEG with libjpeg-turbo at
that quality and reading it back gives (what Pillow's ``Image.save(format="JPEG", quality=q)``
followed by ``Image.open`` gives): Real-ESRGAN's JPEG degradation, run on the training device for a
whole batch at once, without leaving the GPU.

It follows libjpeg's integer pipeline step by step, in int32 tensor arithmetic:

1. the input as 8-bit samples: ``round(clamp(x, 0, 1) * 255)``;
2. RGB -> YCbCr (JFIF, full range, Cb/Cr offset 128) with libjpeg's 16-bit fixed-point weights
   and its rounding (``jccolor.c``);
3. 4:2:0 chroma subsampling (Pillow's default at every quality): each 2x2 chroma group averaged
   with libjpeg's alternating rounding bias 1, 2, 1, 2, ... (``jcsample.c``); before it the full
   resolution chroma is edge-replicated to a width that is a multiple of 16 and an even height,
   after it the subsampled rows are edge-replicated to a multiple of 8, as libjpeg pads;
   luma is edge-replicated to multiples of 8;
4. per 8x8 block: level shift by 128 and libjpeg's "islow" forward DCT (Loeffler-Ligtenberg-
   Moschytz with 13-bit constants, ``jfdctint.c``), quantisation by the IJG tables of ITU-T T.81
   Annex K scaled by libjpeg's ``jpeg_quality_scaling`` and rounded half away from zero
   (``jcdctmgr.c``);
5. dequantisation and libjpeg's "islow" inverse DCT with its rounding and clamping to 0..255
   (``jidctint.c``);
6. chroma upsampling by libjpeg's "fancy" triangular filter (weights 9/16, 3/16, 3/16, 1/16 with
   the rounding biases 8 and 7, edges replicated; ``jdsample.c``), or pixel replication when the
   subsampled width is at most 2 pixels, as libjpeg does;
7. YCbCr -> RGB with libjpeg's fixed-point tables and clamping (``jdcolor.c``); the result is
   8-bit again, returned as ``k / 255`` in the input's dtype.

Every step is integer-exact, so the output equals libjpeg-turbo's decoded JPEG (ISLOW DCT, fancy
upsampling: libjpeg-turbo's and Pillow's defaults) pixel for pixel; tests/test_jpeg.py measures a
mean absolute difference of 0 levels against Pillow 13 (libjpeg-turbo) on photos and noise, at
qualities 1 to 100 and sizes from 1x1 up.

What differs from libjpeg, none of it visible in the pixels: the entropy (Huffman) coding is
lossless and skipped; the blocks libjpeg adds to complete an MCU beyond the padded image (DC copied,
never displayed) are not made; the inverse DCT clamps where libjpeg's range-limit table wraps for
outputs hundreds of levels out of range, which only corrupt files produce. What is not modelled:
options other than Pillow's defaults (``subsampling`` 4:4:4 or 4:2:2, custom ``qtables``,
``smooth``); progressive or arithmetic coding would change no pixel. Inputs that are
not 8-bit values are rounded to 8 bits first, as writing them to a file does. Other decoders
(IJG libjpeg 9's DCT-domain upsampling, libjpeg's float or fast DCT, no fancy upsampling) read the
same file about a level differently.

Not differentiable: the output carries no gradient (Real-ESRGAN synthesises degradations under
``torch.no_grad``). Autocast does not apply: everything after the 8-bit conversion is integer.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["jpeg", "quantization_tables", "LUMINANCE_TABLE", "CHROMINANCE_TABLE"]

# ITU-T T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance), natural (row-major) order:
# libjpeg's quality 50.
LUMINANCE_TABLE = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)
CHROMINANCE_TABLE = (
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
)

# libjpeg's fixed-point colour conversion: 16 fractional bits, FIX(x) = round(x * 2^16).
_SCALEBITS = 16
_ONE_HALF = 1 << (_SCALEBITS - 1)


def _fix(x: float) -> int:
    return int(x * (1 << _SCALEBITS) + 0.5)


# libjpeg's islow DCT: 13-bit constants, 2 extra bits of precision between the passes.
_CONST_BITS = 13
_PASS1_BITS = 2
_F0_298 = 2446   # FIX(0.298631336) = sqrt(2) * (-c1 + c3 + c5 - c7), cK = cos(K pi / 16)
_F0_390 = 3196   # FIX(0.390180644) = sqrt(2) * (c3 - c5)
_F0_541 = 4433   # FIX(0.541196100) = sqrt(2) * c6
_F0_765 = 6270   # FIX(0.765366865) = sqrt(2) * (c2 - c6)
_F0_899 = 7373   # FIX(0.899976223) = sqrt(2) * (c3 - c7)
_F1_175 = 9633   # FIX(1.175875602) = sqrt(2) * c3
_F1_501 = 12299  # FIX(1.501321110) = sqrt(2) * (c1 + c3 - c5 - c7)
_F1_847 = 15137  # FIX(1.847759065) = sqrt(2) * (c2 + c6)
_F1_961 = 16069  # FIX(1.961570560) = sqrt(2) * (c3 + c5)
_F2_053 = 16819  # FIX(2.053119869) = sqrt(2) * (c1 + c3 - c5 + c7)
_F2_562 = 20995  # FIX(2.562915447) = sqrt(2) * (c1 + c3)
_F3_072 = 25172  # FIX(3.072711026) = sqrt(2) * (c1 + c3 + c5 - c7)


def _descale(x: torch.Tensor, n: int) -> torch.Tensor:
    """``round(x / 2^n)``, halves up, as libjpeg's DESCALE (an arithmetic shift)."""
    return (x + (1 << (n - 1))) >> n


def quantization_tables(quality: torch.Tensor) -> torch.Tensor:
    """libjpeg's quantisation tables at integer ``quality`` (``jpeg_set_quality`` with baseline).

    ``quality``: ``(N,)`` integer tensor in [1, 100]. Returns ``(N, 2, 8, 8)`` int32 on
    ``quality``'s device: ``[:, 0]`` luminance, ``[:, 1]`` chrominance, natural (row-major) order,
    each entry ``clamp((annex_k * scale + 50) // 100, 1, 255)`` with ``scale = 5000 // q`` below
    quality 50 and ``200 - 2 q`` from 50 on.
    """
    q = quality.to(torch.int32).view(-1, 1, 1)
    scale = torch.where(q < 50, 5000 // q, 200 - 2 * q)
    base = torch.tensor([LUMINANCE_TABLE, CHROMINANCE_TABLE], dtype=torch.int32, device=q.device)
    return ((base * scale + 50) // 100).clamp_(1, 255).view(-1, 2, 8, 8)


def _check_quality(quality, n: int, device: torch.device) -> torch.Tensor:
    """``(N,)`` int32 qualities on ``device``: float qualities rounded to the nearest integer."""
    if isinstance(quality, numbers.Real) and not isinstance(quality, bool):
        quality = torch.full((n,), float(quality))
    if not isinstance(quality, torch.Tensor):
        raise TypeError(f"jpeg: quality must be a number or a tensor of shape ({n},), got {type(quality).__name__}")
    if quality.dtype == torch.bool or quality.is_complex():
        raise TypeError(f"jpeg: quality must hold integers or floats, got {quality.dtype}")
    if quality.ndim == 0:
        quality = quality.expand(n)
    if quality.shape != (n,):
        raise ValueError(f"jpeg: quality must have shape ({n},), one per image, got {tuple(quality.shape)}")
    # checked and rounded on the host (N numbers; a device tensor costs one synchronisation)
    quality = quality.detach().to("cpu", torch.float64)
    bad = ~((quality >= 1) & (quality <= 100))  # NaN is bad too
    if bool(bad.any()):
        raise ValueError(f"jpeg: quality must lie in [1, 100] (libjpeg's range), got "
                         f"{quality[bad][0].item()}")
    # libjpeg takes an integer quality: round to nearest, halves up
    return torch.floor(quality + 0.5).to(device=device, dtype=torch.int32)


def _replicate(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(..., h, w)`` -> ``(..., height, width)`` by repeating the last row and column."""
    h, w = x.shape[-2:]
    if height > h:
        x = torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], height - h, w)], dim=-2)
    if width > w:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], width - w)], dim=-1)
    return x


def _rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """``(N,3,H,W)`` int32 8-bit RGB -> YCbCr, rounded as libjpeg's ``rgb_ycc_convert``."""
    r, g, b = rgb.unbind(1)
    y = (_fix(0.29900) * r + _fix(0.58700) * g + _fix(0.11400) * b + _ONE_HALF) >> _SCALEBITS
    # Cb/Cr round with 0.5 - epsilon so that 255.5 cannot occur (libjpeg's fudge factor)
    offset = (128 << _SCALEBITS) + _ONE_HALF - 1
    cb = (-_fix(0.16874) * r - _fix(0.33126) * g + _fix(0.50000) * b + offset) >> _SCALEBITS
    cr = (_fix(0.50000) * r - _fix(0.41869) * g - _fix(0.08131) * b + offset) >> _SCALEBITS
    return torch.stack([y, cb, cr], dim=1)


def _ycbcr_to_rgb(y: torch.Tensor, cb: torch.Tensor, cr: torch.Tensor) -> torch.Tensor:
    """8-bit planes ``(N,H,W)`` -> ``(N,3,H,W)`` RGB in 0..255, as libjpeg's ``ycc_rgb_convert``."""
    cb = cb - 128
    cr = cr - 128
    r = y + ((_fix(1.40200) * cr + _ONE_HALF) >> _SCALEBITS)
    g = y + ((-_fix(0.34414) * cb - _fix(0.71414) * cr + _ONE_HALF) >> _SCALEBITS)
    b = y + ((_fix(1.77200) * cb + _ONE_HALF) >> _SCALEBITS)
    return torch.stack([r, g, b], dim=1).clamp_(0, 255)


def _downsample(chroma: torch.Tensor) -> torch.Tensor:
    """``(N,C,H,W)`` -> ``(N,C,H/2,W/2)`` (even H, W): 2x2 means with libjpeg's biases 1, 2, 1, ..."""
    w = chroma.shape[-1]
    sums = chroma[..., 0::2, 0::2] + chroma[..., 0::2, 1::2] + chroma[..., 1::2, 0::2] + chroma[..., 1::2, 1::2]
    bias = torch.tensor([1, 2], dtype=torch.int32, device=chroma.device).repeat(w // 4 + 1)[: w // 2]
    return (sums + bias) >> 2


def _upsample(chroma: torch.Tensor) -> torch.Tensor:
    """``(N,C,h,w)`` -> ``(N,C,2h,2w)``: libjpeg's h2v2 fancy (triangular) upsampling.

    Each output is ``(9 * nearest + 3 * vertical + 3 * horizontal + diagonal) / 16`` of the
    subsampled neighbours, computed as libjpeg does (vertical column sums first, rounding bias 8
    for even and 7 for odd output columns) with the image's edge samples replicated.
    """
    n, c, h, w = chroma.shape
    if w <= 2:  # libjpeg falls back to pixel replication for such narrow images
        return chroma.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    rows = torch.arange(h, device=chroma.device)
    above = chroma[:, :, (rows - 1).clamp(min=0)]
    below = chroma[:, :, (rows + 1).clamp(max=h - 1)]
    colsum = torch.stack([3 * chroma + above, 3 * chroma + below], dim=3).view(n, c, 2 * h, w)
    left = torch.cat([colsum[..., :1], colsum[..., :-1]], dim=-1)
    right = torch.cat([colsum[..., 1:], colsum[..., -1:]], dim=-1)
    even = (3 * colsum + left + 8) >> 4
    odd = (3 * colsum + right + 7) >> 4
    return torch.stack([even, odd], dim=-1).view(n, c, 2 * h, 2 * w)


def _to_blocks(plane: torch.Tensor) -> torch.Tensor:
    """``(N,C,H,W)`` (H, W multiples of 8) -> ``(8, 8, N, C, H/8, W/8)``: sample row, column first,
    so that each 1-D DCT pass works on 8 contiguous slices."""
    n, c, h, w = plane.shape
    return plane.reshape(n, c, h // 8, 8, w // 8, 8).permute(3, 5, 0, 1, 2, 4).contiguous()


def _from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_to_blocks`."""
    _, _, n, c, hb, wb = blocks.shape
    return blocks.permute(2, 3, 4, 0, 5, 1).reshape(n, c, hb * 8, wb * 8)


def _fdct_1d(d: list[torch.Tensor], first_pass: bool) -> list[torch.Tensor]:
    """One pass of libjpeg's ``jpeg_fdct_islow`` over 8 samples (a row or a column of blocks).

    Pass 1 (rows) leaves the outputs scaled by ``2^PASS1_BITS``; pass 2 (columns) removes that
    scaling but leaves the overall factor 8 that the quantiser divides out.
    """
    even_descale = None if first_pass else _PASS1_BITS
    odd_descale = _CONST_BITS - _PASS1_BITS if first_pass else _CONST_BITS + _PASS1_BITS
    tmp0, tmp7 = d[0] + d[7], d[0] - d[7]
    tmp1, tmp6 = d[1] + d[6], d[1] - d[6]
    tmp2, tmp5 = d[2] + d[5], d[2] - d[5]
    tmp3, tmp4 = d[3] + d[4], d[3] - d[4]
    # even part
    tmp10, tmp13 = tmp0 + tmp3, tmp0 - tmp3
    tmp11, tmp12 = tmp1 + tmp2, tmp1 - tmp2
    out = [None] * 8
    if even_descale is None:
        out[0] = (tmp10 + tmp11) << _PASS1_BITS
        out[4] = (tmp10 - tmp11) << _PASS1_BITS
    else:
        out[0] = _descale(tmp10 + tmp11, even_descale)
        out[4] = _descale(tmp10 - tmp11, even_descale)
    z1 = (tmp12 + tmp13) * _F0_541
    out[2] = _descale(z1 + tmp13 * _F0_765, odd_descale)
    out[6] = _descale(z1 - tmp12 * _F1_847, odd_descale)
    # odd part
    z1, z2, z3, z4 = tmp4 + tmp7, tmp5 + tmp6, tmp4 + tmp6, tmp5 + tmp7
    z5 = (z3 + z4) * _F1_175
    tmp4, tmp5, tmp6, tmp7 = tmp4 * _F0_298, tmp5 * _F2_053, tmp6 * _F3_072, tmp7 * _F1_501
    z1, z2 = z1 * -_F0_899, z2 * -_F2_562
    z3, z4 = z3 * -_F1_961 + z5, z4 * -_F0_390 + z5
    out[7] = _descale(tmp4 + z1 + z3, odd_descale)
    out[5] = _descale(tmp5 + z2 + z4, odd_descale)
    out[3] = _descale(tmp6 + z2 + z3, odd_descale)
    out[1] = _descale(tmp7 + z1 + z4, odd_descale)
    return out


def _idct_1d(c: list[torch.Tensor], descale: int) -> list[torch.Tensor]:
    """One pass of libjpeg's ``jpeg_idct_islow`` over 8 (dequantised) coefficients."""
    # even part
    z1 = (c[2] + c[6]) * _F0_541
    tmp2 = z1 - c[6] * _F1_847
    tmp3 = z1 + c[2] * _F0_765
    tmp0 = (c[0] + c[4]) << _CONST_BITS
    tmp1 = (c[0] - c[4]) << _CONST_BITS
    tmp10, tmp13 = tmp0 + tmp3, tmp0 - tmp3
    tmp11, tmp12 = tmp1 + tmp2, tmp1 - tmp2
    # odd part
    tmp0, tmp1, tmp2, tmp3 = c[7], c[5], c[3], c[1]
    z1, z2, z3, z4 = tmp0 + tmp3, tmp1 + tmp2, tmp0 + tmp2, tmp1 + tmp3
    z5 = (z3 + z4) * _F1_175
    tmp0, tmp1, tmp2, tmp3 = tmp0 * _F0_298, tmp1 * _F2_053, tmp2 * _F3_072, tmp3 * _F1_501
    z1, z2 = z1 * -_F0_899, z2 * -_F2_562
    z3, z4 = z3 * -_F1_961 + z5, z4 * -_F0_390 + z5
    tmp0 = tmp0 + z1 + z3
    tmp1 = tmp1 + z2 + z4
    tmp2 = tmp2 + z2 + z3
    tmp3 = tmp3 + z1 + z4
    return [_descale(tmp10 + tmp3, descale), _descale(tmp11 + tmp2, descale),
            _descale(tmp12 + tmp1, descale), _descale(tmp13 + tmp0, descale),
            _descale(tmp13 - tmp0, descale), _descale(tmp12 - tmp1, descale),
            _descale(tmp11 - tmp2, descale), _descale(tmp10 - tmp3, descale)]


def _compress_blocks(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Encode and decode one set of planes: ``(N,C,H,W)`` int32 8-bit samples (H, W multiples of
    8) and ``(N,8,8)`` quantisation tables -> the decoded ``(N,C,H,W)`` samples in 0..255."""
    blocks = _to_blocks(plane) - 128  # (8 sample rows, 8 sample columns, N, C, hb, wb)
    # pass 1 along each row (all rows at once), pass 2 along each column
    rows = torch.stack(_fdct_1d(list(blocks.unbind(1)), first_pass=True), dim=1)
    coef = torch.stack(_fdct_1d(list(rows.unbind(0)), first_pass=False))  # (8 vertical freq, 8 horizontal, ...)
    q = table.permute(1, 2, 0).reshape(8, 8, -1, 1, 1, 1)
    divisor = q * 8  # the DCT leaves its outputs scaled by 8
    # round half away from zero, as libjpeg's quantize()
    level = (coef.abs() + (divisor >> 1)) // divisor
    dequantised = torch.where(coef < 0, -level, level) * q
    # pass 1 along each column (all columns at once), pass 2 along each row
    columns = torch.stack(_idct_1d(list(dequantised.unbind(0)), _CONST_BITS - _PASS1_BITS))
    samples = torch.stack(_idct_1d(list(columns.unbind(1)), _CONST_BITS + _PASS1_BITS + 3), dim=1)
    return _from_blocks((samples + 128).clamp_(0, 255))


def jpeg(images: torch.Tensor, quality) -> torch.Tensor:
    """JPEG-compress and decode a batch, each image at its own quality, as libjpeg-turbo does.

    ``images``: ``(N,3,H,W)`` float RGB in [0,1] (any float dtype, any device; values outside
    [0,1] are clamped, NaN reads as 0) — each image is taken as 8-bit samples
    ``round(x * 255)``, as saving it to a file does. ``quality``: a number for all images or an
    ``(N,)`` tensor of integers or floats in [1, 100], on any device; libjpeg takes integer
    qualities, so floats are rounded to the nearest integer (halves up).
    Returns the decoded images ``(N,3,H,W)``, 8-bit values ``k / 255`` in ``images``' dtype
    (bf16 and fp16 hold the nearest value they can) and device, without gradient. Any H, W >= 1:
    the codec's padding to whole blocks (edge replication) is cropped off again.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"jpeg: images must be a torch.Tensor (N,3,H,W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"jpeg: images must have shape (N,3,H,W) (RGB), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"jpeg: images must be float in [0,1], got {images.dtype} "
                        "(convert uint8 with raysr.ops.convert or x.float() / 255)")
    n, _, height, width = images.shape
    if n == 0 or height == 0 or width == 0:
        raise ValueError(f"jpeg: images must be non-empty, got shape {tuple(images.shape)}")
    tables = quantization_tables(_check_quality(quality, n, images.device))

    with torch.no_grad():
        rgb = images.detach().float().nan_to_num(0.0).clamp_(0, 1).mul_(255).round_().to(torch.int32)
        ycc = _rgb_to_ycbcr(rgb)
        luma = _replicate(ycc[:, :1], -(-height // 8) * 8, -(-width // 8) * 8)
        # libjpeg replicates full-resolution chroma to whole MCUs across but only to an even height,
        # then the subsampled rows to a whole block
        chroma = _replicate(ycc[:, 1:], height + height % 2, -(-width // 16) * 16)
        chroma = _downsample(chroma)
        chroma = _replicate(chroma, -(-height // 16) * 8, chroma.shape[-1])
        luma = _compress_blocks(luma, tables[:, 0])[:, 0, :height, :width]
        chroma = _compress_blocks(chroma, tables[:, 1])[:, :, : -(-height // 2), : -(-width // 2)]
        chroma = _upsample(chroma)[:, :, :height, :width]
        rgb = _ycbcr_to_rgb(luma, chroma[:, 0], chroma[:, 1])
        return rgb.to(images.dtype) / 255  # k / 255 rounded once, in the caller's dtype
