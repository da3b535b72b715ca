"""`ifa-export`: turn a trained Keras model into a TF Serving SavedModel version.

    ifa-export --model_dir=runs/ifa --export_base=/models/ifa [--version=N]

writes `/models/ifa/<N>/` (the next version when --version is omitted) and prints its path.
The version has two signatures: `serving_default` (int64 ids) and `serving_raw` (the log's
raw string ids, mapped as `ifa-data from-log` maps them). When the model was trained on a
converted log, `serving_raw` carries its vocabularies (--vocabularies, by default the
dataset of the run's data.train_data).
"""

import glob
import json
import os

from absl import app, flags

from ifa_tf.cli import run_app


def define_flags(flag_values=flags.FLAGS):
    """Defines ifa-export's flags (at run time, so other console scripts may reuse names)."""
    f = flag_values
    flags.DEFINE_string("model_dir", None,
                        "A `.keras` file, or a directory holding `model.keras` (or exactly one "
                        "`*.keras` file).", flag_values=f)
    flags.DEFINE_string("export_base", None, "Base directory of the model's versions.",
                        flag_values=f)
    flags.DEFINE_integer("version", None, "Version to write; default: one more than the highest.",
                         flag_values=f)
    flags.DEFINE_string("schema", None,
                        "FeatureSchema JSON the model was built for; default: schema.json beside "
                        "the .keras file if there is one, else read off the model.",
                        flag_values=f)
    flags.DEFINE_string("model_name", None,
                        "Name recorded in the export metadata; default: basename of export_base.",
                        flag_values=f)
    flags.DEFINE_boolean("jit_compile", False,
                         "Run the model as one XLA computation on requests padded to "
                         "power-of-two m and n (one compilation per bucket; TF Serving on CPU "
                         "then needs --xla_cpu_compilation_enabled=true).", flag_values=f)
    flags.DEFINE_string("vocabularies", None,
                        "A dataset written by `ifa-data from-log` (its directory or "
                        "metadata.json) whose vocab_*.tsv files serving_raw carries as assets; "
                        "default: the dataset of the run's data.train_data (config.yaml "
                        "beside the .keras file), when it has vocabularies.", flag_values=f)
    flags.mark_flags_as_required(["model_dir", "export_base"], flag_values=f)


FLAGS = flags.FLAGS
SCHEMA_FILE = "schema.json"



def find_keras_file(model_dir):
    """The `.keras` file a --model_dir points to."""
    if os.path.isfile(model_dir):
        return model_dir
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model_dir {model_dir} does not exist")
    preferred = os.path.join(model_dir, "model.keras")
    if os.path.isfile(preferred):
        return preferred
    candidates = sorted(glob.glob(os.path.join(model_dir, "*.keras")))
    if len(candidates) != 1:
        raise FileNotFoundError(f"Expected model.keras or exactly one *.keras file in "
                                f"{model_dir}; found {[os.path.basename(c) for c in candidates]}")
    return candidates[0]


def training_dataset(keras_file):
    """The dataset directory of the run's `data.train_data` (its config.yaml beside
    `keras_file`), or None when there is no config or no metadata.json there."""
    import yaml

    config_path = os.path.join(os.path.dirname(keras_file), "config.yaml")
    if not os.path.isfile(config_path):
        return None
    with open(config_path) as f:
        config = yaml.safe_load(f) or {}
    pattern = (config.get("data") or {}).get("train_data")
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
    for one in patterns:
        for path in sorted(glob.glob(one))[:1]:
            directory = os.path.dirname(os.path.abspath(path))
            if os.path.isfile(os.path.join(directory, "metadata.json")):
                return directory
    return None


def check(argv):
    """What `main` checks before TensorFlow loads."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    find_keras_file(FLAGS.model_dir)
    if FLAGS.version is not None and FLAGS.version < 1:
        raise app.UsageError(f"--version must be a positive integer. Received: {FLAGS.version}")
    for name in ("schema", "vocabularies"):
        value = FLAGS[name].value
        if value and not os.path.exists(value):
            raise app.UsageError(f"--{name}={value} does not exist.")


def load_model(path):
    """Loads a `.keras` file with ifa_tf's layers and models registered."""
    import keras

    import ifa_tf.zoo  # noqa: F401 (registers the layers and models under package "ifa_tf")

    return keras.saving.load_model(path, compile=False)


def export_model(model_dir, export_base, version=None, schema=None, model_name=None,
                 jit_compile=False, vocabularies=None):
    """Loads the model of `model_dir` and exports it; returns the version directory.

    `schema` (a FeatureSchema, dict or JSON path) defaults to `schema.json` beside the
    `.keras` file, else to the schema read off the model's inputs and outputs.
    `vocabularies` (a converted dataset) defaults to the run's training dataset when it has
    vocabularies.
    """
    from ifa_tf import export
    from ifa_tf.schema import resolve_schema

    keras_file = find_keras_file(model_dir)
    if schema is None:
        beside = os.path.join(os.path.dirname(keras_file), SCHEMA_FILE)
        schema = beside if os.path.isfile(beside) else None
    if vocabularies is None:
        dataset = training_dataset(keras_file)
        if dataset is not None:
            with open(os.path.join(dataset, "metadata.json")) as f:
                vocabularies = dataset if json.load(f).get("vocabularies") else None
    model = load_model(keras_file)
    return export.export_saved_model(
        model, export_base, version=version,
        schema=resolve_schema(schema) if schema else None, model_name=model_name,
        jit_compile=jit_compile, vocabularies=vocabularies)


def main(argv):
    check(argv)
    print(export_model(FLAGS.model_dir, FLAGS.export_base, FLAGS.version, FLAGS.schema,
                       FLAGS.model_name, FLAGS.jit_compile, FLAGS.vocabularies))


def run():
    define_flags()
    run_app(main, __name__, "ifa-export", check=check, creates=("export_base",))


if __name__ == "__main__":
    run()
