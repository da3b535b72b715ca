import keras
from keras import ops

from ifa_tf.layers.validation import check_choice, check_positive_int, clone_initializer

# How each pass's attention sees the memory: the memory as it stands before the pass (the
# paper's), or its initial value in every pass (the released code, see `SAMMemory`).
MEMORY_QUERIES = ("paper", "released")


@keras.saving.register_keras_serializable(package="ifa_tf")
class SAMMemory(keras.layers.Layer):
    """SAM's sparse attentive memory (Lin et al., "Sparse Attentive Memory Network for
    Click-through Rate Prediction with Long Sequences", CIKM 2022).

    Each candidate reads the whole sequence `num_passes` times with a memory `m` that starts
    as the candidate itself. In pass t, behaviour i gets the point-wise weight

        a_i = sigmoid(w_t . sigmoid(W_t [q - e_i, q * e_i, m - e_i, m * e_i] + b_t) + c_t)

    (dual-query attention: the candidate q and the memory m both query; an MLP of hidden
    width `attention_units` per pass). There is no softmax: the weights need not sum to
    one, and they are exactly 0 at padded positions. The read `sum_i a_i v_i` then updates
    the memory through a GRU cell shared by the passes, `m = GRU(read, m)`. Memory
    Enhancement follows: a second GRU runs `enhancement_steps` steps from the last memory,
    each step's input `[Dense_s(state), memory_0]` (its own linear layer per step, as the
    released code's un-scoped `fully_connected` calls create). The output is
    `[Dense(summary_units, relu)(attention statistics), enhanced memory]`.

    Defaults are the released config `param_mem_3p_plus` (the full SAM, with Memory
    Enhancement): 3 passes, hidden width 8, 16 summary units, 3 enhancement steps. Both GRU
    cells apply the reset gate before the recurrent product (`reset_after=False`), the form
    of TF1's `GRUCell` that the code uses.

    The first MLP layer is applied term by term and never forms the [B, m, n, 4d]
    concatenation: `W [q - e, q * e, m - e, m * e] = W_a q + W_c m + e (q * W_b + m * W_d -
    W_a - W_c)`, i.e. one [d + 1, h] kernel per candidate applied to every key (a constant
    1 appended to the key carries the candidate's own terms). The [B, m, n, h] hidden
    layer is the cost: O(num_passes * m * n * d * h) per request, linear in n for each
    candidate but m * n for the set (the memory depends on the candidate, so the m
    candidates cannot share a pass over the sequence as IFA's do). Peak memory is a few
    [B, m, n, h] float tensors (3.2 GB each at m = n = 10,000, h = 8).

    Deviations from the released code, both deliberate:
    - Attention summary: the code's `Dense(16, relu)` reads the raw weight vector a in
      R^n of the last pass, which ties the model to one fixed sequence length and
      alignment. Here it reads, for every pass, `log1p(sum_i a_i)` (the attention mass) and
      the mean weight over the valid events, which exist for any n; an empty sequence gives
      zeros.
    - The memory's query: in the call the code makes (`mode='stk'`) the line meant to
      refresh the memory query assigns a misspelt variable, so every pass attends with the
      initial memory, m_0 = q; the passes then differ only through their own MLP weights
      while the GRU still accumulates the reads. `memory_query="paper"` (default) feeds the
      updated memory into each pass as the paper describes; `"released"` reproduces the
      code.

    Keys and values may differ (decoupled embeddings): the weights compare the query with
    the keys (attention space), the read sums the values (representation space). The
    memory lives in the value space (GRU width = value width, started from
    `initial_memory`, the candidate's representation); where the key width differs, its
    attention-side query is a linear map of the memory to the key width, and where the
    widths agree the memory queries as it is, so the shared model (keys = values, memory
    from the query) is exactly the paper's.

    Masking: padded keys get weight 0 and change nothing; a candidate without a valid key
    reads zero (its output stays finite); padded queries get a zero output. Weights and
    their statistics are float32 whatever the compute dtype.

    Args:
        num_passes: T, passes over the sequence (configs: 2 or 3).
        attention_units: hidden width of each pass's attention MLP (code: 8).
        summary_units: width of the attention summary (code: 16).
        enhancement_steps: GRU steps of Memory Enhancement (code: 3); 0 turns it off
            (the output is then the last memory).
        memory_query: `"paper"` or `"released"` (above).
        kernel_initializer: for the attention MLPs, the memory query map and the dense
            layers (the GRU cells keep Keras' defaults).

    Call arguments:
        query: candidates [B, m, d_a] (q).
        key: sequence [B, n, d_a] (e_i).
        value: what is read, [B, n, d_v]; defaults to `key`.
        initial_memory: the memory's start m_0 (and Memory Enhancement's query),
            [B, m, d_v]; defaults to `query`, which then needs d_v = d_a.
        query_mask: optional bool [B, m].
        key_mask: optional bool [B, n].

    Returns:
        [B, m, summary_units + d_v].

    Example:
    >>> memory = SAMMemory(num_passes=3)
    >>> interest = memory(candidates, sequence, key_mask=sequence_mask)  # [B, m, 16 + d]
    """

    def __init__(self, num_passes=3, attention_units=8, summary_units=16,
                 enhancement_steps=3, memory_query="paper",
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        check_positive_int("num_passes", num_passes)
        check_positive_int("attention_units", attention_units)
        check_positive_int("summary_units", summary_units)
        if (not isinstance(enhancement_steps, int) or isinstance(enhancement_steps, bool)
                or enhancement_steps < 0):
            raise ValueError("`enhancement_steps` must be a non-negative integer (0: no "
                             "Memory Enhancement). "
                             f"Received: enhancement_steps={enhancement_steps!r}")
        check_choice("memory_query", memory_query, MEMORY_QUERIES)
        self.num_passes = num_passes
        self.attention_units = attention_units
        self.summary_units = summary_units
        self.enhancement_steps = enhancement_steps
        self.memory_query = memory_query
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, query_shape, key_shape, value_shape=None, initial_memory_shape=None):
        depth = query_shape[-1]
        value_depth = (key_shape if value_shape is None else value_shape)[-1]
        if key_shape[-1] != depth:
            raise ValueError("SAM compares each key with the query (q - e_i, q * e_i): their "
                             f"widths must agree. Received: query_shape={tuple(query_shape)}, "
                             f"key_shape={tuple(key_shape)}")
        memory_depth = depth if initial_memory_shape is None else initial_memory_shape[-1]
        if memory_depth != value_depth:
            raise ValueError(
                "The memory lives in the values' space: `initial_memory` must be as wide as "
                "`value` (without `initial_memory` the memory starts as the query). "
                f"Received: value width {value_depth}, memory width {memory_depth}")
        units, init = self.attention_units, self.kernel_initializer

        def weight(name, shape, initializer=None):
            return self.add_weight(name=name, shape=shape,
                                   initializer=initializer or clone_initializer(init))

        # One MLP per pass: W_t = [W_a | W_b | W_c | W_d] on [q - e, q * e, m - e, m * e].
        self._passes = []
        for t in range(self.num_passes):
            self._passes.append({
                part: weight(f"pass_{t}_{part}_kernel", (depth, units))
                for part in ("query_difference", "query_product", "memory_difference",
                             "memory_product")})
            self._passes[t]["hidden_bias"] = weight(f"pass_{t}_hidden_bias", (units,),
                                                    "zeros")
            self._passes[t]["output_kernel"] = weight(f"pass_{t}_output_kernel", (units, 1))
            self._passes[t]["output_bias"] = weight(f"pass_{t}_output_bias", (1,), "zeros")
        # The memory queries from the attention space; the identity where widths agree.
        self._memory_query_map = None
        if value_depth != depth:
            self._memory_query_map = keras.layers.Dense(
                depth, use_bias=False, kernel_initializer=clone_initializer(init),
                dtype=self.dtype_policy, name="memory_query_map")
            self._memory_query_map.build((None, None, value_depth))
        self._memory_cell = keras.layers.GRUCell(value_depth, reset_after=False,
                                                 dtype=self.dtype_policy, name="memory_update")
        self._memory_cell.build((None, None, value_depth))
        self._summary = keras.layers.Dense(
            self.summary_units, activation="relu", kernel_initializer=clone_initializer(init),
            dtype=self.dtype_policy, name="attention_summary")
        self._summary.build((None, None, 2 * self.num_passes))
        self._enhancement_maps = []
        for step in range(self.enhancement_steps):
            dense = keras.layers.Dense(value_depth, kernel_initializer=clone_initializer(init),
                                       dtype=self.dtype_policy, name=f"enhancement_map_{step}")
            dense.build((None, None, value_depth))
            self._enhancement_maps.append(dense)
        self._enhancement_cell = None
        if self.enhancement_steps:
            self._enhancement_cell = keras.layers.GRUCell(
                value_depth, reset_after=False, dtype=self.dtype_policy,
                name="memory_enhancement")
            self._enhancement_cell.build((None, None, 2 * value_depth))
        self.built = True

    def call(self, query, key, value=None, initial_memory=None, query_mask=None,
             key_mask=None):
        value = key if value is None else value
        initial_memory = query if initial_memory is None else initial_memory
        memory = initial_memory
        if key_mask is None:
            valid_count = ops.cast(ops.shape(key)[1], "float32")
        else:
            key_mask = ops.cast(key_mask, "bool")
            valid_count = ops.sum(ops.cast(key_mask, "float32"), axis=1, keepdims=True)
        # [B, n, d + 1]: the constant 1 carries each candidate's own terms (below).
        extended_key = ops.concatenate([key, ops.ones_like(key[..., :1])], axis=-1)
        memory_query = self._attention_query(memory)
        statistics = []
        for t in range(self.num_passes):
            weights = self._attention_weights(self._passes[t], query, memory_query,
                                              extended_key, key_mask)  # [B, n, m]
            read = ops.einsum("bnm,bnv->bmv", ops.cast(weights, value.dtype), value)
            memory = _gru_step(self._memory_cell, read, memory)
            mass = ops.sum(weights, axis=1)  # [B, m]
            statistics += [ops.log1p(mass), mass / ops.maximum(valid_count, 1.0)]
            if self.memory_query == "paper":
                memory_query = self._attention_query(memory)
        summary = self._summary(ops.cast(ops.stack(statistics, axis=-1), self.compute_dtype))
        state = memory
        for transform in self._enhancement_maps:
            step_input = ops.concatenate([transform(state), initial_memory], axis=-1)
            state = _gru_step(self._enhancement_cell, step_input, state)
        output = ops.concatenate([summary, state], axis=-1)
        if query_mask is not None:
            output = output * ops.cast(query_mask, output.dtype)[..., None]
        return output

    def _attention_query(self, memory):
        """The memory as the attention sees it: in the keys' space."""
        return memory if self._memory_query_map is None else self._memory_query_map(memory)

    def _attention_weights(self, kernels, query, memory_query, extended_key, key_mask):
        """One pass's point-wise weights, float32 [B, n, m]; 0 at padded keys."""
        batch, candidates = ops.shape(query)[0], ops.shape(query)[1]
        length, depth, units = ops.shape(extended_key)[1], query.shape[-1], self.attention_units
        difference = kernels["query_difference"] + kernels["memory_difference"]
        # Per candidate, the kernel its keys meet: e (q * W_b + m * W_d - W_a - W_c) ...
        key_kernel = (query[..., None] * kernels["query_product"]
                      + memory_query[..., None] * kernels["memory_product"]
                      - difference)  # [B, m, d, h]
        # ... and, on the constant 1, what depends on the candidate alone.
        own_term = (ops.matmul(query, kernels["query_difference"])
                    + ops.matmul(memory_query, kernels["memory_difference"])
                    + kernels["hidden_bias"])  # [B, m, h]
        kernel = ops.concatenate([key_kernel, own_term[:, :, None, :]], axis=2)
        kernel = ops.reshape(ops.transpose(kernel, (0, 2, 1, 3)),
                             (batch, depth + 1, candidates * units))
        # One [n, d + 1] x [d + 1, m h] product per request: no [B, m, n, d] tensor.
        hidden = ops.sigmoid(ops.reshape(ops.matmul(extended_key, kernel),
                                         (batch, length, candidates, units)))
        logits = ops.matmul(hidden, kernels["output_kernel"])[..., 0] + kernels["output_bias"]
        weights = ops.sigmoid(ops.cast(logits, "float32"))
        if key_mask is None:
            return weights
        return ops.where(key_mask[:, :, None], weights, 0.0)

    def compute_output_shape(self, query_shape, key_shape, value_shape=None,
                             initial_memory_shape=None):
        value_depth = (key_shape if value_shape is None else value_shape)[-1]
        return (*query_shape[:-1], self.summary_units + value_depth)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_passes": self.num_passes,
            "attention_units": self.attention_units,
            "summary_units": self.summary_units,
            "enhancement_steps": self.enhancement_steps,
            "memory_query": self.memory_query,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        })
        return config


def _gru_step(cell, inputs, state):
    """`cell`'s next state for every candidate: [B, m, *] flattened to the [batch, width]
    a Keras GRU cell takes, and back."""
    flat_state = ops.reshape(state, (-1, state.shape[-1]))
    flat = cell(ops.reshape(inputs, (-1, inputs.shape[-1])), [flat_state])[0]
    return ops.reshape(flat, ops.shape(state))
