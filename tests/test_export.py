"""SavedModel export: signature contract, parity with Keras (Python and TF's C++ loader),
ranking outputs, run-time checks, warm-up requests, metadata, versioning."""

import hashlib
import os
import shutil
import subprocess
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

import ifa_tf
from ifa_tf import export
from ifa_tf.cli import export as export_cli
from ifa_tf.benchmark.requests import random_request
from ifa_tf.schema import FeatureSchema

SCHEMA = FeatureSchema(embedding_buckets={"user_id": 31, "item_id": 101, "category_id": 13,
                                          "author_id": 17})
PARITY_MODELS = ("ifa", "twin", "sim_hard", "eta", "sdim")
# (batch, m, n): two batch sizes and two (m, n) shapes; n > k = 100 exercises the top-k
# search of the two-stage baselines.
SHAPES = ((1, 7, 13), (4, 30, 150))
CPP_SOURCE = os.path.join(os.path.dirname(__file__), "cpp", "saved_model_runner.cc")


def make_features(batch, m, n, seed):
    """Random request whose rows have different numbers of valid candidates / events."""
    features = random_request(SCHEMA, m, n, batch=batch, seed=seed)
    for row in range(batch):
        valid_m = max(1, m - row * 2 - 1) if m > 1 else 1
        valid_n = max(1, n - row * 3 - 2) if n > 2 else n
        for name in SCHEMA.candidate_features + SCHEMA.cross_features:
            features[name][row, valid_m:] = 0
        for name in SCHEMA.sequence_features:
            features[name][row, valid_n:] = 0
    return features


def reference_ranking(score, candidate_ids):
    """NumPy: valid candidates by descending score (ties by position), then padding."""
    key = np.where(candidate_ids != 0, -score.astype(np.float64), np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    return order, np.take_along_axis(candidate_ids, order, axis=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`{name: (keras model, version dir)}` for the parity models."""
    base = tmp_path_factory.mktemp("exports")
    result = {}
    for index, name in enumerate(PARITY_MODELS):
        keras.utils.set_random_seed(index)
        model = ifa_tf.zoo.build(name, schema=SCHEMA)
        result[name] = model, export.export_saved_model(
            model, base / name, schema=SCHEMA, warmup_shapes=((1, 4, 6), (2, 9, 20)))
    return result


@pytest.fixture(scope="session")
def cpp_runner():
    """The C++ runner, compiled once per source / TensorFlow build (cached across runs)."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed")
    include = tf.sysconfig.get_include()
    if not os.path.exists(os.path.join(include, "tensorflow/cc/saved_model/loader.h")):
        pytest.skip("the TensorFlow wheel ships no C++ SavedModel loader headers")
    library_dir = tf.sysconfig.get_lib()
    command = [compiler, "-O1", "-w", *tf.sysconfig.get_compile_flags(), CPP_SOURCE,
               f"-L{library_dir}", "-Wl,--no-as-needed", "-l:libtensorflow_cc.so.2",
               "-l:libtensorflow_framework.so.2", f"-Wl,-rpath,{library_dir}"]
    with open(CPP_SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + " ".join(command).encode()).hexdigest()[:16]
    cache_dir = os.path.join(tempfile.gettempdir(), "ifa_tf_cpp_runner", key)
    binary = os.path.join(cache_dir, "saved_model_runner")
    if not os.path.exists(binary):
        os.makedirs(cache_dir, exist_ok=True)
        partial = f"{binary}.{os.getpid()}"
        build = subprocess.run([*command, "-o", partial], capture_output=True, text=True)
        assert build.returncode == 0, build.stderr[-4000:]
        os.replace(partial, binary)  # atomic: concurrent sessions never run a partial file
    return binary


def run_cpp(runner, export_dir, cases, root, signature_name=export.SIGNATURE_NAME):
    """Runs `cases` (list of feature dicts) through the C++ loader; returns, per case, the
    outputs dict or the error string."""
    case_dirs = []
    for index, features in enumerate(cases):
        case_dir = os.path.join(root, f"case{index}")
        os.makedirs(os.path.join(case_dir, "in"))
        os.makedirs(os.path.join(case_dir, "out"))
        for name, value in features.items():
            with open(os.path.join(case_dir, "in", f"{name}.pb"), "wb") as f:
                f.write(tf.make_tensor_proto(value).SerializeToString())
        case_dirs.append(case_dir)
    process = subprocess.run([runner, export_dir, signature_name, *case_dirs],
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-4000:]
    results = []
    for case_dir in case_dirs:
        error_file = os.path.join(case_dir, "error.txt")
        if os.path.exists(error_file):
            with open(error_file) as f:
                results.append(f.read())
            continue
        outputs = {}
        for file_name in os.listdir(os.path.join(case_dir, "out")):
            proto = tf.make_tensor_proto(0)
            with open(os.path.join(case_dir, "out", file_name), "rb") as f:
                proto.ParseFromString(f.read())
            outputs[file_name[:-len(".pb")]] = tf.make_ndarray(proto)
        results.append(outputs)
    return results


def assert_matches_keras(model, features, outputs):
    expected = {k: np.asarray(v) for k, v in model(features, training=False).items()}
    for task in (*SCHEMA.tasks, "score"):
        np.testing.assert_allclose(outputs[task], expected[task], atol=1e-5, rtol=0,
                                   err_msg=task)
    order, item_ids = reference_ranking(outputs["score"], features["cand_item_id"])
    np.testing.assert_array_equal(outputs["ranked_indices"], order)
    np.testing.assert_array_equal(outputs["ranked_item_ids"], item_ids)
    # The ranking is also Keras' ranking, up to float noise between near-ties.
    ranked_keras = np.take_along_axis(expected["score"], order, axis=1)
    for row in range(order.shape[0]):
        valid = int(np.count_nonzero(features["cand_item_id"][row]))
        assert np.all(np.diff(ranked_keras[row, :valid]) <= 1e-5)


def test_signature_contract(exported):
    _, export_dir = exported["ifa"]
    signature = tf.saved_model.load(export_dir).signatures[export.SIGNATURE_NAME]
    _, inputs = signature.structured_input_signature
    assert set(inputs) == set(SCHEMA.feature_names)
    for name, spec in inputs.items():
        assert spec.name == name
        assert spec.dtype == tf.int64
        assert spec.shape.as_list() == ([None] if name == "user_id" else [None, None])
    outputs = signature.structured_outputs
    assert set(outputs) == {*SCHEMA.tasks, "score", "ranked_indices", "ranked_item_ids"}
    assert outputs["ranked_item_ids"].dtype == tf.int64
    assert all(outputs[t].dtype == tf.float32 for t in (*SCHEMA.tasks, "score"))


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_python_loader_parity(exported, name):
    model, export_dir = exported[name]
    signature = tf.saved_model.load(export_dir).signatures[export.SIGNATURE_NAME]
    for index, shape in enumerate(SHAPES):
        features = make_features(*shape, seed=index)
        outputs = signature(**{k: tf.constant(v) for k, v in features.items()})
        assert_matches_keras(model, features, {k: v.numpy() for k, v in outputs.items()})


def test_xla_export_pads_to_buckets_and_matches_keras(exported, cpp_runner, tmp_path):
    model, _ = exported["ifa"]
    export_dir = export.export_saved_model(model, tmp_path / "xla", schema=SCHEMA,
                                           warmup_shapes=(), jit_compile=True)
    signature = tf.saved_model.load(export_dir).signatures[export.SIGNATURE_NAME]
    # m, n below, at and above a bucket edge (64, 128): padding must change nothing.
    cases = [make_features(*shape, seed=20 + index)
             for index, shape in enumerate(SHAPES + ((2, 64, 65), (1, 129, 64)))]
    for features in cases:
        outputs = signature(**{k: tf.constant(v) for k, v in features.items()})
        assert_matches_keras(model, features, {k: v.numpy() for k, v in outputs.items()})
    # TF's C++ loader (TF Serving's path) compiles and runs the XLA function too.
    for features, outputs in zip(cases[:2], run_cpp(cpp_runner, export_dir, cases[:2],
                                                      tmp_path / "cpp")):
        assert isinstance(outputs, dict), outputs
        assert_matches_keras(model, features, outputs)
    assert export.read_metadata(export_dir)["jit_compile"] is True
    assert [int(export.bucket_size(x)) for x in (0, 1, 64, 65, 1000, 1024, 1025, 10_000)] == [
        64, 64, 64, 128, 1024, 1024, 2048, 16_384]


@pytest.mark.parametrize("name", sorted(set(ifa_tf.zoo.list_models()) - {"ifa"}))
def test_xla_export_of_every_model_matches_keras(name, tmp_path):
    # A branch whose two sides shape the batch differently once crashed XLA's dynamic-shape
    # readback for avg_pooling (TensorFlow aborted the process): every model is compiled.
    keras.utils.set_random_seed(7)
    model = ifa_tf.zoo.build(name, schema=SCHEMA)
    export_dir = export.export_saved_model(model, tmp_path / "xla", schema=SCHEMA,
                                           warmup_shapes=(), jit_compile=True)
    signature = tf.saved_model.load(export_dir).signatures[export.SIGNATURE_NAME]
    for index, shape in enumerate(SHAPES[:2]):
        features = make_features(*shape, seed=30 + index)
        outputs = signature(**{k: tf.constant(v) for k, v in features.items()})
        assert_matches_keras(model, features, {k: v.numpy() for k, v in outputs.items()})


@pytest.mark.parametrize("jit_compile", [False, True])
def test_export_of_ifa_with_its_options_matches_keras(jit_compile, tmp_path):
    # Separate FSM and RAM maps, learnable sharpness on both (moved off their start, as
    # after training) and exact matches: SavedModel and XLA, any m and n.
    keras.utils.set_random_seed(8)
    model = ifa_tf.zoo.build("ifa", schema=SCHEMA, feature_map="elu_plus_one",
                             learnable_temperature=True, exact_matches=True,
                             ram_feature_map="focused",
                             ram_learnable_focusing_factor=True)
    for variable in model.weights:
        if variable.path.endswith(("log_temperature", "focusing_factor")):
            variable.assign(variable + np.array([0.5, -0.5], "float32"))
    export_dir = export.export_saved_model(model, tmp_path / "ifa", schema=SCHEMA,
                                           warmup_shapes=(), jit_compile=jit_compile)
    signature = tf.saved_model.load(export_dir).signatures[export.SIGNATURE_NAME]
    for index, shape in enumerate(SHAPES):
        features = make_features(*shape, seed=40 + index)
        features["cand_item_id"][:, :3] = features["seq_item_id"][:, :3]  # exact matches
        outputs = signature(**{k: tf.constant(v) for k, v in features.items()})
        assert_matches_keras(model, features, {k: v.numpy() for k, v in outputs.items()})


def test_cpp_loader_parity(exported, cpp_runner, tmp_path):
    """TF's C++ LoadSavedModel + Session::Run (TF Serving's path) gives Keras' outputs."""
    for name in PARITY_MODELS:
        model, export_dir = exported[name]
        cases = [make_features(*shape, seed=10 + i) for i, shape in enumerate(SHAPES)]
        results = run_cpp(cpp_runner, export_dir, cases, tmp_path / name)
        for features, outputs in zip(cases, results):
            assert isinstance(outputs, dict), outputs
            assert_matches_keras(model, features, outputs)


def test_cpp_loader_rejects_inconsistent_requests(exported, cpp_runner, tmp_path):
    _, export_dir = exported["ifa"]
    short_m = make_features(2, 6, 9, seed=0)
    short_m["cand_author_id"] = short_m["cand_author_id"][:, :5]
    short_n = make_features(2, 6, 9, seed=0)
    short_n["seq_action"] = short_n["seq_action"][:, :8]
    short_batch = make_features(2, 6, 9, seed=0)
    short_batch["user_id"] = short_batch["user_id"][:1]
    results = run_cpp(cpp_runner, export_dir, [short_m, short_n, short_batch], tmp_path)
    for result, what in zip(results, ("candidate count m", "sequence length n",
                                      "batch size")):
        assert isinstance(result, str), f"inconsistent {what} was accepted"
        assert result.startswith("INVALID_ARGUMENT"), result
        assert f"Inconsistent {what}" in result


def test_ranking_puts_padding_last_and_is_a_permutation(exported):
    _, export_dir = exported["ifa"]
    signature = tf.saved_model.load(export_dir).signatures[export.SIGNATURE_NAME]
    features = make_features(3, 12, 20, seed=5)
    features["cand_item_id"][1, :] = 0  # a user with no valid candidate at all
    outputs = signature(**{k: tf.constant(v) for k, v in features.items()})
    indices = outputs["ranked_indices"].numpy()
    item_ids = outputs["ranked_item_ids"].numpy()
    for row in range(3):
        assert sorted(indices[row]) == list(range(12))
        valid = int(np.count_nonzero(features["cand_item_id"][row]))
        assert np.all(item_ids[row, :valid] != 0) and np.all(item_ids[row, valid:] == 0)
        padded = np.flatnonzero(features["cand_item_id"][row] == 0)
        np.testing.assert_array_equal(indices[row, valid:], padded)  # original order
    assert np.all(np.isfinite(outputs["score"].numpy()))


def test_rank_candidates_breaks_ties_by_position():
    score = tf.constant([[0.5, 0.9, 0.5, 0.9, 0.1]])
    ids = tf.constant([[11, 12, 13, 0, 15]], tf.int64)
    indices, item_ids = export.rank_candidates(score, ids)
    assert indices.numpy().tolist() == [[1, 0, 2, 4, 3]]
    assert item_ids.numpy().tolist() == [[12, 11, 13, 15, 0]]


def test_python_signature_rejects_inconsistent_batch(exported):
    _, export_dir = exported["twin"]
    signature = tf.saved_model.load(export_dir).signatures[export.SIGNATURE_NAME]
    features = make_features(3, 5, 8, seed=1)
    features["cand_cross_author_count"] = features["cand_cross_author_count"][:2]
    with pytest.raises(tf.errors.InvalidArgumentError, match="Inconsistent batch size"):
        signature(**{k: tf.constant(v) for k, v in features.items()})


def test_warmup_requests_replay(exported):
    _, export_dir = exported["sim_hard"]
    requests = export.read_warmup_requests(export_dir)
    # Each shape for serving_default, then for serving_raw (its ids as text).
    assert [(r.model_spec.signature_name,
             tuple(r.inputs["cand_item_id"].tensor_shape.dim[i].size for i in range(2)))
            for r in requests] == [("serving_default", (1, 4)), ("serving_default", (2, 9)),
                                   ("serving_raw", (1, 4)), ("serving_raw", (2, 9))]
    assert {r.model_spec.name for r in requests} == {"sim_hard"}
    signatures = tf.saved_model.load(export_dir).signatures
    for request in requests:
        assert set(request.inputs) == set(SCHEMA.feature_names)
        outputs = signatures[request.model_spec.signature_name](
            **{k: tf.make_ndarray(v) for k, v in request.inputs.items()})
        assert outputs["score"].shape == tf.make_ndarray(request.inputs["cand_item_id"]).shape
    # The file is what TF Serving reads: a TFRecord of PredictionLog.
    path = os.path.join(export_dir, "assets.extra", "tf_serving_warmup_requests")
    records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    log = prediction_log_pb2.PredictionLog.FromString(records[0])
    assert log.predict_log.request.model_spec.signature_name == "serving_default"


def test_metadata_records_schema_and_versions(exported):
    _, export_dir = exported["ifa"]
    metadata = export.read_metadata(export_dir)
    assert metadata["model_name"] == "ifa"
    assert metadata["version"] == 1
    assert FeatureSchema.from_dict(metadata["schema"]) == SCHEMA
    assert metadata["tensorflow_version"] == tf.__version__
    assert metadata["keras_version"] == keras.__version__
    assert set(metadata["outputs"]) == {*SCHEMA.tasks, "score", "ranked_indices",
                                        "ranked_item_ids"}


def test_schema_is_read_off_the_model_when_not_given(exported, tmp_path):
    model, _ = exported["ifa"]
    export_dir = export.export_saved_model(model, tmp_path / "ifa", warmup_shapes=())
    inferred = FeatureSchema.from_dict(export.read_metadata(export_dir)["schema"])
    assert set(inferred.feature_names) == set(SCHEMA.feature_names)
    assert inferred.tasks == SCHEMA.tasks
    assert inferred.score_task == SCHEMA.score_task


def test_versions_increment_and_are_never_overwritten(exported, tmp_path):
    model, _ = exported["twin"]
    base = tmp_path / "twin"
    first = export.export_saved_model(model, base, warmup_shapes=())
    second = export.export_saved_model(model, base, warmup_shapes=())
    assert (os.path.basename(first), os.path.basename(second)) == ("1", "2")
    before = sorted(os.listdir(first))
    with pytest.raises(FileExistsError, match="Version 1 already exists"):
        export.export_saved_model(model, base, version=1, warmup_shapes=())
    assert sorted(os.listdir(first)) == before
    assert os.path.basename(export.export_saved_model(model, base, version=7,
                                                      warmup_shapes=())) == "7"
    assert export.list_versions(base) == [1, 2, 7]
    assert sorted(os.listdir(base)) == ["1", "2", "7"]  # no temporary directory left
    with pytest.raises(ValueError, match="positive integer"):
        export.export_saved_model(model, base, version=0)


def test_failed_export_leaves_no_version(exported, tmp_path, monkeypatch):
    model, _ = exported["twin"]

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_warmup_requests", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_saved_model(model, tmp_path / "twin")
    assert os.listdir(tmp_path / "twin") == []


def test_schema_must_match_model_inputs(exported, tmp_path):
    model, _ = exported["ifa"]
    other = FeatureSchema(cross_features=())
    with pytest.raises(ValueError, match="Only in the model"):
        export.export_saved_model(model, tmp_path / "x", schema=other)


def test_export_cli_function_round_trips_a_keras_file(exported, tmp_path):
    model, _ = exported["ifa"]
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    model.save(model_dir / "model.keras")
    (model_dir / "schema.json").write_text(SCHEMA.to_json())
    export_dir = export_cli.export_model(str(model_dir), str(tmp_path / "serving" / "ifa"))
    assert export_dir.endswith(os.path.join("serving", "ifa", "1"))
    # The schema beside the model is the one recorded (buckets included, unlike inference).
    assert FeatureSchema.from_dict(export.read_metadata(export_dir)["schema"]) == SCHEMA
    signature = tf.saved_model.load(export_dir).signatures[export.SIGNATURE_NAME]
    features = make_features(2, 6, 11, seed=3)
    outputs = signature(**{k: tf.constant(v) for k, v in features.items()})
    assert_matches_keras(model, features, {k: v.numpy() for k, v in outputs.items()})
    with pytest.raises(FileNotFoundError, match="model.keras"):
        export_cli.find_keras_file(str(tmp_path / "serving"))
