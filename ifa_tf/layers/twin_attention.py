import keras
from keras import ops

from ifa_tf.layers.masked_target_attention import MaskedTargetAttention
from ifa_tf.layers.top_k import gather_positions, select_top_k
from ifa_tf.layers.validation import check_positive_int


@keras.saving.register_keras_serializable(package="ifa_tf")
class TWINAttention(MaskedTargetAttention):
    """TWIN's two-stage interest network (Chang et al., KDD 2023).

    GSU: a light target attention scores every valid sequence item against each
    candidate with the *same* query/key projections as the ESU (TWIN's consistency),
    averaged over heads, and keeps the top k. ESU: `MaskedTargetAttention` over those k
    items, reusing the keys and values already projected for the GSU. Items outside the top
    k never reach the output.

    `key_bias` (TWIN-V2's cluster-aware attention, Si et al., CIKM 2024) adds a score per
    key in both stages, so they keep one relevance measure: the GSU then ranks by the mean
    over heads of the ESU's scaled logits plus the bias, and the ESU adds the bias of each
    kept key to every head's logits. With `key_bias = ln(n)` for keys that stand for n
    identical items (clusters), softmax(a + ln n) is proportional to n exp(a): a key
    weighs as its n items would. Without it the GSU ranks by the sum over heads of the
    unscaled products, as TWIN does (the same order).

    Args:
        k: items kept by the GSU (paper: 100).
        num_heads, key_dim, output_dim, use_bias, kernel_initializer: as for
            `MaskedTargetAttention`.

    Call arguments:
        query: candidates [B, m, d].
        key: sequence [B, n, d].
        value: sequence values [B, n, d_v]; defaults to `key`.
        query_mask: optional bool [B, m].
        key_mask: optional bool [B, n].
        key_bias: optional float [B, n], added to every key's score in the GSU and the ESU.

    Returns:
        [B, m, output_dim].
    """

    def __init__(self, k=100, num_heads=2, key_dim=16, **kwargs):
        super().__init__(num_heads=num_heads, key_dim=key_dim, **kwargs)
        check_positive_int("k", k)
        self.k = k

    def call(self, query, key, value=None, query_mask=None, key_mask=None, key_bias=None):
        value = key if value is None else value
        q = self._query_dense(query)  # [B, m, h, c]
        k = self._key_dense(key)  # [B, n, h, c]
        v = self._value_dense(value)
        # GSU: light attention over the whole sequence, one score per (candidate, item).
        light = ops.einsum("bmhc,bnhc->bmn", q, k)
        if key_bias is not None:
            # On the ESU's scale (mean of its heads' logits), where the bias means ln(n).
            key_bias = ops.cast(key_bias, "float32")
            light = (ops.cast(light, "float32") / (self.num_heads * self.key_dim ** 0.5)
                     + key_bias[:, None, :])
        if key_mask is None:
            key_mask = ops.ones(ops.shape(key)[:2], dtype="bool")
        indices, selected_mask, _ = select_top_k(light, key_mask[:, None, :], self.k)
        # ESU: exact multi-head attention over the k kept items' projected keys and values.
        heads = self.num_heads * self.key_dim
        batch, length = ops.shape(k)[0], ops.shape(k)[1]
        split = (*ops.shape(indices), self.num_heads, self.key_dim)
        selected_k = ops.reshape(
            gather_positions(ops.reshape(k, (batch, length, heads)), indices), split)
        selected_v = ops.reshape(
            gather_positions(ops.reshape(v, (batch, length, heads)), indices), split)
        selected_bias = None if key_bias is None else gather_positions(
            key_bias[..., None], indices)[..., 0]  # [B, m, k]
        return self.attend(q, selected_k, selected_v, query_mask, selected_mask, selected_bias)

    def get_config(self):
        return {**super().get_config(), "k": self.k}
