"""The kernel feature maps phi of linear attention. All are non-negative, so the degree
D = phi(Q) (phi(K)^T 1) is too (paper 4.4).

- `"elu_plus_one"`, `"softplus"`, `"relu"`: element-wise.
- `"focused"`: FLatten's focused map, per head (Han et al., "FLatten Transformer: Vision
  Transformer using Focused Linear Attention", ICCV 2023):
  `phi_p(x) = ||relu(x)|| relu(x)^p / ||relu(x)^p||`, element-wise power p (the focusing
  factor, 3 by default as in the paper). It keeps the norm of relu(x) and pulls its
  direction towards its largest coordinates, so a query and a key that share their largest
  coordinates gain weight against the others: the weights get sharper as p grows (p = 1 is
  relu). The paper's depthwise-convolution rank restoration is for images and is not part
  of the map.
- `"hedgehog"`: Hedgehog's exponential map, per head (Zhang et al., "The Hedgehog & the
  Porcupine: Expressive Linear Attentions with Softmax Mimicry", ICLR 2024):
  `phi(x) = [exp(x W + b), exp(-(x W + b))]`, with a trainable W [k, k] and b [k] per head
  and per side (queries, keys), so the feature size doubles. W starts at the identity,
  b at zero; it is trained by the task loss (the paper's distillation from softmax
  weights needs a softmax teacher, which IFA avoids). `NormalizedLinearAttention` owns the
  weights; `hedgehog` below takes `x W + b` already computed, for queries and keys at
  once: its overflow guard scales both sides together.

Learnable sharpness (`NormalizedLinearAttention`'s options, off by default):
- `learnable_temperature`: a trainable temperature per head, phi(u / tau_h), tau_h =
  exp(t_h) with t_h starting at 0 (tau = 1: the map as it is). It changes the weights only
  where phi is not positively homogeneous: elu+1, softplus and Hedgehog. relu and the
  focused map satisfy phi(c u) = c phi(u), so a scale cancels in D^-1 phi(Q) (phi(K)^T V)
  and asking for it there is an error.
- `learnable_focusing_factor`: the focused map's power p as a trainable weight per head,
  starting at `focusing_factor` (3 by default) and kept >= 1.

The functions take projections as [..., heads * key_dim] float32 and return features as
[..., heads * feature_dim(name, key_dim)], each head's features contiguous.
"""

import keras
import numpy as np
from keras import ops

from ifa_tf.layers.validation import check_bool, check_choice

ELEMENTWISE_MAPS = {
    "elu_plus_one": lambda x: ops.elu(x) + 1.0,
    "softplus": ops.softplus,
    "relu": ops.relu,
}
FEATURE_MAPS = (*ELEMENTWISE_MAPS, "focused", "hedgehog")
DEFAULT_FOCUSING_FACTOR = 3
# The maps a temperature on their input changes: the others are positively homogeneous of
# degree 1, and the scale cancels in the normalised output.
TEMPERATURE_MAPS = ("elu_plus_one", "softplus", "hedgehog")

# Smallest normal float32: a floor for norms and degrees that keeps 1 / floor finite.
TINY = float(np.finfo("float32").tiny)


def check_feature_map(feature_map, focusing_factor=None, learnable_temperature=False,
                      learnable_focusing_factor=False, prefix=""):
    """Validates a feature map name and its options; errors name the argument, spelt with
    `prefix` (e.g. `"ram_"` for the model's `ram_feature_map`)."""
    names = {name: prefix + name for name in ("feature_map", "focusing_factor",
                                               "learnable_temperature",
                                               "learnable_focusing_factor")}
    check_choice(names["feature_map"], feature_map, FEATURE_MAPS)
    check_bool(names["learnable_temperature"], learnable_temperature)
    check_bool(names["learnable_focusing_factor"], learnable_focusing_factor)
    if learnable_temperature and feature_map not in TEMPERATURE_MAPS:
        raise ValueError(
            f"`{names['learnable_temperature']}` has no effect on {names['feature_map']}="
            f"{feature_map!r}: the map is positively homogeneous, so a scale on its input "
            f"cancels in the normalised output. It applies to {list(TEMPERATURE_MAPS)}. "
            f"Received: {names['learnable_temperature']}={learnable_temperature!r}")
    if learnable_focusing_factor and feature_map != "focused":
        raise ValueError(
            f"`{names['learnable_focusing_factor']}` learns the power of "
            f"{names['feature_map']}='focused' and has no effect on {names['feature_map']}="
            f"{feature_map!r}. Received: "
            f"{names['learnable_focusing_factor']}={learnable_focusing_factor!r}")
    if focusing_factor is None:
        return
    if feature_map != "focused":
        raise ValueError(
            f"`{names['focusing_factor']}` is the power of {names['feature_map']}='focused' "
            f"and has no effect on {names['feature_map']}={feature_map!r}. Received: "
            f"{names['focusing_factor']}={focusing_factor!r}")
    # p < 1 would flatten the weights instead of focusing them, and the gradient of
    # relu(x)^p is infinite at 0 for p < 1.
    if (not isinstance(focusing_factor, (int, float)) or isinstance(focusing_factor, bool)
            or not np.isfinite(focusing_factor) or focusing_factor < 1):
        raise ValueError(f"`{names['focusing_factor']}` must be a finite number >= 1. "
                         f"Received: {names['focusing_factor']}={focusing_factor!r}")


@keras.saving.register_keras_serializable(package="ifa_tf")
class AtLeastOne(keras.constraints.Constraint):
    """Keeps a learned focusing factor p >= 1: below 1 the map would flatten the weights
    instead of focusing them, and relu(x)^p has an infinite gradient at 0."""

    def __call__(self, w):
        return ops.maximum(w, ops.cast(1.0, w.dtype))

    def get_config(self):
        return {}


def feature_dim(feature_map, key_dim):
    """Size of one head's features: Hedgehog's are [exp(u), exp(-u)], twice the head."""
    return 2 * key_dim if feature_map == "hedgehog" else key_dim


def elementwise(feature_map, x):
    return ELEMENTWISE_MAPS[feature_map](x)


def focused(x, num_heads, focusing_factor=DEFAULT_FOCUSING_FACTOR):
    """FLatten's `||r|| r^p / ||r^p||` with r = relu(x), per head.

    `focusing_factor` is a number, or a float32 tensor [heads] (one learned power per head,
    each >= 1).

    The map is positively homogeneous of degree 1, phi(c x) = c phi(x), so it is computed on
    `r / max(r)` (entries in [0, 1]) and scaled back by `max(r)`: `r^p` and the norms never
    overflow, whatever p. A head whose r is all zero gets zero features, with finite
    gradients (the norms are floored at `TINY` inside the square root).
    """
    shape = ops.shape(x)
    rectified = ops.relu(_split_heads(x, num_heads))
    peak = ops.max(rectified, axis=-1, keepdims=True, initial=0.0)
    scaled = rectified / ops.maximum(peak, TINY)
    if not isinstance(focusing_factor, (int, float)):
        focusing_factor = ops.reshape(focusing_factor, (num_heads, 1))
    # r^p as exp(p log r), in place of TensorFlow's CPU Pow, which a micro-benchmark on a
    # busy machine put at about twice an Exp and a Log. The floor keeps log finite at
    # r = 0, where the power is then TINY^p ~ 0, and the gradient zero (the floor's), not
    # 0 * inf.
    powered = ops.exp(focusing_factor * ops.log(ops.maximum(scaled, TINY)))
    norm = ops.sqrt(ops.maximum(ops.sum(ops.square(scaled), axis=-1, keepdims=True), TINY))
    powered_norm = ops.sqrt(ops.maximum(ops.sum(ops.square(powered), axis=-1, keepdims=True),
                                        TINY))
    return ops.reshape(peak * norm * powered / powered_norm, shape)


def hedgehog(query, key, num_heads, key_mask=None):
    """Hedgehog's features of both sides, `[exp(u), exp(-u)]` per head, scaled so that
    nothing overflows and the scales cancel in D^-1 phi(Q) (phi(K)^T V).

    Args:
        query: [B, m, heads * k] float32, `u` of the queries (`x W + b` already applied).
        key: [B, n, heads * k] float32, `u` of the keys.
        num_heads: number of heads.
        key_mask: optional bool [B, n]; padded keys get zero features, whatever they hold.

    Returns:
        `(phi_q [B, m, heads * 2k], phi_k [B, n, heads * 2k], query_shift [B, m, heads])`,
        where the exact features are `exp(query_shift) phi_q` and `exp(c) phi_k`.

    A factor shared by all keys, or one per query, cancels in the normalised output (the
    caller scales epsilon by `exp(-query_shift)` to match). So key feature f is divided by
    exp(c_f), c_f its largest value over the valid keys, and query feature f multiplied by
    it: their product is unchanged. Each query's features are then divided by its largest
    (u_f + c_f) in the head, `query_shift`. Every feature is at most 1, and each query's
    largest term `phi_q,f phi_k,f` over the keys is exactly 1: D >= 1 whenever a key is
    valid, and float32 only loses terms more than ~87 below a row's largest, which carry
    no weight. A per-key shift (or a softmax over each key's features, as the authors'
    code does) would reweight the keys, and clipping u would change the kernel.
    """
    signed_query = _signed_heads(query, num_heads)  # [B, m, h, 2k]
    signed_key = _signed_heads(key, num_heads)  # [B, n, h, 2k]
    if key_mask is None:
        key_mask = ops.ones(ops.shape(signed_key)[:2], "bool")
    # exp(-inf) = 0: a padded key has zero features and sets no shift.
    signed_key = ops.where(key_mask[:, :, None, None], signed_key, -np.inf)
    # `initial`: an empty sequence (n = 0) or candidate set reduces without an error.
    key_shift = ops.max(signed_key, axis=1, keepdims=True, initial=-np.inf)  # [B, 1, h, 2k]
    has_key = ops.any(key_mask, axis=1)[:, None, None, None]
    key_shift = ops.stop_gradient(ops.where(has_key, key_shift, 0.0))
    query_logits = signed_query + key_shift
    query_shift = ops.stop_gradient(ops.max(query_logits, axis=-1, keepdims=True,
                                            initial=-np.inf))  # [B, m, h, 1]
    phi_q = ops.exp(query_logits - query_shift)
    phi_k = ops.exp(signed_key - key_shift)
    return (ops.reshape(phi_q, (*ops.shape(query)[:-1], 2 * query.shape[-1])),
            ops.reshape(phi_k, (*ops.shape(key)[:-1], 2 * key.shape[-1])), query_shift[..., 0])


def _signed_heads(x, num_heads):
    """[..., heads * k] -> [..., heads, 2k]: [x_h, -x_h] per head."""
    heads = _split_heads(x, num_heads)
    return ops.concatenate([heads, -heads], axis=-1)


def _split_heads(x, num_heads):
    """[..., heads * k] -> [..., heads, k]; k is static, so that a reshape of an empty
    tensor (n = 0) is not ambiguous."""
    return ops.reshape(x, (*ops.shape(x)[:-1], num_heads, x.shape[-1] // num_heads))
