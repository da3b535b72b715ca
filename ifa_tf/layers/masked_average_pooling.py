import keras
from keras import ops


@keras.saving.register_keras_serializable(package="ifa_tf")
class MaskedAveragePooling(keras.layers.Layer):
    """Mean of the valid rows of a sequence (the AvgPooling baseline's sequence module).

    Call arguments:
        sequence: [B, n, d].
        mask: optional bool [B, n], True where valid; defaults to the Keras mask, then to
            all-valid. A row without valid positions pools to zeros (no division by zero).

    Returns:
        [B, d].
    """

    def call(self, sequence, mask=None):
        if mask is None:
            mask = getattr(sequence, "_keras_mask", None)
        values = ops.cast(sequence, "float32")
        if mask is None:
            pooled = ops.mean(values, axis=1)
        else:
            weight = ops.cast(mask, "float32")[..., None]
            pooled = ops.sum(values * weight, axis=1) / ops.maximum(ops.sum(weight, axis=1), 1.0)
        return ops.cast(pooled, self.compute_dtype)

    def compute_mask(self, sequence, mask=None):
        return None

    def compute_output_shape(self, sequence_shape):
        return (sequence_shape[0], sequence_shape[-1])
