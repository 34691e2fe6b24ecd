"""Training entry point: ``accelerate launch launch/train.py --config NAME [key=value ...]``.

The config is resolved and checked before any process group starts; a bad key, type or value
is one line naming the key and what is allowed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

from pipeline.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
