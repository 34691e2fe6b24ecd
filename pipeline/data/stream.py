"""The streaming loader: shards named by a manifest, read through fsspec, split over ranks and
DataLoader workers ("slots"), decoded and augmented, with the position needed to resume.

Every slot's sample sequence is a pure function of ``(seed, epoch, slot)``. Per epoch the shard
order is permuted (training) or kept (evaluation), the concatenated samples are cut into one
contiguous range per slot, and a slot reads only the shards that overlap its range, skipping tar
members before its start without decoding them.

- training: endless; every slot gets exactly ``N // slots`` positions per epoch, so ranks stay
  in step; positions are shuffled within a slot through a seeded buffer (``shuffled``) of at most
  ``shuffle_buffer`` samples and ``shuffle_buffer_mb`` of their encoded bytes.
- evaluation: one pass; slot ranges partition ``[0, N)``, so every sample is seen exactly once
  across all ranks and workers, with no padding.

Each sample carries ``__slot__``, ``__epoch__`` and ``__index__`` (its position in the slot's
epoch) and ``__bad__`` (bad samples the slot has skipped so far). A consumer that records, per
slot, the last ``(epoch, index + 1)`` it consumed can restart the stream exactly there with
``start=``; the skipped positions are re-read but not decoded.

With ``batch_size`` the stream yields batches of that many consecutive samples of one slot (what
a DataLoader worker batches; use the stream with ``DataLoader(batch_size=None)``), made by
``collate.Collate``: each field of a slot is decoded into memory of its own that every sample
reuses (``transforms.DecodeBuffer``), a sample's fields are views of it, cropped and flipped by
strides, and the batch is the one copy of them, made before the next sample is decoded. Without
``batch_size`` it yields samples, each field copied on its own. Either way fields are integer
tensors (``transforms`` has the layouts and dtypes): uint8 RGBX images ``[H, W, 4]``, label maps
uint8 (at most 256 classes), other maps uint16 (PNG) or int32. Each family's ``prepare`` turns
them into floats and int32/int64 on the device: 3x less to pass between DataLoader workers and the
main process, and 3x smaller host-to-device copies, than float32 images.

Tar shards are read by ``tar_samples`` (headers parsed there, one read per member); members of
samples before a slot's start are passed with ``seek``, never read.

A process that iterates a stream (a DataLoader worker, or the main process with
``num_workers=0``) first sets glibc's allocator to keep freed memory mapped
(``keep_freed_memory``): a sample allocates and frees several MB (member bytes, decoded images,
output tensors), and with glibc's default heuristics those pages went back to the kernel after
every sample, to be faulted in again for the next one.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import random
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from .. import io
from .collate import Collate
from .manifest import Manifest, ShardInfo, load_manifest
from .sources.base import sanitize_key
from .tar_samples import TarSamples
from .transforms import Augment, DecodeError, Fields, SampleRandom, loader_dtypes

log = logging.getLogger(__name__)

# Member suffixes whose content would be unpickled by generic decoders: refused outright.
FORBIDDEN_SUFFIXES = ("pyd", "pickle", "pkl", "pth", "pt", "npz")


class BadDataBudgetExceeded(RuntimeError):
    """More bad samples than ``max_bad_samples`` were met by one slot."""


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` (positions inside the tar) of one shard."""

    shard: ShardInfo
    start: int
    stop: int


def epoch_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch, 0xD0]).permutation(num_shards).tolist()


def slot_range(total: int, slot: int, num_slots: int, train: bool) -> tuple[int, int]:
    """The slot's share ``[lo, hi)`` of an epoch's ``total`` concatenated samples."""
    if train:
        quota = total // num_slots
        return slot * quota, (slot + 1) * quota
    return slot * total // num_slots, (slot + 1) * total // num_slots


def plan_segments(shards: list[ShardInfo], *, slot: int, num_slots: int, seed: int, epoch: int,
                  train: bool) -> list[Segment]:
    """The shard segments slot ``slot`` reads in ``epoch`` (a pure function of its arguments)."""
    order = epoch_order(len(shards), seed, epoch, shuffle=train)
    total = sum(s.samples for s in shards)
    lo, hi = slot_range(total, slot, num_slots, train)
    segments, offset = [], 0
    for i in order:
        shard = shards[i]
        a, b = max(lo, offset), min(hi, offset + shard.samples)
        if a < b:
            segments.append(Segment(shard, a - offset, b - offset))
        offset += shard.samples
    return segments


@dataclass
class SlotStats:
    bad: int = 0
    budget: int = 0
    last_problem: str = ""

    def record(self, where: str, reason: str, count: int = 1) -> None:
        self.bad += count
        self.last_problem = f"{where}: {reason}"
        log.warning("skipped %d bad sample(s) at %s: %s", count, where, reason)
        if self.bad > self.budget:
            raise BadDataBudgetExceeded(
                f"{self.bad} bad samples exceed the budget data.max_bad_samples={self.budget}; "
                f"last at {where}: {reason}")


def read_segment(seg: Segment, stats: SlotStats, storage_options: dict | None = None) -> Iterator[dict]:
    """Raw samples of one segment; a truncated or unreadable shard costs its remaining samples.
    Samples before the segment's start are counted from their tar headers, not read."""
    reader = None
    try:
        with io.open_url(seg.shard.url, "rb", storage_options) as f:
            reader = TarSamples(f, seg.shard.url, start=seg.start, stop=seg.stop)
            yield from reader
    except (*io.storage_errors(), tarfile.TarError, ValueError) as exc:
        # A truncated tar, a dropped connection after the store's own retries: the rest of the
        # segment is lost and counted; the slot moves on, so no other rank waits on this one.
        seen = reader.samples if reader else 0
        stats.record(f"{seg.shard.url} after sample {seen}", f"unreadable shard ({exc})",
                     seg.stop - max(seen, seg.start))
        return
    if reader.samples < seg.stop:
        stats.record(seg.shard.url, f"shard ends after {reader.samples} samples; the manifest says "
                     f"{seg.shard.samples}", seg.stop - max(reader.samples, seg.start))


def check_member_names(raw: dict) -> str | None:
    """Why a raw sample must be refused, or None. Keys are checked for path tricks, members for
    pickled content (never unpickled: a shard is data, not code)."""
    key = raw["__key__"]
    member = refused_member(raw)
    return unsafe_key(key) or (member and _refusal(key, member))


def unsafe_key(key: str) -> str | None:
    if key.startswith("/") or ".." in key.split("/") or "\\" in key:
        return f"unsafe key {key!r}"
    return None


def refused_member(raw: dict) -> str | None:
    """The first member name of ``raw`` whose suffix would be unpickled by generic decoders."""
    for name in raw:
        if not name.startswith("__") and name.rsplit(".", 1)[-1].lower() in FORBIDDEN_SUFFIXES:
            return name
    return None


def _refusal(key: str, member: str) -> str:
    return f"refusing member {key}.{member}: pickled content is never loaded"


@dataclass
class StreamSpec:
    """Everything a worker needs to rebuild its slot's stream (picklable)."""

    manifest: Manifest
    split: str
    train: bool
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    augment: Augment = field(default_factory=Augment)
    fields: tuple[str, ...] | None = None
    shuffle_buffer: int = 256
    shuffle_buffer_mb: float = 256.0
    max_bad_samples: int = 100
    storage_options: dict | None = None
    start: dict[int, tuple[int, int]] = field(default_factory=dict)
    batch_size: int | None = None

    def kinds(self) -> dict[str, str]:
        """The fields read, with their kinds."""
        return {name: self.manifest.fields[name]["kind"] for name in self.fields or self.manifest.fields}

    def dtypes(self) -> dict[str, str]:
        """The fields read, with their loader dtypes (``transforms.loader_dtypes``)."""
        return loader_dtypes({name: self.manifest.fields[name] for name in self.kinds()}, self.manifest.num_classes)


_MALLOC = {"M_TRIM_THRESHOLD": (-1, 128 << 20), "M_MMAP_THRESHOLD": (-3, 32 << 20)}  # mallopt(3), glibc
_allocator_set: bool | None = None  # None: not tried yet in this process


def keep_freed_memory() -> bool:
    """Once per process, on glibc: serve blocks up to 32 MiB from the heap and give the heap's
    free top back to the kernel only beyond 128 MiB. Returns whether the settings are in place.

    glibc's defaults adapt the mmap threshold to the largest block freed so far and trim the heap
    above twice that; a 1024x512 sample's buffers (~5 MB alive at once) then cost ~1000 page
    faults per sample, ~5 ms on a virtual machine where a fault costs 5 µs (up to a fifth of the
    PNG decode). Setting both values fixes them (it turns the adaptation off); a reading process
    keeps up to 128 MiB of freed memory mapped for reuse. Elsewhere (not glibc) nothing changes.
    """
    global _allocator_set
    if _allocator_set is not None:
        return _allocator_set
    _allocator_set = False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if platform.libc_ver()[0] == "glibc" else None
    if mallopt is None:
        return False
    refused = [name for name, (param, value) in _MALLOC.items() if mallopt(param, value) != 1]
    if refused:
        log.warning("mallopt refused %s: freed sample memory may go back to the kernel and be "
                    "faulted in again per sample", ", ".join(refused))
        return False
    log.debug("glibc allocator: %s", ", ".join(f"{n}={v}" for n, (_, v) in _MALLOC.items()))
    _allocator_set = True
    return True


def shuffled(raws: Iterator[dict], size: int, max_bytes: float, rng: random.Random) -> Iterator[dict]:
    """``raws`` through a shuffle buffer of at most ``size`` samples and ``max_bytes`` of their
    members' bytes. While the buffer is full, each arriving sample lets a random held one go (a
    sample larger than ``max_bytes`` on its own passes straight through); at the end the rest leave
    in random order. The order is a function of the input, the two bounds and ``rng``'s seed.

    The byte bound keeps a reading process's memory fixed whatever the sample size: a count alone
    held ~230 MB per DataLoader worker at 256 samples of 1024x512, ~600 MB of 2048x1024 Cityscapes
    (2.4 MB per sample), and a node runs ranks x workers of them."""
    buf: list[tuple[int, dict]] = []
    held = 0
    for raw in raws:
        nbytes = sum(len(v) for k, v in raw.items() if not k.startswith("__"))
        buf.append((nbytes, raw))
        held += nbytes
        while len(buf) >= size or held > max_bytes:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            nbytes, out = buf.pop()
            held -= nbytes
            yield out
    rng.shuffle(buf)
    yield from (raw for _, raw in buf)


def _slot_rng(seed: int, slot: int, epoch: int, index: int) -> SampleRandom:
    """The augmentation draws of one position: a pure function of ``(seed, slot, epoch, index)``."""
    return SampleRandom(seed, slot, epoch, index)


POSITIONS = ("__slot__", "__epoch__", "__index__", "__bad__")  # the ints of each sample, in this order


class _Layout(NamedTuple):
    """What ``SlotDecoder`` works out once for a layout of member names."""

    members: list[str | None]  # per field, its member (its first, e.g. ``image`` -> ``image.png``) or None
    exts: list[str | None]  # their extensions (``png``)
    refused: str | None  # a member whose content is never loaded: every such sample is refused
    missing: str | None  # a required field without a member


class SlotDecoder:
    """Decodes a slot's raw samples into the views of their fields (``transforms.Fields``, in the
    order of ``StreamSpec.kinds``). What does not change from sample to sample is worked out once:
    the fields, and for each layout of member names met (a dataset has one, or a few) which
    member holds each field, or why such samples are refused. Only the key is checked per sample."""

    def __init__(self, spec: StreamSpec):
        kinds = spec.kinds()
        self.fields = Fields(kinds, spec.dtypes(), reuse=True)
        self.required = tuple(spec.manifest.fields[name].get("required", True) for name in kinds)
        self.augment, self.train = spec.augment, spec.train
        self._layouts: dict[tuple[str, ...], _Layout] = {}  # the names of a raw sample -> its layout

    def __call__(self, raw: dict, rng: SampleRandom | None) -> list[np.ndarray | None]:
        key = raw["__key__"]
        reason = unsafe_key(key)
        if reason:
            raise DecodeError(reason)
        names = tuple(raw)
        layout = self._layouts.get(names)
        if layout is None:
            if len(self._layouts) >= 64:  # not one dataset's few layouts: forget them rather than grow
                self._layouts.clear()
            layout = self._layouts[names] = self._layout(raw)
        if layout.refused:
            raise DecodeError(_refusal(key, layout.refused))
        if layout.missing:
            raise DecodeError(f"missing field {layout.missing!r}")
        return self.fields.decode_augment([None if m is None else raw[m] for m in layout.members], self.augment,
                                          rng, self.train, layout.exts)

    def _layout(self, raw: dict) -> _Layout:
        first: dict[str, str] = {}
        for k in raw:
            if not k.startswith("__"):
                first.setdefault(k.split(".", 1)[0], k)
        members = [first.get(name) for name in self.fields.names]
        missing = next((name for name, member, required in zip(self.fields.names, members, self.required)
                        if member is None and required), None)
        return _Layout(members, [None if m is None else m.rsplit(".", 1)[-1] for m in members],
                       refused_member(raw), missing)


def iterate_slot(spec: StreamSpec, slot: int, num_slots: int) -> Iterator[tuple[str, list, tuple[int, ...]]]:
    """The decoded samples of one slot (endless in training, one pass in evaluation), each as
    ``(key, views, ints)``: the views of its fields in the order of ``spec.kinds()`` (``None`` for
    a field it lacks), its ints named by ``POSITIONS``."""
    shards = spec.manifest.shards(spec.split)
    total = sum(s.samples for s in shards)
    if spec.train and total < num_slots:
        raise ValueError(f"split {spec.split!r} has {total} samples, fewer than the {num_slots} "
                         f"reading slots (ranks x workers); use fewer workers")
    decode = SlotDecoder(spec)
    stats = SlotStats(budget=spec.max_bad_samples)
    epoch, skip = spec.start.get(slot, (0, 0))
    while True:
        segments = plan_segments(shards, slot=slot, num_slots=num_slots, seed=spec.seed, epoch=epoch,
                                 train=spec.train)
        raws = (raw for seg in segments for raw in read_segment(seg, stats, spec.storage_options))
        if spec.train:
            rng = random.Random(zlib.crc32(f"{spec.seed}/{epoch}/{slot}".encode()))
            raws = shuffled(raws, spec.shuffle_buffer, spec.shuffle_buffer_mb * 2**20, rng)
        for index, raw in enumerate(raws):
            if index < skip:
                continue  # consumed before the resume: re-read, never decoded
            try:  # evaluation draws nothing
                views = decode(raw, _slot_rng(spec.seed, slot, epoch, index) if spec.train else None)
            except (DecodeError, ValueError, OSError) as exc:
                stats.record(f"{raw['__url__']}#{raw['__key__']}", str(exc))  # built only when needed
                continue
            yield sanitize_key(raw["__key__"]), views, (slot, epoch, index, stats.bad)
            del views  # not kept through the next decode (they hold the decoded pixels)
        if not spec.train:
            return
        epoch, skip = epoch + 1, 0


class ShardStream(torch.utils.data.IterableDataset):
    """A stream over one split of a manifest; see the module docstring.

    Use with ``torch.utils.data.DataLoader(stream, batch_size=None, num_workers=W)`` and build it
    with ``batch_size`` and the same ``num_workers=W`` (every rank must use the same ``W``).
    ``len()`` is what this rank yields per epoch: positions, or with ``batch_size`` batches
    (rounded up per slot; a training batch may run across the end of an epoch).
    """

    def __init__(self, spec: StreamSpec, num_workers: int = 0):
        super().__init__()
        self.spec = spec
        self.num_workers = num_workers
        self.collate = Collate(spec.dtypes())

    def slots(self) -> tuple[list[int], int]:
        """This rank's slot ids and the total number of slots."""
        per_rank = max(1, self.num_workers)
        first = self.spec.rank * per_rank
        return list(range(first, first + per_rank)), self.spec.world_size * per_rank

    def __len__(self) -> int:
        own, num_slots = self.slots()
        total = self.spec.manifest.num_samples(self.spec.split)
        spans = (slot_range(total, s, num_slots, self.spec.train) for s in own)
        size = self.spec.batch_size or 1
        return sum(-(-(hi - lo) // size) for lo, hi in spans)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        if workers != max(1, self.num_workers):
            raise ValueError(f"ShardStream was built for num_workers={self.num_workers} but runs in "
                             f"{workers} worker(s); pass the DataLoader's num_workers to make_stream")
        worker = info.id if info is not None else 0
        slot = self.spec.rank * workers + worker
        keep_freed_memory()
        samples = iterate_slot(self.spec, slot, self.spec.world_size * workers)
        if self.spec.batch_size is None:
            return (self.collate.put_one(*sample, POSITIONS) for sample in samples)
        return self.collate.put_batches(samples, self.spec.batch_size, POSITIONS)


def make_stream(url: str, split: str, *, train: bool, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, seed: int = 0, augment: Augment | None = None,
                fields: tuple[str, ...] | None = None, shuffle_buffer: int = 256,
                shuffle_buffer_mb: float = 256.0, max_bad_samples: int = 100, storage_options: dict | None = None,
                start: dict[int, tuple[int, int]] | None = None, batch_size: int | None = None):
    """A ``ShardStream`` over ``split`` of the manifest at ``url`` (a directory or the JSON);
    batches of ``batch_size`` samples, or single samples without it."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if shuffle_buffer < 1 or not shuffle_buffer_mb > 0:
        raise ValueError(f"the shuffle buffer needs at least 1 sample and more than 0 MB, got "
                         f"shuffle_buffer={shuffle_buffer}, shuffle_buffer_mb={shuffle_buffer_mb}")
    manifest = load_manifest(url, storage_options)
    manifest.split(split)  # a clear error for an unknown split, before any worker starts
    for name in fields or ():
        if name not in manifest.fields:
            raise ValueError(f"field {name!r} is not in {manifest.url}; it has {', '.join(manifest.fields)}")
    spec = StreamSpec(manifest=manifest, split=split, train=train, rank=rank, world_size=world_size,
                      seed=seed, augment=augment or Augment(), fields=fields, shuffle_buffer=shuffle_buffer,
                      shuffle_buffer_mb=shuffle_buffer_mb,
                      max_bad_samples=max_bad_samples, storage_options=storage_options,
                      start=dict(start or {}), batch_size=batch_size)
    return ShardStream(spec, num_workers=num_workers)
