import sys

import keras
from keras import ops

from ifa_tf.losses import PerCandidateLoss, per_candidate
from ifa_tf.schema import CANDIDATE_PREFIX


class TrainingDefaultsMixin:
    """`compile()` with no arguments, and the candidate mask in every loss and metric.

    - Defaults: Adam, binary cross-entropy on every task's p(task | candidate) (paper
      Eq. 5 generalised to all tasks: the action losses are taken on the ESMM products),
      averaged over valid candidates, and AUC per task. Any optimizer, loss (one for all,
      or a dict per task), `loss_weights` and metrics may be passed instead; pointwise
      losses are applied per candidate (`ifa_tf.losses.per_candidate`).
    - Masking, one rule for everything: the candidate mask (`cand_item_id != 0`) is
      multiplied into the sample weight of every loss and every metric, so padded
      candidates never count. Metrics passed as `metrics=` are therefore evaluated as
      weighted metrics (Keras passes sample weights only to those).
    - Losses and metrics see only the outputs that have labels (`score` has none).

    Mixed into a `keras.Model` that has a `schema` attribute.
    """

    def compile(self, optimizer="adam", loss=None, loss_weights=None, metrics=None,
                weighted_metrics=None, **kwargs):
        tasks = self.schema.tasks
        if loss is None:
            loss = {task: PerCandidateLoss("binary_crossentropy", name=f"{task}_bce")
                    for task in tasks}
        elif isinstance(loss, dict):
            loss = {task: per_candidate(value) for task, value in loss.items()}
        else:
            loss = per_candidate(loss)
        if metrics is None and weighted_metrics is None:
            weighted_metrics = {task: [keras.metrics.AUC(name="auc")] for task in tasks}
        else:
            weighted_metrics = _merge_metrics(metrics, weighted_metrics)
        super().compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights,
                        weighted_metrics=weighted_metrics, **kwargs)

    def compile_from_config(self, config):
        # Keras skips compile state on load when `compile` is overridden; ours only fills
        # defaults, so replaying the saved arguments through it restores the same state.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, x=None, y=None, *args, **kwargs):
        # Keras cannot shuffle a tf.data dataset (it shuffles itself, as make_dataset's
        # do), and warns when its default shuffle=True meets one; an explicit value stands.
        if "shuffle" not in kwargs and len(args) < 7 and _is_tf_dataset(x):
            kwargs["shuffle"] = False
        return super().fit(self.checked_data(x, y), y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        return super().evaluate(self.checked_data(x, y), y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        return super().predict(self.checked_data(x), *args, **kwargs)

    def checked_data(self, x, y=None):
        """Validates in-memory feature dicts (and their labels) before Keras batches them;
        datasets are checked batch by batch when the model is called."""
        if isinstance(x, dict):
            x = self.schema.validate_features(x)
            if isinstance(y, dict):
                self.schema.validate_features({**x, **y}, with_labels=True)
        return x

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        y_pred = _labelled_outputs(y, y_pred)
        return super().compute_loss(x=x, y=y, y_pred=y_pred,
                                    sample_weight=self.candidate_weights(x, y, sample_weight),
                                    training=training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        y_pred = _labelled_outputs(y, y_pred)
        return super().compute_metrics(x, y, y_pred,
                                       sample_weight=self.candidate_weights(x, y, sample_weight))

    def candidate_weights(self, x, y, sample_weight=None):
        """Per-task [B, m] weights: the candidate mask times any user sample weight
        ([B] per request, [B, m] per candidate, or a dict of those per task)."""
        mask = ops.cast(ops.not_equal(x[CANDIDATE_PREFIX + "item_id"], 0), "float32")
        tasks = list(y) if isinstance(y, dict) else list(self.schema.tasks)

        def combine(weight):
            if weight is None:
                return mask
            weight = ops.cast(weight, "float32")
            return mask * (weight[:, None] if len(weight.shape) == 1 else weight)

        if isinstance(sample_weight, dict):
            return {task: combine(sample_weight.get(task)) for task in tasks}
        return {task: combine(sample_weight) for task in tasks}


def _is_tf_dataset(x):
    tf = sys.modules.get("tensorflow")  # never imported here: other backends need not have it
    return tf is not None and isinstance(x, tf.data.Dataset)


def _labelled_outputs(y, y_pred):
    if isinstance(y, dict) and isinstance(y_pred, dict):
        unknown = sorted(set(y) - set(y_pred))
        if unknown:
            raise ValueError(f"Labels {unknown} match no model output. Outputs: "
                             f"{sorted(y_pred)}")
        return {name: y_pred[name] for name in y}
    return y_pred


def _merge_metrics(metrics, weighted_metrics):
    if metrics is None or weighted_metrics is None:
        return metrics if weighted_metrics is None else weighted_metrics
    if isinstance(metrics, dict) and isinstance(weighted_metrics, dict):
        merged = {k: list(_as_list(v)) for k, v in weighted_metrics.items()}
        for key, value in metrics.items():
            merged.setdefault(key, []).extend(_as_list(value))
        return merged
    if isinstance(metrics, dict) or isinstance(weighted_metrics, dict):
        raise ValueError("Pass `metrics` and `weighted_metrics` in the same form (both dicts "
                         "keyed by task, or both lists); every metric is weighted by the "
                         "candidate mask anyway.")
    return [*_as_list(weighted_metrics), *_as_list(metrics)]


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]
