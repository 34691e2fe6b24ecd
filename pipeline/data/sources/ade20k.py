"""ADE20K as released for the MIT Scene Parsing benchmark (ADEChallengeData2016): each photo with
its 150-class annotation PNG, both passed through unchanged.
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

# Id 0 is "other / unlabeled" in the annotation PNGs; ids 1..150 follow objectInfo150.txt of
# CSAILVision/sceneparsing, keeping the first name of each synonym list.
ADE20K_CLASSES = (
    "unlabeled",
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase",
    "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

RELEASE_DIR = "ADEChallengeData2016"
SPLIT_DIRS = {"train": "training", "val": "validation"}


def _release_root(root: Path) -> Path:
    """The folder holding ``images/`` and ``annotations/``: ``root`` itself or ``root/ADEChallengeData2016``."""
    for candidate in (root, root / RELEASE_DIR):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    raise SourceError(f"no ADE20K images/ and annotations/ folders in {root} or {root / RELEASE_DIR}")


class ADE20KSource:
    """``images/{training,validation}/ADE_{train,val}_<n>.jpg`` with the PNG of the same stem in
    ``annotations/``; splits ``train`` and ``val``. An unmatched file is a ``missing_partner`` problem.
    """

    info = SourceInfo(
        name="ade20k",
        task="label2image",
        fields=(FieldSpec("image", "image"), FieldSpec("label", "label")),
        num_classes=len(ADE20K_CLASSES),
        class_names=ADE20K_CLASSES,
        default_splits=("train", "val"),
    )

    def __init__(self, root: Path | None) -> None:
        if root is None:
            raise SourceError(f"ade20k needs a dataset root ({RELEASE_DIR}/ or the folder holding it)")
        self.root = _release_root(require_dir(Path(root), "ADE20K root"))

    def list_items(self, split: str) -> tuple[list[Item], list[Problem]]:
        if split not in SPLIT_DIRS:
            raise SourceError(f"unknown ADE20K split {split!r}; choose one of: {', '.join(SPLIT_DIRS)}")
        folder = SPLIT_DIRS[split]
        images = require_dir(self.root / "images" / folder, f"ADE20K images of split {split!r}")
        labels = require_dir(self.root / "annotations" / folder, f"ADE20K annotations of split {split!r}")
        label_files = [p for p in find_images(labels) if p.suffix.lower() == ".png"]
        return pair_by_stem(
            split,
            unique_keys((p.stem, p) for p in find_images(images)),
            {"label": dict(unique_keys((p.stem, p) for p in label_files))},
        )

    def read(self, item: Item) -> dict[str, bytes]:
        return dict(read_file_field(stem, path) for stem, path in item.paths.items())
