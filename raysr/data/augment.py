"""The 8 flip/rot90 symmetries of a square crop, applied on the host or on the training device.

Symmetry ``s`` (0..7) is: flip left-right if ``s & 1``, then flip up-down if ``s & 2``, then
transpose if ``s & 4`` — BasicSR's ``augment`` (hflip, vflip, rot90 as a transpose, each with
p = 0.5), so a uniform ``s`` is each of the 8 symmetries with p = 1/8.

The loader draws ``s`` per crop (:mod:`raysr.data.stream`); where the batch becomes float it is
applied: in the loader processes as NumPy views (:func:`symmetric_view`, free: the copy into a
tensor lays them out), or, with ``data.lr_on: device``, on the training device as one gather over
the whole batch (:func:`apply_symmetries`), so the loader processes only slice and batch.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

NUM_SYMMETRIES = 8


def symmetric_view(crop: np.ndarray, symmetry: int) -> np.ndarray:
    """``crop`` (H, W, C) under ``symmetry`` (0..7), as a view (no copy)."""
    if symmetry & 1:
        crop = crop[:, ::-1]
    if symmetry & 2:
        crop = crop[::-1]
    if symmetry & 4:
        crop = crop.transpose(1, 0, 2)
    return crop


@lru_cache(maxsize=16)
def _pixel_tables(size: int, device: torch.device) -> torch.Tensor:
    """(8, size*size) int64: entry ``[s, p]`` is the source pixel (row-major) of output pixel ``p`` under ``s``."""
    base = torch.arange(size * size).view(size, size)
    tables = []
    for symmetry in range(NUM_SYMMETRIES):
        table = base
        if symmetry & 1:
            table = table.flip(1)
        if symmetry & 2:
            table = table.flip(0)
        if symmetry & 4:
            table = table.t()
        tables.append(table.reshape(-1))
    return torch.stack(tables).to(device)


def apply_symmetries(crops: torch.Tensor, symmetries: torch.Tensor) -> torch.Tensor:
    """Each crop under its symmetry, in one gather on the crops' device.

    crops: ``(B, S, S, C)`` (channels last, as the loader ships uint8 crops), any dtype and
    device; symmetries: ``(B,)`` integers in 0..7. Returns a new ``(B, S, S, C)`` tensor.
    """
    batch, height, width, channels = crops.shape
    if height != width:
        raise ValueError(f"flip/rot90 symmetries need square crops, got {height}x{width}")
    index = _pixel_tables(height, crops.device)[symmetries.to(crops.device, torch.long)]  # (B, S*S)
    flat = crops.reshape(batch, height * width, channels)
    out = flat.gather(1, index.unsqueeze(2).expand(batch, height * width, channels))
    return out.view(batch, height, width, channels)
