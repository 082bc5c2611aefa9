"""The lossless members of a shard: PNG (the default: every WebDataset, wids, DALI and HF datasets reader
decodes it) or zstd-compressed raw pixels (`distseg shard --lossless zstd`), which decode 10-40x faster on
a CPU, but only distseg's torch loader reads them. Masks use zstd level 3 (about the size of PNG; a
2048x1024 mask decodes ~2,800 times a second on one core here, PNG ~140); images use the fast level -5,
which keeps zstd's entropy coding out of the way: larger than PNG (up to the raw 6.3 MB of a 2048x1024
image) but decoded at memory speed (thousands a second, PNG ~25). One place decides which member names a
shard's images and masks have and turns their bytes into arrays.

The zstd member: b"DSA1", the numpy dtype's one-character code, the number of dimensions, each dimension as
a little-endian uint32, then one zstd frame of the C-ordered pixels.
"""

from __future__ import annotations

import io
import struct

import numpy as np

MAGIC = b"DSA1"
CODECS = ("png", "zstd")


def member_names(image_format: str, lossless: str) -> tuple[str, str]:
    """The (image, mask) member extensions of a shard: `jpg` or the lossless codec's name for images."""
    zst = lossless == "zstd"
    image = "jpg" if image_format == "jpg" else "rgb.zst" if zst else "png"
    return image, "mask.zst" if zst else "mask.png"


MASK_LEVEL, IMAGE_LEVEL = 3, -5


def encode_array(array: np.ndarray, level: int = MASK_LEVEL) -> bytes:
    """A uint8 array as a zstd member (images: `IMAGE_LEVEL`)."""
    import zstandard

    a = np.ascontiguousarray(array)
    head = MAGIC + a.dtype.char.encode() + struct.pack(f"<B{a.ndim}I", a.ndim, *a.shape)
    return head + zstandard.ZstdCompressor(level=level).compress(a.tobytes())


def is_array(data: bytes) -> bool:
    """Whether member bytes are a zstd array (rather than an encoded image)."""
    return data[:4] == MAGIC


def decode_array(data: bytes) -> np.ndarray:
    """A zstd member's array (a writable copy)."""
    import zstandard

    ndim = data[5]
    shape = struct.unpack_from(f"<{ndim}I", data, 6)
    size = int(np.prod(shape)) * np.dtype(chr(data[4])).itemsize
    raw = zstandard.ZstdDecompressor().decompress(data[6 + 4 * ndim:], max_output_size=size)
    return np.frombuffer(raw, dtype=np.dtype(chr(data[4]))).reshape(shape).copy()


def encode_png(array: np.ndarray, mode: str) -> bytes:
    """A uint8 image or mask as PNG (compression level 6)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
