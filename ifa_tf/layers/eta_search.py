import keras
from keras import ops

from ifa_tf.layers.simhash import add_hyperplanes, simhash_bits
from ifa_tf.layers.top_k import select_top_k
from ifa_tf.layers.validation import check_positive_int, check_seed


@keras.saving.register_keras_serializable(package="ifa_tf")
class ETASearch(keras.layers.Layer):
    """ETA's GSU (Chen et al., "End-to-End User Behavior Retrieval in Click-Through Rate
    Prediction Model", 2021): per candidate, the k valid sequence items whose SimHash
    signatures are nearest in Hamming distance to the candidate's.

    A signature is `hash_bits` bits, the sides of fixed random hyperplanes an embedding
    lies on (never trained: ETA retrieves end to end because the embeddings it hashes are
    the ones the ESU trains). Candidates and sequence must be embedded in one space.

    Hamming distances come from one product of the signatures as ±1 vectors,
    `s_q . s_k = hash_bits - 2 * hamming`, exact in float32: the [B, m, n] distance
    matrix is the cost (no [B, m, n, d] tensor). Ties go to the more recent item (the
    higher position): a lifelong sequence repeats items, and repeats hash alike.

    Args:
        k: items kept per candidate (as for the zoo's other two-stage models).
        hash_bits: signature length.
        hash_seed: seed of the hyperplanes; `None` draws them from Keras' global seed
            (`keras.utils.set_random_seed`). They are saved with the weights either way.

    Call arguments:
        candidate_embeddings: [B, m, d].
        sequence_embeddings: [B, n, d].
        sequence_mask: bool [B, n], True for valid items; padding is never retrieved.

    Returns:
        `(indices, selected_mask)`, each [B, m, k], nearest first; slots beyond the valid
        items are masked (and point at position 0).

    Example:
    >>> search = ETASearch(k=2, hash_bits=16, hash_seed=0)
    >>> indices, selected = search(candidates, sequence, sequence_mask)
    """

    def __init__(self, k=100, hash_bits=64, hash_seed=None, **kwargs):
        super().__init__(**kwargs)
        check_positive_int("k", k)
        check_positive_int("hash_bits", hash_bits)
        check_seed("hash_seed", hash_seed)
        self.k = k
        self.hash_bits = hash_bits
        self.hash_seed = hash_seed

    def build(self, candidate_embeddings_shape, sequence_embeddings_shape,
              sequence_mask_shape=None):
        if candidate_embeddings_shape[-1] != sequence_embeddings_shape[-1]:
            raise ValueError(
                "Candidates and sequence must be embedded in one space to be hashed alike. "
                f"Received: candidate_embeddings_shape={candidate_embeddings_shape}, "
                f"sequence_embeddings_shape={sequence_embeddings_shape}")
        self.hyperplanes = add_hyperplanes(self, candidate_embeddings_shape[-1],
                                           self.hash_bits, self.hash_seed)
        self.built = True

    def call(self, candidate_embeddings, sequence_embeddings, sequence_mask):
        candidate_signs = self._signs(candidate_embeddings)  # [B, m, hash_bits]
        # Oldest last: top_k breaks ties by the lower index, here the more recent item.
        sequence_signs = ops.flip(self._signs(sequence_embeddings), axis=1)
        agreement = ops.matmul(candidate_signs, ops.transpose(sequence_signs, (0, 2, 1)))
        indices, selected_mask, _ = select_top_k(
            agreement, ops.flip(sequence_mask, axis=1)[:, None, :], self.k)
        length = ops.shape(sequence_embeddings)[1]
        return ops.where(selected_mask, length - 1 - indices, 0), selected_mask

    def _signs(self, embeddings):
        return ops.where(simhash_bits(embeddings, self.hyperplanes), 1.0, -1.0)

    def compute_output_shape(self, candidate_embeddings_shape, sequence_embeddings_shape,
                             sequence_mask_shape=None):
        shape = (*candidate_embeddings_shape[:-1], self.k)
        return shape, shape

    def get_config(self):
        config = super().get_config()
        config.update({"k": self.k, "hash_bits": self.hash_bits, "hash_seed": self.hash_seed})
        return config
