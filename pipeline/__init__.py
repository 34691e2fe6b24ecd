"""gan-pipeline: sharded data, distributed GAN training and asynchronous evaluation.

Importing ``pipeline`` imports nothing heavy; subpackages load torch and friends on demand.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``pipeline.load_generator`` and ``pipeline.load_snapshot`` (``pipeline/generate.py``),
    imported on first use."""
    if name in ("load_generator", "load_snapshot"):
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
