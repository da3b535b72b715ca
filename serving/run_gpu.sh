#!/usr/bin/env bash
# Launches the official TF Serving GPU image on exported models.
#
#   bash serving/run_gpu.sh /srv/models [extra flags]   # /srv/models/ifa/<version>/, ...
#
# Batching stays off; to try it (README "Batching"), add
#   --enable_batching=true --batching_parameters_file=/config/batching_parameters.txt
#
# Needs Docker with the NVIDIA Container Toolkit. Serve with a TF Serving at least as new as
# the TensorFlow that exported (recorded in <version>/assets.extra/ifa_export_metadata.json).
# Ports: 8500 gRPC, 8501 REST and Prometheus metrics.
set -euo pipefail
MODELS_DIR=$(realpath "${1:?usage: run_gpu.sh MODELS_DIR [extra tensorflow_model_server flags]}")
shift
TF_SERVING_VERSION=${TF_SERVING_VERSION:-2.21.0}
KIT=$(cd "$(dirname "$0")" && pwd)
# A models.config inside MODELS_DIR wins over the kit's (whose base paths are /models/<name>).
MODEL_CONFIG=/config/models.config
[[ -f "$MODELS_DIR/models.config" ]] && MODEL_CONFIG=/models/models.config

exec docker run --rm --gpus all \
  -p 8500:8500 -p 8501:8501 \
  -v "$MODELS_DIR:/models:ro" \
  -v "$KIT:/config:ro" \
  "tensorflow/serving:${TF_SERVING_VERSION}-gpu" \
  --port=8500 \
  --rest_api_port=8501 \
  --model_config_file="$MODEL_CONFIG" \
  --model_config_file_poll_wait_seconds=60 \
  --file_system_poll_wait_seconds=30 \
  --monitoring_config_file=/config/monitoring.config \
  --enable_model_warmup=true \
  --enable_batching=false \
  --per_process_gpu_memory_fraction=0.9 \
  --grpc_max_threads=64 \
  "$@"
