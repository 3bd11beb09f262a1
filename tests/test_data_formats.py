"""Shard formats (png, npy, npy.lz4), the fast PNG decoder, batched crops and flips on the device.

References: Pillow and NumPy's own .npy reader, webdataset's own decoder, per-crop slicing and
np.rot90/np.fliplr for the 8 symmetries, and the independent MATLAB-bicubic reference of
test_data_common for LR.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from raysr.data import iter_images, make_train_loader, read_manifest, resolve_shards
from raysr.data import decode as decode_module
from raysr.data.augment import apply_symmetries, symmetric_view
from raysr.data.decode import DECODE_ERRORS, decode_member, decode_rgb
from raysr.data.device_batches import DeviceBatches
from raysr.data.make_shards import make_shards
from raysr.data.npy import decode_npy, encode_npy
from raysr.data.stream import DataStats, gather_crops
from test_data_common import assert_lr_matches, png_bytes, read_tar, to_uint8, write_images, write_tar

SAMPLE = 64


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The same 4 images of 96x128 cut into 64x64 sub-images as png, npy and npy.lz4 shards;
    returns (format -> shard dir, key -> pixels of the sub-image cut from the source by hand)."""
    root = tmp_path_factory.mktemp("formats")
    sources = write_images(root / "in", [(96, 128)] * 4, seed=30)
    shards = {}
    for fmt in ("png", "npy", "npy.lz4"):
        shards[fmt] = root / fmt
        make_shards([str(root / "in")], str(shards[fmt]), crop_size=SAMPLE, step=32, min_size=16,
                    fmt=fmt, shard_size_mb=0.2, workers=1, progress=False)
    expected = {}
    for name, member in [m for tar in sorted(shards["png"].glob("*.tar")) for m in read_tar(tar)]:
        if name.endswith(".json"):
            meta = json.loads(member)
            left, top, right, bottom = meta["box"]
            expected[name[:-5]] = sources[meta["source"][:-4]][top:bottom, left:right]
    return shards, expected


def test_npy_shards_hold_npy_members_webdataset_decodes(formats):
    import webdataset as wds

    shards, expected = formats
    urls = [str(p) for p in sorted(shards["npy"].glob("*.tar"))]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        assert set(sample) >= {"__key__", "npy", "json"}
        seen[sample["__key__"]] = sample["npy"]
    assert seen.keys() == expected.keys() and len(seen) == 4 * 6
    for key, pixels in seen.items():
        assert pixels.dtype == np.uint8 and pixels.shape == (SAMPLE, SAMPLE, 3)
        assert np.array_equal(pixels, expected[key])


def test_npy_lz4_members_are_lz4_frames_of_npy_files(formats):
    import lz4.frame

    shards, expected = formats
    members = dict(m for tar in sorted(shards["npy.lz4"].glob("*.tar")) for m in read_tar(tar))
    assert {n.split(".", 1)[1] for n in members} == {"npy.lz4", "json"}
    for key, pixels in expected.items():
        assert np.array_equal(np.load(io.BytesIO(lz4.frame.decompress(members[f"{key}.npy.lz4"]))), pixels)


def test_the_manifest_records_the_format(formats):
    shards, _ = formats
    for fmt, folder in shards.items():
        assert read_manifest(str(folder / "manifest.parquet")).format == fmt
        shard_list = resolve_shards(str(folder))
        assert shard_list.format == fmt and shard_list.num_samples == 24
    mixed = resolve_shards([str(shards["png"]), str(shards["npy"])])
    assert mixed.format is None and mixed.num_samples == 48


def test_every_format_streams_the_same_pixels_and_npy_without_a_copy(formats):
    shards, expected = formats
    for fmt, folder in shards.items():
        stats = DataStats()
        images = dict(iter_images(str(folder), stats=stats))
        assert images.keys() == expected.keys() and stats.skipped == 0, fmt
        for key, pixels in images.items():
            assert np.array_equal(pixels, expected[key]), (fmt, key)
        if fmt == "npy":  # a view of the member's bytes
            assert all(not pixels.flags.owndata and not pixels.flags.writeable for pixels in images.values())


def test_npy_members_of_other_tools():
    rgb = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)

    def npy(array):
        buf = io.BytesIO()
        np.save(buf, array)
        return buf.getvalue()

    assert np.array_equal(decode_member("npy", npy(rgb)), rgb)
    assert np.array_equal(decode_member("x.npy", npy(np.asfortranarray(rgb))), rgb)
    assert np.array_equal(decode_npy(npy(rgb[:, :, 0])), np.repeat(rgb[:, :, :1], 3, axis=2))
    assert np.array_equal(decode_npy(npy(rgb[:, :, :1])), np.repeat(rgb[:, :, :1], 3, axis=2))
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 9, np.uint8)], axis=2)
    assert np.array_equal(decode_npy(npy(rgba)), rgb)
    assert np.array_equal(decode_member("npy.lz4", encode_npy(rgb, compressed=True)), rgb)
    cases = [(npy(rgb.astype(np.float32)), "float32 array of shape (5, 7, 3)"),
             (npy(rgb.transpose(2, 0, 1).copy()), "shape (3, 5, 7)"),
             (npy(rgb)[:-10], "truncated"),
             (png_bytes(rgb), "not a .npy file")]
    for data, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            decode_npy(data)
    with pytest.raises(ValueError, match="not a valid LZ4 frame"):
        decode_npy(b"not lz4 at all", "npy.lz4")


def test_bad_npy_members_are_skipped_and_counted(tmp_path):
    good = encode_npy(np.full((40, 40, 3), 7, np.uint8))
    write_tar(tmp_path / "a.tar", [("x1.npy", good), ("x2.npy", good[:-5]), ("x3.npy", b"junk"),
                                   ("x4.npy.lz4", b"junk"), ("x5.npy.lz4", encode_npy(np.zeros((40, 40, 3), np.uint8),
                                                                                      compressed=True))])
    stats = DataStats()
    keys = [key for key, _ in iter_images(str(tmp_path / "a.tar"), stats=stats)]
    assert keys == ["x1", "x5"] and stats.skipped == 3


def _png_variants() -> dict[str, bytes]:
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (21, 34, 3), dtype=np.uint8)
    out = {"rgb": png_bytes(rgb)}
    for name, image, options in [("interlaced", Image.fromarray(rgb), {"interlace": 1}),
                                 ("trns", Image.fromarray(rgb), {"transparency": (1, 2, 3)}),
                                 ("gray", Image.fromarray(rgb[:, :, 0]), {}),
                                 ("palette", Image.fromarray(rgb).quantize(16), {}),
                                 ("rgba", Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])), {}),
                                 ("rgb16", Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257), {})]:
        buf = io.BytesIO()
        image.save(buf, "PNG", **options)
        out[name] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the EXIF path must stay Pillow's
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", exif=exif)
    out["exif"] = buf.getvalue()
    return out


def test_the_fast_png_decoder_gives_pillows_pixels(monkeypatch):
    pytest.importorskip("pyspng")
    variants = _png_variants()
    fast = {name: decode_rgb(data) for name, data in variants.items()}
    monkeypatch.setattr(decode_module, "pyspng", None)
    for name, data in variants.items():
        assert np.array_equal(fast[name], decode_rgb(data)), name
    assert fast["exif"].shape == (34, 21, 3)  # the orientation was applied
    for bad in (variants["rgb"][:60], variants["rgb"][:-30]):  # errors as Pillow raises them
        monkeypatch.setattr(decode_module, "pyspng", None)
        with pytest.raises(DECODE_ERRORS) as pillow:
            decode_rgb(bad)
        monkeypatch.undo()
        with pytest.raises(DECODE_ERRORS) as ours:
            decode_rgb(bad)
        assert type(ours.value) is type(pillow.value)


def test_crops_of_one_image_are_one_gather_of_the_same_windows():
    image = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)[:, ::-1]  # any strides
    tops, lefts = np.array([0, 34, 5, 34]), np.array([54, 0, 13, 54])
    crops = gather_crops(image, tops, lefts, 16)
    assert crops.shape == (4, 16, 16, 3)
    for crop, top, left in zip(crops, tops, lefts):
        assert np.array_equal(crop, image[top:top + 16, left:left + 16])


def test_the_eight_symmetries_on_the_host_and_on_the_device_agree():
    crop = np.random.default_rng(2).integers(0, 256, (9, 9, 3), dtype=np.uint8)
    dihedral = [np.rot90(c, k) for c in (crop, np.fliplr(crop)) for k in range(4)]
    views = [symmetric_view(crop, s) for s in range(8)]
    assert sorted(v.tobytes() for v in views) == sorted(d.tobytes() for d in dihedral)
    batch = torch.from_numpy(np.stack([crop] * 8))
    out = apply_symmetries(batch, torch.arange(8))
    for s in range(8):
        assert np.array_equal(out[s].numpy(), views[s])
    with pytest.raises(ValueError, match="square"):
        apply_symmetries(torch.zeros(1, 4, 5, 3), torch.zeros(1))


def _is_symmetric_window(crop: np.ndarray, images) -> bool:
    """True if ``crop`` is, under one of the 8 symmetries (np.rot90 of it or of its mirror), a window
    of one of ``images``, pixel for pixel."""
    size = crop.shape[0]
    for undone in [np.rot90(c, k) for c in (crop, np.fliplr(crop)) for k in range(4)]:
        for image in images:
            ys, xs = np.nonzero((image[:-size + 1, :-size + 1] == undone[0, 0]).all(axis=2))
            if any(np.array_equal(image[y:y + size, x:x + size], undone) for y, x in zip(ys, xs)):
                return True
    return False


@pytest.mark.parametrize("fmt", ["npy", "png"])
def test_flips_and_lr_on_the_device_match_the_loader_path_and_the_reference(formats, fmt):
    shards, expected = formats
    args = dict(gt_size=32, scale=4, batch_size=4, num_workers=0, seed=9, crops_per_image=3, batches_per_epoch=6,
                shuffle_buffer=8)
    on_loader = make_train_loader(str(shards[fmt]), lr_on="loader", **args)
    on_device = make_train_loader(str(shards[fmt]), lr_on="device", **args)
    here = DeviceBatches(on_loader, torch.device("cpu"), 4, "loader")
    there = DeviceBatches(on_device, torch.device("cpu"), 4, "device")
    for _ in range(6):
        lr_a, hr_a, usm_a = here.next()
        lr_b, hr_b, usm_b = there.next()
        assert usm_a is None and usm_b is None  # no sharpened target without data.degradation=realesrgan
        assert torch.equal(hr_a, hr_b) and torch.equal(lr_a, lr_b)
        assert hr_b.shape == (4, 3, 32, 32) and hr_b.dtype == torch.float32 and hr_b.is_contiguous()
        for lr, hr in zip(lr_b, hr_b):
            assert_lr_matches(lr, hr, 4)
            assert _is_symmetric_window(to_uint8(hr), expected.values())
    raw = next(on_device.host_batches())  # as the loader ships it: uint8 crops as stored, and their symmetries
    assert raw.hr.dtype == torch.uint8 and raw.hr.shape == (4, 32, 32, 3) and raw.lr is None
    assert raw.symmetries.dtype == torch.int64 and raw.symmetries.shape == (4,)
    with pytest.raises(ValueError, match="lr_on='loader' but the loader was made with lr_on='device'"):
        DeviceBatches(on_device, torch.device("cpu"), 4, "loader")
    here.close()
    there.close()
