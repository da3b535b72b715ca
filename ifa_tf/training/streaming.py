"""The streaming protocol of the IFA paper (5.1): "for each batch of the data, we test the
model first for evaluation, and then train the model"."""

import math

import tensorflow as tf

from ifa_tf.training.checkpointing import TrainingDivergedError


def streaming_train_and_evaluate(model, dataset, evaluator, epochs=1):
    """Evaluates every batch of `dataset` with the current weights, then trains on it.

    Args:
        model: a compiled model.
        dataset: `(features, labels[, extras])` batches, in stream (time) order.
        evaluator: a `CandidateSetEvaluator`; it accumulates the predictions made before each
            training step, so its result is the cumulative streaming metric.
        epochs: passes over the stream; later passes evaluate on data already trained on,
            so only `epochs=1` is the paper's protocol.

    Returns:
        The training loss of every step, in order.

    Raises:
        TrainingDivergedError: a step's loss is NaN or infinite (training stops there).
    """
    predict = tf.function(lambda features: model(features, training=False),
                          reduce_retracing=True)
    losses = []
    for _ in range(epochs):
        for batch in dataset:
            features, labels = batch[0], batch[1]
            extras = batch[2] if len(batch) > 2 else None
            evaluator.update(features, labels, predict(features), extras)
            logs = model.train_on_batch(features, labels, return_dict=True)
            losses.append(float(logs["loss"]))
            if not math.isfinite(losses[-1]):
                raise TrainingDivergedError(
                    f"Training diverged: the loss became {losses[-1]} at step {len(losses)}; "
                    "nothing trained was written. Lower train.learning_rate "
                    "(--learning_rate) and train again.")
    return losses
