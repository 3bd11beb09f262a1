"""Running a generator on an image tensor: whole or in overlapping tiles, padded to the sizes
the network takes, in fp32 / bf16 / fp16.

``raysr.upscale``, ``raysr.evaluate`` and training's validation (:mod:`raysr.scoring`) all
run generators through :func:`upscale_tensor`, so an image is super-resolved the same way
wherever it is scored.
"""

from __future__ import annotations

import torch
from torch import nn

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# LR pixels of context around each tile. A full-depth (23-block) RRDBNet x4 differs from
# whole-image inference by <= 0.004/255 at 16 (0.3/255 at 8, 47/255 at 4); see the tests.
DEFAULT_TILE_PAD = 16


def _forward(model: nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    dtype = PRECISIONS[precision]
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        out = model(x)
    expected = (x.shape[0], 3, x.shape[2] * model.scale, x.shape[3] * model.scale)
    if tuple(out.shape) != expected:
        raise ValueError(f"{type(model).__name__} (scale {model.scale}) turned input {tuple(x.shape)} into "
                         f"{tuple(out.shape)}, expected {expected}; is the checkpoint's scale right?")
    return out.float()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def upscale_tensor(model: nn.Module, lr: torch.Tensor, tile: int = 0, tile_pad: int = DEFAULT_TILE_PAD,
                   precision: str = "fp32") -> torch.Tensor:
    """Run ``model`` on ``lr``, whole or in overlapping tiles.

    lr: (N, 3, h, w) float in [0, 1], any device (tiles move to the model's device).
    tile: tile side in LR pixels, 0 = whole image. tile_pad: LR pixels of context
    added on each side of a tile (clamped at the image border) and cropped from its
    output. Deep networks see far, but the influence of distant pixels decays fast:
    at the default 16 a full-depth RRDBNet differs from untiled inference by
    <= 0.004/255 on a photo-like image; a shallow net whose whole receptive field
    fits in the pad matches up to float rounding. precision: ``fp32`` | ``bf16`` |
    ``fp16`` (autocast). Returns (N, 3, h*scale, w*scale) float32 in [0, 1] on
    ``lr``'s device.
    """
    if tile < 0 or tile_pad < 0:
        raise ValueError(f"tile and tile_pad must be >= 0, got tile={tile}, tile_pad={tile_pad}")
    scale = model.scale
    device = next(model.parameters()).device
    height, width = lr.shape[-2:]
    # RRDBNet x2 / x1 pixel-unshuffle their input, so every piece must divide by that factor
    multiple = getattr(model, "unshuffle", 1)
    x = lr
    if height % multiple or width % multiple:
        pad = (0, _round_up(width, multiple) - width, 0, _round_up(height, multiple) - height)
        x = torch.nn.functional.pad(lr, pad, mode="replicate")
    padded_h, padded_w = x.shape[-2:]
    if tile == 0 or (tile >= padded_h and tile >= padded_w):
        out = _forward(model, x.to(device), precision).to(lr.device)
    else:
        tile, tile_pad = _round_up(tile, multiple), _round_up(tile_pad, multiple)
        out = torch.empty((x.shape[0], 3, padded_h * scale, padded_w * scale), dtype=torch.float32,
                          device=lr.device)
        for y0 in range(0, padded_h, tile):
            for x0 in range(0, padded_w, tile):
                y1, x1 = min(y0 + tile, padded_h), min(x0 + tile, padded_w)
                py0, px0 = max(y0 - tile_pad, 0), max(x0 - tile_pad, 0)
                py1, px1 = min(y1 + tile_pad, padded_h), min(x1 + tile_pad, padded_w)
                piece = _forward(model, x[..., py0:py1, px0:px1].to(device), precision)
                oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
                out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                    piece[..., oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale].to(lr.device)
    return out[..., :height * scale, :width * scale].clamp(0.0, 1.0)
