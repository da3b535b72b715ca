"""The state store of stateful IFA: SQLite and a real redis-server, concurrent writers of one
user, acknowledged writes across a crash, keys per model, unknown users."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from ifa_tf.data import records
from ifa_tf.serving import state_store
from test_serving import free_port
from test_stateful import SCHEMA, events_of, request

CROSS = SCHEMA.cross_features
NOW = np.array([1_700_000_000], np.int64)


@pytest.fixture(scope="module")
def state_model(stateful_export):
    _, export_dir, _ = stateful_export
    return state_model_of(export_dir)


def state_model_of(export_dir):
    return state_store.StateModel(export_dir=export_dir)


class RedisServer:
    """A redis-server on a free port whose acknowledged writes survive a crash (AOF, fsync
    on every write), restartable on the same directory."""

    def __init__(self, directory):
        self.directory, self.port = directory, free_port()
        self.start()

    def start(self):
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
             "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def crash(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; "
                    "scripts/test.sh installs it where apt is available)")
    pytest.importorskip("redis", reason="the redis package (redis-py) is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.crash()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'states.db'}"
    return request.getfixturevalue("redis_server").url


def one_user_events(features, now):
    return {k: v[0] for k, v in events_of(features, now).items()}


def test_record_round_trip_and_cross_counts(state_model):
    features = request(1, 8, 20, seed=6)
    features["cand_author_id"][0, :3] = features["seq_author_id"][0, :3]
    record = state_model.update_state(
        state_store.UserState.empty(state_model.model, state_model.state_shape,
                                    ["author_id", "category_id"]),
        one_user_events(features, NOW))
    assert record.events == int(np.count_nonzero(features["seq_item_id"]))
    loaded = state_store.UserState.from_bytes(record.to_bytes())
    np.testing.assert_array_equal(loaded.state, record.state)
    assert (loaded.model, loaded.time, loaded.tables) == (record.model, record.time,
                                                          record.tables)
    # The stored tables give the pipeline's own cross features.
    one = {k: v[0] for k, v in features.items()}
    expected = records.cross_counts(one, SCHEMA)
    actual = loaded.cross_features(one, CROSS)
    for name in CROSS:
        np.testing.assert_array_equal(actual[name], expected[name])
    assert expected["cand_cross_author_count"][:3].min() > 0


def test_concurrent_updates_of_one_user_lose_no_event(state_model, store_url):
    features = request(1, 4, 24, seed=7)
    events = one_user_events(features, NOW)
    writers = 4
    chunks = np.array_split(np.random.default_rng(2).permutation(24), writers * 3)
    errors = []

    def write(index):
        try:
            with state_store.open_store(store_url) as store:
                for chunk in chunks[index::writers]:
                    state_store.apply_events(store, state_model, "user-7",
                                             {k: v[chunk] for k, v in events.items()}, CROSS)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    with state_store.open_store(store_url) as store:
        record = state_store.load_state(store, state_model, "user-7", CROSS)
    assert record.events == 24
    once = state_model.update_state(
        state_store.UserState.empty(state_model.model, state_model.state_shape,
                                    ["author_id", "category_id"]), events)
    np.testing.assert_allclose(record.state, once.state, rtol=1e-5, atol=1e-6)
    assert record.time == once.time and record.tables == once.tables


def test_keys_per_model_and_unknown_users(state_model, store_url):
    with state_store.open_store(store_url) as store:
        record = state_store.UserState.empty(state_model.model, state_model.state_shape)
        record.time = 123
        state_store.put_state(store, "user-8", record)
        assert store.get(state_model.model + 1, "user-8") == (None, 0)
        unknown = state_store.load_state(store, state_model, "never-seen", CROSS)
        assert unknown.events == 0 and not unknown.state.any() and unknown.time == 0
        assert state_store.load_state(store, state_model, "user-8").time == 123


WRITER = """
import sys
import numpy as np
from ifa_tf.serving import state_store
store = state_store.open_store(sys.argv[1])
for user in range(20):
    record = state_store.UserState.empty(7, (2, 3, 4))
    record.time = user
    state_store.put_state(store, str(user), record)
    print(user, flush=True)  # acknowledged
    if user == 9 and sys.argv[2] == "crash":
        import os, signal
        os.kill(int(sys.argv[3]) if len(sys.argv) > 3 else os.getpid(), signal.SIGKILL)
"""


def test_sqlite_acknowledged_writes_survive_a_crash(tmp_path):
    url = f"sqlite://{tmp_path / 'states.db'}"
    process = subprocess.run([sys.executable, "-c", WRITER, url, "crash"],
                             capture_output=True, text=True, env={**os.environ,
                                                                  "PYTHONPATH": os.getcwd()})
    assert process.returncode == -signal.SIGKILL
    acknowledged = [int(line) for line in process.stdout.split()]
    assert acknowledged == list(range(10))
    with state_store.open_store(url) as store:
        for user in acknowledged:
            record, revision = store.get(7, str(user))
            assert record.time == user and revision == 1


def test_redis_acknowledged_writes_survive_a_crash(redis_server):
    with state_store.open_store(redis_server.url) as store:
        for user in range(10):
            record = state_store.UserState.empty(7, (2, 3, 4))
            record.time = user
            state_store.put_state(store, f"crash-{user}", record)
    redis_server.crash()  # SIGKILL: no shutdown save
    redis_server.start()
    with state_store.open_store(redis_server.url) as store:
        for user in range(10):
            record, _ = store.get(7, f"crash-{user}")
            assert record is not None and record.time == user


def test_ifa_state_builds_applies_and_shows(stateful_export, state_model, tmp_path):
    import types

    import tensorflow as tf

    from ifa_tf.cli import state as state_cli

    model, export_dir, signatures = stateful_export
    features = request(2, 4, 10, seed=8)
    features["user_id"] = np.array([5, 6])
    with tf.io.TFRecordWriter(str(tmp_path / "train.tfrecord")) as writer:
        for row in range(2):
            one = {k: v[row] for k, v in features.items()}
            one.update({t: np.zeros(4, np.int64) for t in SCHEMA.tasks})
            writer.write(records.encode_example(one, SCHEMA))
    values = types.SimpleNamespace(model=export_dir, store=f"sqlite://{tmp_path / 's.db'}",
                                   records=str(tmp_path / "train.tfrecord"), events=None,
                                   log=None, dataset=None,
                                   now=int(NOW[0]), user="6", batch_size=64)
    quiet = dict(out=lambda _: None, model=state_model)
    assert state_cli.run_command("build", values, **quiet)["users"] == 2
    shown = state_cli.run_command("show", values, **quiet)
    assert shown["known"] and shown["events"] == np.count_nonzero(features["seq_item_id"][1])
    # The built state ranks as serving_default does on the sequence.
    with state_store.open_store(values.store) as store:
        record = state_store.load_state(store, state_model, 6, CROSS)
    inputs = {k: tf.constant(v[1:]) for k, v in features.items() if k in model.rank_features}
    ranked = signatures["rank_with_state"](
        **inputs, state=tf.constant(record.state[None]), now=tf.constant(NOW),
        state_time=tf.constant([record.time], tf.int64),
        state_model=tf.constant([record.model], tf.int64))
    expected = signatures["serving_default"](**{k: tf.constant(v[1:])
                                                for k, v in features.items()})
    np.testing.assert_allclose(ranked["score"].numpy(), expected["score"].numpy(), atol=1e-5)
    csv = tmp_path / "events.csv"
    csv.write_text("user_id,item_id,category_id,author_id,action,time\n"
                   f"6,11,2,3,1,{NOW[0] + 10}\n6,12,2,4,0,{NOW[0] + 20}\n7,13,1,1,1,{NOW[0]}\n")
    values.events = str(csv)
    assert state_cli.run_command("apply", values, **quiet)["events"] == 3
    shown_after = state_cli.run_command("show", values, **quiet)
    assert shown_after["events"] == shown["events"] + 2
    assert shown_after["state_time"] == NOW[0] + 20
    values.user = "404"
    assert state_cli.run_command("show", values, **quiet)["known"] is False
