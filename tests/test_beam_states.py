"""`ifa-state build --runner --log`: states built by Apache Beam's workers (the SavedModel
loaded once per worker) equal the states `ifa-state build --log` builds in-process."""

import re
import time
import types

import numpy as np
import pytest
from absl import app

pytest.importorskip("apache_beam",
                    reason="Apache Beam is not installed (pip install 'ifa_tf[beam]')")

from ifa_tf.cli import state as state_cli  # noqa: E402
from ifa_tf.data import beam_pipeline, records  # noqa: E402
from ifa_tf.serving import beam_states, state_store  # noqa: E402
from test_state_from_log import converted, log_model, write_log  # noqa: E402,F401  (fixtures)
from test_state_store import redis_server  # noqa: E402,F401  (fixture)


def _states(store_url, model, users):
    with state_store.open_store(store_url) as store:
        return {user: store.get(model.model, user)[0] for user in users}


def _log_with_bad_times(converted, tmp_path):
    """The converted log with two rows of times no event can have: line 3 in milliseconds,
    line 6 a day after this machine's clock."""
    rows, _, _ = converted
    rows = list(rows)
    rows.insert(1, (*rows[1][:3], rows[1][3] * 1000, "pv"))
    rows.insert(4, (*rows[4][:3], int(time.time()) + 86_400, "pv"))
    return write_log(tmp_path / "bad_times.csv", rows)


def _values(export_dir, store, log, dataset, **overrides):
    return types.SimpleNamespace(**{
        "model": export_dir, "store": store, "records": None, "events": None, "log": log,
        "dataset": dataset, "now": None, "batch_size": 2, "runner": None,
        "pipeline_options": None, "skip_bad_rows": False, **overrides})


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_beam_builds_the_states_built_in_process(converted, log_model, tmp_path,  # noqa: F811
                                                 request, store):
    """SQLite, the local store; Redis, the store of a cluster's workers. The log holds rows
    of bad times, which both drivers skip with --skip_bad_rows."""
    _, _, dataset = converted
    _, export_dir, state_model = log_model
    log = _log_with_bad_times(converted, tmp_path)
    values = _values(export_dir, f"sqlite://{tmp_path / 'a.db'}", log, dataset,
                     skip_bad_rows=True)
    expected = state_cli.run_command("build", values, out=lambda _: None, model=state_model)
    on_beam = (f"sqlite://{tmp_path / 'b.db'}" if store == "sqlite"
               else request.getfixturevalue("redis_server").url)
    got = beam_states.build_states_from_log(
        on_beam, export_dir, log, dataset, state_model.cross_features, batch_size=2,
        options=_in_memory("--user_groups=2"), skip_bad_rows=True)  # 2 groups of users
    assert got == {"users": expected["users"], "model": state_model.model, "skipped_rows": 2}
    assert expected["skipped_rows"] == 2
    users = sorted(state_store.events_from_log(log, dataset, skip_bad_rows=True))
    built, rebuilt = (_states(url, state_model, users) for url in (values.store, on_beam))
    for user in users:
        a, b = built[user], rebuilt[user]
        assert (b.model, b.time, b.events, b.tables) == (a.model, a.time, a.events, a.tables)
        np.testing.assert_allclose(b.state, a.state, rtol=1e-6, atol=1e-7)
        # The log is recorded as applied on both: applying it again adds nothing.
        assert b.batches == a.batches == [state_store.batch_id(log)]


def test_bad_event_times_are_refused_alike_on_both_drivers(converted, log_model,  # noqa: F811
                                                          tmp_path):
    _, _, dataset = converted
    _, export_dir, state_model = log_model
    log = _log_with_bad_times(converted, tmp_path)
    values = _values(export_dir, f"sqlite://{tmp_path / 'a.db'}", log, dataset)
    with pytest.raises(records.DataFormatError) as in_process:
        state_cli.run_command("build", values, out=lambda _: None, model=state_model)
    with pytest.raises(records.DataFormatError) as on_beam:
        beam_states.build_states_from_log(f"sqlite://{tmp_path / 'b.db'}", export_dir, log,
                                          dataset, options=_in_memory())
    message = str(on_beam.value)
    assert message.startswith(f"{log}: 2 malformed rows: line 3: time ") and "\n" not in message
    assert "line 6: time " in message and "after this machine's clock" in message
    # The same rules; each driver's own clock, so the seconds past it may differ by one.
    assert re.sub(r"\d+ s after", "", message) == re.sub(r"\d+ s after", "",
                                                          str(in_process.value))


def _in_memory(*extra):
    return beam_pipeline.default_options(extra=["--direct_running_mode=in_memory",
                                                "--direct_num_workers=1", *extra])


def test_the_command_takes_runner_for_build_log_only(converted, log_model,  # noqa: F811
                                                     tmp_path, monkeypatch):
    _, log, dataset = converted
    _, export_dir, _ = log_model
    monkeypatch.setattr(state_cli.flags, "FLAGS", state_cli.flags.FLAGS)
    state_cli.flags.FLAGS(["ifa-state", f"--model={export_dir}", f"--store={tmp_path}/s.db",
                           "--records=x", "--runner=DirectRunner"])
    try:
        with pytest.raises(app.UsageError, match="--runner builds states from a raw log"):
            state_cli.check(["ifa-state", "build"])
    finally:
        state_cli.flags.FLAGS.unparse_flags()


def test_a_glob_of_log_files_is_a_log_and_a_batch(converted, log_model, tmp_path,  # noqa: F811
                                                  monkeypatch):
    rows, _, dataset = converted
    _, export_dir, _ = log_model
    (tmp_path / "logs").mkdir()
    first = write_log(tmp_path / "logs" / "a.csv", rows[:20])
    write_log(tmp_path / "logs" / "b.csv", rows[20:])
    pattern = str(tmp_path / "logs" / "*.csv")
    monkeypatch.setattr(state_cli.flags, "FLAGS", state_cli.flags.FLAGS)
    state_cli.flags.FLAGS(["ifa-state", f"--model={export_dir}", f"--store={tmp_path}/s.db",
                           f"--log={pattern}", f"--dataset={dataset}"])
    try:
        state_cli.check(["ifa-state", "build"])  # no "does not exist"
        state_cli.flags.FLAGS.log = str(tmp_path / "logs" / "*.tsv")
        with pytest.raises(FileNotFoundError, match=r"\.tsv does not exist, and no file "
                                                    "matches it"):
            state_cli.check(["ifa-state", "build"])
    finally:
        state_cli.flags.FLAGS.unparse_flags()
    # The glob's batch: both files, by name and content; a glob of one file is that file.
    assert state_store.batch_id(pattern) == state_store.batch_id(pattern)
    assert state_store.batch_id(pattern) != state_store.batch_id(first)
    assert state_store.batch_id(str(tmp_path / "logs" / "a*")) == state_store.batch_id(first)
    before = state_store.batch_id(pattern)
    with open(tmp_path / "logs" / "b.csv", "a") as f:
        f.write(f"bob,B001,Drama,{rows[-1][3] + 1},pv\n")
    assert state_store.batch_id(pattern) != before  # events appended: another batch
    # One log read from two files is the log read from one.
    assert {u: {k: v.tolist() for k, v in e.items()} for u, e in
            state_store.events_from_log(pattern, dataset).items()} == {
        u: {k: v.tolist() for k, v in e.items()}
        for u, e in state_store.events_from_log(write_log(tmp_path / "all.csv", rows + [
            ("bob", "B001", "Drama", rows[-1][3] + 1, "pv")]), dataset).items()}
