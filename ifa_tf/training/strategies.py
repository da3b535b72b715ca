"""Distribution strategies and who writes files.

`default`: TensorFlow's default strategy (one device). `mirrored`: `MirroredStrategy` over
the local GPUs. `multi_worker`: `MultiWorkerMirroredStrategy`, the cluster read from
`TF_CONFIG`; only the chief (task `chief`, or `worker` 0 when there is no chief) writes
checkpoints, logs, the model and the metrics.
"""

import json
import os

import tensorflow as tf


def make_strategy(name):
    """The `tf.distribute.Strategy` called `name` (see `config.STRATEGIES`)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError("strategy='multi_worker' reads the cluster from the TF_CONFIG "
                             "environment variable, which is not set.")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        _patch_keras_multi_worker_mean()
        return strategy
    raise ValueError(f"Unknown strategy {name!r}. Valid: ['default', 'mirrored', "
                     "'multi_worker']")


def task_info():
    """`(task_type, task_id)` from `TF_CONFIG`, or `(None, 0)` outside a cluster."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = tf_config.get("task", {})
    return task.get("type"), int(task.get("index", 0))


def is_chief():
    """True for the process that writes files: the chief of a cluster, or the only one."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task_type, task_id = task_info()
    if task_type is None:
        return True
    if "chief" in tf_config.get("cluster", {}):
        return task_type == "chief"
    return task_type == "worker" and task_id == 0


def _patch_keras_multi_worker_mean():
    """Works around Keras 3's distributed `fit` under `MultiWorkerMirroredStrategy`: it
    averages every step's logs with `strategy.reduce("MEAN", value, axis=0)`, which fails on
    the scalar loss and metric values ("Invalid reduction dimension 0 for input with 0
    dimensions"). Scalars are averaged across workers with `axis=None` instead; every other
    case is left to Keras. Installed once, only when a multi-worker strategy is made."""
    from keras.src.backend.tensorflow import trainer as keras_trainer

    original = keras_trainer.reduce_per_replica
    if getattr(original, "ifa_tf_patched", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if (reduction not in ("auto", "mean")
                or not keras_trainer._collective_all_reduce_multi_worker(strategy)):
            return original(values, strategy, reduction)

        def mean(value):
            local = (strategy.experimental_local_results(value)[0]
                     if isinstance(value, tf.distribute.DistributedValues) else value)
            axis = 0 if getattr(local.shape, "rank", 0) else None
            return strategy.reduce("MEAN", value, axis=axis)

        return tf.nest.map_structure(mean, values)

    reduce_per_replica.ifa_tf_patched = True
    keras_trainer.reduce_per_replica = reduce_per_replica
