"""Console scripts: thin absl `main`s over library functions that the tests call directly.

What every command shares (`run_app`):

- `--verbosity` (`-v`): -1 by default (warnings and errors of Python's logging); 0 adds
  info lines; 1 adds debug lines, TensorFlow's C++ logs (see `ifa_tf_console`) and the
  traceback of an error.
- A user error (a bad flag, a missing file, bad data) is one line on stderr,
  `<command>: <what is wrong and what to do>`, and exit status 2 for bad flags and usage, 1
  otherwise; no traceback unless --verbosity=1.
- Flags are parsed and checked before TensorFlow loads: a command's `check(argv)` runs
  first (a mistake answers at once), then `load_library()` finishes importing ifa_tf (the
  console script defers it: `ifa_tf_console`), then `main(argv)`.
- `--help` starts with the command's docstring (its subcommands and examples).
- A run that fails leaves no new, empty output directory behind (the `creates` flags), and
  no new output directory at all where what it wrote is of no use unfinished (the
  `discards` flags: `ifa-data`'s partial shards).
- Flags that `import tensorflow` brings along from absl's test framework (TensorFlow's
  public API imports `absl.testing.absltest` through
  `tf.__internal__.distribute.combinations`) are not the command's: they are removed
  before parsing, so --helpfull does not list them and the command does not accept them.
"""

import functools
import os
import shutil
import sys

from absl import app, flags, logging

from ifa_tf._suggest import did_you_mean  # noqa: F401 (the commands' "did you mean")

# Exit statuses: 2 for a command line the command cannot run, 1 for a failure while running.
USAGE_ERROR, RUN_ERROR = 2, 1
_TEST_FRAMEWORK_MODULES = ("absl.testing",)
# Files a failed run may leave in a directory it created that do not make it worth keeping.
_SCAFFOLDING = ("config.yaml",)
_VERBOSITY_HELP = ("Log detail (Python logging): -1 warnings and errors (default), 0 adds info "
                   "lines, 1 adds debug lines, tracebacks and TensorFlow's C++ logs. Not the "
                   "progress display (ifa-train: --verbose).")


def run_app(main, module_name, program=None, default_verbosity=-1, check=None, creates=(),
            library=None, discards=()):
    """`app.run(main)` with the conventions above; `program` names the command in errors
    (default: the name the command was run by).

    Args:
        main: `main(argv)`, run once the library is loaded.
        module_name: the command's module: its flags are listed under `--help` (absl lists
            the key flags of the main module, `sys.argv[0]`, which for a console script is
            the generated wrapper and defines none), its docstring heads `--help`.
        check: `check(argv)`, run before TensorFlow loads: flag checks that need no model
            or data (raise `app.UsageError` or another user error).
        creates: names of flags holding directories the command creates; one that did not
            exist before a failed run is removed again if nothing but scaffolding landed
            in it.
        library: `library(argv)`: whether `main` needs the library loaded for these
            arguments (default: always); a command answered from files alone skips
            TensorFlow's start-up.
        discards: names of flags (among `creates`) holding directories whose content is of
            no use from a failed run: one that did not exist before it is removed whole.
    """
    program = program or os.path.basename(sys.argv[0])
    remove_test_framework_flags()
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    if "verbosity" in flags.FLAGS:  # listed under --help beside the command's own flags
        flags.FLAGS["verbosity"].help = _VERBOSITY_HELP
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["verbosity"])
    _set_usage(module_name)
    app.run(functools.partial(_run_main, main, program, check=check, creates=creates,
                              library=library, discards=discards),
            flags_parser=functools.partial(parse_flags, program=program,
                                           default_verbosity=default_verbosity))


def _set_usage(module_name):
    """absl's `--help` prints the `__main__` module's docstring: make it the command's."""
    module = sys.modules.get(module_name)
    main_module = sys.modules.get("__main__")
    if module is not None and module.__doc__ and main_module is not None:
        main_module.__doc__ = module.__doc__


def load_library():
    """Finishes importing the ifa_tf package (Keras, TensorFlow) when the console script
    deferred it (`ifa_tf_console`); otherwise nothing to do."""
    package = sys.modules.get("ifa_tf")
    finish = getattr(package, "_finish_import", None)
    if finish is not None:
        del package._finish_import
        finish()


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
    from ifa_tf import _deferred

    types = [OSError, ValueError]
    if _deferred.is_loaded("tensorflow"):  # never load TensorFlow to report an error
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
    """A `progress(done, total)` callback for long work: an `ifa_tf.progress.ProgressBar`
    (at most 100 columns, no ANSI codes) when stdout is a terminal; otherwise an info line
    at every tenth of the work (shown from --verbosity=0), so that logs get a few lines,
    not a redrawn bar."""
    state = {}

    def progress(done, total):
        if sys.stdout.isatty():
            if "bar" not in state:
                from ifa_tf.progress import ProgressBar

                state["bar"] = ProgressBar(total, unit)
            state["bar"].update(done)
            if total and done >= total:
                state.pop("bar").close()
        elif total and done % max(1, total // 10) == 0 or done == total:
            logging.info("%d / %d %ss", done, total, unit)

    return progress


def remove_if_empty(path):
    """Removes directory `path` when it holds no file but scaffolding (`config.yaml`) in
    any subdirectory; returns whether it did."""
    if not os.path.isdir(path):
        return False
    for _, _, files in os.walk(path):
        if any(name not in _SCAFFOLDING for name in files):
            return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def _sentence(error):
    text = " ".join(str(error).split())
    return text if text.endswith((".", "?", "!")) else text + "."


def exit_with_error(program, message, status):
    sys.stderr.write(f"{program}: {message}\n")
    sys.stderr.flush()
    sys.exit(status)


def _run_main(main, program, argv, check=None, creates=(), library=None, discards=()):
    verbose = logging.get_verbosity() >= 1
    try:
        if check is not None:
            check(argv)
        created = [(name, path) for name, path in ((name, flags.FLAGS[name].value)
                                                   for name in (*creates, *discards))
                   if path and not os.path.exists(path)]
        if library is None or library(argv):
            load_library()
        try:
            return main(argv)
        except BaseException:
            for name, path in created:
                if name in discards:
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    remove_if_empty(path)
            raise
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
