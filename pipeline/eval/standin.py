"""An UNTRAINED, seeded InceptionV3 in torch-fidelity's layout, for machines that cannot have the
real weights (no internet; the demo). Its FIDs compare only with FIDs from the same file — the
weights' SHA-256 in every result's protocol says which extractor produced a number. The file
carries a marker (``metrics.STANDIN_MARK``), so the evaluator logs its numbers under tags of
their own (``Metrics_standin/*``) and labels them in every table."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import torch
from torch import nn

from .metrics import STANDIN_MARK


def standin_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` state with informative random weights.

    PyTorch's default conv init shrinks the signal at every conv + ReLU, and after ~17 of them the
    features of every image are ~0 (every FID ~0). Kaiming-normal with the ReLU gain keeps the
    signal's scale through the depth, so distinct image sets get distinct features.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the fresh modules
            return None

    placeholder = BytesIO()
    torch.save({}, placeholder)  # a weights "path" so that torch-fidelity does not download
    placeholder.seek(0)
    model = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=placeholder)
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=gen)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features ** -0.5, generator=gen)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state[STANDIN_MARK[0]] = torch.tensor(STANDIN_MARK[1])
    return state


def write_standin_inception(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(standin_inception_state(seed), path)
    return path
