import keras
import numpy as np
from keras import ops

from ifa_tf.layers.fast_ops import masked_row_sum, per_example_matmul, zero_masked_rows
from ifa_tf.layers.feature_maps import FEATURE_MAPS, apply_feature_map
from ifa_tf.layers.projections import head_projection, merge_heads_projection
from ifa_tf.layers.validation import check_choice, check_positive_int


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

    Args:
        num_heads: number of attention heads.
        key_dim: size of each head for query and key.
        value_dim: size of each head for value; defaults to `key_dim`.
        output_dim: size of the output projection; defaults to the query's last dim.
        use_output_projection: project the concatenated heads to `output_dim` (the usual
            multi-head layout). With False the output is the heads themselves,
            [..., num_heads * value_dim], exactly Eq. 6; when a linear layer follows (IFA's
            towers), the projection adds no expressivity, only cost.
        feature_map: phi, one of `"elu_plus_one"` (default), `"softplus"`, `"relu"`. All are
            non-negative, so D >= 0 (paper 4.4).
        epsilon: added to D so an all-padding row gives a finite output.
        use_bias: whether the projections have biases.
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
                 feature_map="elu_plus_one", epsilon=1e-6, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", **kwargs):
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
        check_choice("feature_map", feature_map, FEATURE_MAPS)
        if not epsilon > 0:
            raise ValueError(f"`epsilon` must be > 0. Received: epsilon={epsilon}")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.output_dim = output_dim
        self.use_output_projection = use_output_projection
        self.feature_map = feature_map
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
        self.built = True

    def call(self, query, key, value=None, query_mask=None, key_mask=None):
        value = key if value is None else value
        if key_mask is None:
            key_mask = getattr(key, "_keras_mask", None)
        heads, key_dim = self.num_heads, self.key_dim
        value_dim = self.value_dim or key_dim
        # Heads stay flat ([..., heads * dim]), so the hot path is a handful of 2-D matmuls
        # with no per-head transposes. The core runs in float32 (a no-op without mixed
        # precision): its sums over up to 10^4 keys overflow float16.
        phi_q = self._project_phi(query, self._query_dense)  # [B, m, h*k]
        phi_k = self._project_phi(key, self._key_dense)  # [B, n, h*k]
        # [B, h*k]: phi(K_h)^T 1 over the valid keys, heads side by side (a matvec with
        # the key mask, which so needs no pass of its own here).
        key_sums = masked_row_sum(phi_k, key_mask)
        if key_mask is not None:
            # A zero row of phi(K) removes its key from phi(K)^T V.
            phi_k = zero_masked_rows(phi_k, key_mask)
        # The sequence summary of Eq. 7 per head, phi(K_h)^T V_h with V_h = value W_h + b_h,
        # is (phi(K_h)^T value) W_h + (phi(K_h)^T 1) b_h: V is never projected over n, and
        # one O(n) product phi(K)^T value serves every head.
        keys_by_value = per_example_matmul(phi_k, _float32(value), transpose_a=True)
        # All heads' summaries at once: [B, h*k, h*v] against every head's value kernel,
        # of which only the diagonal blocks (head h's keys with head h's values) are kept.
        # The blocks are tiny, and the kernel is used as stored: no transpose, no tiling.
        value_kernel = ops.reshape(_float32(self._value_dense.kernel), (-1, heads * value_dim))
        depth = value.shape[-1]
        summary = ops.reshape(ops.matmul(ops.reshape(keys_by_value, (-1, depth)), value_kernel),
                              (-1, heads * key_dim, heads * value_dim))
        if self.use_bias:
            summary = summary + key_sums[..., None] * ops.reshape(
                _float32(self._value_dense.bias), (heads * value_dim,))
        # phi(Q) against the block-diagonal summaries gives every head's numerator and its
        # degree D (Eq. 7) in two matmuls, [B, m, h*v] and [B, m, h], with no slicing.
        numerator = per_example_matmul(phi_q, summary * _head_blocks(heads, key_dim, value_dim))
        degree = per_example_matmul(phi_q, key_sums[..., None] * _head_blocks(heads, key_dim, 1))
        scale = 1.0 / (degree + self.epsilon)  # [B, m, h]: small, the division is done here
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

    def _project_phi(self, inputs, dense):
        """phi(inputs W + b) as [..., heads * dim] float32. The product is taken on the
        inputs flattened to 2-D, so that TensorFlow's CPU runtime (oneDNN) fuses matmul,
        bias and an ELU into one kernel instead of three passes over the result."""
        depth = inputs.shape[-1]
        kernel = ops.reshape(ops.cast(dense.kernel, self.compute_dtype), (depth, -1))
        projected = ops.matmul(ops.reshape(ops.cast(inputs, self.compute_dtype), (-1, depth)),
                               kernel)
        if self.use_bias:
            projected = projected + ops.reshape(ops.cast(dense.bias, self.compute_dtype), (-1,))
        phi = apply_feature_map(self.feature_map, _float32(projected))
        return ops.reshape(phi, (*ops.shape(inputs)[:-1], kernel.shape[-1]))

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
            "epsilon": self.epsilon,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        })
        return config



def _float32(x):
    return ops.cast(x, "float32")


def _head_blocks(heads, rows_per_head, columns_per_head):
    """[h*r, h*c] float32 constant: 1 where the row's and the column's heads agree."""
    row_head = np.repeat(np.arange(heads), rows_per_head)
    column_head = np.repeat(np.arange(heads), columns_per_head)
    return np.equal.outer(row_head, column_head).astype("float32")
