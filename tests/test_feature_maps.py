"""The sharper feature maps of `NormalizedLinearAttention` ("focused", "hedgehog"), their
zoo options, and the attention-concentration diagnostic, against float64 NumPy references.
Tests marked `jax` are backend-independent: CI runs them again with KERAS_BACKEND=jax."""

import math
import re

import keras
import numpy as np
import pytest
from keras import ops

from ifa_tf import diagnostics, layers
from ifa_tf.layers import feature_maps

NEW_MAPS = [("focused", None), ("focused", 1.5), ("hedgehog", None)]


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def named_weights(layer):
    """{"query/kernel": ..., "query_feature_kernel": ...}: paths below the layer's name."""
    return {w.path.split("/", 1)[1]: np_(w) for w in layer.weights}


def randomize(layer, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(scale=scale, size=w.shape).astype("float32")
                       for w in layer.get_weights()])


def random_mask(rng, batch, length, min_valid=0):
    lengths = rng.integers(min_valid, length + 1, size=batch)
    return np.arange(length)[None, :] < lengths[:, None]


def np_focused(x, p):
    """||relu(x)|| relu(x)^p / ||relu(x)^p|| over the last axis, float64 (0 where relu = 0)."""
    r = np.maximum(x, 0.0)
    powered = r ** p
    powered_norm = np.linalg.norm(powered, axis=-1, keepdims=True)
    return np.where(powered_norm > 0, np.linalg.norm(r, axis=-1, keepdims=True) * powered
                    / np.where(powered_norm > 0, powered_norm, 1.0), 0.0)


ELEMENTWISE = {
    "elu_plus_one": lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0))),
    "softplus": lambda x: np.log1p(np.exp(x)),
    "relu": lambda x: np.maximum(x, 0.0),
}


def np_phi(layer, side, inputs):
    """One side's features [B, r, h, f] in float64, straight from the definitions: no
    shift, no folding of Hedgehog's W or of the temperature into the projection."""
    w = named_weights(layer)
    projected = np.tensordot(inputs, w[f"{side}/kernel"], axes=([-1], [0]))
    if layer.use_bias:
        projected = projected + w[f"{side}/bias"]  # [B, r, h, k]
    if layer.feature_map == "hedgehog":
        projected = np.einsum("brhk,hkj->brhj", projected, w[f"{side}_feature_kernel"])
        if layer.use_bias:
            projected = projected + w[f"{side}_feature_bias"]
    if "log_temperature" in w:  # phi(u / tau_h), tau_h = exp(t_h)
        projected = projected / np.exp(w["log_temperature"])[:, None]
    if layer.feature_map == "focused":
        if "focusing_factor" in w:  # one learned power per head, floored at 1
            return np.stack([np_focused(projected[:, :, h], max(p, 1.0))
                             for h, p in enumerate(w["focusing_factor"])], axis=2)
        return np_focused(projected, layer.focusing_factor or 3)
    if layer.feature_map == "hedgehog":
        return np.concatenate([np.exp(projected), np.exp(-projected)], axis=-1)
    return ELEMENTWISE[layer.feature_map](projected)


def np_attention_weights(layer, query, key, query_mask, key_mask):
    """[B, h, m, n]: phi(Q) phi(K)^T over the valid keys, divided by D + epsilon."""
    scores = np.einsum("bmhf,bnhf->bhmn", np_phi(layer, "query", query),
                       np_phi(layer, "key", key)) * key_mask[:, None, None, :]
    degree = scores.sum(-1, keepdims=True) + layer.epsilon
    return scores / degree * query_mask[:, None, :, None]


def np_linear_attention(layer, query, key, value, query_mask, key_mask):
    """E = D^-1 phi(Q) (phi(K)^T V) with the [m, n] matrix formed explicitly, float64."""
    w = named_weights(layer)
    v = np.tensordot(value, w["value/kernel"], axes=([-1], [0])) + w.get("value/bias", 0.0)
    attended = np.einsum("bhmn,bnhv->bmhv",
                         np_attention_weights(layer, query, key, query_mask, key_mask), v)
    if not layer.use_output_projection:
        return attended.reshape(*attended.shape[:2], -1)
    out = (np.tensordot(attended, w["attention_output/kernel"], axes=([-2, -1], [0, 1]))
           + w.get("attention_output/bias", 0.0))
    return out * query_mask[..., None]


def relative_error(out, ref):
    return np.abs(out - ref).max() / np.abs(ref).max()


# ------------------------------------------------------------------------- the maps alone
@pytest.mark.jax
def test_focused_map_is_flattens_definition():
    # One head by hand: r = [3, 0, 1, 0], p = 2: sqrt(10) [9, 0, 1, 0] / sqrt(82).
    got = np_(feature_maps.focused(np.array([[3.0, -1.0, 1.0, 0.0]], "float32"), 1, 2))
    np.testing.assert_allclose(got, [[9 * math.sqrt(10 / 82), 0, math.sqrt(10 / 82), 0]],
                               rtol=1e-6)
    rng = np.random.default_rng(0)
    x = rng.normal(scale=3.0, size=(4, 3 * 5)).astype("float32")
    x[0, 5:10] = -np.abs(x[0, 5:10])  # a head with relu(x) = 0 gets zero features
    x[1, :5] *= 1e4  # r^p = 1e32 / r^(2p) = 1e64 would overflow float32 if formed as such
    for p in (1, 2, 3, 2.5, 8):
        got = np_(feature_maps.focused(x, 3, p))
        ref = np_focused(x.astype(np.float64).reshape(4, 3, 5), p).reshape(4, 15)
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-30)
        assert (got[0, 5:10] == 0).all()
    # p = 1 is relu itself.
    np.testing.assert_allclose(np_(feature_maps.focused(x, 3, 1)), np.maximum(x, 0), rtol=1e-6)


@pytest.mark.jax
def test_hedgehog_map_scales_cancel_and_nothing_overflows():
    rng = np.random.default_rng(1)
    query = rng.normal(scale=3.0, size=(2, 4, 2 * 3)).astype("float32")  # [B, m, h*k]
    key = rng.normal(scale=3.0, size=(2, 5, 2 * 3)).astype("float32")
    key[0, :, :3] -= 20.0  # head 0 of example 0: every key far on one side
    key_mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
    key[~key_mask] = 1e4  # padded keys hold values whose exp overflows float64 too
    phi_q, phi_k, query_shift = (np_(x) for x in feature_maps.hedgehog(query, key, 2,
                                                                         key_mask))
    assert phi_q.shape == (2, 4, 12) and phi_k.shape == (2, 5, 12)
    assert (phi_q <= 1).all() and (phi_k <= 1).all()
    np.testing.assert_array_equal(phi_k[~key_mask], 0.0)

    def by_head(x):
        return x.reshape(*x.shape[:2], 2, -1)

    def signed(x):
        return np.concatenate([by_head(x), -by_head(x)], axis=-1).astype(np.float64)

    # Per head, the scaled terms are the exact ones, exp(+-(u_q + u_k)), over exp(shift):
    valid = key_mask[:, None, :, None, None]
    exact = np.exp(np.where(valid, signed(query)[:, :, None] + signed(key)[:, None],
                            -np.inf))  # [B, m, n, h, 2k], 0 at padded keys
    scaled = by_head(phi_q)[:, :, None] * by_head(phi_k)[:, None]
    np.testing.assert_allclose(scaled * np.exp(query_shift)[:, :, None, :, None], exact,
                               rtol=1e-5)
    # and each query's largest term over the valid keys is 1: D >= 1, nothing underflows.
    np.testing.assert_allclose(scaled.max(axis=(2, 4)), 1.0, rtol=1e-6)
    # With no valid key: zero key features, finite query features.
    phi_q, phi_k, query_shift = (np_(x) for x in feature_maps.hedgehog(
        query, key, 2, np.zeros((2, 5), bool)))
    assert (phi_k == 0).all() and np.isfinite(phi_q).all() and np.isfinite(query_shift).all()
    assert feature_maps.feature_dim("hedgehog", 4) == 8
    assert feature_maps.feature_dim("focused", 4) == 4


# ------------------------------------------------------------------------- the full layer
@pytest.mark.jax
@pytest.mark.parametrize("feature_map, focusing_factor", NEW_MAPS)
@pytest.mark.parametrize("num_heads, use_output_projection", [(1, True), (2, False),
                                                              (3, True)])
def test_layer_matches_float64_reference(feature_map, focusing_factor, num_heads,
                                         use_output_projection):
    rng = np.random.default_rng(num_heads)
    batch, m, n, d = 3, 7, 11, 12
    query = rng.normal(size=(batch, m, d)).astype("float32")
    key = rng.normal(size=(batch, n, d)).astype("float32")
    value = rng.normal(size=(batch, n, 10)).astype("float32")
    query_mask, key_mask = random_mask(rng, batch, m, 1), random_mask(rng, batch, n, 1)
    layer = layers.NormalizedLinearAttention(
        num_heads, key_dim=5, value_dim=4, output_dim=6 if use_output_projection else None,
        use_output_projection=use_output_projection, feature_map=feature_map,
        focusing_factor=focusing_factor)
    layer(query, key, value)
    randomize(layer, seed=num_heads)  # Hedgehog's W, b too: not the identity any more
    out = np_(layer(query, key, value, query_mask=query_mask, key_mask=key_mask))
    ref = np_linear_attention(layer, query, key, value, query_mask, key_mask)
    assert out.shape == ref.shape
    assert relative_error(out, ref) <= 1e-5


@pytest.mark.jax
def test_hedgehog_starts_as_the_exp_map_and_folds_its_weights():
    layer = layers.NormalizedLinearAttention(2, 3, feature_map="hedgehog")
    query = np.random.default_rng(0).normal(size=(1, 4, 6)).astype("float32")
    layer(query, query)
    w = named_weights(layer)
    for side in ("query", "key"):
        np.testing.assert_array_equal(w[f"{side}_feature_kernel"], np.stack([np.eye(3)] * 2))
        np.testing.assert_array_equal(w[f"{side}_feature_bias"], np.zeros((2, 3)))
    no_bias = layers.NormalizedLinearAttention(2, 3, feature_map="hedgehog", use_bias=False)
    no_bias(query, query)
    randomize(no_bias)
    assert sorted(k for k in named_weights(no_bias) if "feature" in k) == [
        "key_feature_kernel", "query_feature_kernel"]
    mask = np.ones((1, 4), bool)
    assert relative_error(np_(no_bias(query, query)), np_linear_attention(
        no_bias, query, query, query, mask, mask)) <= 1e-5


@pytest.mark.jax
def test_hedgehog_is_exact_where_an_unshifted_exp_overflows_float32():
    # Hedgehog's u of up to ~200 in size: exp overflows float32 beyond 88 (not float64).
    # The scales keep every feature <= 1 and cancel, so the output equals the formula.
    rng = np.random.default_rng(4)
    query = rng.normal(size=(2, 5, 8)).astype("float32")
    key = rng.normal(size=(2, 9, 8)).astype("float32")
    query_mask, key_mask = random_mask(rng, 2, 5, 1), random_mask(rng, 2, 9, 2)
    layer = layers.NormalizedLinearAttention(2, 4, feature_map="hedgehog",
                                             use_output_projection=False)
    layer(query, key)
    randomize(layer, seed=4, scale=3.0)
    assert np.abs(np_phi(layer, "key", key)).max() > 1e38  # float32 max is 3.4e38
    out = np_(layer(query, key, query_mask=query_mask, key_mask=key_mask))
    ref = np_linear_attention(layer, query, key, key, query_mask, key_mask)
    assert np.isfinite(out).all()
    assert relative_error(out, ref) <= 1e-4


@pytest.mark.jax
@pytest.mark.parametrize("feature_map, focusing_factor", NEW_MAPS)
def test_padded_keys_and_their_values_change_nothing(feature_map, focusing_factor):
    rng = np.random.default_rng(1)
    query = rng.normal(size=(2, 5, 8)).astype("float32")
    key = rng.normal(size=(2, 6, 8)).astype("float32")
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2], bool)
    layer = layers.NormalizedLinearAttention(2, 4, feature_map=feature_map,
                                             focusing_factor=focusing_factor)
    layer(query, key)
    randomize(layer, seed=2, scale=0.5)
    base = np_(layer(query, key, key_mask=mask))
    # Append padded keys and store huge values at every padded position: exp(1e4) would
    # overflow, and a padded key must neither set Hedgehog's shift nor reach a sum.
    longer = np.concatenate([key, rng.normal(size=(2, 3, 8)).astype("float32")], axis=1)
    longer[1, 4:] = rng.normal(size=(5, 8)) * 1e4
    longer_mask = np.concatenate([mask, np.zeros((2, 3), bool)], axis=1)
    np.testing.assert_allclose(np_(layer(query, longer, key_mask=longer_mask)), base,
                               atol=1e-6)


@pytest.mark.jax
@pytest.mark.parametrize("feature_map, focusing_factor", NEW_MAPS)
def test_rows_without_a_valid_key_are_finite_zeros(feature_map, focusing_factor):
    layer = layers.NormalizedLinearAttention(2, 4, feature_map=feature_map,
                                             focusing_factor=focusing_factor,
                                             use_output_projection=False)
    query = np.random.default_rng(3).normal(size=(2, 3, 8)).astype("float32")
    layer(query, query)
    randomize(layer, seed=3, scale=40.0)  # Hedgehog: its scaled epsilon underflows to 0
    for key in (query * 100, np.ones((2, 0, 8), "float32")):
        out = np_(layer(query, key, key_mask=np.zeros(key.shape[:2], bool)))
        np.testing.assert_array_equal(out, np.zeros((2, 3, 8)))


@pytest.mark.parametrize("feature_map, focusing_factor", NEW_MAPS)
def test_gradients_are_finite_with_padding_and_zero_features(feature_map, focusing_factor):
    # TensorFlow only (tf.GradientTape). relu(x) = 0 for a whole head puts the focused
    # map's norms at 0, where a plain sqrt has an infinite gradient.
    import tensorflow as tf

    rng = np.random.default_rng(6)
    query = rng.normal(size=(2, 4, 8)).astype("float32")
    query[0] = 0.0  # zero projections (no bias below): relu(x) = 0 in every head
    key = rng.normal(size=(2, 5, 8)).astype("float32") * 30
    key_mask = np.array([[1, 1, 0, 0, 0], [0] * 5], bool)
    layer = layers.NormalizedLinearAttention(2, 4, feature_map=feature_map,
                                             focusing_factor=focusing_factor, use_bias=False)
    layer(query, key)
    query, key = tf.constant(query), tf.constant(key)
    with tf.GradientTape() as tape:
        tape.watch([query, key])
        loss = tf.reduce_sum(layer(query, key, key_mask=key_mask) ** 2)
    gradients = tape.gradient(loss, [query, key, *layer.trainable_variables])
    for gradient in gradients:
        assert np.isfinite(np_(gradient)).all()


@pytest.mark.parametrize("feature_map", [*feature_maps.FEATURE_MAPS])
def test_no_m_by_n_tensor_in_the_graph(feature_map):
    # TensorFlow only: every op of the traced call, with m = 13 and n = 17 known, has no
    # output holding both: the cost stays O(m + n), whatever the map.
    import tensorflow as tf

    m, n = 13, 17
    layer = layers.NormalizedLinearAttention(2, 4, feature_map=feature_map)
    query, key = np.ones((2, m, 8), "float32"), np.ones((2, n, 8), "float32")
    layer(query, key)
    graph = tf.function(lambda q, k, mask: layer(q, k, key_mask=mask)).get_concrete_function(
        tf.TensorSpec((2, m, 8)), tf.TensorSpec((2, n, 8)), tf.TensorSpec((2, n), tf.bool)
    ).graph
    shapes = [output.shape for op in graph.get_operations() for output in op.outputs
              if output.shape.rank is not None]
    assert shapes and not any(m in shape.as_list() and n in shape.as_list()
                              for shape in shapes)


@pytest.mark.parametrize("feature_map, focusing_factor", NEW_MAPS)
def test_xla_compiled_call_matches(feature_map, focusing_factor):
    # TensorFlow only: `ifa-export --jit_compile` serves the model through XLA.
    import tensorflow as tf

    rng = np.random.default_rng(12)
    query = rng.normal(size=(2, 5, 8)).astype("float32")
    key = rng.normal(size=(2, 9, 8)).astype("float32")
    key_mask = random_mask(rng, 2, 9, 0)
    layer = layers.NormalizedLinearAttention(2, 4, feature_map=feature_map,
                                             focusing_factor=focusing_factor)
    layer(query, key)
    randomize(layer, seed=12)
    compiled = tf.function(lambda q, k, mask: layer(q, k, key_mask=mask), jit_compile=True)
    np.testing.assert_allclose(np_(compiled(query, key, key_mask)),
                               np_(layer(query, key, key_mask=key_mask)), atol=1e-5)


def test_mixed_precision_keeps_a_float32_normaliser():
    rng = np.random.default_rng(9)
    query = (rng.normal(size=(1, 4, 8)) * 3).astype("float32")
    key = (rng.normal(size=(1, 5000, 8)) * 3).astype("float32")  # sums overflow float16
    for feature_map in ("focused", "hedgehog"):
        exact = layers.NormalizedLinearAttention(2, 4, feature_map=feature_map)
        exact(query, key)
        randomize(exact, scale=0.5)
        mixed = layers.NormalizedLinearAttention(2, 4, feature_map=feature_map,
                                                 dtype="mixed_float16")
        mixed(query, key)
        mixed.set_weights(exact.get_weights())
        out = mixed(query, key)
        assert keras.backend.standardize_dtype(out.dtype) == "float16"
        assert np.isfinite(np_(out)).all()
        # float16 projections carry ~1e-3 relative error, which the sharper maps amplify
        # (relu^3, exp): compared at the output's scale.
        assert relative_error(np_(out), np_(exact(query, key))) <= 2e-2


@pytest.mark.jax
@pytest.mark.parametrize("feature_map, focusing_factor", NEW_MAPS)
def test_config_and_keras_file_round_trip(feature_map, focusing_factor, tmp_path):
    rng = np.random.default_rng(7)
    query = rng.normal(size=(2, 3, 8)).astype("float32")
    key = rng.normal(size=(2, 5, 8)).astype("float32")
    layer = layers.NormalizedLinearAttention(2, 4, feature_map=feature_map,
                                             focusing_factor=focusing_factor, epsilon=1e-4)
    config = layer.get_config()
    assert (config["feature_map"], config["focusing_factor"]) == (feature_map, focusing_factor)
    inputs = [keras.Input((None, 8)), keras.Input((None, 8))]
    model = keras.Model(inputs, layer(*inputs))
    randomize(layer, seed=7)
    expected = np_(model([query, key]))
    restored = layers.NormalizedLinearAttention.from_config(config)
    restored(query, key)
    restored.set_weights(layer.get_weights())
    np.testing.assert_allclose(np_(restored(query, key)), expected, atol=1e-6)
    model.save(tmp_path / "attention.keras")
    loaded = keras.saving.load_model(tmp_path / "attention.keras")
    np.testing.assert_allclose(np_(loaded([query, key])), expected, atol=1e-6)


@pytest.mark.jax
def test_bad_feature_map_arguments_name_the_argument_and_value():
    with pytest.raises(ValueError, match="feature_map='exp'"):
        layers.NormalizedLinearAttention(2, 4, feature_map="exp")
    for bad in (0.5, 0, -3, "3", True, math.nan, math.inf):
        with pytest.raises(ValueError, match=f"focusing_factor={bad!r}"):
            layers.NormalizedLinearAttention(2, 4, feature_map="focused", focusing_factor=bad)
    with pytest.raises(ValueError, match="no effect on feature_map='relu'.*focusing_factor=2"):
        layers.NormalizedLinearAttention(2, 4, feature_map="relu", focusing_factor=2)
    with pytest.raises(ValueError, match="focusing_factor=0"):
        layers.CandidateSelfAttention(2, 4, feature_map="focused", focusing_factor=0)


# ------------------------------------------------------------------------- learnable sharpness
# (feature_map, focusing_factor, learnable_temperature, learnable_focusing_factor)
SHARPNESS = [("elu_plus_one", None, True, False), ("softplus", None, True, False),
             ("hedgehog", None, True, False), ("focused", None, False, True),
             ("focused", 1.5, False, True)]


def sharpness_layer(feature_map, focusing_factor, learnable_temperature,
                    learnable_focusing_factor, **kwargs):
    return layers.NormalizedLinearAttention(
        2, 4, feature_map=feature_map, focusing_factor=focusing_factor,
        learnable_temperature=learnable_temperature,
        learnable_focusing_factor=learnable_focusing_factor, **kwargs)


def set_sharpness(layer, temperatures=(0.25, 3.0), powers=(1.5, 5.0)):
    """Learned values far from the start: one sharper and one flatter head."""
    for variable in layer.weights:
        if variable.path.endswith("log_temperature"):
            variable.assign(np.log(np.array(temperatures, "float32")))
        elif variable.path.endswith("focusing_factor"):
            variable.assign(np.array(powers, "float32"))


@pytest.mark.jax
@pytest.mark.parametrize("options", SHARPNESS)
def test_learnable_sharpness_starts_exactly_where_the_fixed_map_is(options):
    # Training starts where today's map starts: same weights, bit-identical output and
    # attention weights; the only new weight is the sharpness.
    feature_map, focusing_factor, _, _ = options
    rng = np.random.default_rng(20)
    query = rng.normal(size=(2, 5, 8)).astype("float32")
    key = rng.normal(size=(2, 7, 8)).astype("float32")
    key_mask = random_mask(rng, 2, 7, 1)
    fixed = layers.NormalizedLinearAttention(2, 4, feature_map=feature_map,
                                             focusing_factor=focusing_factor)
    learnable = sharpness_layer(*options)
    fixed(query, key)
    learnable(query, key)
    randomize(fixed, seed=20)
    shared = named_weights(fixed)
    for variable in learnable.weights:
        name = variable.path.split("/", 1)[1]
        if name in shared:
            variable.assign(shared[name].astype("float32"))
    added = sorted(set(named_weights(learnable)) - set(shared))
    assert added == (["log_temperature"] if options[2] else ["focusing_factor"])
    start = named_weights(learnable)[added[0]]
    np.testing.assert_array_equal(start, [0.0, 0.0] if options[2]
                                  else [focusing_factor or 3] * 2)
    # The temperature (exp(0) = 1) is exact; a power read from a weight rounds differently
    # from an integer power on some backends (JAX multiplies for x^3): float32 rounding.
    tolerance = {} if options[2] else {"rtol": 1e-6, "atol": 1e-7}
    compare = (np.testing.assert_allclose if tolerance else np.testing.assert_array_equal)
    compare(np_(learnable(query, key, key_mask=key_mask)),
            np_(fixed(query, key, key_mask=key_mask)), **tolerance)
    compare(np_(learnable.attention_weights(query, key, key_mask=key_mask)),
            np_(fixed.attention_weights(query, key, key_mask=key_mask)), **tolerance)


@pytest.mark.jax
@pytest.mark.parametrize("options", SHARPNESS)
def test_learned_sharpness_matches_float64_reference(options):
    rng = np.random.default_rng(21)
    query = rng.normal(size=(3, 5, 8)).astype("float32")
    key = rng.normal(size=(3, 9, 8)).astype("float32")
    value = rng.normal(size=(3, 9, 6)).astype("float32")
    query_mask, key_mask = random_mask(rng, 3, 5, 1), random_mask(rng, 3, 9, 1)
    layer = sharpness_layer(*options, value_dim=3, output_dim=5)
    layer(query, key, value)
    randomize(layer, seed=21)
    set_sharpness(layer)
    out = np_(layer(query, key, value, query_mask=query_mask, key_mask=key_mask))
    assert relative_error(out, np_linear_attention(layer, query, key, value, query_mask,
                                                   key_mask)) <= 1e-5
    weights = np_(layer.attention_weights(query, key, query_mask=query_mask,
                                          key_mask=key_mask))
    np.testing.assert_allclose(weights, np_attention_weights(layer, query, key, query_mask,
                                                             key_mask), rtol=1e-5, atol=1e-7)


@pytest.mark.jax
def test_a_lower_temperature_or_a_higher_learned_power_concentrates_the_weights():
    # What `ifa_tf.diagnostics` measures on a model with learnable sharpness: the same
    # projections, with tau from 4 down to 1/4 (elu+1) or p from 1 up to 6 (focused).
    rng = np.random.default_rng(22)
    query = rng.normal(size=(1, 8, 16)).astype("float32")
    key = rng.normal(size=(1, 300, 16)).astype("float32")
    for options, settings in ((SHARPNESS[0], [{"temperatures": (t, t)} for t in (4, 1, 0.25)]),
                              (SHARPNESS[3], [{"powers": (p, p)} for p in (1, 3, 6)])):
        layer = sharpness_layer(*options)
        layer(query, key)
        randomize(layer, seed=22, scale=0.5)
        entropy, top_share = [], []
        for setting in settings:
            set_sharpness(layer, **setting)
            concentration = diagnostics.attention_concentration(
                np_(layer.attention_weights(query, key)))
            entropy.append(np.nanmean(concentration["entropy"]))
            top_share.append(np.nanmean(concentration["top_share"]))
        assert entropy[0] > entropy[1] > entropy[2], options
        assert top_share[0] < top_share[1] < top_share[2], options


@pytest.mark.parametrize("options", SHARPNESS)
def test_sharpness_gets_finite_gradients_and_p_stays_at_least_one(options):
    # TensorFlow only (tf.GradientTape): the learned power's gradient at relu(x) = 0
    # (log 0) and the temperature's reach their weights, finite.
    import tensorflow as tf

    rng = np.random.default_rng(23)
    query = rng.normal(size=(2, 4, 8)).astype("float32")
    query[0, :2] = 0.0  # zero projections (no bias below): relu(x) = 0 in every head
    key = rng.normal(size=(2, 5, 8)).astype("float32")
    key_mask = np.array([[1, 1, 1, 0, 0], [0] * 5], bool)
    layer = sharpness_layer(*options, use_bias=False)
    layer(query, key)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(query, key, key_mask=key_mask) ** 2)
    is_sharpness = [v.path.endswith(("log_temperature", "focusing_factor"))
                    for v in layer.trainable_variables]
    sharpness = [v for v, s in zip(layer.trainable_variables, is_sharpness) if s]
    others = [v for v, s in zip(layer.trainable_variables, is_sharpness) if not s]
    gradients = tape.gradient(loss, [*sharpness, *others])
    assert len(sharpness) == 1 and all(np.isfinite(np_(g)).all() for g in gradients)
    assert np.abs(np_(gradients[0])).max() > 0
    if options[3]:  # an optimizer step that pushes p below 1 is clipped back to 1
        keras.optimizers.SGD(100.0).apply([np.ones(2, "float32")], sharpness)
        np.testing.assert_array_equal(np_(sharpness[0]), [1.0, 1.0])
        # and a value below 1 set by hand is floored in the call: p = 1 is relu
        sharpness[0].assign([0.5, 0.5])
        relu = layers.NormalizedLinearAttention(2, 4, feature_map="relu", use_bias=False)
        relu(query, key)
        learned = named_weights(layer)
        for variable in relu.weights:
            variable.assign(learned[variable.path.split("/", 1)[1]].astype("float32"))
        np.testing.assert_allclose(np_(layer(query, key, key_mask=key_mask)),
                                   np_(relu(query, key, key_mask=key_mask)), atol=1e-6)


@pytest.mark.parametrize("options", [SHARPNESS[0], SHARPNESS[2], SHARPNESS[4]])
def test_xla_compiled_sharpness_matches(options):
    # TensorFlow only: `ifa-export --jit_compile` serves the model through XLA.
    import tensorflow as tf

    rng = np.random.default_rng(24)
    query = rng.normal(size=(2, 5, 8)).astype("float32")
    key = rng.normal(size=(2, 9, 8)).astype("float32")
    key_mask = random_mask(rng, 2, 9, 0)
    layer = sharpness_layer(*options)
    layer(query, key)
    randomize(layer, seed=24)
    set_sharpness(layer)
    compiled = tf.function(lambda q, k, mask: layer(q, k, key_mask=mask), jit_compile=True)
    np.testing.assert_allclose(np_(compiled(query, key, key_mask)),
                               np_(layer(query, key, key_mask=key_mask)), atol=1e-5)


@pytest.mark.jax
@pytest.mark.parametrize("options", [SHARPNESS[0], SHARPNESS[4]])
def test_sharpness_config_and_keras_file_round_trip(options, tmp_path):
    rng = np.random.default_rng(25)
    query = rng.normal(size=(2, 3, 8)).astype("float32")
    key = rng.normal(size=(2, 5, 8)).astype("float32")
    layer = sharpness_layer(*options)
    config = layer.get_config()
    assert (config["learnable_temperature"], config["learnable_focusing_factor"]) == options[2:]
    inputs = [keras.Input((None, 8)), keras.Input((None, 8))]
    model = keras.Model(inputs, layer(*inputs))
    randomize(layer, seed=25)
    set_sharpness(layer)
    expected = np_(model([query, key]))
    model.save(tmp_path / "attention.keras")
    loaded = keras.saving.load_model(tmp_path / "attention.keras")
    np.testing.assert_allclose(np_(loaded([query, key])), expected, atol=1e-6)
    restored = [v for v in loaded.layers[-1].weights if "focusing_factor" in v.path]
    if options[3]:  # the constraint is saved with the weight
        assert isinstance(restored[0].constraint, feature_maps.AtLeastOne)


@pytest.mark.jax
def test_bad_sharpness_arguments_name_the_argument_and_value():
    for feature_map in ("relu", "focused"):
        with pytest.raises(ValueError, match=f"no effect on feature_map='{feature_map}'.*"
                                             "learnable_temperature=True"):
            layers.NormalizedLinearAttention(2, 4, feature_map=feature_map,
                                             learnable_temperature=True)
    with pytest.raises(ValueError, match="no effect on feature_map='elu_plus_one'.*"
                                         "learnable_focusing_factor=True"):
        layers.NormalizedLinearAttention(2, 4, learnable_focusing_factor=True)
    for name in ("learnable_temperature", "learnable_focusing_factor"):
        with pytest.raises(ValueError, match=f"{name}='yes'"):
            layers.NormalizedLinearAttention(2, 4, feature_map="focused", **{name: "yes"})
    with pytest.raises(ValueError, match="learnable_temperature=1"):
        layers.CandidateSelfAttention(2, 4, learnable_temperature=1)


# ------------------------------------------------------------------------- the zoo options
def zoo_model(name, **overrides):
    from ifa_tf import zoo
    from ifa_tf.schema import FeatureSchema

    keras.utils.set_random_seed(1)
    schema = FeatureSchema(embedding_buckets={"user_id": 40, "item_id": 64, "category_id": 8,
                                              "author_id": 16})
    return zoo.build(name, schema=schema, embedding_dim=4, tower_units=[8], **overrides)


def zoo_batch(seed=0, batch=2, n=9, m=4):
    rng = np.random.default_rng(seed)
    features = {"user_id": rng.integers(1, 1000, batch)}
    for attribute, high in (("item_id", 500), ("category_id", 4), ("author_id", 9)):
        features["seq_" + attribute] = rng.integers(1, high, (batch, n))
        features["cand_" + attribute] = rng.integers(1, high, (batch, m))
    features["seq_action"] = rng.integers(0, 8, (batch, n))
    features["seq_time_delta"] = rng.integers(0, 10**7, (batch, n))
    for name in ("cand_cross_author_count", "cand_cross_category_count"):
        features[name] = rng.integers(0, 20, (batch, m))
    features["seq_item_id"][1, 5:] = 0
    features["cand_item_id"][1, 3:] = 0
    return features


def test_zoo_passes_the_new_maps_and_focusing_factor_to_fsm_and_ram(tmp_path):
    from ifa_tf import zoo

    assert "focusing_factor" in zoo.valid_overrides("ifa")
    assert "focusing_factor" in zoo.valid_overrides("ifa_no_ram")
    # The zoo's default FSM map is focused with a learned power (issue 27's comparison).
    default = zoo_model("ifa").get_layer("interest")
    assert (default.feature_map, default.learnable_focusing_factor) == ("focused", True)
    features = zoo_batch()
    for name, overrides in (("ifa", {"feature_map": "focused", "focusing_factor": 2}),
                            ("ifa", {"feature_map": "hedgehog"}),
                            ("ifa_no_ram", {"feature_map": "focused"})):
        model = zoo_model(name, **overrides)
        attentions = [model.get_layer("interest")._attention]
        if name == "ifa":
            attentions.append(model.get_layer("candidate_self_attention"))
        for attention in attentions:
            assert attention.feature_map == overrides["feature_map"]
            assert attention.focusing_factor == overrides.get("focusing_factor")
        if name == "ifa":  # RAM follows the FSM's map and power
            assert model.get_config()["ram_focusing_factor"] == overrides.get(
                "focusing_factor")
        for attention in attentions:  # saved weights, not the identity start
            for variable in attention.weights:
                if "feature" in variable.path:
                    variable.assign(np.random.default_rng(0).normal(
                        scale=0.3, size=variable.shape).astype("float32"))
        base = {k: np_(v) for k, v in model(features).items()}
        assert np.isfinite(base["score"]).all()
        model.save(tmp_path / f"{name}.keras")
        restored = keras.saving.load_model(tmp_path / f"{name}.keras")
        assert (restored.get_layer("interest").get_config()["focusing_factor"]
                == overrides.get("focusing_factor"))
        for task, probabilities in restored(features).items():
            np.testing.assert_allclose(np_(probabilities), base[task], atol=1e-7)


# Every map in each module's place at least once, with the other module on another map.
MAP_PAIRS = [(("elu_plus_one", None), ("relu", None)), (("softplus", None), ("focused", 2)),
             (("relu", None), ("hedgehog", None)), (("focused", 2), ("softplus", None)),
             (("hedgehog", None), ("elu_plus_one", None))]


@pytest.mark.parametrize("fsm, ram", MAP_PAIRS)
def test_zoo_sets_the_fsm_and_ram_maps_apart(fsm, ram, tmp_path):
    overrides = {"feature_map": fsm[0], "focusing_factor": fsm[1], "ram_feature_map": ram[0],
                 "ram_focusing_factor": ram[1]}
    model = zoo_model("ifa", **overrides)
    fsm_attention = model.get_layer("interest")._attention
    ram_attention = model.get_layer("candidate_self_attention")
    assert (fsm_attention.feature_map, fsm_attention.focusing_factor) == fsm
    assert (ram_attention.feature_map, ram_attention.focusing_factor) == ram
    config = model.get_config()
    assert (config["ram_feature_map"], config["ram_focusing_factor"]) == ram
    assert (config["interest"]["config"]["feature_map"],
            config["interest"]["config"]["focusing_factor"]) == fsm
    for variable in model.weights:  # saved weights, not Hedgehog's identity start
        if "feature" in variable.path:
            variable.assign(np.random.default_rng(1).normal(
                scale=0.3, size=variable.shape).astype("float32"))
    features = zoo_batch()
    base = {k: np_(v) for k, v in model(features).items()}
    model.save(tmp_path / "ifa.keras")
    restored = keras.saving.load_model(tmp_path / "ifa.keras")
    assert restored.get_layer("candidate_self_attention").feature_map == ram[0]
    assert restored.get_layer("interest")._attention.feature_map == fsm[0]
    for task, probabilities in restored(features).items():
        np.testing.assert_allclose(np_(probabilities), base[task], atol=1e-7)


def test_ram_follows_the_fsm_map_unless_set_apart():
    from ifa_tf import zoo

    def maps(model):
        ram = model.get_layer("candidate_self_attention")
        return (model.get_layer("interest")._attention.feature_map, ram.feature_map,
                ram.focusing_factor)

    # As before RAM had its own options: feature_map sets both, so earlier configs (e.g.
    # zoo/RESULTS.md's `ifa_relu=ifa:feature_map=relu`) build the same model.
    # The defaults (focused FSM with a learned power, elu+1 RAM) hold as a whole until
    # feature_map is given.
    assert maps(zoo_model("ifa")) == ("focused", "elu_plus_one", None)
    assert maps(zoo_model("ifa", ram_feature_map="relu")) == ("focused", "relu", None)
    assert maps(zoo_model("ifa", feature_map="elu_plus_one")) == (
        "elu_plus_one", "elu_plus_one", None)
    assert maps(zoo_model("ifa", feature_map="relu")) == ("relu", "relu", None)
    assert maps(zoo_model("ifa", feature_map="focused", focusing_factor=2)) == (
        "focused", "focused", 2)
    assert maps(zoo_model("ifa", feature_map="focused", focusing_factor=2,
                          ram_focusing_factor=4)) == ("focused", "focused", 4)
    assert maps(zoo_model("ifa", feature_map="relu", ram_feature_map="elu_plus_one")) == (
        "relu", "elu_plus_one", None)
    assert maps(zoo_model("ifa", feature_map="focused", focusing_factor=2,
                          ram_feature_map="focused")) == ("focused", "focused", None)
    # twin_ram has RAM and no FSM: only RAM's options.
    twin_ram = zoo_model("twin_ram", k=4, ram_feature_map="relu")
    assert twin_ram.get_layer("candidate_self_attention").feature_map == "relu"
    assert "feature_map" not in zoo.valid_overrides("twin_ram")
    for name in ("ifa", "ifa_no_ram"):
        assert {"feature_map", "ram_feature_map", "learnable_temperature",
                "ram_learnable_temperature", "learnable_focusing_factor",
                "ram_learnable_focusing_factor", "exact_matches"} <= set(
                    zoo.valid_overrides(name))


def test_models_saved_before_ram_had_its_own_options_still_load():
    from ifa_tf.models import CandidateSetRanker

    config = zoo_model("ifa", feature_map="focused", focusing_factor=2).get_config()
    for name in ("feature_map", "focusing_factor"):  # the keys of earlier versions
        config[name] = config.pop("ram_" + name)
    restored = CandidateSetRanker.from_config(config)
    ram = restored.get_layer("candidate_self_attention")
    assert (ram.feature_map, ram.focusing_factor) == ("focused", 2)


def test_zoo_learnable_sharpness_starts_where_the_model_without_it_is(tmp_path):
    # The FSM's temperature and RAM's focusing power: the only new weights, and at the
    # start the model's outputs are those of the model without them.
    base = zoo_model("ifa", feature_map="elu_plus_one", ram_feature_map="focused")
    learnable = zoo_model("ifa", feature_map="elu_plus_one", ram_feature_map="focused",
                          learnable_temperature=True, ram_learnable_focusing_factor=True)
    known = {w.path for w in base.weights}
    added = [w for w in learnable.weights if w.path not in known]
    assert sorted(w.path for w in added) == ["candidate_self_attention/focusing_factor",
                                             "interest/attention/log_temperature"]
    features = zoo_batch()
    expected = {k: np_(v) for k, v in base(features).items()}
    for task, value in learnable(features).items():
        np.testing.assert_allclose(np_(value), expected[task], rtol=1e-6, atol=1e-7)
    # Trained, saved and restored with what it learned.
    start = [np_(w) for w in added]
    learnable.compile(optimizer=keras.optimizers.Adam(0.05))
    labels = {t: (np.random.default_rng(0).random((2, 4)) < 0.5).astype("float32")
              for t in ("impression", "click", "long_view", "like")}
    learnable.fit(features, labels, epochs=2, batch_size=2, verbose=0)
    assert all(np.abs(np_(w) - s).max() > 1e-3 for w, s in zip(added, start))
    learnable.save(tmp_path / "sharp.keras")
    restored = keras.saving.load_model(tmp_path / "sharp.keras")
    for task, value in restored(features).items():
        np.testing.assert_allclose(np_(value), np_(learnable(features)[task]), atol=1e-7)


def test_config_overrides_reach_both_modules():
    # `ifa-train --set model.ram_feature_map=...` and zoo_results' `--extra_run` rows.
    from ifa_tf import training, zoo
    from ifa_tf.schema import FeatureSchema

    config = training.load_config("ifa", overrides=[
        "model.feature_map=relu", "model.ram_feature_map=elu_plus_one",
        "model.ram_learnable_temperature=true", "model.exact_matches=true",
        "model.embedding_dim=4", "model.tower_units=[8]"])
    model = zoo.build("ifa", schema=FeatureSchema(embedding_buckets={
        "user_id": 40, "item_id": 64, "category_id": 8, "author_id": 16}),
        **config.model.overrides)
    ram = model.get_layer("candidate_self_attention")
    assert model.get_layer("interest")._attention.feature_map == "relu"
    assert (ram.feature_map, ram.learnable_temperature) == ("elu_plus_one", True)
    assert model.get_layer("interest").exact_matches is True
    with pytest.raises(ValueError, match="ram_featuremap"):
        training.load_config("ifa", overrides=["model.ram_featuremap=relu"])


def test_saved_configs_name_the_defaults_they_ran_with():
    # A run's config.yaml writes the zoo's defaults out, so a config saved before a default
    # changed (no map keys) no longer matches today's: zoo_results refuses to reuse it.
    from ifa_tf import training, zoo

    overrides = training.load_config("ifa").model.overrides
    assert {k: overrides[k] for k in zoo.IFA_DEFAULTS} == zoo.IFA_DEFAULTS
    assert "ram_feature_map" not in training.load_config(
        "ifa_no_ram", overrides=["model.feature_map=relu"]).model.overrides
    old = training.Config.from_dict({"model": {"name": "ifa"}})
    assert old.to_yaml() != training.load_config("ifa", config_dir="/nonexistent").to_yaml()
    with pytest.raises(ValueError, match="ifa's defaults .* pass feature_map="):
        zoo_model("ifa", learnable_temperature=True)


def test_zoo_rejects_bad_feature_map_options_by_name():
    with pytest.raises(ValueError, match="focusing_factor=0.5"):
        zoo_model("ifa", feature_map="focused", focusing_factor=0.5)
    with pytest.raises(ValueError, match="no effect on feature_map='relu'"):
        zoo_model("ifa_no_ram", feature_map="relu", focusing_factor=2)
    with pytest.raises(ValueError, match="feature_map='tanh'"):
        zoo_model("ifa_no_ram", feature_map="tanh")
    with pytest.raises(ValueError, match="ram_focusing_factor=0.5"):
        zoo_model("ifa", ram_feature_map="focused", ram_focusing_factor=0.5)
    with pytest.raises(ValueError, match="no effect on ram_feature_map='relu'.*"
                                         "ram_learnable_temperature=True"):
        zoo_model("ifa", feature_map="relu", ram_learnable_temperature=True)
    with pytest.raises(ValueError, match="ram_feature_map='tanh'"):
        zoo_model("ifa", ram_feature_map="tanh")
    with pytest.raises(ValueError, match="learnable_temperature=True"):
        zoo_model("ifa", feature_map="focused", learnable_temperature=True)
    with pytest.raises(ValueError, match="exact_matches='yes'"):
        zoo_model("ifa", exact_matches="yes")


# ------------------------------------------------------------------------- the diagnostic
@pytest.mark.jax
@pytest.mark.parametrize("feature_map, focusing_factor",
                         [("elu_plus_one", None), ("relu", None), *NEW_MAPS])
def test_attention_weights_are_the_weights_the_layer_applies(feature_map, focusing_factor):
    rng = np.random.default_rng(8)
    query = rng.normal(size=(2, 5, 8)).astype("float32")
    key = rng.normal(size=(2, 9, 8)).astype("float32")
    query_mask, key_mask = random_mask(rng, 2, 5, 1), random_mask(rng, 2, 9, 1)
    layer = layers.NormalizedLinearAttention(2, 4, value_dim=3, feature_map=feature_map,
                                             focusing_factor=focusing_factor,
                                             use_output_projection=False)
    with pytest.raises(ValueError, match="call the layer once"):
        layer.attention_weights(query, key)
    layer(query, key)
    randomize(layer, seed=8)
    weights = np_(layer.attention_weights(query, key, query_mask=query_mask,
                                          key_mask=key_mask))
    assert weights.shape == (2, 2, 5, 9)
    if feature_map in ("focused", "hedgehog"):
        ref = np_attention_weights(layer, query, key, query_mask, key_mask)
        np.testing.assert_allclose(weights, ref, rtol=1e-5, atol=1e-7)
    assert (weights[~np.broadcast_to(key_mask[:, None, None, :], weights.shape)] == 0).all()
    assert (weights[~np.broadcast_to(query_mask[:, None, :, None], weights.shape)] == 0).all()
    w = named_weights(layer)
    values = np.tensordot(key, w["value/kernel"], axes=([-1], [0])) + w["value/bias"]
    applied = np.einsum("bhmn,bnhv->bmhv", weights, values).reshape(2, 5, 6)
    out = np_(layer(query, key, query_mask=query_mask, key_mask=key_mask))
    np.testing.assert_allclose(applied, out, rtol=1e-5, atol=1e-6)


def np_concentration(weights, key_mask, top_fraction):
    """Entropy and top share of every row, one row at a time, by the definitions."""
    entropy, top_share = np.full(weights.shape[:-1], np.nan), np.full(weights.shape[:-1],
                                                                      np.nan)
    for index in np.ndindex(*weights.shape[:-1]):
        row = weights[index][key_mask[index]]
        if row.size == 0 or row.sum() == 0:
            continue
        p = row / row.sum()
        entropy[index] = -sum(x * math.log(x) for x in p if x > 0)
        top = max(1, math.ceil(round(top_fraction * row.size, 9)))
        top_share[index] = sum(sorted(p, reverse=True)[:top])
    return entropy, top_share


@pytest.mark.jax
def test_attention_concentration_by_hand_and_against_its_definition():
    weights = np.array([[[0.25, 0.25, 0.25, 0.25, 9.0, 9.0],  # uniform over 4 valid
                         [0.0, 0.0, 0.7, 0.0, 0.0, 0.0],  # one event
                         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])  # a padded query
    key_mask = np.array([[1, 1, 1, 1, 0, 0]], bool)
    got = diagnostics.attention_concentration(weights, key_mask, top_fraction=0.5)
    np.testing.assert_allclose(got["entropy"][0, :2], [math.log(4), 0.0])
    np.testing.assert_allclose(got["top_share"][0, :2], [0.5, 1.0])
    assert np.isnan(got["entropy"][0, 2]) and np.isnan(got["top_share"][0, 2])
    np.testing.assert_array_equal(got["num_events"], [[4, 4, 4]])

    rng = np.random.default_rng(0)
    weights = rng.random((3, 2, 4, 300)) ** 8  # [B, heads, m, n], a few large weights
    key_mask = random_mask(rng, 3, 300, 0)
    key_mask[0] = True
    key_mask[1, 250:] = False
    for top_fraction in (0.01, 0.1, 1.0):
        got = diagnostics.attention_concentration(weights, key_mask, top_fraction)
        entropy, top_share = np_concentration(
            weights, np.broadcast_to(key_mask[:, None, None, :], weights.shape), top_fraction)
        np.testing.assert_allclose(got["entropy"], entropy, rtol=1e-12)
        np.testing.assert_allclose(got["top_share"], top_share, rtol=1e-12)
    # 1% of 300 events is 3, not 4 (0.01 * 300 is 3.0000000000000004 in floating point).
    top3 = np.sort(weights[0, 0, 0])[-3:].sum() / weights[0, 0, 0].sum()
    np.testing.assert_allclose(
        diagnostics.attention_concentration(weights, key_mask)["top_share"][0, 0, 0], top3)
    with pytest.raises(ValueError, match="top_fraction=0"):
        diagnostics.attention_concentration(weights, key_mask, top_fraction=0)
    with pytest.raises(ValueError, match="non-negative"):
        diagnostics.attention_concentration(-weights, key_mask)


@pytest.mark.jax
def test_focused_weights_grow_more_concentrated_with_p():
    # The point of the map (FLatten's "focus"): on the same projections, a larger p
    # gives lower entropy and more weight on the top events than relu (p = 1).
    rng = np.random.default_rng(10)
    query = rng.normal(size=(1, 8, 16)).astype("float32")
    key = rng.normal(size=(1, 400, 16)).astype("float32")
    results = {}
    for p in (1, 3, 6):
        layer = layers.NormalizedLinearAttention(2, 8, feature_map="focused",
                                                 focusing_factor=p)
        layer(query, key)
        randomize(layer, seed=10, scale=0.5)
        concentration = diagnostics.attention_concentration(
            np_(layer.attention_weights(query, key)))
        results[p] = (np.nanmean(concentration["entropy"]),
                      np.nanmean(concentration["top_share"]))
    assert results[1][0] > results[3][0] > results[6][0]
    assert results[1][1] < results[3][1] < results[6][1]


@pytest.mark.jax
def test_weight_on_matches_by_hand():
    # One request, one head, three queries over five events (the last one padded).
    weights = np.array([[[[0.1, 0.1, 0.1, 0.1, 5.0],     # uniform: lift 1
                          [0.0, 0.6, 0.0, 0.6, 0.0],     # all on its two matches
                          [0.2, 0.2, 0.2, 0.2, 0.0]]]])  # id 9 never occurs
    key_ids = np.array([[7, 8, 3, 8, 0]])
    query_ids = np.array([[8, 8, 9]])
    got = diagnostics.weight_on_matches(weights, query_ids, key_ids)
    np.testing.assert_allclose(got["weight_share"][0, 0, :2], [0.5, 1.0])
    np.testing.assert_allclose(got["event_share"][0, 0, :2], [0.5, 0.5])
    np.testing.assert_allclose(got["lift"][0, 0, :2], [1.0, 2.0])
    assert np.isnan(got["lift"][0, 0, 2])
    with pytest.raises(ValueError, match="heads, m, n"):
        diagnostics.weight_on_matches(weights[0], query_ids, key_ids)


def test_learned_sharpness_reads_every_attentions_heads():
    model = zoo_model("ifa", feature_map="elu_plus_one", learnable_temperature=True,
                      ram_feature_map="focused", ram_focusing_factor=2,
                      ram_learnable_focusing_factor=True)
    got = diagnostics.learned_sharpness(model)
    assert sorted(got) == ["candidate_self_attention", "interest/attention"]
    np.testing.assert_array_equal(got["interest/attention"]["temperature"], [1.0, 1.0])
    np.testing.assert_array_equal(got["candidate_self_attention"]["focusing_factor"],
                                  [2.0, 2.0])
    for variable in model.weights:
        if variable.path.endswith("log_temperature"):
            variable.assign(np.log(np.array([0.5, 2.0], "float32")))
        elif variable.path.endswith("focusing_factor"):
            variable.assign(np.array([0.5, 4.0], "float32"))  # the layer floors p at 1
    got = diagnostics.learned_sharpness(model)
    np.testing.assert_allclose(got["interest/attention"]["temperature"], [0.5, 2.0],
                               rtol=1e-6)
    np.testing.assert_array_equal(got["candidate_self_attention"]["focusing_factor"],
                                  [1.0, 4.0])
    assert diagnostics.learned_sharpness(zoo_model("ifa", feature_map="elu_plus_one")) == {}
    np.testing.assert_array_equal(  # the default: the FSM's power, from 3
        diagnostics.learned_sharpness(zoo_model("ifa"))["interest/attention"][
            "focusing_factor"], [3.0, 3.0])


def test_exact_matches_of_named_attributes_only():
    # exact_matches=[...] matches only those attributes: here the item, so the module adds
    # one count and one recency embedding (2 * exact_match_dim) where True adds three pairs.
    from ifa_tf import training

    config = training.load_config("ifa", overrides=["model.exact_matches=[item_id]"])
    assert config.model.overrides["exact_matches"] == ["item_id"]
    item_only = zoo_model("ifa", exact_matches=["item_id"], exact_match_dim=3)
    every = zoo_model("ifa", exact_matches=True, exact_match_dim=3)
    module, module_all = item_only.get_layer("interest"), every.get_layer("interest")
    assert module._match_attributes == ["item_id"]
    assert len(module_all._match_attributes) > 1
    assert sorted(module._match_embeddings) == ["item_id_match_count_embedding",
                                                "item_id_match_recency_embedding"]
    scores = item_only(zoo_batch())
    assert all(np.isfinite(np_(v)).all() for v in scores.values())
    restored = item_only.from_config(item_only.get_config())
    assert restored.get_layer("interest").exact_matches == ["item_id"]
    with pytest.raises(ValueError, match=r"exact_matches names \['itemid'\].*given \["):
        zoo_model("ifa", exact_matches=["itemid"])
    for bad in ([], ["item_id", "item_id"], "item_id"):
        with pytest.raises(ValueError, match=r"exact_matches=" + re.escape(repr(bad))):
            zoo_model("ifa", exact_matches=bad)
