import keras
import numpy as np
from keras import ops

from ifa_tf.layers import feature_maps
from ifa_tf.layers.fast_ops import masked_row_sum, per_example_matmul, zero_masked_rows
from ifa_tf.layers.projections import head_projection, merge_heads_projection
from ifa_tf.layers.validation import check_positive_int


@keras.saving.register_keras_serializable(package="ifa_tf")
class NormalizedLinearAttention(keras.layers.Layer):
    """Multi-head linear attention with degree-matrix normalisation (IFA, Eq. 1, 6, 7).

    For each head, with `Q = query W_q`, `K = key W_k`, `V = value W_v`:

        E = D^-1 phi(Q) (phi(K)^T V),    D = diag(phi(Q) (phi(K)^T 1))

    which equals the row-normalised `(phi(Q) phi(K)^T) V` without ever forming the
    [m, n] interaction matrix: the cost is O((m + n) d^2) instead of O(m n d). Every
    query interacts with every valid key; nothing is sampled or dropped. V itself is never
    formed: `phi(K_h)^T V_h = (phi(K_h)^T value) W_v,h + (phi(K_h)^T 1) b_v,h`, so the
    O(n) side is one projection (K) and one product for all heads.

    Masking: keys (and their values) at padded positions are zeroed *after* phi, so
    they contribute to neither the numerator nor the normaliser: appending padding or
    changing the values stored there changes no output. Queries at padded positions get
    a zero output. When a row has no valid key at all, `D = 0` and `epsilon` keeps the
    output finite (zero). Under mixed precision the projections run in the compute dtype
    and everything after them (phi, the sums over up to 10^4 keys, the normaliser) in
    float32; the output is cast back.

    Hedgehog's exp would overflow float32 beyond 88. Its features are scaled so that every
    one is at most 1 and each query's largest term over the keys is exactly 1, by factors
    that cancel in D^-1 phi(Q) (phi(K)^T V): one per query, and one per feature shared by
    all keys (see `feature_maps.hedgehog`); epsilon is scaled to match. The output is the
    unscaled formula's, up to float32 rounding. Per-key factors would reweight the keys and
    clipping would change the kernel; neither is done.

    `attention_weights` returns the [m, n] weights the layer applies implicitly, for
    diagnostics on small requests.

    Args:
        num_heads: number of attention heads.
        key_dim: size of each head for query and key.
        value_dim: size of each head for value; defaults to `key_dim`.
        output_dim: size of the output projection; defaults to the query's last dim.
        use_output_projection: project the concatenated heads to `output_dim` (the usual
            multi-head layout). With False the output is the heads themselves,
            [..., num_heads * value_dim], exactly Eq. 6; when a linear layer follows (IFA's
            towers), the projection adds no expressivity, only cost.
        feature_map: phi, one of `"elu_plus_one"` (default), `"softplus"`, `"relu"`, and
            two sharper maps (see `ifa_tf.layers.feature_maps`): `"focused"`, FLatten's
            `||relu(x)|| relu(x)^p / ||relu(x)^p||` (Han et al., ICCV 2023), and
            `"hedgehog"`, `[exp(x W + b), exp(-(x W + b))]` with a trainable W, b per head
            for queries and for keys, W initialised to the identity (Zhang et al., ICLR
            2024). All are non-negative, so D >= 0 (paper 4.4). Hedgehog's features are
            twice the head size, so its key side costs twice as much; W follows the
            trainable projection, so it is folded into it (one product over the rows, and
            the same function class: the exp is what sharpens).
        focusing_factor: the power p of `"focused"`, a number >= 1; `None` means 3 (the
            paper's). An error with any other map, where it would have no effect. With
            `learnable_focusing_factor`, the power every head starts from.
        learnable_temperature: learn a temperature per head on phi's input,
            `phi(x / tau_h)` for queries and keys, `tau_h = exp(t_h)` (weight
            `log_temperature`, [num_heads]) with `t_h = 0` at the start: the layer then
            computes exactly what it computes without the option. tau < 1 sharpens the
            weights, tau > 1 flattens them. For `"elu_plus_one"`, `"softplus"` and
            `"hedgehog"`; an error with `"relu"` and `"focused"`, whose scale cancels in
            the normalisation. The scale is folded into the query and key projections, so
            it costs nothing per row. Off by default.
        learnable_focusing_factor: learn the focused map's power p per head (weight
            `focusing_factor`, [num_heads]), starting at `focusing_factor` and kept >= 1
            (a constraint, and a floor in the call). Only with `"focused"`. Off by default.
        epsilon: added to D so an all-padding row gives a finite output.
        use_bias: whether the projections (and Hedgehog's map) have biases.
        kernel_initializer, bias_initializer: for the projections.

    Call arguments:
        query: [B, m, d_q].
        key: [B, n, d_k].
        value: [B, n, d_v]; defaults to `key`.
        query_mask: optional bool [B, m], True where the query is valid.
        key_mask: optional bool [B, n], True where the key is valid. When omitted, the
            Keras mask attached to `key` is used, if any.

    Returns:
        [B, m, output_dim], or [B, m, num_heads * value_dim] without output projection.

    Example:
    >>> layer = NormalizedLinearAttention(num_heads=2, key_dim=8)
    >>> out = layer(np.ones((1, 5, 16)), np.ones((1, 7, 16)))
    >>> out.shape
    (1, 5, 16)

    Reference: Yu et al., "IFA: Interaction Fidelity Attention for Entire Lifelong Behaviour
    Sequence Modeling", 2024; Katharopoulos et al., "Transformers are RNNs", ICML 2020.
    """

    def __init__(self, num_heads, key_dim, value_dim=None, output_dim=None,
                 use_output_projection=True,
                 feature_map="elu_plus_one", focusing_factor=None,
                 learnable_temperature=False, learnable_focusing_factor=False, epsilon=1e-6,
                 use_bias=True, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 **kwargs):
        super().__init__(**kwargs)
        check_positive_int("num_heads", num_heads)
        check_positive_int("key_dim", key_dim)
        if value_dim is not None:
            check_positive_int("value_dim", value_dim)
        if output_dim is not None:
            check_positive_int("output_dim", output_dim)
            if not use_output_projection:
                raise ValueError("`output_dim` sets the output projection's size; it cannot be "
                                 "combined with use_output_projection=False. Received: "
                                 f"output_dim={output_dim}")
        feature_maps.check_feature_map(feature_map, focusing_factor, learnable_temperature,
                                       learnable_focusing_factor)
        if not epsilon > 0:
            raise ValueError(f"`epsilon` must be > 0. Received: epsilon={epsilon}")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.output_dim = output_dim
        self.use_output_projection = use_output_projection
        self.feature_map = feature_map
        self.focusing_factor = focusing_factor
        self.learnable_temperature = learnable_temperature
        self.learnable_focusing_factor = learnable_focusing_factor
        self.epsilon = epsilon
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.supports_masking = True

    def build(self, query_shape, key_shape, value_shape=None):
        value_shape = key_shape if value_shape is None else value_shape
        value_dim = self.value_dim or self.key_dim
        output_dim = self.output_dim or query_shape[-1]
        self._query_dense = head_projection("query", query_shape, self.num_heads,
                                            self.key_dim, self, self.use_bias)
        self._key_dense = head_projection("key", key_shape, self.num_heads, self.key_dim, self,
                                          self.use_bias)
        self._value_dense = head_projection("value", value_shape, self.num_heads, value_dim,
                                            self, self.use_bias)
        self._output_dense = merge_heads_projection(
            "attention_output", (*query_shape[:-1], self.num_heads, value_dim), output_dim,
            self, self.use_bias) if self.use_output_projection else None
        if self.feature_map == "hedgehog":
            self._query_feature_weights = self._add_hedgehog_weights("query")
            self._key_feature_weights = self._add_hedgehog_weights("key")
        else:
            self._query_feature_weights = self._key_feature_weights = None
        # Weights of learnable sharpness, made only when asked for: a layer without them
        # has the same weights (and checkpoints) as before they existed.
        self._log_temperature = self.add_weight(
            shape=(self.num_heads,), initializer="zeros",
            name="log_temperature") if self.learnable_temperature else None
        self._focusing_factor = self.add_weight(
            shape=(self.num_heads,),
            initializer=keras.initializers.Constant(
                float(self.focusing_factor or feature_maps.DEFAULT_FOCUSING_FACTOR)),
            constraint=feature_maps.AtLeastOne(),
            name="focusing_factor") if self.learnable_focusing_factor else None
        self.built = True

    def _add_hedgehog_weights(self, side):
        """Hedgehog's W [heads, k, k] (identity at the start) and b [heads, k] for one side."""
        shape = (self.num_heads, self.key_dim)
        kernel = self.add_weight(shape=(*shape, self.key_dim), initializer=_identity_per_head,
                                 name=f"{side}_feature_kernel")
        bias = self.add_weight(shape=shape, initializer="zeros",
                               name=f"{side}_feature_bias") if self.use_bias else None
        return kernel, bias

    def call(self, query, key, value=None, query_mask=None, key_mask=None):
        value = key if value is None else value
        if key_mask is None:
            key_mask = getattr(key, "_keras_mask", None)
        heads, value_dim = self.num_heads, self.value_dim or self.key_dim
        feature_dim = feature_maps.feature_dim(self.feature_map, self.key_dim)
        # Heads stay flat ([..., heads * dim]), so the hot path is a handful of 2-D matmuls
        # with no per-head transposes. The core runs in float32 (a no-op without mixed
        # precision): its sums over up to 10^4 keys overflow float16.
        phi_q, phi_k, epsilon = self._features(query, key, key_mask)  # [B, m|n, h*f]
        # [B, h*f]: phi(K_h)^T 1 over the valid keys, heads side by side (a matvec with
        # the key mask, which so needs no pass of its own here).
        key_sums = masked_row_sum(phi_k, key_mask)
        if key_mask is not None:
            # A zero row of phi(K) removes its key from phi(K)^T V.
            phi_k = zero_masked_rows(phi_k, key_mask)
        # The sequence summary of Eq. 7 per head, phi(K_h)^T V_h with V_h = value W_h + b_h,
        # is (phi(K_h)^T value) W_h + (phi(K_h)^T 1) b_h: V is never projected over n, and
        # one O(n) product phi(K)^T value serves every head.
        keys_by_value = per_example_matmul(phi_k, _float32(value), transpose_a=True)
        # All heads' summaries at once: [B, h*f, h*v] against every head's value kernel,
        # of which only the diagonal blocks (head h's keys with head h's values) are kept.
        # The blocks are tiny, and the kernel is used as stored: no transpose, no tiling.
        value_kernel = ops.reshape(_float32(self._value_dense.kernel), (-1, heads * value_dim))
        depth = value.shape[-1]
        summary = ops.reshape(ops.matmul(ops.reshape(keys_by_value, (-1, depth)), value_kernel),
                              (-1, heads * feature_dim, heads * value_dim))
        if self.use_bias:
            summary = summary + key_sums[..., None] * ops.reshape(
                _float32(self._value_dense.bias), (heads * value_dim,))
        # phi(Q) against the block-diagonal summaries gives every head's numerator and its
        # degree D (Eq. 7) in two matmuls, [B, m, h*v] and [B, m, h], with no slicing.
        numerator = per_example_matmul(phi_q,
                                       summary * _head_blocks(heads, feature_dim, value_dim))
        degree = per_example_matmul(phi_q, key_sums[..., None] * _head_blocks(heads,
                                                                              feature_dim, 1))
        scale = 1.0 / self._denominator(degree, epsilon)  # [B, m, h]: the division is here
        if query_mask is not None and self._output_dense is None:
            scale = scale * ops.cast(query_mask, "float32")[..., None]
            query_mask = None  # folded into the scale: padded queries get zero output
        numerator = ops.reshape(numerator, (*ops.shape(numerator)[:-1], heads, value_dim))
        attended = ops.cast(numerator * scale[..., None], self.compute_dtype)
        if self._output_dense is None:
            output = ops.reshape(attended, (*ops.shape(attended)[:-2], heads * value_dim))
        else:
            output = self._output_dense(attended)
        if query_mask is not None:
            output = output * ops.cast(query_mask, output.dtype)[..., None]
        return output

    def attention_weights(self, query, key, query_mask=None, key_mask=None):
        """The weights the layer applies without forming them, [B, heads, m, n].

        Row i of head h is `phi(q_i) phi(k_j)^T / (D_i + epsilon)` over the valid keys j
        (0 at padded keys; a padded query's row is 0), so head h's attended values, before
        the output projection, are `weights[:, h] @ V_h`. This forms the [m, n] matrix that
        `call` never does, O(m n) in time and memory: a diagnostic for small requests
        (e.g. how concentrated the weights are, `ifa_tf.diagnostics.attention_concentration`),
        not for serving. The layer must have been called once (it is then built).
        """
        if not self.built:
            raise ValueError(f"{self.name} has no weights yet: call the layer once before "
                             "asking for its attention weights.")
        if key_mask is None:
            key_mask = getattr(key, "_keras_mask", None)
        phi_q, phi_k, epsilon = self._features(query, key, key_mask)
        feature_dim = feature_maps.feature_dim(self.feature_map, self.key_dim)
        phi_q = ops.reshape(phi_q, (*ops.shape(phi_q)[:-1], self.num_heads, feature_dim))
        phi_k = ops.reshape(phi_k, (*ops.shape(phi_k)[:-1], self.num_heads, feature_dim))
        if key_mask is not None:
            phi_k = phi_k * ops.cast(key_mask, "float32")[..., None, None]
        scores = ops.einsum("bmhf,bnhf->bhmn", phi_q, phi_k)
        degree = ops.transpose(ops.sum(scores, axis=-1), (0, 2, 1))  # [B, m, h], as in call
        denominator = ops.transpose(self._denominator(degree, epsilon), (0, 2, 1))
        weights = scores / denominator[..., None]
        if query_mask is not None:
            weights = weights * ops.cast(query_mask, "float32")[:, None, :, None]
        return weights

    def _features(self, query, key, key_mask):
        """phi(Q) [B, m, h*f] and phi(K) [B, n, h*f] in float32 (padded keys are zeroed by
        the caller), and the epsilon to add to D: `epsilon` itself, or for Hedgehog epsilon
        scaled like each query's features, [B, m, h], so that the scales cancel exactly."""
        projected_q = self._project(query, self._query_dense, self._query_feature_weights)
        projected_k = self._project(key, self._key_dense, self._key_feature_weights)
        if self.feature_map in feature_maps.ELEMENTWISE_MAPS:
            return (self._rows(feature_maps.elementwise(self.feature_map, projected_q), query),
                    self._rows(feature_maps.elementwise(self.feature_map, projected_k), key),
                    self.epsilon)
        projected_q, projected_k = self._rows(projected_q, query), self._rows(projected_k, key)
        if self.feature_map == "focused":
            power = self.focusing_factor or feature_maps.DEFAULT_FOCUSING_FACTOR
            if self._focusing_factor is not None:
                # The floor holds p >= 1 also where a training loop skips the constraint.
                power = ops.maximum(_float32(self._focusing_factor), 1.0)
            return (feature_maps.focused(projected_q, self.num_heads, power),
                    feature_maps.focused(projected_k, self.num_heads, power), self.epsilon)
        phi_q, phi_k, query_shift = feature_maps.hedgehog(projected_q, projected_k,
                                                          self.num_heads, key_mask)
        return phi_q, phi_k, self.epsilon * ops.exp(-query_shift)

    def _denominator(self, degree, epsilon):
        denominator = degree + epsilon
        if self.feature_map == "hedgehog":
            # The scaled epsilon underflows to 0 for shifts beyond ~100; a row without any
            # valid key then has D + epsilon = 0, and the floor keeps its zero output finite.
            denominator = ops.maximum(denominator, feature_maps.TINY)
        return denominator

    def _project(self, inputs, dense, feature_weights=None):
        """`inputs W + b` as [rows, heads * key_dim] float32, the leading axes flattened.
        The product is taken on 2-D inputs, so that TensorFlow's CPU runtime (oneDNN) fuses
        matmul, bias and an ELU into one kernel instead of three passes over the result.
        Hedgehog's W_h, b_h are folded in, `(x W + b) W_h + b_h = x (W W_h) + (b W_h + b_h)`:
        the rows still see a single product. So is the learnable temperature,
        `(x W + b) / tau_h = x (W / tau_h) + b / tau_h`."""
        depth = inputs.shape[-1]
        kernel = dense.kernel
        bias = dense.bias if self.use_bias else None
        if feature_weights is not None:
            feature_kernel, feature_bias = feature_weights
            # In float32: under mixed precision the variables read in the compute dtype.
            feature_kernel = _float32(feature_kernel)
            kernel = ops.einsum("dhk,hkj->dhj", _float32(kernel), feature_kernel)
            if bias is not None:
                bias = (ops.einsum("hk,hkj->hj", _float32(bias), feature_kernel)
                        + _float32(feature_bias))
        if self._log_temperature is not None:
            inverse_temperature = ops.exp(-_float32(self._log_temperature))[:, None]  # [h, 1]
            kernel = _float32(kernel) * inverse_temperature
            if bias is not None:
                bias = _float32(bias) * inverse_temperature
        kernel = ops.reshape(ops.cast(kernel, self.compute_dtype), (depth, -1))
        projected = ops.matmul(ops.reshape(ops.cast(inputs, self.compute_dtype), (-1, depth)),
                               kernel)
        if bias is not None:
            projected = projected + ops.reshape(ops.cast(bias, self.compute_dtype), (-1,))
        return _float32(projected)

    @staticmethod
    def _rows(flat, inputs):
        """[rows, c] back to the leading axes of `inputs`: [..., c]."""
        return ops.reshape(flat, (*ops.shape(inputs)[:-1], flat.shape[-1]))

    def compute_mask(self, query, key, value=None, query_mask=None, key_mask=None):
        return query_mask

    def compute_output_shape(self, query_shape, key_shape, value_shape=None):
        if not self.use_output_projection:
            return (*query_shape[:-1], self.num_heads * (self.value_dim or self.key_dim))
        return (*query_shape[:-1], self.output_dim or query_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "value_dim": self.value_dim,
            "output_dim": self.output_dim,
            "use_output_projection": self.use_output_projection,
            "feature_map": self.feature_map,
            "focusing_factor": self.focusing_factor,
            "learnable_temperature": self.learnable_temperature,
            "learnable_focusing_factor": self.learnable_focusing_factor,
            "epsilon": self.epsilon,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        })
        return config



def _float32(x):
    return ops.cast(x, "float32")


def _identity_per_head(shape, dtype=None):
    """[heads, k, k]: the identity for every head (Hedgehog's start, the plain exp map)."""
    return ops.broadcast_to(ops.eye(shape[-1], dtype=dtype), shape)


def _head_blocks(heads, rows_per_head, columns_per_head):
    """[h*r, h*c] float32 constant: 1 where the row's and the column's heads agree."""
    row_head = np.repeat(np.arange(heads), rows_per_head)
    column_head = np.repeat(np.arange(heads), columns_per_head)
    return np.equal.outer(row_head, column_head).astype("float32")
