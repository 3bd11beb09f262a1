"""Whole datasets through Ray Data: ``python -m raysr.upscale ... --ray [ADDRESS]`` and
``python -m raysr.evaluate ... --ray``.

The upscale pipeline, in the order the data flows (evaluate's has the same shape: load the
(GTmod, LR) pair -> SR and score on the actor -> save the SR image)::

    work list (driver) -> read + decode (CPU tasks) -> upscale (actor pool, GPUs or CPUs)
                       -> encode + write (CPU tasks) -> outcomes (driver: progress, _failed.jsonl, summary)

With ``--batch-tiles N`` an actor takes N inputs per call and batches their tiles. Shards in and out
take the same path with a shard reader in front (one input shard in, its samples out) and the members
of each output shard staged by the write tasks, then assembled by one task per shard.

Decoding and encoding run on whatever CPUs the cluster has while the model actors only upscale;
the actor pool grows from ``--workers MIN`` to ``MAX`` with the backlog (``ActorPoolStrategy``).
Every stage catches what goes wrong with one input and passes it on as that row's ``error``, so a
bad input never stops the job: the driver lists it in ``_failed.jsonl``. Each output is written
atomically (:func:`raysr.storage.write_bytes`), so a stage Ray retries, or a job run again after it
was killed, never leaves a half-written file.

The stages call the very functions the single-process path calls (:func:`raysr.images.read_image`,
the :class:`raysr.upscale.Upscaler` handed in, :func:`raysr.images.write_image`), so both paths
write the same bytes for the same model, tile and precision.

Decoded images travel between stages as raw bytes plus shape and dtype columns: Ray Data's own
tensor columns cast a batch of uint8 and uint16 images to one dtype and turn a missing ICC
profile into NaN. The pixels of one row live in one Arrow binary value (below 2 GiB per image).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from raysr import storage
from raysr.cli import InputError, failure_reason
from raysr.data.image_shards import (NOT_WRITTEN, assemble_shard, damage_reason, decode_sample, encode_member,
                                     part_uri, read_samples)
from raysr.data.samples import DamagedTar
from raysr.images import DecodedImage, read_image, write_image
from raysr.ray_setup import init_ray, quiet_output

# Heap reserved per read/decode and encode/write task: a large decoded image and its codec buffers.
# Declaring it also keeps Ray Data from fusing the decode tasks into CPU model actors (same CPU
# request, otherwise): the actors would then decode as well as upscale.
CODEC_TASK_MEMORY = 512 << 20
# One input per block up to this many inputs, so the actor pool is balanced image by image;
# beyond it the blocks hold several inputs (Ray Data splits the decoded output blocks by size).
MAX_BLOCKS = 10_000


def start_ray(address: str, verbose: bool) -> None:
    """Join the cluster at ``address`` ('auto', host:port), or, with '', the one in RAY_ADDRESS or
    a new local Ray on 127.0.0.1 (:func:`raysr.ray_setup.init_ray`); Ray Data's progress bars and
    execution logs only with ``verbose``."""
    if address:
        os.environ["RAY_ADDRESS"] = address
    quiet_output(verbose)
    init_ray()
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    if not verbose:  # "Progress bars disabled", "execution finished in ..." are raysr's own lines here
        logging.getLogger("ray.data").setLevel(logging.ERROR)


def actor_resources(workers: tuple[int, int] | None, gpus_per_worker: float | None) -> tuple[int, int, float]:
    """``(min actors, max actors, GPUs per actor)``: by default one GPU per actor and up to as many actors
    as the cluster has GPUs now; on a cluster without GPUs, one CPU actor."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
    gpus = gpus_per_worker if gpus_per_worker is not None else (1.0 if cluster_gpus > 0 else 0.0)
    if workers is None:
        workers = (1, max(1, int(cluster_gpus // gpus)) if gpus > 0 else 1)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if gpus == 0 and workers[0] >= cpus:
        # each CPU actor holds a CPU for the whole job: with all of them held, the read and write tasks
        # never run and the job makes no progress (seen with 2 actors on 2 CPUs), so refuse it up front
        raise InputError(f"--workers {workers[0]},{workers[1]}: {workers[0]} CPU model actors would hold all "
                         f"{cpus} CPUs of this cluster, leaving none to read and write images; use a MIN of at "
                         f"most {max(cpus - 1, 0)}, or GPU actors (--gpus-per-worker)")
    return workers[0], workers[1], gpus


# --------------------------------------------------------------------------- rows


def array_columns(array: np.ndarray, prefix: str = "") -> dict:
    """An (H, W, C) array as plain columns ``<prefix>pixels``, ``height``, ``width``, ``channels``, ``dtype``."""
    height, width, channels = array.shape
    return {f"{prefix}pixels": array.tobytes(), f"{prefix}height": height, f"{prefix}width": width,
            f"{prefix}channels": channels, f"{prefix}dtype": array.dtype.name}


def array_from_columns(row: dict, prefix: str = "") -> np.ndarray:
    """Inverse of :func:`array_columns` (read-only: a view of the row's bytes)."""
    shape = (row[f"{prefix}height"], row[f"{prefix}width"], row[f"{prefix}channels"])
    return np.frombuffer(row[f"{prefix}pixels"], np.dtype(row[f"{prefix}dtype"])).reshape(shape)


def image_columns(image: DecodedImage) -> dict:
    """A decoded image as plain columns (see the module docstring)."""
    return {**array_columns(image.pixels), "format": image.format, "icc": image.icc_profile or b""}


def image_from_columns(row: dict) -> DecodedImage:
    """Inverse of :func:`image_columns`."""
    return DecodedImage(pixels=array_from_columns(row), format=row["format"], icc_profile=row["icc"] or None)


_EMPTY_IMAGE = {"pixels": b"", "height": 0, "width": 0, "channels": 0, "dtype": "uint8", "format": "", "icc": b""}


def _failed_row(row: dict, stage: str, err: BaseException) -> dict:
    return {**row, **_EMPTY_IMAGE, "stage": stage, "error": failure_reason(err)}


# --------------------------------------------------------------------------- the stages


def read_stage(row: dict) -> dict:
    """CPU task: ``{"uri", "outs"}`` -> the decoded input's columns, or ``error``."""
    try:
        image = read_image(row["uri"])
    except Exception as err:  # listed in _failed.jsonl by the driver
        return _failed_row(row, "read", err)
    return {**row, **image_columns(image), "stage": "", "error": ""}


class UpscaleStage:
    """Actor: holds the models on its device (a GPU when it has one) and upscales a batch of up to
    ``--batch-tiles`` inputs (a pyarrow table, one row per input) into tables of one row per output
    file (``out`` and its pixels), one table per group the upscaler forms (bounding the memory the
    outputs hold)."""

    def __init__(self, make_upscaler: Callable[[torch.device], Callable]):
        has_gpu = bool(os.environ.get("CUDA_VISIBLE_DEVICES")) and torch.cuda.is_available()
        self.upscaler = make_upscaler(torch.device("cuda" if has_gpu else "cpu"))

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        rows = batch.to_pylist()
        unread = [_output_row(row, "", 1, 0.0) for row in rows if row["error"]]
        if unread:
            yield pa.Table.from_pylist(unread)
        inputs = ((row, image_from_columns(row)) for row in rows if not row["error"])
        for group in self.upscaler.groups(inputs):
            out = []
            for row, _, results in group:
                if isinstance(results, BaseException):
                    out.append(_output_row(_failed_row(row, "upscale", results), "", 1, 0.0))
                    continue
                megapixels = row["height"] * row["width"] / 1e6
                out += [_output_row({**row, **image_columns(result)}, name, len(row["outs"]), megapixels)
                        for name, result in zip(row["outs"], results)]
            yield pa.Table.from_pylist(out)


def _output_row(row: dict, out: str, count: int, megapixels: float) -> dict:
    """An upscale stage's row: one output file ``out`` of an input that makes ``count``."""
    return {**{k: v for k, v in row.items() if k != "outs"}, "out": out, "count": count, "megapixels": megapixels}


def write_stage(row: dict) -> dict:
    """CPU task: encode and write one output file atomically; the row without its pixels."""
    if not row["error"]:
        try:
            write_image(row["out"], image_from_columns(row))
        except Exception as err:
            row = _failed_row(row, "write", err)
    return {k: row[k] for k in ("uri", "out", "count", "megapixels", "stage", "error")}


# --------------------------------------------------------------------------- the driver


def prepare(address: str, workers: tuple[int, int] | None, gpus_per_worker: float | None, precision: str,
            verbose: bool) -> tuple[int, int, float]:
    """Start or join Ray (:func:`start_ray`); ``(min actors, max actors, GPUs per actor)``
    (:func:`actor_resources`), checked against ``precision``."""
    start_ray(address, verbose)
    low, high, gpus = actor_resources(workers, gpus_per_worker)
    if precision == "fp16" and gpus == 0:
        raise InputError("--precision fp16 needs GPU actors (CPU autocast has no fp16); pass --gpus-per-worker 1 "
                         "on a cluster with GPUs, or use --precision bf16 or fp32")
    return low, high, gpus


def run_pipeline(items: list[dict], read: Callable, stage: type, stage_args: tuple, write: Callable,
                 actors: tuple[int, int, float], read_kwargs: dict | None = None, batch_size: int | None = None,
                 fan_out: bool = False):
    """Rows of ``items`` through ``read`` (CPU tasks; with ``fan_out`` one row in, an iterator of rows
    out) -> ``stage(*stage_args)`` (actor pool of ``actors`` = (min, max, GPUs each); one row in, a list
    of rows out, or with ``batch_size`` a pyarrow table of up to that many rows in, tables out) ->
    ``write`` (CPU tasks); yields the written rows on the driver as they come."""
    import ray.data

    low, high, gpus = actors
    # A lost node costs no output: Ray Data's actor pools restart an actor that dies and resend its
    # batches (its defaults max_restarts=-1, max_task_retries=-1, kept on purpose); tests/test_elastic.py
    # removes the model actor's node mid-job
    model_stage = dict(fn_constructor_args=stage_args, compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
                       num_gpus=gpus, num_cpus=1)
    dataset = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
    dataset = (dataset.flat_map if fan_out else dataset.map)(read, fn_kwargs=read_kwargs, memory=CODEC_TASK_MEMORY)
    # pyarrow batches hand the rows over as read_stage made them (bytes stay bytes, see the module docstring)
    dataset = (dataset.flat_map(stage, **model_stage) if batch_size is None else
               dataset.map_batches(stage, batch_size=batch_size, batch_format="pyarrow", **model_stage))
    yield from dataset.map(write, memory=CODEC_TASK_MEMORY).iter_rows()


def upscale_on_ray(jobs: Sequence, make_upscaler: Callable, log, *, address: str, workers: tuple[int, int] | None,
                   gpus_per_worker: float | None, precision: str, batch_tiles: int = 1, verbose: bool = False) -> None:
    """Run ``jobs`` (:class:`raysr.upscale.Job`: ``uri``, ``outs``) through the pipeline on the Ray cluster at
    ``address`` (see :func:`start_ray`), reporting each input to ``log`` (:class:`raysr.upscale.JobLog`)
    once its last output is written or it fails.

    ``make_upscaler(device)``: the run's models on ``device`` (a :class:`raysr.upscale.Upscaler`). Each model
    actor takes ``batch_tiles`` inputs per call, whose tiles the upscaler batches (``--batch-tiles``).
    """
    if not jobs:  # all skipped: no need to start Ray
        return
    actors = prepare(address, workers, gpus_per_worker, precision, verbose)
    items = [{"uri": job.uri, "outs": list(job.outs)} for job in jobs]
    log.start()  # images/s and MP/s from here: starting Ray is not upscaling
    written: dict[str, int] = {}
    failed: set[str] = set()
    for row in run_pipeline(items, read_stage, UpscaleStage, (make_upscaler,), write_stage, actors,
                            batch_size=batch_tiles):
        uri = row["uri"]
        if uri in failed:
            continue
        if row["error"]:
            failed.add(uri)
            log.failed(uri, row["stage"], row["error"])
            continue
        written[uri] = written.get(uri, 0) + 1
        if written[uri] == row["count"]:
            log.done(uri, row["megapixels"])


# --------------------------------------------------------------------------- raysr.upscale --ray on shards
# The same actor stage between a shard reader and a member writer: each output shard is staged member by
# member (raysr.data.image_shards.part_uri) and assembled by one task once its last sample is written.


def read_shard_stage(row: dict) -> Iterator[dict]:
    """CPU task: ``{"url", "shard_out", "outs"}`` (an input shard, its output shard, the member names of a
    sample's outputs) -> one row per sample in tar order (``key``, ``index``, the decoded image's columns,
    or ``error``), and one more for a tar that breaks; every row carries ``samples``, how many rows its
    shard makes (the shard's encoded bytes are read first, then decoded one sample at a time), and
    ``unreadable`` (the shard could not be read at all: its output shard is not written)."""
    base = {**row, "key": "", "index": 0, "samples": 1, "unreadable": False, **_EMPTY_IMAGE, "stage": "", "error": ""}
    try:
        samples = list(read_samples(row["url"]))
    except storage.StorageError as err:
        yield {**base, "stage": "read", "unreadable": True, "error": f"{failure_reason(err)}; {NOT_WRITTEN}"}
        return
    for index, (key, files) in enumerate(samples):
        at = {**base, "key": key, "index": index, "samples": len(samples)}
        if isinstance(files, DamagedTar):  # a rerun cannot mend it: the samples before the break go on
            yield {**at, "stage": "read", "error": damage_reason(files, index)}
            continue
        image = decode_sample(row["url"], key, files)
        yield _failed_row(at, "read", image) if isinstance(image, Exception) else {**at, **image_columns(image)}


def write_part_stage(row: dict) -> dict:
    """CPU task: encode one output member and stage it (:func:`raysr.data.image_shards.part_uri`); the row
    without its pixels, with ``part`` (its URI)."""
    part = ""
    if not row["error"]:
        try:
            part = part_uri(row["shard_out"], row["index"], row["out"])
            storage.write_bytes(part, encode_member(image_from_columns(row)))
        except Exception as err:
            row, part = _failed_row(row, "write", err), ""
    keep = ("url", "shard_out", "key", "index", "samples", "unreadable", "out", "count", "megapixels", "stage", "error")
    return {**{k: row[k] for k in keep}, "part": part}


class _ShardState:
    """What the driver knows of one output shard: its finished samples and their staged parts."""

    def __init__(self):
        self.samples: int | None = None  # rows the shard makes, from its first row
        self.finished: set[int] = set()
        self.parts: dict[int, tuple[str, dict[str, str], float]] = {}  # index -> (key, member -> part, MP)
        self.failed: set[int] = set()
        self.unreadable = False


def upscale_shards_on_ray(jobs: Sequence, make_upscaler: Callable, log, members: Sequence[str], *, address: str,
                          workers: tuple[int, int] | None, gpus_per_worker: float | None, precision: str,
                          batch_tiles: int = 1, verbose: bool = False) -> None:
    """Run shard ``jobs`` (:class:`raysr.upscale.ShardJob`: ``url``, ``out``, ``samples``) on the Ray cluster at
    ``address``: samples read in CPU tasks, upscaled on the actor pool as :func:`upscale_on_ray` does, each output
    member staged by a CPU task, and each output shard assembled by one task once its last sample is in
    (:func:`raysr.data.image_shards.assemble_shard`). Samples are reported to ``log`` when their shard is written;
    failures as they come (with their key). ``members``: the member name of each output of a sample."""
    if not jobs:
        return
    actors = prepare(address, workers, gpus_per_worker, precision, verbose)
    import ray

    assemble = ray.remote(num_cpus=1, memory=CODEC_TASK_MEMORY)(assemble_shard)
    items = [{"url": job.url, "shard_out": job.out, "outs": list(members)} for job in jobs]
    counted = {job.url: job.samples is not None for job in jobs}
    states = {job.url: _ShardState() for job in jobs}
    assembling: dict = {}  # ObjectRef -> shard url
    log.start()
    for row in run_pipeline(items, read_shard_stage, UpscaleStage, (make_upscaler,), write_part_stage, actors,
                            batch_size=batch_tiles, fan_out=True):
        url, state, index = row["url"], states[row["url"]], row["index"]
        if state.samples is None:
            state.samples = row["samples"]
            if not counted[url]:
                log.expect(row["samples"])
        if row["error"]:
            state.unreadable |= row["unreadable"]
            if index not in state.failed:
                state.failed.add(index)
                state.finished.add(index)
                log.failed(url, row["stage"], row["error"], row["key"] or None)
        elif index not in state.failed:
            key, parts, _ = state.parts.setdefault(index, (row["key"], {}, row["megapixels"]))
            parts[row["out"]] = row["part"]
            if len(parts) == row["count"]:
                state.finished.add(index)
        if len(state.finished) == state.samples:
            _finish_shard(row["shard_out"], state, members, assemble, assembling, url)
        _collect_shards(assembling, states, log, block=False)
    for job in jobs:
        if states[job.url].samples is None:  # a tar without a sample makes no row: its output shard is empty too
            assembling[assemble.remote(job.out, [])] = job.url
    _collect_shards(assembling, states, log, block=True)


def _finish_shard(out: str, state: _ShardState, members: Sequence[str], assemble, assembling: dict, url: str) -> None:
    if state.unreadable:  # listed in _failed.jsonl already
        return
    good = sorted(i for i in state.parts if i not in state.failed)
    samples = [(state.parts[i][0], [(m, state.parts[i][1][m]) for m in members]) for i in good]
    leftovers = [p for i in state.parts if i in state.failed for p in state.parts[i][1].values()]
    assembling[assemble.remote(out, samples, leftovers)] = url


def _collect_shards(assembling: dict, states: dict, log, block: bool) -> None:
    """Report the shards whose assembly finished (all of them with ``block``)."""
    import ray

    while assembling:
        ready, _ = ray.wait(list(assembling), num_returns=len(assembling) if block else 1, timeout=None if block else 0)
        if not ready:
            return
        for ref in ready:
            url = assembling.pop(ref)
            state = states[url]
            try:
                ray.get(ref)
            except Exception as err:  # a full disk, a denied bucket: a rerun tries this shard again
                log.failed(url, "write", failure_reason(err))
                continue
            for index in sorted(i for i in state.parts if i not in state.failed):
                log.done(f"{url}#{state.parts[index][0]}", state.parts[index][2])


# --------------------------------------------------------------------------- raysr.evaluate --ray


def score_read_stage(row: dict, load_pair: Callable) -> dict:
    """CPU task: ``{"index", "name", "hr", "lr", "save"}`` -> the (GTmod, LR) uint8 pair ``load_pair(hr, lr)``
    as columns, or ``error``."""
    try:
        hr, lr = load_pair(row["hr"], row["lr"] or None)
    except Exception as err:
        return {**row, **array_columns(np.zeros((0, 0, 3), np.uint8), "hr_"),
                **array_columns(np.zeros((0, 0, 3), np.uint8), "lr_"), "error": failure_reason(err)}
    return {**row, **array_columns(hr, "hr_"), **array_columns(lr, "lr_"), "error": ""}


class ScoreStage:
    """Actor: the model (and LPIPS) on its device; one pair in, its SR image and scores (JSON) out."""

    def __init__(self, make_scorer: Callable[[torch.device], Callable]):
        has_gpu = bool(os.environ.get("CUDA_VISIBLE_DEVICES")) and torch.cuda.is_available()
        self.score = make_scorer(torch.device("cuda" if has_gpu else "cpu"))

    def __call__(self, row: dict) -> list[dict]:
        sr, scores = np.zeros((0, 0, 3), np.uint8), {}
        if not row["error"]:
            try:
                sr, scores = self.score(array_from_columns(row, "hr_"), array_from_columns(row, "lr_"))
            except Exception as err:
                row = {**row, "error": failure_reason(err)}
        keep = {k: v for k, v in row.items() if not k.startswith(("hr_", "lr_"))}
        # JSON keeps None (no LPIPS) and inf (PSNR of identical images), which Arrow columns would not
        return [{**keep, **array_columns(sr, "sr_"), "scores": json.dumps(scores)}]


def score_write_stage(row: dict) -> dict:
    """CPU task: save the SR image as PNG where asked (``save``); the row without pixels."""
    if row["save"] and not row["error"]:
        try:
            write_image(row["save"], DecodedImage(array_from_columns(row, "sr_"), "PNG"))
        except Exception as err:
            row = {**row, "error": failure_reason(err)}
    return {k: row[k] for k in ("index", "name", "save", "scores", "error")}


def evaluate_on_ray(samples: Sequence, load_pair: Callable, make_scorer: Callable, saves: Sequence[str | None],
                    progress, *, address: str, workers: tuple[int, int] | None, gpus_per_worker: float | None,
                    verbose: bool = False) -> list[tuple[str, dict]]:
    """Score ``samples`` (:class:`raysr.evaluate.Sample`) on the Ray cluster at ``address``: ``load_pair(hr, lr)``
    in CPU tasks, ``make_scorer(device)(hr, lr) -> (sr, scores)`` on the actor pool, the SR image saved to
    ``saves[i]`` (None: not saved) in CPU tasks. Returns ``[(error, scores)]`` in sample order ('' = no error);
    ``progress`` (:class:`raysr.util.Progress`) steps once per sample."""
    actors = prepare(address, workers, gpus_per_worker, "fp32", verbose)
    items = [{"index": i, "name": s.name, "hr": s.hr, "lr": s.lr or "", "save": save or ""}
             for i, (s, save) in enumerate(zip(samples, saves))]
    progress.start = time.monotonic()
    results: list[tuple[str, dict]] = [("", {})] * len(items)
    for row in run_pipeline(items, score_read_stage, ScoreStage, (make_scorer,), score_write_stage, actors,
                            read_kwargs={"load_pair": load_pair}):
        results[row["index"]] = (row["error"], json.loads(row["scores"]))
        progress.step(row["name"])
    return results
