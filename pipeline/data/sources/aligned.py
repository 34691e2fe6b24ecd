"""pix2pix "aligned" datasets (facades, maps, edges2shoes, ...): one file per sample holding A and B
side by side, split into an ``input`` and an ``image`` field re-encoded as lossless PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import (
    FieldSpec,
    Item,
    Problem,
    SourceError,
    SourceInfo,
    encode_png,
    find_images,
    require_dir,
    unique_keys,
)

DIRECTIONS = ("AtoB", "BtoA")


def check_direction(direction: str) -> str:
    """``direction`` if it is ``AtoB`` or ``BtoA``; otherwise a ``SourceError`` naming both."""
    if direction not in DIRECTIONS:
        raise SourceError(f"direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
    return direction


def split_halves(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The left (A) and right (B) halves of an A|B file, ``[H, W/2]`` or ``[H, W/2, 3]`` uint8.

    Grey files stay single channel; any other mode is converted to RGB. An odd width has no equal
    halves and raises ``ValueError``; an undecodable file raises what PIL raises.
    """
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))
    width = array.shape[1]
    if width < 2 or width % 2:
        raise ValueError(f"width {width} of {path} does not split into two equal A|B halves")
    half = width // 2
    return np.ascontiguousarray(array[:, :half]), np.ascontiguousarray(array[:, half:])


class AlignedSource:
    """``ROOT/<split>/*.jpg`` (``1.jpg`` in facades, ``1_AB.jpg`` in edges2shoes), A left, B right.

    ``direction="AtoB"`` makes A the ``input`` and B the ``image`` (the target); ``"BtoA"`` swaps
    them. ``list_items`` only lists files (key = sanitized file stem, made unique); the split
    happens in ``read``, which raises for an undecodable file or an odd width, and the writer
    records that as an ``undecodable`` problem. ``Item.paths`` is ``{"AB": path}``.
    """

    info = SourceInfo(
        name="aligned",
        task="paired",
        fields=(FieldSpec("input", "image"), FieldSpec("image", "image")),
        default_splits=("train", "val"),
    )

    def __init__(self, root: Path | None, direction: str = "AtoB") -> None:
        self.direction = check_direction(direction)
        if root is None:
            raise SourceError("aligned needs a dataset root (the folder holding train/, val/, ...)")
        self.root = require_dir(Path(root), "aligned dataset root")

    def list_items(self, split: str) -> tuple[list[Item], list[Problem]]:
        folder = require_dir(self.root / split, f"aligned split {split!r}")
        keyed = unique_keys((p.stem, p) for p in find_images(folder))
        return [Item(key=key, paths={"AB": str(path)}) for key, path in keyed], []

    def read(self, item: Item) -> dict[str, bytes]:
        a, b = split_halves(item.paths["AB"])
        source, target = (a, b) if self.direction == "AtoB" else (b, a)
        return {"input.png": encode_png(source), "image.png": encode_png(target)}
