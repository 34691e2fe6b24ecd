#!/usr/bin/env bash
# The README's first command: set up, then run the main job on the embedded demo data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
PY=.venv/bin/python
echo "== sharding the embedded demo dataset into shards/demo"
$PY launch/shard.py write demo --out shards/demo --samples-per-shard 64 --workers 2
$PY launch/shard.py verify shards/demo
$PY launch/shard.py inspect shards/demo --samples 6 --sheet shards/demo/contact-sheet.png
echo "== streaming the demo shards (2 ranks x 2 workers, evaluation and training mode)"
$PY launch/stream_check.py --url shards/demo --world-size 2 --workers 2
