"""A diverged run never reaches serving (issue 24): a NaN or infinite loss or weight ends
`ifa-train` with one line and a non-zero exit, writes no model.keras, metrics.json or
checkpoint from the diverged weights, the streaming protocol stops at the step that
diverged, and `ifa-export` (API and command) refuses such weights. Also: a resume
refused for a changed config leaves config.yaml alone, and a resumed run's metrics.json
holds the history of every epoch."""

import json
import os
import re
import subprocess
import sys
import warnings

import h5py
import keras
import numpy as np
import pytest
import yaml

import ifa_tf
from ifa_tf import export, training
from ifa_tf.metrics import CandidateSetEvaluator
from ifa_tf.schema import FeatureSchema
from test_training import make_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [("data.batch_size", 8), ("train.verbose", 0), ("train.epochs", 2),
        ("model.embedding_dim", 4), ("model.tower_units", [8])]


def tiny_config(data_dir, *overrides):
    return training.load_config("avg_pooling", overrides=[
        ("data.train_data", os.path.join(data_dir, "train-*")),
        ("data.eval_data", os.path.join(data_dir, "test-*")),
        ("data.schema", os.path.join(data_dir, "schema.json")), *TINY, *overrides])


def all_finite(path):
    with h5py.File(path, "r") as f:
        arrays = []
        f.visititems(lambda name, item: arrays.append(item[()])
                     if isinstance(item, h5py.Dataset) and item.dtype.kind == "f" else None)
    return all(np.isfinite(a).all() for a in arrays)


def test_ifa_train_with_a_huge_learning_rate_fails_with_one_line(six_step_data, tmp_path):
    model_dir = tmp_path / "run"
    command = [sys.executable, "-m", "ifa_tf.cli.train", "--model=avg_pooling",
               f"--train_data={six_step_data}/train-*", f"--eval_data={six_step_data}/test-*",
               f"--model_dir={model_dir}", f"--schema={six_step_data}/schema.json",
               "--batch_size=8", "--verbose=0", "--epochs=2", "--learning_rate=1e30",
               "--set=model.embedding_dim=4", "--set=model.tower_units=[8]"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert process.returncode == 1, process.stdout + process.stderr
    lines = [line for line in process.stderr.splitlines() if line.startswith("ifa-train:")]
    assert len(lines) == 1, process.stderr
    assert "Training diverged: the loss became nan at epoch 1" in lines[0]
    assert "learning_rate=1e+30" in lines[0]
    assert "trained avg_pooling" not in process.stdout
    assert "Invalid loss" not in process.stdout + process.stderr
    assert not (model_dir / "model.keras").exists()
    assert not (model_dir / "metrics.json").exists()
    checkpoints = list((model_dir / "checkpoints").glob("*.h5")) if (
        model_dir / "checkpoints").exists() else []
    assert all(all_finite(path) for path in checkpoints)


def test_weights_that_turn_nan_without_a_nan_loss_are_not_saved(six_step_data, tmp_path):
    """The loss of the last step may still be finite; the weights are checked too."""

    class PoisonAtTheEnd(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            variable = self.model.weights[0]
            value = np.asarray(variable).copy()
            value.flat[0] = np.inf
            variable.assign(value)

    workdir = tmp_path / "run"
    with pytest.raises(training.TrainingDivergedError,
                       match=r"1 weights hold NaN or infinite values \(.*: 1 of "):
        training.train_and_evaluate(tiny_config(six_step_data), str(workdir),
                                    callbacks=[PoisonAtTheEnd()])
    assert not (workdir / "model.keras").exists()
    assert not (workdir / "metrics.json").exists()


def test_streaming_protocol_stops_at_the_first_non_finite_loss():
    """The streaming protocol checks each step's loss and stops at the one that diverged,
    before training on the rest of the stream."""
    schema = FeatureSchema(embedding_buckets={"user_id": 40, "item_id": 64, "category_id": 8,
                                              "author_id": 16})
    keras.utils.set_random_seed(0)
    model = ifa_tf.zoo.build("avg_pooling", schema=schema, embedding_dim=4, tower_units=[8])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e30))
    stream = [make_batch(schema, seed) for seed in range(6)]
    with pytest.raises(training.TrainingDivergedError) as raised:
        training.streaming_train_and_evaluate(model, stream, CandidateSetEvaluator(schema.tasks))
    match = re.fullmatch(r"Training diverged: the loss became (nan|inf) at step (\d+); nothing "
                         r"trained was written\. Lower train\.learning_rate \(--learning_rate\) "
                         r"and train again\.", str(raised.value))
    assert match, raised.value
    step = int(match.group(2))
    assert step < len(stream)
    assert int(model.optimizer.iterations) == step  # no step after the one that diverged


def test_export_refuses_non_finite_weights(tmp_path):
    model = ifa_tf.zoo.build("avg_pooling", embedding_dim=4, tower_units=[8])
    variable = model.weights[0]
    value = np.asarray(variable).copy()
    value.flat[:2] = np.nan
    variable.assign(value)
    with pytest.raises(ValueError, match=rf"Refusing to export model 'avg_pooling': 1 of its "
                                         rf"\d+ weights hold NaN or infinite values "
                                         rf"\({variable.path}: 2 of \d+ values\)"):
        export.export_saved_model(model, tmp_path / "base", warmup_shapes=())
    assert not (tmp_path / "base").exists() or not os.listdir(tmp_path / "base")


def test_ifa_export_refuses_non_finite_weights_in_one_line(tmp_path):
    model = ifa_tf.zoo.build("avg_pooling", embedding_dim=4, tower_units=[8])
    variable = model.weights[0]
    value = np.asarray(variable).copy()
    value.flat[0] = np.inf
    variable.assign(value)
    model.save(tmp_path / "model.keras")
    export_base = tmp_path / "export"
    # The console script, as a user runs it: it also keeps TensorFlow's C++ logs quiet.
    command = [sys.executable, "-m", "ifa_tf_console", "ifa-export",
               f"--model_dir={tmp_path}", f"--export_base={export_base}"]
    env = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert process.returncode == 1, process.stdout + process.stderr
    assert process.stderr.count("\n") == 1, process.stderr
    assert process.stderr.startswith(
        f"ifa-export: Refusing to export model 'avg_pooling': 1 of its {len(model.weights)} "
        f"weights hold NaN or infinite values ({variable.path}: 1 of "), process.stderr
    assert process.stdout == ""
    assert not export_base.exists()

class Interrupted(Exception):
    pass


class InterruptAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Interrupted()


def test_resume_keeps_history_and_a_refused_one_keeps_config_yaml(six_step_data, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(six_step_data, ("train.epochs", 3), ("data.eval_data", ""))
    with pytest.raises(Interrupted):
        training.train_and_evaluate(config, workdir, callbacks=[InterruptAt(2)])
    config_yaml = os.path.join(workdir, "config.yaml")
    with open(config_yaml) as f:
        written = f.read()

    changed = tiny_config(six_step_data, ("train.epochs", 3), ("data.eval_data", ""),
                          ("model.embedding_dim", 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="does not fit this model"):
            training.train_and_evaluate(changed, workdir)
    assert not [w for w in caught if "Skipping nested container" in str(w.message)]
    with open(config_yaml) as f:
        assert f.read() == written

    result = training.train_and_evaluate(config, workdir)
    assert len(result["history"]["loss"]) == 3
    with open(os.path.join(workdir, "metrics.json")) as f:
        assert json.load(f)["history"] == result["history"]
    with open(os.path.join(workdir, "history.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1, 2]
    with open(config_yaml) as f:
        assert training.Config.from_dict(yaml.safe_load(f)) == config


class _WarningModel:
    """Loads by warning, as Keras does when a file lacks a nested layer's weights."""

    def __init__(self, message):
        self.message = message

    def load_weights(self, path):
        warnings.warn(self.message, UserWarning)


def test_a_file_keras_loads_only_in_part_does_not_fit():
    from ifa_tf.training import checkpointing

    skipped = ("Skipping nested container at '_operations_by_depth/container_12': no "
               "matching group found in the saved file.")
    with pytest.raises(ValueError, match=r"backup.weights.h5 does not fit this model.*"
                                         r"container_12"):
        checkpointing._load_weights(_WarningModel(skipped), "backup.weights.h5")
    with pytest.warns(UserWarning, match="something else"):  # other warnings pass through
        checkpointing._load_weights(_WarningModel("something else"), "backup.weights.h5")
