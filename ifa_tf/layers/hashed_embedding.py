import keras
from keras import ops

from ifa_tf.layers.validation import check_choice, check_positive_int

# Multiplicative hashing modulo the Mersenne prime 2^31 - 1: reducing first keeps every
# product below 2^62, so no id, however large or negative, overflows int64.
_PRIME = 2_147_483_647
_MULTIPLIER = 1_540_483_477
_INCREMENT = 1_013_904_223

BUCKETING_MODES = ("hash", "log2", "clip")


@keras.saving.register_keras_serializable(package="ifa_tf")
class HashedEmbedding(keras.layers.Layer):
    """Embeds raw int64 values without a vocabulary; bucket 0 is reserved for padding.

    Modes:
    - `"hash"` (ids): 0 -> bucket 0; any other id, negative or huge, is hashed into
      [1, num_buckets). Unseen ids are never an error.
    - `"log2"` (counts, durations): v -> 1 + floor(log2(1 + max(v, 0))), capped at
      `num_buckets - 1`, so magnitudes from 0 to 2^63 share a few dozen buckets.
    - `"clip"` (small codes such as action bit sets): v -> clip(v, 0, num_buckets - 1).

    Args:
        num_buckets: rows of the table, including the padding row 0.
        output_dim: embedding size.
        mode: one of `"hash"`, `"log2"`, `"clip"`.
        embeddings_initializer, embeddings_regularizer: as for `keras.layers.Embedding`.

    Call arguments:
        values: int tensor of any shape.

    Returns:
        `values.shape + (output_dim,)`.
    """

    def __init__(self, num_buckets, output_dim, mode="hash", embeddings_initializer="uniform",
                 embeddings_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        check_choice("mode", mode, BUCKETING_MODES)
        check_positive_int("output_dim", output_dim)
        if not isinstance(num_buckets, int) or num_buckets < 2:
            raise ValueError("`num_buckets` must be an integer >= 2 (bucket 0 is padding). "
                             f"Received: num_buckets={num_buckets!r}")
        self.num_buckets = num_buckets
        self.output_dim = output_dim
        self.mode = mode
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)

    def build(self, input_shape):
        self._embedding = keras.layers.Embedding(
            self.num_buckets, self.output_dim,
            embeddings_initializer=self.embeddings_initializer,
            embeddings_regularizer=self.embeddings_regularizer,
            dtype=self.dtype_policy, name="embedding")
        self._embedding.build(input_shape)
        self.built = True

    def bucketize(self, values):
        """The table row of each value (int tensor of the same shape)."""
        if self.mode == "hash":
            values = ops.cast(values, "int64")
            reduced = ops.mod(values, _PRIME)
            mixed = ops.mod(reduced * _MULTIPLIER + _INCREMENT, _PRIME)
            return ops.where(ops.equal(values, 0), 0, ops.mod(mixed, self.num_buckets - 1) + 1)
        if self.mode == "log2":
            magnitude = ops.cast(ops.maximum(values, 0), "float32")
            bucket = 1 + ops.cast(ops.floor(ops.log2(1.0 + magnitude)), "int32")
            return ops.minimum(bucket, self.num_buckets - 1)
        return ops.clip(ops.cast(values, "int32"), 0, self.num_buckets - 1)

    def call(self, values):
        return self._embedding(self.bucketize(values))

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_buckets": self.num_buckets,
            "output_dim": self.output_dim,
            "mode": self.mode,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer),
        })
        return config

