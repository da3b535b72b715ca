"""Benchmark: seconds per training step of zoo models on the batches of a real dataset.

    .venv/bin/python benchmarks/train_step.py --data_dir=/tmp/zoo15/data/lifelong \
        --models=avg_pooling,din,ifa --output=benchmarks/results/train_step/lifelong

`--data_dir` holds TFRecords and `metadata.json` as `ifa-data` or `benchmarks/zoo_results.py`
write them. The first `--steps` training batches (batch 64, grouped by length as in the zoo
runs, seed 0, in a fixed order: the same batches at every commit) are read once and held in
memory, so each model's figure is its own `fit` cost, not the input pipeline's; the
pipeline's seconds per batch are reported beside them. A model is `name[:key=value;...]`:
the config `ifa-train` trains (`zoo/<name>.yaml`, its optimizer included) with `model.key=value`
overrides (`din:k=null`). Each model fits the batches once to trace, then `--repeats` times;
the best repeat counts (the machine may be shared). Writes `<output>.json` and
`<output>.md` with the command and the commit.
"""

import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Directory of the TFRecords and metadata.json.",
                    required=True)
flags.DEFINE_list("models", ["avg_pooling", "ifa", "din"], "Models: name[:key=value;...].")
flags.DEFINE_integer("steps", 20, "Training batches timed per repeat.")
flags.DEFINE_integer("repeats", 2, "Timed passes over the batches per model; the best counts.")
flags.DEFINE_integer("batch_size", 64, "Requests per batch.")
flags.DEFINE_integer("group_by_length", 16, "make_dataset's group_by_length (0: off).")
flags.DEFINE_string("output", None, "Write <output>.json and <output>.md.")


def model_config(spec):
    """`name[:key=value;...]` -> the config `ifa-train` would train: `zoo/<name>.yaml` with
    the settings as `model.key=value` overrides (checked like `--set`)."""
    from ifa_tf import training

    name, _, settings = spec.partition(":")
    try:
        return training.load_config(name, overrides=[
            f"model.{setting}" for setting in filter(None, settings.split(";"))])
    except ValueError as error:
        raise app.UsageError(f"--models={spec!r}: {error}") from None


def read_batches(schema):
    """The first `--steps` training batches, and the pipeline's seconds per batch."""
    from ifa_tf.data import make_dataset

    dataset = make_dataset(os.path.join(FLAGS.data_dir, "train-*"), schema=schema,
                           batch_size=FLAGS.batch_size, shuffle=True, seed=0,
                           deterministic=True, group_by_length=FLAGS.group_by_length)
    started = time.perf_counter()
    batches = list(dataset.take(FLAGS.steps))
    if len(batches) < FLAGS.steps:
        raise app.UsageError(f"--steps={FLAGS.steps} but {FLAGS.data_dir} holds "
                             f"{len(batches)} training batches.")
    return batches, (time.perf_counter() - started) / FLAGS.steps


def time_model(config, schema, batches):
    """Best seconds per step of `fit` over the held batches."""
    import keras
    import tensorflow as tf

    from ifa_tf.training.trainer import build_model

    signature = tf.nest.map_structure(
        lambda x: tf.TensorSpec([None] * len(x.shape), x.dtype), batches[0])
    held = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=signature)
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = build_model(config, schema)
    model.fit(held, epochs=1, verbose=0)  # traces
    best = float("inf")
    for _ in range(FLAGS.repeats):
        started = time.perf_counter()
        model.fit(held, epochs=1, verbose=0)
        best = min(best, (time.perf_counter() - started) / len(batches))
    return best


def main(argv):
    del argv
    from ifa_tf.benchmark import runner
    from ifa_tf.data import records

    commit = runner.git_commit(REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "ifa_tf"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    schema = records.schema_from_metadata(records.read_metadata(FLAGS.data_dir))
    batches, pipeline_s = read_batches(schema)
    lengths = [int(features[schema.sequence_features[0]].shape[1])
               for features, _ in batches]
    print(f"pipeline: {pipeline_s:.3f} s/batch; n per batch {min(lengths)}-{max(lengths)}",
          flush=True)
    rows = []
    for spec in FLAGS.models:
        seconds = time_model(model_config(spec), schema, batches)
        rows.append({"model": spec, "s_per_step": round(seconds, 4)})
        print(f"{spec}: {seconds:.3f} s/step", flush=True)
    if not FLAGS.output:
        return
    result = {"command": " ".join(["python", "benchmarks/train_step.py", *sys.argv[1:]]),
              "commit": commit + (" (ifa_tf/ modified)" if dirty else ""),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "data_dir": FLAGS.data_dir, "steps": FLAGS.steps, "repeats": FLAGS.repeats,
              "batch_size": FLAGS.batch_size, "n_range": [min(lengths), max(lengths)],
              "pipeline_s_per_batch": round(pipeline_s, 4), "models": rows}
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"# Seconds per training step: {os.path.basename(FLAGS.data_dir)}", "",
             f"- Command: `{result['command']}`", f"- Commit: `{result['commit']}`",
             f"- Machine: {result['machine']}",
             f"- {FLAGS.steps} batches of {FLAGS.batch_size} held in memory (n "
             f"{min(lengths)}-{max(lengths)}), best of {FLAGS.repeats} passes; the input "
             f"pipeline alone: {pipeline_s:.3f} s/batch", "",
             "| model | s/step |", "|---|---:|"]
    lines += [f"| `{row['model']}` | {row['s_per_step']:.3f} |" for row in rows]
    with open(FLAGS.output + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
