"""Label and instance maps on the device, for the families that take them: one-hot encoding,
instance boundaries (pix2pixHD, SPADE) and colourised maps for image grids."""

from __future__ import annotations

import torch

from ..data.device import class_ids, instance_ids


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


def colourised(label: torch.Tensor, info) -> torch.Tensor:
    """``label`` [N, H, W] int64 -> [N, 3, H, W] in [-1, 1]: the dataset's own colours
    (``info.palette``) where it has them, else the shard inspector's palette."""
    import numpy as np

    from ..data.verify import palette, with_own_colours

    own = np.asarray(info.palette, dtype=np.uint8) if info.palette else None
    colours = with_own_colours(palette(max(256, info.num_classes or 0)), own)
    pal = torch.from_numpy(colours).to(label.device).float() / 127.5 - 1
    return pal[label].permute(0, 3, 1, 2)


def semantic_input(batch: dict, device: torch.device, num_classes: int, *, edges: bool,
                   instances: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The conditioning input of pix2pixHD and SPADE, built once per batch on the device:
    ``(input, label, instance)`` with ``input`` [N, num_classes (+1 instance edges), H, W] float,
    ``label`` [N, H, W] int64 and ``instance`` [N, 1, H, W] int32 ids (None unless ``edges`` or
    ``instances`` asked for them)."""
    label = class_ids(batch["label"].to(device, non_blocking=True))
    parts = [one_hot(label, num_classes)]
    instance = None
    if edges or instances:
        if "instance" not in batch:
            raise ValueError("instance edges or features need instance maps in the shards: set "
                             "model.use_instance=false, or shard a source that has them")
        instance = instance_ids(batch["instance"].to(device, non_blocking=True)).unsqueeze(1)  # uint16 PNG
    if edges:
        parts.append(instance_edges(instance))
    return torch.cat(parts, 1), label, instance
