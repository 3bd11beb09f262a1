"""Validation pairs the way SR benchmarks define them (Set5, Set14, B100, DIV2K val).

GT is the full HR image with its bottom/right ``H % scale`` rows and
``W % scale`` columns cut ("GTmod", BasicSR's ``mod_crop``); LR is the exact
MATLAB bicubic of GT ÷ scale, on 8-bit levels like the published LR files
(:func:`raysr.data.make_lr`). Images come from a folder (local or s3://) or
from shards; unreadable images are skipped with a warning, as in training.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch

from raysr import storage
from raysr.data.decode import DECODE_ERRORS, decode_rgb
from raysr.data.manifest import manifest_uri
from raysr.data.sources import SHARD_SUFFIXES, resolve_shards
from raysr.data.stream import DataStats, iter_shard, make_lr
from raysr.images import list_images
from raysr.storage import StorageError
from raysr.util import check_int

LOG = logging.getLogger(__name__)


def mod_crop(image: np.ndarray, scale: int) -> np.ndarray:
    """``(H, W, C)`` array cut to ``(H - H % scale, W - W % scale, C)`` (top-left kept)."""
    scale = check_int("scale", scale)
    height, width = image.shape[:2]
    return image[:height - height % scale, :width - width % scale]


class ValidationSet(torch.utils.data.Dataset):
    """Full-image validation pairs; ``ds[i]`` is ``(name, lr, hr)``.

    hr: ``(3, H, W)`` float32 in [0,1], H and W multiples of ``scale``; lr:
    ``(3, H/scale, W/scale)`` float32 (8-bit levels if ``quantize``), made on
    first access and cached. ``skipped`` names the images that could not be used.
    Images differ in size: iterate one at a time (batch size 1).
    """

    def __init__(self, names: Sequence[str], images: Sequence[np.ndarray], scale: int, quantize: bool = True,
                 skipped: Sequence[str] = ()):
        self.scale = check_int("scale", scale)
        self.quantize = quantize
        self.names = list(names)
        self.skipped = list(skipped)
        # uint8 HR: a quarter of the memory of float, converted per access
        self._hr = [torch.from_numpy(np.ascontiguousarray(mod_crop(im, scale).transpose(2, 0, 1))) for im in images]
        self._lr: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        hr = self._hr[index].float().div_(255.0)
        if index not in self._lr:
            self._lr[index] = make_lr(hr, self.scale, self.quantize)
        return self.names[index], self._lr[index].clone(), hr


def _is_shard_source(source) -> bool:
    if not isinstance(source, str):
        return True
    if source.endswith(SHARD_SUFFIXES + (".parquet",)) or "{" in source:
        return True
    return storage.exists(manifest_uri(source))


def _folder_images(folder: str, scale: int) -> tuple[list[str], list[np.ndarray], list[str]]:
    paths, _ = list_images(folder)
    if not paths:
        if any(u.endswith(SHARD_SUFFIXES) for u in storage.list_files(folder)):
            return _shard_images(folder, scale)
        raise ValueError(f"{folder} holds no images (.png, .jpg, .webp, ...) and no shards; "
                         "point it at a folder of HR images or at shards")
    root = folder.rstrip("/")
    names, images, skipped = [], [], []
    for path in paths:
        name = os.path.splitext(path[len(root):].lstrip("/\\"))[0]
        try:
            image = decode_rgb(storage.read_bytes(path), path)
        except DECODE_ERRORS as err:
            if isinstance(err, StorageError):
                raise
            LOG.warning("validation: skipped %s: %s", path, err)
            skipped.append(name)
            continue
        if min(image.shape[:2]) < scale:
            LOG.warning("validation: skipped %s: %dx%d is smaller than scale %d", path, image.shape[1],
                        image.shape[0], scale)
            skipped.append(name)
            continue
        names.append(name)
        images.append(image)
    return names, images, skipped


def _shard_images(shards, scale: int) -> tuple[list[str], list[np.ndarray], list[str]]:
    shard_list = resolve_shards(shards)
    stats = DataStats()
    names, images = [], []
    for url, expected in zip(shard_list.urls, shard_list.samples):
        for key, image in iter_shard(url, scale, stats, expected):
            names.append(key)
            images.append(image)
    skipped = [f"{stats.skipped} bad samples in the shards"] if stats.skipped else []
    return names, images, skipped


def load_validation(source, scale: int, *, quantize: bool = True) -> ValidationSet:
    """Read every image of ``source`` into a :class:`ValidationSet`.

    source: a folder or s3:// prefix of HR images (names: paths relative to it,
    without extension, sorted), or shards (URL list, pattern, directory with a
    manifest, manifest; names: sample keys, in shard order). Raises ValueError
    when no usable image is found, StorageError when the source is missing.
    """
    scale = check_int("scale", scale)
    if _is_shard_source(source):
        names, images, skipped = _shard_images(source, scale)
    else:
        names, images, skipped = _folder_images(source, scale)
    if not names:
        raise ValueError(f"no usable validation image in {source} (skipped: {skipped or 'none'})")
    return ValidationSet(names, images, scale, quantize, skipped)
