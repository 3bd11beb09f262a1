"""make_train_loader: equal batches on every rank, an endless stream without a manifest, LR in the loader or on
the device, counters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysr.data import epoch_batches, make_lr, make_train_loader
from raysr.data.make_shards import make_shards
from test_data_common import assert_lr_matches, png_bytes, write_images, write_tar


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """13 samples of 48x48 in shards of unequal size, with a manifest: ranks get unequal shares."""
    root = tmp_path_factory.mktemp("loader")
    write_images(root / "in", [(96, 144), (96, 96), (48, 144)], seed=20)  # 6 + 4 + 3 crops at 48/48
    report = make_shards([str(root / "in")], str(root / "shards"), crop_size=48, step=48, min_size=16,
                         shard_size_mb=0.055, workers=1, progress=False)
    return root / "shards", report


def test_every_rank_gets_the_same_number_of_batches(uneven):
    shards, report = uneven
    counts = [e.samples for e in report.entries]
    assert len(counts) >= 2 and len(set(counts)) > 1  # the shards really are uneven
    total = sum(counts)
    for world_size, workers in [(2, 0), (3, 2)]:
        expected = total * 2 // (world_size * 4)  # crops_per_image=2, batch_size=4
        for rank in range(world_size):
            loader = make_train_loader(str(shards), 32, 4, 4, rank=rank, world_size=world_size, num_workers=workers,
                                       seed=1, crops_per_image=2, shuffle_buffer=8)
            try:
                assert len(loader) == expected and loader.num_samples == total
                for _ in range(2):  # two epochs
                    batches = list(loader)
                    assert len(batches) == expected
                lr, hr = batches[-1]
                assert lr.shape == (4, 3, 8, 8) and hr.shape == (4, 3, 32, 32)
                assert hr.dtype == lr.dtype == torch.float32 and 0 <= hr.min() and hr.max() <= 1
                assert_lr_matches(lr[0], hr[0], 4)
                stats = loader.stats()
                assert stats["samples"] >= 2 * expected * 4 / 2 and stats["skipped"] == 0
            finally:
                loader.close()


def test_lr_on_device_leaves_lr_to_the_caller(uneven):
    shards, _ = uneven
    args = dict(rank=0, world_size=1, num_workers=0, seed=3, batches_per_epoch=3, shuffle_buffer=4)
    on_loader = list(make_train_loader(str(shards), 32, 4, 4, lr_on="loader", **args))
    on_device = list(make_train_loader(str(shards), 32, 4, 4, lr_on="device", **args))
    for (lr, hr), (none, hr_device) in zip(on_loader, on_device):
        assert none is None and torch.equal(hr, hr_device)
        assert torch.equal(make_lr(hr_device, 4), lr)


def test_same_seed_same_batches_whatever_the_process(uneven):
    shards, _ = uneven
    args = dict(rank=1, world_size=2, seed=9, batches_per_epoch=4, shuffle_buffer=6)
    in_process = list(make_train_loader(str(shards), 32, 2, 3, num_workers=0, **args))
    again = list(make_train_loader(str(shards), 32, 2, 3, num_workers=0, **args))
    in_worker = make_train_loader(str(shards), 32, 2, 3, num_workers=1, **args)
    try:
        from_worker = list(in_worker)
    finally:
        in_worker.close()
    for (lr_a, hr_a), (lr_b, hr_b), (lr_c, hr_c) in zip(in_process, again, from_worker):
        assert torch.equal(hr_a, hr_b) and torch.equal(hr_a, hr_c) and torch.equal(lr_a, lr_c)
    other = list(make_train_loader(str(shards), 32, 2, 3, num_workers=0, **{**args, "seed": 10}))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(in_process, other))


def test_bad_shards_are_counted_not_fatal(uneven, tmp_path):
    shards, _ = uneven
    mixed = [str(p) for p in sorted(shards.glob("*.tar"))]
    write_tar(tmp_path / "broken.tar", [("a.png", b"not a png"), ("b.png", png_bytes(np.zeros((8, 8, 3), np.uint8)))])
    loader = make_train_loader(mixed + [str(tmp_path / "broken.tar")], 32, 4, 4, num_workers=0,
                               batches_per_epoch=20, shuffle_buffer=4)
    assert len(list(loader)) == 20
    stats = loader.stats()
    assert stats["skipped"] >= 2 and stats["skipped"] % 2 == 0  # both samples, each time it is read
    assert stats["samples"] > 0 and stats["bad_shards"] == 0


def test_without_a_manifest_the_stream_is_endless_and_epochs_are_optional(uneven, tmp_path):
    shards, report = uneven
    plain = [str(p) for p in sorted(shards.glob("*.tar"))]
    for p in plain:  # the same shards without their manifest
        (tmp_path / p.rsplit("/", 1)[1]).write_bytes(open(p, "rb").read())
    endless = make_train_loader(str(tmp_path), 32, 4, 4, num_workers=0, shuffle_buffer=4)
    assert endless.num_samples is None and endless.batches_per_epoch is None
    with pytest.raises(TypeError, match="endless"):
        len(endless)
    batches = iter(endless)
    for _ in range(3 * report.samples // 4 + 1):  # more than three passes over the 13 samples
        lr, hr = next(batches)
        assert_lr_matches(lr[0], hr[0], 4)
    assert len(make_train_loader(str(tmp_path), 32, 4, 4, num_workers=0, batches_per_epoch=7)) == 7
    assert len(list(make_train_loader(str(tmp_path), 32, 4, 4, num_workers=0, batches_per_epoch=7))) == 7
    assert epoch_batches(100, 3, 4, 16, None) == 4  # 300 crops // 64
    assert epoch_batches(10, 1, 2, 16, None) == 1  # less than one batch: the stream repeats it
    assert epoch_batches(None, 1, 2, 16, None) is None and epoch_batches(None, 1, 2, 16, 5) == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(gt_size=30), "not a multiple of scale=4"),
    (dict(lr_on="gpu"), "lr_on must be one of"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(num_workers=-1), "num_workers must be an integer >= 0"),
    (dict(rank=3, world_size=2), "rank=3 must be < world_size=2"),
])
def test_bad_settings_are_explained(uneven, kwargs, message):
    shards, _ = uneven
    args = {**dict(gt_size=32, scale=4, batch_size=4, num_workers=0), **kwargs}
    with pytest.raises(ValueError, match=message):
        make_train_loader(str(shards), **args)


def _realesrgan_opts():
    from raysr.config import load_config
    return load_config(overrides=["data.degradation=realesrgan", "data.gt_size=32", "degradation.crop_pad_size=64",
                                  "degradation.resize_range=[0.2, 1.5]"]).realesrgan


@pytest.fixture(scope="module")
def uneven_pairs(uneven):
    """The images of ``uneven`` with x2 LR images (Pillow's bicubic), as LR/HR pair shards."""
    from PIL import Image

    shards, _ = uneven
    root = shards.parent
    (root / "in_lr").mkdir()
    for path in sorted((root / "in").glob("*.png")):
        with Image.open(path) as hr:
            hr.resize((hr.width // 2, hr.height // 2), Image.BICUBIC).save(root / "in_lr" / path.name)
    make_shards([str(root / "in")], str(root / "pair_shards"), crop_size=48, step=48, min_size=16,
                shard_size_mb=0.055, workers=1, progress=False, lr_input=str(root / "in_lr"), scale=2)
    return root / "pair_shards"


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", ["bicubic", "realesrgan", "paired"])
def test_a_loader_made_at_a_saved_position_continues_the_uninterrupted_stream(uneven, uneven_pairs, num_workers,
                                                                              kind):
    """What a resume does: a loader that handed out 5 batches is stopped and a new one made at its position;
    the next batches equal those of the same loader run on (shard order, crops, flips, shuffle buffer,
    kernels, paired LR crops), whichever DataLoader worker made them."""
    shards = uneven_pairs if kind == "paired" else uneven[0]
    args = dict(gt_size=32, scale=2, batch_size=3, rank=1, world_size=2, num_workers=num_workers, seed=7,
                shuffle_buffer=5, batches_per_epoch=1000, degradation=_realesrgan_opts() if kind == "realesrgan" else None,
                paired=kind == "paired")

    def take(loader, n):
        batches = loader.host_batches()
        return [next(batches) for _ in range(n)]

    uninterrupted = make_train_loader(str(shards), **args)
    interrupted = make_train_loader(str(shards), **args)
    try:
        expected = take(uninterrupted, 9)
        before = take(interrupted, 5)
        position = interrupted.position()
        interrupted.close()  # the killed worker
        assert position == {"seed": 7, "consumed": 5}
        resumed = make_train_loader(str(shards), **{**args, **position})
        after = take(resumed, 4)
        assert resumed.position()["consumed"] == 9
    finally:
        for loader in (uninterrupted, interrupted):
            loader.close()
    for got, want in zip(before + after, expected):
        assert torch.equal(got.hr, want.hr)
        assert (got.lr is None and want.lr is None) or torch.equal(got.lr, want.lr)
        assert kind != "paired" or got.lr.shape == (3, 3, 16, 16)  # the LR crops travel with the HR ones
        assert (got.symmetries is None and want.symmetries is None) or torch.equal(got.symmetries, want.symmetries)
    assert not torch.equal(expected[5].hr, expected[0].hr)  # the stream moved on
