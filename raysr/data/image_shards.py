"""Whole images in and out of WebDataset shards, for ``raysr.upscale --input SHARDS --output-shards PATTERN``.

* Which inputs are shards (:func:`is_shard_source`), and which output shard each input shard makes
  (:func:`output_shard_urls`): one output shard per input shard, in the same order.
* The input shards' samples decoded as :class:`raysr.images.DecodedImage` (16-bit, alpha and ICC
  profiles kept), grouped and picked as training reads them (:mod:`raysr.data.samples`).
* An output shard assembled with make_shards' :class:`raysr.data.make_shards.ShardBuilder` and written
  whole (:func:`raysr.data.make_shards.upload_shard`): an output shard under its final name is complete.
  In this process the samples go straight into the tar (:class:`OutputShard`); on Ray the encode tasks
  stage each member under ``<output shard>.parts/`` and one task per shard assembles it
  (:func:`assemble_shard`), byte for byte the same tar.

Shard sources are whatever ``raysr.train`` takes for ``data.train`` (:func:`raysr.data.resolve_shards`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import braceexpand
import numpy as np

from raysr import storage
from raysr.data.decode import DECODE_ERRORS, decode_member
from raysr.data.make_shards import ShardBuilder, upload_shard
from raysr.data.manifest import manifest_uri, parent
from raysr.data.npy import NPY_EXTENSIONS
from raysr.data.samples import DamagedTar, image_member, tar_samples
from raysr.data.sources import SHARD_SUFFIXES
from raysr.images import IMAGE_EXTENSIONS, DecodedImage, ImageError, decode_image, encode_image

OUTPUT_SUFFIX = ".tar"
# why a shard has no output shard in _failed.jsonl: it could not be read (missing, denied, the store gone)
NOT_WRITTEN = "its output shard is not written, a rerun tries it again"


def is_shard_source(source: str) -> bool:
    """Whether ``--input source`` names WebDataset shards rather than images: a shard file or a local
    glob of them (ending in ``.tar``, ``.tar.gz``, ``.tgz``), a ``manifest.parquet``, a brace pattern, or
    a folder / S3 prefix with a ``manifest.parquet`` or with shard files and no image."""
    if source.endswith(SHARD_SUFFIXES + (".parquet",)) or "{" in source:
        return True
    if not storage.is_s3(source) and not Path(source).is_dir():
        return False
    if storage.exists(manifest_uri(source)):
        return True
    names = [f.lower() for f in storage.list_files(source)]
    return any(n.endswith(SHARD_SUFFIXES) for n in names) and not any(n.endswith(IMAGE_EXTENSIONS) for n in names)


def _output_name(url: str) -> str:
    base = url.rstrip("/").rsplit("/", 1)[-1]
    for suffix in SHARD_SUFFIXES:
        if base.endswith(suffix):
            return base[:-len(suffix)] + OUTPUT_SUFFIX
    return base + OUTPUT_SUFFIX


def output_shard_urls(inputs: Sequence[str], pattern: str) -> list[str]:
    """The output shard of each input shard: ``pattern`` a brace pattern with one name per input
    shard (``out/sr-{000000..000009}.tar``), one ``.tar`` name for a single input shard, or a folder /
    S3 prefix that gets each input shard's file name (``.tar.gz``/``.tgz`` become ``.tar``: the outputs
    are plain tars). Raises ValueError naming the problem (count mismatch, two inputs on one output,
    an output that is its own input)."""
    if "{" in pattern:
        outs = list(braceexpand.braceexpand(pattern))
        if len(outs) != len(inputs):
            raise ValueError(f"--output-shards {pattern} names {len(outs)} shard(s), the input has {len(inputs)}: "
                             "give one output name per input shard, or a folder (each output then takes its "
                             "input's file name)")
    elif pattern.endswith(SHARD_SUFFIXES):
        if len(inputs) != 1:
            raise ValueError(f"--output-shards {pattern} names one shard, the input has {len(inputs)}: give a brace "
                             f"pattern such as {pattern[:-len(OUTPUT_SUFFIX)]}-{{000000..{len(inputs) - 1:06d}}}.tar "
                             "or a folder")
        outs = [pattern]
    else:
        outs = [storage.join(pattern, _output_name(url)) for url in inputs]
    if not storage.is_s3(pattern):
        outs = [os.path.abspath(os.path.expanduser(out)) for out in outs]
    if len(set(outs)) != len(outs):
        twice = next(out for out in outs if outs.count(out) > 1)
        raise ValueError(f"two input shards would both write {twice}; give --output-shards a brace pattern with "
                         "one name per input shard")
    for url, out in zip(inputs, outs):
        same = url == out if storage.is_s3(url) else os.path.abspath(url) == out
        if same:
            raise ValueError(f"output shard {out} would overwrite its input; choose another --output-shards")
    return outs


def log_folder(outs: Sequence[str]) -> str:
    """Where ``_failed.jsonl`` goes: the folder of the first output shard."""
    return parent(outs[0])


def existing_files(uris: Sequence[str]) -> set[str]:
    """Those of ``uris`` that exist: S3 with one listing per prefix, not one request per shard."""
    found = {uri for uri in uris if not storage.is_s3(uri) and Path(uri).is_file()}
    for folder in sorted({parent(uri) for uri in uris if storage.is_s3(uri)}):
        found.update(storage.list_files(folder))
    return found & set(uris)


# --------------------------------------------------------------------------- reading


def read_samples(url: str) -> Iterator[tuple[str, dict[str, bytes] | DamagedTar]]:
    """``(key, {extension: bytes})`` of every sample of the shard at ``url``, in tar order. A tar that
    breaks ends the iteration with ``("", DamagedTar)`` after every sample read whole. Raises
    :class:`raysr.storage.StorageError` if the shard cannot be opened or read."""
    stream = storage.open_stream(url)
    try:
        yield from tar_samples(stream)
    except DamagedTar as err:
        yield "", DamagedTar(f"{url}: the tar breaks ({err})")
    finally:
        stream.close()


def damage_reason(err: DamagedTar, count: int) -> str:
    """``_failed.jsonl``'s reason for a tar that breaks after ``count`` samples: a rerun cannot mend it,
    so the samples before the break go into the output shard."""
    return f"{err}; the {count} samples before the break go on"


def read_images(url: str) -> Iterator[tuple[str, DecodedImage | Exception]]:
    """:func:`read_samples` with each sample decoded (:func:`decode_sample`) as it is read."""
    for key, files in read_samples(url):
        yield key, files if isinstance(files, DamagedTar) else decode_sample(url, key, files)


def decode_sample(url: str, key: str, files: dict[str, bytes]) -> DecodedImage | Exception:
    """The sample's image, or the exception that says why it is unusable (no image member, undecodable)."""
    ext = image_member(files)
    if ext is None:
        return ImageError(f"{url}: sample {key} has no image member (it has {', '.join(sorted(files))})")
    name = f"{url}: {key}.{ext}"
    try:
        if ext in NPY_EXTENSIONS:  # uint8 RGB pixels stored as an array: written back as PNG like the rest
            return DecodedImage(np.ascontiguousarray(decode_member(ext, files[ext], name)), "PNG")
        return decode_image(files[ext], name)
    except DECODE_ERRORS as err:
        return err


# --------------------------------------------------------------------------- writing


def member_names(tags: Sequence[str]) -> list[str]:
    """The member extension of each output of a sample: ``png`` for one, ``<tag>.png`` for several
    (``alpha0.5.png``: WebDataset keys end at the first dot, so the tag goes after it)."""
    return ["png"] if len(tags) == 1 else [f"{tag}.png" for tag in tags]


def encode_member(image: DecodedImage) -> bytes:
    """An output image as its PNG member (bit depth, alpha and ICC profile kept)."""
    return encode_image(DecodedImage(image.pixels, "PNG", image.icc_profile))


class OutputShard:
    """One output shard: samples added as PNG members, then written whole to ``url``."""

    def __init__(self, url: str, member_names: Sequence[str]):
        self.url, self.member_names = url, list(member_names)
        self.builder = ShardBuilder()

    def add(self, key: str, images: Sequence[DecodedImage]) -> None:
        """One sample ``key`` with one PNG per output image."""
        self.builder.add(key, {ext: encode_member(im) for ext, im in zip(self.member_names, images)})

    def write(self) -> None:
        """Write the shard to ``url`` atomically (a temporary file renamed, or one whole S3 upload)."""
        _, digest = self.builder.finish()
        upload_shard(self.url, self.builder.file, digest)


# --------------------------------------------------------------------------- on Ray: members staged, then one tar


def part_uri(out: str, index: int, member: str) -> str:
    """Where the Ray pipeline stages member ``member`` of sample ``index`` of output shard ``out``
    (``<out>.parts/``) until :func:`assemble_shard` puts the shard together."""
    return f"{out}.parts/{index:08d}.{member}"


def assemble_shard(out: str, samples: Sequence[tuple[str, Sequence[tuple[str, str]]]],
                   leftovers: Sequence[str] = ()) -> None:
    """Write output shard ``out`` from staged members: ``samples`` = ``(key, [(member, part uri), ...])``
    in tar order (the bytes :class:`OutputShard` would have written for the same samples); then remove
    the parts and ``leftovers`` (parts of samples left out)."""
    builder = ShardBuilder()
    for key, parts in samples:
        builder.add(key, {member: storage.read_bytes(part) for member, part in parts})
    _, digest = builder.finish()
    upload_shard(out, builder.file, digest)
    for part in [part for _, parts in samples for _, part in parts] + list(leftovers):
        storage.remove(part)
    folder = Path(f"{out}.parts")
    if not storage.is_s3(out) and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
