#!/usr/bin/env bash
# The README's first command: set up, shard the embedded demo data, train pix2pix_demo on
# 2 processes (CPU with gloo, or the machine's GPUs), and say where the TensorBoard logs are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
PY=.venv/bin/python
echo "== 1/3 sharding the embedded demo dataset into shards/demo"
$PY launch/shard.py write demo --out shards/demo --samples-per-shard 64 --workers 2
$PY launch/shard.py verify shards/demo
$PY launch/shard.py inspect shards/demo --samples 6 --sheet shards/demo/contact-sheet.png
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  ACCEL=launch/accelerate/multi_gpu.yaml
  NPROC=$($PY -c "import torch; print(torch.cuda.device_count())")
else
  ACCEL=launch/accelerate/cpu_2proc.yaml
  NPROC=2
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
echo "== 2/3 training pix2pix_demo on $NPROC processes (run directory runs/pix2pix_demo)"
.venv/bin/accelerate launch --config_file "$ACCEL" --num_processes "$NPROC" \
  launch/train.py --config pix2pix_demo "$@"
echo "== 3/3 done"
echo "TensorBoard: .venv/bin/tensorboard --logdir runs/pix2pix_demo --host 127.0.0.1"
echo "checkpoints: runs/pix2pix_demo/checkpoints, snapshots (G_ema): runs/pix2pix_demo/snapshots"
