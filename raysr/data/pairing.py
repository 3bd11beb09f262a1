"""LR/HR pairs: the one rule that pairs an LR file with its HR (GT) file, and the size they must have.

An LR image pairs with the HR image whose name (path relative to its folder, extension dropped)
is the same once the usual benchmark decorations for the scale are removed (:func:`pairing_key`:
``baby``, ``babyx4``, ``baby_x4`` and ``baby_LRBI_x4`` all pair with ``baby``), and must be
exactly the HR cut to a multiple of the scale ("GTmod", BasicSR's ``mod_crop``) ÷ scale
(:func:`pair_size_error`). Validation (``data.val_lr``), ``raysr.evaluate --lr`` and
``make_shards --lr-input`` pair by this rule; the training loader checks each paired sample's
sizes with it (``data.degradation: paired``).
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from raysr.images import relative_path
from raysr.util import check_int


def mod_crop(image: np.ndarray, scale: int) -> np.ndarray:
    """``(H, W, C)`` array cut to ``(H - H % scale, W - W % scale, C)`` (top-left kept)."""
    scale = check_int("scale", scale)
    height, width = image.shape[:2]
    return image[:height - height % scale, :width - width % scale]


def dataset_key(stem: str, scale: int) -> str:
    """The stem with the usual benchmark decorations for ``scale`` removed:
    ``baby_LRBI_x4``, ``baby_HR_x4``, ``baby_x4``, ``babyx4`` and ``baby`` -> ``baby``."""
    return re.sub(rf"(?i)(?:[_-]?(?:LR|HR|GT)(?:BI|BD|DN)?)?(?:[_-]?x{scale})?$", "", stem) or stem


def pairing_key(name: str, scale: int) -> str:
    """What pairs an LR file with its GT: the name (a path relative to its folder, extension dropped)
    with :func:`dataset_key` applied to its last part, so ``sub/baby_x4`` pairs with ``sub/baby``."""
    folder, _, stem = name.rpartition("/")
    return f"{folder}/{dataset_key(stem, scale)}" if folder else dataset_key(stem, scale)


def index_by_key(files: Sequence[str], root: str, scale: int, what: str) -> dict[str, str]:
    """``{pairing key: file}`` for image files below ``root``; ValueError naming ``what`` when two
    files match one key."""
    index: dict[str, str] = {}
    for uri in files:
        key = pairing_key(os.path.splitext(relative_path(str(uri), str(root)))[0], scale)
        if key in index:
            raise ValueError(f"{what}: {index[key]} and {uri} both match image {key!r}; keep one of them")
        index[key] = uri
    return index


def pair_size_error(lr: str, lr_size: tuple[int, int], hr: str, gtmod_size: tuple[int, int], scale: int) -> str | None:
    """The message for an LR image (``lr_size`` = (H, W)) that is not its GTmod (``gtmod_size``) ÷ ``scale``,
    or None when it is."""
    if (lr_size[0] * scale, lr_size[1] * scale) == tuple(gtmod_size):
        return None
    return (f"{lr}: LR is {lr_size[0]}x{lr_size[1]} but GT {hr} cropped to a multiple of {scale} is "
            f"{gtmod_size[0]}x{gtmod_size[1]}, so LR should be {gtmod_size[0] // scale}x{gtmod_size[1] // scale}")
