"""Sample member bytes -> upright (H, W, 3) uint8 RGB, the form every data path works on.

Two kinds of members hold a sample's pixels:

* arrays, ``.npy`` and ``.npy.lz4`` (:mod:`raysr.data.npy`): no image decode at all;
* encoded images (PNG, JPEG, WebP, ...). Shards written by make_shards hold plain 8-bit
  RGB, which takes a fast path: for PNG libspng (the ``pyspng`` package, where installed:
  about 3x faster than Pillow, pixel for pixel the same), else one Pillow decode, no copies.
  Anything else (grayscale, palette, alpha, 16-bit, EXIF-rotated, CMYK, animated) goes
  through :mod:`raysr.images`, which the rest of raysr uses for user images: gray is
  repeated to 3 channels, alpha is dropped (as OpenCV's ``IMREAD_COLOR`` in BasicSR),
  16-bit is rounded to 8-bit.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image, UnidentifiedImageError

from raysr.data.npy import decode_npy, npy_kind
from raysr.images import IMAGE_EXTENSIONS, ImageError, decode_image, is_png16, to_uint8_rgb

try:  # optional (pip install 'raysr[data]'): the same pixels as Pillow, decoded faster
    import pyspng
except ImportError:
    pyspng = None

LOG = logging.getLogger(__name__)
EXIF_ORIENTATION = 0x0112
# Errors Pillow raises for data that is not a decodable image (and raysr.data.npy for a bad array).
DECODE_ERRORS = (ImageError, UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
                 Image.DecompressionBombError)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_image_name(name: str) -> bool:
    """True if the file name / tar member extension is an image format raysr reads."""
    return "." + name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def is_pixel_member(ext: str) -> bool:
    """True if a sample member with this extension holds its pixels: an image or a .npy/.npy.lz4 array."""
    return is_image_name(ext) or npy_kind(ext) is not None


def decode_member(ext: str, data: bytes, name: str = "") -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB from a sample member with extension ``ext`` (``"png"``, ``"npy"``, ...).

    Arrays come back as read-only views of ``data``. Raises one of :data:`DECODE_ERRORS`
    for data that is not a readable image or image array.
    """
    kind = npy_kind(ext)
    return decode_npy(data, kind) if kind is not None else decode_rgb(data, name)


def _plain_png(data: bytes) -> bool:
    """True for an 8-bit RGB PNG that is one frame and has no EXIF (whose orientation Pillow's path applies)."""
    return (data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data[24] == 8 and data[25] == 2
            and b"acTL" not in data and b"eXIf" not in data)


def decode_rgb(data: bytes, name: str = "") -> np.ndarray:
    """Decode image file bytes to an upright ``(H, W, 3)`` uint8 RGB array.

    ``name`` only labels error messages. Raises one of :data:`DECODE_ERRORS`
    for data that is not a readable image.
    """
    if pyspng is not None and _plain_png(data):
        try:
            return pyspng.load(data, "RGB")
        except RuntimeError:  # libspng refused it: Pillow below decodes it or names the problem, as before
            LOG.debug("libspng could not decode %s; decoding it with Pillow", name or "a PNG")
    im = Image.open(io.BytesIO(data))
    if im.mode == "RGB" and not is_png16(data) and getattr(im, "n_frames", 1) == 1:
        im.load()
        if im.getexif().get(EXIF_ORIENTATION, 1) == 1:
            return np.asarray(im)
    return to_uint8_rgb(decode_image(data, name))
