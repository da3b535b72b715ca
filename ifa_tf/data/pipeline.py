"""The tf.data input pipeline: TFRecord shards -> padded `(features, labels)` batches.

Order of operations (the tensorflow/models ranking reader's): list shards, shard them per
input pipeline, interleave the files, shuffle examples, batch, parse the whole batch with one
`tf.io.parse_example`, cut and pad each batch to its own longest n and m, prefetch.

Faults are reported with their location. Every record carries its file name and index up to
the parse step, so a record whose candidate features and labels disagree in length, whose
label is not 0 or 1, or whose feature is missing or of the wrong type fails with an error
naming the file and the record. A file holding more records than the metadata lists fails at
the first extra one, naming the file and `metadata.json`. When a file's reading ends, the
records read are checked against the count in the metadata written beside the data (for a
file the metadata does not list, against a walk over its record headers: up front for
uncompressed files, at the end of reading for gzip files, which it decompresses a second
time). A truncated or
corrupt file fails with a `tf.errors.InvalidArgumentError` naming the file and the record
where reading stopped; with `skip_corrupt=True` the unreadable rest of the file is skipped
instead and a warning on this module's logger says so, naming the file and the record, and
counting the records lost (or saying that the count is unknown, for a file no metadata
lists). A file read whole whose count differs from the metadata's is reported as such: an
out-of-date `metadata.json`, or a file cut at a record boundary, not as records lost from a
corrupt file.
"""

import functools
import logging
import os

import tensorflow as tf

from ifa_tf import schema as schema_lib
from ifa_tf.data import records

AUTOTUNE = tf.data.AUTOTUNE
# A request of n = 100,000 events takes 2-5 MB; a record over this is refused before it is
# parsed, where its lists would take several times its bytes whatever `max_seq_len` is.
DEFAULT_MAX_RECORD_BYTES = 16 * 2**20
_logger = logging.getLogger(__name__)


def make_dataset(file_pattern, schema=None, batch_size=32, *, shuffle=True,
                 shuffle_buffer=4096, seed=None, repeat=False, max_seq_len=None,
                 max_candidates=None, with_extras=False, drop_remainder=False,
                 deterministic=False, input_context=None, skip_corrupt=False,
                 group_by_length=0, max_record_bytes=DEFAULT_MAX_RECORD_BYTES, cycle_length=8,
                 num_parallel_calls=AUTOTUNE, prefetch=AUTOTUNE):
    """Builds a `tf.data.Dataset` of padded request batches for `model.fit`.

    Args:
        file_pattern: a glob (or a list of globs) of TFRecord files; `*.gz` files are read
            as GZIP.
        schema: a `FeatureSchema` (or dict / JSON path). None: the schema recorded in the
            `metadata.json` beside the files.
        batch_size: requests per batch; with `input_context`, the global batch size, split
            evenly across replicas.
        shuffle: shuffle file order and examples (before batching).
        shuffle_buffer: examples held by the shuffle buffer.
        seed: seed of both shuffles; required when `deterministic` and `shuffle`.
        repeat: repeat forever (after shuffling, so epochs are not cut at file ends).
        max_seq_len: cap on n; longer sequences keep their most recent (last) events.
        max_candidates: cap on m; longer candidate sets keep their first candidates.
        with_extras: also yield the schema's extras (e.g. the simulator's ground truth) as a
            third element `{name: float32 [B, m]}`. For evaluation loops, not `fit` (which
            would read a third element as sample weights).
        drop_remainder: drop the last incomplete batch.
        deterministic: element order fixed by `seed` (slower parallel steps keep order).
        input_context: a `tf.distribute.InputContext`; files (or, with fewer files than
            pipelines, records) are sharded by `input_pipeline_id`.
        skip_corrupt: skip the unreadable rest of a truncated or corrupt file (a logged
            warning names the file and the record, and counts the records lost) instead of
            failing with a `tf.errors.InvalidArgumentError` that names them.
        group_by_length: 0 (off) or W >= 2: requests are read W batches at a time, sorted
            by sequence length and cut into W batches, so a batch pads to the longest of
            requests of like length instead of the longest of a random draw (with
            lognormal lengths, a random batch of 64 pads to about five times the mean n).
            With `shuffle` the batches then pass a shuffle buffer of W batches. Each
            window's lengths cost one more parse of one sequence feature. Same requests per
            epoch, same model; only which requests share a batch changes.
        max_record_bytes: a record larger than this fails, naming its file, index and size,
            before it is parsed: parsing takes up to 8 bytes per byte of a compressible
            record (1-byte varints), all of it before `max_seq_len` cuts the sequence. 0: no
            limit.
        cycle_length: files read concurrently.
        num_parallel_calls: parallelism of interleave and parsing.
        prefetch: batches prefetched.

    Yields:
        `(features, labels)`: features `{name: int64}` for every model input, user features
        [B], sequence features [B, n] (oldest first, right-padded with 0), candidate and cross
        features [B, m] (right-padded with 0); labels `{task: float32 [B, m]}`, 0 at padded
        candidates. n and m are the longest in the batch after the caps.
    """
    files = records.expand_file_pattern(file_pattern)
    metadata = records.find_metadata(files)
    if schema is None:
        if metadata is None:
            raise ValueError(
                f"schema=None needs a {records.METADATA_FILENAME} beside the data, but none "
                f"is beside {files[0]!r}. Pass schema= explicitly.")
        schema = records.schema_from_metadata(metadata)
    else:
        schema = schema_lib.resolve_schema(schema)
    _check_positive("batch_size", batch_size)
    _check_positive("max_seq_len", max_seq_len, allow_none=True)
    _check_positive("max_candidates", max_candidates, allow_none=True)
    _check_positive("cycle_length", cycle_length)
    if not (isinstance(group_by_length, int) and (group_by_length == 0 or group_by_length >= 2)):
        raise ValueError("`group_by_length` must be 0 (off) or an int >= 2 (batches per "
                         f"sorted window). Received: group_by_length={group_by_length!r}")
    if with_extras and not schema.extras:
        raise ValueError("with_extras=True but the schema declares no extras.")
    if deterministic and shuffle and seed is None:
        raise ValueError("deterministic=True with shuffle=True needs a seed. Received: "
                         "seed=None")

    num_pipelines, pipeline_id = 1, 0
    if input_context is not None:
        num_pipelines = input_context.num_input_pipelines
        pipeline_id = input_context.input_pipeline_id
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    shard_records = num_pipelines > 1 and len(files) < num_pipelines
    if num_pipelines > 1 and not shard_records:
        files = files[pipeline_id::num_pipelines]

    expected = [_expected_count(path, metadata, skip_corrupt) for path in files]
    compressions = [records.compression_of(path) for path in files]
    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(files), tf.constant(compressions), tf.constant(expected, tf.int64)))
    if shuffle:
        dataset = dataset.shuffle(len(files), seed=seed)
    record_shard = (num_pipelines, pipeline_id) if shard_records else None
    dataset = dataset.interleave(
        lambda path, compression, count: _read_file(path, compression, count, skip_corrupt,
                                                    record_shard, max_record_bytes),
        cycle_length=min(cycle_length, len(files)), block_length=1,
        num_parallel_calls=num_parallel_calls, deterministic=deterministic)
    num_records = _num_records(expected, record_shard, skip_corrupt)
    if num_records is not None:
        # The per-file checks make tf.data's own count unknown; with it known, Keras runs
        # an epoch of exactly the batches there are (no "input ran out of data" at the end
        # of the first) and progress bars have a target. The end-of-file checks hold the
        # counts to the truth.
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(num_records))
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    if repeat:
        dataset = dataset.repeat()
    if group_by_length:
        name = schema.sequence_features[0]
        sort = _LengthSortedBatches({name: schema.parse_spec()[name]}, batch_size)
        dataset = dataset.batch(batch_size * group_by_length).flat_map(sort)
        if shuffle:  # a window's batches would otherwise come short to long
            dataset = dataset.shuffle(group_by_length, seed=seed)
        if drop_remainder:
            dataset = dataset.filter(lambda paths, indices, serialized: tf.equal(
                tf.shape(serialized)[0], batch_size))
        if num_records is not None and not repeat:
            # Only the last window is short, so the batches are those of plain batching.
            num_batches = (num_records // batch_size if drop_remainder
                           else -(-num_records // batch_size))
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(num_batches))
    else:
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    parse = _BatchParser(schema, max_seq_len, max_candidates, with_extras)
    dataset = dataset.map(parse, num_parallel_calls=num_parallel_calls,
                          deterministic=deterministic)
    options = tf.data.Options()
    options.deterministic = deterministic
    dataset = dataset.with_options(options)
    return dataset.prefetch(prefetch)


def _check_positive(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")


def _num_records(expected, record_shard, skip_corrupt):
    """Records this pipeline reads from files holding `expected` records each; None when a
    count is unknown (-1) or `skip_corrupt` may drop records."""
    if skip_corrupt or any(count < 0 for count in expected):
        return None
    if record_shard is None:
        return sum(expected)
    num_pipelines, pipeline_id = record_shard
    return sum(max(0, -(-(count - pipeline_id) // num_pipelines)) for count in expected)


def _expected_count(path, metadata, skip_corrupt):
    """Records the file should hold: from the metadata, else from its headers, else -1
    (unknown: the file is walked when its reading ends)."""
    if metadata is not None:
        count = metadata.get("files", {}).get(os.path.basename(path))
        if count is not None:
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise records.DataFormatError(
                    f"{os.path.join(os.path.dirname(path), records.METADATA_FILENAME)}: the "
                    f"record count of {os.path.basename(path)} must be an integer >= 0. "
                    f"Received: {count!r}")
            return count
    if records.compression_of(path):
        return -1  # counting decompresses the file: left to the end of its reading
    try:
        return records.count_records(path)
    except records.DataFormatError:
        if not skip_corrupt:
            raise
        return -1  # the end-of-file check reports the fault, with what was read before it


def _read_file(path, compression, expected, skip_corrupt, record_shard, max_record_bytes=0):
    """Yields `(path, index, serialized)`; checks when the file ends that it was read whole.

    The reader stops quietly at the first fault (`ignore_errors`) and the end-of-file check
    turns the shortfall against `expected` (-1: unknown, then the file is walked to count
    its records) into an error or, with `skip_corrupt`, a logged warning, naming the file
    and the record. TF alone would not name the file, and silently ends an uncompressed file
    at a truncated record header.
    `record_shard=(num_pipelines, pipeline_id)` keeps the records whose index in the file
    is `pipeline_id` modulo `num_pipelines` (an order-independent split). A record over
    `max_record_bytes` (0: no limit) is an error naming it.
    """
    serialized = tf.data.TFRecordDataset(path, compression_type=compression,
                                         buffer_size=1 << 20).ignore_errors()
    indexed = serialized.enumerate()
    end = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int64), tf.constant(b"")))
    report = functools.partial(_end_of_file_report, skip_corrupt)

    def check_end(seen):
        fault = tf.py_function(report, [path, seen, expected], tf.string)
        return tf.ensure_shape(fault, [])

    def one_too_many():
        return tf.strings.join([
            path, ": holds more records than the ", tf.strings.as_string(expected),
            f" its {records.METADATA_FILENAME} lists ({records.METADATA_FILENAME} is out of "
            "date, or the file is not the one it describes)"])

    def too_large(index, record):
        return tf.strings.join([
            path, " record ", tf.strings.as_string(index), ": ",
            tf.strings.as_string(tf.strings.length(record)), " bytes, over max_record_bytes="
            f"{max_record_bytes}; its lists would be parsed whole before max_seq_len cuts "
            "them (raise max_record_bytes, data.max_record_bytes in ifa-train, to read it)"])

    def count_and_check(seen, element):
        index, record = element
        at_end = index < 0
        # With skip_corrupt the extra records are read and the end-of-file report warns.
        extra = tf.constant(False) if skip_corrupt else tf.logical_and(
            tf.logical_not(at_end), tf.logical_and(expected >= 0, seen >= expected))
        large = tf.constant(False) if not max_record_bytes else (
            tf.strings.length(record) > max_record_bytes)
        fault = tf.case([(tf.logical_and(at_end, tf.not_equal(seen, expected)),
                          lambda: check_end(seen)),
                         (extra, one_too_many),
                         (large, lambda: too_large(index, record))],
                        default=lambda: tf.constant(""), exclusive=False)
        # An assertion (INVALID_ARGUMENT) raises the fault: an exception raised in a
        # tf.py_function comes out as UNKNOWN whatever its class, and no TF op raises
        # DATA_LOSS with a message of ours.
        check = tf.debugging.Assert(tf.equal(fault, ""), [fault])
        with tf.control_dependencies([check]):
            seen_next = tf.identity(seen + tf.cast(tf.logical_not(at_end), tf.int64))
        return seen_next, (path, index, record)

    checked = (indexed.concatenate(end)
               .scan(tf.constant(0, tf.int64), count_and_check)
               .filter(lambda _, index, __: index >= 0))
    if record_shard is None:
        return checked
    num_pipelines, pipeline_id = record_shard
    return checked.filter(lambda _, index, __: index % num_pipelines == pipeline_id)


def _end_of_file_report(skip_corrupt, path, seen, expected):
    """Called when the reading of `path` ended after `seen` records where `expected` were due
    (-1: unknown). Returns the fault as bytes, or b"" when the file is whole or the fault was
    logged as skipped."""
    path, seen, expected = os.fsdecode(path.numpy()), int(seen), int(expected)
    count, fault = records.walk_records(path)
    if expected < 0 and fault is None and count == seen:
        return b""
    if fault is None and count == seen:  # read whole; its count differs from the metadata's
        metadata = records.METADATA_FILENAME
        message = (f"{path}: holds {count} records, all readable, but {metadata} lists "
                   f"{expected}: " + (f"{metadata} is out of date, or the file is not the one "
                                      "it describes" if count > expected else
                                      f"the file was cut at a record boundary, or {metadata} "
                                      "is out of date"))
        if not skip_corrupt:
            return message.encode()
        _logger.warning("skip_corrupt: %s; %s.", message,
                        "no record skipped" if count > expected else
                        f"{expected - count} listed records are missing")
        return b""
    reason = fault or (f"record {seen} is corrupt (its length header is intact)"
                       if count > seen else f"the file holds {count} records")
    message = (f"{path}: truncated or corrupt TFRecord file: read {seen} records"
               + (f", {expected} expected" if expected >= 0 else "") + f"; {reason}")
    if not skip_corrupt:
        return message.encode()
    # The walk counts the records behind a corrupt payload, not those behind a broken header.
    total = expected if expected >= 0 else count if fault is None else None
    if total is None:
        skipped = ("skipped the rest of the file; how many records it held is unknown (no "
                   f"{records.METADATA_FILENAME} counts them)")
    elif total > seen:
        skipped = f"skipped {total - seen} records"
    else:
        skipped = f"no record skipped, {records.METADATA_FILENAME} is out of date"
    _logger.warning("skip_corrupt: %s; %s.", message, skipped)
    return b""


def _record_names(paths, indices):
    """`<file> record <index>` of each record of a batch, for parse errors."""
    return tf.strings.join([paths, " record ", tf.strings.as_string(indices)])


class _LengthSortedBatches:
    """A window of requests -> its batches of like sequence length (`group_by_length`)."""

    def __init__(self, spec, batch_size):
        self.spec = spec  # {a sequence feature: its ragged parse spec}
        self.batch_size = batch_size

    def __call__(self, paths, indices, serialized):
        (sequence,) = tf.io.parse_example(serialized, self.spec,
                                          example_names=_record_names(paths, indices)).values()
        order = tf.argsort(sequence.row_lengths(), stable=True)
        paths, indices, serialized = (tf.gather(t, order) for t in (paths, indices, serialized))
        batch_size = self.batch_size
        starts = tf.range(0, tf.shape(order)[0], batch_size)
        return tf.data.Dataset.from_tensor_slices(starts).map(
            lambda start: (paths[start:start + batch_size], indices[start:start + batch_size],
                           serialized[start:start + batch_size]))


class _BatchParser:
    """Parses a batch of serialised requests, checks lengths, cuts and pads."""

    def __init__(self, schema, max_seq_len, max_candidates, with_extras):
        self.schema = schema
        self.max_seq_len = max_seq_len
        self.max_candidates = max_candidates
        self.with_extras = with_extras
        self.spec = schema.parse_spec(with_labels=True, with_extras=with_extras)

    def __call__(self, paths, indices, serialized):
        schema = self.schema
        # Named records: a missing feature or one of the wrong type is reported with its file
        # and record ("Name: <file> record <i>, Feature: user_id ...").
        parsed = tf.io.parse_example(serialized, self.spec,
                                     example_names=_record_names(paths, indices))
        sequence_names = list(schema.sequence_features)
        candidate_names = [*schema.candidate_features, *schema.cross_features, *schema.tasks]
        if self.with_extras:
            candidate_names += list(schema.extras)
        checks = (self._length_checks(parsed, sequence_names, paths, indices, "sequence")
                  + self._length_checks(parsed, candidate_names, paths, indices, "candidate")
                  + [self._label_check(parsed[task], task, paths, indices)
                     for task in schema.tasks])
        with tf.control_dependencies(checks):
            features = {}
            for name in schema.feature_names:
                value = parsed[name]
                if schema.rank(name) == 1:
                    features[name] = tf.identity(value)
                elif schema.role(name) == schema_lib.SEQUENCE:
                    features[name] = self._pad(value, self.max_seq_len, keep_last=True)
                else:
                    features[name] = self._pad(value, self.max_candidates, keep_last=False)
            labels = {task: tf.cast(self._pad(parsed[task], self.max_candidates, False),
                                    tf.float32) for task in schema.tasks}
            if not self.with_extras:
                return features, labels
            extras = {name: self._pad(parsed[name], self.max_candidates, False)
                      for name in schema.extras}
            return features, labels, extras

    @staticmethod
    def _pad(ragged, cap, keep_last):
        if cap is not None:
            ragged = ragged[:, -cap:] if keep_last else ragged[:, :cap]
        return ragged.to_tensor(default_value=tf.zeros([], ragged.dtype))

    @staticmethod
    def _label_check(ragged, task, paths, indices):
        """Asserts that every value of label `task` is 0 or 1, naming the first other one's
        file and record."""
        values = ragged.values
        wrong = tf.logical_and(tf.not_equal(values, 0), tf.not_equal(values, 1))

        def message():
            first = tf.argmax(tf.cast(wrong, tf.int32), output_type=tf.int64)
            row = tf.gather(ragged.value_rowids(), first)
            return tf.strings.join([
                tf.gather(paths, row), " record ", tf.strings.as_string(tf.gather(indices, row)),
                f": label {task} must be 0 or 1; received ",
                tf.strings.as_string(tf.gather(values, first))])

        any_wrong = tf.reduce_any(wrong)
        text = tf.cond(any_wrong, message, lambda: tf.constant(""))
        return tf.debugging.Assert(tf.logical_not(any_wrong), [text])

    @staticmethod
    def _length_checks(parsed, names, paths, indices, what):
        reference = names[0]
        reference_lengths = parsed[reference].row_lengths()
        checks = []
        for name in names[1:]:
            lengths = parsed[name].row_lengths()
            mismatch = tf.not_equal(lengths, reference_lengths)
            first = tf.argmax(tf.cast(mismatch, tf.int32), output_type=tf.int32)
            message = tf.strings.join([
                tf.gather(paths, first), " record ", tf.strings.as_string(
                    tf.gather(indices, first)), f": {what} fields disagree in length: ",
                # Unquoted names: TF escapes quotes inside assertion messages.
                f"{reference} has ", tf.strings.as_string(tf.gather(reference_lengths, first)),
                f" but {name} has ", tf.strings.as_string(tf.gather(lengths, first))])
            checks.append(tf.debugging.Assert(tf.logical_not(tf.reduce_any(mismatch)),
                                              [message]))
        return checks
