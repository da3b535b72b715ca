"""Stateful IFA (time_encoding="decay"): the decayed FSM against a float64 NumPy reference,
and the model's user_state / update_state / rank_with_state against its own call."""

import keras
import numpy as np
import pytest

import ifa_tf
from ifa_tf import layers
from ifa_tf.benchmark.requests import random_request
from ifa_tf.models.candidate_set_ranker import EVENT_TIME
from ifa_tf.schema import FeatureSchema

SCHEMA = FeatureSchema(embedding_buckets={"user_id": 31, "item_id": 101, "category_id": 13,
                                          "author_id": 17})
DAY = 86_400


def build(**overrides):
    keras.utils.set_random_seed(3)
    model = ifa_tf.zoo.build("ifa", schema=SCHEMA, time_encoding="decay", **overrides)
    # Rates away from their start, as after training: hours and weeks.
    model.interest._attention._log_decay_rate.assign(-np.log([5 * 3600.0, 9 * DAY]))
    return model


def request(batch, m, n, seed):
    """A request whose rows hold different numbers of valid events, ages up to 30 days."""
    rng = np.random.default_rng(seed)
    features = random_request(SCHEMA, m, n, batch=batch, seed=seed)
    features["seq_time_delta"] = np.sort(rng.integers(0, 30 * DAY, (batch, n)))[:, ::-1]
    for row in range(batch):
        for name in SCHEMA.sequence_features:
            features[name][row, n - row * 3:] = 0
    return features


def events_of(features, now):
    """The sequence as `update_state` events: absolute times instead of ages."""
    model_events = {name: features[name] for name in
                    ("seq_item_id", "seq_category_id", "seq_author_id", "seq_action")}
    model_events[EVENT_TIME] = now[:, None] - features["seq_time_delta"]
    return model_events


def numpy_decayed_attention(layer, query, key, age, key_mask):
    """float64 reference of DecayedLinearAttention (elu+1, no output projection)."""
    w = {v.path.split("/")[-2] + "/" + v.name: np.asarray(v, np.float64) for v in layer.weights}
    heads, dim = layer.num_heads, layer.key_dim

    def project(x, name):
        return np.einsum("bnd,dhk->bnhk", x, w[f"{name}/kernel"]) + w[f"{name}/bias"]

    def phi(x):
        return np.where(x > 0, x + 1.0, np.exp(x))

    q, k, v = phi(project(query, "query")), phi(project(key, "key")), project(key, "value")
    weight = np.exp(-np.exp(w["attention/log_decay_rate"])[None, None] * age[..., None])
    weight = weight * key_mask[..., None]
    scores = np.einsum("bmhf,bnhf->bhmn", q, k) * np.transpose(weight, (0, 2, 1))[:, :, None]
    out = np.einsum("bhmn,bnhv->bmhv", scores, v) / (scores.sum(-1).transpose(0, 2, 1)[
        ..., None] + layer.epsilon)
    return out.reshape(*out.shape[:2], heads * dim)


@pytest.mark.jax
def test_decayed_attention_matches_numpy_reference():
    rng = np.random.default_rng(0)
    layer = layers.DecayedLinearAttention(2, 4, time_scales=[3600.0, 30 * DAY],
                                          use_output_projection=False, name="attention")
    query, key = rng.normal(size=(2, 5, 6)), rng.normal(size=(2, 9, 6))
    age = rng.integers(0, 10 * DAY, (2, 9)).astype("int64")
    key_mask = np.ones((2, 9), bool)
    key_mask[1, 6:] = False
    age[1, 6:] = -10**12  # garbage at padding is never read (it would overflow exp)
    output = np.asarray(layer(query, key, key_age=age, key_mask=key_mask))
    expected = numpy_decayed_attention(layer, query, key, np.where(key_mask, age, 0), key_mask)
    np.testing.assert_allclose(output, expected, atol=1e-5, rtol=1e-5)
    # A state moved forward by t equals the keys aged by t. Both sum exp(-rate * age) * k v
    # in float32 over values of both signs, so a single entry can lose digits to cancellation:
    # the tolerance is relative to the state's scale, not to each entry.
    state = layer.key_state(key, age, key_mask=key_mask)
    aged = np.asarray(layer.key_state(key, age + np.array([[7200], [86_400]]),
                                      key_mask=key_mask))
    np.testing.assert_allclose(np.asarray(layer.advance_state(state, np.array([7200, 86_400]))),
                               aged, rtol=1e-5, atol=1e-5 * np.abs(aged).max())


def test_rank_with_state_equals_call_on_the_sequence():
    model = build()
    features = request(3, 9, 20, seed=1)
    state_made = np.array([10**9, 10**9 + 5, 1_700_000_000])
    state = model.user_state(features, state_made)
    for later in (0, 3600, 40 * DAY):  # the request comes `later` seconds after the state
        now = state_made + later
        aged = dict(features, seq_time_delta=features["seq_time_delta"] + later)
        expected = model(aged)
        ranked = model.rank_with_state({k: features[k] for k in model.rank_features},
                                       state["state"], state["state_time"], now)
        for task in (*SCHEMA.tasks, "score"):
            np.testing.assert_allclose(np.asarray(ranked[task]), np.asarray(expected[task]),
                                       atol=1e-5, rtol=0, err_msg=f"{task} at +{later}s")


def test_updates_in_any_order_and_chunks_equal_one_user_state():
    model = build()
    features = request(2, 6, 30, seed=2)
    now = np.array([1_700_000_000, 1_700_100_000])
    expected = model.user_state(features, now)
    events = events_of(features, now)
    rng = np.random.default_rng(0)
    for _ in range(3):
        order = rng.permutation(30)
        cuts = np.sort(rng.choice(np.arange(1, 30), size=3, replace=False))
        state = {"state": np.zeros((2, *model.state_shape), "float32"),
                 "state_time": np.zeros(2, "int64")}
        for chunk in np.split(order, cuts):
            state = model.update_state(state["state"], state["state_time"],
                                       {k: v[:, chunk] for k, v in events.items()})
        # The reference time is the newest event's; move it to `now` to compare.
        assert np.all(np.asarray(state["state_time"]) <= now)
        moved = model.interest.advance_state(state["state"], now - state["state_time"])
        np.testing.assert_allclose(np.asarray(moved), np.asarray(expected["state"]),
                                   rtol=1e-5, atol=1e-6)
        ranked = model.rank_with_state({k: features[k] for k in model.rank_features},
                                       state["state"], state["state_time"], now)
        np.testing.assert_allclose(np.asarray(ranked["score"]), np.asarray(model(features)[
            "score"]), atol=1e-5, rtol=0)


def test_no_time_overflows_or_makes_a_state_infinite():
    """The model's own methods (the exported signatures refuse such times first) clip times
    to [0, MAX_TIME]: -2^63 used to overflow `new_time - state_time` into a state of
    infinities, and an age at padding could be anything."""
    model = build()
    features = request(2, 5, 8, seed=12)
    events = events_of(features, np.array([1_700_000_000, 1_700_000_000]))
    events[EVENT_TIME][0, 0] = -2**63
    events[EVENT_TIME][1, -1] = 2**63 - 1  # row 1's last events are padding
    empty = np.zeros((2, *model.state_shape), "float32")
    updated = model.update_state(empty, np.array([-2**63, 2**63 - 1]), events)
    assert np.isfinite(np.asarray(updated["state"])).all()
    assert (0 <= np.asarray(updated["state_time"])).all()
    ranked = model.rank_with_state({k: features[k] for k in model.rank_features},
                                   updated["state"], np.array([-10**18, -2**63]),
                                   np.array([2**63 - 1, -2**63]))
    assert np.isfinite(np.asarray(ranked["score"])).all()


def test_stateful_path_reads_no_sequence_feature():
    model = build()
    assert not [name for name in model.rank_features if name.startswith("seq_")]
    features = request(1, 5, 8, seed=3)
    state = model.user_state(features, np.array([100]))
    # Only the rank features are given: a read of any sequence feature would fail.
    ranked = model.rank_with_state({k: features[k] for k in model.rank_features},
                                   state["state"], state["state_time"], np.array([100]))
    assert np.asarray(ranked["score"]).shape == (1, 5)
    assert "seq_time_delta" not in model.event_features


def test_decay_model_trains_and_round_trips(tmp_path):
    model = build()
    model.compile()
    features = request(4, 6, 12, seed=4)
    labels = {task: (np.random.default_rng(5).random((4, 6)) < 0.5).astype("float32")
              for task in SCHEMA.tasks}
    rates = np.asarray(model.interest._attention._log_decay_rate).copy()
    history = model.fit(features, labels, epochs=2, batch_size=4, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert not np.allclose(np.asarray(model.interest._attention._log_decay_rate), rates)
    path = tmp_path / "decay.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.stateful and loaded.interest.time_encoding == "decay"
    np.testing.assert_allclose(np.asarray(loaded(features)["score"]),
                               np.asarray(model(features)["score"]), atol=1e-6)


@pytest.mark.parametrize("overrides, named", [
    ({"exact_matches": True}, "exact_matches"),
    ({"k": 10}, "k"),
    ({"feature_map": "hedgehog"}, "feature_map"),
])
def test_decay_refuses_what_reads_the_raw_sequence(overrides, named):
    with pytest.raises(ValueError, match=named):
        ifa_tf.zoo.build("ifa", schema=SCHEMA, time_encoding="decay", **overrides)


def test_decay_options_are_checked():
    with pytest.raises(ValueError, match="time_encoding"):
        ifa_tf.zoo.build("ifa", schema=SCHEMA, time_encoding="age")
    with pytest.raises(ValueError, match="decay_time_scales"):
        ifa_tf.zoo.build("ifa", schema=SCHEMA, decay_time_scales=[60.0, 3600.0])
    with pytest.raises(ValueError, match="time_scales"):
        ifa_tf.zoo.build("ifa", schema=SCHEMA, time_encoding="decay",
                         decay_time_scales=[60.0])
    with pytest.raises(ValueError, match="stateful serving"):
        ifa_tf.zoo.build("ifa", schema=SCHEMA).user_state({}, np.array([0]))
