"""What every console script shares: a quiet start (TensorFlow's C++ start-up lines held
back, `ifa_tf_console`), one line per user error with a non-zero exit status and no
traceback unless --verbosity=1, no test-framework flags, progress for long work."""

import io
import logging
import os
import re
import subprocess
import sys

import pytest
import tensorflow as tf
from absl import app, flags
from absl import logging as absl_logging

import ifa_tf_console
from ifa_tf import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a quiet start must not print: a C++ log record, or absl's notice before its records.
_CPP_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d|absl::InitializeLog", re.MULTILINE)

# Lines that `import tensorflow` wrote on this project's CPU machine (TF 2.21, no driver).
_START_UP = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795663278.998316    5962 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1795663279.062113    5962 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
E0000 00:00:1795663283.052897    5962 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
/site-packages/somewhere.py:3: UserWarning: a Python warning during the import
"""


def test_apply_log_level_drops_records_below_the_level_with_their_continuations():
    lines = _START_UP.splitlines(keepends=True)
    assert ifa_tf_console.apply_log_level(_START_UP, 0) == _START_UP
    assert ifa_tf_console.apply_log_level(_START_UP, 2) == lines[4] + lines[5]
    assert ifa_tf_console.apply_log_level(_START_UP, 3) == lines[5]


def test_verbosity_and_log_level_are_read_before_tensorflow_is_imported():
    read = ifa_tf_console.requested_verbosity
    assert read([]) == 0
    assert read(["synthetic", "--verbosity=1"]) == 1
    assert read(["-v", "2", "--output_dir=x"]) == 2
    assert read(["--v=-1"]) == -1
    assert read(["--verbosity=loud"]) == 0  # absl rejects it when it parses the flags
    assert read(["--", "--verbosity=1"]) == 0
    level = ifa_tf_console.tf_log_level
    assert level(0, environ={}) == 3
    assert level(-1, environ={}) == 3
    assert level(1, environ={}) == 0
    assert level(0, environ={"TF_CPP_MIN_LOG_LEVEL": "1"}) == 1  # the user's setting wins
    assert level(1, environ={"TF_CPP_MIN_LOG_LEVEL": "2"}) == 2


def test_test_framework_flags_are_removed_and_ours_kept():
    flag_values = flags.FlagValues()
    flags.DEFINE_string("test_srcdir", "", "absltest's", flag_values=flag_values,
                        module_name="absl.testing.absltest")
    flags.DEFINE_integer("test_random_seed", 301, "absltest's", flag_values=flag_values,
                         module_name="absl.testing.absltest")
    flags.DEFINE_float("test_fraction", 0.1, "ours", flag_values=flag_values,
                       module_name="ifa_tf.cli.data")
    cli.remove_test_framework_flags(flag_values)
    assert list(flag_values) == ["test_fraction"]


def test_error_message_is_the_first_line_without_tensorflow_graph_context():
    error = tf.errors.InvalidArgumentError(
        None, None, "assertion failed: [data/train-0.tfrecord.gz: truncated or corrupt "
        "TFRecord file: read 3 records, 9 expected]\n\t [[{{node Assert}}]] "
        "[Op:IteratorGetNext]")
    assert cli.error_message(error) == ("data/train-0.tfrecord.gz: truncated or corrupt "
                                        "TFRecord file: read 3 records, 9 expected")
    assert cli.error_message(FileNotFoundError("No files match 'x-*'.")) == (
        "No files match 'x-*'.")
    assert cli.error_message(FileNotFoundError(2, "No such file or directory", "a.csv")) == (
        "a.csv: No such file or directory")


@pytest.fixture
def verbosity():
    saved = absl_logging.get_verbosity()
    yield absl_logging.set_verbosity
    absl_logging.set_verbosity(saved)


def _raises(error):
    def main(argv):
        raise error
    return main


@pytest.mark.parametrize("error, status", [
    (app.UsageError("--output_dir is required."), cli.USAGE_ERROR),
    (FileNotFoundError("No files match 'x-*'."), cli.RUN_ERROR),
    (ValueError("train.epochs must be a positive integer."), cli.RUN_ERROR),
    (tf.errors.DataLossError(None, None, "x.tfrecord: corrupted record at 12"),
     cli.RUN_ERROR)])
def test_a_user_error_is_one_line_and_a_status(error, status, capsys, verbosity):
    verbosity(-1)
    with pytest.raises(SystemExit) as exit_info:
        cli._run_main(_raises(error), "ifa-x", ["ifa-x"])
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ifa-x: ")
    assert "Traceback" not in err
    verbosity(1)  # --verbosity=1: the exception, with its traceback
    with pytest.raises(type(error)):
        cli._run_main(_raises(error), "ifa-x", ["ifa-x"])


def test_a_bug_is_not_dressed_as_a_user_error(verbosity):
    verbosity(-1)
    with pytest.raises(KeyError):
        cli._run_main(_raises(KeyError("impression")), "ifa-x", ["ifa-x"])


def test_bad_flag_is_one_line_and_verbosity_defaults_per_command(capsys):
    flag_values = flags.FlagValues()
    flags.DEFINE_integer("verbosity", -1, "absl's", flag_values=flag_values)
    flags.DEFINE_integer("num_requests", 10, "ours", flag_values=flag_values)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_flags(["ifa-x", "--num_request=5"], "ifa-x", flag_values=flag_values)
    assert exit_info.value.code == cli.USAGE_ERROR
    assert capsys.readouterr().err == (
        "ifa-x: Unknown command line flag 'num_request'. Did you mean: num_requests ? "
        "See --help.\n")
    flag_values.unparse_flags()
    cli.parse_flags(["ifa-x"], "ifa-x", default_verbosity=0, flag_values=flag_values)
    assert flag_values.verbosity == 0


def test_progress_off_a_terminal_is_a_line_per_tenth(caplog, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    progress = cli.progress_reporter("request")
    with caplog.at_level(logging.INFO, logger="absl"):
        for done in range(1, 31):
            progress(done, 30)
    assert [r.getMessage() for r in caplog.records] == [
        f"{done} / 30 requests" for done in range(3, 31, 3)]


def test_every_console_script_reports_a_user_error_in_one_quiet_line(tmp_path):
    """Each command in its own process, as a user runs it, all at once (one TensorFlow
    import's wait): a mistake typical of each, with TF_CPP_MIN_LOG_LEVEL left to us."""
    missing = tmp_path / "missing"
    cases = {
        "ifa-data": (["from-log", f"--output_dir={tmp_path / 'data'}",
                      f"--input={missing}.csv", "--columns=user,item,timestamp,action",
                      "--actions=pv:click"], cli.USAGE_ERROR, f"--input={missing}.csv"),
        "ifa-train": (["--model=avg_pooling", f"--model_dir={tmp_path / 'run'}",
                       f"--train_data={missing}/train-*"], cli.USAGE_ERROR,
                      "matches no files"),
        "ifa-export": ([f"--model_dir={missing}", f"--export_base={tmp_path / 'export'}"],
                       cli.RUN_ERROR, f"--model_dir {missing} does not exist"),
        "ifa-serve": (["--port=http"], cli.USAGE_ERROR, "--port"),
        "ifa-bench": (["--m_values=10,ten"], cli.USAGE_ERROR, "--m_values"),
    }
    env = {name: value for name, value in os.environ.items()
           if name != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])

    def start(*argv):
        return subprocess.Popen([sys.executable, "-m", "ifa_tf_console", *argv], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    processes = {command: start(command, *argv) for command, (argv, _, _) in cases.items()}
    helpfull = start("ifa-data", "from-log", "--helpfull")
    for command, process in processes.items():
        out, err = process.communicate(timeout=180)
        _, status, named = cases[command]
        assert process.returncode == status, (command, err)
        assert err.count("\n") == 1 and err.startswith(f"{command}: "), (command, err)
        assert named in err, (command, err)
        assert "Traceback" not in err and not _CPP_LOG.search(err), (command, err)
    out, err = helpfull.communicate(timeout=180)
    assert helpfull.returncode in (0, 1), err  # absl exits 1 after --help*
    assert "--test_fraction" in out and "--input" in out
    assert not re.search(r"absl\.testing|--test_srcdir|--test_tmpdir|--test_random_seed|"
                         r"--xml_output_file", out)
    assert not _CPP_LOG.search(err), err


# A typical mistake of each command, answered from its flags alone.
_MISTAKES = {
    "ifa-data": ["synthetic", "--num_request=5"],
    "ifa-train": ["--model=ifa_tiny", "--model_dir=/nonexistent/run", "--train_data=x"],
    "ifa-export": ["--model_dir=/nonexistent/run", "--export_base=/nonexistent/export"],
    "ifa-serve": ["--port=70000", "--model_base_path=/nonexistent"],
    "ifa-bench": ["--n_values=ten"],
    "ifa-query": ["--nonexistent_flag"],
    "ifa-state": ["frobnicate"],
}


def test_mistakes_answer_before_tensorflow_loads():
    """Each command checks its flags before importing TensorFlow (issue 26: a mistake took
    20-28 s under load): the process exits without TensorFlow or Keras in sys.modules."""
    script = """
import sys, time
import ifa_tf_console
started = time.monotonic()
try:
    ifa_tf_console.run_command(sys.argv[1], sys.argv[1:])
except SystemExit as exit_info:
    code = exit_info.code
from ifa_tf import _deferred
print(code, _deferred.is_loaded("tensorflow"), "keras" in sys.modules,
      round(time.monotonic() - started, 3))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    for command, argv in _MISTAKES.items():
        process = subprocess.run([sys.executable, "-c", script, command, *argv], cwd=REPO,
                                 env=env, capture_output=True, text=True, timeout=120)
        code, tensorflow, keras_loaded, seconds = process.stdout.split()
        assert code in (str(cli.USAGE_ERROR), str(cli.RUN_ERROR)), (command, process.stderr)
        assert process.stderr.startswith(f"{command}: ") and process.stderr.count("\n") == 1
        assert (tensorflow, keras_loaded) == ("False", "False"), (command, process.stderr)
        assert float(seconds) < 2.0, (command, seconds)


def test_help_lists_the_subcommands_and_tells_progress_from_logging():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}

    def help_text(*argv):
        return subprocess.run([sys.executable, "-m", "ifa_tf_console", *argv, "--help"],
                              cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120).stdout

    data_help = help_text("ifa-data")
    assert re.search(r"^Subcommands:\n +synthetic .*\n +from-log ", data_help, re.MULTILINE)
    train_help = help_text("ifa-train")
    assert "compare RUN_DIR" in train_help or "ifa-train compare" in train_help
    assert re.search(r"--verbose: .*Progress display.*Not logging", " ".join(
        train_help.split()))
    assert re.search(r"--verbosity: Log detail.*Not the progress display", " ".join(
        train_help.split()))


def test_progress_bar_fits_100_columns_without_ansi_codes():
    from ifa_tf.progress import ProgressBar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = ProgressBar(10_000, "request", "a prefix that is rather long", stream)
    lines = [bar.line(done, "loss 0.41234 " * 20, elapsed=3.0 * done)
             for done in (0, 1, 5_000, 10_000)]
    assert all(len(line) < 100 for line in lines), [len(line) for line in lines]
    assert "[====" in lines[2] and "5000/10000 requests" in lines[2]
    for done in range(0, 10_001, 2_500):
        bar.update(done, force=True)
    bar.close()
    assert "\x1b" not in stream.getvalue()
    assert all(len(piece) < 100 for piece in stream.getvalue().split("\r"))


def test_failed_run_leaves_no_new_empty_directory(tmp_path, verbosity):
    verbosity(-1)
    flag_values = flags.FLAGS
    created = tmp_path / "run"

    def main(argv):
        os.makedirs(created / "logs")
        (created / "config.yaml").write_text("model: {}\n")
        raise ValueError("bad data")

    flags.DEFINE_string("test_output_dir", None, "a test's", flag_values=flag_values)
    try:
        flag_values.test_output_dir = str(created)
        with pytest.raises(SystemExit):
            cli._run_main(main, "ifa-x", ["ifa-x"], creates=("test_output_dir",))
        assert not created.exists()
        existing = tmp_path / "existing"  # a directory the run did not create stays
        existing.mkdir()
        flag_values.test_output_dir = str(existing)
        with pytest.raises(SystemExit):
            cli._run_main(_raises(ValueError("x")), "ifa-x", ["ifa-x"],
                          creates=("test_output_dir",))
        assert existing.exists()
    finally:
        delattr(flag_values, "test_output_dir")
