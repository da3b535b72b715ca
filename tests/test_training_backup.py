"""Crash safety of `ifa_tf.training`: a crash at any point of a write leaves the old file
whole at the final name."""

import os

import keras
import pytest

from ifa_tf import training

EPOCHS = 4
TINY = [("data.batch_size", 8), ("train.verbose", 0), ("train.epochs", EPOCHS),
        ("data.eval_data", ""), ("model.embedding_dim", 4), ("model.tower_units", [8])]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, write_tiny_dataset):
    """48 training requests: 6 steps an epoch."""
    return write_tiny_dataset(
        str(tmp_path_factory.mktemp("tiny_data")),
        {"user_id": 101, "item_id": 509, "category_id": 29, "author_id": 103},
        num_requests=64, seed=3, max_seq_len=20, max_candidates=8, num_items=500,
        num_authors=100, truth_samples=4, test_fraction=0.25)


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def test_a_crash_while_writing_model_keras_leaves_the_old_model_whole(
        tiny_data, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    workdir.mkdir()
    model_path = workdir / "model.keras"
    model_path.write_bytes(b"the model of an earlier run")
    config = training.load_config("avg_pooling", overrides=[
        ("data.train_data", os.path.join(tiny_data, "train-*")),
        ("data.schema", os.path.join(tiny_data, "schema.json")), *TINY,
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
