"""SimHash (random-hyperplane LSH, Charikar 2002), shared by ETA's search and SDIM.

An embedding's bit j is the side of hyperplane j it lies on. Two vectors at angle theta
agree on a bit with probability 1 - theta / pi, so the Hamming distance of signatures (ETA)
and the chance of equal signatures (SDIM) both track cosine similarity.
"""

import keras
from keras import ops


def add_hyperplanes(layer, input_dim, num_planes, seed):
    """A [input_dim, num_planes] standard normal matrix, never trained: drawn once from
    `seed` (from Keras' global seed when `None`, so `keras.utils.set_random_seed` fixes
    it) and saved with the layer's weights, so a reloaded model hashes alike."""
    return layer.add_weight(
        name="hyperplanes", shape=(input_dim, num_planes),
        initializer=keras.initializers.RandomNormal(stddev=1.0, seed=seed), trainable=False,
        dtype="float32", autocast=False)


def simhash_bits(embeddings, hyperplanes):
    """bool [..., num_planes]: True where the embedding lies on a hyperplane's positive
    side. Computed in float32 whatever the compute dtype, so a signature never depends on
    the precision policy."""
    return ops.matmul(ops.cast(embeddings, "float32"), hyperplanes) > 0
