"""Training and evaluation: typed configs, `train_and_evaluate(config, workdir)`, the
streaming protocol and distribution strategies (`ifa-train` is a thin CLI over these)."""

from ifa_tf.training.checkpointing import TrainingDivergedError
from ifa_tf.training.config import (Config, DataConfig, EvalConfig, ModelConfig,
                                    TrainConfig, load_config, parse_override)
from ifa_tf.training.streaming import streaming_train_and_evaluate
from ifa_tf.training.trainer import build_model, evaluate, train_and_evaluate

__all__ = [
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "TrainConfig",
    "TrainingDivergedError",
    "build_model",
    "evaluate",
    "load_config",
    "parse_override",
    "streaming_train_and_evaluate",
    "train_and_evaluate",
]
