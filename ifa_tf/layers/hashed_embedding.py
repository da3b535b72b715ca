import math

import keras
import numpy as np
from keras import ops

from ifa_tf.layers.fast_ops import count_at_most, gather_rows
from ifa_tf.layers.validation import check_choice, check_positive_int, clone_initializer

# Multiply-shift hashing (Fibonacci hashing): the top 32 bits of id * phi * 2^64 modulo
# 2^64, mapped onto the buckets by a multiply and a shift ("fastrange"). int64 products
# wrap modulo 2^64 on every backend, so any id, negative or huge, is fine, and there is
# no integer division on the hot path (an int64 modulo costs ~25 ns a value on a CPU).
_MULTIPLIER = 0x9E3779B97F4A7C15 - 2**64  # 2^64 / golden ratio, odd, as a signed int64
_LOW_32_BITS = 0xFFFFFFFF

BUCKETING_MODES = ("hash", "log2", "clip")
# Buckets of a `"log2"` embedding that cover every int64 magnitude (counts, durations).
LOG2_BUCKETS = 66


def hash_buckets(values, num_buckets, offset=0):
    """int64 bucket of each id: 0 -> 0, any other id -> [1, num_buckets); plus `offset`
    (added with the 1, in the same pass)."""
    values = ops.cast(values, "int64")
    mixed = ops.bitwise_and(ops.right_shift(values * _MULTIPLIER, 32), _LOW_32_BITS)
    bucket = ops.right_shift(mixed * (num_buckets - 1), 32) + (offset + 1)
    return ops.where(ops.equal(values, 0), offset, bucket)


def _check_num_buckets(num_buckets):
    if not isinstance(num_buckets, int) or not 2 <= num_buckets <= 2**31:
        raise ValueError("`num_buckets` must be an integer in [2, 2^31] (bucket 0 is "
                         f"padding). Received: num_buckets={num_buckets!r}")


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
        _check_num_buckets(num_buckets)
        self.num_buckets = num_buckets
        self.output_dim = output_dim
        self.mode = mode
        self._log2_thresholds = np.array(
            [(1 << k) - 1 for k in range(1, min(63, num_buckets - 2) + 1)], "int64")
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)

    def build(self, input_shape):
        # The table lives in a Keras `Embedding` (its weight path, and so checkpoints, are
        # those of earlier versions); `call` gathers from it directly (see `gather_rows`).
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
            return hash_buckets(values, self.num_buckets)
        if self.mode == "log2":
            # 1 + floor(log2(1 + v)) is 1 + #{k >= 1 : 2^k - 1 <= v}: a binary search over
            # those thresholds counts it exactly in int64 (a float log2 is one off next to
            # powers of two, and differently so on each backend), and at most
            # num_buckets - 2 thresholds cap the bucket.
            if self._log2_thresholds.size == 0:
                return ops.ones_like(values, "int32")
            flat = ops.reshape(ops.cast(values, "int64"), (-1,))  # TF searches 1-D values
            rank = count_at_most(self._log2_thresholds, flat)
            return 1 + ops.reshape(ops.cast(rank, "int32"), ops.shape(values))
        return ops.clip(ops.cast(values, "int32"), 0, self.num_buckets - 1)

    @property
    def embeddings(self):
        """The table, [num_buckets, output_dim]."""
        return self._embedding.embeddings

    def call(self, values):
        return ops.cast(gather_rows(self.embeddings, self.bucketize(values)),
                        self.compute_dtype)

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



@keras.saving.register_keras_serializable(package="ifa_tf")
class SummedHashedEmbedding(keras.layers.Layer):
    """The sum of several features' `HashedEmbedding`s, looked up at once.

    For features with few buckets (action bit sets, log2 time deltas), the sum
    `sum_f E_f[b_f]` is one row of the outer-sum table `T[b_1, ..., b_k] = sum_f E_f[b_f]`
    at the mixed-radix index of the buckets. `T` is rebuilt from the tables at every call
    (a few hundred rows), so over a [B, n] sequence this costs one gather and no additions
    where per-feature lookups cost one gather and one addition each. Each feature keeps its
    own table, and gradients reach every table as they would through the sum. When `T`
    would exceed `max_joint_rows` rows, the features are looked up one by one instead.

    Args:
        num_buckets: the bucket count of each feature.
        modes: the `HashedEmbedding` mode of each feature.
        output_dim: size of every embedding (they are summed).
        names: the name of each feature's `HashedEmbedding`.
        max_joint_rows: the largest outer-sum table built.
        embeddings_initializer: initializer of every feature's table.

    Call arguments:
        values: a list with one int tensor per feature, all of the same shape.

    Returns:
        `values[0].shape + (output_dim,)`.
    """

    def __init__(self, num_buckets, modes, output_dim, names=None, max_joint_rows=4096,
                 embeddings_initializer="uniform", **kwargs):
        super().__init__(**kwargs)
        names = list(names) if names is not None else [f"embedding_{i}"
                                                        for i in range(len(num_buckets))]
        if not num_buckets or not len(num_buckets) == len(modes) == len(names):
            raise ValueError("`num_buckets`, `modes` and `names` need one entry per feature. "
                             f"Received: num_buckets={num_buckets}, modes={modes}, "
                             f"names={names}")
        check_positive_int("max_joint_rows", max_joint_rows)
        self.num_buckets = list(num_buckets)
        self.modes = list(modes)
        self.output_dim = output_dim
        self.names = names
        self.max_joint_rows = max_joint_rows
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self._embeddings = [
            HashedEmbedding(buckets, output_dim, mode=mode,
                            embeddings_initializer=clone_initializer(
                                self.embeddings_initializer),
                            dtype=self.dtype_policy, name=name)
            for buckets, mode, name in zip(self.num_buckets, self.modes, self.names)]

    def build(self, input_shape):
        for embedding, shape in zip(self._embeddings, input_shape):
            embedding.build(shape)
        self.built = True

    def call(self, values):
        if len(self._embeddings) == 1 or math.prod(self.num_buckets) > self.max_joint_rows:
            total = self._embeddings[0](values[0])
            for embedding, value in zip(self._embeddings[1:], values[1:]):
                total = total + embedding(value)
            return total
        joint_table, joint_index = None, None
        for embedding, value in zip(self._embeddings, values):
            table = embedding.embeddings
            bucket = ops.cast(embedding.bucketize(value), "int32")
            if joint_table is None:
                joint_table, joint_index = table, bucket
            else:
                joint_table = ops.reshape(joint_table[:, None, :] + table[None, :, :],
                                          (-1, self.output_dim))
                joint_index = joint_index * embedding.num_buckets + bucket
        return ops.cast(gather_rows(joint_table, joint_index), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape[0], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update({"num_buckets": self.num_buckets, "modes": self.modes,
                       "output_dim": self.output_dim, "names": self.names,
                       "max_joint_rows": self.max_joint_rows,
                       "embeddings_initializer": keras.initializers.serialize(
                           self.embeddings_initializer)})
        return config


@keras.saving.register_keras_serializable(package="ifa_tf")
class StackedHashedEmbedding(keras.layers.Layer):
    """Hashed embeddings of several id features from one table, concatenated.

    Feature i hashes (as `HashedEmbedding`'s `"hash"` mode) into its own block of
    `num_buckets[i]` rows of one [sum(num_buckets), output_dim] table; each block's first
    row is that feature's padding. A position's embeddings then come from one gather,
    already side by side: over a [B, n] sequence that saves a pass over [B, n, k * d] (the
    concatenation) and k - 1 gathers. It is the same model as k `HashedEmbedding`s whose
    outputs are concatenated.

    Args:
        num_buckets: rows of each feature's block, including its padding row.
        output_dim: size of each feature's embedding.
        embeddings_initializer, embeddings_regularizer: as for `keras.layers.Embedding`.

    Call arguments:
        values: a list with one int tensor of ids per feature, all of the same shape.

    Returns:
        `values[0].shape + (len(num_buckets) * output_dim,)`, features in order.
    """

    def __init__(self, num_buckets, output_dim, embeddings_initializer="uniform",
                 embeddings_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        if not num_buckets:
            raise ValueError("`num_buckets` needs one entry per feature. "
                             f"Received: num_buckets={num_buckets!r}")
        for buckets in num_buckets:
            _check_num_buckets(buckets)
        check_positive_int("output_dim", output_dim)
        self.num_buckets = list(num_buckets)
        self.output_dim = output_dim
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self._offsets = [sum(self.num_buckets[:i]) for i in range(len(self.num_buckets))]

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            shape=(sum(self.num_buckets), self.output_dim),
            initializer=self.embeddings_initializer, regularizer=self.embeddings_regularizer,
            name="embeddings")
        self.built = True

    def call(self, values):
        rows = ops.stack([hash_buckets(value, buckets, offset) for value, buckets, offset
                          in zip(values, self.num_buckets, self._offsets)], axis=-1)
        embedded = gather_rows(self.embeddings, rows)  # [..., k, d]
        embedded = ops.reshape(embedded, (*ops.shape(rows)[:-1],
                                          len(self.num_buckets) * self.output_dim))
        return ops.cast(embedded, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape[0], len(self.num_buckets) * self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_buckets": self.num_buckets,
            "output_dim": self.output_dim,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer),
        })
        return config
