"""Two unpaired domains from the demo generator, in CycleGAN's layout: street photos (A) and the
colourised label maps of other scenes (B), the labels↔photos task of the CycleGAN paper's
Cityscapes experiment, made on the fly with nothing to download."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from .base import FieldSpec, Item, Problem, SourceError, SourceInfo, encode_png, sanitize_key
from .demo import _parse_size, render, sample_seed
from .paired import UNPAIRED_SPLITS


def colourised_labels(label: np.ndarray) -> np.ndarray:
    """A demo label map [H, W] as the B domain's image [H, W, 3] uint8 (the inspector's palette)."""
    from ..verify import palette

    return palette(256)[label]


class DemoUnpairedSource:
    """Splits ``trainA``/``testA`` hold demo photos, ``trainB``/``testB`` colourised label maps,
    each sample one ``image`` field. Sample ``i`` of split ``s`` is the scene of the demo's
    ``(seed, s, i, size)``, so A and B never show the same scene: the domains are unpaired."""

    def __init__(self, root: object = None, size: Sequence[int] | str = (256, 128),
                 counts: Mapping[str, int] | None = None, seed: int = 0) -> None:
        self.size = _parse_size(size)
        counts = dict(counts) if counts is not None else {"trainA": 384, "trainB": 384, "testA": 64, "testB": 64}
        for split, n in counts.items():
            if split not in UNPAIRED_SPLITS:
                raise SourceError(f"demo_unpaired splits are {', '.join(UNPAIRED_SPLITS)}, not {split!r}")
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
                raise SourceError(f"demo count for split {split!r} must be an int >= 0, got {n!r}")
        self.counts = {split: int(n) for split, n in counts.items()}
        self.seed = int(seed)
        self.info = SourceInfo(name="demo_unpaired", task="unpaired", fields=(FieldSpec("image", "image"),),
                               default_splits=tuple(self.counts))

    def list_items(self, split: str) -> tuple[list[Item], list[Problem]]:
        if split not in self.counts:
            raise SourceError(f"demo_unpaired has no split {split!r}; available: {', '.join(self.counts)}")
        return [Item(key=f"demo_{sanitize_key(split)}_{i:06d}") for i in range(self.counts[split])], []

    def read(self, item: Item) -> dict[str, bytes]:
        match = re.fullmatch(r"demo_(\w+?)_(\d+)", item.key)
        split = match.group(1) if match else None
        if split not in self.counts or int(match.group(2)) >= self.counts[split]:
            raise SourceError(f"not a demo_unpaired sample key: {item.key!r}")
        width, height = self.size
        arrays = render(sample_seed(self.seed, split, int(match.group(2)), width, height), width, height)
        image = arrays["image"] if split.endswith("A") else colourised_labels(arrays["label"])
        return {"image.png": encode_png(image)}
