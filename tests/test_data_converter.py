"""The log converter: no leakage, candidates and labels from the window, split by time,
malformed rows reported with line numbers, string ids by a stable hash, the item table, the
MovieLens presets."""

import dataclasses
import glob
import hashlib
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from ifa_tf.data import log_converter, make_dataset, records

HOUR = 3600
DAY = 86_400


def _random_log(seed=0, num_users=6, events_per_user=40):
    """Rows (user, item, category, timestamp, action) with many timestamp ties."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(num_users):
        times = np.sort(rng.integers(0, 20, events_per_user)) * 6 * HOUR + 1_000_000
        for time in times:
            item = int(rng.integers(1, 30))
            rows.append((f"u{user}", f"i{item}", f"c{item % 4}", int(time),
                         str(rng.choice(["pv", "fav", "cart"]))))
    rng.shuffle(rows)  # the converter must sort by time itself
    return rows


def _write_log(path, rows, delimiter=",", header="user,item,category,ts,type"):
    with open(path, "w") as f:
        if header:
            f.write(header.replace(",", delimiter) + "\n")
        for row in rows:
            f.write(delimiter.join(str(v) for v in row) + "\n")


def _read_all(output_dir, split):
    schema = records.schema_from_metadata(records.read_metadata(output_dir))
    out = []
    for path in sorted(glob.glob(os.path.join(output_dir, f"{split}-*"))):
        for serialized in tf.data.TFRecordDataset(path, compression_type="GZIP"):
            out.append(records.decode_example(serialized.numpy(), schema))
    return out


def _vocab(output_dir, role):
    vocabulary = log_converter.read_vocabulary(output_dir, role)
    assert len(set(vocabulary.values())) == len(vocabulary)  # no collision
    return vocabulary


CONFIG = log_converter.LogConfig(columns="user,item,category,timestamp,action",
                                 actions="pv:click,fav:like+click", window_seconds=DAY,
                                 num_negatives=5, max_seq_len=1000, test_fraction=0.25)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("log")
    rows = _random_log()
    _write_log(directory / "log.csv", rows)
    output_dir = str(directory / "out")
    metadata = log_converter.convert_log(str(directory / "log.csv"), output_dir, CONFIG,
                                         num_shards=2)
    return rows, output_dir, metadata


def _request_time(request, user_rows):
    """The request time, recovered from the log: the first event time with exactly n
    earlier events (the converter keeps whole histories here: max_seq_len is not hit), rows
    of one item at one time counting once."""
    events = {(t, i) for t, i, _ in user_rows}
    for time in sorted({t for t, _ in events}):
        if sum(t < time for t, _ in events) == len(request["seq_item_id"]):
            return time
    raise AssertionError("no time matches the sequence length")


def _user_rows(rows, users, request):
    user = users[request["user_id"]]
    return sorted((t, i, kind) for u, i, _, t, kind in rows if u == user)


def test_sequence_holds_exactly_the_events_strictly_before_the_request(converted):
    rows, output_dir, _ = converted
    users, items = _vocab(output_dir, "user"), _vocab(output_dir, "item")
    requests = _read_all(output_dir, "train") + _read_all(output_dir, "test")
    assert len(requests) > 20
    for request in requests:
        assert (request["seq_time_delta"] > 0).all()  # nothing at or after T
        user_rows = _user_rows(rows, users, request)
        time = _request_time(request, user_rows)
        earlier = sorted({(t, i) for t, i, _ in user_rows if t < time})
        assert sorted(items[i] for i in request["seq_item_id"]) == sorted(
            i for _, i in earlier)
        np.testing.assert_array_equal(np.sort(request["seq_time_delta"]),
                                      np.sort([time - t for t, _ in earlier]))
        deltas = request["seq_time_delta"]
        assert (np.diff(deltas) <= 0).all()  # oldest first
        window = {i for t, i, _ in user_rows if time <= t < time + DAY}
        positives = {items[i] for i, shown in zip(request["cand_item_id"],
                                                      request["impression"]) if shown}
        assert positives == window


def test_labels_follow_the_action_mapping(converted):
    rows, output_dir, metadata = converted
    assert metadata["tasks"] == ["impression", "click", "like"]
    users, items = _vocab(output_dir, "user"), _vocab(output_dir, "item")
    negatives = 0
    for request in _read_all(output_dir, "train"):
        user_rows = _user_rows(rows, users, request)
        time = _request_time(request, user_rows)
        window_kinds = {}
        for t, item, kind in user_rows:
            if time <= t < time + DAY:
                window_kinds.setdefault(item, set()).add(kind)
        assert len(np.unique(request["cand_item_id"])) == len(request["cand_item_id"])
        for j, item_id in enumerate(request["cand_item_id"]):
            kinds = window_kinds.get(items[item_id])
            assert request["impression"][j] == (kinds is not None)
            if kinds is None:
                negatives += 1
                assert request["click"][j] == request["like"][j] == 0
                continue
            assert request["click"][j] == bool(kinds & {"pv", "fav"})
            assert request["like"][j] == ("fav" in kinds)
    assert negatives > 0


def test_sequence_actions_are_bit_sets(tmp_path):
    _write_log(tmp_path / "log.csv", [("a", "x", "c", 10, "pv"), ("a", "y", "c", 20, "fav"),
                                      ("a", "z", "c", 30, "cart"), ("a", "x", "c", 30, "pv"),
                                      ("a", "w", "c", 200_000, "pv")])
    log_converter.convert_log(str(tmp_path / "log.csv"), str(tmp_path / "out"), CONFIG)
    (request,) = _read_all(str(tmp_path / "out"), "train") + _read_all(
        str(tmp_path / "out"), "test")
    items = _vocab(str(tmp_path / "out"), "item")
    assert [items[i] for i in request["seq_item_id"]] == ["x", "y", "z", "x"]
    np.testing.assert_array_equal(request["seq_action"], [1, 5, 0, 1])  # fav = click+like
    np.testing.assert_array_equal(request["seq_time_delta"],
                                  [199_990, 199_980, 199_970, 199_970])
    assert [items[i] for i, s in zip(request["cand_item_id"], request["impression"])
            if s] == ["w"]
    cross = dict(zip(request["cand_item_id"], request["cand_cross_category_count"]))
    assert cross[log_converter.string_id("w")] == 4


def test_split_is_by_time(converted):
    rows, output_dir, metadata = converted
    split_time = metadata["split_time"]
    users, items = _vocab(output_dir, "user"), _vocab(output_dir, "item")
    for split, later in (("train", False), ("test", True)):
        for request in _read_all(output_dir, split):
            user = users[request["user_id"]]
            last = items[request["seq_item_id"][-1]]
            times = [t + request["seq_time_delta"][-1] for u, i, _, t, _ in rows
                     if u == user and i == last]
            # some occurrence of the last sequence item gives the request time
            assert any((t >= split_time) == later for t in times), split
    assert metadata["splits"]["test"]["num_requests"] > 0


def test_output_loads_through_the_pipeline(converted):
    _, output_dir, _ = converted
    features, labels = next(iter(make_dataset(os.path.join(output_dir, "train-*"),
                                              batch_size=4, max_seq_len=7)))
    assert "seq_author_id" not in features and "cand_author_id" not in features
    assert features["seq_item_id"].shape[1] <= 7
    assert sorted(labels) == ["click", "impression", "like"]


def test_malformed_rows_are_reported_with_line_numbers(tmp_path):
    rows = [("a", "x", "c", 10, "pv"), ("a", "y", "c", "yesterday", "pv"),
            ("b", "", "c", 10, "pv"), ("b", "x", "c", 20, "pv", "extra"),
            ("b", "y", "c", 200_000, "pv")]
    _write_log(tmp_path / "log.csv", rows)
    with pytest.raises(records.DataFormatError) as error:
        log_converter.convert_log(str(tmp_path / "log.csv"), str(tmp_path / "out"), CONFIG)
    message = str(error.value)
    assert "3 malformed rows" in message
    assert "line 3: timestamp 'yesterday'" in message
    assert "line 4: empty item" in message
    assert "line 5: 6 fields, expected 5" in message
    assert not os.path.exists(tmp_path / "out" / "metadata.json")


def test_skipped_rows_are_logged_and_counted(tmp_path, caplog):
    rows = [("a", "x", "c", 10, "pv"), ("a", "y", "c", "yesterday", "pv"),
            ("a", "y", "c", 200_000, "pv")]
    _write_log(tmp_path / "log.csv", rows)
    config = log_converter.LogConfig(columns="user,item,category,timestamp,action",
                                     actions="pv:click", skip_bad_rows=True, test_fraction=0)
    with caplog.at_level(logging.WARNING):
        metadata = log_converter.convert_log(str(tmp_path / "log.csv"),
                                             str(tmp_path / "out"), config)
    assert metadata["bad_rows"] == 1 and metadata["bad_row_lines"] == [3]
    assert "skipped malformed line 3" in caplog.text


def test_threshold_actions_noheader_tab_and_ignored_columns(tmp_path):
    rows = [("7", "100", "junk", "4", "2024-01-01T00:00:00"),
            ("7", "101", "junk", "5", "2024-01-01T01:00:00"),
            ("7", "102", "junk", "2", "2024-01-03T00:00:00"),
            ("7", "103", "junk", "5", "2024-01-03T00:00:00")]
    _write_log(tmp_path / "log.tsv", rows, delimiter="\t", header=None)
    config = log_converter.LogConfig(columns="user,item,_,action,timestamp", delimiter="\t",
                                     header=False, actions=">=4:click,==5:like",
                                     num_negatives=1, test_fraction=0, fixed_set_size=False,
                                     negatives="popularity")
    metadata = log_converter.convert_log(str(tmp_path / "log.tsv"), str(tmp_path / "out"),
                                         config)
    assert metadata["vocabularies"] == {}  # integer ids kept as they are
    assert metadata["schema"]["item_attributes"] == ["item_id"]
    (request,) = _read_all(str(tmp_path / "out"), "train")
    assert request["user_id"] == 7
    np.testing.assert_array_equal(request["seq_item_id"], [100, 101])
    np.testing.assert_array_equal(request["seq_action"], [1, 5])
    np.testing.assert_array_equal(request["seq_time_delta"], [2 * DAY, 2 * DAY - HOUR])
    labels = dict(zip(request["cand_item_id"].tolist(),
                      zip(request["impression"], request["click"], request["like"])))
    assert labels[102] == (1, 0, 0) and labels[103] == (1, 1, 1)
    assert len(labels) == 3  # one negative, drawn from the popular items 100/101
    assert {100, 101} & set(labels)


@pytest.mark.parametrize("kwargs, message", [
    ({"columns": "user,item,stamp"}, "unknown roles \\['stamp'\\]"),
    ({"columns": "user,item"}, "missing \\['timestamp'\\]"),
    ({"columns": "user,item,timestamp,action"}, "must map its values"),
    ({"actions": "pv"}, "'value:task"),
    ({"actions": "pv:impression"}, "'impression' is implied"),
    ({"actions": ">=four:click"}, "compares with a non-number"),
    ({"window_seconds": 0}, "window_seconds=0"),
])
def test_config_errors_name_the_value(kwargs, message):
    base = {"columns": "user,item,timestamp", "actions": ""}
    with pytest.raises(ValueError, match=message):
        log_converter.LogConfig(**{**base, **kwargs})


def test_threshold_rules_reject_non_numbers():
    rules = log_converter.ActionRules.parse(">=4:click,==5:like,pv:long_view")
    assert rules.tasks == ("click", "long_view", "like")
    assert rules("5") == 1 | 4 and rules("4.5") == 1 and rules("pv") == 2 and rules("1") == 0
    with pytest.raises(ValueError, match="'great' is not a number"):
        rules("great")


def _fake_movielens(directory):
    with open(directory / "ml-100k.item", "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        f.write("1\tToy Story\t1995\tAnimation Children's Comedy\n")
        f.write("2\tGoldenEye\t1995\tAction Adventure Thriller\n")
        f.write("3\tFour Rooms\t1995\tThriller\n")
    with open(directory / "ml-100k.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for user, item, rating, time in [(5, 1, 3, 100), (5, 2, 5, 200), (5, 3, 4, 300_000),
                                         (6, 2, 1, 100), (6, 1, 4, 500_000)]:
            f.write(f"{user}\t{item}\t{rating}\t{time}\n")


def test_movielens_preset_reads_the_fetched_layout(tmp_path):
    _fake_movielens(tmp_path)
    config = log_converter.LogConfig(num_negatives=1, test_fraction=0)
    metadata = log_converter.convert_movielens_100k(str(tmp_path), str(tmp_path / "out"),
                                                    config)
    assert metadata["preset"] == "movielens_100k"
    assert metadata["tasks"] == ["impression", "click", "like"]
    genres = _vocab(str(tmp_path / "out"), "category")
    assert sorted(genres.values()) == ["Action", "Animation", "Thriller"]
    requests = {int(r["user_id"]): r for r in _read_all(str(tmp_path / "out"), "train")}
    assert sorted(requests) == [5, 6]
    np.testing.assert_array_equal(requests[5]["seq_item_id"], [1, 2])
    assert [genres[c] for c in requests[5]["seq_category_id"]] == ["Animation", "Action"]
    np.testing.assert_array_equal(requests[5]["seq_action"], [0, 5])  # 3: none, 5: click+like
    shown = requests[5]["cand_item_id"][requests[5]["impression"] == 1]
    np.testing.assert_array_equal(shown, [3])


@pytest.mark.skipif(not os.path.exists("/tmp/ml-100k/ml-100k.inter"),
                    reason="MovieLens-100K not fetched (ifa-data fetch movielens_100k /tmp/ml-100k)")
def test_movielens_100k_real_files(tmp_path):
    config = log_converter.LogConfig(num_negatives=20, max_candidates=100)
    metadata = log_converter.convert_movielens_100k("/tmp/ml-100k", str(tmp_path), config)
    assert metadata["num_events"] == 100_000 and metadata["bad_rows"] == 0
    assert metadata["id_ranges"]["item_id"] == [1, 1682]
    assert metadata["splits"]["train"]["num_requests"] > metadata["splits"]["test"][
        "num_requests"] > 0


# ------------------------------------------------------------------------------ string ids
def test_string_ids_are_a_keyed_blake2b_pinned_here():
    """The documented formula, and values pinned: changing either changes every dataset."""
    for value in ("Toy Story (1995)", "1m_1", "0", "", "\u00e9t\u00e9"):
        digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8,
                                 key=b"ifa_tf.string_id.v1").digest()
        assert log_converter.string_id(value) == 1 + int.from_bytes(digest, "little") % (
            2**63 - 1)
    assert log_converter.string_id("Toy Story (1995)") == 5607944321659586521
    assert log_converter.string_id("1m_1") == 2787727302107777799
    assert log_converter.string_id("007") == 8852246996423323378
    ids, table = log_converter.encode_ids(["42", "abc", "007", "0", "42"])
    np.testing.assert_array_equal(ids, [42, log_converter.string_id("abc"),
                                        8852246996423323378, 7641949619183895545, 42])
    assert table == {"42": 42, "abc": log_converter.string_id("abc"),
                     "007": 8852246996423323378, "0": 7641949619183895545}


CONFIG_NO_CATEGORY = log_converter.LogConfig(columns="user,item,timestamp,action",
                                             actions="pv:click", num_negatives=0,
                                             test_fraction=0)


def test_an_id_maps_to_one_int64_whatever_else_the_log_holds(tmp_path):
    """Two logs (the second in another order, with other users and items) give the shared
    ids the same int64; 1..V by sorted value did not. The vocabulary maps every id back,
    tabs and backslashes included."""
    rows = [("alice", "tab\there", 10, "pv"), ("alice", "back\\slash", 20, "pv"),
            ("alice", "x", 200_000, "pv")]
    more = [("aaron", "a first item", 5, "pv"), ("aaron", "x", 300_000, "pv")]
    ids = {}
    for name, log in (("one", rows), ("two", more + rows[::-1])):
        with open(tmp_path / f"{name}.csv", "w") as f:
            f.write("user,item,ts,type\n")
            f.writelines(",".join(f'"{v}"' if "\t" in str(v) else str(v) for v in row) + "\n"
                         for row in log)
        output_dir = str(tmp_path / name)
        log_converter.convert_log(str(tmp_path / f"{name}.csv"), output_dir, CONFIG_NO_CATEGORY)
        users = log_converter.read_vocabulary(output_dir, "user")
        items = log_converter.read_vocabulary(output_dir, "item")
        assert set(items.values()) == {row[1] for row in log}
        (request,) = [r for r in _read_all(output_dir, "test") + _read_all(output_dir, "train")
                      if users[r["user_id"]] == "alice"]
        ids[name] = request
        assert [items[i] for i in request["seq_item_id"]] == ["tab\there", "back\\slash"]
    assert ids["one"]["user_id"] == ids["two"]["user_id"] == log_converter.string_id("alice")
    np.testing.assert_array_equal(ids["one"]["seq_item_id"], ids["two"]["seq_item_id"])
    np.testing.assert_array_equal(ids["one"]["seq_item_id"],
                                  [log_converter.string_id("tab\there"),
                                   log_converter.string_id("back\\slash")])



# ------------------------------------------------------------------------------ item table
def _write_item_table(path, lines):
    path.write_text("item_id:token,genres:token_seq,year\n" + "".join(f"{line}\n"
                                                                       for line in lines))
    return str(path)


def _table_config(table, **kwargs):
    return log_converter.LogConfig(
        columns="user,item,timestamp,action", actions="pv:click", num_negatives=0,
        fixed_set_size=False, test_fraction=0, item_table=table, item_table_category="genres",
        item_table_separator="|", **kwargs)


def test_item_table_gives_each_event_its_items_first_category(tmp_path):
    table = _write_item_table(tmp_path / "items.csv", ["x,Drama|Comedy,1990", "y,Comedy,1991",
                                                       "w,War,1992"])
    _write_log(tmp_path / "log.csv", [("a", "x", 10, "pv"), ("a", "y", 20, "pv"),
                                      ("a", "w", 200_000, "pv")], header="user,item,ts,type")
    metadata = log_converter.convert_log(str(tmp_path / "log.csv"), str(tmp_path / "out"),
                                         _table_config(table))
    assert metadata["schema"]["item_attributes"] == ["item_id", "category_id"]
    (request,) = _read_all(str(tmp_path / "out"), "train")
    genres = log_converter.read_vocabulary(str(tmp_path / "out"), "category")
    assert [genres[c] for c in request["seq_category_id"]] == ["Drama", "Comedy"]
    assert [genres[c] for c in request["cand_category_id"]] == ["War"]
    np.testing.assert_array_equal(request["cand_cross_category_count"], [0])


def test_item_table_faults_are_named(tmp_path):
    table = _write_item_table(tmp_path / "items.csv", ["x,Drama,1990", "y,,1991", "x,War,1992",
                                                       "z,Comedy"])
    _write_log(tmp_path / "log.csv", [("a", "x", 10, "pv"), ("a", "v", 200_000, "pv")],
               header="user,item,ts,type")
    with pytest.raises(records.DataFormatError) as error:
        log_converter.convert_log(str(tmp_path / "log.csv"), str(tmp_path / "out"),
                                  _table_config(table))
    assert str(error.value).startswith(
        f"{table}: 3 malformed rows: line 3: empty category; line 4: item 'x' is already on "
        "line 2; line 5: 2 fields, expected 3")
    table = _write_item_table(tmp_path / "items.csv", ["x,Drama,1990", "w,War,1992"])
    with pytest.raises(records.DataFormatError,
                       match=f"line 3: item 'v' is not in {table}"):
        log_converter.convert_log(str(tmp_path / "log.csv"), str(tmp_path / "out"),
                                  _table_config(table))
    with pytest.raises(records.DataFormatError, match="no column 'genre' "
                                                      "\\(item_table_category\\)"):
        log_converter.convert_log(str(tmp_path / "log.csv"), str(tmp_path / "out"),
                                  dataclasses.replace(_table_config(table),
                                                      item_table_category="genre"))
    with pytest.raises(ValueError, match="a category column and an item_table"):
        log_converter.LogConfig(columns="user,item,category,timestamp", item_table=table)


# ---------------------------------------------------------------------------- MovieLens-1M
DAY_AND_A_WEEK = 8 * DAY


def fake_movielens_1m(directory):
    """The layout of `ifa-data fetch movielens_1m`: RecBole atomic files, CRLF, string
    user ids, titles as item ids, space-separated genres. User 1m_1 rates Zorro and Alien in
    the same second: the log's order (Zorro first) must survive, although both the titles
    and their hashes sort the other way."""
    (directory / "ml-1m.item").write_bytes((
        "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n"
        "Zorro (1998)\tZorro\t1998\tAction Adventure\r\n"
        "Alien (1979)\tAlien\t1979\tHorror Sci-Fi\r\n"
        "Babe (1995)\tBabe\t1995\tChildren's Comedy Drama\r\n"
        "Heat (1995)\tHeat\t1995\tAction Crime Thriller\r\n").encode())
    (directory / "ml-1m.inter").write_bytes((
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n"
        "1m_1\tZorro (1998)\t5\t100\r\n"
        "1m_1\tAlien (1979)\t3\t100\r\n"
        "1m_1\tBabe (1995)\t4\t200\r\n"
        f"1m_1\tHeat (1995)\t4\t{100 + DAY_AND_A_WEEK}\r\n"
        "1m_2\tBabe (1995)\t2\t50\r\n"
        f"1m_2\tZorro (1998)\t5\t{50 + DAY_AND_A_WEEK}\r\n").encode())


def test_movielens_1m_preset_reads_the_fetched_layout(tmp_path):
    fake_movielens_1m(tmp_path)
    metadata = log_converter.convert_preset("movielens_1m", str(tmp_path), str(tmp_path / "out"))
    assert metadata["preset"] == "movielens_1m"
    assert metadata["tasks"] == ["impression", "click", "like"]
    config = metadata["converter"]
    assert (config["max_seq_len"], config["window_seconds"], config["max_candidates"],
            config["num_negatives"], config["actions"]) == (2500, 7 * DAY, 50, 30,
                                                            ">=4:click,==5:like")
    assert (config["fixed_set_size"], config["negatives"], config["exclude_history"]) == (
        True, "popularity_matched", True)
    items = _vocab(str(tmp_path / "out"), "item")
    genres = _vocab(str(tmp_path / "out"), "category")
    assert sorted(items.values()) == ["Alien (1979)", "Babe (1995)", "Heat (1995)",
                                      "Zorro (1998)"]
    assert sorted(genres.values()) == ["Action", "Children's", "Horror"]
    string_id = log_converter.string_id
    requests = {r["user_id"]: r for r in _read_all(str(tmp_path / "out"), "train")
                + _read_all(str(tmp_path / "out"), "test")}
    assert sorted(requests) == sorted([string_id("1m_1"), string_id("1m_2")])
    request = requests[string_id("1m_1")]
    assert [items[i] for i in request["seq_item_id"]] == ["Zorro (1998)", "Alien (1979)",
                                                         "Babe (1995)"]
    assert [genres[c] for c in request["seq_category_id"]] == ["Action", "Horror",
                                                              "Children's"]
    np.testing.assert_array_equal(request["seq_action"], [5, 0, 1])  # 5: click+like, 3: none
    np.testing.assert_array_equal(request["seq_time_delta"],
                                  [DAY_AND_A_WEEK, DAY_AND_A_WEEK, DAY_AND_A_WEEK - 100])
    shown = request["impression"] == 1
    assert [items[i] for i in request["cand_item_id"][shown]] == ["Heat (1995)"]
    assert request["click"][shown].tolist() == [1] and request["like"][shown].tolist() == [0]
    # Heat alone: the 3 other movies are in the history, never negatives (exclude_history)
    assert len(request["cand_item_id"]) == 1


def test_movielens_1m_preset_overrides_and_layout(tmp_path):
    fake_movielens_1m(tmp_path)
    metadata = log_converter.convert_preset("movielens_1m", str(tmp_path), str(tmp_path / "out"),
                                            num_negatives=1, test_fraction=0)
    assert (metadata["converter"]["num_negatives"], metadata["converter"]["max_seq_len"]) == (
        1, 2500)
    with pytest.raises(ValueError, match="Preset 'movielens_1m' sets \\['columns'\\]"):
        log_converter.convert_preset("movielens_1m", str(tmp_path), str(tmp_path / "x"),
                                     columns="user,item,timestamp")
    with pytest.raises(ValueError, match="Unknown preset 'movielens_2m'"):
        log_converter.preset_config("movielens_2m", str(tmp_path))
    inter = tmp_path / "ml-1m.inter"
    inter.write_bytes(inter.read_bytes().replace(b"rating:float", b"stars:float"))
    with pytest.raises(records.DataFormatError, match="columns \\['user_id', 'item_id', "
                                                      "'stars', 'timestamp'\\], expected"):
        log_converter.convert_preset("movielens_1m", str(tmp_path), str(tmp_path / "y"))


@pytest.mark.skipif(not os.path.exists("/tmp/ml-1m/ml-1m.inter"),
                    reason="MovieLens-1M not fetched (ifa-data fetch movielens_1m /tmp/ml-1m)")
@pytest.mark.slow
def test_movielens_1m_real_files(tmp_path):
    metadata = log_converter.convert_preset("movielens_1m", "/tmp/ml-1m", str(tmp_path))
    assert metadata["num_events"] == 1_000_209 and metadata["bad_rows"] == 0
    assert metadata["id_collisions"] == {"user": 0, "item": 0, "category": 0}
    assert metadata["splits"]["train"]["num_requests"] == 8147
    assert metadata["splits"]["test"]["num_requests"] == 2038
    assert metadata["splits"]["test"]["max_seq_len"] == 2306
