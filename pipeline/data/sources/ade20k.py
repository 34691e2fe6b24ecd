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

# The benchmark's colours of ids 1..150 (CSAILVision's data/color150.mat, as RGB hex); id 0 black.
_ADE20K_COLOURS = (
    "787878b4787806e6e650323204c8037878508c8c8ccc05ffe6e6e604fa07e005ffebff0796053d78784608ff33ff0652"
    "8fff8cccff04ff3307cc46030066c83de6faff06330b66ffff0747ff09e00907e6dcdcdcff095c7009ff08ffd607ffe0"
    "ffb8060aff47ff290a07ffffe0ff086608ffff3d06ffc207ff7a0800ff14ff0829ff05990633ffeb0cffa0961400a3ff"
    "8c8c8cfa0a0f14ff001fff00ff1f00ffe00099ff000000ffff470000ebff00adff1f00ff0bc8c8ff520000fff5003dff"
    "00ff7000ff85ff0000ffa300ff6600c2ff00008fff33ff000052ff00ff2900ffad0a00ffadff0000ff99ff5c00ff00ff"
    "ff00f5ff0066ffad00ff0014ffb8b8001fff00ff3d0047ffff00cc00ffc200ff52000aff0070ff3300ff00c2ff007aff"
    "00ffa3ff990000ff0aff70008fff005200ffa3ff00ffeb0008b8aa8500ff00ff5cb800ffff001f00b8ff00d6ffff0070"
    "5cff0000e0ff70e0ff46b8a0a300ff9900ff47ff00ff00a3ffcc00ff008f00ffeb85ff00ff00ebf500ffff007afff500"
    "0abed4d6ff0000ccff1400ffffff000099ff0029ff00ffcc2900ff29ff00ad00ff00f5ff4700ff7a00ff00ffb8005cff"
    "b8ff000085ffffd60019c2c266ff005c00ff"
)
ADE20K_PALETTE = ((0, 0, 0),) + tuple(tuple(bytes.fromhex(_ADE20K_COLOURS[k:k + 6])) for k in range(0, 900, 6))

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
        palette=ADE20K_PALETTE,
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
