"""Benchmark: zoo models' forward pass with Keras 3 on the JAX backend (no TensorFlow).

    KERAS_BACKEND=jax JAX_ENABLE_X64=1 python benchmarks/jax_forward.py \\
        --models=ifa,avg_pooling,din_full --shapes=10000x10000 --output_json=results.json

The issue's GPU goal (IFA forward at m = n = 10,000 in 2 ms or less on an H100) is timed
this way, since TensorFlow does not travel to the lent GPU machines but JAX does, and every
layer is written with `keras.ops`. Each model is built by `ifa_tf.zoo.build`, its forward
(`stateless_call`, inference mode) compiled with `jax.jit` for the request's shape; the
first call (compilation) is timed apart, then `--repeats` calls after `--warmup`, each
waited for with `block_until_ready`. Requests come from the benchmarks' shared generator.
Prints one JSON line per model and shape, and the device JAX ran on.

`--profile_models=ifa` also traces `--profile_calls` calls of those models with JAX's
profiler and adds to their records where the device time went: the time of every compiled
XLA op (a fusion, a matrix product, a gather) per call, named by the Keras layer path that
XLA's metadata gives it, largest first. It reads the trace with `jax.profiler.ProfileData`,
so it needs neither TensorFlow nor TensorBoard.

`import ifa_tf` needs only Keras, NumPy and JAX here (TensorFlow is optional and not
imported for this). On a lent GPU machine, which has JAX but maybe not Keras, carry the
wheels of Keras and its dependencies (keras, namex, optree, rich, h5py, absl-py; binary ones
built for that machine's Python) in an ignored folder, install them there with
`pip install --no-deps <folder>/*.whl`, and run from the repository root with `PYTHONPATH=.`.
"""

import argparse
import json
import os
import platform
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ifa,avg_pooling,din_full",
                        help="comma-separated zoo models")
    parser.add_argument("--shapes", default="10000x10000", help="comma-separated m x n")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--output_json", default=None, help="also write the records here")
    parser.add_argument("--profile_models", default="",
                        help="comma-separated models whose device time is broken down by op")
    parser.add_argument("--profile_calls", type=int, default=10)
    parser.add_argument("--profile_top", type=int, default=15, help="ops listed per record")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.profile_models = [m for m in args.profile_models.split(",") if m]
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    return args


def compiled_forward(model, features):
    """The model's jitted inference forward (its score) and its device-resident arguments."""
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def forward(trainable, non_trainable, features):
        outputs, _ = model.stateless_call(trainable, non_trainable, features, training=False)
        return outputs["score"]

    inputs = {k: jax.device_put(v) for k, v in features.items()}
    return forward, (trainable, non_trainable, inputs)


def time_forward(forward, arguments, repeats, warmup):
    trainable, non_trainable, inputs = arguments
    start = time.perf_counter()
    forward(trainable, non_trainable, inputs).block_until_ready()
    first_ms = (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        forward(trainable, non_trainable, inputs).block_until_ready()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(trainable, non_trainable, inputs).block_until_ready()
        samples.append((time.perf_counter() - start) * 1e3)
    samples = np.asarray(samples)
    return {"median_ms": float(np.median(samples)), "p10_ms": float(np.percentile(samples, 10)),
            "p90_ms": float(np.percentile(samples, 90)), "min_ms": float(samples.min()),
            "first_call_ms": first_ms, "repeats": repeats}


def profile_forward(forward, arguments, calls, top):
    """Device time per call of each compiled XLA op over `calls` traced calls, largest first.

    An op's time is the summed duration of the trace events that carry its `hlo_op` stat on
    the device's planes (`/device:*`; the host's where the device is the CPU), so concurrent
    streams add up rather than overlap. Each op is named by the `op_name` metadata that its
    instruction carries in the compiled HLO (the Keras layer path of the JAX primitive).
    """
    import glob
    import tempfile

    import jax

    hlo_text = forward.lower(*arguments).compile().as_text()
    op_names = dict(re.findall(r"%?([\w.-]+) = [^\n]*?metadata=\{[^}]*?op_name=\"([^\"]+)\"",
                               hlo_text))
    forward(*arguments).block_until_ready()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                forward(*arguments).block_until_ready()
        trace = jax.profiler.ProfileData.from_file(
            glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0])
    planes = [p for p in trace.planes if p.name.startswith("/device:")]
    planes = planes or [p for p in trace.planes if p.name.startswith("/host:CPU")]
    op_ns = {}
    for plane in planes:
        for line in plane.lines:
            for event in line.events:
                op = dict(event.stats).get("hlo_op")
                if op is not None:
                    op_ns[op] = op_ns.get(op, 0.0) + event.duration_ns
    total_ns = sum(op_ns.values())
    ranked = sorted(op_ns.items(), key=lambda item: -item[1])
    return {"device_ms_per_call": total_ns / calls / 1e6, "ops": [
        {"hlo_op": op, "op_name": op_names.get(op, ""), "ms_per_call": ns / calls / 1e6,
         "share": ns / total_ns} for op, ns in ranked[:top]]}


def check_backend():
    """Exits with the fix unless Keras runs on JAX with 64-bit ints."""
    import jax
    import keras

    if keras.backend.backend() != "jax":
        sys.exit("Run with KERAS_BACKEND=jax (and JAX_ENABLE_X64=1 for int64 ids).")
    if not jax.config.jax_enable_x64:
        sys.exit("Set JAX_ENABLE_X64=1: the models take int64 ids.")


def environment_record():
    """The device JAX runs on and the versions, for every record."""
    import jax
    import keras

    device = jax.devices()[0]
    return {"device": str(device), "device_kind": getattr(device, "device_kind", ""),
            "platform": platform.platform(), "jax": jax.__version__,
            "keras": keras.__version__}


def main(argv):
    args = parse_args(argv)
    check_backend()
    import ifa_tf
    from ifa_tf.benchmark.requests import random_request

    environment = environment_record()
    print(json.dumps(environment), flush=True)
    schema = ifa_tf.default_schema()
    records = []
    for name in args.models:
        model = ifa_tf.zoo.build(name, schema=schema)
        for m, n in args.shapes:
            features = random_request(schema, m, n, batch=args.batch_size)
            forward, arguments = compiled_forward(model, features)
            record = {"model": name, "m": m, "n": n, "batch_size": args.batch_size,
                      **time_forward(forward, arguments, args.repeats, args.warmup),
                      **environment}
            if name in args.profile_models:
                record["profile"] = profile_forward(forward, arguments, args.profile_calls,
                                                    args.profile_top)
            records.append(record)
            print(json.dumps(record), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
