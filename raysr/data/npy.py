"""Decode-free sub-images: ``.npy`` (raw uint8 HWC pixels) and ``.npy.lz4`` (the same, LZ4-compressed).

A ``KEY.npy`` member is NumPy's own ``.npy`` file of a ``(H, W, 3)`` uint8 RGB array, the
WebDataset convention that its readers decode natively (``webdataset``'s default decoder,
Ray Data's ``read_webdataset``). Reading one costs a header parse and a view of the member's
bytes: no image decode, no copy. A ``KEY.npy.lz4`` member is that same file as an LZ4 frame
(``lz4 -d`` gives the ``.npy`` back): 0.6x the bytes, decompressed at ~2 GB/s; it needs the
``lz4`` package (``pip install 'raysr[data]'``). ``docs/data.md`` gives the speed and storage of
each, and why LZ4 and not zstd.

This module writes both (for :mod:`raysr.data.make_shards`) and reads both (for
:mod:`raysr.data.decode`); other tools' arrays are read too where they are uint8 images:
``(H, W)`` and ``(H, W, 1)`` gray (repeated to 3 channels), ``(H, W, 4)`` (alpha dropped),
C or Fortran order.
"""

from __future__ import annotations

import io

import numpy as np

# member extensions, as WebDataset splits them (key up to the first dot)
NPY, NPY_LZ4 = "npy", "npy.lz4"
NPY_EXTENSIONS = (NPY, NPY_LZ4)
# LZ4 level of make_shards' .npy.lz4 (high-compression mode): 0.62x the raw bytes of photo
# sub-images against 0.76x at the fast level 0, decompressed at nearly the same speed
LZ4_LEVEL = 9
# a frame claiming more than this is refused rather than allocated (a "zip bomb")
MAX_DECOMPRESSED_BYTES = 1 << 30
NPY_MAGIC = b"\x93NUMPY"
HOW_TO_WRITE = ("raysr reads uint8 (H, W, 3) RGB arrays (gray (H, W) and RGBA (H, W, 4) are converted); "
                "make_shards --format npy writes them")


def npy_kind(ext: str) -> str | None:
    """``"npy"`` or ``"npy.lz4"`` for a member extension that ends so (``"x.npy"`` too), else None."""
    ext = ext.lower()
    if ext == NPY_LZ4 or ext.endswith("." + NPY_LZ4):
        return NPY_LZ4
    if ext == NPY or ext.endswith("." + NPY):
        return NPY
    return None


def _lz4():
    try:
        import lz4.frame
    except ImportError as err:
        raise ImportError("these shards hold .npy.lz4 members, which need the lz4 package: "
                          "pip install lz4 (or pip install 'raysr[data]')") from err
    return lz4.frame


def encode_npy(pixels: np.ndarray, compressed: bool = False) -> bytes:
    """The ``.npy`` file of ``(H, W, 3)`` uint8 ``pixels`` (C order), as an LZ4 frame when ``compressed``.

    Deterministic: the same pixels give the same bytes (for one lz4 version).
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"encode_npy takes (H, W, 3) uint8 pixels, got {pixels.dtype} {pixels.shape}")
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(pixels), version=(1, 0), allow_pickle=False)
    data = buf.getvalue()
    if compressed:
        data = _lz4().compress(data, compression_level=LZ4_LEVEL, store_size=True)
    return data


def _decompress(data: bytes) -> bytes:
    frame = _lz4()
    try:
        size = frame.get_frame_info(data)["content_size"]
        if size > MAX_DECOMPRESSED_BYTES:
            raise ValueError(f"LZ4 frame of {size} bytes is larger than the {MAX_DECOMPRESSED_BYTES} "
                             "bytes raysr decompresses per member")
        if size:
            return frame.decompress(data)
        # a frame written without its size (a streaming writer): decompress it, bounded
        out = frame.LZ4FrameDecompressor().decompress(data, max_length=MAX_DECOMPRESSED_BYTES + 1)
    except RuntimeError as err:  # what the lz4 bindings raise for data that is not an LZ4 frame
        raise ValueError(f"not a valid LZ4 frame ({err})") from err
    if len(out) > MAX_DECOMPRESSED_BYTES:
        raise ValueError(f"LZ4 frame decompresses to more than the {MAX_DECOMPRESSED_BYTES} bytes raysr "
                         "decompresses per member")
    return out


def decode_npy(data: bytes, kind: str = NPY) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB from the bytes of a ``.npy`` (or, ``kind="npy.lz4"``, ``.npy.lz4``) member.

    For a uint8 ``(H, W, 3)`` array in C order the result is a read-only view of the
    (decompressed) bytes. Raises ValueError for data that is not a ``.npy`` file of a uint8
    image array (naming what it holds), ImportError for ``.npy.lz4`` without lz4.
    """
    if kind == NPY_LZ4:
        data = _decompress(data)
    if not data.startswith(NPY_MAGIC):
        raise ValueError("not a .npy file (no \\x93NUMPY magic)")
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    if dtype != np.uint8 or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise ValueError(f"the .npy member holds a {dtype} array of shape {shape}; {HOW_TO_WRITE}")
    count = int(np.prod(shape))
    offset = stream.tell()
    if len(data) - offset < count:
        raise ValueError(f"the .npy member is truncated: {len(data) - offset} of {count} pixel bytes")
    array = np.frombuffer(data, np.uint8, count, offset)
    array = array.reshape(shape[::-1]).transpose() if fortran_order else array.reshape(shape)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    return array[:, :, :3]
