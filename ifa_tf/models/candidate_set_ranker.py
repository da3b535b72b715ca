import keras
from keras import ops

from ifa_tf import layers
from ifa_tf.layers.feature_maps import check_feature_map
from ifa_tf.layers.hashed_embedding import LOG2_BUCKETS
from ifa_tf.layers.validation import (check_bool, check_dtype_policy, check_positive_int,
                                      check_units, clone_initializer)
from ifa_tf.models.training_defaults import TrainingDefaultsMixin
from ifa_tf.schema import CANDIDATE_PREFIX, MAX_TIME, SEQUENCE_PREFIX, resolve_schema

_TIME_DELTA = SEQUENCE_PREFIX + "time_delta"
# What `update_state` takes for each new event in place of its age: its time, in seconds.
EVENT_TIME = SEQUENCE_PREFIX + "event_time"

# Action bit sets (1 click, 2 long view, 4 like) and their combinations fit in 8 buckets;
# counts and durations take log2 buckets (LOG2_BUCKETS cover every int64 magnitude).
_ACTION_BUCKETS = 8


@keras.saving.register_keras_serializable(package="ifa_tf")
class CandidateSetRanker(TrainingDefaultsMixin, keras.Model):
    """Scores a whole candidate set against a lifelong behaviour sequence (IFA, paper 4.2).

    The skeleton every zoo model shares; models differ only in `interest`:

    1. Embedding: raw int64 ids are hashed into tables (bucket 0 = padding). Sequence and
       candidates share the item attributes' embeddings (one block of one table per
       attribute); an item's embedding is the concat of its attributes'. Sequence items
       also add embeddings of their context (action bits, log2 of the time delta). Cross
       features are log2-bucketed counts.
    2. Sequence module `interest` (F_c-s): candidates read the sequence.
    3. RAM (optional, Eq. 3): `CandidateSelfAttention` among the candidates (F_c-c).
    4. Towers (Eq. 4) over `[F_can, F_c-s, F_c-c, F_u, F_cro]`, one per task, and ESMM
       (Eq. 5): `p(gate | cand)` from the first task's tower, and for every other task
       `p(task | cand) = p(gate | cand) * p(task | gate)`.

    Masking: a candidate is valid where `cand_item_id != 0`, a sequence item where
    `seq_item_id != 0`. Padded candidates get probability 0 and are masked out of every
    loss and metric (see `TrainingDefaultsMixin`); padding never changes a valid output.

    Args:
        interest: the sequence module (a layer from `ifa_tf.models.interest_modules`).
        schema: a `FeatureSchema` (or dict / JSON path); `None` for the default schema.
        embedding_dim: size of each attribute's, user feature's and cross feature's
            embedding.
        use_ram: add the candidate self-attention (RAM).
        ram_heads, ram_key_dim: RAM's heads and head size.
        ram_feature_map: RAM's phi (see `NormalizedLinearAttention`), set apart from the
            sequence module's. `zoo.build` makes it follow the FSM's `feature_map` (and
            `focusing_factor`) unless it is given, as `feature_map` set both before RAM had
            its own.
        ram_focusing_factor: RAM's power p when `ram_feature_map="focused"`; `None`
            means 3.
        ram_learnable_temperature, ram_learnable_focusing_factor: RAM's learnable
            sharpness (`NormalizedLinearAttention`'s `learnable_temperature` and
            `learnable_focusing_factor`); off by default.
        tower_units: hidden sizes of every task tower.
        dropout: tower dropout.
        embeddings_initializer: initializer of every embedding table (items, users,
            context, cross features), as for `keras.layers.Embedding`.
        tower_dtype: dtype policy of the task towers alone, e.g. `"mixed_bfloat16"`: their
            hidden layers then compute in bfloat16 while each tower's logit, the attention
            and the embeddings stay float32. Where the hardware has bfloat16 matrix units
            (AMX), IFA at m = 10,000 takes 20-25% less time (README "How fast"). `None`: the
            model's policy.
        decoupled_embeddings: give the sequence module separate attention tables (DARE,
            Feng et al., ICLR 2025): queries, keys and searches read the items (and the
            events' context) from tables of their own, values and the towers from the
            representation tables, so neither gradient dominates the other's table. The
            module receives them as `attention_candidates`, `attention_sequence` and
            `attention_sequence_items`; RAM takes its queries and keys from them too. Only
            for modules that attend (`supports_decoupled_embeddings`); the cost per request
            keeps its order (IFA stays O(m + n)), the tables double.
        attention_embedding_dim: width of each attribute's attention embedding (may be
            smaller than `embedding_dim`: attention needs less than representation);
            `None`: `embedding_dim`.

    Call arguments:
        inputs: dict of the schema's features: user features [B], `seq_*` [B, n],
            `cand_*` [B, m], all int64.

    Returns:
        `{task: p(task | candidate) [B, m] for every schema task, "score": [B, m]}` where
        `score` is the probability of `schema.score_task`.

    Example:
    >>> model = ifa_tf.zoo.build("ifa")
    >>> model.compile()
    >>> model.fit(dataset, epochs=1)  # dataset of (features, labels)
    """

    def __init__(self, interest, schema=None, embedding_dim=16, use_ram=True, ram_heads=2,
                 ram_key_dim=16, ram_feature_map="elu_plus_one", ram_focusing_factor=None,
                 ram_learnable_temperature=False, ram_learnable_focusing_factor=False,
                 tower_units=(128, 64), dropout=0.0, tower_dtype=None,
                 embeddings_initializer="uniform", decoupled_embeddings=False,
                 attention_embedding_dim=None, **kwargs):
        schema = resolve_schema(schema)
        check_positive_int("embedding_dim", embedding_dim)
        check_bool("decoupled_embeddings", decoupled_embeddings)
        if attention_embedding_dim is not None:
            check_positive_int("attention_embedding_dim", attention_embedding_dim)
            if not decoupled_embeddings:
                raise ValueError("`attention_embedding_dim` is the width of the attention "
                                 "tables of decoupled_embeddings=True. Received: "
                                 f"attention_embedding_dim={attention_embedding_dim}, "
                                 "decoupled_embeddings=False")
        check_feature_map(ram_feature_map, ram_focusing_factor, ram_learnable_temperature,
                          ram_learnable_focusing_factor, prefix="ram_")
        tower_units = check_units("tower_units", tower_units)
        if isinstance(interest, dict):
            interest = keras.saving.deserialize_keras_object(interest)
        if not isinstance(interest, keras.layers.Layer):
            raise ValueError("`interest` must be a sequence module layer. "
                             f"Received: interest={interest!r}")
        if decoupled_embeddings and not getattr(interest, "supports_decoupled_embeddings",
                                                False):
            raise ValueError(
                f"{type(interest).__name__} does not attend (or cannot read keys apart from "
                "values), so it has no attention to decouple. Received: "
                "decoupled_embeddings=True")
        item_dim = embedding_dim * len(schema.item_attributes)
        embeddings_initializer = keras.initializers.get(embeddings_initializer)

        def initializer():  # one per table, so no two tables share seeded state
            return clone_initializer(embeddings_initializer)

        # === Layers ===
        # One table with a block per attribute: an item's attribute embeddings come from
        # one gather, already concatenated.
        item_embedding = layers.StackedHashedEmbedding(
            [schema.num_buckets(attribute) for attribute in schema.item_attributes],
            embedding_dim, embeddings_initializer=initializer(), name="item_embedding")
        user_embeddings = {
            name: layers.HashedEmbedding(schema.num_buckets(name), embedding_dim,
                                         embeddings_initializer=initializer(),
                                         name=f"{name}_embedding")
            for name in schema.user_features
        }
        # Context (action bits, log2 time delta) embeddings are summed into the sequence
        # items; with few buckets per feature the sum is a single lookup. A decayed FSM
        # (stateful IFA) weighs events by their age instead: their keys carry no time.
        stateful = getattr(interest, "time_encoding", None) == "decay"
        if stateful and _TIME_DELTA not in schema.sequence_context:
            raise ValueError("time_encoding='decay' weighs events by their age: the schema "
                             f"must declare {_TIME_DELTA!r}. Received: sequence_context="
                             f"{schema.sequence_context}")
        if stateful and decoupled_embeddings:
            raise ValueError("time_encoding='decay' serves from a state built with the "
                             "representation tables alone; it cannot be combined with "
                             "decoupled_embeddings=True.")
        context_features = _context_features(schema, stateful)
        context_buckets = [(_ACTION_BUCKETS, "clip") if name == "seq_action"
                           else (LOG2_BUCKETS, "log2") for name in context_features]
        context_embedding = layers.SummedHashedEmbedding(
            [buckets for buckets, _ in context_buckets], [mode for _, mode in context_buckets],
            item_dim, names=[f"{name}_embedding" for name in context_features],
            embeddings_initializer=initializer(),
            name="sequence_context_embedding") if context_features else None
        # DARE (Feng et al., ICLR 2025): attention (queries, keys, search) and representation
        # (values, what the towers read) from separate tables, so the gradients of the one
        # do not dominate or oppose the other's. Same ids, same context, own widths.
        attention_item_embedding = attention_context_embedding = None
        if decoupled_embeddings:
            attention_dim = attention_embedding_dim or embedding_dim
            attention_item_embedding = layers.StackedHashedEmbedding(
                [schema.num_buckets(attribute) for attribute in schema.item_attributes],
                attention_dim, embeddings_initializer=initializer(),
                name="attention_item_embedding")
            attention_context_embedding = layers.SummedHashedEmbedding(
                [buckets for buckets, _ in context_buckets],
                [mode for _, mode in context_buckets],
                attention_dim * len(schema.item_attributes),
                names=[f"attention_{name}_embedding" for name in context_features],
                embeddings_initializer=initializer(),
                name="attention_sequence_context_embedding"
            ) if context_features and getattr(interest, "attention_context", True) else None
        cross_embeddings = {
            name: layers.HashedEmbedding(LOG2_BUCKETS, embedding_dim, mode="log2",
                                         embeddings_initializer=initializer(),
                                         name=f"{name}_embedding")
            for name in schema.cross_features
        }
        # Like FSM, RAM outputs its heads (Eq. 3, 6): a projection before the linear first
        # tower layer would only add cost.
        ram = layers.CandidateSelfAttention(
            ram_heads, ram_key_dim, feature_map=ram_feature_map,
            focusing_factor=ram_focusing_factor,
            learnable_temperature=ram_learnable_temperature,
            learnable_focusing_factor=ram_learnable_focusing_factor,
            use_output_projection=False, name="candidate_self_attention") if use_ram else None
        if tower_dtype is not None:
            tower_dtype = check_dtype_policy("tower_dtype", tower_dtype)
        towers = {task: layers.MLPTower(tower_units, dropout=dropout, dtype=tower_dtype,
                                        name=f"{task}_tower")
                  for task in schema.tasks}

        # === Functional model ===
        inputs = schema.keras_inputs()
        candidate_ids = inputs[CANDIDATE_PREFIX + "item_id"]
        sequence_ids = inputs[SEQUENCE_PREFIX + "item_id"]
        candidate_mask = ops.not_equal(candidate_ids, 0)
        sequence_mask = ops.not_equal(sequence_ids, 0)

        candidates = item_embedding(
            [inputs[CANDIDATE_PREFIX + a] for a in schema.item_attributes])  # F_can
        sequence_items, sequence = _embed_events(schema, item_embedding, context_embedding,
                                                 inputs, stateful)  # F_seq [B, n, item_dim]
        module_inputs = _module_inputs(schema, inputs, candidates, candidate_mask)
        module_inputs.update({
            "sequence": sequence,
            "sequence_items": sequence_items,
            "sequence_mask": sequence_mask,
        })
        attention_candidates = None
        if decoupled_embeddings:
            attention_candidates = attention_item_embedding(
                [inputs[CANDIDATE_PREFIX + a] for a in schema.item_attributes])
            attention_items, attention_sequence = _embed_events(
                schema, attention_item_embedding, attention_context_embedding, inputs,
                stateful)
            module_inputs.update({"attention_candidates": attention_candidates,
                                  "attention_sequence": attention_sequence,
                                  "attention_sequence_items": attention_items})
        for attribute in schema.item_attributes:  # sequence_item_ids, ...
            module_inputs[f"sequence_{attribute}s"] = inputs[SEQUENCE_PREFIX + attribute]
        if _TIME_DELTA in schema.sequence_context:
            module_inputs["sequence_time_deltas"] = inputs[_TIME_DELTA]
        if "seq_action" in schema.sequence_context:  # e.g. TWIN-V2's groups
            module_inputs["sequence_actions"] = inputs["seq_action"]
        outputs = _score_candidates(
            schema, {"ram": ram, "user": user_embeddings, "cross": cross_embeddings,
                     "towers": towers}, inputs, candidates, candidate_mask,
            interest(module_inputs), attention_candidates)
        outputs = {task: keras.layers.Identity(name=task)(p) for task, p in outputs.items()}
        outputs["score"] = keras.layers.Identity(name="score")(outputs[schema.score_task])
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.interest = interest
        self.schema = schema
        self.embedding_dim = embedding_dim
        self.use_ram = use_ram
        self.ram_heads = ram_heads
        self.ram_key_dim = ram_key_dim
        self.ram_feature_map = ram_feature_map
        self.ram_focusing_factor = ram_focusing_factor
        self.ram_learnable_temperature = ram_learnable_temperature
        self.ram_learnable_focusing_factor = ram_learnable_focusing_factor
        self.tower_units = tower_units
        self.dropout = dropout
        self.tower_dtype = tower_dtype
        self.embeddings_initializer = embeddings_initializer
        self.decoupled_embeddings = decoupled_embeddings
        self.attention_embedding_dim = attention_embedding_dim

    def __call__(self, inputs, *args, **kwargs):
        # Checked here, before Keras converts inputs: it would silently cast float ids and
        # report mismatched lengths from deep inside the graph.
        return super().__call__(self.schema.validate_features(inputs), *args, **kwargs)

    # === Stateful serving (time_encoding="decay") ===
    # The decayed FSM reads the sequence only through a fixed-size state per user; these
    # run the model's own layers on it, so they equal `call` up to float rounding. Times are
    # int64 seconds on one clock; a state holds its reference time, at which it was made.
    # Times and ages are taken within [0, MAX_TIME] (`ifa_tf.schema`; the exported
    # signatures refuse others): a value outside is clipped to it, so no time subtraction
    # overflows int64 and no input makes a state infinite.
    @property
    def stateful(self):
        """Whether the model reads the sequence through a state (`time_encoding="decay"`)."""
        return getattr(self.interest, "time_encoding", None) == "decay"

    @property
    def state_shape(self):
        """One user's state, (heads, feature_dim, value_dim + 1) float32."""
        self._check_stateful()
        return tuple(self.interest.state_shape)

    @property
    def event_features(self):
        """The features of an event: `seq_<attribute>` of every item attribute, the context
        but its age (`seq_action`), in the schema's order."""
        return (*[SEQUENCE_PREFIX + a for a in self.schema.item_attributes],
                *_context_features(self.schema, stateful=True))

    @property
    def rank_features(self):
        """What `rank_with_state` reads besides the state: user, candidate, cross features.
        No sequence feature: the sequence reaches it only through the state."""
        return (*self.schema.user_features, *self.schema.candidate_features,
                *self.schema.cross_features)

    def user_state(self, features, now):
        """A user's state from the sequence, at `now`.

        Args:
            features: the `seq_*` features, [B, n], `seq_time_delta` counted back from
                `now` (as in a request). Others are ignored.
            now: int64 [B], the time the deltas are counted from, seconds.

        Returns:
            `{"state": [B, *state_shape] float32, "state_time": now}`.
        """
        self._check_stateful()
        return {"state": self._events_state(features, _clip_time(features[_TIME_DELTA])),
                "state_time": _clip_time(now)}

    def update_state(self, state, state_time, events):
        """`state` with new events added, exactly as if they had been in the sequence.

        Args:
            state, state_time: a state and its reference time ([B]).
            events: `event_features` and `seq_event_time` (int64 [B, e], seconds), padded
                with `seq_item_id` 0. Events may be older than the state and come in any
                order or chunks.

        Returns:
            `{"state", "state_time"}`: the reference time moves to the newest event when it
            is later than the state's.
        """
        self._check_stateful()
        valid = ops.not_equal(events[SEQUENCE_PREFIX + "item_id"], 0)
        state_time = _clip_time(state_time)
        # Padding's times are never read: they might be anything.
        event_time = ops.where(valid, _clip_time(events[EVENT_TIME]), 0)
        new_time = ops.maximum(state_time, ops.max(event_time, axis=1, initial=0))
        ages = ops.where(valid, new_time[:, None] - event_time, 0)  # in [0, MAX_TIME]
        moved = self.interest.advance_state(state, new_time - state_time)
        return {"state": moved + self._events_state(events, ages), "state_time": new_time}

    def rank_with_state(self, features, state, state_time, now):
        """What `call` returns for the user whose sequence `state` summarises, from the
        state: `features` hold `rank_features` (no sequence), `now` [B] the request's time,
        not earlier than `state_time` (the exported signature refuses that; here an earlier
        `now` ranks at `state_time`)."""
        self._check_stateful()
        parts = self._stateful_parts()
        candidates = parts["item"]([features[CANDIDATE_PREFIX + a]
                                    for a in self.schema.item_attributes])
        candidate_mask = ops.not_equal(features[CANDIDATE_PREFIX + "item_id"], 0)
        elapsed = ops.maximum(_clip_time(now) - _clip_time(state_time), 0)
        interest = self.interest.read_state(
            _module_inputs(self.schema, features, candidates, candidate_mask),
            self.interest.advance_state(state, elapsed))
        outputs = _score_candidates(self.schema, parts, features, candidates,
                                    candidate_mask, interest)
        outputs["score"] = outputs[self.schema.score_task]
        return outputs

    def _events_state(self, events, ages):
        parts = self._stateful_parts()
        _, embedded = _embed_events(self.schema, parts["item"], parts["context"], events,
                                    stateful=True)
        return self.interest.sequence_state({
            "sequence": embedded,
            "sequence_mask": ops.not_equal(events[SEQUENCE_PREFIX + "item_id"], 0),
            "sequence_time_deltas": ages})

    def _stateful_parts(self):
        """The model's layers by role, found by name (the functional graph owns them)."""
        def layer(name):
            try:
                return self.get_layer(name)
            except ValueError:
                return None

        schema = self.schema
        return {"item": layer("item_embedding"), "context": layer("sequence_context_embedding"),
                "ram": layer("candidate_self_attention"),
                "user": {n: layer(f"{n}_embedding") for n in schema.user_features},
                "cross": {n: layer(f"{n}_embedding") for n in schema.cross_features},
                "towers": {t: layer(f"{t}_tower") for t in schema.tasks}}

    def _check_stateful(self):
        if not self.stateful:
            raise ValueError(f"Model {self.name!r} reads the raw sequence; stateful serving "
                             "needs the decayed FSM: build it with time_encoding='decay'.")

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "interest": keras.saving.serialize_keras_object(self.interest),
            "schema": self.schema.to_dict(),
            "embedding_dim": self.embedding_dim,
            "use_ram": self.use_ram,
            "ram_heads": self.ram_heads,
            "ram_key_dim": self.ram_key_dim,
            "ram_feature_map": self.ram_feature_map,
            "ram_focusing_factor": self.ram_focusing_factor,
            "ram_learnable_temperature": self.ram_learnable_temperature,
            "ram_learnable_focusing_factor": self.ram_learnable_focusing_factor,
            "tower_units": self.tower_units,
            "dropout": self.dropout,
            "tower_dtype": self.tower_dtype,
            "embeddings_initializer": keras.initializers.serialize(
                self.embeddings_initializer),
            "decoupled_embeddings": self.decoupled_embeddings,
            "attention_embedding_dim": self.attention_embedding_dim,
        }

    @classmethod
    def from_config(cls, config):
        # Models saved before RAM had its own options named its map `feature_map`.
        config = dict(config)
        for old_name in ("feature_map", "focusing_factor"):
            if old_name in config:
                config["ram_" + old_name] = config.pop(old_name)
        return cls(**config)


def _clip_time(value):
    """int64 seconds clipped to the stateful times' range, [0, MAX_TIME]."""
    return ops.clip(ops.cast(value, "int64"), 0, MAX_TIME)


def _context_features(schema, stateful):
    """The context features embedded into each event: all of the schema's, but the age for
    a decayed (stateful) FSM."""
    return tuple(n for n in schema.sequence_context if not (stateful and n == _TIME_DELTA))


def _embed_events(schema, item_embedding, context_embedding, events, stateful):
    """`(items, events)` [B, n, item_dim]: the events' item embeddings, and those plus their
    context's (`_context_features`)."""
    items = item_embedding([events[SEQUENCE_PREFIX + a] for a in schema.item_attributes])
    if context_embedding is None:
        return items, items
    return items, items + context_embedding(
        [events[n] for n in _context_features(schema, stateful)])


def _module_inputs(schema, features, candidates, candidate_mask):
    """The candidate side of the sequence module's dict."""
    inputs = {"candidates": candidates, "candidate_mask": candidate_mask}
    for attribute in schema.item_attributes:  # candidate_item_ids, ...
        inputs[f"candidate_{attribute}s"] = features[CANDIDATE_PREFIX + attribute]
    return inputs


def _score_candidates(schema, parts, features, candidates, candidate_mask, interest,
                      attention_candidates=None):
    """F_can, F_c-s (`interest`), F_c-c, F_u, F_cro -> towers -> ESMM: `{task: [B, m]}`.
    With decoupled embeddings RAM's queries and keys come from `attention_candidates`, its
    values from `candidates`."""
    parts_list = [candidates, interest]
    if parts["ram"] is not None:
        if attention_candidates is None:
            parts_list.append(parts["ram"](candidates, candidate_mask=candidate_mask))  # F_c-c
        else:
            parts_list.append(parts["ram"](attention_candidates, candidate_mask=candidate_mask,
                                           values=candidates))
    if parts["user"]:
        user = ops.concatenate([parts["user"][n](features[n]) for n in schema.user_features],
                               axis=-1)
        # F_u, repeated m times (a product with ones: symbolic shapes are unknown here).
        parts_list.append(user[:, None, :] * ops.ones_like(candidates[..., :1]))
    parts_list.extend(parts["cross"][n](features[n]) for n in schema.cross_features)  # F_cro
    towers = parts["towers"]
    # In the towers' compute dtype: one cast per part, not one per tower.
    tower_compute_dtype = towers[schema.gate_task].compute_dtype
    inputs = ops.concatenate([ops.cast(p, tower_compute_dtype) for p in parts_list], axis=-1)
    valid = ops.cast(candidate_mask, "float32")
    gate = ops.sigmoid(ops.cast(towers[schema.gate_task](inputs), "float32")) * valid
    outputs = {schema.gate_task: gate}
    for task in schema.action_tasks:
        outputs[task] = gate * ops.sigmoid(ops.cast(towers[task](inputs), "float32"))
    return outputs
