"""Layer tests against independent float64 NumPy references. Backend-independent: CI runs
this file on TensorFlow and again with KERAS_BACKEND=jax."""

import keras
import numpy as np
import pytest
from keras import ops

from ifa_tf import layers

pytestmark = pytest.mark.jax

PHI = {
    "elu_plus_one": lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0))),
    "softplus": lambda x: np.log1p(np.exp(x)),
    "relu": lambda x: np.maximum(x, 0.0),
}


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def randomize(layer, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(scale=scale, size=w.shape).astype("float32")
                       for w in layer.get_weights()])
    return {w.path.split("/")[-2] + "/" + w.name: np_(w) for w in layer.weights}


def round_trip(layer, *args, **kwargs):
    """Config round trip + weights: the restored layer gives the same output."""
    expected = np_(_first(layer(*args, **kwargs)))
    restored = layer.__class__.from_config(layer.get_config())
    restored(*args, **kwargs)
    restored.set_weights(layer.get_weights())
    np.testing.assert_allclose(np_(_first(restored(*args, **kwargs))), expected, atol=1e-6)


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def random_mask(rng, batch, length, min_valid=0):
    lengths = rng.integers(min_valid, length + 1, size=batch)
    return np.arange(length)[None, :] < lengths[:, None]


def dense(x, kernel, bias=None):
    """x [..., d] with kernel [d, *out] (EinsumDense '...d,d...->...')."""
    out = np.tensordot(x, kernel, axes=([-1], [0]))
    return out if bias is None else out + bias


def output_dense(x, kernel, bias):
    """x [..., h, c] with kernel [h, c, d]."""
    return np.tensordot(x, kernel, axes=([-2, -1], [0, 1])) + bias


def attention_weights(layer):
    w = {v.path.split("/")[-2] + "/" + v.name: np_(v) for v in layer.weights}
    return lambda name, part: w.get(f"{name}/{part}")


# ----------------------------------------------------------------------------------- IFA
def reference_linear_attention(layer, query, key, value, query_mask, key_mask, phi):
    """D^-1 (phi(Q) phi(K)^T) V with the [m, n] matrix formed explicitly, in float64."""
    w = attention_weights(layer)
    q = PHI[phi](dense(query, w("query", "kernel"), w("query", "bias")))  # [B, m, h, c]
    k = PHI[phi](dense(key, w("key", "kernel"), w("key", "bias")))
    v = dense(value, w("value", "kernel"), w("value", "bias"))
    scores = np.einsum("bmhc,bnhc->bhmn", q, k) * key_mask[:, None, None, :]
    degree = scores.sum(-1, keepdims=True) + layer.epsilon
    attended = np.einsum("bhmn,bnhv->bmhv", scores / degree, v)
    if not layer.use_output_projection:  # Eq. 6 as written: the heads are the output
        return attended.reshape(*attended.shape[:2], -1) * query_mask[..., None]
    out = output_dense(attended, w("attention_output", "kernel"),
                       w("attention_output", "bias"))
    return out * query_mask[..., None]


@pytest.mark.parametrize("phi", sorted(PHI))
@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_normalized_linear_attention_matches_float64_reference(phi, num_heads):
    rng = np.random.default_rng(num_heads)
    batch, m, n, d = 3, 7, 11, 12
    query = rng.normal(size=(batch, m, d)).astype("float32")
    key = rng.normal(size=(batch, n, d)).astype("float32")
    value = rng.normal(size=(batch, n, 10)).astype("float32")
    query_mask, key_mask = random_mask(rng, batch, m, 1), random_mask(rng, batch, n, 1)
    layer = layers.NormalizedLinearAttention(num_heads, key_dim=5, value_dim=4, output_dim=6,
                                             feature_map=phi)
    layer(query, key, value)
    randomize(layer, seed=num_heads)
    out = np_(layer(query, key, value, query_mask=query_mask, key_mask=key_mask))
    ref = reference_linear_attention(layer, query, key, value, query_mask, key_mask, phi)
    assert out.shape == (batch, m, 6)
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5


def test_normalized_linear_attention_without_output_projection_is_equation_6():
    rng = np.random.default_rng(11)
    query = rng.normal(size=(2, 5, 8)).astype("float32")
    key = rng.normal(size=(2, 9, 8)).astype("float32")
    query_mask, key_mask = random_mask(rng, 2, 5, 1), random_mask(rng, 2, 9, 1)
    layer = layers.NormalizedLinearAttention(3, 4, value_dim=2, use_output_projection=False)
    layer(query, key)
    randomize(layer)
    out = np_(layer(query, key, query_mask=query_mask, key_mask=key_mask))
    assert out.shape == (2, 5, 6) and not any("attention_output" in w.path
                                              for w in layer.weights)
    ref = reference_linear_attention(layer, query, key, key, query_mask, key_mask,
                                     "elu_plus_one")
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5
    round_trip(layer, query, key, key_mask=key_mask)
    with pytest.raises(ValueError, match="output_dim=8"):
        layers.NormalizedLinearAttention(2, 4, output_dim=8, use_output_projection=False)


def test_normalized_linear_attention_ignores_padded_keys_and_their_values():
    rng = np.random.default_rng(1)
    query = rng.normal(size=(2, 5, 8)).astype("float32")
    key = rng.normal(size=(2, 6, 8)).astype("float32")
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2], bool)
    layer = layers.NormalizedLinearAttention(2, 4)
    base = np_(layer(query, key, key_mask=mask))
    # Append 3 padded keys and scramble what is stored at every padded position.
    longer = np.concatenate([key, rng.normal(size=(2, 3, 8)).astype("float32")], axis=1)
    longer[1, 4:] = rng.normal(size=(5, 8)) * 100
    longer_mask = np.concatenate([mask, np.zeros((2, 3), bool)], axis=1)
    np.testing.assert_allclose(np_(layer(query, longer, key_mask=longer_mask)), base,
                               atol=1e-6)


def test_normalized_linear_attention_batch_of_one_equals_its_row_of_a_batch():
    # A batch of one takes 2-D products on TensorFlow (a branch when the batch size is only
    # known at run time, as in a SavedModel); larger batches the batched ones.
    rng = np.random.default_rng(5)
    query = rng.normal(size=(3, 5, 8)).astype("float32")
    key = rng.normal(size=(3, 9, 8)).astype("float32")
    query_mask, key_mask = random_mask(rng, 3, 5, 1), random_mask(rng, 3, 9, 1)
    layer = layers.NormalizedLinearAttention(2, 4, use_output_projection=False)
    layer(query, key)
    randomize(layer)
    calls = [lambda *args: layer(args[0], args[1], query_mask=args[2], key_mask=args[3])]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        calls.append(tf.function(calls[0], input_signature=[
            tf.TensorSpec([None, None, 8]), tf.TensorSpec([None, None, 8]),
            tf.TensorSpec([None, None], tf.bool), tf.TensorSpec([None, None], tf.bool)]))
    batched = np_(calls[0](query, key, query_mask, key_mask))
    for call in calls:
        np.testing.assert_allclose(np_(call(query, key, query_mask, key_mask)), batched,
                                   atol=1e-6)
        for i in range(3):
            one = [x[i:i + 1] for x in (query, key, query_mask, key_mask)]
            np.testing.assert_allclose(np_(call(*one)), batched[i:i + 1], atol=1e-6)


def test_masked_row_helpers_match_their_definition():
    # On TensorFlow `zero_masked_rows` skips its pass when every row is valid and
    # `masked_row_sum` is a matvec; both must equal the plain expressions, in a graph with
    # unknown shapes too (both branches of the skip).
    from ifa_tf.layers.fast_ops import masked_row_sum, zero_masked_rows

    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 7, 3)).astype("float32")
    calls = [lambda x, mask: (zero_masked_rows(x, mask), masked_row_sum(x, mask),
                              masked_row_sum(x))]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        calls.append(tf.function(calls[0], input_signature=[
            tf.TensorSpec([None, None, 3]), tf.TensorSpec([None, None], tf.bool)]))
    for mask in (np.ones((2, 7), bool), random_mask(rng, 2, 7, 1), np.zeros((2, 7), bool)):
        weights = mask[..., None].astype("float64")
        for call in calls:
            zeroed, total, unmasked = call(x, mask)
            np.testing.assert_array_equal(np_(zeroed), x * weights)
            np.testing.assert_allclose(np_(total), (x * weights).sum(1), atol=1e-6)
            np.testing.assert_allclose(np_(unmasked), x.sum(1, dtype="float64"), atol=1e-6)


def test_normalized_linear_attention_all_padding_is_finite():
    layer = layers.NormalizedLinearAttention(2, 4, feature_map="relu")
    query = np.ones((2, 3, 8), "float32")
    for key in (np.ones((2, 5, 8), "float32"), np.ones((2, 0, 8), "float32")):
        out = np_(layer(query, key, key_mask=np.zeros(key.shape[:2], bool)))
        assert np.isfinite(out).all()


def test_normalized_linear_attention_keras_mask_equals_explicit_mask():
    rng = np.random.default_rng(2)
    ids = np.array([[3, 4, 5, 0, 0], [7, 0, 0, 0, 0]])
    embedding = keras.layers.Embedding(10, 8, mask_zero=True)
    query = rng.normal(size=(2, 4, 8)).astype("float32")
    layer = layers.NormalizedLinearAttention(2, 4)
    automatic = layer(query, embedding(ids))
    explicit = layer(query, embedding(ids), key_mask=ids != 0)
    np.testing.assert_allclose(np_(automatic), np_(explicit), atol=1e-7)


def test_normalized_linear_attention_round_trip_and_bad_arguments():
    query = np.ones((1, 3, 8), "float32")
    round_trip(layers.NormalizedLinearAttention(2, 4, feature_map="softplus", epsilon=1e-3),
               query, query)
    with pytest.raises(ValueError, match="feature_map='tanh'"):
        layers.NormalizedLinearAttention(2, 4, feature_map="tanh")
    with pytest.raises(ValueError, match="num_heads=0"):
        layers.NormalizedLinearAttention(0, 4)
    with pytest.raises(ValueError, match="epsilon=0"):
        layers.NormalizedLinearAttention(2, 4, epsilon=0)


def test_candidate_self_attention_is_masked_linear_self_attention():
    rng = np.random.default_rng(3)
    candidates = rng.normal(size=(2, 6, 8)).astype("float32")
    mask = np.array([[1] * 6, [1] * 3 + [0] * 3], bool)
    layer = layers.CandidateSelfAttention(2, 4)
    layer(candidates)
    randomize(layer)
    out = np_(layer(candidates, candidate_mask=mask))
    ref = reference_linear_attention(layer, candidates, candidates, candidates, mask, mask,
                                     "elu_plus_one")
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5
    # Padded candidates change no valid candidate's output.
    scrambled = candidates.copy()
    scrambled[1, 3:] = rng.normal(size=(3, 8)) * 50
    np.testing.assert_allclose(np_(layer(scrambled, candidate_mask=mask)), out, atol=1e-6)
    round_trip(layer, candidates, candidate_mask=mask)


# ------------------------------------------------------------------------ target attention
def reference_softmax_attention(layer, query, key, key_mask, query_mask, bias=None):
    w = attention_weights(layer)
    q = dense(query, w("query", "kernel"), w("query", "bias"))
    k = dense(key, w("key", "kernel"), w("key", "bias"))
    v = dense(key, w("value", "kernel"), w("value", "bias"))
    per_candidate = key.ndim == 4
    logits = (np.einsum("bmhc,bmkhc->bmhk", q, k) if per_candidate
              else np.einsum("bmhc,bnhc->bmhn", q, k)) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias[:, :, None, :]
    mask = key_mask[:, :, None, :] if per_candidate else key_mask[:, None, None, :]
    logits = np.where(mask, logits, -np.inf)
    with np.errstate(invalid="ignore"):
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights = np.nan_to_num(weights / weights.sum(-1, keepdims=True))
    attended = (np.einsum("bmhk,bmkhc->bmhc", weights, v) if per_candidate
                else np.einsum("bmhn,bnhc->bmhc", weights, v))
    out = output_dense(attended, w("attention_output", "kernel"),
                       w("attention_output", "bias"))
    return out * query_mask[..., None]


@pytest.mark.parametrize("per_candidate", [False, True])
def test_masked_target_attention_matches_reference(per_candidate):
    rng = np.random.default_rng(4)
    batch, m, n, d = 2, 5, 9, 8
    query = rng.normal(size=(batch, m, d)).astype("float32")
    key_shape = (batch, m, n, d) if per_candidate else (batch, n, d)
    key = rng.normal(size=key_shape).astype("float32")
    key_mask = rng.random(key_shape[:-1]) < 0.7
    key_mask[0, ...] = False  # a request with no valid key at all
    query_mask = random_mask(rng, batch, m, 1)
    bias = rng.normal(size=(batch, m, n)).astype("float32") if per_candidate else None
    layer = layers.MaskedTargetAttention(2, 4)
    layer(query, key)
    randomize(layer)
    out = np_(layer(query, key, key_mask=key_mask, query_mask=query_mask,
                    attention_bias=bias))
    ref = reference_softmax_attention(layer, query, key, key_mask, query_mask, bias)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert np.isfinite(out).all()
    round_trip(layer, query, key, key_mask=key_mask)


def test_masked_target_attention_key_indices_equal_the_gathered_keys():
    rng = np.random.default_rng(12)
    batch, m, n, d, k = 2, 4, 9, 8, 3
    query = rng.normal(size=(batch, m, d)).astype("float32")
    key = rng.normal(size=(batch, n, d)).astype("float32")
    indices = rng.integers(0, n, size=(batch, m, k)).astype("int32")
    key_mask = rng.random((batch, m, k)) < 0.7
    query_mask = random_mask(rng, batch, m, 1)
    layer = layers.MaskedTargetAttention(2, 4)
    layer(query, key)
    randomize(layer)
    gathered = np.take_along_axis(key[:, None], indices[..., None], axis=2)  # [B, m, k, d]
    np.testing.assert_allclose(
        np_(layer(query, key, query_mask=query_mask, key_mask=key_mask, key_indices=indices)),
        reference_softmax_attention(layer, query, gathered, key_mask, query_mask),
        rtol=1e-4, atol=1e-5)


def test_din_activation_unit_equals_mlp_on_concatenation():
    rng = np.random.default_rng(5)
    query = rng.normal(size=(2, 4, 6)).astype("float32")
    key = rng.normal(size=(2, 7, 6)).astype("float32")
    key_mask = random_mask(rng, 2, 7, 1)
    layer = layers.DINActivationUnit(hidden_units=[5, 3], activation="relu",
                                     weight_normalization="none")
    layer(query, key)
    randomize(layer)
    w = {v.name: np_(v) for v in layer.weights if "dense" not in v.path}
    hidden_w = [np_(v) for v in layer.weights if "dense" in v.path]
    # DIN's formulation: an MLP of [q, k, q - k, q * k] for every (candidate, item) pair.
    q = np.broadcast_to(query[:, :, None, :], (2, 4, 7, 6))
    k = np.broadcast_to(key[:, None, :, :], (2, 4, 7, 6))
    first = np.concatenate([w["query_kernel"], w["key_kernel"], w["difference_kernel"],
                            w["product_kernel"]], axis=0)
    h = np.maximum(np.concatenate([q, k, q - k, q * k], -1) @ first + w["first_bias"], 0)
    h = np.maximum(h @ hidden_w[0] + hidden_w[1], 0)
    logits = (h @ hidden_w[2] + hidden_w[3])[..., 0] * key_mask[:, None, :]
    ref = np.einsum("bmk,bkd->bmd", logits, key)
    np.testing.assert_allclose(np_(layer(query, key, key_mask=key_mask)), ref,
                               rtol=1e-4, atol=1e-5)
    round_trip(layer, query, key, key_mask=key_mask)


# ---------------------------------------------------------------------------- search units
def test_sim_hard_search_keeps_most_recent_same_category_items():
    sequence_categories = np.array([[1, 2, 1, 1, 3, 1, 1]])
    sequence_mask = np.array([[1, 1, 1, 1, 1, 1, 0]], bool)  # the last item is padding
    indices, selected = layers.SIMHardSearch(k=3)(
        np.array([[1, 3, 4]]), sequence_categories, sequence_mask)
    np.testing.assert_array_equal(np_(indices)[0, 0], [5, 3, 2])  # most recent first
    np.testing.assert_array_equal(np_(selected)[0], [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert np_(indices)[0, 1, 0] == 4


def test_sim_soft_search_matches_numpy_top_k():
    rng = np.random.default_rng(6)
    candidates = rng.normal(size=(2, 3, 4)).astype("float32")
    sequence = rng.normal(size=(2, 9, 4)).astype("float32")
    mask = random_mask(rng, 2, 9, 4)
    indices, selected, scores = layers.SIMSoftSearch(k=4)(candidates, sequence, mask)
    inner = np.einsum("bme,bne->bmn", candidates, sequence)
    inner = np.where(mask[:, None, :], inner, -np.inf)
    expected = np.argsort(-inner, axis=-1)[..., :4]
    valid = np.take_along_axis(np.isfinite(inner), expected, -1)
    np.testing.assert_array_equal(np.where(valid, expected, 0), np_(indices))
    np.testing.assert_array_equal(valid, np_(selected))
    np.testing.assert_allclose(np_(scores), np.where(
        valid, np.take_along_axis(inner, expected, -1), 0), rtol=1e-5)


def test_twin_attention_is_softmax_attention_over_light_attention_top_k():
    rng = np.random.default_rng(7)
    batch, m, n, d, k = 2, 4, 12, 8, 3
    query = rng.normal(size=(batch, m, d)).astype("float32")
    key = rng.normal(size=(batch, n, d)).astype("float32")
    key_mask = random_mask(rng, batch, n, 5)
    layer = layers.TWINAttention(k=k, num_heads=2, key_dim=4)
    layer(query, key)
    randomize(layer)
    w = attention_weights(layer)
    q = dense(query, w("query", "kernel"), w("query", "bias"))
    keys = dense(key, w("key", "kernel"), w("key", "bias"))
    light = np.where(key_mask[:, None, :], np.einsum("bmhc,bnhc->bmn", q, keys), -np.inf)
    top = np.argsort(-light, axis=-1)[..., :k]
    selected_mask = np.zeros((batch, m, n), bool)
    np.put_along_axis(selected_mask, top, True, axis=-1)
    # The ESU over the GSU's choice equals softmax attention restricted to those items.
    esu = layers.MaskedTargetAttention(2, 4)
    esu(query, key)
    esu.set_weights(layer.get_weights())
    ref = reference_softmax_attention(esu, query, np.broadcast_to(
        key[:, None], (batch, m, n, d)), selected_mask & key_mask[:, None, :],
        np.ones((batch, m), bool))
    np.testing.assert_allclose(np_(layer(query, key, key_mask=key_mask)), ref,
                               rtol=1e-4, atol=1e-5)
    round_trip(layer, query, key, key_mask=key_mask)


def test_search_units_handle_sequences_shorter_than_k_and_empty():
    query = np.ones((2, 3, 8), "float32")
    for n in (0, 2):
        key = np.ones((2, n, 8), "float32")
        mask = np.ones((2, n), bool)
        assert np.isfinite(np_(layers.TWINAttention(k=5)(query, key, key_mask=mask))).all()
        _, selected = layers.SIMHardSearch(k=5)(np.ones((2, 3), "int32"),
                                                np.ones((2, n), "int32"), mask)
        assert np_(selected).sum() == 2 * 3 * n


# ------------------------------------------------------------------------- ETA and SDIM
def simhash_bits_reference(embeddings, hyperplanes):
    """float64 signs; the data keeps every product clear of 0, so float32 agrees."""
    products = np.asarray(embeddings, np.float64) @ hyperplanes
    assert np.abs(products).min() > 1e-5, "a product too close to 0 to fix the bit"
    return products > 0


def test_eta_search_is_hamming_top_k_with_recent_ties_first():
    rng = np.random.default_rng(10)
    batch, m, n, d, k = 2, 5, 14, 6, 4
    # Few distinct items, each repeated: exact ties (equal signatures) at every distance.
    pool = rng.normal(size=(6, d)).astype("float32")
    sequence = pool[rng.integers(0, 6, size=(batch, n))]
    candidates = pool[rng.integers(0, 6, size=(batch, m))]
    sequence_mask = np.arange(n)[None, :] < np.array([[n], [3]])  # row 1: 3 valid < k
    sequence[0, -1] = candidates[0, 0]  # row 0 has no padding; row 1's padding ...
    sequence[1, 5:] = candidates[1, 0]  # ... hashes like a candidate: never retrieved
    layer = layers.ETASearch(k=k, hash_bits=8, hash_seed=3)
    indices, selected = layer(candidates, sequence, sequence_mask)
    hyperplanes = np_(layer.hyperplanes)
    candidate_bits = simhash_bits_reference(candidates, hyperplanes)
    sequence_bits = simhash_bits_reference(sequence, hyperplanes)
    for b in range(batch):
        valid = np.flatnonzero(sequence_mask[b])
        for i in range(m):
            hamming = (candidate_bits[b, i] != sequence_bits[b, valid]).sum(-1)
            # Documented order: nearest first, then the more recent (higher position).
            order = valid[np.lexsort((-valid, hamming))][:k]
            expected = np.zeros(k, int)
            expected[:len(order)] = order
            np.testing.assert_array_equal(np_(indices)[b, i], expected)
            np.testing.assert_array_equal(np_(selected)[b, i], np.arange(k) < len(order))
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 1
    round_trip(layer, candidates, sequence, sequence_mask)


def sdim_reference(query, key, value, query_mask, key_mask, hyperplanes, num_hashes, bits):
    """SDIM Eq. 12 by brute force: for every candidate, hash function and sequence item,
    O(m n) comparisons of signatures."""
    query_bits = simhash_bits_reference(query, hyperplanes).reshape(
        *query.shape[:2], num_hashes, bits)
    key_bits = simhash_bits_reference(key, hyperplanes).reshape(*key.shape[:2], num_hashes, bits)
    out = np.zeros((*query.shape[:2], value.shape[-1]))
    for b in range(query.shape[0]):
        for i in range(query.shape[1]):
            if not query_mask[b, i]:
                continue
            for h in range(num_hashes):
                total = np.zeros(value.shape[-1])
                for j in range(key.shape[1]):
                    if key_mask[b, j] and (key_bits[b, j, h] == query_bits[b, i, h]).all():
                        total += value[b, j]
                norm = np.linalg.norm(total)
                out[b, i] += (total / norm if norm > 0 else total) / num_hashes
    return out


@pytest.mark.parametrize("num_hashes, hash_bits", [(4, 2), (3, 5)])
def test_sdim_attention_equals_the_brute_force_bucket_sum(num_hashes, hash_bits):
    rng = np.random.default_rng(11)
    batch, m, n, d, d_v = 3, 6, 17, 5, 7
    query = rng.normal(size=(batch, m, d)).astype("float32")
    key = rng.normal(size=(batch, n, d)).astype("float32")
    key[:, :4] = query[:, :1]  # a few items in the first candidate's buckets for sure
    value = rng.normal(size=(batch, n, d_v)).astype("float32")
    key_mask = random_mask(rng, batch, n)
    key_mask[0] = True
    key_mask[1, :] = False  # a request without any valid event reads zeros
    key[2, ~key_mask[2]] = query[2, 1]  # padding that hashes like a candidate
    query_mask = random_mask(rng, batch, m, 1)
    layer = layers.SDIMAttention(num_hashes, hash_bits, hash_seed=1)
    out = np_(layer(query, key, value, query_mask=query_mask, key_mask=key_mask))
    ref = sdim_reference(query, key, value, query_mask, key_mask, np_(layer.hyperplanes),
                         num_hashes, hash_bits)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert np.abs(ref[0, 0]).sum() > 0 and (out[1] == 0).all()
    assert layer.trainable_weights == []
    round_trip(layer, query, key, value, query_mask=query_mask, key_mask=key_mask)


def test_simhash_hyperplanes_are_seeded_and_arguments_checked():
    x = np.ones((1, 2, 4), "float32")
    mask = np.ones((1, 2), bool)

    def hyperplanes(layer):
        layer(x, x, mask) if isinstance(layer, layers.ETASearch) else layer(x, x)
        return np_(layer.hyperplanes)

    for make in (lambda seed: layers.ETASearch(k=2, hash_bits=6, hash_seed=seed),
                 lambda seed: layers.SDIMAttention(2, 3, hash_seed=seed)):
        np.testing.assert_array_equal(hyperplanes(make(5)), hyperplanes(make(5)))
        assert not np.array_equal(hyperplanes(make(5)), hyperplanes(make(6)))
    for bad, message in ((lambda: layers.ETASearch(hash_bits=0), "hash_bits=0"),
                         (lambda: layers.ETASearch(hash_seed=-1), "hash_seed=-1"),
                         (lambda: layers.SDIMAttention(hash_bits=11), "hash_bits=11"),
                         (lambda: layers.SDIMAttention(num_hashes=0), "num_hashes=0")):
        with pytest.raises(ValueError, match=message):
            bad()
    with pytest.raises(ValueError, match="one space"):
        layers.SDIMAttention()(np.ones((1, 2, 4)), np.ones((1, 3, 5)))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="reads a TF graph")
def test_sdim_is_linear_and_eta_never_forms_an_m_n_d_tensor():
    """Every tensor of the traced graphs at m = 301, n = 293 (primes, so no other size
    equals them): SDIM has none with both m and n; ETA's largest is [B, m, n]."""
    import tensorflow as tf

    m, n, d = 301, 293, 8
    specs = (tf.TensorSpec([2, m, d]), tf.TensorSpec([2, n, d]), tf.TensorSpec([2, n], tf.bool))
    sdim, eta = layers.SDIMAttention(), layers.ETASearch(k=5)
    sdim.build(specs[0].shape, specs[1].shape)
    eta.build(specs[0].shape, specs[1].shape)

    def shapes(function):
        graph = tf.function(function).get_concrete_function(*specs).graph
        return [tuple(t.shape.as_list()) for op in graph.get_operations() for t in op.outputs
                if t.shape.rank is not None]

    assert not [s for s in shapes(lambda q, k, mask: sdim(q, k, key_mask=mask))
                if m in s and n in s]
    eta_shapes = shapes(lambda q, k, mask: eta(q, k, mask))
    assert (2, m, n) in eta_shapes
    assert not [s for s in eta_shapes if m in s and n in s and len(s) > 3]


# ------------------------------------------------------------------------- exact matches
def exact_matches_reference(candidate_ids, sequence_ids, time_delta, sequence_mask,
                            candidate_mask):
    """Brute force over the [m, n] comparison, float64: per attribute, the count of valid
    events sharing a candidate's non-zero id and the smallest time delta among them (-1)."""
    counts, last = [], []
    for candidates, events in zip(candidate_ids, sequence_ids):
        match = ((candidates[:, :, None] == events[:, None, :]) & sequence_mask[:, None, :]
                 & (candidates != 0)[:, :, None] & candidate_mask[:, :, None])  # [B, m, n]
        counts.append(match.sum(-1))
        newest = np.where(match, time_delta[:, None, :].astype(np.float64), np.inf).min(-1)
        last.append(np.where(np.isinf(newest), -1.0, newest))
    return np.stack(counts, -1), np.stack(last, -1)


def exact_matches_case(seed, batch=4, n=23, m=17):
    """Ids from small vocabularies (many matches), padding on both sides with garbage ids
    and time deltas stored there, a fully padded sequence row, unknown (0) attributes."""
    rng = np.random.default_rng(seed)
    sequence_mask = random_mask(rng, batch, n, 1)
    sequence_mask[1] = False  # no valid event at all
    candidate_mask = random_mask(rng, batch, m, 1)
    candidate_ids, sequence_ids = [], []
    for vocabulary in (12, 5, 3):  # item, author, category
        events = rng.integers(1, vocabulary + 1, (batch, n))
        candidates = rng.integers(1, vocabulary + 3, (batch, m))  # some never occur
        candidates[rng.random((batch, m)) < 0.1] = 0  # unknown attribute
        candidates[~candidate_mask] = rng.integers(1, vocabulary + 1)  # garbage at padding
        sequence_ids.append(events)
        candidate_ids.append(candidates)
    time_delta = rng.integers(0, 10**9, (batch, n))
    time_delta[~sequence_mask] = 0  # padded events stored with the most recent time
    return candidate_ids, sequence_ids, time_delta, sequence_mask, candidate_mask


def int_(x):
    return np.asarray(ops.convert_to_numpy(x))


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_matches_equal_the_brute_force_reference(seed):
    case = exact_matches_case(seed)
    counts, last = layers.ExactMatches()(*case[:2], case[2], sequence_mask=case[3],
                                         candidate_mask=case[4])
    ref_counts, ref_last = exact_matches_reference(*case)
    assert int_(counts).dtype == np.int32 and int_(last).dtype == np.int64
    assert ref_counts.sum() > 30 and (ref_counts > 1).any()  # the case has matches
    np.testing.assert_array_equal(int_(counts), ref_counts)
    np.testing.assert_array_equal(int_(last), ref_last)
    assert (int_(counts)[1] == 0).all() and (int_(last)[1] == -1).all()  # no valid event
    # Without time deltas only the counts; without masks, the item ids' zeros mark padding.
    counts_only, none = layers.ExactMatches()(case[0], case[1], sequence_mask=case[3],
                                              candidate_mask=case[4])
    assert none is None
    np.testing.assert_array_equal(int_(counts_only), ref_counts)
    item_padded = [np.where(case[3], ids, 0) for ids in case[1]]
    default_masks, _ = layers.ExactMatches()(case[0], item_padded, case[2])
    ref_default, _ = exact_matches_reference(case[0], item_padded, case[2], case[3],
                                             np.ones_like(case[4]))
    np.testing.assert_array_equal(int_(default_masks), ref_default)


def test_exact_matches_ignore_padding_event_order_and_batch():
    candidate_ids, sequence_ids, time_delta, sequence_mask, candidate_mask = (
        exact_matches_case(2))
    layer = layers.ExactMatches()

    def run(candidates, events, deltas, mask, cand_mask):
        return [int_(x) for x in layer(candidates, events, deltas, sequence_mask=mask,
                                       candidate_mask=cand_mask)]

    base = run(candidate_ids, sequence_ids, time_delta, sequence_mask, candidate_mask)
    # Appended padded events holding ids every candidate has, and the smallest delta.
    rng = np.random.default_rng(3)
    longer = [np.concatenate([ids, np.repeat(c[:, :5], 2, axis=1)], axis=1)
              for ids, c in zip(sequence_ids, candidate_ids)]
    longer_delta = np.concatenate([time_delta, np.zeros((4, 10), "int64")], axis=1)
    longer_mask = np.concatenate([sequence_mask, np.zeros((4, 10), bool)], axis=1)
    for got, expected in zip(run(candidate_ids, longer, longer_delta, longer_mask,
                                 candidate_mask), base):
        np.testing.assert_array_equal(got, expected)
    # The events in any order (the sort does not rely on oldest-first).
    permutation = rng.permutation(sequence_mask.shape[1])
    for got, expected in zip(run(candidate_ids, [ids[:, permutation] for ids in sequence_ids],
                                 time_delta[:, permutation], sequence_mask[:, permutation],
                                 candidate_mask), base):
        np.testing.assert_array_equal(got, expected)
    # Each request alone gives its row of the batch.
    for row in range(4):
        single = run([c[row:row + 1] for c in candidate_ids],
                     [e[row:row + 1] for e in sequence_ids], time_delta[row:row + 1],
                     sequence_mask[row:row + 1], candidate_mask[row:row + 1])
        for got, expected in zip(single, base):
            np.testing.assert_array_equal(got[0], expected[row])


def test_exact_matches_of_empty_sequences_huge_and_negative_ids():
    layer = layers.ExactMatches()
    counts, last = layer([np.array([[5, 0, 2**62]] * 2)], [np.zeros((2, 0), "int64")],
                         np.zeros((2, 0), "int64"))
    np.testing.assert_array_equal(int_(counts)[..., 0], np.zeros((2, 3)))
    np.testing.assert_array_equal(int_(last)[..., 0], -np.ones((2, 3)))
    ids = np.array([[-7, 2**62, -2**62, 3, -7, 2**62]])
    deltas = np.array([[60, 50, 40, 30, 20, 10]])
    counts, last = layer([np.array([[2**62, -7, -2**62, 4, 0]])], [ids], deltas)
    np.testing.assert_array_equal(int_(counts)[0, :, 0], [2, 2, 1, 0, 0])
    np.testing.assert_array_equal(int_(last)[0, :, 0], [10, 20, 40, -1, -1])
    with pytest.raises(ValueError, match="one tensor per attribute"):
        layer([ids], [ids, ids])


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="reads a TF graph")
def test_exact_matches_are_sort_and_search_never_an_m_by_n_comparison():
    """Every tensor of the traced graph at m = 301, n = 293 (primes): none holds both m
    and n, nor m * n elements in one axis; and XLA (`ifa-export --jit_compile`) compiles it."""
    import tensorflow as tf

    m, n = 301, 293
    layer = layers.ExactMatches()
    specs = [tf.TensorSpec([2, m], tf.int64)] * 3 + [tf.TensorSpec([2, n], tf.int64)] * 4

    def call(*args):
        return layer(list(args[:3]), list(args[3:6]), args[6])

    graph = tf.function(call).get_concrete_function(*specs).graph
    shapes = [t.shape.as_list() for op in graph.get_operations() for t in op.outputs
              if t.shape.rank is not None]
    assert shapes and not [s for s in shapes if (m in s and n in s)
                           or any(d is not None and d >= m * n for d in s)]
    case = exact_matches_case(4, batch=2)
    case = [ids for ids in case[0]], [np.where(case[3], ids, 0) for ids in case[1]], case[2]
    compiled = tf.function(call, jit_compile=True)
    for got, expected in zip(compiled(*case[0], *case[1], case[2]), call(*case[0], *case[1],
                                                                        case[2])):
        np.testing.assert_array_equal(int_(got), int_(expected))


# ------------------------------------------------------------------ pooling, towers, ids
def test_masked_average_pooling():
    sequence = np.arange(24, dtype="float32").reshape(2, 4, 3)
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool)
    out = np_(layers.MaskedAveragePooling()(sequence, mask=mask))
    np.testing.assert_allclose(out, [[1.5, 2.5, 3.5], [0, 0, 0]])


def test_mlp_tower_matches_numpy():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 5, 6)).astype("float32")
    tower = layers.MLPTower([4, 3])
    tower(x)
    randomize(tower)
    w = [np_(v) for v in tower.weights]
    h = np.maximum(x @ w[0] + w[1], 0)
    h = np.maximum(h @ w[2] + w[3], 0)
    np.testing.assert_allclose(np_(tower(x)), (h @ w[4] + w[5])[..., 0], rtol=1e-5, atol=1e-6)
    round_trip(tower, x)
    with pytest.raises(ValueError, match="hidden_units=5"):
        layers.MLPTower(5)


def test_hashed_embedding_buckets():
    ids = np.array([0, 1, 2, -7, 2**62, 123456789012])
    hashed = layers.HashedEmbedding(97, 4)
    buckets = np_(hashed.bucketize(ids)).astype(int)
    assert buckets[0] == 0 and (buckets[1:] >= 1).all() and (buckets < 97).all()
    # Exactly multiply-shift hashing in unbounded integers, on every backend (int64
    # products wrap modulo 2^64 alike).
    def reference(i):
        top = ((i * 0x9E3779B97F4A7C15) % 2**64) >> 32
        return 0 if i == 0 else 1 + (top * 96 >> 32)
    extremes = np.array([-2**63, -1, 2**63 - 1, 2**32, 2**40 + 3])
    np.testing.assert_array_equal(np_(hashed.bucketize(extremes)),
                                  [reference(int(i)) for i in extremes])
    np.testing.assert_array_equal(buckets, [reference(int(i)) for i in ids])
    # Consecutive ids spread evenly over the non-padding buckets.
    load = np.bincount(np_(hashed.bucketize(np.arange(1, 9601))).astype(int), minlength=97)
    assert load[0] == 0 and load[1:].min() >= 50 and load[1:].max() <= 150
    log2 = layers.HashedEmbedding(66, 4, mode="log2")
    np.testing.assert_array_equal(np_(log2.bucketize(np.array([0, 1, 2, 3, 7, 1000, -5]))),
                                  [1, 2, 2, 3, 4, 10, 1])
    # Exact next to every power of two (a float log2 is one off there), up to int64's ends,
    # and capped at the last bucket.
    edges = [v for k in range(1, 64) for v in ((1 << k) - 2, (1 << k) - 1, 1 << k)
             if v < 2**63] + [2**63 - 1, -2**63]
    for buckets in (66, 20, 3, 2):
        log2 = layers.HashedEmbedding(buckets, 4, mode="log2")
        np.testing.assert_array_equal(
            np_(log2.bucketize(np.array(edges, "int64"))),
            [min(1 + (max(v, 0) + 1).bit_length() - 1, buckets - 1) for v in edges])
    clip = layers.HashedEmbedding(8, 4, mode="clip")
    np.testing.assert_array_equal(np_(clip.bucketize(np.array([0, 5, 7, 9]))), [0, 5, 7, 7])
    assert tuple(hashed(ids).shape) == (6, 4)
    round_trip(hashed, ids)
    with pytest.raises(ValueError, match="num_buckets=1"):
        layers.HashedEmbedding(1, 4)


def test_stacked_hashed_embedding_is_concatenated_hashed_embeddings():
    ids = [np.array([[0, 5, -3], [2**62, 7, 0]]), np.array([[1, 0, 9], [4, 4, 2**40]])]
    stacked = layers.StackedHashedEmbedding([97, 13], 3)
    got = np_(stacked(ids))
    table = np_(stacked.embeddings)
    single = [layers.HashedEmbedding(97, 3), layers.HashedEmbedding(13, 3)]
    expected = np.concatenate(
        [table[offset + np_(embedding.bucketize(value)).astype(int)]
         for embedding, value, offset in zip(single, ids, (0, 97))], axis=-1)
    np.testing.assert_allclose(got, expected)
    assert got.shape == (2, 3, 6) and table.shape == (110, 3)
    round_trip(stacked, ids)
    with pytest.raises(ValueError, match="num_buckets=1"):
        layers.StackedHashedEmbedding([97, 1], 3)


def test_summed_hashed_embedding_is_the_sum_of_the_lookups():
    rng = np.random.default_rng(0)
    actions = rng.integers(-2, 12, size=(2, 9))
    deltas = rng.integers(-5, 2**40, size=(2, 9))
    for max_joint_rows in (4096, 10):  # one joint lookup; per-feature fallback
        summed = layers.SummedHashedEmbedding([8, 66], ["clip", "log2"], 5,
                                              names=["a", "t"], max_joint_rows=max_joint_rows)
        got = np_(summed([actions, deltas]))
        action_table, delta_table = (np_(e.embeddings) for e in summed._embeddings)
        a_buckets = np_(summed._embeddings[0].bucketize(actions)).astype(int)
        t_buckets = np_(summed._embeddings[1].bucketize(deltas)).astype(int)
        np.testing.assert_allclose(got, action_table[a_buckets] + delta_table[t_buckets],
                                   rtol=1e-6, atol=1e-7)
        assert [w.path.split("/")[-3] for w in summed.weights] == ["a", "t"]
        round_trip(summed, [actions, deltas])
    with pytest.raises(ValueError, match="one entry per feature"):
        layers.SummedHashedEmbedding([8, 66], ["clip"], 5)


def test_normalized_linear_attention_mixed_precision_keeps_a_float32_normaliser():
    rng = np.random.default_rng(9)
    query = (rng.normal(size=(1, 4, 8)) * 3).astype("float32")
    key = (rng.normal(size=(1, 5000, 8)) * 3).astype("float32")  # sums overflow float16
    exact = layers.NormalizedLinearAttention(2, 4, feature_map="softplus")
    exact(query, key)
    randomize(exact, scale=1.0)
    mixed = layers.NormalizedLinearAttention(2, 4, feature_map="softplus",
                                             dtype="mixed_float16")
    mixed(query, key)
    mixed.set_weights(exact.get_weights())
    out = mixed(query, key)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    assert np.isfinite(np_(out)).all()
    np.testing.assert_allclose(np_(out), np_(exact(query, key)), rtol=2e-2, atol=2e-2)
