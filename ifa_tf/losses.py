"""Losses over candidate sets."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="ifa_tf")
class PerCandidateLoss(keras.losses.Loss):
    """Applies a pointwise Keras loss to every candidate and averages over valid ones.

    Keras' pointwise losses average over the last axis, which for [B, m] outputs is the
    candidate axis, padding included. This wrapper gives each candidate its own term
    ([B, m]) so the candidate-mask sample weight removes padded candidates exactly, and
    divides by the sum of the weights: the mean over valid candidates.

    With `BinaryCrossentropy` on the ESMM outputs this is the paper's Eq. 5 for every task.

    Args:
        loss: a pointwise `keras.losses.Loss` (or its name / config), e.g.
            `"binary_crossentropy"`.
    """

    def __init__(self, loss="binary_crossentropy", name=None,
                 reduction="mean_with_sample_weight", dtype=None):
        self.loss = keras.losses.get(loss)
        super().__init__(name=name or f"per_candidate_{_loss_name(self.loss)}",
                         reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        fn = self.loss.call if isinstance(self.loss, keras.losses.Loss) else self.loss
        return fn(y_true[..., None], y_pred[..., None])

    def get_config(self):
        config = super().get_config()
        config.update({"loss": keras.losses.serialize(self.loss)})
        return config


def per_candidate(loss):
    """`loss` made per-candidate, unless it already scores whole lists (keras-rs ranking
    losses take [B, m] lists with the mask as sample weight) or is a `PerCandidateLoss`."""
    loss = keras.losses.get(loss)
    if isinstance(loss, PerCandidateLoss) or type(loss).__module__.startswith("keras_rs"):
        return loss
    return PerCandidateLoss(loss)


def _loss_name(loss):
    return getattr(loss, "name", None) or getattr(loss, "__name__", "loss")
