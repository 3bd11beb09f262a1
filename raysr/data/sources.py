"""Where the shards are: URL lists, brace patterns, directories and ``manifest.parquet``.

A shard source is one string or a list of strings, each of which is

* a shard URL, local or ``s3://`` (``.tar``, ``.tar.gz``, ``.tgz``);
* a brace pattern such as ``s3://bucket/hr/train-{000000..000099}.tar``;
* a local glob such as ``/data/hr/train-*.tar``;
* a ``manifest.parquet`` (:mod:`raysr.data.manifest`);
* a directory or S3 prefix: its ``manifest.parquet`` if it has one, else every
  shard file below it.

Shards need no manifest (any WebDataset tars train, see
:mod:`raysr.data.samples`); where one is found, it tells how many samples each
shard holds, before a byte of image data is read.

Importing this module registers an ``s3://`` opener with WebDataset
(``webdataset.gopen.gopen_schemes``) where WebDataset is installed, so a user's
``webdataset.WebDataset("s3://…")`` reads through the same retrying reader as
raysr. raysr itself reads shards without WebDataset, which is not a dependency.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Sequence

import braceexpand

from raysr import storage
from raysr.data.manifest import Manifest, manifest_uri, parent, read_manifest

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class ShardList:
    """Resolved shard URLs, with per-shard sample counts where a manifest gives them.

    ``samples[i]`` is None for a shard no manifest describes. ``format``: the sub-image
    format (``"png"``, ``"npy"``, ...) the manifests of every shard record, when they all
    record the same one; else None (readers never need it: each sample's member says).
    """

    urls: list[str]
    samples: list[int | None]
    format: str | None = None

    def __len__(self) -> int:
        return len(self.urls)

    @property
    def num_samples(self) -> int | None:
        """Total samples, or None when any shard's count is unknown."""
        if any(n is None for n in self.samples):
            return None
        return sum(self.samples)


def _is_shard(url: str) -> bool:
    return url.endswith(SHARD_SUFFIXES)


def _expand_one(source: str) -> tuple[list[str], Manifest | None]:
    """Shard URLs named by one source string, and the manifest it was read from (if any)."""
    if source.endswith(".parquet"):
        manifest = read_manifest(source)
        return manifest.urls, manifest
    if "{" in source:
        return list(braceexpand.braceexpand(source)), None
    if not storage.is_s3(source) and glob.has_magic(source):
        return sorted(glob.glob(source, recursive=True)), None
    if _is_shard(source):
        return [source], None
    beside = manifest_uri(source)
    if storage.exists(beside):
        manifest = read_manifest(beside)
        return manifest.urls, manifest
    return [u for u in storage.list_files(source) if _is_shard(u)], None


def _described(urls: list[str], manifests: dict[str, Manifest]) -> tuple[list[int | None], str | None]:
    """Per-URL sample counts from the given manifests, else from a manifest beside the shard,
    and the one format all of them record (None if any shard has none or they differ)."""
    counts: dict[str, int] = {}
    formats: dict[str, str | None] = {}

    def add(manifest: Manifest) -> None:
        counts.update(zip(manifest.urls, manifest.samples))
        formats.update(dict.fromkeys(manifest.urls, manifest.format))

    for manifest in manifests.values():
        add(manifest)
    for folder in sorted({parent(u) for u in urls if u not in counts}):
        uri = manifest_uri(folder)
        if uri not in manifests and storage.exists(uri):
            manifest = read_manifest(uri)
            manifests[uri] = manifest
            add(manifest)
    found = {formats.get(u) for u in urls}
    return [counts.get(u) for u in urls], (found.pop() if len(found) == 1 else None)


def resolve_shards(shards: str | Sequence[str]) -> ShardList:
    """Expand a shard source (see the module docstring) into a :class:`ShardList`.

    Order is kept as given (directories and globs sorted); duplicates are
    dropped. Raises ValueError for an empty source or one that names no shard,
    StorageError (naming the URI) for a missing directory, manifest or bucket.
    """
    sources = [shards] if isinstance(shards, str) else list(shards)
    if not sources or any(not isinstance(s, str) or not s.strip() for s in sources):
        raise ValueError(f"shards must be a URL, pattern, directory or manifest string (or a list of them), "
                         f"got {shards!r}")
    urls: list[str] = []
    manifests: dict[str, Manifest] = {}
    for source in sources:
        source = source.strip()
        found, manifest = _expand_one(source if storage.is_s3(source) else os.path.expanduser(source))
        if not found:
            raise ValueError(f"no shards found in {source}; expected .tar files, a brace pattern such as "
                             "train-{000000..000009}.tar, or a manifest.parquet (make them with "
                             "python -m raysr.data.make_shards)")
        if manifest is not None:
            manifests[manifest.uri] = manifest
        urls += found
    urls = list(dict.fromkeys(urls))
    samples, shard_format = _described(urls, manifests)
    return ShardList(urls=urls, samples=samples, format=shard_format)


def as_shard_list(shards) -> ShardList:
    """``shards`` if it is already a ShardList, else :func:`resolve_shards` of it."""
    return shards if isinstance(shards, ShardList) else resolve_shards(shards)


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """WebDataset opener for ``s3://`` URLs: raysr's retrying reader (read-only)."""
    if not mode.startswith("r"):
        raise ValueError(f"s3:// shards are read-only through webdataset.gopen (mode {mode!r}); "
                         "write shards with python -m raysr.data.make_shards")
    return storage.open_stream(url)


def register_s3_opener() -> bool:
    """Let ``webdataset.WebDataset`` / ``gopen`` open ``s3://`` URLs via :func:`raysr.storage.open_stream`;
    False (nothing to register) where WebDataset is not installed."""
    import importlib

    try:
        # importlib: the package attribute ``webdataset.gopen`` is the function, not the module
        gopen = importlib.import_module("webdataset.gopen")
    except ImportError:
        return False
    gopen.gopen_schemes["s3"] = _gopen_s3
    return True


register_s3_opener()
