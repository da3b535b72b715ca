"""Benchmark: zoo models' training throughput with Keras 3 on the JAX backend (no TensorFlow).

    KERAS_BACKEND=jax JAX_ENABLE_X64=1 python benchmarks/jax_train.py \\
        --models=ifa,twin --batch_size=32 --candidates=200 --sequence_length=1000

The GPU counterpart of `ifa-bench`'s training figure: each model is built by
`ifa_tf.zoo.build` and compiled with its defaults (`model.compile()`: Adam, the ESMM loss,
AUC per task), as a user's `fit` would run it; `train_on_batch` (one jitted step that
returns the step's metrics, so each call waits for the device) is timed over `--steps`
steps after `--warmup` steps, on one fixed batch of the benchmarks' random requests.
Prints one JSON line per model (after the environment line of `jax_forward.py`).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ifa,twin", help="comma-separated zoo models")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=200, help="m per request")
    parser.add_argument("--sequence_length", type=int, default=1000, help="n per request")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--output_json", default=None, help="also write the records here")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    return args


def time_training(model, features, labels, steps, warmup):
    start = time.perf_counter()
    model.train_on_batch(features, labels)
    first_ms = (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        model.train_on_batch(features, labels)
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(features, labels)
        samples.append((time.perf_counter() - start) * 1e3)
    step_ms = float(np.median(samples))
    return {"step_median_ms": step_ms, "step_p90_ms": float(np.percentile(samples, 90)),
            "first_step_ms": first_ms, "steps": steps}


def main(argv):
    args = parse_args(argv)
    from benchmarks.jax_forward import check_backend, environment_record

    check_backend()
    import ifa_tf
    from ifa_tf.benchmark.requests import random_labels, random_request

    environment = environment_record()
    print(json.dumps(environment), flush=True)
    schema = ifa_tf.default_schema()
    features = random_request(schema, args.candidates, args.sequence_length,
                              batch=args.batch_size)
    labels = random_labels(schema, args.batch_size, args.candidates)
    records = []
    for name in args.models:
        model = ifa_tf.zoo.build(name, schema=schema)
        model.compile()
        timing = time_training(model, features, labels, args.steps, args.warmup)
        record = {"model": name, "batch_size": args.batch_size, "m": args.candidates,
                  "n": args.sequence_length, **timing,
                  "requests_per_s": args.batch_size * 1e3 / timing["step_median_ms"],
                  **environment}
        records.append(record)
        print(json.dumps(record), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
