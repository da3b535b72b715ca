"""`ifa-export`: turn a trained Keras model into a TF Serving SavedModel version.

    ifa-export --model_dir=runs/ifa --export_base=/models/ifa [--version=N]

writes `/models/ifa/<N>/` (the next version when --version is omitted) and prints its path.
"""

import glob
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


def load_model(path):
    """Loads a `.keras` file with ifa_tf's layers and models registered."""
    import keras

    import ifa_tf  # noqa: F401 (registers the layers and models under package "ifa_tf")

    return keras.saving.load_model(path, compile=False)


def export_model(model_dir, export_base, version=None, schema=None, model_name=None,
                 jit_compile=False):
    """Loads the model of `model_dir` and exports it; returns the version directory.

    `schema` (a FeatureSchema, dict or JSON path) defaults to `schema.json` beside the
    `.keras` file, else to the schema read off the model's inputs and outputs.
    """
    from ifa_tf import export
    from ifa_tf.schema import resolve_schema

    keras_file = find_keras_file(model_dir)
    if schema is None:
        beside = os.path.join(os.path.dirname(keras_file), SCHEMA_FILE)
        schema = beside if os.path.isfile(beside) else None
    model = load_model(keras_file)
    return export.export_saved_model(
        model, export_base, version=version,
        schema=resolve_schema(schema) if schema else None, model_name=model_name,
        jit_compile=jit_compile)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    print(export_model(FLAGS.model_dir, FLAGS.export_base, FLAGS.version, FLAGS.schema,
                       FLAGS.model_name, FLAGS.jit_compile))


def run():
    define_flags()
    run_app(main, __name__, "ifa-export")


if __name__ == "__main__":
    run()
