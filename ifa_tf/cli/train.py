"""`ifa-train`: train a zoo model on candidate-set TFRecords and evaluate it.

    ifa-train --model=ifa --train_data='data/sim/train-*' --eval_data='data/sim/test-*' \\
        --model_dir=runs/ifa --batch_size=64 --epochs=2 --set=model.embedding_dim=32
    ifa-train --model=twin ... --protocol=streaming       # paper 5.1: evaluate, then train
    TF_CONFIG=... ifa-train ... --strategy=multi_worker   # one process per worker

Defaults come from `zoo/<model>.yaml`, then `--config` (a YAML file with sections model,
data, train, eval), then the explicit flags, then `--set section.key=value` (repeatable);
unknown keys are errors. Thin over `ifa_tf.training.train_and_evaluate`.
"""

from absl import app, flags

from ifa_tf.cli import run_app
from ifa_tf.training import config as config_lib

# flag name -> config key; unset flags leave the config alone.
_FLAG_KEYS = {
    "train_data": "data.train_data",
    "eval_data": "data.eval_data",
    "schema": "data.schema",
    "batch_size": "data.batch_size",
    "max_seq_len": "data.max_seq_len",
    "max_candidates": "data.max_candidates",
    "epochs": "train.epochs",
    "steps": "train.steps",
    "learning_rate": "train.learning_rate",
    "seed": "train.seed",
    "strategy": "train.strategy",
    "verbose": "train.verbose",
    "protocol": "eval.protocol",
}


def define_flags(flag_values=flags.FLAGS):
    f = flag_values
    flags.DEFINE_string("model", None, "Zoo model name (zoo.list_models()).", flag_values=f)
    flags.DEFINE_string("model_dir", None, "Where config, checkpoints, logs, the model and "
                        "metrics are written; a rerun resumes from its backup.", flag_values=f)
    flags.DEFINE_string("config", None, "Extra YAML config (sections model, data, train, "
                        "eval), applied after zoo/<model>.yaml.", flag_values=f)
    flags.DEFINE_multi_string("set", [], "Config override section.key=value (value in YAML), "
                              "e.g. --set=model.k=50 --set=train.learning_rate=0.003.",
                              flag_values=f)
    flags.DEFINE_string("train_data", None, "Glob of training TFRecords.", flag_values=f)
    flags.DEFINE_string("eval_data", None, "Glob of evaluation TFRecords.", flag_values=f)
    flags.DEFINE_string("schema", None, "Schema JSON (default: metadata.json beside the "
                        "data).", flag_values=f)
    flags.DEFINE_integer("batch_size", None, "Global batch size.", flag_values=f)
    flags.DEFINE_integer("max_seq_len", None, "Cap on n.", flag_values=f)
    flags.DEFINE_integer("max_candidates", None, "Cap on m.", flag_values=f)
    flags.DEFINE_integer("epochs", None, "Epochs (with --steps: checkpointed chunks).",
                         flag_values=f)
    flags.DEFINE_integer("steps", None, "Total training steps (the data repeats).",
                         flag_values=f)
    flags.DEFINE_float("learning_rate", None, "Optimizer learning rate.", flag_values=f)
    flags.DEFINE_integer("seed", None, "Random seed.", flag_values=f)
    flags.DEFINE_enum("strategy", None, list(config_lib.STRATEGIES), "Distribution strategy.",
                      flag_values=f)
    flags.DEFINE_enum("protocol", None, list(config_lib.PROTOCOLS), "Evaluation protocol.",
                      flag_values=f)
    flags.DEFINE_enum("verbose", None, ["0", "1", "2", "auto"], "Progress output: 0 none, "
                      "1 progress bars, 2 one line per epoch; auto (default): 1 on a "
                      "terminal, else 2.", flag_values=f)


def config_from_flags(flag_values=flags.FLAGS):
    """The resolved `Config` the flags describe."""
    overrides = [(key, flag_values[name].value) for name, key in _FLAG_KEYS.items()
                 if flag_values[name].value is not None]
    overrides = [(key, int(value) if key == "train.verbose" and value.isdigit() else value)
                 for key, value in overrides]
    overrides += [config_lib.parse_override(text) for text in flag_values["set"].value]
    try:
        return config_lib.load_config(flag_values["model"].value,
                                      config_file=flag_values["config"].value,
                                      overrides=overrides)
    except ValueError as error:
        raise app.UsageError(str(error)) from error


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS.model_dir:
        raise app.UsageError("--model_dir is required.")
    config = config_from_flags()
    if not config.data.train_data:
        raise app.UsageError("--train_data (or data.train_data) is required.")
    # Imported after flag parsing: importing TensorFlow is slow.
    from ifa_tf.training import train_and_evaluate

    result = train_and_evaluate(config, flags.FLAGS.model_dir)
    print(format_summary(result, flags.FLAGS.model_dir))


def format_summary(result, model_dir):
    """What a run ends with: steps and time, then the evaluation, one task a line."""
    lines = [f"trained {result['model']}: {result['train_steps']} steps in "
             f"{result['wall_time_s']:.0f} s; model, metrics.json and logs in {model_dir}"]
    evaluation = result.get("eval")
    if evaluation:
        tasks = evaluation["tasks"]
        names = {name for values in tasks.values() for name in values}
        columns = [c for c in ("auc", "gauc", *sorted(n for n in names if n.startswith("ndcg@")),
                               "logloss", "truth_auc") if c in names]
        lines.append(f"evaluation ({result['protocol']}, {evaluation['num_requests']} "
                     "requests; truth_auc: the best any model can score):")
        lines.append(f"  {'task':<10}" + "".join(f"{c:>10}" for c in columns))
        for task, values in tasks.items():
            lines.append(f"  {task:<10}" + "".join(
                f"{values[c]:>10.4f}" if c in values else f"{'':>10}" for c in columns))
    return "\n".join(lines)


def run():
    define_flags()
    run_app(main, __name__, "ifa-train")


if __name__ == "__main__":
    run()
