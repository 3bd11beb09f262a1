"""``manifest.parquet``: the table of a dataset's shards, its one reader and writer.

``python -m raysr.data.make_shards`` writes it beside the shards, one row per shard
(:class:`ShardEntry`): ``shard`` (index), ``name`` (file name beside the manifest),
``url``, ``samples``, ``bytes``, ``sha256`` (hex), and ``plan_start``/``plan_count``/
``plan_sha256`` (the slice of planned samples the shard holds, so a re-run can reuse
it). The run's settings are JSON in the schema metadata under ``raysr``, among them
``format``: how the sub-images are stored (``png``, ``npy``, ``npy.lz4``, ``webp``, ``jpeg``;
the member extension each sample's image has), which readers see as :attr:`Manifest.format`.

Training needs no manifest. Where one is present, readers take from it the samples
per shard (the dataset size for logs and benchmarks, the length of a finite pass,
the samples a truncated shard lost); other tools' manifests need only ``samples``
and ``name`` or ``url``.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from dataclasses import dataclass, fields

from raysr import storage

MANIFEST_NAME = "manifest.parquet"
SETTINGS_KEY = "raysr"


@dataclass
class ShardEntry:
    """One manifest row as make_shards writes it. ``plan_start``/``plan_count``: the range
    of planned samples (in plan order) the shard covers; ``plan_sha256``: digest of that slice."""

    shard: int
    name: str
    url: str
    samples: int
    bytes: int
    sha256: str
    plan_start: int
    plan_count: int
    plan_sha256: str


ENTRY_FIELDS = tuple(f.name for f in fields(ShardEntry))


@dataclass(frozen=True)
class Manifest:
    """What readers take from a manifest, one entry per shard.

    ``urls``: where each shard is read from (resolved next to the manifest);
    ``samples``: samples per shard; ``bytes``: shard sizes (0 if not recorded);
    ``sha256``: hex digests ("" if not recorded); ``format``: the sub-image format make_shards
    wrote (``"png"``, ``"npy"``, ``"npy.lz4"``, ...), None for other tools' manifests.
    """

    uri: str
    urls: list[str]
    samples: list[int]
    bytes: list[int]
    sha256: list[str]
    format: str | None = None

    @property
    def num_samples(self) -> int:
        return sum(self.samples)


def manifest_uri(folder: str) -> str:
    """Where the manifest of the shards in ``folder`` (local or s3:// prefix) is."""
    return storage.join(folder, MANIFEST_NAME)


def parent(uri: str) -> str:
    """The folder or s3:// prefix holding ``uri``."""
    return posixpath.dirname(uri) if storage.is_s3(uri) else os.path.dirname(uri)


def write_manifest(uri: str, entries: list[ShardEntry], settings: dict) -> None:
    """Write ``entries`` (sorted by shard index) and the run's ``settings`` to ``uri``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(entries, key=lambda e: e.shard)
    table = pa.Table.from_pylist([{f: getattr(e, f) for f in ENTRY_FIELDS} for e in rows])
    table = table.replace_schema_metadata({SETTINGS_KEY: json.dumps(settings, sort_keys=True)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    buf.seek(0)
    storage.write_stream(uri, buf)


def _read_table(uri: str):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def read_entries(uri: str) -> list[ShardEntry] | None:
    """The rows of a manifest make_shards wrote, or None if ``uri`` is another tool's table.

    Raises :class:`raysr.storage.StorageError` if ``uri`` is missing.
    """
    table = _read_table(uri)
    if not set(ENTRY_FIELDS) <= set(table.column_names):
        return None
    return [ShardEntry(**{f: row[f] for f in ENTRY_FIELDS}) for row in table.to_pylist()]


def read_manifest(uri: str) -> Manifest:
    """Read a ``manifest.parquet`` (local or s3://).

    Shards are located next to the manifest by their ``name`` column, so a
    dataset copied to another bucket or folder keeps working; manifests without
    ``name`` use their ``url`` column as is. Raises StorageError if missing,
    ValueError if it lacks the ``samples`` column or both ``name`` and ``url``.
    """
    table = _read_table(uri)
    columns = set(table.column_names)
    if "samples" not in columns or not ({"name", "url"} & columns):
        raise ValueError(f"{uri} is not a raysr shard manifest: it needs a 'samples' column and a 'name' "
                         f"or 'url' column, found {sorted(columns)}")
    rows = table.to_pylist()
    base = parent(uri)
    urls = [storage.join(base, row["name"]) if row.get("name") else row["url"] for row in rows]
    return Manifest(uri=uri, urls=urls, samples=[int(row["samples"]) for row in rows],
                    bytes=[int(row.get("bytes") or 0) for row in rows],
                    sha256=[row.get("sha256") or "" for row in rows], format=_settings(table).get("format"))


def _settings(table) -> dict:
    """The make_shards settings stored with ``table`` ({} for other tools' manifests)."""
    raw = (table.schema.metadata or {}).get(SETTINGS_KEY.encode())
    try:
        settings = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return settings if isinstance(settings, dict) else {}
