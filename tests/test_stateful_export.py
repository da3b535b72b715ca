"""Stateful IFA's signatures (user_state, update_state, rank_with_state): parity with
serving_default and Keras through the Python and C++ loaders and ifa-serve (gRPC and REST),
and the refusals of bad states."""

import os

import numpy as np
import pytest
import tensorflow as tf

from ifa_tf import export
from ifa_tf.serving import GrpcClient, RestClient, ServingError
from test_export import cpp_runner, run_cpp  # noqa: F401 (a fixture)
from test_serving import ServeProcess
from test_stateful import SCHEMA, events_of, request

NOW = np.array([1_700_000_000, 1_700_000_100, 1_700_050_000], np.int64)


@pytest.fixture(scope="module")
def exported(stateful_export):
    return stateful_export


def call(signature, inputs):
    return {k: v.numpy() for k, v in signature(**{k: tf.constant(v) for k, v in
                                                  inputs.items()}).items()}


def rank_inputs(model, features, state, now):
    inputs = {k: features[k] for k in model.rank_features}
    inputs.update({k: state[k] for k in (export.STATE, export.STATE_TIME,
                                         export.STATE_MODEL)})
    inputs[export.NOW] = now
    return inputs


def user_state_inputs(features, now):
    return {**{k: v for k, v in features.items() if k.startswith("seq_")}, export.NOW: now}


def assert_same_ranking(actual, expected):
    for name in (*SCHEMA.tasks, "score"):
        np.testing.assert_allclose(actual[name], expected[name], atol=1e-5, rtol=0,
                                   err_msg=name)
    np.testing.assert_array_equal(actual["ranked_item_ids"], expected["ranked_item_ids"])


def test_signatures_and_metadata(exported):
    model, export_dir, signatures = exported
    assert set(export.STATE_SIGNATURES) | {"serving_default", "serving_raw"} <= set(signatures)
    _, inputs = signatures["rank_with_state"].structured_input_signature
    # Nothing on the stateful path reads the raw sequence: it is not even an input.
    assert not [name for name in inputs if name.startswith("seq_")]
    assert set(inputs) == {*model.rank_features, "state", "state_time", "state_model", "now"}
    stateful = export.read_metadata(export_dir)["stateful"]
    assert stateful["state_model"] == export.state_model_id(model)
    assert stateful["state_shape"] == [2, 16, 17]


def test_rank_with_state_equals_serving_default(exported):
    model, _, signatures = exported
    features = request(3, 9, 20, seed=1)
    state = call(signatures["user_state"], user_state_inputs(features, NOW))
    assert state["state"].shape == (3, 2, 16, 17) and state["state"].nbytes == 3 * 2176
    np.testing.assert_array_equal(state["state_time"], NOW)
    later = 7200
    aged = dict(features, seq_time_delta=features["seq_time_delta"] + later)
    expected = call(signatures["serving_default"], aged)
    actual = call(signatures["rank_with_state"], rank_inputs(model, features, state,
                                                            NOW + later))
    assert_same_ranking(actual, expected)
    keras_scores = np.asarray(model(aged)["score"])
    np.testing.assert_allclose(actual["score"], keras_scores, atol=1e-5, rtol=0)


def test_update_state_chunks_equal_user_state(exported):
    model, _, signatures = exported
    features = request(3, 5, 24, seed=2)
    events = events_of(features, NOW)
    state = call(signatures["user_state"], user_state_inputs(
        {k: v[:, :0] for k, v in features.items() if k.startswith("seq_")},
        np.zeros(3, np.int64)))  # new users
    assert not state["state"].any()
    for chunk in np.split(np.random.default_rng(1).permutation(24), [5, 6, 17]):
        state = call(signatures["update_state"], {
            **{k: state[k] for k in ("state", "state_time", "state_model")},
            **{k: v[:, chunk] for k, v in events.items()}})
    expected = call(signatures["serving_default"], features)
    assert_same_ranking(call(signatures["rank_with_state"],
                             rank_inputs(model, features, state, NOW)), expected)


def test_cpp_loader_runs_the_state_signatures(exported, cpp_runner, tmp_path):
    model, export_dir, signatures = exported
    features = request(2, 6, 12, seed=3)
    now = NOW[:2]
    [state] = run_cpp(cpp_runner, export_dir, [user_state_inputs(features, now)],
                      tmp_path / "user", signature_name="user_state")
    assert isinstance(state, dict), state
    python_state = call(signatures["user_state"], user_state_inputs(features, now))
    np.testing.assert_allclose(state["state"], python_state["state"], rtol=1e-6, atol=1e-6)
    events = events_of(features, now + 60)
    [updated] = run_cpp(cpp_runner, export_dir, [{
        **{k: state[k] for k in ("state", "state_time", "state_model")}, **events}],
        tmp_path / "update", signature_name="update_state")
    assert isinstance(updated, dict), updated
    [ranked] = run_cpp(cpp_runner, export_dir, [rank_inputs(model, features, updated,
                                                            now + 600)],
                       tmp_path / "rank", signature_name="rank_with_state")
    assert isinstance(ranked, dict), ranked
    # The same events twice: the sequence, and its copy 60 s later.
    twice = {k: np.concatenate([v, v], axis=1) if k.startswith("seq_") else v
             for k, v in features.items()}
    twice["seq_time_delta"] = np.concatenate([features["seq_time_delta"] + 600,
                                              features["seq_time_delta"] + 540], axis=1)
    assert_same_ranking(ranked, call(signatures["serving_default"], twice))


def bad_states(model, state):
    wrong_model = dict(state, state_model=state["state_model"] + 1)
    nan_state = dict(state, state=state["state"].copy())
    nan_state["state"][0, 0, 0, 0] = np.nan
    shape = dict(state, state=state["state"][:, :, :8])
    negative = dict(state, state=-np.abs(state["state"]) - 1)
    return [(wrong_model, "state_model"), (nan_state, "NaN or infinity"),
            (shape, "must have shape"), (negative, "negative normaliser")]


def test_bad_states_and_times_are_refused(exported):
    model, _, signatures = exported
    features = request(1, 4, 6, seed=4)
    state = call(signatures["user_state"], user_state_inputs(features, NOW[:1]))
    cases = bad_states(model, state)
    for bad, message in cases:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            call(signatures["rank_with_state"], rank_inputs(model, features, bad, NOW[:1]))
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            call(signatures["update_state"], {**bad, **events_of(features, NOW[:1])})
    with pytest.raises(tf.errors.InvalidArgumentError, match="earlier than `state_time`"):
        call(signatures["rank_with_state"], rank_inputs(model, features, state, NOW[:1] - 1))
    negative_age = dict(features, seq_time_delta=features["seq_time_delta"] - 10**9)
    with pytest.raises(tf.errors.InvalidArgumentError, match="seq_time_delta"):
        call(signatures["user_state"], user_state_inputs(negative_age, NOW[:1]))


# Times the range [0, MAX_TIME] refuses: milliseconds, far future, the int64 extremes.
BAD_TIMES = [1_700_000_000_000, 2**62, 2**63 - 1, -1, -10**18, -2**63]


@pytest.mark.parametrize("bad_time", BAD_TIMES)
def test_times_outside_the_range_are_refused(exported, bad_time):
    """One event in milliseconds used to move the state's time so far that the user's
    history decayed to 0 for good; one at -2^63 overflowed a subtraction into a state of
    infinities. Each is now refused before anything is computed, naming the input."""
    model, _, signatures = exported
    features = request(1, 4, 6, seed=9)
    state = call(signatures["user_state"], user_state_inputs(features, NOW[:1]))
    events = events_of(features, NOW[:1] + 60)
    events["seq_event_time"][0, 2] = bad_time
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"`seq_event_time` \(at a valid event\) is {bad_time} at \[0, 2\], "
                             "outside \\[0, 4294967295\\]"):
        call(signatures["update_state"], {**state, **events})
    for signature, inputs in (
            ("update_state", {**dict(state, state_time=np.array([bad_time])),
                              **events_of(features, NOW[:1])}),
            ("rank_with_state", rank_inputs(model, features, dict(
                state, state_time=np.array([bad_time])), NOW[:1]))):
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"`state_time` is {bad_time}"):
            call(signatures[signature], inputs)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"`now` is {bad_time}"):
        call(signatures["rank_with_state"], rank_inputs(model, features, state,
                                                        np.array([bad_time])))
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"`now` is {bad_time}"):
        call(signatures["user_state"], user_state_inputs(features, np.array([bad_time])))
    if bad_time > 0:
        aged = dict(features, seq_time_delta=features["seq_time_delta"].copy())
        aged["seq_time_delta"][0, 1] = bad_time
        with pytest.raises(tf.errors.InvalidArgumentError, match="`seq_time_delta`"):
            call(signatures["user_state"], user_state_inputs(aged, NOW[:1]))


def test_times_at_padding_are_never_read_and_the_range_ends_are_served(exported):
    model, _, signatures = exported
    features = request(1, 4, 6, seed=10)
    empty = call(signatures["user_state"], user_state_inputs(
        {k: v[:, :0] for k, v in features.items() if k.startswith("seq_")},
        np.zeros(1, np.int64)))
    events = events_of(features, NOW[:1])
    expected = call(signatures["update_state"], {**empty, **events})
    padded = {k: np.pad(v, [(0, 0), (0, 2)]) for k, v in events.items()}
    padded["seq_event_time"][0, -2:] = [-2**63, 2**63 - 1]  # item id 0: padding
    updated = call(signatures["update_state"], {**empty, **padded})
    np.testing.assert_allclose(updated["state"], expected["state"], rtol=1e-6, atol=1e-7)
    assert updated["state_time"] == expected["state_time"]
    # A state at time 0 (a new user) ranked at the range's last second: all finite.
    last = np.array([export_max_time()])
    ranked = call(signatures["rank_with_state"], rank_inputs(model, features, updated, last))
    assert np.isfinite(ranked["score"]).all()
    at_end = dict(events, seq_event_time=np.full_like(events["seq_event_time"], last[0]))
    state = call(signatures["update_state"], {**empty, **at_end})
    assert np.isfinite(state["state"]).all() and state["state_time"] == last


def export_max_time():
    from ifa_tf.schema import MAX_TIME

    return MAX_TIME


class StatefulServer(ServeProcess):
    """`ifa-serve --model_name=ifa` over the decay model's base directory."""

    def __init__(self, base_path, log_path):
        self.start(log_path, ["--model_name=ifa", f"--model_base_path={base_path}"])


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    _, export_dir, _ = exported
    server = StatefulServer(os.path.dirname(export_dir),
                            tmp_path_factory.mktemp("serve") / "ifa-serve.log")
    yield server
    assert server.stop() == 0, server.logs()


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_ifa_serve_predicts_with_state(exported, server, protocol):
    model, _, signatures = exported
    client = (GrpcClient(server.target, "ifa") if protocol == "grpc"
              else RestClient(server.rest_target, "ifa"))
    features = request(2, 6, 10, seed=5)
    # What StateModel reads to drive a model of any schema (GetModelMetadata / metadata).
    assert client.signature_inputs("user_state") == sorted(user_state_inputs(features, NOW[:2]))
    assert client.signature_inputs("rank_with_state") == sorted(
        rank_inputs(model, features, {"state": 0, "state_time": 0, "state_model": 0}, 0))
    state, _ = client.predict(user_state_inputs(features, NOW[:2]), signature_name="user_state")
    np.testing.assert_array_equal(state["state_model"], [export.state_model_id(model)] * 2)
    outputs, _ = client.predict(rank_inputs(model, features, state, NOW[:2] + 5),
                                signature_name="rank_with_state")
    aged = dict(features, seq_time_delta=features["seq_time_delta"] + 5)
    assert_same_ranking(outputs, call(signatures["serving_default"], aged))
    bad = dict(state, state_model=state["state_model"] + 1)
    with pytest.raises(ServingError) as error:
        client.predict(rank_inputs(model, features, bad, NOW[:2]),
                       signature_name="rank_with_state")
    assert error.value.code.name == "INVALID_ARGUMENT" and "state_model" in error.value.message
    client.close()


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_a_non_finite_state_is_refused_in_one_line(exported, server, protocol):
    """NaN or infinity in a state used to come back as TensorFlow's VerifyFinite text, with
    the graph's context ('Graph execution error ... VerifyFinite')."""
    model, _, signatures = exported
    features = request(1, 4, 6, seed=11)
    state = call(signatures["user_state"], user_state_inputs(features, NOW[:1]))
    state["state"][0, 0, :2, 0] = [np.inf, np.nan]
    client = (GrpcClient(server.target, "ifa") if protocol == "grpc"
              else RestClient(server.rest_target, "ifa"))
    with client, pytest.raises(ServingError) as error:
        client.predict(rank_inputs(model, features, state, NOW[:1]),
                       signature_name="rank_with_state")
    assert error.value.code.name == "INVALID_ARGUMENT"
    assert error.value.message == (
        "assertion failed: [`state` holds NaN or infinity (2 of 544 values): it is not a "
        "state this model made]")


def test_warmup_covers_the_state_signatures_and_ifa_serve_replays_them(exported, server):
    model, export_dir, signatures = exported
    requests = export.read_warmup_requests(export_dir)
    assert [r.model_spec.signature_name for r in requests] == [
        "serving_default", "serving_raw", "user_state", "update_state", "rank_with_state"]
    for request in requests[2:]:
        outputs = call(signatures[request.model_spec.signature_name],
                       {k: tf.make_ndarray(v) for k, v in request.inputs.items()})
        if request.model_spec.signature_name != "rank_with_state":
            np.testing.assert_array_equal(outputs["state_model"],
                                          [export.state_model_id(model)])
    # ifa-serve replayed all five before marking the version AVAILABLE.
    with GrpcClient(server.target, "ifa") as client:
        assert client.model_status() == [(1, "AVAILABLE", "")]
    assert "(5 warm-up requests)" in server.log_path.read_text()


def test_client_ranks_a_user_from_the_store_in_one_call(exported, server, tmp_path):
    from ifa_tf.data import records
    from ifa_tf.serving import state_store
    from test_stateful import events_of

    model, _, signatures = exported
    features = request(1, 6, 16, seed=6)
    features["cand_author_id"][0, :2] = features["seq_author_id"][0, :2]
    one = {k: v[0] for k, v in features.items()}
    features.update({k: v[None] for k, v in records.cross_counts(one, SCHEMA).items()})
    client = GrpcClient(server.target, "ifa")
    state_model = state_store.StateModel(client=client)
    with state_store.open_store(tmp_path / "states.db") as store:
        state_store.apply_events(store, state_model, 42,
                                 {k: v[0] for k, v in events_of(features, NOW[:1]).items()},
                                 SCHEMA.cross_features)
        candidates = {k: one[k] for k in (*SCHEMA.user_features, *SCHEMA.candidate_features)}
        ranking, record = state_store.rank_user(client, store, 42, candidates,
                                                now=int(NOW[0]) + 30, model=state_model)
        # An unknown user is ranked as a new one, not refused.
        new_user, empty = state_store.rank_user(client, store, 43, candidates,
                                                now=int(NOW[0]), model=state_model,
                                                missing="new")
    assert empty.events == 0 and len(new_user.item_ids) == len(ranking.item_ids)
    aged = dict(features, seq_time_delta=features["seq_time_delta"] + 30)
    expected = call(signatures["serving_default"], aged)
    valid = int(np.count_nonzero(one["cand_item_id"]))
    np.testing.assert_array_equal(ranking.item_ids, expected["ranked_item_ids"][0, :valid])
    np.testing.assert_allclose(ranking.scores["score"], np.sort(expected["score"][0, :valid])[::-1],
                               atol=1e-5)
    client.close()
