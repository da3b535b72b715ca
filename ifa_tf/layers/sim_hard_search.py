import keras
from keras import ops

from ifa_tf.layers.top_k import select_top_k
from ifa_tf.layers.validation import check_positive_int


@keras.saving.register_keras_serializable(package="ifa_tf")
class SIMHardSearch(keras.layers.Layer):
    """SIM's hard-search GSU (Pi et al., CIKM 2020): per candidate, the most recent k valid
    sequence items whose category equals the candidate's.

    Items of other categories are never chosen, however relevant: the information loss
    that IFA removes.

    Args:
        k: sub-sequence length (paper: 100).

    Call arguments:
        candidate_categories: int [B, m].
        sequence_categories: int [B, n].
        sequence_mask: bool [B, n], True for valid items.

    Returns:
        `(indices, selected_mask)`, each [B, m, k], most recent first; slots beyond the
        matches are masked.
    """

    def __init__(self, k=100, **kwargs):
        super().__init__(**kwargs)
        check_positive_int("k", k)
        self.k = k

    def call(self, candidate_categories, sequence_categories, sequence_mask):
        match = ops.equal(candidate_categories[:, :, None], sequence_categories[:, None, :])
        eligible = ops.logical_and(match, sequence_mask[:, None, :])
        recency = ops.cast(ops.arange(ops.shape(sequence_categories)[1]), "float32")
        scores = ops.broadcast_to(recency[None, None, :], ops.shape(eligible))
        indices, selected_mask, _ = select_top_k(scores, eligible, self.k)
        return indices, selected_mask

    def compute_output_shape(self, candidate_shape, sequence_shape, mask_shape):
        shape = (*candidate_shape, self.k)
        return shape, shape

    def get_config(self):
        config = super().get_config()
        config.update({"k": self.k})
        return config
