"""The crash backup of `ifa-train`: a damaged backup (0 bytes, garbage, truncated) resumes
from the previous good state, then the newest readable checkpoint, then epoch 0, each with a
warning naming the file, which is kept aside; a crash at any point of a write leaves the old
file whole at the final name, and a backup pair never mixes two epochs."""

import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from ifa_tf import training
from ifa_tf.training.trainer import ChiefBackupAndRestore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 4
INTERRUPTED_AT = 3  # epochs finished when the first run is interrupted
# The config of `ifa_train` below, so the CLI can resume a backup written in-process.
TINY = [("data.batch_size", 8), ("train.verbose", 0), ("train.epochs", EPOCHS),
        ("data.eval_data", ""), ("model.embedding_dim", 4), ("model.tower_units", [8])]


def tiny_config(data_dir):
    return training.load_config("avg_pooling", overrides=[
        ("data.train_data", os.path.join(data_dir, "train-*")),
        ("data.schema", os.path.join(data_dir, "schema.json")), *TINY])


class Interrupted(Exception):
    pass


class Recorder(keras.callbacks.Callback):
    """Weights at the start of training and after each epoch, and the first epoch run;
    raises `Interrupted` at the start of epoch `interrupt_at`."""

    def __init__(self, interrupt_at=None):
        super().__init__()
        self.interrupt_at = interrupt_at
        self.epoch_weights = {}
        self.first_epoch = None

    def on_train_begin(self, logs=None):
        self.initial_weights = self.model.get_weights()

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.interrupt_at:
            raise Interrupted()
        if self.first_epoch is None:
            self.first_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_weights[epoch + 1] = self.model.get_weights()


@pytest.fixture(scope="module")
def interrupted(six_step_data, tmp_path_factory):
    """A run stopped after epoch 3: its backup (latest at epoch 3, and epoch 2 where the
    code keeps a previous one), checkpoints of epochs 1-3, and the weights of each epoch."""
    workdir = str(tmp_path_factory.mktemp("interrupted") / "run")
    recorder = Recorder(interrupt_at=INTERRUPTED_AT)
    with pytest.raises(Interrupted):
        training.train_and_evaluate(tiny_config(six_step_data), workdir, callbacks=[recorder])
    return workdir, recorder.epoch_weights


@pytest.fixture
def run_copy(interrupted, tmp_path):
    workdir, epoch_weights = interrupted
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    return copy, epoch_weights


def resume(six_step_data, workdir):
    recorder = Recorder()
    result = training.train_and_evaluate(tiny_config(six_step_data), workdir,
                                         callbacks=[recorder])
    return recorder, result


def assert_same_weights(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)


def warnings_text(caplog):
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def set_aside(path):
    """The file `path` was renamed to when it was found unreadable."""
    found = glob.glob(glob.escape(path) + ".corrupt*")
    assert len(found) == 1, (path, os.listdir(os.path.dirname(path)))
    return found[0]


DAMAGES = {
    "empty": lambda data: b"",  # the reported failure: killed during Keras's rewrite
    "garbage": lambda data: b"\x89HDF not really" * 100,
    "truncated": lambda data: data[:len(data) // 2],
}


def damage_file(path, damage):
    with open(path, "rb") as f:
        damaged = DAMAGES[damage](f.read())
    with open(path, "wb") as f:
        f.write(damaged)
    return damaged


def test_empty_latest_backup_resumes_from_the_previous_one(six_step_data, run_copy, caplog):
    workdir, epoch_weights = run_copy
    latest = os.path.join(workdir, "backup", "latest.weights.h5")
    damage_file(latest, "empty")

    with caplog.at_level(logging.INFO):
        recorder, result = resume(six_step_data, workdir)

    assert recorder.first_epoch == INTERRUPTED_AT - 1
    assert_same_weights(recorder.initial_weights, epoch_weights[INTERRUPTED_AT - 1])
    # The history of the epochs the previous backup holds (the interrupted run's), then
    # this run's.
    assert len(result["history"]["loss"]) == EPOCHS
    assert latest in warnings_text(caplog)
    # Kept for a person to look at, even after the backup is deleted at the end.
    kept = set_aside(latest)
    assert kept in warnings_text(caplog)
    assert os.path.getsize(kept) == 0
    assert os.path.exists(os.path.join(workdir, "model.keras"))


def test_both_backups_unreadable_resume_from_the_newest_readable_checkpoint(
        six_step_data, run_copy, caplog):
    workdir, epoch_weights = run_copy
    backup = os.path.join(workdir, "backup")
    newest_checkpoint = os.path.join(workdir, "checkpoints", "epoch-0003.weights.h5")
    damaged = [os.path.join(backup, "latest.weights.h5"),
               os.path.join(backup, "previous.weights.h5"), newest_checkpoint]
    for path in damaged:
        with open(path, "wb") as f:
            f.write(b"not HDF5")

    with caplog.at_level(logging.INFO):
        recorder, _ = resume(six_step_data, workdir)

    assert recorder.first_epoch == 2  # from epoch-0002.weights.h5
    assert_same_weights(recorder.initial_weights, epoch_weights[2])
    for path in damaged:
        assert path in warnings_text(caplog)
    assert "epoch-0002.weights.h5 at epoch 2" in caplog.text
    set_aside(damaged[0])
    set_aside(damaged[1])


def ifa_train(six_step_data, model_dir):
    """`ifa-train` with the config of `tiny_config`."""
    command = [sys.executable, "-m", "ifa_tf.cli.train", "--model=avg_pooling",
               f"--train_data={six_step_data}/train-*", f"--model_dir={model_dir}",
               f"--schema={six_step_data}/schema.json", f"--epochs={EPOCHS}", "--batch_size=8",
               "--verbose=0", "--set=model.embedding_dim=4", "--set=model.tower_units=[8]"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


def test_ifa_train_reruns_past_an_empty_backup_naming_it(six_step_data, run_copy):
    workdir, _ = run_copy
    latest = os.path.join(workdir, "backup", "latest.weights.h5")
    with open(latest, "wb"):
        pass  # what a SIGKILL during Keras's in-place rewrite left

    process = ifa_train(six_step_data, workdir)

    assert process.returncode == 0, process.stdout[-3000:]
    assert latest in process.stdout
    assert os.path.exists(os.path.join(workdir, "metrics.json"))


# ------------------------------------------------------------------- crashes mid-write
def small_model(value=0.0):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD())
    model.optimizer.build(model.trainable_variables)
    model.set_weights([np.full_like(w, value) for w in model.get_weights()])
    return model


def backup_epoch(backup, model, epoch):
    """What `fit` does at the end of (1-based) `epoch`."""
    backup.set_model(model)
    model.set_weights([np.full_like(w, epoch) for w in model.get_weights()])
    backup.on_epoch_end(epoch - 1)


def restore(backup_dir):
    """`(epoch, weight value)` a new run restores from `backup_dir`."""
    model = small_model(value=-1.0)
    backup = ChiefBackupAndRestore(backup_dir)
    backup.set_model(model)
    backup.on_train_begin()
    values = {float(v) for w in model.get_weights() for v in w.ravel()}
    assert len(values) == 1, values  # one epoch's weights, not a mix
    return model._initial_epoch or 0, values.pop()


def file_contents(directory):
    contents = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            contents[name] = f.read()
    return contents


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_latest_backup_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    backup_dir = str(tmp_path / "backup")
    backup = ChiefBackupAndRestore(backup_dir)
    model = small_model()
    backup_epoch(backup, model, 1)
    backup_epoch(backup, model, 2)
    latest = os.path.join(backup_dir, "latest.weights.h5")
    damaged = damage_file(latest, damage)

    with caplog.at_level(logging.WARNING):
        assert restore(backup_dir) == (1, 1.0)

    assert latest in warnings_text(caplog)
    with open(set_aside(latest), "rb") as f:
        assert f.read() == damaged


def test_nothing_readable_starts_from_scratch_with_a_warning(tmp_path, caplog):
    backup_dir = str(tmp_path / "backup")
    backup = ChiefBackupAndRestore(backup_dir)
    model = small_model()
    backup_epoch(backup, model, 1)
    backup_epoch(backup, model, 2)
    damaged = [os.path.join(backup_dir, name)
               for name in ("latest.weights.h5", "previous.weights.h5")]
    for path in damaged:
        with open(path, "wb"):
            pass

    with caplog.at_level(logging.WARNING):
        assert restore(backup_dir) == (0, -1.0)  # the new model's own weights

    assert "training starts from epoch 0" in warnings_text(caplog)
    for path in damaged:
        assert path in warnings_text(caplog)
        set_aside(path)


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def test_a_crash_while_writing_the_backup_leaves_the_old_one_whole(tmp_path, monkeypatch):
    backup_dir = str(tmp_path / "backup")
    model = small_model()
    backup = ChiefBackupAndRestore(backup_dir)
    backup_epoch(backup, model, 1)
    before = file_contents(backup_dir)

    def killed_mid_write(filepath, overwrite=True):
        with open(filepath, "wb") as f:
            f.write(before["latest.weights.h5"][:100])
        raise Killed()

    monkeypatch.setattr(model, "save_weights", killed_mid_write)
    with pytest.raises(Killed):
        backup_epoch(backup, model, 2)
    monkeypatch.undo()

    after = file_contents(backup_dir)
    for name, content in before.items():  # no partial file at the final names
        assert after[name] == content, name
    assert restore(backup_dir) == (1, 1.0)


def test_a_kill_right_after_the_backup_keeps_every_epochs_history(six_step_data, tmp_path,
                                                                 monkeypatch):
    """The history line of an epoch is on disk before the backup says the epoch is done."""
    workdir = str(tmp_path / "run")
    backup_epoch_end = ChiefBackupAndRestore.on_epoch_end

    def backed_up_then_killed(self, epoch, logs=None):
        backup_epoch_end(self, epoch, logs)
        if epoch + 1 == 2:
            raise Killed()

    monkeypatch.setattr(ChiefBackupAndRestore, "on_epoch_end", backed_up_then_killed)
    with pytest.raises(Killed):
        training.train_and_evaluate(tiny_config(six_step_data), workdir)
    monkeypatch.undo()

    recorder, result = resume(six_step_data, workdir)
    assert recorder.first_epoch == 2
    assert len(result["history"]["loss"]) == EPOCHS


@pytest.mark.parametrize("renames_done", [0, 1, 2, 3])
def test_a_crash_between_the_renames_of_a_backup_never_mixes_two_epochs(
        tmp_path, monkeypatch, renames_done):
    backup_dir = str(tmp_path / "backup")
    model = small_model()
    backup = ChiefBackupAndRestore(backup_dir)
    backup_epoch(backup, model, 1)
    backup_epoch(backup, model, 2)

    real_replace, calls = os.replace, []

    def replace_then_killed(source, destination):
        if len(calls) == renames_done:
            raise Killed()
        calls.append(destination)
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_then_killed)
    with pytest.raises(Killed):
        backup_epoch(backup, model, 3)
    monkeypatch.undo()

    epoch, value = restore(backup_dir)
    # The weights belong to the epoch the metadata names; only a complete epoch-3 pair
    # (never reached here) would resume at 3.
    assert value == epoch == 2


def test_a_crash_between_the_weights_and_the_epoch_resumes_a_matching_pair(
        tmp_path, monkeypatch):
    backup_dir = str(tmp_path / "backup")
    model = small_model()
    backup = ChiefBackupAndRestore(backup_dir)
    backup_epoch(backup, model, 1)
    backup_epoch(backup, model, 2)

    def killed(*args, **kwargs):  # the epoch is written after the weights
        raise Killed()

    monkeypatch.setattr(json, "dumps", killed)
    with pytest.raises(Killed):
        backup_epoch(backup, model, 3)
    monkeypatch.undo()

    assert restore(backup_dir) == (2, 2.0)  # not epoch 3's weights resumed at epoch 2


def test_a_crash_while_writing_model_keras_leaves_the_old_model_whole(
        six_step_data, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    workdir.mkdir()
    model_path = workdir / "model.keras"
    model_path.write_bytes(b"the model of an earlier run")
    config = training.load_config("avg_pooling", overrides=[
        ("data.train_data", os.path.join(six_step_data, "train-*")),
        ("data.schema", os.path.join(six_step_data, "schema.json")), *TINY,
        ("train.epochs", 1), ("train.checkpoint_every_epochs", 0)])

    def killed_mid_write(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise Killed()

    monkeypatch.setattr(keras.Model, "save", killed_mid_write)
    with pytest.raises(Killed):
        training.train_and_evaluate(config, str(workdir))
    monkeypatch.undo()

    assert model_path.read_bytes() == b"the model of an earlier run"


def test_a_finished_run_is_not_trained_over_from_epoch_0(six_step_data, tmp_path):
    """A re-run of a finished run directory whose model.keras was deleted and checkpoint
    truncated used to retrain from scratch with exit 0, overwriting its history."""
    from ifa_tf.training import checkpointing, run_directory, trainer

    workdir = str(tmp_path / "run")
    config = training.load_config("avg_pooling", overrides=[
        ("data.train_data", os.path.join(six_step_data, "train-*")),
        ("data.schema", os.path.join(six_step_data, "schema.json")), *TINY,
        ("train.epochs", 2)])
    training.train_and_evaluate(config, workdir)
    os.remove(os.path.join(workdir, "model.keras"))
    damage_file(os.path.join(workdir, "checkpoints", "epoch-0002.weights.h5"), "truncated")
    kept = tree_contents(workdir)
    with pytest.raises(run_directory.FinishedRunError) as error:
        training.train_and_evaluate(config, workdir)
    assert str(error.value).startswith(
        f"{workdir} holds a finished run (metrics.json, history.jsonl (2 epochs)) and no "
        "backup to resume from")
    assert "\n" not in str(error.value)
    assert tree_contents(workdir) == kept  # nothing was overwritten
    # What ifa-train checks before TensorFlow loads is the same rule.
    with pytest.raises(run_directory.FinishedRunError):
        run_directory.check_not_finished(workdir)
    assert (run_directory.METRICS_FILENAME, run_directory.HISTORY_FILENAME) == (
        trainer.METRICS_FILENAME, trainer.HISTORY_FILENAME)
    assert run_directory.BACKUP_FILES == checkpointing._LATEST + checkpointing._PREVIOUS


def tree_contents(directory):
    contents = {}
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                contents[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return contents
