#!/usr/bin/env bash
# Container entry point: `train|evaluate|shard ARGS...`.
#   train    -> accelerate launch launch/train.py ARGS   (accelerate flags may precede --config)
#   evaluate -> python launch/evaluate.py ARGS
#   shard    -> python launch/shard.py ARGS
set -euo pipefail
APP=/opt/gan-pipeline
cmd=${1:-help}
shift || true
case "$cmd" in
  train)    exec accelerate launch "$APP/launch/train.py" "$@" ;;
  evaluate) exec python "$APP/launch/evaluate.py" "$@" ;;
  shard)    exec python "$APP/launch/shard.py" "$@" ;;
  *)        echo "usage: docker run IMAGE train|evaluate|shard ARGS..." >&2; exit 2 ;;
esac
