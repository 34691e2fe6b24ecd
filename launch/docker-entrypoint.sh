#!/usr/bin/env bash
# Container entry point: `train|evaluate|shard ARGS...`.
#   train    -> accelerate launch --config_file $ACCEL_CONFIG launch/train.py ARGS
#               (ACCEL_CONFIG defaults to the image's launch/accelerate/multi_gpu.yaml)
#   evaluate -> python launch/evaluate.py ARGS
#   shard    -> python launch/shard.py ARGS
set -euo pipefail
APP=/opt/gan-pipeline
cmd=${1:-help}
shift || true
case "$cmd" in
  train)    exec accelerate launch --config_file "${ACCEL_CONFIG:-$APP/launch/accelerate/multi_gpu.yaml}" \
              "$APP/launch/train.py" "$@" ;;
  evaluate) exec python "$APP/launch/evaluate.py" "$@" ;;
  shard)    exec python "$APP/launch/shard.py" "$@" ;;
  *)        echo "usage: docker run IMAGE train|evaluate|shard ARGS..." >&2; exit 2 ;;
esac
