#!/usr/bin/env bash
# The README's first command: set up, shard the embedded demo data, train pix2pixhd_demo on
# 2 processes (CPU with gloo, or the machine's GPUs) with an evaluation sidecar computing
# FID/KID and paired metrics from each snapshot, and say where everything is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh demo
PY=.venv/bin/python
RUN=runs/pix2pixhd_demo
# Data loading: keep freed memory mapped rather than fault it in again per sample (docs/data.md).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728}
echo "== 1/4 sharding the embedded demo dataset into shards/demo"
$PY launch/shard.py write demo --out shards/demo --samples-per-shard 64 --workers 2
$PY launch/shard.py verify shards/demo
$PY launch/shard.py inspect shards/demo --samples 6 --sheet shards/demo/contact-sheet.png

echo "== 2/4 InceptionV3 weights for FID/KID"
INCEPTION=${INCEPTION_WEIGHTS:-weights/weights-inception-2015-12-05-6726825d.pth}
if [ ! -f "$INCEPTION" ]; then
  # Nothing is downloaded at run time. Without the real file (see README), the demo uses an
  # untrained, seeded stand-in, made afresh (a few seconds) so that it carries the stand-in mark:
  # its FIDs are logged as Metrics_standin/* and starred in the summary.
  INCEPTION=weights/inception-standin-seed0.pth
  $PY launch/evaluate.py --make-standin-inception "$INCEPTION"
  echo "using the UNTRAINED stand-in $INCEPTION (set INCEPTION_WEIGHTS=PATH for real FIDs)"
fi

if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  ACCEL=launch/accelerate/multi_gpu.yaml
  NPROC=$($PY -c "import torch; print(torch.cuda.device_count())")
else
  ACCEL=launch/accelerate/cpu_2proc.yaml
  NPROC=2
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
echo "== 3/4 training pix2pixhd_demo on $NPROC processes, evaluation sidecar alongside ($RUN)"
.venv/bin/accelerate launch --config_file "$ACCEL" --num_processes "$NPROC" \
  launch/train.py --config pix2pixhd_demo eval.sidecar=true "eval.inception_weights=$INCEPTION" "$@"

echo "== 4/4 waiting for the evaluator to finish the last snapshot ($RUN/eval/sidecar.log)"
for _ in $(seq 1 600); do
  [ -f "$RUN/eval/FINISHED.json" ] && break
  sleep 2
done
echo
$PY -m pipeline.eval.summary "$RUN" --note "FID/KID extractor weights: $INCEPTION" --plot "$RUN/eval/metrics.png"
echo
echo "TensorBoard (losses, image grids, metrics): .venv/bin/tensorboard --logdir $RUN --host 127.0.0.1"
echo "checkpoints: $RUN/checkpoints   snapshots (G_ema, G): $RUN/snapshots   evaluation: $RUN/eval"
