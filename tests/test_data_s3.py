"""Shards in S3 (moto on loopback): make_shards -> S3 -> stream, 404s, and a flaky endpoint."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

import raysr.storage
from raysr.data import DataStats, iter_pairs, resolve_shards
from raysr.data.make_shards import make_shards
from raysr.storage import StorageError
from faults import Fault, FaultProxy
from test_data_common import to_uint8, write_images

CROP = 48


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    name = "raysr-test-data-s3"
    raysr.storage.s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def s3_shards(bucket, tmp_path_factory):
    """Shards of 4 images (9 samples of 48x48) written to S3 by the CLI.

    Returns (prefix, key -> expected pixels, input folder)."""
    tmp_path = tmp_path_factory.mktemp("s3")
    images = write_images(tmp_path / "in", [(96, 96), (48, 96), (96, 48), (48, 48)], seed=30)
    prefix = f"s3://{bucket}/hr/div"
    result = subprocess.run([sys.executable, "-m", "raysr.data.make_shards", "--input", str(tmp_path / "in"),
                             "--output", prefix, "--crop-size", str(CROP), "--step", str(CROP), "--min-size", "16",
                             "--shard-size-mb", "0.03", "--workers", "2"],
                            capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "9 samples" in result.stdout
    crops = {}
    for name, image in images.items():
        for i, (y, x) in enumerate((y, x) for y in range(0, image.shape[0], CROP) for x in range(0, image.shape[1], CROP)):
            crops[f"{name}_s{i + 1:03d}"] = image[y:y + CROP, x:x + CROP]
    return prefix, crops, tmp_path / "in"


def _stream_all(prefix):
    stats = DataStats()
    pairs = list(iter_pairs(prefix, CROP, 4, augment=False, shuffle_buffer=0, stats=stats))
    return sorted(to_uint8(hr).tobytes() for _, hr in pairs), stats


def test_make_shards_to_s3_and_stream_back(s3_shards, bucket):
    prefix, crops, source = s3_shards
    client = raysr.storage.s3_client()
    manifest = pq.read_table(io.BytesIO(raysr.storage.read_bytes(prefix + "/manifest.parquet"))).to_pylist()
    assert len(manifest) > 1 and sum(row["samples"] for row in manifest) == 9
    for row in manifest:
        key = f"hr/div/{row['name']}"
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == row["sha256"] == \
            client.head_object(Bucket=bucket, Key=key)["Metadata"]["sha256"]
        assert len(body) == row["bytes"]
    shard_list = resolve_shards(prefix)
    assert shard_list.num_samples == 9 and shard_list.urls[0] == prefix + "/train-000000.tar"
    got, stats = _stream_all(prefix)
    assert got == sorted(c.tobytes() for c in crops.values())
    assert stats.skipped == 0 and stats.samples == 9
    # a re-run finds every shard intact in S3 (size and sha256 metadata) and uploads nothing
    report = make_shards([str(source)], prefix, crop_size=CROP, step=CROP, min_size=16, shard_size_mb=0.03,
                         workers=1, progress=False)
    assert (report.written, report.reused) == (0, len(manifest))


def test_webdataset_reads_the_shards_through_the_s3_opener(s3_shards):
    import webdataset as wds

    prefix, crops, _ = s3_shards
    urls = resolve_shards(prefix).urls
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert sorted(s["__key__"] for s in samples) == sorted(crops)
    assert all(set(s) >= {"png", "json"} for s in samples)


def test_raysr_reads_shards_without_webdataset_installed(s3_shards):
    """WebDataset is a test dependency only: without it raysr registers no opener and still streams the shards."""
    prefix, crops, _ = s3_shards
    code = ("import sys; sys.modules['webdataset'] = None\n"  # None in sys.modules: importing it fails
            "from raysr.data import iter_pairs, sources\n"
            "assert sources.register_s3_opener() is False\n"
            f"print(len(list(iter_pairs({prefix!r}, {CROP}, 4, augment=False, shuffle_buffer=0))))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(),
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(len(crops))]


def test_missing_objects_raise_one_clear_error(s3_shards, bucket):
    prefix, _, _ = s3_shards
    missing = f"s3://{bucket}/hr/div/train-000042.tar"
    with pytest.raises(StorageError, match=f"{missing} does not exist"):
        list(iter_pairs([prefix + "/train-000000.tar", missing], CROP, 4, shuffle_buffer=0))
    with pytest.raises(StorageError, match="bucket of s3://no-such-bucket-raysr/x does not exist"):
        resolve_shards("s3://no-such-bucket-raysr/x")
    with pytest.raises(ValueError, match="no shards found"):
        resolve_shards(f"s3://{bucket}/elsewhere")


def test_make_shards_to_a_missing_bucket_fails_before_encoding(s3_endpoint, tmp_path, monkeypatch):
    import raysr.data.make_shards as ms

    write_images(tmp_path / "in", [(48, 48)])
    monkeypatch.setattr(ms, "_encode_job", lambda *a: pytest.fail("encoding started before the bucket was checked"))
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-raysr' of output s3://no-such-bucket-raysr/hr "
                                           "does not exist .*create it or fix the URI"):
        make_shards([str(tmp_path / "in")], "s3://no-such-bucket-raysr/hr", crop_size=CROP, step=CROP,
                    min_size=16, workers=1, progress=False)


def test_flaky_endpoint_is_survived(s3_shards, s3_endpoint, monkeypatch):
    prefix, crops, _ = s3_shards
    proxy = FaultProxy(s3_endpoint)
    # three connections reset, then two replies cut short after 20 kB (a body cut midway)
    resets, cuts = proxy.arm(Fault("reset", times=3), Fault("cut_reply", times=2, after_bytes=20_000))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setattr(raysr.storage, "STREAM_RETRY_BASE_S", 0.01)
    raysr.storage._clients.clear()
    try:
        got, stats = _stream_all(prefix)
    finally:
        proxy.close()
        raysr.storage._clients.clear()
    assert got == sorted(c.tobytes() for c in crops.values())
    assert stats.skipped == 0 and stats.bad_shards == 0
    assert resets.fired == 3 and cuts.fired == 2  # the faults really happened
    assert proxy.count(ranged=True) == 2  # each cut body was resumed where it stopped, not restarted
