import keras
from keras import ops

from ifa_tf.layers.masked_target_attention import masked_softmax
from ifa_tf.layers.top_k import gather_positions, select_top_k
from ifa_tf.layers.validation import check_positive_int


@keras.saving.register_keras_serializable(package="ifa_tf")
class DAREAttention(keras.layers.Layer):
    """DARE's soft search and pooling (Feng et al., "Long-Sequence Recommendation Models
    Need Decoupled Embeddings", ICLR 2025).

    Attention and representation come from separate embedding tables. Per candidate t and
    event i, in the attention space:

        s_i = <a_t, a_i> / sqrt(d_a) + <tau_t, tau_i> / sqrt(d_tau)

    (the semantic and the time parts scaled apart, no projection, one head); the k events
    of highest s_i are kept, `w = softmax(s)` over them, and the interest is the pooled
    representation `h = sum_i w_i r_i`. There are no weights: the tables are the model's.

    Masking: padded events are never kept; a candidate without a valid event gets h = 0; a
    padded candidate gets 0.

    Args:
        k: events kept per candidate (DARE: 20 of 200; the zoo's budget: 100).

    Call arguments:
        query: attention embeddings of the candidates, a_t [B, m, d_a].
        key: attention embeddings of the events, a_i [B, n, d_a].
        value: representation embeddings of the events, r_i [B, n, d].
        query_time: optional time embeddings of the candidates, tau_t [B, m, d_tau]
            (or [B, 1, d_tau], one "now" for all); with `key_time`.
        key_time: optional time embeddings of the events, tau_i [B, n, d_tau].
        query_mask: optional bool [B, m].
        key_mask: optional bool [B, n].

    Returns:
        h [B, m, d].

    Example:
    >>> layer = DAREAttention(k=20)
    >>> h = layer(attention_candidates, attention_events, events, key_mask=mask)
    """

    def __init__(self, k=100, **kwargs):
        super().__init__(**kwargs)
        check_positive_int("k", k)
        self.k = k

    def build(self, query_shape, key_shape, value_shape, query_time_shape=None,
              key_time_shape=None):
        if query_shape[-1] != key_shape[-1]:
            raise ValueError("Candidates and events must come from one attention table. "
                             f"Received: query_shape={query_shape}, key_shape={key_shape}")
        self.built = True

    def call(self, query, key, value, query_time=None, key_time=None, query_mask=None,
             key_mask=None):
        scores = self.scores(query, key, query_time, key_time)  # [B, m, n]
        if key_mask is None:
            key_mask = ops.ones(ops.shape(key)[:2], dtype="bool")
        indices, selected_mask, selected_scores = select_top_k(scores, key_mask[:, None, :],
                                                               self.k)
        weights = masked_softmax(selected_scores, selected_mask)  # [B, m, k]
        selected = gather_positions(value, indices)  # [B, m, k, d]
        output = ops.einsum("bmk,bmkd->bmd", ops.cast(weights, selected.dtype), selected)
        if query_mask is not None:
            output = output * ops.cast(query_mask, output.dtype)[..., None]
        return output

    @staticmethod
    def scores(query, key, query_time=None, key_time=None):
        """s [B, m, n], float32: the semantic and the time dot products, each scaled by
        its own width."""
        query, key = ops.cast(query, "float32"), ops.cast(key, "float32")
        scores = ops.einsum("bmd,bnd->bmn", query, key) / (query.shape[-1] ** 0.5)
        if key_time is not None:
            query_time = ops.cast(query_time, "float32")
            key_time = ops.cast(key_time, "float32")
            scores = scores + (ops.einsum("bmd,bnd->bmn", query_time, key_time)
                               / (key_time.shape[-1] ** 0.5))
        return scores

    def compute_output_shape(self, query_shape, key_shape, value_shape,
                             query_time_shape=None, key_time_shape=None):
        return (*query_shape[:-1], value_shape[-1])

    def get_config(self):
        return {**super().get_config(), "k": self.k}
