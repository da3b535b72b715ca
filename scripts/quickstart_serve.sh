#!/usr/bin/env bash
# Quick start, serving half: export a trained model, serve it with ifa-serve, ask the server
# for one ranked candidate list, stop the server.
#
#   bash scripts/quickstart_serve.sh MODEL_DIR [WORKDIR] [DATA_GLOB]
#
# MODEL_DIR: a .keras file or a directory holding model.keras (what ifa-train writes).
# WORKDIR:   where the SavedModel versions go (default /tmp/ifa_quickstart/models).
# DATA_GLOB: TFRecords whose first request is sent (default: a random request).
# Ports: $PORT (gRPC, default 8500) and $REST_PORT (default 8501), on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${1:?usage: quickstart_serve.sh MODEL_DIR [WORKDIR] [DATA_GLOB]}
WORKDIR=${2:-/tmp/ifa_quickstart/models}
DATA=${3:-}
PORT=${PORT:-8500}
REST_PORT=${REST_PORT:-8501}
PYTHON=${PYTHON:-.venv/bin/python}
# `python -m ifa_tf_console COMMAND` is the console script COMMAND (ifa-export, ...).
CLI=("$PYTHON" -m ifa_tf_console)
for port in "$PORT" "$REST_PORT"; do
  if ! "$PYTHON" -c "import socket, sys; socket.socket().bind(('127.0.0.1', int(sys.argv[1])))" \
      "$port" 2>/dev/null; then
    echo "quickstart_serve.sh: port $port on 127.0.0.1 is taken; choose others with" \
         "PORT=... REST_PORT=... (gRPC, REST)" >&2
    exit 2
  fi
done

VERSION_DIR=$("${CLI[@]}" ifa-export --model_dir="$MODEL_DIR" --export_base="$WORKDIR/ifa")
echo "exported $VERSION_DIR"

"${CLI[@]}" ifa-serve --model_name=ifa --model_base_path="$WORKDIR/ifa" \
  --port="$PORT" --rest_api_port="$REST_PORT" >"$WORKDIR/ifa-serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER" || true' EXIT
echo "ifa-serve (pid $SERVER) on 127.0.0.1:$PORT (gRPC), :$REST_PORT (REST); log: $WORKDIR/ifa-serve.log"

"${CLI[@]}" ifa-query --target="127.0.0.1:$PORT" --model_name=ifa \
  --export_dir="$VERSION_DIR" ${DATA:+--data="$DATA"}
