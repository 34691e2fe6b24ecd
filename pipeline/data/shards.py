"""The shard writer: a dataset source becomes WebDataset tar shards plus ``manifest.json``.

Deterministic (same input, options and seed give byte-identical shards, whatever the number of
workers), resumable (a shard is complete when its journal entry names its checksum) and atomic
(the manifest is removed before any shard changes and written only after all are complete).

Parallel parts (``--part I/N`` on N machines, then ``--finalize N``): shard boundaries depend on
every earlier sample (skips, byte caps), so parts cannot cut shards themselves. Each part encodes
and validates a contiguous range of the planned order into a staged file under ``_parts/``; the
finalize step feeds the staged samples, in order, to the same shard writer, so the shards are
byte-identical to a single-process write. The expensive work (read, decode, validate, resize)
is parallel; the finalize step only copies bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import logging
import multiprocessing as mp
import os
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .. import __version__, io
from .manifest import FORMAT, MANIFEST_NAME, VERSION
from .sources.base import Item, Problem, Source, SourceInfo, encode_png
from .transforms import CLASS_KIND, MAP_KINDS, DecodeError, decode_class, decode_field, map_array

log = logging.getLogger(__name__)
JOURNAL_DIR = "_journal"
PARTS_DIR = "_parts"  # staged samples of `--part I/N`, removed once the manifest is written


class ShardWriteError(Exception):
    """The output cannot be written, or ``--strict`` found a problem."""


@dataclass(frozen=True)
class WriteOptions:
    samples_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30
    resize: tuple[int, int] | None = None  # (W, H)
    workers: int = 1
    seed: int = 0
    shuffle: bool = True
    strict: bool = False
    jpeg_quality: int = 95


@dataclass
class Encoded:
    """One validated sample ready for the tar: encoded fields and its statistics."""

    key: str
    fields: dict[str, bytes]
    size: tuple[int, int]
    hist: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return sum(len(v) for v in self.fields.values())

    @property
    def tar_bytes(self) -> int:
        """Bytes the sample takes in a tar: a 512-byte header per member, data padded to 512."""
        return sum(512 + -(-len(v) // 512) * 512 for v in self.fields.values())


def tar_file_size(member_bytes: int) -> int:
    """Size of a tar holding members of ``member_bytes``: end marker, then whole 10 KiB records."""
    return -(-(member_bytes + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


# ---------------------------------------------------------------- one sample: read, check, encode

def _reencode(img: Image.Image, ext: str, kind: str, quality: int) -> bytes:
    if kind in MAP_KINDS or ext == "png":
        arr = map_array(img) if kind in MAP_KINDS else np.asarray(img)
        return encode_png(arr)
    buf = _io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def encode_item(source: Source, split: str, item: Item, opts: WriteOptions) -> Encoded | Problem:
    """Read one sample, decode every field, validate it, optionally resize; never raises for
    bad data, it returns the ``Problem`` instead."""
    info = source.info
    try:
        raw = source.read(item)
    except (OSError, ValueError, DecodeError) as exc:
        return Problem(split, item.key, "undecodable", item.where(), f"cannot read: {exc}")
    decoded: dict[str, tuple[str, Image.Image]] = {}
    hist = None
    for name, data in raw.items():
        stem, ext = name.split(".", 1)
        path = item.paths.get(stem, item.where())
        try:
            if info.kind_of(stem) == CLASS_KIND:  # one id for the sample: counted, passed through
                value = decode_class(data, None)
                if info.num_classes is None or value >= info.num_classes:
                    return Problem(split, item.key, "label_out_of_range", path,
                                   f"class id {value} outside 0..{(info.num_classes or 0) - 1}")
                hist = np.bincount([value], minlength=info.num_classes)
                continue
            decoded[stem] = (ext, decode_field(info.kind_of(stem), data))
        except DecodeError as exc:
            return Problem(split, item.key, "undecodable", path, f"{stem}: {exc}")
    sizes = {stem: img.size for stem, (_, img) in decoded.items()}
    if len(set(sizes.values())) > 1:
        where = item.paths.get(list(sizes)[-1], item.where())
        detail = ", ".join(f"{s} {w}x{h}" for s, (w, h) in sizes.items())
        return Problem(split, item.key, "size_mismatch", where, f"fields differ in size: {detail}")
    fields = {}
    for stem, (ext, img) in decoded.items():
        kind = info.kind_of(stem)
        resized = opts.resize is not None and img.size != tuple(opts.resize)
        if resized:
            resample = Image.Resampling.NEAREST if kind in MAP_KINDS else Image.Resampling.BICUBIC
            img = img.resize(tuple(opts.resize), resample)
        if kind == "label" and info.num_classes is not None:
            ids = map_array(img).ravel()
            top = int(ids.max(initial=0))
            if top >= info.num_classes:
                bad = np.unique(ids[ids >= info.num_classes])[:8].tolist()
                return Problem(split, item.key, "label_out_of_range", item.paths.get(stem, item.where()),
                               f"label ids {bad} outside 0..{info.num_classes - 1}")
            hist = np.bincount(ids, minlength=info.num_classes)
        data = _reencode(img, ext, kind, opts.jpeg_quality) if resized else raw[f"{stem}.{ext}"]
        fields[f"{stem}.{ext}"] = data
    fields.update((name, data) for name, data in raw.items() if info.kind_of(name.split(".", 1)[0]) == CLASS_KIND)
    size = next(iter(decoded.values()))[1].size if opts.resize is None else tuple(opts.resize)
    return Encoded(item.key, fields, size, hist)


_WORKER_STATE: tuple | None = None


def _init_worker(source: Source, split: str, opts: WriteOptions) -> None:
    global _WORKER_STATE
    _WORKER_STATE = (source, split, opts)


def _encode_in_worker(item: Item) -> Encoded | Problem:
    source, split, opts = _WORKER_STATE
    return encode_item(source, split, item, opts)


def _encoded_stream(source: Source, split: str, items: list[Item], opts: WriteOptions) -> Iterator:
    """Encoded samples in item order, from a process pool when ``workers > 1``."""
    if opts.workers <= 1 or len(items) < 2:
        for item in items:
            yield encode_item(source, split, item, opts)
        return
    # spawn, not fork: an s3fs output keeps an event-loop thread that must not be forked.
    ctx = mp.get_context("spawn")
    with ctx.Pool(opts.workers, initializer=_init_worker, initargs=(source, split, opts)) as pool:
        yield from pool.imap(_encode_in_worker, items, chunksize=4)


# ---------------------------------------------------------------- a split: plan, resume, write

def plan_order(items: list[Item], opts: WriteOptions) -> list[Item]:
    """Items sorted by key, then (by default) shuffled with the seed, so shards mix the dataset."""
    keys = [it.key for it in items]
    dupes = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) != len(keys) else []
    if dupes:
        raise ShardWriteError(f"duplicate sample keys: {dupes[:5]}")
    ordered = sorted(items, key=lambda it: it.key)
    if opts.shuffle:
        perm = np.random.default_rng([opts.seed, 0x5EED]).permutation(len(ordered))
        ordered = [ordered[i] for i in perm]
    return ordered


def _plan_hash(split: str, items: list[Item], info: SourceInfo, opts: WriteOptions) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([split, info.name, asdict(opts) | {"workers": 0}], sort_keys=True).encode())
    for it in items:
        h.update(it.key.encode() + b"\0")
    return h.hexdigest()


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class _SplitWriter:
    """Accumulates encoded samples into tar shards and commits each with a journal entry."""

    def __init__(self, out: str, split: str, plan_hash: str, opts: WriteOptions, storage_options):
        self.out, self.split, self.plan_hash, self.opts = out, split, plan_hash, opts
        self.so = storage_options
        self.entries: list[dict] = []
        self._tmpdir = tempfile.TemporaryDirectory(prefix="gan-shard-")
        self._tar = None

    def resume(self, verify) -> int:
        """Load committed journal entries in order; returns the item index to continue from."""
        start = 0
        for index in range(1 << 30):
            url = io.join(self.out, JOURNAL_DIR, shard_name(self.split, index) + ".json")
            if not io.exists(url, self.so):
                break
            entry = io.read_json(url, self.so)
            shard_url = io.join(self.out, entry["name"])
            if entry.get("plan") != self.plan_hash or entry["start"] != start:
                break
            if not io.exists(shard_url, self.so) or verify(shard_url) != (entry["sha256"], entry["bytes"]):
                log.warning("shard %s does not match its journal; rewriting from there", shard_url)
                break
            self.entries.append(entry)
            start = entry["end"]
        return start

    def _open(self, start: int) -> None:
        import webdataset as wds

        self._path = Path(self._tmpdir.name) / shard_name(self.split, len(self.entries))
        self._file = open(self._path, "wb")
        # Fixed owner and mtime: the tar bytes depend on the samples only.
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0, user="gan", group="gan")
        self._start, self._count, self._bytes = start, 0, 0
        self._skipped: list[dict] = []
        self._sizes: list[tuple[int, int]] = []
        self._hist = None
        self._fields: set[str] = set()

    def add(self, sample: Encoded | Problem, index: int) -> None:
        if self._tar is None:
            self._open(index)
        elif isinstance(sample, Encoded) and self._count and (
                self._count >= self.opts.samples_per_shard
                or tar_file_size(self._bytes + sample.tar_bytes) > self.opts.max_shard_bytes):
            self.commit(index)
            self._open(index)
        if isinstance(sample, Problem):
            self._skipped.append(sample.to_json())
            return
        self._tar.write({"__key__": sample.key, **sample.fields})
        self._count += 1
        self._fields.update(sample.fields)
        self._bytes += sample.tar_bytes
        self._sizes.append(sample.size)
        if sample.hist is not None:
            self._hist = sample.hist if self._hist is None else self._hist + sample.hist

    def commit(self, end: int) -> None:
        """Close the current tar, upload it atomically, then journal it (the commit point)."""
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        from .shard_reader import sample_offsets  # webdataset imports torch: not in encoding workers

        with open(self._path, "rb") as f:
            sha, nbytes = io.sha256_stream(f)
            f.seek(0)
            offsets = sample_offsets(f) if self._count else []  # where each sample starts, for readers
        name = self._path.name
        if len(offsets) != self._count:  # keys that webdataset's reader would group otherwise
            raise ShardWriteError(f"{name}: {self._count} samples written, {len(offsets)} by webdataset's key rule")
        if self._count:
            io.atomic_upload(self._path, io.join(self.out, name), self.so)
        self._path.unlink()
        sizes = np.array(self._sizes, dtype=np.int64).reshape(-1, 2)
        entry = {"name": name, "plan": self.plan_hash, "start": self._start, "end": end,
                 "samples": self._count, "bytes": nbytes if self._count else 0, "sha256": sha, "offsets": offsets,
                 "skipped": self._skipped, "fields": sorted(self._fields), "sizes": sizes.tolist(),
                 "hist": None if self._hist is None else self._hist.tolist()}
        io.atomic_write_json(io.join(self.out, JOURNAL_DIR, name + ".json"), entry, self.so)
        self.entries.append(entry)
        self._tar = None

    def close(self) -> None:
        self._tmpdir.cleanup()


def write_split(source: Source, split: str, out: str, opts: WriteOptions,
                storage_options: dict | None = None, progress: bool = True, parts: int | None = None) -> dict:
    """Write one split's shards (resuming where a previous run stopped); returns its manifest entry.
    With ``parts``, the samples come from the ``parts`` staged parts instead of being encoded here."""
    from tqdm import tqdm

    items, problems = source.list_items(split)
    items = plan_order(items, opts)
    plan = _plan_hash(split, items, source.info, opts)
    writer = _SplitWriter(out, split, plan, opts, storage_options)
    try:
        start = writer.resume(lambda url: io.sha256_url(url, storage_options))
        if start:
            log.info("%s: %d shards already complete, resuming at sample %d", split, len(writer.entries), start)
        bar = tqdm(total=len(items), initial=start, desc=f"shard {split}", unit="img",
                   disable=not progress, mininterval=1.0)
        samples = _staged_stream(out, split, plan, len(items), parts, start, storage_options) if parts \
            else _encoded_stream(source, split, items[start:], opts)
        for i, sample in enumerate(samples, start):
            if isinstance(sample, Problem):
                log.warning("skipped %s", sample.line())
                if opts.strict:
                    raise ShardWriteError(f"--strict: {sample.line()}")
            writer.add(sample, i)
            bar.update(1)
        writer.commit(len(items))
        bar.close()
    finally:
        writer.close()
    for p in problems:
        log.warning("skipped %s", p.line())
    if problems and opts.strict:
        raise ShardWriteError(f"--strict: {problems[0].line()} (+{len(problems) - 1} more)")
    return _split_entry(writer.entries, problems)


# ---------------------------------------------------------------- parallel parts: stage, then finalize

def part_range(n_items: int, part: int, parts: int) -> tuple[int, int]:
    """Part ``part`` of ``parts``: a contiguous ``[start, end)`` range of the planned item order."""
    return n_items * part // parts, n_items * (part + 1) // parts


def _part_url(out: str, split: str, part: int, parts: int) -> str:
    return io.join(out, PARTS_DIR, f"{split}-part-{part:04d}-of-{parts:04d}")


def write_part(source: Source, split: str, out: str, opts: WriteOptions, part: int, parts: int,
               storage_options: dict | None = None) -> dict:
    """Encode and validate part ``part`` of ``parts`` of a split into ``_parts/``: the samples'
    field bytes back to back (``.bin``) and an index (``.json``, written last: the commit point)
    holding per item its key, field sizes, SHA-256, image size and class histogram, or its problem.
    A part already staged for the same plan is kept. Returns the index."""
    so = storage_options
    items, _ = source.list_items(split)
    items = plan_order(items, opts)
    plan = _plan_hash(split, items, source.info, opts)
    start, end = part_range(len(items), part, parts)
    base = _part_url(out, split, part, parts)
    if io.exists(base + ".json", so):
        index = io.read_json(base + ".json", so)
        if index.get("plan") == plan and (index["start"], index["end"]) == (start, end) and \
                io.exists(base + ".bin", so) and io.sha256_url(base + ".bin", so) == (index["sha256"], index["bytes"]):
            log.info("%s: part %d/%d already staged", split, part, parts)
            return index
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gan-shard-part-") as tmp:
        path = Path(tmp) / "part.bin"
        with open(path, "wb") as f:
            for sample in _encoded_stream(source, split, items[start:end], opts):
                if isinstance(sample, Problem):
                    log.warning("skipped %s", sample.line())
                    if opts.strict:
                        raise ShardWriteError(f"--strict: {sample.line()}")
                    records.append({"problem": sample.to_json()})
                    continue
                h = hashlib.sha256()
                for data in sample.fields.values():
                    f.write(data)
                    h.update(data)
                records.append({"key": sample.key, "fields": [[n, len(d)] for n, d in sample.fields.items()],
                                "sha256": h.hexdigest(), "size": list(sample.size),
                                "hist": None if sample.hist is None else sample.hist.tolist()})
        with open(path, "rb") as f:
            sha, nbytes = io.sha256_stream(f)
        io.atomic_upload(path, base + ".bin", so)
    index = {"plan": plan, "split": split, "part": part, "parts": parts, "start": start, "end": end,
             "sha256": sha, "bytes": nbytes, "items": records}
    io.atomic_write_json(base + ".json", index, so)
    return index


def _staged_stream(out: str, split: str, plan: str, n_items: int, parts: int, start: int,
                   storage_options: dict | None) -> Iterator[Encoded | Problem]:
    """The staged samples from item ``start`` on, in plan order, each checked against its SHA-256
    before it can reach a shard."""
    so = storage_options
    for part in range(parts):
        first, end = part_range(n_items, part, parts)
        if end <= start or first == end:
            continue
        base = _part_url(out, split, part, parts)
        if not io.exists(base + ".json", so):
            raise ShardWriteError(f"{split}: part {part}/{parts} is not staged in {out} "
                                  f"(run write with --part {part}/{parts} first)")
        index = io.read_json(base + ".json", so)
        if index.get("plan") != plan or (index["start"], index["end"]) != (first, end):
            raise ShardWriteError(f"{split}: staged part {part}/{parts} was written for other input or options; "
                                  f"run write with --part {part}/{parts} again")
        with io.open_url(base + ".bin", "rb", so) as f:
            for i, rec in enumerate(index["items"], first):
                if "problem" in rec:
                    if i >= start:
                        yield Problem(**rec["problem"])
                    continue
                fields = {name: f.read(n) for name, n in rec["fields"]}
                if i < start:
                    continue
                h = hashlib.sha256()
                for data in fields.values():
                    h.update(data)
                if h.hexdigest() != rec["sha256"]:
                    raise ShardWriteError(f"{split}: staged sample {rec['key']} in {base}.bin is damaged; "
                                          f"run write with --part {part}/{parts} again")
                hist = None if rec["hist"] is None else np.array(rec["hist"], dtype=np.int64)
                yield Encoded(rec["key"], fields, tuple(rec["size"]), hist)


def remove_parts(out: str, splits: list[str], parts: int, storage_options: dict | None = None) -> None:
    for split in splits:
        for part in range(parts):
            for ext in (".json", ".bin"):
                io.remove(_part_url(out, split, part, parts) + ext, storage_options)
    if io.is_local(out):  # object stores have no directories to leave behind
        with contextlib.suppress(OSError):  # not empty: other files are none of ours to remove
            os.rmdir(io.fs_for(io.join(out, PARTS_DIR))[1])


def _split_entry(entries: list[dict], problems: list[Problem]) -> dict:
    shards = [{k: e[k] for k in ("name", "samples", "bytes", "sha256", "offsets") if k in e} for e in entries
              if e["samples"]]
    skipped = [p.to_json() for p in problems] + [s for e in entries for s in e["skipped"]]
    sizes = np.array([s for e in entries for s in e["sizes"]], dtype=np.int64).reshape(-1, 2)
    hists = [np.array(e["hist"]) for e in entries if e["hist"] is not None]
    kinds: dict[str, int] = {}
    for s in skipped:
        kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
    entry = {
        "samples": sum(s["samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        "skipped_count": len(skipped),
        "skipped_by_kind": kinds,
        "skipped": skipped,
        "image_size": size_stats(sizes),
        "_fields": sorted({f for e in entries for f in e.get("fields", [])}),
    }
    if hists:
        entry["class_histogram"] = np.sum(hists, axis=0).astype(int).tolist()
    return entry


def size_stats(sizes: np.ndarray) -> dict:
    if not len(sizes):
        return {}
    uniq, counts = np.unique(sizes, axis=0, return_counts=True)
    top = sorted(zip(counts.tolist(), uniq.tolist()), reverse=True)[:5]
    return {
        "width": {"min": int(sizes[:, 0].min()), "max": int(sizes[:, 0].max()),
                  "mean": round(float(sizes[:, 0].mean()), 2)},
        "height": {"min": int(sizes[:, 1].min()), "max": int(sizes[:, 1].max()),
                   "mean": round(float(sizes[:, 1].mean()), 2)},
        "most_common": [{"width": wh[0], "height": wh[1], "count": c} for c, wh in top],
    }


# ---------------------------------------------------------------- a dataset: all splits + manifest

def check_writable(out: str, storage_options: dict | None = None) -> None:
    """Fail early, in one line, when ``out`` cannot take files."""
    probe = io.join(out, f".write-probe-{os.getpid()}")
    try:
        io.makedirs(out, storage_options)
        io.atomic_write_bytes(probe, b"", storage_options)
        io.remove(probe, storage_options)
    except io.storage_errors() as exc:  # also an unreachable endpoint, which is not an OSError
        raise ShardWriteError(f"cannot write to {out}: {getattr(exc, 'strerror', None) or exc}") from exc


def write_dataset(source: Source, out: str, splits: list[str], opts: WriteOptions, *,
                  dataset: str | None = None, command: str = "", storage_options: dict | None = None,
                  extra: dict | None = None, progress: bool = True, parts: int | None = None) -> dict:
    """Write every split and then the manifest; returns the manifest. With ``parts``, the samples
    are the ones ``write_part`` staged for each of the ``parts`` parts (removed at the end)."""
    check_writable(out, storage_options)
    # Invalidate a previous manifest before any shard it names can change.
    io.remove(io.join(out, MANIFEST_NAME), storage_options)
    info = source.info
    split_entries = {s: write_split(source, s, out, opts, storage_options, progress, parts) for s in splits}
    seen = {name for e in split_entries.values() for name in e.pop("_fields")}
    fields = {spec.name: {"kind": spec.kind, "required": spec.required,
                          "exts": sorted(n.split(".", 1)[1] for n in seen if n.split(".", 1)[0] == spec.name)}
              for spec in info.fields}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dataset": dataset or info.name,
        "source": info.name,
        "task": info.task,
        "fields": fields,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names) if info.class_names else None,
        "palette": [list(c) for c in info.palette] if info.palette else None,
        "splits": split_entries,
        "totals": {
            "samples": sum(e["samples"] for e in split_entries.values()),
            "bytes": sum(e["bytes"] for e in split_entries.values()),
            "shards": sum(len(e["shards"]) for e in split_entries.values()),
            "skipped": sum(e["skipped_count"] for e in split_entries.values()),
        },
        "options": {**asdict(opts), **(extra or {})},
        "tool": {"name": "gan-pipeline", "version": __version__},
        "command": command,
    }
    manifest["options"].pop("workers", None)
    io.atomic_write_json(io.join(out, MANIFEST_NAME), manifest, storage_options)
    if parts:
        remove_parts(out, splits, parts, storage_options)
    return manifest
