"""Decoding and paired augmentation: one resize/crop/flip decision for every field of a sample,
and the tensors the loader hands over per sample (images uint8 ``[3, H, W]``, maps ``[H, W]``
integer ids as stored; ``torch.utils.data.default_collate`` adds ``N``)."""

from __future__ import annotations

import io as _io
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where tensors are made: the shard writer never needs it
    import torch

MAP_KINDS = ("label", "instance")
CLASS_KIND = "class"  # one integer per sample, not a picture: never resized, cropped or flipped
_DECIMAL = re.compile(rb"\s*([0-9]{1,9})\s*")


class DecodeError(Exception):
    """A field that PIL cannot decode, or whose content does not fit its kind."""


def decode_field(kind: str, data: bytes) -> Image.Image:
    """Decode one encoded field; image kinds come back RGB, maps as single-channel images."""
    try:
        img = Image.open(_io.BytesIO(data))
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL's "not an image"
        # PIL names the BytesIO object (an address): keep messages, and manifests, deterministic.
        detail = re.sub(r"<[^>]* object at 0x[0-9a-fA-F]+>", "the data", str(exc))
        raise DecodeError(f"cannot decode: {detail}") from exc
    if kind == "image":
        return img if img.mode == "RGB" else img.convert("RGB")
    if img.mode not in ("L", "P", "I;16", "I", "I;16B", "I;16L"):
        raise DecodeError(f"a {kind} map must be single-channel, got mode {img.mode}")
    return img


def decode_class(data: bytes, num_classes: int | None) -> int:
    """A ``class`` field: the sample's class id as ASCII decimal (``b"3"``), within
    ``0..num_classes - 1`` when the count is known."""
    match = _DECIMAL.fullmatch(data)
    if match is None:
        raise DecodeError(f"a class field must hold a decimal class id, got {data[:20]!r}")
    value = int(match.group(1))
    if num_classes is not None and value >= num_classes:
        raise DecodeError(f"class id {value} outside 0..{num_classes - 1}")
    return value


def map_array(img: Image.Image) -> np.ndarray:
    """Integer ids of a single-channel map as ``[H, W]`` (uint8, uint16 or int32), native order."""
    arr = np.asarray(img)
    return arr.astype(arr.dtype.newbyteorder("=")) if arr.dtype.byteorder == ">" else arr


def map_dtype(kind: str, num_classes: int | None, exts: list[str] | None) -> np.dtype:
    """The dtype a ``label`` or ``instance`` field gets, from the manifest alone (never from a
    sample, so that a dataset mixing 8- and 16-bit PNGs still collates): labels of at most 256
    classes uint8; maps stored only as PNG (at most 16 bits; Cityscapes instance ids reach ~34000)
    uint16; anything else int32."""
    if kind == "label" and num_classes is not None and num_classes <= 256:
        return np.dtype(np.uint8)
    if exts and all(str(ext).lower().endswith("png") for ext in exts):
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def field_dtypes(fields: dict[str, dict], num_classes: int | None) -> dict[str, np.dtype]:
    """Per field of a manifest (``{name: {"kind": ..., "exts": [...]}}``) its loader dtype:
    uint8 for images (``[3, H, W]``), ``map_dtype`` for maps (``[H, W]``), int64 for class ids
    (``[]``, as ``torch.tensor(int)``)."""
    return {name: np.dtype(np.uint8) if spec["kind"] == "image" else np.dtype(np.int64) if spec["kind"] == CLASS_KIND
            else map_dtype(spec["kind"], num_classes, spec.get("exts")) for name, spec in fields.items()}


def sample_rng(seed: int, slot: int, epoch: int, index: int) -> random.Random:
    """The augmentation draws of one position: a pure function of ``(seed, slot, epoch, index)``
    (a string seed is hashed by SHA-512, whatever ``PYTHONHASHSEED`` is)."""
    return random.Random(f"{seed}/{slot}/{epoch}/{index}")


@dataclass(frozen=True)
class Augment:
    """Paired augmentation: resize to ``resize`` (W, H), crop ``crop`` (W, H), random h-flip.

    In evaluation the crop is centred and there is no flip, so evaluation is deterministic.
    """

    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    flip: bool = True

    def params(self, size: tuple[int, int], rng: random.Random | None, train: bool) -> tuple:
        """The one decision shared by every field: ``((w, h) after resize, crop box, flip)``."""
        w, h = self.resize or size
        box = (0, 0, w, h)
        if self.crop is not None:
            cw, ch = self.crop
            if cw > w or ch > h:
                raise ValueError(f"crop {cw}x{ch} is larger than the image {w}x{h}")
            x, y = (rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)) if train else ((w - cw) // 2, (h - ch) // 2)
            box = (x, y, x + cw, y + ch)
        flip = bool(train and self.flip and rng.random() < 0.5)
        return (w, h), box, flip


def augment(images: dict[str, Image.Image], kinds: dict[str, str], dtypes: dict[str, np.dtype],
            aug: Augment, rng: random.Random | None, train: bool) -> dict[str, torch.Tensor]:
    """One augmentation decision (``aug.params``) applied to every decoded field of a sample:
    images resized bicubically, maps with nearest neighbour (a label map stays a label map), then
    cropped and flipped alike. Returns uint8 ``[3, h, w]`` images and ``[h, w]`` maps in their
    ``dtypes`` (``field_dtypes``); a map id that its dtype cannot hold is refused, never wrapped."""
    import torch

    sizes = {img.size for img in images.values()}
    if len(sizes) != 1:
        raise DecodeError(f"fields disagree in size: {sorted(sizes)}")
    (w, h), (x0, y0, x1, y1), flip = aug.params(sizes.pop(), rng, train)
    out = {}
    for name, img in images.items():
        kind, dtype = kinds[name], dtypes[name]
        if (w, h) != img.size:
            img = img.resize((w, h), Image.Resampling.NEAREST if kind in MAP_KINDS else Image.Resampling.BICUBIC)
        view = (np.asarray(img) if kind == "image" else map_array(img))[y0:y1, x0:x1]
        if flip:
            view = view[:, ::-1]
        if kind == "image":
            view = view.transpose(2, 0, 1)
        elif not np.can_cast(view.dtype, dtype) and view.size:
            lo, hi = int(view.min()), int(view.max())
            if lo < np.iinfo(dtype).min or hi > np.iinfo(dtype).max:
                raise DecodeError(f"{name} map has id {hi if hi > np.iinfo(dtype).max else lo}, outside {dtype}, "
                                  f"the loader dtype of this field (from the manifest: kind, member types, classes)")
        out[name] = torch.from_numpy(np.array(view, dtype=dtype, order="C"))  # the one copy: crop, flip, layout
    return out
