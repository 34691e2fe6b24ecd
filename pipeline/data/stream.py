"""The streaming loader: shards named by a manifest (or a shard pattern), read through fsspec,
split over ranks and DataLoader workers ("slots"), decoded and augmented, with the position
needed to resume exactly.

Every slot's sample sequence is a pure function of ``(seed, epoch, slot)``. Per epoch the shard
order is permuted (training) or kept (evaluation), the concatenated samples are cut into one
contiguous range per slot, and a slot reads only the shards that overlap its range, entering each
at its first sample by the byte offset the manifest records (``shard_reader``).

- training: endless; every slot gets exactly ``N // slots`` positions per epoch, so ranks stay
  in step; positions are shuffled within a slot through a seeded buffer (``shuffled``) of at most
  ``shuffle_buffer`` samples and ``shuffle_buffer_mb`` of their encoded bytes.
- evaluation: one pass; slot ranges partition ``[0, N)``, so every sample is seen exactly once
  across all ranks and workers, with no padding.

Each sample carries ``__slot__``, ``__epoch__`` and ``__index__`` (its position in the slot's
epoch) and ``__bad__`` (bad samples the slot has skipped so far). A consumer that records, per
slot, the last ``(epoch, index + 1)`` it consumed restarts the stream exactly there with
``start=``; the positions before are read again (through the same shuffle) but not decoded.
A run with another number of slots takes an interrupted epoch over with ``handover=``
(``handover_plan``): it reads exactly the positions the old slots had not.
"""

from __future__ import annotations

import itertools
import logging
import random
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import default_collate

from .. import io
from .manifest import Manifest, ShardInfo, load_manifest
from .shard_reader import read_samples, reason
from .sources.base import sanitize_key
from .transforms import CLASS_KIND, Augment, DecodeError, augment, decode_class, decode_field, field_dtypes, sample_rng

log = logging.getLogger(__name__)

# Member suffixes whose content would be unpickled by generic decoders: refused outright.
FORBIDDEN_SUFFIXES = ("pyd", "pickle", "pkl", "pth", "pt", "npz")
POSITIONS = ("__slot__", "__epoch__", "__index__", "__bad__")


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

    def record(self, where: str, why: str, count: int = 1) -> None:
        self.bad += count
        log.warning("skipped %d bad sample(s) at %s: %s", count, where, why)
        if self.bad > self.budget:
            raise BadDataBudgetExceeded(f"{self.bad} bad samples exceed the budget data.max_bad_samples="
                                        f"{self.budget}; last at {where}: {why}")


def read_segment(seg: Segment, stats: SlotStats, storage_options: dict | None = None) -> Iterator[dict]:
    """Raw samples of one segment; a truncated or unreadable shard costs its remaining samples."""
    url, want, count = seg.shard.url, seg.stop - seg.start, 0
    try:
        with io.open_url(url, "rb", storage_options) as f:
            offset = seg.shard.offsets[seg.start] if seg.shard.offsets else None
            for raw in read_samples(f, url, seg.start, offset):
                yield raw
                count += 1
                if count == want:
                    return
    except (*io.storage_errors(), tarfile.TarError, ValueError) as exc:
        # A truncated tar, a dropped connection after the store's own retries: the rest of the
        # segment is lost and counted; the slot moves on, so no other rank waits on this one.
        stats.record(f"{url} after sample {seg.start + count}", f"unreadable shard ({reason(exc)})", want - count)
        return
    stats.record(url, f"shard ends after {seg.start + count} samples; the manifest says {seg.shard.samples}",
                 want - count)


def check_member_names(raw: dict) -> str | None:
    """Why a raw sample must be refused, or None. Keys are checked for path tricks, members for
    pickled content (never unpickled: a shard is data, not code)."""
    key = raw["__key__"]
    if key.startswith("/") or ".." in key.split("/") or "\\" in key:
        return f"unsafe key {key!r}"
    for name in raw:
        if not name.startswith("__") and name.rsplit(".", 1)[-1].lower() in FORBIDDEN_SUFFIXES:
            return f"refusing member {key}.{name}: pickled content is never loaded"
    return None


def shuffled(raws: Iterator[dict], size: int, max_bytes: float, rng: random.Random) -> Iterator[dict]:
    """``raws`` through a shuffle buffer of at most ``size`` samples and ``max_bytes`` of their
    members' bytes. While the buffer is full, each arriving sample lets a random held one go (a
    sample larger than ``max_bytes`` on its own passes straight through); at the end the rest leave
    in random order. The order is a function of the input, the two bounds and ``rng``'s seed.

    The byte bound keeps a reading process's memory fixed whatever the sample size: a count alone
    held ~600 MB per DataLoader worker of 2048x1024 Cityscapes, and a node runs ranks x workers."""
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
    handover: dict | None = None  # see ``handover_plan``


    def kinds(self) -> dict[str, str]:
        """The fields read, with their kinds."""
        return {name: self.manifest.fields[name]["kind"] for name in self.fields or self.manifest.fields}


def sample_decoder(spec: StreamSpec) -> Callable[[dict, random.Random | None], dict[str, torch.Tensor]]:
    """``decode(raw, rng)``: the fields of a raw sample, decoded and augmented (``transforms.augment``)."""
    kinds = spec.kinds()
    members = {name: spec.manifest.members(name) for name in kinds}
    dtypes = field_dtypes({name: spec.manifest.fields[name] for name in kinds}, spec.manifest.num_classes)

    def decode(raw: dict, rng: random.Random | None) -> dict[str, torch.Tensor]:
        why = check_member_names(raw)
        if why:
            raise DecodeError(why)
        images, classes = {}, {}
        for name, kind in kinds.items():
            member = next((m for m in members[name] if m in raw), None)
            if member is None:
                raise DecodeError(f"missing field {name!r}")
            if kind == CLASS_KIND:
                classes[name] = torch.tensor(decode_class(raw[member], spec.manifest.num_classes))
            else:
                images[name] = decode_field(kind, raw[member])
        return {**augment(images, kinds, dtypes, spec.augment, rng, spec.train), **classes}

    return decode


def slot_raws(spec: StreamSpec, shards: list[ShardInfo], slot: int, num_slots: int, epoch: int,
              stats: SlotStats) -> Iterator[dict]:
    """The raw samples of one slot's epoch in its reading order (shuffled in training)."""
    segments = plan_segments(shards, slot=slot, num_slots=num_slots, seed=spec.seed, epoch=epoch, train=spec.train)
    raws = (raw for seg in segments for raw in read_segment(seg, stats, spec.storage_options))
    if spec.train:
        raws = shuffled(raws, spec.shuffle_buffer, spec.shuffle_buffer_mb * 2**20,
                        random.Random(zlib.crc32(f"{spec.seed}/{epoch}/{slot}".encode())))
    return raws


def handover_plan(handover: dict, total: int, slot: int, num_slots: int) -> list[tuple[int, int, int]]:
    """What slot ``slot`` of ``num_slots`` reads of an epoch that another layout began.

    ``handover`` = ``{"epoch": e, "slots": S, "consumed": [k_0, ..., k_S-1]}``: old slot ``s`` of
    the run that stopped had read the first ``k_s`` of its ``total // S`` positions of epoch
    ``e``. The unread positions, in old-slot order, are cut into ``num_slots`` equal contiguous
    pieces (the last ``< num_slots`` left over, as an epoch leaves ``total mod slots``): no sample
    of the epoch is read twice or lost. Returns this slot's piece as ``(old slot, from, to)``
    position ranges."""
    quota_old = total // handover["slots"]
    rests = [max(quota_old - k, 0) for k in handover["consumed"]]
    quota = sum(rests) // num_slots
    plan, lo, hi, offset = [], slot * quota, (slot + 1) * quota, 0
    for old, (k, rest) in enumerate(zip(handover["consumed"], rests)):
        a, b = max(lo, offset), min(hi, offset + rest)
        if a < b:
            plan.append((old, k + a - offset, k + b - offset))
        offset += rest
    return plan


def iterate_slot(spec: StreamSpec, slot: int, num_slots: int) -> Iterator[dict]:
    """The samples of one slot (endless in training, one pass in evaluation): its fields as
    tensors, ``__key__`` and the ints named by ``POSITIONS``. In the epoch of ``spec.handover``
    the slot reads its piece of what the stopped layout left (``handover_plan``), each sample
    with the augmentation its old slot would have drawn."""
    shards = spec.manifest.shards(spec.split)
    total = sum(s.samples for s in shards)
    if spec.train and total < num_slots:
        raise ValueError(f"split {spec.split!r} has {total} samples, fewer than the {num_slots} "
                         f"reading slots (ranks x workers); use fewer workers")
    decode = sample_decoder(spec)
    stats = SlotStats(budget=spec.max_bad_samples)
    epoch, skip = spec.start.get(slot, (0, 0))
    while True:
        if spec.train and spec.handover and epoch == spec.handover["epoch"]:
            pieces = [(old, a, b, spec.handover["slots"]) for old, a, b in
                      handover_plan(spec.handover, total, slot, num_slots)]
        else:
            pieces = [(slot, 0, None, num_slots)]
        index = -1
        for source, a, b, slots in pieces:
            for position, raw in enumerate(slot_raws(spec, shards, source, slots, epoch, stats)):
                if position < a:
                    continue  # another slot's, or read before the handover
                if b is not None and position >= b:
                    break
                index += 1
                if index < skip:
                    continue  # consumed before the resume: read again, never decoded
                try:  # evaluation draws nothing
                    sample = decode(raw, sample_rng(spec.seed, source, epoch, position) if spec.train else None)
                    sample["__key__"] = sanitize_key(raw["__key__"])
                except (DecodeError, ValueError, OSError) as exc:
                    stats.record(f"{raw['__url__']}#{raw['__key__']}", str(exc))
                    continue
                sample.update(zip(POSITIONS, (slot, epoch, index, stats.bad)))
                yield sample
        if not spec.train:
            return
        epoch, skip = epoch + 1, 0


def batches(samples: Iterator[dict], size: int) -> Iterator[dict]:
    """Consecutive ``samples`` in batches of ``size`` (the last may be smaller), collated by
    ``default_collate``, as a ``DataLoader(batch_size=size)`` over the samples would make them."""
    samples = iter(samples)
    while batch := list(itertools.islice(samples, size)):
        try:
            collated = default_collate(batch)
        except RuntimeError as exc:  # torch.stack: "stack expects each tensor to be equal size"
            shapes = sorted({tuple(s[k].shape) for s in batch for k in s if torch.is_tensor(s[k])})
            raise ValueError(f"samples {[s['__key__'] for s in batch]} differ in size ({shapes}); crop them "
                             f"to one size (data.crop_size) to batch them") from exc
        yield collated


class ShardStream(torch.utils.data.IterableDataset):
    """A stream over one split of a manifest; see the module docstring.

    Use it under ``torch.utils.data.DataLoader`` with the same ``num_workers`` it was built with
    (every rank must use the same): ``DataLoader(stream, batch_size=None, num_workers=W)`` when the
    stream batches (``batch_size``), or ``DataLoader(stream, batch_size=B, num_workers=W)`` over
    single samples; both give the same batches. ``len()`` is what this rank yields per epoch:
    positions, or with ``batch_size`` batches (rounded up per slot).
    """

    def __init__(self, spec: StreamSpec, num_workers: int = 0):
        super().__init__()
        self.spec = spec
        self.num_workers = num_workers

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
        slot = self.spec.rank * workers + (info.id if info is not None else 0)
        samples = iterate_slot(self.spec, slot, self.spec.world_size * workers)
        return batches(samples, self.spec.batch_size) if self.spec.batch_size else samples


def make_stream(url: str, split: str, *, train: bool, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, seed: int = 0, augment: Augment | None = None,
                fields: tuple[str, ...] | None = None, shuffle_buffer: int = 256,
                shuffle_buffer_mb: float = 256.0, max_bad_samples: int = 100, storage_options: dict | None = None,
                start: dict[int, tuple[int, int]] | None = None, batch_size: int | None = None,
                handover: dict | None = None) -> ShardStream:
    """A ``ShardStream`` over ``split`` of the manifest at ``url`` (its JSON or directory, or a
    shard pattern such as ``s3://b/x-{000..099}.tar``, read as the split ``split``).

    Samples are ``{field: tensor, "__key__": str, "__slot__": int, ...}``: images uint8
    ``[3, H, W]``, maps ``[H, W]``, class ids int64 ``[]`` (``transforms.field_dtypes``). With ``batch_size`` the stream
    yields ``default_collate`` batches of that many consecutive samples of one slot (``[N, ...]``
    tensors, the ints as int64 ``[N]``, keys a list); convert them on the device with
    ``pipeline.data.device``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if shuffle_buffer < 1 or not shuffle_buffer_mb > 0:
        raise ValueError(f"the shuffle buffer needs at least 1 sample and more than 0 MB, got "
                         f"shuffle_buffer={shuffle_buffer}, shuffle_buffer_mb={shuffle_buffer_mb}")
    manifest = load_manifest(url, storage_options, split=split)
    manifest.split(split)  # a clear error for an unknown split, before any worker starts
    for name in fields or ():
        if name not in manifest.fields:
            raise ValueError(f"field {name!r} is not in {manifest.url}; it has {', '.join(manifest.fields)}")
    spec = StreamSpec(manifest=manifest, split=split, train=train, rank=rank, world_size=world_size,
                      seed=seed, augment=augment or Augment(), fields=fields, shuffle_buffer=shuffle_buffer,
                      shuffle_buffer_mb=shuffle_buffer_mb, max_bad_samples=max_bad_samples,
                      storage_options=storage_options, start=dict(start or {}), batch_size=batch_size,
                      handover=handover)
    return ShardStream(spec, num_workers=num_workers)
