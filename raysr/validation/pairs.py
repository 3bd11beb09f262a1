"""Validation pairs the way SR benchmarks define them (Set5, Set14, B100, DIV2K val).

GT is the full HR image with its bottom/right ``H % scale`` rows and
``W % scale`` columns cut ("GTmod", BasicSR's ``mod_crop``); LR is the exact
MATLAB bicubic of GT ÷ scale, on 8-bit levels like the published LR files
(:func:`raysr.data.make_lr`), or, for real LR/HR pairs (RealSR, DRealSR, camera
pairs), the LR image of a paired folder, matched to its GT by name
(:func:`raysr.data.pairing.pairing_key`) and required to be exactly GTmod ÷ scale. Images come from
a folder (local or s3://) or from shards; unreadable images are skipped with a
warning, as in training. ``raysr.evaluate --lr`` pairs files by the same rule.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np
import torch

from raysr import storage
from raysr.data.decode import DECODE_ERRORS, decode_rgb
from raysr.data.manifest import manifest_uri
from raysr.data.pairing import index_by_key, mod_crop, pair_size_error, pairing_key
from raysr.data.sources import SHARD_SUFFIXES, resolve_shards
from raysr.data.stream import DataStats, iter_shard, make_lr
from raysr.images import list_images
from raysr.storage import StorageError
from raysr.util import check_int

LOG = logging.getLogger(__name__)


class ValidationSet(torch.utils.data.Dataset):
    """Full-image validation pairs; ``ds[i]`` is ``(name, lr, hr)``.

    hr: ``(3, H, W)`` float32 in [0,1], H and W multiples of ``scale``; lr:
    ``(3, H/scale, W/scale)`` float32: the given ``lr_images`` (uint8 ``(H/scale, W/scale, 3)``,
    one per image) divided by 255, else the bicubic of hr (8-bit levels if ``quantize``), made
    on first access and cached. ``skipped`` names the images that could not be used.
    Images differ in size: iterate one at a time (batch size 1).
    """

    def __init__(self, names: Sequence[str], images: Sequence[np.ndarray], scale: int, quantize: bool = True,
                 skipped: Sequence[str] = (), lr_images: Optional[Sequence[np.ndarray]] = None):
        self.scale = check_int("scale", scale)
        self.quantize = quantize
        self.names = list(names)
        self.skipped = list(skipped)
        # uint8 HR: a quarter of the memory of float, converted per access
        self._hr = [torch.from_numpy(np.ascontiguousarray(mod_crop(im, scale).transpose(2, 0, 1))) for im in images]
        self.paired = lr_images is not None
        self._lr: dict[int, torch.Tensor] = {}
        if lr_images is not None:
            if len(lr_images) != len(self._hr):
                raise ValueError(f"{len(lr_images)} LR images for {len(self._hr)} HR images")
            for i, (name, lr, hr) in enumerate(zip(self.names, lr_images, self._hr)):
                if (error := pair_size_error(f"LR of {name}", lr.shape[:2], name, hr.shape[1:], scale)) is not None:
                    raise ValueError(error)
                self._lr[i] = torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1))).float().div_(255.0)

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


def _paired_lr_images(lr_source: str, names: Sequence[str], images: Sequence[np.ndarray], scale: int,
                      skipped: list[str]) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """The LR image of each validation image from the folder ``lr_source``, paired by
    :func:`raysr.data.pairing.pairing_key`. ValueError naming the images without an LR file and any LR file whose size
    is not GTmod ÷ scale; an unreadable LR file skips its pair with a warning."""
    what = f"data.val_lr {lr_source}"
    files, _ = list_images(lr_source)
    if not files:
        raise ValueError(f"{what} holds no images (.png, .jpg, .webp, ...); point it at the LR images of data.val")
    index = index_by_key(files, lr_source, scale, what)
    missing = [n for n in names if pairing_key(n, scale) not in index]
    if missing:
        raise ValueError(f"{what}: no LR image for {missing[:5]}{' ...' if len(missing) > 5 else ''} (paired by name: "
                         f"expected e.g. {missing[0]}.png or {missing[0]}x{scale}.png)")
    kept_names, kept_hr, lr_images = [], [], []
    for name, hr in zip(names, images):
        path = index[pairing_key(name, scale)]
        try:
            lr = decode_rgb(storage.read_bytes(path), path)
        except DECODE_ERRORS as err:
            if isinstance(err, StorageError):
                raise
            LOG.warning("validation: skipped %s: its LR %s is unreadable: %s", name, path, err)
            skipped.append(name)
            continue
        gtmod = mod_crop(hr, scale).shape[:2]
        if (error := pair_size_error(path, lr.shape[:2], name, gtmod, scale)) is not None:
            raise ValueError(f"{what}: {error}; is model.generator.scale right, and is this the LR of that image?")
        kept_names.append(name)
        kept_hr.append(hr)
        lr_images.append(lr)
    return kept_names, kept_hr, lr_images


def load_validation(source, scale: int, *, quantize: bool = True, lr_source: Optional[str] = None) -> ValidationSet:
    """Read every image of ``source`` into a :class:`ValidationSet`.

    source: a folder or s3:// prefix of HR images (names: paths relative to it,
    without extension, sorted), or shards (URL list, pattern, directory with a
    manifest, manifest; names: sample keys, in shard order). lr_source: a folder
    or s3:// prefix of the matching LR images (``data.val_lr``), paired by name
    (:func:`raysr.data.pairing.pairing_key`), each exactly GTmod ÷ scale; None makes LR by bicubic.
    Raises ValueError when no usable image is found or a pair does not fit,
    StorageError when a source is missing.
    """
    scale = check_int("scale", scale)
    if _is_shard_source(source):
        names, images, skipped = _shard_images(source, scale)
    else:
        names, images, skipped = _folder_images(source, scale)
    lr_images = None
    if lr_source is not None and names:
        names, images, lr_images = _paired_lr_images(lr_source, names, images, scale, skipped)
    if not names:
        raise ValueError(f"no usable validation image in {source} (skipped: {skipped or 'none'})")
    return ValidationSet(names, images, scale, quantize, skipped, lr_images)
