"""Raw ids end to end: the in-graph id mapping equals the converter's, the request builder
equals the converter's records, `serving_raw` equals `serving_default` on the same request
(Python loader, TF's C++ loader, ifa-serve over gRPC and REST with both clients)."""

import csv
import dataclasses
import os
import shutil
import socket
import statistics
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import ifa_tf
from ifa_tf import export
from ifa_tf.data import log_converter, raw_ids, records
from ifa_tf.serving import (GrpcClient, RequestBuilder, RestClient, ServingError,
                            pad_requests)
from ifa_tf.serving.query import wait_until_available
from ifa_tf.serving.server import ModelServer, ServerOptions
from test_export import cpp_runner, run_cpp  # noqa: F401 (a fixture)

COLUMNS = ("user", "item", "category", "timestamp", "action")
CONFIG = log_converter.LogConfig(
    columns=COLUMNS, actions="click:click,like:click+like", window_seconds=100,
    num_negatives=3, max_candidates=8, max_seq_len=6, test_fraction=0.3, seed=0)
# String titles, an integer id kept as is, ids the hash maps, one with a backslash (escaped
# in the vocabulary, so the export's table leaves it to the hash).
ITEMS = ("Heat (1995)", "Up (2009)", "42", "007", "Amélie (2001)", "Alien\\Director's Cut",
         "Her (2013)", "Jaws (1975)", "M (1931)", "Z (1969)")
CATEGORIES = ("Crime", "Animation", "Drama", "Action", "Comedy", "Horror", "Drama", "Horror",
              "Crime", "Drama")
USERS = ("alice", "bob", "7", "dan")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_log(path):
    rng = np.random.default_rng(0)
    rows = []
    for user in USERS:
        time = 1_000 + int(rng.integers(0, 50))
        for _ in range(int(rng.integers(10, 16))):
            item = int(rng.integers(0, len(ITEMS)))
            action = ("view", "click", "like")[int(rng.integers(0, 3))]
            rows.append((user, ITEMS[item], CATEGORIES[item], str(time), action))
            time += int(rng.choice([0, 30, 70, 150, 400]))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw_ids")
    rows = write_log(root / "log.csv")
    output_dir = root / "data"
    log_converter.convert_log(str(root / "log.csv"), str(output_dir), CONFIG,
                              compression="none")
    return output_dir, rows


@pytest.fixture(scope="module")
def exported(dataset, tmp_path_factory):
    """(model, version dir) of a tiny IFA exported with the dataset's vocabularies, which
    are then deleted: the export must carry its own copy."""
    output_dir, _ = dataset
    root = tmp_path_factory.mktemp("raw_export")
    copy = shutil.copytree(output_dir, root / "data")
    schema = records.schema_from_metadata(records.read_metadata(str(copy)))
    schema = dataclasses.replace(schema, embedding_buckets={
        "user_id": 7, "item_id": 17, "category_id": 5})
    keras.utils.set_random_seed(0)
    model = ifa_tf.zoo.build("ifa", schema=schema)
    version = export.export_saved_model(model, root / "ifa", schema=schema,
                                        vocabularies=str(copy), warmup_shapes=((1, 4, 6),))
    shutil.rmtree(copy)
    return model, version


def converter_records(output_dir, schema):
    requests = []
    for split in ("train", "test"):
        for path in records.expand_file_pattern(records.split_pattern(str(output_dir), split,
                                                                      "none")):
            for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
                requests.append(records.decode_example(serialized, schema, with_labels=False))
    return requests


def test_in_graph_mapping_equals_the_converter():
    values = ["abc", "Heat (1995)", "é" * 70, "x" * 128, "y" * 129, "z" * 300, "0", "007",
              "42", "123456789012345678", "1234567890123456789", " 17 ", "\u3000a b\u00a0",
              "tab\tinside", "back\\slash", "", "  "]
    expected = [log_converter.encode_ids([v.strip()])[0][0] if v.strip() else 0 for v in values]
    ids = raw_ids.encode_ids_tensor(tf.constant(values)).numpy()
    assert ids.tolist() == expected
    # In a graph, any shape.
    batched = tf.function(raw_ids.encode_ids_tensor)(tf.constant([values[:8], values[8:16]]))
    assert batched.numpy().tolist() == [expected[:8], expected[8:16]]
    assert raw_ids.role_of("seq_category_id") == "category"
    assert raw_ids.role_of("user_id") == "user"


def test_hashing_costs_in_proportion_to_the_ids_bytes():
    """Every id used to be padded to the longest one: one 10 KB id among 10,000 candidates
    cost +1.3 GB and 9-16 s. Now each id is hashed over its own blocks: one id at the length
    limit (8 blocks) among 20,000 short ones costs about one more block's work, not 8x."""
    short = [f"item-{i}" for i in range(20_000)]
    long = [raw_ids.MAX_ID_BYTES * "x"] + short[1:]
    assert raw_ids.string_id_tensor(tf.constant(long[:3])).numpy().tolist() == [
        log_converter.string_id(v) for v in long[:3]]
    hashed = tf.function(raw_ids.string_id_tensor)
    times = {"short": [], "long": []}
    for values in (short, long):
        hashed(tf.constant(values))  # traced
    for _ in range(5):  # interleaved, best of 5: the machine's load touches both alike
        for name, values in (("short", short), ("long", long)):
            tensor = tf.constant(values)
            started = time.perf_counter()
            hashed(tensor).numpy()
            times[name].append(time.perf_counter() - started)
    assert min(times["long"]) < 3 * min(times["short"]), times


def test_ids_longer_than_the_limit_are_malformed_log_rows(tmp_path):
    log = tmp_path / "log.csv"
    long_item = "é" * (raw_ids.MAX_ID_BYTES // 2 + 1)  # 1,026 bytes in UTF-8
    log.write_text("user,item,category,timestamp,action\n"
                   f"alice,Up (2009),Animation,1000,click\n"
                   f"alice,{long_item},Drama,1100,click\n"
                   f"{'u' * raw_ids.MAX_ID_BYTES},Up (2009),Animation,1200,click\n")
    with pytest.raises(records.DataFormatError,
                       match=r"1 malformed rows: line 3: item id of 1026 bytes is longer than "
                             r"1024 bytes, the most a raw id may hold"):
        log_converter.read_log(str(log), CONFIG)
    assert log_converter.read_log(str(log), dataclasses.replace(
        CONFIG, skip_bad_rows=True)).user == ["alice", "u" * raw_ids.MAX_ID_BYTES]


def test_request_builder_equals_the_converters_records(dataset):
    output_dir, rows = dataset
    metadata = records.read_metadata(str(output_dir))
    schema = records.schema_from_metadata(metadata)
    users = log_converter.read_vocabulary(str(output_dir), "user")
    items = log_converter.read_vocabulary(str(output_dir), "item")
    builder = RequestBuilder(output_dir)
    builder = RequestBuilder(output_dir, categories=builder.categories_of(rows))
    written = converter_records(output_dir, schema)
    assert len(written) > 10
    longest = 0
    for record in written:
        user = users[int(record["user_id"])]
        history = [row for row in rows if row[0] == user]
        candidates = [items[int(i)] for i in record["cand_item_id"]]
        matches = []
        for time in sorted({int(row[3]) for row in history}):
            built = builder.build(history, candidates, time=time)
            if all(np.array_equal(built[name][0], record[name]) for name in schema.feature_names):
                matches.append(time)
        assert matches, f"no request time of {user!r} gives the record {record}"
        longest = max(longest, len(record["seq_item_id"]))
    assert longest == CONFIG.max_seq_len  # some sequences were cut to the most recent


def test_request_builder_errors(dataset):
    output_dir, rows = dataset
    builder = RequestBuilder(output_dir)
    with pytest.raises(ValueError, match="history row 0: timestamp 'soon'"):
        builder.build([("alice", "Up (2009)", "Animation", "soon", "click")], ["Up (2009)"])
    with pytest.raises(ValueError, match="history row 0: 4 fields, expected 5"):
        builder.build([("alice", "Up (2009)", "Animation", "1000")], ["Up (2009)"])
    with pytest.raises(ValueError, match="No category for item 'Unknown'"):
        builder.build(rows[:3], ["Unknown"])
    with pytest.raises(ValueError, match="other users"):
        builder.build(rows, ["Up (2009)"], user="alice")
    # Dict rows and an explicit category for an item the rows never saw.
    built = RequestBuilder(output_dir, categories={"Unknown": "Drama"}).build(
        [{"item": "Up (2009)", "category": "Animation", "timestamp": "1000"}], ["Unknown"],
        time=2000, user="alice")
    assert built["seq_time_delta"].tolist() == [[1000]]
    assert built["cand_category_id"][0, 0] == log_converter.string_id("Drama")


def raw_and_hashed_requests(dataset):
    """Two users' requests (builder, raw and int64), with candidates the data never saw."""
    output_dir, rows = dataset
    builder = RequestBuilder(output_dir, categories={"Unseen (2024)": "Western",
                                                     "Her (2013)": "Drama"})
    requests = {True: [], False: []}
    for user, candidates in (("alice", ["Up (2009)", "Unseen (2024)", "42", "Jaws (1975)"]),
                             ("bob", ["Her (2013)", "007", "Alien\\Director's Cut"])):
        history = [row for row in rows if row[0] == user]
        for raw in (True, False):
            requests[raw].append(builder.build(history, candidates, time=5_000, raw=raw))
    return pad_requests(requests[True]), pad_requests(requests[False])


def assert_same_outputs(raw_outputs, hashed_outputs, raw_features):
    for name, value in hashed_outputs.items():
        np.testing.assert_array_equal(raw_outputs[name], value, err_msg=name)
    ranked = np.take_along_axis(raw_features["cand_item_id"],
                                np.asarray(raw_outputs["ranked_indices"]), axis=1)
    assert [[v.decode() if isinstance(v, bytes) else v for v in row]
            for row in np.asarray(raw_outputs["ranked_raw_item_ids"]).tolist()] == \
        ranked.tolist()


def test_serving_raw_equals_serving_default(dataset, exported):
    model, version_dir = exported
    raw, hashed = raw_and_hashed_requests(dataset)
    assert raw["cand_item_id"][1, -1] == ""  # the shorter candidate list is padded
    loaded = tf.saved_model.load(version_dir)
    raw_outputs = loaded.signatures["serving_raw"](
        **{k: tf.constant(v.tolist() if v.dtype == object else v) for k, v in raw.items()})
    hashed_outputs = loaded.signatures["serving_default"](
        **{k: tf.constant(v) for k, v in hashed.items()})
    assert_same_outputs({k: v.numpy() for k, v in raw_outputs.items()},
                        {k: v.numpy() for k, v in hashed_outputs.items()}, raw)
    # The vocabularies travel inside the SavedModel (the dataset was deleted).
    assets = sorted(os.listdir(os.path.join(version_dir, "assets")))
    assert assets == ["vocab_category.tsv", "vocab_item.tsv", "vocab_user.tsv"]
    metadata = export.read_metadata(version_dir)
    assert metadata["vocabularies"]["item"]["hashed"] == 1  # the escaped value
    assert metadata["raw_id_inputs"] == ["cand_category_id", "cand_item_id",
                                         "seq_category_id", "seq_item_id", "user_id"]


def test_serving_raw_refuses_an_id_over_the_limit_before_mapping(dataset, exported):
    """A 1 MB id used to take 8.2 s of graph time and a 64 MiB one about 10 minutes."""
    _, version_dir = exported
    raw, hashed = raw_and_hashed_requests(dataset)
    loaded = tf.saved_model.load(version_dir)
    limit = export.read_metadata(version_dir)["raw_id_max_bytes"]
    assert limit == raw_ids.MAX_ID_BYTES == 1024

    def serve_raw(features):
        return loaded.signatures["serving_raw"](**{k: tf.constant(v.tolist() if v.dtype == object
                                                                  else v)
                                                   for k, v in features.items()})

    at_limit = dict(raw, cand_item_id=raw["cand_item_id"].copy())
    at_limit["cand_item_id"][1, 0] = "é" * (limit // 2)  # 1,024 bytes: served
    ranked = serve_raw(at_limit)["ranked_item_ids"].numpy()[1].tolist()
    assert log_converter.string_id("é" * (limit // 2)) in ranked
    over = dict(raw, seq_item_id=raw["seq_item_id"].copy())
    over["seq_item_id"][0, 2] = "x" * (4 * 2**20)
    started = time.perf_counter()
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"Input seq_item_id: a raw id of 4194304 bytes at \[0, 2\], over "
                             r"the limit of 1024 bytes per raw id"):
        serve_raw(over)
    assert time.perf_counter() - started < 5  # was 36.8 s


def test_serving_raw_through_the_cpp_loader(dataset, exported, cpp_runner, tmp_path):  # noqa: F811
    """TF's C++ loader (TF Serving's path) initialises the tables from the assets."""
    _, version_dir = exported
    raw, hashed = raw_and_hashed_requests(dataset)
    raw_bytes = {k: (np.vectorize(lambda s: s.encode(), otypes=[object])(v)
                     if v.dtype == object else v) for k, v in raw.items()}
    (raw_outputs,) = run_cpp(cpp_runner, version_dir, [raw_bytes], tmp_path / "raw",
                             signature_name="serving_raw")
    (hashed_outputs,) = run_cpp(cpp_runner, version_dir, [hashed], tmp_path / "hashed")
    assert isinstance(raw_outputs, dict), raw_outputs
    assert_same_outputs(raw_outputs, hashed_outputs, raw)


def test_clients_send_raw_ids_to_ifa_serve(dataset, exported):
    _, version_dir = exported
    raw, hashed = raw_and_hashed_requests(dataset)
    server = ModelServer(ServerOptions(
        port=0, rest_api_port=free_port(), model_name="ifa",
        model_base_path=os.path.dirname(version_dir))).start()
    try:
        for client in (GrpcClient(f"127.0.0.1:{server.grpc_port}", "ifa"),
                       RestClient(f"127.0.0.1:{server.rest_port}", "ifa")):
            over = dict(raw, cand_item_id=raw["cand_item_id"].copy())
            over["cand_item_id"][1, 1] = "€" * 400  # 1,200 bytes
            with client:
                wait_until_available(client, 60)
                by_raw = client.rank(raw)
                by_id = client.rank(hashed)
                with pytest.raises(ServingError) as error:
                    client.rank(over)
            assert (error.value.code.name, error.value.message) == (
                "INVALID_ARGUMENT", "Input cand_item_id: a raw id of 1200 bytes at [1, 1], "
                                    "over the limit of 1024 bytes per raw id")
            for row, (raw_ranking, id_ranking) in enumerate(zip(by_raw, by_id)):
                np.testing.assert_array_equal(raw_ranking.item_ids, id_ranking.item_ids)
                np.testing.assert_array_equal(raw_ranking.indices, id_ranking.indices)
                assert raw_ranking.raw_item_ids == [raw["cand_item_id"][row][i]
                                                    for i in raw_ranking.indices]
                assert id_ranking.raw_item_ids is None
            assert "Unseen (2024)" in by_raw[0].raw_item_ids
            assert "Alien\\Director's Cut" in by_raw[1].raw_item_ids
    finally:
        server.stop()


def test_a_fresh_servers_first_raw_request_is_warm(dataset, exported):
    """The warm-up file replays `serving_raw` (numeric, hashed and padded ids) beside
    `serving_default`, so a fresh ifa-serve's first raw request costs about what the next
    ones do (without it: 1.1-1.3 s, some 200 times the next)."""
    _, version_dir = exported
    requests = export.read_warmup_requests(version_dir)
    assert [r.model_spec.signature_name for r in requests] == ["serving_default", "serving_raw"]
    warm_up = {k: tf.make_ndarray(v) for k, v in requests[1].inputs.items()}
    ids = warm_up["cand_item_id"].ravel().tolist()
    assert b"" in ids and any(i.isdigit() for i in ids) and any(
        i.startswith(b"warm-up ") for i in ids)
    raw, _ = raw_and_hashed_requests(dataset)
    server = ModelServer(ServerOptions(
        port=0, model_name="ifa", model_base_path=os.path.dirname(version_dir))).start()
    try:
        with GrpcClient(f"127.0.0.1:{server.grpc_port}", "ifa") as client:
            wait_until_available(client, 60)  # AVAILABLE once the warm-up ran
            seconds = []
            for _ in range(4):
                started = time.perf_counter()
                client.rank(raw)
                seconds.append(time.perf_counter() - started)
    finally:
        server.stop()
    assert seconds[0] < 20 * statistics.median(seconds[1:]), seconds


def test_ifa_export_finds_the_training_datasets_vocabularies(dataset, tmp_path):
    from ifa_tf.cli import export as export_cli

    output_dir, _ = dataset
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"")
    (run / "config.yaml").write_text(f"data:\n  train_data: {output_dir}/train-*\n")
    assert export_cli.training_dataset(str(run / "model.keras")) == str(output_dir)
    assert sorted(raw_ids.vocabulary_files(export_cli.training_dataset(
        str(run / "model.keras")))) == ["category", "item", "user"]
    (run / "config.yaml").write_text("data:\n  train_data: /nowhere/train-*\n")
    assert export_cli.training_dataset(str(run / "model.keras")) is None
