"""Damaged input is named, never lost silently (issue 12): TFRecord files that are truncated,
corrupt or garbage, read with and without `skip_corrupt`."""

import logging
import os
import re
import shutil
import struct

import numpy as np
import pytest
import tensorflow as tf

from ifa_tf.data import make_dataset, records, simulator

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
    assert f"read {count} records, {count - 1} expected; the file holds {count} records; " \
           "no record skipped, metadata.json is out of date." in warning


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
