import keras
from keras import ops

from ifa_tf.layers.validation import check_units, clone_initializer


@keras.saving.register_keras_serializable(package="ifa_tf")
class MLPTower(keras.layers.Layer):
    """A task tower (IFA Eq. 4): ReLU hidden layers, then one logit per position.

    Args:
        hidden_units: sizes of the hidden layers, e.g. `[128, 64]`.
        activation: hidden activation (the paper uses ReLU).
        dropout: dropout rate after each hidden layer.
        kernel_initializer, kernel_regularizer: for every Dense layer.

    Call arguments:
        inputs: [..., d].

    Returns:
        logits [...] (the trailing unit axis is squeezed), in the variables' dtype (float32
        under a mixed policy, whose compute dtype the hidden layers use). The caller applies
        the sigmoid, so products of probabilities (ESMM) can be formed in float32.
    """

    def __init__(self, hidden_units, activation="relu", dropout=0.0,
                 kernel_initializer="glorot_uniform", kernel_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = check_units("hidden_units", hidden_units)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        self.activation = keras.activations.get(activation)
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, input_shape):
        self._hidden = []
        self._dropouts = []
        shape = input_shape
        for i, units in enumerate(self.hidden_units):
            dense = keras.layers.Dense(
                units, activation=self.activation,
                kernel_initializer=clone_initializer(self.kernel_initializer),
                kernel_regularizer=self.kernel_regularizer,
                dtype=self.dtype_policy, name=f"hidden_{i}")
            dense.build(shape)
            shape = (*shape[:-1], units)
            self._hidden.append(dense)
            self._dropouts.append(
                keras.layers.Dropout(self.dropout, dtype=self.dtype_policy, name=f"dropout_{i}"))
        # The logit is one cheap [..., units] x [units, 1] product: under a mixed policy it
        # runs in the variables' dtype (float32): bfloat16 keeps ~3 significant digits.
        self._logit = keras.layers.Dense(1, kernel_regularizer=self.kernel_regularizer,
                                         dtype=self.dtype_policy.variable_dtype, name="logit")
        self._logit.build(shape)
        self.built = True

    def call(self, inputs, training=None):
        # The layers run on the inputs flattened to 2-D: on TensorFlow's CPU runtime
        # (oneDNN) a 2-D matmul fuses with its bias and ReLU into one kernel, where the
        # [..., d] form (a reshaped tensordot) costs two more passes over [..., units].
        x = ops.reshape(inputs, (-1, inputs.shape[-1]))
        for dense, dropout in zip(self._hidden, self._dropouts):
            x = dropout(dense(x), training=training)
        return ops.reshape(self._logit(x), ops.shape(inputs)[:-1])

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1])

    def get_config(self):
        config = super().get_config()
        config.update({
            "hidden_units": self.hidden_units,
            "activation": keras.activations.serialize(self.activation),
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
        })
        return config
