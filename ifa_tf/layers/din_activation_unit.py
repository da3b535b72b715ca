import keras
from keras import ops

from ifa_tf.layers.masked_target_attention import masked_softmax
from ifa_tf.layers.validation import check_choice, check_units, clone_initializer


@keras.saving.register_keras_serializable(package="ifa_tf")
class DINActivationUnit(keras.layers.Layer):
    """DIN's local activation unit and weighted pooling (Zhou et al., KDD 2018).

    The weight of sequence item j for candidate i is an MLP of
    `[e_i, e_j, e_i - e_j, e_i * e_j]`; the interest vector is the weighted sum of the
    item embeddings. The first MLP layer is applied term by term
    (`W [q, k, q-k, q*k] = (W_q + W_d) q + (W_k - W_d) k + W_p (q*k)`), which is exact and
    never materialises the [B, m, k, 4d] concatenation.

    Args:
        hidden_units: the activation MLP's hidden sizes (DIN: [80, 40]).
        activation: its hidden activation.
        weight_normalization: `"softmax"` (default: weights over the valid items sum to 1,
            stable for long sequences) or `"none"` (the DIN paper's raw weights).
        kernel_initializer: for the MLP.

    Call arguments:
        query: candidates [B, m, d].
        key: sequence items [B, k, d].
        value: optional [B, k, d_v], what the weights pool; defaults to `key` (DIN's).
        query_mask: optional bool [B, m]; padded candidates get zero output.
        key_mask: optional bool [B, k]; padded items get zero weight.

    Returns:
        [B, m, d] ([B, m, d_v] with `value`).
    """

    def __init__(self, hidden_units=(80, 40), activation="sigmoid",
                 weight_normalization="softmax", kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = check_units("hidden_units", hidden_units)
        check_choice("weight_normalization", weight_normalization, ("softmax", "none"))
        self.activation = keras.activations.get(activation)
        self.weight_normalization = weight_normalization
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, query_shape, key_shape, value_shape=None):
        depth, first = query_shape[-1], self.hidden_units[0]
        init = self.kernel_initializer
        self.query_kernel = self.add_weight(name="query_kernel", shape=(depth, first),
                                            initializer=clone_initializer(init))
        self.key_kernel = self.add_weight(name="key_kernel", shape=(depth, first),
                                          initializer=clone_initializer(init))
        self.difference_kernel = self.add_weight(name="difference_kernel", shape=(depth, first),
                                                 initializer=clone_initializer(init))
        self.product_kernel = self.add_weight(name="product_kernel", shape=(depth, first),
                                              initializer=clone_initializer(init))
        self.first_bias = self.add_weight(name="first_bias", shape=(first,), initializer="zeros")
        self._hidden = []
        for i, units in enumerate([*self.hidden_units[1:], 1]):
            dense = keras.layers.Dense(
                units, activation=None if i == len(self.hidden_units) - 1 else self.activation,
                kernel_initializer=clone_initializer(init), dtype=self.dtype_policy,
                name=f"dense_{i + 1}")
            dense.build((None, None, None, self.hidden_units[i]))
            self._hidden.append(dense)
        self.built = True

    def call(self, query, key, value=None, query_mask=None, key_mask=None):
        value = key if value is None else value
        query_term = (ops.matmul(query, self.query_kernel + self.difference_kernel)
                      + self.first_bias)  # [B, m, h]
        key_term = ops.matmul(key, self.key_kernel - self.difference_kernel)  # [B, k, h]
        # One [B, m, k, d] product then one matmul: TensorFlow's three-operand einsum
        # costs twice as much, forward and backward.
        product_term = ops.matmul(query[:, :, None, :] * key[:, None, :, :],
                                  self.product_kernel)  # [B, m, k, h]
        hidden = self.activation(
            query_term[:, :, None, :] + key_term[:, None, :, :] + product_term)
        for dense in self._hidden:
            hidden = dense(hidden)
        logits = ops.cast(hidden[..., 0], "float32")  # [B, m, k]
        mask = None if key_mask is None else key_mask[:, None, :]
        if self.weight_normalization == "softmax":
            weights = masked_softmax(logits, mask)
        else:
            weights = logits if mask is None else logits * ops.cast(mask, "float32")
        output = ops.einsum("bmk,bkd->bmd", ops.cast(weights, value.dtype), value)
        if query_mask is not None:
            output = output * ops.cast(query_mask, output.dtype)[..., None]
        return output

    def compute_output_shape(self, query_shape, key_shape, value_shape=None):
        return (*query_shape[:-1], (value_shape or key_shape)[-1])

    def get_config(self):
        config = super().get_config()
        config.update({
            "hidden_units": self.hidden_units,
            "activation": keras.activations.serialize(self.activation),
            "weight_normalization": self.weight_normalization,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        })
        return config
