"""Training and evaluation: typed configs, `train_and_evaluate(config, workdir)`, the
streaming protocol and distribution strategies (`ifa-train` is a thin CLI over these).

The names below load on first use, so that `ifa_tf.training.config` (what `ifa-train`
checks its flags with) imports without TensorFlow.
"""

import importlib

_WHERE = {
    "Config": "config",
    "DataConfig": "config",
    "EvalConfig": "config",
    "ModelConfig": "config",
    "TrainConfig": "config",
    "TrainingDivergedError": "checkpointing",
    "load_config": "config",
    "parse_override": "config",
    "streaming_train_and_evaluate": "streaming",
    "build_model": "trainer",
    "evaluate": "trainer",
    "train_and_evaluate": "trainer",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"ifa_tf.training.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'ifa_tf.training' has no attribute {name!r}")
