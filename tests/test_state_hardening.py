"""`ifa-state` and the state store against bad input (issue 34): times outside the range or
in the future refused or skipped with line numbers, a re-run of `apply` after a crash that
counts no event twice, stores that cannot be used answered in one line before the model
loads, retries with jittered exponential backoff, user ids in other digits."""

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from ifa_tf.data import records
from ifa_tf.schema import MAX_TIME
from ifa_tf.serving import state_store
from test_state_from_log import converted  # noqa: F401 (a fixture)
from test_state_store import CROSS, NOW, state_model  # noqa: F401 (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "user_id,item_id,category_id,author_id,action,time\n"
T = int(NOW[0])


def cli_values(export_dir, store, **overrides):
    values = dict(model=export_dir, store=store, records=None, events=None, log=None,
                  dataset=None, now=None, user=None, batch_size=64, skip_bad_rows=False)
    values.update(overrides)
    return types.SimpleNamespace(**values)


def run_state(command, values, model):
    from ifa_tf.cli import state as state_cli

    return state_cli.run_command(command, values, out=lambda _: None, model=model)


def write_events(path, rows):
    path.write_text(HEADER + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return str(path)


BAD_ROWS = {  # line: (row, what the error names)
    3: ((1, 12, 2, 3, 1, T * 1000), "milliseconds"),
    4: ((1, 13, 2, 3, 1, 2**62), "outside [0, 4294967295]"),
    5: ((1, 14, 2, 3, 1, -2**63), "outside [0, 4294967295]"),
    6: ((2, 15, 2, 3, 1, int(time.time()) + 86_400), "after this machine's clock"),
    7: (("١٢٣", 16, 2, 3, 1, T), "user_id '١٢٣' is not an integer"),
    8: ((2, "²", 2, 3, 1, T), "item_id '²' is not an integer"),
    9: ((2, 17, 2, 3, 1, 2**63), "does not fit int64"),
}


def test_events_with_times_no_event_can_have_are_refused_naming_their_lines(
        stateful_export, state_model, tmp_path):  # noqa: F811 (a fixture)
    _, export_dir, _ = stateful_export
    rows = [(1, 11, 2, 3, 1, T)] + [row for row, _ in BAD_ROWS.values()] + [(2, 18, 1, 1, 0, T)]
    csv = write_events(tmp_path / "events.csv", rows)
    values = cli_values(export_dir, f"sqlite://{tmp_path / 's.db'}", events=csv)
    with pytest.raises(records.DataFormatError) as error:
        run_state("apply", values, state_model)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{csv}: 7 malformed rows: line 3: ")
    for line, (_, named) in BAD_ROWS.items():
        assert f"line {line}: " in message and named in message, (line, message)
    with state_store.open_store(values.store) as store:  # nothing was applied
        assert store.get(state_model.model, 1) == (None, 0)


def test_bad_events_are_skipped_and_logged_with_skip_bad_rows(
        stateful_export, state_model, tmp_path, caplog):  # noqa: F811 (a fixture)
    _, export_dir, _ = stateful_export
    rows = [(1, 11, 2, 3, 1, T)] + [row for row, _ in BAD_ROWS.values()] + [(2, 18, 1, 1, 0, T)]
    csv = write_events(tmp_path / "events.csv", rows)
    values = cli_values(export_dir, f"sqlite://{tmp_path / 's.db'}", events=csv,
                        skip_bad_rows=True)
    with caplog.at_level(logging.WARNING):
        result = run_state("apply", values, state_model)
    assert (result["users"], result["events"], result["skipped_rows"]) == (2, 2, 7)
    for line in BAD_ROWS:
        assert f"skipped malformed line {line}: " in caplog.text
    with state_store.open_store(values.store) as store:
        record = state_store.load_state(store, state_model, 1, CROSS)
    # The user's state stays at the good event's time: one event in milliseconds used to
    # move it 1.7e12 s ahead, and every later event then weighed 0.
    assert (record.events, record.time) == (1, T)


def test_log_rows_with_bad_times_are_malformed_rows(converted, tmp_path, caplog):  # noqa: F811
    from test_state_from_log import write_log

    rows, _, dataset = converted
    log = write_log(tmp_path / "new.csv", [rows[0], (*rows[1][:3], T * 1000, "pv"),
                                           (*rows[2][:3], 2**62, "pv")])
    with pytest.raises(records.DataFormatError, match=rf"^{log}: 2 malformed rows: line 3: "
                                                      r"time 1700000000000 is outside"):
        state_store.events_from_log(log, dataset)
    skipped = []
    with caplog.at_level(logging.WARNING):
        [events] = state_store.events_from_log(log, dataset, skip_bad_rows=True,
                                               skipped=skipped).values()
    assert [line for line, _ in skipped] == [3, 4] and "skipped malformed line 4" in caplog.text
    np.testing.assert_array_equal(events["seq_event_time"], [rows[0][3]])


def test_a_state_time_beyond_the_clock_is_never_ranked_at_silently(
        state_model, tmp_path):  # noqa: F811 (a fixture)
    with state_store.open_store(tmp_path / "s.db") as store:
        record = state_store.UserState.empty(state_model.model, state_model.state_shape)
        record.time = int(time.time()) + 3 * 86_400  # written before times were checked
        state_store.put_state(store, "jumped", record)
        with pytest.raises(ValueError, match="'jumped'.s state is at time .* after this "
                                             "machine's clock"):
            state_store.rank_user(None, store, "jumped", {}, model=state_model)


def test_user_ids_are_ascii_digits_or_names(stateful_export, state_model,
                                           tmp_path):  # noqa: F811 (a fixture)
    from ifa_tf.cli import state as state_cli

    assert state_cli._user("123") == 123 and state_cli._user("-7") == -7
    # "١٢٣" (Arabic-Indic digits) used to be read as user 123, and "²" failed in int().
    assert state_cli._user("١٢٣") == "١٢٣" and state_cli._user("²") == "²"
    _, export_dir, _ = stateful_export
    values = cli_values(export_dir, f"sqlite://{tmp_path / 's.db'}",
                        events=write_events(tmp_path / "e.csv", [(123, 11, 2, 3, 1, T)]))
    run_state("apply", values, state_model)
    for text, known in (("123", True), ("١٢٣", False), ("²", False)):
        values.user = text
        assert run_state("show", values, state_model)["known"] is known, text


class OldExportClient:
    """A server of an export made before issue 34: `update_state` answers a time of -2^63
    with a state of infinities."""

    def signature_inputs(self, signature):
        return {"user_state": ["now", "seq_item_id"],
                "rank_with_state": ["cand_item_id", "now", "state"]}[signature]

    def predict(self, inputs, signature_name):
        batch = len(next(iter(inputs.values())))
        state = np.zeros((batch, 2, 3, 4), np.float32)
        if signature_name == "update_state":
            state[:] = np.inf
        return {"state": state, "state_time": np.zeros(batch, np.int64),
                "state_model": np.full(batch, 7, np.int64)}, 1


def test_a_non_finite_state_is_never_stored(tmp_path):
    model = state_store.StateModel(client=OldExportClient())
    events = {"seq_item_id": np.array([5]), "seq_event_time": np.array([-2**63])}
    with state_store.open_store(tmp_path / "s.db") as store:
        with pytest.raises(ValueError, match="update_state returned a state holding NaN or "
                                             "infinity for 1 of 1 users"):
            state_store.apply_events(store, model, "u", events)
        assert store.get(7, "u") == (None, 0)


# ----------------------------------------------------------------- re-running apply
def many_users_events(path, users, per_user=2):
    rng = np.random.default_rng(5)
    rows = [(user, int(rng.integers(1, 100)), int(rng.integers(1, 12)),
             int(rng.integers(1, 16)), int(rng.integers(0, 8)), T - int(rng.integers(0, 10**5)))
            for user in range(1, users + 1) for _ in range(per_user)]
    return write_events(path, rows)


class InterruptingStore(state_store.StateStore):
    """A store whose `compare_and_set` stops the run (as a crash would) after `writes`."""

    def __init__(self, store, writes):
        self.store, self.writes = store, writes

    def get(self, model, user):
        return self.store.get(model, user)

    def compare_and_set(self, model, user, record, revision):
        if self.writes == 0:
            raise KeyboardInterrupt
        self.writes -= 1
        return self.store.compare_and_set(model, user, record, revision)


def test_apply_interrupted_and_run_again_counts_no_event_twice(
        state_model, tmp_path):  # noqa: F811 (a fixture)
    csv = many_users_events(tmp_path / "events.csv", users=12, per_user=3)
    events = state_store.read_events(csv)
    batch = state_store.batch_id(csv)
    with state_store.open_store(tmp_path / "crashed.db") as store:
        with pytest.raises(KeyboardInterrupt):
            state_store.apply_batch(InterruptingStore(store, writes=5), state_model, events,
                                    batch, CROSS)
        again = state_store.apply_batch(store, state_model, events, batch, CROSS)
        assert again == {"users": 7, "events": 21, "skipped_users": 5, "skipped_events": 15}
        # A third run finds every user done.
        assert state_store.apply_batch(store, state_model, events, batch, CROSS)[
            "skipped_users"] == 12
        crashed = {u: state_store.load_state(store, state_model, u, CROSS) for u in events}
    with state_store.open_store(tmp_path / "once.db") as store:
        state_store.apply_batch(store, state_model, events, batch, CROSS)
        once = {u: state_store.load_state(store, state_model, u, CROSS) for u in events}
    for user in events:
        assert crashed[user].events == once[user].events == 3
        assert crashed[user].tables == once[user].tables  # cross counts not doubled
        np.testing.assert_array_equal(crashed[user].state, once[user].state)
        assert crashed[user].batches == [batch]


def test_a_batch_is_remembered_among_the_last_ones_applied(state_model, tmp_path):  # noqa: F811
    first = state_store.read_events(many_users_events(tmp_path / "a.csv", users=1))
    with state_store.open_store(tmp_path / "s.db") as store:
        for index in range(state_store.BATCHES_KEPT + 1):
            state_store.apply_batch(store, state_model, first, f"batch-{index}", CROSS)
        record = state_store.load_state(store, state_model, 1, CROSS)
    assert record.batches == [f"batch-{i}" for i in range(1, state_store.BATCHES_KEPT + 1)]
    assert record.events == 2 * (state_store.BATCHES_KEPT + 1)
    assert state_store.UserState.from_bytes(record.to_bytes()).batches == record.batches


def test_applying_the_file_a_state_was_built_from_adds_nothing(
        stateful_export, state_model, tmp_path):  # noqa: F811 (a fixture)
    _, export_dir, _ = stateful_export
    csv = many_users_events(tmp_path / "events.csv", users=3)
    values = cli_values(export_dir, f"sqlite://{tmp_path / 's.db'}", events=csv, user="2")
    assert run_state("build", values, state_model)["users"] == 3
    applied = run_state("apply", values, state_model)
    assert (applied["users"], applied["skipped_users"]) == (0, 3)
    assert run_state("show", values, state_model)["events"] == 2


def stored_users(path):
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            return connection.execute("SELECT COUNT(*) FROM states").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def test_ifa_state_apply_killed_and_run_again_counts_no_event_twice(
        stateful_export, state_model, tmp_path):  # noqa: F811 (a fixture)
    """The probe's case: kill -9 in the middle of `ifa-state apply`, then the same command
    again (348 of 3,000 users used to get their events twice)."""
    _, export_dir, _ = stateful_export
    users = 400
    csv = many_users_events(tmp_path / "events.csv", users=users)
    store_path = tmp_path / "states.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "ifa_tf_console", "ifa-state", "apply", f"--model={export_dir}",
         f"--store=sqlite://{store_path}", f"--events={csv}"], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while stored_users(store_path) < 10 and process.poll() is None:
        assert time.monotonic() < deadline, "ifa-state apply wrote nothing in 300 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written_before_the_kill = stored_users(store_path)
    assert 10 <= written_before_the_kill < users, (written_before_the_kill,
                                                   process.stderr.read())
    values = cli_values(export_dir, f"sqlite://{store_path}", events=csv)
    result = run_state("apply", values, state_model)
    assert result["skipped_users"] == written_before_the_kill
    assert result["users"] == users - written_before_the_kill
    with state_store.open_store(store_path) as store:
        counts = [state_store.load_state(store, state_model, u, CROSS).events
                  for u in range(1, users + 1)]
    assert counts == [2] * users


# ------------------------------------------------------------- stores that cannot be used
def bad_stores(tmp_path):
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("not a database, but long enough to be read as one " * 20)
    directory = tmp_path / "a_directory"
    directory.mkdir()
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE states (name TEXT)")
    return [(str(not_sqlite), "file is not a database"),
            (str(directory), "is a directory"),
            (str(tmp_path / "missing" / "states.db"), "does not exist"),
            (str(other), "columns ['name']")]


def test_a_store_that_cannot_be_used_is_one_line_naming_it(tmp_path):
    for path, reason in bad_stores(tmp_path):
        with pytest.raises(state_store.StoreError) as error:
            state_store.open_store(f"sqlite://{path}")
        assert path in str(error.value) and reason in str(error.value)
        assert "\n" not in str(error.value)
    with pytest.raises(state_store.StoreError, match="State store redis://127.0.0.1:1/0: "):
        state_store.open_store("redis://127.0.0.1:1/0")  # nothing listens there


def test_ifa_state_checks_the_store_before_tensorflow_loads(stateful_export, tmp_path):
    """A store that is not SQLite, a directory or in a missing directory used to print a
    30-35-line sqlite3 traceback after the ~9 s model load."""
    _, export_dir, _ = stateful_export
    script = """
import sys, time
import ifa_tf_console
try:
    ifa_tf_console.run_command("ifa-state", ["ifa-state", *sys.argv[1:]])
except SystemExit as exit_info:
    code = exit_info.code
from ifa_tf import _deferred
print(code, _deferred.is_loaded("tensorflow") or "keras" in sys.modules)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    for path, reason in bad_stores(tmp_path):
        process = subprocess.run(
            [sys.executable, "-c", script, "show", f"--model={export_dir}",
             f"--store=sqlite://{path}", "--user=1"], cwd=REPO, env=env,
            capture_output=True, text=True, timeout=120)
        assert process.stdout.split() == ["1", "False"], process.stderr
        assert process.stderr.count("\n") == 1, process.stderr
        assert process.stderr.startswith(f"ifa-state: State store {path}") and reason in (
            process.stderr), process.stderr


def test_a_record_that_is_not_a_state_is_one_line_naming_the_store(tmp_path):
    path = tmp_path / "s.db"
    with state_store.open_store(path) as store:
        store._connection().execute("INSERT INTO states VALUES (7, 'u', 1, ?)",
                                    (b'{"format": "ifa_tf.state/1"}',))
        with pytest.raises(state_store.StoreError,
                           match=f"State store {path}: the record of user 'u' \\(model 7\\) is "
                                 "not a state record \\(KeyError"):
            store.get(7, "u")


def test_an_events_file_that_is_not_utf8_costs_its_rows_not_a_traceback(tmp_path):
    csv = tmp_path / "events.csv"
    csv.write_bytes(HEADER.encode() + b"1,11,2,3,1,1700000000\n2,1\xff,2,3,1,1700000000\n")
    with pytest.raises(records.DataFormatError, match=f"^{csv}: 1 malformed rows: line 3: "
                                                      "item_id '1\\\\udcff' is not an integer"):
        state_store.read_events(str(csv))
    assert list(state_store.read_events(str(csv), skip_bad_rows=True)) == [1]


# ------------------------------------------------------------------------- backoff
class ContendedStore(state_store.StateStore):
    """A store whose first `conflicts` writes find that someone else wrote first."""

    def __init__(self, conflicts):
        self.conflicts, self.records = conflicts, {}

    def get(self, model, user):
        return self.records.get(user, (None, 0))

    def compare_and_set(self, model, user, record, revision):
        if self.conflicts:
            self.conflicts -= 1
            return False
        self.records[user] = (record, revision + 1)
        return True


def test_contended_writes_retry_with_jittered_exponential_backoff(
        state_model, monkeypatch):  # noqa: F811 (a fixture)
    waits = []
    monkeypatch.setattr(state_store.time, "sleep", waits.append)
    monkeypatch.setattr(state_store, "_jitter", __import__("random").Random(0))
    events = {"seq_item_id": np.array([5]), "seq_category_id": np.array([1]),
              "seq_author_id": np.array([2]), "seq_action": np.array([1]),
              "seq_event_time": np.array([T])}
    state_store.apply_events(ContendedStore(conflicts=12), state_model, 1, events)
    assert len(waits) == 12
    bounds = [min(state_store.RETRY_CAP_S, state_store.RETRY_BASE_S * 2**i) for i in range(12)]
    assert all(0 <= wait <= bound for wait, bound in zip(waits, bounds))
    assert len(set(waits)) == 12  # jittered: no two writers wait in lockstep
    assert max(waits[8:]) > 4 * max(waits[:3])  # and the waits grow
    with pytest.raises(state_store.StoreContentionError, match="User 1's state changed under "
                                                               "each of 5 tries"):
        state_store.apply_events(ContendedStore(conflicts=10), state_model, 1, events,
                                 max_attempts=5)
    record = state_store.UserState.empty(7, (2, 3, 4))
    waits.clear()
    state_store.put_state(ContendedStore(conflicts=3), "u", record)
    assert len(waits) == 3


def test_times_are_checked_against_the_documented_range():
    assert state_store.event_time_problem(0) is None
    assert state_store.event_time_problem(MAX_TIME, wall_clock=MAX_TIME) is None
    assert "outside" in state_store.event_time_problem(MAX_TIME + 1, wall_clock=MAX_TIME)
    assert "after this machine's clock" in state_store.event_time_problem(
        1000 + state_store.MAX_CLOCK_SKEW_S + 1, wall_clock=1000)
