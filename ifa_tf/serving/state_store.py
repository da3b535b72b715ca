"""Per-user states of stateful IFA (`time_encoding="decay"`), kept beside TF Serving.

A ranking service keeps, per user and model, everything a request needs from the history:

- the model's dense state (`user_state` / `update_state` of the SavedModel: a few KB);
- sparse per-attribute tables, id -> [count, last event time], from which the cross
  features `cand_cross_<a>_count` are computed exactly as the data pipeline computes them
  from the sequence (`ifa_tf.data.records.cross_counts`);
- its reference time, the number of events applied and the wall-clock time of the write.

Records are keyed by (model id, user): the model id is the fingerprint of the weights that
every state carries (`state_model`), so a new model version never reads an old version's
state (it finds none, and ranks the user as new until `ifa-state build` rebuilt them).

Two backends share one contract: `get(model, user) -> (record or None, revision)` and
`compare_and_set(model, user, record, revision) -> bool`. An update reads, computes and
writes only if no one wrote in between, else retries (`apply_events`): concurrent updates
of one user lose no event, on one machine or many. A write is acknowledged once durable:

- `SQLiteStateStore` (embedded, no server): WAL journal, `synchronous=FULL`.
- `RedisStateStore` (several machines): one Lua script per write, so the check and the
  write are atomic on the server. Durability is Redis's: run it with `appendonly yes` and
  `appendfsync always` for acknowledged writes to survive a crash (serving/README.md).

`open_store("sqlite:///path/states.db")` or `open_store("redis://host:6379/0")`.
"""

import base64
import dataclasses
import json
import os
import sqlite3
import threading
import time

import numpy as np

from ifa_tf import schema as schema_lib
from ifa_tf.serving.closeable import Closeable

STATE, STATE_TIME, STATE_MODEL, NOW = "state", "state_time", "state_model", "now"
EVENT_TIME = "seq_event_time"
_FORMAT = "ifa_tf.state/1"


@dataclasses.dataclass
class UserState:
    """One user's stored state for one model.

    Attributes:
        model: id of the model that made `state` (its `state_model`).
        state: float32 [heads, feature_dim, value_dim + 1].
        time: the state's reference time, int seconds (0: no event yet).
        events: how many events it holds.
        tables: `{attribute: {id: [count, last event time]}}` per cross-feature attribute
            (e.g. `author_id`, `category_id`).
        written: wall-clock seconds of the last write (how stale the record is).
    """

    model: int
    state: np.ndarray
    time: int = 0
    events: int = 0
    tables: dict = dataclasses.field(default_factory=dict)
    written: float = 0.0

    @classmethod
    def empty(cls, model, state_shape, attributes=()):
        """A user with no history: what an unknown user gets."""
        return cls(int(model), np.zeros(state_shape, np.float32),
                   tables={a: {} for a in attributes})

    def to_bytes(self):
        return json.dumps({
            "format": _FORMAT, "model": self.model, "time": self.time, "events": self.events,
            "written": self.written, "shape": list(self.state.shape),
            "state": base64.b64encode(np.ascontiguousarray(self.state, "<f4").tobytes()
                                      ).decode(),
            "tables": {a: [[int(i), int(c), int(t)] for i, (c, t) in sorted(table.items())]
                       for a, table in self.tables.items()},
        }, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data):
        record = json.loads(data)
        if record.get("format") != _FORMAT:
            raise ValueError(f"Not a state record of format {_FORMAT}: "
                             f"{str(record.get('format'))[:50]!r}")
        state = np.frombuffer(base64.b64decode(record["state"]), "<f4").reshape(
            record["shape"]).astype(np.float32)
        tables = {a: {int(i): [int(c), int(t)] for i, c, t in rows}
                  for a, rows in record["tables"].items()}
        return cls(int(record["model"]), state, int(record["time"]), int(record["events"]),
                   tables, float(record["written"]))

    def cross_features(self, candidates, cross_features):
        """`{cand_cross_<a>_count: int64 [m]}` for the candidates' `cand_<a>` ids (1-D)."""
        counts = {}
        for name in cross_features:
            attribute = cross_attribute(name)
            table = self.tables.get(attribute, {})
            ids = np.asarray(candidates[schema_lib.CANDIDATE_PREFIX + attribute])
            counts[name] = np.array([table.get(int(i), (0,))[0] if i else 0 for i in ids],
                                    np.int64)
        return counts


def cross_attribute(cross_feature):
    """`cand_cross_author_count` -> `author_id` (the data pipeline's naming rule)."""
    stem = cross_feature[len(schema_lib.CROSS_PREFIX):]
    if not (cross_feature.startswith(schema_lib.CROSS_PREFIX) and stem.endswith("_count")):
        raise ValueError(f"Cannot keep a table for cross feature {cross_feature!r}: expected "
                         "cand_cross_<a>_count.")
    return stem[:-len("_count")] + "_id"


class StateStore(Closeable):
    """The contract of the backends (see the module docstring)."""

    def get(self, model, user):
        """`(UserState or None, revision)`; revision 0 for a user never written."""
        raise NotImplementedError

    def compare_and_set(self, model, user, record, revision):
        """Writes `record` if the stored revision is still `revision`; True when written
        (durably), False when someone wrote in between."""
        raise NotImplementedError


class SQLiteStateStore(StateStore):
    """States in one SQLite file: no server, several threads and processes of one machine.
    Each thread has its own connection; writes are durable when acknowledged (WAL,
    `synchronous=FULL`)."""

    def __init__(self, path, timeout=30.0):
        self.path = os.fspath(path)
        self.timeout = timeout
        self._local = threading.local()
        self._connection().execute(
            "CREATE TABLE IF NOT EXISTS states (model INTEGER NOT NULL, user TEXT NOT NULL, "
            "revision INTEGER NOT NULL, value BLOB NOT NULL, PRIMARY KEY (model, user))")

    def _connection(self):
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=self.timeout,
                                         isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            self._local.connection = connection
        return connection

    def get(self, model, user):
        row = self._connection().execute(
            "SELECT revision, value FROM states WHERE model = ? AND user = ?",
            (int(model), str(user))).fetchone()
        if row is None:
            return None, 0
        return UserState.from_bytes(row[1]), row[0]

    def compare_and_set(self, model, user, record, revision):
        connection = self._connection()
        if revision == 0:
            cursor = connection.execute(
                "INSERT OR IGNORE INTO states (model, user, revision, value) "
                "VALUES (?, ?, 1, ?)", (int(model), str(user), record.to_bytes()))
        else:
            cursor = connection.execute(
                "UPDATE states SET revision = revision + 1, value = ? "
                "WHERE model = ? AND user = ? AND revision = ?",
                (record.to_bytes(), int(model), str(user), revision))
        return cursor.rowcount == 1

    def close(self):
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


# KEYS[1]: the record's hash; ARGV: expected revision, new value. Atomic on the server.
_COMPARE_AND_SET = """
local revision = tonumber(redis.call('HGET', KEYS[1], 'revision') or '0')
if revision ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'revision', revision + 1, 'value', ARGV[2])
return 1
"""


class RedisStateStore(StateStore):
    """States in Redis, one hash per (model, user) under `prefix`, for several machines."""

    def __init__(self, url="redis://localhost:6379/0", prefix="ifa_state"):
        import redis

        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self._compare_and_set = self.client.register_script(_COMPARE_AND_SET)

    def _key(self, model, user):
        return f"{self.prefix}:{int(model)}:{user}"

    def get(self, model, user):
        revision, value = self.client.hmget(self._key(model, user), "revision", "value")
        if value is None:
            return None, 0
        return UserState.from_bytes(value), int(revision)

    def compare_and_set(self, model, user, record, revision):
        return bool(self._compare_and_set(keys=[self._key(model, user)],
                                          args=[revision, record.to_bytes()]))

    def close(self):
        self.client.close()


def open_store(url):
    """`sqlite:///path/to/states.db` (or a plain path) or `redis://host:port/db`."""
    url = os.fspath(url)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStateStore(url)
    if url.startswith("sqlite://"):
        url = url[len("sqlite://"):]
    return SQLiteStateStore(url)


class StateModel:
    """A stateful model's state signatures, run in-process on a SavedModel version
    directory (`export_dir`) or through a server (`client`, a `ServingClient`)."""

    def __init__(self, export_dir=None, client=None):
        if (export_dir is None) == (client is None):
            raise ValueError("Pass exactly one of export_dir and client.")
        self.client = client
        self.signatures = None
        if export_dir is not None:
            import tensorflow as tf

            self.signatures = tf.saved_model.load(os.fspath(export_dir)).signatures
            missing = [n for n in ("user_state", "update_state", "rank_with_state")
                       if n not in self.signatures]
            if missing:
                raise ValueError(f"{export_dir} has no {missing} signatures: export a model "
                                 "built with time_encoding='decay'.")
        self.refresh()

    def refresh(self):
        """Reads the model's inputs, id and state shape (again, after a new version)."""
        self.sequence_features = [n for n in self.signature_inputs("user_state") if n != NOW]
        self.cross_features = [n for n in self.signature_inputs("rank_with_state")
                               if n.startswith(schema_lib.CROSS_PREFIX)]
        empty = self.user_state({name: np.zeros((1, 0), np.int64) for name in
                                 self.sequence_features}, np.zeros(1, np.int64))
        self.model = int(empty[STATE_MODEL][0])
        self.state_shape = tuple(empty[STATE].shape[1:])

    def signature_inputs(self, signature):
        """The input names of one of the model's signatures: from the SavedModel, or from
        what the server lists for it (GetModelMetadata), so that a model of any schema is
        driven by its own feature names."""
        if self.signatures is not None:
            _, inputs = self.signatures[signature].structured_input_signature
            return list(inputs)
        return self.client.signature_inputs(signature)

    def run(self, signature, inputs):
        if self.signatures is not None:
            import tensorflow as tf

            outputs = self.signatures[signature](**{k: tf.constant(v)
                                                    for k, v in inputs.items()})
            return {k: v.numpy() for k, v in outputs.items()}
        outputs, _ = self.client.predict(inputs, signature_name=signature)
        return outputs

    def user_state(self, sequence, now):
        return self.run("user_state", {**sequence, NOW: np.asarray(now, np.int64)})

    def update_state(self, record, events):
        """`record` (a `UserState`) with `events` (1-D arrays: event features and
        `seq_event_time`) added: a new `UserState`."""
        return self.update_states([record], [events])[0]

    def update_states(self, records, events):
        """`update_state` of several users in one call (their events padded to one
        length)."""
        length = max(len(e["seq_item_id"]) for e in events)
        batch = {name: np.stack([np.pad(np.asarray(e[name], np.int64),
                                        (0, length - len(e[name]))) for e in events])
                 for name in events[0]}
        outputs = self.run("update_state", {
            STATE: np.stack([r.state for r in records]),
            STATE_TIME: np.array([r.time for r in records], np.int64),
            STATE_MODEL: np.array([r.model for r in records], np.int64), **batch})
        updated = []
        for index, (record, user_events) in enumerate(zip(records, events)):
            valid = np.asarray(user_events["seq_item_id"]) != 0
            times = np.asarray(user_events[EVENT_TIME])[valid].tolist()
            tables = {a: dict(table) for a, table in record.tables.items()}
            for attribute, table in tables.items():
                ids = np.asarray(user_events[schema_lib.SEQUENCE_PREFIX + attribute])[valid]
                for item, when in zip(ids.tolist(), times):
                    count, last = table.get(item, (0, when))
                    table[item] = [count + 1, max(last, when)]
            updated.append(UserState(record.model, outputs[STATE][index],
                                     int(outputs[STATE_TIME][index]),
                                     record.events + int(valid.sum()), tables))
        return updated


def load_state(store, model, user, cross_features=()):
    """The stored `UserState` of `user` for `model` (a `StateModel`); an unknown user gets
    the empty state, not an error."""
    record, _ = store.get(model.model, user)
    if record is None:
        return UserState.empty(model.model, model.state_shape,
                               [cross_attribute(n) for n in cross_features])
    return record


def apply_events(store, model, user, events, cross_features=(), max_attempts=100):
    """Adds `events` (1-D arrays) to `user`'s state in `store`, atomically: read, update,
    write if no one wrote in between, else again. Returns the written `UserState`.

    Raises:
        RuntimeError: still contended after `max_attempts` tries.
    """
    for _ in range(max_attempts):
        record, revision = store.get(model.model, user)
        if record is None:
            record = UserState.empty(model.model, model.state_shape,
                                     [cross_attribute(n) for n in cross_features])
        updated = model.update_state(record, events)
        updated.written = time.time()
        if store.compare_and_set(model.model, user, updated, revision):
            return updated
    raise RuntimeError(f"User {user}'s state changed under {max_attempts} updates in a row; "
                       "too many writers for one user.")


def put_state(store, user, record, max_attempts=100):
    """Stores `record` for `user`, replacing any (a rebuild)."""
    record.written = time.time()
    for _ in range(max_attempts):
        _, revision = store.get(record.model, user)
        if store.compare_and_set(record.model, user, record, revision):
            return record
    raise RuntimeError(f"User {user}'s state changed under {max_attempts} writes in a row.")


def rank_user(client, store, user, features, now=None, model=None, cross_features=None):
    """One call: `user`'s ranking of the candidates in `features` from the stored state.

    Args:
        client: a `ServingClient` of the served decay model.
        store: a `StateStore`.
        user: the user's id (as stored).
        features: one user's user features (scalars) and candidate features (1-D).
            Cross features (`cand_cross_*`) the model reads and `features` lacks are
            computed from the stored tables.
        now: the request's time, int seconds; default the wall clock, or the state's time
            when that is later (clocks of the writer and the ranker may disagree by a
            little; a request never ranks before its state's time).
        model: the client's `StateModel`, kept between calls to skip reading its id.
        cross_features: the cross features to compute; default the ones the served
            `rank_with_state` takes (`model.cross_features`) that `features` does not hold.

    Returns:
        `(Ranking, UserState)`. A new model version answers the old id with
        INVALID_ARGUMENT; the model's id is then read again and the call retried once.
    """
    from ifa_tf.serving import errors
    from ifa_tf.serving.client import rankings_from_outputs

    model = model or StateModel(client=client)
    if cross_features is None:
        cross_features = [n for n in model.cross_features if n not in features]
    for attempt in range(2):
        record = load_state(store, model, user, cross_features)
        when = max(int(time.time()), record.time) if now is None else int(now)
        inputs = {name: np.asarray(value)[None] for name, value in features.items()}
        inputs.update({name: value[None] for name, value in
                       record.cross_features(features, cross_features).items()})
        inputs.update({STATE: record.state[None], STATE_TIME: np.array([record.time]),
                       STATE_MODEL: np.array([record.model]), NOW: np.array([when])})
        try:
            outputs, version = client.predict(inputs, signature_name="rank_with_state")
        except errors.ServingError as error:
            if attempt == 0 and STATE_MODEL in error.message:
                model.refresh()
                continue
            raise
        return rankings_from_outputs(outputs, version)[0], record


# ------------------------------------------------------------------ building and events
EVENT_COLUMNS = ("user_id", "item_id", "category_id", "author_id", "action", "time")


def read_events(path, schema=None):
    """`{user: events}` from a CSV of int64 ids with the header `user_id,item_id,
    category_id,author_id,action,time` (time in seconds; columns of attributes the schema
    lacks may be left out). Ids are the ones the model was trained on (what `ifa-data`
    wrote)."""
    import csv

    schema = schema or schema_lib.default_schema()
    names = [a for a in schema.item_attributes] + (
        ["action"] if "seq_action" in schema.sequence_context else [])
    columns = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("user_id", *names, "time") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: the header lacks columns {missing}; expected "
                             f"{','.join(EVENT_COLUMNS)}. Received: {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                user = int(row["user_id"])
                values = [int(row[n]) for n in names] + [int(row["time"])]
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: ids, action and time must be integers. "
                                 f"Received: {row}") from None
            columns.setdefault(user, []).append(values)
    keys = [schema_lib.SEQUENCE_PREFIX + n for n in names] + [EVENT_TIME]
    return {user: {k: np.array(column, np.int64) for k, column in zip(keys, zip(*rows))}
            for user, rows in columns.items()}


def events_from_records(file_pattern, now, schema=None):
    """`{user: events}` from candidate-set TFRecords: each user's longest sequence (their
    latest request), its `seq_time_delta` counted back from `now` (the records hold no
    absolute time)."""
    import tensorflow as tf

    from ifa_tf.data import records

    files = records.expand_file_pattern(file_pattern)
    metadata = records.find_metadata(files)
    schema = schema or (records.schema_from_metadata(metadata) if metadata
                        else schema_lib.default_schema())
    names = [n for n in schema.sequence_features if n != "seq_time_delta"]
    latest = {}
    for path in files:
        compression = "GZIP" if records.compression_of(path) else ""
        for serialized in tf.data.TFRecordDataset(path, compression).as_numpy_iterator():
            request = records.decode_example(serialized, schema, with_labels=False,
                                             with_extras=False)
            user = int(request[schema.user_features[0]])
            if user not in latest or len(request["seq_item_id"]) >= len(
                    latest[user]["seq_item_id"]):
                events = {n: request[n] for n in names}
                events[EVENT_TIME] = int(now) - request["seq_time_delta"]
                latest[user] = events
    return latest


def events_from_log(path, dataset):
    """`{user: events}` from a raw interaction log (string ids allowed), read and mapped
    exactly as `ifa-data from-log` read and mapped the log of `dataset` (the directory it
    wrote, or its metadata.json): the converter's columns, delimiter, header, action rules,
    item table and bad-row policy (`RequestBuilder`'s settings), its parser
    (`log_converter.read_log`), its id rule (`encode_ids`: a positive integer is kept, any
    other value `string_id`), its merge of rows of one (user, item, time), and its category
    rule (an item's first category in the log, or the item table's).

    Users are keyed by their int64 id (the converter's `user_id`), as `events_from_records`
    keys them. Every event of the log is kept: a state has no length limit (the converter's
    `max_seq_len` cut only bounds a training sequence). `path` may be a preset's directory
    (`ifa-data from-log --preset=... --input=<directory>`)."""
    from ifa_tf.data import log_converter, log_statistics, records, user_requests
    from ifa_tf.serving.request_builder import RequestBuilder

    builder = RequestBuilder(dataset)
    path = os.fspath(path)
    if os.path.isdir(path):
        preset = records.read_metadata(os.fspath(dataset)).get("preset")
        if preset not in log_converter.PRESETS:
            raise ValueError(f"{path} is a directory; pass the log file (only a preset's "
                             "dataset names the file in its directory).")
        path = log_converter.preset_log_file(preset, path, builder.config)
    log = log_converter.read_log(path, builder.config)
    if not log.user:
        return {}
    users, _ = log_converter.encode_ids(log.user)
    items, _ = log_converter.encode_ids(log.item)
    timeline = user_requests.merge_and_sort(users, items, log.timestamp, log.action_bits,
                                            log.line)
    first = {}
    if "category_id" in builder.schema.item_attributes:
        categories, _ = log_converter.encode_ids(log.category)
        first = {item: category for item, (_, category) in
                 log_statistics.first_categories(items, categories, log.line).items()}
    starts = timeline.user_start
    return {int(timeline.user[begin]): user_requests.sequence_events(
        timeline, slice(begin, end), first, builder.schema, EVENT_TIME)
        for begin, end in zip(starts[:-1], starts[1:])}


def build_states(store, model, events_by_user, cross_features=(), batch_size=64,
                 progress=None):
    """Writes every user's state made from their events alone (a rebuild, e.g. for a new
    model version: states are keyed by model, so the old ones stay for the old version);
    returns the number of users."""
    users = sorted(events_by_user)
    attributes = [cross_attribute(n) for n in cross_features]
    for start in range(0, len(users), batch_size):
        chunk = users[start:start + batch_size]
        empty = [UserState.empty(model.model, model.state_shape, attributes) for _ in chunk]
        for user, record in zip(chunk, model.update_states(
                empty, [events_by_user[u] for u in chunk])):
            put_state(store, user, record)
        if progress is not None:
            progress(min(start + batch_size, len(users)), len(users))
    return len(users)


def describe(record, now=None):
    """A record's age and size, for people: `{model, events, state_time, age_s, written,
    written_age_s, bytes}`."""
    now = time.time() if now is None else now
    return {"model": record.model, "events": record.events, "state_time": record.time,
            "age_s": None if record.time == 0 else round(now - record.time, 1),
            "written": record.written, "written_age_s": round(now - record.written, 1),
            "bytes": len(record.to_bytes()),
            "tables": {a: len(t) for a, t in record.tables.items()}}
