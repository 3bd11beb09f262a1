"""uint8 images <-> float tensors, the two conversions every stage uses the same way."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """``(N,3,H,W)`` float32 in [0,1] from N ``(H,W,3)`` uint8 arrays of one size."""
    # one uint8 copy into planar layout, then one float conversion (a quarter of the bytes to shuffle)
    planar = np.empty((len(images), 3, *images[0].shape[:2]), np.uint8)
    for out, image in zip(planar, images):
        out[...] = image.transpose(2, 0, 1)
    return torch.from_numpy(planar).float().div_(255.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(1,3,H,W)`` or ``(3,H,W)`` float -> ``(H,W,3)`` uint8: clamped to [0,1], scaled, rounded
    (MATLAB ``im2uint8``, BasicSR ``tensor2img``)."""
    if x.ndim == 4:
        x = x[0]
    return x.clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
