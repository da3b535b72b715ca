"""The console scripts' entry points (`ifa-data`, `ifa-train`, `ifa-export`, `ifa-serve`,
`ifa-bench`, `ifa-state`, `ifa-query`): quiet TensorFlow's start-up, then run the command's
`ifa_tf.cli` module.

This module sits outside the `ifa_tf` package on purpose: TensorFlow's C++ log level must be
set before anything under `ifa_tf` can import TensorFlow.

- Unless the user set `TF_CPP_MIN_LOG_LEVEL`, it becomes 3 (C++ logs off; on a machine
  without an NVIDIA driver the full `tensorflow` wheel logs a harmless `failed call to
  cuInit` ERROR at the first op), or 0 with `--verbosity=1` or more.
- Flags are checked before TensorFlow loads: the `ifa_tf` package is registered without
  running its `__init__`, and TensorFlow without running its own (`ifa_tf._deferred`: its
  protos import, nothing loads), so a command's checks may read the data's files and
  build its configs; `ifa_tf.cli.load_library()` runs the `__init__` and loads Keras and
  TensorFlow once the command's `check` passed, so a bad flag answers in well under 2 s.
  A command that needs no TensorFlow (`ifa-query`, `ifa-data fetch`, `ifa-train compare`)
  never loads it.
- Lines that TensorFlow's shared libraries write while they load, before absl's logging is
  initialised, ignore `TF_CPP_MIN_LOG_LEVEL` ("WARNING: All log messages before
  absl::InitializeLog() ...", "cudart_stub.cc ... Could not find cuda drivers"; twice,
  because `import tensorflow` loads a second library with its own copy of absl and the
  CUDA stub, `_pywrap_profiler_plugin`). They are held back while TensorFlow loads, and
  what was written then is passed on with that log level applied to it.

    python -m ifa_tf_console ifa-data synthetic --output_dir=data   # = ifa-data synthetic ...
"""

import importlib
import importlib.util
import os
import re
import sys
import tempfile

COMMANDS = {
    "ifa-data": "ifa_tf.cli.data",
    "ifa-train": "ifa_tf.cli.train",
    "ifa-export": "ifa_tf.cli.export",
    "ifa-serve": "ifa_tf.cli.serve",
    "ifa-bench": "ifa_tf.cli.bench",
    "ifa-state": "ifa_tf.cli.state",
    # The quick start's client: asks a server for one ranked list.
    "ifa-query": "ifa_tf.serving.query",
}

# A line of absl / TensorFlow C++ logging: severity, date, time, thread, file:line]. (Before
# absl's logging is initialised the time reads 00:00:<seconds since the epoch>.)
_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+\s+\S+:\d+\] ")
# Lines that start something of their own, never a log record's continuation.
_OWN_LINE = re.compile(r"^(Traceback|\S+:\d+: \w+(Warning|Error)\b)")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
_BEFORE_INIT_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called"


def requested_verbosity(argv):
    """The `--verbosity` (`-v`) the command line asks for, read before absl parses it; 0 when
    absent or unreadable (absl then reports a bad value itself)."""
    value = None
    for index, arg in enumerate(argv):
        if arg == "--":
            break
        name, has_value, text = arg.partition("=")
        if name in ("--verbosity", "-verbosity", "--v", "-v"):
            if not has_value:
                text = argv[index + 1] if index + 1 < len(argv) else ""
            value = text
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def tf_log_level(verbosity, environ=os.environ):
    """The `TF_CPP_MIN_LOG_LEVEL` to run with: the user's if set, else 3 (quiet) or, from
    `--verbosity=1` on, 0 (every C++ log line)."""
    if environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip():
        try:
            return int(environ["TF_CPP_MIN_LOG_LEVEL"])
        except ValueError:
            return 0
    return 0 if verbosity >= 1 else 3


def apply_log_level(text, min_level):
    """`text` written to stderr before absl's logging started, without the C++ log records
    below `min_level` (a record's indented or unprefixed continuation lines go with it) and
    without absl's notice that such records are written regardless."""
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        match = _LOG_LINE.match(line)
        if match:
            dropping = _SEVERITY[match.group(1)] < min_level
        elif line.startswith(_BEFORE_INIT_NOTICE):
            dropping = min_level > 0
        elif _OWN_LINE.match(line):
            dropping = False
        if not dropping:
            kept.append(line)
    return "".join(kept)


def import_quietly(module_name, min_level):
    """Imports `module_name` with file descriptor 2 held in a temporary file, then writes what
    it caught to stderr with `apply_log_level(min_level)`."""
    return run_quietly(lambda: importlib.import_module(module_name), min_level)


def run_quietly(function, min_level):
    """`function()` with file descriptor 2 held in a temporary file, then what it caught
    written to stderr with `apply_log_level(min_level)`."""
    if min_level <= 0:
        return function()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            return function()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            sys.stderr.write(apply_log_level(caught.read().decode(errors="replace"),
                                             min_level))
            sys.stderr.flush()


def defer_package_import(min_level):
    """Registers the `ifa_tf` package without running its `__init__`, and TensorFlow's
    (`ifa_tf._deferred`: its protos import alone, and its first use loads it); the ifa_tf
    module gets `_finish_import()`, which runs its `__init__` and loads Keras, and with it
    TensorFlow, quietly (as `run_quietly`). Submodules import as usual meanwhile. Does
    nothing when ifa_tf is already imported."""
    if "ifa_tf" in sys.modules:
        return
    spec = importlib.util.find_spec("ifa_tf")
    package = importlib.util.module_from_spec(spec)
    sys.modules["ifa_tf"] = package
    importlib.import_module("ifa_tf._deferred").defer("tensorflow")

    def finish():
        def load():
            spec.loader.exec_module(package)
            # TensorFlow first, on its own: Keras imports parts of TensorFlow directly, and
            # those must not start before TensorFlow's __init__ has enabled TF2 behaviour
            # (else training fails: "defined in ... Graph ... which is out of scope").
            importlib.import_module("ifa_tf._deferred").load("tensorflow")
            importlib.import_module("keras")  # the zoo registers with it (ifa_tf.__init__)

        run_quietly(load, min_level)

    package._finish_import = finish


def run_command(command, argv=None):
    """Runs console script `command` (a key of `COMMANDS`) with `argv` (default sys.argv)."""
    if argv is not None:
        sys.argv = list(argv)
    level = tf_log_level(requested_verbosity(sys.argv[1:]))
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = str(level)
    defer_package_import(level)
    import_quietly(COMMANDS[command], level).run()


def data():
    run_command("ifa-data")


def train():
    run_command("ifa-train")


def export():
    run_command("ifa-export")


def serve():
    run_command("ifa-serve")


def bench():
    run_command("ifa-bench")


def state():
    run_command("ifa-state")


def query():
    run_command("ifa-query")


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m ifa_tf_console {{{'|'.join(COMMANDS)}}} [flags]")
    run_command(sys.argv[1], [sys.argv[1], *sys.argv[2:]])


if __name__ == "__main__":
    main()
