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
writes only if no one wrote in between, else retries after a jittered exponential backoff
(`apply_events`): concurrent updates of one user lose no event, on one machine or many. A
write is acknowledged once durable:

- `SQLiteStateStore` (embedded, no server): WAL journal, `synchronous=FULL`.
- `RedisStateStore` (several machines): one Lua script per write, so the check and the
  write are atomic on the server. Durability is Redis's: run it with `appendonly yes` and
  `appendfsync always` for acknowledged writes to survive a crash (serving/README.md).

`open_store("sqlite:///path/states.db")` or `open_store("redis://host:6379/0")` opens and
checks a store; what goes wrong with it (not a state store, a missing directory, a read-only
or full disk, Redis down) raises `StoreError`, one line naming the store.

Re-running a batch of events is safe (`apply_batch`): every record keeps the ids of the last
`BATCHES_KEPT` batches applied to it, written in the same atomic write as the events, so a
batch applied again (a command re-run after a crash) skips the users it already reached and
counts no event twice.

Times are int64 seconds in [0, `schema.MAX_TIME`] (1970 to 2106), and an event is no more
than `MAX_CLOCK_SKEW_S` after this machine's clock: the readers of events (`read_events`,
`events_from_log`, `events_from_records`) refuse others, or skip them (`skip_bad_rows`)
with a warning naming each line, as `ifa-data` does a malformed row. One event in
milliseconds would move its user's state so far ahead that the history decays to nothing.
"""

import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Mapping

import numpy as np

from ifa_tf import schema as schema_lib
from ifa_tf.serving.closeable import Closeable

STATE, STATE_TIME, STATE_MODEL, NOW = "state", "state_time", "state_model", "now"
EVENT_TIME = "seq_event_time"
_FORMAT = "ifa_tf.state/1"
# How far after this machine's clock an event or a state's time may lie: clocks of the
# machines that log events, write states and rank disagree by a little, never by more.
MAX_CLOCK_SKEW_S = 300
# The ids of the last batches applied to a user, kept in the user's record.
BATCHES_KEPT = 32
# Retries of a contended write wait a random time in [0, min(cap, base * 2^attempt)]
# ("full jitter"): writers of one user that collided do not collide again in lockstep.
RETRY_BASE_S = 0.002
RETRY_CAP_S = 0.2
_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: int() also reads "١٢٣" as 123
_STORE_COLUMNS = ["model", "user", "revision", "value"]
_logger = logging.getLogger(__name__)
_jitter = random.Random()


class StoreError(OSError):
    """The state store cannot be used (its message names the store and why)."""


class StoreContentionError(StoreError):
    """A user's record changed under every one of a write's tries."""


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
        batches: ids of the last `BATCHES_KEPT` batches of events applied (`apply_batch`),
            oldest first.
    """

    model: int
    state: np.ndarray
    time: int = 0
    events: int = 0
    tables: dict = dataclasses.field(default_factory=dict)
    written: float = 0.0
    batches: list = dataclasses.field(default_factory=list)

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
            "batches": list(self.batches),
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
                   tables, float(record["written"]), list(record.get("batches", [])))

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
        if os.path.isdir(self.path):
            raise StoreError(f"State store {self.path} is a directory, not an SQLite file.")
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise StoreError(f"State store {self.path}: its directory {directory} does not "
                             "exist.")
        with self._errors():
            connection = self._connection()
            connection.execute(
                "CREATE TABLE IF NOT EXISTS states (model INTEGER NOT NULL, user TEXT NOT "
                "NULL, revision INTEGER NOT NULL, value BLOB NOT NULL, PRIMARY KEY (model, "
                "user))")
            columns = [row[1] for row in connection.execute("PRAGMA table_info(states)")]
        if columns != _STORE_COLUMNS:
            self.close()
            raise StoreError(f"State store {self.path} is an SQLite file of something else: "
                             f"its table `states` has the columns {columns}, not "
                             f"{_STORE_COLUMNS}.")

    @contextlib.contextmanager
    def _errors(self):
        """SQLite's errors as `StoreError`s naming the file (a file that is not SQLite, a
        read-only or full disk, a directory that cannot be written)."""
        try:
            yield
        except sqlite3.Error as error:
            raise StoreError(f"State store {self.path}: {error}.") from error

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
        with self._errors():
            row = self._connection().execute(
                "SELECT revision, value FROM states WHERE model = ? AND user = ?",
                (int(model), str(user))).fetchone()
        if row is None:
            return None, 0
        return _decode(self.path, model, user, row[1]), row[0]

    def compare_and_set(self, model, user, record, revision):
        with self._errors():
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

        self.url = url
        self.prefix = prefix
        with self._errors():
            self.client = redis.Redis.from_url(url)
            self.client.ping()
        self._compare_and_set = self.client.register_script(_COMPARE_AND_SET)

    @contextlib.contextmanager
    def _errors(self):
        """redis-py's errors (server down, refused, wrong URL) as `StoreError`s naming the
        store."""
        import redis

        try:
            yield
        except (redis.RedisError, ValueError) as error:
            raise StoreError(f"State store {self.url}: {error}".rstrip(".") + ".") from error

    def _key(self, model, user):
        return f"{self.prefix}:{int(model)}:{user}"

    def get(self, model, user):
        with self._errors():
            revision, value = self.client.hmget(self._key(model, user), "revision", "value")
        if value is None:
            return None, 0
        return _decode(self.url, model, user, value), int(revision)

    def compare_and_set(self, model, user, record, revision):
        with self._errors():
            return bool(self._compare_and_set(keys=[self._key(model, user)],
                                              args=[revision, record.to_bytes()]))

    def close(self):
        self.client.close()


def _decode(store, model, user, data):
    """`UserState.from_bytes(data)`, or a `StoreError` naming the store and the record."""
    try:
        return UserState.from_bytes(data)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise StoreError(f"State store {store}: the record of user {user!r} (model {model}) is "
                         f"not a state record ({type(error).__name__}: {error}).") from error


def open_store(url):
    """`sqlite:///path/to/states.db` (or a plain path) or `redis://host:port/db`, opened and
    checked (`StoreError` naming the store if it cannot be used)."""
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
        self.rank_inputs = self.signature_inputs("rank_with_state")
        self.cross_features = [n for n in self.rank_inputs
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
        # Exports before issue 34 returned a state of infinities for a time of -2^63: such a
        # state must never reach a store.
        finite = np.isfinite(outputs[STATE]).reshape(len(records), -1).all(axis=1)
        if not finite.all():
            raise ValueError(f"update_state returned a state holding NaN or infinity for "
                             f"{int((~finite).sum())} of {len(records)} users (the first: "
                             f"events at times {events[int(np.argmin(finite))][EVENT_TIME][:5]}"
                             "); nothing was stored. Re-export the model with this ifa_tf, "
                             "which refuses such times.")
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
                                     record.events + int(valid.sum()), tables,
                                     batches=list(record.batches)))
        return updated


def load_state(store, model, user, cross_features=()):
    """The stored `UserState` of `user` for `model` (a `StateModel`); an unknown user gets
    the empty state, not an error."""
    record, _ = store.get(model.model, user)
    if record is None:
        return UserState.empty(model.model, model.state_shape,
                               [cross_attribute(n) for n in cross_features])
    return record


def apply_events(store, model, user, events, cross_features=(), max_attempts=100,
                 batch=None):
    """Adds `events` (1-D arrays) to `user`'s state in `store`, atomically: read, update,
    write if no one wrote in between, else again after a jittered exponential backoff
    (`retry_delay`). Returns the `UserState` stored.

    `batch`: the id of the batch the events belong to (`batch_id`), recorded with them; a
    user whose record already lists it is left as it is (the batch reached them before).

    Raises:
        StoreContentionError: still contended after `max_attempts` tries.
    """
    return _apply(store, model, user, events, cross_features, max_attempts, batch)[0]


def _apply(store, model, user, events, cross_features, max_attempts, batch):
    """`apply_events`; returns `(record stored, whether the events were added now)`."""
    for attempt in range(max_attempts):
        if attempt:
            time.sleep(retry_delay(attempt - 1))
        record, revision = store.get(model.model, user)
        if record is None:
            record = UserState.empty(model.model, model.state_shape,
                                     [cross_attribute(n) for n in cross_features])
        if batch is not None and batch in record.batches:
            return record, False
        updated = model.update_state(record, events)
        if batch is not None:
            updated.batches = (updated.batches + [batch])[-BATCHES_KEPT:]
        updated.written = time.time()
        if store.compare_and_set(model.model, user, updated, revision):
            return updated, True
    raise StoreContentionError(f"User {user}'s state changed under each of {max_attempts} "
                               "tries to update it: too many writers for one user.")


def apply_batch(store, model, events_by_user, batch, cross_features=(), progress=None):
    """Adds each user's events (`{user: events}`) to their stored state, recording `batch`
    (`batch_id`) in every record it writes. Safe to re-run: after a crash, applying the same
    batch again skips the users it had reached (their records list it) and counts no event
    twice; a record keeps the last `BATCHES_KEPT` batches.

    Returns `{"users", "events", "skipped_users", "skipped_events"}`: users and events added
    now, and those skipped because the batch had reached them before.
    """
    counts = {"users": 0, "events": 0, "skipped_users": 0, "skipped_events": 0}
    users = sorted(events_by_user, key=str)
    for index, user in enumerate(users):
        events = events_by_user[user]
        _, applied = _apply(store, model, user, events, cross_features, 100, batch)
        added = int(np.count_nonzero(np.asarray(events["seq_item_id"])))
        prefix = "" if applied else "skipped_"
        counts[prefix + "users"] += 1
        counts[prefix + "events"] += added
        if progress is not None:
            progress(index + 1, len(users))
    return counts


def batch_id(path, files=None, open_binary=None):
    """The id of a batch of events: the SHA-256 (first 128 bits, hex) of its file's bytes,
    or of every file under a directory or matched by a glob (names, relative to the files'
    common directory, and bytes). The same file gives the same id on every run; another
    file, even one with events appended, is another batch. `files` and `open_binary(path)`
    (a binary stream): the files found and a reader of their bytes elsewhere than on this
    machine (Beam's file systems for a cluster's log)."""
    digest = hashlib.sha256()
    path = os.fspath(path)
    root = path
    if files is None and os.path.isdir(path):
        files = sorted(os.path.join(directory, name)
                       for directory, _, names in os.walk(path) for name in names)
    elif files is None:
        from ifa_tf.data import log_converter

        files = log_converter.log_files(path)
    if not os.path.isdir(path) and len(files) > 1:
        root = os.path.commonpath(files)
    elif not os.path.isdir(path):
        root = files[0]
    for name in files:
        digest.update(os.path.relpath(name, root).encode("utf-8", "surrogateescape") + b"\0")
        with (open_binary or _open_bytes)(name) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def _open_bytes(path):
    return open(path, "rb")


def retry_delay(attempt, base=RETRY_BASE_S, cap=RETRY_CAP_S):
    """Seconds to wait before retry `attempt + 1` of a contended write: uniform in
    [0, min(cap, base * 2^attempt)] (exponential backoff with full jitter)."""
    return _jitter.uniform(0.0, min(cap, base * 2.0 ** min(attempt, 60)))


def put_state(store, user, record, max_attempts=100):
    """Stores `record` for `user`, replacing any (a rebuild)."""
    record.written = time.time()
    for attempt in range(max_attempts):
        if attempt:
            time.sleep(retry_delay(attempt - 1))
        _, revision = store.get(record.model, user)
        if store.compare_and_set(record.model, user, record, revision):
            return record
    raise StoreContentionError(f"User {user}'s state changed under each of {max_attempts} "
                               "tries to write it.")


class MissingStateError(LookupError):
    """`rank_user(..., missing="refuse")` of a user the store holds no state of."""


class StateWarning(UserWarning):
    """`rank_user` ranks from a state that may not be the one meant: none stored (a new
    user, or an id the store does not know), or one far older than the wall clock."""


def rank_user(client, store, user, features, now=None, model=None, cross_features=None,
              dataset=None, missing="warn", stale_after_s=365 * 86_400):
    """One call: `user`'s ranking of the candidates in `features` from the stored state.

        ranking, record = rank_user(client, store, "1m_1", ["Heat (1995)", "Babe (1995)"],
                                    dataset="data/ml-1m", now="2001-01-01")
        ranking.raw_item_ids          # the titles, best first

    Args:
        client: a `ServingClient` of the served decay model.
        store: a `StateStore`.
        user: with `dataset`, the log's own user id (`"1m_1"`, `42`), mapped to the store's
            key as `ifa-data from-log` maps it (`ifa-state build --log` keys states so);
            without, the store's key itself (the converter's int64 user id).
        features: the candidates. With `dataset`, their raw item ids (a list), whose
            features (item, category) the dataset gives as `RequestBuilder` does; or one
            user's user features (scalars) and candidate features (1-D int64 ids).
            Cross features (`cand_cross_*`) the model reads and `features` lacks are
            computed from the stored tables.
        now: the request's time, int seconds or an ISO 8601 date; default the wall clock,
            or the state's time when that is later by at most `MAX_CLOCK_SKEW_S` (clocks of
            the writer and the ranker may disagree by a little; a request never ranks before
            its state's time). A state further ahead is refused (ValueError): its time came
            from a wrong clock, and ranking at it would hide that. A state older than
            `stale_after_s` then warns (`StateWarning`): its events decay by all that time,
            which is not what ranking a past log (MovieLens) means.
        model: the client's `StateModel`, kept between calls to skip reading its id.
        cross_features: the cross features to compute; default the ones the served
            `rank_with_state` takes (`model.cross_features`) that `features` does not hold.
        dataset: the directory `ifa-data from-log` wrote (or a `RequestBuilder` of it):
            raw ids in, and the ranking's `raw_item_ids` out.
        missing: a user the store holds no state of: `"warn"` (ranked as a new user, with
            a `StateWarning` naming the user and the key looked up), `"refuse"`
            (`MissingStateError`), or `"new"` (ranked as a new user, silently: for a
            service where new users are expected).
        stale_after_s: the state age that warns when `now` is not given; None: never.

    Returns:
        `(Ranking, UserState)`. A new model version answers the old id with
        INVALID_ARGUMENT; the model's id is then read again and the call retried once.
    """
    import warnings

    from ifa_tf.serving import errors
    from ifa_tf.serving.client import rankings_from_outputs

    if missing not in ("warn", "refuse", "new"):
        raise ValueError(f"missing must be 'warn', 'refuse' or 'new'. Received: "
                         f"missing={missing!r}")
    model = model or StateModel(client=client)
    key, raw_of = user, None
    if dataset is not None:
        key, features, raw_of = _raw_request(dataset, user, features, model)
    if isinstance(now, str):
        from ifa_tf.data import log_converter

        now = log_converter.parse_timestamp(now.strip())
    if cross_features is None:
        cross_features = [n for n in model.cross_features if n not in features]
    for attempt in range(2):
        record, _ = store.get(model.model, key)
        if record is None:
            named = f"user {user!r}" + (f" (key {key})" if key != user else "")
            if missing == "refuse":
                raise MissingStateError(f"No stored state of {named} for model "
                                        f"{model.model}: build it with `ifa-state build`, "
                                        "or pass missing='new' to rank new users.")
            if missing == "warn":
                warnings.warn(f"No stored state of {named} for model {model.model}: "
                              "ranked as a new user, from no history (missing='new' "
                              "ranks new users silently, 'refuse' refuses them).",
                              StateWarning, stacklevel=2)
            record = UserState.empty(model.model, model.state_shape,
                                     [cross_attribute(n) for n in cross_features])
        when = _default_now(user, record) if now is None else int(now)
        if now is None and stale_after_s is not None and record.time and (
                when - record.time > stale_after_s):
            warnings.warn(f"User {user!r}'s state is {(when - record.time) / 86_400:,.0f} "
                          f"days older than the wall clock (state time {record.time}): its "
                          "events are decayed by all that time. Pass now= (e.g. the "
                          "time of a past log) to rank at another time.", StateWarning,
                          stacklevel=2)
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
        ranking = rankings_from_outputs(outputs, version)[0]
        if raw_of is not None:
            ranking.raw_item_ids = [raw_of[int(i)] for i in ranking.item_ids]
        return ranking, record


def _raw_request(dataset, user, candidates, model):
    """`(store key, features, {item id: raw id})` of a raw user id and raw candidates (or
    int64 candidate features, then no raw ids), mapped as the dataset's converter maps
    them (`RequestBuilder`)."""
    from ifa_tf.serving.request_builder import RequestBuilder

    builder = dataset if isinstance(dataset, RequestBuilder) else RequestBuilder(dataset)
    raw_user = str(user).strip()
    key = int(builder.encode_user(raw_user))
    if isinstance(candidates, Mapping):
        return key, dict(candidates), None
    if isinstance(candidates, str):
        raise ValueError("features: pass the raw candidate ids as a list, not one string. "
                         f"Received: {candidates!r}")
    raw = [str(c).strip() for c in candidates]
    built = builder.build([], raw, time=0, user=raw_user)
    features = {name: value[0] for name, value in built.items()
                if name in model.rank_inputs
                and not name.startswith(schema_lib.CROSS_PREFIX)}
    raw_of = dict(zip(built["cand_item_id"][0].tolist(), raw))
    return key, features, raw_of


def _default_now(user, record):
    """The wall clock, or the state's time when a clock that is off by a little put it
    later; never a time the state jumped to."""
    wall = int(time.time())
    if record.time > wall + MAX_CLOCK_SKEW_S:
        raise ValueError(
            f"User {user!r}'s state is at time {record.time}, {record.time - wall} s after "
            f"this machine's clock (more than the {MAX_CLOCK_SKEW_S} s clocks may disagree): "
            "an event of the future or in milliseconds moved it there. Rebuild the user's "
            "state (ifa-state build), or pass now= to rank at a time of your choice.")
    return max(wall, record.time)


# ------------------------------------------------------------------ building and events
EVENT_COLUMNS = ("user_id", "item_id", "category_id", "author_id", "action", "time")


def event_time_problem(value, wall_clock=None):
    """Why `value` (int seconds) cannot be an event's time, or None: outside [0, MAX_TIME]
    (milliseconds, far in the future, negative), or more than `MAX_CLOCK_SKEW_S` after
    `wall_clock` (default this machine's clock)."""
    if not 0 <= value <= schema_lib.MAX_TIME:
        return (f"time {value} is outside [0, {schema_lib.MAX_TIME}], the int64 seconds from "
                "1970 to 2106 that stateful serving takes (milliseconds? a time far in the "
                "future or before 1970?)")
    wall_clock = time.time() if wall_clock is None else wall_clock
    if value > wall_clock + MAX_CLOCK_SKEW_S:
        return (f"time {value} is {value - int(wall_clock)} s after this machine's clock, "
                f"more than the {MAX_CLOCK_SKEW_S} s clocks may disagree: an event cannot "
                "come from the future")
    return None


def _parse_int(row, column):
    """`row[column]` as an int64 written in ASCII digits (int() would also take "١٢٣",
    " 1_0" or "+5")."""
    text = row.get(column)
    if text is None:
        raise ValueError(f"no {column} (too few fields)")
    text = text.strip()
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"{column} {text[:40]!r} is not an integer")
    value = int(text)
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{column} {text[:40]!r} does not fit int64")
    return value


def read_events(path, schema=None, skip_bad_rows=False, skipped=None):
    """`{user: events}` from a CSV of int64 ids with the header `user_id,item_id,
    category_id,author_id,action,time` (time in seconds; columns of attributes the schema
    lacks may be left out). Ids are the ones the model was trained on (what `ifa-data`
    wrote).

    A malformed row (a field that is not an integer in ASCII digits, CSV that cannot be
    parsed) or an event whose time no event can have (`event_time_problem`) is an error
    naming the file and the rows' line numbers; with `skip_bad_rows` the rows are skipped,
    each logged with its line number, as `ifa-data from-log` does. `skipped`, when a list,
    receives `(line, reason)` of every row skipped."""
    import csv

    from ifa_tf.data import log_converter

    schema = schema or schema_lib.default_schema()
    names = [a for a in schema.item_attributes] + (
        ["action"] if "seq_action" in schema.sequence_context else [])
    columns, bad = {}, []
    wall_clock = time.time()
    # Bytes that are not UTF-8 are kept as surrogate escapes: they cost their row (not an
    # integer), not the file.
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        try:
            fieldnames = reader.fieldnames or []
        except csv.Error as error:
            raise ValueError(f"{path}: line 1: unparseable CSV header: {error}") from None
        missing = [c for c in ("user_id", *names, "time") if c not in fieldnames]
        if missing:
            raise ValueError(f"{path}: the header lacks columns {missing}; expected "
                             f"{','.join(EVENT_COLUMNS)}. Received: {fieldnames}")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                bad.append((reader.line_num, f"unparseable CSV: {error}"))
                continue
            try:
                user = _parse_int(row, "user_id")
                values = [_parse_int(row, n) for n in names] + [_parse_int(row, "time")]
            except ValueError as error:
                bad.append((reader.line_num, str(error)))
                continue
            problem = event_time_problem(values[-1], wall_clock)
            if problem:
                bad.append((reader.line_num, problem))
                continue
            columns.setdefault(user, []).append(values)
    log_converter.report_bad_rows(path, bad, skip_bad_rows)
    if skipped is not None:
        skipped.extend(bad)
    keys = [schema_lib.SEQUENCE_PREFIX + n for n in names] + [EVENT_TIME]
    return {user: {k: np.array(column, np.int64) for k, column in zip(keys, zip(*rows))}
            for user, rows in columns.items()}


def events_from_records(file_pattern, now, schema=None):
    """`{user: events}` from candidate-set TFRecords: each user's longest sequence (their
    latest request), its `seq_time_delta` counted back from `now` (the records hold no
    absolute time). `now` must be a time an event can have (`event_time_problem`), and
    no age may reach back before 1970 (ValueError naming the file and the user)."""
    import tensorflow as tf

    from ifa_tf.data import records

    files = records.expand_file_pattern(file_pattern)
    metadata = records.find_metadata(files)
    schema = schema or (records.schema_from_metadata(metadata) if metadata
                        else schema_lib.default_schema())
    names = [n for n in schema.sequence_features if n != "seq_time_delta"]
    problem = event_time_problem(int(now))
    if problem:
        raise ValueError(f"now={now}: {problem}.")
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
                valid = request["seq_item_id"] != 0
                if (events[EVENT_TIME][valid] < 0).any():
                    raise ValueError(
                        f"{path}: user {user}: a seq_time_delta of "
                        f"{int(request['seq_time_delta'][valid].max())} s reaches back before "
                        f"1970 from now={now}: pass the time the records were written at as "
                        "now (--now).")
                latest[user] = events
    return latest


def events_from_log(path, dataset, skip_bad_rows=False, skipped=None):
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
    (`ifa-data from-log --preset=... --input=<directory>`); a glob of files, or `.gz` files.

    Rows whose time no event can have (`event_time_problem`) are malformed rows too: an
    error listing their line numbers, or skipped and logged when the dataset's converter
    skipped malformed rows or `skip_bad_rows` is set (`log_source`: `ifa-state build
    --runner` reads the log by the same rules). `skipped`, when a list, receives `(line,
    reason)` of every row skipped."""
    from ifa_tf.data import log_converter, log_statistics, user_requests
    path, builder, parser = log_source(path, dataset, skip_bad_rows)
    log = log_converter.read_log(path, parser.config, parser=parser)
    if skipped is not None:
        skipped.extend(log.bad_rows)
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


def log_source(path, dataset, skip_bad_rows=False):
    """How a raw log in the format of `dataset` is read for users' states, in-process
    (`events_from_log`) and by Beam's workers (`beam_states`) alike: `(path, builder,
    parser)`, the log's file or glob (a preset's directory: its log file), the dataset's
    `RequestBuilder`, and the `log_converter.RowParser` of the converter's settings
    (`skip_bad_rows` added when set) that also refuses times no event can have
    (`event_time_problem`, against this machine's clock at this call: one clock for every
    worker)."""
    from ifa_tf.data import log_converter, records
    from ifa_tf.serving.request_builder import RequestBuilder

    builder = RequestBuilder(dataset)
    path = os.fspath(path)
    if os.path.isdir(path):
        preset = records.read_metadata(os.fspath(dataset)).get("preset")
        if preset not in log_converter.PRESETS:
            raise ValueError(f"{path} is a directory; pass the log file (only a preset's "
                             "dataset names the file in its directory).")
        path = log_converter.preset_log_file(preset, path, builder.config)
    config = builder.config
    if skip_bad_rows and not config.skip_bad_rows:
        config = dataclasses.replace(config, skip_bad_rows=True)
    check_time = functools.partial(event_time_problem, wall_clock=time.time())
    return path, builder, log_converter.RowParser(config, check_time=check_time)


def build_states(store, model, events_by_user, cross_features=(), batch_size=64,
                 progress=None, batch=None):
    """Writes every user's state made from their events alone (a rebuild, e.g. for a new
    model version: states are keyed by model, so the old ones stay for the old version);
    returns the number of users. `batch` (`batch_id` of the source), when given, is
    recorded as applied: `apply_batch` of the same events then adds nothing."""
    users = sorted(events_by_user)
    attributes = [cross_attribute(n) for n in cross_features]
    for start in range(0, len(users), batch_size):
        chunk = users[start:start + batch_size]
        empty = [UserState.empty(model.model, model.state_shape, attributes) for _ in chunk]
        for record in empty:
            record.batches = [batch] if batch is not None else []
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
