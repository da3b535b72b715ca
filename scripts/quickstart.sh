#!/usr/bin/env bash
# The quick start: install ifa_tf into .venv, simulate lifelong-behaviour data, train IFA,
# export a SavedModel, serve it with ifa-serve (TF Serving's gRPC API) and print the ranked
# candidate list the server returns for one request. Everything goes under $WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
install_venv "."
WORKDIR=${WORKDIR:-runs/quickstart}
export TF_CPP_MIN_LOG_LEVEL=2
rm -rf "$WORKDIR"
mkdir -p "$WORKDIR"

echo "== 1/4 data: ifa-data synthetic"
.venv/bin/ifa-data synthetic --output_dir="$WORKDIR/data" --num_requests=3000 \
  --max_seq_len=400 --max_candidates=100 --seed=0

echo "== 2/4 train: ifa-train --model=ifa"
.venv/bin/ifa-train --model=ifa --train_data="$WORKDIR/data/train-*" \
  --eval_data="$WORKDIR/data/test-*" --model_dir="$WORKDIR/model" --batch_size=64 --epochs=2 \
  --verbose=2

echo "== 3/4 + 4/4 export, serve, rank: ifa-export, ifa-serve, ifa_tf.serving client"
PYTHON=.venv/bin/python bash scripts/quickstart_serve.sh "$WORKDIR/model" \
  "$WORKDIR/serving" "$WORKDIR/data/test-*"
