"""gan-pipeline: sharded data, distributed GAN training and asynchronous evaluation.

Importing ``pipeline`` imports nothing heavy; subpackages load torch and friends on demand.
"""

__version__ = "0.1.0"
