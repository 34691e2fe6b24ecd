"""Training: the loop, per-family step functions, EMA and checkpoints."""
