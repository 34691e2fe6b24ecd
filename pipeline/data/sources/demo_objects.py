"""The embedded labelled demo: square crops of the objects in the demo street scenes, one class per
object type (car, tree, pole, person), for class-conditional GANs on CPU with nothing to download.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from .base import FieldSpec, Item, Problem, SourceError, SourceInfo, encode_png, sanitize_key
from .demo import CAR, PERSON, POLE, TREE, render, sample_seed, split_counts

OBJECT_CLASSES = (CAR, TREE, POLE, PERSON)
CLASS_NAMES = ("car", "tree", "pole", "person")
_MIN_PIXELS = 60  # smaller objects are a few pixels of noise once cropped
_ATTEMPTS = 64


def crop_object(scene: dict[str, np.ndarray], cls: int, size: int) -> np.ndarray | None:
    """The largest visible object of scene class ``cls`` (``demo.CLASS_NAMES`` ids) in a square
    crop 1.2x its longer side (shifted to stay inside the scene), resized bicubically to
    ``size``x``size``; None when the scene has none of at least ``_MIN_PIXELS`` pixels."""
    inst = scene["instance"]
    ids, counts = np.unique(inst[(inst // 1000) == cls], return_counts=True)
    if not len(ids) or counts.max() < _MIN_PIXELS:
        return None
    ys, xs = np.nonzero(inst == ids[counts.argmax()])
    h, w = inst.shape
    side = min(h, w, int(1.2 * max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)) + 1)
    cy, cx = (ys.min() + ys.max() + 1) // 2, (xs.min() + xs.max() + 1) // 2
    y0, x0 = int(np.clip(cy - side // 2, 0, h - side)), int(np.clip(cx - side // 2, 0, w - side))
    crop = Image.fromarray(scene["image"][y0:y0 + side, x0:x0 + side])
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))


class DemoObjectsSource:
    """Object crops rendered on the fly; ``root`` is ignored. Sample ``i`` of split ``s`` has class
    ``i mod 4`` (balanced classes) and is the largest such object of the first scene, among
    seeds ``(seed, s, i, attempt)``, that has one: a pure function of its coordinates, so workers
    render it alike."""

    def __init__(self, root: object = None, size: int | Sequence[int] | str = 32,
                 counts: Mapping[str, int] | None = None, seed: int = 0) -> None:
        try:
            w, h = (size, size) if isinstance(size, int) else \
                (int(p) for p in (re.split(r"[x,]", size) if isinstance(size, str) else size))
        except (TypeError, ValueError):
            raise SourceError(f"demo_objects size must be N or 'NxN', got {size!r}") from None
        if w != h or w < 8:
            raise SourceError(f"demo_objects samples are squares of at least 8x8, got {w}x{h}")
        self.size = w
        self.counts, self._splits = split_counts("demo_objects", counts, {"train": 2048, "val": 256})
        self.seed = int(seed)
        self.info = SourceInfo(name="demo_objects", task="class2image",
                               fields=(FieldSpec("image", "image"), FieldSpec("class", "class")),
                               num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES, default_splits=tuple(self.counts))

    def list_items(self, split: str) -> tuple[list[Item], list[Problem]]:
        if split not in self.counts:
            raise SourceError(f"demo_objects has no split {split!r}; available: {', '.join(self.counts)}")
        name = sanitize_key(split)
        return [Item(key=f"objects_{name}_{i:06d}") for i in range(self.counts[split])], []

    def sample(self, split: str, index: int) -> tuple[np.ndarray, int]:
        """``(image [size, size, 3] uint8, class id)`` of one sample."""
        label = index % len(CLASS_NAMES)
        for attempt in range(_ATTEMPTS):
            scene = render(sample_seed(self.seed, split, index, attempt, 256), 256, 128)
            crop = crop_object(scene, OBJECT_CLASSES[label], self.size)
            if crop is not None:
                return crop, label
        raise SourceError(f"no {CLASS_NAMES[label]} in {_ATTEMPTS} scenes for {split} sample {index}")

    def read(self, item: Item) -> dict[str, bytes]:
        match = re.fullmatch(r"objects_(.+)_(\d+)", item.key)
        split = self._splits.get(match.group(1)) if match else None
        if split is None or int(match.group(2)) >= self.counts[split]:
            raise SourceError(f"not a demo_objects sample key: {item.key!r}")
        image, label = self.sample(split, int(match.group(2)))
        return {"image.png": encode_png(image), "class.cls": str(label).encode()}
