"""SavedModel export for TensorFlow Serving: one request = one user + the whole candidate set.

`export_saved_model` writes `<base_dir>/<version>/`, a SavedModel whose `serving_default`
signature takes the feature dict (every input a `TensorSpec` named after its feature, dims
`[None]` for user features and `[None, None]` for sequence and candidate features, so any
batch size, n and m is served without re-export) and returns:

- every task probability the model outputs, float32 [B, m];
- `score`, the ranking score, float32 [B, m];
- `ranked_indices`, int64 [B, m]: candidate positions by descending score. Valid candidates
  (`cand_item_id != 0`) come first; the positions of padded candidates follow, in their
  original order, so every row is a permutation of `range(m)`;
- `ranked_item_ids`, int64 [B, m]: `cand_item_id` gathered in that order, so its padded tail
  is 0 and a client can stop at the first 0.

`serving_raw` takes the same features with raw string ids in place of the int64 ids (user
features and every item attribute, sequence and candidates: `user_id`, `seq_item_id`,
`cand_item_id`, `*_category_id`, `*_author_id`; `seq_action`, `seq_time_delta` and the
cross counts stay int64), refuses an id longer than `raw_ids.MAX_ID_BYTES` (1,024 bytes)
before anything else runs (INVALID_ARGUMENT naming the input), maps them in the graph exactly as `ifa-data from-log` maps a
log's ids (`ifa_tf.data.raw_ids`: the vocabularies it wrote, carried as SavedModel assets,
then the converter's own rule for ids it never saw; `""` is padding), and returns what
`serving_default` returns plus `ranked_raw_item_ids`, string [B, m]: the candidates' raw ids
(stripped) in ranked order, `""` for padding.

The signature checks at run time that all features agree on the batch size, all candidate
features on m and all sequence features on n, so an inconsistent request fails with
INVALID_ARGUMENT instead of broadcasting silently. Ties in score keep candidate order.

A model built with `time_encoding="decay"` (stateful IFA) gets three more signatures, which
read and write a user's state (a few KB, whatever the history's length) instead of the
sequence (see `add_state_endpoints`): `user_state`, `update_state` and `rank_with_state`.

`assets.extra/` holds TF Serving warm-up requests (`tf_serving_warmup_requests`, replayed by
the server before a version is marked AVAILABLE: `serving_default` and `serving_raw` at each
warm-up shape and, for a stateful model, `user_state`, `update_state` and `rank_with_state`
too, so that no signature's first request pays for its start-up) and
`ifa_export_metadata.json` (model name, feature schema, signature, TensorFlow / Keras
versions).

A version is written to a hidden temporary directory beside it and renamed into place, so a
server polling `base_dir` never sees a half-written version; an existing version is never
overwritten. Export knows the model only through its inputs and outputs.
"""

import datetime
import errno
import hashlib
import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from ifa_tf import diagnostics
from ifa_tf import schema as schema_lib

# The names the clients read without TensorFlow, and `read_metadata`: one definition each.
from ifa_tf.signatures import (ASSETS_EXTRA, EVENT_TIME, METADATA_FILE, NOW,  # noqa: F401
                               RANK_WITH_STATE_SIGNATURE, RANKED_INDICES, RANKED_ITEM_IDS,
                               RANKED_RAW_ITEM_IDS, RAW_SIGNATURE_NAME, SCORE, SIGNATURE_NAME,
                               STATE, STATE_MODEL, STATE_SIGNATURES, STATE_TIME,
                               UPDATE_STATE_SIGNATURE, USER_STATE_SIGNATURE, read_metadata)

VOCABULARY_ASSET = "vocab_{role}.tsv"
WARMUP_FILE = "tf_serving_warmup_requests"
METADATA_FORMAT = "ifa_tf.export/1"
# (batch, m, n) of the recorded warm-up requests: a tiny one, and one near the paper's
# operating point so the first real request does not pay for kernel selection.
DEFAULT_WARMUP_SHAPES = ((1, 8, 32), (1, 200, 2000))
# The smallest padded m and n of an XLA export (see `bucket_size`).
MIN_BUCKET = 64

_TEMP_PREFIX = ".tmp-export-"
# TF Serving's version numbers are int64.
MAX_VERSION = 2**63 - 1


def version_directories(base_dir):
    """The versions under `base_dir`, by TF Serving's rule, and the names that look like one
    but are not.

    A version is a subdirectory named by ASCII digits whose value fits int64 (TF Serving
    parses the name with `safe_strto64`). Other names (`.tmp-export-*`, `latest`) are not
    versions and are skipped quietly.

    Returns:
        `(versions, ignored)`: `{version: directory name}`, and `{directory name: why}` for
        all-digit names beyond int64 and for a second name of the same version (`007` beside
        `7`: the later name in sorted order wins, as in TF Serving).
    """
    if not os.path.isdir(base_dir):
        return {}, {}
    versions, ignored = {}, {}
    for name in sorted(os.listdir(base_dir)):
        if not (name.isascii() and name.isdigit()
                and os.path.isdir(os.path.join(base_dir, name))):
            continue
        version = int(name)
        if version > MAX_VERSION:
            ignored[name] = f"the version number does not fit int64 (at most {MAX_VERSION})"
            continue
        if version in versions:
            ignored[versions[version]] = f"directory {name} is the same version {version}"
        versions[version] = name
    return versions, ignored


def list_versions(base_dir):
    """Sorted integer versions present in `base_dir` (see `version_directories`)."""
    return sorted(version_directories(base_dir)[0])


def next_version(base_dir):
    """One more than the highest version in `base_dir`, or 1."""
    versions = list_versions(base_dir)
    return versions[-1] + 1 if versions else 1


def rank_candidates(score, candidate_ids):
    """Orders each row's candidates by descending score, padded candidates last.

    Args:
        score: float [B, m].
        candidate_ids: int64 [B, m], 0 where the candidate slot is padding.

    Returns:
        `(ranked_indices, ranked_item_ids)`, both int64 [B, m]. Ties keep candidate order.
        A valid candidate whose score is NaN ranks after every other valid one and before
        the padding, so each row stays valid candidates first, then padding, whatever the
        scores hold.
    """
    valid = tf.not_equal(candidate_ids, schema_lib.PADDING_ID)
    score = tf.cast(score, tf.float32)
    scored = tf.logical_and(valid, tf.logical_not(tf.math.is_nan(score)))
    keyed = tf.where(scored, score, tf.constant(-np.inf, tf.float32))
    by_score = tf.argsort(keyed, axis=-1, direction="DESCENDING", stable=True)
    # 0: scored, 1: valid with a NaN score, 2: padding. A stable sort by this group after
    # the sort by score keeps each group in score order (-inf ties keep request order).
    group = 2 - tf.cast(valid, tf.int32) - tf.cast(scored, tf.int32)
    by_group = tf.argsort(tf.gather(group, by_score, batch_dims=1), axis=-1, stable=True)
    ranked_indices = tf.gather(by_score, by_group, batch_dims=1)
    ranked_item_ids = tf.gather(candidate_ids, ranked_indices, batch_dims=1)
    return tf.cast(ranked_indices, tf.int64), ranked_item_ids


def serving_specs(model, schema=None):
    """`{name: tf.TensorSpec}` of the model's inputs: named after the feature, dims None.

    When `schema` is given, the model's inputs must be exactly its features.
    """
    specs = {}
    for tensor in model.inputs:
        name = tensor.name
        dtype = tf.as_dtype(keras.backend.standardize_dtype(tensor.dtype))
        specs[name] = tf.TensorSpec([None] * len(tensor.shape), dtype, name=name)
    if schema is not None:
        expected = schema.serving_specs()
        if set(expected) != set(specs):
            raise ValueError(
                "The model's inputs are not the schema's features. Only in the model: "
                f"{sorted(set(specs) - set(expected))}; only in the schema: "
                f"{sorted(set(expected) - set(specs))}.")
        for name, spec in expected.items():
            if specs[name].shape.rank != spec.shape.rank:
                raise ValueError(f"Model input {name!r} has rank {specs[name].shape.rank}; "
                                 f"the schema declares rank {spec.shape.rank}.")
    if "cand_item_id" not in specs:
        raise ValueError("The model must take a `cand_item_id` input (it marks valid "
                         f"candidates and is returned ranked). Model inputs: {sorted(specs)}")
    return specs


def bucket_size(length, smallest=MIN_BUCKET):
    """The padded length XLA compiles for: the next power of two >= `length`, at least
    `smallest` (int64 scalar tensor)."""
    bits = tf.cast(length, tf.int64) - 1
    for shift in (1, 2, 4, 8, 16, 32):  # smear the highest set bit into every lower bit
        bits = tf.bitwise.bitwise_or(bits, tf.bitwise.right_shift(bits, shift))
    return tf.maximum(bits + 1, smallest)


def make_serving_function(model, specs, jit_compile=False):
    """The function behind `serving_default`: checks, model call, ranking.

    With `jit_compile`, the model runs as one XLA computation on the request padded to
    power-of-two m and n (`bucket_size`): padding is exactly invariant (padded candidates
    and sequence items are masked out of every valid output), and XLA compiles once per
    (batch, m bucket, n bucket) instead of once per request shape.
    """
    candidate_names = sorted(n for n in specs if n.startswith(schema_lib.CANDIDATE_PREFIX)
                             and specs[n].shape.rank == 2)
    sequence_names = sorted(n for n in specs if n.startswith(schema_lib.SEQUENCE_PREFIX)
                            and specs[n].shape.rank == 2)
    compiled = tf.function(lambda features: model(features, training=False),
                           jit_compile=True) if jit_compile else None

    def call_model(features):
        if compiled is None:
            return model(features, training=False)
        padded = dict(features)
        for names in (candidate_names, sequence_names):  # one length each (checked)
            if names:
                length = tf.shape(features[names[0]], out_type=tf.int64)[1]
                extra = bucket_size(length) - length
                for name in names:
                    padded[name] = tf.pad(features[name], [[0, 0], [0, extra]])
        m = tf.shape(features["cand_item_id"], out_type=tf.int64)[1]
        return {name: value[:, :m] for name, value in compiled(padded).items()}

    def serve(features):
        checks = _consistency_checks(features, candidate_names, sequence_names)
        with tf.control_dependencies(checks):
            features = {name: tf.identity(value) for name, value in features.items()}
        outputs = call_model(features)
        if not isinstance(outputs, dict) or SCORE not in outputs:
            raise ValueError("The model must return a dict of outputs including "
                             f"{SCORE!r}. Received: {type(outputs).__name__} "
                             f"{sorted(outputs) if isinstance(outputs, dict) else ''}")
        clashes = sorted({RANKED_INDICES, RANKED_ITEM_IDS, RANKED_RAW_ITEM_IDS} & set(outputs))
        if clashes:
            raise ValueError(f"Model outputs {clashes} clash with the ranking outputs.")
        result = {name: tf.cast(value, tf.float32) for name, value in outputs.items()}
        result[RANKED_INDICES], result[RANKED_ITEM_IDS] = rank_candidates(
            result[SCORE], features["cand_item_id"])
        return result

    return serve


def raw_id_features(specs, schema):
    """The inputs that `serving_raw` takes as raw string ids: the user features and both
    sides of every item attribute."""
    names = {*schema.user_features}
    for attribute in schema.item_attributes:
        names.update((schema_lib.SEQUENCE_PREFIX + attribute,
                      schema_lib.CANDIDATE_PREFIX + attribute))
    return sorted(names & set(specs))


def raw_serving_specs(specs, schema):
    """`serving_raw`'s input specs: `serving_default`'s with string ids."""
    raw = set(raw_id_features(specs, schema))
    return {name: tf.TensorSpec(spec.shape, tf.string, name=name) if name in raw else spec
            for name, spec in specs.items()}


class RawIdTables(tf.Module):
    """The lookup tables of `serving_raw`, one per role with a vocabulary (`{role: path
    of a file written by raw_ids.write_lookup_file}`); tracked so that the files become
    SavedModel assets."""

    def __init__(self, lookup_files):
        super().__init__(name="raw_id_tables")
        from ifa_tf.data import raw_ids

        self.tables = {role: raw_ids.lookup_table(path)
                       for role, path in sorted(lookup_files.items())}


def make_raw_serving_function(serve, raw_names, tables):
    """The function behind `serving_raw`: raw ids -> int64 ids, `serve`, raw ranked ids.

    Every raw id's length is checked first (`raw_id_length_checks`): nothing else runs on a
    request holding a longer one."""
    from ifa_tf.data import raw_ids

    def serve_raw(features):
        checks = raw_id_length_checks({name: features[name] for name in raw_names})
        with tf.control_dependencies(checks):
            features = {name: tf.identity(value) for name, value in features.items()}
        mapped = dict(features)
        encoded = raw_ids.encode_ids_tensors(
            [features[name] for name in raw_names],
            [tables.tables.get(raw_ids.role_of(name)) for name in raw_names])
        mapped.update(zip(raw_names, encoded))
        result = dict(serve(mapped))
        result[RANKED_RAW_ITEM_IDS] = tf.gather(raw_ids.strip(features["cand_item_id"]),
                                                result[RANKED_INDICES], batch_dims=1)
        return result

    return serve_raw


def raw_id_length_checks(raw_inputs, max_bytes=None):
    """Asserts that no raw id (`{name: string tensor}`) holds more than `max_bytes` (default
    `raw_ids.MAX_ID_BYTES`) bytes: INVALID_ARGUMENT naming the input, the first longer id's
    length and its position. One length per id: cheap beside the mapping, whose time grows
    with the ids' bytes."""
    from ifa_tf.data import raw_ids

    max_bytes = raw_ids.MAX_ID_BYTES if max_bytes is None else max_bytes
    checks = []
    for name, value in sorted(raw_inputs.items()):
        lengths = tf.strings.length(value, unit="BYTE")
        too_long = lengths > max_bytes
        length, position = _first_where(lengths, too_long)
        checks.append(tf.debugging.Assert(tf.logical_not(tf.reduce_any(too_long)), [
            tf.strings.join([f"Input {name}: a raw id of ", length, " bytes at [", position,
                             f"], over the limit of {max_bytes} bytes per raw id"])]))
    return checks


def _first_where(value, mask):
    """`(value, position)` as strings of the first element of `value` where `mask` holds,
    both empty when it holds nowhere (nothing is indexed that may not exist)."""
    first_value = tf.strings.reduce_join(tf.strings.as_string(
        tf.boolean_mask(value, mask)[:1]))
    position = tf.strings.reduce_join(tf.strings.as_string(
        tf.reshape(tf.where(mask)[:1], [-1])), separator=", ")
    return first_value, position


def raw_warmup_features(features, raw_names):
    """A `serving_raw` warm-up request made from a `serving_default` one: its ids as text,
    every other one non-numeric (the hashed path beside the integer one and the table
    lookup), 0 as "" (padding)."""
    raw = dict(features)
    for name in raw_names:
        ids = np.asarray(features[name])
        text = np.empty(ids.shape, dtype=object)
        for index, value in np.ndenumerate(ids):
            text[index] = ("" if value == 0 else str(value) if value % 2 else f"warm-up {value}")
        raw[name] = text
    return raw


def resolve_vocabularies(vocabularies):
    """`{role: vocabulary path}` from a converted dataset (directory or metadata.json), a
    dict, or None (none)."""
    if vocabularies is None:
        return {}
    if isinstance(vocabularies, dict):
        return {role: os.fspath(path) for role, path in vocabularies.items()}
    from ifa_tf.data import raw_ids

    return raw_ids.vocabulary_files(os.fspath(vocabularies))


def export_saved_model(model, base_dir, version=None, schema=None, model_name=None,
                       warmup_shapes=DEFAULT_WARMUP_SHAPES, seed=0, jit_compile=False,
                       vocabularies=None):
    """Exports `model` to `<base_dir>/<version>/` for TF Serving; returns that path.

    Args:
        model: a Keras model taking the feature dict and returning `{task: [B, m], "score":
            [B, m], ...}`.
        base_dir: the model's base path (what TF Serving's `--model_base_path` points to).
            A local (or mounted) directory, created when missing.
        version: positive integer; defaults to one more than the highest present.
        schema: the `FeatureSchema` the model was built for (recorded in the metadata and
            checked against the model's inputs). When omitted it is read off the model's
            input and output names.
        model_name: name recorded in the metadata and the warm-up requests; defaults to
            the basename of `base_dir`.
        warmup_shapes: `(batch, m, n)` of each warm-up request; empty for none.
        seed: seed of the warm-up requests' random ids.
        jit_compile: run the model as one XLA computation, on requests padded to
            power-of-two m and n (at least 64), so at most one compilation per (batch, m
            bucket, n bucket); the warm-up requests compile their buckets before a version
            serves. TF Serving runs it on GPU as is; on CPU it needs
            `--xla_cpu_compilation_enabled=true`. Results equal the plain export's (within
            float rounding).
        vocabularies: the vocabularies `serving_raw` carries as assets: a dataset written
            by `ifa-data from-log` (its directory or metadata.json), or `{role: path of a
            vocab_<role>.tsv}`. Without them `serving_raw` still maps every raw id as the
            converter does (the integer rule, else `string_id` in the graph), only slower
            for string ids.

    Raises:
        FileExistsError: `<base_dir>/<version>` already exists.
        ValueError: bad version, a weight holds NaN or infinity (`check_finite_weights`),
            or the model does not fit the serving contract.
    """
    base_dir = os.path.abspath(os.fspath(base_dir))
    if version is None:
        version = next_version(base_dir)
    if (isinstance(version, bool) or not isinstance(version, (int, np.integer))
            or not 1 <= version <= MAX_VERSION):
        raise ValueError("`version` must be a positive integer that fits int64 (TF Serving's "
                         f"version type). Received: version={version!r}")
    version = int(version)
    final_dir = os.path.join(base_dir, str(version))
    if os.path.exists(final_dir):
        raise FileExistsError(f"Version {version} already exists at {final_dir}; versions are "
                              "never overwritten. Omit --version to write the next one.")
    model_name = model_name or os.path.basename(base_dir.rstrip(os.sep)) or model.name
    check_finite_weights(model)
    specs = serving_specs(model, schema)

    archive = keras.export.ExportArchive()
    archive.track(model)
    serve = archive.add_endpoint(SIGNATURE_NAME,
                                 make_serving_function(model, specs, jit_compile),
                                 input_signature=[specs])
    warmup = [(SIGNATURE_NAME, random_features(specs, *shape, seed=seed + i))
              for i, shape in enumerate(warmup_shapes)]
    # Running the signature before writing anything catches a broken model early, and tells
    # which task is the ranking score when the schema is read off the model.
    probe = serve(random_features(specs, 2, 5, 7, seed=seed))
    if schema is None:
        schema = infer_schema(specs, probe)
    raw_names = raw_id_features(specs, schema)
    warmup += [(RAW_SIGNATURE_NAME, raw_warmup_features(features, raw_names))
               for _, features in list(warmup)]
    vocabulary_paths = resolve_vocabularies(vocabularies)
    stateful = add_state_endpoints(archive, model, specs) if getattr(
        model, "stateful", False) else None
    if stateful is not None:
        warmup += state_warmup_requests(stateful, specs, warmup_shapes, seed)

    from ifa_tf.data import raw_ids

    os.makedirs(base_dir, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{version}-", dir=base_dir)
    try:
        vocabulary_counts = _add_raw_endpoint(archive, serve, specs, schema,
                                              vocabulary_paths, temp_dir)
        export_dir = os.path.join(temp_dir, "model")
        archive.write_out(export_dir, verbose=False)
        extra_dir = os.path.join(export_dir, ASSETS_EXTRA)
        os.makedirs(extra_dir)
        write_warmup_requests(os.path.join(extra_dir, WARMUP_FILE), warmup, model_name)
        metadata = _metadata(model_name, version, schema, specs, probe, jit_compile)
        metadata["raw_signature_name"] = RAW_SIGNATURE_NAME
        metadata["raw_id_inputs"] = raw_id_features(specs, schema)
        metadata["raw_id_max_bytes"] = raw_ids.MAX_ID_BYTES
        metadata["vocabularies"] = vocabulary_counts
        metadata["stateful"] = stateful
        with open(os.path.join(extra_dir, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
        try:
            # rename(2) is atomic and refuses a non-empty target: a concurrent export of
            # the same version makes this one fail instead of mixing files.
            os.rename(export_dir, final_dir)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(f"Version {version} appeared at {final_dir} during "
                                      "export; versions are never overwritten.") from error
            raise
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return final_dir


def state_model_id(model):
    """The model's weights' fingerprint, a positive int63: every state carries the id of the
    model that made it, and a state of other weights (another version) is refused."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(variable.path.encode())
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable)).tobytes())
    return int.from_bytes(digest.digest()[:8], "big") & MAX_VERSION or 1


def add_state_endpoints(archive, model, specs):
    """Adds stateful IFA's signatures to `archive`; returns their description (metadata).

    - `user_state`: the `seq_*` features and `now` [B] (the time `seq_time_delta` counts
      back from, int64 seconds) -> `state` float32 [B, heads, feature_dim, value_dim + 1],
      `state_time` int64 [B] (= now, its reference time) and `state_model` int64 [B] (the
      model's id, `state_model_id`).
    - `update_state`: `state`, `state_time`, `state_model` and new events, the `seq_*` ids
      and action [B, e] with `seq_event_time` [B, e] (seconds, in any order, older than the
      state or not) -> the state with them added; its time moves to the newest event when
      that is later.
    - `rank_with_state`: `state`, `state_time`, `state_model`, `now` [B] and the user,
      candidate and cross features -> what `serving_default` returns. No sequence input.

    Refused with INVALID_ARGUMENT, naming the input and its value: a state of another shape,
    of another model (`state_model`), holding NaN or infinity, or with negative weights
    (z < 0); `now` before `state_time` (the state holds events the request's time has not
    seen: clocks disagree or the state is another user's; rank at `state_time` or later);
    a time (`now`, `state_time`, a valid event's `seq_event_time`) or age (a valid event's
    `seq_time_delta`) outside [0, `schema.MAX_TIME`], int64 seconds from 1970 to 2106: a
    time in milliseconds, far in the future or negative would move a state's reference
    time so far that it decays to nothing, or overflow a time difference; batch sizes that
    disagree. Every check passes before anything is computed, and `update_state` never
    returns a state holding NaN or infinity. An empty state (zeros, time 0) is a user with
    no history.
    """
    model_id = state_model_id(model)
    state_shape = model.state_shape
    int_spec = tf.TensorSpec([None], tf.int64)
    state_specs = {STATE: tf.TensorSpec([None] * 4, tf.float32, name=STATE),
                   STATE_TIME: tf.TensorSpec([None], tf.int64, name=STATE_TIME),
                   STATE_MODEL: tf.TensorSpec([None], tf.int64, name=STATE_MODEL)}
    sequence_specs = {n: s for n, s in specs.items()
                      if n.startswith(schema_lib.SEQUENCE_PREFIX)}
    event_specs = {n: specs[n] for n in model.event_features}
    event_specs[EVENT_TIME] = tf.TensorSpec([None, None], tf.int64, name=EVENT_TIME)
    rank_specs = {n: specs[n] for n in model.rank_features}

    def out(state, state_time):
        batch = tf.shape(state_time)[0]
        return {STATE: state, STATE_TIME: state_time,
                STATE_MODEL: tf.fill([batch], tf.constant(model_id, tf.int64))}

    def checked(inputs, checks):
        """`inputs` once `checks` passed: nothing computes with a refused value."""
        with tf.control_dependencies(checks):
            return {name: tf.identity(value) for name, value in inputs.items()}

    def user_state(inputs):
        valid = tf.not_equal(inputs[schema_lib.SEQUENCE_PREFIX + "item_id"], 0)
        inputs = checked(inputs, _batch_checks(inputs, NOW)
                         + _length_checks(inputs, "seq_item_id", "sequence length n")
                         + [_time_check(inputs, NOW),
                            _time_check(inputs, schema_lib.SEQUENCE_PREFIX + "time_delta",
                                        valid, "seconds before `now`, at a valid event")])
        made = model.user_state(inputs, inputs[NOW])
        return out(made[STATE], made[STATE_TIME])

    def update_state(inputs):
        valid = tf.not_equal(inputs[schema_lib.SEQUENCE_PREFIX + "item_id"], 0)
        inputs = checked(inputs, _batch_checks(inputs, STATE_TIME)
                         + _length_checks(inputs, "seq_item_id", "event count")
                         + _state_checks(inputs, model_id, state_shape)
                         + [_time_check(inputs, STATE_TIME),
                            _time_check(inputs, EVENT_TIME, valid, "at a valid event")])
        made = model.update_state(inputs[STATE], inputs[STATE_TIME], inputs)
        with tf.control_dependencies([_finite_check(
                made[STATE], "update_state made a state holding NaN or infinity ({} of {} "
                "values) from a finite one: the state sent is not one this model made")]):
            return out(tf.identity(made[STATE]), made[STATE_TIME])

    def rank_with_state(inputs):
        inputs = checked(inputs, _batch_checks(inputs, NOW)
                         + _length_checks(inputs, "cand_item_id", "candidate count m")
                         + _state_checks(inputs, model_id, state_shape)
                         + [_time_check(inputs, NOW), _time_check(inputs, STATE_TIME),
                            tf.debugging.assert_greater_equal(
                                inputs[NOW], inputs[STATE_TIME],
                                message="`now` is earlier than `state_time`, the reference "
                                        "time of the state: the state holds events after "
                                        "the time of the request. Rank at state_time or "
                                        "later (now, state_time)")])
        outputs = model.rank_with_state(inputs, inputs[STATE], inputs[STATE_TIME], inputs[NOW])
        result = {name: tf.cast(value, tf.float32) for name, value in outputs.items()}
        result[RANKED_INDICES], result[RANKED_ITEM_IDS] = rank_candidates(
            result[SCORE], inputs["cand_item_id"])
        return result

    archive.add_endpoint(USER_STATE_SIGNATURE, user_state,
                         input_signature=[{**sequence_specs, NOW: _named(int_spec, NOW)}])
    archive.add_endpoint(UPDATE_STATE_SIGNATURE, update_state,
                         input_signature=[{**state_specs, **event_specs}])
    archive.add_endpoint(RANK_WITH_STATE_SIGNATURE, rank_with_state,
                         input_signature=[{**state_specs, NOW: _named(int_spec, NOW),
                                           **rank_specs}])
    return {"signatures": list(STATE_SIGNATURES), "state_model": model_id,
            "state_shape": list(state_shape), "event_features": [*event_specs],
            "rank_features": [*rank_specs]}


def state_warmup_requests(stateful, specs, shapes, seed=0, now=1_700_000_000):
    """Warm-up `(signature name, features)` of the state signatures, one of each per
    `(batch, m, n)` of `shapes`, so a version's first stateful request does not pay for
    tracing and kernel selection: `user_state` of n events, `update_state` of an empty
    state (a new user, what ifa-state build starts from) with n events, `rank_with_state`
    of an empty state and m candidates. `stateful`: what `add_state_endpoints` returned."""
    state_shape, model_id = tuple(stateful["state_shape"]), stateful["state_model"]
    sequence_specs = {n: s for n, s in specs.items()
                      if n.startswith(schema_lib.SEQUENCE_PREFIX)}
    event_specs = {n: specs.get(n, tf.TensorSpec([None, None], tf.int64, name=n))
                   for n in stateful["event_features"]}
    rank_specs = {n: specs[n] for n in stateful["rank_features"]}
    requests = []
    for index, (batch, m, n) in enumerate(shapes):
        batch, m, n = int(batch), int(m), int(n)
        times = np.full(batch, now, np.int64)
        empty = {STATE: np.zeros((batch, *state_shape), np.float32),
                 STATE_TIME: np.zeros(batch, np.int64),
                 STATE_MODEL: np.full(batch, model_id, np.int64)}
        sequence = random_features(sequence_specs, batch, m, n, seed=seed + index)
        events = random_features(event_specs, batch, m, n, seed=seed + index)
        # Events up to about a day before `now` (random_features' ids are small ints).
        events[EVENT_TIME] = now - 100 * events[EVENT_TIME]
        requests += [
            (USER_STATE_SIGNATURE, {**sequence, NOW: times}),
            (UPDATE_STATE_SIGNATURE, {**empty, **events}),
            (RANK_WITH_STATE_SIGNATURE, {**empty, NOW: times, **random_features(
                rank_specs, batch, m, n, seed=seed + index)})]
    return requests


def _named(spec, name):
    return tf.TensorSpec(spec.shape, spec.dtype, name=name)


def _batch_checks(inputs, reference):
    """Every input has `inputs[reference]`'s batch size (INVALID_ARGUMENT)."""
    batch = tf.shape(inputs[reference], out_type=tf.int64)[0]
    return [tf.debugging.assert_equal(
        tf.shape(value, out_type=tf.int64)[0], batch,
        message=f"Inconsistent batch size: `{name}` and `{reference}` must have the same "
                "first dimension") for name, value in sorted(inputs.items())]


def _length_checks(inputs, reference, axis_name):
    """Every rank-2 input has `inputs[reference]`'s second dimension (INVALID_ARGUMENT)."""
    length = tf.shape(inputs[reference], out_type=tf.int64)[1]
    return [tf.debugging.assert_equal(
        tf.shape(value, out_type=tf.int64)[1], length,
        message=f"Inconsistent {axis_name}: `{name}` and `{reference}` must have the same "
                "second dimension")
        for name, value in sorted(inputs.items()) if value.shape.rank == 2]


def _time_check(inputs, name, valid=None, where=""):
    """`inputs[name]` (int64 seconds) lies in [0, MAX_TIME] (where `valid`, if given):
    INVALID_ARGUMENT naming the input, its first value outside and that value's position."""
    value = inputs[name]
    outside = tf.logical_or(value < 0, value > schema_lib.MAX_TIME)
    if valid is not None:
        outside = tf.logical_and(outside, valid)
    first_value, first_position = _first_where(value, outside)
    unit = f" ({where})" if where else ""
    return tf.debugging.Assert(tf.logical_not(tf.reduce_any(outside)), [tf.strings.join([
        f"`{name}`{unit} is ", first_value, " at [", first_position,
        f"], outside [0, {schema_lib.MAX_TIME}]: times are int64 seconds from 1970 to 2106 "
        "(milliseconds, or a time far in the future or before 1970, are refused)"])])


def _finite_check(value, message):
    """An assert that `value` holds no NaN or infinity; `message` has two `{}` for the
    count of such values and the size. Its text is one line (unlike `assert_all_finite`'s,
    which carries TensorFlow's graph context)."""
    bad = tf.logical_not(tf.math.is_finite(value))
    return tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [tf.strings.format(
        message, (tf.math.count_nonzero(bad), tf.size(value, out_type=tf.int64)))])


def _state_checks(inputs, model_id, state_shape):
    """A state of this model: its shape, its model id, finite values, z >= 0."""
    state = inputs[STATE]
    expected = tf.constant(state_shape, tf.int64)
    return [
        tf.debugging.assert_equal(
            tf.shape(state, out_type=tf.int64)[1:], expected,
            message=f"`state` must have shape [B, {', '.join(map(str, state_shape))}] for "
                    "this model; the state sent has shape (after B)"),
        tf.debugging.assert_equal(
            inputs[STATE_MODEL], tf.constant(model_id, tf.int64),
            message=f"`state_model` is not this model's ({model_id}): the state was made by "
                    "another model version. Rebuild the states for this version (ifa-state "
                    "build) or rank with the version that made them. state_model"),
        _finite_check(state, "`state` holds NaN or infinity ({} of {} values): it is not a "
                             "state this model made"),
        tf.debugging.assert_non_negative(
            state[..., -1], message="`state` has a negative normaliser (its last column): "
                                    "it is not a state this model made"),
    ]


def check_finite_weights(model):
    """Raises ValueError naming the weights of `model` that hold NaN or infinity: a model
    that diverged in training scores every candidate NaN, and must not reach serving."""
    found = diagnostics.non_finite_weights(model)
    if found:
        shown = ", ".join(f"{path}: {count} of {size} values"
                          for path, (count, size) in list(found.items())[:3])
        raise ValueError(
            f"Refusing to export model {model.name!r}: {len(found)} of its "
            f"{len(model.weights)} weights hold NaN or infinite values ({shown}"
            f"{', ...' if len(found) > 3 else ''}). It diverged in training or was damaged; "
            "retrain it (e.g. with a lower learning rate).")


def _add_raw_endpoint(archive, serve, specs, schema, vocabulary_paths, work_dir):
    """Adds `serving_raw` to `archive`; returns `{role: {"file", "entries", "hashed"}}` of
    the vocabularies it carries (lines kept in the table, values left to the hash)."""
    from ifa_tf.data import raw_ids

    lookup_files, counts = {}, {}
    for role, path in sorted(vocabulary_paths.items()):
        # The asset keeps its file name: one per role, as the converter names them.
        lookup_dir = os.path.join(work_dir, "vocabularies")
        os.makedirs(lookup_dir, exist_ok=True)
        lookup_files[role] = os.path.join(lookup_dir, VOCABULARY_ASSET.format(role=role))
        kept, dropped = raw_ids.write_lookup_file(path, lookup_files[role])
        counts[role] = {"file": VOCABULARY_ASSET.format(role=role), "entries": kept,
                        "hashed": dropped}
    tables = RawIdTables(lookup_files)
    archive.track(tables)
    raw_specs = raw_serving_specs(specs, schema)
    archive.add_endpoint(RAW_SIGNATURE_NAME,
                         make_raw_serving_function(serve, raw_id_features(specs, schema),
                                                   tables),
                         input_signature=[raw_specs])
    return counts


def infer_schema(specs, outputs):
    """A `FeatureSchema` read off input names (DESIGN.md naming rule) and output names."""
    names = list(specs)
    ranks = {name: spec.shape.rank for name, spec in specs.items()}
    seq_prefix, cand_prefix = schema_lib.SEQUENCE_PREFIX, schema_lib.CANDIDATE_PREFIX
    attributes = [n[len(cand_prefix):] for n in names
                  if n.startswith(cand_prefix) and not n.startswith(schema_lib.CROSS_PREFIX)
                  and seq_prefix + n[len(cand_prefix):] in specs]
    attributes.sort(key=lambda a: (a != "item_id", a))
    tasks = [n for n in outputs if n not in (SCORE, RANKED_INDICES, RANKED_ITEM_IDS)]
    score = np.asarray(outputs[SCORE])
    score_task = next((t for t in tasks if np.array_equal(np.asarray(outputs[t]), score)),
                      None)
    fields = dict(
        item_attributes=tuple(attributes),
        user_features=tuple(sorted(n for n in names if ranks[n] == 1)),
        sequence_context=tuple(sorted(n for n in names if n.startswith(seq_prefix)
                                      and n[len(seq_prefix):] not in attributes)),
        cross_features=tuple(sorted(n for n in names if n.startswith(schema_lib.CROSS_PREFIX))),
        tasks=tuple(tasks))
    if score_task is not None:
        fields["score_task"] = score_task
    try:
        schema = schema_lib.FeatureSchema(**fields)
    except ValueError as error:
        raise ValueError("Could not read a FeatureSchema off the model's inputs and outputs "
                         f"({error}); pass schema= explicitly.") from error
    leftover = set(names) - set(schema.feature_names)
    if leftover:
        raise ValueError(f"Model inputs {sorted(leftover)} follow no schema naming rule; "
                         "pass schema= explicitly.")
    return schema


def make_predict_request(features, model_name, signature_name=SIGNATURE_NAME, version=None):
    """A `tensorflow.serving.PredictRequest` carrying a NumPy feature dict."""
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, value in features.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
    return request


def write_warmup_requests(path, requests, model_name):
    """Writes TF Serving's warm-up file: a TFRecord of `PredictionLog`s.

    `requests`: feature dicts (for `serving_default`) or `(signature name, feature dict)`
    pairs; TF Serving and `ifa-serve` replay each on the signature it names."""
    from tensorflow_serving.apis import prediction_log_pb2

    with tf.io.TFRecordWriter(path) as writer:
        for request in requests:
            signature_name, features = (request if isinstance(request, tuple)
                                        else (SIGNATURE_NAME, request))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(
                    request=make_predict_request(features, model_name, signature_name)))
            writer.write(log.SerializeToString())


def read_warmup_requests(export_dir):
    """The `PredictRequest`s recorded in a version's warm-up file (empty when none)."""
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(export_dir, ASSETS_EXTRA, WARMUP_FILE)
    if not os.path.exists(path):
        return []
    requests = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(record)
        if log.WhichOneof("log_type") == "predict_log":
            requests.append(log.predict_log.request)
    return requests


def random_features(specs, batch, m, n, seed=0):
    """A random request for `specs` (name -> TensorSpec): `batch` users, `m` candidates,
    `n` sequence items, ids in [1, 1000) with the last eighth of each list padded (0).
    Roles follow the naming rule: rank 1 = user, `seq_*` = sequence, other rank 2 = m."""
    batch, m, n = int(batch), int(m), int(n)
    rng = np.random.default_rng(seed)
    features = {}
    for name, spec in specs.items():
        if spec.shape.rank == 1:
            size = (batch,)
        else:
            size = (batch, n if name.startswith(schema_lib.SEQUENCE_PREFIX) else m)
        features[name] = rng.integers(1, 1000, size=size, dtype=np.int64)
    for name in features:
        if name.startswith(schema_lib.CANDIDATE_PREFIX) and m > 1:
            features[name][:, -max(1, m // 8):] = 0
        if name.startswith(schema_lib.SEQUENCE_PREFIX) and n > 1:
            features[name][:, -max(1, n // 8):] = 0
    return {name: features[name].astype(specs[name].dtype.as_numpy_dtype) for name in specs}


def _consistency_checks(features, candidate_names, sequence_names):
    """Run-time asserts: one batch size, one m, one n (INVALID_ARGUMENT otherwise)."""
    checks = []
    batch = tf.shape(features["cand_item_id"], out_type=tf.int64)[0]
    for name in sorted(features):
        checks.append(tf.debugging.assert_equal(
            tf.shape(features[name], out_type=tf.int64)[0], batch,
            message=f"Inconsistent batch size: `{name}` and `cand_item_id` must have the "
                    "same first dimension"))
    for names, axis_name in ((candidate_names, "candidate count m"),
                             (sequence_names, "sequence length n")):
        if not names:
            continue
        reference = "cand_item_id" if "cand_item_id" in names else names[0]
        if axis_name.startswith("sequence") and "seq_item_id" in names:
            reference = "seq_item_id"
        length = tf.shape(features[reference], out_type=tf.int64)[1]
        for name in names:
            checks.append(tf.debugging.assert_equal(
                tf.shape(features[name], out_type=tf.int64)[1], length,
                message=f"Inconsistent {axis_name}: `{name}` and `{reference}` must have "
                        "the same second dimension"))
    return checks


def _metadata(model_name, version, schema, specs, probe, jit_compile):
    def describe(value):
        return {"dtype": tf.as_dtype(value.dtype).name,
                "shape": [None] * len(value.shape)}

    return {
        "format": METADATA_FORMAT,
        "model_name": model_name,
        "version": version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "signature_name": SIGNATURE_NAME,
        "inputs": {name: describe(spec) for name, spec in specs.items()},
        "outputs": {name: describe(value) for name, value in probe.items()},
        "schema": schema.to_dict(),
        "jit_compile": bool(jit_compile),
        "xla_min_bucket": MIN_BUCKET if jit_compile else None,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "ifa_tf_version": _package_version(),
    }


def _package_version():
    from importlib import metadata

    try:
        return metadata.version("ifa_tf")
    except metadata.PackageNotFoundError:
        return None
