"""Unconditional image folders (FFHQ's ``images1024x1024/00000/00000.png``, or any nested tree):
every image file found recursively is one sample with one ``image`` field, passed through.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .base import (
    IMAGE_SUFFIXES,
    FieldSpec,
    Item,
    Problem,
    SourceError,
    SourceInfo,
    find_images,
    read_file_field,
    require_dir,
    unique_keys,
)

# Folder names that mark a tree as already split: using the whole root as "train" would then
# mix their images into it.
SPLIT_FOLDER_NAMES = ("train", "val", "valid", "validation", "test")


class FolderSource:
    """Images under ``ROOT/<split>/`` when that folder exists; otherwise split ``train`` is every
    image under ``ROOT`` (unless ``ROOT`` has split folders such as ``val/``: a ``SourceError``),
    and any other split is a ``SourceError``.

    Keys are the path relative to the split folder without its suffix, sanitized
    (``00000/00000.png`` -> ``00000_00000``). Files whose keys collide (``a.png`` and ``a.jpg``,
    ``a b.png`` and ``a_b.png``) all stay: in sorted path order the first keeps the key and the
    next ones get ``_2``, ``_3``, ..., logged as a warning (``base.unique_keys``).

    ``classes=True`` (``gan-shard write folder --classes``) reads the tree as torchvision's
    ``ImageFolder`` does: each sub-folder of a split folder is a class, named by the folder, ids in
    sorted name order, every image below it (at any depth) one of its samples, stored with a
    ``class`` field. The class list is the union over all split folders, so ids agree across
    splits; an image directly in a split folder has no class and is reported (``no_class``).
    """

    info = SourceInfo(name="folder", task="unconditional", fields=(FieldSpec("image", "image"),),
                      default_splits=("train",))

    def __init__(self, root: Path | None, classes: bool = False) -> None:
        if root is None:
            raise SourceError("folder needs a dataset root (the folder holding the images)")
        self.root = require_dir(Path(root), "image folder root")
        self.classes = bool(classes)
        if self.classes:
            names = self._class_names()
            self.info = replace(self.info, task="class2image", fields=(*self.info.fields, FieldSpec("class", "class")),
                                num_classes=len(names), class_names=names)

    def _class_names(self) -> tuple[str, ...]:
        splits = [self.root / n for n in SPLIT_FOLDER_NAMES if (self.root / n).is_dir()] or [self.root]
        names = sorted({d.name for folder in splits for d in folder.iterdir() if d.is_dir() and _holds_an_image(d)})
        if not names:
            raise SourceError(f"--classes needs one sub-folder per class holding images, e.g. "
                              f"{splits[0]}/cat/001.png; {', '.join(str(f) for f in splits)} has none")
        return tuple(names)

    def _split_folder(self, split: str) -> Path:
        folder = self.root / split
        if folder.is_dir():
            return folder
        if split != "train":
            raise SourceError(f"split folder not found: {folder} (only 'train' may be the whole root)")
        split_dirs = [name for name in SPLIT_FOLDER_NAMES if (self.root / name).is_dir()]
        if split_dirs:
            raise SourceError(f"no train/ folder in {self.root}, but it has split folders "
                              f"({', '.join(split_dirs)}): add train/ or point ROOT at one split")
        return self.root

    def list_items(self, split: str) -> tuple[list[Item], list[Problem]]:
        folder = self._split_folder(split)
        keyed = unique_keys((p.relative_to(folder).with_suffix("").as_posix(), p)
                            for p in find_images(folder, recursive=True))
        if not self.classes:
            return [Item(key=key, paths={"image": str(path)}) for key, path in keyed], []
        items, problems = [], []
        for key, path in keyed:
            top = path.relative_to(folder).parts[0]
            if path.parent == folder:
                problems.append(Problem(split, key, "no_class", str(path),
                                        "image outside the class folders: move it into one (--classes)"))
            else:
                items.append(Item(key=key, paths={"image": str(path), "class": str(folder / top)}))
        return items, problems

    def read(self, item: Item) -> dict[str, bytes]:
        name, data = read_file_field("image", item.paths["image"])
        if not self.classes:
            return {name: data}
        return {name: data, "class.cls": str(self.info.class_names.index(Path(item.paths["class"]).name)).encode()}


def _holds_an_image(folder: Path) -> bool:
    """Whether any file below ``folder`` is an image; stops at the first (a class folder of a
    large dataset is listed in full once, by ``list_items``)."""
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in folder.rglob("*"))
