"""raysr.upscale and raysr.images: tiling, checkpoint layouts, image formats, bad inputs."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch import nn

from raysr.generator_file import save_generator
from raysr.data.decode import decode_rgb
from raysr.images import DecodedImage, ImageError, decode_image, encode_image
from raysr.models import build_generator
from raysr.ops.resize import imresize
from raysr.inference import DEFAULT_TILE_PAD, upscale_tensor
from raysr.upscale import UpscaleOptions, Upscaler, build_parser, main, upscale_image

REPO = Path(__file__).resolve().parents[1]
TINY = {"rrdbnet": dict(num_feat=8, num_block=1, num_grow_ch=4), "srresnet": dict(num_feat=8, num_block=1),
        "srcnn": dict(num_feat=(8, 4), kernel_sizes=(5, 1, 3)), "vdsr": dict(num_feat=8, num_layer=4),
        "compact": dict(num_feat=8, num_conv=2)}


def tiny_generator(name: str = "rrdbnet", scale: int = 4, seed: int = 0, **kwargs) -> nn.Module:
    """A small generator (``kwargs`` override the TINY sizes) whose output varies inside [0, 1]
    (random init alone gives a near-constant image)."""
    torch.manual_seed(seed)
    model = build_generator(name, scale=scale, **{**TINY[name], **kwargs}).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv in convs:
            conv.weight.normal_(0, conv.weight[0].numel() ** -0.5)
            if conv.bias is not None:
                conv.bias.normal_(0, 0.02)
        convs[-1].weight.mul_(0.3)
        if name in ("rrdbnet", "srcnn"):  # no input skip: centre the output in [0, 1]
            convs[-1].bias.add_(0.5)
    return model


def model_output(model: nn.Module, rgb: np.ndarray, peak: int = 255) -> np.ndarray:
    """The network on an (H, W, 3) integer image scaled to [0, 1]: (sH, sW, 3) float64, clamped."""
    x = torch.from_numpy(rgb.astype(np.float32) / peak).permute(2, 0, 1)[None]
    with torch.no_grad():
        return model(x)[0].clamp(0, 1).permute(1, 2, 0).double().numpy()


def expected_sr(model: nn.Module, rgb: np.ndarray, peak: int = 255) -> np.ndarray:
    """What upscale must write for an (H, W, 3) image: the network output rounded to integers."""
    return np.rint(model_output(model, rgb, peak) * peak)


def save_png(path: Path, array: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def run(argv) -> int:
    """main(argv) as the shell sees it: argparse errors also become exit codes."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def assert_close_uint(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to one quantisation step (float32 rounding can flip a .5 tie)."""
    assert actual.shape == expected.shape
    diff = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


# --------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("name,scale,size,tile,pad", [
    ("rrdbnet", 4, (30, 26), 16, 20),   # receptive field ~19 LR px
    ("rrdbnet", 2, (29, 35), 20, 40),   # pixel-unshuffled: odd sizes are padded, field ~38 px
    ("srresnet", 3, (25, 31), 10, 8),
    ("srcnn", 4, (22, 27), 8, 8),
])
def test_tiled_equals_untiled(name, scale, size, tile, pad, make_image):
    model = tiny_generator(name, scale)
    lr = torch.from_numpy(make_image(*size, seed=3)).permute(2, 0, 1)[None].float() / 255
    whole = upscale_tensor(model, lr)
    tiled = upscale_tensor(model, lr, tile=tile, tile_pad=pad)
    assert whole.shape == (1, 3, size[0] * scale, size[1] * scale)
    assert whole.std() > 0.02  # a real image, not a constant
    assert (tiled - whole).abs().max() < 1e-5


@pytest.mark.slow  # a 23-block RRDBNet on CPU
def test_full_depth_rrdbnet_tiles_within_one_level_at_the_default_pad(make_image):
    """ESRGAN's 23-block RRDBNet sees ~700 LR px, far more than any pad: tiling changes
    its output, and the default pad must keep that change under one 8-bit level."""
    model = tiny_generator("rrdbnet", 4, num_feat=64, num_block=23, num_grow_ch=32)
    # 40 LR rows: the first 16-px tile with its 16-px pad reaches row 32 only (on a 32-px side every
    # padded tile would be the whole image, and tiling could not change anything)
    lr = torch.from_numpy(make_image(40, 32, seed=3)).permute(2, 0, 1)[None].float() / 255
    whole = upscale_tensor(model, lr)
    assert whole.std() > 0.1
    assert build_parser().parse_args(["--model", "m", "--input", "i", "--output", "o"]).tile_pad == DEFAULT_TILE_PAD
    seam = (upscale_tensor(model, lr, tile=16) - whole).abs().max().item()
    assert seam <= 1 / 255
    # the test can fail: with too little context the tile borders show
    assert (upscale_tensor(model, lr, tile=16, tile_pad=4) - whole).abs().max().item() > 1 / 255


def test_bf16_autocast_on_cpu_is_close_but_not_fp32(make_image):
    model = tiny_generator("srresnet", 4)
    lr = torch.from_numpy(make_image(16, 16, seed=5)).permute(2, 0, 1)[None].float() / 255
    fp32, bf16 = upscale_tensor(model, lr), upscale_tensor(model, lr, precision="bf16")
    assert 0 < (bf16 - fp32).abs().max() < 0.05


# --------------------------------------------------------------------------- checkpoint layouts


def to_esrgan_layouts(params: dict[str, torch.Tensor], num_block: int) -> dict[str, dict]:
    """BasicSR RRDBNet names -> the ESRGAN repo's newer names and its 2018 release names."""
    new, old = {}, {}
    top = {"conv_first": ("conv_first", "model.0"), "conv_body": ("trunk_conv", f"model.1.sub.{num_block}"),
           "conv_up1": ("upconv1", "model.3"), "conv_up2": ("upconv2", "model.6"),
           "conv_hr": ("HRconv", "model.8"), "conv_last": ("conv_last", "model.10")}
    for key, value in params.items():
        parts = key.split(".")
        if parts[0] == "body":  # body.N.rdbK.convJ.(weight|bias)
            n, rdb, conv, kind = parts[1], parts[2].upper(), parts[3], parts[4]
            new[f"RRDB_trunk.{n}.{rdb}.{conv}.{kind}"] = value
            old[f"model.1.sub.{n}.{rdb}.{conv}.0.{kind}"] = value
        else:
            new_name, old_name = top[parts[0]]
            new[f"{new_name}.{parts[1]}"] = value
            old[f"{old_name}.{parts[1]}"] = value
    return {"esrgan_new": new, "esrgan_2018": old}


def test_every_checkpoint_layout_upscales_identically(tmp_path, make_image):
    model = tiny_generator("rrdbnet", 4, seed=1)
    save_generator(model, tmp_path / "basicsr.pth", fmt="basicsr")
    save_generator(model, tmp_path / "raysr.pth", fmt="raysr")
    save_generator(model, tmp_path / "raysr.safetensors", fmt="raysr")
    save_generator(model, tmp_path / "basicsr.safetensors", fmt="basicsr")
    params = {k: v.clone() for k, v in model.state_dict().items()}
    for layout, state in to_esrgan_layouts(params, num_block=1).items():
        torch.save(state, tmp_path / f"{layout}.pth")
    torch.save({"params_ema": params, "params": {k: v * 0 for k, v in params.items()}}, tmp_path / "ema.pth")
    image = make_image(14, 18, seed=2)
    save_png(tmp_path / "in" / "photo.png", image)
    want = expected_sr(model, image)
    for layout in ("basicsr.pth", "raysr.pth", "esrgan_new.pth", "esrgan_2018.pth", "ema.pth", "raysr.safetensors",
                   "basicsr.safetensors"):
        out = tmp_path / f"out_{layout}"
        assert run(["--model", tmp_path / layout, "--input", tmp_path / "in", "--output", out]) == 0
        got = np.asarray(Image.open(out / "photo.png"))
        assert got.shape == (56, 72, 3)
        assert_close_uint(got, want)


@pytest.mark.parametrize("name,scale,fmt", [("srresnet", 4, "basicsr"), ("srresnet", 3, "raysr"),
                                            ("srcnn", 2, "raysr"), ("vdsr", 3, "raysr")])
def test_other_generators_upscale(name, scale, fmt, tmp_path, make_image):
    model = tiny_generator(name, scale)
    save_generator(model, tmp_path / "g.pth", fmt=fmt)
    image = make_image(11, 13, seed=6)
    save_png(tmp_path / "a.png", image)
    assert run(["--model", tmp_path / "g.pth", "--input", tmp_path / "a.png", "--output", tmp_path / "o"]) == 0
    assert_close_uint(np.asarray(Image.open(tmp_path / "o" / "a.png")), expected_sr(model, image))


def test_srcnn_in_basicsr_format_needs_model_scale(tmp_path, make_image, capsys):
    model = tiny_generator("srcnn", 3)
    save_generator(model, tmp_path / "g.pth", fmt="basicsr")  # BasicSR format does not record SRCNN's scale
    save_png(tmp_path / "a.png", make_image(8, 8))
    assert run(["--model", tmp_path / "g.pth", "--input", tmp_path / "a.png", "--output", tmp_path / "o"]) == 2
    err = capsys.readouterr().err
    assert "SRCNN" in err and "--model-scale N" in err and "load_generator" not in err
    assert not (tmp_path / "o").exists()
    assert run(["--model", tmp_path / "g.pth", "--input", tmp_path / "a.png", "--output", tmp_path / "o",
                "--model-scale", 3]) == 0
    assert Image.open(tmp_path / "o" / "a.png").size == (24, 24)


# --------------------------------------------------------------------------- scale-out, tiles via the CLI


def test_scale_out_resizes_the_sr_output_with_bicubic(tmp_path, make_image):
    model = tiny_generator("srresnet", 4)
    save_generator(model, tmp_path / "g.pth", fmt="raysr")
    image = make_image(10, 13, seed=7)
    save_png(tmp_path / "a.png", image)
    for scale_out, size in ((2, (20, 26)), (1.5, (15, 20))):  # ceil(13 * 1.5) = 20
        out = tmp_path / f"o{scale_out}"
        assert run(["--model", tmp_path / "g.pth", "--input", tmp_path / "a.png", "--output", out,
                    "--scale-out", scale_out]) == 0
        got = np.asarray(Image.open(out / "a.png"))
        assert got.shape[:2] == size
        if scale_out == 2:  # exactly MATLAB imresize(SR, 0.5) of the x4 output
            x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
            with torch.no_grad():
                sr = model(x).clamp(0, 1).double()
            want = np.rint(imresize(sr, 0.5)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255)
            assert_close_uint(got, want)


def test_tiled_cli_matches_untiled_cli(tmp_path, make_image):
    model = tiny_generator("srresnet", 2)
    save_generator(model, tmp_path / "g.pth", fmt="raysr")
    save_png(tmp_path / "a.png", make_image(33, 29, seed=8))
    args = ["--model", tmp_path / "g.pth", "--input", tmp_path / "a.png"]
    assert run(args + ["--output", tmp_path / "whole"]) == 0
    assert run(args + ["--output", tmp_path / "tiled", "--tile", 10, "--tile-pad", 8]) == 0
    whole = np.asarray(Image.open(tmp_path / "whole" / "a.png")).astype(int)
    tiled = np.asarray(Image.open(tmp_path / "tiled" / "a.png")).astype(int)
    assert np.abs(whole - tiled).max() <= 1


# --------------------------------------------------------------------------- --batch-tiles


def batch_inputs(root: Path, make_image) -> None:
    """Three RGB images of one size (with an ICC profile), one of another, RGBA, 16-bit RGB and gray."""
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for i in range(3):
        save_png(root / f"same{i}.png", make_image(12, 10, seed=30 + i), icc_profile=srgb)
    save_png(root / "other.png", make_image(9, 13, seed=33))
    save_png(root / "rgba.png", np.dstack([make_image(12, 10, seed=34), make_image(12, 10, seed=35)[..., :1]]))
    (root / "deep16.png").write_bytes(png16(make_image(12, 10, seed=36).astype(np.uint16) * 257 + 5))
    save_png(root / "gray.png", make_image(12, 10, seed=37)[..., 0])


def decoded_outputs(folder: Path) -> dict[str, DecodedImage]:
    return {p.name: decode_image(p.read_bytes()) for p in sorted(folder.iterdir())}


def test_batch_tiles_within_one_level_of_one_image_at_a_time(tmp_path, make_image, x2_model):
    model, ckpt = x2_model
    batch_inputs(tmp_path / "in", make_image)
    base = ["--model", ckpt, "--input", tmp_path / "in"]
    for name, extra in (("one", []), ("batched", ["--batch-tiles", 4]), ("tiled", ["--tile", 5, "--tile-pad", 8]),
                        ("tiled_batched", ["--tile", 5, "--tile-pad", 8, "--batch-tiles", 16])):
        assert run(base + ["--output", tmp_path / name] + extra) == 0, name
    one = decoded_outputs(tmp_path / "one")
    # one image at a time is the network on that image alone, byte for byte: the same float32 steps by hand
    for i in range(3):
        x = torch.from_numpy(make_image(12, 10, seed=30 + i).astype(np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            sr = model(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()
        assert (one[f"same{i}.png"].pixels == np.rint(np.clip(sr, 0, 1) * 255)).all()
    for name in ("batched", "tiled", "tiled_batched"):
        got = decoded_outputs(tmp_path / name)
        assert got.keys() == one.keys()
        for key, image in got.items():
            ref = one[key]
            assert image.pixels.shape == ref.pixels.shape and image.pixels.dtype == ref.pixels.dtype, (name, key)
            assert image.icc_profile == ref.icc_profile and image.format == ref.format
            assert np.abs(image.pixels.astype(int) - ref.pixels.astype(int)).max() <= 1, (name, key)
    assert one["deep16.png"].bit_depth == 16 and one["rgba.png"].has_alpha and one["gray.png"].grayscale


def test_batch_tiles_puts_equal_shapes_of_several_images_in_one_forward(make_image, x2_model):
    model, _ = x2_model
    shapes = []
    model.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(inputs[0].shape)))
    images = [DecodedImage(make_image(*size, seed=i), "PNG") for i, size in enumerate([(12, 10)] * 5 + [(9, 13)])]
    upscaler = Upscaler([model], UpscaleOptions(batch_tiles=4), torch.device("cpu"))
    groups = list(upscaler.groups(enumerate(images)))
    # a group closes at 4 tiles: images 0-3, then 4-5 (the end); equal shapes share a forward
    assert [[i for i, _, _ in group] for group in groups] == [[0, 1, 2, 3], [4, 5]]
    assert sorted(shapes) == sorted([(4, 3, 12, 10), (1, 3, 12, 10), (1, 3, 9, 13)])
    shapes.clear()
    # 12x10 in tiles of 6 with 2 px of context: 8x8 and 8x6 pieces, two of each per image; both images in one
    # group of 8 tiles, so each shape goes through the network once, 4 pieces at a time
    tiled = Upscaler([model], UpscaleOptions(tile=6, tile_pad=2, batch_tiles=6), torch.device("cpu"))
    (group,) = list(tiled.groups(enumerate(images[:2])))
    assert len(group) == 2 and sorted(shapes) == [(4, 3, 8, 6), (4, 3, 8, 8)]


class FailsOnHeight7(nn.Module):
    """x2 nearest-neighbour upscaling that raises on inputs 7 pixels high: a bad image in a batch."""

    scale = 2

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(0))

    def forward(self, x):
        if x.shape[-2] == 7:
            raise ValueError("cannot upscale a height of 7")
        return x.repeat_interleave(2, -2).repeat_interleave(2, -1)


def test_a_batch_that_fails_is_retried_image_by_image(make_image):
    images = [DecodedImage(make_image(h, 6, seed=h), "PNG") for h in (5, 7, 5)]
    upscaler = Upscaler([FailsOnHeight7()], UpscaleOptions(batch_tiles=8), torch.device("cpu"))
    (group,) = list(upscaler.groups(enumerate(images)))
    outcomes = {i: result for i, _, result in group}
    assert isinstance(outcomes[1], ValueError) and "height of 7" in str(outcomes[1])
    for i in (0, 2):
        assert (outcomes[i][0].pixels == images[i].pixels.repeat(2, 0).repeat(2, 1)).all()


# --------------------------------------------------------------------------- image formats


@pytest.fixture
def x2_model(tmp_path):
    model = tiny_generator("srresnet", 2)
    save_generator(model, tmp_path / "g.pth", fmt="raysr")
    return model, tmp_path / "g.pth"


def test_grayscale_stays_grayscale(tmp_path, make_image, x2_model):
    model, ckpt = x2_model
    gray = make_image(12, 15, seed=9)[..., 1]
    save_png(tmp_path / "in" / "g.png", gray)
    assert run(["--model", ckpt, "--input", tmp_path / "in", "--output", tmp_path / "o"]) == 0
    out = Image.open(tmp_path / "o" / "g.png")
    assert out.mode == "L" and out.size == (30, 24)
    rgb = model_output(model, np.repeat(gray[..., None], 3, axis=2))
    want = np.rint((rgb @ np.array([0.299, 0.587, 0.114])) * 255)  # BT.601 luma
    assert_close_uint(np.asarray(out), want)


def test_alpha_is_upscaled_separately_with_bicubic(tmp_path, make_image, x2_model):
    model, ckpt = x2_model
    rgb = make_image(12, 10, seed=10)
    alpha = make_image(12, 10, seed=11)[..., 0]
    save_png(tmp_path / "a.png", np.dstack([rgb, alpha]))
    assert run(["--model", ckpt, "--input", tmp_path / "a.png", "--output", tmp_path / "o"]) == 0
    out = Image.open(tmp_path / "o" / "a.png")
    assert out.mode == "RGBA"
    got = np.asarray(out)
    assert_close_uint(got[..., :3], expected_sr(model, rgb))
    want_alpha = imresize(torch.from_numpy(alpha / 255.0)[None], 2)[0].clamp(0, 1).numpy()
    assert_close_uint(got[..., 3], np.rint(want_alpha * 255))


def test_alpha_is_resized_in_float32(monkeypatch, make_image, x2_model):
    """Alpha goes through bicubic in float32: float64 would double the resize buffers of large images."""
    import raysr.upscale

    model, _ = x2_model
    seen = []

    def spy(x, scale, *args, **kwargs):
        seen.append(x.dtype)
        return imresize(x, scale, *args, **kwargs)

    monkeypatch.setattr(raysr.upscale, "imresize", spy)
    pixels = np.dstack([make_image(9, 7, seed=4), make_image(9, 7, seed=5)[..., :1]])
    for bits in (8, 16):
        image = DecodedImage(pixels.astype(np.uint16) * 257 if bits == 16 else pixels, "PNG")
        out = upscale_image([model], image)[0]
        assert out.pixels.shape == (18, 14, 4) and out.bit_depth == bits
    assert seen == [torch.float32, torch.float32]


def filter_rows(rows: np.ndarray, bpp: int, kinds: np.ndarray) -> bytes:
    """PNG scanlines (H, row_bytes) uint8 filtered with filter type ``kinds[y]`` on row y,
    byte by byte from the PNG specification (section 9.2); bytes left of / above the image are 0."""
    out = bytearray()
    for y, kind in enumerate(kinds):
        out.append(int(kind))
        for i, raw in enumerate(rows[y].tolist()):
            a = int(rows[y, i - bpp]) if i >= bpp else 0
            b = int(rows[y - 1, i]) if y else 0
            c = int(rows[y - 1, i - bpp]) if y and i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            paeth = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            out.append((raw - (0, a, b, (a + b) // 2, paeth)[kind]) % 256)
    return bytes(out)


def png16(array: np.ndarray, kinds: np.ndarray | None = None) -> bytes:
    """A 16-bit PNG written independently of raysr, with the filter types ``kinds`` per row
    (default: type 0 on every row)."""
    height, width, channels = array.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = np.ascontiguousarray(array, dtype=">u2").view(np.uint8).reshape(height, -1)
    rows = filter_rows(rows, 2 * channels, np.zeros(height, np.int64) if kinds is None else kinds)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16bit_rgb_png_stays_16bit(tmp_path, make_image, x2_model):
    model, ckpt = x2_model
    # low bits carry information: truncating to 8 bits would change the output
    image = make_image(9, 11, seed=12).astype(np.uint16) * 257 + np.arange(99 * 3).reshape(9, 11, 3) % 200
    (tmp_path / "a.png").write_bytes(png16(image))
    assert run(["--model", ckpt, "--input", tmp_path / "a.png", "--output", tmp_path / "o"]) == 0
    data = (tmp_path / "o" / "a.png").read_bytes()
    assert data[24:26] == bytes([16, 2])  # IHDR: bit depth 16, colour type RGB
    got = decode_image(data).pixels
    assert got.dtype == np.uint16
    want = expected_sr(model, image, peak=65535)
    assert_close_uint(got, want)
    # Pillow (an independent decoder) reads 16-bit RGB as the high bytes
    high = np.asarray(Image.open(io.BytesIO(data)))
    assert np.abs(high.astype(int) - (want.astype(int) >> 8)).max() <= 1


def test_16bit_gray_png_with_alpha_and_plain_16bit_gray(tmp_path, make_image, x2_model):
    _, ckpt = x2_model
    gray = make_image(8, 9, seed=13)[..., 0].astype(np.uint16) * 257
    alpha = np.full_like(gray, 40000)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ga.png").write_bytes(png16(np.dstack([gray, alpha])))
    Image.fromarray(gray).save(tmp_path / "in" / "g.png")  # Pillow's own 16-bit gray (mode I;16)
    assert run(["--model", ckpt, "--input", tmp_path / "in", "--output", tmp_path / "o"]) == 0
    ga = decode_image((tmp_path / "o" / "ga.png").read_bytes()).pixels
    assert ga.dtype == np.uint16 and ga.shape == (16, 18, 2)
    assert (ga[..., 1] == 40000).all()  # constant alpha stays constant through bicubic
    g = Image.open(tmp_path / "o" / "g.png")
    assert g.mode.startswith("I") and g.size == (18, 16) and np.asarray(g).max() > 255


def test_png16_decoder_matches_pillow_on_adaptive_filters(make_image):
    gray = (make_image(40, 50, seed=14)[..., 0].astype(np.uint16) * 251 + np.arange(50)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")  # Pillow picks Sub/Up/Average/Paeth per row
    assert (decode_image(buf.getvalue()).pixels[..., 0] == gray).all()


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png16_decoder_every_filter_and_run_length(channels, make_image):
    """Runs of Average/Paeth rows longer than the 512-row sweep, short ones, isolated ones,
    and None/Sub/Up runs between them, against a filter encoder written from the spec."""
    runs = [(4, 530), (2, 3), (3, 1), (1, 2), (3, 9), (4, 7), (0, 1), (3, 20), (4, 1), (2, 40), (3, 2), (4, 30)]
    kinds = np.concatenate([np.full(n, kind) for kind, n in runs])
    image = make_image(len(kinds), 13, seed=channels).astype(np.uint16) * 257
    image = np.dstack([image, image[..., :1] ^ 0x5A5A])[..., :channels]  # low bytes differ from high ones
    image[::7] = 65535 - image[::7]  # large jumps make Paeth pick all three neighbours
    got = decode_image(png16(image, kinds)).pixels
    assert got.dtype == np.uint16 and (got == image).all()


def test_png16_unknown_filter_type_is_reported(make_image):
    data = bytearray(png16(make_image(4, 3, seed=1).astype(np.uint16)))
    start = data.index(b"IDAT") + 4
    end = data.index(b"IEND") - 8
    raw = bytearray(zlib.decompress(bytes(data[start:end])))
    raw[2 * (1 + 3 * 6)] = 5  # row 2's filter byte
    body = zlib.compress(bytes(raw))
    idat = struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body))
    data[start - 8:end + 4] = idat
    with pytest.raises(ImageError, match="row 2 has unknown filter type 5"):
        decode_image(bytes(data))


def test_shard_decoder_rounds_16bit_png_to_8bit(make_image):
    """raysr.data's fast path must not let Pillow truncate 16-bit colour: v/257 rounded, not v >> 8."""
    image = make_image(5, 6, seed=2).astype(np.uint16) * 256 + 200  # dark pixels round up to v + 1
    assert (decode_rgb(png16(image)) == np.rint(image / 257.0)).all()
    assert (decode_rgb(png16(image)) != image >> 8).any()


def test_png16_adam7_interlaced(make_image):
    image = make_image(11, 13, seed=15).astype(np.uint16) * 257
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = image[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.astype(">u2").tobytes() for row in sub)
    data = bytearray(png16(image))
    data[28] = 1  # IHDR interlace method = Adam7; fix the IHDR CRC and the image data
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    start = data.index(b"IDAT") - 4
    end = data.index(b"IEND") - 4
    idat = zlib.compress(raw)
    data[start:end] = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    assert (decode_image(bytes(data)).pixels == image).all()


def test_other_modes_decode_and_encode_back():
    gray16 = (np.arange(48).reshape(6, 8) * 1300).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray16).save(buf, format="TIFF")
    tiff = decode_image(buf.getvalue())
    assert tiff.format == "TIFF" and tiff.bit_depth == 16 and (tiff.pixels[..., 0] == gray16).all()
    back = Image.open(io.BytesIO(encode_image(tiff)))
    assert back.format == "TIFF" and (np.asarray(back) == gray16).all()
    palette = Image.fromarray((np.arange(48).reshape(6, 8) * 5).astype(np.uint8)).convert("P")
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)
    decoded = decode_image(buf.getvalue())
    assert decoded.has_alpha and not decoded.grayscale and decoded.pixels[0, 0, 3] == 0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(orientation, make_image):
    image = make_image(6, 10, seed=16)
    exif = Image.Exif()
    exif[0x0112] = orientation
    for array, fmt in ((image, "JPEG"), (image[..., 0].astype(np.uint16) * 257, "PNG")):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt, exif=exif.tobytes())
        want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
        got = decode_image(buf.getvalue()).pixels
        assert got.shape[:2] == want.shape[:2]
        assert (got.reshape(want.shape) == want).all()


def test_jpeg_output_and_exif_rotation(tmp_path, make_image, x2_model):
    _, ckpt = x2_model
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: upright it is 12 wide, 7 tall
    save_png(tmp_path / "p.jpg", make_image(12, 7, seed=17), exif=exif.tobytes(), quality=95)
    assert run(["--model", ckpt, "--input", tmp_path / "p.jpg", "--output", tmp_path / "o"]) == 0
    out = Image.open(tmp_path / "o" / "p.jpg")
    assert out.format == "JPEG" and out.size == (24, 14)
    assert out.getexif().get(0x0112, 1) == 1


# --------------------------------------------------------------------------- interpolation sweeps


def test_alpha_sweep_writes_one_output_per_alpha(tmp_path, make_image):
    psnr, gan = tiny_generator("rrdbnet", 4, seed=20), tiny_generator("rrdbnet", 4, seed=21)
    save_generator(psnr, tmp_path / "psnr.pth", fmt="basicsr")
    save_generator(gan, tmp_path / "gan.pth", fmt="raysr")
    image = make_image(8, 9, seed=22)
    save_png(tmp_path / "a.png", image)
    assert run(["--model", tmp_path / "psnr.pth", "--model-b", tmp_path / "gan.pth", "--alpha", 0, 0.25, 1,
                "--input", tmp_path / "a.png", "--output", tmp_path / "o"]) == 0
    assert sorted(os.listdir(tmp_path / "o")) == ["a_alpha0.25.png", "a_alpha0.png", "a_alpha1.png"]
    mixed = tiny_generator("rrdbnet", 4)
    mixed.load_state_dict({k: 0.75 * v + 0.25 * gan.state_dict()[k] for k, v in psnr.state_dict().items()})
    for tag, net in (("0", psnr), ("0.25", mixed), ("1", gan)):
        assert_close_uint(np.asarray(Image.open(tmp_path / "o" / f"a_alpha{tag}.png")), expected_sr(net, image))
    assert run(["--model", tmp_path / "psnr.pth", "--model-b", tmp_path / "gan.pth", "--alpha", 0, 1,
                "--side-by-side", "--input", tmp_path / "a.png", "--output", tmp_path / "s"]) == 0
    joined = np.asarray(Image.open(tmp_path / "s" / "a_alpha0-1.png"))
    assert joined.shape == (32, 72, 3)
    assert_close_uint(joined[:, :36], expected_sr(psnr, image))
    assert_close_uint(joined[:, 36:], expected_sr(gan, image))


# --------------------------------------------------------------------------- bad inputs


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, make_image, x2_model, capsys):
    _, ckpt = x2_model
    save_png(tmp_path / "in" / "a.png", make_image(8, 8))
    (tmp_path / "bad.pth").write_bytes(b"\x00garbage" * 10)
    save_generator(tiny_generator("rrdbnet", 2), tmp_path / "x2_rrdb.pth", fmt="raysr")
    (tmp_path / "run").mkdir()
    for name in ("generator.pth", "state.pt", "config.yaml"):
        (tmp_path / "run" / name).write_bytes(b"")
    out = tmp_path / "out"
    cases = [
        (["--model", ckpt, "--input", tmp_path / "missing.png"], "no such file"),
        (["--model", tmp_path / "bad.pth", "--input", tmp_path / "in" / "a.png"], "bad.pth"),
        (["--model", tmp_path / "nothere.pth", "--input", tmp_path / "in" / "a.png"], "nothere.pth"),
        (["--model", ckpt, "--input", tmp_path / "in" / "a.png", "--precision", "fp16", "--device", "cpu"], "fp16"),
        (["--model", ckpt, "--input", tmp_path / "in" / "a.png", "--alpha", 0.5], "--model-b"),
        (["--model", ckpt, "--model-b", ckpt, "--alpha", 1.5, "--input", tmp_path / "in" / "a.png"], "[0, 1]"),
        (["--model", ckpt, "--input", tmp_path / "in" / "a.png", "--scale-out", -1], "--scale-out"),
        (["--model", tmp_path / "run", "--input", tmp_path / "in" / "a.png"],
         f"is a directory; pass the checkpoint file in it, e.g. {tmp_path / 'run' / 'generator.pth'} "
         "(it holds generator.pth, state.pt)"),
        (["--model", ckpt, "--model-b", tmp_path / "x2_rrdb.pth", "--alpha", 0.5, "--input", tmp_path / "in" / "a.png"],
         "--model and --model-b differ in shape at 'conv_first.weight'"),
        (["--model", ckpt, "--input", tmp_path / "in" / "a.png", "--model-scale", 0], "--model-scale"),
        (["--model", ckpt, "--input", tmp_path / "in" / "a.png", "--batch-tiles", 0], "--batch-tiles must be an integer >= 1"),
    ]
    for argv, needle in cases:
        assert run(argv + ["--output", out]) == 2, argv
        assert needle in capsys.readouterr().err, argv
        assert files_under(out) == []
    # the output folder is the input folder: a.png would overwrite itself
    assert run(["--model", ckpt, "--input", tmp_path / "in", "--output", tmp_path / "in"]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_bad_inputs_are_listed_the_rest_is_done_and_a_rerun_skips_what_is_there(tmp_path, make_image, x2_model,
                                                                                 capsys):
    model, ckpt = x2_model
    good = {"a.png": make_image(8, 8), "sub/d.png": make_image(7, 9, seed=4)}
    for name, pixels in good.items():
        save_png(tmp_path / "in" / name, pixels)
    whole = io.BytesIO()
    Image.fromarray(make_image(40, 40, seed=1)).save(whole, format="PNG")
    (tmp_path / "in" / "b.png").write_bytes(whole.getvalue()[:300])  # header fine, pixel data cut
    (tmp_path / "in" / "c.png").write_text("this is not an image")
    save_png(tmp_path / "in" / "e.png", make_image(6, 6, seed=5))
    (tmp_path / "o" / "e.png").mkdir(parents=True)  # its output cannot be written
    argv = ["--model", ckpt, "--input", tmp_path / "in", "--output", tmp_path / "o"]
    assert run(argv) == 3
    err = capsys.readouterr().err
    assert "2 done, 0 skipped (output already there), 3 failed" in err and "_failed.jsonl" in err
    assert "images/s" in err and "MP/s" in err
    failed = [json.loads(line) for line in (tmp_path / "o" / "_failed.jsonl").read_text().splitlines()]
    assert sorted((Path(f["input"]).name, f["stage"]) for f in failed) == \
        [("b.png", "read"), ("c.png", "read"), ("e.png", "write")]
    assert all(Path(f["input"]).name in f["error"] or f["stage"] == "write" for f in failed)
    # finished outputs only: no temp file, no half-written b.png
    assert files_under(tmp_path / "o") == ["_failed.jsonl", "a.png", "e.png", "sub", "sub/d.png"]
    for name, pixels in good.items():
        assert_close_uint(np.asarray(Image.open(tmp_path / "o" / name)), expected_sr(model, pixels))
    before = (tmp_path / "o" / "a.png").stat().st_mtime_ns

    # the bad inputs mended: a rerun upscales only them, and the failure list goes
    save_png(tmp_path / "in" / "b.png", make_image(5, 5, seed=6))
    save_png(tmp_path / "in" / "c.png", make_image(5, 6, seed=7))
    (tmp_path / "o" / "e.png").rmdir()
    # what a run killed mid-write leaves: the temporary file a write goes through (mkstemp beside the output)
    fd, leftover = tempfile.mkstemp(dir=tmp_path / "o", prefix=".b.png.", suffix=".tmp")
    os.write(fd, b"half a PNG")
    os.close(fd)
    (tmp_path / "o" / ".notes.tmp").write_text("a user's file, not a temporary of raysr's")
    assert run(argv) == 0
    err = capsys.readouterr().err
    assert "skipping 2 input(s) whose output is already in" in err
    assert "3 done, 2 skipped (output already there), 0 failed" in err
    assert f"removed {leftover}, a write an earlier run did not finish" in err
    assert (tmp_path / "o" / "a.png").stat().st_mtime_ns == before
    assert files_under(tmp_path / "o") == [".notes.tmp", "a.png", "b.png", "c.png", "e.png", "sub", "sub/d.png"]


def test_module_entry_point(tmp_path, make_image, x2_model):
    _, ckpt = x2_model
    save_png(tmp_path / "in" / "sub" / "a.png", make_image(6, 7))
    (tmp_path / "in" / "notes.txt").write_text("not an image, skipped")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "raysr.upscale", "--model", str(ckpt), "--input",
                         str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--device", "cpu"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert Image.open(tmp_path / "o" / "sub" / "a.png").size == (14, 12)
    assert "1/1" in ok.stderr and "notes.txt" in ok.stderr
    bad = subprocess.run([sys.executable, "-m", "raysr.upscale", "--model", str(ckpt), "--input",
                          str(tmp_path / "nope"), "--output", str(tmp_path / "o2")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "no such file" in bad.stderr


def test_s3_model_input_and_output(s3_bucket, tmp_path, make_image, x2_model):
    from raysr import storage

    model, ckpt = x2_model
    image = make_image(7, 9, seed=23)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    storage.write_bytes(f"s3://{s3_bucket}/models/g.pth", ckpt.read_bytes())
    storage.write_bytes(f"s3://{s3_bucket}/in/x/a.png", buf.getvalue())
    storage.write_bytes(f"s3://{s3_bucket}/in/readme.txt", b"skipped")
    assert run(["--model", f"s3://{s3_bucket}/models/g.pth", "--input", f"s3://{s3_bucket}/in",
                "--output", f"s3://{s3_bucket}/out"]) == 0
    assert storage.list_files(f"s3://{s3_bucket}/out") == [f"s3://{s3_bucket}/out/x/a.png"]
    got = np.asarray(Image.open(io.BytesIO(storage.read_bytes(f"s3://{s3_bucket}/out/x/a.png"))))
    assert_close_uint(got, expected_sr(model, image))
