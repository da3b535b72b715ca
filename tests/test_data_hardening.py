"""Damaged input is named, never lost silently (issues 12 and 24): TFRecord files that are
truncated, corrupt or garbage, read with and without `skip_corrupt`; logs with bytes that are
not UTF-8, fields over the `csv` size limit or timestamps outside int64 seconds, read with and
without `skip_bad_rows`; extreme timestamps, a byte order mark and tied request times."""

import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from ifa_tf.cli import data as cli
from ifa_tf.data import log_converter, make_dataset, records, simulator, user_requests

PIPELINE_LOGGER = "ifa_tf.data.pipeline"
GARBAGE = b"this is not a TFRecord file \x00\xff\x01" * 20


@pytest.fixture(scope="module")
def pristine_dir(tmp_path_factory, write_tiny_dataset):
    """Two gzip shards of simulated requests, their counts in `metadata.json`."""
    return write_tiny_dataset(
        str(tmp_path_factory.mktemp("pristine")), {}, num_requests=30, seed=5, max_seq_len=40,
        min_seq_len=3, max_candidates=12, num_items=300, num_categories=6, num_topics=8,
        num_authors=30, truth_samples=4, impression_slots=4, category_cap=2, test_fraction=0)


@pytest.fixture
def damaged(pristine_dir, tmp_path):
    """A copy of the pristine data whose second shard keeps 60 % of its bytes: returns
    `(pattern, intact, truncated, counts)`, `counts` the records per file name."""
    directory = shutil.copytree(pristine_dir, tmp_path / "data")
    counts = records.read_metadata(str(directory))["files"]
    intact, truncated = (os.path.join(directory, name) for name in sorted(counts))
    data = open(truncated, "rb").read()
    with open(truncated, "wb") as f:
        f.write(data[:int(len(data) * 0.6)])
    return os.path.join(directory, "train-*"), intact, truncated, counts


def _user_ids(dataset):
    return np.concatenate([features["user_id"].numpy() for features, _ in dataset])


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == PIPELINE_LOGGER and r.levelno == logging.WARNING]


def _read_with_skip(pattern, caplog):
    with caplog.at_level(logging.WARNING, logger=PIPELINE_LOGGER):
        return len(_user_ids(make_dataset(pattern, schema=simulator.simulator_schema(),
                                          batch_size=8, shuffle=False, skip_corrupt=True)))


# ------------------------------------------------------------------------ skip_corrupt
def test_skip_without_metadata_names_the_file_and_says_the_loss_is_unknown(damaged, caplog):
    """The issue's case: a truncated .tfrecord.gz, no metadata.json, skip_corrupt=True."""
    pattern, intact, truncated, counts = damaged
    os.remove(os.path.join(os.path.dirname(intact), records.METADATA_FILENAME))
    read_from_truncated = _read_with_skip(pattern, caplog) - counts[os.path.basename(intact)]
    assert 0 < read_from_truncated < counts[os.path.basename(truncated)]
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"skip_corrupt: {truncated}: truncated or corrupt TFRecord "
                              f"file: read {read_from_truncated} records;")
    assert f"record {read_from_truncated}" in warning
    assert "how many records it held is unknown" in warning


def test_skip_with_metadata_is_logged_and_counts_the_records_lost(damaged, caplog):
    pattern, intact, truncated, counts = damaged
    expected = counts[os.path.basename(truncated)]
    read_from_truncated = _read_with_skip(pattern, caplog) - counts[os.path.basename(intact)]
    (warning,) = _warnings(caplog)
    assert (f"{truncated}: truncated or corrupt TFRecord file: read {read_from_truncated} "
            f"records, {expected} expected;") in warning
    assert f"record {read_from_truncated}" in warning
    assert f"skipped {expected - read_from_truncated} records." in warning


@pytest.mark.parametrize("suffix", [".tfrecord.gz", ".tfrecord"])
def test_skip_garbage_file_outside_the_metadata_is_named(damaged, caplog, suffix):
    pattern, intact, truncated, counts = damaged
    shutil.copy(intact, truncated)  # whole again: only the garbage file is damaged
    garbage = os.path.join(os.path.dirname(intact), "train-garbage" + suffix)
    with open(garbage, "wb") as f:
        f.write(GARBAGE)
    assert _read_with_skip(pattern, caplog) == 2 * counts[os.path.basename(intact)]
    (warning,) = _warnings(caplog)
    assert f"{garbage}: truncated or corrupt TFRecord file: read 0 records;" in warning
    assert "record 0" in warning
    assert "how many records it held is unknown" in warning


def _uncompressed(directory, with_metadata):
    """One uncompressed shard of simulated requests: returns `(path, count)`."""
    simulator.write_synthetic(str(directory), simulator.SimulatorConfig(
        num_requests=6, seed=2, max_seq_len=20, min_seq_len=3, max_candidates=8,
        num_items=100, num_categories=4, num_topics=8, num_authors=10, truth_samples=2,
        impression_slots=3, category_cap=2, test_fraction=0), num_shards=1,
        compression="none")
    ((name, count),) = records.read_metadata(str(directory))["files"].items()
    if not with_metadata:
        os.remove(directory / records.METADATA_FILENAME)
    return str(directory / name), count


def test_skip_uncompressed_truncated_without_metadata_warns_once(tmp_path, caplog):
    path, count = _uncompressed(tmp_path, with_metadata=False)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-3])  # the last record loses the end of its checksum
    assert _read_with_skip(path, caplog) == count - 1
    (warning,) = _warnings(caplog)
    assert f"{path}: truncated or corrupt TFRecord file: read {count - 1} records;" in warning
    assert f"record {count - 1}" in warning
    assert "how many records it held is unknown" in warning


def test_skip_corrupt_payload_names_the_record(tmp_path, caplog):
    path, count = _uncompressed(tmp_path, with_metadata=False)
    data = bytearray(open(path, "rb").read())
    (first_length,) = struct.unpack("<Q", data[:8])
    data[12 + first_length + 4 + 12 + 5] ^= 0xFF  # inside the payload of record 1
    with open(path, "wb") as f:
        f.write(bytes(data))
    assert _read_with_skip(path, caplog) == 1
    (warning,) = _warnings(caplog)
    assert warning == (f"skip_corrupt: {path}: truncated or corrupt TFRecord file: read 1 "
                       f"records, {count} expected; record 1 is corrupt (its length header "
                       f"is intact); skipped {count - 1} records.")


def test_skip_with_out_of_date_metadata_says_so(tmp_path, caplog):
    path, count = _uncompressed(tmp_path, with_metadata=True)
    metadata = records.read_metadata(str(tmp_path))
    metadata["files"][os.path.basename(path)] = count - 1
    records.write_metadata(str(tmp_path), metadata)
    assert _read_with_skip(path, caplog) == count
    (warning,) = _warnings(caplog)
    # Not "records lost": the file is whole and the count is wrong (issue 24).
    assert warning == (f"skip_corrupt: {path}: holds {count} records, all readable, but "
                       f"metadata.json lists {count - 1}: metadata.json is out of date, or the "
                       "file is not the one it describes; no record skipped.")


@pytest.mark.parametrize("listed, message", [
    (-1, "more"), (+1, "fewer"), ("abc", "not a count")])
def test_a_wrong_count_in_metadata_names_the_file_and_metadata(tmp_path, listed, message):
    """It failed with tf.data's "expected 5 ... at least 6" or a bare `invalid literal for
    int()`, naming neither the file nor metadata.json."""
    path, count = _uncompressed(tmp_path, with_metadata=True)
    metadata = records.read_metadata(str(tmp_path))
    metadata["files"][os.path.basename(path)] = listed if message == "not a count" \
        else count + listed
    records.write_metadata(str(tmp_path), metadata)
    if message == "not a count":
        with pytest.raises(records.DataFormatError,
                           match=rf"^{re.escape(str(tmp_path / 'metadata.json'))}: the record "
                                 rf"count of {os.path.basename(path)} must be an integer >= 0\. "
                                 r"Received: 'abc'$"):
            make_dataset(path, batch_size=4, shuffle=False)
        return
    expected = (rf"{re.escape(path)}: holds more records than the {count - 1} its "
                r"metadata.json lists" if message == "more" else
                rf"{re.escape(path)}: holds {count} records, all readable, but metadata.json "
                rf"lists {count + 1}: the file was cut at a record boundary, or metadata.json "
                r"is out of date")
    with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
        _user_ids(make_dataset(path, batch_size=4, shuffle=False))


def _rewrite_first_record(path, change):
    """Rewrites the first record of an uncompressed shard with `change(example)` applied."""
    serialized = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    example = tf.train.Example.FromString(serialized[0])
    change(example.features.feature)
    serialized[0] = example.SerializeToString()
    with tf.io.TFRecordWriter(path) as writer:
        for record in serialized:
            writer.write(record)


def _float_user_id(feature):
    feature["user_id"].Clear()
    feature["user_id"].float_list.value.append(1.5)


@pytest.mark.parametrize("change, message", [
    (lambda feature: feature["click"].int64_list.value.__setitem__(0, 7),
     r"record 0: label click must be 0 or 1; received 7"),
    (lambda feature: feature.pop("user_id"),
     r"Name: .* record 0, Feature: user_id \(data type: int64\) is required"),
    (_float_user_id, r"Name: .* record 0, Key: user_id, Index: 0\.\s+Data types don't match"),
], ids=["label 7", "no user_id", "float user_id"])
def test_a_bad_record_names_the_file_the_record_and_the_feature(tmp_path, change, message):
    path, _ = _uncompressed(tmp_path, with_metadata=True)
    _rewrite_first_record(path, change)
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        _user_ids(make_dataset(path, batch_size=4, shuffle=False))
    assert path in raised.value.message
    assert re.search(message, raised.value.message), raised.value.message


# ------------------------------------------------------------------- without skipping
@pytest.mark.parametrize("with_metadata", [True, False])
def test_truncated_gzip_error_names_the_file_and_the_record(damaged, with_metadata):
    pattern, intact, truncated, counts = damaged
    if not with_metadata:
        os.remove(os.path.join(os.path.dirname(intact), records.METADATA_FILENAME))
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        _user_ids(make_dataset(pattern, schema=simulator.simulator_schema(), batch_size=8,
                               shuffle=False))
    found = re.search(rf"{re.escape(truncated)}: truncated or corrupt TFRecord file: read "
                      rf"(\d+) records", error.value.message)
    assert found, error.value.message
    assert f"record {found.group(1)}" in error.value.message[found.end():]


def test_garbage_gzip_file_outside_the_metadata_error_names_it(damaged):
    pattern, intact, truncated, _ = damaged
    shutil.copy(intact, truncated)
    garbage = os.path.join(os.path.dirname(intact), "train-garbage.tfrecord.gz")
    with open(garbage, "wb") as f:
        f.write(GARBAGE)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{re.escape(garbage)}: truncated or corrupt TFRecord file: "
                             r"read 0 records; unreadable from record 0 on \(BadGzipFile"):
        _user_ids(make_dataset(pattern, batch_size=8, shuffle=False))


# --------------------------------------------------------------------------- from-log
LOG_CONFIG = dict(columns="user,item,timestamp", num_negatives=0, test_fraction=0)
OVERSIZED = "y" * 140_000  # over the csv module's 131,072-character field limit


def _write_log(path, lines):
    """`lines`: bytes, one per line, after a `user,item,timestamp` header (line 1)."""
    with open(path, "wb") as f:
        f.write(b"user,item,timestamp\n" + b"".join(line + b"\n" for line in lines))
    return str(path)


def _log_lines(bad):
    """Good rows of user `a` on lines 2, 3, 5 and 6 around `bad` on line 4."""
    return [b"a,x,10", b"a,y,20", bad, b"a,z,200000", b"a,w,200010"]


@pytest.mark.parametrize("bad, reason", [
    (b"a,\xff\xfe\x00garbage,30", r"item is not UTF-8 text: b'\\xff\\xfe\\x00garbage'"),
    (b'a,"' + OVERSIZED.encode() + b'",30', r"unparseable CSV: field larger than field limit"),
    (b"a,z," + OVERSIZED.encode(), r"unparseable CSV: field larger than field limit"),
])
def test_bad_bytes_are_a_line_numbered_error_naming_the_file(tmp_path, bad, reason):
    log = _write_log(tmp_path / "log.csv", _log_lines(bad))
    with pytest.raises(records.DataFormatError,
                       match=rf"^{re.escape(log)}: 1 malformed rows: line 4: {reason}"):
        log_converter.convert_log(log, str(tmp_path / "out"),
                                  log_converter.LogConfig(**LOG_CONFIG))


def test_skip_bad_rows_skips_binary_garbage_and_oversized_fields(tmp_path, caplog):
    garbage = bytes(range(256))  # NUL, \n, \r, quotes and bytes that are not UTF-8
    lines = [b"a,x,10", garbage, b"a,y,20", b"a," + OVERSIZED.encode() + b",30",
             b"a,\xc3\x28,40", b"a,z,200000"]
    log = _write_log(tmp_path / "log.csv", lines)
    config = log_converter.LogConfig(**LOG_CONFIG, skip_bad_rows=True)
    with caplog.at_level(logging.WARNING):
        metadata = log_converter.convert_log(log, str(tmp_path / "out"), config)
    assert metadata["num_events"] == 3  # a,x  a,y  a,z
    # bytes(range(256)) spans lines 3-5 (\n is byte 10, \r byte 13, the second \n is a new
    # line); the oversized field is on line 7, the broken UTF-8 on line 8.
    assert metadata["bad_row_lines"] == [3, 4, 5, 7, 8]
    assert metadata["bad_rows"] == 5
    assert f"{log}: skipped malformed line 8: item is not UTF-8 text" in caplog.text


def test_movielens_preset_names_the_file_and_line_of_garbage(tmp_path):
    with open(tmp_path / "ml-100k.item", "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                "1\tToy Story\t1995\tAnimation\n")
    with open(tmp_path / "ml-100k.inter", "wb") as f:
        f.write(b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                b"5\t1\t4\t100\n\xff\xd8\t1\t5\t300000\n5\t1\t" + OVERSIZED.encode() + b"\n")
    inter = str(tmp_path / "ml-100k.inter")
    with pytest.raises(records.DataFormatError) as error:
        log_converter.convert_movielens_100k(str(tmp_path), str(tmp_path / "out"))
    message = str(error.value)
    assert message.startswith(f"{inter}: 2 malformed rows: ")
    assert "line 3: user is not UTF-8 text: b'\\xff\\xd8'" in message
    assert "line 4: unparseable CSV: field larger than field limit" in message


def _cli_flags(*argv):
    flag_values = flags.FlagValues()
    cli.define_flags(flag_values)
    flag_values(["ifa-data", *argv])
    return flag_values


def test_cli_reports_bad_rows_in_one_line_or_counts_the_skipped(tmp_path, capsys):
    log = _write_log(tmp_path / "log.csv", _log_lines(b"a,\x80\x81,30"))
    argv = [f"--input={log}", "--columns=user,item,timestamp", "--num_negatives=0",
            "--test_fraction=0"]
    with pytest.raises(ValueError) as error:  # `ifa_tf.cli.run_app` prints it as one line
        cli.main(["ifa-data", "from-log"], _cli_flags(f"--output_dir={tmp_path / 'a'}", *argv))
    assert str(error.value) == (
        f"{log}: 1 malformed rows: line 4: item is not UTF-8 text: b'\\x80\\x81' "
        "(skip them with skip_bad_rows / --skip_bad_rows)")
    cli.main(["ifa-data", "from-log"],
             _cli_flags(f"--output_dir={tmp_path / 'b'}", *argv, "--skip_bad_rows"))
    assert capsys.readouterr().out == (f"wrote train=1 requests to {tmp_path / 'b'}; "
                                       "skipped 1 malformed rows (logged above)\n")


# ------------------------------------------------------------- extreme timestamps (issue 24)
INT64_MAX = 2**63 - 1


def test_from_log_near_int64_max_ends_instead_of_spinning(tmp_path):
    """A request window reaching past 2^63 - 1 wrapped in int64, `searchsorted` returned
    0 and the request loop never advanced: a 3-row log spun at 100% CPU (issue 24). These
    timestamps are exact floats, so the old float parsing read them right too."""
    times = [2**63 - 8192, 2**63 - 4096, 2**63 - 2048]
    log = _write_log(tmp_path / "log.csv", [f"a,{item},{time}".encode()
                                            for item, time in zip("xyz", times)])
    command = [sys.executable, "-m", "ifa_tf.cli.data", "from-log", f"--input={log}",
               f"--output_dir={tmp_path / 'out'}", "--columns=user,item,timestamp",
               "--num_negatives=0", "--test_fraction=0", "--window_seconds=5000"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    metadata = records.read_metadata(str(tmp_path / "out"))
    assert metadata["splits"]["train"]["num_requests"] == 1  # at the last time; 2 before it


def test_request_windows_past_int64_max_do_not_wrap():
    times = np.array([INT64_MAX - 20, INT64_MAX - 10, INT64_MAX], np.int64)
    timeline = user_requests.Timeline(
        user=np.ones(3, np.int64), item=np.array([7, 8, 9], np.int64), time=times,
        bits=np.ones(3, np.int64), user_start=np.array([0, 3]))
    found = []
    worker = threading.Thread(target=lambda: found.extend(user_requests.request_points(
        timeline, log_converter.LogConfig(window_seconds=15, min_seq_len=0))), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "the request loop did not end"
    assert [(p.time, p.window, p.history) for p in found] == [
        (INT64_MAX - 20, slice(0, 2), slice(0, 0)), (INT64_MAX, slice(2, 3), slice(0, 2))]


@pytest.mark.parametrize("value", [b"1e19", b"9223372036854775808", b"-5", b"1969-07-20",
                                   b"99999999999999999999999999999999"])
def test_timestamps_outside_int64_seconds_are_line_numbered_bad_rows(tmp_path, caplog, value):
    log = _write_log(tmp_path / "log.csv", _log_lines(b"a,q," + value))
    shown = value.decode()[:37] + ("..." if len(value) > 40 else "")
    with pytest.raises(records.DataFormatError,
                       match=rf"^{re.escape(log)}: 1 malformed rows: line 4: timestamp "
                             rf"'{re.escape(shown)}' is outside the range of int64 seconds "
                             r"since 1970-01-01 this converter represents, "
                             r"\[0, 9223372036854775807\] \(skip them"):
        log_converter.convert_log(log, str(tmp_path / "out"),
                                  log_converter.LogConfig(**LOG_CONFIG))
    config = log_converter.LogConfig(**LOG_CONFIG, skip_bad_rows=True)
    with caplog.at_level(logging.WARNING):
        metadata = log_converter.convert_log(log, str(tmp_path / "out"), config)
    assert metadata["bad_row_lines"] == [4] and metadata["num_events"] == 4
    assert f"{log}: skipped malformed line 4: timestamp" in caplog.text


def test_a_byte_order_mark_does_not_change_the_first_user(tmp_path):
    """With --noheader the BOM stuck to the first field: user `a` became `\\ufeffa`."""
    plain, marked = tmp_path / "plain.csv", tmp_path / "marked.csv"
    rows = b"a,x,10\na,y,20\na,z,200000\n"
    plain.write_bytes(rows)
    marked.write_bytes(b"\xef\xbb\xbf" + rows)
    config = log_converter.LogConfig(**LOG_CONFIG, header=False)
    converted = [log_converter.convert_log(str(path), str(tmp_path / path.stem), config)
                 for path in (plain, marked)]
    assert converted[0]["id_ranges"] == converted[1]["id_ranges"]
    assert converted[0]["splits"] == converted[1]["splits"]
    assert log_converter.read_vocabulary(str(tmp_path / "marked"), "user") == {
        log_converter.string_id("a"): "a"}


def test_request_times_that_all_tie_warn_that_there_is_no_train_split(tmp_path, caplog):
    log = _write_log(tmp_path / "log.csv", [b"a,x,10", b"a,y,500000", b"b,x,10",
                                            b"b,y,500000"])
    config = log_converter.LogConfig(**{**LOG_CONFIG, "test_fraction": 0.5})
    with caplog.at_level(logging.WARNING):
        metadata = log_converter.convert_log(log, str(tmp_path / "out"), config)
    assert list(metadata["splits"]) == ["test"]
    assert ("All 2 requests go to test and no train split is written: the split time, the "
            "0.5 quantile of request times, is the earliest (500000). Set test_fraction=0 to "
            "write them all to train.") in caplog.text


def test_a_record_over_max_record_bytes_is_refused_before_it_is_parsed(tmp_path):
    """A compressible record (long runs of 1-byte ids) was parsed whole before max_seq_len
    applied: 20M ids in one sequence took +0.75 GB (issue 24)."""
    path, _ = _uncompressed(tmp_path, with_metadata=True)

    def lengthen(feature):
        for name in feature:
            if name.startswith("seq_"):
                feature[name].int64_list.value.extend([1] * 3000)

    _rewrite_first_record(path, lengthen)
    size = len(next(tf.data.TFRecordDataset(path).as_numpy_iterator()))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{re.escape(path)} record 0: {size} bytes, over "
                             r"max_record_bytes=2000; its lists would be parsed whole"):
        _user_ids(make_dataset(path, batch_size=4, shuffle=False, max_seq_len=5,
                               max_record_bytes=2000))
    assert len(_user_ids(make_dataset(path, batch_size=4, shuffle=False, max_seq_len=5,
                                      max_record_bytes=size))) == 6
