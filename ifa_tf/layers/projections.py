"""Multi-head projections shared by the attention layers.

Equations name every axis explicitly: TensorFlow 2.21's CPU einsum computes
`"...d,dhk->...hk"` wrongly in float16 (every row after the first), which breaks
`EinsumDense` with ellipses under mixed precision; `"abd,dhk->abhk"` is exact.
"""

import keras

from ifa_tf.layers.validation import clone_initializer

_BATCH_AXES = "abcefg"


def head_projection(name, input_shape, num_heads, head_dim, layer, use_bias=True):
    """[..., d] -> [..., num_heads, head_dim], built for `input_shape`."""
    batch = _BATCH_AXES[:len(input_shape) - 1]
    dense = keras.layers.EinsumDense(
        f"{batch}d,dhk->{batch}hk",
        output_shape=(*[None] * (len(input_shape) - 2), num_heads, head_dim),
        bias_axes="hk" if use_bias else None, dtype=layer.dtype_policy, name=name,
        **_initializers(layer))
    dense.build(input_shape)
    return dense


def merge_heads_projection(name, heads_shape, output_dim, layer, use_bias=True):
    """[..., num_heads, head_dim] -> [..., output_dim], built for `heads_shape`."""
    batch = _BATCH_AXES[:len(heads_shape) - 2]
    dense = keras.layers.EinsumDense(
        f"{batch}hk,hkd->{batch}d",
        output_shape=(*[None] * (len(heads_shape) - 3), output_dim),
        bias_axes="d" if use_bias else None, dtype=layer.dtype_policy, name=name,
        **_initializers(layer))
    dense.build(heads_shape)
    return dense


def _initializers(layer):
    initializers = {"kernel_initializer": clone_initializer(layer.kernel_initializer)}
    if getattr(layer, "bias_initializer", None) is not None:
        initializers["bias_initializer"] = clone_initializer(layer.bias_initializer)
    return initializers
