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

``rgbx_words`` views an RGB image's memory as it is, one uint32 word per pixel (R, G, B and a
padding byte): the loader copies photos in that form, whole words, never picking 3 bytes out of 4.
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


def _fallback(img: Image.Image, why: str) -> None:
    if why not in _said:  # a copy more per field, not other values: said once, at debug level
        _said.add(why)
        log.debug("no zero-copy pixel view (%s): a copy instead", why)


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
    layout = _layout(img)
    if layout is None:
        return np.asarray(img)
    typestr, per_pixel = layout
    w, h = img.size
    view = _export_view(img, typestr, per_pixel, (h, w, per_pixel) if per_pixel > 1 else (h, w))
    if view is None:
        return np.asarray(img)
    return view[:, :, :3] if per_pixel > 1 else view


def rgbx_words(img: Image.Image) -> np.ndarray:
    """An RGB image's pixels as ``[H, W]`` uint32 words, each R, G, B and a padding byte in memory
    order (Pillow's own RGBX storage), zero-copy where ``pixels`` is; the padding byte's value is
    Pillow's (255 after a decode, 0 after a resize). Otherwise a copy through RGBA."""
    if img.mode != "RGB":
        raise ValueError(f"rgbx_words takes RGB images, not {img.mode}")
    w, h = img.size
    view = _export_view(img, _WORDS, 4, (h, w)) if _layout(img) is not None else None
    if view is None:
        return np.ascontiguousarray(np.asarray(img.convert("RGBA"))).view(np.uint32).reshape(h, w)
    return view


_WORDS = np.dtype(np.uint32).str  # 4 bytes of a pixel read as one native word


def _layout(img: Image.Image) -> tuple[str, int] | None:
    """``(numpy typestr, values per pixel)`` of ``img``'s export, or None where there is no view."""
    mode = img.mode
    ok = _schema_ok.get(mode)
    if ok is None:
        ok = _schema_ok[mode] = mode in _LAYOUTS and hasattr(img, "__arrow_c_array__") and _check_schema(img)
    return _LAYOUTS[mode][1:] if ok else None


def _export_view(img: Image.Image, typestr: str, per_pixel: int, shape: tuple[int, ...]) -> np.ndarray | None:
    """The export's pixel buffer as an array of ``shape`` and ``typestr``; None where the export is
    refused or not laid out as expected (then the caller copies). Only the array is exported, not
    its schema (checked once per mode), and the core image is asked directly: this runs for every
    field of every sample."""
    core = img.im
    if core is None:  # opened, not loaded
        img.load()
        core = img.im
    try:
        capsule = core.__arrow_c_array__()
    except ValueError as exc:  # e.g. "Image rows are not contiguous in memory" (several blocks)
        _fallback(img, str(exc))
        return None
    array = _ArrowArray.from_address(_capsule_pointer(capsule, b"arrow_array"))
    values = array.children[0].contents if per_pixel > 1 else array
    w, h = img.size
    if values.length != w * h * per_pixel or values.offset or array.offset or values.n_buffers != 2:
        _fallback(img, f"unexpected {img.mode} export layout")
        return None
    base = _Export()
    base.__array_interface__ = {"version": 3, "typestr": typestr, "data": (values.buffers[1], True), "shape": shape}
    base.keep = (capsule, img)
    return np.asarray(base)
