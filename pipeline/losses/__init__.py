"""Losses: adversarial objectives (``adversarial``) and discriminator regularizers (``regularizers``).

Kept light: import the submodule you need; nothing here imports torch.
"""
