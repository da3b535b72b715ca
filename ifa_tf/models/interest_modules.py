"""Sequence modules: how each model lets the candidate set read the behaviour sequence.

Every model of the zoo shares embeddings, RAM, towers and loss (paper 5.1), and differs
only in this module, so comparisons isolate it. A module is a layer called with one dict:

    candidates [B, m, d], sequence [B, n, d], candidate_mask [B, m], sequence_mask [B, n],
    sequence_items [B, n, d] (the sequence's item embeddings alone, without the action and
    time context that `sequence` adds: the same space as `candidates`),
    candidate_<a>s / sequence_<a>s [B, m] / [B, n] for every id attribute <a> of the
    schema (candidate_item_ids, and e.g. candidate_category_ids, candidate_author_ids),
    and sequence_time_deltas [B, n] when the schema has `seq_time_delta`
    (sequence_actions [B, n] when it has `seq_action`)

and, where the ranker decouples attention from representation (`decoupled_embeddings`),
attention_candidates [B, m, d_a], attention_sequence [B, n, d_a] and
attention_sequence_items [B, n, d_a]: the same items and events from the attention tables,
which a module that attends (`supports_decoupled_embeddings`) reads for its queries, keys
and searches, while its values stay the representation's

(a module whose class sets `attention_context = False` gets no attention embedding of the
events' context: `attention_sequence` is then `attention_sequence_items`), and returns the
candidates' interest vectors [B, m, d]. These classes are thin adapters
from that dict to the layers of `ifa_tf.layers`; they live together because each is a few
lines.
"""

import keras
from keras import ops

from ifa_tf import layers
from ifa_tf.layers.feature_maps import check_feature_map
from ifa_tf.layers.top_k import gather_positions, most_recent_mask, most_recent_positions
from ifa_tf.layers.hashed_embedding import LOG2_BUCKETS
from ifa_tf.layers.validation import check_bool, check_choice, check_positive_int

# How an event's age reaches the FSM: an embedding added to its key (the paper's), or a
# per-head exponential decay of its weight (stateful serving).
TIME_ENCODINGS = ("embedding", "decay")


class InterestModule(keras.layers.Layer):
    """Base of the sequence modules: checks the dict and stores no state of its own."""

    required_inputs = ("candidates", "sequence", "candidate_mask", "sequence_mask")
    # Whether the module reads queries and keys apart from values (`attention_*` inputs).
    supports_decoupled_embeddings = False

    def __call__(self, inputs, **kwargs):
        # Checked here rather than in `call`: symbolic calls never reach `call`.
        missing = [k for k in self.required_inputs if k not in inputs]
        if missing:
            raise ValueError(f"{type(self).__name__} needs inputs {missing}; the schema must "
                             "declare the features they come from.")
        return super().__call__(inputs, **kwargs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape["candidates"])


def attention_views(inputs):
    """`(queries, keys, key_items)`: the candidates, events and events' items a module
    attends with: from the attention tables where the ranker decouples them, else the
    shared embeddings (which are then the values too)."""
    return (inputs.get("attention_candidates", inputs["candidates"]),
            inputs.get("attention_sequence", inputs["sequence"]),
            inputs.get("attention_sequence_items", inputs.get("sequence_items")))


def attention_shapes(input_shape):
    """The shapes of `attention_views`' first two, from a module's input shape dict."""
    return (input_shape.get("attention_candidates", input_shape["candidates"]),
            input_shape.get("attention_sequence", input_shape["sequence"]))


def _check_optional_k(k):
    """`k`: a positive int, or None for every item of the sequence."""
    if k is not None:
        check_positive_int("k", k)


def _read_shape(sequence_shape, k):
    """The shape of what a recent-k module reads: [B, k, d], or the sequence's own."""
    return sequence_shape if k is None else (sequence_shape[0], k, sequence_shape[-1])


def _most_recent(inputs, k):
    """`(keys, values, mask)` of the k most recent valid events, most recent first (keys
    from `attention_views`); the whole sequence when k is None."""
    _, keys, _ = attention_views(inputs)
    if k is None:
        return keys, inputs["sequence"], inputs["sequence_mask"]
    indices, recent_mask = most_recent_positions(inputs["sequence_mask"], k)
    values = gather_positions(inputs["sequence"], indices)  # [B, k, d]
    if keys is inputs["sequence"]:
        return values, values, recent_mask
    return gather_positions(keys, indices), values, recent_mask


@keras.saving.register_keras_serializable(package="ifa_tf")
class AveragePoolingInterest(InterestModule):
    """`avg_pooling`: the masked mean of the whole sequence, the same for every candidate."""

    def build(self, input_shape):
        self._pooling = layers.MaskedAveragePooling(dtype=self.dtype_policy, name="pooling")
        self.built = True

    def call(self, inputs):
        pooled = self._pooling(inputs["sequence"], mask=inputs["sequence_mask"])
        return ops.broadcast_to(pooled[:, None, :], ops.shape(inputs["candidates"]))


@keras.saving.register_keras_serializable(package="ifa_tf")
class RecentDINInterest(InterestModule):
    """`din`: DIN's activation unit over the k most recent valid sequence items; `k=None`
    reads every item, O(m n) through the unit's MLP (DIN at the full length)."""

    supports_decoupled_embeddings = True

    def __init__(self, k=100, hidden_units=(80, 40), **kwargs):
        super().__init__(**kwargs)
        _check_optional_k(k)
        self.k = k
        self.hidden_units = list(hidden_units)

    def build(self, input_shape):
        query_shape, key_shape = attention_shapes(input_shape)
        self._unit = layers.DINActivationUnit(self.hidden_units, dtype=self.dtype_policy,
                                              name="activation_unit")
        self._unit.build(query_shape, _read_shape(key_shape, self.k))
        self.built = True

    def call(self, inputs):
        queries, _, _ = attention_views(inputs)
        keys, values, sequence_mask = _most_recent(inputs, self.k)
        return self._unit(queries, keys, values, query_mask=inputs["candidate_mask"],
                          key_mask=sequence_mask)

    def compute_output_shape(self, input_shape):
        return (*input_shape["candidates"][:-1], input_shape["sequence"][-1])

    def get_config(self):
        return {**super().get_config(), "k": self.k, "hidden_units": self.hidden_units}


@keras.saving.register_keras_serializable(package="ifa_tf")
class FullTargetAttentionInterest(InterestModule):
    """`din_full`: exact softmax target attention over the whole sequence, O(m n). `k`
    restricts it to the k most recent valid items (what `din` reads, by dot-product
    attention instead of DIN's MLP unit): one change at a time between `din` and
    `din_full`."""

    supports_decoupled_embeddings = True

    def __init__(self, num_heads=2, key_dim=16, k=None, **kwargs):
        super().__init__(**kwargs)
        _check_optional_k(k)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.k = k

    def build(self, input_shape):
        query_shape, key_shape = attention_shapes(input_shape)
        # The output keeps the representation's width, whatever the attention's.
        self._attention = layers.MaskedTargetAttention(
            self.num_heads, self.key_dim, output_dim=input_shape["candidates"][-1],
            dtype=self.dtype_policy, name="attention")
        self._attention.build(query_shape, _read_shape(key_shape, self.k),
                              _read_shape(input_shape["sequence"], self.k))
        self.built = True

    def call(self, inputs):
        queries, _, _ = attention_views(inputs)
        keys, values, sequence_mask = _most_recent(inputs, self.k)
        return self._attention(queries, keys, values, query_mask=inputs["candidate_mask"],
                               key_mask=sequence_mask)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "key_dim": self.key_dim,
                "k": self.k}


@keras.saving.register_keras_serializable(package="ifa_tf")
class SIMHardInterest(FullTargetAttentionInterest):
    """`sim_hard`: GSU = same-category, most recent k; ESU = target attention over them."""

    required_inputs = (*InterestModule.required_inputs, "candidate_category_ids",
                       "sequence_category_ids")
    # Its search matches categories, not embeddings: there is no attention table to learn.
    supports_decoupled_embeddings = False

    def __init__(self, k=100, num_heads=2, key_dim=16, **kwargs):
        check_positive_int("k", k)  # the search's size: required here
        super().__init__(num_heads=num_heads, key_dim=key_dim, k=k, **kwargs)

    def build(self, input_shape):
        shape = input_shape["candidates"]
        self._search = layers.SIMHardSearch(self.k, dtype=self.dtype_policy, name="search")
        self._attention = layers.MaskedTargetAttention(
            self.num_heads, self.key_dim, dtype=self.dtype_policy, name="attention")
        self._attention.build(shape, (*shape[:2], self.k, input_shape["sequence"][-1]))
        self.built = True

    def call(self, inputs):
        indices, selected_mask = self._search(inputs["candidate_category_ids"],
                                              inputs["sequence_category_ids"],
                                              inputs["sequence_mask"])
        selected = gather_positions(inputs["sequence"], indices)  # [B, m, k, d]
        return self._attention(inputs["candidates"], selected,
                               query_mask=inputs["candidate_mask"], key_mask=selected_mask)


@keras.saving.register_keras_serializable(package="ifa_tf")
class SIMSoftInterest(SIMHardInterest):
    """`sim_soft`: GSU = top k by inner product of separate search embeddings of the item
    ids; ESU = target attention over them, with the search scores as logit bias."""

    required_inputs = (*InterestModule.required_inputs, "candidate_item_ids",
                       "sequence_item_ids")
    supports_decoupled_embeddings = True  # the ESU's queries and keys; the GSU has its own

    def __init__(self, k=100, num_heads=2, key_dim=16, search_dim=16,
                 search_buckets=200_003, **kwargs):
        super().__init__(k=k, num_heads=num_heads, key_dim=key_dim, **kwargs)
        check_positive_int("search_dim", search_dim)
        self.search_dim = search_dim
        self.search_buckets = search_buckets

    def build(self, input_shape):
        shape = input_shape["candidates"]
        self._search_embedding = layers.HashedEmbedding(
            self.search_buckets, self.search_dim, dtype=self.dtype_policy,
            name="search_embedding")
        self._search_embedding.build(input_shape["candidate_item_ids"])
        self._search = layers.SIMSoftSearch(self.k, dtype=self.dtype_policy, name="search")
        query_shape, key_shape = attention_shapes(input_shape)
        self._attention = layers.MaskedTargetAttention(
            self.num_heads, self.key_dim, output_dim=shape[-1], dtype=self.dtype_policy,
            name="attention")
        self._attention.build(query_shape, (*shape[:2], self.k, key_shape[-1]),
                              (*shape[:2], self.k, input_shape["sequence"][-1]))
        self.built = True

    def call(self, inputs):
        indices, selected_mask, scores = self._search(
            self._search_embedding(inputs["candidate_item_ids"]),
            self._search_embedding(inputs["sequence_item_ids"]),
            inputs["sequence_mask"])
        queries, keys, _ = attention_views(inputs)
        selected = gather_positions(inputs["sequence"], indices)  # [B, m, k, d]
        selected_keys = selected if keys is inputs["sequence"] else gather_positions(
            keys, indices)
        return self._attention(queries, selected_keys, selected,
                               query_mask=inputs["candidate_mask"], key_mask=selected_mask,
                               attention_bias=scores)

    def get_config(self):
        return {**super().get_config(), "search_dim": self.search_dim,
                "search_buckets": self.search_buckets}


@keras.saving.register_keras_serializable(package="ifa_tf")
class ETAInterest(SIMHardInterest):
    """`eta`: GSU = top k by Hamming distance of SimHash signatures of the item embeddings
    (ETA); ESU = target attention over them."""

    required_inputs = (*InterestModule.required_inputs, "sequence_items")
    supports_decoupled_embeddings = True  # hashes and attends with the attention tables

    def __init__(self, k=100, num_heads=2, key_dim=16, hash_bits=64, hash_seed=None,
                 **kwargs):
        super().__init__(k=k, num_heads=num_heads, key_dim=key_dim, **kwargs)
        # Built here, so its own argument checks run when the model is configured.
        self._search = layers.ETASearch(k, hash_bits, hash_seed, dtype=self.dtype_policy,
                                        name="search")
        self.hash_bits = hash_bits
        self.hash_seed = hash_seed

    def build(self, input_shape):
        query_shape, key_shape = attention_shapes(input_shape)
        self._search.build(query_shape, input_shape.get("attention_sequence_items",
                                                        input_shape["sequence_items"]))
        self._attention = layers.MaskedTargetAttention(
            self.num_heads, self.key_dim, output_dim=input_shape["candidates"][-1],
            dtype=self.dtype_policy, name="attention")
        self._attention.build(query_shape, key_shape, input_shape["sequence"])
        self.built = True

    def call(self, inputs):
        # Items are compared without their action and time context (a candidate has none);
        # the ESU then reads the selected events with it, each projected once.
        queries, keys, key_items = attention_views(inputs)
        indices, selected_mask = self._search(queries, key_items, inputs["sequence_mask"])
        return self._attention(queries, keys, inputs["sequence"],
                               query_mask=inputs["candidate_mask"], key_mask=selected_mask,
                               key_indices=indices)

    def get_config(self):
        return {**super().get_config(), "hash_bits": self.hash_bits,
                "hash_seed": self.hash_seed}


@keras.saving.register_keras_serializable(package="ifa_tf")
class SDIMInterest(InterestModule):
    """`sdim`: SDIM's hash sampling, per SimHash function the l2-normalised sum of the
    sequence events in the candidate's bucket, averaged over functions; O(m + n)."""

    required_inputs = (*InterestModule.required_inputs, "sequence_items")

    def __init__(self, num_hashes=16, hash_bits=3, hash_seed=None, **kwargs):
        super().__init__(**kwargs)
        # Built here, so its own argument checks run when the model is configured.
        self._attention = layers.SDIMAttention(num_hashes, hash_bits, hash_seed,
                                               dtype=self.dtype_policy, name="attention")
        self.num_hashes = num_hashes
        self.hash_bits = hash_bits
        self.hash_seed = hash_seed

    def build(self, input_shape):
        self._attention.build(input_shape["candidates"], input_shape["sequence_items"],
                              input_shape["sequence"])
        self.built = True

    def call(self, inputs):
        # Buckets by the items alone (a candidate has no action or time context); the sums
        # are of the events, context included.
        return self._attention(inputs["candidates"], inputs["sequence_items"],
                               inputs["sequence"], query_mask=inputs["candidate_mask"],
                               key_mask=inputs["sequence_mask"])

    def compute_output_shape(self, input_shape):
        return (*input_shape["candidates"][:-1], input_shape["sequence"][-1])

    def get_config(self):
        return {**super().get_config(), "num_hashes": self.num_hashes,
                "hash_bits": self.hash_bits, "hash_seed": self.hash_seed}


@keras.saving.register_keras_serializable(package="ifa_tf")
class TWINInterest(FullTargetAttentionInterest):
    """`twin`, `twin_ram`: TWIN's light-attention GSU (top k) and multi-head ESU."""

    def __init__(self, k=100, num_heads=2, key_dim=16, **kwargs):
        check_positive_int("k", k)  # the search's size: required here
        super().__init__(num_heads=num_heads, key_dim=key_dim, k=k, **kwargs)

    def build(self, input_shape):
        query_shape, key_shape = attention_shapes(input_shape)
        self._attention = layers.TWINAttention(
            self.k, self.num_heads, self.key_dim, output_dim=input_shape["candidates"][-1],
            dtype=self.dtype_policy, name="attention")
        self._attention.build(query_shape, key_shape, input_shape["sequence"])
        self.built = True

    def call(self, inputs):
        # The whole sequence: TWIN's own search picks the k events per candidate.
        queries, keys, _ = attention_views(inputs)
        return self._attention(queries, keys, inputs["sequence"],
                               query_mask=inputs["candidate_mask"],
                               key_mask=inputs["sequence_mask"])


@keras.saving.register_keras_serializable(package="ifa_tf")
class LinearAttentionInterest(FullTargetAttentionInterest):
    """`ifa`, `ifa_no_ram`: Full Sequence Modelling (FSM, IFA Eq. 2) by normalised linear
    attention over every valid sequence item, O(m + n), optionally with the exact matches
    of each candidate over the whole sequence.

    As in Eq. 6 the heads are the output (num_heads * key_dim wide), with no output
    projection: the towers' first layer is linear, so one would add cost and no
    expressivity. `feature_map`, `focusing_factor`, `learnable_temperature` and
    `learnable_focusing_factor` are those of `NormalizedLinearAttention`; `k`, as for
    `din_full`, restricts the module to the k most recent valid items (an ablation of
    range).

    `exact_matches=True` adds the candidate's exact matches (`ifa_tf.layers.ExactMatches`)
    to the interaction: for each id attribute the module is given (item, author, category),
    how many of the events it reads share the candidate's id (log2-bucketed embedding) and
    how long ago the newest of them was (log2 of its time delta in seconds; a zero vector
    when there is none), each `exact_match_dim` wide, concatenated after the heads. It
    costs O((m + n) log n) per attribute, no [m, n] comparison. Off by default.

    `short_term_k` adds a short-term module beside the long-term FSM, the production
    pattern of one long-term and one short-term reader: exact softmax target attention
    (`MaskedTargetAttention`, the module's heads) over the `short_term_k` most recent valid
    events, its output (the representation's width) concatenated after the heads. Softmax
    is sharp where linear attention is not, and the last events are where sharpness pays.
    O(m * short_term_k): linear in m + n for a fixed k. Off (None) by default.

    Inputs (the module dict, see above): with `exact_matches`, `candidate_<a>s` and
    `sequence_<a>s` of every id attribute `<a>` present (`item_id` at least), and
    `sequence_time_deltas` when the schema has `seq_time_delta` (without it, counts only).

    `time_encoding="decay"` (stateful IFA, `ifa_tf.layers.DecayedLinearAttention`): an
    event's age no longer enters its key (the ranker leaves `seq_time_delta` out of the
    context embedding); it weighs `exp(-lambda_h * age)` per head instead, rates learnt
    from `decay_time_scales` (seconds per head; default: an hour to a year). The sequence is
    then read only through a fixed-size per-user state (`sequence_state`, `advance_state`,
    `read_state`) that new events update exactly, so a server can keep the state instead
    of the sequence. Needs `sequence_time_deltas`; `exact_matches`, `k` and the Hedgehog
    map read the raw sequence (or all of it at once) and are refused with it.
    """

    def __init__(self, num_heads=2, key_dim=16, feature_map="elu_plus_one",
                 focusing_factor=None, k=None, learnable_temperature=False,
                 learnable_focusing_factor=False, exact_matches=False, exact_match_dim=8,
                 time_encoding="embedding", decay_time_scales=None, short_term_k=None,
                 **kwargs):
        super().__init__(num_heads=num_heads, key_dim=key_dim, k=k, **kwargs)
        _check_optional_k(short_term_k)
        # Checked here: the attention layer is only made in `build`.
        check_feature_map(feature_map, focusing_factor, learnable_temperature,
                          learnable_focusing_factor)
        check_bool("exact_matches", exact_matches)
        check_positive_int("exact_match_dim", exact_match_dim)
        check_choice("time_encoding", time_encoding, TIME_ENCODINGS)
        if time_encoding == "decay":
            refused = {"exact_matches": exact_matches or None, "k": k,
                       "short_term_k": short_term_k,
                       "feature_map": "hedgehog" if feature_map == "hedgehog" else None}
            refused = {name: value for name, value in refused.items() if value is not None}
            if refused:
                raise ValueError(
                    "time_encoding='decay' keeps a fixed-size state of the sequence, which "
                    f"{sorted(refused)} cannot be computed from (they read the raw "
                    f"sequence). Received: {', '.join(f'{n}={v!r}' for n, v in refused.items())}")
        elif decay_time_scales is not None:
            raise ValueError("`decay_time_scales` needs time_encoding='decay'. Received: "
                             f"decay_time_scales={decay_time_scales!r}")
        self.time_encoding = time_encoding
        self.decay_time_scales = (None if decay_time_scales is None
                                  else [float(t) for t in decay_time_scales])
        self.feature_map = feature_map
        self.focusing_factor = focusing_factor
        self.learnable_temperature = learnable_temperature
        self.learnable_focusing_factor = learnable_focusing_factor
        self.exact_matches = exact_matches
        self.exact_match_dim = exact_match_dim
        self.short_term_k = short_term_k
        if exact_matches:
            self.required_inputs = (*self.required_inputs, "candidate_item_ids",
                                    "sequence_item_ids")

    def build(self, input_shape):
        if self.time_encoding == "decay":
            if "sequence_time_deltas" not in input_shape:
                raise ValueError("time_encoding='decay' needs the events' ages: the schema "
                                 "must declare `seq_time_delta`.")
            self._attention = layers.DecayedLinearAttention(
                self.num_heads, self.key_dim, time_scales=self.decay_time_scales,
                feature_map=self.feature_map, focusing_factor=self.focusing_factor,
                learnable_temperature=self.learnable_temperature,
                learnable_focusing_factor=self.learnable_focusing_factor,
                use_output_projection=False, dtype=self.dtype_policy, name="attention")
            self._attention.build(input_shape["candidates"], input_shape["sequence"])
            self.built = True
            return
        self._attention = layers.NormalizedLinearAttention(
            self.num_heads, self.key_dim, feature_map=self.feature_map,
            focusing_factor=self.focusing_factor,
            learnable_temperature=self.learnable_temperature,
            learnable_focusing_factor=self.learnable_focusing_factor,
            use_output_projection=False, dtype=self.dtype_policy, name="attention")
        query_shape, key_shape = attention_shapes(input_shape)
        self._attention.build(query_shape, _read_shape(key_shape, self.k),
                              _read_shape(input_shape["sequence"], self.k))
        if self.short_term_k is not None:
            self._short_term = layers.MaskedTargetAttention(
                self.num_heads, self.key_dim, output_dim=input_shape["candidates"][-1],
                dtype=self.dtype_policy, name="short_term_attention")
            self._short_term.build(query_shape, _read_shape(key_shape, self.short_term_k),
                                   _read_shape(input_shape["sequence"], self.short_term_k))
        if self.exact_matches:
            self._match_attributes = _match_attributes(input_shape)
            self._with_recency = "sequence_time_deltas" in input_shape
            self._exact_matches = layers.ExactMatches(name="exact_matches")
            self._match_embeddings = {}
            for attribute in self._match_attributes:
                for kind in ("count", "recency") if self._with_recency else ("count",):
                    name = f"{attribute}_match_{kind}_embedding"
                    embedding = layers.HashedEmbedding(LOG2_BUCKETS, self.exact_match_dim,
                                                       mode="log2", dtype=self.dtype_policy,
                                                       name=name)
                    embedding.build(input_shape["candidate_mask"])
                    self._match_embeddings[name] = embedding
        self.built = True

    def call(self, inputs):
        if self.time_encoding == "decay":
            return self.read_state(inputs, self.sequence_state(inputs))
        parts = [super().call(inputs)]
        if self.short_term_k is not None:
            # Softmax over the last events: sharp where a linear kernel cannot be.
            queries, _, _ = attention_views(inputs)
            keys, values, recent_mask = _most_recent(inputs, self.short_term_k)
            parts.append(self._short_term(queries, keys, values,
                                          query_mask=inputs["candidate_mask"],
                                          key_mask=recent_mask))
        if self.exact_matches:
            parts.append(self._match_features(inputs))
        return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)

    # Stateful reading (time_encoding="decay"): all the candidates need of the sequence.
    @property
    def state_shape(self):
        """One user's state shape, (heads, feature_dim, value_dim + 1)."""
        return self._attention.state_shape

    def sequence_state(self, inputs):
        """The state of `inputs["sequence"]` (masked by `sequence_mask`) at the ages
        `sequence_time_deltas`, [B, heads, feature_dim, value_dim + 1]."""
        return self._attention.key_state(inputs["sequence"], inputs["sequence_time_deltas"],
                                         key_mask=inputs["sequence_mask"])

    def advance_state(self, state, elapsed):
        return self._attention.advance_state(state, elapsed)

    def read_state(self, inputs, state):
        """The candidates' interest from a state at the request's time."""
        return self._attention.read_state(inputs["candidates"], state,
                                          query_mask=inputs["candidate_mask"])

    def _match_features(self, inputs):
        """[B, m, attributes * (1 or 2) * exact_match_dim]: per attribute, the embeddings
        of the count of matching events and of the newest one's time delta."""
        sequence_mask = inputs["sequence_mask"]
        if self.k is not None:
            # The same events the attention reads: the k most recent valid ones.
            sequence_mask = most_recent_mask(sequence_mask, self.k)
        counts, last_time_delta = self._exact_matches(
            [inputs[f"candidate_{a}s"] for a in self._match_attributes],
            [inputs[f"sequence_{a}s"] for a in self._match_attributes],
            inputs["sequence_time_deltas"] if self._with_recency else None,
            sequence_mask=sequence_mask, candidate_mask=inputs["candidate_mask"])
        features = []
        for index, attribute in enumerate(self._match_attributes):
            count = counts[..., index]
            features.append(self._match_embeddings[f"{attribute}_match_count_embedding"](
                count))
            if self._with_recency:
                # No match, no recency: a zero vector rather than a bucket shared with
                # "just now".
                matched = ops.cast(count > 0, self.compute_dtype)[..., None]
                features.append(self._match_embeddings[f"{attribute}_match_recency_embedding"](
                    last_time_delta[..., index]) * matched)
        return ops.concatenate(features, axis=-1)

    def compute_output_shape(self, input_shape):
        width = self.num_heads * self.key_dim
        if self.short_term_k is not None:
            width += input_shape["candidates"][-1]
        if self.exact_matches:
            kinds = 2 if "sequence_time_deltas" in input_shape else 1
            width += len(_match_attributes(input_shape)) * kinds * self.exact_match_dim
        return (*input_shape["candidates"][:-1], width)

    def get_config(self):
        return {**super().get_config(), "feature_map": self.feature_map,
                "focusing_factor": self.focusing_factor,
                "learnable_temperature": self.learnable_temperature,
                "learnable_focusing_factor": self.learnable_focusing_factor,
                "exact_matches": self.exact_matches, "exact_match_dim": self.exact_match_dim,
                "time_encoding": self.time_encoding,
                "decay_time_scales": self.decay_time_scales,
                "short_term_k": self.short_term_k}


def _match_attributes(input_shape):
    """The id attributes given on both sides (`candidate_<a>s` and `sequence_<a>s`),
    sorted: e.g. `["author_id", "category_id", "item_id"]`."""
    return sorted(key[len("candidate_"):-1] for key in input_shape
                  if key.startswith("candidate_") and key.endswith("_ids")
                  and f"sequence_{key[len('candidate_'):]}" in input_shape)


@keras.saving.register_keras_serializable(package="ifa_tf")
class DAREInterest(InterestModule):
    """`dare`: DARE's model (Feng et al., ICLR 2025): attention and representation from
    separate tables (the ranker's `decoupled_embeddings`, which the zoo's `dare` always
    sets). Each candidate scores every event by the attention tables' items plus a time
    term (`ifa_tf.layers.DAREAttention`), keeps the top k, and pools the events'
    representation by the softmax of those scores: h. The towers then read
    `[r, h, r * h]` (r, the candidate's representation, is every model's first tower
    input; this module returns `[h, r * h]`).

    The time term: DARE embeds each event's position from the end in the attention space
    and scores it against the target's (position 0), scaled apart from the items. Here
    the position is the event's age, log2-bucketed like every model's time context
    (`time_dim` wide, its own table), and the candidate's age is 0; without
    `sequence_time_deltas` in the schema there is no time term. The events' action and time
    context reach the pooled representation, as in every zoo model. Left out: the official
    code's auxiliary loss over full (not top-k) attention, which the paper does not have.
    """

    required_inputs = (*InterestModule.required_inputs, "attention_candidates",
                       "attention_sequence_items")
    supports_decoupled_embeddings = True
    # Scores read the attention tables' items and a time term of its own: the ranker
    # makes no attention tables for the events' context.
    attention_context = False

    def __init__(self, k=100, time_dim=16, **kwargs):
        super().__init__(**kwargs)
        check_positive_int("k", k)
        check_positive_int("time_dim", time_dim)
        self.k = k
        self.time_dim = time_dim
        self._attention = layers.DAREAttention(k, dtype=self.dtype_policy, name="attention")

    def build(self, input_shape):
        self._with_time = "sequence_time_deltas" in input_shape
        if self._with_time:
            self._time_embedding = layers.HashedEmbedding(
                LOG2_BUCKETS, self.time_dim, mode="log2", dtype=self.dtype_policy,
                name="attention_time_embedding")
            self._time_embedding.build(input_shape["sequence_time_deltas"])
        self.built = True

    def call(self, inputs):
        query_time = key_time = None
        if self._with_time:
            deltas = inputs["sequence_time_deltas"]
            key_time = self._time_embedding(deltas)  # [B, n, time_dim]
            # A candidate is shown now: age 0, one embedding for all of them.
            query_time = self._time_embedding(
                ops.zeros((ops.shape(deltas)[0], 1), dtype=deltas.dtype))
        pooled = self._attention(inputs["attention_candidates"],
                                 inputs["attention_sequence_items"], inputs["sequence"],
                                 query_time, key_time, query_mask=inputs["candidate_mask"],
                                 key_mask=inputs["sequence_mask"])
        # DARE's target representation (TR): the candidate's own times what it pooled.
        return ops.concatenate([pooled, inputs["candidates"] * pooled], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape["candidates"][:-1], 2 * input_shape["sequence"][-1])

    def get_config(self):
        return {**super().get_config(), "k": self.k, "time_dim": self.time_dim}


@keras.saving.register_keras_serializable(package="ifa_tf")
class MIRRNInterest(InterestModule):
    """`mirrn`: MIRRN (Xu et al., KDD 2025, `ifa_tf.layers.MIRRNAttention`): the target, the
    last 16 events and the whole sequence each retrieve their top k events by SimHash
    (re-sorted oldest first), a Fourier filter refines each retrieved sub-sequence, and
    multi-head target attention fuses the three interests. Items are hashed without their
    action and time context (a candidate has none) and the events are retrieved with it.
    The official code hashes item and category fields as separate pairs; here an item is
    its attributes' embeddings concatenated, as in the FuxiCTR port and every zoo model.
    `fourier_filter="released"` reproduces the official code's filter (its einsum keeps
    one gain per channel); the default is the paper's per-frequency filter."""

    required_inputs = (*InterestModule.required_inputs, "sequence_items")

    def __init__(self, k=100, hash_bits=32, hash_seed=None, local_window=16,
                 num_filter_heads=4, fourier_filter="paper", dropout=0.1, num_heads=4,
                 key_dim=8, **kwargs):
        super().__init__(**kwargs)
        # Built here, so its own argument checks run when the model is configured.
        self._attention = layers.MIRRNAttention(
            k, hash_bits, hash_seed, local_window, num_filter_heads, fourier_filter,
            dropout, num_heads=num_heads, key_dim=key_dim, dtype=self.dtype_policy,
            name="attention")
        self.k = k
        self.hash_bits = hash_bits
        self.hash_seed = hash_seed
        self.local_window = local_window
        self.num_filter_heads = num_filter_heads
        self.fourier_filter = fourier_filter
        self.dropout = dropout
        self.num_heads = num_heads
        self.key_dim = key_dim

    def build(self, input_shape):
        self._attention.build(input_shape["candidates"], input_shape["sequence_items"],
                              input_shape["sequence"])
        self.built = True

    def call(self, inputs, training=None):
        return self._attention(inputs["candidates"], inputs["sequence_items"],
                               inputs["sequence"], candidate_mask=inputs["candidate_mask"],
                               sequence_mask=inputs["sequence_mask"], training=training)

    def compute_output_shape(self, input_shape):
        return (*input_shape["candidates"][:-1], input_shape["sequence"][-1])

    def get_config(self):
        return {**super().get_config(), "k": self.k, "hash_bits": self.hash_bits,
                "hash_seed": self.hash_seed, "local_window": self.local_window,
                "num_filter_heads": self.num_filter_heads,
                "fourier_filter": self.fourier_filter, "dropout": self.dropout,
                "num_heads": self.num_heads, "key_dim": self.key_dim}


@keras.saving.register_keras_serializable(package="ifa_tf")
class SAMInterest(InterestModule):
    """`sam`: SAM's sparse attentive memory (`ifa_tf.layers.SAMMemory`): each candidate
    reads the whole sequence `num_passes` times with point-wise sigmoid weights from an MLP
    of the candidate, its memory and each event, a GRU refines the memory after each pass,
    and Memory Enhancement refines it again; O(num_passes * m * n * attention_units) per
    request.

    The memory starts as the candidate's representation and reads the events' values; with
    decoupled embeddings the weights compare the attention tables' candidate and events
    (`SAMMemory` maps the memory into their width where it differs). The output is
    `summary_units` wide plus the representation's width.
    """

    supports_decoupled_embeddings = True

    def __init__(self, num_passes=3, attention_units=8, summary_units=16,
                 enhancement_steps=3, memory_query="paper", **kwargs):
        super().__init__(**kwargs)
        # Built here, so its own argument checks run when the model is configured.
        self._memory = layers.SAMMemory(num_passes, attention_units, summary_units,
                                        enhancement_steps, memory_query,
                                        dtype=self.dtype_policy, name="memory")
        self.num_passes = num_passes
        self.attention_units = attention_units
        self.summary_units = summary_units
        self.enhancement_steps = enhancement_steps
        self.memory_query = memory_query

    def build(self, input_shape):
        query_shape, key_shape = attention_shapes(input_shape)
        self._memory.build(query_shape, key_shape, input_shape["sequence"],
                           input_shape["candidates"])
        self.built = True

    def call(self, inputs):
        queries, keys, _ = attention_views(inputs)
        return self._memory(queries, keys, inputs["sequence"],
                            initial_memory=inputs["candidates"],
                            query_mask=inputs["candidate_mask"],
                            key_mask=inputs["sequence_mask"])

    def compute_output_shape(self, input_shape):
        return (*input_shape["candidates"][:-1],
                self.summary_units + input_shape["candidates"][-1])

    def get_config(self):
        return {**super().get_config(), "num_passes": self.num_passes,
                "attention_units": self.attention_units,
                "summary_units": self.summary_units,
                "enhancement_steps": self.enhancement_steps,
                "memory_query": self.memory_query}


@keras.saving.register_keras_serializable(package="ifa_tf")
class TWINV2Interest(TWINInterest):
    """`twin_v2`: TWIN's GSU (top k) and ESU over the user's history compressed into
    clusters of at most `max_cluster_size` events, each scored with ln(its size) added
    (TWIN-V2, Si et al., CIKM 2024).

    The clustering (`ifa_tf.layers.TWINV2Clustering`) runs in the model, per request, on
    the stop-gradient item embeddings: a request carries the raw sequence alone, as for
    every other model, and no offline job or cluster feature is needed. It groups events
    by their action bits (`group_by_action`; the paper's play-completion groups), splits
    each group by up to `cluster_bits` SimHash hyperplanes until no cell holds more than
    `max_cluster_size` events (the paper's recursive k-means), and cuts what is still
    larger oldest first. A cluster is read as the item closest to its centroid plus its
    members' mean context (action, time). `max_clusters` keeps only the clusters with the
    most recent events, so the GSU costs O(m * max_clusters) instead of O(m n).

    Inputs (the module dict): `sequence_items`, and `sequence_actions` when the schema has
    `seq_action` (without it, or with `group_by_action=False`, one group).
    """

    required_inputs = (*InterestModule.required_inputs, "sequence_items")
    # It clusters, attends and reads values from one set of embeddings.
    supports_decoupled_embeddings = False

    def __init__(self, k=100, num_heads=2, key_dim=16, max_cluster_size=20, cluster_bits=8,
                 max_clusters=None, group_by_action=True, hash_seed=None, **kwargs):
        super().__init__(k=k, num_heads=num_heads, key_dim=key_dim, **kwargs)
        check_bool("group_by_action", group_by_action)
        # Built here, so its own argument checks run when the model is configured. Groups
        # are the ranker's action buckets (bit sets of click, long view, like).
        from ifa_tf.models.candidate_set_ranker import _ACTION_BUCKETS

        self._clustering = layers.TWINV2Clustering(
            max_cluster_size, cluster_bits, num_groups=_ACTION_BUCKETS,
            max_clusters=max_clusters,
            hash_seed=hash_seed, dtype=self.dtype_policy, name="clustering")
        self.max_cluster_size = max_cluster_size
        self.cluster_bits = cluster_bits
        self.max_clusters = max_clusters
        self.group_by_action = group_by_action
        self.hash_seed = hash_seed

    def build(self, input_shape):
        self._clustering.build(input_shape["sequence_items"], input_shape["sequence"])
        clusters_shape, _, _ = self._clustering.compute_output_shape(
            input_shape["sequence_items"], input_shape["sequence"])
        self._attention = layers.TWINAttention(
            self.k, self.num_heads, self.key_dim, output_dim=input_shape["candidates"][-1],
            dtype=self.dtype_policy, name="attention")
        self._attention.build(input_shape["candidates"], clusters_shape)
        self.built = True

    def call(self, inputs):
        groups = inputs.get("sequence_actions") if self.group_by_action else None
        clusters, sizes, cluster_mask = self._clustering(
            inputs["sequence_items"], inputs["sequence"], groups=groups,
            sequence_mask=inputs["sequence_mask"])
        # ln(n_c) in both stages: a cluster weighs as its n_c events would.
        size_bias = ops.log(ops.cast(ops.maximum(sizes, 1), "float32"))
        return self._attention(inputs["candidates"], clusters,
                               query_mask=inputs["candidate_mask"], key_mask=cluster_mask,
                               key_bias=size_bias)

    def get_config(self):
        return {**super().get_config(), "max_cluster_size": self.max_cluster_size,
                "cluster_bits": self.cluster_bits, "max_clusters": self.max_clusters,
                "group_by_action": self.group_by_action, "hash_seed": self.hash_seed}
