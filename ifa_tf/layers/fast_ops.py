"""Operations with a faster path on one backend than their `keras.ops` form.

Most are TensorFlow CPU runtime paths and take the `keras.ops` route on other backends,
where the computation is compiled (JAX) and the extra work below is fused away or never
emitted; `count_at_most` is a JAX (GPU) path.
"""

import keras
from keras import ops


def gather_rows(table, rows):
    """`table[rows]` for rows known to lie in `[0, len(table))` (hash buckets).

    `ops.take` also wraps negative indices, which on TensorFlow costs three more passes over
    the indices (~0.2 ms of a 10,000-item sequence's ~0.8 ms lookup on a 2-core CPU); bucket
    ids are never negative, so TensorFlow gathers directly.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.gather(table, rows)
    return ops.take(table, rows, axis=0)


def per_example_matmul(a, b, transpose_a=False):
    """[B, r, k] x [B, k, c] -> [B, r, c]; with `transpose_a`, `a` is given as [B, k, r].

    On TensorFlow's CPU runtime a batched matmul (oneDNN's) costs ~40-70 us a call whatever
    its size, a 2-D one ~5-10 us. A served request is a batch of one, so on TensorFlow a
    batch of one takes the 2-D kernel (a branch when B is only known at run time): ~0.3 ms
    less per IFA request at m, n <= 1,000.
    """
    if keras.backend.backend() != "tensorflow":
        return ops.matmul(ops.transpose(a, (0, 2, 1)) if transpose_a else a, b)
    import tensorflow as tf

    def single():
        return tf.matmul(a[0], b[0], transpose_a=transpose_a)[None]

    def batched():
        return tf.matmul(a, b, transpose_a=transpose_a)

    if a.shape[0] is not None:
        return single() if a.shape[0] == 1 else batched()
    return tf.cond(tf.equal(tf.shape(a)[0], 1), single, batched)


def zero_masked_rows(x, mask):
    """`x` with the rows where `mask` [B, r] is False set to zero; x is [B, r, c].

    On TensorFlow's CPU runtime the broadcast multiply costs ~0.2 ms over a [1, 10,000, 32]
    tensor. A served request is one user's sequence as it is, with no padding, so on
    TensorFlow the pass is skipped when every row is valid (a branch on `all(mask)`, which
    reads only the [B, r] mask); the result is the same either way.
    """

    def masked():
        return x * ops.cast(mask, x.dtype)[..., None]

    if keras.backend.backend() != "tensorflow":
        return masked()
    import tensorflow as tf

    return tf.cond(tf.reduce_all(mask), lambda: tf.identity(x), masked)


def masked_row_sum(x, mask=None):
    """`sum_r mask[b, r] * x[b, r, :]`, [B, c], as one matrix-vector product per example.

    A column sum of [r, c] by TensorFlow's reduction kernels costs ~3x the matvec
    `mask^T x` (~0.09 vs ~0.03 ms at r = 10,000, c = 32 on a 2-core CPU), and the mask is
    folded in with no pass of its own.
    """
    if mask is None:
        weights = ops.ones_like(x[..., 0])
    else:
        weights = ops.cast(mask, x.dtype)
    return per_example_matmul(weights[:, None, :], x)[:, 0]


def count_at_most(thresholds, values):
    """`#{t in thresholds : t <= v}` for each of the 1-D `values`; `thresholds` sorted, short.

    `ops.searchsorted(thresholds, values, side="right")`. On JAX that is a binary search
    written as a loop of ceil(log2(len)) steps, which a GPU runs as separate kernels with a
    host round trip per step: with IFA's three log2-bucketed features it was ~40% of the
    model's device time at m = n = 10,000 on an H100 (`benchmarks/results/gpu/`). Against a
    few dozen thresholds, comparing every value with every threshold is one fused kernel.
    """
    if keras.backend.backend() == "jax":
        import jax.numpy as jnp

        return jnp.searchsorted(thresholds, values, side="right", method="compare_all")
    return ops.searchsorted(thresholds, values, side="right")


def searchsorted_rows(sorted_rows, values, side="left"):
    """`searchsorted` of each row's `values` [B, m] in its own sorted row [B, n]: int32
    [B, m], O(m log n) per row, never an [m, n] comparison.

    `ops.searchsorted` takes 1-D sequences only. TensorFlow's op searches rows natively; on
    JAX each row is searched by `jnp.searchsorted(method="sort")` under `vmap`, one sort
    of the n + m values instead of a loop of log2(n) steps (which a GPU runs as separate
    kernels: see `count_at_most`); other backends map `ops.searchsorted` over the rows.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.searchsorted(sorted_rows, values, side=side, out_type=tf.int32)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def search(row, row_values):
            return jnp.searchsorted(row, row_values, side=side, method="sort")

        return jax.vmap(search)(sorted_rows, values).astype("int32")
    return ops.cast(ops.vectorized_map(
        lambda pair: ops.searchsorted(pair[0], pair[1], side=side), (sorted_rows, values)),
        "int32")
