"""Decoding and paired augmentation: one resize/crop/flip decision for every field of a sample.

Images are resized bicubically, label and instance maps with nearest neighbour, so a label map
stays a label map. Output tensors:

- ``image``-kind fields: ``float32 [3, H, W]`` in ``[-1, 1]``
- ``label``-kind fields: ``int64 [H, W]`` (class ids)
- ``instance``-kind fields: ``int32 [H, W]`` (instance ids, Cityscapes style)
"""

from __future__ import annotations

import io as _io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

MAP_KINDS = ("label", "instance")


class DecodeError(Exception):
    """A field that PIL cannot decode, or whose content does not fit its kind."""


def decode_field(kind: str, data: bytes) -> Image.Image:
    """Decode one encoded field; image kinds come back RGB, maps as single-channel images."""
    try:
        img = Image.open(_io.BytesIO(data))
        img.load()
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's ways of saying "not an image"
        # PIL names the BytesIO object (an address): keep messages, and manifests, deterministic.
        detail = re.sub(r"<[^>]* object at 0x[0-9a-fA-F]+>", "the data", str(exc))
        raise DecodeError(f"cannot decode: {detail}") from exc
    if kind == "image":
        return img if img.mode == "RGB" else img.convert("RGB")
    if img.mode not in ("L", "P", "I;16", "I", "I;16B", "I;16L"):
        raise DecodeError(f"a {kind} map must be single-channel, got mode {img.mode}")
    return img


def map_array(img: Image.Image) -> np.ndarray:
    """Integer ids of a single-channel map as ``[H, W]`` (uint8, uint16 or int32)."""
    arr = np.asarray(img)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


@dataclass(frozen=True)
class Augment:
    """Paired augmentation: resize to ``resize`` (W, H), crop ``crop`` (W, H), random h-flip.

    In evaluation the crop is centred and there is no flip, so evaluation is deterministic.
    """

    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    flip: bool = True

    def params(self, size: tuple[int, int], rng: np.random.Generator, train: bool) -> tuple:
        """The one decision shared by every field: (resize_to, crop_box, flip)."""
        w, h = self.resize or size
        box = None
        if self.crop is not None:
            cw, ch = self.crop
            if cw > w or ch > h:
                raise ValueError(f"crop {cw}x{ch} is larger than the image {w}x{h}")
            if train:
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            else:
                x, y = (w - cw) // 2, (h - ch) // 2
            box = (x, y, x + cw, y + ch)
        flip = bool(train and self.flip and rng.random() < 0.5)
        return (w, h), box, flip


def augment(fields: dict[str, Image.Image], kinds: dict[str, str], aug: Augment,
            rng: np.random.Generator, train: bool):
    """Apply one augmentation decision to every field and convert to tensors (see module doc)."""
    import torch

    sizes = {img.size for img in fields.values()}
    if len(sizes) != 1:
        raise DecodeError(f"fields disagree in size: {sorted(sizes)}")
    size = sizes.pop()
    (w, h), box, flip = aug.params(size, rng, train)
    out = {}
    for name, img in fields.items():
        kind = kinds[name]
        if (w, h) != img.size:
            resample = Image.Resampling.NEAREST if kind in MAP_KINDS else Image.Resampling.BICUBIC
            img = img.resize((w, h), resample)
        if box is not None:
            img = img.crop(box)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if kind == "image":
            # np.array: one writable copy out of PIL; the float conversion is the only other pass
            # over the pixels besides the in-place normalisation.
            t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()
            out[name] = t.mul_(1 / 127.5).sub_(1.0).contiguous()
        else:
            out[name] = torch.from_numpy(map_array(img).astype(np.int64 if kind == "label" else np.int32))
    return out
