"""The shard manifest: the contract between the sharding CLI and every reader of shards.

``manifest.json`` sits beside the shards and is written last; a manifest never names a shard
that is not complete. Readers resolve shard names relative to the manifest's own URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import io

MANIFEST_NAME = "manifest.json"
FORMAT = "gan-pipeline-shards"
VERSION = 1


class ManifestError(Exception):
    """A manifest that is missing, unreadable or not of this format."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    url: str
    samples: int
    bytes: int
    sha256: str


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

    def split(self, name: str) -> dict[str, Any]:
        if name not in self.data["splits"]:
            raise ManifestError(f"split {name!r} is not in {self.url}; it has: {', '.join(self.splits)}")
        return self.data["splits"][name]

    def shards(self, split: str) -> list[ShardInfo]:
        base = base_url(self.url)
        return [ShardInfo(name=s["name"], url=io.join(base, s["name"]), samples=int(s["samples"]),
                          bytes=int(s["bytes"]), sha256=s["sha256"]) for s in self.split(split)["shards"]]

    def num_samples(self, split: str) -> int:
        return int(self.split(split)["samples"])


def load_manifest(url: str, storage_options: dict | None = None) -> Manifest:
    murl = manifest_url(url)
    try:
        data = io.read_json(murl, storage_options)
    except FileNotFoundError as exc:
        raise ManifestError(f"no shard manifest at {murl} (write one with `gan-shard write`)") from exc
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
