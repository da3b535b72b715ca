"""serving/README.md's stateful example runs as written, on the MovieLens-1M look-alike of
test_readme (its commands done by the functions they are thin over, a tiny untrained decay
IFA, an ifa-serve on localhost:8500), and `rank_user` with raw ids: the log's user id finds
the state `ifa-state build --log` stored, raw candidates rank as their int64 features do,
a user without a state is warned about or refused, and a stale state warns."""

import os
import re
import warnings

import keras
import numpy as np
import pytest

import ifa_tf
from ifa_tf import export
from ifa_tf.data import log_converter
from ifa_tf.serving import GrpcClient, RequestBuilder, state_store
from ifa_tf.serving.query import wait_until_available
from ifa_tf.serving.server import ModelServer, ServerOptions
from test_readme import free, write_movielens_look_alike

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANDIDATES = ["Heat (1995)", "Jumanji (1995)", "Babe (1995)", "Casino (1995)"]


def stateful_snippet():
    with open(os.path.join(REPO, "serving", "README.md"), encoding="utf-8") as f:
        snippets = re.findall(r"^```python\n(.*?)^```", f.read(), re.MULTILINE | re.DOTALL)
    (snippet,) = [s for s in snippets if "state_store.rank_user" in s]
    return snippet


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The files of the example's commands, in a working directory of their own."""
    root = tmp_path_factory.mktemp("serving_readme")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        write_movielens_look_alike("ml-1m")
        log_converter.convert_preset("movielens_1m", "ml-1m", "data/ml-1m")
        keras.utils.set_random_seed(0)
        model = ifa_tf.zoo.build("ifa", schema="data/ml-1m", time_encoding="decay")
        version = export.export_saved_model(model, "models/ifa-decay",
                                            vocabularies="data/ml-1m", warmup_shapes=())
        # = ifa-state build --model=models/ifa-decay/1 --store=states.db --log=ml-1m
        #       --dataset=data/ml-1m
        local = state_store.StateModel(export_dir=version)
        with state_store.open_store("states.db") as store:
            state_store.build_states(store, local,
                                     state_store.events_from_log("ml-1m", "data/ml-1m"),
                                     local.cross_features)
        yield root, version
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def server(workdir):
    if not free(8500):
        pytest.skip("port 8500 is taken: the example names it")
    root, _ = workdir
    server = ModelServer(ServerOptions(port=8500, model_name="ifa",
                                       model_base_path=str(root / "models/ifa-decay"),
                                       file_system_poll_wait_seconds=0)).start()
    with GrpcClient("localhost:8500", "ifa") as client:
        wait_until_available(client, 60)
    yield server
    server.stop()


def test_the_stateful_example_runs_as_written(workdir, server, monkeypatch, capsys):
    root, _ = workdir
    monkeypatch.chdir(root)
    snippet = stateful_snippet()
    assert eval(re.search(r"candidates = (\[.*\])", snippet).group(1)) == CANDIDATES
    session = {"__name__": "__serving_readme__"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", state_store.StateWarning)  # none may warn
        exec(compile(snippet, "serving/README.md stateful snippet", "exec"), session)
    ranking, record = session["ranking"], session["record"]
    assert sorted(ranking.raw_item_ids) == sorted(CANDIDATES)
    history = [row for row in log_rows(root) if row[0] == "1m_1"]
    assert record.events == len({(row[1], row[3]) for row in history}) > 0
    assert not set(CANDIDATES) & {row[1] for row in history}  # unrated candidates
    printed = capsys.readouterr().out
    assert printed.strip() == f"{ranking.raw_item_ids} {record.events}"


def log_rows(root):
    with open(root / "ml-1m" / "ml-1m.inter", newline="") as f:
        return [line.rstrip("\r\n").split("\t") for line in f][1:]


def test_raw_ids_rank_as_their_int64_features(workdir, server):
    root, _ = workdir
    builder = RequestBuilder(root / "data/ml-1m")
    with GrpcClient("localhost:8500", "ifa") as client, \
            state_store.open_store(root / "states.db") as store:
        by_raw, record = state_store.rank_user(client, store, "1m_2", CANDIDATES,
                                               dataset=builder, now="2001-02-01")
        features = builder.build([], CANDIDATES, user="1m_2")
        by_id, same = state_store.rank_user(
            client, store, builder.encode_user("1m_2"),
            {k: features[k][0] for k in ("user_id", "cand_item_id", "cand_category_id")},
            now=log_converter.parse_timestamp("2001-02-01"))
    assert record.events == same.events > 0
    np.testing.assert_array_equal(by_raw.item_ids, by_id.item_ids)
    np.testing.assert_allclose(by_raw.scores["score"], by_id.scores["score"], rtol=1e-6)
    items = log_converter.read_vocabulary(str(root / "data/ml-1m"), "item")
    assert by_raw.raw_item_ids == [items[int(i)] for i in by_raw.item_ids]


def test_a_user_without_a_state_is_warned_about_or_refused(workdir, server):
    root, _ = workdir
    key = RequestBuilder(root / "data/ml-1m").encode_user("1m_99")
    with GrpcClient("localhost:8500", "ifa") as client, \
            state_store.open_store(root / "states.db") as store:
        rank = {"client": client, "store": store, "user": "1m_99", "features": CANDIDATES,
                "dataset": root / "data/ml-1m", "now": "2001-02-01"}
        with pytest.warns(state_store.StateWarning,
                          match=f"No stored state of user '1m_99' \\(key {key}\\)"):
            ranking, record = state_store.rank_user(**rank)
        assert record.events == 0 and sorted(ranking.raw_item_ids) == sorted(CANDIDATES)
        with pytest.raises(state_store.MissingStateError, match="ifa-state build"):
            state_store.rank_user(**rank, missing="refuse")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            state_store.rank_user(**rank, missing="new")
        # Without `now`, a 2001 state is ranked decades later: said, not done silently.
        with pytest.warns(state_store.StateWarning, match="days older than the wall clock"):
            state_store.rank_user(**dict(rank, user="1m_1", now=None))
