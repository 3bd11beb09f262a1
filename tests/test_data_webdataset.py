"""Shards written by another tool (``webdataset.ShardWriter``, no manifest) in S3 stream and train.

Real components: shards written by webdataset's own ShardWriter, uploaded to the moto S3
server on loopback, grouped by webdataset's own reader as the reference, decoded by
Pillow; the end-to-end run goes through ``raysr.train.main`` on the session's local Ray.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raysr import storage
from raysr.data import check_train_shards, iter_images, iter_pairs, make_train_loader
from raysr.data.samples import split_member_name, tar_samples
from test_data_common import assert_lr_matches, png_bytes, to_uint8, write_images, write_tar
from conftest import synthetic_image

SIZE = 48  # every image is SIZE x SIZE, so an un-augmented SIZE crop is the whole image
# (ShardWriter __key__, image field, Pillow format, json member?): keys with dots, every format
# family the decoder reads, with and without json
SAMPLES = [("img00.crop", "jpg", "JPEG", True), ("img01.crop", "png", "PNG", True),
           ("scan/img02.v2.final", "jpeg", "JPEG", False), ("img03", "webp", "WEBP", True),
           ("img04.x", "ppm", "PPM", False), ("img05", "tif", "TIFF", True), ("img06.y", "bmp", "BMP", False)]


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    options = {"JPEG": dict(quality=95), "WEBP": dict(lossless=True)}.get(fmt, {})
    Image.fromarray(image).save(buf, fmt, **options)
    return buf.getvalue()


def write_shardwriter_shards(folder: Path, samples, maxcount: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Shards ``folder/part-%06d.tar`` written by webdataset.ShardWriter; returns the WebDataset key
    of each sample -> its pixels as Pillow decodes the stored bytes (JPEG is lossy)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    with wds.ShardWriter(str(folder / "part-%06d.tar"), maxcount=maxcount, verbose=0) as writer:
        for i, (key, field, fmt, with_json) in enumerate(samples):
            data = _encoded(synthetic_image(SIZE, SIZE, seed + i), fmt)
            writer.write({"__key__": key, field: data, **({"json": {"id": i}} if with_json else {})})
            head, slash, base = key.rpartition("/")  # WebDataset's key: up to the first dot after the last "/"
            expected[head + slash + base.split(".", 1)[0]] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return expected


def upload(folder: Path, bucket: str, prefix: str) -> str:
    client = storage.s3_client()
    for path in sorted(folder.glob("*.tar")):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    name = "raysr-test-webdataset"
    storage.s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def wds_shards(bucket, tmp_path_factory):
    """The 7 samples of SAMPLES in 2 ShardWriter shards in S3; returns (prefix, key -> pixels)."""
    folder = tmp_path_factory.mktemp("wds") / "shards"
    expected = write_shardwriter_shards(folder, SAMPLES, maxcount=4)
    assert len(list(folder.glob("*.tar"))) == 2
    return upload(folder, bucket, "wds/hr"), expected


def test_member_names_split_as_webdataset_splits_them():
    from webdataset.tariterators import base_plus_ext

    for name in ["a.jpg", "a/b.c.jpg", "dir.x/img.001.PNG", "x/y/z.tar.gz", "k.seg.png", "a_b-c.json",
                 "deep/er/K.JPEG", "a/b/c"]:
        key, ext = base_plus_ext(name)
        assert split_member_name(name) == (None if key is None else (key, ext.lower())), name
    # skipped: no dot, WebDataset metadata, hidden files and macOS "._" forks
    for name in ["README", "__index__", "__meta__/x.json", "x/.DS_Store", "._a.jpg", "d/._a.jpg"]:
        assert split_member_name(name) is None, name


def test_samples_group_as_webdataset_reads_them(wds_shards):
    import webdataset as wds

    prefix, expected = wds_shards
    urls = [f"{prefix}/part-{i:06d}.tar" for i in range(2)]
    reference = [(s["__key__"], sorted(k for k in s if not k.startswith("__")))
                 for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    ours = []
    for url in urls:
        with storage.open_stream(url) as stream:
            ours += [(key, sorted(files)) for key, files in tar_samples(stream)]
    assert ours == reference
    assert ("img00", ["crop.jpg", "crop.json"]) in ours and ("scan/img02", ["v2.final.jpeg"]) in ours
    assert sorted(key for key, _ in ours) == sorted(expected)


def test_shardwriter_shards_in_s3_stream_exact_pairs(wds_shards):
    prefix, expected = wds_shards
    keys = [key for key, _ in iter_images(prefix)]
    assert sorted(keys) == sorted(expected)
    pairs = list(iter_pairs(prefix, SIZE, 4, augment=False, shuffle_buffer=0))
    assert sorted(to_uint8(hr).tobytes() for _, hr in pairs) == sorted(p.tobytes() for p in expected.values())
    for lr, hr in pairs:
        assert lr.shape == (3, SIZE // 4, SIZE // 4)
        assert_lr_matches(lr, hr, 4)


def _symmetries(image: np.ndarray) -> list[np.ndarray]:
    out = []
    for k in range(4):
        rotated = np.rot90(image, k)
        out += [rotated, rotated[:, ::-1]]
    return out


def test_make_train_loader_streams_them_past_one_pass(wds_shards):
    prefix, expected = wds_shards
    loader = make_train_loader(prefix, 32, 4, 2, num_workers=1, seed=2, shuffle_buffer=4)
    try:
        assert loader.num_samples is None and loader.batches_per_epoch is None
        with pytest.raises(TypeError, match="endless: no manifest.parquet"):
            len(loader)
        batches = iter(loader)
        for _ in range(6):  # 12 crops from 7 samples: more than one pass
            lr, hr = next(batches)
            assert lr.shape == (2, 3, 8, 8) and hr.shape == (2, 3, 32, 32)
            for i in range(2):
                assert_lr_matches(lr[i], hr[i], 4)
                crop = to_uint8(hr[i])
                # a 32x32 window of one stored image under one of the 8 flips/rotations
                assert any(np.array_equal(s[y:y + 32, x:x + 32], crop) for image in expected.values()
                           for s in _symmetries(image) for y in range(SIZE - 31) for x in range(SIZE - 31))
        stats = loader.stats()
        assert stats["samples"] >= 12 and stats["skipped"] == 0
    finally:
        loader.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_without_a_manifest_always_have_a_next_batch(bucket, tmp_path, num_workers):
    """One shard of 3 samples and 2 ranks (x 2 loader workers): a split without resampling would
    leave rank 1 with nothing; each rank draws 5 batches of 2, over three times the dataset."""
    write_shardwriter_shards(tmp_path / "one", SAMPLES[:3], maxcount=10, seed=50)
    url = upload(tmp_path / "one", bucket, f"one-{num_workers}") + "/part-000000.tar"
    for rank in range(2):
        loader = make_train_loader(url, 32, 4, 2, rank=rank, world_size=2, num_workers=num_workers, seed=1,
                                   shuffle_buffer=2)
        try:
            batches = iter(loader)
            for _ in range(5):
                lr, hr = next(batches)
                assert hr.shape == (2, 3, 32, 32)
                assert_lr_matches(lr[0], hr[0], 4)
            assert loader.stats()["samples"] >= 10 > 3
        finally:
            loader.close()


def test_the_check_accepts_any_webdataset_images_and_rejects_other_data(wds_shards, bucket, tmp_path):
    prefix, _ = wds_shards
    check_train_shards(prefix)  # no manifest, dotted keys, jpg first
    check_train_shards(prefix, min_size=SIZE)
    with pytest.raises(ValueError, match=rf"shard {prefix}/part-000000.tar holds no image raysr can train on: "
                                         r"4 samples .*\(first: img00: 48x48 image is smaller than gt_size=64\)"):
        check_train_shards(prefix, min_size=64)

    write_tar(tmp_path / "labels.tar", [(f"s{i}.{ext}", data) for i in range(3)
                                        for ext, data in (("txt", b"a caption"), ("cls", b"7"))])
    labels = upload(tmp_path, bucket, "labels") + "/labels.tar"
    with pytest.raises(ValueError) as err:
        check_train_shards(labels)
    message = str(err.value)
    assert message.startswith(f"shard {labels} holds no image raysr can train on: 3 samples with 3 x .cls, "
                              "3 x .txt (first: s0: no image member (has cls, txt)); ")
    assert "png, jpg, jpeg, webp" in message and "python -m raysr.data.make_shards --input" in message

    # a damaged first shard is passed over as training passes over it; all damaged is explained
    (tmp_path / "a-garbage.tar").write_bytes(b"not a tar" * 100)
    write_tar(tmp_path / "b-good.tar", [("k.png", png_bytes(synthetic_image(40, 40)))])
    check_train_shards([str(tmp_path / "a-garbage.tar"), str(tmp_path / "b-good.tar")])
    with pytest.raises(ValueError, match=r"none of the 1 shards checked is a readable tar file: .*a-garbage.tar"):
        check_train_shards(str(tmp_path / "a-garbage.tar"))


# --------------------------------------------------------------------------- the command a user runs


def _train_argv(train: str, val: str, storage: Path, name: str, steps: int) -> list[str]:
    sets = [f"data.train={train}", f"data.val={val}", f"run.storage={storage}", f"run.name={name}",
            f"train.total_steps={steps}", "model.generator.num_feat=8", "model.generator.num_block=1",
            "data.gt_size=32", "data.batch_size=2", "data.num_workers=0",
            f"run.checkpoint_every={steps}", f"run.val_every={steps}", "run.log_every=1"]
    return ["--preset", "quickstart"] + [arg for item in sets for arg in ("--set", item)]


def test_python_m_raysr_train_on_shardwriter_shards_in_s3(ray_local, wds_shards, tmp_path, capsys):
    from raysr.train import main

    prefix, _ = wds_shards
    write_images(tmp_path / "val", [(40, 44)], seed=70)
    code = main(_train_argv(prefix, str(tmp_path / "val"), tmp_path / "runs", "wds", steps=3))
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "raysr: finished wds at step 3/3" in out
    final = tmp_path / "runs" / "wds" / "checkpoint_00000003"
    assert json.loads((final / "metrics.json").read_text())["step"] == 3
    state = torch.load(final / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 3 and state["config"]["data"]["train"] == [prefix]


def test_python_m_raysr_train_rejects_shards_without_images_before_ray(bucket, tmp_path, capsys, monkeypatch):
    import raysr.train

    write_tar(tmp_path / "labels.tar", [("s0.txt", b"a caption"), ("s0.cls", b"7")])
    labels = upload(tmp_path, bucket, "labels-cli")
    write_images(tmp_path / "val", [(40, 44)], seed=70)
    monkeypatch.setattr(raysr.train, "init_ray", lambda: pytest.fail("Ray started before the data check"))
    code = raysr.train.main(_train_argv(labels, str(tmp_path / "val"), tmp_path / "runs", "bad", steps=3))
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"raysr.train: error: data.train: shard {labels}/labels.tar holds no image raysr can "
                          "train on: 1 samples with 1 x .cls, 1 x .txt")
    assert "python -m raysr.data.make_shards" in err and "Traceback" not in err
