"""``python -m raysr.data.make_shards``: HR photos -> sub-image WebDataset shards + manifest.

    python -m raysr.data.make_shards --input /data/DIV2K_train_HR --output s3://bucket/div2k/hr
    python -m raysr.data.make_shards --input /data/RealSR/HR --lr-input /data/RealSR/LR --scale 4 \
        --output s3://bucket/realsr/x4          # LR/HR pairs, for data.degradation: paired

1. Plan (headers only): every input image is cut into ``crop_size`` sub-images
   as BasicSR's ``extract_subimages``: positions ``0, step, 2*step, ...`` plus one
   crop flush with the far edge when pixels would otherwise be dropped (a
   1680x1050 image gives 6 x 4 = 24 crops at 480/240). A side shorter than the
   crop is kept whole; images shorter than ``min_size`` are skipped.
2. Encode (``--workers`` processes): decode upright RGB (gray, palette, alpha,
   16-bit, EXIF orientation handled by :mod:`raysr.data.decode`), crop, encode
   (lossless PNG by default; ``--format npy`` stores the raw pixels, which the
   loaders read with no decode, see :mod:`raysr.data.npy`). Sample ``KEY.png``
   (``KEY.npy``, ...) + ``KEY.json`` (source file, crop box); keys have no dots,
   e.g. ``0001_s001``. The manifest records the format.

   With ``--lr-input DIR --scale S`` (real LR/HR pairs) each HR input is paired with the
   LR file of the same name in DIR (:func:`raysr.data.pairing.pairing_key`: ``0001x4.png``
   pairs with ``0001.png``), which must be exactly the HR cut to a multiple of S ÷ S
   (:func:`raysr.data.pairing.pair_size_error`; the HR is so cut); an HR without its LR, or
   an LR of another size, stops the run before any encoding with a message naming the
   file. The HR is cut into sub-images as above and the LR at the same positions ÷ S
   (``--crop-size`` and ``--step`` multiples of S), as BasicSR's ``extract_subimages`` on
   both folders; each sample is then ``KEY.hr.png`` + ``KEY.lr.png`` + ``KEY.json``
   (:mod:`raysr.data.samples`).
3. Write ``PREFIX/train-000000.tar ...`` in plan order, each at most
   ``--shard-size-mb``, locally or to S3 (multipart upload, sha256 stored as
   object metadata), and ``PREFIX/manifest.parquet`` after every shard.

Shards are deterministic: the same inputs and settings give byte-identical
shards whatever the number of workers. A re-run reuses every shard the
manifest lists whose planned samples are unchanged (source path, size and
mtime, crop box, settings) and whose file still has the recorded sha256, and
encodes only the rest, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import tarfile
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from raysr import storage
from raysr.data.decode import DECODE_ERRORS, decode_rgb, is_image_name
from raysr.data.manifest import ShardEntry, manifest_uri, read_entries, write_manifest
from raysr.data.npy import NPY, NPY_LZ4, encode_npy
from raysr.data.pairing import index_by_key, pair_size_error, pairing_key
from raysr.images import probe_image
from raysr.util import Progress

LOG = logging.getLogger(__name__)

SHARD_NAME = "train-{:06d}.tar"
MIB = 1 << 20
# --format -> (Pillow format or None for an array, member extension)
FORMATS = {"png": ("PNG", "png"), "webp": ("WEBP", "webp"), "jpeg": ("JPEG", "jpg"),
           NPY: (None, NPY), NPY_LZ4: (None, NPY_LZ4)}
LOSSY = ("webp", "jpeg")
DEFAULT_QUALITY = 95
# Fixed tar header fields: the same samples always give byte-identical shards.
TAR_MTIME = 0
TAR_FORMAT = tarfile.GNU_FORMAT  # long member names without PAX records
BLOCK, RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
# Shards are assembled in memory up to this size, then in a temporary file.
SPOOL_BYTES = 64 * MIB
# Shards uploaded concurrently (each up to --shard-size-mb on local disk).
UPLOAD_THREADS = 2


# --------------------------------------------------------------------------- plan


def crop_positions(length: int, crop_size: int, step: int) -> list[int]:
    """Start offsets of sub-images along one side (BasicSR ``extract_subimages``).

    ``0, step, 2*step, ...`` while a crop fits, plus ``length - crop_size`` when
    the last crop would leave pixels uncovered; ``[0]`` when ``length <= crop_size``.
    """
    if length <= crop_size:
        return [0]
    positions = list(range(0, length - crop_size + 1, step))
    if positions[-1] + crop_size < length:
        positions.append(length - crop_size)
    return positions


def crop_boxes(width: int, height: int, crop_size: int, step: int) -> list[tuple[int, int, int, int]]:
    """``(left, top, right, bottom)`` sub-image boxes, row by row; sides shorter than
    ``crop_size`` are taken whole."""
    return [(x, y, min(x + crop_size, width), min(y + crop_size, height))
            for y in crop_positions(height, crop_size, step)
            for x in crop_positions(width, crop_size, step)]


@dataclass(frozen=True)
class SourceImage:
    """One input image and the sub-images planned from it."""

    path: str
    relpath: str
    width: int  # upright (after EXIF orientation); paired: cut to a multiple of the scale
    height: int
    fingerprint: str  # file size and mtime (paired: the LR file's too): a changed file re-plans its shards
    keys: tuple[str, ...]
    boxes: tuple[tuple[int, int, int, int], ...]  # HR pixels; the LR box is each ÷ scale
    lr_path: str | None = None  # paired (--lr-input): the LR file
    scale: int = 1


def find_inputs(inputs: Sequence[str]) -> list[tuple[str, str]]:
    """``(path, relpath)`` of every image named by directories (recursive), globs or files.

    relpath is relative to the directory or to the glob's fixed leading part;
    files keep their base name. Hidden files are ignored. Order: inputs as
    given, each sorted; duplicates dropped.
    """
    found: dict[str, str] = {}
    for item in inputs:
        if storage.is_s3(item):
            raise ValueError(f"--input {item}: inputs must be local images; copy them here first "
                             "(e.g. aws s3 sync) and write the shards to S3 with --output")
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            root, paths = item, [str(p) for p in Path(item).rglob("*")]
        elif glob.has_magic(item):
            fixed = item[:min(item.find(c) for c in "*?[" if c in item)]
            root = fixed if fixed.endswith(os.sep) else os.path.dirname(fixed)
            paths = glob.glob(item, recursive=True)
        elif os.path.isfile(item):
            root, paths = os.path.dirname(item), [item]
        else:
            raise ValueError(f"--input {item} does not exist; give a directory, a glob such as "
                             "'/data/*.png' (quoted) or image files")
        for path in sorted(paths):
            relpath = os.path.relpath(path, root or ".")
            if (os.path.isfile(path) and is_image_name(path)
                    and not any(part.startswith(".") for part in Path(relpath).parts)):
                found.setdefault(os.path.abspath(path), relpath)
    return list(found.items())


def _fingerprint(path: str) -> str:
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def index_lr_input(lr_input: str, scale: int) -> dict[str, str]:
    """``{pairing key: LR file}`` of the images below the local folder ``lr_input``
    (:func:`raysr.data.pairing.index_by_key`). Raises ValueError for a folder that is not local or holds no image."""
    what = f"--lr-input {lr_input}"
    root = os.path.abspath(os.path.expanduser(lr_input))
    if storage.is_s3(lr_input) or not os.path.isdir(root):
        raise ValueError(f"{what}: not a local directory; give the folder of the LR images of --input "
                         "(copy them here first, as the HR images)")
    files = [path for path, _ in find_inputs([root])]
    if not files:
        raise ValueError(f"{what} holds no images (.png, .jpg, .webp, ...); give the folder of the LR images")
    return index_by_key(files, root, scale, what)


def _listed(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def _key_base(relpath: str) -> str:
    # WebDataset splits member names at the first dot, so keys must not contain any
    return re.sub(r"[^0-9A-Za-z_-]+", "_", os.path.splitext(relpath)[0]).strip("_") or "image"


def plan_images(inputs: Sequence[str], crop_size: int, step: int, min_size: int, lr_input: str | None = None,
                scale: int = 1) -> tuple[list[SourceImage], list[tuple[str, str]]]:
    """``(images, skipped)``: the sub-image plan, reading image headers only, and
    ``(path, reason)`` for inputs that are not usable images or are too small.

    With ``lr_input`` each image is paired with its LR file there (:func:`index_lr_input`), planned
    on the HR cut to a multiple of ``scale``; ValueError naming every HR image without an LR file
    and every LR file that is not its HR ÷ ``scale``. An unreadable LR file skips its pair."""
    images, skipped, bases = [], [], {}
    lr_index = index_lr_input(lr_input, scale) if lr_input is not None else None
    missing, wrong, paired_keys = [], [], set()
    for path, relpath in find_inputs(inputs):
        key = pairing_key(Path(os.path.splitext(relpath)[0]).as_posix(), scale)
        paired_keys.add(key)  # an LR file of a skipped HR image is not an unpaired one
        try:
            info = probe_image(path)
        except DECODE_ERRORS as err:
            skipped.append((path, f"not a readable image ({err})"))
            continue
        if min(info.width, info.height) < min_size:
            skipped.append((path, f"{info.width}x{info.height} is smaller than --min-size {min_size}"))
            continue
        width, height, fingerprint, lr_path = info.width, info.height, _fingerprint(path), None
        if lr_index is not None:
            lr_path = lr_index.get(key)
            if lr_path is None:
                missing.append(path)
                continue
            try:
                lr_info = probe_image(lr_path)
            except DECODE_ERRORS as err:
                skipped.append((path, f"its LR {lr_path} is not a readable image ({err})"))
                continue
            width, height = width - width % scale, height - height % scale  # GTmod: what the LR was made from
            error = pair_size_error(lr_path, (lr_info.height, lr_info.width), path, (height, width), scale)
            if error is not None:
                wrong.append(error)
                continue
            fingerprint += f"|{_fingerprint(lr_path)}"
        base = _key_base(relpath)
        if base in bases:  # "a_b/c.png" and "a/b_c.png" sanitise alike
            base = f"{base}_{hashlib.sha1(relpath.encode()).hexdigest()[:8]}"
        bases[base] = path
        boxes = crop_boxes(width, height, crop_size, step)
        images.append(SourceImage(path=path, relpath=relpath, width=width, height=height, fingerprint=fingerprint,
                                  keys=tuple(f"{base}_s{i:03d}" for i in range(1, len(boxes) + 1)),
                                  boxes=tuple(boxes), lr_path=lr_path, scale=scale))
    if missing:
        raise ValueError(f"--lr-input {lr_input}: no LR image for {len(missing)} HR image(s) of --input: "
                         f"{_listed(missing)}; LR files pair with HR files by name (0001.png, 0001x{scale}.png "
                         f"and 0001_x{scale}.png pair with 0001.png; subfolders mirror --input's)")
    if wrong:
        raise ValueError(f"--lr-input {lr_input}: {len(wrong)} LR image(s) are not their HR / --scale {scale}: "
                         f"{'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}; is --scale right, and are "
                         "these the LR images of --input?")
    unused = sorted(set(lr_index or {}) - paired_keys)
    if unused:  # e.g. --input names a few of the HR files on purpose
        LOG.warning("--lr-input %s: %d LR images pair with no HR image of --input and are left out (e.g. %s)",
                    lr_input, len(unused), lr_index[unused[0]])
    return images, skipped


# --------------------------------------------------------------------------- encode (worker processes)


@dataclass(frozen=True)
class EncodeSettings:
    fmt: str = "png"
    quality: int | None = None

    def encode(self, pixels: np.ndarray) -> bytes:
        """The member bytes of ``(H, W, 3)`` uint8 ``pixels``."""
        if self.fmt in (NPY, NPY_LZ4):
            return encode_npy(pixels, compressed=self.fmt == NPY_LZ4)
        pil_format, options = self.save_args()
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buf, pil_format, **options)
        return buf.getvalue()

    def save_args(self) -> tuple[str, dict]:
        pil_format = FORMATS[self.fmt][0]
        if self.fmt == "png":
            return pil_format, {}
        if self.fmt == "webp":
            # lossy WebP always halves chroma resolution, so it is lossless unless a quality is asked for
            return pil_format, {"lossless": True} if self.quality is None else {"quality": self.quality}
        # 4:4:4 chroma: subsampled chroma would blur the very detail SR learns from
        return pil_format, {"quality": DEFAULT_QUALITY if self.quality is None else self.quality, "subsampling": 0}


def _decode_planned(path: str, height: int, width: int, cut: int = 1) -> np.ndarray:
    """``(height, width, 3)`` uint8 RGB of ``path``: the planned size, of which the image may be larger by less
    than ``cut`` px a side (a paired HR, cut to a multiple of the scale ``cut``); ValueError if it no
    longer has the planned size."""
    pixels = decode_rgb(Path(path).read_bytes(), path)
    if not (0 <= pixels.shape[0] - height < cut and 0 <= pixels.shape[1] - width < cut):
        raise ValueError(f"{path} decodes to {pixels.shape[1]}x{pixels.shape[0]}, planned {width}x{height}; "
                         "was it changed during the run?")
    return pixels[:height, :width]


def encode_image(image: SourceImage, settings: EncodeSettings) -> list[tuple[str, tuple[tuple[str, bytes], ...]]]:
    """``(key, members)`` for each planned sub-image of ``image``: members ``(extension, bytes)``, the
    image (``png``, ...) and ``json``; paired (``image.lr_path``), ``hr.png``, ``lr.png`` (the LR box is
    the HR box ÷ scale) and ``json``.

    Raises one of DECODE_ERRORS if a file cannot be decoded, ValueError if it
    no longer has the planned size.
    """
    ext = FORMATS[settings.fmt][1]
    scale = image.scale
    pixels = _decode_planned(image.path, image.height, image.width, cut=scale)
    lr = None if image.lr_path is None else _decode_planned(image.lr_path, image.height // scale, image.width // scale)
    out = []
    for key, (left, top, right, bottom) in zip(image.keys, image.boxes):
        meta = {"source": image.relpath, "box": [left, top, right, bottom], "source_size": [image.width, image.height]}
        hr_bytes = settings.encode(pixels[top:bottom, left:right])
        if lr is None:
            members = ((ext, hr_bytes),)
        else:
            meta.update(lr_source=image.lr_path, scale=scale)
            lr_bytes = settings.encode(lr[top // scale:bottom // scale, left // scale:right // scale])
            members = ((f"hr.{ext}", hr_bytes), (f"lr.{ext}", lr_bytes))
        out.append((key, members + (("json", json.dumps(meta, sort_keys=True).encode()),)))
    return out


def _encode_job(image: SourceImage, settings: EncodeSettings):
    # worker entry point: errors come back as text so one bad file cannot stop the pool
    try:
        return encode_image(image, settings), ""
    except DECODE_ERRORS as err:
        return None, f"{type(err).__name__}: {err}"


class _Ready:
    """An already computed result, with the ``get()`` of a pool's AsyncResult."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def _start_method() -> str:
    """``fork`` while this process has one thread (the command line: the pool is made before any upload
    thread), else ``forkserver``: a child forked beside running threads (a Ray driver's, a test server's)
    can inherit a lock one of them held and hang for good, even past the pool's terminate()."""
    return "fork" if threading.active_count() == 1 else "forkserver"


class _Encoder:
    """Encoded sub-images per image, computed ahead in a process pool (or inline),
    held until :meth:`release` (a shard boundary may fall inside an image)."""

    def __init__(self, images: list[SourceImage], settings: EncodeSettings, workers: int, ahead: list[int]):
        self.images, self.settings = images, settings
        self.pool = multiprocessing.get_context(_start_method()).Pool(workers) if workers > 1 else None
        self.window = 2 * workers
        self.ahead, self.next = ahead, 0
        self.pending: dict[int, object] = {}

    def _submit(self, index: int) -> None:
        job = (self.images[index], self.settings)
        self.pending[index] = self.pool.apply_async(_encode_job, job) if self.pool else _Ready(_encode_job(*job))

    def get(self, index: int) -> tuple[list | None, str]:
        """Encoded sub-images of image ``index`` (or None and why it failed)."""
        if index not in self.pending:
            self._submit(index)
        while self.pool is not None and self.next < len(self.ahead) and len(self.pending) < self.window:
            if self.ahead[self.next] > index and self.ahead[self.next] not in self.pending:
                self._submit(self.ahead[self.next])
            self.next += 1
        return self.pending[index].get()

    def release(self, index: int) -> None:
        self.pending.pop(index, None)

    def release_before(self, index: int) -> None:
        """Drop results of images before ``index`` (their last crops went into a reused shard)."""
        for done in [i for i in self.pending if i < index]:
            del self.pending[done]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# --------------------------------------------------------------------------- shards


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


class ShardBuilder:
    """One tar being assembled in memory (spilling to a temporary file), with make_shards' fixed
    headers; :func:`upload_shard` writes it. ``raysr.upscale --output-shards`` writes its shards so too."""

    def __init__(self):
        self.file = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=TAR_FORMAT)
        self.samples = 0

    def size_with(self, *payloads: bytes) -> int:
        """Final tar size if ``payloads`` were added now (headers, padding, end blocks)."""
        end = self.file.tell() + sum(BLOCK + _padded(len(p)) for p in payloads) + 2 * BLOCK
        return -(-end // RECORD) * RECORD

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """One sample: a member ``<key>.<extension>`` per entry of ``members``, in order."""
        for ext, payload in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(payload), TAR_MTIME, 0o644
            self.tar.addfile(info, io.BytesIO(payload))
        self.samples += 1

    def finish(self) -> tuple[int, str]:
        """Close the tar; ``(bytes, sha256 hex)``, file rewound for reading."""
        self.tar.close()
        size = self.file.tell()
        self.file.seek(0)
        digest = _sha256(self.file)
        self.file.seek(0)
        return size, digest


def _sha256(file) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: file.read(MIB), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return _sha256(f)


def shard_is_intact(url: str, nbytes: int, sha256: str) -> bool:
    """True if ``url`` exists with this size and sha256 (S3: the sha256 stored at upload)."""
    info = storage.object_info(url)
    if info is None or info[0] != nbytes:
        return False
    if storage.is_s3(url):
        return info[1].get("sha256") == sha256
    return _sha256_file(url) == sha256


def _old_entries(uri: str) -> list[ShardEntry]:
    """Rows of an existing raysr manifest at ``uri`` ([] if absent or not ours)."""
    if not storage.exists(uri):
        return []
    entries = read_entries(uri)
    if entries is None:
        LOG.warning("%s was not written by make_shards; ignoring it and writing all shards", uri)
        return []
    return entries


# --------------------------------------------------------------------------- driver


@dataclass
class ShardsReport:
    """What a make_shards run did. ``written``/``reused``: shard counts;
    ``skipped``: ``(path, reason)`` of inputs left out."""

    manifest: str
    entries: list[ShardEntry]
    written: int
    reused: int
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(e.samples for e in self.entries)

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.entries)


def _check_settings(crop_size, step, min_size, fmt, quality, shard_size_mb, workers, lr_input, scale) -> None:
    for name, value in (("crop_size", crop_size), ("step", step), ("min_size", min_size), ("workers", workers),
                        ("scale", 1 if scale is None else scale)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if (lr_input is None) != (scale is None):
        raise ValueError("--lr-input DIR (the LR images of --input) and --scale S (HR size / LR size) go together: "
                         + ("give --scale too, e.g. --scale 4" if scale is None else
                            "--scale applies to LR/HR pairs only; give --lr-input or drop --scale (HR-only shards "
                            "serve every scale)"))
    for name, value in (("crop-size", crop_size), ("step", step)):
        if scale is not None and value % scale:
            lower = value - value % scale
            raise ValueError(f"--{name} {value} is not a multiple of --scale {scale}: the LR sub-images are cut at "
                             f"the HR positions / {scale}, which must be whole pixels; use --{name} "
                             f"{lower or scale} or {lower + scale}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if quality is not None and (fmt not in LOSSY or not 1 <= quality <= 100):
        raise ValueError(f"quality={quality!r}: it applies to jpeg and webp only, as 1..100; {fmt} is lossless")
    if fmt == NPY_LZ4:
        import importlib.util
        if importlib.util.find_spec("lz4") is None:
            raise ValueError("format npy.lz4 needs the lz4 package: pip install lz4 "
                             "(or pip install 'raysr[data]'), or use --format npy")
    if not shard_size_mb > 0:
        raise ValueError(f"shard_size_mb must be > 0, got {shard_size_mb!r}")


class _Plan:
    """The planned samples in order: sample ``s`` is crop ``crops[s][1]`` of image ``crops[s][0]``."""

    def __init__(self, images: list[SourceImage], settings: dict):
        self.images = images
        self.crops = [(i, c) for i, image in enumerate(images) for c in range(len(image.keys))]
        self.settings_line = json.dumps(settings, sort_keys=True)

    def __len__(self) -> int:
        return len(self.crops)

    def digest(self, start: int, count: int) -> str:
        """sha256 of samples ``start .. start+count-1``: keys, sources (size, mtime), boxes, settings."""
        digest = hashlib.sha256(self.settings_line.encode())
        for image_index, crop_index in self.crops[start:start + count]:
            image = self.images[image_index]
            digest.update(f"\n{image.keys[crop_index]}\t{image.relpath}\t{image.fingerprint}\t"
                          f"{image.boxes[crop_index]}".encode())
        return digest.hexdigest()

    def reusable(self, entries: list[ShardEntry], output: str) -> dict[int, ShardEntry]:
        """The old manifest rows whose samples are still planned as they were and whose file is intact."""
        return {e.shard: e for e in entries
                if 0 <= e.plan_start < e.plan_start + e.plan_count <= len(self)
                and self.digest(e.plan_start, e.plan_count) == e.plan_sha256
                and e.url == storage.join(output, e.name) and shard_is_intact(e.url, e.bytes, e.sha256)}


class _ShardSink:
    """Uploads finished shards in the background and keeps the manifest current.

    The manifest only ever lists shards that are completely written, so a run
    that dies leaves a manifest the next run can resume from.
    """

    def __init__(self, output: str, settings: dict, report: ShardsReport, progress: Progress):
        self.output, self.settings, self.report, self.progress = output, settings, report, progress
        self.uploads = ThreadPoolExecutor(UPLOAD_THREADS)
        self.in_flight: list[tuple[object, ShardEntry]] = []

    def _done(self, entry: ShardEntry, reused: bool) -> None:
        report = self.report
        report.entries.append(entry)
        if reused:
            report.reused += 1
        else:
            report.written += 1
        self.progress.info = (f"{report.samples} samples | {len(report.entries)} shards ({report.reused} reused) | "
                              f"{report.bytes / MIB:.1f} MiB")

    def reuse(self, entry: ShardEntry) -> None:
        self._done(entry, reused=True)

    def put(self, builder: ShardBuilder, index: int, start: int, count: int, plan: _Plan) -> None:
        nbytes, digest = builder.finish()
        name = SHARD_NAME.format(index)
        entry = ShardEntry(shard=index, name=name, url=storage.join(self.output, name), samples=builder.samples,
                           bytes=nbytes, sha256=digest, plan_start=start, plan_count=count,
                           plan_sha256=plan.digest(start, count))
        if len(self.in_flight) >= UPLOAD_THREADS:  # bound the shards waiting in memory / temp files
            self.in_flight[0][0].result()
        self._collect(block=False)
        self.in_flight.append((self.uploads.submit(upload_shard, entry.url, builder.file, digest), entry))

    def _collect(self, block: bool) -> None:
        done = 0
        try:
            while self.in_flight and (block or self.in_flight[0][0].done()):
                future, entry = self.in_flight.pop(0)
                future.result()
                self._done(entry, reused=False)
                done += 1
        finally:  # also when a later upload failed: the shards before it are complete
            if done:  # a small file next to 256 MB shards: rewriting it each time costs nothing
                write_manifest(self.report.manifest, self.report.entries, self.settings)

    def finish(self) -> None:
        self._collect(block=True)
        write_manifest(self.report.manifest, self.report.entries, self.settings)

    def close(self) -> None:
        self.uploads.shutdown(wait=True)


def _fill(builder: ShardBuilder, plan: _Plan, cursor: int, stop: int, limit: int, encoder: _Encoder,
          report: ShardsReport, progress: Progress) -> int:
    """Add planned samples from ``cursor`` until ``stop`` or the size ``limit``; the next cursor."""
    while cursor < stop:
        image_index, crop_index = plan.crops[cursor]
        image = plan.images[image_index]
        encoded, problem = encoder.get(image_index)
        if encoded is not None:
            key, members = encoded[crop_index]
            if builder.samples and builder.size_with(*(payload for _, payload in members)) > limit:
                break
            builder.add(key, dict(members))
        elif (image.path, problem) not in report.skipped:
            LOG.warning("skipped %s: %s", image.path, problem)
            report.skipped.append((image.path, problem))
        if crop_index == len(image.keys) - 1:
            encoder.release(image_index)
            progress.update(done=image_index + 1)
        cursor += 1
        progress.update()
    return cursor


def check_output(output: str) -> None:
    """Raise :class:`raysr.storage.StorageError` unless shards can be written under ``output``.

    Local: an existing directory, or one that can be created, in which a file
    can be created (permission, read-only file system). S3: the bucket must
    exist (a 403 on the bucket is let through: a policy may allow PutObject but
    not HeadBucket, and the first upload would name a real denial). Run before
    any encoding, so a bad ``--output`` costs seconds, not an encoding pass.
    A full disk can only show while writing; :func:`main` reports that too.
    """
    if storage.is_s3(output):
        _check_bucket(output)
        return
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise storage.StorageError(f"output {output} is an existing file, not a directory; give a directory "
                               "(created if missing) or an s3://bucket/prefix")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise storage.StorageError(f"cannot write shards to output {output}: {err.strerror or err}"
                               f"{f' ({err.filename})' if err.filename and str(err.filename) != output else ''}; "
                               "choose a directory you can write to") from err


def _check_bucket(output: str) -> None:
    bucket, _ = storage.split_s3(output)
    try:
        storage.s3_client().head_bucket(Bucket=bucket)
    except Exception as err:  # botocore raises several unrelated classes
        code = storage.error_code(err)
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise storage.StorageError(f"bucket {bucket!r} of output {output} does not exist (S3 said {code}); "
                                   "create it or fix the URI") from err
        if code not in ("403", "AccessDenied"):
            raise storage.StorageError(f"cannot reach the bucket of output {output}: {err}") from err


def make_shards(inputs: Sequence[str], output: str, *, crop_size: int = 480, step: int = 240, min_size: int = 128,
                fmt: str = "png", quality: int | None = None, shard_size_mb: float = 256.0,
                workers: int | None = None, progress: bool = True, lr_input: str | None = None,
                scale: int | None = None) -> ShardsReport:
    """Cut the images under ``inputs`` into sub-images and write shards + manifest to ``output``.

    inputs: local directories (recursive), globs or image files. output: local
    directory or ``s3://bucket/prefix``. crop_size/step/min_size in pixels;
    fmt ``png`` (lossless), ``npy`` (raw uint8 pixels: no decode when training, ~2.4x the
    bytes of PNG for photos), ``npy.lz4`` (the same LZ4-compressed, 0.6x npy, needs ``lz4``),
    ``webp`` (lossless, or lossy at ``quality``) or ``jpeg`` (``quality`` 1..100, default 95,
    4:4:4 chroma); docs/data.md compares them;
    shard_size_mb: upper bound per shard in MiB (a single larger sample gets a
    shard of its own); workers: encoding processes (default: all cores).
    lr_input, scale: a local folder of the LR images of ``inputs`` and their scale (both or
    neither): LR/HR pair shards, ``KEY.hr.png`` + ``KEY.lr.png`` (:func:`plan_images`; crop_size
    and step multiples of scale).
    Returns a :class:`ShardsReport`. Raises ValueError for bad settings or
    when no usable image is found, :class:`raysr.storage.StorageError` when
    ``output`` cannot be written (checked before encoding, see
    :func:`check_output`), OSError when a write fails later (e.g. disk full;
    finished shards stay in the manifest and a re-run resumes).
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    output = output if storage.is_s3(output) else os.path.abspath(os.path.expanduser(output))
    _check_settings(crop_size, step, min_size, fmt, quality, shard_size_mb, workers, lr_input, scale)
    check_output(output)
    settings = {"crop_size": crop_size, "step": step, "min_size": min_size, "format": fmt, "quality": quality,
                "shard_size_mb": shard_size_mb}
    if lr_input is not None:  # only then: HR-only runs keep the settings (and so reuse the shards) of before
        settings.update(lr_input=os.path.abspath(os.path.expanduser(lr_input)), scale=scale)
    images, skipped = plan_images(inputs, crop_size, step, min_size, lr_input, scale or 1)
    for path, reason in skipped:
        LOG.warning("skipped %s: %s", path, reason)
    plan = _Plan(images, settings)
    if not len(plan):
        raise ValueError(f"no usable images in {list(inputs)} ({len(skipped)} skipped); "
                         f"images need a side of at least --min-size {min_size} px")
    report = ShardsReport(manifest=manifest_uri(output), entries=[], written=0, reused=0,
                          skipped=list(skipped))
    old_entries = _old_entries(report.manifest)
    reusable = plan.reusable(old_entries, output)
    covered = {s for e in reusable.values() for s in range(e.plan_start, e.plan_start + e.plan_count)}
    to_encode = sorted({plan.crops[s][0] for s in range(len(plan)) if s not in covered})

    # on a log file, a line every 10 s is enough
    shown = Progress(len(images), "make_shards", unit="images", enabled=progress, interval=10.0)
    encoder = _Encoder(images, EncodeSettings(fmt, quality), workers, to_encode)
    sink = _ShardSink(output, settings, report, shown)
    limit = int(shard_size_mb * MIB)
    try:
        cursor, index = 0, 0
        while cursor < len(plan):
            if index in reusable and reusable[index].plan_start == cursor:
                sink.reuse(reusable[index])
                cursor += reusable[index].plan_count
                shown.update(done=plan.crops[cursor - 1][0] + 1)
                index += 1
                continue
            # a new shard runs to the size limit, or up to the next reusable shard
            following = reusable.get(index + 1)
            stop = following.plan_start if following is not None and following.plan_start > cursor else len(plan)
            encoder.release_before(plan.crops[cursor][0])
            builder, start = ShardBuilder(), cursor
            cursor = _fill(builder, plan, cursor, stop, limit, encoder, report, shown)
            if builder.samples:  # else every image in the range failed: no shard, same index next
                sink.put(builder, index, start, cursor - start, plan)
                index += 1
        sink.finish()
        shown.update(done=len(images))
    finally:
        encoder.close()
        sink.close()
        shown.finish()  # ends the line on a terminal, also before an error message
    report.entries.sort(key=lambda e: e.shard)
    stale = sorted({e.url for e in old_entries if e.shard >= len(report.entries)})
    if stale:
        LOG.warning("%d shards of the previous run are no longer in the manifest (e.g. %s); readers of the "
                    "manifest ignore them, delete them to save space", len(stale), stale[0])
    return report


def upload_shard(url: str, file, sha256: str) -> None:
    """Write a finished shard's ``file`` (closed after) to ``url`` whole (see :func:`raysr.storage.write_stream`),
    its sha256 stored as S3 object metadata."""
    try:
        storage.write_stream(url, file, metadata={"sha256": sha256})
    finally:
        file.close()


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m raysr.data.make_shards",
                                     description="Cut HR photos into sub-images and write WebDataset tar "
                                                 "shards plus manifest.parquet, locally or to S3.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="DIR_OR_GLOB",
                        help="image directories (recursive), quoted globs or image files")
    parser.add_argument("--output", required=True, metavar="DIR|s3://bucket/prefix",
                        help="where the shards and manifest.parquet go")
    parser.add_argument("--crop-size", type=int, default=480, help="sub-image side in px")
    parser.add_argument("--step", type=int, default=240, help="stride between sub-images in px")
    parser.add_argument("--min-size", type=int, default=128,
                        help="skip images whose shorter side is below this (px); smaller-than-crop images "
                             "at least this size are kept whole")
    parser.add_argument("--format", choices=sorted(FORMATS), default="png",
                        help="sub-image encoding: png (lossless, compact), npy (raw pixels: no decode when "
                             "training, the fastest loader), npy.lz4 (npy compressed with LZ4: 0.6x the "
                             "bytes, most of npy's speed; needs lz4); docs/data.md compares them")
    parser.add_argument("--quality", type=int, default=None,
                        help=f"jpeg quality 1..100 (default {DEFAULT_QUALITY}, 4:4:4 chroma); webp: lossless "
                             "unless a quality is given; not for png")
    parser.add_argument("--lr-input", default=None, metavar="DIR",
                        help="folder of the LR images of --input (real LR/HR pairs, for data.degradation: paired), "
                             "paired by name (0001x4.png with 0001.png); each sample then holds KEY.hr.* + KEY.lr.*, "
                             "the LR cut at the HR's sub-image positions / --scale")
    parser.add_argument("--scale", type=int, default=None,
                        help="with --lr-input: HR size / LR size; each LR must be its HR (cut to a multiple of "
                             "the scale) / scale")
    parser.add_argument("--shard-size-mb", type=float, default=256.0, help="maximum shard size in MiB")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="make_shards: %(message)s")
    try:
        report = make_shards(args.input, args.output, crop_size=args.crop_size, step=args.step,
                             min_size=args.min_size, fmt=args.format, quality=args.quality,
                             shard_size_mb=args.shard_size_mb, workers=args.workers, lr_input=args.lr_input,
                             scale=args.scale)
    except (ValueError, storage.StorageError) as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a write failing midway: disk full, quota, a vanished mount
        where = f": {err.filename}" if err.filename else ""
        print(f"make_shards: error: {err.strerror or err}{where}; the shards listed in the manifest are complete: "
              "fix the problem and re-run the same command to resume from them", file=sys.stderr)
        return 2
    print(f"make_shards: {len(report.entries)} shards ({report.written} written, {report.reused} reused), "
          f"{report.samples} samples, {report.bytes / MIB:.1f} MiB, {len(report.skipped)} inputs skipped; "
          f"manifest {report.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
