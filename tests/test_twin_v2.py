"""TWIN-V2: the clustering against a recursive float64 NumPy reference, cluster-aware
attention (ln n_c in TWIN's GSU and ESU) against its defining identity, and the `twin_v2`
model against `twin`. The layer tests also run under KERAS_BACKEND=jax (JAX_ENABLE_X64=1);
the zoo contract (tests/test_zoo.py) covers the model's invariances, saving and training."""

import keras
import numpy as np
import pytest
from keras import ops

from ifa_tf import layers, zoo
from ifa_tf.schema import FeatureSchema
from test_zoo import make_batch as zoo_batch


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def clustering(hyperplanes=None, **kwargs):
    """A `TWINV2Clustering` built for width-d items; `hyperplanes` [d, bits] replace the
    random ones."""
    layer = layers.TWINV2Clustering(**kwargs)
    depth = 8 if hyperplanes is None else hyperplanes.shape[0]
    layer.build((None, None, depth))
    if hyperplanes is not None:
        layer.set_weights([hyperplanes.astype("float32")])
    return layer


def reference_clusters(items, groups, mask, hyperplanes, gamma, num_groups=8):
    """TWIN-V2's hierarchy as the layer approximates it, written recursively: per request,
    the clusters (member positions, ascending) in the layer's order. A group, then each
    cell of it, with more than gamma events is halved by the next hyperplane (side 0 first);
    past the last one it is cut oldest first."""
    bits = hyperplanes.shape[1]
    result = []
    for row in range(items.shape[0]):
        products = np.asarray(items[row], np.float64) @ hyperplanes
        valid = np.flatnonzero(mask[row])
        assert valid.size == 0 or np.abs(products[valid]).min() > 1e-5, "a bit too close to 0"
        sides = products > 0
        group = np.clip(groups[row], 0, num_groups - 1) if groups is not None else np.zeros(
            items.shape[1], int)
        clusters = []

        def split(members, level):
            if len(members) <= gamma:
                clusters.append(members)
            elif level == bits:
                clusters.extend(members[start:start + gamma]
                                for start in range(0, len(members), gamma))
            else:
                for half in (members[~sides[members, level]], members[sides[members, level]]):
                    if len(half):
                        split(half, level + 1)

        for value in sorted(set(group[valid])):
            split(valid[group[valid] == value], 0)
        result.append(clusters)
    return result


def reference_outputs(items, events, clusters, slots, max_clusters=None):
    """The layer's outputs for `reference_clusters`: each cluster's representative (the
    member nearest its items' centroid; near ties: the most recent) plus its members' mean
    context (`events - items`), its size and the mask, most recent first under
    `max_clusters`."""
    batch, _, depth = items.shape
    embeddings = np.zeros((batch, slots, depth))
    sizes = np.zeros((batch, slots), int)
    for row, row_clusters in enumerate(clusters):
        if max_clusters is not None:
            row_clusters = sorted(row_clusters, key=lambda c: -c.max())[:max_clusters]
        for slot, members in enumerate(row_clusters):
            points = np.asarray(items[row, members], np.float64)
            distance = ((points - points.mean(0)) ** 2).sum(-1)
            representative = members[distance <= distance.min() * (1 + 1e-5)].max()
            context = np.asarray(events[row, members], np.float64) - points
            embeddings[row, slot] = items[row, representative] + context.mean(0)
            sizes[row, slot] = len(members)
    return embeddings, sizes, sizes > 0


def call(layer, items, events, groups, mask):
    out = layer(items, events, groups=groups, sequence_mask=mask)
    return np_(out[0]), np_(out[1]).astype(int), np_(out[2]).astype(bool)


def hand_made():
    """One request of 14 events, 2 of them padding, with 2 hyperplanes (coordinates 0 and 1
    of the items) and gamma = 3. Group 1 holds events 2 and 9: one cluster, although their
    signatures differ. Group 0 holds 10: hyperplane 0 halves it into 4 (events 1, 4, 8,
    12), which hyperplane 1 halves into [1, 4] and [8, 12], and 6, which it halves into
    [5] and 5 events of one signature, cut oldest first into [0, 3, 7] and [10, 13]."""
    layout = [("++", 0), ("--", 0), ("-+", 1), ("++", 0), ("--", 0), ("+-", 0), ("pad", 5),
              ("++", 0), ("-+", 0), ("++", 1), ("++", 0), ("pad", 3), ("-+", 0), ("++", 0)]
    rng = np.random.default_rng(0)
    items = rng.uniform(0.2, 1.0, (1, len(layout), 4)).astype("float32")
    for position, (sides, _) in enumerate(layout):
        if sides != "pad":
            items[0, position, :2] *= [1 if side == "+" else -1 for side in sides]
    groups = np.array([[group for _, group in layout]])
    mask = np.array([[sides != "pad" for sides, _ in layout]])
    events = items + rng.normal(size=items.shape).astype("float32")
    return items, events, groups, mask, np.eye(4)[:, :2]


def random_requests(seed, batch=3, n=40, depth=8, distinct=9):
    """Requests drawn from a few distinct items (repeats hash alike), random groups,
    padding scattered among the events, the last request empty."""
    rng = np.random.default_rng(seed)
    pool = rng.normal(size=(distinct, depth)).astype("float32")
    items = pool[rng.integers(0, distinct, (batch, n))]
    events = items + rng.normal(size=items.shape).astype("float32")
    groups = rng.integers(-1, 4, (batch, n))  # -1: clipped into group 0
    mask = rng.random((batch, n)) < 0.8
    mask[-1] = False
    return items, events, groups, mask


@pytest.mark.jax
def test_hand_made_sequence_gives_the_hierarchys_clusters():
    items, events, groups, mask, hyperplanes = hand_made()
    clusters = reference_clusters(items, groups, mask, hyperplanes, gamma=3)
    assert [list(c) for c in clusters[0]] == [[1, 4], [8, 12], [5], [0, 3, 7], [10, 13],
                                              [2, 9]]
    layer = clustering(hyperplanes, max_cluster_size=3, cluster_bits=2)
    out = call(layer, items, events, groups, mask)
    expected = reference_outputs(items, events, clusters, slots=14)
    np.testing.assert_allclose(out[0], expected[0], atol=1e-6)
    np.testing.assert_array_equal(out[1], expected[1])
    np.testing.assert_array_equal(out[2], expected[2])
    assert out[1].tolist()[0] == [2, 2, 1, 3, 2, 2] + [0] * 8


@pytest.mark.jax
@pytest.mark.parametrize("gamma, bits, max_clusters", [(3, 3, None), (4, 2, None),
                                                       (1, 3, None), (50, 3, None),
                                                       (3, 3, 4), (2, 1, 30)])
def test_clustering_matches_the_recursive_reference(gamma, bits, max_clusters):
    """Membership (through the members' mean context), sizes <= gamma, the representative
    nearest the centroid, padding in no cluster, groups never mixed; `max_clusters` keeps
    the clusters with the most recent events."""
    items, events, groups, mask = random_requests(seed=gamma * 10 + bits)
    layer = clustering(max_cluster_size=gamma, cluster_bits=bits, max_clusters=max_clusters,
                       hash_seed=3)
    hyperplanes = np_(layer.hyperplanes)
    clusters = reference_clusters(items, groups, mask, hyperplanes, gamma)
    assert max(len(c) for row in clusters for c in row) <= gamma
    assert sum(len(c) for row in clusters for c in row) == mask.sum()  # padding in none
    if gamma > 1:
        assert any(len(c) > 1 for row in clusters for c in row)
    slots = items.shape[1] if max_clusters is None else max_clusters
    expected = reference_outputs(items, events, clusters, slots, max_clusters)
    out = call(layer, items, events, groups, mask)
    assert out[0].shape == (3, slots, 8)
    np.testing.assert_allclose(out[0], expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[1], expected[1])
    np.testing.assert_array_equal(out[2], expected[2])
    assert not out[2][-1].any() and not out[0][-1].any()  # the empty request: no cluster


@pytest.mark.jax
def test_without_events_or_groups_a_cluster_is_its_representative_item():
    items, _, _, mask = random_requests(seed=5)
    layer = clustering(max_cluster_size=3, cluster_bits=3, hash_seed=1)
    clusters = reference_clusters(items, None, mask, np_(layer.hyperplanes), 3)
    expected = reference_outputs(items, items, clusters, slots=items.shape[1])
    out = call(layer, items, None, None, mask)
    np.testing.assert_allclose(out[0], expected[0], atol=1e-6)
    np.testing.assert_array_equal(out[1], expected[1])


@pytest.mark.jax
def test_padding_and_where_it_lies_change_nothing():
    items, events, groups, mask = random_requests(seed=7)
    layer = clustering(max_cluster_size=3, cluster_bits=3, max_clusters=6, hash_seed=2)
    base = call(layer, items, events, groups, mask)
    rng = np.random.default_rng(8)
    # Garbage in every padded position (items, events, groups)...
    noisy = [np.where(mask[..., None], x, rng.normal(size=x.shape).astype("float32"))
             for x in (items, events)]
    noisy_groups = np.where(mask, groups, rng.integers(0, 8, groups.shape))
    for got, want in zip(call(layer, *noisy, noisy_groups, mask), base):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # ...and the valid events moved to the front, then 5 more padded slots: same clusters.
    order = np.argsort(~mask, axis=1, kind="stable")
    moved = [np.pad(np.take_along_axis(x, order[..., None] if x.ndim == 3 else order, 1),
                    ((0, 0), (0, 5)) + ((0, 0),) * (x.ndim - 2))
             for x in (items, events, groups)]
    moved_mask = np.pad(np.take_along_axis(mask, order, 1), ((0, 0), (0, 5)))
    for got, want in zip(call(layer, *moved, moved_mask), base):
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.jax
@pytest.mark.parametrize("n", [0, 5])
def test_empty_sequence_has_no_cluster(n):
    items = np.ones((2, n, 8), "float32")
    for max_clusters in (None, 3):
        layer = clustering(max_clusters=max_clusters, hash_seed=0)
        embeddings, sizes, cluster_mask = call(layer, items, items, np.ones((2, n), int),
                                               np.zeros((2, n), bool))
        slots = n if max_clusters is None else max_clusters
        assert embeddings.shape == (2, slots, 8) and not embeddings.any()
        assert not sizes.any() and not cluster_mask.any()


@pytest.mark.jax
def test_clustering_config_round_trip_and_bad_arguments():
    items, events, groups, mask = random_requests(seed=9)
    layer = clustering(max_cluster_size=3, cluster_bits=4, max_clusters=5, hash_seed=4)
    restored = layers.TWINV2Clustering.from_config(layer.get_config())
    restored.build((None, None, 8))
    restored.set_weights(layer.get_weights())
    for got, want in zip(call(restored, items, events, groups, mask),
                         call(layer, items, events, groups, mask)):
        np.testing.assert_array_equal(got, want)
    assert layer.hyperplanes.trainable is False
    for kwargs, message in (({"max_cluster_size": 0}, "max_cluster_size=0"),
                            ({"cluster_bits": 25}, "cluster_bits=25"),
                            ({"num_groups": 0}, "num_groups=0"),
                            ({"max_clusters": 2.5}, "max_clusters=2.5"),
                            ({"hash_seed": -1}, "hash_seed=-1")):
        with pytest.raises(ValueError, match=f"Received: {message}"):
            layers.TWINV2Clustering(**kwargs)
    with pytest.raises(ValueError, match="as wide as `items`"):
        layers.TWINV2Clustering()(items, events[..., :4])


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's tape")
def test_clusters_pass_gradients_to_their_embeddings_but_the_clustering_is_not_trained():
    """d(sum of cluster embeddings)/d(items) is 1 at each representative (the item it
    carries) minus the members' mean share of the context; nothing flows through the
    hashing or the centroids."""
    import tensorflow as tf

    items, events, groups, mask = random_requests(seed=11, batch=2)
    layer = clustering(max_cluster_size=3, cluster_bits=3, hash_seed=5)
    items_t, events_t = tf.constant(items), tf.constant(events)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([items_t, events_t])
        embeddings, sizes, _ = layer(items_t, events_t, groups=groups, sequence_mask=mask)
        total = tf.reduce_sum(embeddings)
    by_items, by_events = (np_(g) for g in tape.gradient(total, [items_t, events_t]))
    clusters = reference_clusters(items, groups, mask, np_(layer.hyperplanes), 3)
    expected_items, expected_events = np.zeros(items.shape[:2]), np.zeros(items.shape[:2])
    for row, row_clusters in enumerate(clusters):
        for members in row_clusters:
            points = items[row, members].astype(np.float64)
            distance = ((points - points.mean(0)) ** 2).sum(-1)
            expected_items[row, members[distance <= distance.min() * (1 + 1e-5)].max()] += 1
            expected_items[row, members] -= 1 / len(members)
            expected_events[row, members] += 1 / len(members)
    np.testing.assert_allclose(by_items, expected_items[..., None] * np.ones(8), atol=1e-6)
    np.testing.assert_allclose(by_events, expected_events[..., None] * np.ones(8), atol=1e-6)


# ------------------------------------------------------------- cluster-aware attention
def twin_attention(k, seed=0, depth=8):
    layer = layers.TWINAttention(k=k, num_heads=2, key_dim=4)
    layer.build((None, None, depth), (None, None, depth))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(scale=0.4, size=w.shape).astype("float32")
                       for w in layer.get_weights()])
    return layer


@pytest.mark.jax
def test_log_size_bias_weighs_a_cluster_as_its_size_in_identical_keys():
    """softmax(a + ln n) is proportional to n exp(a): the ESU over clusters with ln(size)
    added equals plain softmax attention over the keys with each cluster's representative
    repeated size times."""
    rng = np.random.default_rng(1)
    batch, m, clusters, depth = 2, 3, 5, 8
    query = rng.normal(size=(batch, m, depth)).astype("float32")
    keys = rng.normal(size=(batch, clusters, depth)).astype("float32")
    sizes = rng.integers(1, 6, (batch, clusters))
    cluster_mask = np.array([[True] * 5, [True, True, True, False, False]])
    layer = twin_attention(k=clusters)  # the GSU keeps every cluster
    out = np_(layer(query, keys, query_mask=np.ones((batch, m), bool), key_mask=cluster_mask,
                    key_bias=np.log(sizes)))
    plain = layers.MaskedTargetAttention(2, 4)
    plain.build((None, None, depth), (None, None, depth))
    plain.set_weights(layer.get_weights())
    # Each valid cluster's key repeated size times, the rows padded to one length.
    repeated = [np.repeat(keys[row][cluster_mask[row]], sizes[row][cluster_mask[row]], axis=0)
                for row in range(batch)]
    length = max(len(r) for r in repeated)
    repeated_mask = np.array([[i < len(r) for i in range(length)] for r in repeated])
    repeated = np.stack([np.pad(r, ((0, length - len(r)), (0, 0))) for r in repeated])
    expected = np_(plain(query, repeated, key_mask=repeated_mask))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # Without the bias the clusters weigh alike: a different output.
    unbiased = np_(layer(query, keys, key_mask=cluster_mask))
    assert np.abs(unbiased - out).max() > 1e-3


@pytest.mark.jax
def test_gsu_ranks_by_the_mean_scaled_logit_plus_the_bias():
    """With key_bias the GSU keeps the k keys of highest mean-over-heads scaled logit plus
    bias (the ESU's relevance), and the ESU adds the kept keys' bias: a float64 reference."""
    rng = np.random.default_rng(2)
    batch, m, n, depth, k = 2, 4, 10, 8, 3
    query = rng.normal(size=(batch, m, depth)).astype("float32")
    keys = rng.normal(size=(batch, n, depth)).astype("float32")
    bias = rng.normal(scale=2.0, size=(batch, n)).astype("float32")
    key_mask = np.arange(n)[None] < np.array([[10], [6]])
    layer = twin_attention(k=k, seed=3)
    w = {v.path.split("/")[-2] + "/" + v.name: np_(v) for v in layer.weights}

    def project(x, name):
        return np.tensordot(x, w[f"{name}/kernel"], axes=([-1], [0])) + w[f"{name}/bias"]

    q, kk, v = project(query, "query"), project(keys, "key"), project(keys, "value")
    logits = np.einsum("bmhc,bnhc->bmhn", q, kk) / 2.0 + bias[:, None, None, :]  # sqrt(4)
    score = np.where(key_mask[:, None, :], logits.mean(2), -np.inf)
    kept = np.zeros(score.shape, bool)
    np.put_along_axis(kept, np.argsort(-score, -1)[..., :k], True, -1)
    kept &= key_mask[:, None, :]
    logits = np.where(kept[:, :, None, :], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    heads = np.einsum("bmhn,bnhc->bmhc", weights, v)
    expected = (np.tensordot(heads, w["attention_output/kernel"], axes=([-2, -1], [0, 1]))
                + w["attention_output/bias"])
    out = np_(layer(query, keys, key_mask=key_mask, key_bias=bias))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.jax
def test_twin_attention_without_key_bias_is_unchanged():
    """A zero bias selects what TWIN's own GSU selects (the same order on another scale) and
    adds nothing in the ESU: the output equals TWIN's without the argument."""
    rng = np.random.default_rng(4)
    query = rng.normal(size=(2, 5, 8)).astype("float32")
    keys = rng.normal(size=(2, 12, 8)).astype("float32")
    key_mask = np.arange(12)[None] < np.array([[12], [7]])
    layer = twin_attention(k=4, seed=5)
    np.testing.assert_allclose(
        np_(layer(query, keys, key_mask=key_mask, key_bias=np.zeros((2, 12), "float32"))),
        np_(layer(query, keys, key_mask=key_mask)), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------- the model
SCHEMA = FeatureSchema(embedding_buckets={"user_id": 40, "item_id": 64, "category_id": 8,
                                          "author_id": 16})
SMALL = {"embedding_dim": 4, "tower_units": [16, 8]}


def make_batch(seed=0, batch=3, n=12, m=6):
    return zoo_batch(seed=seed, batch=batch, n=n, m=m)[0]


def predict(model, features):
    return {k: ops.convert_to_numpy(v) for k, v in model(features).items()}


def test_singleton_clusters_make_twin_v2_twin():
    """With max_cluster_size = 1 every event is its own cluster (its item plus its own
    context: the event; ln 1 = 0): twin_v2 scores as twin with the same weights."""
    features = make_batch()
    keras.utils.set_random_seed(3)
    twin_v2 = zoo.build("twin_v2", schema=SCHEMA, k=4, max_cluster_size=1, **SMALL)
    twin = zoo.build("twin", schema=SCHEMA, k=4, **SMALL)
    for layer in twin.layers:
        if layer.weights and layer.name != "interest":
            layer.set_weights(twin_v2.get_layer(layer.name).get_weights())
    twin.interest._attention.set_weights(twin_v2.interest._attention.get_weights())
    base, out = predict(twin, features), predict(twin_v2, features)
    for task in base:
        np.testing.assert_allclose(out[task], base[task], rtol=1e-5, atol=1e-6)


def test_actions_group_the_events(monkeypatch):
    """Events of one item that differ only in their action fall into one cluster per action
    (the ranker gives the module `sequence_actions`), and into one without
    `group_by_action`."""
    features = make_batch(n=12)
    for name in ("seq_item_id", "seq_category_id", "seq_author_id"):
        features[name][:] = features[name][:, :1]  # one item, 12 times
    features["seq_action"][:] = np.arange(12) % 3
    sizes = {}
    for group_by_action in (True, False):
        keras.utils.set_random_seed(0)
        model = zoo.build("twin_v2", schema=SCHEMA, group_by_action=group_by_action, **SMALL)
        clustering_layer = model.interest._clustering
        original = clustering_layer.call

        def spy(*args, **kwargs):
            out = original(*args, **kwargs)
            sizes[group_by_action] = np_(out[1]).astype(int)
            return out

        monkeypatch.setattr(clustering_layer, "call", spy)
        predict(model, features)
    assert sizes[True][:, :4].tolist() == [[4, 4, 4, 0]] * 3
    assert sizes[False][:, :2].tolist() == [[12, 0]] * 3


def test_max_clusters_model_saves_and_exports(tmp_path):
    """`max_clusters` bounds the GSU; the model round-trips through `.keras` and the
    exported `serving_default` returns Keras' scores."""
    import tensorflow as tf

    from ifa_tf import export

    keras.utils.set_random_seed(4)
    model = zoo.build("twin_v2", schema=SCHEMA, k=3, max_cluster_size=2, max_clusters=4,
                      **SMALL)
    features = make_batch(seed=2)
    base = predict(model, features)
    model.save(tmp_path / "twin_v2.keras")
    restored = keras.saving.load_model(tmp_path / "twin_v2.keras")
    assert restored.interest.max_clusters == 4
    np.testing.assert_allclose(predict(restored, features)["score"], base["score"], atol=1e-7)
    export_dir = export.export_saved_model(model, tmp_path / "export", schema=SCHEMA,
                                           warmup_shapes=((1, 4, 6),))
    signature = tf.saved_model.load(export_dir).signatures[export.SIGNATURE_NAME]
    outputs = signature(**{k: tf.constant(v) for k, v in features.items()})
    np.testing.assert_allclose(outputs["score"].numpy(), base["score"], atol=1e-6)
