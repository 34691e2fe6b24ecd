"""Label and instance maps on the device, for the families that take them: one-hot encoding,
instance boundaries (pix2pixHD, SPADE) and colourised maps for image grids."""

from __future__ import annotations

import torch


def one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``label`` [N, H, W] int64 -> float [N, num_classes, H, W], built in place on its device."""
    n, h, w = label.shape
    out = torch.zeros(n, num_classes, h, w, device=label.device)
    return out.scatter_(1, label.unsqueeze(1), 1.0)


def instance_edges(instance: torch.Tensor) -> torch.Tensor:
    """Instance boundaries [N, 1, H, W] of ``instance`` [N, 1, H, W]: 1.0 where a 4-neighbour has
    another id (pix2pixHD's ``get_edges``), on the device."""
    t = instance
    edge = torch.zeros_like(t, dtype=torch.bool)
    dx = t[..., :, 1:] != t[..., :, :-1]
    dy = t[..., 1:, :] != t[..., :-1, :]
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    return edge.float()


def colourised(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``label`` [N, H, W] int64 -> [N, 3, H, W] in [-1, 1], the shard inspector's palette."""
    from ..data.verify import palette

    pal = torch.from_numpy(palette(max(256, num_classes))).to(label.device).float() / 127.5 - 1
    return pal[label].permute(0, 3, 1, 2)
