#!/usr/bin/env bash
# Create .venv (if missing) and install gan-pipeline into it: with its test extras, S3 support and
# DeepSpeed (the default, for the test suite), or with `setup.sh demo` only what the demo runs.
# Exact versions from constraints.txt (torch/torchvision included); pip takes those from the local wheel cache
# when the machine has one (PIP_FIND_LINKS / pip.conf), otherwise from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = demo ]; then
  .venv/bin/python -m pip install --quiet -c constraints.txt -e .
  exit 0
fi
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
# DeepSpeed is a source package whose build imports torch: built against the torch installed
# above (no isolated build environment, which would fetch a torch of its own), at the pinned version.
.venv/bin/python -m pip install --quiet --no-build-isolation -c constraints.txt deepspeed
