"""Generation entry point: ``python launch/generate.py --run RUN_URL --out DIR [--seeds 0-15 |
--split val | --dump-eval] ...`` (also installed as ``gan-generate``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

from pipeline.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
