"""The shard manifest: the contract between the sharding CLI and every reader of shards.

``manifest.json`` is written last; a manifest never names a shard that is not complete. Shards
are named relative to the manifest's own URL, or by a URL of their own (``gan-shard index`` of
shards made elsewhere). A shard pattern (``s3://b/x-{000..099}.tar``) in place of a manifest is
indexed in memory (``index.index_shards``) as one split.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import io

MANIFEST_NAME = "manifest.json"
FORMAT = "gan-pipeline-shards"
VERSION = 1


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or not of this format."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    url: str
    samples: int
    bytes: int
    sha256: str
    offsets: tuple[int, ...] | None = None  # per sample, the byte offset of its first tar header


def manifest_url(url: str) -> str:
    """Accept either the manifest's URL or the directory that holds it."""
    url = str(url)
    return url if url.endswith(".json") else io.join(url, MANIFEST_NAME)


def base_url(url: str) -> str:
    """The directory of a manifest URL."""
    return manifest_url(url).rsplit("/", 1)[0] if "/" in manifest_url(url) else "."


@dataclass(frozen=True)
class Manifest:
    url: str
    data: dict[str, Any]

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    @property
    def task(self) -> str:
        return self.data["task"]

    @property
    def fields(self) -> dict[str, dict]:
        """Field stem -> ``{"kind": ..., "exts": [...]}``."""
        return self.data["fields"]

    @property
    def num_classes(self) -> int | None:
        return self.data.get("num_classes")

    @property
    def palette(self) -> np.ndarray | None:
        """``[num_classes, 3]`` uint8: the dataset's own colour of each class id, when its source
        has them (Cityscapes, ADE20K)."""
        colours = self.data.get("palette")
        return np.asarray(colours, dtype=np.uint8).reshape(-1, 3) if colours else None

    def members(self, field: str) -> tuple[str, ...]:
        """The member suffixes that may hold ``field`` in a sample, in order of preference
        (``image.png``; ``jpg`` for shards made elsewhere)."""
        spec = self.fields[field]
        return tuple(spec.get("members") or (f"{field}.{ext}" for ext in spec.get("exts", ())))

    def split(self, name: str) -> dict[str, Any]:
        if name not in self.data["splits"]:
            raise ManifestError(f"split {name!r} is not in {self.url}; it has: {', '.join(self.splits)} "
                                f"(choose with data.split / data.val_split, e.g. data.val_split={self.splits[0]})")
        return self.data["splits"][name]

    def shards(self, split: str) -> list[ShardInfo]:
        base = base_url(self.url)
        return [ShardInfo(name=s["name"], url=s.get("url") or io.join(base, s["name"]), samples=int(s["samples"]),
                          bytes=int(s["bytes"]), sha256=s["sha256"],
                          offsets=tuple(s["offsets"]) if s.get("offsets") else None)
                for s in self.split(split)["shards"]]

    def num_samples(self, split: str) -> int:
        return int(self.split(split)["samples"])


def is_shard_pattern(url: str) -> bool:
    """A brace pattern or a single tar, not a manifest or its directory."""
    return "{" in str(url) or str(url).endswith(".tar")


def _missing_manifest(url: str, murl: str, storage_options: dict | None) -> str:
    """Why there is no manifest at ``url``, and what to run: a folder of images is data to shard."""
    from .sources.base import IMAGE_SUFFIXES

    try:
        names = io.list_files_fresh(url, storage_options)
    except (FileNotFoundError, NotADirectoryError, *io.storage_errors()):
        names = []
    if any(n.lower().endswith(IMAGE_SUFFIXES) for n in names):
        return (f"data.url={url} holds images, not shards: shard them first, e.g. `gan-shard write folder "
                f"--root {url} --out shards/mydata`, then train with data.url=shards/mydata")
    return (f"no shard manifest at {murl}: write shards there with `gan-shard write SOURCE --root DATA --out {url}` "
            "(`gan-shard write --help` lists the sources), or point data.url at existing shards")


def load_manifest(url: str, storage_options: dict | None = None, split: str = "train") -> Manifest:
    """The manifest at ``url`` (its JSON or the directory holding it), or a shard pattern indexed
    in memory as the one split ``split`` (once per process)."""
    if is_shard_pattern(url):
        return _pattern_manifest(str(url), json.dumps(storage_options or {}, sort_keys=True), split)
    murl = manifest_url(url)
    try:
        data = io.read_json(murl, storage_options)
    except FileNotFoundError as exc:
        raise ManifestError(_missing_manifest(str(url), murl, storage_options)) from exc
    except ValueError as exc:
        raise ManifestError(f"shard manifest {murl} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{murl} is not a {FORMAT} manifest")
    if int(data.get("version", 0)) > VERSION:
        raise ManifestError(f"{murl} has manifest version {data['version']}; this tool reads up to {VERSION}")
    for key in ("task", "fields", "splits"):
        if key not in data:
            raise ManifestError(f"{murl} lacks the required key {key!r}")
    return Manifest(url=murl, data=data)


@functools.cache
def _pattern_manifest(url: str, options: str, split: str) -> Manifest:
    from .index import index_shards

    return Manifest(url=url, data=index_shards({split: url}, json.loads(options) or None, full=False))
