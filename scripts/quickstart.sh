#!/usr/bin/env bash
# The quick start: install ifa_tf into .venv, simulate lifelong-behaviour data, train IFA,
# export a SavedModel, serve it with ifa-serve (TF Serving's gRPC API) and print the ranked
# candidate list the server returns for one request. Everything goes under $WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
step_start=$SECONDS
took() { echo "      $((SECONDS - step_start)) s"; step_start=$SECONDS; }

echo "[0/3] install ifa_tf into .venv"
source scripts/venv.sh
install_venv "."
WORKDIR=${WORKDIR:-runs/quickstart}
rm -rf "$WORKDIR"
mkdir -p "$WORKDIR"
took

echo "[1/3] simulate 3,000 requests: ifa-data synthetic"
.venv/bin/ifa-data synthetic --output_dir="$WORKDIR/data" --num_requests=3000 \
  --max_seq_len=400 --max_candidates=100 --seed=0
took

echo "[2/3] train IFA for 2 epochs and evaluate it: ifa-train --model=ifa"
.venv/bin/ifa-train --model=ifa --train_data="$WORKDIR/data/train-*" \
  --eval_data="$WORKDIR/data/test-*" --model_dir="$WORKDIR/model" --batch_size=64 --epochs=2 \
  --verbose=0
took

echo "[3/3] export, serve and rank one request: ifa-export, ifa-serve, ifa_tf.serving client"
PYTHON=.venv/bin/python bash scripts/quickstart_serve.sh "$WORKDIR/model" \
  "$WORKDIR/serving" "$WORKDIR/data/test-*"
took
echo "done in $((SECONDS - START)) s"
