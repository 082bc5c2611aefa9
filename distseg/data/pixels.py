"""A PIL image's pixels as a numpy view, without a copy, for the collate to lay them out planar.

PIL holds an RGB image as 4 bytes per pixel (RGBX) and gives its pixels out only as copies (`tobytes`,
`np.asarray`, which calls it): packing a crop planar took three `tobytes("raw", band)` passes, each a
bytes object to copy again. Pillow (11.2 and newer) also exports an image through the Arrow C data
interface, a stable ABI (https://arrow.apache.org/docs/format/CDataInterface.html), as its own memory:
`rgbx_view` reads the data pointer out of that export with ctypes (numpy reads no Arrow; pyarrow would
be a large dependency for one pointer), so numpy copies each channel straight from PIL's memory into the
batch row. Where the export is missing (an older Pillow) or refused (an image in several blocks), the
caller packs as before.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager

import numpy as np
from PIL import Image


class _ArrowSchema(ctypes.Structure):
    """struct ArrowSchema of the C data interface."""


class _ArrowArray(ctypes.Structure):
    """struct ArrowArray of the C data interface."""


_ArrowSchema._fields_ = [("format", ctypes.c_char_p), ("name", ctypes.c_char_p),
                         ("metadata", ctypes.c_char_p), ("flags", ctypes.c_int64),
                         ("n_children", ctypes.c_int64),
                         ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
                         ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p),
                         ("private_data", ctypes.c_void_p)]


_ArrowArray._fields_ = [("length", ctypes.c_int64), ("null_count", ctypes.c_int64),
                        ("offset", ctypes.c_int64), ("n_buffers", ctypes.c_int64),
                        ("n_children", ctypes.c_int64), ("buffers", ctypes.POINTER(ctypes.c_void_p)),
                        ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
                        ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p),
                        ("private_data", ctypes.c_void_p)]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


@contextmanager
def rgbx_view(im: Image.Image):
    """Within the block: PIL's own pixels of an RGB image as uint8 h x w x 4 (the 4th byte unused), or
    None where Pillow cannot export them. The view is valid only inside the block: the export it reads
    is released when its capsule goes, and the image must not change meanwhile."""
    capsules = _export(im)
    if capsules is None:
        yield None
        return
    schema = _ArrowSchema.from_address(_capsule_pointer(capsules[0], b"arrow_schema"))
    array = _ArrowArray.from_address(_capsule_pointer(capsules[1], b"arrow_array"))
    w, h = im.size
    # an RGB image: a fixed-size list of 4 uint8 per pixel, whose one child holds the bytes
    if (schema.format != b"+w:4" or schema.n_children != 1 or schema.children[0].contents.format != b"C"
            or array.n_children != 1 or array.length != w * h):
        yield None
        return
    child = array.children[0].contents
    start = child.buffers[1] + child.offset + 4 * array.offset
    data = (ctypes.c_uint8 * (4 * w * h)).from_address(start)
    try:
        yield np.frombuffer(data, np.uint8).reshape(h, w, 4)
    finally:
        del data, array, schema, capsules


def _export(im: Image.Image):
    """(schema, array) capsules of the image's Arrow export, or None."""
    if im.mode != "RGB" or not hasattr(im, "__arrow_c_array__"):
        return None
    try:
        return im.__arrow_c_array__()
    except ValueError:  # "Image rows are not contiguous in memory": an image in several blocks
        return None
