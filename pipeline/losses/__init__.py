"""Losses: adversarial objectives (``adversarial``), discriminator regularizers (``regularizers``),
pix2pixHD's feature matching (``feature_matching``) and VGG19 perceptual loss (``perceptual``).

Kept light: import the submodule you need; nothing here imports torch.
"""
