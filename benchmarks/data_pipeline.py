"""Benchmark: simulator speed, `make_dataset` throughput, and whether the pipeline keeps up
with IFA training at the same shape (same process, same machine).

    .venv/bin/python benchmarks/data_pipeline.py            # n=1,000/m=200, n=10,000/m=1,000
    .venv/bin/python benchmarks/data_pipeline.py --quick    # smaller, for a smoke run

For each shape it writes simulator data (every request at exactly n events and m
candidates) and reports
- simulator: requests/s of `write_synthetic` (generate + encode + write, one process);
- pipeline: requests/s of `make_dataset` (gzip shards, shuffle, parse, pad) iterated alone;
- IFA train step: requests/s of `model.fit` on one batch held in memory (no input cost);
- IFA fit from the pipeline: requests/s of `model.fit(make_dataset(...))`;
the two model feeds alternate twice and each keeps its best run (the machine may be shared).
The pipeline does not limit training when its own rate is well above the training rate and
fitting from it is as fast as fitting from memory. Results go to
`benchmarks/results/data_pipeline.{json,md}`.
"""

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from ifa_tf.data import make_dataset, simulator  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass(frozen=True)
class Shape:
    seq_len: int
    candidates: int
    num_requests: int
    batch_size: int
    train_steps: int


FULL = (Shape(1_000, 200, 1_024, 32, 20), Shape(10_000, 1_000, 192, 8, 6))
QUICK = (Shape(200, 50, 128, 16, 5), Shape(1_000, 200, 64, 8, 3))


def simulate(shape, output_dir):
    config = simulator.SimulatorConfig(
        num_requests=shape.num_requests, seed=0, max_seq_len=shape.seq_len,
        min_seq_len=shape.seq_len, max_candidates=shape.candidates,
        min_candidates=shape.candidates, num_items=max(20_000, 20 * shape.candidates),
        test_fraction=0.0)
    start = time.perf_counter()
    simulator.write_synthetic(output_dir, config, num_shards=8)
    seconds = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(output_dir, f)) for f in os.listdir(output_dir))
    return {"requests_per_s": shape.num_requests / seconds, "seconds": seconds,
            "bytes_per_request": size / shape.num_requests}


def pipeline_rate(pattern, shape, epochs=3):
    dataset = make_dataset(pattern, batch_size=shape.batch_size, repeat=True,
                           shuffle_buffer=4 * shape.batch_size, seed=0)
    iterator = iter(dataset)
    next(iterator)  # warm-up: tracing, first files opened
    batches = epochs * shape.num_requests // shape.batch_size
    start = time.perf_counter()
    for _ in range(batches):
        features, _ = next(iterator)
    features["cand_item_id"].numpy()
    seconds = time.perf_counter() - start
    return {"requests_per_s": batches * shape.batch_size / seconds, "batches": batches,
            "seq_shape": list(features["seq_item_id"].shape),
            "cand_shape": list(features["cand_item_id"].shape)}


def ifa_rates(pattern, shape):
    """IFA fit rate from a batch in memory and from the pipeline, or the reason it can't."""
    try:
        from ifa_tf import zoo
    except ImportError as error:
        return {"skipped": f"ifa_tf.zoo not importable: {error}"}
    schema = simulator.simulator_schema()
    model_schema = dataclasses.replace(schema, extras=())
    model = zoo.build("ifa", schema=model_schema)
    model.compile()
    dataset = make_dataset(pattern, batch_size=shape.batch_size, repeat=True,
                           shuffle_buffer=4 * shape.batch_size, seed=0, drop_remainder=True)
    in_memory = dataset.take(1).cache().repeat()
    model.fit(in_memory, steps_per_epoch=_WARMUP_STEPS, epochs=1, verbose=0)  # trace
    rates = {}
    # Alternate the two feeds and keep each one's best run: the machine may be shared.
    for _ in range(2):
        for name, data in (("train_step_in_memory", in_memory),
                           ("fit_from_pipeline", dataset)):
            timer = _StepTimer()
            model.fit(data, steps_per_epoch=shape.train_steps + _WARMUP_STEPS, epochs=1,
                      verbose=0, callbacks=[timer])
            seconds = timer.seconds_after(_WARMUP_STEPS)
            rate = shape.train_steps * shape.batch_size / seconds
            if rate > rates.get(name, {}).get("requests_per_s", 0.0):
                rates[name] = {"requests_per_s": rate,
                               "seconds_per_step": seconds / shape.train_steps}
    return rates


_WARMUP_STEPS = 2  # tracing and the first batches are not timed


class _StepTimer:
    """A Keras callback recording when each training batch ends."""

    def __new__(cls):
        import keras

        class StepTimer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.ends = []

            def on_train_batch_end(self, batch, logs=None):
                self.ends.append(time.perf_counter())

            def seconds_after(self, warmup):
                return self.ends[-1] - self.ends[warmup - 1]

        return StepTimer()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--no_model", action="store_true", help="skip the IFA comparison")
    parser.add_argument("--output", default=os.path.join(RESULTS, "data_pipeline"),
                        help="results path without extension (.json and .md are written)")
    args = parser.parse_args()
    shapes = QUICK if args.quick else FULL
    rows = []
    for shape in shapes:
        directory = tempfile.mkdtemp(prefix="ifa_bench_")
        try:
            row = {"n": shape.seq_len, "m": shape.candidates, "batch_size": shape.batch_size,
                   "num_requests": shape.num_requests,
                   "simulator": simulate(shape, directory)}
            pattern = os.path.join(directory, "train-*")
            row["pipeline"] = pipeline_rate(pattern, shape)
            if not args.no_model:
                row["ifa"] = ifa_rates(pattern, shape)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
                    "tensorflow": tf.__version__},
        "results": rows,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(args.output + ".md", "w") as f:
        f.write(markdown(report))


def markdown(report):
    lines = ["# Data pipeline benchmark", "",
             f"Command: `{report['command']}`  ",
             f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, "
             f"GPUs: {report['machine']['gpus'] or 'none'}, TensorFlow "
             f"{report['machine']['tensorflow']}", "",
             "Requests/s (one request = one user, n events, m candidates). Pipeline: "
             "`make_dataset` alone (gzip shards, shuffle, batched parse, pad). IFA: "
             "`model.fit` of `zoo.build(\"ifa\")` on one batch held in memory, and fed by "
             "`make_dataset`.", "",
             "| n | m | batch | simulator | MB/1k requests | pipeline | IFA step (memory) "
             "| IFA fit (pipeline) | pipeline / IFA step |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["results"]:
        ifa = row.get("ifa", {})
        step = ifa.get("train_step_in_memory", {}).get("requests_per_s")
        fed = ifa.get("fit_from_pipeline", {}).get("requests_per_s")
        pipeline = row["pipeline"]["requests_per_s"]
        cells = [row["n"], row["m"], row["batch_size"],
                 f"{row['simulator']['requests_per_s']:.1f}",
                 f"{row['simulator']['bytes_per_request'] / 1e3:.1f}", f"{pipeline:.1f}",
                 f"{step:.1f}" if step else ifa.get("skipped", "not run"),
                 f"{fed:.1f}" if fed else "-", f"{pipeline / step:.1f}x" if step else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
