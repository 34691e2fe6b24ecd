"""A tiny label2image source whose content encodes its own key, for writer and stream tests.

Pixel rule: ``label = (x // 4 + y // 4 + k) % NUM_CLASSES`` for sample number ``k``; the photo's red
channel is ``label * 20``, green is the column ``x * 8`` (so crops and flips are visible) and
blue is ``k``; ``instance = label * 1000 + k`` (16 bit). Any transform that treats the fields
differently breaks the rule, which is what the tests look for.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.sources.base import FieldSpec, Item, SourceInfo, encode_png

NUM_CLASSES = 5


def render(k: int, width: int = 24, height: int = 16) -> dict[str, np.ndarray]:
    y, x = np.mgrid[0:height, 0:width]
    label = ((x // 4 + y // 4 + k) % NUM_CLASSES).astype(np.uint8)
    image = np.stack([label * 20, (x * 8) % 256, np.full_like(label, k % 256)], axis=-1).astype(np.uint8)
    instance = (label.astype(np.uint16) * 1000 + k).astype(np.uint16)
    return {"image": image, "label": label, "instance": instance}


class SyntheticSource:
    """``counts`` samples per split; ``bad`` maps a key to the kind of damage to put in it."""

    info = SourceInfo(
        name="synthetic", task="label2image",
        fields=(FieldSpec("image", "image"), FieldSpec("label", "label"), FieldSpec("instance", "instance")),
        num_classes=NUM_CLASSES, class_names=tuple(f"c{i}" for i in range(NUM_CLASSES)),
    )

    def __init__(self, counts: dict[str, int] | None = None, bad: dict[str, str] | None = None,
                 size: tuple[int, int] = (24, 16)):
        self.counts = counts or {"train": 20, "val": 9}
        self.bad = bad or {}
        self.size = size

    def list_items(self, split: str):
        items = [Item(key=f"{split}_{k:04d}", paths={"image": f"/synthetic/{split}/{k}.png"})
                 for k in range(self.counts[split])]
        return items, []

    def read(self, item: Item) -> dict[str, bytes]:
        k = int(item.key.rsplit("_", 1)[1])
        arrays = render(k, *self.size)
        damage = self.bad.get(item.key)
        if damage == "label_out_of_range":
            arrays["label"] = arrays["label"].copy()
            arrays["label"][0, 0] = NUM_CLASSES + 3
        if damage == "size_mismatch":
            arrays["label"] = arrays["label"][:-2]
        fields = {f"{name}.png": encode_png(arr) for name, arr in arrays.items()}
        if damage == "undecodable":
            fields["image.png"] = b"\x89PNG\r\n\x1a\nthis is not really a png"
        return fields
