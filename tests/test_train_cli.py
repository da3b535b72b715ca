"""`ifa-train`'s output: the run summary shows only the columns that exist, and `ifa-train
compare` puts runs side by side; the names the commands keep to check flags before
TensorFlow loads equal the library's."""

import json
import os
import subprocess
import sys

import pytest

from ifa_tf.cli import data as data_cli
from ifa_tf.cli import train as train_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def metrics(model, steps, wall, tasks):
    return {"model": model, "train_steps": steps, "wall_time_s": wall, "protocol": "split",
            "eval": {"num_requests": 100, "tasks": tasks}}


def write_run(directory, content):
    os.makedirs(directory)
    with open(os.path.join(directory, "metrics.json"), "w") as f:
        json.dump(content, f)
    return str(directory)


def test_compare_prints_every_task_steps_and_wall_time(tmp_path):
    a = write_run(tmp_path / "a", metrics("ifa", 1200, 312.4, {
        "impression": {"auc": 0.81234, "gauc": 0.7}, "click": {"auc": 0.75, "gauc": 0.6612}}))
    b = write_run(tmp_path / "b", metrics("twin", 900, 95.0, {
        "impression": {"auc": 0.8, "gauc": 0.69}, "click": {"auc": 0.74, "gauc": 0.65},
        "like": {"auc": 0.7, "gauc": 0.6}}))
    table = train_cli.format_comparison(train_cli.read_runs([a, b]))
    lines = table.splitlines()
    assert lines[0].split() == ["run", "model", "steps", "wall", "time", "impression",
                                "click", "like"]
    assert lines[1].split() == ["AUC", "GAUC"] * 3
    assert lines[2].split() == [a, "ifa", "1200", "312", "s", "0.8123", "0.7000", "0.7500",
                                "0.6612", "-", "-"]
    assert lines[3].split() == [b, "twin", "900", "95", "s", "0.8000", "0.6900", "0.7400",
                                "0.6500", "0.7000", "0.6000"]
    # Columns line up: every AUC sits under its task's header.
    assert lines[2].index("0.8123") < lines[0].index("impression") + len("impression")
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        train_cli.read_runs([a, str(tmp_path)])


@pytest.mark.parametrize("content, field", [
    ([1, 2], "the top level must be a JSON object"),
    ({"model": ["ifa"]}, "model must be a string or null"),
    ({"train_steps": "many"}, "train_steps must be a number or null"),
    ({"wall_time_s": True}, "wall_time_s must be a number or null"),
    ({"eval": [1]}, "eval must be an object or null"),
    ({"eval": {"tasks": [1]}}, "eval.tasks must be an object of tasks"),
    ({"eval": {"tasks": {"click": 0.7}}}, "eval.tasks.click must be an object of metrics"),
    ({"eval": {"tasks": {"click": {"auc": "0.7"}}}}, "eval.tasks.click.auc must be a number"),
])
def test_compare_names_the_file_and_field_of_a_malformed_metrics_json(tmp_path, content,
                                                                     field):
    """A metrics.json holding [1, 2] used to end in a 27-line AttributeError."""
    run = write_run(tmp_path / "run", content)
    with pytest.raises(ValueError) as error:
        train_cli.format_comparison(train_cli.read_runs([run]))
    message = str(error.value)
    assert message.startswith(os.path.join(run, "metrics.json") + ": " + field)
    assert "\n" not in message


def test_compare_from_the_command_line_without_tensorflow(tmp_path):
    a = write_run(tmp_path / "a", metrics("ifa", 10, 1.0, {"click": {"auc": 0.7, "gauc": 0.6}}))
    script = ("import sys, ifa_tf_console\n"
              "try:\n"
              "    ifa_tf_console.run_command('ifa-train', ['ifa-train', 'compare', sys.argv[1]])\n"
              "except SystemExit as exit_info:\n"
              "    assert not exit_info.code, exit_info.code\n"
              "from ifa_tf import _deferred\n"
              "print(_deferred.is_loaded('tensorflow'))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run([sys.executable, "-c", script, a], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert "0.7000" in process.stdout and process.stdout.splitlines()[-1] == "False"


def test_summary_header_names_only_existing_columns():
    result = {"model": "ifa", "train_steps": 10, "wall_time_s": 3.0, "protocol": "split",
              "eval": {"num_requests": 5, "tasks": {"click": {"auc": 0.7, "gauc": 0.6}}}}
    summary = train_cli.format_summary(result, "runs/x")
    assert "truth_auc" not in summary
    assert summary.splitlines()[2].split() == ["task", "auc", "gauc"]
    result["eval"]["tasks"]["click"]["truth_auc"] = 0.9
    assert "truth_auc: the best any model can score" in train_cli.format_summary(result, "r")


def test_names_kept_by_the_commands_equal_the_librarys():
    from ifa_tf.data import log_converter, simulator
    from ifa_tf.training import config, trainer
    import ifa_tf

    assert data_cli.PRESETS == tuple(log_converter.PRESETS)
    assert data_cli.SYNTHETIC_PRESETS == tuple(simulator.PRESETS)
    assert data_cli.NEGATIVE_SAMPLERS == log_converter.NEGATIVE_SAMPLERS
    assert train_cli.METRICS_FILENAME == trainer.METRICS_FILENAME
    assert config.zoo_config_names() == ifa_tf.zoo.list_models()


def test_fit_progress_lines_fit_100_columns_without_ansi_codes():
    import io

    from ifa_tf.training.progress import FitProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    logs = {"loss": 0.41234, "click_auc": 0.7, "val_loss": 0.5, "val_click_auc": 0.69,
            **{f"task_{i}_auc": 0.5 for i in range(40)}}  # what Keras' bar would print
    for stream, verbose in ((Terminal(), 1), (io.StringIO(), 1), (io.StringIO(), 2)):
        progress = FitProgress(verbose, "click", stream)
        progress.set_params({"epochs": 3, "steps": 50})
        for epoch in range(3):
            progress.on_epoch_begin(epoch)
            for batch in range(50):
                progress.on_train_batch_end(batch, {"loss": 0.5})
            progress.on_epoch_end(epoch, logs)
        text = stream.getvalue()
        assert "\x1b" not in text
        assert all(len(piece) < 100 for line in text.split("\n") for piece in line.split("\r"))
        lines = [line.split("\r")[-1].strip() for line in text.strip().split("\n")]
        assert lines == [f"epoch {e}/3: 50 steps in 0:00, loss 0.4123, click_auc 0.7000, "
                         "val_loss 0.5000, val_click_auc 0.6900" for e in (1, 2, 3)]
        assert ("\r" in text) == isinstance(stream, Terminal)
