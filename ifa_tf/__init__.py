"""ifa_tf: rank whole candidate sets against entire lifelong behaviour sequences.

    import ifa_tf
    model = ifa_tf.zoo.build("ifa")
    model.compile()
    model.fit(ifa_tf.data.make_dataset("data/train-*"))

`layers`, `models`, `zoo` and the schema need only Keras (any backend); `data`, `export`,
`serving`, `training` and `benchmark` need TensorFlow and are imported on first use.
"""

import importlib

from ifa_tf import layers, models, zoo
from ifa_tf.schema import FeatureSchema, default_schema

__version__ = "0.1.0"

_ON_DEMAND = ("data", "export", "serving", "training", "evaluation", "metrics", "diagnostics",
              "benchmark")

__all__ = ["FeatureSchema", "default_schema", "layers", "models", "zoo", *_ON_DEMAND]


def __getattr__(name):
    if name in _ON_DEMAND:
        return importlib.import_module(f"ifa_tf.{name}")
    raise AttributeError(f"module 'ifa_tf' has no attribute {name!r}")
