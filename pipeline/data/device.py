"""The device side of the batch contract: what every family's ``prepare`` and the evaluator call
on the loader's integer tensors once they are on the device."""

from __future__ import annotations

import torch


def float_image(image: torch.Tensor) -> torch.Tensor:
    """Loader images, uint8 ``[N, 3, H, W]`` -> float32 ``[N, 3, H, W]`` in ``[-1, 1]``
    (``x * (1 / 127.5) - 1``). Anything but uint8 is refused: a float image would be scaled twice."""
    if image.dtype != torch.uint8 or image.dim() != 4 or image.shape[1] != 3:
        raise TypeError(f"expected the loader's uint8 [N, 3, H, W] images, got {image.dtype} {list(image.shape)}")
    return image.float().mul_(1 / 127.5).sub_(1.0)


def class_ids(label: torch.Tensor) -> torch.Tensor:
    """Loader label maps (uint8, uint16 or int32 ``[N, H, W]``) -> int64: ``one_hot``'s scatter
    needs int64, and indexing with a uint8 tensor would be a boolean mask."""
    if label.is_floating_point() or label.dtype == torch.bool:
        raise TypeError(f"expected integer label maps from the loader, got {label.dtype}")
    return label.long()


def instance_ids(instance: torch.Tensor) -> torch.Tensor:
    """Loader instance maps (uint16 from PNG, or int32 ``[N, H, W]``) -> int32 ``[N, H, W]``:
    torch supports uint16 in copies and casts, not in most other kernels (``max``, comparisons)."""
    if instance.is_floating_point() or instance.dtype == torch.bool:
        raise TypeError(f"expected integer instance maps from the loader, got {instance.dtype}")
    return instance.int()
