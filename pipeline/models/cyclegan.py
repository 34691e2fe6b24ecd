"""CycleGAN's networks (Zhu et al. 2017, "Unpaired Image-to-Image Translation using
Cycle-Consistent Adversarial Networks"; official junyanz/pytorch-CycleGAN-and-pix2pix
``models/networks.py``). Its discriminator is pix2pix's 70×70 PatchGAN on one image
(``models.pix2pix.NLayerDiscriminator`` with ``input_nc=3``).
"""

from __future__ import annotations

from pipeline.models.pix2pixhd import GlobalGenerator


def resnet_generator(*, input_nc: int = 3, output_nc: int = 3, ngf: int = 64, n_blocks: int = 9) -> GlobalGenerator:
    """CycleGAN's ResNet generator (the paper's appendix 7.2, after Johnson et al. 2016): c7s1-64,
    d128, d256, ``n_blocks`` residual blocks R256 (9 at 256×256, 6 at 128×128), u128, u64, c7s1-3
    with Tanh; reflection padding, instance norm without affine parameters, every conv with a bias
    (the official ``ResnetGenerator`` with ``norm=instance``, ``no_dropout``, ``padding_type=reflect``,
    initialised N(0, 0.02)).

    That is, layer for layer and in the same order (so with the same checkpoint keys),
    pix2pixHD's global generator with two downsamplings, which grew out of it: one implementation
    serves both. ``[N, input_nc, H, W]`` → ``[N, output_nc, H, W]`` in [-1, 1], H and W multiples of 4.
    """
    return GlobalGenerator(input_nc, output_nc=output_nc, ngf=ngf, n_downsample=2, n_blocks=n_blocks, norm="instance")
