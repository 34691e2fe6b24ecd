"""Two-folder layouts of pix2pix and CycleGAN: A/B folders matched by file stem (paired), and the
trainA/trainB/testA/testB folders of unpaired translation. Files are passed through unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .aligned import check_direction
from .base import (
    FieldSpec,
    Item,
    Problem,
    SourceError,
    SourceInfo,
    find_images,
    pair_by_stem,
    read_file_field,
    require_dir,
    unique_keys,
)

UNPAIRED_SPLITS = ("trainA", "trainB", "testA", "testB")


def _read_fields(item: Item) -> dict[str, bytes]:
    return dict(read_file_field(stem, path) for stem, path in item.paths.items())


class PairedSource:
    """``ROOT/A/<split>/<name>.<ext>`` with ``ROOT/B/<split>/<name>.<ext>`` (the layout of pix2pix's
    ``combine_A_and_B.py``); the extensions may differ between A and B.

    ``direction="AtoB"`` makes A the ``input`` and B the ``image`` (the target); ``"BtoA"`` swaps
    them. Keys are sanitized file stems (made unique); a file without a partner of the same stem
    is a ``missing_partner`` problem naming it.
    """

    info = SourceInfo(
        name="paired",
        task="paired",
        fields=(FieldSpec("input", "image"), FieldSpec("image", "image")),
        default_splits=("train", "val"),
    )

    def __init__(self, root: Path | None, direction: str = "AtoB") -> None:
        self.direction = check_direction(direction)
        if root is None:
            raise SourceError("paired needs a dataset root (the folder holding A/ and B/)")
        self.root = require_dir(Path(root), "paired dataset root")

    def _files(self, side: str, split: str) -> list[tuple[str, Path]]:
        folder = require_dir(self.root / side / split, f"paired folder {side} of split {split!r}")
        return unique_keys((p.stem, p) for p in find_images(folder))

    def list_items(self, split: str) -> tuple[list[Item], list[Problem]]:
        input_side, image_side = ("A", "B") if self.direction == "AtoB" else ("B", "A")
        inputs = self._files(input_side, split)
        images = self._files(image_side, split)
        return pair_by_stem(split, images, {"input": dict(inputs)})

    def read(self, item: Item) -> dict[str, bytes]:
        return _read_fields(item)


class UnpairedSource:
    """CycleGAN's ``ROOT/{trainA,trainB,testA,testB}/``: each file is a sample with one ``image``
    field; the split is the folder name and keys are sanitized relative stems (made unique).

    ``info.default_splits`` holds the standard folders that exist under this root, so a dataset
    without test folders shards its train folders by default; a split asked for explicitly whose
    folder is missing is a ``SourceError``.
    """

    info = SourceInfo(
        name="unpaired",
        task="unpaired",
        fields=(FieldSpec("image", "image"),),
        default_splits=UNPAIRED_SPLITS,
    )

    def __init__(self, root: Path | None) -> None:
        if root is None:
            raise SourceError("unpaired needs a dataset root (the folder holding trainA/, trainB/, ...)")
        self.root = require_dir(Path(root), "unpaired dataset root")
        present = tuple(s for s in UNPAIRED_SPLITS if (self.root / s).is_dir())
        if not present:
            raise SourceError(f"none of the folders {', '.join(UNPAIRED_SPLITS)} found in {self.root}")
        self.info = replace(type(self).info, default_splits=present)

    def list_items(self, split: str) -> tuple[list[Item], list[Problem]]:
        folder = require_dir(self.root / split, f"unpaired split {split!r}")
        keyed = unique_keys((p.relative_to(folder).with_suffix("").as_posix(), p)
                            for p in find_images(folder, recursive=True))
        return [Item(key=key, paths={"image": str(path)}) for key, path in keyed], []

    def read(self, item: Item) -> dict[str, bytes]:
        return _read_fields(item)
