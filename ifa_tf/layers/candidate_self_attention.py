import keras

from ifa_tf.layers.normalized_linear_attention import NormalizedLinearAttention


@keras.saving.register_keras_serializable(package="ifa_tf")
class CandidateSelfAttention(NormalizedLinearAttention):
    """Relation-aware modelling among the candidates (RAM, IFA Eq. 3).

    `F_c-c = fastAtten(F_can, F_can, F_can)`: normalised linear attention with the
    candidate set as query, key and value, so every candidate sees the whole set at
    O(m) cost. Padded candidates are excluded as keys (they change no valid output) and
    get a zero output as queries.

    Takes the constructor arguments of `NormalizedLinearAttention`.

    Call arguments:
        candidates: [B, m, d], the queries and keys (and the values unless `values`).
        candidate_mask: optional bool [B, m], True for valid candidates. When omitted, the
            Keras mask attached to `candidates` is used, if any.
        values: optional [B, m, d_v], the candidates' values when they come from other
            embeddings than their queries and keys (decoupled embeddings).

    Returns:
        [B, m, output_dim].
    """

    def build(self, candidates_shape, values_shape=None):
        super().build(candidates_shape, candidates_shape, values_shape)

    def call(self, candidates, candidate_mask=None, values=None):
        if candidate_mask is None:
            candidate_mask = getattr(candidates, "_keras_mask", None)
        return super().call(candidates, candidates, values, query_mask=candidate_mask,
                            key_mask=candidate_mask)

    def compute_mask(self, candidates, candidate_mask=None, values=None):
        return candidate_mask

    def compute_output_shape(self, candidates_shape, values_shape=None):
        return super().compute_output_shape(candidates_shape, candidates_shape, values_shape)
