#!/usr/bin/env bash
# The GPU figures: the zoo's forward (B = 1 at m = n = 1k and 10k, B = 32 at 1k; IFA's device
# time broken down by op, also kernel by kernel) and training throughput, with Keras 3 on
# JAX, written as JSON to the folder given (default benchmarks/results/gpu). TensorFlow does not travel to the lent
# GPU machines; JAX is there, and Keras with its two missing pure dependencies travels as
# wheels in `.whl/` (see benchmarks/results/gpu/README.md for the pip download line).
#
#   bash benchmarks/gpu_run.sh "$OUT"
#
# The shapes and step counts can be made tiny for a CPU rehearsal of the whole script:
#   SHAPES=20x30,40x50 BATCHED_SHAPE=20x30 REPEATS=3 TRAIN_M=10 TRAIN_N=20 TRAIN_STEPS=2 \
#   KERAS_BACKEND=jax .venv/bin/python ... (see tests/test_jax_forward.py)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
python=${PYTHON:-python3}
if ! "$python" -c "import keras" 2>/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/ifa_tf_site .whl/*.whl
  export PYTHONPATH=/tmp/ifa_tf_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} KERAS_BACKEND=jax JAX_ENABLE_X64=1 PYTHONUNBUFFERED=1
models=${MODELS:-ifa,ifa_no_ram,avg_pooling,din_full,twin,sim_hard,sdim,eta}
repeats=${REPEATS:-50}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    2>/dev/null || echo "no nvidia-smi"; } >"$out/device.txt"
"$python" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__,
jax.devices())" >>"$out/device.txt"

"$python" benchmarks/jax_forward.py --models="$models" --shapes="${SHAPES:-1000x1000,10000x10000}" \
  --batch_size=1 --repeats="$repeats" --profile_models=ifa --output_json="$out/forward_b1.json"
"$python" benchmarks/jax_forward.py --models="$models" --shapes="${BATCHED_SHAPE:-1000x1000}" \
  --batch_size=32 --repeats="$repeats" --output_json="$out/forward_b32.json"
"$python" benchmarks/jax_train.py --models="${TRAIN_MODELS:-ifa,twin}" --batch_size=32 \
  --candidates="${TRAIN_M:-200}" --sequence_length="${TRAIN_N:-1000}" \
  --steps="${TRAIN_STEPS:-50}" --output_json="$out/train.json"
# XLA runs most of a forward as CUDA graphs (command buffers), which a trace shows as one
# event each; with them off every kernel is traced on its own, naming the ops that dominate.
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" "$python" benchmarks/jax_forward.py \
  --models=ifa --shapes="${PROFILE_SHAPE:-10000x10000}" --batch_size=1 --repeats="$repeats" \
  --profile_models=ifa --profile_top=25 --output_json="$out/profile_ifa_kernels.json"
