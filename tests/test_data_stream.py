"""raysr.data streaming: exact LR, crops, splits across ranks/workers, seeding, bad data."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from raysr.data import DataStats, iter_images, iter_pairs, make_lr, resolve_shards
from raysr.data.make_shards import make_shards
from raysr.data.stream import shard_order
from raysr.storage import StorageError
from test_data_common import assert_lr_matches, png_bytes, read_tar, shard_samples, to_uint8, write_images, write_tar

SAMPLE = 64  # every sample is a 64x64 crop


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """8 images of 128x192 cut into 48 samples of 64x64 over several shards; returns (dir, key -> pixels)."""
    root = tmp_path_factory.mktemp("stream")
    write_images(root / "in", [(128, 192)] * 8, seed=10)
    make_shards([str(root / "in")], str(root / "shards"), crop_size=SAMPLE, step=SAMPLE, min_size=16,
                shard_size_mb=0.06, workers=1, progress=False)
    samples = shard_samples(sorted((root / "shards").glob("*.tar")))
    assert len(samples) == 48 and len(list((root / "shards").glob("*.tar"))) >= 5
    return root / "shards", samples


def _digest(pixels: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def test_pairs_are_exact_crops_with_exact_8bit_bicubic_lr(dataset):
    shards, samples = dataset
    stats = DataStats()
    pairs = list(iter_pairs(str(shards), 32, 4, seed=3, augment=False, stats=stats))
    assert len(pairs) == 48 and stats.samples == 48 and stats.skipped == 0
    for lr, hr in pairs[:12]:
        assert lr.shape == (3, 8, 8) and hr.shape == (3, 32, 32) and lr.dtype == hr.dtype == torch.float32
        assert_lr_matches(lr, hr, 4)
        # hr is a 32x32 window of one stored sample, pixel for pixel
        assert any(_contains(sample, to_uint8(hr)) for sample in samples.values())
    offsets = {tuple(hr[:, 0, 0].tolist()) for _, hr in pairs}
    assert len(offsets) > 40  # random positions, not always the corner


def _contains(image: np.ndarray, crop: np.ndarray) -> bool:
    """True if ``crop`` is a window of ``image``, pixel for pixel."""
    size = crop.shape[0]
    ys, xs = np.nonzero((image[:-size + 1 or None, :-size + 1 or None] == crop[0, 0]).all(axis=2))
    return any(np.array_equal(image[y:y + size, x:x + size], crop) for y, x in zip(ys, xs))


def test_augmentation_uses_all_eight_symmetries(dataset):
    shards, samples = dataset
    by_digest = {_digest(s): s for s in samples.values()}
    seen = Counter()
    for i, (lr, hr) in enumerate(iter_pairs(str(shards), SAMPLE, 2, seed=1, crops_per_image=4)):
        crop = to_uint8(hr)
        matches = [k for k in range(8) if _digest(_undo(crop, k)) in by_digest]
        assert matches, "every augmented crop is a flip/rotation of a stored sample"
        seen[matches[0]] += 1
        if i < 8:
            assert_lr_matches(lr, hr, 2)
    assert len(seen) == 8 and sum(seen.values()) == 4 * 48


def _undo(crop: np.ndarray, k: int) -> np.ndarray:
    """Inverse of: hflip if k&1, then vflip if k&2, then transpose if k&4."""
    if k & 4:
        crop = crop.transpose(1, 0, 2)
    if k & 2:
        crop = crop[::-1]
    if k & 1:
        crop = crop[:, ::-1]
    return crop


class _Pairs(IterableDataset):
    """iter_pairs inside DataLoader workers: each worker takes its share of a rank's shards."""

    def __init__(self, shards, rank, world_size):
        self.shards, self.rank, self.world_size = shards, rank, world_size

    def __iter__(self):
        for _, hr in iter_pairs(self.shards, SAMPLE, 4, seed=7, augment=False, rank=self.rank,
                                world_size=self.world_size):
            yield _digest(to_uint8(hr))


@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (3, 0)])
def test_one_pass_visits_every_sample_once_across_ranks_and_workers(dataset, world_size, num_workers):
    shards, samples = dataset
    shard_list = resolve_shards(str(shards))
    seen = []
    for rank in range(world_size):
        loader = DataLoader(_Pairs(shard_list, rank, world_size), batch_size=None, num_workers=num_workers)
        seen += list(loader)
    assert sorted(seen) == sorted(_digest(s) for s in samples.values())


def test_shard_order_partitions_each_pass():
    for num_shards, consumers in [(7, 3), (2, 5), (12, 4)]:
        first_pass = [list(shard_order(num_shards, 0, c, consumers, resampled=False)) for c in range(consumers)]
        assert sorted(sum(first_pass, [])) == list(range(num_shards))
        endless = [shard_order(num_shards, 0, c, consumers, resampled=True) for c in range(consumers)]
        reads = Counter(next(it) for _ in range(num_shards * 6) for it in endless)
        assert set(reads.values()) == {6 * consumers}  # 6 * consumers full passes, each shard once per pass


def test_seed_makes_the_stream_reproducible(dataset):
    shards, _ = dataset

    def run(seed):
        return [hr for _, (_, hr) in zip(range(30), iter_pairs(str(shards), 32, 4, seed=seed, shuffle_buffer=16))]

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 30
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_resampled_stream_continues_past_one_pass(dataset):
    shards, _ = dataset
    stats = DataStats()
    stream = iter_pairs(str(shards), 32, 4, resampled=True, shuffle_buffer=8, stats=stats)
    assert len([p for _, p in zip(range(150), stream)]) == 150
    assert stats.samples >= 150 > 48


def _bad_shards(folder, good_shard):
    """Shards with each kind of bad data; returns the number of good samples they hold."""
    folder.mkdir()
    members = read_tar(good_shard)
    ok = png_bytes(np.full((40, 40, 3), 100, np.uint8))
    write_tar(folder / "a-good.tar", members)
    write_tar(folder / "b-mixed.tar", [("x1.png", ok), ("x1.json", b"{}"),
                                       ("x2.png", b"\x89PNG\r\n\x1a\n garbage"), ("x2.json", b"{}"),  # undecodable
                                       ("x3.txt", b"no image here"),  # not an image
                                       ("x4.png", png_bytes(np.zeros((16, 40, 3), np.uint8))),  # too small
                                       ("x5.png", ok)])
    (folder / "c-garbage.tar").write_bytes(b"this is not a tar file" * 100)
    # cut inside the data of the 4th member: samples 1 (members 1-2) survive, the 2nd loses its json
    with tarfile.open(good_shard) as tar:
        infos = [m for m in tar.getmembers() if m.isfile()]
    cut = infos[3].offset_data + infos[3].size // 2
    (folder / "d-truncated.tar").write_bytes(good_shard.read_bytes()[:cut])
    return len(members) // 2 + 2 + 2


def test_bad_data_is_skipped_counted_and_logged_once_per_shard(dataset, tmp_path, caplog):
    shards, _ = dataset
    good = sorted(shards.glob("*.tar"))[0]
    expected_good = _bad_shards(tmp_path / "bad", good)
    stats = DataStats()
    with caplog.at_level(logging.WARNING, logger="raysr.data.stream"):
        got = list(iter_images(str(tmp_path / "bad"), min_size=32, stats=stats))
    assert len(got) == stats.samples == expected_good
    # mixed: undecodable, not-an-image, too small (3); garbage: 1; truncated: 1 (size unknown)
    assert stats.skipped == 5 and stats.bad_shards == 2 and stats.shards == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3
    assert sum("b-mixed.tar" in w and "skipped 3" in w for w in warnings) == 1
    assert sum("c-garbage.tar" in w for w in warnings) == sum("d-truncated.tar" in w for w in warnings) == 1


def _bad_shard_warnings(records) -> Counter:
    return Counter(name for r in records for name in ("b-mixed", "c-garbage", "d-truncated")
                   if f"{name}.tar" in r.getMessage())


def test_bad_shards_are_logged_once_per_stream_not_once_per_process(dataset, tmp_path, caplog):
    shards, _ = dataset
    expected_good = _bad_shards(tmp_path / "bad", sorted(shards.glob("*.tar"))[0])
    stats = DataStats()
    first = iter_images(str(tmp_path / "bad"), min_size=32, resampled=True, stats=stats)
    with caplog.at_level(logging.WARNING, logger="raysr.data.stream"):
        # 4 passes and a bit: pass 5 begins only after pass 4's last good sample
        for _ in range(4 * expected_good + 1):
            next(first)
    assert stats.shards >= 4 * 4 + 1 and stats.skipped >= 4 * 5
    assert _bad_shard_warnings(caplog.records) == {"b-mixed": 1, "c-garbage": 1, "d-truncated": 1}
    caplog.clear()
    # an independent stream in the same process (a new loader, validation, a test) reports its own
    with caplog.at_level(logging.WARNING, logger="raysr.data.stream"):
        assert len(list(iter_images(str(tmp_path / "bad"), min_size=32))) == expected_good
        for _ in range(expected_good):  # the first stream, still running, stays quiet
            next(first)
    assert _bad_shard_warnings(caplog.records) == {"b-mixed": 1, "c-garbage": 1, "d-truncated": 1}


def test_manifest_sizes_count_every_sample_a_truncated_shard_lost(dataset, tmp_path):
    shards, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    victim = sorted(copy.glob("*.tar"))[1]
    total = len(read_tar(victim)) // 2
    victim.write_bytes(victim.read_bytes()[:1536 + 700])  # inside the first member's data
    stats = DataStats()
    assert len(list(iter_images(str(copy), stats=stats))) == 48 - total
    assert stats.skipped == total and stats.bad_shards == 1


def test_only_bad_shards_raise_instead_of_hanging(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"garbage" * 50)
    (tmp_path / "b.tar").write_bytes(b"")
    with pytest.raises(RuntimeError, match="none of the 2 shards"):
        next(iter_pairs(str(tmp_path), 32, 4, resampled=True))


def test_missing_shard_names_the_url(tmp_path, dataset):
    shards, _ = dataset
    missing = str(tmp_path / "train-000099.tar")
    with pytest.raises(StorageError, match="train-000099.tar does not exist"):
        list(iter_pairs([str(sorted(shards.glob("*.tar"))[0]), missing], 32, 4, shuffle_buffer=0))
    with pytest.raises(ValueError, match="no shards found"):
        resolve_shards(str(tmp_path / "nothing-*.tar"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(gt_size=30, scale=4), "gt_size=30 is not a multiple of scale=4.*use gt_size=28 or 32"),
    (dict(gt_size=32, scale=4, rank=2, world_size=2), "rank=2 must be < world_size=2"),
    (dict(gt_size=32, scale=0), "scale must be an integer >= 1"),
    (dict(gt_size=32, scale=4, crops_per_image=0), "crops_per_image must be an integer >= 1"),
    (dict(gt_size=32, scale=4, seed=-1), "seed must be an integer >= 0"),
])
def test_bad_arguments_are_explained(dataset, kwargs, message):
    shards, _ = dataset
    with pytest.raises(ValueError, match=message):
        next(iter_pairs(str(shards), **kwargs))


def test_make_lr_batched_matches_reference_and_checks_sizes():
    hr = torch.rand(3, 3, 24, 36)
    lr = make_lr(hr, 3)
    assert lr.shape == (3, 3, 8, 12)
    for i in range(3):
        assert_lr_matches(lr[i], hr[i], 3)
        assert torch.equal(make_lr(hr[i], 3), lr[i])
    raw = make_lr(hr, 3, quantize=False)
    assert not torch.equal(raw, lr) and (raw - lr).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="25x36 is not a multiple of scale=3"):
        make_lr(torch.rand(3, 25, 36), 3)


def test_shard_sources_expand_patterns_directories_and_manifests(dataset):
    shards, _ = dataset
    files = sorted(str(p) for p in shards.glob("*.tar"))
    from_dir = resolve_shards(str(shards))
    assert from_dir.urls == files and from_dir.num_samples == 48
    pattern = str(shards / f"train-{{000000..{len(files) - 1:06d}}}.tar")
    from_pattern = resolve_shards(pattern)
    assert from_pattern.urls == files and from_pattern.num_samples == 48  # sizes from the manifest beside them
    assert resolve_shards(str(shards / "manifest.parquet")).urls == files
    assert resolve_shards([files[1], files[0], files[1]]).urls == [files[1], files[0]]
