"""Views of a decoded PIL image's pixel memory as numpy arrays, without copying it.

``np.asarray(img)`` copies: Pillow builds its ``__array_interface__`` from ``tobytes()``, a
Python loop over encoder chunks joined into a new bytes object, packing RGB's 4-byte pixels to
3. For a 1024x512 photo that is ~1.5 ms and 3 MB of fresh memory per sample, more than the crop,
flip and layout change the loader needs. Pillow (11.2 and later) exports an image zero-copy
through the Arrow C data interface (``Image.__arrow_c_array__``); ``pixels`` reads that export's
buffer address with ctypes and wraps it in a read-only array whose base keeps the export, and so
the image memory, alive. Where the export is missing or not in the layout expected below (an old
Pillow, an image in several memory blocks), ``pixels`` falls back to ``np.asarray``: the same
values, one copy more.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class _ArrowArray(ctypes.Structure):
    """``struct ArrowArray`` of the Arrow C data interface."""


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64), ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p)]


class _ArrowSchema(ctypes.Structure):
    """``struct ArrowSchema`` of the Arrow C data interface."""


_ArrowSchema._fields_ = [
    ("format", ctypes.c_char_p), ("name", ctypes.c_char_p), ("metadata", ctypes.c_char_p),
    ("flags", ctypes.c_int64), ("n_children", ctypes.c_int64),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p)]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]

# Pillow mode -> (Arrow format of its export, numpy typestr of one value, values per pixel in memory).
# RGB is stored as 4 bytes per pixel (RGBX) and exported as a fixed-size list of 4 uint8.
_LAYOUTS = {
    "RGB": (b"+w:4", "|u1", 4),
    "L": (b"C", "|u1", 1),
    "P": (b"C", "|u1", 1),
    "I;16": (b"s", "<u2", 1),
    "I;16L": (b"s", "<u2", 1),
    "I;16B": (b"s", ">u2", 1),
    "I": (b"i", np.dtype(np.int32).str, 1),
}


class _Export:
    """The base of a ``pixels`` view: numpy reads ``__array_interface__``; ``keep`` holds the
    Arrow capsules (whose release lets Pillow free the memory) and the image."""

    __slots__ = ("__array_interface__", "keep")


_schema_ok: dict[str, bool] = {}  # mode -> Pillow exports it in the layout of _LAYOUTS (checked once)
_said: set[str] = set()


def _fallback(img: Image.Image, why: str) -> np.ndarray:
    if why not in _said:  # a copy more per field, not other values: said once, at debug level
        _said.add(why)
        log.debug("no zero-copy pixel view (%s): np.asarray copies instead", why)
    return np.asarray(img)


def _check_schema(img: Image.Image) -> bool:
    fmt, _, per_pixel = _LAYOUTS[img.mode]
    capsule = img.__arrow_c_schema__()  # held while the struct is read: dropping it releases the struct
    schema = _ArrowSchema.from_address(_capsule_pointer(capsule, b"arrow_schema"))
    ok = schema.format == fmt and (per_pixel == 1 or (
        schema.n_children == 1 and schema.children[0].contents.format == b"C"))
    if not ok:
        _fallback(img, f"Pillow exports {img.mode} as {schema.format!r}")
    return ok


def pixels(img: Image.Image) -> np.ndarray:
    """A read-only view of ``img``'s pixels: ``[H, W, 3]`` uint8 for RGB, ``[H, W]`` for the
    single-channel modes (uint8 for L and P, uint16 for I;16*, int32 for I), equal to
    ``np.asarray(img)``. Other modes are copied with ``np.asarray``."""
    mode = img.mode
    ok = _schema_ok.get(mode)
    if ok is None:
        ok = _schema_ok[mode] = mode in _LAYOUTS and hasattr(img, "__arrow_c_array__") and _check_schema(img)
    if not ok:
        return np.asarray(img)
    _, typestr, per_pixel = _LAYOUTS[mode]
    try:
        capsules = img.__arrow_c_array__()
    except ValueError as exc:  # e.g. "Image rows are not contiguous in memory" (several blocks)
        return _fallback(img, str(exc))
    array = _ArrowArray.from_address(_capsule_pointer(capsules[1], b"arrow_array"))
    values = array.children[0].contents if per_pixel > 1 else array
    w, h = img.size
    if values.length != w * h * per_pixel or values.offset or array.offset or values.n_buffers != 2:
        return _fallback(img, f"unexpected {mode} export layout")
    base = _Export()
    base.__array_interface__ = {"version": 3, "typestr": typestr, "data": (values.buffers[1], True),
                                "shape": (h, w, per_pixel) if per_pixel > 1 else (h, w)}
    base.keep = (capsules, img)
    view = np.asarray(base)
    return view[:, :, :3] if per_pixel > 1 else view
