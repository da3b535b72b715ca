"""`ifa_tf.training` and `ifa-train`: typed configs with unknown keys rejected, what a run
writes, resume after SIGKILL, metrics against an independent recomputation, and the
streaming protocol evaluating each batch before training on it."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import keras
import numpy as np
import pytest
import yaml

from ifa_tf import training, zoo
from ifa_tf.data import make_dataset
from ifa_tf.metrics import CandidateSetEvaluator
from ifa_tf.schema import FeatureSchema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = {"embedding_dim": 4, "tower_units": [8]}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, write_tiny_dataset):
    """A small simulator dataset: 160 requests, n <= 30, m <= 12."""
    return write_tiny_dataset(
        str(tmp_path_factory.mktemp("tiny_data")),
        {"user_id": 101, "item_id": 509, "category_id": 29, "author_id": 103},
        num_requests=160, seed=3, max_seq_len=30, max_candidates=12, num_items=500,
        num_authors=100, truth_samples=8, test_fraction=0.25)


def tiny_config(data_dir, model="ifa", **sections):
    overrides = [("data.train_data", os.path.join(data_dir, "train-*")),
                 ("data.eval_data", os.path.join(data_dir, "test-*")),
                 ("data.schema", os.path.join(data_dir, "schema.json")),
                 ("data.batch_size", 16), ("train.verbose", 0),
                 *[(f"model.{k}", v) for k, v in TINY_MODEL.items()]]
    overrides += [(key, value) for key, value in sections.items()]
    return training.load_config(model, overrides=overrides)


# ------------------------------------------------------------------------------ config
def test_config_defaults_come_from_the_zoo_yaml_and_overrides_win():
    with open(os.path.join(REPO, "zoo", "twin.yaml")) as f:
        defaults = yaml.safe_load(f)
    config = training.load_config("twin", overrides=["model.k=7", "train.epochs=3"])
    assert config.model.overrides["k"] == 7
    assert config.model.overrides["embedding_dim"] == defaults["model"]["embedding_dim"]
    assert config.train.epochs == 3
    assert config.data.batch_size == defaults["data"]["batch_size"]


def test_every_zoo_model_has_a_valid_yaml():
    for name in zoo.list_models():
        assert os.path.exists(os.path.join(REPO, "zoo", f"{name}.yaml")), name
        training.load_config(name)  # validates every key against the model


@pytest.mark.parametrize("override, message", [
    ("train.epoch=2", r"Unknown config key 'train.epoch'.*train.epochs"),
    ("model.embeding_dim=8", r"model.embeding_dim.*Valid model keys.*embedding_dim"),
    ("optimizer.lr=1", r"Unknown config key 'optimizer.lr'"),
    ("eval.protocol=online", r"eval.protocol must be one of"),
    ("data.batch_size=0", r"data.batch_size must be a positive integer"),
    ("data.group_by_length=1", r"data.group_by_length must be 0 \(off\) or an int >= 2"),
    ("train.verbose=3", r"train.verbose must be 0, 1, 2 or 'auto'"),
    ("train.deterministic=maybe", r"train.deterministic must be true or false.*'maybe'"),
])
def test_config_typos_are_errors_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        training.load_config("ifa", overrides=[override])


def test_config_rejects_two_model_names():
    with pytest.raises(ValueError, match="model.name='twin'"):
        training.load_config("ifa", overrides=["model.name=twin"])
    assert training.load_config(None, overrides=["model.name=twin"]).model.name == "twin"


def test_config_file_sections_are_checked(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  epochs: 2\n")
    with pytest.raises(ValueError, match=r"Unknown config sections \['trainer'\]"):
        training.load_config("ifa", config_file=str(path))


def test_resolved_config_round_trips_through_yaml():
    config = training.load_config("sim_soft", overrides=["model.k=5", "eval.ndcg_k=3"])
    again = training.Config.from_dict(yaml.safe_load(config.to_yaml()))
    assert again == config


# ------------------------------------------------------------------- train_and_evaluate
def test_train_and_evaluate_writes_config_checkpoints_logs_model_and_metrics(
        tiny_data, tmp_path):
    # Batches of like length (data.group_by_length): the metrics recomputed below from
    # plain batches in file order must still match.
    config = tiny_config(tiny_data, **{"train.epochs": 2, "data.group_by_length": 2})
    workdir = str(tmp_path / "run")
    result = training.train_and_evaluate(config, workdir)

    with open(os.path.join(workdir, "config.yaml")) as f:
        assert training.Config.from_dict(yaml.safe_load(f)) == config
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
        "epoch-0001.weights.h5", "epoch-0002.weights.h5"]
    for logs in ("train", "validation", "evaluation"):
        assert any(n.startswith("events.out.tfevents")
                   for n in os.listdir(os.path.join(workdir, "logs", logs)))
    assert not os.path.exists(os.path.join(workdir, "backup"))  # deleted once complete
    with open(os.path.join(workdir, "metrics.json")) as f:
        written = json.load(f)
    assert written["eval"]["tasks"]["click"]["auc"] == result["eval"]["tasks"]["click"]["auc"]
    assert len(written["history"]["loss"]) == 2

    # The saved model reproduces the reported metrics, recomputed independently here.
    model = keras.saving.load_model(os.path.join(workdir, "model.keras"))
    labels, scores, truth = [], [], []
    dataset = make_dataset(os.path.join(tiny_data, "test-*"), batch_size=7, shuffle=False,
                           with_extras=True)
    for features, batch_labels, extras in dataset:
        valid = features["cand_item_id"].numpy() != 0
        labels.append(batch_labels["click"].numpy()[valid])
        scores.append(keras.ops.convert_to_numpy(model(features)["click"])[valid])
        truth.append(extras["truth_click"].numpy()[valid])
    labels, scores, truth = map(np.concatenate, (labels, scores, truth))
    click = written["eval"]["tasks"]["click"]
    assert click["num_candidates"] == labels.size
    np.testing.assert_allclose(click["auc"], pair_auc(labels, scores), atol=1e-6)
    np.testing.assert_allclose(click["truth_auc"], pair_auc(labels, truth), atol=1e-9)


def pair_auc(labels, scores):
    positives, negatives = scores[labels > 0.5], scores[labels <= 0.5]
    greater = (positives[:, None] > negatives[None, :]).sum()
    equal = (positives[:, None] == negatives[None, :]).sum()
    return (greater + 0.5 * equal) / (positives.size * negatives.size)


def test_steps_training_runs_exactly_that_many_steps(tiny_data, tmp_path):
    config = tiny_config(tiny_data, **{"train.steps": 5, "train.epochs": 2,
                                       "data.eval_data": ""})
    result = training.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["train_steps"] == 6  # ceil(5 / 2) steps in each of 2 epochs
    assert "eval" not in result


# -------------------------------------------------------------------------- streaming
def test_streaming_evaluates_each_batch_before_training_on_it():
    schema = FeatureSchema(embedding_buckets={"user_id": 40, "item_id": 64,
                                              "category_id": 8, "author_id": 16})
    batches = [make_batch(schema, seed) for seed in (0, 1, 2)]

    def fresh_model():
        keras.utils.set_random_seed(0)
        model = zoo.build("avg_pooling", schema=schema, **TINY_MODEL)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5))
        return model

    evaluator = CandidateSetEvaluator(schema.tasks)
    losses = training.streaming_train_and_evaluate(fresh_model(), batches, evaluator)
    assert len(losses) == 3

    # Reference, by hand: predict with the current weights, then train.
    before, after = fresh_model(), fresh_model()
    predicted_before, predicted_after, labels = [], [], []
    for features, batch_labels in batches:
        predicted_before.append(before.predict_on_batch(features)["click"])
        before.train_on_batch(features, batch_labels)
        after.train_on_batch(features, batch_labels)  # the wrong order: train first
        predicted_after.append(after.predict_on_batch(features)["click"])
        labels.append(batch_labels["click"])
    valid = np.concatenate([f["cand_item_id"] for f, _ in batches]) != 0
    labels = np.concatenate(labels)[valid]
    streaming = evaluator.result()["click"]
    expected = training_log_loss(labels, np.concatenate(predicted_before)[valid])
    wrong_order = training_log_loss(labels, np.concatenate(predicted_after)[valid])
    np.testing.assert_allclose(streaming["logloss"], expected, rtol=1e-5)
    assert abs(wrong_order - expected) > 1e-2  # the order is measurable


def training_log_loss(labels, p):
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))


def make_batch(schema, seed, batch=8, n=10, m=6):
    rng = np.random.default_rng(seed)
    features = {"user_id": rng.integers(1, 100, batch)}
    for attribute, high in (("item_id", 60), ("category_id", 5), ("author_id", 12)):
        features["seq_" + attribute] = rng.integers(1, high, (batch, n))
        features["cand_" + attribute] = rng.integers(1, high, (batch, m))
    features["seq_action"] = rng.integers(0, 8, (batch, n))
    features["seq_time_delta"] = rng.integers(0, 10**6, (batch, n))
    for name in schema.cross_features:
        features[name] = rng.integers(0, 5, (batch, m))
    features["cand_item_id"][:, m - 2:] = 0  # padded candidates
    valid = features["cand_item_id"] != 0
    labels = {task: ((rng.random((batch, m)) < 0.4) & valid).astype("float32")
              for task in schema.tasks}
    return features, labels


def test_a_run_raises_no_keras_warning(tiny_data, tmp_path):
    """Issue 16: fit got shuffle=True (its default) with a dataset, and a dataset of unknown
    length made Keras warn "Your input ran out of data" after the first epoch."""
    config = tiny_config(tiny_data, model="avg_pooling", **{"train.epochs": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = training.train_and_evaluate(config, str(tmp_path / "run"))
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert result["train_steps"] == 2 * 8  # 120 training requests, batches of 16


def test_streaming_protocol_end_to_end(tiny_data, tmp_path):
    config = tiny_config(tiny_data, model="avg_pooling",
                         **{"eval.protocol": "streaming", "data.eval_data": ""})
    result = training.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["eval"]["num_requests"] == 120  # every training request, evaluated once
    assert len(result["history"]["loss"]) == result["train_steps"] == 8
    assert os.path.exists(tmp_path / "run" / "model.keras")


# ------------------------------------------------------------------- ifa-train, resume
def ifa_train(tiny_data, model_dir, *extra):
    command = [sys.executable, "-m", "ifa_tf.cli.train", "--model=avg_pooling",
               f"--train_data={tiny_data}/train-*", f"--eval_data={tiny_data}/test-*",
               f"--model_dir={model_dir}", f"--schema={tiny_data}/schema.json",
               "--batch_size=8", "--verbose=2",
               "--set=model.embedding_dim=4", "--set=model.tower_units=[8]", *extra]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_ifa_train_rejects_a_typo_naming_the_key(tiny_data, tmp_path):
    process = ifa_train(tiny_data, tmp_path / "run", "--set=train.epoch=2")
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "Unknown config key 'train.epoch'" in output


def test_ifa_train_resumes_after_sigkill(tiny_data, tmp_path):
    model_dir = tmp_path / "run"
    epochs = 12
    first = ifa_train(tiny_data, model_dir, f"--epochs={epochs}")
    backup = model_dir / "backup" / "training_metadata.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and first.poll() is None:
            if backup.exists() and json.loads(backup.read_text() or "{}").get("epoch", 0) >= 2:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be killed"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    assert not (model_dir / "metrics.json").exists()
    killed_at = json.loads(backup.read_text())["epoch"]

    second = ifa_train(tiny_data, model_dir, f"--epochs={epochs}")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output[-3000:]
    runs = {}
    for line in (model_dir / "progress.jsonl").read_text().splitlines():
        entry = json.loads(line)
        runs.setdefault(entry["pid"], []).append(entry["epoch"])
    first_epochs, second_epochs = (runs[first.pid], runs[second.pid])
    assert first_epochs[0] == 0
    # The restart begins at the epoch after the last backup and finishes the rest.
    assert second_epochs[0] == killed_at > 0
    assert second_epochs == list(range(killed_at, epochs))
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert len(metrics["history"]["loss"]) == epochs  # both processes' epochs
    assert (model_dir / "model.keras").exists()
    assert not (model_dir / "backup").exists()


def test_ifa_train_deterministic_repeats_a_run_bit_for_bit(tiny_data, tmp_path):
    # Two processes: op determinism, once enabled, holds for the rest of a process.
    runs = [ifa_train(tiny_data, tmp_path / name, "--deterministic", "--epochs=2", "--seed=5")
            for name in ("first", "second")]
    for process in runs:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
    first, second = (json.loads((tmp_path / name / "metrics.json").read_text())
                     for name in ("first", "second"))
    assert first["history"]["loss"] == second["history"]["loss"]
    assert first["eval"]["tasks"] == second["eval"]["tasks"]
    config = yaml.safe_load((tmp_path / "first" / "config.yaml").read_text())
    assert config["train"]["deterministic"] is True
