import keras
from keras import ops

from ifa_tf.layers.projections import head_projection, merge_heads_projection
from ifa_tf.layers.top_k import gather_positions
from ifa_tf.layers.validation import check_positive_int


@keras.saving.register_keras_serializable(package="ifa_tf")
class MaskedTargetAttention(keras.layers.Layer):
    """Multi-head softmax target attention: each candidate attends to its keys.

    `softmax(Q K^T / sqrt(d) + bias) V` per head, over either one key set shared by all
    candidates (keys [B, n, d]: exact attention over a whole sequence, O(m n)) or a key set
    per candidate (keys [B, m, k, d]: the ESU over a sub-sequence chosen by a search unit).

    Masking: invalid keys get zero weight; a candidate without any valid key gets a zero
    output (no NaN); padded queries get a zero output. Softmax runs in float32.

    Args:
        num_heads: number of heads.
        key_dim: size of each head.
        output_dim: size of the output projection; defaults to the query's last dim.
        use_bias: whether projections have biases.
        kernel_initializer: for the projections.

    Call arguments:
        query: [B, m, d_q].
        key: [B, n, d] or [B, m, k, d].
        value: same leading shape as `key`; defaults to `key`.
        query_mask: optional bool [B, m].
        key_mask: optional bool [B, n] or [B, m, k].
        attention_bias: optional float [B, m, n] or [B, m, k] added to every head's logits
            (e.g. the search scores of SIM soft search, which lets them learn).
        key_indices: optional int [B, m, k]: each candidate attends to these positions of
            the shared keys [B, n, d] (a search unit's choice; `key_mask` is then
            [B, m, k]). The same as passing the gathered [B, m, k, d] keys, but every key
            and value is projected once, not once per candidate that selected it.

    Returns:
        [B, m, output_dim].
    """

    def __init__(self, num_heads, key_dim, output_dim=None, use_bias=True,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        check_positive_int("num_heads", num_heads)
        check_positive_int("key_dim", key_dim)
        if output_dim is not None:
            check_positive_int("output_dim", output_dim)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.output_dim = output_dim
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, query_shape, key_shape, value_shape=None):
        value_shape = key_shape if value_shape is None else value_shape
        self._query_dense = head_projection("query", query_shape, self.num_heads,
                                            self.key_dim, self, self.use_bias)
        self._key_dense = head_projection("key", key_shape, self.num_heads, self.key_dim, self,
                                          self.use_bias)
        self._value_dense = head_projection("value", value_shape, self.num_heads, self.key_dim,
                                            self, self.use_bias)
        self._output_dense = merge_heads_projection(
            "attention_output", (*query_shape[:-1], self.num_heads, self.key_dim),
            self.output_dim or query_shape[-1], self, self.use_bias)
        self.built = True

    def call(self, query, key, value=None, query_mask=None, key_mask=None, attention_bias=None,
             key_indices=None):
        value = key if value is None else value
        k, v = self._key_dense(key), self._value_dense(value)
        if key_indices is not None:
            k, v = (_gather_heads(x, key_indices) for x in (k, v))
        return self.attend(self._query_dense(query), k, v, query_mask, key_mask,
                           attention_bias)

    def attend(self, q, k, v, query_mask=None, key_mask=None, attention_bias=None):
        """Softmax attention of projected queries [B, m, h, c] over projected keys and
        values, shared ([B, n, h, c]) or per candidate ([B, m, k, h, c])."""
        per_candidate = len(k.shape) == 5
        if per_candidate:
            logits = ops.einsum("bmhc,bmkhc->bmhk", q, k)
        else:
            logits = ops.einsum("bmhc,bnhc->bmhn", q, k)
        logits = ops.cast(logits, "float32") / (self.key_dim ** 0.5)
        if attention_bias is not None:
            logits = logits + ops.cast(attention_bias, "float32")[:, :, None, :]
        weights = masked_softmax(logits, None if key_mask is None else (
            key_mask[:, :, None, :] if per_candidate else key_mask[:, None, None, :]))
        weights = ops.cast(weights, v.dtype)
        if per_candidate:
            attended = ops.einsum("bmhk,bmkhc->bmhc", weights, v)
        else:
            attended = ops.einsum("bmhn,bnhc->bmhc", weights, v)
        output = self._output_dense(attended)
        if query_mask is not None:
            output = output * ops.cast(query_mask, output.dtype)[..., None]
        return output

    def compute_output_shape(self, query_shape, key_shape, value_shape=None):
        return (*query_shape[:-1], self.output_dim or query_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "output_dim": self.output_dim,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        })
        return config


def _gather_heads(projected, indices):
    """[B, n, h, c] at int [B, m, k] -> [B, m, k, h, c]."""
    batch, length, heads, size = (ops.shape(projected)[i] for i in range(4))
    gathered = gather_positions(ops.reshape(projected, (batch, length, heads * size)), indices)
    return ops.reshape(gathered, (*ops.shape(indices), heads, size))


def masked_softmax(logits, mask, axis=-1):
    """Softmax over `axis` where invalid entries get weight 0; all-invalid rows give 0."""
    logits = ops.cast(logits, "float32")
    if mask is None:
        return ops.softmax(logits, axis=axis)
    mask = ops.cast(mask, "float32")
    # `initial` keeps the max defined over an empty axis (n = 0).
    row_max = ops.max(ops.where(mask > 0, logits, -1e9), axis=axis, keepdims=True, initial=-1e9)
    shifted = logits - row_max
    exp = ops.exp(ops.minimum(shifted, 0.0)) * mask
    return exp / ops.maximum(ops.sum(exp, axis=axis, keepdims=True), 1e-30)
