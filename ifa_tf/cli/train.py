"""`ifa-train`: train a zoo model on candidate-set TFRecords and evaluate it.

    ifa-train --model=ifa --train_data='data/sim/train-*' --eval_data='data/sim/test-*' \\
        --model_dir=runs/ifa --batch_size=64 --epochs=2 --set=model.embedding_dim=32
    ifa-train --model=twin ... --protocol=streaming       # paper 5.1: evaluate, then train
    TF_CONFIG=... ifa-train ... --strategy=multi_worker   # one process per worker
    ifa-train compare runs/ifa runs/twin ...              # every task's AUC and GAUC, steps,
                                                          # wall time: one table

Defaults come from `zoo/<model>.yaml`, then `--config` (a YAML file with sections model,
data, train, eval), then the explicit flags, then `--set section.key=value` (repeatable);
unknown keys are errors. Thin over `ifa_tf.training.train_and_evaluate`.
"""

import glob
import json
import os

from absl import app, flags

from ifa_tf.cli import did_you_mean, run_app
from ifa_tf.training import config as config_lib
from ifa_tf.training import run_directory

METRICS_FILENAME = "metrics.json"  # trainer.METRICS_FILENAME (tested equal)

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
    "deterministic": "train.deterministic",
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
    flags.DEFINE_boolean("deterministic", None, "Same seed, same data: the same weights and "
                         "metrics, bit for bit (slower input; train.deterministic).",
                         flag_values=f)
    flags.DEFINE_enum("strategy", None, list(config_lib.STRATEGIES), "Distribution strategy.",
                      flag_values=f)
    flags.DEFINE_enum("protocol", None, list(config_lib.PROTOCOLS), "Evaluation protocol.",
                      flag_values=f)
    flags.DEFINE_enum("verbose", None, ["0", "1", "2", "auto"], "Progress display (as "
                      "Keras' fit(verbose=...)): 0 none, 1 a progress bar (at most 100 "
                      "columns, no colour codes), 2 one line per epoch; auto (default): 1 on a "
                      "terminal, else 2. Not logging: log detail is --verbosity.",
                      flag_values=f)


def config_from_flags(flag_values=flags.FLAGS, check_model=True):
    """The resolved `Config` the flags describe (`check_model=False`: without the model
    section's check, which imports the zoo)."""
    overrides = [(key, flag_values[name].value) for name, key in _FLAG_KEYS.items()
                 if flag_values[name].value is not None]
    overrides = [(key, int(value) if key == "train.verbose" and value.isdigit() else value)
                 for key, value in overrides]
    try:
        overrides += [config_lib.parse_override(text) for text in flag_values["set"].value]
        return config_lib.load_config(flag_values["model"].value,
                                      config_file=flag_values["config"].value,
                                      overrides=overrides, check_model=check_model)
    except ValueError as error:
        raise app.UsageError(str(error)) from error


def check(argv, flag_values=flags.FLAGS):
    """What `main` checks before TensorFlow loads: arguments, required flags, the config
    (all but the model's keys), the model name, that the data files exist."""
    if argv[1:2] == ["compare"]:
        if len(argv) < 3:
            raise app.UsageError("Usage: ifa-train compare RUN_DIR [RUN_DIR ...] (directories "
                                 "of ifa-train --model_dir).")
        return
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]} (the one subcommand is "
                             "`compare`).")
    if not flag_values["model_dir"].value:
        raise app.UsageError("--model_dir is required.")
    config_file = flag_values["config"].value
    if config_file and not os.path.isfile(config_file):
        raise app.UsageError(f"--config={config_file} does not exist.")
    config = config_from_flags(flag_values, check_model=False)
    names = config_lib.zoo_config_names()
    if names and config.model.name not in names:
        raise app.UsageError(f"Unknown model {config.model.name!r}"
                             f"{did_you_mean(config.model.name, names)}. Registered models: "
                             f"{names}")
    try:
        config_lib.check_model_keys_early(config)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    if not config.data.train_data:
        raise app.UsageError("--train_data (or data.train_data) is required.")
    run_directory.check_not_finished(flag_values["model_dir"].value)
    for flag, pattern in (("train_data", config.data.train_data),
                          ("eval_data", config.data.eval_data)):
        patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
        for one in filter(None, patterns):  # "": none given (a resumed run's config)
            if not glob.glob(one):
                raise app.UsageError(f"--{flag}={one!r} matches no files.")


def main(argv):
    check(argv)
    if argv[1:2] == ["compare"]:
        print(format_comparison(read_runs(argv[2:])))
        return
    config = config_from_flags()
    # Imported after flag parsing: importing TensorFlow is slow.
    from ifa_tf.training import train_and_evaluate

    result = train_and_evaluate(config, flags.FLAGS.model_dir)
    print(format_summary(result, flags.FLAGS.model_dir))


def read_runs(run_dirs):
    """`[(run directory, metrics dict)]` of `ifa-train` runs, read from their metrics.json."""
    runs = []
    for run_dir in run_dirs:
        path = os.path.join(run_dir, METRICS_FILENAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{run_dir}: no {METRICS_FILENAME} (not an ifa-train --model_dir, or a run "
                "that has not finished)")
        with open(path) as f:
            try:
                metrics = json.load(f)
            except ValueError as error:
                raise ValueError(f"{path}: not JSON ({error})") from None
        check_metrics(path, metrics)
        runs.append((run_dir, metrics))
    return runs


def check_metrics(path, metrics):
    """Raises ValueError naming `path` and the field when `metrics` is not what ifa-train
    writes to metrics.json, as far as `format_comparison` reads it."""
    def fail(field, expected, value):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ValueError(f"{path}: {field} must be {expected} (is this an ifa-train "
                         f"metrics.json?). Received: {shown}")

    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(metrics, dict):
        fail("the top level", "a JSON object", metrics)
    for field, valid, expected in (("model", lambda v: isinstance(v, str), "a string"),
                                   ("train_steps", number, "a number"),
                                   ("wall_time_s", number, "a number"),
                                   ("eval", lambda v: isinstance(v, dict), "an object")):
        if metrics.get(field) is not None and not valid(metrics[field]):
            fail(field, f"{expected} or null", metrics[field])
    tasks = (metrics.get("eval") or {}).get("tasks", {})
    if not isinstance(tasks, dict):
        fail("eval.tasks", "an object of tasks", tasks)
    for task, values in tasks.items():
        if not isinstance(values, dict):
            fail(f"eval.tasks.{task}", "an object of metrics", values)
        for key in ("auc", "gauc"):
            if values.get(key) is not None and not number(values[key]):
                fail(f"eval.tasks.{task}.{key}", "a number or null", values[key])


def format_comparison(runs):
    """One table of runs: model, steps, wall time, then every task's AUC and GAUC (the
    tasks of all runs, in order of first appearance; '-' where a run has none)."""
    tasks = []
    for _, metrics in runs:
        for task in (metrics.get("eval") or {}).get("tasks", {}):
            if task not in tasks:
                tasks.append(task)
    names = [run_dir for run_dir, _ in runs]
    width = max(len("run"), *(len(n) for n in names))
    models = [str(metrics.get("model", "-")) for _, metrics in runs]
    model_width = max(len("model"), *(len(m) for m in models))
    head = f"{'run':<{width}}  {'model':<{model_width}}  {'steps':>7}  {'wall time':>9}"
    lines = [head + "".join(f"  {task:^15}" for task in tasks),
             " " * len(head) + "".join(f"  {'AUC':>7} {'GAUC':>7}" for _ in tasks)]
    for (run_dir, metrics), model in zip(runs, models):
        steps = metrics.get("train_steps")
        wall = metrics.get("wall_time_s")
        line = (f"{run_dir:<{width}}  {model:<{model_width}}  "
                f"{'-' if steps is None else steps:>7}  "
                f"{'-' if wall is None else f'{wall:.0f} s':>9}")
        results = (metrics.get("eval") or {}).get("tasks", {})
        for task in tasks:
            auc, gauc = (_cell(results.get(task, {}).get(key)) for key in ("auc", "gauc"))
            line += f"  {auc} {gauc}"
        lines.append(line)
    return "\n".join(lines)


def _cell(value):
    return f"{'-':>7}" if value is None else f"{value:>7.4f}"


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
                     "requests" + ("; truth_auc: the best any model can score"
                                   if "truth_auc" in columns else "") + "):")
        lines.append(f"  {'task':<10}" + "".join(f"{c:>10}" for c in columns))
        for task, values in tasks.items():
            lines.append(f"  {task:<10}" + "".join(
                f"{values[c]:>10.4f}" if c in values else f"{'':>10}" for c in columns))
    return "\n".join(lines)


def run():
    define_flags()
    run_app(main, __name__, "ifa-train", check=check, creates=("model_dir",),
            library=lambda argv: argv[1:2] != ["compare"])


if __name__ == "__main__":
    run()
