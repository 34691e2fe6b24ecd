"""Decoding and paired augmentation: one resize/crop/flip decision for every field of a sample,
and the conversion of the loader's integer batches into what the networks take.

Images are resized bicubically, label and instance maps with nearest neighbour, so a label map
stays a label map. ``augment`` copies nothing: a field comes back as a numpy view of the decoded
image's memory, cropped and flipped by its strides, and ``collate`` copies each field once, into
its batch. The loader hands over integers, as they are stored (per sample; a batch adds ``N``):

- ``image``-kind fields (photos, pix2pix ``input`` images): ``uint8 [H, W, 4]``, each pixel R, G,
  B and a padding byte (Pillow's own RGBX memory, copied in whole 4-byte words: picking 3 bytes
  out of 4, or transposing to ``[3, H, W]``, cost the host a slow pass over the pixels that the
  device does for nothing). ``float_image`` and ``rgb_image`` give ``[N, 3, H, W]`` on the device.
- ``label``-kind fields: ``uint8 [H, W]`` class ids when the manifest's ``num_classes`` is at
  most 256 (Cityscapes' 35, ADE20K's 151, the demo's)
- other maps (``instance``-kind fields, labels of more classes): ``uint16 [H, W]`` when the field is
  stored as PNG, which holds at most 16 bits per pixel (Cityscapes instance ids reach 33000 and
  more, in 16-bit PNGs), else ``int32 [H, W]``. Half the bytes of int32 through the worker queues
  and to the device; each family's ``prepare`` widens them there (CUDA supports uint16 in copies
  and casts, not in most other kernels).

The dtype of a field (``loader_dtypes``) is a function of the manifest (its kind, the extensions
of its members, ``num_classes``), never of a sample: the shard writer copies a map's PNG bytes from
the source unchanged (or re-encodes them at the same bit depth), so a dataset may mix 8- and
16-bit PNGs, and one batch must still collate to one dtype. A 16-bit label PNG in a dataset of at
most 256 classes becomes uint8 (the writer checked its ids against ``num_classes``; an id that does
not fit is refused here, never wrapped).

Floats are made on the device, in each family's ``prepare`` (``float_image``, ``class_ids``):
uint8 batches are 3x smaller than float32 ones, which is 3x less to pass through the DataLoader's
worker queues and to copy from host to device, and no worker spends a pass over the pixels on a
conversion the device does for nothing.
"""

from __future__ import annotations

import functools
import hashlib
import io as _io
import logging
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from .pixels import pixels, rgbx_words

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch is imported where tensors are made: the shard writer never needs it
    import torch

MAP_KINDS = ("label", "instance")


class DecodeError(Exception):
    """A field that PIL cannot decode, or whose content does not fit its kind."""


# Member extensions -> the Pillow format to try first (``decode_field``'s ``ext``).
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "tif": "TIFF", "tiff": "TIFF",
               "bmp": "BMP", "gif": "GIF", "ppm": "PPM"}


def decode_field(kind: str, data: bytes, into: DecodeBuffer | None = None, ext: str | None = None) -> Image.Image:
    """Decode one encoded field; image kinds come back RGB, maps as single-channel images.

    With ``into``, the pixels are decoded into that buffer's memory where its layout allows
    (``DecodeBuffer``), and ``into.array`` is then the image's pixels as an array (else None).
    ``ext``, the member's extension (``png``), names the format Pillow tries first, instead of
    asking every registered plugin in turn (BMP, GIF, JPEG, ... before PNG: ~5 µs per field);
    data of another format than its extension says is still decoded, by the plain way."""
    try:
        fmt = PIL_FORMATS.get(ext) if ext else None
        try:
            img = Image.open(_io.BytesIO(data), formats=(fmt,) if fmt else None)
        except UnidentifiedImageError:
            if fmt is None:
                raise
            img = Image.open(_io.BytesIO(data))  # not what its extension says
        if into is not None:
            into.map(img, kind)
        img.load()
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's ways of saying "not an image"
        # PIL names the BytesIO object (an address): keep messages, and manifests, deterministic.
        detail = re.sub(r"<[^>]* object at 0x[0-9a-fA-F]+>", "the data", str(exc))
        raise DecodeError(f"cannot decode: {detail}") from exc
    if into is not None and into.array is not None and img.im is not into.core:
        into.array = None  # the plugin replaced the image memory after all: its pixels are elsewhere
    if kind == "image":
        return img if img.mode == "RGB" else img.convert("RGB")
    if img.mode not in ("L", "P", "I;16", "I", "I;16B", "I;16L"):
        raise DecodeError(f"a {kind} map must be single-channel, got mode {img.mode}")
    return img


class DecodeBuffer:
    """Memory one field's decodes reuse, sample after sample (the stream's ``Fields(reuse=True)``).

    Pillow decodes into the image memory an opened image already has (``ImageFile.load_prepare``
    allocates only where there is none), and ``Image.core.map_buffer`` (what ``Image.frombuffer``
    uses) makes image memory of an array's. So the pixels land in an array this class keeps:
    no allocation and zero fill of new image memory per decode (warm, the demo's 256x128 photo,
    instance and label PNGs decoded 35, 21 and 3 µs faster), and the array is the pixels' view,
    with no export (``pixels``, ~4 µs per field warm, several times that after a decode). The
    memory is the same from decode to decode, still in the caches. The layouts are Pillow's own:
    RGB as 4-byte RGBX words, L and P as uint8, I;16 as little-endian uint16. Another mode, a
    multi-tile file, or a Pillow whose ``map_buffer`` refuses, decodes as ``decode_field`` does
    without ``into``.

    The array is overwritten by the next decode into it: a view of it must be used (copied into
    its batch) before then."""

    LAYOUTS = {"RGB": np.dtype(np.uint32), "L": np.dtype(np.uint8), "P": np.dtype(np.uint8),
               "I;16": np.dtype("<u2")}
    _refused: set[str] = set()  # modes map_buffer refused in this process

    def __init__(self) -> None:
        self.array: np.ndarray | None = None  # the last decode's pixels, or None where they are not here
        self.core = None  # Pillow image memory made of ``memory``, kept for the next decode
        self.memory: np.ndarray | None = None

    def map(self, img: Image.Image, kind: str) -> None:
        """Before ``img`` (opened, not loaded) is loaded: give it image memory of this buffer."""
        self.array = None
        mode = img.mode
        dtype = self.LAYOUTS.get(mode)
        if dtype is None or (mode == "RGB") != (kind == "image") or len(img.tile) != 1 or mode in self._refused:
            return
        w, h = img.size
        if self.core is None or self.core.mode != mode or self.memory.shape != (h, w) or self.memory.dtype != dtype:
            memory = np.empty((h, w), dtype)
            memory.flags.writeable = False  # for its views; the decoder writes through its own pointer
            try:
                self.core = Image.core.map_buffer(memory, (w, h), "raw", 0, (mode, 0, 1))
            except (ValueError, TypeError, AttributeError) as exc:
                self._refused.add(mode)
                log.debug("no decoding into reused memory for mode %s (%s)", mode, exc)
                return
            self.memory = memory
        img.im = self.core  # the same image memory for the next decode of this mode and size
        self.array = self.memory


def map_array(img: Image.Image) -> np.ndarray:
    """Integer ids of a single-channel map as ``[H, W]`` (uint8, uint16 or int32)."""
    arr = np.asarray(img)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


IMAGE_DTYPE = "rgbx"  # what ``loader_dtypes`` says of image fields: uint8 [H, W, 4] RGBX


def map_dtype(kind: str, num_classes: int | None, exts: list[str] | None) -> np.dtype:
    """The dtype the loader gives a ``label`` or ``instance`` field of a dataset whose members of
    that field have the extensions ``exts`` (module doc)."""
    if kind == "label" and num_classes is not None and num_classes <= 256:
        return np.dtype(np.uint8)
    if exts and all(str(ext).lower() == "png" for ext in exts):  # at most 16 bits per pixel
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def loader_dtypes(fields: dict[str, dict], num_classes: int | None) -> dict[str, str]:
    """What the loader hands over for each of a manifest's ``fields`` (``{name: {"kind": ...,
    "exts": [...]}}``): ``IMAGE_DTYPE`` for images, the numpy dtype name of a map (``map_dtype``)."""
    return {name: IMAGE_DTYPE if spec["kind"] == "image" else
            map_dtype(spec["kind"], num_classes, spec.get("exts")).name for name, spec in fields.items()}


_EIGHT_WORDS = struct.Struct("<8Q")


class SampleRandom:
    """The random draws of one sample's augmentation, a pure function of ``words`` (e.g. seed,
    slot, epoch, index): counter-mode BLAKE2b, eight 64-bit words per block. A few µs per sample,
    where a seeded numpy Generator costs ~45 µs (its SeedSequence): 2% of a small sample's decode.
    The first block is hashed when the object is made (before the sample is decoded, not after).

    ``integers(low, high)`` maps a word onto ``[low, high)`` by multiply-shift (bias below
    ``(high - low) / 2**64``); ``random()`` is a float in ``[0, 1)`` from 53 bits.
    """

    __slots__ = ("_key", "_block", "_words", "_used")

    def __init__(self, *words: int):
        self._key = "/".join(map(str, map(int, words))).encode()
        self._block = 0
        self._words = self._hash()

    def _hash(self) -> tuple[int, ...]:
        digest = hashlib.blake2b(self._key, digest_size=64, salt=self._block.to_bytes(16, "little")).digest()
        self._block += 1
        self._used = 0
        return _EIGHT_WORDS.unpack(digest)

    def _next(self) -> int:
        if self._used == 8:
            self._words = self._hash()
        self._used += 1
        return self._words[self._used - 1]

    def integers(self, low: int, high: int) -> int:
        if high <= low:
            raise ValueError(f"empty range [{low}, {high})")
        return low + ((self._next() * (high - low)) >> 64)

    def random(self) -> float:
        return (self._next() >> 11) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class Augment:
    """Paired augmentation: resize to ``resize`` (W, H), crop ``crop`` (W, H), random h-flip.

    In evaluation the crop is centred and there is no flip, so evaluation is deterministic.
    """

    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    flip: bool = True

    def params(self, size: tuple[int, int], rng, train: bool) -> tuple:
        """The one decision shared by every field: (resize_to, crop_box, flip). ``rng`` has
        ``integers(low, high)`` and ``random()`` (a ``SampleRandom`` or a numpy Generator)."""
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


class Fields:
    """The fields of one dataset in a fixed order, with their kinds and loader dtypes: decoding and
    augmenting a sample positionally, a list of encoded fields in, a list of views out (``None``
    for a field the sample lacks). Made once (per stream slot, per map-style dataset), not per
    sample: at 256x128 everything the loader does besides decoding took ~0.2 ms per sample, and
    leaving out the per-sample dicts saved ~30 µs of it (A/B, 4 processes each)."""

    def __init__(self, kinds: dict[str, str], dtypes: dict[str, str], reuse: bool = False):
        self.names = tuple(kinds)
        self.kinds = tuple(kinds.values())
        self.dtypes = tuple(np.dtype(np.uint32) if dtypes[name] == IMAGE_DTYPE else np.dtype(dtypes[name])
                            for name in self.names)
        # reuse: every field decodes into memory of its own, the same for every sample (``DecodeBuffer``)
        self.buffers = tuple(DecodeBuffer() for _ in self.names) if reuse else None

    def decode_augment(self, encoded: list[bytes | None], aug: Augment, rng, train: bool,
                       exts: list[str | None] | None = None) -> list[np.ndarray | None]:
        """``decode_field`` for every field (``exts``: the members' extensions, if known), then
        ``views``: the loader's way (``decode_augment``). With ``reuse``, a view may be of memory
        the next call decodes into."""
        nothing = (None,) * len(encoded)
        images = [None if data is None else decode_field(kind, data, buffer, ext)
                  for kind, data, buffer, ext in zip(self.kinds, encoded, self.buffers or nothing, exts or nothing)]
        return self.views(images, aug, rng, train, self.buffers and [buffer.array for buffer in self.buffers])

    def views(self, images: list[Image.Image | None], aug: Augment, rng, train: bool,
              arrays: list[np.ndarray | None] | None = None) -> list[np.ndarray | None]:
        """One augmentation decision (``aug.params``, drawn from ``rng``) applied to every decoded
        field: read-only numpy views of the pixel memory (``_field_view``; ``arrays``: the images'
        pixels where they are already arrays, from ``DecodeBuffer``)."""
        sizes = {img.size for img in images if img is not None}
        if len(sizes) != 1:
            raise DecodeError(f"fields disagree in size: {sorted(sizes)}")
        geometry = aug.params(sizes.pop(), rng, train)
        return [None if img is None else _field_view(name, img, kind, geometry, dtype, array)
                for name, kind, dtype, img, array in zip(self.names, self.kinds, self.dtypes, images,
                                                         arrays or (None,) * len(images))]


def augment(fields: dict[str, Image.Image], kinds: dict[str, str], aug: Augment, rng, train: bool,
            dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    """Apply one augmentation decision to every (decoded) field: read-only numpy views of the
    pixel memory (``_field_view``), each turned into its loader dtype (``dtypes``, from
    ``loader_dtypes``) by ``collate``'s one copy."""
    names = list(fields)
    views = Fields({name: kinds[name] for name in names}, dtypes).views(list(fields.values()), aug, rng, train)
    return dict(zip(names, views))


def decode_augment(encoded: dict[str, bytes], kinds: dict[str, str], aug: Augment, rng, train: bool,
                   dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    """``decode_field`` for every field of a sample, then ``augment``: the loader's way.

    Every field is decoded before any view is made: a PNG decode leaves the CPU's caches full of its
    own data and code, and Python run between decodes ran several times slower than it does warm
    (interleaving cost ~0.05 ms per 256x128 demo sample, ~2% of its decode). The views keep the
    decoded images alive until ``collate`` copies them into the batch; ``stream.keep_freed_memory``
    keeps the memory they free mapped for the next sample."""
    names = list(encoded)
    fields = Fields({name: kinds[name] for name in names}, dtypes)
    return dict(zip(names, fields.decode_augment(list(encoded.values()), aug, rng, train)))


def _field_view(name: str, img: Image.Image, kind: str, geometry: tuple, dtype: np.dtype,
                array: np.ndarray | None = None) -> np.ndarray:
    """One field, resized, cropped and flipped, as a view of the image's pixel memory (no copy):
    ``[h, w]`` uint32 RGBX words for images (``rgbx_words``), ``[h, w]`` ids as stored for maps.
    A map stored in a type its loader ``dtype`` cannot hold (a 16-bit label PNG of a 35-class
    dataset) is checked here, where a bad sample can still be skipped, never wrapped by the copy
    into its batch. ``array``: the pixels of ``img`` as an array already, or None."""
    (w, h), box, flip = geometry
    if (w, h) != img.size:
        resample = Image.Resampling.NEAREST if kind in MAP_KINDS else Image.Resampling.BICUBIC
        img, array = img.resize((w, h), resample), None
    x0, y0, x1, y1 = box or (0, 0, w, h)
    if array is None:
        array = rgbx_words(img) if kind == "image" else pixels(img)
    view = array[y0:y1, x0:x1]
    if kind != "image" and not _can_cast(view.dtype, dtype) and view.size:
        limits = np.iinfo(dtype)
        ends = (view.min(), view.max()) if view.dtype.kind == "i" else (view.max(),)  # unsigned: no pass for min
        for value in map(int, ends):
            if not limits.min <= value <= limits.max:
                raise DecodeError(f"{name} map has id {value}, outside {dtype}, the loader dtype of this field "
                                  f"(from the manifest: its kind, member types and number of classes)")
    return view[:, ::-1] if flip else view


@functools.cache
def _can_cast(stored: np.dtype, dtype: np.dtype) -> bool:
    return np.can_cast(stored, dtype)


# ------------------------------------------------------------------ on the device, in prepare()


def rgb_image(image: torch.Tensor) -> torch.Tensor:
    """Loader images, uint8 ``[N, H, W, 4]`` RGBX -> uint8 ``[N, 3, H, W]``, a view (no copy).
    Move the loader's dense tensor to the device first: a view this strided, sent from the host,
    would be made contiguous there, by the CPU."""
    import torch

    if image.dtype != torch.uint8 or image.dim() != 4 or image.shape[-1] != 4:
        raise TypeError(f"expected the loader's uint8 [N, H, W, 4] images, got {image.dtype} {list(image.shape)}")
    return image[..., :3].permute(0, 3, 1, 2)


def float_image(image: torch.Tensor) -> torch.Tensor:
    """Loader images, uint8 ``[N, H, W, 4]`` RGBX (already on the device) -> float32
    ``[N, 3, H, W]`` (contiguous) in ``[-1, 1]``.

    ``x * (1 / 127.5) - 1`` in this order, in place on the new float tensor: bit for bit the
    values the loader produced when it converted on the host. Anything but the loader's uint8 is
    refused (a float image would be scaled twice)."""
    import torch

    rgb = rgb_image(image)
    return torch.empty(rgb.shape, dtype=torch.float32, device=rgb.device).copy_(rgb).mul_(1 / 127.5).sub_(1.0)


def class_ids(label: torch.Tensor) -> torch.Tensor:
    """Loader label maps (uint8 or int32 ``[N, H, W]``, on the device) -> int64: ``one_hot``'s
    scatter needs int64, and indexing with a uint8 tensor would be a boolean mask."""
    import torch

    if label.is_floating_point() or label.dtype == torch.bool:
        raise TypeError(f"expected integer label maps from the loader, got {label.dtype}")
    return label.long()
