"""`--runner` and `--pipeline_options`: the flags of the commands that run on Apache Beam
(`ifa-data from-log`, `ifa-state build`), checked before TensorFlow loads.

With `--runner`, the command's work runs as a Beam pipeline (installed with
`pip install 'ifa_tf[beam]'`): `--runner=DirectRunner` on this machine, in Beam's
multi-process mode with one worker per core; `DataflowRunner`, `FlinkRunner`,
`SparkRunner` or `PortableRunner` on a cluster, configured by `--pipeline_options`, which
Beam reads as it reads its own command line:

    --runner=DirectRunner --pipeline_options='--direct_num_workers=1'
    --runner=DataflowRunner --pipeline_options='--project=my-project
        --region=europe-west1 --temp_location=gs://my-bucket/tmp'
    --runner=FlinkRunner --pipeline_options='--flink_master=flink-host:8081
        --environment_type=LOOPBACK'
    --runner=SparkRunner --pipeline_options='--spark_master_url=spark://spark-host:7077'

One option is ours (`ifa_tf.data.beam_options`): `--user_groups=N`, the number of groups of
users the grouping by user runs in, one after another. By default, on the DirectRunner
(whose workers are sent their whole share of a step's input at once, so that a worker's
memory would follow the log), one per 32 MiB of log for each worker; one on a cluster's
runner.
"""

import contextlib
import importlib.util
import logging
import os
import shlex
import sys
import tempfile

from absl import app, flags

from ifa_tf.cli import did_you_mean

RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner",
           "PrismRunner")
INSTALL_HINT = "pip install 'ifa_tf[beam]'"
# Beam's own lines a run prints on this machine (worker start-up, option parsing, the local
# job service); shown from --verbosity=0.
_BEAM_LOGGERS = ("apache_beam", "root")


def define_flags(flag_values=flags.FLAGS):
    flags.DEFINE_string("runner", None, "Run as an Apache Beam pipeline on this runner: "
                        f"{', '.join(RUNNERS)} (DirectRunner: this machine, one worker per "
                        f"core). Needs {INSTALL_HINT}.", flag_values=flag_values)
    flags.DEFINE_string("pipeline_options", None, "With --runner: Beam pipeline options, "
                        "as on Beam's command line (e.g. '--project=p --region=r "
                        "--temp_location=gs://b/tmp' for Dataflow, '--flink_master=host:8081' "
                        "for Flink, '--direct_num_workers=1'); ours: '--user_groups=N', "
                        "the groups of users the grouping by user runs in (default: one per "
                        "32 MiB of log and worker on the DirectRunner, one on other "
                        "runners).",
                        flag_values=flag_values)


def check(flag_values=flags.FLAGS):
    """Raises `app.UsageError` for a runner Beam does not have, options Beam does not know,
    or a missing Apache Beam install; nothing to check without --runner."""
    runner = flag_values["runner"].value
    if runner is None:
        if flag_values["pipeline_options"].value is not None:
            raise app.UsageError("--pipeline_options applies with --runner only.")
        return
    if runner not in RUNNERS:
        raise app.UsageError(f"--runner={runner} is not a Beam runner"
                             f"{did_you_mean(runner, RUNNERS)}; valid: {list(RUNNERS)}.")
    if importlib.util.find_spec("apache_beam") is None:
        raise app.UsageError(f"--runner={runner} needs Apache Beam: {INSTALL_HINT}.")
    unknown = sorted(unknown_options(pipeline_arguments(flag_values)))
    if unknown:
        raise app.UsageError(f"--pipeline_options: Beam has no option "
                             f"{', '.join('--' + name for name in unknown)}.")
    groups = user_groups(pipeline_arguments(flag_values))
    if groups is not None and groups < 1:
        raise app.UsageError(f"--pipeline_options: --user_groups must be a positive integer. "
                             f"Received: --user_groups={groups}")


def pipeline_arguments(flag_values=flags.FLAGS):
    """--pipeline_options split as a shell splits it."""
    text = flag_values["pipeline_options"].value or ""
    try:
        arguments = shlex.split(text)
    except ValueError as error:
        raise app.UsageError(f"--pipeline_options={text!r}: {error}.") from None
    given = [a for a in arguments if a.split("=")[0] == "--runner"]
    if given:
        raise app.UsageError(f"--pipeline_options: pass the runner as --runner, not "
                             f"{given[0]!r}.")
    return arguments


def unknown_options(arguments):
    """The names in `arguments` that no Beam pipeline option reads (Beam's, and ours:
    `beam_options.ConversionOptions`)."""
    with quiet_beam():
        from apache_beam.options.pipeline_options import PipelineOptions

        from ifa_tf.data import beam_options  # noqa: F401 - registers our options

        options = PipelineOptions(arguments)
        return set(options.get_all_options(retain_unknown_options=True)) - set(
            options.get_all_options())


def options(flag_values=flags.FLAGS):
    """The `PipelineOptions` the flags give, or None without --runner."""
    return pipeline_options(flag_values["runner"].value, flag_values["pipeline_options"].value)


def user_groups(arguments):
    """`--user_groups` of `arguments` (None where not given)."""
    with quiet_beam():
        from apache_beam.options.pipeline_options import PipelineOptions

        from ifa_tf.data import beam_options

        return PipelineOptions(arguments).view_as(beam_options.ConversionOptions).user_groups


def pipeline_options(runner, text=None):
    """The `PipelineOptions` of `--runner=runner --pipeline_options=text` (None without a
    runner)."""
    if runner is None:
        return None
    try:
        arguments = shlex.split(text or "")
    except ValueError as error:
        raise app.UsageError(f"--pipeline_options={text!r}: {error}.") from None
    with quiet_beam():
        from ifa_tf.data import beam_pipeline

        return beam_pipeline.default_options(runner, extra=arguments)


@contextlib.contextmanager
def quiet_beam():
    """Beam's warnings on import and option parsing are not the user's business at the
    default verbosity: shown from --verbosity=0 on."""
    loggers = [logging.getLogger(name) for name in _BEAM_LOGGERS]
    levels = [logger.level for logger in loggers]
    if not _verbose():
        for logger in loggers:
            logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def quiet_workers():
    """The DirectRunner's workers are processes that print their start-up and shut-down to
    this terminal: at the default verbosity, while they run, the terminal's stderr goes to
    a file, of which only ifa_tf's warnings and errors are shown (a skipped malformed row,
    say). A failed run is reported by its error, as any other."""
    if _verbose():
        yield
        return
    with tempfile.TemporaryFile("w+b") as captured, quiet_beam():
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines():
                if line.startswith(("WARNING:ifa_tf", "ERROR:ifa_tf")):
                    print(line.split(":", 2)[2], file=sys.stderr)


def _verbose():
    return flags.FLAGS.is_parsed() and "verbosity" in flags.FLAGS and (
        flags.FLAGS.verbosity >= 0)
