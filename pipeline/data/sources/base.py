"""The contract between a dataset layout adapter and the shard writer.

An adapter lists the samples of a split (with the problems it found while pairing files) and
reads one sample as encoded image bytes. Decoding, validation, resizing and statistics are the
writer's job, so every adapter gets them the same way.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

# Field kinds: how the writer validates a field and how the loader decodes and augments it.
#   image    - a photo, any mode PIL decodes, delivered as RGB
#   label    - class ids in a single-channel PNG (8 or 16 bit), resized with nearest neighbour
#   instance - instance ids in a single-channel PNG (usually 16 bit), nearest neighbour
#   class    - the class id of the whole sample, ASCII decimal in ``class.cls`` (WebDataset's
#              convention); names and per-split counts are in the manifest
FIELD_KINDS = ("image", "label", "instance", "class")
TASKS = ("label2image", "paired", "unpaired", "unconditional", "class2image")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
PROBLEM_KINDS = (
    "missing_partner",
    "undecodable",
    "label_out_of_range",
    "size_mismatch",
    "no_class",
)

_KEY_OK = re.compile(r"[^A-Za-z0-9_-]+")
_log = logging.getLogger(__name__)


def sanitize_key(text: str) -> str:
    """A tar-safe sample key: no dots (WebDataset splits fields at the first dot), no slashes,
    no ``..``; runs of other characters become ``_``."""
    key = _KEY_OK.sub("_", text).strip("_")
    if not key:
        raise ValueError(f"cannot make a sample key from {text!r}")
    return key


@dataclass(frozen=True)
class FieldSpec:
    """One field of a sample: ``name`` is the stem used in the tar (``image`` -> ``image.jpg``)."""

    name: str
    kind: str
    required: bool = True


@dataclass(frozen=True)
class SourceInfo:
    name: str
    task: str
    fields: tuple[FieldSpec, ...]
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    default_splits: tuple[str, ...] = ("train", "val")
    # The dataset's own colour of each class id (Cityscapes', ADE20K's), for contact sheets and
    # image grids; None: the inspector's generated palette.
    palette: tuple[tuple[int, int, int], ...] | None = None

    def kind_of(self, field_name: str) -> str:
        for spec in self.fields:
            if spec.name == field_name:
                return spec.kind
        raise KeyError(field_name)


@dataclass(frozen=True)
class Item:
    """A sample to be written: its key and the files it is made of (field stem -> path).

    ``paths`` is what error messages point at; ``read`` decides how the files become fields.
    """

    key: str
    paths: Mapping[str, str] = field(default_factory=dict)

    def where(self) -> str:
        return ", ".join(str(p) for p in self.paths.values()) or self.key


@dataclass(frozen=True)
class Problem:
    """A sample that was not written, and why. ``path`` names the offending file."""

    split: str
    key: str
    kind: str
    path: str
    message: str

    def line(self) -> str:
        return f"[{self.kind}] {self.split}/{self.key}: {self.message} ({self.path})"

    def to_json(self) -> dict:
        return {"split": self.split, "key": self.key, "kind": self.kind,
                "path": self.path, "message": self.message}


class Source(Protocol):
    info: SourceInfo

    def list_items(self, split: str) -> tuple[list[Item], list[Problem]]:
        """Every sample of ``split`` in a deterministic order, plus pairing problems."""

    def read(self, item: Item) -> dict[str, bytes]:
        """Encoded fields of one sample, keyed ``"<stem>.<ext>"`` (``{"image.png": b"..."}``)."""


class SourceError(Exception):
    """A dataset root that does not have the layout the adapter expects."""


def find_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files under ``folder`` sorted by path (deterministic across file systems)."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern)
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_file_field(stem: str, path: str | Path) -> tuple[str, bytes]:
    """A file passed through unchanged: ``("image.jpg", bytes)``; ``.jpeg`` becomes ``jpg``."""
    ext = Path(path).suffix.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    with open(path, "rb") as f:
        return f"{stem}.{ext}", f.read()


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG of an ``[H, W]`` (uint8/uint16) or ``[H, W, 3]`` uint8 array, deterministic."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise SourceError(f"{what} not found: {path}")
    return path


def pair_by_stem(split: str, primary: Iterable[tuple[str, Path]],
                 partners: Mapping[str, Mapping[str, Path]]) -> tuple[list[Item], list[Problem]]:
    """Join files that belong together.

    ``primary`` yields ``(key, path)`` for the leading field; ``partners`` maps every other field
    stem to ``{key: path}``. A key missing any partner becomes a ``missing_partner`` problem; a
    partner file without a primary one is reported too.
    """
    primary = list(primary)
    items: list[Item] = []
    problems: list[Problem] = []
    lead_stem = "image"
    seen = set()
    for key, path in primary:
        seen.add(key)
        paths = {lead_stem: str(path)}
        missing = [stem for stem, table in partners.items() if key not in table]
        if missing:
            problems.append(Problem(split, key, "missing_partner", str(path),
                                    f"no {' / '.join(missing)} file for this image"))
            continue
        for stem, table in partners.items():
            paths[stem] = str(table[key])
        items.append(Item(key=sanitize_key(key), paths=paths))
    for stem, table in partners.items():
        for key in sorted(set(table) - seen):
            problems.append(Problem(split, key, "missing_partner", str(table[key]),
                                    f"{stem} file without a matching image"))
    return items, problems


def unique_keys(entries: Iterable[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """``(text, path)`` pairs -> ``(key, path)`` with sanitized keys unique within the list.

    Entries are taken in the order given (pass them sorted): the first one keeps its plain key; a
    later one whose text sanitizes to a key already used gets ``_2``, ``_3``, ... (never the plain
    key of another entry), and the rename is logged with both paths. A name that yields no key at
    all is a ``SourceError`` naming the file.
    """
    entries = list(entries)
    keys = []
    for text, path in entries:
        try:
            keys.append(sanitize_key(text))
        except ValueError as exc:
            raise SourceError(f"cannot make a sample key from the file name: {path}") from exc
    taken = set(keys)
    first: dict[str, Path] = {}
    out: list[tuple[str, Path]] = []
    for key, (_, path) in zip(keys, entries):
        if key not in first:
            first[key] = path
            out.append((key, path))
            continue
        n = 2
        while f"{key}_{n}" in taken:
            n += 1
        renamed = f"{key}_{n}"
        taken.add(renamed)
        _log.warning("sample key %r of %s is taken by %s; using %r", key, path, first[key], renamed)
        out.append((renamed, path))
    return out
