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
        return tf.distribute.MultiWorkerMirroredStrategy()
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
