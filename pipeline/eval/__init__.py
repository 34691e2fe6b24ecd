"""Evaluation: distribution metrics (``metrics``: FID/KID through torch-fidelity, reference-feature
cache, protocol record) and paired metrics (``paired``: PSNR, SSIM, MS-SSIM, LPIPS).

Kept light: import the submodule you need; nothing here imports torch.
"""
