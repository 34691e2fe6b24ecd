"""The discriminator feature-matching loss of pix2pixHD (``G_GAN_Feat``) and SPADE
(``GAN_Feat``), reduced in fp32."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor


def feature_matching_loss(
    real_feats: Sequence[Sequence[Tensor]],
    fake_feats: Sequence[Sequence[Tensor]],
    num_D: int,
    n_layers: int,
    weight: float = 10.0,
    layer_weight: float | None = None,
) -> Tensor:
    """Wang et al. 2018, eq. (4), weighted as ``Pix2PixHDModel.forward`` in the official
    NVIDIA/pix2pixHD ``models/pix2pixHD_model.py`` (``G_GAN_Feat``): a scalar fp32 tensor

        weight * sum_i sum_j  1/num_D * layer_weight * mean|fake[i][j] - real[i][j].detach()|

    with ``layer_weight`` 4/(n_layers+1) by default (pix2pixHD's ``D_weights``); SPADE's
    ``Pix2PixModel.compute_generator_loss`` uses 1 (its features are summed unweighted).

    over the ``num_D`` scales ``i`` and every intermediate feature ``j`` of a scale — the last
    element, the logits, is excluded. ``real_feats`` and ``fake_feats`` are
    :class:`~pipeline.models.pix2pixhd.MultiscaleDiscriminator` outputs with intermediate features
    (per scale, ``n_layers + 2`` tensors [N, C_j, H_j, W_j]) for the real and the generated image
    under the same condition. ``weight`` is the official ``lambda_feat``. Gradients reach
    ``fake_feats`` only: real features are targets.
    """
    if num_D < 1 or n_layers < 1:
        raise ValueError(f"num_D and n_layers must be >= 1, got {num_D} and {n_layers}")
    for name, feats in (("real_feats", real_feats), ("fake_feats", fake_feats)):
        if len(feats) != num_D:
            raise ValueError(f"{name} has {len(feats)} scales, expected num_D={num_D}")
        for i, scale in enumerate(feats):
            # n_layers + 2 outputs per scale; fewer means D was built without intermediate features.
            if len(scale) != n_layers + 2:
                raise ValueError(
                    f"{name}[{i}] has {len(scale)} tensors, expected n_layers + 2 = {n_layers + 2} "
                    "(a MultiscaleDiscriminator with get_intermediate_features=True)"
                )
    if layer_weight is None:
        layer_weight = 4.0 / (n_layers + 1)
    scale_weight = weight * (1.0 / num_D) * layer_weight
    # Features may be bf16/fp16 from autocast; the L1 and its gradient are taken in fp32.
    terms = [
        F.l1_loss(fake.float(), real.detach().float())
        for real_scale, fake_scale in zip(real_feats, fake_feats)
        for real, fake in zip(real_scale[:-1], fake_scale[:-1])
    ]
    return sum(terms[1:], terms[0]) * scale_weight
