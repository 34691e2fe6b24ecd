#!/usr/bin/env bash
# Create .venv (if missing) and install gan-pipeline with its test extras into it.
# torch/torchvision are pinned in pyproject.toml; pip takes them from the local wheel cache
# when the machine has one (PIP_FIND_LINKS / pip.conf), otherwise from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
