"""Entry point of the sharding CLI: ``python launch/shard.py write|verify|inspect ...``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

from pipeline.data.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
