"""Benchmark: where a zoo model's inference time goes, op by op (TensorFlow's profiler).

    .venv/bin/python benchmarks/op_profile.py --models=avg_pooling,ifa --m=10000 --n=10000 \
        --output=benchmarks/results/op_profile/ifa_avg_pooling

One request (B = 1) of random ids through `tf.function(model)` on one intra-op thread, so
an op's time is its CPU time, not the share of two threads. Each model: 3 untimed calls,
`--calls` timed calls (CPU and wall ms per call), then `--calls` profiled calls. Reports
the time per call by op type, by module (the layer path under the model; the towers
together) and the module's slowest ops. A model is `name[:key=value;...]` (values in YAML),
as in `benchmarks/train_step.py`. Writes `<output>.md` with the command and the commit.
"""

import collections
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["avg_pooling", "ifa"], "Models: name[:key=value;...].")
flags.DEFINE_integer("m", 10_000, "Candidates per request.")
flags.DEFINE_integer("n", 10_000, "Sequence length.")
flags.DEFINE_integer("calls", 5, "Timed calls, then as many profiled calls.")
flags.DEFINE_integer("top", 12, "Slowest ops listed per model.")
flags.DEFINE_string("output", None, "Write <output>.md.")


def parse_model(spec):
    import yaml

    name, _, settings = spec.partition(":")
    return name, {key: yaml.safe_load(value) for key, _, value in
                  (setting.partition("=") for setting in settings.split(";") if setting)}


def op_times(trace_dir, calls):
    """{op name: ms per call} from the profiler's XSpace (op events are named 'name:type')."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(trace_dir, "plugins/profile/*/*.xplane.pb"))[0],
              "rb") as f:
        space.ParseFromString(f.read())
    times = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and "/" in name and not name.startswith("_"):
                    times[name] += event.duration_ps / 1e9 / calls
    return times


def profile(spec, features):
    import tensorflow as tf

    from ifa_tf import zoo
    from ifa_tf.schema import FeatureSchema

    name, overrides = parse_model(spec)
    model = zoo.build(name, schema=FeatureSchema(), **overrides)
    call = tf.function(lambda x: model(x, training=False))
    for _ in range(3):
        call(features)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(FLAGS.calls):
        call(features)
    cpu_ms = (time.process_time() - cpu) * 1e3 / FLAGS.calls
    wall_ms = (time.perf_counter() - wall) * 1e3 / FLAGS.calls
    trace_dir = tempfile.mkdtemp()
    try:
        tf.profiler.experimental.start(trace_dir)
        for _ in range(FLAGS.calls):
            call(features)
        tf.profiler.experimental.stop()
        times = op_times(trace_dir, FLAGS.calls)
    finally:
        shutil.rmtree(trace_dir)
    return cpu_ms, wall_ms, times


def report(spec, cpu_ms, wall_ms, times):
    by_type, by_module = collections.Counter(), collections.Counter()
    for op, ms in times.items():
        path, _, kind = op.rpartition(":")
        by_type[kind] += ms
        parts = path.split("/")
        by_module["towers" if "_tower" in path else parts[1] if len(parts) > 2 else "(model)"] += ms
    lines = [f"## `{spec}`", "",
             f"{cpu_ms:.1f} ms of CPU and {wall_ms:.1f} ms wall per call; the ops sum to "
             f"{sum(times.values()):.1f} ms.", "", "| module | ms per call |", "|---|---:|"]
    lines += [f"| {module} | {ms:.2f} |" for module, ms in by_module.most_common()]
    lines += ["", "| op type | ms per call |", "|---|---:|"]
    lines += [f"| {kind} | {ms:.2f} |" for kind, ms in by_type.most_common(FLAGS.top)]
    lines += ["", "| slowest ops outside the towers | ms per call |", "|---|---:|"]
    lines += [f"| `{op}` | {ms:.2f} |" for op, ms in collections.Counter(
        {op: ms for op, ms in times.items() if "_tower" not in op}).most_common(FLAGS.top)]
    return lines + [""]


def main(argv):
    del argv
    import tensorflow as tf

    from ifa_tf.benchmark.requests import random_request
    from ifa_tf.schema import FeatureSchema

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    features = {key: tf.constant(value) for key, value in
                random_request(FeatureSchema(), FLAGS.m, FLAGS.n).items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                            capture_output=True).stdout.strip() or "unknown"
    lines = [f"# Inference, op by op: m = {FLAGS.m:,}, n = {FLAGS.n:,}, one thread", "",
             f"Commit `{commit}`. Command: `python benchmarks/op_profile.py "
             + " ".join(sys.argv[1:]) + f"`. Load average at the start: "
             f"{os.getloadavg()[0]:.2f} (2 CPUs).", ""]
    for spec in FLAGS.models:
        lines += report(spec, *profile(spec, features))
        print("\n".join(lines[-8:]), flush=True)
    if FLAGS.output:
        os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
        with open(FLAGS.output + ".md", "w") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
