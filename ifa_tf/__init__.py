"""ifa_tf: rank whole candidate sets against entire lifelong behaviour sequences.

    import ifa_tf
    model = ifa_tf.zoo.build("ifa")
    model.compile()
    model.fit(ifa_tf.data.make_dataset("data/train-*"))

The subpackages load on first use, so that `import ifa_tf` (and a serving client: `from
ifa_tf.serving import RestClient`) costs no Keras or TensorFlow start-up. `layers`,
`models`, `zoo` and the schema need only Keras (any backend); `data`, `export`, `serving`,
`training` and `benchmark` need TensorFlow. Once Keras is imported too, the zoo is, so
`keras.saving.load_model` finds every ifa_tf layer and model.
"""

import importlib
import sys

import wrapt

from ifa_tf.schema import FeatureSchema, default_schema

__version__ = "0.1.0"

_ON_DEMAND = ("layers", "models", "zoo", "data", "export", "serving", "training", "evaluation",
              "metrics", "diagnostics", "benchmark")

__all__ = ["FeatureSchema", "default_schema", *_ON_DEMAND]


def __getattr__(name):
    if name in _ON_DEMAND:
        return importlib.import_module(f"ifa_tf.{name}")
    raise AttributeError(f"module 'ifa_tf' has no attribute {name!r}")


# Keras registers a serialisable class when its module runs: import the zoo (every layer and
# model) once Keras is imported, but never in the middle of importing one of ours (which
# imports Keras itself, and ends with this hook again).
_KERAS_MODULES = ("ifa_tf.layers", "ifa_tf.models", "ifa_tf.zoo")
_imported = set()


def _register_with_keras(module):
    _imported.add(module.__name__)
    if "keras" not in _imported or "ifa_tf.zoo" in sys.modules:
        return
    if any(name in sys.modules and name not in _imported for name in _KERAS_MODULES):
        return
    importlib.import_module("ifa_tf.zoo")


for _name in ("keras", *_KERAS_MODULES):
    wrapt.register_post_import_hook(_register_with_keras, _name)
