"""The on-disk format: one `tf.train.Example` per request, sharded files, a metadata file.

A request is a dict of NumPy arrays keyed by schema name: user features are scalars, sequence
features are [n] (oldest first), candidate features, cross features, labels and extras are
[m]. `encode_example` turns it into a serialised `tf.train.Example` whose features are named
exactly like the schema (int64 lists; extras float lists) and `decode_example` reverses it.
The same request always gives the same bytes, and so does a whole dataset: map entries are
serialised in a fixed order, gzip headers carry no time or name, and `metadata.json` holds
no time (keys sorted).

`ShardedWriter` writes a split as `<split>-<i>-of-<k>.tfrecord[.gz]`, each under a temporary
name that is renamed only when the whole split was written, so a failed run never leaves a
file that looks complete. `write_metadata` writes `metadata.json` beside the data (schema,
id ranges, parameters, row counts per file) the same way; it is written last, so its
presence marks a finished dataset.
"""

import glob
import gzip
import itertools
import json
import os
import struct
import zlib

import numpy as np
from tensorflow.core.example import example_pb2

from ifa_tf import schema as schema_lib

METADATA_FILENAME = schema_lib.METADATA_FILENAME
FORMAT_VERSION = 1
COMPRESSIONS = ("gzip", "none")
TMP_PREFIX = ".tmp-"


class DataFormatError(ValueError):
    """A record or a file does not follow the format; the message names which one."""


# ----------------------------------------------------------------------------- requests
def check_request(request, schema, where="request"):
    """Raises `DataFormatError` unless `request` has every declared field with consistent
    lengths: one n across the sequence features, one m across candidates, cross features,
    labels and extras. `where` names the record in the message. Returns `(n, m)`."""
    names = [*schema.feature_names, *schema.tasks, *schema.extras]
    missing = [name for name in names if name not in request]
    if missing:
        raise DataFormatError(f"{where}: missing fields {missing}. Received fields: "
                              f"{sorted(request)}")
    lengths = {}
    for name in names:
        value = np.asarray(request[name])
        if schema.rank(name) == 1:
            if value.ndim != 0:
                raise DataFormatError(f"{where}: user feature {name!r} must be a scalar. "
                                      f"Received: shape={value.shape}")
            continue
        if value.ndim != 1:
            raise DataFormatError(f"{where}: {name!r} must be a 1-D list. "
                                  f"Received: shape={value.shape}")
        axis = "n" if schema.role(name) == schema_lib.SEQUENCE else "m"
        lengths.setdefault(axis, []).append((name, len(value)))
    for axis, entries in lengths.items():
        first_name, first_len = entries[0]
        for name, length in entries[1:]:
            if length != first_len:
                what = "sequence" if axis == "n" else "candidate"
                raise DataFormatError(
                    f"{where}: {what} fields disagree in length: {first_name!r} has "
                    f"{first_len} but {name!r} has {length}.")
    return (lengths.get("n", [(None, 0)])[0][1], lengths.get("m", [(None, 0)])[0][1])


def cross_counts(request, schema):
    """`cand_cross_<a>_count` for every declared cross feature: how many sequence events
    share the candidate's attribute `<a>_id` (author, category, ...)."""
    counts = {}
    for name in schema.cross_features:
        stem = name[len(schema_lib.CROSS_PREFIX):]
        attribute = stem[:-len("_count")] + "_id"
        if not stem.endswith("_count") or attribute not in schema.item_attributes:
            raise ValueError(f"Cannot compute cross feature {name!r}: expected "
                             "cand_cross_<a>_count for an item attribute <a>_id in "
                             f"{schema.item_attributes}.")
        sequence = np.asarray(request[schema_lib.SEQUENCE_PREFIX + attribute])
        candidates = np.asarray(request[schema_lib.CANDIDATE_PREFIX + attribute])
        values, how_many = np.unique(sequence[sequence != 0], return_counts=True)
        if len(values) == 0:
            counts[name] = np.zeros(len(candidates), np.int64)
            continue
        position = np.minimum(np.searchsorted(values, candidates), len(values) - 1)
        counts[name] = np.where(values[position] == candidates, how_many[position],
                                0).astype(np.int64)
    return counts


def encode_example(request, schema):
    """Serialises one request (dict of NumPy arrays) into `tf.train.Example` bytes."""
    check_request(request, schema)
    example = example_pb2.Example()
    feature = example.features.feature
    for name in (*schema.feature_names, *schema.tasks, *schema.extras):
        value = np.asarray(request[name])
        if schema.dtype(name) == "float32":
            feature[name].float_list.value.extend(value.astype(np.float32).ravel().tolist())
        else:
            if value.dtype.kind not in "iub":
                raise DataFormatError(f"{name!r} must hold integers. Received: "
                                      f"dtype={value.dtype}")
            feature[name].int64_list.value.extend(value.astype(np.int64).ravel().tolist())
    # The feature map's wire order is otherwise chosen per process, so the same request
    # would give different bytes in two runs (users hash data files to cache and verify).
    return example.SerializeToString(deterministic=True)


def decode_example(serialized, schema, with_labels=True, with_extras=True):
    """Parses `tf.train.Example` bytes back into the dict `encode_example` was given."""
    example = example_pb2.Example.FromString(serialized)
    names = [*schema.feature_names]
    names += list(schema.tasks) if with_labels else []
    names += list(schema.extras) if with_extras else []
    request = {}
    for name in names:
        if name not in example.features.feature:
            raise DataFormatError(f"Example has no feature {name!r}. Present: "
                                  f"{sorted(example.features.feature)}")
        feature = example.features.feature[name]
        if schema.dtype(name) == "float32":
            value = np.asarray(feature.float_list.value, dtype=np.float32)
        else:
            value = np.asarray(feature.int64_list.value, dtype=np.int64)
        request[name] = value[0] if schema.rank(name) == 1 else value
    return request


# -------------------------------------------------------------------------------- files
def shard_filename(split, index, num_shards, compression="gzip"):
    suffix = ".tfrecord.gz" if compression == "gzip" else ".tfrecord"
    return f"{split}-{index:05d}-of-{num_shards:05d}{suffix}"


def split_pattern(output_dir, split, compression="gzip"):
    suffix = ".tfrecord.gz" if compression == "gzip" else ".tfrecord"
    return os.path.join(output_dir, f"{split}-*-of-*{suffix}")


def compression_of(path):
    """'GZIP' for `*.gz` files, '' otherwise (the `tf.data.TFRecordDataset` spelling)."""
    return "GZIP" if str(path).endswith(".gz") else ""


def check_compression(compression):
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}. "
                         f"Received: compression={compression!r}")


class ShardedWriter:
    """Writes serialised examples round-robin into `num_shards` files of one split.

    Files are written under temporary names and renamed when the `with` block exits
    normally; on an exception they are deleted. `row_counts` maps final file names to the
    number of records each holds.

    Example:
    >>> with ShardedWriter("/tmp/out", "train", num_shards=4) as writer:
    ...     writer.write(encode_example(request, schema))
    """

    def __init__(self, output_dir, split, num_shards=1, compression="gzip"):
        import tensorflow as tf

        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be a positive integer. "
                             f"Received: num_shards={num_shards!r}")
        check_compression(compression)
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir = output_dir
        self.split = split
        self.names = [shard_filename(split, i, num_shards, compression)
                      for i in range(num_shards)]
        self._tmp_paths = [os.path.join(output_dir, TMP_PREFIX + name) for name in self.names]
        options = tf.io.TFRecordOptions(compression_type="GZIP" if compression == "gzip" else "")
        self._writers = [tf.io.TFRecordWriter(path, options) for path in self._tmp_paths]
        self.row_counts = dict.fromkeys(self.names, 0)
        self._next = 0

    def write(self, serialized):
        shard = self._next % len(self._writers)
        self._writers[shard].write(serialized)
        self.row_counts[self.names[shard]] += 1
        self._next += 1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        for writer in self._writers:
            writer.close()
        if exc_type is not None:
            for path in self._tmp_paths:
                if os.path.exists(path):
                    os.remove(path)
            return False
        for tmp_path, name in zip(self._tmp_paths, self.names):
            os.replace(tmp_path, os.path.join(self.output_dir, name))
        return False


def write_metadata(output_dir, metadata):
    """Writes `metadata.json` atomically (temporary file, then rename)."""
    path = os.path.join(output_dir, METADATA_FILENAME)
    tmp_path = os.path.join(output_dir, TMP_PREFIX + METADATA_FILENAME)
    with open(tmp_path, "w") as f:
        f.write(metadata_text(metadata))
    os.replace(tmp_path, path)
    return path


def metadata_text(metadata):
    """The text of `metadata.json` (keys sorted, no time: the same metadata, the same
    bytes)."""
    return json.dumps({"format_version": FORMAT_VERSION, **metadata}, indent=2,
                      sort_keys=True, default=_json_default) + "\n"


def read_metadata(path):
    """Reads a metadata file, or the `metadata.json` inside a directory."""
    if os.path.isdir(path):
        path = os.path.join(path, METADATA_FILENAME)
    with open(path) as f:
        metadata = json.load(f)
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise DataFormatError(f"{path}: unsupported format_version={version!r}; this version "
                              f"of ifa_tf reads format_version={FORMAT_VERSION}.")
    return metadata


def find_metadata(files):
    """The metadata of the directory holding `files` (all must share one), or None."""
    directories = sorted({os.path.dirname(os.path.abspath(f)) for f in files})
    found = [d for d in directories if os.path.exists(os.path.join(d, METADATA_FILENAME))]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"Files come from several dataset directories with different "
                         f"metadata: {found}. Pass schema= explicitly or one directory.")
    return read_metadata(found[0])


def schema_from_metadata(metadata):
    return schema_lib.FeatureSchema.from_dict(metadata["schema"])


def expand_file_pattern(file_pattern):
    """Sorted files matching a pattern, or a list of patterns; an error if none match."""
    patterns = [file_pattern] if isinstance(file_pattern, (str, os.PathLike)) else file_pattern
    files = []
    for pattern in patterns:
        matched = sorted(p for p in glob.glob(os.fspath(pattern))
                         if not os.path.basename(p).startswith(TMP_PREFIX))
        if not matched:
            raise FileNotFoundError(f"No files match {os.fspath(pattern)!r}.")
        files.extend(matched)
    return files


def count_records(path):
    """Counts the records of a TFRecord file by walking its length headers.

    Uncompressed files are cheap (seeks over the payloads); `*.gz` files are decompressed on
    the way. Raises `DataFormatError` naming the file, the record and the byte offset when
    the file is truncated, a length header is corrupt or the gzip stream is broken. Payload
    checksums are verified by the reader later.
    """
    count, fault = walk_records(path)
    if fault is not None:
        raise DataFormatError(f"{path}: {fault}")
    return count


def walk_records(path):
    """`(count, fault)`: the records whose length headers are intact, and None when the file
    ends cleanly after them, else what is wrong with record `count` (without the path)."""
    gzipped = bool(compression_of(path))
    count = offset = 0
    try:
        # The size of a gzip file says nothing about where its records end; a seek past the
        # end of its stream stops there instead.
        size = None if gzipped else os.path.getsize(path)
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            while True:
                header = f.read(12)
                if not header:
                    return count, None
                if len(header) < 12:
                    return count, (f"truncated record header at {_position(offset, size)} "
                                   f"(record {count})")
                (length,) = struct.unpack("<Q", header[:8])
                (length_crc,) = struct.unpack("<I", header[8:])
                if _masked_crc32c(header[:8]) != length_crc:
                    return count, (f"corrupt record header at {_position(offset, size)} "
                                   f"(record {count})")
                end = offset + 12 + length + 4
                if f.seek(end) < end or (size is not None and end > size):
                    return count, (f"truncated record at {_position(offset, size)} (record "
                                   f"{count} needs {length} bytes)")
                offset = end
                count += 1
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        return count, (f"unreadable from record {count} on ({type(error).__name__}: "
                       f"{error})")


def read_records(path):
    """Yields the payload of each record of a TFRecord file (`*.gz`: gzip), checking both
    checksums: without TensorFlow, for a reader of a few records (`ifa-query --data`).
    Raises `DataFormatError` naming the file and the record at a damaged one."""
    gzipped = bool(compression_of(path))
    with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
        for index in itertools.count():
            header = f.read(12)
            if not header:
                return
            length = struct.unpack("<Q", header[:8])[0] if len(header) == 12 else None
            if length is None or _masked_crc32c(header[:8]) != struct.unpack(
                    "<I", header[8:])[0]:
                raise DataFormatError(f"{path}: record {index}: corrupt or truncated header")
            payload, footer = f.read(length), f.read(4)
            if len(payload) < length or len(footer) < 4 or _masked_crc32c(
                    payload) != struct.unpack("<I", footer)[0]:
                raise DataFormatError(f"{path}: record {index}: corrupt or truncated data")
            yield payload


def _position(offset, size):
    return f"uncompressed byte {offset}" if size is None else f"byte {offset} of {size}"


def _masked_crc32c(data):
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _make_crc32c_table():
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _make_crc32c_table()


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Cannot write {type(value).__name__} into metadata.json")
