#!/usr/bin/env bash
# Container entry point: `train|evaluate|shard|generate ARGS...`.
#   train    -> accelerate launch --config_file $ACCEL_CONFIG --num_processes N launch/train.py ARGS
#               N: NPROC, else one process per GPU the container sees. With no GPU visible it stops
#               (a GPU image run without `--gpus` would otherwise train on the CPU unnoticed),
#               unless DEVICE=cpu asks for the CPU (NPROC processes, default 2, with gloo).
#               ACCEL_CONFIG defaults to multi_gpu.yaml (cpu_2proc.yaml with DEVICE=cpu); a
#               multi-node file of your own takes NPROC as the total over all machines.
#   evaluate -> python launch/evaluate.py ARGS
#   shard    -> python launch/shard.py ARGS
#   generate -> python launch/generate.py ARGS
set -euo pipefail
APP=${APP:-/opt/gan-pipeline}
PY=${PYTHON:-python}
cmd=${1:-help}
shift || true

train() {
  local gpus config nproc
  gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  case "${DEVICE:-gpu}" in
    cpu)
      config=${ACCEL_CONFIG:-$APP/launch/accelerate/cpu_2proc.yaml}
      nproc=${NPROC:-2}
      export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;;
    gpu)
      if [ "$gpus" -eq 0 ]; then
        echo "gan-pipeline: no GPU is visible in the container: run it with --gpus all (NVIDIA container toolkit), or set -e DEVICE=cpu to train on the CPU" >&2
        exit 2
      fi
      config=${ACCEL_CONFIG:-$APP/launch/accelerate/multi_gpu.yaml}
      nproc=${NPROC:-$gpus} ;;
    *)
      echo "gan-pipeline: DEVICE=${DEVICE} is not one of: gpu (the default), cpu" >&2
      exit 2 ;;
  esac
  echo "gan-pipeline: $nproc training processes (${DEVICE:-gpu}; $gpus GPUs visible), $config" >&2
  exec "$PY" -m accelerate.commands.launch --config_file "$config" --num_processes "$nproc" \
    "$APP/launch/train.py" "$@"
}

case "$cmd" in
  train)    train "$@" ;;
  evaluate) exec "$PY" "$APP/launch/evaluate.py" "$@" ;;
  shard)    exec "$PY" "$APP/launch/shard.py" "$@" ;;
  generate) exec "$PY" "$APP/launch/generate.py" "$@" ;;
  *)        echo "usage: docker run IMAGE train|evaluate|shard|generate ARGS..." >&2; exit 2 ;;
esac
