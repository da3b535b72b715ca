import keras
from keras import ops

from ifa_tf.layers.masked_target_attention import masked_softmax
from ifa_tf.layers.projections import head_projection, merge_heads_projection
from ifa_tf.layers.top_k import gather_positions, select_top_k
from ifa_tf.layers.validation import check_positive_int


@keras.saving.register_keras_serializable(package="ifa_tf")
class TWINAttention(keras.layers.Layer):
    """TWIN's two-stage interest network (Chang et al., KDD 2023).

    GSU: a light target attention scores every valid sequence item against each
    candidate with the *same* query/key projections as the ESU (TWIN's consistency),
    averaged over heads, and keeps the top k. ESU: multi-head softmax target attention
    over those k items. Items outside the top k never reach the output.

    Args:
        k: items kept by the GSU (paper: 100).
        num_heads: ESU heads.
        key_dim: size of each head.
        output_dim: output size; defaults to the query's last dim.
        kernel_initializer: for the projections.

    Call arguments:
        query: candidates [B, m, d].
        key: sequence [B, n, d].
        value: sequence values [B, n, d_v]; defaults to `key`.
        query_mask: optional bool [B, m].
        key_mask: optional bool [B, n].

    Returns:
        [B, m, output_dim].
    """

    def __init__(self, k=100, num_heads=2, key_dim=16, output_dim=None,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        for name, value in (("k", k), ("num_heads", num_heads), ("key_dim", key_dim)):
            check_positive_int(name, value)
        if output_dim is not None:
            check_positive_int("output_dim", output_dim)
        self.k = k
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.output_dim = output_dim
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, query_shape, key_shape, value_shape=None):
        value_shape = key_shape if value_shape is None else value_shape
        self._query_dense = head_projection("query", query_shape, self.num_heads,
                                            self.key_dim, self, True)
        self._key_dense = head_projection("key", key_shape, self.num_heads, self.key_dim, self,
                                          True)
        self._value_dense = head_projection("value", value_shape, self.num_heads, self.key_dim,
                                            self, True)
        self._output_dense = merge_heads_projection(
            "attention_output", (*query_shape[:-1], self.num_heads, self.key_dim),
            self.output_dim or query_shape[-1], self, True)
        self.built = True

    def call(self, query, key, value=None, query_mask=None, key_mask=None):
        value = key if value is None else value
        q = self._query_dense(query)  # [B, m, h, c]
        k = self._key_dense(key)  # [B, n, h, c]
        v = self._value_dense(value)
        scale = 1.0 / (self.key_dim ** 0.5)
        # GSU: light attention over the whole sequence, one score per (candidate, item).
        light = ops.einsum("bmhc,bnhc->bmn", q, k) * (scale / self.num_heads)
        if key_mask is None:
            key_mask = ops.ones(ops.shape(key)[:2], dtype="bool")
        indices, selected_mask, _ = select_top_k(light, key_mask[:, None, :], self.k)
        # ESU: exact multi-head attention over the k kept items.
        heads = self.num_heads * self.key_dim
        batch, length = ops.shape(k)[0], ops.shape(k)[1]
        selected_k = gather_positions(ops.reshape(k, (batch, length, heads)), indices)
        selected_v = gather_positions(ops.reshape(v, (batch, length, heads)), indices)
        split = (*ops.shape(indices), self.num_heads, self.key_dim)
        selected_k = ops.reshape(selected_k, split)  # [B, m, k, h, c]
        selected_v = ops.reshape(selected_v, split)
        logits = ops.einsum("bmhc,bmkhc->bmhk", q, selected_k) * scale
        weights = masked_softmax(logits, selected_mask[:, :, None, :])
        attended = ops.einsum("bmhk,bmkhc->bmhc", ops.cast(weights, v.dtype), selected_v)
        output = self._output_dense(attended)
        if query_mask is not None:
            output = output * ops.cast(query_mask, output.dtype)[..., None]
        return output

    def compute_output_shape(self, query_shape, key_shape, value_shape=None):
        return (*query_shape[:-1], self.output_dim or query_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({
            "k": self.k,
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "output_dim": self.output_dim,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        })
        return config
