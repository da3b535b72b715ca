"""DARE's and MIRRN's layers against float64 NumPy references of their equations."""

import keras
import numpy as np
import pytest

from ifa_tf import layers, zoo

pytestmark = pytest.mark.jax


def dare_reference(query, key, value, query_time, key_time, key_mask, k):
    scores = (np.einsum("bmd,bnd->bmn", query, key) / np.sqrt(query.shape[-1])
              + np.einsum("bmd,bnd->bmn", query_time, key_time) / np.sqrt(key_time.shape[-1]))
    output = np.zeros((*query.shape[:2], value.shape[-1]))
    for b in range(query.shape[0]):
        valid = np.flatnonzero(key_mask[b])
        for i in range(query.shape[1]):
            kept = valid[np.argsort(-scores[b, i, valid], kind="stable")[:k]]
            if kept.size:
                weights = np.exp(scores[b, i, kept] - scores[b, i, kept].max())
                output[b, i] = (weights / weights.sum()) @ value[b, kept]
    return output


def test_dare_attention_keeps_the_top_k_by_attention_and_pools_representations():
    rng = np.random.default_rng(0)
    query, key = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 9, 6))
    value = rng.normal(size=(2, 9, 5))
    query_time, key_time = rng.normal(size=(2, 1, 4)), rng.normal(size=(2, 9, 4))
    key_mask = np.array([[True] * 9, [True] * 4 + [False] * 5])
    query_mask = np.array([[True, True, False], [True, True, True]])
    out = keras.ops.convert_to_numpy(layers.DAREAttention(k=3)(
        query, key, value, query_time, key_time, query_mask=query_mask, key_mask=key_mask))
    expected = dare_reference(query, key, value, np.broadcast_to(query_time, (2, 3, 4)),
                              key_time, key_mask, 3) * query_mask[..., None]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # Representations alone never move the choice: a huge value changes no weight.
    changed = value.copy()
    changed[0, 0] += 100.0
    out2 = keras.ops.convert_to_numpy(layers.DAREAttention(k=3)(
        query, key, changed, query_time, key_time, query_mask=query_mask, key_mask=key_mask))
    np.testing.assert_allclose(out2, dare_reference(
        query, key, changed, np.broadcast_to(query_time, (2, 3, 4)), key_time, key_mask, 3)
        * query_mask[..., None], rtol=1e-5, atol=1e-5)


def test_dare_model_refuses_shared_embeddings():
    with pytest.raises(ValueError, match="dare always has decoupled_embeddings=True"):
        zoo.build("dare", decoupled_embeddings=False)
    assert zoo.build("dare", embedding_dim=4, tower_units=[8]).decoupled_embeddings


def layer_norm(x, gamma, beta, epsilon=1e-12):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon) * gamma + beta


def dense_heads(x, dense):
    kernel, bias = (keras.ops.convert_to_numpy(w).astype("float64") for w in dense.weights)
    return np.einsum("...d,dhc->...hc", x, kernel) + bias


def mirrn_reference(layer, candidates, items, events, candidate_mask, sequence_mask):
    """MIRRN's forward pass, step by step, in float64 from the layer's weights."""
    weights = {w.path.split("/")[-1]: keras.ops.convert_to_numpy(w).astype("float64")
               for w in layer.weights}
    planes, positions = weights["hyperplanes"], weights["positions"]
    k, heads = layer.k, layer.num_filter_heads
    width = events.shape[-1]

    def signs(x):
        return np.where(x @ planes > 0, 1.0, -1.0)

    batch, m = candidates.shape[:2]
    out = np.zeros((batch, m, width))
    for b in range(batch):
        valid = np.flatnonzero(sequence_mask[b])
        recent = valid[-layer.local_window:]
        queries = {"target": candidates[b],
                   "local": items[b, recent].mean(0, keepdims=True) if recent.size
                   else np.zeros((1, items.shape[-1])),
                   "global": items[b, valid].mean(0, keepdims=True) if valid.size
                   else np.zeros((1, items.shape[-1]))}
        interests = []
        for granularity in ("target", "local", "global"):
            pooled = []
            for query in queries[granularity]:
                agreement = signs(items[b, valid]) @ signs(query)
                kept = np.sort(valid[np.argsort(-agreement, kind="stable")[:k]])
                rows = np.zeros((k, width))
                distance = np.minimum(valid.size - 1 - kept, layer.max_positions - 1)
                rows[:kept.size] = events[b, kept] + layer.tape_scale * positions[distance]
                spectrum = np.fft.rfft(rows, axis=0).reshape(k // 2 + 1, heads, -1)
                real = weights[f"{granularity}_filter_real"]
                imag = weights[f"{granularity}_filter_imag"]
                if layer.fourier_filter == "paper":
                    mixed = np.einsum("fnc,fnce->fne", spectrum, real + 1j * imag)
                else:
                    gain = (np.diagonal(real, axis1=-2, axis2=-1)
                            + 1j * np.diagonal(imag, axis1=-2, axis2=-1))
                    mixed = spectrum * gain[None]
                filtered = np.fft.irfft(mixed.reshape(k // 2 + 1, width), n=k, axis=0)
                refined = layer_norm(rows + filtered, weights[f"{granularity}_norm_gamma"]
                                     if f"{granularity}_norm_gamma" in weights else 1.0, 0.0)
                pooled.append(refined[:kept.size].mean(0) if kept.size else np.zeros(width))
            interests.append(np.broadcast_to(np.array(pooled), (m, width)))
        stacked = np.stack(interests, axis=1)  # [m, 3, width]
        fusion = layer._fusion
        q = dense_heads(candidates[b], fusion._query_dense)  # [m, h, c]
        keys = dense_heads(stacked, fusion._key_dense)  # [m, 3, h, c]
        values = dense_heads(stacked, fusion._value_dense)
        logits = np.einsum("mhc,mjhc->mhj", q, keys) / np.sqrt(fusion.key_dim)
        attention = np.exp(logits - logits.max(-1, keepdims=True))
        attention /= attention.sum(-1, keepdims=True)
        attended = np.einsum("mhj,mjhc->mhc", attention, values)
        kernel, bias = (keras.ops.convert_to_numpy(w).astype("float64")
                        for w in fusion._output_dense.weights)
        out[b] = (np.einsum("mhc,hcd->md", attended, kernel) + bias) * candidate_mask[b, :,
                                                                                      None]
    return out


@pytest.mark.parametrize("fourier_filter", ["paper", "released"])
def test_mirrn_attention_equals_its_equations(fourier_filter):
    rng = np.random.default_rng(1)
    candidates, items = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 10, 4))
    events = items @ rng.normal(size=(4, 6)) + rng.normal(size=(2, 10, 6)) * 0.3
    sequence_mask = np.array([[True] * 10, [True] * 5 + [False] * 5])
    candidate_mask = np.array([[True, True, True], [True, False, True]])
    layer = layers.MIRRNAttention(k=4, hash_bits=8, hash_seed=3, local_window=3,
                                  num_filter_heads=2, fourier_filter=fourier_filter,
                                  num_heads=2, key_dim=3, max_positions=7)
    layer(candidates, items, events, candidate_mask, sequence_mask)
    for weight in layer.weights:  # filters and positions large enough to matter
        if "filter" in weight.path or "positions" in weight.path:
            weight.assign(rng.normal(size=weight.shape))
    out = keras.ops.convert_to_numpy(layer(candidates, items, events, candidate_mask,
                                           sequence_mask, training=False))
    expected = mirrn_reference(layer, candidates, items, events, candidate_mask,
                               sequence_mask)
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)


def test_mirrn_padding_and_an_empty_sequence():
    rng = np.random.default_rng(2)
    candidates, items = rng.normal(size=(1, 2, 4)), rng.normal(size=(1, 6, 4))
    events = rng.normal(size=(1, 6, 4))
    layer = layers.MIRRNAttention(k=4, hash_bits=8, hash_seed=0, num_filter_heads=2,
                                  num_heads=2, key_dim=2)
    mask = np.array([[True] * 4 + [False] * 2])
    base = keras.ops.convert_to_numpy(layer(candidates, items, events, sequence_mask=mask))
    garbage = events.copy()
    garbage[:, 4:] = 50.0
    padded = keras.ops.convert_to_numpy(layer(candidates, items, garbage, sequence_mask=mask))
    np.testing.assert_allclose(padded, base, atol=1e-6)
    empty = keras.ops.convert_to_numpy(layer(candidates, items[:, :0], events[:, :0],
                                             sequence_mask=mask[:, :0]))
    assert np.isfinite(empty).all()


@pytest.mark.parametrize("argument, value", [("k", 0), ("hash_bits", -1),
                                             ("fourier_filter", "fft"), ("dropout", 1.0),
                                             ("local_window", 2.5)])
def test_mirrn_bad_arguments_are_clear_errors(argument, value):
    with pytest.raises(ValueError, match=f"{argument}"):
        layers.MIRRNAttention(**{argument: value})
