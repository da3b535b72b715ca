"""States of a stateful IFA trained on a converted raw log (`ifa-data from-log`: string ids,
its own schema without authors): `ifa-state build` / `apply` from the raw log map ids as the
converter did, and `StateModel` / `rank_user` over a server read the model's own feature
names instead of the default schema's."""

import collections
import os
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import ifa_tf
from ifa_tf import export
from ifa_tf.data import log_converter, records
from ifa_tf.schema import FeatureSchema
from ifa_tf.serving import GrpcClient, RequestBuilder, state_store

DAY = 86_400
T0 = 1_700_000_000
CONFIG = log_converter.LogConfig(columns="user,item,category,timestamp,action",
                                 actions="pv:click,fav:like+click", window_seconds=DAY,
                                 num_negatives=2, max_candidates=4, test_fraction=0.0)
HEADER = "user,item,category,ts,type\n"


def log_rows():
    """Three users (two string ids, one integer id) over four days; one row repeated at its
    time with another action (the converter merges them)."""
    rng = np.random.default_rng(0)
    rows = []
    for user in ("alice", "bob", "17"):
        for day in range(4):
            for event in range(3):
                item = int(rng.integers(0, 9))
                rows.append((user, f"B00{item}", ("Drama", "Comedy", "Noir")[item % 3],
                             T0 + day * DAY + event * 600 + int(rng.integers(0, 60)),
                             ("pv", "fav")[int(rng.integers(0, 2))]))
    rows.append((*rows[4][:4], "fav"))
    return rows


def write_log(path, rows, header=HEADER):
    path.write_text(header + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("raw_log")
    rows = log_rows()
    log = write_log(directory / "log.csv", rows)
    log_converter.convert_log(log, str(directory / "data"), CONFIG)
    return rows, log, str(directory / "data")


@pytest.fixture(scope="module")
def log_model(converted, tmp_path_factory):
    """A decay IFA on the log's schema (item and category, no author), exported."""
    _, _, dataset = converted
    schema = records.schema_from_metadata(records.read_metadata(dataset)).to_dict()
    schema["embedding_buckets"] = {"user_id": 31, "item_id": 101, "category_id": 13}
    schema = FeatureSchema.from_dict(schema)
    keras.utils.set_random_seed(4)
    model = ifa_tf.zoo.build("ifa", schema=schema, time_encoding="decay")
    export_dir = export.export_saved_model(model, tmp_path_factory.mktemp("log_model") / "ifa",
                                           schema=schema, warmup_shapes=())
    return model, export_dir, state_store.StateModel(export_dir=export_dir)


def test_log_events_are_mapped_as_the_converter_mapped_them(converted):
    _, log, dataset = converted
    events = state_store.events_from_log(log, dataset)
    assert sorted(events) == sorted(int(log_converter.encode_ids([u])[0][0])
                                    for u in ("alice", "bob", "17"))
    assert 17 in events  # an integer id is kept
    schema = records.schema_from_metadata(records.read_metadata(dataset))
    checked = 0
    for path in records.expand_file_pattern(f"{dataset}/train-*"):
        for serialized in tf.data.TFRecordDataset(path, "GZIP").as_numpy_iterator():
            request = records.decode_example(serialized, schema, with_labels=False,
                                             with_extras=False)
            user = events[int(request["user_id"])]
            n = len(request["seq_item_id"])
            # The request's time: the event time with exactly n events before it.
            [now] = {t for t in user["seq_event_time"].tolist()
                     if np.count_nonzero(user["seq_event_time"] < t) == n}
            np.testing.assert_array_equal(request["seq_time_delta"],
                                          now - user["seq_event_time"][:n])
            for name in ("seq_item_id", "seq_category_id", "seq_action"):
                np.testing.assert_array_equal(request[name], user[name][:n], err_msg=name)
            checked += 1
    assert checked >= 6


def test_a_relative_item_table_is_found_beside_the_log(tmp_path, monkeypatch):
    source = tmp_path / "source"
    source.mkdir()
    (source / "items.csv").write_text("item_id,category\nB001,Drama\nB002,Noir\n")
    write_log(source / "log.csv", [("alice", "B001", T0), ("alice", "B002", T0 + DAY),
                                   ("alice", "B001", T0 + 2 * DAY)], "user,item,ts\n")
    monkeypatch.chdir(source)  # the converter records the item table as given: relative
    log_converter.convert_log("log.csv", str(tmp_path / "data"), log_converter.LogConfig(
        item_table="items.csv", num_negatives=1, max_candidates=2, test_fraction=0.0))
    monkeypatch.chdir(tmp_path)
    [events] = state_store.events_from_log(source / "log.csv", tmp_path / "data").values()
    np.testing.assert_array_equal(events["seq_category_id"], log_converter.encode_ids(
        ["Drama", "Noir", "Drama"])[0])


def test_ifa_state_builds_and_applies_a_raw_log(converted, log_model, tmp_path):
    from ifa_tf.cli import state as state_cli

    rows, log, dataset = converted
    model, export_dir, state_model = log_model
    values = types.SimpleNamespace(model=export_dir, store=f"sqlite://{tmp_path / 's.db'}",
                                   records=None, events=None, log=log, dataset=dataset,
                                   now=None, user="alice", batch_size=2)
    run = dict(out=lambda _: None, model=state_model)
    assert state_cli.run_command("build", values, **run)["users"] == 3
    alice = [row for row in rows if row[0] == "alice"]
    items = sorted({row[1] for row in rows})
    shown = state_cli.run_command("show", values, **run)
    assert shown["known"] and shown["state_time"] == max(row[3] for row in alice)
    # The raw user's key, and the state's categories by the log's names, most frequent first.
    assert shown["key"] == RequestBuilder(dataset).encode_user("alice")
    counts = collections.Counter(category for _, _, category in  # rows of one event merge
                                 {(row[1], row[3], row[2]) for row in alice})
    assert [[name, count] for name, count, _ in shown["top"]["category"]] == sorted(
        ([name, count] for name, count in counts.items()),
        key=lambda entry: (-entry[1], log_converter.encode_ids([entry[0]])[0][0]))
    # The state ranks as serving_default ranks RequestBuilder's request from the rows.
    now = T0 + 5 * DAY
    builder = RequestBuilder(dataset)  # categories as the converter saw them, and one new
    builder = RequestBuilder(dataset, categories={**builder.categories_of(rows), "B00X": "Noir"})
    features = builder.build(alice, [*items[:3], "B00X"], time=now)
    assert shown["events"] == features["seq_item_id"].shape[1]
    with state_store.open_store(values.store) as store:
        record = state_store.load_state(store, state_model, int(features["user_id"][0]),
                                        state_model.cross_features)
    one = {k: v[0] for k, v in features.items()}
    crosses = record.cross_features(one, state_model.cross_features)
    np.testing.assert_array_equal(crosses["cand_cross_category_count"],
                                  one["cand_cross_category_count"])
    signatures = tf.saved_model.load(export_dir).signatures
    ranked = signatures["rank_with_state"](
        **{k: tf.constant(features[k]) for k in model.rank_features},
        state=tf.constant(record.state[None]), now=tf.constant([now], tf.int64),
        state_time=tf.constant([record.time], tf.int64),
        state_model=tf.constant([record.model], tf.int64))
    expected = signatures["serving_default"](**{k: tf.constant(v)
                                                for k, v in features.items()})
    np.testing.assert_allclose(ranked["score"].numpy(), expected["score"].numpy(), atol=1e-5)
    # New raw events, in the same format, are added to the stored states.
    values.log = write_log(tmp_path / "today.csv", [("alice", "B00X", "Noir", now, "fav"),
                                                    ("carol", "B001", "Drama", now, "pv")])
    applied = state_cli.run_command("apply", values, **run)
    assert (applied["users"], applied["events"]) == (2, 2)
    after = state_cli.run_command("show", values, **run)
    assert (after["events"], after["state_time"]) == (shown["events"] + 1, now)
    values.user = "dave"
    assert state_cli.run_command("show", values, **run)["known"] is False


def test_rank_user_over_a_server_uses_the_served_models_features(converted, log_model,
                                                                  tmp_path):
    from ifa_tf.serving.options import ServerOptions
    from ifa_tf.serving.server import ModelServer

    rows, _, dataset = converted
    model, export_dir, local = log_model
    server = ModelServer(ServerOptions(port=0, model_name="ifa",
                                       model_base_path=os.path.dirname(export_dir),
                                       file_system_poll_wait_seconds=0)).start()
    try:
        with GrpcClient(f"127.0.0.1:{server.grpc_port}", "ifa") as client:
            served = state_store.StateModel(client=client)
            # Not the default schema's (no author): the model's own, read off the server.
            assert served.sequence_features == sorted(local.sequence_features) == [
                "seq_action", "seq_category_id", "seq_item_id", "seq_time_delta"]
            assert served.cross_features == ["cand_cross_category_count"]
            assert (served.model, served.state_shape) == (local.model, local.state_shape)
            builder = RequestBuilder(dataset)
            builder = RequestBuilder(dataset, categories=builder.categories_of(rows))
            bob = [row for row in rows if row[0] == "bob"]
            features = builder.build(bob, sorted({row[1] for row in rows})[-3:],
                                     time=T0 + 9 * DAY)
            user = int(features["user_id"][0])
            with state_store.open_store(tmp_path / "states.db") as store:
                state_store.apply_events(store, served, user,
                                         state_store.events_from_log(
                                             write_log(tmp_path / "bob.csv", bob),
                                             dataset)[user], served.cross_features)
                ranking, _ = state_store.rank_user(
                    client, store, user,
                    {k: features[k][0] for k in ("user_id", "cand_item_id",
                                                 "cand_category_id")},
                    now=T0 + 9 * DAY, model=served)
    finally:
        server.stop()
    signature = tf.saved_model.load(export_dir).signatures["serving_default"]
    expected = signature(**{k: tf.constant(v) for k, v in features.items()})
    np.testing.assert_array_equal(ranking.item_ids, expected["ranked_item_ids"].numpy()[0])
