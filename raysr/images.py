"""Read and write the images users hand to ``upscale`` and ``evaluate``.

Every image decodes to one array, ``(H, W, C)`` uint8 or uint16 with C = 1 (gray),
2 (gray + alpha), 3 (RGB) or 4 (RGBA), upright (EXIF orientation applied), and
encodes back in the format it came in, so a 16-bit grayscale PNG with alpha comes
out as one. Pillow reads everything except 16-bit colour PNGs, which it silently
cuts to 8 bits; those go through the small PNG codec below. Paths may be local or
``s3://`` URIs (see :mod:`raysr.storage`); writes are atomic.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from raysr import storage

# What a folder listing treats as an image; anything else in the folder is skipped.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".tga")
# Pillow names some camera JPEGs "MPO" (multi-picture); they are written back as JPEG.
_WRITE_FORMAT = {"MPO": "JPEG"}
# Pillow modes converted on read to one of L, LA, RGB, RGBA (8-bit) or I;16 (16-bit gray).
_CONVERT = {"1": "L", "La": "LA", "PA": "RGBA", "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB",
            "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "I;16L": "I;16", "I;16B": "I;16", "I;16N": "I;16"}
_MODE_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_SAVE_OPTIONS = {"JPEG": dict(quality=95, subsampling=0), "WEBP": dict(quality=95)}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}  # colour type -> samples per pixel
_PNG_COLOR_TYPE = {c: t for t, c in _PNG_CHANNELS.items()}
# Adam7 passes as (x0, y0, dx, dy)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the array operation that makes the image upright (as ImageOps.exif_transpose)
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1),
           7: lambda a: a[::-1, ::-1].swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}


class ImageError(ValueError):
    """A file that is not an image raysr can read or write; the message names it."""


@dataclass
class DecodedImage:
    """An upright image: ``pixels`` (H, W, C) uint8 or uint16, C in 1..4 (gray, gray+alpha,
    RGB, RGBA); ``format`` the Pillow format name to write it back as; ``icc_profile``
    the embedded colour profile, carried to the output unchanged."""

    pixels: np.ndarray
    format: str
    icc_profile: bytes | None = None

    @property
    def bit_depth(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    @property
    def grayscale(self) -> bool:
        return self.pixels.shape[2] in (1, 2)

    @property
    def has_alpha(self) -> bool:
        return self.pixels.shape[2] in (2, 4)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.pixels.shape[0], self.pixels.shape[1]


@dataclass
class ImageInfo:
    """Header facts of an image file, read without decoding its pixels."""

    height: int
    width: int
    format: str
    mode: str


def _where(name: str) -> str:
    return f"{name}: " if name else ""


# --------------------------------------------------------------------------- reading

def is_png16(data: bytes) -> bool:
    """Whether ``data`` is a PNG with 16 bits per sample (Pillow would cut its colour to 8 bits)."""
    # IHDR is always the first chunk: signature(8) length(4) type(4) width(4) height(4) depth(1)
    return data[:8] == PNG_SIGNATURE and len(data) > 24 and data[12:16] == b"IHDR" and data[24] == 16


def _png_chunks(data: bytes, name: str):
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length or len(data) < pos + 12 + length:
            raise ImageError(f"{_where(name)}PNG is truncated inside its {kind!r} chunk; the file is incomplete")
        yield kind, body
        if kind == b"IEND":
            return
        pos += 12 + length
    raise ImageError(f"{_where(name)}PNG ends without an IEND chunk; the file is incomplete")


def _unfilter(raw: bytes, height: int, row_bytes: int, bpp: int, name: str) -> np.ndarray:
    """Undo PNG scanline filtering: ``raw`` is ``height`` rows of (filter byte + row_bytes);
    returns (height, row_bytes) uint8. ``bpp``: bytes per complete pixel (divides row_bytes).

    None / Sub / Up rows are whole-row numpy operations. Average and Paeth make each byte
    depend on the one ``bpp`` to its left, so a row is sequential: runs of such rows are
    swept diagonal by diagonal (:func:`_unfilter_run`), isolated ones byte by byte.
    """
    stride = row_bytes + 1
    if len(raw) < height * stride:
        raise ImageError(f"{_where(name)}PNG image data is shorter than its header says; the file is incomplete")
    rows = np.frombuffer(raw, np.uint8, height * stride).reshape(height, stride)
    kinds = rows[:, 0]
    unknown = np.flatnonzero(kinds > 4)
    if unknown.size:
        row = int(unknown[0])
        raise ImageError(f"{_where(name)}PNG row {row} has unknown filter type {kinds[row]}; the file is corrupt")
    out = np.empty((height, row_bytes), np.uint8)
    zeros = np.zeros(row_bytes, np.uint8)  # PNG's row above the first

    def above(y: int) -> np.ndarray:
        return out[y - 1] if y else zeros

    sequential = kinds >= 3
    edges = [0, *(np.flatnonzero(np.diff(sequential)) + 1).tolist(), height]
    for start, stop in zip(edges[:-1], edges[1:]):
        if not sequential[start]:
            _unfilter_rows(kinds[start:stop], rows[start:stop, 1:], above(start), bpp, out[start:stop])
        elif stop - start < _MIN_RUN_ROWS:
            for y in range(start, stop):
                line = _unfilter_sequential(kinds[y], rows[y, 1:].tobytes(), above(y).tobytes(), bpp)
                out[y] = np.frombuffer(line, np.uint8)
        else:
            for first in range(start, stop, _RUN_ROWS):
                last = min(first + _RUN_ROWS, stop)
                out[first:last] = _unfilter_run(kinds[first:last], rows[first:last, 1:], above(first), bpp)
    return out


# Average/Paeth runs shorter than this are cheaper byte by byte than by diagonal sweeps;
# longer ones are swept in chunks of _RUN_ROWS rows, which bounds the sweep's buffers.
_MIN_RUN_ROWS = 8
_RUN_ROWS = 512


def _unfilter_rows(kinds: np.ndarray, data: np.ndarray, above: np.ndarray, bpp: int, out: np.ndarray) -> None:
    """None / Sub / Up rows ``data`` (B, row_bytes) into ``out``, given the unfiltered row ``above``."""
    prev = above
    for y, (kind, cur) in enumerate(zip(kinds, data)):
        if kind == 0:
            out[y] = cur
        elif kind == 1:  # Sub: a running sum per byte lane, wrapping at 256
            out[y] = np.cumsum(cur.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        else:  # Up
            out[y] = cur + prev
        prev = out[y]


def _unfilter_sequential(kind: int, cur: bytes, up: bytes, bpp: int) -> bytes:
    """One Average (3) or Paeth (4) row, byte by byte."""
    line = bytearray(cur)
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        if kind == 3:
            pred = (left + up[i]) >> 1
        else:
            upleft = up[i - bpp] if i >= bpp else 0
            p = left + up[i] - upleft
            pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - upleft)
            pred = left if pa <= pb and pa <= pc else (up[i] if pb <= pc else upleft)
        line[i] = (line[i] + pred) & 0xFF
    return bytes(line)


def _unfilter_run(kinds: np.ndarray, data: np.ndarray, above: np.ndarray, bpp: int) -> np.ndarray:
    """Average / Paeth rows ``data`` (B, row_bytes) with filter types ``kinds`` (B,), given the
    unfiltered row ``above`` them; returns (B, row_bytes) uint8.

    Each pixel depends on its left, upper and upper-left neighbours only, so all pixels of
    one anti-diagonal x + y = d follow from diagonals d-1 and d-2: B + W - 1 vector steps
    replace B*W*bpp scalar ones.
    """
    height, row_bytes = data.shape
    width = row_bytes // bpp
    ndiag = height + width - 1
    # diagonal-major copies: src[d, y] is filtered pixel (y, d - y); recon[d + 2, y + 1] is the
    # reconstructed one, recon[:, 0] the row above and recon[0:2] the zeros left of column 0
    src = np.zeros((ndiag, height, bpp), np.uint8)
    for y in range(height):
        src[y:y + width, y] = data[y].reshape(width, bpp)
    recon = np.zeros((ndiag + 2, height + 1, bpp), np.int16)
    recon[1:width + 1, 0] = above.reshape(width, bpp)
    paeth_row = (kinds == 4)[:, None]
    paeth_before = np.concatenate([[0], np.cumsum(paeth_row)])
    for d in range(ndiag):
        lo, hi = max(0, d - width + 1), min(height, d + 1)
        left, up, upleft = recon[d + 1, lo + 1:hi + 1], recon[d + 1, lo:hi], recon[d, lo:hi]
        paeths = paeth_before[hi] - paeth_before[lo]
        if paeths == 0:
            pred = (left + up) >> 1
        else:
            pa, pb, pc = np.abs(up - upleft), np.abs(left - upleft), np.abs(left + up - 2 * upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
            if paeths < hi - lo:
                pred = np.where(paeth_row[lo:hi], pred, (left + up) >> 1)
        recon[d + 2, lo + 1:hi + 1] = (src[d, lo:hi] + pred) & 0xFF
    out = np.empty((height, width, bpp), np.uint8)
    for y in range(height):
        out[y] = recon[y + 2:y + 2 + width, y + 1]
    return out.reshape(height, row_bytes)


def _decode_png16(data: bytes, name: str) -> tuple[np.ndarray, bytes | None]:
    """Pixels (H, W, C) uint16 and ICC profile of a 16-bit PNG (any colour type, Adam7 too)."""
    header, idat, trns, icc = None, [], None, None
    for kind, body in _png_chunks(data, name):
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"tRNS":
            trns = body
        elif kind == b"iCCP":
            # profile name, NUL, compression method (0 = zlib), compressed profile
            icc = zlib.decompress(body[body.index(b"\0") + 2:])
    width, height, depth, color_type, _, _, interlace = header
    if color_type not in _PNG_CHANNELS:
        raise ImageError(f"{_where(name)}16-bit PNG with invalid colour type {color_type}; the file is corrupt")
    channels = _PNG_CHANNELS[color_type]
    bpp = 2 * channels
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as err:
        raise ImageError(f"{_where(name)}PNG image data does not decompress ({err}); the file is corrupt") from err
    out = np.empty((height, width * bpp), np.uint8)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    offset = 0
    for x0, y0, dx, dy in passes:
        pass_w, pass_h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if pass_w <= 0 or pass_h <= 0:
            continue  # Adam7 passes that hold no pixel of a small image have no data at all
        block = _unfilter(raw[offset:], pass_h, pass_w * bpp, bpp, name)
        offset += pass_h * (pass_w * bpp + 1)
        out.reshape(height, width, bpp)[y0::dy, x0::dx] = block.reshape(pass_h, pass_w, bpp)
    pixels = out.view(">u2").reshape(height, width, channels).astype(np.uint16)
    if trns is not None and channels in (1, 3):
        # tRNS names one fully transparent colour; turn it into an alpha channel
        key = np.frombuffer(trns[:2 * channels], ">u2").astype(np.uint16)
        alpha = np.where(np.all(pixels == key, axis=2), 0, 65535).astype(np.uint16)
        pixels = np.concatenate([pixels, alpha[..., None]], axis=2)
    return pixels, icc


def _open(data: bytes, name: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        raise ImageError(f"{_where(name)}not an image Pillow can read; expected PNG, JPEG, WebP, BMP, "
                         "TIFF or another Pillow format") from err


def _pil_pixels(im: Image.Image, name: str) -> np.ndarray:
    mode = _CONVERT.get(im.mode, im.mode)
    if im.mode == "P":
        transparent = "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA")
        mode = "RGBA" if transparent else "RGB"
    if mode == "I":
        # 32-bit integer images are how some readers hand over 16-bit gray
        values = np.asarray(im)
        if values.min() < 0 or values.max() > 65535:
            raise ImageError(f"{_where(name)}32-bit integer image with values outside 0..65535; "
                             "save it as 8- or 16-bit")
        return values.astype(np.uint16)[..., None]
    if mode == "I;16":  # numpy reads I;16B as big-endian uint16; astype gives native order
        return np.asarray(im).astype(np.uint16)[..., None]
    if mode not in _MODE_CHANNELS:
        raise ImageError(f"{_where(name)}image mode {im.mode!r} is not supported; "
                         "save it as 8/16-bit gray, RGB or RGBA")
    arr = np.asarray(im if im.mode == mode else im.convert(mode))
    return arr.reshape(arr.shape[0], arr.shape[1], _MODE_CHANNELS[mode])


def decode_image(data: bytes, name: str = "") -> DecodedImage:
    """Decode image file bytes to an upright :class:`DecodedImage`.

    ``name`` only labels error messages. Raises :class:`ImageError` for data that is
    not an image, is truncated, animated, or in a pixel format raysr cannot process.
    """
    im = _open(data, name)
    try:
        _check_frames(im, name)
        if is_png16(data):
            pixels, icc = _decode_png16(data, name)
            orient = _ORIENT.get(im.getexif().get(_EXIF_ORIENTATION, 1))
            pixels = np.ascontiguousarray(orient(pixels)) if orient else pixels
        else:
            icc = im.info.get("icc_profile")
            pixels = _pil_pixels(ImageOps.exif_transpose(im), name)
    except (OSError, SyntaxError, struct.error, zlib.error, EOFError) as err:
        # Pillow reports truncated or corrupt data as OSError / SyntaxError
        raise ImageError(f"{_where(name)}image data is corrupt or truncated ({err})") from err
    return DecodedImage(pixels=np.ascontiguousarray(pixels), format=im.format, icc_profile=icc)


def _check_frames(im: Image.Image, name: str) -> None:
    if getattr(im, "n_frames", 1) > 1:
        raise ImageError(f"{_where(name)}is animated ({im.n_frames} frames); extract the frame to "
                         "process as a single image first")


def writable_format(fmt: str) -> str:
    """The Pillow format an image read as ``fmt`` is written back as; ImageError if none."""
    Image.init()
    out = _WRITE_FORMAT.get(fmt, fmt)
    if out not in Image.SAVE:
        raise ImageError(f"Pillow can read {fmt} images but cannot write them; convert the input to PNG")
    return out


def probe_image(uri: str) -> ImageInfo:
    """Header facts of the image at ``uri`` (local path or s3://), without decoding pixels.

    Raises :class:`ImageError` for a file that is not an image, is animated, or is in
    a format raysr could not write back; :class:`raysr.storage.StorageError` if missing.
    """
    data = storage.read_bytes(uri) if storage.is_s3(uri) else None
    try:
        im = _open(data, uri) if data is not None else Image.open(uri)
    except UnidentifiedImageError as err:
        raise ImageError(f"{uri}: not an image Pillow can read; expected PNG, JPEG, WebP, BMP, "
                         "TIFF or another Pillow format") from err
    except FileNotFoundError as err:
        raise storage.StorageError(f"{uri} does not exist") from err
    with im:
        _check_frames(im, uri)
        writable_format(im.format)
        return ImageInfo(height=im.height if not _swaps_axes(im) else im.width,
                         width=im.width if not _swaps_axes(im) else im.height,
                         format=im.format, mode=im.mode)


def _swaps_axes(im: Image.Image) -> bool:
    # orientations 5..8 rotate by 90 degrees, so the upright image is W x H
    try:
        return im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except (OSError, SyntaxError):
        return False


def read_image(uri: str) -> DecodedImage:
    """Read and decode the image at a local path or s3:// URI (see :func:`decode_image`)."""
    return decode_image(storage.read_bytes(uri), str(uri))


# --------------------------------------------------------------------------- writing

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _filter_rows(rows: np.ndarray, bpp: int) -> np.ndarray:
    """Filter (H, row_bytes) uint8 scanlines, picking per row the PNG filter with the
    smallest sum of absolute residuals (libpng's heuristic); returns (H, 1 + row_bytes)."""
    x = rows.astype(np.int16)
    left = np.zeros_like(x)
    left[:, bpp:] = x[:, :-bpp]
    up = np.zeros_like(x)
    up[1:] = x[:-1]
    upleft = np.zeros_like(x)
    upleft[1:] = left[:-1]
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    candidates = np.stack([x, x - left, x - up, x - ((left + up) >> 1), x - paeth]) & 0xFF
    signed = np.minimum(candidates, 256 - candidates)
    best = signed.sum(axis=2).argmin(axis=0)
    chosen = candidates[best, np.arange(len(rows))].astype(np.uint8)
    return np.concatenate([best.astype(np.uint8)[:, None], chosen], axis=1)


def _encode_png16(pixels: np.ndarray, icc: bytes | None) -> bytes:
    height, width, channels = pixels.shape
    rows = np.ascontiguousarray(pixels, dtype=">u2").view(np.uint8).reshape(height, width * 2 * channels)
    header = struct.pack(">IIBBBBB", width, height, 16, _PNG_COLOR_TYPE[channels], 0, 0, 0)
    chunks = [_png_chunk(b"IHDR", header)]
    if icc:
        chunks.append(_png_chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc)))
    chunks.append(_png_chunk(b"IDAT", zlib.compress(_filter_rows(rows, 2 * channels).tobytes(), 6)))
    chunks.append(_png_chunk(b"IEND", b""))
    return PNG_SIGNATURE + b"".join(chunks)


def encode_image(image: DecodedImage) -> bytes:
    """Encode ``image`` in its own format (16-bit stays 16-bit; JPEG at quality 95, 4:4:4).

    Raises :class:`ImageError` when the format cannot hold the pixels (alpha in JPEG,
    16-bit colour outside PNG).
    """
    pixels, fmt = image.pixels, writable_format(image.format)
    if image.bit_depth == 16 and fmt == "PNG":
        return _encode_png16(pixels, image.icc_profile)
    if image.bit_depth == 16:
        if pixels.shape[2] != 1:
            raise ImageError(f"{fmt} cannot store 16-bit colour or alpha here; use PNG for 16-bit output")
        im = Image.fromarray(np.ascontiguousarray(pixels[..., 0]))  # uint16 -> mode I;16
    else:
        im = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    if image.has_alpha and fmt == "JPEG":
        raise ImageError("JPEG cannot store an alpha channel; use PNG or WebP")
    options = dict(_SAVE_OPTIONS.get(fmt, {}))
    if image.icc_profile:
        options["icc_profile"] = image.icc_profile
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt, **options)
    except (OSError, ValueError, KeyError) as err:
        raise ImageError(f"cannot write a {im.mode} image as {fmt} ({err}); use PNG") from err
    return buf.getvalue()


def write_image(uri: str, image: DecodedImage) -> None:
    """Encode ``image`` (see :func:`encode_image`) and write it atomically to a local path
    or s3:// URI: the file appears whole or not at all."""
    storage.write_bytes(uri, encode_image(image))


# --------------------------------------------------------------------------- pixels

def max_value(image: DecodedImage) -> int:
    """255 for 8-bit, 65535 for 16-bit images."""
    return 65535 if image.bit_depth == 16 else 255


def to_float_rgb(image: DecodedImage) -> tuple[np.ndarray, np.ndarray | None]:
    """``(rgb, alpha)``: rgb (H, W, 3) float32 in [0, 1] (gray repeated to 3 channels),
    alpha (H, W) float32 in [0, 1] or None."""
    scaled = image.pixels.astype(np.float32) / max_value(image)
    color = scaled[..., :1] if image.grayscale else scaled[..., :3]
    alpha = scaled[..., -1] if image.has_alpha else None
    if image.grayscale:
        color = np.repeat(color, 3, axis=2)
    return color, alpha


# ITU-R BT.601 luma weights, as Pillow's RGB -> L conversion
_LUMA = np.array([0.299, 0.587, 0.114], np.float64)


def from_float_rgb(rgb: np.ndarray, alpha: np.ndarray | None, like: DecodedImage) -> DecodedImage:
    """Inverse of :func:`to_float_rgb`: quantise rgb (H, W, 3) and alpha (H, W) floats in
    [0, 1] (clipped) to ``like``'s bit depth and channel layout (gray via BT.601 luma)."""
    peak = max_value(like)
    color = rgb @ _LUMA if like.grayscale else rgb
    planes = color[..., None] if like.grayscale else color
    if like.has_alpha:
        if alpha is None:
            raise ValueError(f"{like.format} image has an alpha channel but no alpha was given")
        planes = np.concatenate([planes, alpha[..., None]], axis=2)
    pixels = np.ascontiguousarray(np.rint(np.clip(planes, 0.0, 1.0) * peak), dtype=like.pixels.dtype)
    return DecodedImage(pixels=pixels, format=like.format, icc_profile=like.icc_profile)


def to_uint8_rgb(image: DecodedImage) -> np.ndarray:
    """(H, W, 3) uint8 RGB: gray repeated, alpha dropped, 16-bit rounded to 8-bit."""
    rgb, _ = to_float_rgb(image)
    return np.rint(rgb * 255.0).astype(np.uint8)


def list_images(uri: str, recursive: bool = True, exclude: str | None = None) -> tuple[list[str], list[str]]:
    """``(images, skipped)`` below a local directory or s3:// prefix, each sorted.

    Images are files whose extension is in :data:`IMAGE_EXTENSIONS`; ``skipped`` are
    the other files (hidden files are ignored altogether). ``recursive=False`` keeps
    only direct children. Files under ``exclude`` (e.g. the output folder inside the
    input folder) are left out.
    """
    images, skipped = [], []
    for path in storage.list_files(uri):
        rel = PurePosixPath(relative_path(str(path), str(uri)))
        if any(part.startswith(".") for part in rel.parts) or (not recursive and len(rel.parts) > 1):
            continue
        if exclude is not None and is_under(str(path), exclude):
            continue
        (images if rel.suffix.lower() in IMAGE_EXTENSIONS else skipped).append(str(path))
    return images, skipped


def relative_path(path: str, root: str) -> str:
    """``path`` relative to the folder or s3:// prefix ``root``, with ``/`` separators."""
    if storage.is_s3(path):
        return path[len(root.rstrip("/")):].lstrip("/")
    return Path(path).relative_to(Path(root)).as_posix()


def is_under(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or inside it (local paths resolved; s3 URIs by prefix)."""
    if storage.is_s3(path) != storage.is_s3(folder):
        return False
    if storage.is_s3(path):
        return (path.rstrip("/") + "/").startswith(folder.rstrip("/") + "/")
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False
