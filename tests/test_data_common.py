"""Helpers shared by the tests of raysr.data (this module holds no tests).

The references here are written from the definitions, not from raysr's code:
MATLAB's bicubic ``imresize`` as documented (Keys a=-0.5, antialiased kernel,
symmetric padding), and tar/PNG reading with the standard library and Pillow.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import synthetic_image


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return np.where(ax <= 1, 1.5 * ax**3 - 2.5 * ax**2 + 1,
                    np.where(ax <= 2, -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2, 0.0))


def _matlab_matrix(in_len: int, scale: float) -> np.ndarray:
    """(out, in) matrix of MATLAB imresize along one axis for a downscale factor ``scale`` < 1."""
    out_len = int(np.ceil(in_len * scale))
    width = 4.0 / scale
    taps = int(np.ceil(width)) + 2
    matrix = np.zeros((out_len, in_len))
    for i in range(1, out_len + 1):  # MATLAB's 1-based output pixel
        u = i / scale + 0.5 * (1 - 1 / scale)
        left = int(np.floor(u - width / 2))
        idx = left + np.arange(taps)
        w = scale * _keys_cubic(scale * (u - idx))
        w = w / w.sum()
        for j, wj in zip(idx, w):
            while j < 1 or j > in_len:  # symmetric padding: 0 -> 1, -1 -> 2, n+1 -> n
                j = 1 - j if j < 1 else 2 * in_len + 1 - j
            matrix[i - 1, j - 1] += wj
    return matrix


def matlab_downscale(image: np.ndarray, scale: int) -> np.ndarray:
    """``imresize(image, 1/scale, 'bicubic')`` of (H, W, C) float64, in float64."""
    rows = _matlab_matrix(image.shape[0], 1.0 / scale)
    cols = _matlab_matrix(image.shape[1], 1.0 / scale)
    return np.einsum("ih,hwc,jw->ijc", rows, image, cols)


def assert_lr_matches(lr, hr, scale: int) -> None:
    """LR equals the 8-bit rounded float64 reference, except where float32 arithmetic puts a value
    that lies within a thousandth of a level of a .5 boundary on the other side (one level at most)."""
    exact = np.clip(matlab_downscale(hr.double().numpy().transpose(1, 2, 0), scale).transpose(2, 0, 1), 0, 1) * 255
    levels = lr.double().numpy() * 255
    assert levels.shape == exact.shape
    assert np.abs(levels - np.round(levels)).max() < 1e-3  # on 8-bit levels (float32 of k/255)
    diff = np.abs(np.round(levels) - np.round(exact))
    assert diff.max() <= 1
    off = exact[diff != 0]
    assert np.all(np.abs(off % 1 - 0.5) < 1e-3), f"levels off by one away from a .5 boundary: {off}"


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> dict[str, np.ndarray]:
    """PNG files ``img00.png ...`` of the given (height, width); returns name -> pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for i, (height, width) in enumerate(sizes):
        name = f"img{i:02d}"
        images[name] = synthetic_image(height, width, seed + i)
        (folder / f"{name}.png").write_bytes(png_bytes(images[name]))
    return images


def read_tar(path) -> list[tuple[str, bytes]]:
    """Members of a whole tar as (name, bytes), in order (random-access reader)."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def shard_samples(paths) -> dict[str, np.ndarray]:
    """key -> decoded RGB pixels of every ``KEY.png`` in the given tar files."""
    out = {}
    for path in paths:
        for name, data in read_tar(path):
            if name.endswith(".png"):
                out[name[:-4]] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return out


def to_uint8(hr) -> np.ndarray:
    """(3, H, W) float tensor in [0, 1] on 8-bit levels -> (H, W, 3) uint8."""
    return np.round(hr.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
