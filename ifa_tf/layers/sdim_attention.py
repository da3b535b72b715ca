import keras
import numpy as np
from keras import ops

from ifa_tf.layers.simhash import add_hyperplanes, simhash_bits
from ifa_tf.layers.validation import check_int_in_range, check_positive_int, check_seed

# Bucket sums whose squared norm is below this are treated as empty (they read zero).
_EPSILON = 1e-12


@keras.saving.register_keras_serializable(package="ifa_tf")
class SDIMAttention(keras.layers.Layer):
    """SDIM's hash-based sampling attention (Cao et al., "Sampling Is All You Need on
    Modeling Long-Term User Behaviors for CTR Prediction", CIKM 2022, Eq. 12).

    Each of `num_hashes` hash functions gives every item a signature of `hash_bits`
    SimHash bits (fixed random hyperplanes, never trained). Per hash function, a
    candidate's interest is the l2-normalised sum of the values of the valid sequence
    items whose signature equals the candidate's (zero when none does); the output is the
    mean over hash functions. In expectation this is attention with weights
    `(1 - angle(q, k) / pi) ** hash_bits` (paper Eq. 14): more bits, sharper attention.

    Linear in m + n, as the paper deploys it: the sequence is bucketed once per hash
    function (a segment sum over `2 ** hash_bits` buckets each) and every candidate reads
    its `num_hashes` buckets; no [B, m, n] tensor. Both steps are products with one-hot
    bucket matrices (num_hashes * 2 ** hash_bits columns per item): on TensorFlow's CPU
    runtime the sum takes 1.5 ms at n = 10,000, d = 48 and the defaults, where
    `unsorted_segment_sum` takes 44 ms. Cost O((m + n) * num_hashes * 2 ** hash_bits *
    d), so `hash_bits` is capped at 10 (the paper finds 2-5 best).

    Masking: padded keys fall in no bucket; padded queries get a zero output. Sums and
    their norms are float32 whatever the compute dtype.

    Args:
        num_hashes: hash functions averaged over (paper: m / tau = 48 / 3 = 16).
        hash_bits: bits per signature, tau (paper: 3).
        hash_seed: seed of the hyperplanes; `None` draws them from Keras' global seed
            (`keras.utils.set_random_seed`). They are saved with the weights either way.

    Call arguments:
        query: candidates [B, m, d].
        key: sequence items [B, n, d], embedded in the candidates' space (what is hashed).
        value: what is summed, [B, n, d_v]; defaults to `key`.
        query_mask: optional bool [B, m].
        key_mask: optional bool [B, n].

    Returns:
        [B, m, d_v].

    Example:
    >>> attention = SDIMAttention(num_hashes=16, hash_bits=3)
    >>> interest = attention(candidates, sequence_items, sequence, key_mask=sequence_mask)
    """

    def __init__(self, num_hashes=16, hash_bits=3, hash_seed=None, **kwargs):
        super().__init__(**kwargs)
        check_positive_int("num_hashes", num_hashes)
        check_int_in_range("hash_bits", hash_bits, 1, 10)
        check_seed("hash_seed", hash_seed)
        self.num_hashes = num_hashes
        self.hash_bits = hash_bits
        self.hash_seed = hash_seed

    def build(self, query_shape, key_shape, value_shape=None):
        if query_shape[-1] != key_shape[-1]:
            raise ValueError(
                "Queries and keys must be embedded in one space to be hashed alike. "
                f"Received: query_shape={query_shape}, key_shape={key_shape}")
        self.hyperplanes = add_hyperplanes(self, query_shape[-1],
                                           self.num_hashes * self.hash_bits, self.hash_seed)
        # bits [.., num_hashes * hash_bits] @ this = each hash function's signature, the
        # integer its bits spell (exact in float32).
        self._bit_values = np.kron(np.eye(self.num_hashes, dtype="float32"),
                                   2.0 ** np.arange(self.hash_bits, dtype="float32")[:, None])
        self.built = True

    def call(self, query, key, value=None, query_mask=None, key_mask=None):
        value = key if value is None else value
        buckets = 2 ** self.hash_bits
        batch, length = ops.shape(key)[0], ops.shape(key)[1]
        # The segment sum as one product with the keys' one-hot buckets, laid out
        # [B, hash function * bucket, n] (the transposed layout costs oneDNN ~2x more):
        # row (h, s) adds the values of the keys whose signature under h is s. Batched
        # matmuls, not fast_ops' per_example_matmul: its batch-of-one branch broke XLA's
        # dynamic shapes here (the jit_compile export returned [0, 0] scores).
        key_signatures = ops.transpose(self._signatures(key, key_mask), (0, 2, 1))
        key_buckets = ops.reshape(ops.one_hot(key_signatures, buckets, axis=2),
                                  (batch, self.num_hashes * buckets, length))
        sums = ops.matmul(key_buckets, ops.cast(value, "float32"))
        squared_norms = ops.sum(ops.square(sums), axis=-1, keepdims=True)
        normalised = sums * ops.rsqrt(ops.maximum(squared_norms, _EPSILON))
        # Each query reads its num_hashes buckets: one product with its one-hot buckets.
        query_buckets = ops.one_hot(self._signatures(query, query_mask), buckets)
        query_buckets = ops.reshape(query_buckets, (batch, ops.shape(query)[1],
                                                    self.num_hashes * buckets))
        interest = ops.matmul(query_buckets, normalised) / self.num_hashes
        return ops.cast(interest, self.compute_dtype)

    def _signatures(self, embeddings, mask):
        """int32 [B, L, num_hashes]: each hash function's bucket of each item, the integer
        its bits spell; -1 (no bucket) where `mask` is False."""
        bits = ops.cast(simhash_bits(embeddings, self.hyperplanes), "float32")
        signatures = ops.cast(ops.matmul(bits, self._bit_values), "int32")
        if mask is None:
            return signatures
        return ops.where(mask[..., None], signatures, -1)

    def compute_output_shape(self, query_shape, key_shape, value_shape=None):
        return (*query_shape[:-1], (key_shape if value_shape is None else value_shape)[-1])

    def get_config(self):
        config = super().get_config()
        config.update({"num_hashes": self.num_hashes, "hash_bits": self.hash_bits,
                       "hash_seed": self.hash_seed})
        return config
