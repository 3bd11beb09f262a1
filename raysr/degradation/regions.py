"""The loader side of ``data.degradation: realesrgan``: per sample, the GT region the device degrades and its kernels.

As ``RealESRGANDataset``: each decoded HR image gives ``crops_per_image`` regions of
``crop_pad_size`` px (400) — a random crop, or the image reflect-padded at its bottom and right
when it is smaller (OpenCV's BORDER_REFLECT_101) —, flipped left-right with probability 0.5
(``hflip``; no vertical flip, no rotation, as Real-ESRGAN), and the sample's three kernels
(:func:`raysr.degradation.kernels.draw_kernels`). The crop to ``data.gt_size`` comes after the
degradation, on the device. Seeded like :func:`raysr.data.stream.iter_crops`: the same
(seed, rank, world size, DataLoader worker) gives the same regions and kernels.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from raysr.data.stream import DataStats, check_split_args, consumer_id, iter_images, shuffled, skip_batches
from raysr.degradation.kernels import draw_kernels
from raysr.ops.convert import to_tensor
from raysr.util import check_int


def gt_region(image: np.ndarray, size: int, rng: np.random.Generator, hflip: bool) -> np.ndarray:
    """A ``(size, size, 3)`` uint8 region of ``image`` ``(H, W, 3)``: reflect-padded (bottom, right) where
    the image is smaller, a random crop where it is larger, then flipped left-right with p = 0.5."""
    height, width = image.shape[:2]
    if height < size or width < size:
        image = np.pad(image, ((0, max(0, size - height)), (0, max(0, size - width)), (0, 0)), mode="reflect")
        height, width = image.shape[:2]
    top = int(rng.integers(height - size + 1))
    left = int(rng.integers(width - size + 1))
    region = image[top:top + size, left:left + size]
    if hflip and rng.uniform() < 0.5:
        region = region[:, ::-1]
    return np.ascontiguousarray(region)


def iter_regions(shards, opts, seed: int = 0, *, crops_per_image: int = 1, shuffle_buffer: int = 0,
                 resampled: bool = False, rank: int = 0, world_size: int = 1,
                 stats: DataStats | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    """``(region (S,S,3) uint8, kernels (3,21,21) float32, params)`` per sample, shuffled; ``S =
    opts.crop_pad_size``, ``opts`` a ``raysr.config.DegradationConfig``. ``params``: the kernels'
    drawn parameters. Shards and the split as :func:`raysr.data.stream.iter_crops`."""
    check_split_args(rank, world_size, seed)
    crops_per_image = check_int("crops_per_image", crops_per_image)
    stats = stats if stats is not None else DataStats()
    consumer, num_consumers = consumer_id(rank, world_size)
    rng = np.random.default_rng([seed, consumer, num_consumers, 20])  # 20: not the bicubic crops' stream

    def samples():
        for _, image in iter_images(shards, seed=seed, rank=rank, world_size=world_size, resampled=resampled,
                                    stats=stats):
            for _ in range(crops_per_image):
                region = gt_region(image, opts.crop_pad_size, rng, opts.hflip)
                kernels, params = draw_kernels(rng, opts)
                stats.crops += 1
                yield region, kernels, params

    yield from shuffled(samples(), shuffle_buffer, rng)


def iter_region_batches(shards, batch_size: int, opts, seed: int = 0, skip: int = 0,
                        **region_args) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[dict]]]:
    """``(kernels (B,3,21,21) float32, hr (B,3,S,S) float32 in [0,1], params)`` batches of
    :func:`iter_regions`; a final partial batch of a finite stream is dropped; the first ``skip``
    drawn but not built (:func:`raysr.data.stream.skip_batches`)."""
    batch_size = check_int("batch_size", batch_size)
    for batch in skip_batches(iter_regions(shards, opts, seed, **region_args), batch_size, skip):
        regions, kernels, params = zip(*batch)
        yield torch.from_numpy(np.stack(kernels)), to_tensor(list(regions)), list(params)
