"""The TFRecord format and the tf.data pipeline: round trips, padding and caps, sharding,
faults named by file and record."""

import gzip
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from ifa_tf.data import make_dataset, records, simulator
from ifa_tf.schema import FeatureSchema

TINY = simulator.SimulatorConfig(
    num_requests=24, seed=3, max_seq_len=60, min_seq_len=3, max_candidates=20,
    num_items=400, num_categories=8, num_topics=12, num_authors=60, truth_samples=16,
    impression_slots=5, category_cap=2, test_fraction=0.25)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("synthetic"))
    simulator.write_synthetic(output_dir, TINY, num_shards=3)
    return output_dir


def _schema():
    return FeatureSchema(item_attributes=("item_id", "category_id"),
                         cross_features=("cand_cross_category_count",),
                         tasks=("impression", "click"))


def _request(user, n, m, offset=0):
    """A hand-made request whose values encode their position: seq 1..n, cand 101..100+m."""
    seq = np.arange(1, n + 1, dtype=np.int64) + offset
    cand = np.arange(101, 101 + m, dtype=np.int64) + offset
    return {"user_id": np.int64(user), "seq_item_id": seq, "seq_category_id": seq + 1000,
            "seq_action": seq % 8, "seq_time_delta": (n - np.arange(n)) * 10,
            "cand_item_id": cand, "cand_category_id": cand + 1000,
            "cand_cross_category_count": cand % 3, "impression": cand % 2,
            "click": (cand % 4 == 0).astype(np.int64)}


def _write(directory, requests, schema, compression="none", split="train", num_shards=1,
           metadata=True):
    with records.ShardedWriter(str(directory), split, num_shards, compression) as writer:
        for request in requests:
            writer.write(records.encode_example(request, schema))
    if metadata:
        records.write_metadata(str(directory), {"schema": schema.to_dict(),
                                                "files": writer.row_counts})
    return [os.path.join(str(directory), name) for name in writer.names]


def _batches(dataset):
    return [tf.nest.map_structure(lambda t: t.numpy(), batch) for batch in dataset]


def test_round_trip_reproduces_simulated_values_exactly(synthetic_dir):
    sim = simulator.Simulator(TINY)
    dataset = make_dataset(os.path.join(synthetic_dir, "*.tfrecord.gz"), batch_size=1,
                           shuffle=False, deterministic=True, with_extras=True)
    seen = set()
    for features, labels, extras in _batches(dataset):
        user = int(features["user_id"][0])
        expected = sim.request(user - 1)
        got = {**features, **labels, **extras}
        for name in [*sim.schema.feature_names, *sim.schema.tasks, *sim.schema.extras]:
            value = got[name][0]
            np.testing.assert_array_equal(value, expected[name], err_msg=name)
            assert value.dtype == (np.int64 if name in features else np.float32), name
        seen.add(user)
    assert seen == set(range(1, TINY.num_requests + 1))


def test_metadata_records_schema_counts_and_splits(synthetic_dir):
    metadata = records.read_metadata(synthetic_dir)
    assert records.schema_from_metadata(metadata) == simulator.simulator_schema()
    assert metadata["splits"]["train"]["num_requests"] == 18
    assert metadata["splits"]["test"]["num_requests"] == 6
    assert sum(metadata["files"].values()) == 24
    assert sorted(metadata["files"]) == sorted(
        f for f in os.listdir(synthetic_dir) if f.endswith(".tfrecord.gz"))
    assert metadata["generator"]["seed"] == 3
    assert metadata["id_ranges"]["item_id"] == [1, 400]


def test_padding_and_caps_keep_recent_events_and_first_candidates(tmp_path):
    schema = _schema()
    requests = [_request(1, 5, 4), _request(2, 2, 6), _request(3, 0, 1)]
    _write(tmp_path, requests, schema)
    (features, labels), = _batches(make_dataset(str(tmp_path / "*.tfrecord"), batch_size=3,
                                               shuffle=False, max_seq_len=3,
                                               max_candidates=5))
    np.testing.assert_array_equal(features["seq_item_id"], [[3, 4, 5], [1, 2, 0], [0, 0, 0]])
    np.testing.assert_array_equal(features["seq_time_delta"],
                                  [[30, 20, 10], [20, 10, 0], [0, 0, 0]])
    np.testing.assert_array_equal(features["cand_item_id"], [
        [101, 102, 103, 104, 0], [101, 102, 103, 104, 105], [101, 0, 0, 0, 0]])
    np.testing.assert_array_equal(features["cand_cross_category_count"], [
        [2, 0, 1, 2, 0], [2, 0, 1, 2, 0], [2, 0, 0, 0, 0]])
    np.testing.assert_array_equal(labels["impression"], [
        [1, 0, 1, 0, 0], [1, 0, 1, 0, 1], [1, 0, 0, 0, 0]])
    assert labels["click"].dtype == np.float32
    np.testing.assert_array_equal(labels["click"][1], [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(features["user_id"], [1, 2, 3])
    assert set(features) == set(schema.feature_names)
    assert set(labels) == set(schema.tasks)


def test_each_batch_is_padded_to_its_own_longest_row(tmp_path):
    schema = _schema()
    _write(tmp_path, [_request(1, 2, 3), _request(2, 4, 1), _request(3, 7, 9)], schema)
    batches = _batches(make_dataset(str(tmp_path / "*.tfrecord"), batch_size=2, shuffle=False))
    # Parallel batching may hand the batches over in either order (deterministic=False).
    shapes = sorted((b[0]["seq_item_id"].shape, b[0]["cand_item_id"].shape) for b in batches)
    assert shapes == [((1, 7), (1, 9)), ((2, 4), (2, 3))]


def test_group_by_length_batches_like_lengths_and_keeps_every_request(tmp_path):
    schema = _schema()
    lengths = [9, 1, 7, 2, 8, 3, 6, 4, 5, 10]  # user u has n = lengths[u - 1]
    _write(tmp_path, [_request(u, n, 2, offset=100 * u) for u, n in enumerate(lengths, 1)],
           schema)
    pattern = str(tmp_path / "*.tfrecord")
    batches = _batches(make_dataset(pattern, batch_size=2, shuffle=False, group_by_length=3,
                                    deterministic=True))
    # Windows of 6 then 4 requests, each sorted by n and cut into batches of 2, in order.
    assert [sorted(b[0]["user_id"].tolist()) for b in batches] == [
        [2, 4], [3, 6], [1, 5], [8, 9], [7, 10]]
    assert [b[0]["seq_item_id"].shape[1] for b in batches] == [2, 7, 9, 5, 10]
    for features, labels in batches:  # every request intact, features and labels together
        for row, user in enumerate(features["user_id"]):
            n = lengths[user - 1]
            expected = _request(user, n, 2, offset=100 * user)
            np.testing.assert_array_equal(features["seq_item_id"][row, :n],
                                          expected["seq_item_id"])
            np.testing.assert_array_equal(labels["click"][row], expected["click"])

    def users(seed, drop_remainder=False):
        dataset = make_dataset(pattern, batch_size=2, seed=seed, deterministic=True,
                               group_by_length=3, drop_remainder=drop_remainder)
        return [b[0]["user_id"].tolist() for b in _batches(dataset)]

    assert users(1) == users(1)
    assert sorted(u for batch in users(1) for u in batch) == list(range(1, 11))
    for drop_remainder, expected in ((False, 5), (True, 5)):
        dataset = make_dataset(pattern, batch_size=2, group_by_length=3,
                               drop_remainder=drop_remainder)
        assert dataset.cardinality().numpy() == expected == len(_batches(dataset))
    dataset = make_dataset(pattern, batch_size=3, group_by_length=2, drop_remainder=True)
    assert dataset.cardinality().numpy() == 3 == len(_batches(dataset))
    assert all(len(batch) == 2 for batch in users(1, drop_remainder=True))
    for bad in (1, -2, 2.5, True):
        with pytest.raises(ValueError, match="group_by_length"):
            make_dataset(pattern, group_by_length=bad)


def test_schema_comes_from_metadata_or_must_be_given(tmp_path):
    schema = _schema()
    _write(tmp_path, [_request(1, 2, 3)], schema, metadata=False)
    with pytest.raises(ValueError, match="metadata.json"):
        make_dataset(str(tmp_path / "*.tfrecord"))
    (features, _), = _batches(make_dataset(str(tmp_path / "*.tfrecord"), schema=schema))
    assert "seq_author_id" not in features
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        make_dataset(str(tmp_path / "nothing-here*"), schema=schema)


def test_bad_arguments_name_the_argument(synthetic_dir):
    pattern = os.path.join(synthetic_dir, "train-*")
    with pytest.raises(ValueError, match="batch_size=0"):
        make_dataset(pattern, batch_size=0)
    with pytest.raises(ValueError, match="max_seq_len=-1"):
        make_dataset(pattern, max_seq_len=-1)
    with pytest.raises(ValueError, match="needs a seed"):
        make_dataset(pattern, deterministic=True)


def test_shuffle_is_reproducible_by_seed(synthetic_dir):
    pattern = os.path.join(synthetic_dir, "train-*")

    def users(seed):
        dataset = make_dataset(pattern, batch_size=4, seed=seed, deterministic=True,
                               shuffle_buffer=64)
        return np.concatenate([f["user_id"] for f, _ in _batches(dataset)]).tolist()

    assert users(7) == users(7)
    assert users(7) != users(8)
    assert sorted(users(7)) == list(range(1, 19))


def test_input_context_shards_disjointly(synthetic_dir):
    pattern = os.path.join(synthetic_dir, "train-*")
    for num_pipelines in (2, 4):  # 3 files: by file, then by record
        parts = []
        for pipeline_id in range(num_pipelines):
            context = tf.distribute.InputContext(num_pipelines, pipeline_id,
                                                 num_replicas_in_sync=num_pipelines)
            dataset = make_dataset(pattern, batch_size=2 * num_pipelines, shuffle=False,
                                   input_context=context)
            batches = _batches(dataset)
            assert max(len(f["user_id"]) for f, _ in batches) == 2
            parts.append(np.concatenate([f["user_id"] for f, _ in batches]).tolist())
        flat = sorted(u for part in parts for u in part)
        assert flat == list(range(1, 19)), num_pipelines


def test_the_dataset_knows_its_length_when_the_metadata_counts_the_files(synthetic_dir):
    """Keras runs an epoch of `cardinality` steps; an unknown one makes it warn "Your input
    ran out of data" at the end of the first epoch."""
    pattern = os.path.join(synthetic_dir, "train-*")  # 18 requests in 3 files
    assert int(make_dataset(pattern, batch_size=4).cardinality()) == 5
    assert int(make_dataset(pattern, batch_size=4, drop_remainder=True).cardinality()) == 4
    context = tf.distribute.InputContext(4, 1, num_replicas_in_sync=4)  # 4 > 3 files: by record
    sharded = make_dataset(pattern, batch_size=8, shuffle=False, input_context=context)
    assert int(sharded.cardinality()) == 3 == len(_batches(sharded))
    unknown = tf.data.UNKNOWN_CARDINALITY
    assert make_dataset(pattern, skip_corrupt=True).cardinality() == unknown
    assert make_dataset(pattern, repeat=True).cardinality() == tf.data.INFINITE_CARDINALITY


def test_model_fit_takes_the_batches(synthetic_dir):
    import keras

    schema = simulator.simulator_schema()
    inputs = schema.keras_inputs()
    counts = keras.ops.cast(inputs["cand_cross_category_count"], "float32")[..., None]
    outputs = {task: keras.layers.Reshape((-1,), name=task)(
        keras.layers.Dense(1, activation="sigmoid", name=f"{task}_dense")(counts))
        for task in schema.tasks}
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="binary_crossentropy")
    # A plain Keras model: shuffle=False, or Keras warns that it cannot shuffle a dataset.
    history = model.fit(make_dataset(os.path.join(synthetic_dir, "train-*"), batch_size=6),
                        epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0])


# ------------------------------------------------------------------------------ faults
def _truncate(path, keep=0.6):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_truncated_file_is_an_error_naming_the_file(tmp_path, compression):
    schema = _schema()
    files = _write(tmp_path, [_request(i, 30, 20, offset=i) for i in range(1, 9)], schema,
                   compression=compression, num_shards=2)
    _truncate(files[1])
    pattern = str(tmp_path / "train-*")
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{os.path.basename(files[1])}: truncated or corrupt"):
        _batches(make_dataset(pattern, batch_size=2, shuffle=False))


def test_truncated_file_without_metadata_fails_before_reading(tmp_path):
    schema = _schema()
    files = _write(tmp_path, [_request(i, 30, 20) for i in range(1, 5)], schema,
                   metadata=False)
    _truncate(files[0])
    with pytest.raises(records.DataFormatError, match=rf"{files[0]}: truncated record"):
        make_dataset(files[0], schema=schema)


def test_corrupt_payload_is_an_error_naming_the_file(tmp_path):
    schema = _schema()
    files = _write(tmp_path, [_request(i, 30, 20) for i in range(1, 5)], schema)
    data = bytearray(open(files[0], "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(files[0], "wb").write(bytes(data))
    with pytest.raises(tf.errors.InvalidArgumentError, match="truncated or corrupt"):
        _batches(make_dataset(files[0], batch_size=4, shuffle=False))


def test_skip_corrupt_keeps_readable_records_and_counts_the_rest(tmp_path, caplog):
    schema = _schema()
    files = _write(tmp_path, [_request(i, 30, 20) for i in range(1, 9)], schema,
                   compression="none", num_shards=2)
    _truncate(files[1], keep=0.5)  # keeps 2 of its 4 records
    dataset = make_dataset(str(tmp_path / "train-*"), batch_size=8, shuffle=False,
                           skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="ifa_tf.data.pipeline"):
        users = sorted(np.concatenate([f["user_id"] for f, _ in _batches(dataset)]).tolist())
    assert users == [1, 2, 3, 4, 5, 7]
    log = caplog.text
    # Cut at a record boundary: the 2 records left are whole (issue 24: not "corrupt").
    assert (f"{files[1]}: holds 2 records, all readable, but metadata.json lists 4: the file "
            "was cut at a record boundary, or metadata.json is out of date; 2 listed records "
            "are missing.") in log


def test_candidate_length_mismatch_names_the_record(tmp_path):
    schema = _schema()
    bad = _request(2, 3, 4)
    bad["click"] = bad["click"][:3]
    with pytest.raises(records.DataFormatError, match="'cand_item_id' has 4 but 'click' has 3"):
        records.encode_example(bad, schema)
    # A foreign writer can still produce such a record: the pipeline names it.
    path = str(tmp_path / "foreign.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for request in (_request(1, 3, 4), bad):
            example = tf.train.Example()
            for name, value in request.items():
                example.features.feature[name].int64_list.value.extend(
                    np.atleast_1d(value).tolist())
            writer.write(example.SerializeToString())
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"foreign.tfrecord record 1: candidate fields disagree in "
                             r"length: cand_item_id has 4 but click has 3"):
        _batches(make_dataset(path, schema=schema, batch_size=2, shuffle=False))


def test_failed_write_leaves_no_file(tmp_path):
    schema = _schema()
    with pytest.raises(RuntimeError, match="boom"):
        with records.ShardedWriter(str(tmp_path), "train", 2, "gzip") as writer:
            writer.write(records.encode_example(_request(1, 2, 2), schema))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_gzip_shards_are_gzip(synthetic_dir):
    name = sorted(f for f in os.listdir(synthetic_dir) if f.endswith(".gz"))[0]
    with gzip.open(os.path.join(synthetic_dir, name)) as f:
        assert len(f.read(12)) == 12


def test_count_records_matches_writer(tmp_path):
    schema = _schema()
    files = _write(tmp_path, [_request(i, 5, 5) for i in range(1, 8)], schema, num_shards=2)
    assert [records.count_records(f) for f in files] == [4, 3]
