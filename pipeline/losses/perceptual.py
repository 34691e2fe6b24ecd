"""VGG19 perceptual losses: pix2pixHD's (``G_VGG``: the weighted L1 between the frozen VGG19
feature slices) and SRGAN's content loss (the MSE of one layer's features), in fp32, from a local
torchvision state_dict file (never downloaded).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# torchvision's vgg19 `features` (configuration "E"): conv widths, "M" for a 2×2 max pool; up to
# relu5_4 (index 35), the deepest layer either loss reads. pix2pixHD's slices stop at relu5_1.
_VGG19_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                                     512, 512, 512, 512)
# Indices into `features` of SRGAN's φ_i,j: the ReLU after the j-th conv before the i-th pooling.
VGG19_RELU = {"relu2_2": 8, "relu5_4": 35}
# Index ranges into `features` of the official Vgg19 slices, ending at relu1_1, relu2_1,
# relu3_1, relu4_1 and relu5_1.
VGG19_SLICES: tuple[tuple[int, int], ...] = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))

VGG_WEIGHTS_HOWTO = (
    "On a machine with internet access run\n"
    "  python -c \"import torch, torchvision; torch.save(torchvision.models.vgg19(weights='IMAGENET1K_V1')"
    ".state_dict(), 'vgg19.pth')\"\n"
    "copy vgg19.pth here and set model.vgg_weights=PATH, or turn the perceptual loss off with model.vgg_weight=0."
)


def _vgg19_layers() -> list[nn.Module]:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(True)]
            in_ch = v
    return layers


class VGG19Features(nn.Module):
    """The first 30 layers of torchvision's ``vgg19().features`` (Simonyan & Zisserman 2015),
    cut into the five slices of ``Vgg19`` in the official NVIDIA/pix2pixHD ``models/networks.py``.

    Module names are ``slice{k}.{index in features}``, as in the official class, so a torchvision
    state dict maps by renaming ``features.{i}`` (see :meth:`load_torchvision_state_dict`).
    Randomly initialised by construction; it knows nothing of files.
    """

    def __init__(self) -> None:
        super().__init__()
        layers = _vgg19_layers()[: VGG19_SLICES[-1][1]]
        for k, (start, stop) in enumerate(VGG19_SLICES, start=1):
            block = nn.Sequential()
            for i in range(start, stop):
                block.add_module(str(i), layers[i])
            setattr(self, f"slice{k}", block)

    def slices(self) -> list[nn.Sequential]:
        return [getattr(self, f"slice{k}") for k in range(1, len(VGG19_SLICES) + 1)]

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x`` [N, 3, H, W] → [relu1_1, relu2_1, relu3_1, relu4_1, relu5_1] features:
        [N, 64, H, W], [N, 128, H/2, W/2], [N, 256, H/4, W/4], [N, 512, H/8, W/8],
        [N, 512, H/16, W/16]."""
        feats = []
        for block in self.slices():
            x = block(x)
            feats.append(x)
        return feats

    def load_torchvision_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load the ``features.{i}.weight/bias`` entries of a torchvision ``vgg19`` state dict
        (classifier entries and the unused deeper layers are ignored); strict on the rest."""
        own = self.state_dict()
        renamed = {}
        for key in own:
            _, index, param = key.split(".")
            renamed[key] = f"features.{index}.{param}"
        missing = [src for src in renamed.values() if src not in state_dict]
        if missing:
            raise ValueError(
                f"not a torchvision vgg19 state_dict: missing {', '.join(missing[:4])}"
                f"{' …' if len(missing) > 4 else ''}"
            )
        self.load_state_dict({key: state_dict[src] for key, src in renamed.items()}, strict=True)


def load_vgg19_features(weights_path: str | os.PathLike[str]) -> VGG19Features:
    """A frozen, eval-mode :class:`VGG19Features` with the weights of the torchvision vgg19
    state_dict saved at the local path ``weights_path``.

    Raises ``FileNotFoundError`` saying how to obtain the file when it is not there. The file is
    read with ``torch.load(weights_only=True)``: tensors only, no pickled code.
    """
    vgg = VGG19Features()
    vgg.load_torchvision_state_dict(_read_state_dict(weights_path))
    return vgg.eval().requires_grad_(False)


def _read_state_dict(weights_path: str | os.PathLike[str]) -> Mapping[str, Tensor]:
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"VGG19 weights for the perceptual loss not found at {str(weights_path)!r}. "
            "The loss needs a torchvision vgg19 state_dict in a local file; nothing is downloaded at run time.\n"
            + VGG_WEIGHTS_HOWTO
        )
    # mmap: only the feature layers' ~80 MB are read, not the classifier's ~470 MB.
    state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path}: expected a torchvision vgg19 state_dict, got {type(state_dict).__name__}")
    return state_dict


def load_vgg19_prefix(weights_path: str | os.PathLike[str], last: int) -> nn.Sequential:
    """Frozen, eval-mode ``features[: last + 1]`` of torchvision's vgg19 with the weights of the
    state dict at ``weights_path`` (its module indices are torchvision's)."""
    features = nn.Sequential(*_vgg19_layers()[: last + 1])
    state_dict = _read_state_dict(weights_path)
    wanted = {key: f"features.{key}" for key in features.state_dict()}
    missing = [src for src in wanted.values() if src not in state_dict]
    if missing:
        raise ValueError(f"{weights_path}: not a torchvision vgg19 state_dict reaching features.{last}: missing "
                         f"{', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
    features.load_state_dict({key: state_dict[src] for key, src in wanted.items()}, strict=True)
    return features.eval().requires_grad_(False)


# torchvision's ImageNet statistics, which its VGG19 weights expect of [0, 1] images.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class VGGContentLoss(nn.Module):
    """SRGAN's VGG content loss ``l_VGG/i.j`` (Ledig et al. 2017, Eq. 5): the mean squared
    difference between the φ_i,j features (``layer``: ``relu5_4``, the paper's VGG54, or
    ``relu2_2``, VGG22) of the generated and the target image, both in [-1, 1], ImageNet-
    normalised as torchvision's VGG19 expects. ``rescale`` multiplies the features first (the
    paper's 1/12.75, which puts the loss on the scale of the pixel MSE). fp32, autocast off; the
    target's features are taken without a graph."""

    def __init__(self, weights_path: str | os.PathLike[str], layer: str = "relu5_4", rescale: float = 1 / 12.75):
        super().__init__()
        if layer not in VGG19_RELU:
            raise ValueError(f"layer must be one of {', '.join(VGG19_RELU)}, got {layer!r}")
        self.rescale = float(rescale)
        self.vgg = load_vgg19_prefix(weights_path, VGG19_RELU[layer])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> VGGContentLoss:
        super().train(mode)
        self.vgg.eval()
        return self

    def _features(self, x: Tensor) -> Tensor:
        return self.vgg(((x.float() + 1) / 2 - self.mean) / self.std) * self.rescale

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """``x`` (generated) and ``y`` (target) [N, 3, H, W] in [-1, 1] → fp32 scalar."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            with torch.no_grad():
                target = self._features(y)
            return F.mse_loss(self._features(x), target)


class VGGLoss(nn.Module):
    """pix2pixHD's perceptual loss: Wang et al. 2018, §3.3 (the VGG feature matching loss,
    ``λ Σ_i 1/M_i ||F(x)_i - F(y)_i||_1`` weighted per layer); follows ``VGGLoss`` of the official
    NVIDIA/pix2pixHD ``models/networks.py``.

    ``Σ_k layer_weights[k] * mean|F_k(x) - F_k(y).detach()|`` over the relu1_1 … relu5_1
    features of an ImageNet-trained VGG19. Like the official code, images in [-1, 1] go into VGG
    as they are, without ImageNet mean/std normalisation — curves stay comparable with the
    official ones. The official ``lambda_feat`` (10) multiplier is the caller's.

    The VGG is frozen and stays in eval mode whatever ``train()`` is called with; the loss runs
    in fp32 with autocast off. ``y``'s features are computed without a graph (the official code
    builds one and detaches it: same value and gradient, more memory).
    """

    def __init__(
        self,
        weights_path: str | os.PathLike[str],
        layer_weights: Sequence[float] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0),
    ) -> None:
        super().__init__()
        if len(layer_weights) != len(VGG19_SLICES):
            raise ValueError(f"layer_weights needs {len(VGG19_SLICES)} values, got {len(layer_weights)}")
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.vgg = load_vgg19_features(weights_path)

    def train(self, mode: bool = True) -> VGGLoss:
        super().train(mode)
        self.vgg.eval()  # a fixed feature extractor, not a trained network
        return self

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """``x`` (generated) and ``y`` (target) [N, 3, H, W] in [-1, 1] → fp32 scalar. Gradients
        reach ``x`` only."""
        if x.shape != y.shape:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_feats = self.vgg(x.float())
            with torch.no_grad():
                y_feats = self.vgg(y.float())
            terms = [w * F.l1_loss(fx, fy) for w, fx, fy in zip(self.layer_weights, x_feats, y_feats)]
        return sum(terms[1:], terms[0])


_CACHE: dict[tuple, nn.Module] = {}


def require_vgg_weights(weight: float, weights_path: str | None) -> None:
    """Before training starts: the VGG loss is on (``weight`` > 0) and its weights file is not
    there -> a one-line ``ConfigError`` saying how to get it or turn the loss off."""
    from ..config import ConfigError

    if weight > 0 and not (weights_path and Path(weights_path).is_file()):
        where = f"model.vgg_weights={weights_path}: no such file" if weights_path else "model.vgg_weights is not set"
        raise ConfigError(f"{where}; the VGG loss (model.vgg_weight={weight:g}) needs a local torchvision VGG19 state "
                          f"dict, and nothing is downloaded. " + " ".join(VGG_WEIGHTS_HOWTO.split()))


def vgg_loss(weights_path: str | None, device: torch.device) -> VGGLoss:
    """The VGG19 loss of ``weights_path`` on ``device``, loaded once per process: a frozen helper
    outside the trained networks (so outside DDP, EMA and checkpoints)."""
    return _cached(("pix2pixhd", weights_path), lambda: VGGLoss(weights_path), device)


def vgg_content_loss(weights_path: str | None, device: torch.device, layer: str, rescale: float) -> VGGContentLoss:
    """SRGAN's content loss, loaded once per process, as :func:`vgg_loss`."""
    return _cached(("content", weights_path, layer, rescale), lambda: VGGContentLoss(weights_path, layer, rescale),
                   device)


def _cached(key: tuple, make, device: torch.device):
    if not key[1]:
        raise FileNotFoundError("model.vgg_weight > 0 needs model.vgg_weights=PATH to a local torchvision VGG19 "
                                "state dict. " + VGG_WEIGHTS_HOWTO.replace("\n", " "))
    key = (*key, str(device))
    if key not in _CACHE:
        _CACHE[key] = make().to(device)
    return _CACHE[key]
