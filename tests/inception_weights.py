"""Seeded random-init weights files for the metric tests: torch-fidelity's real InceptionV3 and this
pipeline's LPIPS. Nothing is downloaded; the files have exactly the layouts the loaders expect.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import torch
from torch import nn


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of torch-fidelity's own ``FeatureExtractorInceptionV3`` with random weights that
    keep its 2048-d features informative.

    PyTorch's default conv init (kaiming-uniform with a = sqrt(5)) has Var(w) = 1 / (3 fan_in): with the
    ReLU halving the second moment too, each conv shrinks the signal ~6x, and after the network's
    ~17 convs in depth the features are ~1e-8 for every image, so every FID is ~0. Kaiming-normal
    with the ReLU gain (Var(w) = 2 / fan_in) keeps the second moment constant through conv + ReLU;
    the BatchNorms stay at their defaults (mean 0, var 1, affine identity), i.e. near the identity.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        # torch-fidelity's __init__ builds the modules, then loads weights (downloading them when
        # given no path). Keep the built modules and skip only that load.
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = BytesIO()
    torch.save({}, empty)  # a path is required to avoid the download; its content is ignored above
    empty.seek(0)
    model = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=gen)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features ** -0.5, generator=gen)
    return {k: v.clone() for k, v in model.state_dict().items()}


def write_random_inception_weights(path: Path, seed: int = 0) -> Path:
    torch.save(random_inception_state_dict(seed), path)
    return path


def write_random_lpips_weights(path: Path, seed: int = 0) -> Path:
    """This pipeline's LPIPS weights file (format in ``pipeline.eval.paired.LPIPS``), random but seeded;
    the linear heads are made non-negative, as the official trained heads are."""
    from pipeline.eval.paired import LPIPS

    torch.manual_seed(seed)
    model = LPIPS()
    for lin in model.lins:
        lin.weight.data.abs_()
    torch.save(model.state_dict(), path)
    return path
