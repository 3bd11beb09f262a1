"""What raysr reads from a WebDataset tar: members -> samples -> one HR image each.

Any WebDataset shard trains, whichever tool wrote it (``make_shards``,
``webdataset.ShardWriter``, ``tar`` by hand):

* Members group into samples as WebDataset groups them
  (``webdataset.tariterators.base_plus_ext``): the key runs to the FIRST dot after
  the last ``/``, the rest is the extension, lowercased — ``a/b.c.jpg`` is key
  ``a/b``, extension ``c.jpg`` — and consecutive members with one key make one
  sample. Members WebDataset skips are skipped (no dot in the base name,
  ``__meta__`` files), and so are hidden files (``.DS_Store``, macOS ``._`` forks).
* A sample's image is its first member that holds pixels: one whose LAST extension
  is a format the decoder reads (:data:`raysr.images.IMAGE_EXTENSIONS`: png,
  jpg/jpeg, webp, bmp, tif/tiff, ppm, ...; ``c.jpg`` is a JPEG), or a uint8 image
  array, ``.npy`` or ``.npy.lz4`` (:mod:`raysr.data.npy`), read with no decode.
  Other members (``json``, ``cls``, ``txt``) are ignored.
* A paired sample (``data.degradation: paired``) holds an LR and an HR image of one scene:
  ``KEY.lr.png`` + ``KEY.hr.png`` (the extension's first part names the role; BasicSR's
  ``lq``/``gt`` are accepted too, and any of the formats above: ``KEY.lq.npy`` + ``KEY.gt.npy``),
  the LR exactly the HR cut to a multiple of the scale ÷ scale (:mod:`raysr.data.pairing`).
  :func:`decode_pair` reads one. Where a sample has an ``hr``/``gt`` member, that member is its
  image for HR-only training too, so paired shards also train with ``bicubic`` or ``realesrgan``.

:func:`check_train_shards` looks at the first shard before training starts, so
shards with no usable image fail in seconds with one message, not inside every
Ray worker.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from collections import Counter
from typing import Iterator

import numpy as np

from raysr import storage
from raysr.data.decode import DECODE_ERRORS, decode_member, is_pixel_member
from raysr.data.npy import NPY_EXTENSIONS
from raysr.data.pairing import mod_crop, pair_size_error
from raysr.data.sources import as_shard_list
from raysr.images import IMAGE_EXTENSIONS
from raysr.util import check_int

# Exceptions that mean "this tar is damaged" (not "the store is unreachable").
TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)
# WebDataset's member-name split and metadata filter (webdataset.tariterators).
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
# Damaged shards check_train_shards reads past before it calls the shards unreadable.
CHECK_DAMAGED_SHARDS = 3
# The roles of a paired sample's members, the first part of their extension (KEY.lr.png, KEY.gt.npy):
# raysr's names and BasicSR's
LR_ROLES, HR_ROLES = ("lr", "lq"), ("hr", "gt")
HOW_TO_MAKE = ("raysr trains on WebDataset tars with one image member per sample ("
               + ", ".join([ext[1:] for ext in IMAGE_EXTENSIONS] + list(NPY_EXTENSIONS))
               + "; other members such as json are ignored); "
               "make them from a folder of HR images with python -m raysr.data.make_shards --input DIR "
               "--output DIR_OR_S3_PREFIX")
HOW_TO_MAKE_PAIRED = ("data.degradation=paired trains on WebDataset tars whose samples hold an LR and an HR image, "
                      "KEY.lr.png + KEY.hr.png (or BasicSR's KEY.lq.* + KEY.gt.*; png, jpg, webp, npy, ...), the LR "
                      "exactly the HR (cut to a multiple of model.generator.scale) / scale; make them with python -m raysr.data.make_shards "
                      "--input HR_DIR --lr-input LR_DIR --scale S --output DIR_OR_S3_PREFIX")


class DamagedTar(ValueError):
    """A tar that cannot be read past some point (garbage, truncated, bad compression)."""


def split_member_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member as WebDataset splits it, or None for a member it skips.

    ``"a/b.c.JPG"`` -> ``("a/b", "c.jpg")``; None for ``"a/README"`` (no dot),
    ``"__index__"``-style metadata and hidden files (``"x/.DS_Store"``, ``"._a.jpg"``).
    """
    base = name.rsplit("/", 1)[-1]
    if base.startswith(".") or _META.match(name) or ("/" not in name and name.startswith("__")
                                                     and name.endswith("__")):
        return None
    match = _KEY_AND_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def tar_samples(stream) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of each sample of a tar stream, in tar order.

    Raises DamagedTar where the tar breaks, after yielding every member read whole;
    StorageError if the stream itself fails (see :func:`raysr.storage.open_stream`).
    """
    key, files = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                split = split_member_name(info.name) if info.isfile() else None
                if split is None:
                    continue
                if split[0] != key and files:
                    yield key, files
                    files = {}
                key = split[0]
                files[split[1]] = tar.extractfile(info).read()
    except storage.StorageError:
        raise
    except TAR_ERRORS as err:
        if files:  # every member read whole is intact
            yield key, files
        raise DamagedTar(f"{type(err).__name__}: {err}") from err
    if files:
        yield key, files


def member_role(ext: str) -> str | None:
    """``"lr"`` or ``"hr"`` for a paired sample's pixel member (``lr.png``, ``lq.npy``, ``gt.jpg``, ...), else None."""
    role, _, rest = ext.partition(".")
    if not rest or not is_pixel_member(rest):
        return None
    return "lr" if role in LR_ROLES else "hr" if role in HR_ROLES else None


def image_member(files: dict[str, bytes], role: str = "hr") -> str | None:
    """The extension of the sample's ``role`` image, else None. ``"hr"``: its ``hr``/``gt`` member, else its
    first member that is an image or a .npy/.npy.lz4 array and not an ``lr``/``lq`` one; ``"lr"``: its
    ``lr``/``lq`` member."""
    pixels = [ext for ext in files if is_pixel_member(ext)]
    roles = {ext: member_role(ext) for ext in pixels}
    named = next((ext for ext in pixels if roles[ext] == role), None)
    if named is not None or role == "lr":
        return named
    return next((ext for ext in pixels if roles[ext] is None), None)


def _decode_role(key: str, files: dict[str, bytes], role: str) -> tuple[np.ndarray | None, str]:
    """The sample's ``role`` image (see :func:`image_member`) as ``((H,W,3) uint8 RGB, "")``, or ``(None, why not)``."""
    ext = image_member(files, role)
    if ext is None:
        what = "image member" if role == "hr" else "LR member (KEY.lr.* or KEY.lq.*)"
        return None, f"no {what} (has {', '.join(sorted(files)) or 'nothing'})"
    try:
        return decode_member(ext, files[ext], key), ""
    except DECODE_ERRORS as err:
        return None, f"undecodable .{ext} ({type(err).__name__}: {err})"


def decode_sample(key: str, files: dict[str, bytes], min_size: int) -> tuple[np.ndarray | None, str]:
    """``((H,W,3) uint8 RGB, "")``, or ``(None, why the sample is unusable)``."""
    image, problem = _decode_role(key, files, "hr")
    if image is not None and min(image.shape[:2]) < min_size:
        return None, f"{image.shape[1]}x{image.shape[0]} image is smaller than gt_size={min_size}"
    return image, problem


def decode_pair(key: str, files: dict[str, bytes], min_size: int,
                scale: int) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """``((lr (h,w,3), hr (h*scale, w*scale, 3)) uint8 RGB, "")`` of a paired sample, or ``(None, why it is
    unusable)``: an LR or HR member missing or undecodable, an LR that is not the HR cut to a multiple
    of ``scale`` ÷ ``scale`` (the HR comes back so cut), or an HR smaller than ``min_size`` (gt_size)."""
    hr, problem = decode_sample(key, files, min_size)
    if hr is None:
        return None, problem
    lr, problem = _decode_role(key, files, "lr")
    if lr is None:
        return None, problem
    hr = mod_crop(hr, scale)
    error = pair_size_error(f"member {image_member(files, 'lr')}", lr.shape[:2],
                            f"member {image_member(files, 'hr')}", hr.shape[:2], scale)
    if error is not None:
        return None, f"{error} (is model.generator.scale={scale} right?)"
    return (lr, hr), ""


def sample_decoder(min_size: int, paired_scale: int | None = None):
    """``decode(key, files) -> (pixels or None, why not)``: :func:`decode_sample` (an HR image), or with
    ``paired_scale`` :func:`decode_pair` (an ``(lr, hr)`` pair at that scale)."""
    if paired_scale is None:
        return lambda key, files: decode_sample(key, files, min_size)
    return lambda key, files: decode_pair(key, files, min_size, paired_scale)


def check_train_shards(shards, min_size: int = 1, paired_scale: int | None = None) -> None:
    """Raise ValueError unless the first shard holds an image raysr can train on.

    shards: anything :func:`raysr.data.resolve_shards` accepts, or a ShardList.
    Reads the first shard up to its first sample with a decodable image of at
    least ``min_size`` px a side (``gt_size``) — with ``paired_scale`` (``data.degradation:
    paired``), a sample whose LR and HR images pair at that scale (:func:`decode_pair`) —, so
    it costs one small read for good data. A shard that is not a readable tar is passed over,
    as training passes over it, up to :data:`CHECK_DAMAGED_SHARDS` of them. The message names
    the shard, the members it found, the first sample's problem and how to make shards raysr
    reads. Raises StorageError if the shard is missing or denied.
    """
    min_size = check_int("min_size", min_size)
    decode = sample_decoder(min_size, None if paired_scale is None else check_int("paired_scale", paired_scale))
    how_to_make = HOW_TO_MAKE if paired_scale is None else HOW_TO_MAKE_PAIRED
    shard_list = as_shard_list(shards)
    damaged = []
    for url in shard_list.urls[:CHECK_DAMAGED_SHARDS + 1]:
        members, samples, first_problem = Counter(), 0, ""
        stream = storage.open_stream(url)
        try:
            for key, files in tar_samples(stream):
                image, problem = decode(key, files)
                if image is not None:
                    return
                samples += 1
                members.update(files.keys())
                first_problem = first_problem or f"{key}: {problem}"
        except DamagedTar as err:
            if not samples:
                damaged.append(f"{url} ({err})")
                continue
            first_problem += f"; then the tar breaks ({err})"
        finally:
            stream.close()
        found = ", ".join(f"{n} x .{ext}" for ext, n in sorted(members.items())) or "no members"
        raise ValueError(f"shard {url} holds no {'image' if paired_scale is None else 'LR/HR pair'} raysr can train "
                         f"on: {samples} samples with {found} "
                         f"(first: {first_problem}); {how_to_make}")
    raise ValueError(f"none of the {len(damaged)} shards checked is a readable tar file: {'; '.join(damaged)}; "
                     f"{how_to_make}")
