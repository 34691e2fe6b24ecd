"""Dataset layout adapters, one module per published layout, plus the embedded demo generator.

``SOURCES`` maps the sharding CLI's SOURCE names to ``module:Class``; a class is built as
``Class(root, **options)`` and follows the ``Source`` protocol of ``sources/base.py``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .base import Source, SourceError

SOURCES: dict[str, str] = {
    "cityscapes": "cityscapes:CityscapesSource",
    "ade20k": "ade20k:ADE20KSource",
    "aligned": "aligned:AlignedSource",
    "paired": "paired:PairedSource",
    "unpaired": "paired:UnpairedSource",
    "folder": "folder:FolderSource",
    "demo": "demo:DemoSource",
    "demo_unpaired": "demo_unpaired:DemoUnpairedSource",
    "demo_objects": "demo_objects:DemoObjectsSource",
}


def make_source(name: str, root: str | Path | None, **options) -> Source:
    """Build the adapter ``name`` over ``root``; unknown names list the known ones."""
    if name not in SOURCES:
        raise SourceError(f"unknown source {name!r}; choose one of: {', '.join(SOURCES)}")
    module_name, class_name = SOURCES[name].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    cls = getattr(module, class_name)
    return cls(Path(root) if root is not None else None, **options)


__all__ = ["SOURCES", "Source", "SourceError", "make_source"]
