"""pix2pixHD networks (Wang et al. 2018): the global generator, the local enhancer, the multiscale
discriminator and the instance-wise feature encoder with its k-means export, as in the official
NVIDIA/pix2pixHD ``models/networks.py``, ``models/pix2pixHD_model.py`` and ``encode_features.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from pipeline.models.layers import check_norm, init_weights, norm_layer, spectral_norm

# Official `weights_init`: conv weights N(0, 0.02), batch-norm weights N(1, 0.02).
_INIT_GAIN = 0.02


def _check_divisible(x: Tensor, factor: int, name: str) -> None:
    # Stride-2 convs round up and transposed convs exactly double, so any other size comes back
    # at a different size than it went in (or, in the local enhancer, fails to add up).
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(f"{name} needs H and W divisible by {factor}, got {tuple(x.shape[-2:])}")


class ResnetBlock(nn.Module):
    """The residual block of pix2pixHD's generators (official ``ResnetBlock`` with
    ``padding_type="reflect"``, no dropout): ``x + [pad, conv3×3, norm, ReLU, pad, conv3×3, norm](x)``.
    No activation after the addition. ``[N, dim, H, W]`` → same shape.
    """

    def __init__(self, dim: int, *, norm: str = "instance") -> None:
        super().__init__()
        # Same module indices as the official `conv_block`, so official checkpoint keys match.
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3),
            norm_layer(norm, dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3),
            norm_layer(norm, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)


def _stem_and_downsampling(input_nc: int, ngf: int, n_downsample: int, norm: str) -> list[nn.Module]:
    """The 7×7 stem and the stride-2 3×3 downsampling convs shared by the generator and encoder."""
    layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7), norm_layer(norm, ngf), nn.ReLU(True)]
    for i in range(n_downsample):
        width = ngf * 2**i
        layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), norm_layer(norm, 2 * width), nn.ReLU(True)]
    return layers


def _upsampling(ngf: int, n_upsample: int, norm: str) -> list[nn.Module]:
    """``n_upsample`` 3×3 stride-2 transposed convs halving the width from ``ngf * 2**n_upsample``."""
    layers: list[nn.Module] = []
    for i in range(n_upsample):
        width = ngf * 2 ** (n_upsample - i)
        layers += [
            nn.ConvTranspose2d(width, width // 2, 3, stride=2, padding=1, output_padding=1),
            norm_layer(norm, width // 2),
            nn.ReLU(True),
        ]
    return layers


def _output_layers(ngf: int, output_nc: int) -> list[nn.Module]:
    return [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]


class GlobalGenerator(nn.Module):
    """pix2pixHD's global generator G1: Wang et al. 2018, "High-Resolution Image Synthesis and
    Semantic Manipulation with Conditional GANs", §3.2 "Coarse-to-fine generator"; follows
    ``GlobalGenerator`` of the official ``models/networks.py``.

    c7s1-ngf (reflection-padded 7×7 conv, norm, ReLU), ``n_downsample`` stride-2 3×3 convs
    doubling the width, ``n_blocks`` residual blocks at ``ngf * 2**n_downsample`` channels,
    ``n_downsample`` stride-2 3×3 transposed convs (padding 1, output_padding 1), and a
    reflection-padded 7×7 conv to ``output_nc`` with Tanh. The defaults are the official
    ``--netG global`` training options (``n_downsample_global=4``; the class itself defaults to
    3). Every conv keeps its bias, as in the official code, so parameter counts match it.

    ``output_layer=False`` drops the final pad/conv/Tanh: that is the global part of a
    :class:`LocalEnhancer`, whose ``forward`` then returns ``[N, ngf, H, W]`` features. Module
    indices are the official ones, so official checkpoints load with their keys unchanged.
    """

    def __init__(
        self,
        input_nc: int,
        *,
        output_nc: int = 3,
        ngf: int = 64,
        n_downsample: int = 4,
        n_blocks: int = 9,
        norm: str = "instance",
        output_layer: bool = True,
    ) -> None:
        super().__init__()
        if n_downsample < 0 or n_blocks < 0:
            raise ValueError(f"n_downsample and n_blocks must be >= 0, got {n_downsample} and {n_blocks}")
        check_norm(norm)
        self.n_downsample = n_downsample
        layers = _stem_and_downsampling(input_nc, ngf, n_downsample, norm)
        layers += [ResnetBlock(ngf * 2**n_downsample, norm=norm) for _ in range(n_blocks)]
        layers += _upsampling(ngf, n_downsample, norm)
        if output_layer:
            layers += _output_layers(ngf, output_nc)
        self.model = nn.Sequential(*layers)
        init_weights(self, "normal", _INIT_GAIN)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [N, input_nc, H, W], H and W multiples of ``2**n_downsample`` → [N, output_nc,
        H, W] in [-1, 1] (with ``output_layer=False``: features [N, ngf, H, W])."""
        _check_divisible(x, 2**self.n_downsample, f"GlobalGenerator with n_downsample={self.n_downsample}")
        return self.model(x)


class LocalEnhancerBranch(nn.Module):
    """One local enhancer G2 of pix2pixHD (official ``model{n}_1`` and ``model{n}_2``):
    ``down`` = c7s1-ngf + one stride-2 3×3 conv to ``2 * ngf`` on this branch's input;
    ``up`` = residual blocks + one stride-2 transposed conv back to ``ngf`` (+ the output layer on
    the finest branch), applied to the sum of ``down``'s output and the coarser level's features.
    """

    def __init__(self, input_nc: int, *, output_nc: int, ngf: int, n_blocks: int, norm: str, output_layer: bool):
        super().__init__()
        self.down = nn.Sequential(*_stem_and_downsampling(input_nc, ngf, 1, norm))
        up = [ResnetBlock(2 * ngf, norm=norm) for _ in range(n_blocks)] + _upsampling(ngf, 1, norm)
        if output_layer:
            up += _output_layers(ngf, output_nc)
        self.up = nn.Sequential(*up)

    def forward(self, x: Tensor, coarse: Tensor) -> Tensor:
        """``x`` [N, input_nc, H, W], ``coarse`` [N, 2 * ngf, H/2, W/2] → [N, ngf, H, W] (the
        finest branch: [N, output_nc, H, W] in [-1, 1])."""
        return self.up(self.down(x) + coarse)


class LocalEnhancer(nn.Module):
    """pix2pixHD's coarse-to-fine generator G = {G1, G2}: Wang et al. 2018, §3.2 "Coarse-to-fine
    generator"; follows ``LocalEnhancer`` of the official ``models/networks.py``.

    The input pyramid is built with ``AvgPool2d(3, stride=2, padding=1, count_include_pad=False)``.
    ``global_generator`` — a :class:`GlobalGenerator` of width ``ngf * 2**n_local_enhancers``
    without its output layer — runs on the coarsest level; ``enhancers[0]`` (coarsest, official
    ``model1_*``) to ``enhancers[-1]`` (full resolution, official ``model{n_local_enhancers}_*``,
    width ``ngf``) each add their downsampled input features to the coarser level's output.
    Only the last branch has the output layer.

    Official checkpoint keys map as ``model.`` → ``global_generator.model.``, ``model{n}_1.`` →
    ``enhancers.{n-1}.down.`` and ``model{n}_2.`` → ``enhancers.{n-1}.up.``.
    """

    def __init__(
        self,
        input_nc: int,
        *,
        output_nc: int = 3,
        ngf: int = 32,
        n_downsample_global: int = 3,
        n_blocks_global: int = 9,
        n_local_enhancers: int = 1,
        n_blocks_local: int = 3,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if n_local_enhancers < 1:
            raise ValueError(f"n_local_enhancers must be >= 1, got {n_local_enhancers}")
        check_norm(norm)
        self.n_local_enhancers = n_local_enhancers
        self.ngf_global = ngf * 2**n_local_enhancers
        self.global_generator = GlobalGenerator(
            input_nc,
            output_nc=output_nc,
            ngf=self.ngf_global,
            n_downsample=n_downsample_global,
            n_blocks=n_blocks_global,
            norm=norm,
            output_layer=False,
        )
        self.enhancers = nn.ModuleList(
            LocalEnhancerBranch(
                input_nc,
                output_nc=output_nc,
                ngf=ngf * 2 ** (n_local_enhancers - n),
                n_blocks=n_blocks_local,
                norm=norm,
                output_layer=n == n_local_enhancers,
            )
            for n in range(1, n_local_enhancers + 1)
        )
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        init_weights(self, "normal", _INIT_GAIN)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [N, input_nc, H, W], H and W multiples of ``2**(n_downsample_global +
        n_local_enhancers)`` → [N, output_nc, H, W] in [-1, 1]."""
        factor = 2 ** (self.global_generator.n_downsample + self.n_local_enhancers)
        _check_divisible(x, factor, f"LocalEnhancer with n_local_enhancers={self.n_local_enhancers}")
        pyramid = [x]
        for _ in range(self.n_local_enhancers):
            pyramid.append(self.downsample(pyramid[-1]))
        h = self.global_generator(pyramid[-1])
        # enhancers[0] is the coarsest branch and sees pyramid[-2]; the last sees x itself.
        for branch, level in zip(self.enhancers, reversed(pyramid[:-1])):
            h = branch(level, h)
        return h

    def load_global(self, state_dict: Mapping[str, Tensor]) -> None:
        """Copy a trained standalone :class:`GlobalGenerator`'s weights into ``global_generator``.

        The state dict must be that of a ``GlobalGenerator`` with ``ngf = ngf * 2**n_local_enhancers``
        and the same ``n_downsample``/``n_blocks``/``norm``: every key of the shared part must be
        present with the same shape; the only keys allowed beyond it are the output conv's, which
        the local enhancer does not have. Anything else raises ``ValueError`` before any weight is
        copied.
        """
        own = self.global_generator.state_dict()
        # The output layers follow the shared ones: ReflectionPad2d at len(model), the conv after it.
        out_conv = f"model.{len(self.global_generator.model) + 1}."
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own and not k.startswith(out_conv)]
        mismatched = [
            f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
            for k, v in own.items()
            if k in state_dict and state_dict[k].shape != v.shape
        ]
        if missing or unexpected or mismatched:
            raise ValueError(
                "state dict is not a GlobalGenerator compatible with this LocalEnhancer "
                f"(ngf={self.ngf_global}, n_downsample={self.global_generator.n_downsample}); "
                f"missing keys: {missing[:5]}, unexpected keys: {unexpected[:5]}, shape mismatches: {mismatched[:5]}"
            )
        self.global_generator.load_state_dict({k: state_dict[k] for k in own}, strict=True)

    def global_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the official ``--niter_fix_global`` keeps fixed: everything outside
        the finest enhancer branch, i.e. the global generator and (with ``n_local_enhancers > 1``)
        the coarser branches, which come pretrained from the previous stage."""
        yield from self.global_generator.parameters()
        for branch in self.enhancers[:-1]:
            yield from branch.parameters()

    def local_parameters(self) -> Iterator[nn.Parameter]:
        """The finest enhancer branch's parameters: all that trains while the rest is fixed."""
        yield from self.enhancers[-1].parameters()


class NLayerDiscriminatorHD(nn.Module):
    """One scale of pix2pixHD's discriminator: the PatchGAN variant of ``NLayerDiscriminator`` in
    the official pix2pixHD ``models/networks.py`` with ``getIntermFeat=True``.

    Differs from pix2pix's PatchGAN in padding (``ceil((4 - 1) / 2) = 2`` instead of 1) and in
    keeping every conv's bias. ``layers[0]``: 4×4 stride-2 conv + LeakyReLU(0.2);
    ``layers[1 .. n_layers-1]``: stride-2 conv + norm + LeakyReLU; ``layers[n_layers]``: stride-1
    conv + norm + LeakyReLU; ``layers[n_layers+1]``: stride-1 conv to one channel. Widths double
    from ``ndf`` and are capped at 512. No sigmoid: the losses take logits.

    SPADE's ``NLayerDiscriminator`` (NVlabs/SPADE ``models/networks/discriminator.py``) is the
    same stack, counted differently (its ``n_layers_D=4`` is ``n_layers=3`` here), with
    ``spectral=True`` (spectral norm on the normalised convs), ``norm_bias=False`` (those convs
    lose their bias, as its ``get_nonspade_norm_layer`` removes it) and Xavier ``init``.
    """

    def __init__(self, input_nc: int, *, ndf: int = 64, n_layers: int = 3, norm: str = "instance",
                 spectral: bool = False, norm_bias: bool = True, init: str = "normal") -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        check_norm(norm)
        kw, padw = 4, 2
        layers = [nn.Sequential(nn.Conv2d(input_nc, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True))]
        normed = []
        nf = ndf
        for n in range(1, n_layers + 1):
            nf_prev, nf = nf, min(nf * 2, 512)
            stride = 2 if n < n_layers else 1
            conv = nn.Conv2d(nf_prev, nf, kw, stride=stride, padding=padw, bias=norm_bias or norm == "none")
            normed.append(conv)
            layers.append(nn.Sequential(conv, norm_layer(norm, nf), nn.LeakyReLU(0.2, True)))
        layers.append(nn.Sequential(nn.Conv2d(nf, 1, kw, stride=1, padding=padw)))
        self.layers = nn.ModuleList(layers)
        init_weights(self, init, _INIT_GAIN)
        if spectral:
            for conv in normed:
                spectral_norm(conv)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x`` [N, input_nc, H, W] → the ``n_layers + 2`` layer outputs, logits [N, 1, H', W'] last."""
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiscaleDiscriminator(nn.Module):
    """pix2pixHD's multiscale discriminators D1..Dk: Wang et al. 2018, §3.2 "Multi-scale
    discriminators"; follows ``MultiscaleDiscriminator`` of the official ``models/networks.py``.

    ``num_D`` identical :class:`NLayerDiscriminatorHD` see the input at full resolution and
    downsampled ``1 .. num_D-1`` times by ``AvgPool2d(3, stride=2, padding=1,
    count_include_pad=False)``. ``num_D=2`` is the official train option's default (its 512p
    runs); the paper's 3 is what the official 1024p script passes.

    The output is ordered finest first, like the official ``forward``: ``out[0]`` is the
    full-resolution D. ``scales[i]`` sees the input downsampled ``i`` times; the official module
    that does so is ``scale{num_D-1-i}_layer*`` (the official code runs its scales in reverse
    order), so official keys map as ``scale{num_D-1-i}_layer{j}.`` → ``scales.{i}.layers.{j}.``.
    ``scale_options`` go to every scale (SPADE's variant, see :class:`NLayerDiscriminatorHD`).
    """

    def __init__(
        self,
        input_nc: int,
        *,
        ndf: int = 64,
        n_layers: int = 3,
        num_D: int = 2,
        norm: str = "instance",
        get_intermediate_features: bool = True,
        **scale_options,
    ) -> None:
        super().__init__()
        if num_D < 1:
            raise ValueError(f"num_D must be >= 1, got {num_D}")
        self.num_D = num_D
        self.n_layers = n_layers
        self.get_intermediate_features = get_intermediate_features
        self.scales = nn.ModuleList(
            NLayerDiscriminatorHD(input_nc, ndf=ndf, n_layers=n_layers, norm=norm, **scale_options)
            for _ in range(num_D)
        )
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    def forward(self, x: Tensor) -> list[list[Tensor]]:
        """``x`` [N, input_nc, H, W] → one list per scale, finest first. Each holds the
        ``n_layers + 2`` layer outputs (the last being logits [N, 1, H', W']), or only
        ``[logits]`` with ``get_intermediate_features=False``."""
        out = []
        for i, scale in enumerate(self.scales):
            if i > 0:
                x = self.downsample(x)
            feats = scale(x)
            out.append(feats if self.get_intermediate_features else feats[-1:])
        return out


class Encoder(nn.Module):
    """pix2pixHD's instance-level feature encoder E: Wang et al. 2018, §3.4 "Instance-level
    feature embedding"; follows ``Encoder`` of the official ``models/networks.py``.

    An encoder-decoder (c7s1-ngf, ``n_downsampling`` stride-2 convs, as many transposed convs,
    c7s1-``output_nc`` with Tanh; no residual blocks) whose output is averaged within each
    instance of each image, so every object gets one ``output_nc``-dim feature (``feat_num`` in
    the official options; ``ngf`` is their ``nef``). The pooling is vectorised over pixels and
    instances, where the official code loops over instance ids, images and channels.
    """

    def __init__(
        self, *, input_nc: int = 3, output_nc: int = 3, ngf: int = 16, n_downsampling: int = 4, norm: str = "instance"
    ) -> None:
        super().__init__()
        check_norm(norm)
        self.n_downsampling = n_downsampling
        layers = _stem_and_downsampling(input_nc, ngf, n_downsampling, norm)
        layers += _upsampling(ngf, n_downsampling, norm) + _output_layers(ngf, output_nc)
        self.model = nn.Sequential(*layers)
        init_weights(self, "normal", _INIT_GAIN)

    def forward(self, image: Tensor, inst: Tensor) -> Tensor:
        """``image`` [N, input_nc, H, W] (H, W multiples of ``2**n_downsampling``), ``inst``
        [N, 1, H, W] instance ids (any integer or integral float dtype) → [N, output_nc, H, W],
        constant within each instance of each image."""
        _check_divisible(image, 2**self.n_downsampling, f"Encoder with n_downsampling={self.n_downsampling}")
        return instance_average(self.model(image), inst)


def _segments(inst: Tensor) -> tuple[Tensor, Tensor, int]:
    """Number the (image, instance id) pairs of ``inst`` [N, 1, H, W]: returns ``seg`` [N, H*W]
    (pixel → segment index ``n * U + u``), ``ids`` [U] (the sorted distinct ids) and ``U``."""
    if inst.dim() != 4 or inst.shape[1] != 1:
        raise ValueError(f"inst must be [N, 1, H, W], got {tuple(inst.shape)}")
    n = inst.shape[0]
    ids, inverse = torch.unique(inst.reshape(n, -1).long(), return_inverse=True)
    num_ids = ids.numel()
    seg = inverse + torch.arange(n, device=inst.device).unsqueeze(1) * num_ids
    return seg, ids, num_ids


def _segment_means(features: Tensor, seg: Tensor, num_segments: int) -> tuple[Tensor, Tensor]:
    """Per-segment means [S, C] (fp32) and pixel counts [S] of ``features`` [N, C, H, W]."""
    c = features.shape[1]
    flat = features.float().movedim(1, -1).reshape(-1, c)
    idx = seg.reshape(-1)
    sums = flat.new_zeros(num_segments, c).index_add(0, idx, flat)
    counts = torch.bincount(idx, minlength=num_segments)
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def instance_average(features: Tensor, inst: Tensor) -> Tensor:
    """Replace every pixel of ``features`` [N, C, H, W] by the mean over its instance (same id in
    ``inst`` [N, 1, H, W], same image) → [N, C, H, W]. Differentiable; sums in fp32."""
    if inst.shape[0] != features.shape[0] or inst.shape[-2:] != features.shape[-2:]:
        raise ValueError(f"inst {tuple(inst.shape)} does not match features {tuple(features.shape)}")
    seg, _, num_ids = _segments(inst)
    means, _ = _segment_means(features, seg, features.shape[0] * num_ids)
    n, c, h, w = features.shape
    return means[seg.reshape(-1)].reshape(n, h, w, c).movedim(-1, 1).to(features.dtype)


def collect_instance_features(
    features: Tensor, inst: Tensor, *, block_num: int = 32, min_area: float = 0.5
) -> dict[int, Tensor]:
    """The per-instance features the official ``encode_features`` extracts, grouped by class.

    ``features`` [N, C, H, W] (the :class:`Encoder` output), ``inst`` [N, 1, H, W] instance ids →
    ``{class: [M, C] fp32}``, one row per instance of that class over the batch. Classes follow
    the Cityscapes convention of the official code: id ``i < 1000`` is class ``i``, otherwise
    ``i // 1000``. Like ``encode_features.py``, only instances whose pixel count exceeds
    ``min_area * (H * W // block_num)`` (more than 1/64 of the image by default) are kept.
    """
    seg, ids, num_ids = _segments(inst)
    means, counts = _segment_means(features.detach(), seg, features.shape[0] * num_ids)
    h, w = inst.shape[-2:]
    area = counts.double() / (h * w // block_num)
    seg_ids = ids.repeat(features.shape[0])
    classes = torch.where(seg_ids < 1000, seg_ids, seg_ids // 1000)
    keep = (counts > 0) & (area > min_area)
    out: dict[int, Tensor] = {}
    for label in classes[keep].unique().tolist():
        out[int(label)] = means[keep & (classes == label)]
    return out


def cluster_features(
    features_per_class: Mapping[int, Tensor],
    n_clusters: int = 10,
    *,
    seed: int = 0,
    n_init: int = 10,
    max_iter: int = 300,
) -> dict[int, Tensor]:
    """k-means cluster centres per class, the official ``encode_features.py`` clustering step.

    ``features_per_class``: ``{class: [M, C]}`` (e.g. :func:`collect_instance_features` gathered
    over the training set) → ``{class: [min(M, n_clusters), C] fp32}``; classes with no rows are
    left out, as the official script leaves them out. At test time a centre per instance is
    drawn at random from its class. k-means++ init, Lloyd iterations, best of ``n_init`` runs by
    inertia (scikit-learn's ``KMeans`` defaults of the official code's time), seeded.
    """
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    gen = torch.Generator().manual_seed(seed)
    centres: dict[int, Tensor] = {}
    for label in sorted(features_per_class):
        x = features_per_class[label].detach().to("cpu", torch.float64)
        if x.dim() != 2:
            raise ValueError(f"class {label}: features must be [M, C], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            continue
        k = min(x.shape[0], n_clusters)
        runs = [_kmeans(x, k, gen, max_iter) for _ in range(n_init)]
        centres[label] = min(runs, key=lambda run: run[1])[0].float()
    return centres


def _kmeans(x: Tensor, k: int, gen: torch.Generator, max_iter: int) -> tuple[Tensor, float]:
    """One k-means run on ``x`` [M, C]: returns (centres [k, C], inertia)."""
    # scikit-learn's stopping rule: centre shift below 1e-4 of the mean feature variance.
    tol = 1e-4 * float(x.var(dim=0, unbiased=False).mean())
    centres = _kmeans_plus_plus(x, k, gen)
    for _ in range(max_iter):
        dist = torch.cdist(x, centres).square()
        assign = dist.argmin(dim=1)
        counts = torch.bincount(assign, minlength=k)
        new = x.new_zeros(k, x.shape[1]).index_add(0, assign, x) / counts.clamp_min(1).unsqueeze(1)
        empty = counts == 0
        if empty.any():
            # An empty cluster takes the points farthest from their centres, as scikit-learn does.
            far = dist.gather(1, assign.unsqueeze(1)).squeeze(1).topk(int(empty.sum())).indices
            new[empty] = x[far]
        shift = float((new - centres).square().sum())
        centres = new
        if shift <= tol:
            break
    inertia = float(torch.cdist(x, centres).square().min(dim=1).values.sum())
    return centres, inertia


def _kmeans_plus_plus(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    idx = [int(torch.randint(x.shape[0], (1,), generator=gen))]
    closest = (x - x[idx[0]]).square().sum(dim=1)
    for _ in range(1, k):
        # All points on a centre already (duplicates): any point is as good as any other.
        weights = closest if float(closest.sum()) > 0 else torch.ones_like(closest)
        nxt = int(torch.multinomial(weights, 1, generator=gen))
        idx.append(nxt)
        closest = torch.minimum(closest, (x - x[nxt]).square().sum(dim=1))
    return x[idx].clone()
