"""Every registered model: outputs, padding/permutation/batch invariances, edge shapes,
saving, training defaults and errors. Parameterised over `zoo.list_models()`, so a model is
tested the moment it is registered."""

import warnings

import keras
import keras_rs
import numpy as np
import pytest
import tensorflow as tf

import ifa_tf
from ifa_tf import zoo
from ifa_tf.schema import FeatureSchema

SCHEMA = FeatureSchema(embedding_buckets={"user_id": 40, "item_id": 64, "category_id": 8,
                                          "author_id": 16})
# Small sub-sequences so that n = 12 is "long" for the sampling baselines.
OVERRIDES = {"din": {"k": 4}, "sim_hard": {"k": 4}, "sim_soft": {"k": 4, "search_buckets": 64},
             "dare": {"k": 4}, "mirrn": {"k": 4, "local_window": 3, "num_filter_heads": 2},
             "twin": {"k": 4}, "twin_ram": {"k": 4}, "eta": {"k": 4},
             "twin_v2": {"k": 4, "max_cluster_size": 2}}
SMALL = {"embedding_dim": 4, "tower_units": [16, 8]}
# IFA's options that add to what the model computes, run through every test below as if
# they were models of their own: exact matches, and separate maps with learnable sharpness
# (the paper's elu+1 FSM with a temperature; `ifa` itself is the focused FSM's learned power).
VARIANTS = {"ifa+exact_matches": ("ifa", {"exact_matches": True}),
            "ifa+sharpness": ("ifa", {"feature_map": "elu_plus_one",
                                      "learnable_temperature": True,
                                      "ram_feature_map": "focused",
                                      "ram_learnable_focusing_factor": True}),
            # Decoupled attention tables (narrower than the representation's) with the
            # short-term softmax module beside the FSM: both options in one row.
            "ifa+decoupled+short_term": ("ifa", {"decoupled_embeddings": True,
                                                 "attention_embedding_dim": 2,
                                                 "short_term_k": 3})}
MODELS = [*zoo.list_models(), *VARIANTS]


def build(name, **extra):
    keras.utils.set_random_seed(1)
    name, variant = VARIANTS.get(name, (name, {}))
    return zoo.build(name, schema=SCHEMA, **SMALL,
                     **{**OVERRIDES.get(name, {}), **variant, **extra})


def make_batch(seed=0, batch=3, n=12, m=6, seq_valid=(12, 9, 5), cand_valid=(6, 4, 1)):
    rng = np.random.default_rng(seed)
    f = {"user_id": rng.integers(1, 1000, batch)}
    for attribute, high in (("item_id", 500), ("category_id", 4), ("author_id", 9)):
        f["seq_" + attribute] = rng.integers(1, high, (batch, n))
        f["cand_" + attribute] = rng.integers(1, high, (batch, m))
    f["seq_action"] = rng.integers(0, 8, (batch, n))
    f["seq_time_delta"] = rng.integers(0, 10**7, (batch, n))
    for name in SCHEMA.cross_features:
        f[name] = rng.integers(0, 20, (batch, m))
    f["seq_item_id"][np.arange(n)[None, :] >= np.array(seq_valid)[:, None]] = 0
    f["cand_item_id"][np.arange(m)[None, :] >= np.array(cand_valid)[:, None]] = 0
    labels = {t: (rng.random((batch, m)) < 0.5).astype("float32") for t in SCHEMA.tasks}
    return f, labels


def predict(model, features):
    return {k: keras.ops.convert_to_numpy(v) for k, v in model(features).items()}


@pytest.fixture(scope="module")
def models():
    return {name: build(name) for name in MODELS}


def test_zoo_lists_every_model_of_the_paper():
    assert set(zoo.list_models()) >= {"avg_pooling", "din", "din_full", "sim_hard",
                                      "sim_soft", "twin", "twin_ram", "ifa_no_ram", "ifa",
                                      "eta", "sdim"}


@pytest.mark.parametrize("name", MODELS)
def test_outputs_are_esmm_probabilities(models, name):
    features, _ = make_batch()
    out = predict(models[name], features)
    assert sorted(out) == sorted([*SCHEMA.tasks, "score"])
    valid = features["cand_item_id"] != 0
    for task in SCHEMA.tasks:
        assert out[task].shape == (3, 6)
        assert ((out[task] > 0) & (out[task] < 1))[valid].all()
        assert (out[task][~valid] == 0).all()
        assert (out[task] <= out["impression"] + 1e-7).all()  # p(a|cand) = p(imp) p(a|imp)
    np.testing.assert_array_equal(out["score"], out["click"])


@pytest.mark.parametrize("name", MODELS)
def test_padding_changes_no_valid_output(models, name):
    features, _ = make_batch()
    base = predict(models[name], features)
    rng = np.random.default_rng(5)
    padded = {}
    for key, value in features.items():
        if key.startswith(("seq_", "cand_")):
            extra = 4 if key.startswith("seq_") else 3
            value = np.concatenate([value, rng.integers(1, 50, (3, extra))], axis=1)
            ids = features["seq_item_id" if key.startswith("seq_") else "cand_item_id"]
            length = ids.shape[1] + extra
            is_padding = np.concatenate([ids == 0, np.ones((3, extra), bool)], axis=1)
            # Store garbage wherever the position is padding, but keep item id 0 there.
            value = np.where(is_padding, 0 if key.endswith("item_id") else value, value)
            assert value.shape == (3, length)
        padded[key] = value
    out = predict(models[name], padded)
    valid = features["cand_item_id"] != 0
    for task in out:
        np.testing.assert_allclose(out[task][:, :6][valid], base[task][valid], atol=2e-6)
        assert (out[task][:, 6:] == 0).all()


@pytest.mark.parametrize("name", MODELS)
def test_permuting_candidates_permutes_outputs(models, name):
    features, _ = make_batch(cand_valid=(6, 6, 6))
    permutation = np.array([3, 0, 5, 1, 4, 2])
    permuted = {k: (v[:, permutation] if k.startswith("cand_") else v)
                for k, v in features.items()}
    base, out = predict(models[name], features), predict(models[name], permuted)
    for task in out:
        np.testing.assert_allclose(out[task], base[task][:, permutation], atol=2e-6)


@pytest.mark.parametrize("name", MODELS)
def test_requests_are_independent_of_their_batch(models, name):
    features, _ = make_batch()
    batch_out = predict(models[name], features)
    for row in range(3):
        single = predict(models[name], {k: v[row:row + 1] for k, v in features.items()})
        for task in single:
            np.testing.assert_allclose(single[task][0], batch_out[task][row], atol=2e-6)


@pytest.mark.parametrize("name", MODELS)
def test_empty_sequence_and_single_candidate(models, name):
    features, _ = make_batch(n=0, m=1, seq_valid=(0, 0, 0), cand_valid=(1, 1, 0))
    out = predict(models[name], features)
    assert out["score"].shape == (3, 1)
    assert np.isfinite(out["score"]).all() and out["score"][2, 0] == 0


@pytest.mark.parametrize("name", MODELS)
def test_keras_file_round_trip(models, name, tmp_path):
    features, _ = make_batch()
    path = tmp_path / f"{name}.keras"
    models[name].save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, ifa_tf.models.CandidateSetRanker)
    assert restored.schema == SCHEMA
    base, out = predict(models[name], features), predict(restored, features)
    for task in base:
        np.testing.assert_allclose(out[task], base[task], atol=1e-7)


def test_embeddings_initializer_reaches_every_table_and_the_config():
    initializer = {"class_name": "RandomNormal", "config": {"stddev": 0.25}}
    model = build("ifa", embeddings_initializer=initializer)
    tables = [v for v in model.weights if v.path.endswith("embeddings")]
    # item, user, the two context features, the two cross features
    assert len(tables) == 6
    for table in tables:
        assert 0.15 < np.std(keras.ops.convert_to_numpy(table)) < 0.35, table.path
    values = [keras.ops.convert_to_numpy(t) for t in tables]
    assert not any(np.allclose(values[0][:8, :4], v[:8, :4]) for v in values[1:])  # unshared
    again = type(model).from_config(model.get_config())
    assert again.get_config()["embeddings_initializer"]["config"]["stddev"] == 0.25


@pytest.mark.parametrize("name", MODELS)
def test_compile_without_arguments_then_fit_lowers_the_loss(name):
    model = build(name)
    features, labels = make_batch(seed=3)
    model.compile()
    before = model.evaluate(features, labels, verbose=0, return_dict=True)
    model.fit(features, labels, epochs=15, batch_size=3, verbose=0)
    after = model.evaluate(features, labels, verbose=0, return_dict=True)
    assert after["loss"] < before["loss"] - 0.04  # four tasks' losses summed, ~2.7 at start
    assert {f"{t}_auc" for t in SCHEMA.tasks} <= set(after)


def test_trained_model_reloads_compiled(tmp_path):
    model = build("ifa")
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    features, labels = make_batch()
    model.fit(features, labels, epochs=2, batch_size=3, verbose=0)
    model.save(tmp_path / "trained.keras")
    restored = keras.saving.load_model(tmp_path / "trained.keras")
    expected = model.evaluate(features, labels, verbose=0, return_dict=True)
    got = restored.evaluate(features, labels, verbose=0, return_dict=True)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, err_msg=key)
    assert float(restored.optimizer.learning_rate) == pytest.approx(1e-2)
    assert int(restored.optimizer.iterations) == int(model.optimizer.iterations)
    restored.fit(features, labels, epochs=1, batch_size=3, verbose=0)  # training continues


def test_bfloat16_towers_train_save_and_stay_close_to_float32(tmp_path):
    float32, mixed = build("ifa"), build("ifa", tower_dtype="mixed_bfloat16")
    mixed.set_weights(float32.get_weights())
    features, labels = make_batch()
    base, out = predict(float32, features), predict(mixed, features)
    for task in base:  # bfloat16 hidden layers (~3 digits), float32 logits and probabilities
        assert out[task].dtype == np.float32
        np.testing.assert_allclose(out[task], base[task], atol=2e-2)
    assert {w.dtype for w in mixed.weights} == {"float32"}  # variables stay float32
    mixed.compile()
    mixed.fit(features, labels, epochs=1, batch_size=3, verbose=0)
    mixed.save(tmp_path / "mixed.keras")
    restored = keras.saving.load_model(tmp_path / "mixed.keras")
    assert restored.tower_dtype == "mixed_bfloat16"
    for task, value in predict(mixed, features).items():
        np.testing.assert_array_equal(predict(restored, features)[task], value)
    with pytest.raises(ValueError, match="tower_dtype='int32'"):
        build("ifa", tower_dtype="int32")


def test_full_sequence_fidelity():
    """IFA, SDIM and din_full read every valid item; din (k = 4) ignores all but the 4 most
    recent."""
    features, _ = make_batch(seq_valid=(12, 12, 12))
    changed = {k: v.copy() for k, v in features.items()}
    changed["seq_item_id"][:, 0] += 1000  # the oldest event: outside din's 4 most recent
    changed["seq_category_id"][:, 0] = (changed["seq_category_id"][:, 0] % 3) + 1
    for name, extra, reacts in (("ifa", {}, True), ("ifa_no_ram", {}, True),
                                ("din_full", {}, True), ("sdim", {}, True), ("din", {}, False),
                                ("din", {"k": None}, True), ("din_full", {"k": 4}, False),
                                ("ifa", {"k": 4}, False), ("ifa+exact_matches", {}, True),
                                ("ifa+exact_matches", {"k": 4}, False)):
        model = build(name, **extra)
        delta = np.abs(predict(model, changed)["score"] - predict(model, features)["score"])
        assert (delta.max() > 1e-6) == reacts, (name, extra)


def keep_most_recent(features, k):
    """`features` with every sequence cut to its k most recent valid events (oldest first,
    padding after), as if the user had no older history."""
    cut = {name: value.copy() for name, value in features.items()}
    valid = (features["seq_item_id"] != 0).sum(axis=1)
    for name in (n for n in features if n.startswith("seq_")):
        cut[name][:] = 0
        for row, length in enumerate(valid):
            kept = features[name][row, max(length - k, 0):length]
            cut[name][row, :len(kept)] = kept
    return cut


@pytest.mark.parametrize("name", ["din", "din_full", "ifa", "ifa+exact_matches"])
def test_recent_k_equals_the_same_model_on_the_cut_history(name, tmp_path):
    """`k` on `din`, `din_full` and `ifa` reads the k most recent events: the model with k = 4
    scores a request as the same weights with k = None score its 4 most recent events."""
    features, _ = make_batch()
    recent, full = build(name, k=4), build(name, k=None)
    full.set_weights(recent.get_weights())
    expected = predict(full, keep_most_recent(features, 4))
    path = tmp_path / f"{name}.keras"
    recent.save(path)
    for model in (recent, keras.saving.load_model(path)):
        assert model.interest.k == 4
        out = predict(model, features)
        for task in expected:
            np.testing.assert_allclose(out[task], expected[task], rtol=1e-5, atol=1e-6)
    # k = None reads what the largest k would.
    np.testing.assert_allclose(predict(build(name, k=12), features)["score"],
                               predict(build(name, k=None), features)["score"], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("name", ["din", "din_full", "ifa", "twin", "sim_hard"])
@pytest.mark.parametrize("k", [0, -3, 2.5, "100"])
def test_bad_k_is_a_clear_error(name, k):
    with pytest.raises(ValueError, match=r"k"):
        build(name, k=k)


def test_search_models_need_a_k():
    with pytest.raises(ValueError, match=r"k"):
        build("twin", k=None)


def exact_matches_reference(features, attributes, with_recency=True):
    """Brute force over [m, n], float64: per attribute, the count of valid events sharing
    each candidate's non-zero id and the newest one's time delta (-1 without one)."""
    valid_events = features["seq_item_id"] != 0
    counts, last = [], []
    for attribute in attributes:
        candidates = features["cand_" + attribute]
        match = ((candidates[:, :, None] == features["seq_" + attribute][:, None, :])
                 & valid_events[:, None, :] & (candidates != 0)[:, :, None]
                 & (features["cand_item_id"] != 0)[:, :, None])
        counts.append(match.sum(-1))
        if with_recency:
            newest = np.where(match, features["seq_time_delta"][:, None, :].astype(float),
                              np.inf).min(-1)
            last.append(np.where(np.isinf(newest), -1, newest).astype("int64"))
    return counts, last


def log2_bucket(values):
    """`HashedEmbedding`'s log2 mode: 1 + floor(log2(1 + max(v, 0)))."""
    return 1 + np.floor(np.log2(1 + np.maximum(values, 0).astype(np.float64))).astype(int)


@pytest.mark.parametrize("schema_kind", ["default", "no_authors_no_time"])
def test_exact_matches_reach_the_towers_as_the_brute_force_counts(schema_kind):
    """The module's output after the heads is, per attribute (sorted by name), the
    embedding of the count of matching events and of the newest one's log2 time delta (a
    zero vector without a match), computed from the brute-force [m, n] reference."""
    schema = SCHEMA if schema_kind == "default" else FeatureSchema(
        item_attributes=("item_id", "category_id"), sequence_context=("seq_action",),
        cross_features=(), embedding_buckets={"item_id": 64, "category_id": 8})
    keras.utils.set_random_seed(2)
    model = zoo.build("ifa", schema=schema, exact_matches=True, exact_match_dim=3, **SMALL)
    features, _ = make_batch(seed=4)
    # Repeated items, authors and categories: copy events into the candidates.
    features["cand_item_id"][:, :3] = features["seq_item_id"][:, 2:5]
    features["cand_author_id"][0, 3] = 0  # an unknown author matches nothing
    features = {k: v for k, v in features.items() if k in schema.feature_names}
    interest = model.get_layer("interest")
    probe = keras.Model(model.inputs, interest.output)
    heads = interest.num_heads * interest.key_dim
    attributes = sorted(a for a in schema.item_attributes)
    with_recency = "seq_time_delta" in schema.sequence_context
    out = keras.ops.convert_to_numpy(probe(features))
    assert out.shape == (3, 6, heads + len(attributes) * (2 if with_recency else 1) * 3)
    counts, last = exact_matches_reference(features, attributes, with_recency)
    assert sum(c.sum() for c in counts) > 10 and (counts[-1] > 0).any()  # items matched
    valid = features["cand_item_id"] != 0
    column = heads
    for index, attribute in enumerate(attributes):
        kinds = ("count", "recency") if with_recency else ("count",)
        for kind in kinds:
            table = keras.ops.convert_to_numpy(
                interest._match_embeddings[f"{attribute}_match_{kind}_embedding"].embeddings)
            if kind == "count":
                expected = table[log2_bucket(counts[index])]
            else:
                expected = table[log2_bucket(last[index])] * (counts[index] > 0)[..., None]
            np.testing.assert_allclose(out[..., column:column + 3][valid], expected[valid],
                                       rtol=1e-6, err_msg=f"{attribute} {kind}")
            column += 3
    assert column == out.shape[-1]


@pytest.mark.parametrize("name", ["ifa", "ifa+exact_matches"])
def test_ifa_traces_no_m_by_n_tensor(name):
    """Every tensor of the traced model at m = 301, n = 293 (primes): none holds both m
    and n, nor m * n elements in one axis: IFA stays O(m + n) with exact matches."""
    m, n = 301, 293
    model = build(name)
    specs = {feature: tf.TensorSpec([2] if feature == "user_id" else
                                    [2, n if feature.startswith("seq_") else m], tf.int64,
                                    name=feature)
             for feature in SCHEMA.feature_names}
    graph = tf.function(lambda features: model(features)).get_concrete_function(specs).graph
    shapes = [t.shape.as_list() for op in graph.get_operations() for t in op.outputs
              if t.shape.rank is not None]
    assert len(shapes) > 100
    assert not [s for s in shapes if (m in s and n in s)
                or any(d is not None and d >= m * n for d in s)]


def test_padded_candidates_change_no_loss_or_metric():
    model = build("ifa")
    model.compile(metrics={"click": [keras_rs.metrics.NDCG(k=3, name="ndcg")]})
    features, labels = make_batch(cand_valid=(6, 6, 6))
    base = model.evaluate(features, labels, verbose=0, return_dict=True)
    padded = {k: (np.pad(v, ((0, 0), (0, 4))) if k.startswith("cand_") else v)
              for k, v in features.items()}
    padded_labels = {t: np.pad(v, ((0, 0), (0, 4)), constant_values=1) for t, v in labels.items()}
    out = model.evaluate(padded, padded_labels, verbose=0, return_dict=True)
    for key in base:
        np.testing.assert_allclose(out[key], base[key], rtol=1e-5, err_msg=key)


def test_custom_training_options_and_tf_data():
    model = build("twin")
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss={t: "binary_crossentropy" for t in SCHEMA.tasks},
                  loss_weights={"impression": 1.0, "click": 2.0, "long_view": 0.5, "like": 0.5},
                  metrics={"click": [keras_rs.metrics.NDCG(k=3, name="ndcg")]})
    features, labels = make_batch()
    dataset = tf.data.Dataset.from_tensor_slices((features, labels)).batch(2)
    with warnings.catch_warnings(record=True) as caught:  # no "shuffle=True ... ignored"
        warnings.simplefilter("always")
        history = model.fit(dataset, epochs=2, verbose=0)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert {"loss", "click_ndcg", "click_loss"} <= set(history.history)
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.pop("seq_author_id"), r"Missing features \['seq_author_id'\]"),
    (lambda f: f.update(cand_item_id=f["cand_item_id"].astype("float32")),
     r"'cand_item_id' must hold integer ids \(int64\). Received: dtype=float32"),
    (lambda f: f.update(user_id=f["user_id"][:, None]),
     r"'user_id' must have rank 1 \(\[batch\]\). Received: shape=\(3, 1\)"),
    (lambda f: f.update(cand_author_id=f["cand_author_id"][:, :4]),
     r"'cand_author_id' has candidate count m 4 but 'cand_item_id' has 6"),
    (lambda f: f.update(seq_action=f["seq_action"][:, :5]),
     r"'seq_action' has sequence length n 5 but 'seq_item_id' has 12"),
    (lambda f: f.update(bogus=f["user_id"]), r"Unexpected features \['bogus'\]"),
])
def test_bad_input_is_a_clear_error(models, mutate, message):
    features, labels = make_batch()
    mutate(features)
    with pytest.raises(ValueError, match=message):
        models["ifa"](features)
    with pytest.raises(ValueError, match=message):
        models["ifa"].predict(features, verbose=0)


def test_negative_and_huge_ids_are_hashed(models):
    features, _ = make_batch()
    features["cand_item_id"][0, :2] = [-5, 2**62]
    features["seq_author_id"][:, :3] = 10**15
    assert np.isfinite(predict(models["ifa"], features)["score"]).all()


def test_unknown_names_and_overrides_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown model 'ifa2'. Registered models: \['avg_"):
        zoo.build("ifa2")
    with pytest.raises(ValueError, match=r"Unknown overrides \['kk'\] .*Valid overrides: "
                                         r"\[.*'k'.*\]"):
        zoo.build("twin", kk=3)
    with pytest.raises(ValueError, match="embedding_dim=0"):
        zoo.build("ifa", embedding_dim=0)


def test_register_adds_a_buildable_model():
    @zoo.register("test_tiny_ifa")
    def tiny(schema=None, heads=1):
        return zoo.build("ifa", schema=schema, ram_heads=heads, **SMALL)

    try:
        assert "test_tiny_ifa" in zoo.list_models()
        assert zoo.build("test_tiny_ifa", schema=SCHEMA).name == "ifa"
        with pytest.raises(ValueError, match=r"Valid overrides: \['heads'\]"):
            zoo.build("test_tiny_ifa", size=3)
        with pytest.raises(ValueError, match="already registered"):
            zoo.register("test_tiny_ifa")(tiny)
    finally:
        zoo._REGISTRY.pop("test_tiny_ifa")


def test_schema_without_authors_or_cross_features():
    schema = FeatureSchema(item_attributes=("item_id", "category_id"), cross_features=(),
                           embedding_buckets={"item_id": 64})
    model = zoo.build("sim_hard", schema=schema, k=3, **SMALL)
    features, _ = make_batch()
    kept = {k: v for k, v in features.items() if k in schema.feature_names}
    assert predict(model, kept)["score"].shape == (3, 6)
    with pytest.raises(ValueError, match="needs inputs"):
        zoo.build("sim_hard", schema=FeatureSchema(item_attributes=("item_id",)))


def test_build_reads_the_schema_of_a_dataset(tmp_path):
    """schema= takes a dataset directory or its metadata.json; a model built for other
    features says how to build one for the data."""
    from ifa_tf.data import records

    schema = FeatureSchema(item_attributes=("item_id", "category_id"),
                           cross_features=("cand_cross_category_count",),
                           tasks=("impression", "click"), embedding_buckets={"item_id": 64})
    records.write_metadata(str(tmp_path), {"schema": schema.to_dict()})
    for where in (tmp_path, str(tmp_path / "metadata.json")):
        model = zoo.build("avg_pooling", schema=where, **SMALL)
        assert model.schema == schema
    features, _ = make_batch()
    kept = {k: v for k, v in features.items() if k in schema.feature_names}
    default_model = zoo.build("avg_pooling", **SMALL)
    with pytest.raises(ValueError, match=r"Missing features \[.seq_author_id., .*"
                                         r"zoo.build\(name, schema=<the dataset directory"):
        default_model(kept)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no metadata.json"):
        zoo.build("avg_pooling", schema=tmp_path / "empty")


# Every model whose sequence module attends, and the options that make it small here.
DECOUPLED = ["din", "din_full", "sim_soft", "twin", "eta", "ifa", "ifa_no_ram", "twin_ram",
             "sam"]


def copy_shared_weights(source, target):
    """`target`'s layers that `source` has too get `source`'s weights; the attention tables
    get the representation tables' (same width), so that `target` attends as `source`."""
    for layer in source.layers:
        if layer.weights:
            target.get_layer(layer.name).set_weights(layer.get_weights())
    for shared, attention in (("item_embedding", "attention_item_embedding"),
                              ("sequence_context_embedding",
                               "attention_sequence_context_embedding")):
        target.get_layer(attention).set_weights(source.get_layer(shared).get_weights())


@pytest.mark.parametrize("name", DECOUPLED)
def test_decoupled_embeddings_equal_the_shared_model_when_the_tables_agree(name):
    """With decoupled_embeddings=True queries, keys and searches read the attention tables
    and values the representation tables: given the same numbers in both, the model
    scores as the shared one does; once the attention tables alone change, its scores
    change while its representation (the candidates' own embeddings) does not."""
    features, _ = make_batch()
    shared, decoupled = build(name), build(name, decoupled_embeddings=True)
    copy_shared_weights(shared, decoupled)
    base = predict(shared, features)
    out = predict(decoupled, features)
    for task in base:
        np.testing.assert_allclose(out[task], base[task], rtol=1e-5, atol=1e-6)
    table = decoupled.get_layer("attention_item_embedding")
    table.set_weights([w + np.random.default_rng(0).normal(0, 0.5, w.shape)
                       for w in table.get_weights()])
    assert np.abs(predict(decoupled, features)["score"] - base["score"]).max() > 1e-4


@pytest.mark.parametrize("name", ["ifa", "twin", "sam"])  # the equality test covers the rest
def test_decoupled_attention_tables_have_their_own_width(name, tmp_path):
    features, _ = make_batch()
    model = build(name, decoupled_embeddings=True, attention_embedding_dim=2)
    width = 2 * len(SCHEMA.item_attributes)
    assert model.get_layer("attention_item_embedding").compute_output_shape(
        [(3, 6)] * len(SCHEMA.item_attributes))[-1] == width
    out = predict(model, features)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.decoupled_embeddings and restored.attention_embedding_dim == 2
    np.testing.assert_allclose(predict(restored, features)["score"], out["score"], atol=1e-7)


@pytest.mark.parametrize("name, extra, message", [
    ("avg_pooling", {"decoupled_embeddings": True}, "no attention to decouple"),
    ("sdim", {"decoupled_embeddings": True}, "no attention to decouple"),
    ("sim_hard", {"decoupled_embeddings": True}, "no attention to decouple"),
    ("ifa", {"attention_embedding_dim": 4}, "decoupled_embeddings=False"),
    ("ifa", {"decoupled_embeddings": True, "attention_embedding_dim": 0},
     "attention_embedding_dim=0"),
    ("ifa", {"decoupled_embeddings": "yes"}, "decoupled_embeddings"),
    ("ifa", {"decoupled_embeddings": True, "time_encoding": "decay"}, "decoupled_embeddings"),
    ("ifa", {"short_term_k": 0}, "k"),
    ("ifa", {"short_term_k": 3, "time_encoding": "decay"}, "short_term_k"),
])
def test_bad_decoupling_or_short_term_is_a_clear_error(name, extra, message):
    with pytest.raises(ValueError, match=message):
        build(name, **extra)


def test_short_term_module_is_softmax_attention_over_the_last_events():
    """`short_term_k` concatenates, after the FSM's heads, what `din_full` with k = 3 reads:
    softmax target attention over the 3 most recent events; older events reach only the
    FSM."""
    features, _ = make_batch()
    model, din_full = build("ifa", short_term_k=3), build("din_full", k=3)
    for table in ("item_embedding", "sequence_context_embedding"):
        din_full.get_layer(table).set_weights(model.get_layer(table).get_weights())
    din_full.interest._attention.set_weights(model.interest._short_term.get_weights())

    def interest(ranker, batch):
        module = keras.Model(ranker.inputs, ranker.get_layer("interest").output)
        return keras.ops.convert_to_numpy(module(batch))

    heads = model.interest.num_heads * model.interest.key_dim
    out, expected = interest(model, features), interest(din_full, features)
    assert out.shape[-1] == heads + expected.shape[-1]
    np.testing.assert_allclose(out[..., heads:], expected, rtol=1e-5, atol=1e-6)
    older = {k: v.copy() for k, v in features.items()}
    older["seq_item_id"][0, 0] += 1000  # the oldest event of a 12-event history
    changed = interest(model, older)
    np.testing.assert_allclose(changed[..., heads:], out[..., heads:], atol=1e-6)
    assert np.abs(changed[0, :, :heads] - out[0, :, :heads]).max() > 1e-6
