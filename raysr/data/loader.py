"""This rank's training batches: a torch DataLoader over the endless shard stream.

Every DataLoader worker runs :func:`raysr.data.stream.iter_batches` on its
share of the shards (rank, then worker) and ships whole batches
(:class:`raysr.data.stream.HostBatch`): with ``lr_on="loader"`` finished, LR made
once per batch (one batched matmul) in the worker; with ``lr_on="device"`` raw, the
uint8 crops and their flip/rot90 symmetries, which the training device finishes
(:class:`raysr.data.device_batches.DeviceBatches`), so the workers only slice and batch.
With ``paired`` (``data.degradation: paired``) the LR is the sample's own, cropped with the
HR and shipped with it (finished or raw alike).

The stream is resampled and never ends, on every rank: each consumer walks an
endless sequence of shard positions (:func:`raysr.data.stream.shard_order`),
so a rank always has a next batch, whatever the number of shards, ranks and
workers, and DDP's all-reduce never waits on a rank that ran out. Training is
counted in steps and needs no dataset size, hence no manifest. An epoch (one
finite ``iter()``) exists only where its length is known, and then it is **the
same on every rank**: ``batches_per_epoch`` as given, else one pass over the
manifest's samples (``samples * crops_per_image // (world_size * batch_size)``,
at least 1); shards no manifest describes give an endless ``iter()``.

Each batch also carries its worker's counters, so :meth:`TrainLoader.stats`
reports samples seen and samples skipped without any shared memory.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from raysr.data.sources import ShardList, as_shard_list
from raysr.data.stream import (DEFAULT_SHUFFLE_BUFFER, DataStats, HostBatch, check_crop_args, check_split_args,
                               iter_batches)
from raysr.util import check_int

LR_ON = ("loader", "device")


def resolve_lr_on(lr_on: str, device: torch.device) -> str:
    """Where LR is made for a config's ``data.lr_on`` when training on ``device``.

    ``auto``: on a GPU the batched bicubic costs it microseconds, while the loader processes'
    cores are busy decoding, so ``device``; on CPU the training process's cores run the step,
    so ``loader``. ``loader`` and ``device`` are returned as given.
    """
    if lr_on == "auto":
        return "device" if torch.device(device).type == "cuda" else "loader"
    if lr_on not in LR_ON:
        raise ValueError(f"lr_on must be one of {('auto',) + LR_ON}, got {lr_on!r}")
    return lr_on


class _BatchStream(IterableDataset):
    """``(lr or empty, hr, symmetries or empty, counters)`` batches of one rank (a HostBatch's
    tensors, so the DataLoader pins and ships them); split further per DataLoader worker.
    With ``degradation`` (a ``raysr.config.DegradationConfig``): ``(kernels, GT regions, empty,
    counters)`` from :func:`raysr.degradation.regions.iter_region_batches` instead. ``consumed``: batches
    of this rank handed out before (a resumed run's), skipped: the stream continues after them."""

    def __init__(self, shard_list: ShardList, gt_size: int, scale: int, batch_size: int, seed: int, rank: int,
                 world_size: int, crops_per_image: int, shuffle_buffer: int, lr_here: bool, quantize: bool,
                 degradation=None, consumed: int = 0, paired: bool = False):
        super().__init__()
        self.shard_list = shard_list
        self.consumed = consumed
        self.degradation = degradation
        self.batch_args = dict(gt_size=gt_size, scale=scale, batch_size=batch_size, seed=seed, lr_here=lr_here,
                               quantize=quantize, crops_per_image=crops_per_image, shuffle_buffer=shuffle_buffer,
                               rank=rank, world_size=world_size, resampled=True, paired=paired)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = torch.tensor([worker_id])
        # The DataLoader hands out its workers' batches round-robin (TrainLoader keeps that order across a
        # restart), so of the rank's first ``consumed`` batches this worker made every num_workers-th: that
        # many it draws again, unbuilt (a resume's fast-forward).
        skip = len(range(worker_id, self.consumed, num_workers))
        stats = DataStats()
        empty = torch.empty(0)
        if self.degradation is not None:  # data.degradation=realesrgan: degraded on the training device
            from raysr.degradation.regions import iter_region_batches
            args = {k: v for k, v in self.batch_args.items()
                    if k not in ("gt_size", "scale", "lr_here", "quantize", "paired")}
            for kernels, regions, _ in iter_region_batches(self.shard_list, opts=self.degradation, stats=stats,
                                                           skip=skip, **args):
                yield kernels, regions, empty, torch.cat([worker, stats.as_tensor()])
            return
        for batch in iter_batches(self.shard_list, stats=stats, skip=skip, **self.batch_args):
            yield (batch.lr if batch.lr is not None else empty, batch.hr,
                   batch.symmetries if batch.symmetries is not None else empty,
                   torch.cat([worker, stats.as_tensor()]))


class TrainLoader:
    """This rank's ``(lr, hr)`` batches: ``batches_per_epoch`` per ``iter()``, or endless when that is None.

    Iterating yields ``(lr, hr)``: hr ``(B,3,H,W)`` float32 in [0,1] and lr
    ``(B,3,H/scale,W/scale)`` on 8-bit levels, on the CPU (pinned when
    ``pin_memory``); with ``lr_on="device"`` lr is None (call :func:`raysr.data.make_lr`
    on the device batch; paired: the shipped LR crops, finished like hr) and hr is finished
    from the shipped uint8 crops in this process;
    :meth:`host_batches` yields the batches as shipped, for the device to finish
    (:meth:`raysr.data.stream.HostBatch.finish`, as DeviceBatches does). Each ``iter()`` continues
    the same endless stream (no worker restart per epoch). ``num_samples``: the
    dataset size from the manifest, None without one. Call :meth:`close` to stop
    the worker processes.
    """

    def __init__(self, dataset: _BatchStream, num_workers: int, batches_per_epoch: int | None,
                 num_samples: int | None, pin_memory: bool, prefetch_factor: int):
        self.batches_per_epoch = batches_per_epoch
        self.num_samples = num_samples
        self.lr_on = "loader" if dataset.batch_args["lr_here"] else "device"
        self.num_workers = num_workers
        # Its own generator: starting the workers draws their base seed from it, not from torch's global
        # RNG, which then stays the training's alone (a resumed run restarts the workers at another step).
        self._loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                  prefetch_factor=prefetch_factor if num_workers else None,
                                  generator=torch.Generator().manual_seed(0))
        self._batches = None
        self.consumed = dataset.consumed  # batches of this rank's stream handed out, a resume's included
        self._early: dict[int, tuple] = {}  # DataLoader worker -> a batch that came before its turn
        self._worker_stats: dict[int, DataStats] = {}

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("this loader is endless: no manifest.parquet gives the dataset size and no "
                            "batches_per_epoch was passed; count steps, or pass batches_per_epoch")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor]]:
        for batch in self.host_batches():
            yield batch.float_lr(), batch.float_hr()

    def host_batches(self) -> Iterator[HostBatch]:
        """The batches as the workers ship them (one epoch, as ``iter()``): finished with
        ``lr_on="loader"``, raw uint8 crops with their symmetries with ``lr_on="device"``."""
        if self._batches is None:  # new workers: they continue the stream after the batches handed out
            self._loader.dataset.consumed = self.consumed
            self._batches = iter(self._loader)
        produced = 0
        while self.batches_per_epoch is None or produced < self.batches_per_epoch:
            lr, hr, symmetries, counters = self._next_in_order()
            self._worker_stats[int(counters[0])] = DataStats.from_tensor(counters[1:])
            produced += 1
            self.consumed += 1
            yield HostBatch(hr=hr, lr=lr if lr.numel() else None, symmetries=symmetries if symmetries.numel() else None)

    def _next_in_order(self) -> tuple[torch.Tensor, ...]:
        """The stream's next batch: the one DataLoader worker ``consumed % num_workers`` makes. The
        DataLoader hands out batches from workers 0, 1, ... from its start, a resumed one's too, so
        a batch that comes before its turn waits here (at most one per worker)."""
        turn = self.consumed % max(self.num_workers, 1)
        while turn not in self._early:
            try:
                batch = next(self._batches)
            except StopIteration:  # the stream is endless; ending means a worker died quietly
                raise RuntimeError("the training data stream ended; see the worker logs above") from None
            self._early[int(batch[3][0])] = batch
        return self._early.pop(turn)

    def position(self) -> dict[str, int]:
        """Where this rank's stream is: ``{"seed", "consumed"}`` (batches handed out so far);
        ``make_train_loader(<the same arguments>, **position)`` continues from there."""
        return {"seed": self._loader.dataset.batch_args["seed"], "consumed": self.consumed}

    def stats(self) -> dict[str, int]:
        """Counters of this rank so far, summed over its workers: ``samples`` (images
        decoded and used), ``crops``, ``skipped`` (bad samples), ``bad_shards``,
        ``shards`` (shard reads). Sum over ranks for the job's totals."""
        return sum(self._worker_stats.values(), DataStats()).as_dict()

    def close(self) -> None:
        """Stop the DataLoader workers; iterating again starts new ones, which continue the stream
        (re-drawing, unbuilt, what was handed out: a cost that grows with it)."""
        batches, self._batches, self._early = self._batches, None, {}
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def epoch_batches(num_samples: int | None, crops_per_image: int, world_size: int, batch_size: int,
                  batches_per_epoch: int | None) -> int | None:
    """Batches per rank per epoch: the given number, else one pass over the manifest's
    samples (``num_samples * crops_per_image // (world_size * batch_size)``, at least 1:
    the resampled stream repeats a dataset smaller than one batch), else None (unknown)."""
    if batches_per_epoch is not None:
        return check_int("batches_per_epoch", batches_per_epoch)
    if num_samples is None:
        return None
    return max(1, num_samples * crops_per_image // (world_size * batch_size))


def make_train_loader(shards, gt_size: int, scale: int, batch_size: int, rank: int = 0, world_size: int = 1,
                      num_workers: int = 4, seed: int = 0, crops_per_image: int = 1,
                      batches_per_epoch: int | None = None, lr_on: str = "loader", *,
                      shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, quantize: bool = True,
                      pin_memory: bool | None = None, prefetch_factor: int = 2, degradation=None,
                      consumed: int = 0, paired: bool = False) -> TrainLoader:
    """The (LR, HR) batches of rank ``rank`` of ``world_size`` (see :class:`TrainLoader`).

    shards: URL(s), brace pattern, directory or manifest (:func:`raysr.data.resolve_shards`).
    gt_size: HR crop side in px (multiple of ``scale``). batch_size: crops per
    batch on this rank. num_workers: DataLoader processes (0 = in this process).
    crops_per_image: crops per decoded image. batches_per_epoch: the length of
    one ``iter()``; default one pass over the manifest's samples (same on every
    rank), endless without a manifest. lr_on: ``"loader"`` (LR made in the
    workers) or ``"device"`` (the workers ship uint8 crops and their flips; iterating
    gives lr None, :meth:`TrainLoader.host_batches` the batches to finish on the device).
    pin_memory: default True when CUDA is available. degradation: a ``raysr.config.DegradationConfig``
    for ``data.degradation=realesrgan``: batches are then ``(kernels (B,3,21,21), GT regions
    (B,3,S,S))`` (in a HostBatch's ``lr`` and ``hr``) for :class:`raysr.degradation.TrainingPairs`.
    consumed: batches a loader with the same arguments handed out before (``TrainLoader.consumed``, saved
    with a checkpoint): this one continues after them — a resume's fast-forward, which re-reads and
    re-draws what they were made from but does not build them. paired: ``data.degradation=paired``:
    each sample holds its own LR (``KEY.lr.*`` + ``KEY.hr.*``, :mod:`raysr.data.samples`), cropped at
    the HR crop's position ÷ scale under the same flip/rot90; a sample without one, or whose LR is not
    its HR ÷ scale, is skipped and counted like any bad sample. Raises ValueError for
    invalid settings, StorageError for shards that cannot be found.
    """
    check_crop_args(gt_size, scale, crops_per_image, shuffle_buffer)
    check_split_args(rank, world_size, seed)
    batch_size = check_int("batch_size", batch_size)
    num_workers = check_int("num_workers", num_workers, minimum=0)
    prefetch_factor = check_int("prefetch_factor", prefetch_factor)
    if lr_on not in LR_ON:
        raise ValueError(f"lr_on must be one of {LR_ON}, got {lr_on!r}"
                         + (" (resolve auto first with resolve_lr_on)" if lr_on == "auto" else ""))
    shard_list = as_shard_list(shards)
    batches = epoch_batches(shard_list.num_samples, crops_per_image, world_size, batch_size, batches_per_epoch)
    if paired and degradation is not None:
        raise ValueError("paired=True trains on the shards' own LR images and degradation makes LR by Real-ESRGAN's "
                         "degradations: pass one of them (data.degradation is paired or realesrgan)")
    dataset = _BatchStream(shard_list, gt_size, scale, batch_size, seed, rank, world_size, crops_per_image,
                           shuffle_buffer, lr_here=lr_on == "loader", quantize=quantize, degradation=degradation,
                           consumed=check_int("consumed", consumed, minimum=0), paired=paired)
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    return TrainLoader(dataset, num_workers, batches, shard_list.num_samples, pin, prefetch_factor)
