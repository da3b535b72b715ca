"""`ifa-state build --runner --log`: states built by Apache Beam's workers (the SavedModel
loaded once per worker) equal the states `ifa-state build --log` builds in-process."""

import types

import numpy as np
import pytest
from absl import app

pytest.importorskip("apache_beam",
                    reason="Apache Beam is not installed (pip install 'ifa_tf[beam]')")

from ifa_tf.cli import state as state_cli  # noqa: E402
from ifa_tf.data import beam_pipeline  # noqa: E402
from ifa_tf.serving import beam_states, state_store  # noqa: E402
from test_state_from_log import converted, log_model  # noqa: E402,F401  (fixtures)
from test_state_store import redis_server  # noqa: E402,F401  (fixture)


def _states(store_url, model, users):
    with state_store.open_store(store_url) as store:
        return {user: store.get(model.model, user)[0] for user in users}


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_beam_builds_the_states_built_in_process(converted, log_model, tmp_path,  # noqa: F811
                                                 request, store):
    """SQLite, the local store; Redis, the store of a cluster's workers."""
    _, log, dataset = converted
    _, export_dir, state_model = log_model
    values = types.SimpleNamespace(model=export_dir, store=f"sqlite://{tmp_path / 'a.db'}",
                                   records=None, events=None, log=log, dataset=dataset,
                                   now=None, batch_size=2, runner=None, pipeline_options=None)
    expected = state_cli.run_command("build", values, out=lambda _: None, model=state_model)
    on_beam = (f"sqlite://{tmp_path / 'b.db'}" if store == "sqlite"
               else request.getfixturevalue("redis_server").url)
    got = beam_states.build_states_from_log(
        on_beam, export_dir, log, dataset, state_model.cross_features, batch_size=2,
        options=beam_pipeline.default_options(extra=["--direct_running_mode=in_memory",
                                                     "--direct_num_workers=1"]))
    assert got == {"users": expected["users"], "model": state_model.model}
    users = sorted(state_store.events_from_log(log, dataset))
    built, rebuilt = (_states(url, state_model, users) for url in (values.store, on_beam))
    for user in users:
        a, b = built[user], rebuilt[user]
        assert (b.model, b.time, b.events, b.tables) == (a.model, a.time, a.events, a.tables)
        np.testing.assert_allclose(b.state, a.state, rtol=1e-6, atol=1e-7)


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
