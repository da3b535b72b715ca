"""Training and evaluation: typed configs, `train_and_evaluate(config, workdir)`, the
streaming protocol and distribution strategies (`ifa-train` is a thin CLI over these).

The names below load on first use, so that `ifa_tf.training.config` (what `ifa-train`
checks its flags with) imports without TensorFlow.
"""

from ifa_tf._lazy import lazy_names

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

__getattr__, __all__ = lazy_names(__name__, _WHERE)
