import keras
from keras import ops

from ifa_tf.layers.top_k import select_top_k
from ifa_tf.layers.validation import check_positive_int


@keras.saving.register_keras_serializable(package="ifa_tf")
class SIMSoftSearch(keras.layers.Layer):
    """SIM's soft-search GSU (Pi et al., CIKM 2020): per candidate, the k valid sequence
    items with the largest inner product of their search embeddings.

    The search embeddings are separate from the model's (the caller embeds items into a
    dedicated table). Top-k passes no gradient to them, so the selected scores are returned
    too: the ESU adds them to its attention logits, which trains the search embeddings
    end to end (SIM trains them with an auxiliary task instead).

    Args:
        k: sub-sequence length (paper: 100).

    Call arguments:
        candidate_embeddings: [B, m, e] search embeddings of the candidates.
        sequence_embeddings: [B, n, e] search embeddings of the sequence.
        sequence_mask: bool [B, n].

    Returns:
        `(indices, selected_mask, selected_scores)`, each [B, m, k], best first.
    """

    def __init__(self, k=100, **kwargs):
        super().__init__(**kwargs)
        check_positive_int("k", k)
        self.k = k

    def call(self, candidate_embeddings, sequence_embeddings, sequence_mask):
        scores = ops.einsum("bme,bne->bmn", candidate_embeddings, sequence_embeddings)
        indices, selected_mask, selected_scores = select_top_k(
            scores, sequence_mask[:, None, :], self.k)
        selected_scores = ops.where(selected_mask, selected_scores, 0.0)
        return indices, selected_mask, selected_scores

    def compute_output_shape(self, candidate_shape, sequence_shape, mask_shape):
        shape = (*candidate_shape[:-1], self.k)
        return shape, shape, shape

    def get_config(self):
        config = super().get_config()
        config.update({"k": self.k})
        return config
