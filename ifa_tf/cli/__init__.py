"""Console scripts: thin absl `main`s over library functions that the tests call directly.

What every command shares (`run_app`):

- `--verbosity` (`-v`): -1 by default (warnings and errors of Python's logging); 0 adds
  info lines; 1 adds debug lines, TensorFlow's C++ logs (see `ifa_tf_console`) and the
  traceback of an error.
- A user error (a bad flag, a missing file, bad data) is one line on stderr,
  `<command>: <what is wrong and what to do>`, and exit status 2 for bad flags and usage, 1
  otherwise; no traceback unless --verbosity=1.
- Flags that `import tensorflow` brings along from absl's test framework (TensorFlow's
  public API imports `absl.testing.absltest` through
  `tf.__internal__.distribute.combinations`) are not the command's: they are removed
  before parsing, so --helpfull does not list them and the command does not accept them.
"""

import functools
import os
import sys

from absl import app, flags, logging

# Exit statuses: 2 for a command line the command cannot run, 1 for a failure while running.
USAGE_ERROR, RUN_ERROR = 2, 1
_TEST_FRAMEWORK_MODULES = ("absl.testing",)


def run_app(main, module_name, program=None, default_verbosity=-1):
    """`app.run(main)` with the conventions above; `program` names the command in errors
    (default: the name the command was run by).

    Also lists the flags defined in `module_name` under `--help`: absl's `--help` lists the
    key flags of the main module, `sys.argv[0]`, which for a console script is the
    generated wrapper and defines none.
    """
    program = program or os.path.basename(sys.argv[0])
    remove_test_framework_flags()
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(functools.partial(_run_main, main, program),
            flags_parser=functools.partial(parse_flags, program=program,
                                           default_verbosity=default_verbosity))


def remove_test_framework_flags(flag_values=flags.FLAGS):
    """Removes the flags defined by test-framework modules (`--test_srcdir`, ...)."""
    names = [flag.name for module, module_flags in flag_values.flags_by_module_dict().items()
             if module.startswith(_TEST_FRAMEWORK_MODULES) for flag in module_flags]
    for name in names:
        if name in flag_values:
            delattr(flag_values, name)


def parse_flags(argv, program, default_verbosity=-1, flag_values=flags.FLAGS):
    """Parses `argv` into `flag_values`; a bad flag exits with one line naming it."""
    try:
        remaining = flag_values(argv)
    except flags.Error as error:
        exit_with_error(program, f"{_sentence(error)} See --help.", USAGE_ERROR)
    if not flag_values["verbosity"].present:
        flag_values.verbosity = default_verbosity
    return remaining


def user_error_types():
    """Exceptions that report a problem with the user's input rather than a bug: files
    (OSError), values and data (ValueError), and TensorFlow's op errors (bad records)."""
    types = [OSError, ValueError]
    if "tensorflow" in sys.modules:
        types.append(sys.modules["tensorflow"].errors.OpError)
    return tuple(types)


def error_message(error):
    """The one-line form of `error`: for a TensorFlow op error, its message without the
    graph context TensorFlow appends."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    text = text.strip().split("\n")[0].strip()
    for marker in (" [Op:", "\t [[", " [[{{"):
        text = text.split(marker)[0]
    if text.startswith("assertion failed: [") and text.endswith("]"):
        text = text[len("assertion failed: ["):-1]
    return text


def progress_reporter(unit):
    """A `progress(done, total)` callback for long work: a `keras.utils.Progbar` when stdout
    is a terminal; otherwise an info line at every tenth of the work (shown from
    --verbosity=0), so that logs get a few lines, not a redrawn bar."""
    state = {}

    def progress(done, total):
        if sys.stdout.isatty():
            if "bar" not in state:
                import keras

                state["bar"] = keras.utils.Progbar(total, unit_name=unit)
            state["bar"].update(done)
        elif total and done % max(1, total // 10) == 0 or done == total:
            logging.info("%d / %d %ss", done, total, unit)

    return progress


def _sentence(error):
    text = " ".join(str(error).split())
    return text if text.endswith((".", "?", "!")) else text + "."


def exit_with_error(program, message, status):
    sys.stderr.write(f"{program}: {message}\n")
    sys.stderr.flush()
    sys.exit(status)


def _run_main(main, program, argv):
    verbose = logging.get_verbosity() >= 1
    try:
        return main(argv)
    except app.UsageError as error:
        if verbose:
            raise
        exit_with_error(program, f"{_sentence(error)} See --help.", USAGE_ERROR)
    except user_error_types() as error:
        if verbose:
            raise
        exit_with_error(program, f"{error_message(error)} (--verbosity=1 shows the "
                        "traceback)", RUN_ERROR)
    except KeyboardInterrupt:
        if verbose:
            raise
        exit_with_error(program, "interrupted", 130)
