"""ifa-bench: latency, memory and throughput of every zoo model; see ifa_tf.benchmark."""

import dataclasses

from absl import app, flags

from ifa_tf.benchmark.runner import OPTIONAL_PATHS, PATHS, BenchConfig, run_benchmark
from ifa_tf.cli import run_app

_DEFAULTS = BenchConfig()
flags.DEFINE_string("output_dir", _DEFAULTS.output_dir, "Where results.json/.md and plots go.")
flags.DEFINE_list("models", [], "Models to time (default: every registered model).")
flags.DEFINE_list("paths", list(PATHS),
                  f"Scoring paths, of {list(PATHS + OPTIONAL_PATHS)}; saved_model_xla is the "
                  "export with jit_compile (XLA on power-of-two buckets).")
flags.DEFINE_list("m_values", [str(v) for v in _DEFAULTS.m_values], "Candidate-set sizes.")
flags.DEFINE_list("n_values", [str(v) for v in _DEFAULTS.n_values], "Sequence lengths.")
flags.DEFINE_integer("repeats", _DEFAULTS.repeats, "Timed calls per shape.")
flags.DEFINE_integer("warmup", _DEFAULTS.warmup, "Untimed calls per shape first.")
flags.DEFINE_integer("rounds", _DEFAULTS.rounds, "Times every model is timed, in alternating "
                     "order; a shape's figures pool the timed calls of all rounds.")
flags.DEFINE_integer("train_batch_size", _DEFAULTS.train_batch_size, "Training batch size.")
flags.DEFINE_integer("train_m", _DEFAULTS.train_m, "Candidates per training request.")
flags.DEFINE_integer("train_n", _DEFAULTS.train_n, "Sequence length of training requests.")
flags.DEFINE_integer("train_repeats", _DEFAULTS.train_repeats, "Timed training steps.")
flags.DEFINE_integer("job_timeout_s", _DEFAULTS.job_timeout_s, "Limit per model and path.")
flags.DEFINE_multi_string("model_overrides", [], "key=value (value in YAML): a zoo.build "
                          "override for every model, e.g. tower_dtype=mixed_bfloat16; "
                          "model:key=value for that model only, e.g. "
                          "ifa:exact_matches=true; repeat the flag for more.")


def config_from_flags(argv):
    """The `BenchConfig` the flags describe (checked before TensorFlow loads)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = {}
    for field in dataclasses.fields(BenchConfig):
        value = flags.FLAGS[field.name].value
        if field.name in ("m_values", "n_values"):
            if not all(v.strip().isdigit() for v in value):
                raise app.UsageError(f"--{field.name} must be a comma-separated list of "
                                     f"positive integers. Received: {','.join(value)}")
            value = tuple(int(v) for v in value)
        elif isinstance(value, list):
            value = tuple(value)
        values[field.name] = value
    try:
        return BenchConfig(**values)
    except ValueError as error:
        raise app.UsageError(str(error)) from error


def main(argv):
    run_benchmark(config_from_flags(argv))


def run():
    run_app(main, __name__, "ifa-bench", check=config_from_flags)
