"""HR shards -> (LR, HR) training pairs, in one process; the loaders run this in each worker.

The stages, each a generator feeding the next:

1. :func:`shard_order` — which shards this consumer (a rank's DataLoader
   worker) reads, in which order. All consumers walk one seeded sequence of
   shard permutations (pass 0, pass 1, ...) and consumer ``g`` of ``T`` takes
   positions ``g, g+T, g+2T, ...``: within a pass every shard is read by exactly
   one consumer, every shard is read equally often over time, and it works for
   any number of shards, ranks and workers.
2. :func:`iter_images` — the pixels of each sample of each shard: a view of a
   ``.npy`` member (no decode), or a decoded image (which members make a sample and
   which one is its image: :mod:`raysr.data.samples`; any WebDataset tar works); for
   ``data.degradation: paired``, the sample's LR and HR images. Bad data never
   stops training: a garbage or truncated tar, an undecodable or non-image
   member, an image smaller than ``gt_size``, or a paired sample without its LR or whose
   LR is not its HR ÷ scale is skipped, counted in
   :class:`DataStats` and logged once per shard. A missing or denied shard
   (404/403) raises :class:`raysr.storage.StorageError` naming it; transient S3
   errors are retried by :func:`raysr.storage.open_stream`.
3. :func:`random_crops` — ``crops_per_image`` random ``gt_size`` crops per image
   (to amortise a decode), gathered in one copy, each with a random flip / rot90
   (one of the 8 symmetries of :mod:`raysr.data.augment`) to apply later; a paired
   sample's LR crop is cut at the HR crop's position ÷ scale and gets the same symmetry.
4. :func:`shuffled` — a seeded shuffle buffer, so crops of one image and of one
   shard spread out.
5. :func:`host_batch` — a batch: symmetries applied, float, and LR = :func:`make_lr`
   (exact MATLAB bicubic, rounded to 8-bit levels) or the paired LR crops here; or, for
   ``data.lr_on: device``, the uint8 crops (with the paired LR crops) and their symmetries,
   which the training device finishes (:meth:`HostBatch.finish`), so loader processes only
   slice and batch.

A stage that needs a per-sample random draw (a new augmentation, a degradation
kernel) is a generator over the stage before it, with the stream's ``rng``, so
the stream stays one pipeline read in data order.

Everything is seeded from ``seed`` and the consumer's position, so a run is
reproducible for a fixed (seed, world_size, num_workers).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Iterator

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from raysr import storage
from raysr.data.augment import NUM_SYMMETRIES, apply_symmetries, symmetric_view
from raysr.data.samples import DamagedTar, sample_decoder, tar_samples
from raysr.data.sources import as_shard_list
from raysr.ops.convert import to_tensor
from raysr.ops.resize import imresize
from raysr.util import check_int

LOG = logging.getLogger(__name__)

# Crops held by the shuffle buffer; 512 crops of 128^2 RGB are 25 MB per worker.
DEFAULT_SHUFFLE_BUFFER = 512


@dataclass
class DataStats:
    """Counters of one stream. ``samples``: images decoded and used; ``crops``:
    HR crops produced; ``skipped``: samples dropped as bad data (for a damaged
    tar: every sample it lost where the manifest gives the shard's size, else
    one); ``bad_shards``: shard reads that hit a damaged tar; ``shards``: shard
    reads started."""

    shards: int = 0
    samples: int = 0
    crops: int = 0
    skipped: int = 0
    bad_shards: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([getattr(self, f.name) for f in fields(self)], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "DataStats":
        return cls(*(int(v) for v in values.tolist()))

    def __add__(self, other: "DataStats") -> "DataStats":
        return DataStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


# --------------------------------------------------------------------------- argument checks


def check_crop_args(gt_size: int, scale: int, crops_per_image: int = 1, shuffle_buffer: int = 0) -> None:
    """Raise ValueError for crop settings that cannot work, naming the fix."""
    check_int("gt_size", gt_size)
    check_int("scale", scale)
    check_int("crops_per_image", crops_per_image)
    check_int("shuffle_buffer", shuffle_buffer, minimum=0)
    if gt_size % scale:
        lower = gt_size - gt_size % scale
        raise ValueError(f"gt_size={gt_size} is not a multiple of scale={scale}: the LR crop would not be "
                         f"whole pixels; use gt_size={lower or scale} or {lower + scale}")


def check_split_args(rank: int, world_size: int, seed: int) -> None:
    check_int("world_size", world_size)
    check_int("rank", rank, minimum=0)
    check_int("seed", seed, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank={rank} must be < world_size={world_size} (ranks are numbered from 0)")


# --------------------------------------------------------------------------- LR


def make_lr(hr: torch.Tensor, scale: int, quantize: bool = True) -> torch.Tensor:
    """LR input from HR: MATLAB bicubic ``imresize(hr, 1/scale)``, optionally on 8-bit levels.

    hr: ``(N,3,H,W)`` or ``(3,H,W)`` float in [0,1] on any device, H and W
    multiples of ``scale``. Returns the same layout with size ``(H/scale, W/scale)``;
    with ``quantize`` (default, like benchmark LR files)
    ``round(clamp(lr, 0, 1) * 255) / 255``, else MATLAB's unclamped float output.
    """
    scale = check_int("scale", scale)
    if not isinstance(hr, torch.Tensor) or hr.ndim not in (3, 4):
        raise ValueError(f"make_lr expects a (N,3,H,W) or (3,H,W) tensor, got "
                         f"{tuple(hr.shape) if isinstance(hr, torch.Tensor) else type(hr).__name__}")
    height, width = hr.shape[-2:]
    if height % scale or width % scale:
        raise ValueError(f"HR size {height}x{width} is not a multiple of scale={scale}; crop it first "
                         "(raysr.data.pairing.mod_crop) so LR pixels align with HR pixels")
    lr = imresize(hr, 1.0 / scale)
    if quantize:
        lr = lr.clamp(0.0, 1.0).mul(255.0).round().div(255.0)
    return lr


# --------------------------------------------------------------------------- shards -> samples


def consumer_id(rank: int, world_size: int) -> tuple[int, int]:
    """``(consumer, num_consumers)`` of this process: rank-major, then DataLoader worker."""
    info = torch.utils.data.get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * num_workers + worker, world_size * num_workers


def shard_order(num_shards: int, seed: int, consumer: int, num_consumers: int,
                resampled: bool) -> Iterator[int]:
    """Indices of the shards consumer ``consumer`` of ``num_consumers`` reads, in order.

    Position ``p`` of the global sequence is shard ``perm_e[p % num_shards]``
    with ``e = p // num_shards`` and ``perm_e`` a permutation seeded by
    ``(seed, e)``; this consumer reads positions ``consumer + k*num_consumers``.
    Not ``resampled``: only pass 0, so the consumers together read every shard
    exactly once. ``resampled``: endless.
    """
    position, perm_pass, perm = consumer, -1, None
    while True:
        pass_index, index = divmod(position, num_shards)
        if pass_index and not resampled:
            return
        if pass_index != perm_pass:
            perm_pass, perm = pass_index, np.random.default_rng([seed, pass_index]).permutation(num_shards)
        yield int(perm[index])
        position += num_consumers


def _report(url: str, skipped: int, total: int | None, first_problem: str, reported: set[str] | None) -> None:
    # once per shard and stream: a resampled stream re-reads the same bad shard every pass
    if reported is not None:
        if url in reported:
            return
        reported.add(url)
    of = f" of {total}" if total is not None else ""
    again = ", not logged again for this shard" if reported is not None else ""
    LOG.warning("shard %s: skipped %d%s samples (first: %s); counted in the loader stats%s",
                url, skipped, of, first_problem, again)


def iter_shard(url: str, min_size: int, stats: DataStats, expected: int | None = None,
               reported: set[str] | None = None, paired_scale: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, (H,W,3) uint8 RGB)`` for every good sample of one shard; with ``paired_scale``,
    ``(key, (lr, hr))`` for every good paired sample (:func:`raysr.data.samples.decode_pair`).

    Bad samples are skipped and counted in ``stats.skipped``; ``expected`` (from
    the manifest) lets a tar cut short at a member boundary count its missing
    samples too. A shard with skipped samples is logged (one warning) unless its
    URL is in ``reported``, the set of shards the calling stream has already
    logged, which it is then added to (None: log every time). Raises
    StorageError if the shard is missing or denied.
    """
    stats.shards += 1
    good, bad, first_problem = 0, 0, ""
    decode = sample_decoder(min_size, paired_scale)
    stream = storage.open_stream(url)
    try:
        for key, files in tar_samples(stream):
            image, problem = decode(key, files)
            if image is None:
                bad += 1
                first_problem = first_problem or f"{key}: {problem}"
                continue
            good += 1
            stats.samples += 1
            yield key, image
    except DamagedTar as err:
        stats.bad_shards += 1
        first_problem = first_problem or f"damaged tar: {err}"
        if expected is None:
            bad += 1  # at least the sample being read when the tar broke is lost
    finally:
        stream.close()
    if expected is not None and good + bad < expected:
        bad = expected - good
        first_problem = first_problem or f"tar ended after {good} samples"
    stats.skipped += bad
    if bad:
        _report(url, bad, expected, first_problem, reported)


def iter_images(shards, *, seed: int = 0, rank: int = 0, world_size: int = 1, resampled: bool = False,
                min_size: int = 1, stats: DataStats | None = None,
                paired_scale: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, (H,W,3) uint8 RGB)`` of this consumer's share of the samples; with ``paired_scale``
    (``data.degradation: paired``), ``(key, (lr, hr))``: the sample's LR and HR images, ``hr``
    cut to ``lr``'s size × ``paired_scale``.

    shards: anything :func:`raysr.data.resolve_shards` accepts, or a ShardList.
    The share is rank ``rank`` of ``world_size``, then this DataLoader worker
    (see :func:`shard_order`). ``resampled=False``: one pass, ending; ``True``:
    endless. Images smaller than ``min_size`` on either side are skipped.
    Raises RuntimeError when every shard was read since the last good sample
    and none had one (an endless stream would otherwise hang).
    """
    check_split_args(rank, world_size, seed)
    shard_list = as_shard_list(shards)
    stats = stats if stats is not None else DataStats()
    consumer, num_consumers = consumer_id(rank, world_size)
    barren: set[int] = set()
    reported: set[str] = set()  # bad shards this stream has logged
    for index in shard_order(len(shard_list), seed, consumer, num_consumers, resampled):
        produced = False
        for sample in iter_shard(shard_list.urls[index], min_size, stats, shard_list.samples[index], reported,
                                 paired_scale):
            produced = True
            yield sample
        barren = set() if produced else barren | {index}
        if len(barren) == len(shard_list):
            unpaired = f", or without an LR image that is HR / {paired_scale}" if paired_scale else ""
            raise RuntimeError(f"none of the {len(shard_list)} shards (e.g. {shard_list.urls[index]}) holds a "
                               f"usable sample: {stats.skipped} skipped so far (undecodable, not an image, "
                               f"smaller than {min_size} px{unpaired}); check the shards with raysr.data.iter_pairs")


# --------------------------------------------------------------------------- samples -> crops


def gather_crops(image: np.ndarray, tops: np.ndarray, lefts: np.ndarray, size: int) -> np.ndarray:
    """``(K, size, size, C)`` copies of the windows of ``image`` (H, W, C) at ``(tops[k], lefts[k])``,
    taken in one gather (one fancy index into a strided window view; no loop over crops)."""
    windows = sliding_window_view(image, (size, size), axis=(0, 1))  # (H-size+1, W-size+1, C, size, size)
    return windows.transpose(0, 1, 3, 4, 2)[tops, lefts]


def random_crops(images: Iterator[tuple[str, np.ndarray]], gt_size: int, crops_per_image: int, augment: bool,
                 rng: np.random.Generator, stats: DataStats,
                 paired_scale: int | None = None) -> Iterator[tuple[np.ndarray, int, np.ndarray | None]]:
    """``(crop, symmetry, lr_crop)``: ``crops_per_image`` random ``(gt_size, gt_size, 3)`` uint8 crops per
    image, each with the flip/rot90 symmetry it is to be shown under (:mod:`raysr.data.augment`) and
    None; with ``paired_scale``, images are ``(lr, hr)`` pairs and ``lr_crop`` is the ``(gt_size/s,
    gt_size/s, 3)`` LR crop under the HR crop (BasicSR's ``paired_random_crop``): positions are drawn on
    the LR grid and × s on the HR, so ``lr_crop`` × s covers exactly ``crop``.

    The crops of one image are drawn and copied together (:func:`gather_crops`): they hold
    no reference to the image. ``augment``: symmetries uniform over the 8; else all 0.
    """
    step = paired_scale or 1  # HR pixels per LR pixel; 1: any HR position (LR is made from the crop)
    for _, image in images:
        lr, hr = image if paired_scale else (None, image)
        height, width = hr.shape[:2]
        tops = rng.integers((height - gt_size) // step + 1, size=crops_per_image) * step
        lefts = rng.integers((width - gt_size) // step + 1, size=crops_per_image) * step
        symmetries = (rng.integers(NUM_SYMMETRIES, size=crops_per_image) if augment
                      else np.zeros(crops_per_image, np.int64))
        crops = gather_crops(hr, tops, lefts, gt_size)
        lr_crops = ([None] * crops_per_image if lr is None
                    else gather_crops(lr, tops // step, lefts // step, gt_size // step))
        stats.crops += crops_per_image
        yield from zip(crops, symmetries.tolist(), lr_crops)


# Shuffle-buffer slots drawn at once (one RNG call per block, not per item).
SHUFFLE_DRAWS = 256


def shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Items in a random order: a buffer of ``size`` where each new item replaces a
    randomly drawn one; the rest comes out shuffled when ``items`` ends."""
    if size <= 1:
        yield from items
        return
    buffer = []
    slots: list[int] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        if not slots:
            slots = rng.integers(size, size=SHUFFLE_DRAWS).tolist()[::-1]
        i = slots.pop()
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def iter_crops(shards, gt_size: int, seed: int = 0, *, crops_per_image: int = 1, augment: bool = True,
               resampled: bool = False, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, rank: int = 0,
               world_size: int = 1, stats: DataStats | None = None,
               paired_scale: int | None = None) -> Iterator[tuple[np.ndarray, int, np.ndarray | None]]:
    """Shuffled random HR crops of this consumer's samples: ``(crop, symmetry, lr_crop)``, crop
    ``(gt_size, gt_size, 3)`` uint8 as stored, symmetry 0..7 to apply (:mod:`raysr.data.augment`),
    lr_crop None, or with ``paired_scale`` the paired sample's LR crop under it (:func:`random_crops`)."""
    check_crop_args(gt_size, paired_scale or 1, crops_per_image, shuffle_buffer)
    check_split_args(rank, world_size, seed)
    stats = stats if stats is not None else DataStats()
    consumer, num_consumers = consumer_id(rank, world_size)
    rng = np.random.default_rng([seed, consumer, num_consumers])
    images = iter_images(shards, seed=seed, rank=rank, world_size=world_size, resampled=resampled,
                         min_size=gt_size, stats=stats, paired_scale=paired_scale)
    crops = random_crops(images, gt_size, crops_per_image, augment, rng, stats, paired_scale)
    yield from shuffled(crops, shuffle_buffer, rng)


def iter_pairs(shards, gt_size: int, scale: int, seed: int = 0, *, crops_per_image: int = 1, augment: bool = True,
               quantize: bool = True, resampled: bool = False, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
               rank: int = 0, world_size: int = 1, stats: DataStats | None = None,
               paired: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(lr, hr)`` training pairs, one at a time, in this process: the way to look at the data.

    lr: ``(3, gt_size/scale, gt_size/scale)``, hr: ``(3, gt_size, gt_size)``,
    float32 in [0,1]; ``lr = make_lr(hr, scale, quantize)``, or with ``paired``
    (``data.degradation: paired``) the sample's own LR crop under the HR crop, under the
    same flip/rot90. shards: URL(s),
    brace pattern, directory or manifest (see :func:`raysr.data.resolve_shards`).
    Default: one pass over all shards (``resampled=False``), random crop
    position and flip/rot90 (``augment``), seeded. ``rank``/``world_size`` (and
    the DataLoader worker, when called inside one) select a disjoint share.
    Pass a :class:`DataStats` as ``stats`` to read samples/skipped counters.
    ``gt_size % scale != 0`` raises ValueError.
    """
    check_crop_args(gt_size, scale, crops_per_image, shuffle_buffer)
    for item in iter_crops(shards, gt_size, seed, crops_per_image=crops_per_image, augment=augment,
                           resampled=resampled, shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size,
                           stats=stats, paired_scale=scale if paired else None):
        batch = host_batch([item], scale, lr_here=True, quantize=quantize)
        yield batch.lr[0], batch.hr[0]


# --------------------------------------------------------------------------- crops -> batches


@dataclass
class HostBatch:
    """One batch as a loader process ships it, in one of two forms.

    Finished (LR made in the loader, ``data.lr_on: loader``): ``hr`` ``(B,3,H,W)`` float32 in
    [0,1] under its symmetries, ``lr`` ``(B,3,H/scale,W/scale)`` on 8-bit levels, ``symmetries``
    None. Raw (``data.lr_on: device``): ``hr`` ``(B,H,W,3)`` uint8 crops as stored, ``symmetries``
    ``(B,)`` int64 still to apply, ``lr`` None (bicubic: a quarter of the bytes to ship, and the
    loader process only sliced and batched) or, paired, the ``(B,H/scale,W/scale,3)`` uint8 LR
    crops, under the same symmetries still to apply. :meth:`finish` turns either into the
    training pair on a device.
    """

    hr: torch.Tensor
    lr: torch.Tensor | None = None
    symmetries: torch.Tensor | None = None

    def float_hr(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(B,3,H,W)`` float32 in [0,1] under the symmetries, on ``device`` (default: where ``hr`` is);
        a raw batch is copied there as uint8 (non-blocking) and finished there."""
        return self._finished(self.hr, device)

    def float_lr(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The LR batch like :meth:`float_hr`: ``(B,3,H/scale,W/scale)`` float32, finished where raw (the
        paired LR crops of ``data.degradation: paired``); None for a raw bicubic batch (LR still to make)."""
        return None if self.lr is None else self._finished(self.lr, device)

    def _finished(self, crops: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
        crops = crops if device is None else crops.to(device, non_blocking=True)
        if self.symmetries is None:
            return crops
        crops = apply_symmetries(crops, self.symmetries)
        return crops.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)

    def finish(self, device: torch.device | str, scale: int, quantize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lr, hr)`` float32 on ``device``: copied there (non-blocking, from pinned memory), and
        what the loader left done there: symmetries, float, LR = :func:`make_lr` (unless paired)."""
        hr = self.float_hr(device)
        lr = self.float_lr(device)
        return (make_lr(hr, scale, quantize) if lr is None else lr), hr


def host_batch(items: list[tuple[np.ndarray, int, np.ndarray | None]], scale: int, lr_here: bool,
               quantize: bool) -> HostBatch:
    """A :class:`HostBatch` of ``(crop, symmetry, lr_crop)`` items (:func:`random_crops`): finished when
    ``lr_here`` (LR = the paired LR crops under their symmetries, or made from the HR), else raw."""
    paired = items[0][2] is not None
    if lr_here:
        hr = to_tensor([symmetric_view(crop, symmetry) for crop, symmetry, _ in items])
        lr = (to_tensor([symmetric_view(lr_crop, symmetry) for _, symmetry, lr_crop in items]) if paired
              else make_lr(hr, scale, quantize))
        return HostBatch(hr=hr, lr=lr)
    crops = torch.from_numpy(np.stack([crop for crop, _, _ in items]))
    lr_crops = torch.from_numpy(np.stack([lr_crop for _, _, lr_crop in items])) if paired else None
    return HostBatch(hr=crops, lr=lr_crops,
                     symmetries=torch.tensor([symmetry for _, symmetry, _ in items], dtype=torch.int64))


def iter_batches(shards, gt_size: int, scale: int, batch_size: int, seed: int = 0, *, lr_here: bool = True,
                 quantize: bool = True, skip: int = 0, paired: bool = False, **crop_args) -> Iterator[HostBatch]:
    """Batches (:class:`HostBatch`) of ``batch_size`` crops: finished, LR made here (``lr_here``), or raw
    for the device to finish (``batch.finish(device, scale)``). Other arguments as
    :func:`iter_pairs`; a final partial batch of a finite stream is dropped. ``skip``: the first
    ``skip`` batches are drawn (decoded, cropped, shuffled: every RNG draw made) but not built or
    yielded, so a resumed stream continues where one that yielded them would (:func:`skip_batches`)."""
    check_crop_args(gt_size, scale)
    batch_size = check_int("batch_size", batch_size)
    crops = iter_crops(shards, gt_size, seed, paired_scale=scale if paired else None, **crop_args)
    for batch in skip_batches(crops, batch_size, skip):
        yield host_batch(batch, scale, lr_here, quantize)


def skip_batches(items: Iterator, batch_size: int, skip: int) -> Iterator[list]:
    """Lists of ``batch_size`` consecutive ``items``, the first ``skip`` of them drawn and dropped
    unbuilt (a resume's fast-forward: the drawing sets the stream's RNG and shuffle buffer, the
    building — LR, float conversion — is the cost it saves); a final partial list is dropped."""
    skip = check_int("skip", skip, minimum=0)
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            if skip:
                skip -= 1
            else:
                yield batch
            batch = []
