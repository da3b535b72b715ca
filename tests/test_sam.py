"""SAM (`layers.SAMMemory`, zoo `sam`) against a float64 NumPy reference of its equations.
The layer tests are backend-independent: CI also runs them with KERAS_BACKEND=jax."""

import keras
import numpy as np
import pytest
from keras import ops

from ifa_tf import layers, zoo
from ifa_tf.schema import FeatureSchema


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def randomize(layer, seed=0, scale=0.5):
    """Random weights (biases too, so no term hides at zero); `{path: float64 value}` with
    the layer's name dropped from each path."""
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(scale=scale, size=w.shape).astype("float32")
                       for w in layer.get_weights()])
    return {w.path.split("/", 1)[1]: np_(w) for w in layer.weights}


def gru_reference(x, h, w, name):
    """TF1's GRUCell form (Keras' `reset_after=False`): the reset gate scales the state
    before the recurrent product."""
    kernel, recurrent, bias = (w[f"{name}/{part}"] for part in
                               ("kernel", "recurrent_kernel", "bias"))
    units = h.shape[-1]
    x_z, x_r, x_h = np.split(x @ kernel + bias, 3, axis=-1)
    z = sigmoid(x_z + h @ recurrent[:, :units])
    r = sigmoid(x_r + h @ recurrent[:, units:2 * units])
    candidate = np.tanh(x_h + (r * h) @ recurrent[:, 2 * units:])
    return z * h + (1 - z) * candidate


def sam_reference(layer, w, query, key, value, memory, query_mask, key_mask):
    """SAM as its equations read: per pass an MLP of the explicit concatenation
    [q - e, q * e, m - e, m * e] for every (candidate, event), sigmoid weights zeroed at
    padding, the read sum_i a_i v_i, m = GRU(read, m); then Memory Enhancement."""
    value = key if value is None else value
    memory0 = query if memory is None else memory
    memory = memory0
    n = key.shape[1]
    e = np.broadcast_to(key[:, None], (*query.shape[:2], n, key.shape[-1]))

    def attention_query(mem):
        return mem if "memory_query_map/kernel" not in w else mem @ w["memory_query_map/kernel"]

    fixed_query = attention_query(memory0)
    statistics = []
    for t in range(layer.num_passes):
        m_att = attention_query(memory) if layer.memory_query == "paper" else fixed_query
        q = np.broadcast_to(query[:, :, None], e.shape)
        mq = np.broadcast_to(m_att[:, :, None], e.shape)
        z = np.concatenate([q - e, q * e, mq - e, mq * e], axis=-1)  # [B, m, n, 4d]
        first = np.concatenate([w[f"pass_{t}_{part}_kernel"] for part in
                                ("query_difference", "query_product", "memory_difference",
                                 "memory_product")], axis=0)
        hidden = sigmoid(z @ first + w[f"pass_{t}_hidden_bias"])
        logits = (hidden @ w[f"pass_{t}_output_kernel"])[..., 0] + w[f"pass_{t}_output_bias"]
        weights = sigmoid(logits) * key_mask[:, None, :]  # [B, m, n]
        read = np.einsum("bmn,bnv->bmv", weights, value)
        memory = gru_reference(read, memory, w, "memory_update")
        mass = weights.sum(-1)
        statistics += [np.log1p(mass), mass / np.maximum(key_mask.sum(-1), 1)[:, None]]
    summary = np.maximum(np.stack(statistics, -1) @ w["attention_summary/kernel"]
                         + w["attention_summary/bias"], 0)
    state = memory
    for step in range(layer.enhancement_steps):
        transformed = (state @ w[f"enhancement_map_{step}/kernel"]
                       + w[f"enhancement_map_{step}/bias"])
        state = gru_reference(np.concatenate([transformed, memory0], -1), state, w,
                              "memory_enhancement")
    return np.concatenate([summary, state], -1) * query_mask[..., None]


def case(seed=0, batch=3, m=5, n=9, depth=4, value_depth=None):
    """Query, key, value (None when shared), initial memory (None when the query), masks:
    the second row has one valid event, the third none (and only padded candidates
    beyond its first)."""
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, m, depth)).astype("float32")
    key = rng.normal(size=(batch, n, depth)).astype("float32")
    value = memory = None
    if value_depth is not None:
        value = rng.normal(size=(batch, n, value_depth)).astype("float32")
        memory = rng.normal(size=(batch, m, value_depth)).astype("float32")
    key_mask = np.arange(n)[None, :] < np.array([n, 1, 0])[:, None]
    query_mask = np.arange(m)[None, :] < np.array([m, m - 2, 1])[:, None]
    return query, key, value, memory, query_mask, key_mask


@pytest.mark.jax
@pytest.mark.parametrize("memory_query", ["paper", "released"])
@pytest.mark.parametrize("enhancement_steps", [0, 3])
@pytest.mark.parametrize("value_depth", [None, 6])  # shared, or decoupled and wider
def test_sam_memory_matches_the_float64_reference(memory_query, enhancement_steps,
                                                  value_depth):
    query, key, value, memory, query_mask, key_mask = case(value_depth=value_depth)
    layer = layers.SAMMemory(num_passes=2, attention_units=3, summary_units=5,
                             enhancement_steps=enhancement_steps, memory_query=memory_query)
    kwargs = dict(initial_memory=memory, query_mask=query_mask, key_mask=key_mask)
    layer(query, key, value, **kwargs)
    w = randomize(layer)
    assert ("memory_query_map/kernel" in w) == (value_depth is not None)
    expected = sam_reference(layer, w, query, key, value, memory, query_mask, key_mask)
    out = np_(layer(query, key, value, **kwargs))
    assert out.shape == (3, 5, 5 + (value_depth or 4))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # Every part of the output is alive: the weights vary and the memory moved.
    assert np.abs(out[0, :, :5]).max() > 1e-3
    if enhancement_steps == 0:
        assert np.abs(out[0, :, 5:] - (memory if value_depth else query)[0]).max() > 1e-2


@pytest.mark.jax
def test_paper_and_released_memory_queries_differ_only_after_the_first_pass():
    """The released code never refreshes the memory query: with one pass the two modes
    are the same model, with two they differ."""
    query, key, _, _, query_mask, key_mask = case(seed=1)
    outputs = {}
    for passes in (1, 2):
        for mode in ("paper", "released"):
            layer = layers.SAMMemory(num_passes=passes, memory_query=mode)
            layer(query, key, key_mask=key_mask)
            randomize(layer, seed=passes)
            outputs[passes, mode] = np_(layer(query, key, key_mask=key_mask,
                                              query_mask=query_mask))
    np.testing.assert_allclose(outputs[1, "paper"], outputs[1, "released"], atol=1e-6)
    assert np.abs(outputs[2, "paper"] - outputs[2, "released"]).max() > 1e-4


@pytest.mark.jax
def test_sam_memory_ignores_padded_events_and_zeroes_padded_candidates():
    query, key, _, _, query_mask, key_mask = case(seed=2)
    layer = layers.SAMMemory()
    layer(query, key)
    randomize(layer, seed=3)
    base = np_(layer(query, key, query_mask=query_mask, key_mask=key_mask))
    rng = np.random.default_rng(4)
    # Garbage in every padded position, and four more padded events at the end.
    garbage_key = np.where(key_mask[..., None], key, rng.normal(size=key.shape) * 5)
    longer_key = np.concatenate([garbage_key, rng.normal(size=(3, 4, 4)) * 5], 1)
    longer_mask = np.concatenate([key_mask, np.zeros((3, 4), bool)], 1)
    out = np_(layer(query, longer_key.astype("float32"), query_mask=query_mask,
                    key_mask=longer_mask))
    np.testing.assert_allclose(out, base, atol=1e-6)
    assert (out[~query_mask] == 0).all()
    assert np.abs(out[query_mask]).max(-1).min() > 0


@pytest.mark.jax
@pytest.mark.parametrize("n", [0, 3])
def test_sam_memory_of_an_empty_sequence_is_finite_and_reads_nothing(n):
    """No valid event: every weight is 0, the summary sees zeros and the memory moves
    only by the GRU's own response to a zero read."""
    query, key, _, _, query_mask, _ = case(seed=5, n=max(n, 1))
    key = key[:, :n]
    key_mask = np.zeros((3, n), bool)
    layer = layers.SAMMemory(num_passes=2, enhancement_steps=2)
    layer(query, key, key_mask=key_mask)
    w = randomize(layer, seed=6)
    out = np_(layer(query, key, query_mask=query_mask, key_mask=key_mask))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(
        out, sam_reference(layer, w, query, key, None, None, query_mask, key_mask),
        rtol=1e-4, atol=1e-5)


@pytest.mark.jax
def test_sam_memory_round_trip_and_batch_independence(tmp_path):
    query, key, _, _, query_mask, key_mask = case(seed=7)
    layer = layers.SAMMemory(num_passes=2, attention_units=4, summary_units=6,
                             enhancement_steps=1, memory_query="released")
    kwargs = dict(query_mask=query_mask, key_mask=key_mask)
    expected = np_(layer(query, key, **kwargs))
    restored = layers.SAMMemory.from_config(layer.get_config())
    restored(query, key, **kwargs)
    restored.set_weights(layer.get_weights())
    np.testing.assert_allclose(np_(restored(query, key, **kwargs)), expected, atol=1e-6)
    assert restored.get_config()["memory_query"] == "released"
    # A `.keras` file of a model holding the layer.
    inputs = [keras.Input((None, 4)), keras.Input((None, 4))]
    model = keras.Model(inputs, layers.SAMMemory(num_passes=2)(*inputs))
    path = tmp_path / "sam.keras"
    model.save(path)
    np.testing.assert_allclose(np_(keras.saving.load_model(path)([query, key])),
                               np_(model([query, key])), atol=1e-6)
    for row in range(3):
        single = layer(query[row:row + 1], key[row:row + 1],
                       query_mask=query_mask[row:row + 1], key_mask=key_mask[row:row + 1])
        np.testing.assert_allclose(np_(single)[0], expected[row], atol=1e-6)


@pytest.mark.jax
@pytest.mark.parametrize("arguments, message", [
    ({"num_passes": 0}, "num_passes=0"),
    ({"attention_units": 2.5}, "attention_units=2.5"),
    ({"summary_units": True}, "summary_units=True"),
    ({"enhancement_steps": -1}, "enhancement_steps=-1"),
    ({"memory_query": "iter"}, "memory_query='iter'"),
])
def test_sam_memory_bad_arguments_name_the_value(arguments, message):
    with pytest.raises(ValueError, match=f"Received: {message}"):
        layers.SAMMemory(**arguments)


@pytest.mark.jax
@pytest.mark.parametrize("shapes, message", [
    (((2, 3, 4), (2, 5, 6)), "widths must agree"),
    (((2, 3, 4), (2, 5, 4), (2, 5, 6)), "value width 6, memory width 4"),
    (((2, 3, 4), (2, 5, 4), (2, 5, 6), (2, 3, 5)), "value width 6, memory width 5"),
])
def test_sam_memory_mismatched_widths_are_clear_errors(shapes, message):
    with pytest.raises(ValueError, match=message):
        layers.SAMMemory().build(*shapes)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="reads a TF graph")
def test_sam_memory_forms_no_tensor_wider_than_its_hidden_layer():
    """The first MLP layer is applied term by term: with d = 16 > h = 8 no tensor of the
    traced layer holds m * n * d elements (the [B, m, n, 4d] concatenation would)."""
    import tensorflow as tf

    m, n, depth = 13, 29, 16
    layer = layers.SAMMemory()
    layer.build((1, m, depth), (1, n, depth))
    graph = tf.function(lambda q, k: layer(q, k, key_mask=tf.ones((1, n), bool)))
    graph = graph.get_concrete_function(tf.TensorSpec((1, m, depth)),
                                        tf.TensorSpec((1, n, depth))).graph
    sizes = [t.shape.num_elements() for op in graph.get_operations() for t in op.outputs
             if t.shape.is_fully_defined()]
    assert max(sizes) == m * n * layer.attention_units


# ------------------------------------------------------------------------------- the zoo
SCHEMA = FeatureSchema(embedding_buckets={"user_id": 40, "item_id": 64, "category_id": 8,
                                          "author_id": 16})


def make_features(seed=0, batch=2, m=4, n=10):
    rng = np.random.default_rng(seed)
    features = {"user_id": rng.integers(1, 100, batch)}
    for attribute, high in (("item_id", 500), ("category_id", 4), ("author_id", 9)):
        features["seq_" + attribute] = rng.integers(1, high, (batch, n))
        features["cand_" + attribute] = rng.integers(1, high, (batch, m))
    features["seq_action"] = rng.integers(0, 8, (batch, n))
    features["seq_time_delta"] = rng.integers(0, 10**7, (batch, n))
    for name in SCHEMA.cross_features:
        features[name] = rng.integers(0, 20, (batch, m))
    return features


def test_zoo_sam_reads_the_oldest_event_and_takes_its_options(tmp_path):
    """`sam` reads the whole sequence (an event far outside any recent-k window moves
    the scores); its options reach the layer and survive a `.keras` round trip."""
    keras.utils.set_random_seed(3)
    model = zoo.build("sam", schema=SCHEMA, embedding_dim=4, tower_units=[8],
                      num_passes=2, memory_query="released", enhancement_steps=0)
    memory = model.interest._memory
    assert (memory.num_passes, memory.memory_query, memory.enhancement_steps) == (
        2, "released", 0)
    features = make_features()
    changed = {k: v.copy() for k, v in features.items()}
    changed["seq_item_id"][:, 0] += 1000
    score = keras.ops.convert_to_numpy(model(features)["score"])
    assert np.abs(keras.ops.convert_to_numpy(model(changed)["score"]) - score).max() > 1e-6
    model.save(tmp_path / "sam.keras")
    restored = keras.saving.load_model(tmp_path / "sam.keras")
    assert restored.interest.get_config()["memory_query"] == "released"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(restored(features)["score"]),
                               score, atol=1e-7)
    with pytest.raises(ValueError, match="memory_query='iter'"):
        zoo.build("sam", schema=SCHEMA, memory_query="iter")

