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

# The colour of each id above, as cityscapesScripts' labels.py gives it ("license plate" there
# has the colour of "car").
CITYSCAPES_PALETTE = (
    (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (111, 74, 0), (81, 0, 81), (128, 64, 128),
    (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 153), (250, 170, 30),
    (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142),
    (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32), (0, 0, 142),
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
        palette=CITYSCAPES_PALETTE,
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
