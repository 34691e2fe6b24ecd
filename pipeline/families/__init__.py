"""The GAN families, by ``model.family``: one module each (its config section, networks,
optimizers, phases, streams, preparation, evaluation and grid), declared against the contract in
``pipeline/train/family.py``. Registering a family is one entry here plus its module."""

from __future__ import annotations

from ..train.family import Family
from . import aae, bicyclegan, cyclegan, dcgan, pix2pix, pix2pixhd, progan, spade, srgan, stylegan2

FAMILIES: dict[str, Family] = {f.name: f for f in (pix2pix.FAMILY, pix2pixhd.FAMILY, dcgan.FAMILY, cyclegan.FAMILY,
                                                spade.FAMILY, stylegan2.FAMILY, srgan.SRRESNET, srgan.SRGAN,
                                                aae.FAMILY, bicyclegan.FAMILY, progan.FAMILY)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown model.family {name!r}; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]
