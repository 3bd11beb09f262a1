"""Running a generator on an image tensor: whole or in overlapping tiles, padded to the sizes
the network takes, in fp32 / bf16 / fp16.

``raysr.upscale``, ``raysr.evaluate`` and training's validation (:mod:`raysr.scoring`) all
run generators through :func:`upscale_tensor`, so an image is super-resolved the same way
wherever it is scored.
"""

from __future__ import annotations

from collections.abc import Sequence

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


# A tile: ((y0, y1, x0, x1) the part of the padded LR image it fills, (py0, py1, px0, px1) the part it
# reads = that part plus tile_pad of context on each side, clamped at the border), in LR pixels.
Tile = tuple[tuple[int, int, int, int], tuple[int, int, int, int]]


def _padded_size(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    # RRDBNet x2 / x1 pixel-unshuffle their input, so every piece must divide by that factor
    multiple = getattr(model, "unshuffle", 1)
    return _round_up(height, multiple), _round_up(width, multiple)


def _tiles(model: nn.Module, height: int, width: int, tile: int, tile_pad: int) -> list[Tile]:
    """The tiles of an ``height`` x ``width`` LR image (before padding to the network's multiple), row by row."""
    padded_h, padded_w = _padded_size(model, height, width)
    if tile == 0 or (tile >= padded_h and tile >= padded_w):
        return [((0, padded_h, 0, padded_w), (0, padded_h, 0, padded_w))]
    multiple = getattr(model, "unshuffle", 1)
    tile, tile_pad = _round_up(tile, multiple), _round_up(tile_pad, multiple)
    tiles = []
    for y0 in range(0, padded_h, tile):
        for x0 in range(0, padded_w, tile):
            y1, x1 = min(y0 + tile, padded_h), min(x0 + tile, padded_w)
            tiles.append(((y0, y1, x0, x1), (max(y0 - tile_pad, 0), min(y1 + tile_pad, padded_h),
                                             max(x0 - tile_pad, 0), min(x1 + tile_pad, padded_w))))
    return tiles


def count_tiles(model: nn.Module, height: int, width: int, tile: int, tile_pad: int = DEFAULT_TILE_PAD) -> int:
    """How many pieces :func:`upscale_tensors` cuts an ``height`` x ``width`` LR image into (1 untiled)."""
    return len(_tiles(model, height, width, tile, tile_pad))


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
    return upscale_tensors(model, [lr], tile, tile_pad, precision)[0]


def upscale_tensors(model: nn.Module, lrs: Sequence[torch.Tensor], tile: int = 0, tile_pad: int = DEFAULT_TILE_PAD,
                    precision: str = "fp32", batch_tiles: int = 1) -> list[torch.Tensor]:
    """:func:`upscale_tensor` of each of ``lrs`` (each (n, 3, h, w), sizes may differ), with the
    tiles of equal shape of all of them going through the network together, up to ``batch_tiles``
    rows per forward (a piece of n rows counts n; one larger than ``batch_tiles`` runs alone).

    ``batch_tiles=1`` runs every piece alone, exactly as :func:`upscale_tensor` does. Batched, the
    network computes the same values in another summation order: they differ by float rounding
    (~1e-7), which can flip an 8-bit rounding by one level.
    """
    if tile < 0 or tile_pad < 0:
        raise ValueError(f"tile and tile_pad must be >= 0, got tile={tile}, tile_pad={tile_pad}")
    if batch_tiles < 1:
        raise ValueError(f"batch_tiles must be >= 1, got {batch_tiles}")
    scale = model.scale
    device = next(model.parameters()).device
    padded, outs, by_shape = [], [], {}
    for index, lr in enumerate(lrs):
        height, width = lr.shape[-2:]
        padded_h, padded_w = _padded_size(model, height, width)
        x = lr
        if (padded_h, padded_w) != (height, width):
            x = torch.nn.functional.pad(lr, (0, padded_w - width, 0, padded_h - height), mode="replicate")
        padded.append(x)
        outs.append(torch.empty((x.shape[0], 3, padded_h * scale, padded_w * scale), dtype=torch.float32,
                                device=lr.device))
        for fill, read in _tiles(model, height, width, tile, tile_pad):
            shape = (x.shape[1], read[1] - read[0], read[3] - read[2])
            by_shape.setdefault(shape, []).append((index, fill, read))
    for pieces in by_shape.values():
        for chunk in _chunks(pieces, [padded[index].shape[0] for index, _, _ in pieces], batch_tiles):
            inputs = [padded[index][..., py0:py1, px0:px1] for index, _, (py0, py1, px0, px1) in chunk]
            # one piece goes in as the view upscale_tensor always passed; several are concatenated
            batch = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
            result = _forward(model, batch.to(device), precision)
            row = 0
            for (index, (y0, y1, x0, x1), (py0, _, px0, _)), piece in zip(chunk, inputs):
                oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
                outs[index][..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                    result[row:row + piece.shape[0], :, oy:oy + (y1 - y0) * scale,
                           ox:ox + (x1 - x0) * scale].to(lrs[index].device)
                row += piece.shape[0]
    return [out[..., :lr.shape[-2] * scale, :lr.shape[-1] * scale].clamp(0.0, 1.0) for out, lr in zip(outs, lrs)]


def _chunks(items: list, rows: list[int], limit: int) -> list[list]:
    """``items`` cut in order into runs of at most ``limit`` rows (``rows[i]`` each); an item with more
    rows than ``limit`` makes a run alone; ``limit=1``: every item alone."""
    chunks, total = [], 0
    for item, n in zip(items, rows):
        if not chunks or limit == 1 or total + n > limit:
            chunks.append([])
            total = 0
        chunks[-1].append(item)
        total += n
    return chunks
