import keras
import numpy as np
from keras import ops

from ifa_tf.layers import feature_maps
from ifa_tf.layers.normalized_linear_attention import NormalizedLinearAttention

# Seconds in an hour and in a (365-day) year: the default decay time scales span them.
HOUR = 3600.0
YEAR = 365.0 * 86400.0


@keras.saving.register_keras_serializable(package="ifa_tf")
class DecayedLinearAttention(NormalizedLinearAttention):
    """Normalised linear attention whose keys fade with their age, per head, through a
    fixed-size state that new events update exactly (stateful IFA).

    Key i of head h weighs `exp(-lambda_h * age_i)` in both the numerator and the
    normaliser, with a learnable rate `lambda_h = exp(log_decay_rate_h)` per head:

        S_h = sum_i exp(-lambda_h age_i) phi(k_i) v_i^T,   z_h = sum_i exp(-lambda_h age_i) phi(k_i)
        E_h = phi(q) S_h / (phi(q) z_h + epsilon)

    `(S_h, z_h)` is the *state*, [B, heads, feature_dim, value_dim + 1] (z is the last
    column): everything the queries need from the keys, whatever their number. Moving the
    state `t` seconds later multiplies it by `exp(-lambda_h t)` (`advance_state`); a new key
    adds one outer product (`key_state` of it, summed): keys may come in any order and any
    chunks ("Transformers are RNNs", Katharopoulos et al., 2020). The keys carry what
    happened, not when: their age enters through the decay alone.

    `call(query, key, key_age=...)` computes `read_state(query, key_state(key, key_age))`,
    so training and stateful serving run the same code. Ages are computed in float64 before
    the exponential (a float32 age of a year is off by seconds).

    Feature maps: the element-wise maps and `"focused"` (per key, so per event). Hedgehog's
    overflow guard shifts every key by the largest one, which new events would change: it is
    refused. The output projection is optional as in the parent.

    Args:
        time_scales: the heads' starting time scales `1 / lambda_h` in seconds, one per
            head; `None`: log-spaced from an hour to a year (one head: a day).
        learnable_decay: train the rates (weight `log_decay_rate`, [num_heads]); False
            keeps the starting ones.
        Every other argument is `NormalizedLinearAttention`'s.

    Call arguments:
        query: [B, m, d_q]; key: [B, n, d_k]; value: [B, n, d_v], defaults to `key`.
        key_age: [B, n] seconds (>= 0; a negative age counts as 0) from each key's event
            to the query's time, int or float.
        query_mask, key_mask: optional bool [B, m] / [B, n] (see the parent).

    Example:
    >>> layer = DecayedLinearAttention(num_heads=2, key_dim=8)
    >>> out = layer(np.ones((1, 5, 16)), np.ones((1, 7, 16)), key_age=np.zeros((1, 7)))
    >>> out.shape
    (1, 5, 16)
    """

    def __init__(self, num_heads, key_dim, time_scales=None, learnable_decay=True, **kwargs):
        super().__init__(num_heads, key_dim, **kwargs)
        if self.feature_map == "hedgehog":
            raise ValueError(
                "DecayedLinearAttention's state must be updatable by new events alone; "
                "Hedgehog's features are scaled by the largest key, which a new event "
                "changes. Use 'elu_plus_one', 'softplus', 'relu' or 'focused'. Received: "
                f"feature_map={self.feature_map!r}")
        if time_scales is None:
            time_scales = (np.geomspace(HOUR, YEAR, num_heads) if num_heads > 1
                           else np.array([86400.0]))
        time_scales = [float(t) for t in np.ravel(time_scales)]
        if len(time_scales) != num_heads or not all(np.isfinite(t) and t > 0
                                                    for t in time_scales):
            raise ValueError("`time_scales` must hold one positive number of seconds per "
                             f"head ({num_heads}). Received: time_scales={time_scales!r}")
        if not isinstance(learnable_decay, bool):
            raise ValueError("`learnable_decay` must be True or False. Received: "
                             f"learnable_decay={learnable_decay!r}")
        self.time_scales = time_scales
        self.learnable_decay = learnable_decay

    def build(self, query_shape, key_shape, value_shape=None):
        super().build(query_shape, key_shape, value_shape)
        self._log_decay_rate = self.add_weight(
            shape=(self.num_heads,),
            initializer=keras.initializers.Constant(-np.log(self.time_scales)),
            trainable=self.learnable_decay, name="log_decay_rate")

    @property
    def state_shape(self):
        """(heads, feature_dim, value_dim + 1): one example's state."""
        return (self.num_heads, feature_maps.feature_dim(self.feature_map, self.key_dim),
                (self.value_dim or self.key_dim) + 1)

    def call(self, query, key, value=None, query_mask=None, key_mask=None, key_age=None):
        if key_age is None:
            raise ValueError("DecayedLinearAttention needs `key_age`, [B, n] seconds from "
                             "each key's event to the query's time.")
        if key_mask is None:
            key_mask = getattr(key, "_keras_mask", None)
        return self.read_state(query, self.key_state(key, key_age, value, key_mask),
                               query_mask=query_mask)

    def decay(self, elapsed):
        """`exp(-lambda_h * elapsed)`, float32 [..., heads], for `elapsed` [...] seconds.

        A negative `elapsed` counts as 0: a key never weighs more than at its event, so no
        age (a garbage one included) makes a weight, and with it a state, infinite."""
        rate = ops.exp(ops.cast(self._log_decay_rate, "float64"))
        elapsed = ops.maximum(ops.cast(elapsed, "float64"), 0.0)
        return ops.cast(ops.exp(-elapsed[..., None] * rate), "float32")

    def key_state(self, key, key_age, value=None, key_mask=None):
        """The state of the keys at their ages, [B, heads, feature_dim, value_dim + 1]."""
        value = key if value is None else value
        heads, feature_dim, columns = self.state_shape
        phi_k = self._feature_heads(key, self._key_dense, self._key_feature_weights)
        if key_mask is not None:
            # A padded key's age is never read: exp(-lambda * garbage) could be inf, and
            # inf * 0 is NaN.
            key_age = ops.where(key_mask, key_age, ops.zeros_like(key_age))
        weights = self.decay(key_age)  # [B, n, h]
        if key_mask is not None:
            weights = weights * ops.cast(key_mask, "float32")[..., None]
        phi_k = phi_k * weights[..., None]  # [B, n, h, f]
        key_sums = ops.sum(phi_k, axis=1)  # z: [B, h, f]
        # V is never formed over n (as in the parent): sum_i phi(k_i) v_i^T W_h + z b_h.
        keys_by_value = ops.einsum("bnhf,bnd->bhfd", phi_k, ops.cast(value, "float32"))
        summary = ops.einsum("bhfd,dhv->bhfv", keys_by_value,
                             ops.cast(self._value_dense.kernel, "float32"))
        if self.use_bias:
            summary = summary + key_sums[..., None] * ops.cast(self._value_dense.bias,
                                                               "float32")[None, :, None, :]
        return ops.concatenate([summary, key_sums[..., None]], axis=-1)

    def advance_state(self, state, elapsed):
        """`state` moved `elapsed` [B] seconds later (older events fade; a negative
        `elapsed` moves nothing, see `decay`)."""
        return state * self.decay(elapsed)[:, :, None, None]

    def read_state(self, query, state, query_mask=None):
        """The attention output of the queries against a state at their time."""
        heads, _, columns = self.state_shape
        phi_q = self._feature_heads(query, self._query_dense, self._query_feature_weights)
        numerator = ops.einsum("bmhf,bhfv->bmhv", phi_q, state[..., :-1])
        degree = ops.einsum("bmhf,bhf->bmh", phi_q, state[..., -1])
        scale = 1.0 / (degree + self.epsilon)
        if query_mask is not None:
            scale = scale * ops.cast(query_mask, "float32")[..., None]
        attended = ops.cast(numerator * scale[..., None], self.compute_dtype)
        if self._output_dense is not None:
            return self._output_dense(attended)
        return ops.reshape(attended, (*ops.shape(attended)[:-2], heads * (columns - 1)))

    def _feature_heads(self, inputs, dense, feature_weights):
        """phi of one side's projection, float32 [..., heads, feature_dim]."""
        projected = self._rows(self._project(inputs, dense, feature_weights), inputs)
        if self.feature_map in feature_maps.ELEMENTWISE_MAPS:
            features = feature_maps.elementwise(self.feature_map, projected)
        else:  # focused
            power = self.focusing_factor or feature_maps.DEFAULT_FOCUSING_FACTOR
            if self._focusing_factor is not None:
                power = ops.maximum(ops.cast(self._focusing_factor, "float32"), 1.0)
            features = feature_maps.focused(projected, self.num_heads, power)
        return ops.reshape(features, (*ops.shape(features)[:-1], self.num_heads,
                                      features.shape[-1] // self.num_heads))

    def attention_weights(self, query, key, query_mask=None, key_mask=None):
        raise NotImplementedError("DecayedLinearAttention's weights depend on the keys' "
                                  "ages; use the parent's for an undecayed view.")

    def get_config(self):
        return {**super().get_config(), "time_scales": self.time_scales,
                "learnable_decay": self.learnable_decay}
