"""Evaluator entry point: ``python launch/evaluate.py --run RUN_URL [--once | --step N] ...``;
under ``accelerate launch`` several processes share the work."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

from pipeline.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
