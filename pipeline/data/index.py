"""Manifests for WebDataset shards made elsewhere (img2dataset, tarp, ``webdataset.ShardWriter``):
``gan-shard index`` counts their samples, finds their fields, hashes them and records per-sample
byte offsets and image-size statistics, without rewriting a byte of them."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io as _io
import logging
import os
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
from PIL import Image
from webdataset.shardlists import expand_urls

from .. import __version__, io
from .manifest import FORMAT, VERSION, ManifestError
from .shard_reader import GZIP_MAGIC, CompressedShardError, tar_members
from .shards import size_stats
from .sources.base import FIELD_KINDS

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm")
KIND_OF_STEM = {"image": "image", "input": "image", "label": "label", "instance": "instance", "class": "class"}


class HashingReader:
    """A read-only file wrapper that hashes every byte it hands out."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        self.n += len(data)
        return data

    def drain(self) -> tuple[str, int]:
        """Read the rest; the SHA-256 and size of everything read."""
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest(), self.n


def expand(pattern: str) -> list[str]:
    """Shard URLs of a pattern, as webdataset expands them (braces; ``::`` between patterns);
    local paths made absolute, so that a manifest anywhere finds them."""
    urls = expand_urls(str(pattern))
    return [u if "://" in u else os.path.abspath(u) for u in urls]


def detect_fields(suffixes: set[str]) -> dict[str, dict]:
    """Fields from the member suffixes of a sample: ``image.png``, ``label.png``, ... (our own
    layout: the stem names the field) or one plain image extension (``jpg``: the image)."""
    fields: dict[str, dict] = {}
    for suffix in sorted(suffixes):
        stem, _, ext = suffix.rpartition(".")
        name = stem if stem in KIND_OF_STEM else "image" if not stem else None
        if name and (ext in IMAGE_EXTS if name != "class" else ext == "cls"):
            fields.setdefault(name, {"kind": KIND_OF_STEM[name], "members": []})["members"].append(suffix)
    if not any(spec["kind"] == "image" for spec in fields.values()):
        raise ManifestError(f"no image member among {sorted(suffixes)}; name the fields with "
                            f"--field NAME=KIND:SUFFIX (e.g. --field image=image:jpg)")
    return fields


@contextlib.contextmanager
def open_plain_tar(url: str, storage_options: dict | None) -> Iterator[BinaryIO]:
    """``url`` opened for reading; a compressed, unreadable or missing shard is a one-line
    ``ManifestError`` naming it."""
    try:
        with io.open_url(url, "rb", storage_options) as f:
            if f.read(2) == GZIP_MAGIC:
                raise CompressedShardError(f"{url} is compressed: store shards as plain .tar (images are "
                                           f"compressed already), so that a reader can enter one at a sample")
            f.seek(0)
            yield f
    except (tarfile.TarError, *io.storage_errors()) as exc:
        raise ManifestError(f"cannot index {url}: {exc}") from exc


def scan_shard(url: str, size_members: tuple[str, ...], full: bool, storage_options: dict | None) -> dict:
    """One shard: samples, bytes, SHA-256 (``full``; else ""), per-sample offsets, the sets of
    member suffixes met (``layouts``) and the image size of each sample (``full``)."""
    with open_plain_tar(url, storage_options) as raw:
        f = HashingReader(raw) if full else raw
        offsets, sizes, layouts, last, members = [], [], collections.Counter(), None, set()
        for tar, info, key, suffix in tar_members(f, stream=full):
            if key != last:
                if last is not None:
                    layouts[frozenset(members)] += 1
                offsets.append(info.offset)
                last, members = key, set()
            members.add(suffix)
            if full and suffix in size_members and len(sizes) < len(offsets):
                try:  # the header is enough; an undecodable image is for `verify` to report
                    sizes.append(Image.open(_io.BytesIO(tar.extractfile(info).read())).size)
                except OSError:
                    pass
        if last is not None:
            layouts[frozenset(members)] += 1
        sha, nbytes = f.drain() if full else ("", raw.seek(0, 2))
    return {"url": url, "samples": len(offsets), "bytes": nbytes, "sha256": sha, "offsets": offsets,
            "layouts": layouts, "sizes": sizes}


def parse_field(text: str) -> tuple[str, dict]:
    """``NAME=KIND:SUFFIX[,SUFFIX...]`` (``label=label:seg.png``) -> ``(name, spec)``."""
    name, _, rest = text.partition("=")
    kind, _, suffixes = rest.partition(":")
    if not name or kind not in FIELD_KINDS or not suffixes:
        raise ManifestError(f"expected --field NAME=KIND:SUFFIX[,SUFFIX] with KIND one of {', '.join(FIELD_KINDS)} "
                            f"(e.g. label=label:seg.png), got {text!r}")
    return name, {"kind": kind, "members": [s.strip().lower() for s in suffixes.split(",")]}


def index_shards(patterns: dict[str, str], storage_options: dict | None = None, *, full: bool = True,
                 offsets: bool = True, fields: dict[str, dict] | None = None, num_classes: int | None = None,
                 dataset: str | None = None, command: str = "") -> dict:
    """A manifest (as a dict) for the shards of ``patterns`` (split -> pattern), read in place.
    ``full`` reads every byte (SHA-256, image sizes); otherwise only tar headers are read, which is
    what a shard pattern given in place of a manifest gets (``manifest.load_manifest``)."""
    urls = {split: expand(pattern) for split, pattern in patterns.items()}
    first = next(u for split_urls in urls.values() for u in split_urls)
    if fields is None:
        with open_plain_tar(first, storage_options) as f:
            fields = detect_fields({suffix for _, _, key, suffix in _first_sample(f)})
    fields = {name: {**spec, "required": True, "exts": sorted({m.rsplit(".", 1)[-1] for m in spec["members"]})}
              for name, spec in fields.items()}
    task = ("label2image" if "label" in fields else "paired" if "input" in fields
            else "class2image" if "class" in fields else "unconditional")
    if any(spec["kind"] in ("label", "class") for spec in fields.values()) and not num_classes:
        raise ManifestError(f"{' '.join(patterns.values())} holds label maps or class ids: their number of classes is "
                            f"needed (gan-shard index ... --num-classes N)")
    image = next(spec["members"] for spec in fields.values() if spec["kind"] == "image")
    splits = {split: _split_entry([scan_shard(u, tuple(image), full, storage_options) for u in split_urls],
                                  fields, offsets) for split, split_urls in urls.items()}
    return {
        "format": FORMAT, "version": VERSION,
        "dataset": dataset or os.path.basename(first).split(".")[0].rstrip("0123456789-_") or "shards",
        "source": "webdataset", "task": task, "fields": fields, "num_classes": num_classes, "class_names": None,
        "splits": splits,
        "totals": {"samples": sum(s["samples"] for s in splits.values()),
                   "bytes": sum(s["bytes"] for s in splits.values()),
                   "shards": sum(len(s["shards"]) for s in splits.values()), "skipped": 0},
        "options": {"indexed": patterns, "offsets": offsets, "full": full},
        "tool": {"name": "gan-pipeline", "version": __version__}, "command": command,
    }


def _first_sample(f: BinaryIO):
    """The members of the first sample of a tar (headers only)."""
    members = tar_members(f)
    head = next(members, None)
    if head is None:
        raise ManifestError("the first shard holds no samples")
    yield head
    for member in members:
        if member[2] != head[2]:
            return
        yield member


def _split_entry(scans: list[dict], fields: dict[str, dict], offsets: bool) -> dict:
    lacking = collections.Counter()
    for scan in scans:
        for layout, count in scan["layouts"].items():
            for name, spec in fields.items():
                if layout.isdisjoint(spec["members"]):
                    lacking[name] += count
    for name, count in lacking.items():
        log.warning("%d samples lack field %r (members %s): the loader will skip them as bad samples",
                    count, name, ", ".join(fields[name]["members"]))
    sizes = np.array([s for scan in scans for s in scan["sizes"]], dtype=np.int64).reshape(-1, 2)
    keep = ("url", "samples", "bytes", "sha256", "offsets") if offsets else ("url", "samples", "bytes", "sha256")
    return {"samples": sum(s["samples"] for s in scans), "bytes": sum(s["bytes"] for s in scans),
            "shards": [{"name": s["url"].rsplit("/", 1)[-1], **{k: s[k] for k in keep}} for s in scans],
            "skipped_count": 0, "skipped_by_kind": {}, "skipped": [], "lacking": dict(lacking),
            "image_size": size_stats(sizes)}
