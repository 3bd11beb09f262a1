"""manifest.parquet: one module writes and reads it; copies of a dataset and other tools' tables."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysr.data import read_manifest, resolve_shards
from raysr.data.manifest import ShardEntry, read_entries, write_manifest


def _entry(i: int, samples: int) -> ShardEntry:
    name = f"train-{i:06d}.tar"
    return ShardEntry(shard=i, name=name, url=f"/old/place/{name}", samples=samples, bytes=1000 + i,
                      sha256=f"{i:064x}", plan_start=10 * i, plan_count=samples, plan_sha256="ab" * 32)


def test_written_rows_read_back_by_pyarrow_and_by_raysr(tmp_path):
    entries = [_entry(1, 7), _entry(0, 5)]  # written sorted by shard index
    write_manifest(str(tmp_path / "manifest.parquet"), entries, {"crop_size": 480})
    table = pq.read_table(tmp_path / "manifest.parquet")
    assert table.column("name").to_pylist() == ["train-000000.tar", "train-000001.tar"]
    assert table.column("samples").to_pylist() == [5, 7]
    assert json.loads(table.schema.metadata[b"raysr"]) == {"crop_size": 480}
    assert read_entries(str(tmp_path / "manifest.parquet")) == [entries[1], entries[0]]
    manifest = read_manifest(str(tmp_path / "manifest.parquet"))
    # shards are found beside the manifest by name, not at the url recorded when it was written
    assert manifest.urls == [str(tmp_path / "train-000000.tar"), str(tmp_path / "train-000001.tar")]
    assert (manifest.samples, manifest.bytes, manifest.num_samples) == ([5, 7], [1000, 1001], 12)


def test_a_copied_dataset_reads_from_its_new_place(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("train-000000.tar", "train-000001.tar"):
        (tmp_path / "a" / name).write_bytes(b"")
    write_manifest(str(tmp_path / "a" / "manifest.parquet"), [_entry(0, 5), _entry(1, 7)], {})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shards = resolve_shards(str(tmp_path / "b"))
    assert shards.urls == [str(tmp_path / "b" / "train-000000.tar"), str(tmp_path / "b" / "train-000001.tar")]
    assert shards.samples == [5, 7] and shards.num_samples == 12


def test_other_tools_tables(tmp_path):
    # url + samples is enough for readers; make_shards does not reuse such a table
    pq.write_table(pa.table({"url": ["s3://b/x.tar"], "samples": [3]}), tmp_path / "manifest.parquet")
    assert read_manifest(str(tmp_path / "manifest.parquet")).urls == ["s3://b/x.tar"]
    assert read_entries(str(tmp_path / "manifest.parquet")) is None
    pq.write_table(pa.table({"path": ["x.tar"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"not a raysr shard manifest: it needs a 'samples' column .*\['path'\]"):
        read_manifest(str(tmp_path / "other.parquet"))
