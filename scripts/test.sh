#!/usr/bin/env bash
# Installs ifa_tf with its test and beam extras into .venv, runs the test suite on the
# TensorFlow backend, then the backend-independent layer tests again on JAX. Extra arguments
# go to the first pytest run (e.g. `bash scripts/test.sh -k zoo`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
# The Beam extra too, so that the tests of `--runner` (the converter and the state build on
# Apache Beam) run here; without it they skip and say why.
install_venv ".[test,beam]"
# The state store's tests run against a real redis-server: installed where apt is at hand
# (Debian package redis-server); elsewhere those tests skip and say why.
if ! command -v redis-server >/dev/null && command -v apt-get >/dev/null \
    && [[ $(id -u) -eq 0 ]]; then
  echo "      installing redis-server (apt) for the state store tests"
  { apt-get update -qq && apt-get install -y -qq redis-server; } >/dev/null 2>&1 \
    || echo "      could not install redis-server: its tests will skip"
fi
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/python -m pytest -q "$@"
# int64 ids need JAX's 64-bit mode: without it JAX truncates them to int32.
KERAS_BACKEND=jax JAX_ENABLE_X64=1 .venv/bin/python -m pytest -q -m "jax and not slow" tests
