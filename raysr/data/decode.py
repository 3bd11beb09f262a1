"""Encoded image bytes -> upright (H, W, 3) uint8 RGB, the form every data path works on.

Shards written by make_shards hold plain 8-bit RGB, which takes a fast path
(one Pillow decode, no copies). Anything else (grayscale, palette, alpha,
16-bit, EXIF-rotated, CMYK) goes through :mod:`raysr.images`, which the rest
of raysr uses for user images: gray is repeated to 3 channels, alpha is dropped
(as OpenCV's ``IMREAD_COLOR`` in BasicSR), 16-bit is rounded to 8-bit.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from raysr.images import IMAGE_EXTENSIONS, ImageError, decode_image, is_png16, to_uint8_rgb

EXIF_ORIENTATION = 0x0112
# Errors Pillow raises for data that is not a decodable image.
DECODE_ERRORS = (ImageError, UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
                 Image.DecompressionBombError)


def is_image_name(name: str) -> bool:
    """True if the file name / tar member extension is an image format raysr reads."""
    return "." + name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def decode_rgb(data: bytes, name: str = "") -> np.ndarray:
    """Decode image file bytes to an upright ``(H, W, 3)`` uint8 RGB array.

    ``name`` only labels error messages. Raises one of :data:`DECODE_ERRORS`
    for data that is not a readable image.
    """
    im = Image.open(io.BytesIO(data))
    if im.mode == "RGB" and not is_png16(data) and getattr(im, "n_frames", 1) == 1:
        im.load()
        if im.getexif().get(EXIF_ORIENTATION, 1) == 1:
            return np.asarray(im)
    return to_uint8_rgb(decode_image(data, name))
