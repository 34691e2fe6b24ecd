"""Cityscapes (gtFine) as label -> photo samples: the photo, the labelIds map and the 16-bit
instanceIds map of each frame, passed through unchanged.
"""

from __future__ import annotations

from pathlib import Path

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

# Label ids 0..33 in the order of cityscapesScripts' helpers/labels.py; "license plate" (id -1
# there, never written to labelIds.png) takes the last slot so that label_nc = 35 as in pix2pixHD.
CITYSCAPES_CLASSES = (
    "unlabeled", "ego vehicle", "rectification border", "out of roi", "static", "dynamic",
    "ground", "road", "sidewalk", "parking", "rail track", "building", "wall", "fence",
    "guard rail", "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan",
    "trailer", "train", "motorcycle", "bicycle", "license plate",
)

PHOTO_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


def _by_suffix(folder: Path, suffix: str) -> list[tuple[str, Path]]:
    """``(key, path)`` for the files under ``folder/<city>/`` named ``<key><suffix>``, sorted.

    Other files of a real tree (``_gtFine_color.png``, ``_gtFine_polygons.json``,
    ``_gtFine_labelTrainIds.png``) do not end with the suffix and are left out.
    """
    return [(p.name[: -len(suffix)], p) for p in find_images(folder, recursive=True)
            if p.name.endswith(suffix)]


class CityscapesSource:
    """``ROOT/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` with its
    ``ROOT/gtFine/<split>/<city>/..._gtFine_{labelIds,instanceIds}.png``; key ``<city>_<seq>_<frame>``.

    A photo without both maps, or a map without a photo, is a ``missing_partner`` problem. A
    missing ``leftImg8bit/<split>`` or ``gtFine/<split>`` folder is a ``SourceError``.
    """

    info = SourceInfo(
        name="cityscapes",
        task="label2image",
        fields=(
            FieldSpec("image", "image"),
            FieldSpec("label", "label"),
            FieldSpec("instance", "instance"),
        ),
        num_classes=len(CITYSCAPES_CLASSES),
        class_names=CITYSCAPES_CLASSES,
        default_splits=("train", "val"),
    )

    def __init__(self, root: Path | None) -> None:
        if root is None:
            raise SourceError("cityscapes needs a dataset root (the folder holding leftImg8bit/ and gtFine/)")
        self.root = require_dir(Path(root), "Cityscapes root")

    def list_items(self, split: str) -> tuple[list[Item], list[Problem]]:
        photos = require_dir(self.root / "leftImg8bit" / split, f"Cityscapes photos of split {split!r}")
        maps = require_dir(self.root / "gtFine" / split, f"Cityscapes gtFine maps of split {split!r}")
        return pair_by_stem(
            split,
            unique_keys(_by_suffix(photos, PHOTO_SUFFIX)),
            {
                "label": dict(unique_keys(_by_suffix(maps, LABEL_SUFFIX))),
                "instance": dict(unique_keys(_by_suffix(maps, INSTANCE_SUFFIX))),
            },
        )

    def read(self, item: Item) -> dict[str, bytes]:
        return dict(read_file_field(stem, path) for stem, path in item.paths.items())
